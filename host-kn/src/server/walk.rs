//! The commands that walk the keyspace: `SCAN`, `KEYS`, `DBSIZE`, `RANDOMKEY`,
//! `FLUSHALL`/`FLUSHDB`, `CLUSTER COUNTKEYSINSLOT` and `CLUSTER GETKEYSINSLOT`.
//!
//! Each asks the shards for pages of their walk ([`Msg::Scan`], answered through a oneshot,
//! so the connection never blocks its thread). A KN's `SCAN` cursor is the shard's cursor
//! ([`SHARD_CURSOR_BITS`] bits) with the shard index above it: the shards are walked one
//! after the other, each next one started with a cursor that carries the map epoch, and a
//! shard that finds the map changed sends the walk back to the first shard. Like Redis's, a walk returns every key that exists from its start to
//! its end at least once, and may return a key more than once.

use std::collections::HashSet;

use dinomo_shared::resp::Out;
use dinomo_shared::slot::SLOTS;

use super::acl::glob_match;
use super::commands::upper;
use super::conn::{kv_error, Conn};
use crate::ownership::shard_of;
use crate::shard::{
    Msg, ReplyFn, Request, ScanMode, ScanPage, ScanRequest, ScanRestart, ShardTx, SHARD_CURSOR_BITS,
};
use crate::KvError;

/// `SCAN`'s default `COUNT`, as in Redis.
const DEFAULT_COUNT: usize = 10;
/// Shard pages one `SCAN` call asks for at most before it answers (bounds its latency
/// when few keys match).
const PAGES_PER_CALL: usize = 16;
/// Deletes `FLUSHALL` keeps in flight.
const FLUSH_WINDOW: usize = 256;
/// `FLUSHALL` logs its progress every this many keys.
const FLUSH_LOG_EVERY: u64 = 10_000;
const SHARD_MASK: u64 = (1 << SHARD_CURSOR_BITS) - 1;

/// One page of shard `tx`'s walk.
async fn page(tx: &ShardTx, req: ScanRequest) -> Result<ScanPage, KvError> {
    let (otx, orx) = tokio::sync::oneshot::channel();
    tx.send(Msg::Scan { req, reply: otx })
        .map_err(|_| KvError::ShuttingDown)?;
    orx.await.map_err(|_| KvError::ShuttingDown)?
}

/// Counts the live keys of one shard (of `slot`, if given) by a whole paged walk, and how
/// many of them have an expiry time.
async fn count_shard(tx: &ShardTx, slot: Option<u16>) -> Result<(u64, u64), KvError> {
    let mut req = ScanRequest {
        cursor: 0,
        count: usize::MAX,
        now_ms: crate::clock::now_ms(),
        slot,
        mode: ScanMode::Count,
    };
    let (mut own, mut index) = ((0, 0), (0, 0));
    loop {
        let p = page(tx, req).await?;
        match p.restart {
            ScanRestart::None => {}
            ScanRestart::Index => index = (0, 0),
            ScanRestart::All => (own, index) = ((0, 0), (0, 0)),
        }
        let part = if p.index_phase { &mut index } else { &mut own };
        part.0 += p.counted;
        part.1 += p.counted_expiring;
        if p.cursor == 0 {
            return Ok((own.0 + index.0, own.1 + index.1));
        }
        req.cursor = p.cursor;
    }
}

fn parse_u64(a: &[u8]) -> Option<u64> {
    std::str::from_utf8(a).ok()?.parse().ok()
}

