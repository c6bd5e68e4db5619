//! Walking a shard's keys in the DPM index: SCAN, KEYS, DBSIZE, RANDOMKEY, FLUSHALL and
//! CLUSTER COUNTKEYSINSLOT / GETKEYSINSLOT are built on one paged walk.
//!
//! A walk has two phases. Phase 0 hands out the shard's own unmerged puts (those the index
//! may not hold yet), in the order of the top 32 bits of their key hash, so that it can be
//! paged without keeping a snapshot. Phase 1 walks the index's head buckets in order, a
//! chunk per page (64 KiB to 1 MiB of head buckets, sized by the page's `COUNT` and the
//! share of slots the shard serves; cut short at 16 384 candidate entries or 4 MiB of
//! them): one READ of the chunk together with the root word (one round trip), one round
//! trip per level of overflow buckets of the chunk's chains, then the chunk's candidate
//! entries, one round trip per [`MAX_WRS`] READs (one when they fit). Reads are coalesced: overflow buckets lie close together
//! in the index area, and entries of one log block are fetched by one READ when they are
//! close enough (the smallest gap, from 4 KiB up, whose READs fit one round trip of
//! [`MAX_WRS`], within 8 MiB); unknown block salts come by header READs posted with them.
//! Each entry is verified (salted CRC, length, the slot's hash is its key's hash) and kept
//! if this shard owns its slot, no newer own write deleted it, and it has not expired.
//!
//! The buffers (1 MiB of buckets, the entries buffer, up to 16 MiB) are registered at the
//! shard's first walk and kept.
//!
//! Why no key that exists throughout a walk is skipped: when phase 0 passes a key's hash it
//! is either an unmerged own put (handed out) or already merged (a shard forgets an own
//! write only once the DPM merged it), and a merged key stays in its chain of the current
//! table until it is deleted. Phase 1 therefore meets it, unless the table is replaced by a
//! resize: the cursor carries the low bits of the table generation, and a walk that finds
//! the generation changed (in the cursor, the root word read with every chunk, or a bucket's
//! meta word) restarts phase 1 from bucket 0 of the new table. Keys may come twice (as
//! Redis's SCAN allows), never not at all. The cursor also carries the low bits of the
//! cluster map epoch: a cursor from before a slot moved starts over, so keys that moved in
//! are not skipped.
//!
//! Cursor (56 bits; the KN puts its shard index above them): bit 55 is always set (so a
//! cursor in progress is never 0, which means start and done), bits 53..55 the phase,
//! 45..53 the map epoch, 37..45 the table generation, 0..37 the position (phase 0: the next
//! 32-bit hash prefix; phase 1: the next head bucket). A cursor that does not decode, or
//! names a bucket past the table, is refused ([`KvError::InvalidCursor`]): a client can
//! never make the shard READ outside the index.

use dinomo_hw::fabric::{execute, Completion, CompletionStatus, Fabric, LocalBuf, Verb};
use dinomo_hw::fabric::{WorkRequest, WrId};
use dinomo_shared::block::{BlockHeader, BLOCK_MAGIC};
use dinomo_shared::entry::{self, Op, ENTRY_HEADER_SIZE};
use dinomo_shared::hash::{key_hash, EMPTY_HASH};
use dinomo_shared::index::{Bucket, EntryRef, RootWord, BUCKET_SIZE};
use dinomo_shared::pod::Pod;
use dinomo_shared::slot::{key_slot, SLOTS};

use super::{Shard, ShardConfig};
use crate::error::KvError;
use crate::ownership::{shard_of, SlotMap};

/// Work requests posted per round trip (below the fabric's queue depth of 256).
pub const MAX_WRS: usize = 224;
/// Head buckets read per page at least (64 KiB) and at most (1 MiB).
const CHUNK_MIN: u64 = 1 << 10;
const CHUNK_MAX: u64 = 1 << 14;
/// A page stops taking head buckets once their candidates reach this many...
const CANDIDATES_MAX: usize = 16384;
/// ...or their entries this many bytes.
const ENTRY_BYTES_MAX: u64 = 4 << 20;
/// Entries of one block at most this far apart are fetched by one READ (the smallest of
/// these gaps whose READs fit one round trip, unless the bytes read would pass
/// [`COALESCED_MAX`])...
const GAPS: [u64; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
/// ...of at most this many bytes.
const RANGE_MAX: u64 = 1 << 20;
/// Bytes the coalesced READs of one round of entries may fetch at most.
const COALESCED_MAX: u64 = 8 << 20;
/// Own unmerged puts handed out (or counted) per page at most.
const OWN_PER_PAGE: usize = 4096;
/// Table changes tolerated within one page before giving up.
const MAX_RESTARTS: u32 = 16;
/// Overflow levels tolerated before a chain is taken as corrupt.
const MAX_CHAIN: u32 = 1 << 16;

/// Bits of a shard cursor; a KN's cursor puts the shard index above them.
pub const SHARD_CURSOR_BITS: u32 = 56;
const MARK: u64 = 1 << 55;
const PHASE_SHIFT: u32 = 53;
const EPOCH_SHIFT: u32 = 45;
const GEN_SHIFT: u32 = 37;
const POS_MASK: u64 = (1 << GEN_SHIFT) - 1;

/// A key a walk found, with its expiry time (Unix ms), if it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedKey {
    pub key: Vec<u8>,
    pub expire_at: Option<u64>,
}

