//! The persistent hash index (P-CLHT style) in the index area of the region.
//!
//! Layout (see `dinomo_shared::index`): a root word names the current bucket array (base,
//! log2 size, generation); each 64-byte bucket holds a meta word (lock byte, flags, table
//! generation), three `(key hash, entry ref)` slots and the offset of an overflow bucket.
//! Keys are not stored: the entry a slot points to holds the key, so equal hashes are
//! resolved by reading it.
//!
//! Durability without a log: every change becomes visible through one 8-byte store that is
//! persisted after everything it depends on.
//! - insert into an empty slot: ref, persist, hash (the commit), persist;
//! - update: the new ref, persist; delete: hash 0, persist;
//! - new overflow bucket: the whole bucket, persist, then `next` of its predecessor, persist;
//!   when the index area has no free unit left, the bucket goes into a log block the
//!   memory node took from its free list for the index (see [`Index::add_block`]): the
//!   link that commits the bucket is also what makes the block the index's, because
//!   recovery hands a log block to the index exactly when the reachable index names a
//!   bucket in it;
//! - resize (copy-on-write): the new table, persist; `BUCKET_MOVED` in every old bucket,
//!   persist; the new root word (generation + 1), persist.
//!
//! A crash at any persist point therefore leaves every operation either done or not done;
//! [`Index::open`] only has to clear volatile bits and rebuild the volatile state (which
//! includes the set of log blocks holding reachable overflow buckets: a block taken for the
//! index but not linked yet is free again, one that holds a linked bucket stays the
//! index's).
//!
//! Concurrency: writers (merge workers) lock the head bucket of a chain (a CAS on the lock
//! byte); readers never lock. A resize excludes writers with a gate; readers that hold the
//! old root see `BUCKET_MOVED`, or another generation once the memory is reused, and
//! re-read the root.

mod area;
#[cfg(test)]
mod tests;

pub use dinomo_shared::index::{scan_bucket, Candidates, Scan};

use alloc::collections::btree_map::{BTreeMap, Entry};
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::entry::{EntryHeader, ENTRY_HEADER_SIZE};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::hash::{key_hash, EMPTY_HASH};
use dinomo_shared::index::{
    Bucket, EntryRef, RootWord, Slot, BUCKET_LOCK_MASK, BUCKET_MOVED, BUCKET_SIZE, GEN_MASK,
    SLOTS_PER_BUCKET,
};

use area::AreaAlloc;

/// Generation of the first table (0 is never used, so a zeroed bucket never belongs).
const FIRST_GENERATION: u32 = 1;
/// Lookups give up after this many restarts (only a damaged region gets near it).
const MAX_RESTARTS: u32 = 1 << 16;

