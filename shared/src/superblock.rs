//! The superblock: the first 4 KiB of the region.
//!
//! Line 0-1 (128 bytes) is the immutable geometry, sealed by a CRC-32C; line 2 is the
//! mutable state (clean-shutdown flag, cluster-map epoch, mount count), updated with
//! single 8-byte stores.

use crate::{assert_offset, assert_size, impl_pod};

/// `b"DINOMO\0\x01"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"DINOMO\x00\x01");
/// Version of every layout in this crate; bump on any incompatible change.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes reserved for the superblock at offset 0.
pub const SUPERBLOCK_AREA: u64 = 4096;
/// Offset of [`SuperState`] within the region.
pub const STATE_OFFSET: u64 = 128;
/// `SuperState::flags` bit: the DPM shut down cleanly (everything merged and persisted).
pub const FLAG_CLEAN_SHUTDOWN: u64 = 1;

/// Immutable geometry written once by `format`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub magic: u64,
    pub layout_version: u32,
    /// Must be zero in this version.
    pub features: u32,
    pub region_size: u64,
    pub block_size: u64,
    pub max_logs: u32,
    pub max_kns: u32,
    pub control_off: u64,
    pub control_len: u64,
    pub index_off: u64,
    pub index_len: u64,
    pub log_off: u64,
    pub n_blocks: u64,
    pub indirect_off: u64,
    pub indirect_len: u64,
    /// Random identity chosen at format time; lets a KN tell two regions apart.
    pub region_id: u64,
    pub reserved: [u32; 3],
    /// CRC-32C over bytes `0..124` of this struct.
    pub crc: u32,
}
assert_size!(Superblock, 128);
assert_offset!(Superblock, region_size, 16);
assert_offset!(Superblock, log_off, 72);
assert_offset!(Superblock, region_id, 104);
assert_offset!(Superblock, crc, 124);

/// Mutable state, at [`STATE_OFFSET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SuperState {
    pub flags: u64,
    /// Epoch of the durable cluster map (mirrors the control area's map header).
    pub cluster_epoch: u64,
    /// Incremented each time the region is opened for service.
    pub mount_count: u64,
    /// Compaction totals since format: entries and bytes moved, blocks freed, compare
    /// failures (a newer version was merged while an entry was being moved). Written once
    /// per compaction step, so a crash may lose the last step's share. These words were
    /// reserved (zero) before compaction existed, so older regions read as "none yet".
    pub compact_entries: u64,
    pub compact_bytes: u64,
    pub compact_blocks: u64,
    pub compact_cas_failures: u64,
    pub reserved: [u64; 1],
}
assert_size!(SuperState, 64);
assert_offset!(SuperState, compact_entries, 24);
impl_pod!(Superblock, SuperState);

impl Superblock {
    /// Bytes covered by [`Superblock::crc`].
    pub const CRC_SPAN: usize = 124;

    /// Computes the CRC over the covered bytes.
    pub fn compute_crc(&self) -> u32 {
        use crate::pod::Pod;
        crate::crc::crc32c(&self.as_bytes()[..Self::CRC_SPAN])
    }

    /// Sets [`Superblock::crc`] to match the contents.
    pub fn seal(&mut self) {
        self.crc = self.compute_crc();
    }
}