/// What a page of a walk collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMode {
    /// The keys (a key may come twice in one walk).
    Keys,
    /// Only how many: each live key is counted once per walk when nothing changes meanwhile
    /// (an own unmerged write counts in phase 0, never again in phase 1).
    Count,
}

/// One page of a walk, as asked of a shard ([`super::Msg::Scan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanRequest {
    /// 0 to start; then what the previous page returned.
    pub cursor: u64,
    /// About how many keys the page should find (a hint, as in Redis).
    pub count: usize,
    /// Keys that expire before this (Unix ms) are left out.
    pub now_ms: u64,
    /// Only keys of this slot.
    pub slot: Option<u16>,
    pub mode: ScanMode,
}

/// What the walk had to start over since the previous page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Restart {
    #[default]
    None,
    /// The index table was replaced: phase 1 began again (counts of earlier phase-1 pages
    /// are to be dropped).
    Index,
    /// The cluster map changed: the whole walk began again.
    All,
}

/// One page of a walk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Where to continue; 0: the walk is done.
    pub cursor: u64,
    /// [`ScanMode::Keys`]: the keys found.
    pub keys: Vec<ScannedKey>,
    /// [`ScanMode::Count`]: how many.
    pub counted: u64,
    /// [`ScanMode::Count`]: how many of them have an expiry time.
    pub counted_expiring: u64,
    /// Keys this page found expired with no newer own write: the shard deletes them before
    /// it answers (so a walk reclaims what nobody reads), and this is empty then.
    pub(crate) expired: Vec<Vec<u8>>,
    /// Whether the walk started over within this page (phase 1 counts of earlier pages do
    /// not hold any more).
    pub restart: Restart,
    /// Whether this page's count belongs to phase 1 (and is dropped on an index restart).
    pub index_phase: bool,
    /// The cursor that starts a walk under the cluster map this page used: a KN walking
    /// its shards one after the other starts the next shard with it, so that a map change
    /// between two shards is seen too.
    pub fresh: u64,
    /// Round trips this page spent on overflow buckets: one per level of the chunk's
    /// chains, more when a level has more buckets than one round trip posts.
    pub overflow_rts: u32,
}

/// A decoded shard cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    phase: u8,
    epoch: u8,
    generation: u8,
    pos: u64,
}

impl Cursor {
    fn start(epoch: u8) -> Self {
        Self {
            phase: 0,
            epoch,
            generation: 0,
            pos: 0,
        }
    }

    fn encode(self) -> u64 {
        MARK | (u64::from(self.phase) << PHASE_SHIFT)
            | (u64::from(self.epoch) << EPOCH_SHIFT)
            | (u64::from(self.generation) << GEN_SHIFT)
            | (self.pos & POS_MASK)
    }

    /// `None`: 0, the start.
    fn decode(c: u64) -> Result<Option<Self>, KvError> {
        if c == 0 {
            return Ok(None);
        }
        if c >> SHARD_CURSOR_BITS != 0 || c & MARK == 0 {
            return Err(KvError::InvalidCursor);
        }
        let phase = ((c >> PHASE_SHIFT) & 3) as u8;
        let pos = c & POS_MASK;
        if phase > 1 || (phase == 0 && pos > u64::from(u32::MAX)) {
            return Err(KvError::InvalidCursor);
        }
        Ok(Some(Self {
            phase,
            epoch: (c >> EPOCH_SHIFT) as u8,
            generation: (c >> GEN_SHIFT) as u8,
            pos,
        }))
    }
}

/// Whether a key expiring at `at` is still there at `now_ms` (Redis: expired once now >
/// the expiry time).
pub fn alive(at: Option<u64>, now_ms: u64) -> bool {
    at.map_or(true, |t| now_ms <= t)
}

