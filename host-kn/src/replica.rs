//! Selective replication of hot keys through indirect cells, and hot-key tracking.
//!
//! A replicated key has one 8-byte cell in the DPM holding the packed reference of its
//! newest entry; while the cell is active the DPM's merger leaves the key out of the index.
//! Every replica KN may serve the key:
//! - a read READs the cell (1 RT, with a FLUSH of the cell behind it so that nothing read
//!   can be lost); if it equals the reference the shard cached for the key, the cached
//!   value is the answer, else the entry is READ (1 RT more) and cached;
//! - a write is staged and flushed with the shard's batch like any other, then the cell is
//!   swapped from the last reference this shard saw to the new one by CAS (retried with the
//!   value the failed CAS returned: the last CAS wins, and a write takes effect at its CAS),
//!   and the cell is made durable in the same round trip before the writer is answered.
//!
//! Replicated keys never enter the DAC cache or the unmerged-writes map, so nothing can
//! answer for them without checking the cell.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dinomo_hw::fabric::{
    execute, Completion, CompletionStatus, Fabric, LocalBuf, Verb, WorkRequest, WrId,
};
use dinomo_shared::entry::Op;
use dinomo_shared::geometry::Geometry;
use dinomo_shared::index::EntryRef;
use dinomo_shared::slot::key_slot;
use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::error::KvError;
use crate::ownership::shard_of;
use crate::reader::IndexReader;

/// The KNs serving one replicated key and its cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSet {
    pub cell: u32,
    /// The KN owning the key's slot; it allocated the cell and frees it.
    pub owner: u16,
    /// Every KN serving the key, the owner included.
    pub kns: Vec<u16>,
}

/// Which keys are replicated (key -> cell and replica KNs). Immutable: a change publishes a
/// new table.
#[derive(Clone, Debug, Default)]
pub struct Replicas {
    keys: HashMap<Box<[u8]>, ReplicaSet>,
}

impl Replicas {
    pub fn get(&self, key: &[u8]) -> Option<&ReplicaSet> {
        self.keys.get(key)
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &ReplicaSet)> {
        self.keys.iter().map(|(k, s)| (&**k, s))
    }
    /// This table with `key` served by `set`.
    pub fn with(&self, key: &[u8], set: ReplicaSet) -> Self {
        let mut t = self.clone();
        t.keys.insert(key.into(), set);
        t
    }
    /// This table without `key`.
    pub fn without(&self, key: &[u8]) -> Self {
        let mut t = self.clone();
        t.keys.remove(key);
        t
    }
}

/// The router's published table. Clients compare one atomic version per request and take
/// the lock only when it changed, so the hot path gains no lock.
#[derive(Debug, Default)]
pub(crate) struct ReplicaRoutes {
    version: AtomicU64,
    table: RwLock<Arc<Replicas>>,
}

impl ReplicaRoutes {
    pub fn publish(&self, table: Arc<Replicas>) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
        self.version.fetch_add(1, Ordering::AcqRel);
    }
    pub fn table(&self) -> Arc<Replicas> {
        Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()))
    }
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// A client's view of the replica table and its own choice among replicas, so that the
/// load of a hot key spreads over clients while each client keeps to one replica.
#[derive(Debug)]
pub(crate) struct ReplicaView {
    table: Arc<Replicas>,
    /// The routes' version `table` was taken at (`u64::MAX`: never taken).
    version: u64,
    pub(crate) choice: usize,
}

static NEXT_CHOICE: AtomicU64 = AtomicU64::new(0);

impl ReplicaView {
    pub(crate) fn new() -> Self {
        Self {
            table: Arc::new(Replicas::default()),
            version: u64::MAX,
            choice: NEXT_CHOICE.fetch_add(1, Ordering::Relaxed) as usize,
        }
    }

    /// Whether the published table changed since this view was taken.
    pub(crate) fn is_stale(&self, routes: &ReplicaRoutes) -> bool {
        routes.version() != self.version
    }

    /// Takes the published table if it changed.
    pub(crate) fn refresh(&mut self, routes: &ReplicaRoutes) {
        let v = routes.version();
        if v != self.version {
            self.table = routes.table();
            self.version = v;
        }
    }

