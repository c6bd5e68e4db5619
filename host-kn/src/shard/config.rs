//! A shard's settings: the bounds of its group commit, its timeouts, its cache and the
//! lease it checks before a flush.

use std::sync::Arc;
use std::time::Duration;

use crate::dac::DacConfig;

use super::LeaseGate;

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