/// Whether the shard of `cfg` serves `slot` under `map` (and `slot` passes `filter`).
fn serves(map: &SlotMap, cfg: &ShardConfig, slot: u16, filter: Option<u16>) -> bool {
    filter.map_or(true, |s| s == slot)
        && map.owner(slot) == cfg.kn_id
        && shard_of(slot, cfg.shards as usize) == cfg.shard as usize
}

/// Registered buffers of the walk, made at the first walk.
#[derive(Debug)]
struct Bufs {
    /// Root word.
    root: LocalBuf,
    /// Head buckets of a chunk.
    buckets: LocalBuf,
    /// Block headers, [`MAX_WRS`] at a time.
    headers: LocalBuf,
    entries: LocalBuf,
    entries_cap: usize,
}

/// A shard's walk state: its buffers and how many slots it serves under the current map.
#[derive(Debug, Default)]
pub(super) struct Walker {
    bufs: Option<Bufs>,
    /// (map epoch, slots served): sizes chunks for a page's `count`.
    served: Option<(u64, u64)>,
}

/// An entry a walk read and verified.
#[derive(Clone, Debug)]
struct Decoded {
    op: Op,
    key: Vec<u8>,
    expire_at: Option<u64>,
}

/// Posts `wrs` and waits once for all of them (one round trip).
fn run<F: Fabric + ?Sized>(
    f: &mut F,
    wrs: &[(WrId, WorkRequest)],
    timeout: std::time::Duration,
) -> Result<(), KvError> {
    if wrs.is_empty() {
        return Ok(());
    }
    let mut out = vec![
        Completion {
            wr_id: 0,
            verb: Verb::Read,
            status: CompletionStatus::Success,
            value: 0,
        };
        wrs.len()
    ];
    execute(f, wrs, &mut out, timeout)?;
    match out.iter().find(|c| c.status != CompletionStatus::Success) {
        None => Ok(()),
        Some(c) => Err(KvError::Corrupt(format!(
            "a READ of the index walk failed: {} (stale or corrupt offset)",
            c.status
        ))),
    }
}

impl<F: Fabric> Shard<F> {
    /// One page of a walk of this shard's keys: appends what it found to `out` and returns
    /// the cursor to continue with (0: done). See the module documentation.
    pub fn scan_keys(
        &mut self,
        cursor: u64,
        count: usize,
        now_ms: u64,
        out: &mut Vec<ScannedKey>,
    ) -> Result<u64, KvError> {
        let req = ScanRequest {
            cursor,
            count,
            now_ms,
            slot: None,
            mode: ScanMode::Keys,
        };
        let page = self.scan_page(&req)?;
        out.extend(page.keys);
        Ok(page.cursor)
    }

    /// How many live keys this shard holds (of `slot` only, if given), by one whole walk on
    /// the shard's thread (exact: no own write interleaves with it).
    pub fn count_keys(&mut self, now_ms: u64, slot: Option<u16>) -> Result<u64, KvError> {
        let mut req = ScanRequest {
            cursor: 0,
            count: usize::MAX,
            now_ms,
            slot,
            mode: ScanMode::Count,
        };
        let (mut own, mut index) = (0, 0);
        loop {
            let page = self.scan_page(&req)?;
            match page.restart {
                Restart::None => {}
                Restart::Index => index = 0,
                Restart::All => (own, index) = (0, 0),
            }
            if page.index_phase {
                index += page.counted;
            } else {
                own += page.counted;
            }
            if page.cursor == 0 {
                return Ok(own + index);
            }
            req.cursor = page.cursor;
        }
    }

    /// Up to `count` distinct live keys of `slot` (CLUSTER GETKEYSINSLOT).
    pub fn keys_in_slot(
        &mut self,
        slot: u16,
        count: usize,
        now_ms: u64,
    ) -> Result<Vec<Vec<u8>>, KvError> {
        let mut seen = std::collections::HashSet::new();
        let mut keys = Vec::new();
        let mut req = ScanRequest {
            cursor: 0,
            count: count.max(1),
            now_ms,
            slot: Some(slot),
            mode: ScanMode::Keys,
        };
        while keys.len() < count {
            let page = self.scan_page(&req)?;
            for k in page.keys {
                if keys.len() < count && seen.insert(k.key.clone()) {
                    keys.push(k.key);
                }
            }
            if page.cursor == 0 {
                break;
            }
            req.cursor = page.cursor;
        }
        Ok(keys)
    }

