//! What `Dpm::open` rebuilds from the region: each log's chain and merge position, and
//! the active indirect cells.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE, BLOCK_MAGIC};
use dinomo_shared::control::{
    LogSlot, ProgressSlot, LOG_ACTIVE, LOG_CLOSED, LOG_FLAG_COMPACTION, LOG_FLAG_FENCED, LOG_FREE,
    NO_BLOCK,
};
use dinomo_shared::entry::ENTRY_HEADER_SIZE;
use dinomo_shared::geometry::Geometry;
use dinomo_shared::index::EntryRef;

use super::cells::read_entry;
use super::{compact, Cursor, LogState};
use crate::blocks::Blocks;
use crate::cells::Cells;
use crate::region::OpenError;

/// Validates one log's chain and progress; marks its blocks used. `None` for a free slot.
pub(super) fn recover_log<P: Persist>(
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

/// Walks the chain of log `log_id` from its slot's head: every block must be in range,
/// belong to the log's generation and appear once (marked in `used`). `visit` sees each
/// block; returns the last one with its header.
pub(super) fn walk_chain<P: Persist>(
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
pub(super) fn fix_tail_hint<P: Persist>(
    pm: &Pmem<P>,
    geo: &Geometry,
    log_id: u32,
    slot: &LogSlot,
    tail: u32,
) {
    if slot.tail_block != tail {
        let off = geo.log_slot_off(log_id) + core::mem::offset_of!(LogSlot, tail_block) as u64;
        pm.store_u32(off, tail);
        pm.persist(off, 4);
    }
}

/// Rebuilds the active cells from the cells area: every non-zero cell names an entry of
/// its key, counted live (pinned) in its block.
pub(super) fn recover_cells<P: Persist>(
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
