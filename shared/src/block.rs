//! Log blocks: fixed-size pieces of the log area handed to KN shards.
//!
//! A block starts with a 64-byte header; entries follow, 8-byte aligned, never split across
//! blocks. The DPM writes the header when it allocates the block and links it after the
//! log's previous block; the writing KN sets `sealed_len` when it moves on to the next block,
//! which tells the merger that nothing more will appear in this one.

use crate::{assert_offset, assert_size, impl_pod};

/// `b"DBLK"`.
pub const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"DBLK");
/// Bytes of the block header; the first entry starts here.
pub const BLOCK_HEADER_SIZE: u64 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    pub magic: u32,
    /// The log this block belongs to.
    pub log_id: u32,
    /// Seed of every entry CRC in this block, fresh at each allocation, so that entries left
    /// over from an earlier use of the block never verify.
    pub salt: u32,
    /// 0 while the block is being written; then the offset where its entries end.
    pub sealed_len: u32,
    /// The next block of the log, or [`crate::control::NO_BLOCK`].
    pub next: u32,
    pub reserved0: u32,
    /// The log slot generation that owns the block.
    pub log_generation: u64,
    /// Seq the first entry of this block is expected to carry (informative).
    pub first_seq: u64,
    pub reserved: [u64; 3],
}
assert_size!(BlockHeader, 64);
assert_offset!(BlockHeader, sealed_len, 12);
assert_offset!(BlockHeader, next, 16);

impl BlockHeader {
    /// Offset of `sealed_len` within the header (written by the KN with one 4-byte WRITE).
    pub const SEALED_LEN_OFFSET: u64 = 12;
    /// Offset of `next` within the header (written by the DPM).
    pub const NEXT_OFFSET: u64 = 16;
}

impl_pod!(BlockHeader);
