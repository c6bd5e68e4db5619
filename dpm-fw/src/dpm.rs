//! The memory node: log blocks, merging, recovery and control messages over one region.
//!
//! Merge workers replay each log's committed entries in order into the index. Each log is
//! merged by one worker at a time (its state sits behind a per-log lock that workers only
//! `try_lock`), so entries of one log are applied in log order; different logs proceed in
//! parallel and meet only at the index's bucket locks.
//!
//! Indirect cells (see [`crate::cells`]) change only while every log is held, so a merge
//! step sees a stable set of replicated keys.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE, BLOCK_MAGIC};
use dinomo_shared::control::{
    LogSlot, ProgressRecord, ProgressSlot, LOG_ACTIVE, LOG_CLOSED, LOG_FLAG_COMPACTION,
    LOG_FLAG_FENCED, LOG_FREE, NO_BLOCK,
};
use dinomo_shared::entry::{self, EntryError, Op, ENTRY_ALIGN, ENTRY_HEADER_SIZE};
use dinomo_shared::geometry::{FormatParams, Geometry};
use dinomo_shared::index::EntryRef;
use dinomo_shared::msg::{Frame, Request, Response};
use dinomo_shared::superblock::FLAG_CLEAN_SHUTDOWN;
use dinomo_shared::ErrorCode;

use crate::blocks::Blocks;
use crate::cells::Cells;
use crate::index::{Index, IndexError, IndexStats};
use crate::region::{self, FormatError, OpenError};

mod compact;
pub use compact::{CompactConfig, CompactStep, CompactTotals, LiveMismatch};

/// Reusable buffer for reading entries; one per worker thread.
#[derive(Debug, Default)]
pub struct Scratch {
    buf: Vec<u8>,
}

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

#[derive(Debug)]
struct LogState {
    status: u32,
    kn_id: u32,
    shard: u32,
    generation: u64,
    cursor: Cursor,
    /// Block named by the last persisted progress record; blocks before it may be freed.
    persisted_block: u32,
    persisted: Cursor,
    stall: Option<Stall>,
    /// Seq of the last entry that may be merged (persisted in the log slot); set at close.
    fence: Option<u64>,
    /// For a log closed by fencing its KN: the clock reading its quarantine counts from.
    quarantine_from: Option<u64>,
    /// The DPM's compaction log: never merged; `cursor` is where the next moved entry is
    /// written and `persisted_block` the block being written (kept from reclaim).
    compaction: bool,
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

/// Per-log figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStats {
    pub log_id: u32,
    pub state: u32,
    pub kn_id: u32,
    pub shard: u32,
    pub generation: u64,
    /// Seq of the last merged entry.
    pub merged_seq: u64,
    /// Seq of the last committed entry in the log (merged or not), at most the fence.
    pub tail_seq: u64,
    /// The log's fence point: no entry after this seq is ever merged.
    pub fence_seq: Option<u64>,
    /// Closed by fencing its KN and still in quarantine: none of its blocks is reused yet.
    pub quarantined: bool,
    pub cursor: Cursor,
    pub blocks: u64,
    pub stall: Option<Stall>,
}

/// An active indirect cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellStats {
    pub cell: u32,
    /// The replicated key.
    pub key: Vec<u8>,
    /// The entry the cell names now.
    pub eref: EntryRef,
    /// Entries of the key kept out of the index and from reclaim while the cell is active.
    pub pinned_entries: u64,
}

/// Region-wide figures.
#[derive(Clone, Debug, PartialEq)]
pub struct DpmStats {
    pub geometry: Geometry,
    pub region_id: u64,
    pub mount_count: u64,
    pub clean_shutdown: bool,
    pub blocks_free: u64,
    pub blocks_used: u64,
    /// Used blocks that are fully merged and hold no live entry (about to be reclaimed).
    pub blocks_dead: u64,
    pub live_entries: u64,
    /// Bytes of the entries the index holds (what compaction would have to move).
    pub live_bytes: u64,
    /// Compaction totals since format (persisted once per step).
    pub compaction: CompactTotals,
    pub logs: Vec<LogStats>,
    pub cells: Vec<CellStats>,
    pub index: IndexStats,
}

/// The memory node over one region.
pub struct Dpm<P: Persist> {
    pm: Pmem<P>,
    geo: Geometry,
    region_id: u64,
    index: Index,
    blocks: Blocks,
    cells: Cells,
    logs: Vec<spin::Mutex<Option<LogState>>>,
    open_lock: spin::Mutex<()>,
    shutting_down: AtomicBool,
    /// Milliseconds on the runner's clock (see [`Dpm::tick`]).
    clock_ms: AtomicU64,
    quarantine_ms: AtomicU64,
    /// KNs fenced so far, for a transport that can also revoke their access (verbs).
    fences: spin::Mutex<FenceLog>,
    /// How many fences `fences` has recorded; read without its lock to skip it when unchanged.
    fence_count: AtomicU64,
    compaction: compact::Compaction,
}

