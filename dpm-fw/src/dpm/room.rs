//! Room for the index: log blocks given to it when its area is full, and the rule that
//! grants a KN a log block only while every entry already granted can still be merged.
//!
//! A KN acknowledges a write once its entry is durable in its log, and the entry reaches
//! the index only later, when it is merged. If the index then had no room the write would
//! be acknowledged but never readable. So the memory node keeps this invariant:
//!
//! > the index can take, without any further log block being freed, one new overflow
//! > bucket for every put that could still be merged from log space already granted.
//!
//! A put adds at most one overflow bucket (64 bytes) to the index (so does freeing an
//! indirect cell, which puts its key back: one is counted per active cell), and a put entry
//! is at least [`MIN_PUT_ENTRY`] bytes long, so a block holds at most
//! `(block_size - header) / MIN_PUT_ENTRY` of them; the part of a log's current merge block
//! past the merge cursor holds at most `(block_size - offset) / MIN_PUT_ENTRY`. The room
//! counted against that is the free units in the blocks the index already holds plus every
//! free block beyond the compaction reserve (the index area's own free units are not
//! counted: a resize may take them). `AllocBlock` and `OpenLog` are refused with
//! `RegionFull` when granting one more block would break the invariant; the KN then
//! refuses the write before acknowledging it.

use core::sync::atomic::Ordering;

use dinomo_hw::Persist;
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE, BLOCK_MAGIC};
use dinomo_shared::control::{LogSlot, NO_BLOCK};
use dinomo_shared::entry;
use dinomo_shared::index::EntryRef;

use super::{Dpm, LogState, Stall};
use crate::index::IndexError;

/// The shortest put entry a KN writes: a 1-byte key and an empty value.
pub const MIN_PUT_ENTRY: u64 = entry::padded_len(1, 0) as u64;

/// New logs a full region still has room to open (a KN's default shard count): extending
/// a log leaves their first blocks, and the index room those need, untouched.
pub const OPEN_HEADROOM_LOGS: u64 = 2;

/// A log's mark when it has nothing left to merge (free, the compaction log, damaged, or
/// closed and merged to its fence point).
pub(super) const NO_MARK: u64 = u64::MAX;

/// What the invariant looks like now (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Room {
    /// Free log blocks.
    pub free_blocks: u64,
    /// Log blocks the index holds.
    pub index_blocks: u64,
    /// Free overflow-bucket units in those blocks.
    pub index_free_units: u64,
    /// Free units of the index area (a resize leaves what the room counts on free).
    pub area_free_units: u64,
    /// Overflow buckets the index may still need for the unmerged granted log space.
    pub reserved_units: u64,
    /// Units the room counts: `index_free_units`, `area_free_units`, and the free blocks
    /// beyond the compaction reserve.
    pub available_units: u64,
}

impl<P: Persist> Dpm<P> {
    /// Upserts into the index; when the index has no room, gives it a free log block and
    /// tries again.
    pub(super) fn index_upsert(
        &self,
        key: &[u8],
        eref: EntryRef,
    ) -> Result<Option<EntryRef>, IndexError> {
        loop {
            match self.index.upsert(&self.pm, key, eref) {
                Err(IndexError::Full) if self.feed_index() => continue,
                r => return r,
            }
        }
    }

    /// Moves one free log block to the index; false if there is none, even after reclaiming.
    fn feed_index(&self) -> bool {
        let block = match self.blocks.pop_free() {
            Some(b) => b,
            None => {
                self.reclaim_all();
                match self.blocks.pop_free() {
                    Some(b) => b,
                    None => return false,
                }
            }
        };
        match self.index.add_block(block) {
            Ok(()) => true,
            Err(_) => {
                self.blocks.push_free(block);
                false
            }
        }
    }

    /// Records where `log_id`'s merge cursor stands, for [`Dpm::room`] (read without the
    /// log's lock, which a block grant of another log cannot take).
    pub(super) fn publish_mark(&self, log_id: u32, guard: &Option<LogState>) {
        let mark = match guard {
            Some(st) if !st.compaction && still_merges(st) => {
                (st.cursor.block as u64) << 32 | st.cursor.offset as u64
            }
            _ => NO_MARK,
        };
        if let Some(m) = self.marks.get(log_id as usize) {
            m.store(mark, Ordering::Release);
        }
    }