    /// Serves [`super::Msg::Scan`].
    pub(super) fn serve_scan(&mut self, req: &ScanRequest) -> Result<ScanPage, KvError> {
        if let Some(e) = &self.broken {
            if *e == KvError::ShuttingDown {
                return Err(e.clone());
            }
        }
        let t0 = self.rts();
        let r = match self.scan_page(req) {
            Err(KvError::Disconnected(why)) => {
                self.reconnect(&why).and_then(|()| self.scan_page(req))
            }
            r => r,
        };
        self.stats.maintenance_rts += self.rts() - t0;
        r
    }

    /// One page of a walk.
    pub fn scan_page(&mut self, req: &ScanRequest) -> Result<ScanPage, KvError> {
        let mut page = self.walk_page(req)?;
        for key in std::mem::take(&mut page.expired) {
            // Not twice (a walk may meet a key again before its delete is flushed), and
            // never over a newer own write.
            let staged = self.staged_hashes.contains(&key_hash(&key));
            if !staged && self.unmerged.get(&key).is_none() && !self.replicas.serves(&key) {
                self.expire(&key);
            }
        }
        Ok(page)
    }

    /// [`Shard::scan_page`] before the expired keys it found are deleted.
    fn walk_page(&mut self, req: &ScanRequest) -> Result<ScanPage, KvError> {
        if req.slot.is_some_and(|s| s >= SLOTS) {
            return Err(KvError::InvalidCursor);
        }
        let epoch = self.map.epoch() as u8;
        let mut page = ScanPage {
            fresh: Cursor::start(epoch).encode(),
            ..ScanPage::default()
        };
        let mut cur = match Cursor::decode(req.cursor)? {
            None => Cursor::start(epoch),
            Some(c) if c.epoch != epoch => {
                page.restart = Restart::All;
                Cursor::start(epoch)
            }
            Some(c) => c,
        };
        let count = req.count.max(1);
        if cur.phase == 0 {
            match self.unmerged_page(cur.pos, count, req, &mut page)? {
                Some(pos) => {
                    cur.pos = pos;
                    page.cursor = cur.encode();
                    return Ok(page);
                }
                None => {
                    cur = Cursor {
                        phase: 1,
                        epoch,
                        generation: 0,
                        pos: 0,
                    };
                    if !page.keys.is_empty() || page.counted > 0 {
                        page.cursor = cur.encode();
                        return Ok(page);
                    }
                }
            }
        }
        page.index_phase = true;
        let (next, generation, restarted) =
            self.index_page(cur.pos, cur.generation, count, req, &mut page)?;
        if restarted && page.restart == Restart::None {
            page.restart = Restart::Index;
        }
        page.cursor = match next {
            None => 0,
            Some(pos) => Cursor {
                phase: 1,
                epoch,
                generation,
                pos,
            }
            .encode(),
        };
        Ok(page)
    }

    /// Phase 0 from hash prefix `pos`: about `count` own unmerged puts. Returns the next
    /// prefix, or `None` once they are all handed out.
    fn unmerged_page(
        &mut self,
        pos: u64,
        count: usize,
        req: &ScanRequest,
        page: &mut ScanPage,
    ) -> Result<Option<u64>, KvError> {
        let (map, cfg) = (&self.map, &self.cfg);
        let mut items: Vec<(u32, Vec<u8>, EntryRef)> = self
            .unmerged
            .iter()
            .filter_map(|(k, u)| {
                let r = u.eref?;
                let prefix = (key_hash(k) >> 32) as u32;
                (u64::from(prefix) >= pos && serves(map, cfg, key_slot(k), req.slot))
                    .then(|| (prefix, k.to_vec(), r))
            })
            .collect();
        items.sort_unstable_by_key(|i| i.0);
        let count = count.min(OWN_PER_PAGE);
        let take = if items.len() <= count {
            items.len()
        } else {
            let last = items[count - 1].0;
            count + items[count..].iter().take_while(|i| i.0 == last).count()
        };
        let next = (take < items.len()).then(|| u64::from(items[take - 1].0) + 1);
        items.truncate(take);
        let refs: Vec<EntryRef> = items.iter().map(|i| i.2).collect();
        let decoded = self.read_entries(&refs)?;
        for ((_, key, r), d) in items.into_iter().zip(decoded) {
            match d {
                Some(d) if d.op == Op::Put && d.key == key => {
                    // An expired own write is the sweep's (the shard knows its time).
                    if alive(d.expire_at, req.now_ms) {
                        emit(page, req.mode, key, d.expire_at);
                    }
                }
                _ => tracing::warn!(
                    shard = self.cfg.shard,
                    "own unmerged entry at {:#x} does not verify; left out of a scan",
                    r.offset()
                ),
            }
        }
        Ok(next.filter(|&p| p <= u64::from(u32::MAX)))
    }