/// Why an index operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexError {
    /// No room left for another overflow bucket: the index area and every log block given
    /// to the index are full (the memory node then gives it another free block and retries).
    Full,
    /// The index structures in the region are damaged; the string says what was found.
    Corrupt(&'static str),
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => f.write_str("the index area is full"),
            Self::Corrupt(what) => write!(f, "the index is corrupt: {what}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for IndexError {}

/// A snapshot of the index's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IndexStats {
    /// Generation of the current table (incremented by every resize).
    pub generation: u32,
    /// Head buckets of the current table.
    pub buckets: u64,
    /// Overflow buckets chained to them.
    pub overflow_buckets: u64,
    /// Live keys.
    pub items: u64,
    /// `items` over the slots of the head buckets; a resize is due above 0.75.
    pub load_factor: f64,
    /// Bytes of the index area.
    pub area_bytes: u64,
    /// Bytes of the index area in use (current table and overflow buckets).
    pub used_bytes: u64,
    /// Log blocks the index took from the block pool for overflow buckets.
    pub blocks: u64,
    /// Free 64-byte units in those blocks.
    pub block_free_units: u64,
}

/// The index's volatile state; the index itself lives in the region.
pub struct Index {
    root_off: u64,
    area_off: u64,
    /// 64-byte units in the index area.
    units: u64,
    /// The log area, where blocks given to the index hold overflow buckets.
    log: LogArea,
    /// Longest chain a walk follows before it calls the chain a loop: every unit of the
    /// index area and of the log area.
    max_hops: u64,
    area: spin::Mutex<Space>,
    /// Writers hold it shared, a resize exclusively.
    gate: spin::RwLock<()>,
    items: AtomicU64,
    overflow: AtomicU64,
    /// Generation of a table that could not be doubled for lack of contiguous room; it
    /// keeps chaining instead (nothing is freed while a table lives). 0: none.
    no_grow_gen: AtomicU32,
    /// Units of the index area a resize must leave free: overflow buckets the memory node
    /// promised to merges already granted (see `Index::set_area_reserve`).
    area_reserve: AtomicU64,
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("area_off", &self.area_off)
            .field("units", &self.units)
            .field("items", &self.items.load(Ordering::Relaxed))
            .field("overflow", &self.overflow.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Where the log area is, and how a log block splits into 64-byte units.
#[derive(Clone, Copy, Debug)]
struct LogArea {
    off: u64,
    block_size: u64,
    n_blocks: u64,
}

impl LogArea {
    fn units_per_block(&self) -> u64 {
        self.block_size / BUCKET_SIZE
    }

    /// The block and unit of a bucket offset in the log area.
    fn place(&self, off: u64) -> Option<(u32, u64)> {
        let rel = off.checked_sub(self.off)?;
        let block = rel / self.block_size;
        (block < self.n_blocks).then_some((block as u32, (rel % self.block_size) / BUCKET_SIZE))
    }
}

/// Where a bucket lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Unit of the index area.
    Area(u64),
    /// Log block given to the index, and unit within it.
    Block(u32, u64),
}

/// The index's space: the index area, and the log blocks it was given (volatile: rebuilt
/// from what the root reaches at open).
struct Space {
    area: AreaAlloc,
    blocks: BTreeMap<u32, AreaAlloc>,
    /// Free units over `blocks`.
    block_free: u64,
}

impl Space {
    fn new(units: u64) -> Self {
        Self {
            area: AreaAlloc::new(units),
            blocks: BTreeMap::new(),
            block_free: 0,
        }
    }

    /// A unit for one overflow bucket: from the index area first, then from the blocks.
    fn alloc_overflow(&mut self, area_off: u64, log: &LogArea) -> Option<u64> {
        if let Some(unit) = self.area.alloc_one() {
            return Some(area_off + unit * BUCKET_SIZE);
        }
        for (&b, a) in self.blocks.iter_mut() {
            if let Some(unit) = a.alloc_one() {
                self.block_free -= 1;
                return Some(log.off + b as u64 * log.block_size + unit * BUCKET_SIZE);
            }
        }
        None
    }

    fn free(&mut self, place: Place, n: u64) {
        match place {
            Place::Area(unit) => self.area.free(unit, n),
            Place::Block(b, unit) => {
                if let Some(a) = self.blocks.get_mut(&b) {
                    a.free(unit, n);
                    self.block_free += n;
                }
            }
        }
    }
}

/// What a locked writer found in a chain.
struct ChainScan {
    /// Offset of the slot holding the key, and its ref.
    found: Option<(u64, EntryRef)>,
    /// Offset of the first empty slot.
    empty: Option<u64>,
    /// Offset of the last bucket of the chain.
    last: u64,
}

/// Holds a head bucket's lock byte; released on drop (also when unwinding).
struct BucketLock<'a, P: Persist> {
    pm: &'a Pmem<P>,
    off: u64,
    unlocked: u64,
}

impl<'a, P: Persist> BucketLock<'a, P> {
    fn acquire(pm: &'a Pmem<P>, off: u64) -> Self {
        loop {
            let m = pm.load_u64(off);
            if m & BUCKET_LOCK_MASK == 0 && pm.cas_u64(off, m, m | 1).is_ok() {
                return Self {
                    pm,
                    off,
                    unlocked: m,
                };
            }
            core::hint::spin_loop();
        }
    }
}

impl<P: Persist> Drop for BucketLock<'_, P> {
    fn drop(&mut self) {
        // Only the holder changes the meta word while it is locked (a resize, the only
        // other writer of meta words, excludes writers), so a plain store releases it.
        self.pm.store_u64(self.off, self.unlocked);
    }
}

const fn next_generation(g: u32) -> u32 {
    match (g + 1) & GEN_MASK {
        0 => FIRST_GENERATION,
        n => n,
    }
}

