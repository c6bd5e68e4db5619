//! Compaction of mostly-dead log blocks.
//!
//! A block is reclaimed only once it holds no live entry, so a key set with a cold tail
//! (or a skewed update stream) leaves blocks that are almost all dead but never free. A
//! compaction step picks one such block (a victim), copies each of its live entries into
//! the DPM's own compaction log and swaps the index ref with a compare-and-replace, so a
//! newer version merged meanwhile always wins; once no live entry is left the block is
//! reclaimed as usual.
//!
//! Victims lie strictly before their log's persisted merge block (as reclaim requires), so
//! recovery never replays them; they are not quarantined, not pinned by an indirect cell,
//! and their live bytes are at most [`CompactConfig::live_pct`] of a block's payload.
//!
//! Crash safety: the copy is persisted, in a block already linked into the compaction
//! log, before the index names it. A crash before the swap leaves the copy dead; after it
//! the old entry is dead. Recovery never replays the compaction log into the index (its
//! entries get there only by the compare), it only finds the tail to write on; live counts
//! are recounted from the index as for any block.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use alloc::vec::Vec;

use dinomo_hw::Persist;
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE};
use dinomo_shared::control::{LogSlot, COMPACTION_KN, LOG_CLOSED, LOG_FLAG_COMPACTION, NO_BLOCK};
use dinomo_shared::entry::{self, Op, ENTRY_HEADER_SIZE};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::index::EntryRef;
use dinomo_shared::msg::Response;
use dinomo_shared::superblock::{SuperState, STATE_OFFSET};
use dinomo_shared::ErrorCode;

use super::{index_code, Cursor, Dpm, LogState, Scratch};
use crate::region::OpenError;
use dinomo_hw::Pmem;

/// Steps [`Dpm::make_room`] tries before the writer gets `RegionFull`.
const MAKE_ROOM_TRIES: usize = 4096;

/// When and what to compact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactConfig {
    /// A block is a victim when its live bytes are at most this share (percent) of its
    /// payload.
    pub live_pct: u32,
    /// Merge workers compact while fewer blocks than this are free.
    pub low_watermark: u64,
}

impl CompactConfig {
    /// Victims at most 60% live; compaction starts when an eighth of the blocks (at least
    /// 4) are left free.
    pub fn default_for(geo: &Geometry) -> Self {
        Self {
            live_pct: 60,
            low_watermark: (geo.n_blocks / 8).max(4),
        }
    }
}

/// Compaction totals since the region was formatted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactTotals {
    pub entries_moved: u64,
    pub bytes_moved: u64,
    pub blocks_freed: u64,
    /// Moves that lost to a newer version merged meanwhile (the copy is dead).
    pub cas_failures: u64,
}

/// What one compaction step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStep {
    /// The block compacted, if any was found.
    pub victim: Option<u32>,
    pub entries_moved: u64,
    pub bytes_moved: u64,
    pub cas_failures: u64,
    /// The victim had no live entry left and was reclaimed.
    pub freed: bool,
    /// Another step (or the victim's merger) was running; nothing was done.
    pub busy: bool,
    /// No free block was left for the copies; the victim was compacted only in part.
    pub region_full: bool,
}

/// A block whose kept live figures differ from a recount: `(entries, bytes)` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveMismatch {
    pub block: u32,
    pub kept: (u32, u32),
    pub recounted: (u32, u32),
}

/// Compaction state of a [`Dpm`].
pub(super) struct Compaction {
    /// Held for a step; the buffer copies are encoded in.
    step: spin::Mutex<Vec<u8>>,
    /// The compaction log's id, or `NO_BLOCK` until it is opened.
    log: AtomicU32,
    live_pct: AtomicU32,
    low_watermark: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    blocks: AtomicU64,
    cas_failures: AtomicU64,
}

impl Compaction {
    pub(super) fn new(geo: &Geometry, log: Option<u32>, state: &SuperState) -> Self {
        let cfg = CompactConfig::default_for(geo);
        Self {
            step: spin::Mutex::new(Vec::new()),
            log: AtomicU32::new(log.unwrap_or(NO_BLOCK)),
            live_pct: AtomicU32::new(cfg.live_pct),
            low_watermark: AtomicU64::new(cfg.low_watermark),
            entries: AtomicU64::new(state.compact_entries),
            bytes: AtomicU64::new(state.compact_bytes),
            blocks: AtomicU64::new(state.compact_blocks),
            cas_failures: AtomicU64::new(state.compact_cas_failures),
        }
    }