    /// Phase 1 from head bucket `pos` of the table of generation `generation` (low bits).
    /// Returns the next head bucket (`None`: done), the generation walked, and whether the
    /// walk had to start over at bucket 0.
    fn index_page(
        &mut self,
        mut pos: u64,
        generation: u8,
        count: usize,
        req: &ScanRequest,
        page: &mut ScanPage,
    ) -> Result<(Option<u64>, u8, bool), KvError> {
        let mut root = match self.reader.cached_root() {
            Some(r) => r,
            None => self.reader.refresh_root(&mut self.f)?,
        };
        let mut restarted = false;
        if pos != 0 && root.generation() as u8 != generation {
            root = self.reader.refresh_root(&mut self.f)?;
            if root.generation() as u8 != generation {
                pos = 0;
                restarted = true;
            }
        }
        if pos >= root.buckets() {
            return Err(KvError::InvalidCursor);
        }
        for _ in 0..MAX_RESTARTS {
            match self.walk_chunk(root, pos, count, req, page)? {
                Some(next) => {
                    let next = (next < root.buckets()).then_some(next);
                    return Ok((next, root.generation() as u8, restarted));
                }
                None => {
                    root = self.reader.refresh_root(&mut self.f)?;
                    restarted |= pos != 0;
                    pos = 0;
                }
            }
        }
        Err(KvError::Corrupt(format!(
            "the index root changed {MAX_RESTARTS} times during one scan page"
        )))
    }

    /// Head buckets to read for a page that should find about `count` keys.
    fn chunk_for(&mut self, count: usize, slot: Option<u16>) -> u64 {
        let epoch = self.map.epoch();
        let served = match (slot, self.walk.served) {
            (Some(_), _) => 1,
            (None, Some((e, n))) if e == epoch => n,
            (None, _) => {
                let n = (0..SLOTS)
                    .filter(|&s| serves(&self.map, &self.cfg, s, None))
                    .count() as u64;
                self.walk.served = Some((epoch, n));
                n
            }
        };
        // About one key per head bucket at the index's load factor.
        let per_key = u64::from(SLOTS) / served.max(1);
        (count as u64)
            .saturating_mul(per_key)
            .clamp(CHUNK_MIN, CHUNK_MAX)
    }

    fn bufs(&mut self, entries: usize) -> Result<&Bufs, KvError> {
        if self.walk.bufs.is_none() {
            let f = &mut self.f;
            self.walk.bufs = Some(Bufs {
                root: f.alloc_buf(64)?,
                buckets: f.alloc_buf((CHUNK_MAX * BUCKET_SIZE) as usize)?,
                headers: f.alloc_buf(MAX_WRS * 64)?,
                entries: f.alloc_buf(1 << 20)?,
                entries_cap: 1 << 20,
            });
        }
        let b = self
            .walk
            .bufs
            .as_mut()
            .ok_or_else(|| KvError::Corrupt("walk buffers".into()))?;
        if entries > b.entries_cap {
            let cap = entries.next_power_of_two();
            b.entries = self.f.alloc_buf(cap)?;
            b.entries_cap = cap;
        }
        Ok(b)
    }

