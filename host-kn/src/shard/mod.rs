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
//!
//! This module holds the shard's core (staging, flushing, reading and the message loop);
//! its settings, lease, messages, counters, the superblock read, and the reconfiguration
//! and replication steps each have a submodule.

mod config;
mod exec;
mod expiry;
mod geometry;
mod keyhash;
mod lease;
mod local;
mod msg;
mod reconfig;
mod replication;
mod scan;
mod stats;
mod unmerged;

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use dinomo_hw::fabric::Fabric;
use dinomo_shared::control::ProgressSlot;
use dinomo_shared::entry::{self, Op, MAX_KEY_LEN, MAX_VALUE_LEN};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::index::EntryRef;
use dinomo_shared::pod::Pod;
use dinomo_shared::slot::key_slot;

use crate::dac::{DacCache, Lookup};
use crate::error::KvError;
use crate::log::{AppendError, LogArea, ShardLog};
use crate::ownership::{shard_of, SlotMap};
use crate::reader::IndexReader;
use crate::replica::{HotKeys, ReplicaCtl, ShardReplicas};

pub use config::ShardConfig;
pub use exec::{ExecJob, JobFn, KeyAccess, TimedValue};
pub use geometry::read_geometry;
pub use lease::LeaseGate;
pub use local::{run_blocking, run_thread, LocalShard, ShardOps};
pub use msg::{
    GetReply, Msg, ReleaseReport, Reply, ReplyFn, ReplyResult, ReplySlots, ReplyTo, Request,
    ShardTx, SlotRef, StoredReply, Task,
};

/// Keys one active-expiry sweep deletes at most (more wait for the next sweep, so that a
/// mass expiry does not stall the shard's clients).
const SWEEP_MAX: usize = 256;