    pub(super) fn totals(&self) -> CompactTotals {
        CompactTotals {
            entries_moved: self.entries.load(Ordering::Relaxed),
            bytes_moved: self.bytes.load(Ordering::Relaxed),
            blocks_freed: self.blocks.load(Ordering::Relaxed),
            cas_failures: self.cas_failures.load(Ordering::Relaxed),
        }
    }
}

impl<P: Persist> Dpm<P> {
    /// The compaction settings in force.
    pub fn compaction_config(&self) -> CompactConfig {
        CompactConfig {
            live_pct: self.compaction.live_pct.load(Ordering::Relaxed),
            low_watermark: self.compaction.low_watermark.load(Ordering::Relaxed),
        }
    }

    /// Changes the compaction settings (`live_pct` is capped at 100).
    pub fn set_compaction_config(&self, cfg: CompactConfig) {
        let c = &self.compaction;
        c.live_pct.store(cfg.live_pct.min(100), Ordering::Relaxed);
        c.low_watermark.store(cfg.low_watermark, Ordering::Relaxed);
    }

    /// Compaction totals since format.
    pub fn compaction_totals(&self) -> CompactTotals {
        self.compaction.totals()
    }

    /// The compaction log, once the first step opened it.
    pub fn compaction_log(&self) -> Option<u32> {
        let l = self.compaction.log.load(Ordering::Relaxed);
        (l != NO_BLOCK).then_some(l)
    }

    /// Blocks on the free list now.
    pub fn blocks_free(&self) -> u64 {
        self.blocks.free_count()
    }

    /// Whether free blocks are below the low watermark.
    pub fn compaction_due(&self) -> bool {
        self.blocks.free_count() < self.compaction.low_watermark.load(Ordering::Relaxed)
    }

    /// Compacts at most one victim block: moves its live entries to the compaction log and
    /// reclaims it once none is left. Without `force` it does nothing unless
    /// [`Dpm::compaction_due`]. Holds the victim's log for the step (one block's entries),
    /// never waits for a log held by someone else, and merges of other logs go on.
    pub fn compact_step(
        &self,
        force: bool,
        scratch: &mut Scratch,
    ) -> Result<CompactStep, ErrorCode> {
        let Some(mut buf) = self.compaction.step.try_lock() else {
            return Ok(CompactStep {
                busy: true,
                ..CompactStep::default()
            });
        };
        if !force && !self.compaction_due() {
            return Ok(CompactStep::default());
        }
        let Some((vlog, victim)) = self.pick_victim() else {
            return Ok(CompactStep::default());
        };
        let clog = self.ensure_compaction_log()?;
        // Never waits for a log: the caller may hold one (see `make_room`), and a holder of
        // every log may be waiting for it.
        let Some(mut cguard) = self.logs[clog as usize].try_lock() else {
            return Ok(CompactStep {
                busy: true,
                ..CompactStep::default()
            });
        };
        let mut vguard = if vlog == clog {
            None
        } else {
            match self.logs[vlog as usize].try_lock() {
                Some(g) => Some(g),
                None => {
                    return Ok(CompactStep {
                        busy: true,
                        ..CompactStep::default()
                    })
                }
            }
        };
        let still = {
            let vst = match &vguard {
                Some(g) => g.as_ref(),
                None => cguard.as_ref(),
            };
            vst.is_some_and(|st| self.is_victim(vlog, st, victim))
        };
        if !still {
            return Ok(CompactStep::default());
        }
        let cst = cguard.as_mut().ok_or(ErrorCode::Corrupt)?;
        let mut step = CompactStep {
            victim: Some(victim),
            ..CompactStep::default()
        };
        let moved = self.move_live(clog, cst, victim, &mut buf, scratch, &mut step);
        step.freed = self.blocks.live(victim) == 0;
        if let Some(g) = vguard.as_mut() {
            self.reclaim_log(vlog, g);
        }
        self.reclaim_log(clog, &mut cguard);
        drop(vguard);
        drop(cguard);
        self.count_step(&step);
        moved.map(|()| step)
    }

