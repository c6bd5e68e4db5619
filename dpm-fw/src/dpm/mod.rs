//! The memory node: log blocks, merging, recovery and control messages over one region.
//!
//! Merge workers replay each log's committed entries in order into the index. Each log is
//! merged by one worker at a time (its state sits behind a per-log lock that workers only
//! `try_lock`), so entries of one log are applied in log order; different logs proceed in
//! parallel and meet only at the index's bucket locks.
//!
//! Indirect cells (see [`crate::cells`]) change only while every log is held, so a merge
//! step sees a stable set of replicated keys.
//!
//! This module holds the [`Dpm`] itself, opening a region and the dispatch of control
//! messages; each concern lives in a submodule: `logs` (opening, extending and closing
//! logs), `merge`, `reclaim` (dead blocks and quarantine), `fence`, `cells` (indirect
//! cells), `compact`, `recovery` (what `open` rebuilds), `stats`, and `cluster_state`
//! (the cluster map and KN leases the manager keeps in the control area).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::block::BlockHeader;
use dinomo_shared::control::LOG_CLOSED;
use dinomo_shared::entry::{self, Op};
use dinomo_shared::geometry::{FormatParams, Geometry};
use dinomo_shared::index::EntryRef;
use dinomo_shared::msg::{Frame, Request, Response};
use dinomo_shared::ErrorCode;

use crate::blocks::Blocks;
use crate::cells::Cells;
use crate::index::{Index, IndexError};
use crate::region::{self, FormatError, OpenError};

mod cells;
mod cluster_state;
mod compact;
mod fence;
mod logs;
mod merge;
mod reclaim;
mod recovery;
mod room;
mod stats;

pub use compact::{CompactConfig, CompactStep, CompactTotals, LiveMismatch};
pub use logs::COMPACTION_RESERVE;
pub use merge::{Cursor, Stall, Step, DEFAULT_STEP};
pub use reclaim::DEFAULT_QUARANTINE_MS;
pub use room::{Room, MIN_PUT_ENTRY, OPEN_HEADROOM_LOGS};
pub use stats::{CellStats, DpmStats, LogStats};

use fence::FenceLog;
use recovery::{recover_cells, recover_log};

/// Reusable buffer for reading entries; one per worker thread.
#[derive(Debug, Default)]
pub struct Scratch {
    buf: Vec<u8>,
}

/// The volatile state of one open log, behind its per-log lock.
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

/// The memory node over one region.
pub struct Dpm<P: Persist> {
    pm: Pmem<P>,
    geo: Geometry,
    region_id: u64,
    index: Index,
    blocks: Blocks,
    cells: Cells,
    logs: Vec<spin::Mutex<Option<LogState>>>,
    /// Per log, where its merge cursor stands (block << 32 | offset), or `room::NO_MARK`;
    /// read by block grants, which cannot take other logs' locks.
    marks: Vec<AtomicU64>,
    /// Serializes block grants to KNs, so that two grants never both count the same room.
    grant_lock: spin::Mutex<()>,
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
    /// The cluster map being staged by `MapBegin`/`MapRanges`, if any.
    staged_map: spin::Mutex<Option<cluster_state::StagedMap>>,
}

impl<P: Persist> core::fmt::Debug for Dpm<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Dpm")
            .field("geometry", &self.geo)
            .field("region_id", &self.region_id)
            .finish()
    }
}

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
        // Log blocks holding reachable index buckets are the index's; none may also be in a
        // log chain (a block is given to the index only once unlinked from every chain).
        for b in index.blocks() {
            match used.get_mut(b as usize) {
                Some(u) if !*u => *u = true,
                _ => {
                    return Err(OpenError::Index(IndexError::Corrupt(
                        "a log block holds index buckets and is in a log chain",
                    )))
                }
            }
        }
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
            marks: (0..geo.max_logs)
                .map(|_| AtomicU64::new(room::NO_MARK))
                .collect(),
            grant_lock: spin::Mutex::new(()),
            logs,
            open_lock: spin::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            clock_ms: AtomicU64::new(0),
            quarantine_ms: AtomicU64::new(DEFAULT_QUARANTINE_MS),
            fences: spin::Mutex::new(FenceLog::default()),
            fence_count: AtomicU64::new(0),
            compaction: compact::Compaction::new(&geo, compaction_log, &sstate),
            staged_map: spin::Mutex::new(None),
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
            dpm.publish_mark(log_id, &guard);
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
        (e.key == key && e.op == Op::Put).then(|| e.user_value().to_vec())
    }

    fn header(&self, block: u32) -> BlockHeader {
        self.pm.read_pod(self.geo.block_off(block))
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
                self.make_room(true, scratch);
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
                self.make_room(false, scratch);
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
            // The manager's durable state: only the control area, so also served while
            // merging is paused and during shutdown.
            Request::ClusterInfo => Ok(self.cluster_info()),
            Request::ReadLease { kn } => self.read_lease(kn),
            Request::StoreLease {
                kn,
                lease_epoch,
                expires_ms,
                lease_ms,
            } => self.store_lease(kn, lease_epoch, expires_ms, lease_ms),
            Request::MapBegin { epoch } => self.map_begin(epoch),
            Request::MapRanges { epoch, ranges } => self.map_ranges(epoch, &ranges),
            Request::MapCommit { epoch, crc } => self.map_commit(epoch, crc),
        }
    }
}

/// The error a control reply carries for a log that stopped merging: `IndexFull` while the
/// index waits for room (retried on every pass), `Corrupt` for damage.
pub(super) fn stall_code(stall: Stall) -> ErrorCode {
    match stall {
        Stall::Index(e) => index_code(e),
        Stall::CorruptEntry { .. } | Stall::BadLink { .. } => ErrorCode::Corrupt,
    }
}

pub(super) fn index_code(e: IndexError) -> ErrorCode {
    match e {
        IndexError::Full => ErrorCode::IndexFull,
        IndexError::Corrupt(_) => ErrorCode::Corrupt,
    }
}