/// Where the replies of a [`Msg::Batch`] go.
type BatchDone = tokio::sync::oneshot::Sender<Vec<Option<ReplyResult>>>;
use exec::Watches;
use expiry::Expiries;
use keyhash::KeyHash;
pub use scan::{
    Restart as ScanRestart, ScanMode, ScanPage, ScanRequest, ScannedKey, SHARD_CURSOR_BITS,
};
pub use stats::ShardStats;
use unmerged::UnmergedWrites;

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
    /// When the key written expires (Unix ms), if it does.
    expire_at: Option<u64>,
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
    /// Own writes not yet merged.
    unmerged: UnmergedWrites,
    pending: Vec<Pending>,
    staged_hashes: HashSet<u64, KeyHash>,
    first_staged: Option<Instant>,
    broken: Option<KvError>,
    stats: ShardStats,
    misses_since_cost: u64,
    miss_rts_since_cost: u64,
    replicas: ShardReplicas,
    hot: HotKeys,
    /// Expiry times of the keys this shard holds in its cache or wrote (see `expiry`).
    expiries: Expiries,
    /// Watched keys and their write numbers (see `exec`).
    watches: Watches,
    /// Counts installed cluster maps: a watch taken under an older one is void.
    map_generation: u64,
    /// Bytes freed (cache values, merged writes' bookkeeping) and not yet given back to
    /// the system (see `give_back_memory`).
    freed_bytes: u64,
    /// Buffers and sizing of key walks (SCAN and friends).
    walk: scan::Walker,
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
            unmerged: UnmergedWrites::default(),
            pending: Vec::new(),
            staged_hashes: HashSet::default(),
            first_staged: None,
            broken: None,
            stats: ShardStats::default(),
            misses_since_cost: 0,
            miss_rts_since_cost: 0,
            replicas,
            hot: HotKeys::default(),
            expiries: Expiries::default(),
            watches: Watches::default(),
            map_generation: 0,
            freed_bytes: 0,
            walk: scan::Walker::default(),
        })
    }

    /// The largest value accepted with a key of `key_len` bytes.
    pub fn max_value(&self, key_len: usize) -> usize {
        self.log.max_value(key_len).min(MAX_VALUE_LEN)
    }

    /// The largest value accepted with a key of `key_len` bytes that expires (its time is
    /// stored beside the value) or not.
    fn max_value_expiring(&self, key_len: usize, expiring: bool) -> usize {
        let extra = if expiring { entry::EXPIRY_LEN } else { 0 };
        self.log
            .max_value(key_len)
            .saturating_sub(extra)
            .min(MAX_VALUE_LEN)
    }

    /// Current counters.
    pub fn stats(&mut self) -> ShardStats {
        let mut s = self.stats;
        s.fabric = *self.f.counters();
        s.cache = self.cache.stats();
        s.unmerged = self.unmerged.len() as u64;
        s.unmerged_queue = self.unmerged.queued() as u64;
        s.expiring = self.expiries.len() as u64;
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
        let mut out = Err(KvError::ShuttingDown);
        self.get_with(key, &mut |r| out = r.map(|v| v.map(<[u8]>::to_vec)));
        out
    }

    /// Serves one get and hands the answer to `emit` (exactly once). A value in the cache
    /// is handed over in place, without a copy: the common case costs a hash lookup.
    pub fn get_with(&mut self, key: &[u8], emit: &mut GetReply<'_>) {
        self.get_stored(key, &mut |r| emit(r.map(|found| found.map(|(v, _)| v))));
    }

    /// Reads a key for a command that needs its value and expiry time (Unix ms) owned.
    pub(crate) fn read_stored(&mut self, key: &[u8]) -> Result<Option<TimedValue>, KvError> {
        let mut out = Err(KvError::ShuttingDown);
        self.get_stored(key, &mut |r| {
            out = r.map(|found| found.map(|(v, t)| (v.to_vec(), t)));
        });
        out
    }

    /// [`Shard::get_with`] with the key's expiry time. A key whose time has come reads as
    /// absent, and its delete is staged (lazy expiry).
    fn get_stored(&mut self, key: &[u8], emit: &mut StoredReply<'_>) {
        let replicated = self.replicas.serves(key);
        if !replicated {
            if let Err(e) = self.check_owner(key) {
                return emit(Err(e));
            }
        }
        self.stats.gets += 1;
        if !self.staged_hashes.is_empty()
            && self
                .staged_hashes
                .contains(&dinomo_shared::hash::key_hash(key))
        {
            self.flush();
        }
        let shortcut = if replicated {
            None
        } else {
            match self.cache.get(key) {
                Lookup::Value(v) => {
                    let expires = self.expiries.get(key);
                    if !expires.is_some_and(|t| t < crate::clock::now_ms()) {
                        self.stats.hit_value += 1;
                        return emit(Ok(Some((v, expires))));
                    }
                    self.expire(key);
                    return emit(Ok(None));
                }
                Lookup::Shortcut(r) => Some(r),
                Lookup::Miss => None,
            }
        };
        let t0 = self.rts();
        // A read changes nothing at the memory node: one that found it gone is read again
        // over a new connection.
        let r = match self.get_once(key, replicated, shortcut) {
            Err(KvError::Disconnected(why)) => self
                .reconnect(&why)
                .and_then(|()| self.get_once(key, replicated, shortcut)),
            r => r,
        };
        self.stats.read_rts += self.rts() - t0;
        match r {
            Ok(Some((_, Some(t)))) if t < crate::clock::now_ms() => {
                self.expire(key);
                emit(Ok(None))
            }
            Ok(Some((v, t))) => emit(Ok(Some((&v, t)))),
            Ok(None) => emit(Ok(None)),
            Err(e) => emit(Err(e)),
        }
    }

    /// Deletes `key`, whose time has come, through the log (nobody waits for the delete).
    fn expire(&mut self, key: &[u8]) {
        self.stats.expired += 1;
        self.expiries.forget(key);
        let reply = ReplyTo::Fn(ReplyFn(Box::new(|_| {})));
        self.write_expiring(key.to_vec(), None, None, 0, reply);
    }

    /// Gives the memory of freed cache values and merged writes' bookkeeping back to the
    /// system once they add up to a 32nd of the cache budget (at least 1 MiB), so that the
    /// budget bounds the KN's resident memory. Called from the shard's periodic
    /// housekeeping, off every request's path.
    pub(crate) fn give_back_memory(&mut self) {
        self.freed_bytes += self.cache.take_freed_bytes();
        let budget = self.cache.config().budget_bytes;
        if self.freed_bytes > (budget / 32).max(1 << 20) {
            self.freed_bytes = 0;
            crate::memory::trim();
        }
    }

    /// Active expiry: deletes up to [`SWEEP_MAX`] keys whose time has come; returns how
    /// many. Costs nothing while no key this shard knows has an expiry time.
    pub(crate) fn sweep_expired(&mut self) -> usize {
        if self.expiries.is_empty() {
            return 0;
        }
        self.expire_due(crate::clock::now_ms(), SWEEP_MAX)
    }

    /// Deletes up to `max` keys whose time came by `now`; returns how many.
    fn expire_due(&mut self, now: u64, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(key) = self.expiries.pop_due(now) else {
                break;
            };
            n += 1;
            self.expire(&key);
        }
        n
    }

    fn get_once(
        &mut self,
        key: &[u8],
        replicated: bool,
        shortcut: Option<EntryRef>,
    ) -> Result<Option<TimedValue>, KvError> {
        if replicated {
            let timeout = self.cfg.timeout;
            let v = self
                .replicas
                .get(&mut self.f, &mut self.reader, &self.geo, key, timeout)?;
            Ok(v.map(|v| (v, None)))
        } else {
            self.get_uncached(key, shortcut)
        }
    }

    /// Connects to the memory node again after one-sided access found it gone (`why`),
    /// waiting up to [`RECONNECT_WAIT`](crate::control::RECONNECT_WAIT) for it to come back.
    /// Over shm one-sided access never loses the region, so this is the verbs case: the
    /// restarted DPM registered its region anew and only a new queue pair reaches it.
    /// Whatever was outstanding on the old connection has an unknown outcome; callers
    /// repeat only what is safe to repeat.
    fn reconnect(&mut self, why: &str) -> Result<(), KvError> {
        let (kn, shard) = (self.cfg.kn_id, self.cfg.shard);
        tracing::warn!(kn, shard, why, "the DPM went away; reconnecting");
        let lost = dinomo_hw::fabric::FabricError::Disconnected(why.to_owned());
        self.f
            .reconnect(crate::control::RECONNECT_WAIT)
            .map_err(|again| crate::control::reconnect_failed(&lost, &again))?;
        self.stats.reconnects += 1;
        tracing::info!(kn, shard, "reconnected to the DPM");
        Ok(())
    }

    /// Writes the staged batch; if the memory node went away meanwhile, reconnects and
    /// writes it again. That is idempotent: nothing was acknowledged, and the staged bytes
    /// (and a pending seal) are unchanged and go to the same offsets, so a first WRITE that
    /// landed in part or in whole is overwritten with the same bytes, and the FLUSH behind
    /// the second WRITE makes the whole batch durable. The lease is checked again before
    /// the second WRITE (a KN fenced meanwhile writes nothing more), and the caller checks
    /// it once more before acknowledging.
    fn flush_log(&mut self) -> Result<crate::log::Flushed, KvError> {
        match self.log.flush(&mut self.f) {
            Err(KvError::Disconnected(why)) => {
                self.reconnect(&why)?;
                if self.cfg.lease.as_ref().is_some_and(|l| !l.wait_valid()) {
                    return Err(KvError::LeaseLapsed);
                }
                self.log.flush(&mut self.f)
            }
            r => r,
        }
    }

    /// A get that the cache could not answer with a value (`shortcut`: what it had).
    fn get_uncached(
        &mut self,
        key: &[u8],
        shortcut: Option<EntryRef>,
    ) -> Result<Option<TimedValue>, KvError> {
        if let Some(u) = self.unmerged.get(key) {
            self.stats.hit_local += 1;
            let Some(r) = u.eref else { return Ok(None) };
            return match self.reader.fetch(&mut self.f, key, &[r])? {
                Some(found) => {
                    let value = self.value_of(found.value_at, found.value_len);
                    self.cache.on_fetch(key, &value, r, true);
                    self.note_expiry(key, found.expire_at);
                    Ok(Some((value, found.expire_at)))
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
                self.note_expiry(key, found.expire_at);
                return Ok(Some((value, found.expire_at)));
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
                self.note_expiry(key, found.expire_at);
                Ok(Some((value, found.expire_at)))
            }
            None => {
                self.stats.absent += 1;
                Ok(None)
            }
        }
    }

    /// Keeps the expiry table exact for a key whose value may now be cached.
    fn note_expiry(&mut self, key: &[u8], expire_at: Option<u64>) {
        match expire_at {
            Some(t) => self.expiries.note(&Rc::from(key), Some(t)),
            None => self.expiries.forget(key),
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
        self.write_expiring(key, value, None, tag, reply);
    }

    /// Whether this shard may write `key` now (its owner, or a replica of a replicated key
    /// without an expiry time; its log not broken).
    fn may_write(&mut self, key: &[u8], expire_at: Option<u64>) -> Result<(), KvError> {
        if self.replicas.serves(key) {
            if expire_at.is_some() {
                return Err(KvError::Replication(
                    "a replicated key cannot be given an expiry time".into(),
                ));
            }
        } else {
            self.check_owner(key)?;
        }
        match &self.broken {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Whether a write would be refused before it is staged (the owner, a broken log, a
    /// full region, the value's size); a job checks each write before staging any.
    pub(crate) fn check_write(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        expire_at: Option<u64>,
    ) -> Result<(), KvError> {
        self.may_write(key, expire_at)?;
        if let Some(v) = value {
            if self.log.is_full() {
                return Err(KvError::RegionFull);
            }
            let max = self.max_value_expiring(key.len(), expire_at.is_some());
            if v.len() > max {
                return Err(KvError::ValueTooLarge { len: v.len(), max });
            }
        }
        Ok(())
    }

    /// [`Shard::write_to`] of a key that expires at `expire_at` (Unix ms), if given.
    pub(crate) fn write_expiring(
        &mut self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        expire_at: Option<u64>,
        tag: u64,
        reply: ReplyTo,
    ) {
        let expire_at = value.as_ref().and(expire_at);
        let (seq, eref) = match self.stage(&key, value.as_deref(), expire_at) {
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
        self.watches.wrote(&key);
        let replicated = self.replicas.serves(&key);
        self.pending.push(Pending {
            key,
            value,
            eref,
            seq,
            reply,
            tag,
            replicated,
            expire_at,
        });
        if self.log.staged_bytes() >= self.cfg.batch_bytes
            || self.log.staged_entries() >= self.cfg.batch_entries
        {
            self.flush();
        }
    }

    /// Appends the entry to the staged batch; returns its seq and where it will live.
    fn stage(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        expire_at: Option<u64>,
    ) -> Result<(u64, EntryRef), KvError> {
        self.may_write(key, expire_at)?;
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
        // An expiring value is stored behind its expiry time (see `entry::FLAG_EXPIRES`).
        let stored;
        let (flags, v) = match expire_at {
            Some(t) => {
                let mut b = Vec::with_capacity(entry::EXPIRY_LEN + v.len());
                b.extend_from_slice(&t.to_le_bytes());
                b.extend_from_slice(v);
                stored = b;
                (entry::FLAG_EXPIRES, &stored[..])
            }
            None => (0, v),
        };
        let max = self.max_value_expiring(key.len(), expire_at.is_some());
        if value.map_or(0, <[u8]>::len) > max {
            return Err(KvError::ValueTooLarge {
                len: value.map_or(0, <[u8]>::len),
                max,
            });
        }
        for _ in 0..3 {
            match self.log.append_flagged(&mut self.f, op, flags, key, v) {
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
        let r = self.flush_log();
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
                    if p.expire_at.is_some() || !self.expiries.is_empty() {
                        self.expiries.note(&key, p.expire_at);
                    }
                    let eref = p.value.as_ref().map(|_| p.eref);
                    self.unmerged.record(p.seq, key, eref);
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
        self.freed_bytes += self.unmerged.forget_merged(merged_seq);
    }

    /// Whether the oldest staged write has waited the group-commit bound.
    fn flush_overdue(&self) -> bool {
        self.first_staged
            .is_some_and(|t| t.elapsed() >= self.cfg.flush_bound)
    }

    /// Whether writes wait to be made durable.
    fn has_staged(&self) -> bool {
        !self.pending.is_empty() || self.log.staged_bytes() > 0
    }

    /// Handles one message (a `Task` is run by the thread's loop, never here); false for
    /// `Stop`.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Req { op, tag, reply } => self.request(op, tag, ReplyTo::Chan(reply)),
            Msg::ReqFn { op, tag, reply } => self.request(op, tag, ReplyTo::Fn(reply)),
            Msg::Batch { ops, done } => self.batch(ops, done),
            Msg::Exec { job, done } => self.exec(job, done),
            Msg::Task(_) => {}
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
            Msg::Replica(ReplicaCtl::End { key, cell, reply }) => {
                let _ = reply.send(self.end_replication(&key, cell));
            }
            Msg::HotKeys(tx) => {
                let _ = tx.send(self.hot.take());
            }
            Msg::Scan { req, reply } => {
                let _ = reply.send(self.serve_scan(&req));
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

    /// Serves the requests of a batch in order; the replies go back together once the
    /// last write of the batch is durable.
    fn batch(&mut self, ops: Vec<Request>, done: BatchDone) {
        let slots = Rc::new(RefCell::new(ReplySlots::new(Some(done))));
        for op in ops {
            let reply = ReplyTo::Slot(ReplySlots::push(&slots));
            self.request(op, 0, reply);
        }
        slots.borrow_mut().seal();
    }

    /// Serves a get from a connection on this shard's thread (see [`Shard::get_with`]).
    pub fn serve_get(&mut self, key: &[u8], emit: &mut GetReply<'_>) {
        self.hot.observe(key);
        self.get_with(key, emit);
    }

    /// Stages a write from a connection on this shard's thread.
    pub fn serve_write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, reply: ReplyTo) {
        self.hot.observe(&key);
        self.write_to(key, value, 0, reply);
    }

    /// After `Stop`: answers what is still queued (requests of slots this shard no longer
    /// owns get `WrongOwner`, so their clients retry elsewhere), then closes the log.
    fn stop(&mut self, rx: &mut tokio::sync::mpsc::UnboundedReceiver<Msg>) -> ShardStats {
        while let Ok(m) = rx.try_recv() {
            if let Msg::Req { .. } | Msg::ReqFn { .. } | Msg::Batch { .. } | Msg::Exec { .. } = m {
                self.handle(m);
            }
        }
        self.close()
    }

    /// Closes the log (the DPM merges it to its tail); the shard refuses everything after.
    fn close(&mut self) -> ShardStats {
        self.flush();
        self.broken = Some(KvError::ShuttingDown);
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