    /// Back-pressure for a writer asking for a block while the free list is at the
    /// compaction reserve, or while the room rule (see `room`) refuses a grant: merges
    /// every log once (which releases the index room kept for unmerged log space), then
    /// reclaims and compacts (in the caller's thread) until a grant would succeed, there is
    /// nothing left to compact, or a bounded number of tries passed. `opening`: the grant
    /// asked for is a new log's first block.
    pub(super) fn make_room(&self, opening: bool, scratch: &mut Scratch) {
        let fits =
            || self.blocks.free_count() > super::COMPACTION_RESERVE && self.may_grant(opening);
        let mut merged = false;
        for _ in 0..MAKE_ROOM_TRIES {
            if fits() {
                return;
            }
            if !merged {
                merged = true;
                for log_id in 0..self.geo.max_logs {
                    // A log that cannot merge keeps its room; the grant decides.
                    let _ = self.merge_all(log_id, scratch);
                }
            }
            self.reclaim_all();
            if fits() {
                return;
            }
            match self.compact_step(true, scratch) {
                Ok(s) if s.busy => core::hint::spin_loop(),
                Ok(s) if s.victim.is_some() => {}
                _ => return,
            }
        }
    }

    /// The block with the fewest live bytes under the threshold among all logs' blocks
    /// before their persisted merge block. Reads only volatile counts and block headers.
    fn pick_victim(&self) -> Option<(u32, u32)> {
        let payload = self.geo.block_size - BLOCK_HEADER_SIZE;
        let limit = payload * self.compaction.live_pct.load(Ordering::Relaxed) as u64 / 100;
        let mut best: Option<(u32, u32, u32)> = None;
        for (log_id, slot) in self.logs.iter().enumerate() {
            let log_id = log_id as u32;
            let Some(mut g) = slot.try_lock() else {
                continue;
            };
            // Free what is already dead first: no move needed there.
            self.reclaim_log(log_id, &mut g);
            let Some(st) = g.as_ref() else { continue };
            if st.status == LOG_CLOSED && self.in_quarantine(st) {
                continue;
            }
            self.before_merge_block(log_id, st, |b| {
                let bytes = self.blocks.live_bytes(b);
                if self.blocks.live(b) == 0 || bytes as u64 > limit || self.pinned(b) {
                    return;
                }
                if !matches!(best, Some((_, _, least)) if least <= bytes) {
                    best = Some((log_id, b, bytes));
                }
            });
        }
        best.map(|(l, b, _)| (l, b))
    }

    /// Calls `f` for each block of `log_id` that recovery never replays: those before its
    /// persisted merge block, and for a closed log merged to its tail (fenced there) the
    /// last block too, the same blocks [`Dpm::reclaim_log`] may free.
    fn before_merge_block(&self, log_id: u32, st: &LogState, mut f: impl FnMut(u32)) {
        let closed_done = st.status == LOG_CLOSED
            && st.stall.is_none()
            && st.fence.is_some()
            && st.cursor == st.persisted;
        let mut b = self
            .pm
            .load_u32(self.geo.log_slot_off(log_id) + LogSlot::CHAIN_OFFSET);
        for _ in 0..self.geo.n_blocks {
            if b == NO_BLOCK || b as u64 >= self.geo.n_blocks {
                return;
            }
            let next = self.header(b).next;
            if b == st.persisted_block {
                if closed_done && next == NO_BLOCK {
                    f(b);
                }
                return;
            }
            f(b);
            b = next;
        }
    }

    fn pinned(&self, block: u32) -> bool {
        self.cells.any_active() && self.cells.pins_block(block)
    }

    /// Checked again with the log held: the victim still qualifies.
    fn is_victim(&self, log_id: u32, st: &LogState, victim: u32) -> bool {
        if st.status == LOG_CLOSED && self.in_quarantine(st) || self.pinned(victim) {
            return false;
        }
        let mut found = false;
        self.before_merge_block(log_id, st, |b| found |= b == victim);
        found
    }

