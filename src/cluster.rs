//! An in-process cluster: one memory node (merge workers as threads) and K KVS nodes over
//! one region in this process's memory, reached through the shm fabric. The same code runs
//! the multi-process deployment; here everything shares an address space for tests and
//! benchmarks.
//!
//! The baselines of the evaluation live beside it: [`clover`] (shared-everything) and
//! [`dinomo_n`] (shared-nothing).
//!
//! # Moving slots
//!
//! [`Cluster::reconfigure`] moves slots to new owners while clients keep running. Only
//! ownership moves; the data stays in the memory node. The danger is a new owner reading
//! the index before the old owner's acknowledged writes are merged into it (or a KN that
//! regains a slot trusting what it cached before). A move therefore goes:
//!
//! 1. The router marks the slots whose owner changes as *moving*: new requests for them are
//!    refused with `TRYAGAIN` before reaching any KN, and clients retry after a short sleep.
//!    Every other slot is served throughout.
//! 2. Every old owner's shards get `Release(next)`. Requests queued before it are answered
//!    first (queues are FIFO). The shard installs `next` (from now on it refuses the lost
//!    slots with `WrongOwner` and has dropped their cache entries), flushes its batch, has
//!    the memory node merge its log to the tail, and forgets its unmerged own writes of the
//!    lost slots. After the replies the index holds every acknowledged write of the slots.
//! 3. Every other KN installs `next`; new owners start cold (nothing of the moved slots is
//!    in their caches: a KN drops a slot's entries when it releases it).
//! 4. The router publishes `next` and clears *moving*; retried requests reach the new owner.
//!
//! A shard serves a slot only while its installed map says it owns it, and a new owner
//! installs the map only after every old owner replied, so no two KNs ever serve a slot at
//! once and no read returns a value older than an acknowledged write. Each move is measured
//! in a [`ReconfigReport`].

pub mod clover;
pub mod dinomo_n;
mod replication;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::nic::NicProfile;
use dinomo_hw::fabric::{ControlServer, DpmSpec, LocalDpm};
use dinomo_hw::heap::{HeapPersist, HeapRegion};
use dinomo_hw::CpuPersist;
use dinomo_shared::entry::{ENTRY_HEADER_SIZE, MAX_KEY_LEN, MAX_VALUE_LEN};
use dinomo_shared::geometry::{FormatParams, Geometry};
use dinomo_shared::slot::{key_slot, SLOTS};
use dpm_fw::runner::{DpmService, ServeConfig};
use dpm_fw::Dpm;
use host_kn::dac::{CachePolicy, DacConfig};
use host_kn::{Client, Kn, KvError, ReleaseReport, Router, ShardConfig, ShardStats, SlotMap};

/// The memory every node of an in-process cluster sees.
pub type ClusterPersist = HeapPersist<CpuPersist>;

/// How to build an in-process cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub kns: u16,
    pub shards_per_kn: u16,
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Log block size; default: chosen from the region size.
    pub block_size: Option<u64>,
    pub dpm_workers: usize,
    /// Cache bytes per KN, split evenly over its shards.
    pub cache_bytes_per_kn: u64,
    pub policy: CachePolicy,
    pub nic: NicProfile,
    pub batch_bytes: usize,
    pub batch_entries: u64,
    pub flush_bound: Duration,
    /// The most KNs that may ever run at once: the region's log table has room for them.
    pub max_kns: u16,
    /// Compaction settings of the memory node; `None`: its defaults for the region.
    pub compaction: Option<dpm_fw::CompactConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            kns: 2,
            shards_per_kn: 2,
            region_bytes: 256 << 20,
            block_size: None,
            dpm_workers: 1,
            cache_bytes_per_kn: 16 << 20,
            policy: CachePolicy::Dac,
            nic: NicProfile::None,
            batch_bytes: 64 << 10,
            batch_entries: 256,
            flush_bound: Duration::from_micros(100),
            max_kns: 16,
            compaction: None,
        }
    }
}

