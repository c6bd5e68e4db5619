//! The persistent hash index (P-CLHT style): root word, 64-byte buckets, entry references.
//!
//! A remote reader needs three things, all reachable by offset-based READs: the root word
//! (one 8-byte READ names the table), a bucket chain, and the entry a slot points to.

mod scan;

pub use scan::{scan_bucket, Candidates, Scan};

use crate::{assert_offset, assert_size, impl_pod};

/// Bucket slots per 64-byte bucket.
pub const SLOTS_PER_BUCKET: usize = 3;
/// Bytes of one bucket.
pub const BUCKET_SIZE: u64 = 64;
/// Bits of the table generation kept in the root word and in every bucket.
pub const GEN_BITS: u32 = 24;
pub const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

/// A reference to a log entry: its region offset (40 bits) and padded length (24 bits), so
/// that one READ fetches header, key and value.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EntryRef(pub u64);

impl EntryRef {
    pub const OFFSET_BITS: u32 = 40;
    pub const MAX_LEN: u64 = (1 << (64 - Self::OFFSET_BITS)) - 1;
    const OFFSET_MASK: u64 = (1 << Self::OFFSET_BITS) - 1;

    /// Packs `offset` and `len`; `None` if either does not fit.
    pub const fn new(offset: u64, len: u64) -> Option<Self> {
        if offset > Self::OFFSET_MASK || len > Self::MAX_LEN {
            None
        } else {
            Some(Self(offset | (len << Self::OFFSET_BITS)))
        }
    }
    pub const fn offset(self) -> u64 {
        self.0 & Self::OFFSET_MASK
    }
    pub const fn len(self) -> u64 {
        self.0 >> Self::OFFSET_BITS
    }
    pub const fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// The index root: names the current table in one 8-byte word, swapped atomically on
/// resize. Layout: bits 0..34 bucket-array offset / 64, bits 34..40 log2(bucket count),
/// bits 40..64 table generation.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RootWord(pub u64);

impl RootWord {
    const BASE_BITS: u32 = 34;
    const LOG2_BITS: u32 = 6;

    /// Packs a table descriptor; `None` if it does not fit.
    pub const fn new(base: u64, log2_buckets: u32, generation: u32) -> Option<Self> {
        if base % BUCKET_SIZE != 0
            || base / BUCKET_SIZE >= (1 << Self::BASE_BITS)
            || log2_buckets >= (1 << Self::LOG2_BITS)
            || generation > GEN_MASK
        {
            return None;
        }
        Some(Self(
            (base / BUCKET_SIZE)
                | ((log2_buckets as u64) << Self::BASE_BITS)
                | ((generation as u64) << (Self::BASE_BITS + Self::LOG2_BITS)),
        ))
    }
    /// Region offset of bucket 0.
    pub const fn base(self) -> u64 {
        (self.0 & ((1 << Self::BASE_BITS) - 1)) * BUCKET_SIZE
    }
    pub const fn log2_buckets(self) -> u32 {
        ((self.0 >> Self::BASE_BITS) & ((1 << Self::LOG2_BITS) - 1)) as u32
    }
    pub const fn buckets(self) -> u64 {
        1 << self.log2_buckets()
    }
    pub const fn generation(self) -> u32 {
        (self.0 >> (Self::BASE_BITS + Self::LOG2_BITS)) as u32
    }
    /// Whether no table has been installed (a freshly zeroed root).
    pub const fn is_unset(self) -> bool {
        self.0 == 0
    }
    /// Region offset of the home bucket of `hash`.
    pub const fn bucket_of(self, hash: u64) -> u64 {
        self.base() + (hash & (self.buckets() - 1)) * BUCKET_SIZE
    }
}

/// One (hash, entry ref) slot. Empty when `hash` is [`crate::hash::EMPTY_HASH`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Slot {
    pub hash: u64,
    pub eref: u64,
}
assert_size!(Slot, 16);

/// A 64-byte bucket: meta word, three slots, next-bucket offset (0: end of chain).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Bits 0..8: lock byte (volatile, reset at recovery); bits 8..16: flags;
    /// bits 32..56: the generation of the table the bucket belongs to.
    pub meta: u64,
    pub slots: [Slot; SLOTS_PER_BUCKET],
    pub next: u64,
}
assert_size!(Bucket, 64);
assert_offset!(Bucket, slots, 8);
assert_offset!(Bucket, next, 56);
impl_pod!(Slot, Bucket);

/// `Bucket::meta` flag: the table was replaced by a resize; re-read the root.
pub const BUCKET_MOVED: u64 = 1 << 8;
/// Mask of the lock byte in `Bucket::meta`.
pub const BUCKET_LOCK_MASK: u64 = 0xFF;

impl Bucket {
    /// Byte offset of slot `i`'s hash within a bucket.
    pub const fn slot_hash_offset(i: usize) -> u64 {
        8 + 16 * i as u64
    }
    /// Byte offset of slot `i`'s entry ref within a bucket.
    pub const fn slot_ref_offset(i: usize) -> u64 {
        16 + 16 * i as u64
    }
    /// Byte offset of `next`.
    pub const NEXT_OFFSET: u64 = 56;

    /// The meta word of an unlocked bucket of table `generation`.
    pub const fn meta_for(generation: u32) -> u64 {
        ((generation & GEN_MASK) as u64) << 32
    }
    /// The table generation recorded in `meta`.
    pub const fn generation_of(meta: u64) -> u32 {
        ((meta >> 32) as u32) & GEN_MASK
    }
    /// A reader's check: does this bucket still belong to the table it expects?
    pub const fn belongs_to(&self, generation: u32) -> bool {
        Self::generation_of(self.meta) == generation & GEN_MASK && self.meta & BUCKET_MOVED == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ref_packs() {
        let r = EntryRef::new((1 << 40) - 8, (1 << 24) - 1).expect("fits");
        assert_eq!((r.offset(), r.len()), ((1 << 40) - 8, (1 << 24) - 1));
        assert!(EntryRef::new(1 << 40, 8).is_none());
        assert!(EntryRef::new(0, 1 << 24).is_none());
    }

    #[test]
    fn root_word_packs() {
        let r = RootWord::new(64 * 12345, 17, 0xABCDEF).expect("fits");
        assert_eq!(
            (r.base(), r.log2_buckets(), r.generation()),
            (64 * 12345, 17, 0xABCDEF)
        );
        assert_eq!(r.bucket_of(u64::MAX), 64 * 12345 + ((1 << 17) - 1) * 64);
        assert!(RootWord::new(65, 1, 1).is_none());
        assert!(RootWord::new(0, 64, 1).is_none());
        assert!(RootWord::new(0, 1, 1 << 24).is_none());
    }

    #[test]
    fn bucket_generation_check() {
        let mut b = Bucket {
            meta: Bucket::meta_for(7) | 1,
            slots: [Slot::default(); 3],
            next: 0,
        };
        assert!(b.belongs_to(7));
        assert!(!b.belongs_to(8));
        b.meta |= BUCKET_MOVED;
        assert!(!b.belongs_to(7));
    }
}