/// Checks that the index area and the root word lie in the region; returns the area's
/// offset and size in units.
fn area_of<P: Persist>(pm: &Pmem<P>, geo: &Geometry) -> Result<(u64, u64), IndexError> {
    let units = geo.index_len / BUCKET_SIZE;
    if geo.index_off % BUCKET_SIZE != 0
        || units == 0
        || pm.check(geo.index_off, geo.index_len).is_err()
    {
        return Err(IndexError::Corrupt("index area lies outside the region"));
    }
    if geo.root_off() % 8 != 0 || pm.check(geo.root_off(), 8).is_err() {
        return Err(IndexError::Corrupt("index root lies outside the region"));
    }
    Ok((geo.index_off, units))
}

fn log_area_of(geo: &Geometry) -> LogArea {
    LogArea {
        off: geo.log_off,
        block_size: geo.block_size,
        n_blocks: geo.n_blocks,
    }
}

impl Index {
    /// Writes an empty first table (about 1/16 of the area, so that it can double a few
    /// times) and the root word; persists both.
    pub fn format<P: Persist>(pm: &Pmem<P>, geo: &Geometry) -> Result<(), IndexError> {
        let (_, units) = area_of(pm, geo)?;
        let target = (units / 16).max(1);
        Self::format_with(pm, geo, 63 - target.leading_zeros())
    }

    /// [`Index::format`] with a first table of `2^log2_buckets` buckets.
    pub fn format_with<P: Persist>(
        pm: &Pmem<P>,
        geo: &Geometry,
        log2_buckets: u32,
    ) -> Result<(), IndexError> {
        let (area_off, units) = area_of(pm, geo)?;
        if log2_buckets >= 63 || 1u64 << log2_buckets > units {
            return Err(IndexError::Full);
        }
        let n = 1u64 << log2_buckets;
        let root = RootWord::new(area_off, log2_buckets, FIRST_GENERATION).ok_or(
            IndexError::Corrupt("index area cannot be named by a root word"),
        )?;
        let empty = empty_bucket(FIRST_GENERATION);
        for i in 0..n {
            pm.write_pod(area_off + i * BUCKET_SIZE, &empty);
        }
        // The table must be durable before the root names it.
        pm.persist(area_off, n * BUCKET_SIZE);
        pm.store_u64(geo.root_off(), root.0);
        pm.persist(geo.root_off(), 8);
        Ok(())
    }

    /// Opens the index after `format` or after a crash at any instant.
    ///
    /// Validates the root and every bucket offset it reaches, clears lock bytes and stale
    /// `BUCKET_MOVED` flags (left by a resize that did not swap the root), and rebuilds the
    /// volatile state. Everything not reachable from the root is free space.
    pub fn open<P: Persist>(pm: &Pmem<P>, geo: &Geometry) -> Result<Index, IndexError> {
        let (area_off, units) = area_of(pm, geo)?;
        let log = log_area_of(geo);
        let idx = Index {
            root_off: geo.root_off(),
            area_off,
            units,
            log,
            max_hops: units
                .saturating_add(log.n_blocks.saturating_mul(log.units_per_block()).max(1)),
            area: spin::Mutex::new(Space::new(units)),
            gate: spin::RwLock::new(()),
            items: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            no_grow_gen: AtomicU32::new(0),
            area_reserve: AtomicU64::new(0),
        };
        let root = RootWord(pm.load_u64(idx.root_off));
        if root.is_unset() {
            return Err(IndexError::Corrupt(
                "index root is not set (region not formatted)",
            ));
        }
        let first = idx.table_unit(root).ok_or(IndexError::Corrupt(
            "index root names a table outside the index area",
        ))?;
        let generation = root.generation();
        let mut space = Space::new(units);
        space.area.mark(first, root.buckets());
        let (mut items, mut overflow, mut dirty) = (0u64, 0u64, false);
        for i in 0..root.buckets() {
            let mut off = root.base() + i * BUCKET_SIZE;
            loop {
                let b: Bucket = pm.read_pod(off);
                if Bucket::generation_of(b.meta) != generation {
                    return Err(IndexError::Corrupt(
                        "bucket of another table generation in the current table",
                    ));
                }
                let clean = b.meta & !(BUCKET_LOCK_MASK | BUCKET_MOVED);
                if clean != b.meta {
                    pm.store_u64(off, clean);
                    pm.flush(off, 8);
                    dirty = true;
                }
                for s in &b.slots {
                    if s.hash != EMPTY_HASH {
                        let r = EntryRef(s.eref);
                        if r.is_empty() || pm.check(r.offset(), r.len()).is_err() {
                            return Err(IndexError::Corrupt(
                                "slot refers to an entry outside the region",
                            ));
                        }
                        items += 1;
                    }
                }
                if b.next == 0 {
                    break;
                }
                const SHARED: IndexError =
                    IndexError::Corrupt("overflow chains loop or share a bucket");
                match idx.bucket_place(b.next).ok_or(IndexError::Corrupt(
                    "overflow pointer outside the index area and the log blocks",
                ))? {
                    Place::Area(unit) => {
                        if space.area.is_used(unit) {
                            return Err(SHARED);
                        }
                        space.area.mark(unit, 1);
                    }
                    Place::Block(blk, unit) => {
                        let per = idx.log.units_per_block();
                        let a = match space.blocks.entry(blk) {
                            Entry::Occupied(o) => o.into_mut(),
                            Entry::Vacant(v) => {
                                space.block_free += per;
                                v.insert(AreaAlloc::new(per))
                            }
                        };
                        if a.is_used(unit) {
                            return Err(SHARED);
                        }
                        a.mark(unit, 1);
                        space.block_free -= 1;
                    }
                }
                overflow += 1;
                off = b.next;
            }
        }
        if dirty {
            pm.fence();
        }
        idx.items.store(items, Ordering::Relaxed);
        idx.overflow.store(overflow, Ordering::Relaxed);
        *idx.area.lock() = space;
        Ok(idx)
    }