/// Why a cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("cannot format the region: {0}")]
    Format(#[from] dpm_fw::FormatError),
    #[error("memory node: {0}")]
    Serve(#[from] dpm_fw::runner::ServeError),
    #[error("KVS node: {0}")]
    Kn(#[from] KvError),
    #[error("invalid reconfiguration: {0}")]
    Reconfig(String),
}

/// What one reconfiguration cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReconfigReport {
    /// Epoch of the map now in force.
    pub epoch: u64,
    /// Slots whose owner changed.
    pub slots_moved: usize,
    /// How long the moving slots were refused (from marking them moving to publishing).
    pub pause: Duration,
    /// The slowest old owner's merge of its logs to their tails.
    pub merge: Duration,
    /// Log entries merged by the old owners during the move.
    pub entries_merged: u64,
    /// Data copied between nodes (always 0 here: only ownership moves).
    pub bytes_moved: u64,
}

/// A running in-process cluster.
#[derive(Debug)]
pub struct Cluster {
    service: DpmService<ClusterPersist>,
    /// Live KNs, by increasing id.
    kns: Vec<Kn>,
    router: Arc<Router>,
    geometry: Geometry,
    max_value: usize,
    cfg: ClusterConfig,
    /// How KN shards reach the memory node: its region and control switchboard, in this
    /// process.
    dpm: DpmSpec,
    staging: usize,
    /// Counters of KNs stopped so far.
    retired: ShardStats,
    /// Held for the whole of a move, so two never interleave.
    moving: std::sync::Mutex<()>,
}

impl Cluster {
    pub fn start(cfg: &ClusterConfig) -> Result<Self, ClusterError> {
        if cfg.kns == 0 || cfg.shards_per_kn == 0 {
            return Err(ClusterError::Config(
                "at least one KN with one shard is needed".into(),
            ));
        }
        if cfg.kns > cfg.max_kns {
            return Err(ClusterError::Config(format!(
                "{} KNs exceed max_kns = {}",
                cfg.kns, cfg.max_kns
            )));
        }
        let region = HeapRegion::new(cfg.region_bytes);
        let mut params = FormatParams::for_size(cfg.region_bytes);
        if let Some(b) = cfg.block_size {
            params.block_size = b;
        }
        // Room for every KN that may run, as many closed logs still holding live entries,
        // and the compaction log.
        let logs = cfg.max_kns as u32 * cfg.shards_per_kn as u32;
        params.max_logs = (2 * logs + 1).max(16);
        let geometry =
            Geometry::compute(&params).map_err(|e| ClusterError::Config(e.to_string()))?;
        let dpm = Dpm::format(
            region.pmem(CpuPersist::detect()),
            &params,
            0xD1_0000 + cfg.kns as u64,
        )?;
        let control = ControlServer::in_memory(params.max_logs + 8);
        let handle = control.handle();
        let serve = ServeConfig {
            workers: cfg.dpm_workers,
            pin: false,
            compaction: cfg.compaction,
            ..ServeConfig::default()
        };
        let service = DpmService::start(Arc::new(dpm), control, &serve)?;
        let kn_ids: Vec<u16> = (0..cfg.kns).collect();
        let map = Arc::new(SlotMap::consistent(
            1,
            &kn_ids,
            host_kn::ownership::DEFAULT_VNODES,
        ));
        let router = Arc::new(Router::new(Arc::clone(&map)));
        let max_entry = geometry.max_entry_len() as usize;
        let staging = (max_entry)
            .min(MAX_VALUE_LEN + MAX_KEY_LEN + 4096)
            .max(cfg.batch_bytes);
        let max_value =
            MAX_VALUE_LEN.min(staging.min(max_entry) - ENTRY_HEADER_SIZE - MAX_KEY_LEN) & !7;
        let mut cluster = Self {
            service,
            kns: Vec::new(),
            router,
            geometry,
            max_value,
            cfg: cfg.clone(),
            dpm: DpmSpec::Local(LocalDpm {
                region,
                control: handle,
                nic: cfg.nic,
            }),
            staging,
            retired: ShardStats::default(),
            moving: std::sync::Mutex::new(()),
        };
        for kn in 0..cfg.kns {
            cluster.launch_kn(kn)?;
        }
        Ok(cluster)
    }

    /// Starts KN `kn` with the router's current map and registers its shards.
    fn launch_kn(&mut self, kn: u16) -> Result<(), ClusterError> {
        let cfg = &self.cfg;
        let per_shard = cfg.cache_bytes_per_kn / cfg.shards_per_kn as u64;
        let configs = (0..cfg.shards_per_kn)
            .map(|s| {
                let mut c = ShardConfig::new(
                    kn,
                    s,
                    cfg.shards_per_kn,
                    DacConfig {
                        budget_bytes: per_shard,
                        policy: cfg.policy,
                        ..DacConfig::default()
                    },
                );
                c.batch_bytes = cfg.batch_bytes;
                c.batch_entries = cfg.batch_entries;
                c.flush_bound = cfg.flush_bound;
                c.staging_bytes = self.staging;
                c
            })
            .collect();
        let spec = self.dpm.clone();
        let connect = move |_shard: u16| Ok(spec.connect()?);
        let k = Kn::start(configs, self.router.map(), connect)?;
        self.router.add_kn(kn, k.senders().to_vec());
        let at = self.kns.partition_point(|x| x.kn_id < kn);
        self.kns.insert(at, k);
        Ok(())
    }

    /// A new client (one per thread).
    pub fn client(&self) -> Client {
        Client::new(Arc::clone(&self.router), self.max_value)
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    pub fn dpm(&self) -> &Arc<Dpm<ClusterPersist>> {
        self.service.dpm()
    }
    pub fn kns(&self) -> &[Kn] {
        &self.kns
    }
    /// The largest value a client may write.
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// Ids of the running KNs, in increasing order.
    pub fn live_kns(&self) -> Vec<u16> {
        self.kns.iter().map(|k| k.kn_id).collect()
    }

    /// The router every client of this cluster uses.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Counters of every shard of every running KN, added up.
    pub fn stats(&self) -> ShardStats {
        let mut t = ShardStats::default();
        for k in &self.kns {
            t.add(&k.stats());
        }
        t
    }

    /// Flushes every shard and waits until the DPM has merged every log.
    pub fn sync(&self) -> Result<(), KvError> {
        self.kns.iter().try_for_each(Kn::sync)
    }

    /// Moves to the map `next` (see the module documentation), safely with clients running.
    /// `next` must have a higher epoch than the current map and give every slot to a running
    /// KN. On an error the current map stays in force.
    pub fn reconfigure(&mut self, next: SlotMap) -> Result<ReconfigReport, ClusterError> {
        self.move_to(Arc::new(next))
    }

    /// [`Cluster::reconfigure`] with a shared map.
    pub fn install_map(&self, map: &Arc<SlotMap>) -> Result<ReconfigReport, ClusterError> {
        self.move_to(Arc::clone(map))
    }

    fn move_to(&self, next: Arc<SlotMap>) -> Result<ReconfigReport, ClusterError> {
        let _one_at_a_time = self.moving.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.router.map();
        if next.epoch() <= cur.epoch() {
            return Err(ClusterError::Reconfig(format!(
                "epoch {} is not after the current epoch {}",
                next.epoch(),
                cur.epoch()
            )));
        }
        let live = self.live_kns();
        if let Some(slot) = (0..SLOTS).find(|&s| live.binary_search(&next.owner(s)).is_err()) {
            return Err(ClusterError::Reconfig(format!(
                "slot {slot} would belong to KN {}, which is not running",
                next.owner(slot)
            )));
        }
        // A replicated key's cell belongs to its owner: end the replication first.
        self.dereplicate_where(|key, set| next.owner(key_slot(key)) != set.owner)?;
        let moving: Vec<u16> = (0..SLOTS)
            .filter(|&s| cur.owner(s) != next.owner(s))
            .collect();
        let losing: Vec<u16> = {
            let mut v: Vec<u16> = moving.iter().map(|&s| cur.owner(s)).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let t0 = Instant::now();
        self.router.set_moving(&moving);
        let (losers, others): (Vec<&Kn>, Vec<&Kn>) = self
            .kns
            .iter()
            .partition(|k| losing.binary_search(&k.kn_id).is_ok());
        let released: Vec<Result<ReleaseReport, KvError>> = std::thread::scope(|s| {
            let hs: Vec<_> = losers
                .iter()
                .map(|k| {
                    let (cur, next) = (&cur, &next);
                    s.spawn(move || k.release(cur, next))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(KvError::Fabric("release panicked".into())))
                })
                .collect()
        });
        let mut report = ReconfigReport {
            epoch: next.epoch(),
            slots_moved: moving.len(),
            ..ReconfigReport::default()
        };
        for r in released {
            match r {
                Ok(r) => {
                    report.entries_merged += r.entries_merged;
                    report.merge = report.merge.max(r.merge);
                }
                Err(e) => {
                    // Give the old owners their slots back (their unmerged writes are kept
                    // on a failed release) and let clients through again.
                    for k in &losers {
                        k.set_map(&cur);
                    }
                    self.router.clear_moving();
                    return Err(e.into());
                }
            }
        }
        for k in &others {
            k.set_map(&next);
        }
        self.router.set_map(Arc::clone(&next));
        self.router.clear_moving();
        report.pause = t0.elapsed();
        Ok(report)
    }

    /// Starts a new KN that owns no slots yet; returns its id (the lowest free one).
    pub fn start_kn(&mut self) -> Result<u16, ClusterError> {
        let live = self.live_kns();
        let kn = (0..self.cfg.max_kns)
            .find(|k| live.binary_search(k).is_err())
            .ok_or_else(|| {
                ClusterError::Reconfig(format!(
                    "already running max_kns = {} KNs",
                    self.cfg.max_kns
                ))
            })?;
        self.launch_kn(kn)?;
        Ok(kn)
    }

    /// Stops KN `kn`, which must own no slots (move them away first).
    pub fn stop_kn(&mut self, kn: u16) -> Result<(), ClusterError> {
        let at = self
            .kns
            .iter()
            .position(|k| k.kn_id == kn)
            .ok_or_else(|| ClusterError::Reconfig(format!("KN {kn} is not running")))?;
        let owned = self.router.map().slots_of(kn);
        if owned > 0 {
            return Err(ClusterError::Reconfig(format!(
                "KN {kn} still owns {owned} slots"
            )));
        }
        self.dereplicate_where(|_, set| set.kns.contains(&kn))?;
        self.router.remove_kn(kn);
        let k = self.kns.remove(at);
        self.retired.add(&k.stop());
        Ok(())
    }

    /// Starts a KN and gives it its consistent-hashing share of the slots.
    pub fn add_kn(&mut self) -> Result<(u16, ReconfigReport), ClusterError> {
        let kn = self.start_kn()?;
        let next = SlotMap::consistent(
            self.router.map().epoch() + 1,
            &self.live_kns(),
            host_kn::ownership::DEFAULT_VNODES,
        );
        match self.reconfigure(next) {
            Ok(r) => Ok((kn, r)),
            Err(e) => {
                let _ = self.stop_kn(kn);
                Err(e)
            }
        }
    }

    /// Moves KN `kn`'s slots to the others (consistent hashing over the rest), then stops it.
    pub fn remove_kn(&mut self, kn: u16) -> Result<ReconfigReport, ClusterError> {
        let live = self.live_kns();
        if live.binary_search(&kn).is_err() {
            return Err(ClusterError::Reconfig(format!("KN {kn} is not running")));
        }
        let rest: Vec<u16> = live.into_iter().filter(|&k| k != kn).collect();
        if rest.is_empty() {
            return Err(ClusterError::Reconfig(
                "cannot remove the last running KN".into(),
            ));
        }
        let next = SlotMap::consistent(
            self.router.map().epoch() + 1,
            &rest,
            host_kn::ownership::DEFAULT_VNODES,
        );
        let report = self.reconfigure(next)?;
        self.stop_kn(kn)?;
        Ok(report)
    }

    /// Stops the memory node's merge workers (control messages are still served).
    pub fn pause_merging(&mut self) {
        self.service.pause_merging();
    }

    /// Restarts the merge workers.
    pub fn resume_merging(&mut self) -> Result<(), ClusterError> {
        Ok(self.service.resume_merging()?)
    }

    /// Stops every KN (flushing and closing its logs), then the memory node. The counters
    /// include KNs stopped earlier.
    pub fn stop(self) -> ShardStats {
        let mut t = self.retired;
        for k in self.kns {
            t.add(&k.stop());
        }
        let _ = self.service.stop();
        t
    }
}
