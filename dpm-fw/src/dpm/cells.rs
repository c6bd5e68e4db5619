//! Indirect cells: a replicated key's only authority while several KNs write it.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE, BLOCK_MAGIC};
use dinomo_shared::control::{LogSlot, NO_BLOCK};
use dinomo_shared::entry::{self, Op, ENTRY_ALIGN, ENTRY_HEADER_SIZE};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::index::EntryRef;
use dinomo_shared::msg::Response;
use dinomo_shared::ErrorCode;

use super::{index_code, Dpm, LogState, Scratch};

impl<P: Persist> Dpm<P> {
    /// The entry ref an active cell holds; `None` if the cell is not active.
    pub fn cell_ref(&self, cell: u32) -> Option<EntryRef> {
        self.cells.is_active(cell).then(|| self.load_cell(cell))
    }

    pub(super) fn load_cell(&self, cell: u32) -> EntryRef {
        EntryRef(self.pm.load_u64(self.geo.indirect_off(cell as u64)))
    }

    fn store_cell(&self, cell: u32, r: EntryRef) {
        let off = self.geo.indirect_off(cell as u64);
        self.pm.store_u64(off, r.0);
        self.pm.persist(off, 8);
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

    /// Serves [`Request::AllocCell`](dinomo_shared::msg::Request::AllocCell): the key of the entry
    /// `eref` (in log `log_id`) gets a cell holding its newest entry ref; the key's entries stay
    /// out of the index from then on. A key that has a cell gets that cell again.
    pub(super) fn alloc_cell(
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

    /// Serves [`Request::FreeCell`](dinomo_shared::msg::Request::FreeCell): installs the entry the
    /// cell names in the index (an update, or a removal for a delete), releases the key's pinned
    /// entries and frees the cell. Every replica must have stopped writing the key and merged its
    /// log first: an entry of the key merged later goes to the index as usual.
    pub(super) fn free_cell(
        &self,
        cell: u32,
        scratch: &mut Scratch,
    ) -> Result<Response, ErrorCode> {
        let guards = self.lock_all_logs();
        let key = self.cells.key_of(cell).ok_or(ErrorCode::NoSuchCell)?;
        let r = self.load_cell(cell);
        let found = read_entry(&self.pm, &self.geo, r, &mut scratch.buf)
            .filter(|f| scratch.buf[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + f.key_len] == key[..])
            .ok_or(ErrorCode::Corrupt)?;
        let installed = match found.op {
            Op::Put => {
                let old = self.index_upsert(&key, r).map_err(index_code)?;
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

/// The entry an `AllocCell` names, checked.
struct NamedEntry {
    eref: EntryRef,
    key: Vec<u8>,
    seq: u64,
    block: u32,
}

/// An entry found through an entry ref; its bytes are in the caller's buffer.
pub(super) struct FoundEntry {
    pub(super) block: u32,
    header: BlockHeader,
    op: Op,
    seq: u64,
    pub(super) key_len: usize,
}

/// Reads and verifies the entry `r` names: inside one log block, after its header,
/// aligned, CRC-valid with the block's salt, and exactly `r.len()` long.
pub(super) fn read_entry<P: Persist>(
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
