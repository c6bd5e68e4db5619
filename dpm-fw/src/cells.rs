//! Volatile bookkeeping of indirect cells: which key each active cell replicates, and the
//! entries of that key the merger kept out of the index ("pins").
//!
//! While a cell is active the cell, not the index, is the key's authority: KNs swap entry
//! refs into it with CAS, and the merger leaves the key's entries out of the index but
//! counts each as live in its block, so no entry the cell may name is ever reclaimed. The
//! persistent state is the cells area alone (a non-zero cell is active; the entry it names
//! holds the key); everything here is rebuilt from it at open.
//!
//! Membership changes only while the caller holds every log, and a merger holds its log,
//! so a merge step sees a stable set. The merger asks only when a cell is active and the
//! key's hash hits the counting filter, so the merge path takes no lock otherwise.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use dinomo_shared::hash::key_hash;

/// Counters of the filter over active keys' hashes.
const FILTER: usize = 4096;

/// One active cell.
#[derive(Debug)]
pub(crate) struct Cell {
    pub(crate) key: Vec<u8>,
    /// Entries of the key merged while the cell is active (or its entry at open), counted
    /// as live in their blocks: block → entries.
    pub(crate) pins: BTreeMap<u32, u32>,
}

impl Cell {
    pub(crate) fn pinned(&self) -> u64 {
        self.pins.values().map(|&n| n as u64).sum()
    }
}

#[derive(Debug, Default)]
struct Table {
    by_key: BTreeMap<Vec<u8>, u32>,
    cells: BTreeMap<u32, Cell>,
}

/// The active cells of a region.
#[derive(Debug)]
pub(crate) struct Cells {
    count: u32,
    active: AtomicU32,
    filter: Vec<AtomicU16>,
    table: spin::Mutex<Table>,
}

fn slot_of(key: &[u8]) -> usize {
    // High bits: the index uses the low ones for buckets.
    (key_hash(key) >> 40) as usize % FILTER
}

impl Cells {
    /// `count` cells, none active.
    pub(crate) fn new(count: u32) -> Self {
        Self {
            count,
            active: AtomicU32::new(0),
            filter: (0..FILTER).map(|_| AtomicU16::new(0)).collect(),
            table: spin::Mutex::new(Table::default()),
        }
    }

    /// Cells in the region.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Active cells.
    pub(crate) fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed) as u64
    }

    /// Whether any cell is active (the merger's only check otherwise).
    pub(crate) fn any_active(&self) -> bool {
        self.active.load(Ordering::Relaxed) != 0
    }

    /// If `key` has an active cell, counts one entry of it in `block` as pinned and
    /// returns true.
    pub(crate) fn pin_if_active(&self, key: &[u8], block: u32) -> bool {
        if self.filter[slot_of(key)].load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut t = self.table.lock();
        let Some(&cell) = t.by_key.get(key) else {
            return false;
        };
        match t.cells.get_mut(&cell) {
            Some(c) => {
                *c.pins.entry(block).or_insert(0) += 1;
                true
            }
            None => false,
        }
    }

    /// The active cell of `key`.
    /// Calls `f(block, entries)` for every pin of every active cell.
    pub(crate) fn for_each_pin(&self, mut f: impl FnMut(u32, u32)) {
        for c in self.table.lock().cells.values() {
            for (&b, &n) in &c.pins {
                f(b, n);
            }
        }
    }

    /// Whether any active cell pins an entry in `block`.
    pub(crate) fn pins_block(&self, block: u32) -> bool {
        self.table
            .lock()
            .cells
            .values()
            .any(|c| c.pins.contains_key(&block))
    }

    pub(crate) fn cell_of(&self, key: &[u8]) -> Option<u32> {
        self.table.lock().by_key.get(key).copied()
    }

    /// The key of an active cell.
    pub(crate) fn key_of(&self, cell: u32) -> Option<Vec<u8>> {
        self.table.lock().cells.get(&cell).map(|c| c.key.clone())
    }

    pub(crate) fn is_active(&self, cell: u32) -> bool {
        self.table.lock().cells.contains_key(&cell)
    }

    /// The lowest inactive cell.
    pub(crate) fn first_free(&self) -> Option<u32> {
        let t = self.table.lock();
        let mut want = 0u32;
        for &c in t.cells.keys() {
            if c != want {
                break;
            }
            want += 1;
        }
        (want < self.count).then_some(want)
    }

    /// Activates `cell` for `key`. The caller holds every log.
    pub(crate) fn insert(&self, cell: u32, key: Vec<u8>, pins: BTreeMap<u32, u32>) {
        let mut t = self.table.lock();
        self.filter[slot_of(&key)].fetch_add(1, Ordering::Relaxed);
        t.by_key.insert(key.clone(), cell);
        t.cells.insert(cell, Cell { key, pins });
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Deactivates `cell` and returns what it held. The caller holds every log.
    pub(crate) fn remove(&self, cell: u32) -> Option<Cell> {
        let mut t = self.table.lock();
        let c = t.cells.remove(&cell)?;
        t.by_key.remove(&c.key);
        self.filter[slot_of(&c.key)].fetch_sub(1, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
        Some(c)
    }

    /// `(cell, key, pinned entries)` of every active cell, by cell.
    pub(crate) fn list(&self) -> Vec<(u32, Vec<u8>, u64)> {
        self.table
            .lock()
            .cells
            .iter()
            .map(|(&id, c)| (id, c.key.clone(), c.pinned()))
            .collect()
    }
}
