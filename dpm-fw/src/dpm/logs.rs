//! Log slots: opening a log, granting it blocks, closing it.

use alloc::vec::Vec;

use dinomo_hw::Persist;
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE, BLOCK_MAGIC};
use dinomo_shared::control::{
    LogSlot, ProgressRecord, ProgressSlot, LOG_ACTIVE, LOG_CLOSED, LOG_FLAG_COMPACTION,
    LOG_FLAG_FENCED, NO_BLOCK,
};
use dinomo_shared::msg::Response;
use dinomo_shared::ErrorCode;

use super::{Cursor, Dpm, LogState, Scratch};

/// Free blocks only the compaction log may take (one step needs at most one new block).
pub const COMPACTION_RESERVE: u64 = 2;

impl<P: Persist> Dpm<P> {
    pub(super) fn slot(&self, log_id: u32) -> Result<&spin::Mutex<Option<LogState>>, ErrorCode> {
        self.logs
            .get(log_id as usize)
            .ok_or(ErrorCode::InvalidArgument)
    }

    pub(super) fn check_log(&self, log_id: u32, generation: u64) -> Result<(), ErrorCode> {
        match &*self.slot(log_id)?.lock() {
            Some(st) if st.generation == generation && !st.compaction => Ok(()),
            _ => Err(ErrorCode::NoSuchLog),
        }
    }

