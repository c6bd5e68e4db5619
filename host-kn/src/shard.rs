//! A KN shard: one thread, one fabric connection, one log, one cache. Nothing on its hot
//! path is shared with another shard.
//!
//! Writes are staged and made durable in batches (group commit): the batch is flushed when
//! it fills, when no request is waiting, or when its oldest entry has waited the configured
//! bound; writers are answered only after the flush. Reads go, in order, to the cached value
//! (0 RT), the shard's own writes that the DPM has not merged yet (found locally; 1 RT to
//! read the entry unless the value is cached), the cached shortcut (1 RT), and the index
//! (2 RTs with the root cached). A read of a key that is in the batch being staged first
//! flushes the batch, so no read ever returns a value that is not durable.

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::{Fabric, FabricCounters};
use dinomo_shared::control::ProgressSlot;
use dinomo_shared::entry::{self, Op, MAX_KEY_LEN, MAX_VALUE_LEN};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::index::EntryRef;
use dinomo_shared::pod::Pod;
use dinomo_shared::slot::key_slot;

use crate::dac::{DacCache, DacConfig, DacStats, Lookup};
use crate::error::KvError;
use crate::log::{AppendError, LogArea, ShardLog};
use crate::ownership::{shard_of, SlotMap};
use crate::reader::IndexReader;
use crate::replica::{HotKeys, ReplicaCtl, ReplicaStats, Replicas, ShardReplicas};

/// How a shard behaves.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub kn_id: u16,
    pub shard: u16,
    pub shards: u16,
    pub lease_epoch: u32,
    pub cache: DacConfig,
    /// Flush when the staged batch reaches this many bytes...
    pub batch_bytes: usize,
    /// ...or this many entries...
    pub batch_entries: u64,
    /// ...or when its oldest entry has waited this long (with requests still arriving).
    pub flush_bound: Duration,
    /// Registered staging buffer size (at least the largest entry accepted).
    pub staging_bytes: usize,
    /// Fabric and control timeout.
    pub timeout: Duration,
    /// Read the DPM's progress to forget merged own writes once this many are tracked.
    pub trim_threshold: usize,
    /// Misses between refreshes of the cache's miss cost.
    pub miss_cost_every: u64,
    /// The KN's lease, checked before every flush (`None`: no lease, as in the in-process
    /// cluster). A batch is made durable, and its writers answered, only while the lease
    /// surely holds, so nothing is acknowledged after the manager may have fenced the KN.
    pub lease: Option<Arc<LeaseGate>>,
}

/// A KN's lease as its shards see it: valid until a deadline that the lease keeper moves
/// forward on every renewal; lost for good once the manager refused a renewal or the
/// deadline passed long ago.
#[derive(Debug)]
pub struct LeaseGate {
    base: Instant,
    /// Milliseconds since `base` until which the lease surely holds.
    until_ms: std::sync::atomic::AtomicU64,
    /// How long after the deadline a flush keeps waiting for a renewal before giving up.
    grace: Duration,
    lost: std::sync::atomic::AtomicBool,
}