/// The most recent fenced KNs, in a ring (a reader that falls more than its length behind
/// is told so and revokes nothing it missed; fencing is rare).
#[derive(Default)]
struct FenceLog {
    count: u64,
    ring: [u32; FENCE_RING],
}

const FENCE_RING: usize = 32;

impl<P: Persist> core::fmt::Debug for Dpm<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Dpm")
            .field("geometry", &self.geo)
            .field("region_id", &self.region_id)
            .finish()
    }
}

/// Free blocks only the compaction log may take (one step needs at most one new block).
pub const COMPACTION_RESERVE: u64 = 2;

/// Entries merged per step before a worker moves on to another log.
pub const DEFAULT_STEP: u64 = 256;

/// How long the blocks of a log closed by fencing its KN stay out of reuse: a KN that was
/// paused, not dead, cannot be revoked on the shm fabric and may still land one WRITE in
/// its last block; the quarantine outlasts such a straggler.
pub const DEFAULT_QUARANTINE_MS: u64 = 10_000;

impl<P: Persist> Dpm<P> {
    /// Formats `pm` and opens it.
    pub fn format(pm: Pmem<P>, params: &FormatParams, region_id: u64) -> Result<Self, FormatError> {
        region::format(&pm, params, region_id)?;
        Self::open(pm).map_err(|e| match e {
            OpenError::Index(i) => FormatError::Index(i),
            // A region we just formatted always opens; anything else is an index failure.
            _ => FormatError::Index(IndexError::Corrupt(
                "freshly formatted region does not open",
            )),
        })
    }

    /// Opens a region after a clean shutdown or a crash at any instant: validates it, resets
    /// volatile state, rebuilds the free list and live counts, and replays every log from its
    /// persisted progress to its committed tail, so that the index equals the committed log.
    pub fn open(pm: Pmem<P>) -> Result<Self, OpenError> {
        let geo = region::read_geometry(&pm)?;
        let sb = region::superblock(&pm);
        let index = Index::open(&pm, &geo).map_err(OpenError::Index)?;
        let sstate = region::state(&pm);
        let mount = sstate.mount_count;
        let blocks = Blocks::new(geo.n_blocks, sb.region_id ^ mount.rotate_left(32));
        let mut used = alloc::vec![false; geo.n_blocks as usize];
        let mut logs = Vec::with_capacity(geo.max_logs as usize);
        let mut compaction_log = None;
        for log_id in 0..geo.max_logs {
            let st = recover_log(&pm, &geo, log_id, &mut used)?;
            if st.as_ref().is_some_and(|s| s.compaction) {
                compaction_log = Some(log_id);
            }
            logs.push(spin::Mutex::new(st));
        }
        index.for_each(&pm, |_, r| {
            if let Some(b) = geo.block_of(r.offset()) {
                blocks.add_ref(b, r.len());
            }
        });
        // Before the logs are replayed: entries of replicated keys stay out of the index.
        let cells = recover_cells(&pm, &geo, &used, &blocks)?;
        blocks.set_free(
            (0..geo.n_blocks as u32)
                .filter(|&b| !used[b as usize])
                .collect(),
        );
        let dpm = Self {
            pm,
            geo,
            region_id: sb.region_id,
            index,
            blocks,
            cells,
            logs,
            open_lock: spin::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            clock_ms: AtomicU64::new(0),
            quarantine_ms: AtomicU64::new(DEFAULT_QUARANTINE_MS),
            fences: spin::Mutex::new(FenceLog::default()),
            fence_count: AtomicU64::new(0),
            compaction: compact::Compaction::new(&geo, compaction_log, &sstate),
        };
        region::bump_mount_count(&dpm.pm);
        region::set_clean(&dpm.pm, false);
        let mut scratch = Scratch::default();
        for (log_id, slot) in dpm.logs.iter().enumerate() {
            let log_id = log_id as u32;
            let mut guard = slot.lock();
            // A stalled log stays stalled (and visible in stats); recovery does not fail.
            let _ = dpm.merge_locked(log_id, &mut guard, &mut scratch);
            // A close cut short before its fence point was persisted: its writer is gone
            // (or fenced), so its tail now is where it ends.
            if matches!(guard.as_ref(), Some(st) if st.status == LOG_CLOSED) {
                dpm.fence_locked(log_id, &mut guard, &mut scratch);
            }
        }
        Ok(dpm)
    }

