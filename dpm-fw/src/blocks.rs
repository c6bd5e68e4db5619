//! Volatile bookkeeping of log blocks: the free list, per-block live counts and live bytes,
//! salts.
//!
//! Nothing here is persisted: at recovery the free list is every block not reachable from a
//! log chain, and a block's live count is the number of index refs pointing into it (plus
//! entries pinned by indirect cells). A block whose entries are all merged and whose live
//! count is zero is dead and returns to the free list once unlinked from its chain. Live
//! bytes (of index-held entries only) let compaction pick mostly-dead blocks without
//! reading them.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Free list and live counts.
#[derive(Debug)]
pub(crate) struct Blocks {
    free: spin::Mutex<Vec<u32>>,
    live: Vec<AtomicU32>,
    live_bytes: Vec<AtomicU32>,
    salt_seed: u64,
    salt_counter: AtomicU64,
}

impl Blocks {
    /// All `n` blocks start used; the caller frees the unreachable ones.
    pub(crate) fn new(n: u64, salt_seed: u64) -> Self {
        Self {
            free: spin::Mutex::new(Vec::new()),
            live: (0..n).map(|_| AtomicU32::new(0)).collect(),
            live_bytes: (0..n).map(|_| AtomicU32::new(0)).collect(),
            salt_seed,
            salt_counter: AtomicU64::new(0),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.live.len() as u64
    }

    /// Sets the free list (recovery). Lowest block numbers are handed out first.
    pub(crate) fn set_free(&self, mut blocks: Vec<u32>) {
        blocks.sort_unstable_by(|a, b| b.cmp(a));
        *self.free.lock() = blocks;
    }

    pub(crate) fn pop_free(&self) -> Option<u32> {
        self.free.lock().pop()
    }

    pub(crate) fn push_free(&self, block: u32) {
        self.live[block as usize].store(0, Ordering::Relaxed);
        self.live_bytes[block as usize].store(0, Ordering::Relaxed);
        self.free.lock().push(block);
    }

    pub(crate) fn free_count(&self) -> u64 {
        self.free.lock().len() as u64
    }

    pub(crate) fn live(&self, block: u32) -> u32 {
        self.live[block as usize].load(Ordering::Relaxed)
    }

    /// Bytes of the index-held entries in `block`.
    pub(crate) fn live_bytes(&self, block: u32) -> u32 {
        self.live_bytes[block as usize].load(Ordering::Relaxed)
    }

    /// Counts an index-held entry of `len` bytes in `block`.
    pub(crate) fn add_ref(&self, block: u32, len: u64) {
        self.inc_live(block);
        self.live_bytes[block as usize].fetch_add(len as u32, Ordering::Relaxed);
    }

    /// Releases an index-held entry of `len` bytes in `block`.
    pub(crate) fn release_ref(&self, block: u32, len: u64) {
        self.dec_live(block);
        let _ = self.live_bytes[block as usize].fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |v| Some(v.saturating_sub(len as u32)),
        );
    }

    /// Counts an entry pinned by an indirect cell (its bytes are not tracked: a block with
    /// pins is never compacted).
    pub(crate) fn inc_live(&self, block: u32) {
        self.live[block as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dec_live(&self, block: u32) {
        self.sub_live(block, 1);
    }

    pub(crate) fn sub_live(&self, block: u32, n: u32) {
        let _ = self.live[block as usize].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }

    /// A fresh salt for a block allocation, different from the block's previous one.
    pub(crate) fn next_salt(&self, previous: u32) -> u32 {
        let n = self.salt_counter.fetch_add(1, Ordering::Relaxed);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.salt_seed.to_le_bytes());
        bytes[8..].copy_from_slice(&n.to_le_bytes());
        let s = xxh32ish(&bytes);
        if s == previous {
            s ^ 1
        } else {
            s
        }
    }
}

/// 32 well-mixed bits of `bytes` (the index's key hash, truncated).
fn xxh32ish(bytes: &[u8]) -> u32 {
    let h = dinomo_shared::hash::key_hash(bytes);
    (h ^ (h >> 32)) as u32
}
