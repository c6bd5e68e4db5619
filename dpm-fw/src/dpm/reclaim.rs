//! Reclaiming dead log blocks, and the quarantine that keeps a fenced log's blocks out of
//! reuse for a while.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use dinomo_hw::Persist;
use dinomo_shared::block::BlockHeader;
use dinomo_shared::control::{LogSlot, LOG_CLOSED, LOG_FREE, NO_BLOCK};

use super::{Dpm, LogState};

/// How long the blocks of a log closed by fencing its KN stay out of reuse: a KN that was
/// paused, not dead, cannot be revoked on the shm fabric and may still land one WRITE in
/// its last block; the quarantine outlasts such a straggler.
pub const DEFAULT_QUARANTINE_MS: u64 = 10_000;

impl<P: Persist> Dpm<P> {
    /// Advances the clock quarantines are measured on: milliseconds on a monotonic clock
    /// that reads 0 (or less) when the region was opened, e.g. the time since the runner
    /// started. The core has no clock of its own; a reading older than the last is ignored.
    /// Logs found fenced at open count their quarantine from 0.
    pub fn tick(&self, now_ms: u64) {
        self.clock_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    /// The clock as last ticked.
    pub fn now_ms(&self) -> u64 {
        self.clock_ms.load(Ordering::Relaxed)
    }

    /// Sets how long blocks of logs closed by fencing stay out of reuse (default
    /// [`DEFAULT_QUARANTINE_MS`]).
    pub fn set_quarantine_ms(&self, ms: u64) {
        self.quarantine_ms.store(ms, Ordering::Relaxed);
    }

    pub fn quarantine_ms(&self) -> u64 {
        self.quarantine_ms.load(Ordering::Relaxed)
    }

    pub(super) fn in_quarantine(&self, st: &LogState) -> bool {
        st.quarantine_from.is_some_and(|from| {
            self.now_ms() < from.saturating_add(self.quarantine_ms.load(Ordering::Relaxed))
        })
    }

    /// Reclaims dead blocks of every log not held by a worker.
    pub fn reclaim_all(&self) {
        for (log_id, slot) in self.logs.iter().enumerate() {
            if let Some(mut g) = slot.try_lock() {
                self.reclaim_log(log_id as u32, &mut g);
            }
        }
    }

    /// Unlinks and frees the dead blocks of `log_id`: those before the persisted merge
    /// position with no live entry. A closed log that is merged to its tail gives up its
    /// last block (the one its progress names) once it is the only one left, and then its
    /// slot.
    pub(super) fn reclaim_log(&self, log_id: u32, guard: &mut Option<LogState>) {
        let Some(st) = guard.as_mut() else { return };
        if st.status == LOG_CLOSED && self.in_quarantine(st) {
            return;
        }
        let closed_done = st.status == LOG_CLOSED && st.stall.is_none();
        let slot_off = self.geo.log_slot_off(log_id);
        let head_off = slot_off + LogSlot::CHAIN_OFFSET;
        let mut prev: Option<u32> = None;
        let mut b = self.pm.load_u32(head_off);
        let mut remaining = 0u64;
        while b != NO_BLOCK && (b as u64) < self.geo.n_blocks {
            let mut next = self.header(b).next;
            let before_cursor = b != st.persisted_block;
            if !before_cursor
                && next != NO_BLOCK
                && closed_done
                && st.fence.is_some()
                && st.cursor == st.persisted
                && self.cut_after(log_id, b)
            {
                next = NO_BLOCK;
            }
            // The block the persisted progress names goes last, with the whole chain:
            // recovery needs it in the chain as long as the log has a chain at all.
            let at_end = !before_cursor
                && closed_done
                && next == NO_BLOCK
                && st.cursor == st.persisted
                && prev.is_none();
            if (before_cursor || at_end) && self.blocks.live(b) == 0 {
                match prev {
                    None => {
                        self.pm.store_u32(head_off, next);
                        self.pm.persist(head_off, 4);
                    }
                    Some(p) => {
                        let link = self.geo.block_off(p) + BlockHeader::NEXT_OFFSET;
                        self.pm.store_u32(link, next);
                        self.pm.persist(link, 4);
                    }
                }
                self.blocks.push_free(b);
            } else {
                prev = Some(b);
                remaining += 1;
            }
            if !before_cursor {
                break;
            }
            b = next;
        }
        if closed_done && remaining == 0 {
            self.pm.store_u32(slot_off, LOG_FREE);
            self.pm.persist(slot_off, 4);
            *guard = None;
            self.publish_mark(log_id, guard);
        }
    }

    /// Frees the blocks of a closed log after `last`, the block its merge stopped in at its
    /// fence point: the spare block its writer was granted, and anything a fenced writer
    /// put there after the fence, which is never merged. Without this a closed log kept
    /// its spare forever, and the block before it too. Returns whether it cut.
    fn cut_after(&self, log_id: u32, last: u32) -> bool {
        let mut cut = Vec::new();
        let mut b = self.header(last).next;
        while b != NO_BLOCK
            && (b as u64) < self.geo.n_blocks
            && cut.len() < self.geo.n_blocks as usize
        {
            let h = self.header(b);
            // Nothing after the merge position can be live; a count says otherwise only if
            // the chain is not what it seems, so leave it alone.
            if h.log_id != log_id || self.blocks.live(b) != 0 {
                return false;
            }
            cut.push(b);
            b = h.next;
        }
        let link = self.geo.block_off(last) + BlockHeader::NEXT_OFFSET;
        self.pm.store_u32(link, NO_BLOCK);
        self.pm.persist(link, 4);
        let tail =
            self.geo.log_slot_off(log_id) + core::mem::offset_of!(LogSlot, tail_block) as u64;
        self.pm.store_u32(tail, last);
        self.pm.persist(tail, 4);
        for b in cut {
            self.blocks.push_free(b);
        }
        true
    }
}