    /// Every log, held in log order (the only place more than one is held at a time, so
    /// this cannot deadlock). Merge workers skip held logs meanwhile.
    pub(super) fn lock_all_logs(&self) -> Vec<spin::MutexGuard<'_, Option<LogState>>> {
        self.logs.iter().map(|l| l.lock()).collect()
    }

    /// Takes a free block and writes its header (persisted). Reclaims dead blocks first if
    /// the free list is empty. Only the compaction log may take the last
    /// [`COMPACTION_RESERVE`] blocks: compaction needs somewhere to move entries to. A KN's
    /// log (`reserve > 0`) gets a block only while the index keeps room for every entry
    /// that could be written to it (see `room`): otherwise `RegionFull`, before the KN
    /// has acknowledged anything it would write there. Extending a log (`opening` false)
    /// also leaves room for [`OPEN_HEADROOM_LOGS`](super::room::OPEN_HEADROOM_LOGS) new
    /// logs, so that a KN replacing a dead one can still open its logs (and serve reads)
    /// when writes have filled the region.
    pub(super) fn take_block(
        &self,
        log_id: u32,
        generation: u64,
        first_seq: u64,
        reserve: u64,
        opening: bool,
    ) -> Result<(u32, u32), ErrorCode> {
        let _grant = (reserve > 0).then(|| self.grant_lock.lock());
        let refused =
            || self.blocks.free_count() <= reserve || (reserve > 0 && !self.may_grant(opening));
        if refused() {
            self.reclaim_all();
            if refused() {
                return Err(ErrorCode::RegionFull);
            }
        }
        let block = match self.blocks.pop_free() {
            Some(b) => b,
            None => {
                self.reclaim_all();
                self.blocks.pop_free().ok_or(ErrorCode::RegionFull)?
            }
        };
        let old = self.header(block);
        let salt = self.blocks.next_salt(old.salt);
        let hdr = BlockHeader {
            magic: BLOCK_MAGIC,
            log_id,
            salt,
            sealed_len: 0,
            next: NO_BLOCK,
            reserved0: 0,
            log_generation: generation,
            first_seq,
            reserved: [0; 3],
        };
        let off = self.geo.block_off(block);
        self.pm.write_pod(off, &hdr);
        self.pm.persist(off, BLOCK_HEADER_SIZE);
        Ok((block, salt))
    }

    pub(super) fn open_log(
        &self,
        kn_id: u32,
        shard: u32,
        lease_epoch: u32,
    ) -> Result<Response, ErrorCode> {
        if kn_id == dinomo_shared::control::COMPACTION_KN {
            return Err(ErrorCode::InvalidArgument);
        }
        self.open_log_flagged(kn_id, shard, lease_epoch, 0)
    }

    /// Opens a log; `flags` go to its slot with the commit ([`LOG_FLAG_COMPACTION`] for
    /// the DPM's own compaction log).
    pub(super) fn open_log_flagged(
        &self,
        kn_id: u32,
        shard: u32,
        lease_epoch: u32,
        flags: u64,
    ) -> Result<Response, ErrorCode> {
        let _g = self.open_lock.lock();
        let log_id = (0..self.geo.max_logs)
            .find(|&l| self.logs[l as usize].lock().is_none())
            .ok_or(ErrorCode::NoFreeLog)?;
        let mut guard = self.logs[log_id as usize].lock();
        let slot_off = self.geo.log_slot_off(log_id);
        let old: LogSlot = self.pm.read_pod(slot_off);
        let generation = old.generation + 1;
        let reserve = if flags & LOG_FLAG_COMPACTION != 0 {
            0
        } else {
            COMPACTION_RESERVE
        };
        let (block, salt) = self.take_block(log_id, generation, 1, reserve, true)?;
        // Progress first, then the slot: the slot store is the commit of the open.
        let rec = ProgressRecord::new(0, block, BLOCK_HEADER_SIZE as u32, generation);
        let poff = self.geo.progress_off(log_id);
        self.pm.write_pod(
            poff,
            &ProgressSlot {
                records: [rec, ProgressRecord::new(0, NO_BLOCK, 0, 0)],
            },
        );
        self.pm.persist(poff, ProgressSlot::SIZE);
        let slot = LogSlot {
            state: LOG_ACTIVE,
            kn_id,
            shard,
            lease_epoch,
            head_block: block,
            tail_block: block,
            generation,
            fence: 0,
            flags,
            reserved: [0; 2],
        };
        self.pm.write_pod(slot_off, &slot);
        self.pm.persist(slot_off, LogSlot::SIZE);
        let cursor = Cursor {
            block,
            offset: BLOCK_HEADER_SIZE as u32,
            salt,
            next_seq: 1,
        };
        *guard = Some(LogState {
            status: LOG_ACTIVE,
            kn_id,
            shard,
            generation,
            cursor,
            persisted_block: block,
            persisted: cursor,
            stall: None,
            fence: None,
            quarantine_from: None,
            compaction: flags & LOG_FLAG_COMPACTION != 0,
        });
        self.publish_mark(log_id, &guard);
        Ok(Response::LogOpened {
            log_id,
            generation,
            block,
            salt,
        })
    }

    /// Serves [`Request::AllocBlock`](dinomo_shared::msg::Request::AllocBlock). `last_block` must
    /// be the log's tail. If a block is already linked after it for the same `next_seq` and still
    /// untouched, the request is a retry whose reply was lost (this DPM restarted, or the
    /// connection broke) and gets that block again: linking a second one after it would leave an
    /// empty block in the chain, which the merger would take as the log's end.
    pub(super) fn alloc_block(
        &self,
        log_id: u32,
        generation: u64,
        next_seq: u64,
        last_block: u32,
    ) -> Result<Response, ErrorCode> {
        let mut guard = self.slot(log_id)?.lock();
        let st = match guard.as_mut() {
            Some(st)
                if st.generation == generation && st.status == LOG_ACTIVE && !st.compaction =>
            {
                st
            }
            _ => return Err(ErrorCode::NoSuchLog),
        };
        let slot_off = self.geo.log_slot_off(log_id);
        let slot: LogSlot = self.pm.read_pod(slot_off);
        if last_block as u64 >= self.geo.n_blocks {
            return Err(ErrorCode::InvalidArgument);
        }
        let last = self.header(last_block);
        if last.magic != BLOCK_MAGIC || last.log_id != log_id || last.log_generation != generation {
            return Err(ErrorCode::InvalidArgument);
        }
        if slot.tail_block != last_block {
            return match self.granted_after(&slot, &last, log_id, generation, next_seq) {
                Some(granted) => Ok(granted),
                None => Err(ErrorCode::InvalidArgument),
            };
        }
        let (block, salt) =
            self.take_block(log_id, st.generation, next_seq, COMPACTION_RESERVE, false)?;
        // Link after the tail, then move the tail hint. Recovery walks `next` links, so the
        // link is the commit; the hint is only a shortcut.
        let link = self.geo.block_off(last_block) + BlockHeader::NEXT_OFFSET;
        self.pm.store_u32(link, block);
        self.pm.persist(link, 4);
        let tail = slot_off + core::mem::offset_of!(LogSlot, tail_block) as u64;
        self.pm.store_u32(tail, block);
        self.pm.persist(tail, 4);
        Ok(Response::BlockGranted { block, salt })
    }

    /// The block granted by an earlier `AllocBlock` with the same arguments, if the log's
    /// tail is that block, linked right after `last`, and nothing was written to it.
    fn granted_after(
        &self,
        slot: &LogSlot,
        last: &BlockHeader,
        log_id: u32,
        generation: u64,
        next_seq: u64,
    ) -> Option<Response> {
        let b = last.next;
        if b != slot.tail_block || b as u64 >= self.geo.n_blocks {
            return None;
        }
        let h = self.header(b);
        let untouched = h.magic == BLOCK_MAGIC
            && h.log_id == log_id
            && h.log_generation == generation
            && h.first_seq == next_seq
            && h.sealed_len == 0
            && h.next == NO_BLOCK;
        untouched.then_some(Response::BlockGranted {
            block: b,
            salt: h.salt,
        })
    }

    /// Closes a log (its writer gets no more blocks), merges it to its committed tail and,
    /// still holding it, persists that tail as its fence point. `fenced`: closed because
    /// its KN's lease expired, so its blocks are quarantined (recorded before the close,
    /// so that a restart keeps the quarantine).
    pub(super) fn close_log(
        &self,
        log_id: u32,
        generation: u64,
        fenced: bool,
        scratch: &mut Scratch,
    ) -> Result<Response, ErrorCode> {
        let mut guard = self.slot(log_id)?.lock();
        match guard.as_mut() {
            Some(st) if st.generation == generation && !st.compaction => {
                if fenced {
                    let off = self.geo.log_slot_off(log_id) + LogSlot::FLAGS_OFFSET;
                    self.pm
                        .store_u64(off, self.pm.load_u64(off) | LOG_FLAG_FENCED);
                    self.pm.persist(off, 8);
                    st.quarantine_from = Some(self.now_ms());
                }
                if st.status == LOG_ACTIVE {
                    let off = self.geo.log_slot_off(log_id);
                    self.pm.store_u32(off, LOG_CLOSED);
                    self.pm.persist(off, 4);
                    st.status = LOG_CLOSED;
                }
            }
            _ => return Err(ErrorCode::NoSuchLog),
        }
        let merged = self.merge_locked(log_id, &mut guard, scratch);
        self.fence_locked(log_id, &mut guard, scratch);
        merged.map(|merged_seq| Response::Closed { merged_seq })
    }
}
