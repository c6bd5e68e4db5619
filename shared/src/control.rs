//! The control area: log-mapping table, progress table, KN leases, durable cluster map.

use crate::{assert_offset, assert_size, impl_pod};

/// Marks "no block" in chains and tables.
pub const NO_BLOCK: u32 = u32::MAX;

/// A log slot is free.
pub const LOG_FREE: u32 = 0;
/// A log slot belongs to a live KN shard that appends to it.
pub const LOG_ACTIVE: u32 = 1;
/// A log slot whose writer is gone (closed or fenced); it is merged to its tail, then freed.
pub const LOG_CLOSED: u32 = 2;

/// One row of the log-mapping table: which KN shard writes the log, and its block chain.
///
/// `head_block` is the oldest block still in the chain; blocks link forward through their
/// headers' `next`. `tail_block` is a hint (the newest block); recovery walks the chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogSlot {
    pub state: u32,
    pub kn_id: u32,
    pub shard: u32,
    /// The writer's lease epoch when the log was opened; a flush under an older epoch is fenced.
    pub lease_epoch: u32,
    pub head_block: u32,
    pub tail_block: u32,
    /// Incarnation of this slot: bumped every time it is (re)opened.
    pub generation: u64,
    /// The fence point: seq of the last entry that may ever be merged, plus one; 0 means
    /// no fence (so regions written before fences existed stay valid). Set when the log is
    /// closed, after it was merged to its committed tail: a writer that was paused rather
    /// than gone may still land entries after it, and they must never reach the index.
    pub fence: u64,
    /// [`LOG_FLAG_FENCED`], [`LOG_FLAG_COMPACTION`].
    pub flags: u64,
    pub reserved: [u64; 2],
}
assert_size!(LogSlot, 64);
assert_offset!(LogSlot, head_block, 16);
assert_offset!(LogSlot, generation, 24);
assert_offset!(LogSlot, fence, 32);
assert_offset!(LogSlot, flags, 40);

/// `LogSlot::flags`: the log was closed by fencing its KN (lease expired), not by its
/// writer; its blocks are quarantined before reuse since the writer may still be alive.
pub const LOG_FLAG_FENCED: u64 = 1;

/// `LogSlot::flags`: the memory node's own compaction log (its `kn_id` is
/// [`COMPACTION_KN`]). It holds live entries moved out of mostly-dead blocks; they reach the
/// index only by a compare-and-replace, so recovery never replays it, it only finds its
/// tail. Regions written before compaction existed have no slot with this flag.
pub const LOG_FLAG_COMPACTION: u64 = 2;

/// The `kn_id` the compaction log is opened under (no KN has it).
pub const COMPACTION_KN: u32 = u32::MAX;

impl LogSlot {
    pub const SIZE: u64 = 64;
    /// Offset within the slot of the `(head_block, tail_block)` pair, updated as one u64.
    pub const CHAIN_OFFSET: u64 = 16;
    /// Offset within the slot of `fence`.
    pub const FENCE_OFFSET: u64 = 32;
    /// Offset within the slot of `flags`.
    pub const FLAGS_OFFSET: u64 = 40;

    /// The fence point's seq, if the log has one.
    pub const fn fence_seq(&self) -> Option<u64> {
        self.fence.checked_sub(1)
    }
    /// The stored form of a fence at `seq`.
    pub const fn encode_fence(seq: u64) -> u64 {
        seq.saturating_add(1)
    }
}

/// One of the two alternating records of a log's merged position.
///
/// The merger writes the older record (by `merged_seq`) and persists it; a reader takes the
/// valid record with the higher `merged_seq`. A torn record fails its CRC and is ignored, so
/// the position moves atomically without a separate commit store.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressRecord {
    /// Seq of the last merged entry (0: nothing merged yet).
    pub merged_seq: u64,
    /// Block holding the next entry to merge.
    pub block: u32,
    /// Offset within that block of the next entry to merge.
    pub offset: u32,
    /// The log slot generation this record belongs to.
    pub generation: u64,
    /// CRC-32C over bytes `0..24`.
    pub crc: u32,
    pub reserved: u32,
}
assert_size!(ProgressRecord, 32);
assert_offset!(ProgressRecord, crc, 24);

impl ProgressRecord {
    /// Builds a sealed record.
    pub fn new(merged_seq: u64, block: u32, offset: u32, generation: u64) -> Self {
        let mut r = Self {
            merged_seq,
            block,
            offset,
            generation,
            crc: 0,
            reserved: 0,
        };
        r.crc = r.compute_crc();
        r
    }
    fn compute_crc(&self) -> u32 {
        use crate::pod::Pod;
        crate::crc::crc32c(&self.as_bytes()[..24])
    }
    /// Whether the CRC matches.
    pub fn is_valid(&self) -> bool {
        self.crc == self.compute_crc()
    }
}