    /// The KN this client sends `key` to, if the key is replicated.
    pub(crate) fn pick(&self, key: &[u8]) -> Option<u16> {
        if self.table.is_empty() {
            return None;
        }
        let set = self.table.get(key)?;
        set.kns.get(self.choice % set.kns.len().max(1)).copied()
    }
}

/// Requests a replica shard understands besides the table itself (sent to the owner).
#[derive(Debug)]
pub enum ReplicaCtl {
    /// Start replicating `key`: give it an entry in the owner's log, have the DPM allocate
    /// its cell, and from now on serve it through the cell. Answers the cell.
    Begin {
        key: Vec<u8>,
        reply: Sender<Result<u32, KvError>>,
    },
    /// End replicating `key` (the other replicas have dropped it and merged their logs):
    /// flush, merge the own log, have the DPM free the cell (installing its reference in
    /// the index), and serve the key as an ordinary owned key again. With `cell`, a shard
    /// that does not serve the key (it became the owner of the key's slot while an earlier
    /// owner was ending it) frees that cell; a cell already free is no error.
    End {
        key: Vec<u8>,
        cell: Option<u32>,
        reply: Sender<Result<(), KvError>>,
    },
}

/// Counters of the replicated-key paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    pub gets: u64,
    /// Gets answered from the cached value after the cell matched (1 RT).
    pub cell_hits: u64,
    /// Gets that READ the entry the cell named (2 RTs).
    pub entry_reads: u64,
    pub writes: u64,
    /// CASes of the cell that lost to another writer and were repeated.
    pub cas_retries: u64,
}

impl ReplicaStats {
    pub fn add(&mut self, o: &Self) {
        self.gets += o.gets;
        self.cell_hits += o.cell_hits;
        self.entry_reads += o.entry_reads;
        self.writes += o.writes;
        self.cas_retries += o.cas_retries;
    }
    pub fn since(&self, e: &Self) -> Self {
        Self {
            gets: self.gets - e.gets,
            cell_hits: self.cell_hits - e.cell_hits,
            entry_reads: self.entry_reads - e.entry_reads,
            writes: self.writes - e.writes,
            cas_retries: self.cas_retries - e.cas_retries,
        }
    }
}

/// Times a read re-reads the cell because the entry it named no longer verifies (the cell
/// moved on and the block was reused meanwhile).
const MAX_READ_RETRIES: u32 = 16;
/// CAS rounds tolerated for one batch before giving up (each lost CAS means another write
/// took effect, so this bounds only a pathological storm).
const MAX_CAS_ROUNDS: u32 = 4096;
/// Cells swapped per posted round (two work requests each).
const CAS_PER_POST: usize = 32;

#[derive(Debug)]
struct KeyState {
    key: Box<[u8]>,
    cell: u32,
    /// This shard's KN owns the key's slot: only `Begin`/`End` add or remove it.
    owner: bool,
    /// The cell value this shard saw last (the expectation of its next CAS).
    last_seen: u64,
    /// Reference of the cached value (0: nothing cached).
    cached_ref: u64,
    /// `None`: the cached version is a delete.
    cached: Option<Vec<u8>>,
    /// The newest reference of this batch and its value, to publish after the flush.
    next_ref: u64,
    next: Option<Vec<u8>>,
}

/// A shard's replicated keys.
#[derive(Debug)]
pub(crate) struct ShardReplicas {
    keys: Vec<KeyState>,
    index: HashMap<Box<[u8]>, usize>,
    table: Arc<Replicas>,
    cell_buf: LocalBuf,
    /// Indexes into `keys` with a staged reference to publish (reused).
    todo: Vec<usize>,
    pub stats: ReplicaStats,
}

impl ShardReplicas {
    pub fn new<F: Fabric + ?Sized>(f: &mut F) -> Result<Self, KvError> {
        Ok(Self {
            keys: Vec::new(),
            index: HashMap::new(),
            table: Arc::new(Replicas::default()),
            cell_buf: f.alloc_buf(8)?,
            todo: Vec::new(),
            stats: ReplicaStats::default(),
        })
    }

    /// Whether this shard serves `key` through its cell.
    #[inline]
    pub fn serves(&self, key: &[u8]) -> bool {
        !self.keys.is_empty() && self.index.contains_key(key)
    }