    /// Walks the chains of up to a chunk of head buckets from `pos` of `root`'s table.
    /// Returns the next head bucket, or `None` if the table was replaced meanwhile (nothing
    /// was handed out then).
    fn walk_chunk(
        &mut self,
        root: RootWord,
        pos: u64,
        count: usize,
        req: &ScanRequest,
        page: &mut ScanPage,
    ) -> Result<Option<u64>, KvError> {
        let n = (root.buckets() - pos).min(self.chunk_for(count, req.slot));
        let timeout = self.reader.timeout();
        let root_off = self.reader.root_off();
        let region = self.f.region_len();
        let b = self.bufs(0)?;
        let (root_buf, buckets_buf) = (b.root, b.buckets);
        // The root word with the chunk: a resize since the root was read shows here.
        run(
            &mut self.f,
            &[
                (
                    0,
                    WorkRequest::Read {
                        remote: root_off,
                        local: root_buf.slice(0, 8),
                    },
                ),
                (
                    1,
                    WorkRequest::Read {
                        remote: root.base() + pos * BUCKET_SIZE,
                        local: buckets_buf.slice(0, (n * BUCKET_SIZE) as u32),
                    },
                ),
            ],
            timeout,
        )?;
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.f.buf(root_buf)[..8]);
        if RootWord(u64::from_le_bytes(w)) != root {
            self.reader.set_root(None);
            return Ok(None);
        }
        let generation = root.generation();
        let mut cands: Vec<(EntryRef, u64)> = Vec::new();
        let mut nexts: Vec<u64> = Vec::new();
        let mut bytes = 0u64;
        let mut taken = 0u64;
        {
            let chunk = self.f.buf(buckets_buf);
            for i in 0..n as usize {
                let bucket = Bucket::read_from(&chunk[i * 64..])
                    .ok_or_else(|| KvError::Corrupt("short bucket".into()))?;
                if !bucket.belongs_to(generation) {
                    self.reader.set_root(None);
                    return Ok(None);
                }
                bytes += take_slots(&bucket, &mut cands, &mut nexts);
                taken += 1;
                if cands.len() >= CANDIDATES_MAX || bytes >= ENTRY_BYTES_MAX {
                    break;
                }
            }
        }
        // Overflow buckets, a level of every chain at a time.
        let mut levels = 0u32;
        while !nexts.is_empty() {
            levels += 1;
            if levels > MAX_CHAIN {
                return Err(KvError::Corrupt("index chain does not end".into()));
            }
            let level = std::mem::take(&mut nexts);
            for &off in &level {
                if off % BUCKET_SIZE != 0
                    || off.checked_add(BUCKET_SIZE).map_or(true, |e| e > region)
                {
                    return Err(KvError::Corrupt(format!(
                        "bucket offset {off:#x} is misaligned or outside the region"
                    )));
                }
            }
            for bucket in self.read_buckets(&level, &mut page.overflow_rts)? {
                if !bucket.belongs_to(generation) {
                    self.reader.set_root(None);
                    return Ok(None);
                }
                take_slots(&bucket, &mut cands, &mut nexts);
            }
        }
        let refs: Vec<EntryRef> = cands.iter().map(|c| c.0).collect();
        let decoded = self.read_entries(&refs)?;
        let mut later: Vec<(Vec<u8>, EntryRef)> = Vec::new();
        for ((r, hash), d) in cands.into_iter().zip(decoded) {
            let Some(d) = d else { continue };
            // A slot read while a writer reused it may pair a hash with another key's ref.
            if d.op != Op::Put || key_hash(&d.key) != hash {
                continue;
            }
            if !serves(&self.map, &self.cfg, key_slot(&d.key), req.slot) {
                continue;
            }
            match (req.mode, self.unmerged.get(&d.key).map(|u| u.eref)) {
                (_, None) => {
                    if alive(d.expire_at, req.now_ms) {
                        emit(page, req.mode, d.key, d.expire_at);
                    } else {
                        // The index holds the key's latest write: it is due.
                        page.expired.push(d.key);
                    }
                }
                // Counted in phase 0, or deleted by a newer own write.
                (ScanMode::Count, Some(_)) | (ScanMode::Keys, Some(None)) => {}
                (ScanMode::Keys, Some(Some(own))) if own == r => {
                    if alive(d.expire_at, req.now_ms) {
                        emit(page, req.mode, d.key, d.expire_at);
                    }
                }
                // Rewritten since phase 0 passed it: the own write says whether it lives.
                (ScanMode::Keys, Some(Some(own))) => later.push((d.key, own)),
            }
        }
        if !later.is_empty() {
            let refs: Vec<EntryRef> = later.iter().map(|l| l.1).collect();
            let decoded = self.read_entries(&refs)?;
            for ((key, _), d) in later.into_iter().zip(decoded) {
                if let Some(d) = d {
                    if d.op == Op::Put && d.key == key && alive(d.expire_at, req.now_ms) {
                        emit(page, req.mode, key, d.expire_at);
                    }
                }
            }
        }
        Ok(Some(pos + taken))
    }

    /// READs the buckets at `offs` (validated), in their order. Buckets near one another
    /// (overflow buckets are allocated close together) share a READ, as entries do; `rts`
    /// counts the round trips.
    fn read_buckets(&mut self, offs: &[u64], rts: &mut u32) -> Result<Vec<Bucket>, KvError> {
        let timeout = self.reader.timeout();
        let refs: Vec<EntryRef> = offs
            .iter()
            .map(|&o| EntryRef::new(o, BUCKET_SIZE).ok_or(KvError::InvalidCursor))
            .collect::<Result<_, _>>()?;
        let mut todo: Vec<(usize, u32)> = (0..refs.len()).map(|i| (i, 0)).collect();
        todo.sort_unstable_by_key(|&(i, _)| refs[i].offset());
        let (mut ranges, mut range_of, mut total) = coalesce(&refs, &todo, GAPS[0]);
        for &gap in &GAPS[1..] {
            if ranges.len() <= MAX_WRS {
                break;
            }
            let wider = coalesce(&refs, &todo, gap);
            if wider.2 > COALESCED_MAX {
                break;
            }
            (ranges, range_of, total) = wider;
        }
        let buf = self.bufs(total as usize)?.entries;
        for part in ranges.chunks(MAX_WRS) {
            *rts += 1;
            let wrs: Vec<(WrId, WorkRequest)> = part
                .iter()
                .enumerate()
                .map(|(k, &(s, e, _, p))| {
                    (
                        k as u64,
                        WorkRequest::Read {
                            remote: s,
                            local: buf.slice(p as u32, (e - s) as u32),
                        },
                    )
                })
                .collect();
            run(&mut self.f, &wrs, timeout)?;
        }
        let got = self.f.buf(buf);
        let mut out = vec![None; refs.len()];
        for (&(i, _), &ri) in todo.iter().zip(&range_of) {
            let (start, _, _, p) = ranges[ri];
            let at = (p + refs[i].offset() - start) as usize;
            out[i] = Some(
                Bucket::read_from(&got[at..])
                    .ok_or_else(|| KvError::Corrupt("short bucket".into()))?,
            );
        }
        out.into_iter()
            .map(|b| b.ok_or_else(|| KvError::Corrupt("bucket not read".into())))
            .collect()
    }

    /// READs and verifies the entries `refs` (answers in the same order; `None`: not a
    /// verified entry). Entries near one another in a block are fetched by one READ, the
    /// headers of blocks whose salt is unknown with them, [`MAX_WRS`] READs per round
    /// trip; an entry whose checksum fails under a cached salt is read again with a fresh
    /// header (its block may have been reused).
    fn read_entries(&mut self, refs: &[EntryRef]) -> Result<Vec<Option<Decoded>>, KvError> {
        let area = self.reader.area();
        let timeout = self.reader.timeout();
        let mut out: Vec<Option<Decoded>> = vec![None; refs.len()];
        let mut todo: Vec<(usize, u32)> = refs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let b = area.block_of(r.offset())?;
                let end = area.block_off(b) + area.block_size;
                (r.len() >= ENTRY_HEADER_SIZE as u64 && r.offset() + r.len() <= end)
                    .then_some((i, b))
            })
            .collect();
        todo.sort_unstable_by_key(|&(i, _)| refs[i].offset());
        for attempt in 0..2 {
            if todo.is_empty() {
                break;
            }
            let unknown = {
                let mut u: Vec<u32> = todo
                    .iter()
                    .map(|t| t.1)
                    .filter(|&b| attempt > 0 || self.reader.salt(b).is_none())
                    .collect();
                u.sort_unstable();
                u.dedup();
                u.len()
            };
            let room = MAX_WRS.saturating_sub(unknown).max(1);
            let (mut ranges, mut range_of, mut total) = coalesce(refs, &todo, GAPS[0]);
            for &gap in &GAPS[1..] {
                if ranges.len() <= room {
                    break;
                }
                let wider = coalesce(refs, &todo, gap);
                if wider.2 > COALESCED_MAX {
                    break;
                }
                (ranges, range_of, total) = wider;
            }
            let mut blocks: Vec<u32> = ranges
                .iter()
                .map(|r| r.2)
                .filter(|&b| attempt > 0 || self.reader.salt(b).is_none())
                .collect();
            blocks.sort_unstable();
            blocks.dedup();
            let fresh = blocks.clone();
            let b = self.bufs(total as usize)?;
            let (entries_buf, headers_buf) = (b.entries, b.headers);
            // Ranges first, then headers; MAX_WRS per round trip.
            let n_wrs = ranges.len() + blocks.len();
            let mut at = 0;
            while at < n_wrs {
                let end = (at + MAX_WRS).min(n_wrs);
                let mut wrs = Vec::with_capacity(end - at);
                for (slot, k) in (at..end).enumerate() {
                    let wr = if k < ranges.len() {
                        let (s, e, _, p) = ranges[k];
                        WorkRequest::Read {
                            remote: s,
                            local: entries_buf.slice(p as u32, (e - s) as u32),
                        }
                    } else {
                        WorkRequest::Read {
                            remote: area.block_off(blocks[k - ranges.len()]),
                            local: headers_buf.slice(slot as u32 * 64, 64),
                        }
                    };
                    wrs.push((k as u64, wr));
                }
                run(&mut self.f, &wrs, timeout)?;
                for (slot, k) in (at..end).enumerate() {
                    if k >= ranges.len() {
                        let block = blocks[k - ranges.len()];
                        let h = BlockHeader::read_from(&self.f.buf(headers_buf)[slot * 64..])
                            .ok_or_else(|| KvError::Corrupt("short header".into()))?;
                        if h.magic == BLOCK_MAGIC {
                            self.reader.learn_salt(block, h.salt);
                        } else {
                            self.reader.forget_salt(block);
                        }
                    }
                }
                at = end;
            }
            let mut retry = Vec::new();
            for (&(i, b), &ri) in todo.iter().zip(&range_of) {
                let Some(salt) = self.reader.salt(b) else {
                    continue;
                };
                let (start, _, _, p) = ranges[ri];
                let from = (p + refs[i].offset() - start) as usize;
                let len = refs[i].len() as usize;
                let bytes = &self.f.buf(entries_buf)[from..from + len];
                match entry::decode(bytes, salt) {
                    Ok(e) if e.len == len => {
                        out[i] = Some(Decoded {
                            op: e.op,
                            key: e.key.to_vec(),
                            expire_at: e.expire_at(),
                        });
                    }
                    Ok(_) => {}
                    Err(entry::EntryError::BadChecksum)
                        if attempt == 0 && fresh.binary_search(&b).is_err() =>
                    {
                        retry.push((i, b));
                    }
                    Err(_) => {}
                }
            }
            for &(_, b) in &retry {
                self.reader.forget_salt(b);
            }
            todo = retry;
        }
        Ok(out)
    }
}

