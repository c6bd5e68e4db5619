//! A shard's counters, kept apart from the shard so a KN or a cluster can add them up
//! and take differences between measurements.

use dinomo_hw::fabric::FabricCounters;

use crate::dac::DacStats;
use crate::replica::ReplicaStats;

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
    /// Keys deleted because their expiry time came (read, walked or swept).
    pub expired: u64,
    /// Keys with an expiry time that the shard keeps track of (a current value).
    pub expiring: u64,
    pub read_rts: u64,
    pub write_rts: u64,
    /// RTs spent reading the DPM's progress to forget merged own writes.
    pub maintenance_rts: u64,
    pub miss_rts: u64,
    pub flushes: u64,
    pub flushed_entries: u64,
    pub unmerged: u64,
    /// Entries of the shards' queue of unmerged writes (bounded by about twice `unmerged`).
    pub unmerged_queue: u64,
    /// Time the shard thread spent handling messages (not waiting for them), for occupancy.
    pub busy_ns: u64,
    /// Times the shard's one-sided access found the memory node gone and connected again
    /// (verbs: a new queue pair to the restarted DPM).
    pub reconnects: u64,
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
        self.expired += o.expired;
        self.expiring += o.expiring;
        self.reconnects += o.reconnects;
        self.read_rts += o.read_rts;
        self.write_rts += o.write_rts;
        self.maintenance_rts += o.maintenance_rts;
        self.miss_rts += o.miss_rts;
        self.flushes += o.flushes;
        self.flushed_entries += o.flushed_entries;
        self.unmerged += o.unmerged;
        self.unmerged_queue += o.unmerged_queue;
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
        self.cache.history_bytes += o.cache.history_bytes;
        self.cache.compactions += o.cache.compactions;
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
            expired: self.expired - e.expired,
            expiring: self.expiring,
            read_rts: self.read_rts - e.read_rts,
            write_rts: self.write_rts - e.write_rts,
            maintenance_rts: self.maintenance_rts - e.maintenance_rts,
            miss_rts: self.miss_rts - e.miss_rts,
            flushes: self.flushes - e.flushes,
            flushed_entries: self.flushed_entries - e.flushed_entries,
            unmerged: self.unmerged,
            unmerged_queue: self.unmerged_queue,
            busy_ns: self.busy_ns - e.busy_ns,
            reconnects: self.reconnects - e.reconnects,
            fabric: self.fabric.since(&e.fabric),
            replica: self.replica.since(&e.replica),
            cache: DacStats {
                promotions: self.cache.promotions - e.cache.promotions,
                demotions: self.cache.demotions - e.cache.demotions,
                evictions: self.cache.evictions - e.cache.evictions,
                compactions: self.cache.compactions - e.cache.compactions,
                ..self.cache
            },
        }
    }
}