/// The progress-table row of one log: two alternating records.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressSlot {
    pub records: [ProgressRecord; 2],
}
assert_size!(ProgressSlot, 64);

impl ProgressSlot {
    pub const SIZE: u64 = 64;

    /// The current record for `generation`: the valid one with the higher `merged_seq`.
    pub fn current(&self, generation: u64) -> Option<(usize, ProgressRecord)> {
        let mut best: Option<(usize, ProgressRecord)> = None;
        for (i, r) in self.records.iter().enumerate() {
            if r.is_valid() && r.generation == generation {
                match best {
                    Some((_, b)) if b.merged_seq >= r.merged_seq => {}
                    _ => best = Some((i, *r)),
                }
            }
        }
        best
    }

    /// Which record the next update should overwrite.
    pub fn next_index(&self, generation: u64) -> usize {
        match self.current(generation) {
            Some((i, _)) => 1 - i,
            None => 0,
        }
    }
}

/// A KN's lease as the manager records it; the manager renews leases in its memory and a
/// manager that takes over reads these rows to know whom to fence, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnLease {
    /// Non-zero when the slot is in use.
    pub kn_id: u32,
    /// Bumped at every registration of the KN id; log entries carry it.
    pub lease_epoch: u32,
    /// Milliseconds since the Unix epoch until which the KN held its lease when the row
    /// was written; 0 once the lease ended (the KN left or was fenced).
    pub expires_ms: u64,
    /// Length of the leases the manager grants, in ms: a KN stops serving at most this long
    /// after the last renewal of a manager that died. 0 in rows written before it was kept
    /// (whose `expires_ms` was rewritten at every renewal instead).
    pub lease_ms: u64,
    pub reserved: [u64; 5],
}
assert_size!(KnLease, 64);
assert_offset!(KnLease, lease_ms, 16);

impl KnLease {
    pub const SIZE: u64 = 64;
}

/// Header of the durable cluster map. Two copies of the slot → KN table alternate; the
/// header's single 8-byte word `epoch_active` names the current copy and its epoch, so a
/// new map is written to the inactive copy, persisted, and committed with one store.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterMapHeader {
    /// `epoch << 1 | active_copy`.
    pub epoch_active: u64,
    pub reserved: [u64; 7],
}
assert_size!(ClusterMapHeader, 64);

impl ClusterMapHeader {
    pub const SIZE: u64 = 64;
    pub const fn epoch(&self) -> u64 {
        self.epoch_active >> 1
    }
    pub const fn active_copy(&self) -> u32 {
        (self.epoch_active & 1) as u32
    }
    /// The header word naming copy `copy` (0 or 1) as the map of `epoch`.
    pub const fn word(epoch: u64, copy: u32) -> u64 {
        epoch << 1 | (copy & 1) as u64
    }
}

/// The highest epoch the header word can hold (it gives one bit to the copy).
pub const MAX_MAP_EPOCH: u64 = u64::MAX >> 1;

/// Bytes of one cluster-map copy: a little-endian `u16` KN id per slot.
pub const CLUSTER_MAP_BYTES: u64 = crate::slot::SLOTS as u64 * 2;
/// KN id meaning "no owner".
pub const NO_KN: u16 = u16::MAX;

impl_pod!(
    LogSlot,
    ProgressRecord,
    ProgressSlot,
    KnLease,
    ClusterMapHeader
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::Pod;

    #[test]
    fn progress_picks_newest_valid_record() {
        let mut s = ProgressSlot {
            records: [
                ProgressRecord::new(5, 1, 64, 3),
                ProgressRecord::new(9, 1, 200, 3),
            ],
        };
        assert_eq!(s.current(3).map(|(i, r)| (i, r.merged_seq)), Some((1, 9)));
        assert_eq!(s.next_index(3), 0);
        // A torn newest record falls back to the older one.
        s.records[1].offset ^= 8;
        assert_eq!(s.current(3).map(|(i, r)| (i, r.merged_seq)), Some((0, 5)));
        // Records of another generation do not count.
        assert_eq!(s.current(4), None);
    }

    #[test]
    fn zero_fence_means_none() {
        let mut slot = LogSlot::zeroed();
        assert_eq!(slot.fence_seq(), None);
        slot.fence = LogSlot::encode_fence(0);
        assert_eq!(slot.fence_seq(), Some(0));
        slot.fence = LogSlot::encode_fence(41);
        assert_eq!(slot.fence_seq(), Some(41));
    }
}
