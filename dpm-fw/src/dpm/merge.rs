//! Merging: replaying each log's committed entries, in order, into the index.

use dinomo_hw::Persist;
use dinomo_shared::block::{BLOCK_HEADER_SIZE, BLOCK_MAGIC};
use dinomo_shared::control::{ProgressRecord, ProgressSlot, NO_BLOCK};
use dinomo_shared::entry::{self, EntryError, Op, ENTRY_HEADER_SIZE};
use dinomo_shared::index::EntryRef;
use dinomo_shared::ErrorCode;

use super::{Dpm, LogState, Scratch};
use crate::index::IndexError;

/// Where the merger of one log stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Block holding the next entry to merge.
    pub block: u32,
    /// Offset of the next entry within that block.
    pub offset: u32,
    /// Salt of `block`.
    pub salt: u32,
    /// Seq the next entry must carry.
    pub next_seq: u64,
}

/// Why a log stopped merging before its tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// An entry inside a sealed block fails validation: the log is damaged there.
    CorruptEntry {
        block: u32,
        offset: u32,
        error: EntryError,
    },
    /// A block link points outside the log area or to a block of another log.
    BadLink { block: u32 },
    /// The index could not take the entry.
    Index(IndexError),
}

/// Outcome of one merge step on one log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Entries applied to the index.
    pub merged: u64,
    /// The log has nothing more to merge right now.
    pub at_tail: bool,
    /// Another worker holds the log.
    pub busy: bool,
    /// Seq of the last merged entry of the log after the step.
    pub merged_seq: u64,
}

/// Entries merged per step before a worker moves on to another log.
pub const DEFAULT_STEP: u64 = 256;

impl<P: Persist> Dpm<P> {
    /// Merges up to `budget` entries of `log_id`. Returns at once if another worker has the log.
    pub fn merge_step(&self, log_id: u32, budget: u64, scratch: &mut Scratch) -> Step {
        let Some(slot) = self.logs.get(log_id as usize) else {
            return Step {
                at_tail: true,
                ..Step::default()
            };
        };
        let Some(mut guard) = slot.try_lock() else {
            return Step {
                busy: true,
                ..Step::default()
            };
        };
        self.step_locked(log_id, &mut guard, budget, scratch)
    }

    /// Merges `log_id` up to its committed tail (waiting for any worker that holds it) and
    /// returns the seq of the last merged entry.
    pub fn merge_all(&self, log_id: u32, scratch: &mut Scratch) -> Result<u64, ErrorCode> {
        let mut guard = self.slot(log_id)?.lock();
        self.merge_locked(log_id, &mut guard, scratch)
    }

    /// [`Dpm::merge_all`] on a log the caller holds.
    pub(super) fn merge_locked(
        &self,
        log_id: u32,
        guard: &mut Option<LogState>,
        scratch: &mut Scratch,
    ) -> Result<u64, ErrorCode> {
        loop {
            let step = self.step_locked(log_id, guard, u64::MAX, scratch);
            match guard.as_ref() {
                Some(st) if st.stall.is_some() => {
                    return Err(st.stall.map_or(ErrorCode::Corrupt, super::stall_code))
                }
                Some(_) if !step.at_tail => {}
                _ => return Ok(step.merged_seq),
            }
        }
    }

    /// One pass of worker `worker` of `workers` over its share of the logs.
    pub fn merge_pass(&self, worker: u32, workers: u32, budget: u64, scratch: &mut Scratch) -> u64 {
        let mut merged = 0;
        let mut log_id = worker;
        while log_id < self.geo.max_logs {
            merged += self.merge_step(log_id, budget, scratch).merged;
            log_id += workers.max(1);
        }
        merged
    }

    fn step_locked(
        &self,
        log_id: u32,
        guard: &mut Option<LogState>,
        budget: u64,
        scratch: &mut Scratch,
    ) -> Step {
        let Some(st) = guard.as_mut() else {
            return Step {
                at_tail: true,
                ..Step::default()
            };
        };
        // An index that had no room is tried again: blocks may have been freed since.
        if st.stall == Some(Stall::Index(IndexError::Full)) {
            st.stall = None;
        }
        if st.stall.is_some() {
            return Step {
                at_tail: true,
                ..Step::default()
            };
        }
        if st.compaction {
            // Its entries reach the index only by compaction's compare-and-replace.
            self.reclaim_log(log_id, guard);
            return Step {
                at_tail: true,
                ..Step::default()
            };
        }
        let mut step = Step::default();
        while step.merged < budget {
            if st.fence.is_some_and(|f| st.cursor.next_seq > f) {
                step.at_tail = true;
                break;
            }
            match self.next_entry(log_id, st, scratch) {
                Ok(Some((op, key_len, len))) => {
                    let c = st.cursor;
                    let off = self.geo.block_off(c.block) + c.offset as u64;
                    let key = &scratch.buf[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + key_len];
                    let eref = EntryRef::new(off, len as u64);
                    let replicated =
                        self.cells.any_active() && self.cells.pin_if_active(key, c.block);
                    let applied = match (op, eref) {
                        // The key's cell is its authority: the entry stays out of the index
                        // and live in its block, as the cell may name it.
                        _ if replicated => {
                            self.blocks.inc_live(c.block);
                            Ok(())
                        }
                        (Op::Put, Some(r)) => self.index_upsert(key, r).map(|old| {
                            self.blocks.add_ref(c.block, r.len());
                            self.release(old);
                        }),
                        (Op::Delete, _) => self
                            .index
                            .remove(&self.pm, key)
                            .map(|old| self.release(old)),
                        (Op::Put, None) => {
                            Err(IndexError::Corrupt("entry does not fit an entry ref"))
                        }
                    };
                    if let Err(e) = applied {
                        st.stall = Some(Stall::Index(e));
                        step.at_tail = true;
                        break;
                    }
                    st.cursor.offset += len as u32;
                    st.cursor.next_seq += 1;
                    step.merged += 1;
                }
                Ok(None) => {
                    step.at_tail = true;
                    break;
                }
                Err(stall) => {
                    st.stall = Some(stall);
                    step.at_tail = true;
                    break;
                }
            }
        }
        if st.cursor != st.persisted {
            self.persist_progress(log_id, st);
        }
        step.merged_seq = st.cursor.next_seq - 1;
        self.reclaim_log(log_id, guard);
        self.publish_mark(log_id, guard);
        step
    }