/// READs that fetch the entries `todo` (indexes into `refs` with their block, in offset
/// order): entries of one block at most `gap` bytes apart share a READ. Returns the READs
/// (start, end, block, where in the entries buffer), the READ of each entry, and the bytes.
#[allow(clippy::type_complexity)]
fn coalesce(
    refs: &[EntryRef],
    todo: &[(usize, u32)],
    gap: u64,
) -> (Vec<(u64, u64, u32, u64)>, Vec<usize>, u64) {
    let mut ranges: Vec<(u64, u64, u32, u64)> = Vec::new();
    let mut range_of = Vec::with_capacity(todo.len());
    let mut total = 0u64;
    for &(i, b) in todo {
        let (off, end) = (refs[i].offset(), refs[i].offset() + refs[i].len());
        match ranges.last_mut() {
            Some(l) if l.2 == b && off <= l.1 + gap && end - l.0 <= RANGE_MAX => {
                total += end.saturating_sub(l.1);
                l.1 = l.1.max(end);
            }
            _ => {
                ranges.push((off, end, b, total));
                total += end - off;
            }
        }
        range_of.push(ranges.len() - 1);
    }
    (ranges, range_of, total)
}

/// Adds a bucket's filled slots to `cands` and its next bucket to `nexts`; returns the
/// bytes of the slots' entries.
fn take_slots(bucket: &Bucket, cands: &mut Vec<(EntryRef, u64)>, nexts: &mut Vec<u64>) -> u64 {
    let mut bytes = 0;
    for s in &bucket.slots {
        let r = EntryRef(s.eref);
        if s.hash != EMPTY_HASH && !r.is_empty() {
            cands.push((r, s.hash));
            bytes += r.len();
        }
    }
    if bucket.next != 0 {
        nexts.push(bucket.next);
    }
    bytes
}