    /// Opens the compaction log on first use.
    fn ensure_compaction_log(&self) -> Result<u32, ErrorCode> {
        if let Some(l) = self.compaction_log() {
            return Ok(l);
        }
        match self.open_log_flagged(COMPACTION_KN, 0, 0, LOG_FLAG_COMPACTION)? {
            Response::LogOpened { log_id, .. } => {
                self.compaction.log.store(log_id, Ordering::Relaxed);
                Ok(log_id)
            }
            _ => Err(ErrorCode::Corrupt),
        }
    }

    /// Moves the live entries of `victim` into the compaction log (`cst`).
    fn move_live(
        &self,
        clog: u32,
        cst: &mut LogState,
        victim: u32,
        buf: &mut Vec<u8>,
        scratch: &mut Scratch,
        step: &mut CompactStep,
    ) -> Result<(), ErrorCode> {
        let hdr = self.header(victim);
        let base = self.geo.block_off(victim);
        let end = match hdr.sealed_len as u64 {
            0 => self.geo.block_size,
            n => n.min(self.geo.block_size),
        };
        let mut at = BLOCK_HEADER_SIZE;
        while at + ENTRY_HEADER_SIZE as u64 <= end {
            let mut head = [0u8; ENTRY_HEADER_SIZE];
            self.pm.read(base + at, &mut head);
            let Some(len) = entry::peek_len(&head).filter(|&l| at + l as u64 <= end) else {
                break;
            };
            scratch.buf.resize(len, 0);
            self.pm.read(base + at, &mut scratch.buf);
            let Ok(e) = entry::decode(&scratch.buf, hdr.salt) else {
                break;
            };
            let here = at;
            at += len as u64;
            let Some(old) = EntryRef::new(base + here, len as u64) else {
                continue;
            };
            // Live iff the index holds exactly this ref; a replicated key's entries belong
            // to its cell.
            if e.op != Op::Put
                || self.index.get(&self.pm, e.key) != Some(old)
                || (self.cells.any_active() && self.cells.cell_of(e.key).is_some())
            {
                continue;
            }
            if cst.cursor.offset as u64 + len as u64 > self.geo.block_size {
                match self.next_compaction_block(clog, cst) {
                    Ok(()) => {}
                    Err(ErrorCode::RegionFull) => {
                        step.region_full = true;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            buf.clear();
            buf.resize(len, 0);
            // The flags go with the value: an expiring key keeps its expiry time.
            entry::encode_flagged(
                buf,
                cst.cursor.salt,
                Op::Put,
                e.flags,
                e.epoch,
                e.seq,
                e.key,
                e.value,
            )
            .map_err(|_| ErrorCode::Corrupt)?;
            let dest = cst.cursor.block;
            let off = self.geo.block_off(dest) + cst.cursor.offset as u64;
            self.pm.write(off, buf);
            self.pm.persist(off, len as u64);
            cst.cursor.offset += len as u32;
            cst.persisted = cst.cursor;
            let new = EntryRef::new(off, len as u64).ok_or(ErrorCode::Corrupt)?;
            // Counted before the index can name it, so a merge that replaces it at once
            // never releases a count that is not there.
            self.blocks.add_ref(dest, len as u64);
            match self.index.replace_if(&self.pm, e.key, old, new) {
                Ok(true) => {
                    self.blocks.release_ref(victim, len as u64);
                    step.entries_moved += 1;
                    step.bytes_moved += len as u64;
                }
                Ok(false) => {
                    self.blocks.release_ref(dest, len as u64);
                    step.cas_failures += 1;
                }
                Err(err) => {
                    self.blocks.release_ref(dest, len as u64);
                    return Err(index_code(err));
                }
            }
        }
        Ok(())
    }

    /// Links a new block after the compaction log's tail, then seals the old tail.
    fn next_compaction_block(&self, clog: u32, cst: &mut LogState) -> Result<(), ErrorCode> {
        let (block, salt) = self.take_block(clog, cst.generation, cst.cursor.next_seq, 0, false)?;
        let old = cst.cursor.block;
        let link = self.geo.block_off(old) + BlockHeader::NEXT_OFFSET;
        self.pm.store_u32(link, block);
        self.pm.persist(link, 4);
        let tail = self.geo.log_slot_off(clog) + core::mem::offset_of!(LogSlot, tail_block) as u64;
        self.pm.store_u32(tail, block);
        self.pm.persist(tail, 4);
        let seal = self.geo.block_off(old) + BlockHeader::SEALED_LEN_OFFSET;
        self.pm.store_u32(seal, cst.cursor.offset);
        self.pm.persist(seal, 4);
        cst.cursor = Cursor {
            block,
            offset: BLOCK_HEADER_SIZE as u32,
            salt,
            next_seq: cst.cursor.next_seq,
        };
        cst.persisted = cst.cursor;
        cst.persisted_block = block;
        Ok(())
    }

    /// The first block whose live count or live bytes differ from a recount from the index
    /// and the cells' pins. Only meaningful while nothing merges or compacts (a check for
    /// tests and tools).
    pub fn live_count_mismatch(&self) -> Option<LiveMismatch> {
        let n = self.geo.n_blocks as usize;
        let mut counts = alloc::vec![(0u32, 0u32); n];
        self.index.for_each(&self.pm, |_, r| {
            if let Some(b) = self.geo.block_of(r.offset()) {
                counts[b as usize].0 += 1;
                counts[b as usize].1 += r.len() as u32;
            }
        });
        self.cells.for_each_pin(|b, k| {
            if let Some(c) = counts.get_mut(b as usize) {
                c.0 += k;
            }
        });
        (0..n as u32).find_map(|b| {
            let kept = (self.blocks.live(b), self.blocks.live_bytes(b));
            (kept != counts[b as usize]).then_some(LiveMismatch {
                block: b,
                kept,
                recounted: counts[b as usize],
            })
        })
    }

    /// Adds a step to the totals and persists them.
    fn count_step(&self, step: &CompactStep) {
        if step.entries_moved == 0 && step.cas_failures == 0 && !step.freed {
            return;
        }
        let c = &self.compaction;
        c.entries.fetch_add(step.entries_moved, Ordering::Relaxed);
        c.bytes.fetch_add(step.bytes_moved, Ordering::Relaxed);
        c.blocks.fetch_add(step.freed as u64, Ordering::Relaxed);
        c.cas_failures
            .fetch_add(step.cas_failures, Ordering::Relaxed);
        let t = c.totals();
        let off = STATE_OFFSET + core::mem::offset_of!(SuperState, compact_entries) as u64;
        for (i, v) in [
            t.entries_moved,
            t.bytes_moved,
            t.blocks_freed,
            t.cas_failures,
        ]
        .into_iter()
        .enumerate()
        {
            self.pm.store_u64(off + 8 * i as u64, v);
        }
        self.pm.persist(off, 32);
    }
}

/// Recovers the compaction log: validates its chain (marking its blocks used) and finds
/// where writing goes on, after the last entry that verifies in the tail block. Nothing in
/// it is replayed.
pub(super) fn recover_compaction_log<P: Persist>(
    pm: &Pmem<P>,
    geo: &Geometry,
    log_id: u32,
    slot: &LogSlot,
    used: &mut [bool],
) -> Result<LogState, OpenError> {
    let corrupt = |what| OpenError::CorruptLog { log: log_id, what };
    let tail = super::recovery::walk_chain(pm, geo, log_id, slot, used, |_, _| Ok(()))?;
    let (tail, h) = tail.ok_or(corrupt("compaction log has no block"))?;
    let base = geo.block_off(tail);
    let mut at = BLOCK_HEADER_SIZE;
    let mut buf = Vec::new();
    while at + ENTRY_HEADER_SIZE as u64 <= geo.block_size {
        let mut head = [0u8; ENTRY_HEADER_SIZE];
        pm.read(base + at, &mut head);
        let Some(len) = entry::peek_len(&head).filter(|&l| at + l as u64 <= geo.block_size) else {
            break;
        };
        buf.resize(len, 0);
        pm.read(base + at, &mut buf);
        if entry::decode(&buf, h.salt).is_err() {
            break;
        }
        at += len as u64;
    }
    super::recovery::fix_tail_hint(pm, geo, log_id, slot, tail);
    let cursor = Cursor {
        block: tail,
        offset: at as u32,
        salt: h.salt,
        next_seq: 1,
    };
    Ok(LogState {
        status: slot.state,
        kn_id: slot.kn_id,
        shard: slot.shard,
        generation: slot.generation,
        cursor,
        persisted_block: tail,
        persisted: cursor,
        stall: None,
        fence: None,
        quarantine_from: None,
        compaction: true,
    })
}