impl Conn {
    /// `SCAN cursor [MATCH pattern] [COUNT count] [TYPE type]`.
    pub(super) async fn scan(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let Some(cursor) = parse_u64(&args[1]) else {
            return o.error("ERR invalid cursor");
        };
        let mut pattern: Option<&[u8]> = None;
        let mut count = DEFAULT_COUNT;
        let mut strings = true;
        let mut i = 2;
        while i < args.len() {
            let Some(v) = args.get(i + 1) else {
                return o.error("ERR syntax error");
            };
            match upper(&args[i]).as_str() {
                "MATCH" => pattern = Some(v),
                "COUNT" => match std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    None => return o.error("ERR value is not an integer or out of range"),
                    Some(n) if n < 1 => return o.error("ERR syntax error"),
                    Some(n) => count = n.min(1 << 20) as usize,
                },
                "TYPE" => strings = v.eq_ignore_ascii_case(b"string"),
                _ => return o.error("ERR syntax error"),
            }
            i += 2;
        }
        let shards = self.shared.shards.len();
        let mut shard = (cursor >> SHARD_CURSOR_BITS) as usize;
        let mut sc = cursor & SHARD_MASK;
        if shard >= shards {
            return o.error("ERR invalid cursor");
        }
        let mut keys: Vec<Vec<u8>> = Vec::new();
        if !strings {
            // Every key here is a string: the walk is empty to its end.
            shard = shards;
        }
        let now = crate::clock::now_ms();
        let mut pages = 0;
        while shard < shards && keys.len() < count && pages < PAGES_PER_CALL {
            let Some(tx) = self.shared.shards.get(shard) else {
                break;
            };
            let req = ScanRequest {
                cursor: sc,
                count: count - keys.len(),
                now_ms: now,
                slot: None,
                mode: ScanMode::Keys,
            };
            let p = match page(tx, req).await {
                Ok(p) => p,
                Err(e) => return o.error(&kv_error(&e)),
            };
            pages += 1;
            let restarted = p.restart == ScanRestart::All;
            keys.extend(
                p.keys
                    .into_iter()
                    .map(|k| k.key)
                    .filter(|k| pattern.map_or(true, |pat| glob_match(pat, k))),
            );
            if restarted && shard > 0 {
                // The cluster map changed since the walk began: shards already walked may
                // have gained slots, so the walk starts over (keys may repeat, none is
                // skipped).
                shard = 0;
                sc = 0;
            } else if p.cursor == 0 {
                shard += 1;
                sc = p.fresh;
            } else {
                sc = p.cursor;
            }
        }
        let next = if shard >= shards {
            0
        } else {
            ((shard as u64) << SHARD_CURSOR_BITS) | sc
        };
        o.array(2);
        o.bulk(next.to_string().as_bytes());
        o.array(keys.len());
        for k in &keys {
            o.bulk(k);
        }
    }

    /// `KEYS pattern`: a whole walk of every shard.
    pub(super) async fn keys(&mut self, pattern: &[u8], o: &mut Out<'_>) {
        let limit = self.shared.client.reply;
        let now = crate::clock::now_ms();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0usize;
        for tx in &self.shared.shards {
            let mut seen = HashSet::new();
            let mut req = ScanRequest {
                cursor: 0,
                count: 1 << 16,
                now_ms: now,
                slot: None,
                mode: ScanMode::Keys,
            };
            loop {
                let p = match page(tx, req).await {
                    Ok(p) => p,
                    Err(e) => return o.error(&kv_error(&e)),
                };
                for k in p.keys {
                    if glob_match(pattern, &k.key) && seen.insert(k.key.clone()) {
                        bytes += k.key.len() + 16;
                        keys.push(k.key);
                    }
                }
                if bytes > limit {
                    return o.error(&format!(
                        "ERR the reply would exceed client-reply-limit ({limit} bytes); use SCAN"
                    ));
                }
                if p.cursor == 0 {
                    break;
                }
                req.cursor = p.cursor;
            }
        }
        o.array(keys.len());
        for k in &keys {
            o.bulk(k);
        }
    }

    /// `DBSIZE`: the live keys of this KN's slots.
    pub(super) async fn dbsize(&mut self, o: &mut Out<'_>) {
        match self.count_keys().await {
            Ok((n, _)) => o.int(n as i64),
            Err(e) => o.error(&kv_error(&e)),
        }
    }

    /// The live keys of this KN's slots, and how many of them have an expiry time (a walk
    /// of every shard).
    pub(super) async fn count_keys(&self) -> Result<(u64, u64), KvError> {
        let mut total = (0, 0);
        for tx in &self.shared.shards {
            let (n, e) = count_shard(tx, None).await?;
            total = (total.0 + n, total.1 + e);
        }
        Ok(total)
    }

    /// `RANDOMKEY`: a key of the first shard (from a random one on) that has any; nil when
    /// this KN holds none.
    pub(super) async fn randomkey(&mut self, o: &mut Out<'_>) {
        let shards = self.shared.shards.len();
        let mut x = (crate::clock::now_ms() ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let first = if shards == 0 {
            0
        } else {
            rand() as usize % shards
        };
        let now = crate::clock::now_ms();
        for s in 0..shards {
            let Some(tx) = self.shared.shards.get((first + s) % shards) else {
                continue;
            };
            let mut req = ScanRequest {
                cursor: 0,
                count: 64,
                now_ms: now,
                slot: None,
                mode: ScanMode::Keys,
            };
            loop {
                let p = match page(tx, req).await {
                    Ok(p) => p,
                    Err(e) => return o.error(&kv_error(&e)),
                };
                if !p.keys.is_empty() {
                    let k = &p.keys[rand() as usize % p.keys.len()];
                    return o.bulk(&k.key);
                }
                if p.cursor == 0 {
                    break;
                }
                req.cursor = p.cursor;
            }
        }
        o.null();
    }

    /// `FLUSHALL`/`FLUSHDB [SYNC|ASYNC]`: deletes every key of this KN's slots through the
    /// shards' write path (each delete is logged and durable like a `DEL`). Both modes
    /// answer once every delete is durable.
    pub(super) async fn flushall(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        if let Some(m) = args.get(1) {
            if !m.eq_ignore_ascii_case(b"SYNC") && !m.eq_ignore_ascii_case(b"ASYNC") {
                return o.error("ERR syntax error");
            }
        }
        let kn = self.shared.kn_id;
        let mut deleted = 0u64;
        for tx in &self.shared.shards {
            let mut req = ScanRequest {
                cursor: 0,
                count: 4096,
                now_ms: crate::clock::now_ms(),
                slot: None,
                mode: ScanMode::Keys,
            };
            loop {
                let p = match page(tx, req).await {
                    Ok(p) => p,
                    Err(e) => return o.error(&kv_error(&e)),
                };
                for part in p.keys.chunks(FLUSH_WINDOW) {
                    let mut waits = Vec::with_capacity(part.len());
                    for k in part {
                        let (otx, orx) = tokio::sync::oneshot::channel();
                        let sent = tx.send(Msg::ReqFn {
                            op: Request::Delete { key: k.key.clone() },
                            tag: 0,
                            reply: ReplyFn(Box::new(move |r| {
                                let _ = otx.send(r.result);
                            })),
                        });
                        if sent.is_err() {
                            return o.error(&kv_error(&KvError::ShuttingDown));
                        }
                        waits.push(orx);
                    }
                    for w in waits {
                        match w.await.map_err(|_| KvError::ShuttingDown).and_then(|r| r) {
                            Ok(_) => {
                                deleted += 1;
                                if deleted % FLUSH_LOG_EVERY == 0 {
                                    tracing::info!(kn, deleted, "FLUSHALL in progress");
                                }
                            }
                            // The slot moved away meanwhile: its keys are another KN's now.
                            Err(KvError::WrongOwner { .. }) => {}
                            Err(e) => return o.error(&kv_error(&e)),
                        }
                    }
                }
                if p.cursor == 0 {
                    break;
                }
                req.cursor = p.cursor;
            }
        }
        if deleted >= FLUSH_LOG_EVERY {
            tracing::info!(kn, deleted, "FLUSHALL done");
        }
        o.simple("OK");
    }

    /// `CLUSTER COUNTKEYSINSLOT slot` and `CLUSTER GETKEYSINSLOT slot count` (0 and none
    /// for a slot this KN does not own).
    pub(super) async fn cluster_keys(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let get = upper(&args[1]) == "GETKEYSINSLOT";
        let slot = std::str::from_utf8(&args[2])
            .ok()
            .and_then(|s| s.parse::<i64>().ok());
        let Some(slot) = slot else {
            return o.error("ERR value is not an integer or out of range");
        };
        let count = if get {
            match std::str::from_utf8(&args[3])
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                None => return o.error("ERR value is not an integer or out of range"),
                Some(n) => n,
            }
        } else {
            0
        };
        if !(0..i64::from(SLOTS)).contains(&slot) || count < 0 {
            return o.error(if get {
                "ERR Invalid slot or number of keys"
            } else {
                "ERR Invalid slot"
            });
        }
        let slot = slot as u16;
        self.refresh();
        let tx = if self.view.map.owner(slot) == self.shared.kn_id {
            self.shared
                .shards
                .get(shard_of(slot, self.shared.shards.len()))
        } else {
            None
        };
        if !get {
            let n = match tx {
                Some(tx) => match count_shard(tx, Some(slot)).await.map(|(n, _)| n) {
                    Ok(n) => n,
                    Err(e) => return o.error(&kv_error(&e)),
                },
                None => 0,
            };
            return o.int(n as i64);
        }
        let want = count.min(1 << 20) as usize;
        let mut keys = Vec::new();
        if let Some(tx) = tx {
            let mut seen = HashSet::new();
            let mut req = ScanRequest {
                cursor: 0,
                count: want.max(1),
                now_ms: crate::clock::now_ms(),
                slot: Some(slot),
                mode: ScanMode::Keys,
            };
            while keys.len() < want {
                let p = match page(tx, req).await {
                    Ok(p) => p,
                    Err(e) => return o.error(&kv_error(&e)),
                };
                for k in p.keys {
                    if keys.len() < want && seen.insert(k.key.clone()) {
                        keys.push(k.key);
                    }
                }
                if p.cursor == 0 {
                    break;
                }
                req.cursor = p.cursor;
            }
        }
        o.array(keys.len());
        for k in &keys {
            o.bulk(k);
        }
    }
}