    /// Lock-free lookup, by the same steps a remote reader takes with READs (see
    /// [`scan_bucket`]).
    pub fn get<P: Persist>(&self, pm: &Pmem<P>, key: &[u8]) -> Option<EntryRef> {
        self.get_hashed(pm, key_hash(key), key)
    }

    /// Inserts or updates `key → eref` and returns the previous ref. May resize.
    pub fn upsert<P: Persist>(
        &self,
        pm: &Pmem<P>,
        key: &[u8],
        eref: EntryRef,
    ) -> Result<Option<EntryRef>, IndexError> {
        self.upsert_hashed(pm, key_hash(key), key, eref)
    }

    /// Deletes `key`; returns the removed ref.
    pub fn remove<P: Persist>(
        &self,
        pm: &Pmem<P>,
        key: &[u8],
    ) -> Result<Option<EntryRef>, IndexError> {
        self.remove_hashed(pm, key_hash(key), key)
    }

    /// Replaces `key`'s ref with `new` only if it is `expected` (compaction moving an entry
    /// must not undo a newer merged version). Returns whether it replaced.
    pub fn replace_if<P: Persist>(
        &self,
        pm: &Pmem<P>,
        key: &[u8],
        expected: EntryRef,
        new: EntryRef,
    ) -> Result<bool, IndexError> {
        self.replace_if_hashed(pm, key_hash(key), key, expected, new)
    }

    /// Visits every live `(hash, ref)` of the current table. Writers may run concurrently
    /// (a slot changed meanwhile is seen old or new); a resize waits until the visit is
    /// done, so `f` must not insert into this index.
    pub fn for_each<P: Persist>(&self, pm: &Pmem<P>, mut f: impl FnMut(u64, EntryRef)) {
        let _gate = self.gate.read();
        let root = RootWord(pm.load_u64(self.root_off));
        if self.table_unit(root).is_none() {
            return;
        }
        for i in 0..root.buckets() {
            let mut off = root.base() + i * BUCKET_SIZE;
            let mut hops = 0u64;
            loop {
                let b: Bucket = pm.read_pod(off);
                for s in &b.slots {
                    if s.hash != EMPTY_HASH {
                        f(s.hash, EntryRef(s.eref));
                    }
                }
                hops += 1;
                match self.bucket_place(b.next) {
                    Some(_) if hops <= self.max_hops => off = b.next,
                    _ => break,
                }
            }
        }
    }

    /// The current shape of the index.
    pub fn stats<P: Persist>(&self, pm: &Pmem<P>) -> IndexStats {
        let _gate = self.gate.read();
        let root = RootWord(pm.load_u64(self.root_off));
        let items = self.items.load(Ordering::Relaxed);
        let space = self.area.lock();
        let buckets = if self.table_unit(root).is_some() {
            root.buckets()
        } else {
            0
        };
        IndexStats {
            generation: root.generation(),
            buckets,
            overflow_buckets: self.overflow.load(Ordering::Relaxed),
            items,
            load_factor: if buckets == 0 {
                0.0
            } else {
                items as f64 / (buckets as f64 * SLOTS_PER_BUCKET as f64)
            },
            area_bytes: self.units * BUCKET_SIZE,
            used_bytes: space.area.used_units() * BUCKET_SIZE,
            blocks: space.blocks.len() as u64,
            block_free_units: space.block_free,
        }
    }

