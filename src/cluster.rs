//! An in-process cluster: one memory node (merge workers as threads) and K KVS nodes over
//! one region in this process's memory, reached through the shm fabric. The same code runs
//! the multi-process deployment; here everything shares an address space for tests and
//! benchmarks.
//!
//! The baselines of the evaluation live beside it: [`clover`] (shared-everything) and
//! [`dinomo_n`] (shared-nothing).

pub mod clover;
pub mod dinomo_n;

use std::sync::Arc;
use std::time::Duration;

use dinomo_hw::fabric::nic::{NicModel, NicProfile};
use dinomo_hw::fabric::{ControlServer, ShmFabric};
use dinomo_hw::heap::{HeapPersist, HeapRegion};
use dinomo_hw::CpuPersist;
use dinomo_shared::entry::{ENTRY_HEADER_SIZE, MAX_KEY_LEN, MAX_VALUE_LEN};
use dinomo_shared::geometry::{FormatParams, Geometry};
use dpm_fw::runner::{DpmService, ServeConfig};
use dpm_fw::Dpm;
use host_kn::dac::{CachePolicy, DacConfig};
use host_kn::{Client, Kn, KvError, Router, ShardConfig, ShardStats, SlotMap};

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
}

/// A running in-process cluster.
#[derive(Debug)]
pub struct Cluster {
    service: DpmService<ClusterPersist>,
    kns: Vec<Kn>,
    router: Arc<Router>,
    geometry: Geometry,
    max_value: usize,
}

impl Cluster {
    pub fn start(cfg: &ClusterConfig) -> Result<Self, ClusterError> {
        if cfg.kns == 0 || cfg.shards_per_kn == 0 {
            return Err(ClusterError::Config(
                "at least one KN with one shard is needed".into(),
            ));
        }
        let region = HeapRegion::new(cfg.region_bytes);
        let mut params = FormatParams::for_size(cfg.region_bytes);
        if let Some(b) = cfg.block_size {
            params.block_size = b;
        }
        let logs = cfg.kns as u32 * cfg.shards_per_kn as u32;
        params.max_logs = (2 * logs).max(16);
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
        let per_shard = cfg.cache_bytes_per_kn / cfg.shards_per_kn as u64;
        let max_entry = geometry.max_entry_len() as usize;
        let staging = (max_entry)
            .min(MAX_VALUE_LEN + MAX_KEY_LEN + 4096)
            .max(cfg.batch_bytes);
        let mut kns = Vec::new();
        for kn in 0..cfg.kns {
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
                    c.staging_bytes = staging;
                    c
                })
                .collect();
            let (region, handle, nic) = (Arc::clone(&region), handle.clone(), cfg.nic);
            let connect = move |_shard: u16| -> Result<ShmFabric<ClusterPersist>, KvError> {
                let pm = Arc::new(region.pmem(CpuPersist::detect()));
                Ok(ShmFabric::new(pm, handle.client()?, NicModel::new(nic)))
            };
            let k = Kn::start(configs, Arc::clone(&map), connect)?;
            router.add_kn(kn, k.senders().to_vec());
            kns.push(k);
        }
        let max_value =
            MAX_VALUE_LEN.min(staging.min(max_entry) - ENTRY_HEADER_SIZE - MAX_KEY_LEN) & !7;
        Ok(Self {
            service,
            kns,
            router,
            geometry,
            max_value,
        })
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

    /// Counters of every shard of every KN, added up.
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

    /// Installs a new cluster map on the router and every shard, and returns once every
    /// shard has applied it (a stats request queued behind the map change is answered).
    pub fn install_map(&self, map: &Arc<SlotMap>) {
        self.router.set_map(Arc::clone(map));
        for k in &self.kns {
            k.set_map(map);
        }
        for k in &self.kns {
            let _ = k.stats();
        }
    }

    /// Stops the memory node's merge workers (control messages are still served).
    pub fn pause_merging(&mut self) {
        self.service.pause_merging();
    }

    /// Restarts the merge workers.
    pub fn resume_merging(&mut self) -> Result<(), ClusterError> {
        Ok(self.service.resume_merging()?)
    }

    /// Stops every KN (flushing and closing its logs), then the memory node.
    pub fn stop(self) -> ShardStats {
        let mut t = ShardStats::default();
        for k in self.kns {
            t.add(&k.stop());
        }
        let _ = self.service.stop();
        t
    }
}