fn emit(page: &mut ScanPage, mode: ScanMode, key: Vec<u8>, expire_at: Option<u64>) {
    match mode {
        ScanMode::Keys => page.keys.push(ScannedKey { key, expire_at }),
        ScanMode::Count => {
            page.counted += 1;
            page.counted_expiring += u64::from(expire_at.is_some());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_strangers_are_refused() {
        let c = Cursor {
            phase: 1,
            epoch: 0xAB,
            generation: 0xCD,
            pos: (1 << 37) - 1,
        };
        let e = c.encode();
        assert_ne!(e, 0);
        assert!(e >> SHARD_CURSOR_BITS == 0);
        assert_eq!(Cursor::decode(e).expect("valid"), Some(c));
        let start = Cursor::start(0).encode();
        assert_ne!(start, 0, "a cursor in progress is never 0");
        assert_eq!(Cursor::decode(0).expect("start"), None);
        for bad in [
            1,
            12345,
            1 << 56,
            u64::MAX,
            MARK | (2 << PHASE_SHIFT),
            MARK | ((1 << 32) + 1),
        ] {
            assert_eq!(Cursor::decode(bad), Err(KvError::InvalidCursor), "{bad:#x}");
        }
    }

    #[test]
    fn expiry_follows_redis() {
        assert!(alive(None, u64::MAX));
        assert!(alive(Some(100), 100));
        assert!(!alive(Some(100), 101));
    }
}