    pub fn cell_of(&self, key: &[u8]) -> Option<u32> {
        self.index.get(key).map(|&i| self.keys[i].cell)
    }

    fn insert(&mut self, key: &[u8], cell: u32, owner: bool, eref: u64) {
        self.index.insert(key.into(), self.keys.len());
        self.keys.push(KeyState {
            key: key.into(),
            cell,
            owner,
            last_seen: eref,
            cached_ref: 0,
            cached: None,
            next_ref: 0,
            next: None,
        });
    }

    /// Serves `key` through `cell` from now on, as its owner (the cell holds `eref`).
    pub fn adopt(&mut self, key: &[u8], cell: u32, eref: u64) {
        if !self.serves(key) {
            self.insert(key, cell, true, eref);
        }
    }

    /// Stops serving `key` through its cell (nothing of it may be staged).
    pub fn forget(&mut self, key: &[u8]) {
        let Some(i) = self.index.remove(key) else {
            return;
        };
        self.keys.swap_remove(i);
        if let Some(moved) = self.keys.get(i) {
            self.index.insert(moved.key.clone(), i);
        }
    }

    /// Whether `table` keeps key state `s` served by KN `kn`: a key whose owner this KN is
    /// is kept until `End` (a table that no longer lists it is about to end it), a replica
    /// only while the table lists this KN for it with the same cell.
    fn keeps(table: &Replicas, kn: u16, s: &KeyState) -> bool {
        match table.get(&s.key) {
            None => s.owner,
            Some(set) if set.cell != s.cell => false,
            Some(set) => set.owner == kn || set.kns.contains(&kn),
        }
    }

    /// Whether installing `table` would make this shard stop serving a key it serves (the
    /// shard must flush first, so that no staged write of that key is left unpublished).
    pub fn drops_any(&self, table: &Replicas, kn: u16) -> bool {
        self.keys.iter().any(|s| !Self::keeps(table, kn, s))
    }

    /// Installs a new table for shard `shard` of `shards` of KN `kn`: starts serving the
    /// keys it lists for this shard and this KN and stops serving the others. A key whose
    /// owner this KN is starts with `Begin` and stops with `End`; but a table naming this
    /// KN as the owner of a key with a cell makes it the owner of that cell (the key's
    /// slot moved here while the key stayed replicated), and a table naming another owner
    /// makes this shard a mere replica of it.
    pub fn install(&mut self, table: Arc<Replicas>, kn: u16, shard: u16, shards: u16) {
        let stale: Vec<Box<[u8]>> = self
            .keys
            .iter()
            .filter(|s| !Self::keeps(&table, kn, s))
            .map(|s| s.key.clone())
            .collect();
        for k in stale {
            self.forget(&k);
        }
        for s in &mut self.keys {
            if let Some(set) = table.get(&s.key) {
                s.owner = set.owner == kn;
            }
        }
        for (key, set) in table.iter() {
            let mine = (set.owner == kn || set.kns.contains(&kn))
                && shard_of(key_slot(key), shards as usize) == shard as usize;
            if mine && !self.serves(key) {
                // Nothing seen yet: the first read or CAS learns the cell's value.
                self.insert(key, set.cell, set.owner == kn, 0);
            }
        }
        self.table = table;
    }

    fn read_cell<F: Fabric + ?Sized>(
        &self,
        f: &mut F,
        geo: &Geometry,
        cell: u32,
        timeout: Duration,
    ) -> Result<u64, KvError> {
        // The FLUSH behind the READ makes what was read durable before it is returned (a
        // writer's CAS is visible before its own FLUSH completes): same round trip.
        let remote = geo.indirect_off(cell as u64);
        let wr = [
            (
                0,
                WorkRequest::Read {
                    remote,
                    local: self.cell_buf.slice(0, 8),
                },
            ),
            (1, WorkRequest::Flush { remote, len: 8 }),
        ];
        let mut out = [done(0, Verb::Read), done(1, Verb::Flush)];
        execute(f, &wr, &mut out, timeout)?;
        if let Some(bad) = out.iter().find(|c| c.status != CompletionStatus::Success) {
            return Err(KvError::Fabric(format!(
                "reading cell {cell}: {}",
                bad.status
            )));
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&f.buf(self.cell_buf)[..8]);
        Ok(u64::from_le_bytes(w))
    }