    // ---- lookups --------------------------------------------------------------------

    fn get_hashed<P: Persist>(&self, pm: &Pmem<P>, hash: u64, key: &[u8]) -> Option<EntryRef> {
        'restart: for _ in 0..MAX_RESTARTS {
            let root = RootWord(pm.load_u64(self.root_off));
            self.table_unit(root)?;
            let generation = root.generation();
            let mut off = root.bucket_of(hash);
            for _ in 0..=self.max_hops {
                let b: Bucket = pm.read_pod(off);
                let Scan::Slots { candidates, next } = scan_bucket(&b, generation, hash) else {
                    continue 'restart;
                };
                for r in candidates.iter() {
                    if entry_has_key(pm, r, key) == Some(true) {
                        return Some(r);
                    }
                }
                // The copy was read word by word: if the bucket was retired meanwhile (its
                // memory may now hold another table), what it said is void.
                fence(Ordering::Acquire);
                if !meta_belongs(pm.load_u64(off), generation) {
                    continue 'restart;
                }
                if next == 0 {
                    return None;
                }
                self.bucket_place(next)?;
                off = next;
            }
            // A chain longer than the area has buckets loops: damaged.
            return None;
        }
        None
    }

    // ---- writers --------------------------------------------------------------------

    fn upsert_hashed<P: Persist>(
        &self,
        pm: &Pmem<P>,
        hash: u64,
        key: &[u8],
        eref: EntryRef,
    ) -> Result<Option<EntryRef>, IndexError> {
        debug_assert_ne!(hash, EMPTY_HASH);
        let prev = self.with_chain(pm, hash, key, |root, scan| {
            if let Some((slot, old)) = scan.found {
                pm.store_u64(slot + 8, eref.0);
                pm.persist(slot + 8, 8);
                return Ok(Some(old));
            }
            if let Some(slot) = scan.empty {
                // Ref first, then the hash commits the slot.
                pm.store_u64(slot + 8, eref.0);
                pm.persist(slot + 8, 8);
                pm.store_u64(slot, hash);
                pm.persist(slot, 8);
            } else {
                let off = self
                    .area
                    .lock()
                    .alloc_overflow(self.area_off, &self.log)
                    .ok_or(IndexError::Full)?;
                let mut b = empty_bucket(root.generation());
                b.slots[0] = Slot { hash, eref: eref.0 };
                pm.write_pod(off, &b);
                pm.persist(off, BUCKET_SIZE);
                // Linking commits the bucket.
                pm.store_u64(scan.last + Bucket::NEXT_OFFSET, off);
                pm.persist(scan.last + Bucket::NEXT_OFFSET, 8);
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
            self.items.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        })?;
        if prev.is_none() {
            self.grow_if_due(pm)?;
        }
        Ok(prev)
    }

    fn remove_hashed<P: Persist>(
        &self,
        pm: &Pmem<P>,
        hash: u64,
        key: &[u8],
    ) -> Result<Option<EntryRef>, IndexError> {
        self.with_chain(pm, hash, key, |_, scan| {
            let Some((slot, old)) = scan.found else {
                return Ok(None);
            };
            pm.store_u64(slot, EMPTY_HASH);
            pm.persist(slot, 8);
            self.items.fetch_sub(1, Ordering::Relaxed);
            Ok(Some(old))
        })
    }

    fn replace_if_hashed<P: Persist>(
        &self,
        pm: &Pmem<P>,
        hash: u64,
        key: &[u8],
        expected: EntryRef,
        new: EntryRef,
    ) -> Result<bool, IndexError> {
        self.with_chain(pm, hash, key, |_, scan| match scan.found {
            Some((slot, old)) if old == expected => {
                pm.store_u64(slot + 8, new.0);
                pm.persist(slot + 8, 8);
                Ok(true)
            }
            _ => Ok(false),
        })
    }

    /// Runs `op` with the chain of `hash` locked and scanned for `key`.
    fn with_chain<P: Persist, R>(
        &self,
        pm: &Pmem<P>,
        hash: u64,
        key: &[u8],
        op: impl FnOnce(RootWord, &ChainScan) -> Result<R, IndexError>,
    ) -> Result<R, IndexError> {
        let _gate = self.gate.read();
        // Stable while the gate is held: only a resize changes the root.
        let root = RootWord(pm.load_u64(self.root_off));
        self.table_unit(root).ok_or(IndexError::Corrupt(
            "index root names a table outside the index area",
        ))?;
        let head = root.bucket_of(hash);
        let _lock = BucketLock::acquire(pm, head);
        let scan = self.scan_locked(pm, root, head, hash, key)?;
        op(root, &scan)
    }

    /// Walks a locked chain: the slot holding `key`, the first empty slot, the last bucket.
    fn scan_locked<P: Persist>(
        &self,
        pm: &Pmem<P>,
        root: RootWord,
        head: u64,
        hash: u64,
        key: &[u8],
    ) -> Result<ChainScan, IndexError> {
        let mut scan = ChainScan {
            found: None,
            empty: None,
            last: head,
        };
        let mut off = head;
        for _ in 0..=self.max_hops {
            let b: Bucket = pm.read_pod(off);
            if Bucket::generation_of(b.meta) != root.generation() {
                return Err(IndexError::Corrupt(
                    "bucket of another table generation in the current table",
                ));
            }
            for (i, s) in b.slots.iter().enumerate() {
                let slot = off + Bucket::slot_hash_offset(i);
                if s.hash == hash {
                    let r = EntryRef(s.eref);
                    match entry_has_key(pm, r, key) {
                        Some(true) => {
                            scan.found = Some((slot, r));
                            return Ok(scan);
                        }
                        Some(false) => {}
                        None => {
                            return Err(IndexError::Corrupt(
                                "slot refers to an entry outside the region",
                            ))
                        }
                    }
                } else if s.hash == EMPTY_HASH && scan.empty.is_none() {
                    scan.empty = Some(slot);
                }
            }
            scan.last = off;
            if b.next == 0 {
                return Ok(scan);
            }
            self.bucket_place(b.next).ok_or(IndexError::Corrupt(
                "overflow pointer outside the index area and the log blocks",
            ))?;
            off = b.next;
        }
        Err(IndexError::Corrupt("overflow chain loops"))
    }

    // ---- resize ---------------------------------------------------------------------

    /// Whether the table is due to double: too many items for its head buckets, or too
    /// many overflow buckets (long chains make every lookup pay extra reads).
    fn grow_due(&self, root: RootWord) -> bool {
        let n = root.buckets();
        let items = self.items.load(Ordering::Relaxed);
        let overflow = self.overflow.load(Ordering::Relaxed);
        (items * 4 > 9 * n || overflow * 4 > n)
            && self.no_grow_gen.load(Ordering::Relaxed) != root.generation()
    }

    fn grow_if_due<P: Persist>(&self, pm: &Pmem<P>) -> Result<(), IndexError> {
        if !self.grow_due(RootWord(pm.load_u64(self.root_off))) {
            return Ok(());
        }
        // An upgradeable guard stops new writers from entering, so the resize does not
        // starve behind a steady stream of them; only one resize runs at a time.
        let gate = self.gate.upgradeable_read();
        let root = RootWord(pm.load_u64(self.root_off));
        if !self.grow_due(root) {
            return Ok(());
        }
        let _gate = gate.upgrade();
        self.grow(pm, root)
    }

    /// Doubles the table copy-on-write. Writers are excluded by the caller.
    fn grow<P: Persist>(&self, pm: &Pmem<P>, old: RootWord) -> Result<(), IndexError> {
        let first = self.table_unit(old).ok_or(IndexError::Corrupt(
            "index root names a table outside the index area",
        ))?;
        let mut space = self.area.lock();
        let Some((unit, new)) = self.alloc_table(&mut space.area, old) else {
            self.no_grow_gen.store(old.generation(), Ordering::Relaxed);
            return Ok(());
        };
        let empty = empty_bucket(new.generation());
        for i in 0..new.buckets() {
            pm.write_pod(new.base() + i * BUCKET_SIZE, &empty);
        }
        // Copy every live slot; the stored hash says where it goes, no entry is read.
        let mut old_overflow: Vec<u64> = Vec::new();
        let mut new_overflow: Vec<u64> = Vec::new();
        let copied = (|| {
            for i in 0..old.buckets() {
                let mut off = old.base() + i * BUCKET_SIZE;
                let mut hops = 0;
                loop {
                    let b: Bucket = pm.read_pod(off);
                    for s in b.slots.iter().filter(|s| s.hash != EMPTY_HASH) {
                        place(
                            pm,
                            &mut space.area,
                            self.area_off,
                            new,
                            *s,
                            &mut new_overflow,
                        )?;
                    }
                    if b.next == 0 {
                        break;
                    }
                    self.bucket_place(b.next).ok_or(IndexError::Corrupt(
                        "overflow pointer outside the index area and the log blocks",
                    ))?;
                    hops += 1;
                    if hops > self.max_hops {
                        return Err(IndexError::Corrupt("overflow chain loops"));
                    }
                    old_overflow.push(b.next);
                    off = b.next;
                }
            }
            Ok(())
        })();
        // A resize that would leave fewer free units than are promised to overflow buckets
        // is not made (the table keeps chaining): the promise holds at the resize's peak,
        // while the old table still lives.
        let copied = copied.and_then(|()| {
            if space.area.free_units() < self.area_reserve.load(Ordering::Acquire) {
                Err(IndexError::Full)
            } else {
                Ok(())
            }
        });
        if let Err(e) = copied {
            space.area.free(unit, new.buckets());
            for &o in &new_overflow {
                space.area.free((o - self.area_off) / BUCKET_SIZE, 1);
            }
            if e != IndexError::Full {
                return Err(e);
            }
            self.no_grow_gen.store(old.generation(), Ordering::Relaxed);
            return Ok(());
        }
        // 1. The new table is durable before anything names it.
        pm.flush(new.base(), new.buckets() * BUCKET_SIZE);
        for &o in &new_overflow {
            pm.flush(o, BUCKET_SIZE);
        }
        pm.fence();
        // 2. Readers holding the old root restart from here on (no bucket is locked: the
        //    caller excludes writers).
        let heads = (0..old.buckets()).map(|i| old.base() + i * BUCKET_SIZE);
        for o in heads.chain(old_overflow.iter().copied()) {
            pm.store_u64(o, pm.load_u64(o) | BUCKET_MOVED);
            pm.flush(o, 8);
        }
        pm.fence();
        // 3. The swap.
        pm.store_u64(self.root_off, new.0);
        pm.persist(self.root_off, 8);
        // 4. The old table's memory is free: a stale reader that reaches it after reuse sees
        //    another generation.
        space.area.free(first, old.buckets());
        for &o in &old_overflow {
            if let Some(p) = self.bucket_place(o) {
                space.free(p, 1);
            }
        }
        self.overflow
            .store(new_overflow.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Room for the table that doubles `old`: its first unit and root word.
    fn alloc_table(&self, area: &mut AreaAlloc, old: RootWord) -> Option<(u64, RootWord)> {
        let log2 = old.log2_buckets() + 1;
        if log2 >= 63 {
            return None;
        }
        let unit = area.alloc_run(1 << log2)?;
        let new = RootWord::new(
            self.area_off + unit * BUCKET_SIZE,
            log2,
            next_generation(old.generation()),
        );
        if new.is_none() {
            area.free(unit, 1 << log2);
        }
        Some((unit, new?))
    }

    // ---- offsets --------------------------------------------------------------------

    /// The first unit of the table `root` names, if the table lies in the index area.
    fn table_unit(&self, root: RootWord) -> Option<u64> {
        if root.generation() == 0 || root.base() < self.area_off || root.log2_buckets() >= 63 {
            return None;
        }
        let first = (root.base() - self.area_off) / BUCKET_SIZE;
        (first.checked_add(root.buckets())? <= self.units).then_some(first)
    }

    /// Where an overflow-bucket offset lies, if it can be one: a unit of the index area or
    /// of the log area (only log blocks given to the index hold buckets; a reader that
    /// follows a pointer elsewhere finds another generation and restarts).
    fn bucket_place(&self, off: u64) -> Option<Place> {
        if off % BUCKET_SIZE != 0 || off < self.area_off {
            return None;
        }
        let unit = (off - self.area_off) / BUCKET_SIZE;
        if unit < self.units {
            return Some(Place::Area(unit));
        }
        self.log.place(off).map(|(b, u)| Place::Block(b, u))
    }

    // ---- log blocks given to the index ----------------------------------------------

    /// Gives the index log block `block` (taken off the memory node's free list) for
    /// overflow buckets. Nothing is written: the block becomes the index's in the region
    /// only when a bucket in it is linked, so a crash before that leaves it free.
    pub fn add_block(&self, block: u32) -> Result<(), IndexError> {
        if block as u64 >= self.log.n_blocks {
            return Err(IndexError::Corrupt("log block out of range"));
        }
        let per = self.log.units_per_block();
        let mut space = self.area.lock();
        if space.blocks.contains_key(&block) {
            return Err(IndexError::Corrupt("log block given to the index twice"));
        }
        space.blocks.insert(block, AreaAlloc::new(per));
        space.block_free += per;
        Ok(())
    }

    /// The log blocks the index holds (after [`Index::open`]: those a reachable bucket lies
    /// in), lowest first.
    pub fn blocks(&self) -> Vec<u32> {
        self.area.lock().blocks.keys().copied().collect()
    }

    /// Free units in the index's log blocks: overflow buckets it can add without another
    /// block.
    pub fn block_free_units(&self) -> u64 {
        self.area.lock().block_free
    }

    /// Free units of the index area: overflow buckets it can add there, as long as no
    /// resize takes them (a resize leaves [`Index::set_area_reserve`] units free).
    pub fn area_free_units(&self) -> u64 {
        self.area.lock().area.free_units()
    }

    /// Makes every later resize leave at least `units` units of the index area free, so
    /// that overflow buckets counted on by the memory node stay available.
    pub fn set_area_reserve(&self, units: u64) {
        self.area_reserve.store(units, Ordering::Release);
    }

    /// Overflow buckets one log block holds.
    pub fn units_per_block(&self) -> u64 {
        self.log.units_per_block()
    }
}

/// Puts one slot into the (not yet published) table `new`, chaining if its bucket is full.
fn place<P: Persist>(
    pm: &Pmem<P>,
    area: &mut AreaAlloc,
    area_off: u64,
    new: RootWord,
    slot: Slot,
    new_overflow: &mut Vec<u64>,
) -> Result<(), IndexError> {
    let mut off = new.bucket_of(slot.hash);
    loop {
        for i in 0..SLOTS_PER_BUCKET {
            let h = off + Bucket::slot_hash_offset(i);
            if pm.load_u64(h) == EMPTY_HASH {
                pm.store_u64(h, slot.hash);
                pm.store_u64(h + 8, slot.eref);
                return Ok(());
            }
        }
        let next = pm.load_u64(off + Bucket::NEXT_OFFSET);
        if next != 0 {
            off = next;
            continue;
        }
        let unit = area.alloc_one().ok_or(IndexError::Full)?;
        let b_off = area_off + unit * BUCKET_SIZE;
        pm.write_pod(b_off, &empty_bucket(new.generation()));
        new_overflow.push(b_off);
        pm.store_u64(off + Bucket::NEXT_OFFSET, b_off);
        off = b_off;
    }
}

/// [`Bucket::belongs_to`] for a meta word alone.
const fn meta_belongs(meta: u64, generation: u32) -> bool {
    Bucket::generation_of(meta) == generation & GEN_MASK && meta & BUCKET_MOVED == 0
}

fn empty_bucket(generation: u32) -> Bucket {
    Bucket {
        meta: Bucket::meta_for(generation),
        slots: [Slot::default(); SLOTS_PER_BUCKET],
        next: 0,
    }
}

/// Whether the entry `r` points to has key `key`; `None` if `r` does not lie in the region.
/// Reads the key in small pieces: no allocation, and a mismatch usually stops early.
fn entry_has_key<P: Persist>(pm: &Pmem<P>, r: EntryRef, key: &[u8]) -> Option<bool> {
    let (off, len) = (r.offset(), r.len());
    pm.check(off, len).ok()?;
    if len < (ENTRY_HEADER_SIZE + key.len()) as u64 {
        return Some(false);
    }
    let header: EntryHeader = pm.read_pod(off);
    if header.key_len as usize != key.len() {
        return Some(false);
    }
    let mut buf = [0u8; 64];
    let mut at = off + ENTRY_HEADER_SIZE as u64;
    for chunk in key.chunks(buf.len()) {
        let b = &mut buf[..chunk.len()];
        pm.read(at, b);
        if b != chunk {
            return Some(false);
        }
        at += chunk.len() as u64;
    }
    Some(true)
}
