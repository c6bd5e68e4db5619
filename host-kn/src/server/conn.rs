//! Client connections: RESP framing, routing each key to its owner shard (or refusing it
//! with `MOVED`/`TRYAGAIN`), and the data commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::entry::MAX_KEY_LEN;
use dinomo_shared::resp::{parse_command, Out, Proto};
use dinomo_shared::slot::key_slot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::commands::upper;
use super::{Shared, View};
use crate::ownership::shard_of;
use crate::shard::{Msg, ReplyFn, Request};
use crate::KvError;

/// Accepts client connections until `stop` is set, the lease is lost, or the manager asked
/// this KN to leave.
pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(connection(Arc::clone(&shared), s));
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = tick.tick() => {
                if stop.load(Ordering::Acquire)
                    || shared.fenced.load(Ordering::Acquire)
                    || shared.drain.load(Ordering::Acquire)
                {
                    return Ok(());
                }
            }
        }
    }
}

/// Per-connection state.
pub(super) struct Conn {
    pub(super) shared: Arc<Shared>,
    pub(super) view: Arc<View>,
    version: u64,
    pub(super) proto: Proto,
}

async fn connection(shared: Arc<Shared>, mut sock: tokio::net::TcpStream) {
    let version = shared.version.load(Ordering::Acquire);
    let stripe = shared.conns.fetch_add(1, Ordering::Relaxed) as usize;
    let mut c = Conn {
        view: shared.view(),
        shared,
        version,
        proto: Proto::Resp2,
    };
    let limits = c.shared.limits;
    let mut inbuf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut out: Vec<u8> = Vec::with_capacity(16 << 10);
    loop {
        let mut pos = 0;
        let mut close = false;
        loop {
            match parse_command(&inbuf[pos..], &limits) {
                Ok(Some((args, n))) => {
                    pos += n;
                    if args.is_empty() {
                        continue;
                    }
                    let t0 = Instant::now();
                    let quit = c.exec(&args, &mut out).await;
                    c.shared.latency.record(stripe, t0.elapsed());
                    if quit {
                        close = true;
                        break;
                    }
                    if out.len() > 1 << 20 {
                        if sock.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    Out {
                        buf: &mut out,
                        proto: c.proto,
                    }
                    .error(&format!("ERR {e}"));
                    close = true;
                    break;
                }
            }
        }
        inbuf.drain(..pos);
        if !out.is_empty() {
            if sock.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            let _ = sock.shutdown().await;
            return;
        }
        inbuf.reserve(16 << 10);
        match sock.read_buf(&mut inbuf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Where a key's request goes.
enum Route {
    Shard(Sender<Msg>),
    /// Refused with this error line.
    Refuse(String),
}

/// Sends one request to a shard and waits for its answer.
async fn call(tx: &Sender<Msg>, op: Request) -> Result<Option<Vec<u8>>, KvError> {
    let (otx, orx) = tokio::sync::oneshot::channel();
    tx.send(Msg::ReqFn {
        op,
        tag: 0,
        reply: ReplyFn(Box::new(move |r| {
            let _ = otx.send(r.result);
        })),
    })
    .map_err(|_| KvError::ShuttingDown)?;
    orx.await.map_err(|_| KvError::ShuttingDown)?
}

fn kv_error(e: &KvError) -> String {
    match e {
        KvError::WrongOwner { .. } => "TRYAGAIN the slot is changing owner".into(),
        e @ KvError::TryAgain { .. } => e.to_string(),
        KvError::ShuttingDown => "TRYAGAIN the node is shutting down".into(),
        KvError::RegionFull => crate::error::REGION_FULL_REPLY.into(),
        e => format!("ERR {e}"),
    }
}

impl Conn {
    pub(super) fn refresh(&mut self) {
        let v = self.shared.version.load(Ordering::Acquire);
        if v != self.version {
            self.view = self.shared.view();
            self.version = v;
        }
    }

    fn route(&self, slot: u16) -> Route {
        let v = &self.view;
        let owner = v.map.owner(slot);
        if owner != self.shared.kn_id {
            return match v.addrs.get(&owner) {
                Some(a) => Route::Refuse(format!("MOVED {slot} {a}")),
                None => Route::Refuse("CLUSTERDOWN Hash slot not served".into()),
            };
        }
        if v.moving[slot as usize] {
            return Route::Refuse("TRYAGAIN the slot is moving to this node".into());
        }
        if !self.shared.lease_ok() {
            return Route::Refuse("TRYAGAIN this node's lease is being renewed".into());
        }
        let shards = &self.shared.shards;
        Route::Shard(shards[shard_of(slot, shards.len())].clone())
    }

    /// The common slot of `keys`, or the error to answer.
    fn slot_of(&self, keys: &[&[u8]]) -> Result<u16, String> {
        let first = key_slot(keys.first().copied().unwrap_or_default());
        if keys.iter().any(|k| key_slot(k) != first) {
            return Err("CROSSSLOT Keys in request don't hash to the same slot".into());
        }
        for k in keys {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(format!(
                    "ERR key length {} is outside 1..={MAX_KEY_LEN}",
                    k.len()
                ));
            }
        }
        Ok(first)
    }

    /// The shard for `keys` (all in one slot), or the error to answer.
    fn shard_for(&mut self, keys: &[&[u8]]) -> Result<Sender<Msg>, String> {
        self.refresh();
        let slot = self.slot_of(keys)?;
        match self.route(slot) {
            Route::Shard(tx) => Ok(tx),
            Route::Refuse(e) => Err(e),
        }
    }

    /// Executes one command; returns whether to close the connection afterwards.
    async fn exec(&mut self, args: &[Vec<u8>], buf: &mut Vec<u8>) -> bool {
        let name = upper(&args[0]);
        let argc = args.len();
        let proto = self.proto;
        let mut o = Out { buf, proto };
        let arity = |o: &mut Out<'_>| {
            o.error(&format!(
                "ERR wrong number of arguments for '{}' command",
                name.to_ascii_lowercase()
            ))
        };
        match name.as_str() {
            "PING" => match argc {
                1 => o.simple("PONG"),
                2 => o.bulk(&args[1]),
                _ => arity(&mut o),
            },
            "ECHO" if argc == 2 => o.bulk(&args[1]),
            "QUIT" => {
                o.simple("OK");
                return true;
            }
            "HELLO" => self.hello(args, &mut o),
            "SELECT" if argc == 2 => {
                if args[1] == b"0" {
                    o.simple("OK")
                } else {
                    o.error("ERR SELECT is not allowed in cluster mode")
                }
            }
            "CLIENT" | "READONLY" | "READWRITE" | "RESET" => o.simple("OK"),
            "COMMAND" => o.array(0),
            "CONFIG" => o.map(0),
            "GET" if argc == 2 => match self.shard_for(&[&args[1]]) {
                Err(e) => o.error(&e),
                Ok(tx) => match call(
                    &tx,
                    Request::Get {
                        key: args[1].clone(),
                    },
                )
                .await
                {
                    Ok(Some(v)) => o.bulk(&v),
                    Ok(None) => o.null(),
                    Err(e) => o.error(&kv_error(&e)),
                },
            },
            "SET" if argc >= 3 => {
                if argc != 3 {
                    o.error("ERR syntax error (only plain SET key value is supported)");
                } else if args[2].len() > self.shared.max_value {
                    o.error(&format!(
                        "ERR value of {} bytes exceeds the limit of {} bytes",
                        args[2].len(),
                        self.shared.max_value
                    ));
                } else {
                    match self.shard_for(&[&args[1]]) {
                        Err(e) => o.error(&e),
                        Ok(tx) => {
                            let op = Request::Put {
                                key: args[1].clone(),
                                value: args[2].clone(),
                            };
                            match call(&tx, op).await {
                                Ok(_) => o.simple("OK"),
                                Err(e) => o.error(&kv_error(&e)),
                            }
                        }
                    }
                }
            }
            "DEL" | "UNLINK" | "EXISTS" if argc >= 2 => {
                let keys: Vec<&[u8]> = args[1..].iter().map(Vec::as_slice).collect();
                match self.shard_for(&keys) {
                    Err(e) => o.error(&e),
                    Ok(tx) => match count_keys(&tx, &keys, name != "EXISTS").await {
                        Ok(n) => o.int(n),
                        Err(e) => o.error(&kv_error(&e)),
                    },
                }
            }
            "MGET" if argc >= 2 => {
                let keys: Vec<&[u8]> = args[1..].iter().map(Vec::as_slice).collect();
                match self.shard_for(&keys) {
                    Err(e) => o.error(&e),
                    Ok(tx) => match mget(&tx, &keys).await {
                        Ok(vals) => {
                            o.array(vals.len());
                            for v in vals {
                                match v {
                                    Some(v) => o.bulk(&v),
                                    None => o.null(),
                                }
                            }
                        }
                        Err(e) => o.error(&kv_error(&e)),
                    },
                }
            }
            "MSET" if argc >= 3 && argc % 2 == 1 => {
                let keys: Vec<&[u8]> = args[1..].iter().step_by(2).map(Vec::as_slice).collect();
                let too_big = args[2..]
                    .iter()
                    .step_by(2)
                    .any(|v| v.len() > self.shared.max_value);
                match self.shard_for(&keys) {
                    Err(e) => o.error(&e),
                    Ok(_) if too_big => o.error(&format!(
                        "ERR a value exceeds the limit of {} bytes",
                        self.shared.max_value
                    )),
                    Ok(tx) => match mset(&tx, &args[1..]).await {
                        Ok(()) => o.simple("OK"),
                        Err(e) => o.error(&kv_error(&e)),
                    },
                }
            }
            "INFO" => {
                let shared = Arc::clone(&self.shared);
                let stats = tokio::task::spawn_blocking(move || shared.stats())
                    .await
                    .unwrap_or_default();
                self.refresh();
                o.text(&self.info(&stats));
            }
            "CLUSTER" if argc >= 2 => {
                self.refresh();
                self.cluster(args, &mut o);
            }
            "GET" | "SET" | "DEL" | "UNLINK" | "EXISTS" | "MGET" | "MSET" | "ECHO" | "SELECT"
            | "CLUSTER" => arity(&mut o),
            _ => {
                let mut shown = String::new();
                for a in args.iter().skip(1).take(8) {
                    shown.push('\'');
                    shown.push_str(&String::from_utf8_lossy(&a[..a.len().min(64)]));
                    shown.push_str("' ");
                }
                o.error(&format!(
                    "ERR unknown command '{}', with args beginning with: {shown}",
                    String::from_utf8_lossy(&args[0][..args[0].len().min(64)])
                ));
            }
        }
        false
    }
}

/// Gets (and with `delete`, deletes) `keys` on one shard; returns how many existed.
async fn count_keys(tx: &Sender<Msg>, keys: &[&[u8]], delete: bool) -> Result<i64, KvError> {
    let mut n = 0;
    for (i, v) in mget(tx, keys).await?.into_iter().enumerate() {
        if v.is_some() {
            n += 1;
            if delete {
                call(
                    tx,
                    Request::Delete {
                        key: keys[i].to_vec(),
                    },
                )
                .await?;
            }
        }
    }
    Ok(n)
}

/// Gets `keys` from one shard with every request in flight at once.
async fn mget(tx: &Sender<Msg>, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
    let mut waits = Vec::with_capacity(keys.len());
    for k in keys {
        let (otx, orx) = tokio::sync::oneshot::channel();
        tx.send(Msg::ReqFn {
            op: Request::Get { key: k.to_vec() },
            tag: 0,
            reply: ReplyFn(Box::new(move |r| {
                let _ = otx.send(r.result);
            })),
        })
        .map_err(|_| KvError::ShuttingDown)?;
        waits.push(orx);
    }
    let mut out = Vec::with_capacity(keys.len());
    for w in waits {
        out.push(w.await.map_err(|_| KvError::ShuttingDown)??);
    }
    Ok(out)
}

/// Sets key/value pairs on one shard (they share one group commit when they fit a batch).
async fn mset(tx: &Sender<Msg>, kv: &[Vec<u8>]) -> Result<(), KvError> {
    let mut waits = Vec::new();
    for pair in kv.chunks_exact(2) {
        let (otx, orx) = tokio::sync::oneshot::channel();
        tx.send(Msg::ReqFn {
            op: Request::Put {
                key: pair[0].clone(),
                value: pair[1].clone(),
            },
            tag: 0,
            reply: ReplyFn(Box::new(move |r| {
                let _ = otx.send(r.result);
            })),
        })
        .map_err(|_| KvError::ShuttingDown)?;
        waits.push(orx);
    }
    for w in waits {
        w.await.map_err(|_| KvError::ShuttingDown)??;
    }
    Ok(())
}
