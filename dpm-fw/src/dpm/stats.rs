//! Figures of the region, its logs and its cells, for tools and tests.

use alloc::vec::Vec;

use dinomo_hw::Persist;
use dinomo_shared::control::{LogSlot, LOG_CLOSED, NO_BLOCK};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::index::EntryRef;
use dinomo_shared::superblock::FLAG_CLEAN_SHUTDOWN;

use super::{CompactTotals, Cursor, Dpm, Scratch, Stall};
use crate::index::IndexStats;
use crate::region;

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

impl<P: Persist> Dpm<P> {
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
}