    pub(super) fn release(&self, old: Option<EntryRef>) {
        if let Some(o) = old {
            if let Some(b) = self.geo.block_of(o.offset()) {
                self.blocks.release_ref(b, o.len());
            }
        }
    }

    /// Reads the next committed entry into `scratch`, moving the cursor across sealed block
    /// boundaries. `Ok(None)`: nothing more is committed yet.
    fn next_entry(
        &self,
        log_id: u32,
        st: &mut LogState,
        scratch: &mut Scratch,
    ) -> Result<Option<(Op, usize, usize)>, Stall> {
        loop {
            let c = st.cursor;
            let base = self.geo.block_off(c.block) + c.offset as u64;
            let room = self.geo.block_size.saturating_sub(c.offset as u64);
            let mut error = EntryError::Truncated;
            if room >= ENTRY_HEADER_SIZE as u64 {
                let mut head = [0u8; ENTRY_HEADER_SIZE];
                self.pm.read(base, &mut head);
                if let Some(len) = entry::peek_len(&head).filter(|&l| l as u64 <= room) {
                    scratch.buf.resize(len, 0);
                    self.pm.read(base, &mut scratch.buf);
                    match entry::decode_next(&scratch.buf, c.salt, c.next_seq) {
                        Ok(e) => return Ok(Some((e.op, e.key.len(), e.len))),
                        Err(e) => error = e,
                    }
                }
            }
            match self.advance(log_id, st, error) {
                Advance::Moved => continue,
                Advance::Tail => return Ok(None),
                Advance::Damaged(stall) => return Err(stall),
            }
        }
    }

    /// There is no committed entry at the cursor. If the block is sealed and the cursor is
    /// at its end, moves to the next block; if the block is still open, this is the tail
    /// (a torn or unwritten entry); inside a sealed block it is damage.
    fn advance(&self, log_id: u32, st: &mut LogState, error: EntryError) -> Advance {
        let c = st.cursor;
        let hdr = self.header(c.block);
        if hdr.sealed_len == 0 {
            return Advance::Tail;
        }
        if c.offset < hdr.sealed_len {
            return Advance::Damaged(Stall::CorruptEntry {
                block: c.block,
                offset: c.offset,
                error,
            });
        }
        if hdr.next == NO_BLOCK {
            // Sealed before its successor was linked: nothing more yet.
            return Advance::Tail;
        }
        let next = hdr.next;
        if next as u64 >= self.geo.n_blocks {
            return Advance::Damaged(Stall::BadLink { block: c.block });
        }
        let nh = self.header(next);
        if nh.magic != BLOCK_MAGIC || nh.log_id != log_id || nh.log_generation != st.generation {
            return Advance::Damaged(Stall::BadLink { block: c.block });
        }
        st.cursor = Cursor {
            block: next,
            offset: BLOCK_HEADER_SIZE as u32,
            salt: nh.salt,
            next_seq: c.next_seq,
        };
        Advance::Moved
    }

    fn persist_progress(&self, log_id: u32, st: &mut LogState) {
        let poff = self.geo.progress_off(log_id);
        let slot: ProgressSlot = self.pm.read_pod(poff);
        let i = slot.next_index(st.generation);
        let c = st.cursor;
        let rec = ProgressRecord::new(c.next_seq - 1, c.block, c.offset, st.generation);
        let roff = poff + i as u64 * core::mem::size_of::<ProgressRecord>() as u64;
        self.pm.write_pod(roff, &rec);
        self.pm
            .persist(roff, core::mem::size_of::<ProgressRecord>() as u64);
        st.persisted = c;
        st.persisted_block = c.block;
    }

    /// Seq of the last committed entry of a log (at most its fence point), found by
    /// scanning from the merge cursor without applying anything.
    pub(super) fn tail_seq(&self, log_id: u32, st: &LogState, scratch: &mut Scratch) -> u64 {
        let mut probe = LogState {
            status: st.status,
            kn_id: st.kn_id,
            shard: st.shard,
            generation: st.generation,
            cursor: st.cursor,
            persisted_block: st.persisted_block,
            persisted: st.persisted,
            stall: None,
            fence: st.fence,
            quarantine_from: st.quarantine_from,
            compaction: st.compaction,
        };
        if st.compaction {
            return st.cursor.next_seq - 1;
        }
        loop {
            if probe.fence.is_some_and(|f| probe.cursor.next_seq > f) {
                return probe.cursor.next_seq - 1;
            }
            match self.next_entry(log_id, &mut probe, scratch) {
                Ok(Some((_, _, len))) => {
                    probe.cursor.offset += len as u32;
                    probe.cursor.next_seq += 1;
                }
                _ => return probe.cursor.next_seq - 1,
            }
        }
    }
}

/// What to do when the cursor holds no committed entry.
enum Advance {
    Moved,
    Tail,
    Damaged(Stall),
}