    /// Serves a get of a key this shard serves: 1 RT when the cell names the cached
    /// version, 2 otherwise.
    pub fn get<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        reader: &mut IndexReader,
        geo: &Geometry,
        key: &[u8],
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, KvError> {
        let i = *self
            .index
            .get(key)
            .ok_or_else(|| KvError::Corrupt("replicated key is not served here".into()))?;
        self.stats.gets += 1;
        for _ in 0..MAX_READ_RETRIES {
            let cell = self.keys[i].cell;
            let cur = self.read_cell(f, geo, cell, timeout)?;
            let s = &mut self.keys[i];
            s.last_seen = cur;
            if cur != 0 && s.cached_ref == cur {
                self.stats.cell_hits += 1;
                return Ok(s.cached.clone());
            }
            let r = EntryRef(cur);
            if r.is_empty() {
                return Err(KvError::Corrupt(format!("cell {cell} holds no entry")));
            }
            self.stats.entry_reads += 1;
            if let Some((found, op)) = reader.fetch_op(f, key, &[r], true)? {
                let value = match op {
                    // A key that expired while replicated reads as absent.
                    Op::Put if found.expire_at.is_some_and(|t| t < crate::clock::now_ms()) => None,
                    Op::Put => Some(
                        reader.buf(f)[found.value_at..found.value_at + found.value_len].to_vec(),
                    ),
                    Op::Delete => None,
                };
                let s = &mut self.keys[i];
                s.cached_ref = cur;
                s.cached.clone_from(&value);
                return Ok(value);
            }
            // The cell moved on and the entry's block was reused: look again.
        }
        Err(KvError::Corrupt(format!(
            "cell {} kept naming entries that do not verify",
            self.keys[i].cell
        )))
    }

    /// Notes a flushed write of a served key (its entry is durable), to publish with
    /// [`ShardReplicas::publish`]. Later writes of a batch supersede earlier ones.
    pub fn stage_flushed(&mut self, key: &[u8], eref: EntryRef, value: Option<&[u8]>) {
        let Some(&i) = self.index.get(key) else {
            return;
        };
        self.stats.writes += 1;
        let s = &mut self.keys[i];
        if s.next_ref == 0 {
            self.todo.push(i);
        }
        s.next_ref = eref.0;
        match value {
            Some(v) => {
                let buf = s.next.get_or_insert_with(Vec::new);
                buf.clear();
                buf.extend_from_slice(v);
            }
            None => s.next = None,
        }
    }