    /// Overflow buckets the unmerged part of every log could still need, and one per
    /// active indirect cell (freeing a cell puts its key back into the index).
    fn reserved_units(&self) -> u64 {
        let per_block = self.worst_puts(BLOCK_HEADER_SIZE);
        let mut total = self.cells.active();
        for log_id in 0..self.geo.max_logs {
            let mark = self.marks[log_id as usize].load(Ordering::Acquire);
            if mark == NO_MARK {
                continue;
            }
            let (block, offset) = ((mark >> 32) as u32, mark as u32 as u64);
            total = total.saturating_add(match self.walk_from(log_id, block, offset, per_block) {
                Some(n) => n,
                // The cursor moved on meanwhile and its block was reused: count the whole
                // chain instead (more than needed, never less).
                None => {
                    let head = self
                        .pm
                        .load_u32(self.geo.log_slot_off(log_id) + LogSlot::CHAIN_OFFSET);
                    self.walk_from(log_id, head, BLOCK_HEADER_SIZE, per_block)
                        .unwrap_or(self.geo.n_blocks * per_block)
                }
            });
        }
        total
    }

    /// Worst-case puts from `offset` in `block` to the end of the chain; `None` if `block`
    /// is no longer a block of `log_id`.
    fn walk_from(&self, log_id: u32, block: u32, offset: u64, per_block: u64) -> Option<u64> {
        let mut b = block;
        let mut n = 0u64;
        let mut total = 0u64;
        while b != NO_BLOCK && (b as u64) < self.geo.n_blocks && n < self.geo.n_blocks {
            let h: BlockHeader = self.header(b);
            if h.magic != BLOCK_MAGIC || h.log_id != log_id {
                if n == 0 {
                    return None;
                }
                break;
            }
            total += if n == 0 {
                self.worst_puts(offset)
            } else {
                per_block
            };
            n += 1;
            b = h.next;
        }
        Some(total)
    }

    /// Most put entries that fit a block from `offset` on.
    fn worst_puts(&self, offset: u64) -> u64 {
        self.geo.block_size.saturating_sub(offset) / MIN_PUT_ENTRY
    }

    /// The room invariant's figures now.
    pub fn room(&self) -> Room {
        let free_blocks = self.blocks.free_count();
        let index_free_units = self.index.block_free_units();
        let area_free_units = self.index.area_free_units();
        let spare_blocks = free_blocks.saturating_sub(super::COMPACTION_RESERVE);
        Room {
            free_blocks,
            index_blocks: self.index.blocks().len() as u64,
            index_free_units,
            area_free_units,
            reserved_units: self.reserved_units(),
            available_units: index_free_units
                .saturating_add(area_free_units)
                .saturating_add(spare_blocks.saturating_mul(self.index.units_per_block())),
        }
    }

    /// Whether one more block may be granted to a KN's log without breaking the invariant
    /// (`opening`: the first block of a new log; otherwise the headroom for opening
    /// [`OPEN_HEADROOM_LOGS`] logs stays free too). The caller holds `grant_lock`, so no
    /// other grant changes the figures meanwhile; merging and reclaiming only improve them.
    pub(super) fn may_grant(&self, opening: bool) -> bool {
        let room = self.room();
        let per_block = self.index.units_per_block();
        let one_log = per_block.saturating_add(self.worst_puts(BLOCK_HEADER_SIZE));
        let (blocks, units) = if opening {
            (1, one_log)
        } else {
            (
                1 + OPEN_HEADROOM_LOGS,
                one_log.saturating_mul(1 + OPEN_HEADROOM_LOGS),
            )
        };
        if room.free_blocks < super::COMPACTION_RESERVE + blocks {
            return false;
        }
        // After the grant(s): free blocks fewer, and more blocks to merge.
        let needed = room.reserved_units.saturating_add(units);
        if room.available_units < needed {
            return false;
        }
        // What the log blocks cannot hold must stay free in the index area: a resize may
        // not take it.
        let in_blocks = room.available_units - room.area_free_units;
        self.index
            .set_area_reserve(needed.saturating_sub(in_blocks));
        true
    }
}

/// Whether a log still has entries to merge into the index.
fn still_merges(st: &LogState) -> bool {
    match st.stall {
        None | Some(Stall::Index(IndexError::Full)) => {}
        Some(_) => return false,
    }
    !st.fence.is_some_and(|f| st.cursor.next_seq > f)
}