impl LeaseGate {
    /// A gate that is not valid until the first [`LeaseGate::extend_to`].
    pub fn new(grace: Duration) -> Self {
        Self {
            base: Instant::now(),
            until_ms: std::sync::atomic::AtomicU64::new(0),
            grace,
            lost: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The lease surely holds until `until` (never moves the deadline back).
    pub fn extend_to(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.until_ms
            .fetch_max(ms, std::sync::atomic::Ordering::AcqRel);
    }

    /// The lease is gone (fenced, or the KN is stopping without it).
    pub fn set_lost(&self) {
        self.lost.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the lease holds now.
    pub fn is_valid(&self) -> bool {
        !self.is_lost()
            && (self.base.elapsed().as_millis() as u64)
                < self.until_ms.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until the lease holds (`true`) or is lost (`false`); a deadline more than the
    /// grace period in the past counts as lost.
    pub fn wait_valid(&self) -> bool {
        loop {
            if self.is_valid() {
                return true;
            }
            if self.is_lost() {
                return false;
            }
            let until = self.until_ms.load(std::sync::atomic::Ordering::Acquire);
            if self.base.elapsed().as_millis() as u64 > until + self.grace.as_millis() as u64 {
                self.set_lost();
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl ShardConfig {
    pub fn new(kn_id: u16, shard: u16, shards: u16, cache: DacConfig) -> Self {
        Self {
            kn_id,
            shard,
            shards,
            lease_epoch: 1,
            cache,
            batch_bytes: 64 << 10,
            batch_entries: 256,
            flush_bound: Duration::from_micros(100),
            staging_bytes: 2 << 20,
            timeout: Duration::from_secs(10),
            trim_threshold: 4096,
            miss_cost_every: 1024,
            lease: None,
        }
    }
}

/// A client request.
#[derive(Debug)]
pub enum Request {
    Get { key: Vec<u8> },
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

impl Request {
    pub fn key(&self) -> &[u8] {
        match self {
            Self::Get { key } | Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// The answer to a request: the value for a get (None: absent), None for writes.
#[derive(Debug)]
pub struct Reply {
    pub tag: u64,
    pub result: Result<Option<Vec<u8>>, KvError>,
}

/// A reply callback, for callers that do not wait on a std channel (e.g. an async server
/// completing a future). It runs on the shard thread, so it must be quick and not block.
pub struct ReplyFn(pub Box<dyn FnOnce(Reply) + Send>);

impl std::fmt::Debug for ReplyFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyFn")
    }
}

/// Where a shard sends the answer to a request.
#[derive(Debug)]
pub enum ReplyTo {
    Chan(Sender<Reply>),
    Fn(ReplyFn),
}

impl ReplyTo {
    /// Delivers the reply (a caller that went away is not an error).
    pub fn send(self, r: Reply) {
        match self {
            Self::Chan(tx) => {
                let _ = tx.send(r);
            }
            Self::Fn(f) => (f.0)(r),
        }
    }
}

/// What a shard thread receives.
#[derive(Debug)]
pub enum Msg {
    Req {
        op: Request,
        tag: u64,
        reply: Sender<Reply>,
    },
    /// A request answered through a callback instead of a channel.
    ReqFn {
        op: Request,
        tag: u64,
        reply: ReplyFn,
    },
    /// A new cluster map; entries of slots no longer owned are dropped from the cache.
    SetMap(Arc<SlotMap>),
    /// Hand over the slots this shard loses under `map`: install it (so their requests are
    /// refused from now on and their cached entries dropped), flush, have the DPM merge this
    /// shard's log to its tail, then forget own unmerged writes of the lost slots. After the
    /// reply, the index holds every write this shard acknowledged, so a new owner reading it
    /// cold sees them all. Requests queued before this message are answered before it.
    Release {
        map: Arc<SlotMap>,
        reply: Sender<Result<ReleaseReport, KvError>>,
    },
    Stats(Sender<ShardStats>),
    /// Flush, have the DPM merge this shard's log to its tail, forget the merged own writes,
    /// then answer (used to start a measurement from a merged state).
    Sync(Sender<Result<(), KvError>>),
    /// Flush, close the log (the DPM merges it to its tail) and exit.
    Stop,
    /// The replicated keys: this shard serves those of its slots listed for its KN.
    SetReplicas(Arc<Replicas>),
    /// Allocate or free a replicated key's cell (sent to the owning shard).
    Replica(ReplicaCtl),
    /// The shard's hottest keys since the last such request.
    HotKeys(Sender<Vec<(Vec<u8>, u64)>>),
}

/// What handing over slots cost one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Log entries the DPM merged to bring the index up to the log's tail.
    pub entries_merged: u64,
    /// Time from the merge request to its reply.
    pub merge: Duration,
}

/// Counters of one shard (add them up for a KN or a cluster).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ShardStats {
    pub gets: u64,
    pub puts: u64,
    pub deletes: u64,
    pub hit_value: u64,
    pub hit_shortcut: u64,
    pub hit_local: u64,
    pub miss: u64,
    /// Gets of keys that do not exist (counted in `miss` too).
    pub absent: u64,
    pub stale_shortcuts: u64,
    pub wrong_owner: u64,
    pub read_rts: u64,
    pub write_rts: u64,
    /// RTs spent reading the DPM's progress to forget merged own writes.
    pub maintenance_rts: u64,
    pub miss_rts: u64,
    pub flushes: u64,
    pub flushed_entries: u64,
    pub unmerged: u64,
    /// Time the shard thread spent handling messages (not waiting for them), for occupancy.
    pub busy_ns: u64,
    pub fabric: FabricCounters,
    pub cache: DacStats,
    pub replica: ReplicaStats,
}

impl ShardStats {
    pub fn add(&mut self, o: &ShardStats) {
        self.gets += o.gets;
        self.puts += o.puts;
        self.deletes += o.deletes;
        self.hit_value += o.hit_value;
        self.hit_shortcut += o.hit_shortcut;
        self.hit_local += o.hit_local;
        self.miss += o.miss;
        self.absent += o.absent;
        self.stale_shortcuts += o.stale_shortcuts;
        self.wrong_owner += o.wrong_owner;
        self.read_rts += o.read_rts;
        self.write_rts += o.write_rts;
        self.maintenance_rts += o.maintenance_rts;
        self.miss_rts += o.miss_rts;
        self.flushes += o.flushes;
        self.flushed_entries += o.flushed_entries;
        self.unmerged += o.unmerged;
        self.busy_ns += o.busy_ns;
        self.fabric.add(&o.fabric);
        self.replica.add(&o.replica);
        self.cache.values += o.cache.values;
        self.cache.shortcuts += o.cache.shortcuts;
        self.cache.value_bytes += o.cache.value_bytes;
        self.cache.shortcut_bytes += o.cache.shortcut_bytes;
        self.cache.budget_bytes += o.cache.budget_bytes;
        self.cache.promotions += o.cache.promotions;
        self.cache.demotions += o.cache.demotions;
        self.cache.evictions += o.cache.evictions;
    }

    /// Counts accumulated since `earlier` (cache occupancy and `unmerged` are current values).
    pub fn since(&self, e: &ShardStats) -> ShardStats {
        ShardStats {
            gets: self.gets - e.gets,
            puts: self.puts - e.puts,
            deletes: self.deletes - e.deletes,
            hit_value: self.hit_value - e.hit_value,
            hit_shortcut: self.hit_shortcut - e.hit_shortcut,
            hit_local: self.hit_local - e.hit_local,
            miss: self.miss - e.miss,
            absent: self.absent - e.absent,
            stale_shortcuts: self.stale_shortcuts - e.stale_shortcuts,
            wrong_owner: self.wrong_owner - e.wrong_owner,
            read_rts: self.read_rts - e.read_rts,
            write_rts: self.write_rts - e.write_rts,
            maintenance_rts: self.maintenance_rts - e.maintenance_rts,
            miss_rts: self.miss_rts - e.miss_rts,
            flushes: self.flushes - e.flushes,
            flushed_entries: self.flushed_entries - e.flushed_entries,
            unmerged: self.unmerged,
            busy_ns: self.busy_ns - e.busy_ns,
            fabric: self.fabric.since(&e.fabric),
            replica: self.replica.since(&e.replica),
            cache: DacStats {
                promotions: self.cache.promotions - e.cache.promotions,
                demotions: self.cache.demotions - e.cache.demotions,
                evictions: self.cache.evictions - e.cache.evictions,
                ..self.cache
            },
        }
    }
}

#[derive(Debug)]
struct Unmerged {
    seq: u64,
    /// `None`: a delete.
    eref: Option<EntryRef>,
}

#[derive(Debug)]
struct Pending {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    eref: EntryRef,
    seq: u64,
    reply: ReplyTo,
    tag: u64,
    /// A write of a replicated key: published through its cell, not cached.
    replicated: bool,
}

/// One shard of a KN.
#[derive(Debug)]
pub struct Shard<F: Fabric> {
    cfg: ShardConfig,
    f: F,
    geo: Geometry,
    log: ShardLog,
    reader: IndexReader,
    cache: DacCache,
    map: Arc<SlotMap>,
    /// Own writes not yet merged; the key is shared with `unmerged_order` (one allocation
    /// per write; a shard is one thread, so `Rc` suffices).
    unmerged: HashMap<Rc<[u8]>, Unmerged>,
    unmerged_order: VecDeque<(u64, Rc<[u8]>)>,
    pending: Vec<Pending>,
    staged_hashes: HashSet<u64>,
    first_staged: Option<Instant>,
    broken: Option<KvError>,
    stats: ShardStats,
    misses_since_cost: u64,
    miss_rts_since_cost: u64,
    replicas: ShardReplicas,
    hot: HotKeys,
}

/// Reads the region's geometry through the fabric (one READ of the superblock).
pub fn read_geometry<F: Fabric + ?Sized>(
    f: &mut F,
    timeout: Duration,
) -> Result<Geometry, KvError> {
    use dinomo_hw::fabric::{execute, Completion, CompletionStatus, Verb, WorkRequest};
    use dinomo_shared::superblock::Superblock;
    let buf = f.alloc_buf(core::mem::size_of::<Superblock>())?;
    let wr = [(
        0,
        WorkRequest::Read {
            remote: 0,
            local: buf.slice(0, core::mem::size_of::<Superblock>() as u32),
        },
    )];
    let mut out = [Completion {
        wr_id: 0,
        verb: Verb::Read,
        status: CompletionStatus::Success,
        value: 0,
    }];
    execute(f, &wr, &mut out, timeout)?;
    if out[0].status != CompletionStatus::Success {
        return Err(KvError::Fabric(format!(
            "reading the superblock: {}",
            out[0].status
        )));
    }
    let sb = Superblock::read_from(f.buf(buf))
        .ok_or_else(|| KvError::Corrupt("short superblock".into()))?;
    Geometry::from_superblock(&sb, f.region_len()).map_err(|e| KvError::Corrupt(e.to_string()))
}

impl<F: Fabric> Shard<F> {
    /// Attaches to the DPM over `f`: reads the geometry, opens a log, sets up the cache.
    pub fn open(cfg: ShardConfig, mut f: F, map: Arc<SlotMap>) -> Result<Self, KvError> {
        let geo = read_geometry(&mut f, cfg.timeout)?;
        let area = LogArea {
            log_off: geo.log_off,
            block_size: geo.block_size,
            n_blocks: geo.n_blocks,
        };
        let log = ShardLog::open(
            &mut f,
            area,
            cfg.kn_id as u32,
            cfg.shard as u32,
            cfg.lease_epoch,
            cfg.staging_bytes,
            cfg.timeout,
        )?;
        let mut reader = IndexReader::new(&mut f, geo.root_off(), area, cfg.timeout)?;
        let (b, s) = log.current_block();
        reader.learn_salt(b, s);
        let cache = DacCache::new(cfg.cache.clone());
        let replicas = ShardReplicas::new(&mut f)?;
        Ok(Self {
            cfg,
            f,
            geo,
            log,
            reader,
            cache,
            map,
            unmerged: HashMap::new(),
            unmerged_order: VecDeque::new(),
            pending: Vec::new(),
            staged_hashes: HashSet::new(),
            first_staged: None,
            broken: None,
            stats: ShardStats::default(),
            misses_since_cost: 0,
            miss_rts_since_cost: 0,
            replicas,
            hot: HotKeys::default(),
        })
    }

    /// The largest value accepted with a key of `key_len` bytes.
    pub fn max_value(&self, key_len: usize) -> usize {
        self.log.max_value(key_len).min(MAX_VALUE_LEN)
    }

    /// Current counters.
    pub fn stats(&mut self) -> ShardStats {
        let mut s = self.stats;
        s.fabric = *self.f.counters();
        s.cache = self.cache.stats();
        s.unmerged = self.unmerged.len() as u64;
        s.replica = self.replicas.stats;
        s
    }

    fn rts(&self) -> u64 {
        self.f.counters().round_trips
    }

    /// Refuses a key this shard does not own.
    fn check_owner(&mut self, key: &[u8]) -> Result<(), KvError> {
        validate_key(key)?;
        let slot = key_slot(key);
        let owner = self.map.owner(slot);
        if owner != self.cfg.kn_id
            || shard_of(slot, self.cfg.shards as usize) != self.cfg.shard as usize
        {
            self.stats.wrong_owner += 1;
            return Err(KvError::WrongOwner {
                owner,
                epoch: self.map.epoch(),
            });
        }
        Ok(())
    }

    /// Serves one get.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let replicated = self.replicas.serves(key);
        if !replicated {
            self.check_owner(key)?;
        }
        self.stats.gets += 1;
        if !self.staged_hashes.is_empty()
            && self
                .staged_hashes
                .contains(&dinomo_shared::hash::key_hash(key))
        {
            self.flush();
        }
        let t0 = self.rts();
        let r = if replicated {
            let timeout = self.cfg.timeout;
            self.replicas
                .get(&mut self.f, &mut self.reader, &self.geo, key, timeout)
        } else {
            self.get_inner(key)
        };
        self.stats.read_rts += self.rts() - t0;
        r
    }

    fn get_inner(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let shortcut = match self.cache.get(key) {
            Lookup::Value(v) => {
                self.stats.hit_value += 1;
                return Ok(Some(v.to_vec()));
            }
            Lookup::Shortcut(r) => Some(r),
            Lookup::Miss => None,
        };
        if let Some(u) = self.unmerged.get(key) {
            self.stats.hit_local += 1;
            let Some(r) = u.eref else { return Ok(None) };
            return match self.reader.fetch(&mut self.f, key, &[r])? {
                Some(found) => {
                    let value = self.value_of(found.value_at, found.value_len);
                    self.cache.on_fetch(key, &value, r, true);
                    Ok(Some(value))
                }
                None => Err(KvError::Corrupt(format!(
                    "own unmerged entry at {:#x} does not verify",
                    r.offset()
                ))),
            };
        }
        if let Some(r) = shortcut {
            if let Some(found) = self.reader.fetch(&mut self.f, key, &[r])? {
                self.stats.hit_shortcut += 1;
                let value = self.value_of(found.value_at, found.value_len);
                self.cache.on_fetch(key, &value, r, true);
                return Ok(Some(value));
            }
            // Moved or stale: forget it and take the miss path.
            self.stats.stale_shortcuts += 1;
            self.cache.remove(key);
        }
        self.stats.miss += 1;
        let t0 = self.rts();
        let found = self.reader.lookup(&mut self.f, key);
        let spent = self.rts() - t0;
        self.stats.miss_rts += spent;
        self.note_miss_cost(spent);
        match found? {
            Some(found) => {
                let value = self.value_of(found.value_at, found.value_len);
                self.cache.on_fetch(key, &value, found.eref, false);
                Ok(Some(value))
            }
            None => {
                self.stats.absent += 1;
                Ok(None)
            }
        }
    }

    fn value_of(&self, at: usize, len: usize) -> Vec<u8> {
        self.reader.buf(&self.f)[at..at + len].to_vec()
    }

    fn note_miss_cost(&mut self, rts: u64) {
        self.misses_since_cost += 1;
        self.miss_rts_since_cost += rts;
        if self.misses_since_cost >= self.cfg.miss_cost_every {
            self.cache
                .set_miss_cost(self.miss_rts_since_cost as f64 / self.misses_since_cost as f64);
            self.misses_since_cost = 0;
            self.miss_rts_since_cost = 0;
        }
    }

    /// Stages a put or delete; the reply is sent once it is durable (or has failed).
    pub fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, tag: u64, reply: Sender<Reply>) {
        self.write_to(key, value, tag, ReplyTo::Chan(reply));
    }

    /// [`Shard::write`] with any kind of reply target.
    pub fn write_to(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, tag: u64, reply: ReplyTo) {
        let (seq, eref) = match self.stage(&key, value.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                reply.send(Reply {
                    tag,
                    result: Err(e),
                });
                return;
            }
        };
        self.staged_hashes
            .insert(dinomo_shared::hash::key_hash(&key));
        self.first_staged.get_or_insert_with(Instant::now);
        let replicated = self.replicas.serves(&key);
        self.pending.push(Pending {
            key,
            value,
            eref,
            seq,
            reply,
            tag,
            replicated,
        });
        if self.log.staged_bytes() >= self.cfg.batch_bytes
            || self.log.staged_entries() >= self.cfg.batch_entries
        {
            self.flush();
        }
    }

    /// Appends the entry to the staged batch; returns its seq and where it will live.
    fn stage(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(u64, EntryRef), KvError> {
        if !self.replicas.serves(key) {
            self.check_owner(key)?;
        }
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let (op, v) = match value {
            Some(v) => {
                self.stats.puts += 1;
                (Op::Put, v)
            }
            None => {
                self.stats.deletes += 1;
                (Op::Delete, &[][..])
            }
        };
        let max = self.max_value(key.len());
        if v.len() > max {
            return Err(KvError::ValueTooLarge { len: v.len(), max });
        }
        for _ in 0..3 {
            match self.log.append(&mut self.f, op, key, v) {
                Ok(a) => return Ok((a.seq, a.eref)),
                Err(AppendError::Kv(e)) => return Err(e),
                Err(AppendError::NeedFlush) => {
                    self.flush();
                    if let Some(e) = &self.broken {
                        return Err(e.clone());
                    }
                    if self
                        .log
                        .block_full_for(entry::padded_len(key.len(), v.len()))
                    {
                        let t0 = self.rts();
                        let switched = self.log.switch_block(&mut self.f);
                        self.stats.write_rts += self.rts() - t0;
                        switched?;
                        let (b, s) = self.log.current_block();
                        self.reader.learn_salt(b, s);
                    }
                }
            }
        }
        Err(KvError::Corrupt("entry does not fit an empty block".into()))
    }

    /// Makes the staged batch durable and answers its writers.
    pub fn flush(&mut self) {
        if self.pending.is_empty() && self.log.staged_bytes() == 0 {
            return;
        }
        if let Some(lease) = &self.cfg.lease {
            if self.broken.is_none() && !lease.wait_valid() {
                // Fenced: this batch is never written, and no later one either.
                self.broken = Some(KvError::ShuttingDown);
            }
            if let Some(e) = self.broken.clone() {
                self.staged_hashes.clear();
                self.first_staged = None;
                for p in self.pending.drain(..) {
                    p.reply.send(Reply {
                        tag: p.tag,
                        result: Err(e.clone()),
                    });
                }
                return;
            }
        }
        let t0 = self.rts();
        let r = self.log.flush(&mut self.f);
        self.stats.write_rts += self.rts() - t0;
        // A shard paused between its lease check and its WRITE can land the batch after the
        // manager fenced this KN, and the memory node never merges past a fence. So the batch
        // is acknowledged (and replicated keys' cells swapped to it) only if the lease still
        // holds now: it was renewed, hence never expired, hence no fence came before the WRITE.
        let r = match r {
            Ok(_) if self.cfg.lease.as_ref().is_some_and(|l| !l.wait_valid()) => {
                Err(KvError::LeaseLapsed)
            }
            r => r,
        };
        self.staged_hashes.clear();
        self.first_staged = None;
        match r {
            Ok(fl) => {
                self.stats.flushes += 1;
                self.stats.flushed_entries += fl.entries;
                let published = self.publish_replicated();
                for p in self.pending.drain(..) {
                    if p.replicated {
                        let result = published.clone().map(|()| None);
                        p.reply.send(Reply { tag: p.tag, result });
                        continue;
                    }
                    let key: Rc<[u8]> = Rc::from(p.key);
                    match &p.value {
                        Some(v) => self.cache.on_write(&key, v, p.eref),
                        None => self.cache.remove(&key),
                    }
                    let eref = p.value.as_ref().map(|_| p.eref);
                    self.unmerged_order.push_back((p.seq, Rc::clone(&key)));
                    self.unmerged.insert(key, Unmerged { seq: p.seq, eref });
                    p.reply.send(Reply {
                        tag: p.tag,
                        result: Ok(None),
                    });
                }
                if self.unmerged.len() >= self.cfg.trim_threshold {
                    self.trim_unmerged();
                }
            }
            Err(e) => {
                // The batch may be partly durable; this log cannot be trusted to continue.
                self.broken = Some(e.clone());
                for p in self.pending.drain(..) {
                    p.reply.send(Reply {
                        tag: p.tag,
                        result: Err(e.clone()),
                    });
                }
            }
        }
    }

    /// Swaps the cells of the batch's replicated writes (now durable) to their entries.
    fn publish_replicated(&mut self) -> Result<(), KvError> {
        if !self.pending.iter().any(|p| p.replicated) {
            return Ok(());
        }
        for p in &self.pending {
            if p.replicated {
                self.replicas
                    .stage_flushed(&p.key, p.eref, p.value.as_deref());
            }
        }
        let t0 = self.rts();
        let r = self
            .replicas
            .publish(&mut self.f, &self.geo, self.cfg.timeout);
        self.stats.write_rts += self.rts() - t0;
        r
    }

    /// See [`ReplicaCtl::Begin`]: the key's newest version gets a reference the DPM can
    /// put in a cell (its own unmerged entry, its index entry, or a new delete entry).
    fn begin_replication(&mut self, key: &[u8]) -> Result<u32, KvError> {
        self.check_owner(key)?;
        if self.replicas.serves(key) {
            return Err(KvError::Replication("the key is already replicated".into()));
        }
        self.flush();
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let t0 = self.rts();
        let allocated = self.alloc_cell(key);
        self.stats.maintenance_rts += self.rts() - t0;
        let (cell, eref) = allocated?;
        self.cache.remove(key);
        self.unmerged.remove(key);
        self.replicas.adopt(key, cell, eref);
        Ok(cell)
    }

    /// Names the newest version of `key` by an entry in this shard's log (the DPM takes a
    /// cell only for an entry of the asking log) and asks the DPM for the key's cell.
    fn alloc_cell(&mut self, key: &[u8]) -> Result<(u32, u64), KvError> {
        if let Some(u) = self.unmerged.get(key) {
            let eref = match u.eref {
                Some(r) => r,
                None => self.append_now(key, None)?,
            };
            return self.request_cell(eref);
        }
        let Some(found) = self.reader.lookup(&mut self.f, key)? else {
            let eref = self.append_now(key, None)?;
            return self.request_cell(eref);
        };
        let value = self.value_of(found.value_at, found.value_len);
        match self.request_cell(found.eref) {
            // The index entry is in another log (an earlier owner's, or an earlier
            // generation of this one): write the same value again into this log.
            Err(KvError::Dpm(dinomo_shared::ErrorCode::InvalidArgument)) => {
                let eref = self.append_now(key, Some(&value))?;
                self.request_cell(eref)
            }
            r => r,
        }
    }

    /// Appends an entry of `key` and makes it durable at once.
    fn append_now(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<EntryRef, KvError> {
        let (_, eref) = self.stage(key, value)?;
        self.flush();
        match &self.broken {
            Some(e) => Err(e.clone()),
            None => Ok(eref),
        }
    }

    fn request_cell(&mut self, eref: EntryRef) -> Result<(u32, u64), KvError> {
        let req = dinomo_shared::msg::Request::AllocCell {
            log_id: self.log.log_id,
            generation: self.log.generation,
            eref: eref.0,
        };
        match crate::control::call(&mut self.f, req, self.cfg.timeout)? {
            dinomo_shared::msg::Response::CellAllocated { cell, eref } => Ok((cell, eref)),
            r => Err(KvError::Corrupt(format!(
                "unexpected reply {r:?} to AllocCell"
            ))),
        }
    }

    /// See [`ReplicaCtl::End`].
    fn end_replication(&mut self, key: &[u8]) -> Result<(), KvError> {
        let Some(cell) = self.replicas.cell_of(key) else {
            return Err(KvError::Replication("the key is not replicated".into()));
        };
        self.sync()?;
        let req = dinomo_shared::msg::Request::FreeCell { cell };
        match crate::control::call(&mut self.f, req, self.cfg.timeout)? {
            dinomo_shared::msg::Response::CellFreed { .. } => {}
            r => {
                return Err(KvError::Corrupt(format!(
                    "unexpected reply {r:?} to FreeCell"
                )))
            }
        }
        self.replicas.forget(key);
        self.cache.remove(key);
        Ok(())
    }

    /// Installs the replicated keys (flushing first if this shard stops serving one).
    pub fn set_replicas(&mut self, table: Arc<Replicas>) {
        if self.replicas.drops_any(&table, self.cfg.kn_id) {
            self.flush();
        }
        let (kn, shard, shards) = (self.cfg.kn_id, self.cfg.shard, self.cfg.shards);
        self.replicas.install(table, kn, shard, shards);
    }

    /// See [`Msg::Sync`].
    pub fn sync(&mut self) -> Result<(), KvError> {
        self.flush();
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let req = dinomo_shared::msg::Request::MergeAll {
            log_id: self.log.log_id,
            generation: self.log.generation,
            upto_seq: self.log.durable_seq(),
        };
        crate::control::call(&mut self.f, req, self.cfg.timeout)?;
        self.trim_unmerged();
        Ok(())
    }

    /// The seq up to which the DPM has merged this shard's log (one READ of its progress
    /// slot), if it can be read.
    fn read_merged_seq(&mut self) -> Option<u64> {
        let t0 = self.rts();
        let line = self
            .reader
            .read_line(&mut self.f, self.geo.progress_off(self.log.log_id));
        self.stats.maintenance_rts += self.rts() - t0;
        let slot = ProgressSlot::read_from(&line.ok()?)?;
        slot.current(self.log.generation)
            .map(|(_, rec)| rec.merged_seq)
    }

    /// Forgets own writes that the DPM has merged (one READ of the log's progress slot).
    fn trim_unmerged(&mut self) {
        let Some(merged_seq) = self.read_merged_seq() else {
            return;
        };
        self.forget_merged(merged_seq);
    }

    /// Forgets own writes up to `merged_seq`.
    fn forget_merged(&mut self, merged_seq: u64) {
        while let Some((seq, _)) = self.unmerged_order.front() {
            if *seq > merged_seq {
                break;
            }
            let Some((seq, key)) = self.unmerged_order.pop_front() else {
                break;
            };
            if self.unmerged.get(&*key).is_some_and(|u| u.seq == seq) {
                self.unmerged.remove(&*key);
            }
        }
    }

    /// Installs a new cluster map; cached entries of slots no longer served are dropped.
    pub fn set_map(&mut self, map: Arc<SlotMap>) {
        self.flush();
        let (kn, shard, shards) = (
            self.cfg.kn_id,
            self.cfg.shard as usize,
            self.cfg.shards as usize,
        );
        let keep = |k: &[u8]| {
            let s = key_slot(k);
            map.owner(s) == kn && shard_of(s, shards) == shard
        };
        self.cache.retain(keep);
        self.map = map;
    }

    /// See [`Msg::Release`]. On an error the lost slots stay refused but their unmerged own
    /// writes are kept, so re-installing a map that gives them back is safe.
    pub fn release(&mut self, map: Arc<SlotMap>) -> Result<ReleaseReport, KvError> {
        self.set_map(map);
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let before = self.read_merged_seq();
        let req = dinomo_shared::msg::Request::MergeAll {
            log_id: self.log.log_id,
            generation: self.log.generation,
            upto_seq: self.log.durable_seq(),
        };
        let t0 = Instant::now();
        let resp = crate::control::call(&mut self.f, req, self.cfg.timeout)?;
        let merge = t0.elapsed();
        let merged_seq = match resp {
            dinomo_shared::msg::Response::Merged { merged_seq } => merged_seq,
            r => {
                return Err(KvError::Corrupt(format!(
                    "unexpected reply {r:?} to MergeAll"
                )))
            }
        };
        if merged_seq < self.log.durable_seq() {
            return Err(KvError::Corrupt(format!(
                "the memory node merged log {} only to seq {merged_seq} of {}",
                self.log.log_id,
                self.log.durable_seq()
            )));
        }
        self.forget_merged(merged_seq);
        let (kn, shard, shards) = (
            self.cfg.kn_id,
            self.cfg.shard as usize,
            self.cfg.shards as usize,
        );
        let map = Arc::clone(&self.map);
        self.unmerged.retain(|k, _| {
            let s = key_slot(k);
            map.owner(s) == kn && shard_of(s, shards) == shard
        });
        Ok(ReleaseReport {
            entries_merged: merged_seq.saturating_sub(before.unwrap_or(merged_seq)),
            merge,
        })
    }

    /// Runs the shard until `Stop` or until every sender is gone.
    pub fn run(mut self, rx: Receiver<Msg>) -> ShardStats {
        loop {
            let msg = if self.pending.is_empty() {
                match crate::client::recv_soon(&rx) {
                    Some(m) => m,
                    None => break,
                }
            } else {
                let waited = self.first_staged.map_or(Duration::ZERO, |t| t.elapsed());
                match rx.recv_timeout(self.cfg.flush_bound.saturating_sub(waited)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        self.flush();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            let busy_from = Instant::now();
            if !self.handle(msg) {
                return self.stop(&rx, busy_from);
            }
            // Take what is already waiting, then flush: no request is waiting any more.
            while let Ok(m) = rx.try_recv() {
                if !self.handle(m) {
                    return self.stop(&rx, busy_from);
                }
                if self
                    .first_staged
                    .is_some_and(|t| t.elapsed() >= self.cfg.flush_bound)
                {
                    self.flush();
                }
            }
            self.flush();
            self.stats.busy_ns += busy_from.elapsed().as_nanos() as u64;
        }
        self.flush();
        self.close()
    }

    /// Answers what is still queued (requests of slots this shard no longer owns get
    /// `WrongOwner`, so their clients retry elsewhere), then flushes and closes the log.
    fn stop(mut self, rx: &Receiver<Msg>, busy_from: Instant) -> ShardStats {
        while let Ok(m) = rx.try_recv() {
            if let Msg::Req { .. } | Msg::ReqFn { .. } = m {
                self.handle(m);
            }
        }
        self.flush();
        self.stats.busy_ns += busy_from.elapsed().as_nanos() as u64;
        self.close()
    }

    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Req { op, tag, reply } => self.request(op, tag, ReplyTo::Chan(reply)),
            Msg::ReqFn { op, tag, reply } => self.request(op, tag, ReplyTo::Fn(reply)),
            Msg::SetMap(m) => self.set_map(m),
            Msg::Release { map, reply } => {
                let r = self.release(map);
                let _ = reply.send(r);
            }
            Msg::Stats(tx) => {
                let s = self.stats();
                let _ = tx.send(s);
            }
            Msg::Sync(tx) => {
                let r = self.sync();
                let _ = tx.send(r);
            }
            Msg::Stop => return false,
            Msg::SetReplicas(t) => self.set_replicas(t),
            Msg::Replica(ReplicaCtl::Begin { key, reply }) => {
                let _ = reply.send(self.begin_replication(&key));
            }
            Msg::Replica(ReplicaCtl::End { key, reply }) => {
                let _ = reply.send(self.end_replication(&key));
            }
            Msg::HotKeys(tx) => {
                let _ = tx.send(self.hot.take());
            }
        }
        true
    }

    fn request(&mut self, op: Request, tag: u64, reply: ReplyTo) {
        self.hot.observe(op.key());
        match op {
            Request::Get { key } => {
                let result = self.get(&key);
                reply.send(Reply { tag, result });
            }
            Request::Put { key, value } => self.write_to(key, Some(value), tag, reply),
            Request::Delete { key } => self.write_to(key, None, tag, reply),
        }
    }

    fn close(mut self) -> ShardStats {
        let req = dinomo_shared::msg::Request::CloseLog {
            log_id: self.log.log_id,
            generation: self.log.generation,
        };
        let _ = crate::control::call(&mut self.f, req, self.cfg.timeout);
        self.stats()
    }
}

/// Checks a key against the limits every node enforces.
pub fn validate_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KvError::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    #[test]
    fn lease_gate_holds_until_its_deadline_and_then_gives_up() {
        let g = LeaseGate::new(Duration::from_millis(20));
        assert!(!g.is_valid(), "no lease before the first renewal");
        g.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(g.is_valid() && g.wait_valid());
        // The deadline never moves back.
        g.extend_to(Instant::now());
        assert!(g.is_valid());
        g.set_lost();
        assert!(!g.is_valid() && !g.wait_valid());

        let g = LeaseGate::new(Duration::from_millis(20));
        g.extend_to(Instant::now());
        // Past the deadline and past the grace: lost for good.
        assert!(!g.wait_valid());
        assert!(g.is_lost());
        g.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(
            !g.is_valid(),
            "a lost lease is not revived by a late renewal"
        );
    }
}