    /// Swaps the cells of the flushed writes to their new entries, durably: one round trip
    /// (CAS + FLUSH per cell) when no other replica wrote meanwhile, one more per lost CAS.
    pub fn publish<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        geo: &Geometry,
        timeout: Duration,
    ) -> Result<(), KvError> {
        let mut wrs: Vec<(WrId, WorkRequest)> = Vec::with_capacity(2 * CAS_PER_POST);
        let mut out = [done(0, Verb::Cas); 2 * CAS_PER_POST];
        let mut rounds = 0;
        let result = loop {
            if self.todo.is_empty() {
                break Ok(());
            }
            rounds += 1;
            if rounds > MAX_CAS_ROUNDS {
                break Err(KvError::Fabric(format!(
                    "cell CAS lost {MAX_CAS_ROUNDS} times in a row"
                )));
            }
            let n = self.todo.len().min(CAS_PER_POST);
            wrs.clear();
            for (j, &i) in self.todo[..n].iter().enumerate() {
                let s = &self.keys[i];
                let remote = geo.indirect_off(s.cell as u64);
                wrs.push((
                    2 * j as u64,
                    WorkRequest::Cas {
                        remote,
                        expect: s.last_seen,
                        new: s.next_ref,
                    },
                ));
                wrs.push((2 * j as u64 + 1, WorkRequest::Flush { remote, len: 8 }));
            }
            if let Err(e) = execute(f, &wrs, &mut out[..2 * n], timeout) {
                break Err(e.into());
            }
            if let Some(bad) = out[..2 * n]
                .iter()
                .find(|c| c.status != CompletionStatus::Success)
            {
                break Err(KvError::Fabric(format!("cell CAS failed: {}", bad.status)));
            }
            let mut j = 0;
            let mut kept = 0;
            while j < n {
                let i = self.todo[j];
                let old = out[2 * j].value;
                let s = &mut self.keys[i];
                if old == s.last_seen {
                    s.last_seen = s.next_ref;
                    s.cached_ref = s.next_ref;
                    std::mem::swap(&mut s.cached, &mut s.next);
                    s.next_ref = 0;
                } else {
                    self.stats.cas_retries += 1;
                    s.last_seen = old;
                    self.todo[kept] = i;
                    kept += 1;
                }
                j += 1;
            }
            self.todo.drain(kept..n);
        };
        match &result {
            // Kept for `resume_publish` after a reconnect (or `abandon_publish`).
            Err(KvError::Disconnected(_)) => {}
            Err(_) => self.abandon_publish(),
            Ok(()) => {}
        }
        result
    }

    /// Forgets the writes that [`ShardReplicas::publish`] did not publish.
    pub fn abandon_publish(&mut self) {
        for &i in &self.todo {
            self.keys[i].next_ref = 0;
        }
        self.todo.clear();
    }

    /// Carries on with a [`ShardReplicas::publish`] that lost its connection, over a new
    /// one. A CAS whose completion was lost may have executed, so each cell still to swap is
    /// read first: one that names this write's entry was swapped (entry references are
    /// unique while the entry's block is in this shard's log, and it is), one that names
    /// anything else was not swapped by this write or was swapped and overwritten by another
    /// replica since, and is swapped again from what it names now, exactly as after a lost
    /// CAS. In the second case the cell names this write's entry again although another
    /// replica's write came after it; neither write was lost, and this one is acknowledged
    /// only now, after the write it replaces.
    pub fn resume_publish<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        geo: &Geometry,
        timeout: Duration,
    ) -> Result<(), KvError> {
        let mut kept = 0;
        for j in 0..self.todo.len() {
            let i = self.todo[j];
            let cur = match self.read_cell(f, geo, self.keys[i].cell, timeout) {
                Ok(cur) => cur,
                Err(e) => {
                    self.abandon_publish();
                    return Err(e);
                }
            };
            let s = &mut self.keys[i];
            if cur == s.next_ref {
                s.last_seen = s.next_ref;
                s.cached_ref = s.next_ref;
                std::mem::swap(&mut s.cached, &mut s.next);
                s.next_ref = 0;
            } else {
                s.last_seen = cur;
                self.todo[kept] = i;
                kept += 1;
            }
        }
        self.todo.truncate(kept);
        let r = self.publish(f, geo, timeout);
        if r.is_err() {
            self.abandon_publish();
        }
        r
    }
}

fn done(wr_id: WrId, verb: Verb) -> Completion {
    Completion {
        wr_id,
        verb,
        status: CompletionStatus::Success,
        value: 0,
    }
}

/// Keys tracked by [`HotKeys`].
pub(crate) const HOT_KEYS: usize = 16;
/// One request in this many is sampled.
pub(crate) const HOT_SAMPLE: u32 = 16;

/// A space-saving top-k over a sample of a shard's requests: at most [`HOT_KEYS`] counters;
/// an untracked key takes over the smallest counter (and its count, so counts are upper
/// bounds that never miss a key hotter than 1/k of the sample).
#[derive(Debug)]
pub(crate) struct HotKeys {
    /// Xorshift state: the sample is random, so a periodic request pattern cannot alias
    /// with it.
    rng: u32,
    counters: Vec<(Vec<u8>, u64)>,
}

impl Default for HotKeys {
    fn default() -> Self {
        Self {
            rng: 0x9E37_79B9,
            counters: Vec::new(),
        }
    }
}

impl HotKeys {
    /// Counts a request of `key` (one in [`HOT_SAMPLE`] on average).
    #[inline]
    pub fn observe(&mut self, key: &[u8]) {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        if x % HOT_SAMPLE == 0 {
            self.count(key);
        }
    }