    pub fn pmem(&self) -> &Pmem<P> {
        &self.pm
    }
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }
    pub fn region_id(&self) -> u64 {
        self.region_id
    }
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The entry ref the index holds for `key`.
    pub fn lookup(&self, key: &[u8]) -> Option<EntryRef> {
        self.index.get(&self.pm, key)
    }

    /// The merged value of `key`, read from its entry (DPM-local; for tests and tools).
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let r = self.lookup(key)?;
        self.pm.check(r.offset(), r.len()).ok()?;
        let mut buf = alloc::vec![0u8; r.len() as usize];
        self.pm.read(r.offset(), &mut buf);
        let salt = self.geo.block_of(r.offset()).map(|b| self.header(b).salt)?;
        let e = entry::decode(&buf, salt).ok()?;
        (e.key == key && e.op == Op::Put).then(|| e.value.to_vec())
    }

    fn header(&self, block: u32) -> BlockHeader {
        self.pm.read_pod(self.geo.block_off(block))
    }

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
    fn in_quarantine(&self, st: &LogState) -> bool {
        st.quarantine_from.is_some_and(|from| {
            self.now_ms() < from.saturating_add(self.quarantine_ms.load(Ordering::Relaxed))
        })
    }

    /// Asks every worker loop to stop taking new work.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Merges every log to its tail and marks the region cleanly shut down.
    pub fn shutdown_clean(&self, scratch: &mut Scratch) {
        self.begin_shutdown();
        for log_id in 0..self.geo.max_logs {
            let _ = self.merge_all(log_id, scratch);
        }
        region::set_clean(&self.pm, true);
    }

    // ----- control messages -----

    /// Handles one control frame and returns the reply.
    pub fn handle(&self, frame: &Frame, scratch: &mut Scratch) -> Frame {
        let req = match Request::decode(frame) {
            Ok(r) => r,
            Err(_) => return Response::error(frame, ErrorCode::UnknownMessage),
        };
        match self.execute(req, scratch) {
            Ok(resp) => resp.encode(frame.req_id),
            Err(code) => Response::error(frame, code),
        }
    }

    /// Executes one request.
    pub fn execute(&self, req: Request, scratch: &mut Scratch) -> Result<Response, ErrorCode> {
        match req {
            Request::Ping => Ok(Response::Pong),
            Request::Hello { .. } => Ok(Response::Hello {
                region_id: self.region_id,
                region_size: self.geo.region_size,
            }),
            Request::OpenLog {
                kn_id,
                shard,
                lease_epoch,
            } => {
                if self.is_shutting_down() {
                    return Err(ErrorCode::ShuttingDown);
                }
                self.make_room(scratch);
                self.open_log(kn_id, shard, lease_epoch)
            }
            Request::AllocBlock {
                log_id,
                generation,
                next_seq,
                last_block,
            } => {
                if self.is_shutting_down() {
                    return Err(ErrorCode::ShuttingDown);
                }
                self.make_room(scratch);
                self.alloc_block(log_id, generation, next_seq, last_block)
            }
            Request::MergeAll {
                log_id, generation, ..
            } => {
                self.check_log(log_id, generation)?;
                self.merge_all(log_id, scratch)
                    .map(|merged_seq| Response::Merged { merged_seq })
            }
            Request::CloseLog { log_id, generation } => {
                self.close_log(log_id, generation, false, scratch)
            }
            Request::FenceKn { kn_id } => self.fence_kn(kn_id, scratch),
            Request::AllocCell {
                log_id,
                generation,
                eref,
            } => self.alloc_cell(log_id, generation, EntryRef(eref), scratch),
            Request::FreeCell { cell } => self.free_cell(cell, scratch),
        }
    }

    /// Closes every active log of `kn_id` and merges each to its committed tail (what the
    /// KN acknowledged is durable in its logs, so after this it is in the index), then
    /// persists that tail as the log's fence point before replying. A write the KN lands
    /// later in a closed log is never merged, also after a restart, and its next block
    /// request is refused. Logs of the KN closed without a fence point (a close cut short
    /// by a crash) are fenced too. The blocks of every fenced log are quarantined.
    fn fence_kn(&self, kn_id: u32, scratch: &mut Scratch) -> Result<Response, ErrorCode> {
        let mut logs = 0;
        let mut entries = 0;
        for log_id in 0..self.geo.max_logs {
            let target = match &*self.logs[log_id as usize].lock() {
                Some(st)
                    if st.kn_id == kn_id
                        && !st.compaction
                        && (st.status == LOG_ACTIVE || st.fence.is_none()) =>
                {
                    Some((st.generation, st.cursor.next_seq))
                }
                _ => None,
            };
            let Some((generation, next_seq)) = target else {
                continue;
            };
            match self.close_log(log_id, generation, true, scratch) {
                Ok(Response::Closed { merged_seq }) => {
                    logs += 1;
                    entries += (merged_seq + 1).saturating_sub(next_seq);
                }
                // Closed or reused by someone else meanwhile: not this KN's any more.
                Err(ErrorCode::NoSuchLog) => {}
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        {
            let mut f = self.fences.lock();
            let at = (f.count % FENCE_RING as u64) as usize;
            f.ring[at] = kn_id;
            f.count += 1;
            self.fence_count.store(f.count, Ordering::Release);
        }
        Ok(Response::Fenced { logs, entries })
    }

    /// KNs fenced since `*cursor` (a count this call advances), oldest first, passed to
    /// `revoke`. Returns how many fences were missed because the reader fell too far behind.
    pub fn fenced_since(&self, cursor: &mut u64, mut revoke: impl FnMut(u32)) -> u64 {
        if self.fence_count.load(Ordering::Acquire) == *cursor {
            return 0;
        }
        let f = self.fences.lock();
        let oldest = f.count.saturating_sub(FENCE_RING as u64);
        let missed = oldest.saturating_sub(*cursor);
        for n in (*cursor).max(oldest)..f.count {
            revoke(f.ring[(n % FENCE_RING as u64) as usize]);
        }
        *cursor = f.count;
        missed
    }

    fn slot(&self, log_id: u32) -> Result<&spin::Mutex<Option<LogState>>, ErrorCode> {
        self.logs
            .get(log_id as usize)
            .ok_or(ErrorCode::InvalidArgument)
    }

    fn check_log(&self, log_id: u32, generation: u64) -> Result<(), ErrorCode> {
        match &*self.slot(log_id)?.lock() {
            Some(st) if st.generation == generation && !st.compaction => Ok(()),
            _ => Err(ErrorCode::NoSuchLog),
        }
    }

    /// Takes a free block and writes its header (persisted). Reclaims dead blocks first if
    /// the free list is empty. Only the compaction log may take the last
    /// [`COMPACTION_RESERVE`] blocks: compaction needs somewhere to move entries to.
    fn take_block(
        &self,
        log_id: u32,
        generation: u64,
        first_seq: u64,
        reserve: u64,
    ) -> Result<(u32, u32), ErrorCode> {
        if self.blocks.free_count() <= reserve {
            self.reclaim_all();
            if self.blocks.free_count() <= reserve {
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

    fn open_log(&self, kn_id: u32, shard: u32, lease_epoch: u32) -> Result<Response, ErrorCode> {
        if kn_id == dinomo_shared::control::COMPACTION_KN {
            return Err(ErrorCode::InvalidArgument);
        }
        self.open_log_flagged(kn_id, shard, lease_epoch, 0)
    }

    /// Opens a log; `flags` go to its slot with the commit ([`LOG_FLAG_COMPACTION`] for
    /// the DPM's own compaction log).
    fn open_log_flagged(
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
        let (block, salt) = self.take_block(log_id, generation, 1, reserve)?;
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
        Ok(Response::LogOpened {
            log_id,
            generation,
            block,
            salt,
        })
    }

    /// Serves [`Request::AllocBlock`]. `last_block` must be the log's tail. If a block is
    /// already linked after it for the same `next_seq` and still untouched, the request is a
    /// retry whose reply was lost (this DPM restarted, or the connection broke) and gets that
    /// block again: linking a second one after it would leave an empty block in the chain,
    /// which the merger would take as the log's end.
    fn alloc_block(
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
        let (block, salt) = self.take_block(log_id, st.generation, next_seq, COMPACTION_RESERVE)?;
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
    fn close_log(
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

    /// Persists the fence point of a log that has none: its tail as merged, or for a
    /// stalled log as far as its entries verify (what was committed when it was closed).
    /// A log whose slot was already released has nothing left to fence.
    fn fence_locked(&self, log_id: u32, guard: &mut Option<LogState>, scratch: &mut Scratch) {
        let Some(st) = guard.as_mut() else { return };
        if st.fence.is_some() {
            return;
        }
        let seq = match st.stall {
            None => st.cursor.next_seq - 1,
            Some(_) => self.tail_seq(log_id, st, scratch),
        };
        let off = self.geo.log_slot_off(log_id) + LogSlot::FENCE_OFFSET;
        self.pm.store_u64(off, LogSlot::encode_fence(seq));
        self.pm.persist(off, 8);
        st.fence = Some(seq);
    }

    // ----- merging -----

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
    fn merge_locked(
        &self,
        log_id: u32,
        guard: &mut Option<LogState>,
        scratch: &mut Scratch,
    ) -> Result<u64, ErrorCode> {
        loop {
            let step = self.step_locked(log_id, guard, u64::MAX, scratch);
            match guard.as_ref() {
                Some(st) if st.stall.is_some() => return Err(ErrorCode::Corrupt),
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
                        (Op::Put, Some(r)) => self.index.upsert(&self.pm, key, r).map(|old| {
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
        step
    }

    fn release(&self, old: Option<EntryRef>) {
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

    // ----- reclaiming dead blocks -----

    /// Unlinks and frees the dead blocks of `log_id`: those before the persisted merge
    /// position with no live entry. A closed log that is merged to its tail gives up its
    /// last block (the one its progress names) once it is the only one left, and then its
    /// slot.
    fn reclaim_log(&self, log_id: u32, guard: &mut Option<LogState>) {
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

    /// Reclaims dead blocks of every log not held by a worker.
    pub fn reclaim_all(&self) {
        for (log_id, slot) in self.logs.iter().enumerate() {
            if let Some(mut g) = slot.try_lock() {
                self.reclaim_log(log_id as u32, &mut g);
            }
        }
    }

    // ----- figures -----

    /// Seq of the last committed entry of a log (at most its fence point), found by
    /// scanning from the merge cursor without applying anything.
    fn tail_seq(&self, log_id: u32, st: &LogState, scratch: &mut Scratch) -> u64 {
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

    /// Current figures of the region.
    pub fn stats(&self) -> DpmStats {
        let mut scratch = Scratch::default();
        let mut logs = Vec::new();
        let mut blocks_used = 0;
        let mut blocks_dead = 0;
        for (log_id, slot) in self.logs.iter().enumerate() {
            let g = slot.lock();
            let Some(st) = g.as_ref() else { continue };
            let log_id = log_id as u32;
            let mut n = 0;
            let mut b = self
                .pm
                .load_u32(self.geo.log_slot_off(log_id) + LogSlot::CHAIN_OFFSET);
            while b != NO_BLOCK && (b as u64) < self.geo.n_blocks && n < self.geo.n_blocks {
                n += 1;
                if b != st.cursor.block && self.blocks.live(b) == 0 {
                    blocks_dead += 1;
                }
                if b == st.cursor.block {
                    // Blocks after the cursor are allocated but not reached yet.
                    let mut c = self.header(b).next;
                    while c != NO_BLOCK && (c as u64) < self.geo.n_blocks && n < self.geo.n_blocks {
                        n += 1;
                        c = self.header(c).next;
                    }
                    break;
                }
                b = self.header(b).next;
            }
            blocks_used += n;
            logs.push(LogStats {
                log_id,
                state: st.status,
                kn_id: st.kn_id,
                shard: st.shard,
                generation: st.generation,
                merged_seq: st.cursor.next_seq - 1,
                tail_seq: self.tail_seq(log_id, st, &mut scratch),
                fence_seq: st.fence,
                quarantined: st.status == LOG_CLOSED && self.in_quarantine(st),
                cursor: st.cursor,
                blocks: n,
                stall: st.stall,
            });
        }
        let state = region::state(&self.pm);
        DpmStats {
            geometry: self.geo,
            region_id: self.region_id,
            mount_count: state.mount_count,
            clean_shutdown: state.flags & FLAG_CLEAN_SHUTDOWN != 0,
            blocks_free: self.blocks.free_count(),
            blocks_used,
            blocks_dead,
            live_entries: (0..self.blocks.len() as u32)
                .map(|b| self.blocks.live(b) as u64)
                .sum(),
            live_bytes: (0..self.blocks.len() as u32)
                .map(|b| self.blocks.live_bytes(b) as u64)
                .sum(),
            compaction: self.compaction.totals(),
            logs,
            cells: self
                .cells
                .list()
                .into_iter()
                .map(|(cell, key, pinned_entries)| CellStats {
                    cell,
                    key,
                    eref: self.load_cell(cell),
                    pinned_entries,
                })
                .collect(),
            index: self.index.stats(&self.pm),
        }
    }

    // ----- indirect cells -----

    /// The entry ref an active cell holds; `None` if the cell is not active.
    pub fn cell_ref(&self, cell: u32) -> Option<EntryRef> {
        self.cells.is_active(cell).then(|| self.load_cell(cell))
    }

    fn load_cell(&self, cell: u32) -> EntryRef {
        EntryRef(self.pm.load_u64(self.geo.indirect_off(cell as u64)))
    }

    fn store_cell(&self, cell: u32, r: EntryRef) {
        let off = self.geo.indirect_off(cell as u64);
        self.pm.store_u64(off, r.0);
        self.pm.persist(off, 8);
    }

    /// Every log, held in log order (the only place more than one is held at a time, so
    /// this cannot deadlock). Merge workers skip held logs meanwhile.
    fn lock_all_logs(&self) -> Vec<spin::MutexGuard<'_, Option<LogState>>> {
        self.logs.iter().map(|l| l.lock()).collect()
    }

    /// The verified entry `r` names in a block that is in the chain of log `log_id` of
    /// `generation` (a block reclaimed from the chain keeps its header until reused, so
    /// the header alone does not say).
    fn log_entry(
        &self,
        log_id: u32,
        generation: u64,
        r: EntryRef,
        scratch: &mut Scratch,
    ) -> Option<FoundEntry> {
        let found = read_entry(&self.pm, &self.geo, r, &mut scratch.buf)?;
        if found.header.log_id != log_id || found.header.log_generation != generation {
            return None;
        }
        let mut b = self
            .pm
            .load_u32(self.geo.log_slot_off(log_id) + LogSlot::CHAIN_OFFSET);
        for _ in 0..self.geo.n_blocks {
            if b == NO_BLOCK || b as u64 >= self.geo.n_blocks {
                return None;
            }
            if b == found.block {
                return Some(found);
            }
            b = self.header(b).next;
        }
        None
    }

    /// Serves [`Request::AllocCell`]: the key of the entry `eref` (in log `log_id`) gets
    /// a cell holding its newest entry ref; the key's entries stay out of the index from
    /// then on. A key that has a cell gets that cell again.
    fn alloc_cell(
        &self,
        log_id: u32,
        generation: u64,
        eref: EntryRef,
        scratch: &mut Scratch,
    ) -> Result<Response, ErrorCode> {
        if self.is_shutting_down() {
            return Err(ErrorCode::ShuttingDown);
        }
        // With the log held: check the entry, pin its block (merging may make it dead, and
        // the cell may have to name it), merge to the tail.
        let (key, block, seq) = {
            let mut guard = self.slot(log_id)?.lock();
            match guard.as_ref() {
                Some(st) if st.generation == generation && !st.compaction => {}
                _ => return Err(ErrorCode::NoSuchLog),
            }
            let found = self
                .log_entry(log_id, generation, eref, scratch)
                .ok_or(ErrorCode::InvalidArgument)?;
            let key = scratch.buf[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + found.key_len].to_vec();
            self.blocks.inc_live(found.block);
            if let Err(e) = self.merge_locked(log_id, &mut guard, scratch) {
                self.blocks.dec_live(found.block);
                return Err(e);
            }
            (key, found.block, found.seq)
        };
        let mut guards = self.lock_all_logs();
        let named = NamedEntry {
            eref,
            key,
            seq,
            block,
        };
        let outcome = self.alloc_cell_held(&mut guards, log_id, generation, named, scratch);
        drop(guards);
        // The pin stays only if the new cell names `eref`.
        if !matches!(outcome, Ok((_, _, true))) {
            self.blocks.dec_live(block);
        }
        outcome.map(|(cell, r, _)| Response::CellAllocated { cell, eref: r.0 })
    }

    /// [`Dpm::alloc_cell`] with every log held. Returns the cell, what it holds, and
    /// whether that is `eref` (whose block stays pinned).
    fn alloc_cell_held(
        &self,
        guards: &mut [spin::MutexGuard<'_, Option<LogState>>],
        log_id: u32,
        generation: u64,
        named: NamedEntry,
        scratch: &mut Scratch,
    ) -> Result<(u32, EntryRef, bool), ErrorCode> {
        let NamedEntry {
            eref,
            key,
            seq,
            block,
        } = named;
        let guard = &mut guards[log_id as usize];
        match guard.as_ref() {
            Some(st) if st.generation == generation => {}
            _ => return Err(ErrorCode::NoSuchLog),
        }
        let merged = self.merge_locked(log_id, guard, scratch)?;
        if seq > merged {
            // Verifies, but is not part of the committed log.
            return Err(ErrorCode::InvalidArgument);
        }
        if let Some(cell) = self.cells.cell_of(&key) {
            return Ok((cell, self.load_cell(cell), false));
        }
        let cell = self.cells.first_free().ok_or(ErrorCode::NoFreeCell)?;
        let (value, names_eref) = match self.index.get(&self.pm, &key) {
            // Counted live by the index, which keeps it while the cell is active.
            Some(r) => (r, false),
            None => (eref, true),
        };
        self.store_cell(cell, value);
        let pins = if names_eref {
            BTreeMap::from([(block, 1)])
        } else {
            BTreeMap::new()
        };
        self.cells.insert(cell, key, pins);
        Ok((cell, value, names_eref))
    }

    /// Serves [`Request::FreeCell`]: installs the entry the cell names in the index (an
    /// update, or a removal for a delete), releases the key's pinned entries and frees the
    /// cell. Every replica must have stopped writing the key and merged its log first: an
    /// entry of the key merged later goes to the index as usual.
    fn free_cell(&self, cell: u32, scratch: &mut Scratch) -> Result<Response, ErrorCode> {
        let guards = self.lock_all_logs();
        let key = self.cells.key_of(cell).ok_or(ErrorCode::NoSuchCell)?;
        let r = self.load_cell(cell);
        let found = read_entry(&self.pm, &self.geo, r, &mut scratch.buf)
            .filter(|f| scratch.buf[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + f.key_len] == key[..])
            .ok_or(ErrorCode::Corrupt)?;
        let installed = match found.op {
            Op::Put => {
                let old = self.index.upsert(&self.pm, &key, r).map_err(index_code)?;
                self.blocks.add_ref(found.block, r.len());
                self.release(old);
                r
            }
            Op::Delete => {
                let old = self.index.remove(&self.pm, &key).map_err(index_code)?;
                self.release(old);
                EntryRef(0)
            }
        };
        // Installed first: a crash before the cell is zeroed leaves it active, and a
        // repeated FreeCell installs the same ref again.
        self.store_cell(cell, EntryRef(0));
        if let Some(c) = self.cells.remove(cell) {
            for (b, n) in c.pins {
                self.blocks.sub_live(b, n);
            }
        }
        drop(guards);
        Ok(Response::CellFreed { eref: installed.0 })
    }
}

fn index_code(e: IndexError) -> ErrorCode {
    match e {
        IndexError::Full => ErrorCode::IndexFull,
        IndexError::Corrupt(_) => ErrorCode::Corrupt,
    }
}

/// The entry an `AllocCell` names, checked.
struct NamedEntry {
    eref: EntryRef,
    key: Vec<u8>,
    seq: u64,
    block: u32,
}

/// An entry found through an entry ref; its bytes are in the caller's buffer.
struct FoundEntry {
    block: u32,
    header: BlockHeader,
    op: Op,
    seq: u64,
    key_len: usize,
}

/// Reads and verifies the entry `r` names: inside one log block, after its header,
/// aligned, CRC-valid with the block's salt, and exactly `r.len()` long.
fn read_entry<P: Persist>(
    pm: &Pmem<P>,
    geo: &Geometry,
    r: EntryRef,
    buf: &mut Vec<u8>,
) -> Option<FoundEntry> {
    let block = geo.block_of(r.offset())?;
    let within = r.offset() - geo.block_off(block);
    if within < BLOCK_HEADER_SIZE
        || within % ENTRY_ALIGN as u64 != 0
        || r.len() < ENTRY_HEADER_SIZE as u64
        || within + r.len() > geo.block_size
    {
        return None;
    }
    let header: BlockHeader = pm.read_pod(geo.block_off(block));
    if header.magic != BLOCK_MAGIC {
        return None;
    }
    buf.resize(r.len() as usize, 0);
    pm.read(r.offset(), buf);
    let e = entry::decode(buf, header.salt).ok()?;
    (e.len as u64 == r.len()).then_some(FoundEntry {
        block,
        header,
        op: e.op,
        seq: e.seq,
        key_len: e.key.len(),
    })
}

/// Rebuilds the active cells from the cells area: every non-zero cell names an entry of
/// its key, counted live (pinned) in its block.
fn recover_cells<P: Persist>(
    pm: &Pmem<P>,
    geo: &Geometry,
    used: &[bool],
    blocks: &Blocks,
) -> Result<Cells, OpenError> {
    let cells = Cells::new(u32::try_from(geo.indirect_cells()).unwrap_or(u32::MAX));
    let mut buf = Vec::new();
    for cell in 0..cells.count() {
        let v = pm.load_u64(geo.indirect_off(cell as u64));
        if v == 0 {
            continue;
        }
        let corrupt = |what| OpenError::CorruptCell { cell, what };
        let found =
            read_entry(pm, geo, EntryRef(v), &mut buf).ok_or(corrupt("it names no valid entry"))?;
        if !used[found.block as usize] {
            return Err(corrupt("its entry lies in a block of no log"));
        }
        let key = buf[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + found.key_len].to_vec();
        if cells.cell_of(&key).is_some() {
            return Err(corrupt("another cell replicates the same key"));
        }
        blocks.inc_live(found.block);
        cells.insert(cell, key, BTreeMap::from([(found.block, 1)]));
    }
    Ok(cells)
}

/// What to do when the cursor holds no committed entry.
enum Advance {
    Moved,
    Tail,
    Damaged(Stall),
}

/// Walks the chain of log `log_id` from its slot's head: every block must be in range,
/// belong to the log's generation and appear once (marked in `used`). `visit` sees each
/// block; returns the last one with its header.
fn walk_chain<P: Persist>(
    pm: &Pmem<P>,
    geo: &Geometry,
    log_id: u32,
    slot: &LogSlot,
    used: &mut [bool],
    mut visit: impl FnMut(u32, &BlockHeader) -> Result<(), OpenError>,
) -> Result<Option<(u32, BlockHeader)>, OpenError> {
    let corrupt = |what| OpenError::CorruptLog { log: log_id, what };
    let mut b = slot.head_block;
    let mut tail = None;
    while b != NO_BLOCK {
        if b as u64 >= geo.n_blocks {
            return Err(corrupt("block link out of range"));
        }
        if used[b as usize] {
            return Err(corrupt("block chain loops or is shared"));
        }
        used[b as usize] = true;
        let h: BlockHeader = pm.read_pod(geo.block_off(b));
        if h.magic != BLOCK_MAGIC || h.log_id != log_id || h.log_generation != slot.generation {
            return Err(corrupt("block header does not belong to the log"));
        }
        visit(b, &h)?;
        tail = Some((b, h));
        b = h.next;
    }
    Ok(tail)
}

/// Points the slot's tail hint at `tail` if it says otherwise (a crash between linking a
/// block and moving the hint).
fn fix_tail_hint<P: Persist>(pm: &Pmem<P>, geo: &Geometry, log_id: u32, slot: &LogSlot, tail: u32) {
    if slot.tail_block != tail {
        let off = geo.log_slot_off(log_id) + core::mem::offset_of!(LogSlot, tail_block) as u64;
        pm.store_u32(off, tail);
        pm.persist(off, 4);
    }
}

/// Validates one log's chain and progress; marks its blocks used. `None` for a free slot.
fn recover_log<P: Persist>(
    pm: &Pmem<P>,
    geo: &Geometry,
    log_id: u32,
    used: &mut [bool],
) -> Result<Option<LogState>, OpenError> {
    let corrupt = |what| OpenError::CorruptLog { log: log_id, what };
    let slot_off = geo.log_slot_off(log_id);
    let slot: LogSlot = pm.read_pod(slot_off);
    match slot.state {
        LOG_FREE => return Ok(None),
        LOG_ACTIVE | LOG_CLOSED => {}
        _ => return Err(corrupt("unknown log state")),
    }
    if slot.flags & LOG_FLAG_COMPACTION != 0 {
        return compact::recover_compaction_log(pm, geo, log_id, &slot, used).map(Some);
    }
    let prog: ProgressSlot = pm.read_pod(geo.progress_off(log_id));
    let (_, rec) = prog
        .current(slot.generation)
        .ok_or(corrupt("no valid progress record"))?;
    let mut cursor = None;
    let mut seen_progress_block = false;
    let tail = walk_chain(pm, geo, log_id, &slot, used, |b, h| {
        if b == rec.block {
            seen_progress_block = true;
            if rec.offset as u64 > geo.block_size || (rec.offset as u64) < BLOCK_HEADER_SIZE {
                return Err(corrupt("progress offset out of range"));
            }
            cursor = Some(Cursor {
                block: b,
                offset: rec.offset,
                salt: h.salt,
                next_seq: rec.merged_seq + 1,
            });
        }
        Ok(())
    })?
    .map_or(NO_BLOCK, |(b, _)| b);
    let cursor = match (cursor, slot.fence_seq()) {
        (Some(c), _) => Some(c),
        // A closed log merged to its fence point whose last block was reclaimed before the
        // blocks ahead of it (earlier versions did that): nothing of it is ever merged
        // again, so the cursor can stand past its fence at its tail.
        (None, Some(fence)) if slot.state == LOG_CLOSED && tail != NO_BLOCK => {
            let h: BlockHeader = pm.read_pod(geo.block_off(tail));
            Some(Cursor {
                block: tail,
                offset: BLOCK_HEADER_SIZE as u32,
                salt: h.salt,
                next_seq: fence + 1,
            })
        }
        (None, _) => None,
    };
    let Some(cursor) = cursor else {
        if slot.head_block == NO_BLOCK && slot.state == LOG_CLOSED {
            // A closed log whose every block was reclaimed; finish releasing the slot.
            pm.store_u32(slot_off, LOG_FREE);
            pm.persist(slot_off, 4);
            return Ok(None);
        }
        return Err(corrupt(if seen_progress_block {
            "progress lost"
        } else {
            "progress points outside the chain"
        }));
    };
    fix_tail_hint(pm, geo, log_id, &slot, tail);
    Ok(Some(LogState {
        status: slot.state,
        kn_id: slot.kn_id,
        shard: slot.shard,
        generation: slot.generation,
        cursor,
        persisted_block: cursor.block,
        persisted: cursor,
        stall: None,
        compaction: false,
        fence: slot.fence_seq(),
        // The clock restarts at 0 with the open; the quarantine starts over.
        quarantine_from: (slot.flags & LOG_FLAG_FENCED != 0).then_some(0),
    }))
}

#[cfg(all(test, feature = "std"))]
mod fence_tests {
    use std::sync::Arc;

    use dinomo_hw::shadow::ShadowRegion;
    use dinomo_shared::geometry::FormatParams;
    use dinomo_shared::msg::{Request, Response};
    use dinomo_shared::ErrorCode;

    use super::{Dpm, Scratch};
    use crate::testkit::LogWriter;

    #[test]
    fn fence_merges_and_closes_only_the_fenced_kns_logs() {
        const REGION: u64 = 4 << 20;
        let params = FormatParams {
            block_size: 4096,
            max_logs: 8,
            max_kns: 4,
            indirect_cells: 16,
            ..FormatParams::for_size(REGION)
        };
        let r = ShadowRegion::new(REGION);
        let dpm: Dpm<Arc<ShadowRegion>> = Dpm::format(r.pmem(), &params, 9).expect("format");
        let mut s = Scratch::default();
        // No merge workers run: everything written stays unmerged until the fence.
        let mut a0 = LogWriter::open(&dpm, 3, 0).expect("open");
        let mut a1 = LogWriter::open(&dpm, 3, 1).expect("open");
        let mut b = LogWriter::open(&dpm, 4, 0).expect("open");
        for i in 0..20u32 {
            a0.put(format!("a0-{i}").as_bytes(), b"v0");
            a1.put(format!("a1-{i}").as_bytes(), b"v1");
            b.put(format!("b-{i}").as_bytes(), b"vb");
        }
        for w in [&mut a0, &mut a1, &mut b] {
            w.flush(&dpm).expect("flush");
        }
        assert_eq!(dpm.get(b"a0-3"), None);
        let r = dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s);
        assert_eq!(
            r,
            Ok(Response::Fenced {
                logs: 2,
                entries: 40
            })
        );
        assert_eq!(dpm.get(b"a0-19").as_deref(), Some(&b"v0"[..]));
        assert_eq!(dpm.get(b"a1-0").as_deref(), Some(&b"v1"[..]));
        // The other KN's log is untouched (still active, not merged by the fence).
        assert_eq!(dpm.get(b"b-0"), None);
        let active: Vec<u32> = dpm
            .stats()
            .logs
            .iter()
            .filter(|l| l.state == dinomo_shared::control::LOG_ACTIVE)
            .map(|l| l.kn_id)
            .collect();
        assert_eq!(active, vec![4]);
        // The fenced writer cannot extend its log any more; fencing again is a no-op.
        assert_eq!(a0.next_block(&dpm), Err(ErrorCode::NoSuchLog));
        assert_eq!(
            dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s),
            Ok(Response::Fenced {
                logs: 0,
                entries: 0
            })
        );
    }
}