    fn count(&mut self, key: &[u8]) {
        if let Some(c) = self.counters.iter_mut().find(|(k, _)| k == key) {
            c.1 += 1;
            return;
        }
        if self.counters.len() < HOT_KEYS {
            self.counters.push((key.to_vec(), 1));
            return;
        }
        if let Some(min) = self.counters.iter_mut().min_by_key(|(_, n)| *n) {
            min.0.clear();
            min.0.extend_from_slice(key);
            min.1 += 1;
        }
    }

    /// The hottest keys since the last call, hottest first, with their estimated request
    /// counts; starts over.
    pub fn take(&mut self) -> Vec<(Vec<u8>, u64)> {
        let mut v = std::mem::take(&mut self.counters);
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for c in &mut v {
            c.1 *= HOT_SAMPLE as u64;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinomo_hw::fabric::FabricError;

    #[test]
    fn hot_keys_find_the_heavy_hitters_of_a_sample() {
        let mut h = HotKeys::default();
        // 2 hot keys among 1000 cold ones, 1/4 of the requests each.
        for i in 0..64_000u32 {
            let key = match i % 4 {
                0 => b"hot-a".to_vec(),
                1 => b"hot-b".to_vec(),
                _ => format!("cold-{}", i % 1000).into_bytes(),
            };
            h.observe(&key);
        }
        let top = h.take();
        assert!(top.len() <= HOT_KEYS);
        let names: Vec<&[u8]> = top.iter().take(2).map(|(k, _)| &k[..]).collect();
        assert!(names.contains(&&b"hot-a"[..]) && names.contains(&&b"hot-b"[..]));
        // 16 000 requests of each; the sample is random and space-saving over-estimates by
        // at most the sample size / k, so the estimate is near, never far below.
        let a = top.iter().find(|(k, _)| k == b"hot-a").map_or(0, |c| c.1);
        assert!(
            (12_000..=16_000 + 2 * 64_000 / HOT_KEYS as u64).contains(&a),
            "{a}"
        );
        assert!(h.take().is_empty(), "take starts over");
    }

    #[test]
    fn replica_table_and_client_choice() {
        let routes = ReplicaRoutes::default();
        let mut view = ReplicaView::new();
        view.refresh(&routes);
        assert_eq!(view.pick(b"k"), None);
        let set = ReplicaSet {
            cell: 3,
            owner: 1,
            kns: vec![1, 0, 2],
        };
        let t = Replicas::default().with(b"k", set.clone());
        routes.publish(Arc::new(t.clone()));
        assert!(view.is_stale(&routes));
        view.refresh(&routes);
        assert!(!view.is_stale(&routes));
        let kn = view.pick(b"k").expect("replicated");
        assert!(set.kns.contains(&kn));
        assert_eq!(view.pick(b"other"), None);
        // Clients spread over the replicas.
        let picks: std::collections::HashSet<u16> = (0..6)
            .map(|_| {
                let mut v = ReplicaView::new();
                v.refresh(&routes);
                v.pick(b"k").unwrap_or(u16::MAX)
            })
            .collect();
        assert_eq!(picks.len(), 3, "{picks:?}");
        let t2 = t.without(b"k");
        assert!(t2.is_empty() && t.len() == 1);
    }

    #[test]
    fn install_serves_only_this_shards_non_owned_keys() {
        use dinomo_hw::fabric::nic::{NicModel, NicProfile};
        use dinomo_hw::fabric::{ControlServer, ShmFabric};
        use dinomo_hw::heap::HeapRegion;
        use dinomo_hw::CpuPersist;
        let region = HeapRegion::new(1 << 20);
        let ctl = ControlServer::in_memory(2);
        let mut f = ShmFabric::new(
            Arc::new(region.pmem(CpuPersist::detect())),
            ctl.handle().client().expect("control slot"),
            NicModel::new(NicProfile::None),
        );
        let mut r = ShardReplicas::new(&mut f).expect("buffer");
        let key = b"hot";
        let shard = shard_of(key_slot(key), 2) as u16;
        let t = Arc::new(Replicas::default().with(
            key,
            ReplicaSet {
                cell: 1,
                owner: 0,
                kns: vec![0, 1],
            },
        ));
        // A table naming a KN as the owner of a key with a cell hands it the cell (its
        // slot moved there while the key stayed replicated).
        r.install(Arc::clone(&t), 0, shard, 2);
        assert!(r.serves(key));
        // Named a mere replica now, it serves the key while the table lists it.
        r.install(Arc::clone(&t), 1, shard, 2);
        assert!(r.serves(key));
        r.forget(key);
        // Another shard of a replica KN does not serve it.
        r.install(Arc::clone(&t), 1, 1 - shard, 2);
        assert!(!r.serves(key));
        r.install(Arc::clone(&t), 1, shard, 2);
        assert!(r.serves(key) && r.cell_of(key) == Some(1));
        let owner_only = Arc::new(t.with(
            key,
            ReplicaSet {
                cell: 1,
                owner: 0,
                kns: vec![0],
            },
        ));
        assert!(r.drops_any(&owner_only, 1));
        r.install(owner_only, 1, shard, 2);
        assert!(!r.serves(key));
        // An owner keeps the key until End, whatever the table says.
        r.adopt(key, 1, 77);
        assert!(!r.drops_any(&Replicas::default(), 0));
        r.install(Arc::new(Replicas::default()), 0, shard, 2);
        assert!(r.serves(key));
        r.forget(key);
        assert!(!r.serves(key));
    }

    /// The shm fabric, except that the CAS batch posted while `lose` is set executes but
    /// its completions are lost with the connection (as over verbs when the DPM dies after
    /// the NIC executed the CAS and before the ACK came back), or, with `before`, is lost
    /// before it executes. Until `reconnect`, everything fails with `Disconnected`.
    struct LosesCas {
        inner: dinomo_hw::fabric::ShmFabric<dinomo_hw::heap::HeapPersist<dinomo_hw::CpuPersist>>,
        lose: bool,
        before: bool,
        lost: bool,
        reconnects: u32,
    }

    impl LosesCas {
        fn gone(&self) -> Result<(), FabricError> {
            if self.lost {
                return Err(FabricError::Disconnected("test: the DPM went away".into()));
            }
            Ok(())
        }
    }

    impl Fabric for LosesCas {
        fn region_len(&self) -> u64 {
            self.inner.region_len()
        }
        fn alloc_buf(&mut self, len: usize) -> Result<LocalBuf, FabricError> {
            self.inner.alloc_buf(len)
        }
        fn buf(&self, buf: LocalBuf) -> &[u8] {
            self.inner.buf(buf)
        }
        fn buf_mut(&mut self, buf: LocalBuf) -> &mut [u8] {
            self.inner.buf_mut(buf)
        }
        fn post(&mut self, wrs: &[(WrId, WorkRequest)]) -> Result<(), FabricError> {
            self.gone()?;
            let cas = wrs
                .iter()
                .any(|(_, w)| matches!(w, WorkRequest::Cas { .. }));
            if cas && self.lose {
                self.lose = false;
                self.lost = true;
                if self.before {
                    return self.gone();
                }
                self.inner.post(wrs)?;
                let mut out = vec![done(0, Verb::Cas); wrs.len()];
                self.inner.wait(&mut out, Duration::from_secs(5))?;
                return Ok(());
            }
            self.inner.post(wrs)
        }
        fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
            self.gone()?;
            self.inner.poll(out)
        }
        fn outstanding(&self) -> usize {
            self.inner.outstanding()
        }
        fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<(), FabricError> {
            self.gone()?;
            self.inner.wait(out, timeout)
        }
        fn counters(&self) -> &dinomo_hw::fabric::FabricCounters {
            self.inner.counters()
        }
    }

    impl dinomo_hw::fabric::ControlChannel for LosesCas {
        fn send(&mut self, frame: &dinomo_shared::msg::Frame) -> Result<(), FabricError> {
            self.inner.send(frame)
        }
        fn recv(
            &mut self,
            timeout: Duration,
        ) -> Result<Option<dinomo_shared::msg::Frame>, FabricError> {
            self.inner.recv(timeout)
        }
        fn next_request_id(&mut self) -> u32 {
            self.inner.next_request_id()
        }
        fn reconnect(&mut self, _: Duration) -> Result<(), FabricError> {
            self.lost = false;
            self.reconnects += 1;
            Ok(())
        }
    }

    /// A publish whose cell CAS lost its completion with the connection: after a reconnect
    /// the cell tells whether the CAS executed, and the write ends up published exactly
    /// once, whichever way it went (and also when another replica swapped the cell since).
    #[test]
    fn a_cas_whose_completion_was_lost_is_resolved_from_the_cell() {
        use dinomo_hw::fabric::nic::{NicModel, NicProfile};
        use dinomo_hw::fabric::{ControlChannel, ControlServer, ShmFabric};
        use dinomo_hw::heap::HeapRegion;
        use dinomo_hw::CpuPersist;
        use dinomo_shared::geometry::{FormatParams, Geometry};
        const REGION: u64 = 32 << 20;
        const T: Duration = Duration::from_secs(5);
        let geo = Geometry::compute(&FormatParams::for_size(REGION)).expect("geometry");
        let region = HeapRegion::new(REGION);
        let pm = Arc::new(region.pmem(CpuPersist::detect()));
        let ctl = ControlServer::in_memory(2);
        let mut f = LosesCas {
            inner: ShmFabric::new(
                Arc::clone(&pm),
                ctl.handle().client().expect("control slot"),
                NicModel::new(NicProfile::None),
            ),
            lose: false,
            before: false,
            lost: false,
            reconnects: 0,
        };
        let entry = |n: u64| {
            EntryRef::new(geo.block_off(1) + 64 * n, 64)
                .expect("entry ref")
                .0
        };
        let cell = 3u32;
        let at = geo.indirect_off(u64::from(cell));
        pm.store_u64(at, entry(1));
        let mut r = ShardReplicas::new(&mut f).expect("buffer");
        r.adopt(b"k", cell, entry(1));
        let key = |r: &ShardReplicas| {
            let s = &r.keys[r.index[&b"k"[..]]];
            (s.last_seen, s.cached_ref, s.cached.clone(), s.next_ref)
        };

        // 1. The CAS executed; its completion was lost.
        r.stage_flushed(b"k", EntryRef(entry(2)), Some(b"v2"));
        f.lose = true;
        let e = r.publish(&mut f, &geo, T).expect_err("lost");
        assert!(matches!(e, KvError::Disconnected(_)), "{e:?}");
        assert_eq!(pm.load_u64(at), entry(2), "the CAS executed");
        f.reconnect(T).expect("reconnect");
        r.resume_publish(&mut f, &geo, T).expect("resumed");
        assert_eq!(pm.load_u64(at), entry(2));
        assert_eq!(
            r.stats.cas_retries, 0,
            "its own CAS was recognised, not retried"
        );
        assert_eq!(key(&r), (entry(2), entry(2), Some(b"v2".to_vec()), 0));

        // 2. The CAS never executed.
        r.stage_flushed(b"k", EntryRef(entry(3)), Some(b"v3"));
        (f.lose, f.before) = (true, true);
        let e = r.publish(&mut f, &geo, T).expect_err("lost");
        assert!(matches!(e, KvError::Disconnected(_)), "{e:?}");
        assert_eq!(pm.load_u64(at), entry(2), "nothing executed");
        f.reconnect(T).expect("reconnect");
        r.resume_publish(&mut f, &geo, T).expect("resumed");
        assert_eq!(pm.load_u64(at), entry(3));
        assert_eq!(key(&r), (entry(3), entry(3), Some(b"v3".to_vec()), 0));

        // 3. The CAS executed and another replica swapped the cell since: swapped again
        //    from what the cell names now, like after a lost CAS.
        r.stage_flushed(b"k", EntryRef(entry(4)), Some(b"v4"));
        (f.lose, f.before) = (true, false);
        assert!(r.publish(&mut f, &geo, T).is_err());
        pm.store_u64(at, entry(5));
        f.reconnect(T).expect("reconnect");
        r.resume_publish(&mut f, &geo, T).expect("resumed");
        assert_eq!(pm.load_u64(at), entry(4));
        assert_eq!(key(&r), (entry(4), entry(4), Some(b"v4".to_vec()), 0));
        assert_eq!(f.reconnects, 3);

        // A publish that fails for another reason (or is abandoned) forgets its writes.
        r.stage_flushed(b"k", EntryRef(entry(6)), Some(b"v6"));
        f.lose = true;
        assert!(r.publish(&mut f, &geo, T).is_err());
        r.abandon_publish();
        assert!(r.todo.is_empty() && key(&r).3 == 0);
    }
}
