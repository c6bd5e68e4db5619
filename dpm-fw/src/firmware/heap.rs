//! A first-fit free-list allocator for the bare-metal image.
//!
//! The merger allocates and frees scratch buffers and index bookkeeping for as long as the
//! memory node runs, so a bump allocator would run dry; this one returns freed memory to an
//! address-ordered list of holes and merges neighbours. Every block is a multiple of
//! [`UNIT`] bytes and [`UNIT`]-aligned, so a hole header always fits in what is left over.
//! One core allocates at a time (behind a spin lock); O(holes) per call is fine for the
//! few, mostly long-lived allocations the memory node makes.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};

/// Granule of every block and hole.
pub const UNIT: usize = 16;

#[repr(C)]
struct Hole {
    size: usize,
    next: Option<NonNull<Hole>>,
}

const _: () = assert!(core::mem::size_of::<Hole>() <= UNIT);

/// The list of free holes, sorted by address.
#[derive(Debug)]
pub struct FreeList {
    head: Option<NonNull<Hole>>,
    free: usize,
}

// SAFETY: the list owns the memory its holes describe; moving it to another thread moves
// that ownership with it.
unsafe impl Send for FreeList {}

impl Default for FreeList {
    fn default() -> Self {
        Self::empty()
    }
}

const fn round_up(v: usize, align: usize) -> Option<usize> {
    match v.checked_add(align - 1) {
        Some(x) => Some(x & !(align - 1)),
        None => None,
    }
}

fn block_of(layout: Layout) -> Option<(usize, usize)> {
    Some((
        round_up(layout.size().max(1), UNIT)?,
        layout.align().max(UNIT),
    ))
}

impl FreeList {
    /// A list with no memory.
    pub const fn empty() -> Self {
        Self {
            head: None,
            free: 0,
        }
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> usize {
        self.free
    }

    /// Number of holes (fragmentation indicator).
    pub fn holes(&self) -> usize {
        let mut n = 0;
        let mut cur = self.head;
        while let Some(c) = cur {
            n += 1;
            // SAFETY: every listed hole is memory this list owns, holding a valid header.
            cur = unsafe { c.as_ref() }.next;
        }
        n
    }

    /// Hands `[start, start + len)` to the allocator (trimmed to [`UNIT`] alignment).
    ///
    /// # Safety
    /// The memory must be valid for reads and writes, not overlap memory already given to
    /// this list, and stay unused by anything else for as long as the list or any block it
    /// handed out lives.
    pub unsafe fn add_region(&mut self, start: *mut u8, len: usize) {
        let addr = start as usize;
        let Some(first) = round_up(addr, UNIT) else {
            return;
        };
        let end = addr.saturating_add(len) & !(UNIT - 1);
        if end > first {
            // SAFETY: the caller hands over `[first, end)`, which lies inside its range.
            unsafe { self.insert(first, end - first) };
        }
    }

    /// Inserts the hole `[addr, addr + size)` in address order, merging with neighbours.
    ///
    /// # Safety
    /// The memory must be owned by this list from now on, `UNIT`-aligned, a multiple of
    /// `UNIT` long, and not overlap any listed hole.
    unsafe fn insert(&mut self, addr: usize, size: usize) {
        self.free += size;
        let mut prev: Option<NonNull<Hole>> = None;
        let mut next = self.head;
        while let Some(n) = next {
            if n.as_ptr() as usize > addr {
                break;
            }
            prev = next;
            // SAFETY: listed holes hold valid headers.
            next = unsafe { n.as_ref() }.next;
        }
        let mut size = size;
        if let Some(n) = next {
            if addr + size == n.as_ptr() as usize {
                // SAFETY: as above; the hole is absorbed and no longer listed.
                let n = unsafe { n.as_ptr().read() };
                size += n.size;
                next = n.next;
            }
        }
        if let Some(mut p) = prev {
            // SAFETY: as above; `p` is a listed hole and `&mut self` excludes other access.
            let ph = unsafe { p.as_mut() };
            if p.as_ptr() as usize + ph.size == addr {
                ph.size += size;
                ph.next = next;
                return;
            }
        }
        let hole = addr as *mut Hole;
        // SAFETY: the caller gives us `[addr, addr + size)`, aligned and at least UNIT
        // bytes, which holds a header.
        unsafe {
            hole.write(Hole { size, next });
        }
        let hole = NonNull::new(hole);
        match prev {
            // SAFETY: `p` is a listed hole.
            Some(mut p) => unsafe { p.as_mut() }.next = hole,
            None => self.head = hole,
        }
    }

    /// First-fit allocation; `None` if no hole is large enough.
    pub fn alloc(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let (need, align) = block_of(layout)?;
        let mut prev: Option<NonNull<Hole>> = None;
        let mut cur = self.head;
        while let Some(c) = cur {
            // SAFETY: listed holes hold valid headers.
            let hole = unsafe { c.as_ptr().read() };
            let addr = c.as_ptr() as usize;
            let end = addr + hole.size;
            if let Some(start) = round_up(addr, align) {
                if start.checked_add(need).is_some_and(|e| e <= end) {
                    match prev {
                        // SAFETY: `p` is a listed hole.
                        Some(mut p) => unsafe { p.as_mut() }.next = hole.next,
                        None => self.head = hole.next,
                    }
                    self.free -= hole.size;
                    // SAFETY: the front and back remainders are UNIT-aligned multiples of
                    // UNIT inside the hole just unlinked, disjoint from every listed hole.
                    unsafe {
                        if start > addr {
                            self.insert(addr, start - addr);
                        }
                        if end > start + need {
                            self.insert(start + need, end - start - need);
                        }
                    }
                    return NonNull::new(start as *mut u8);
                }
            }
            prev = cur;
            cur = hole.next;
        }
        None
    }

    /// Returns a block to the list.
    ///
    /// # Safety
    /// `ptr` must come from [`FreeList::alloc`] on this list with the same `layout`, and not
    /// be used afterwards.
    pub unsafe fn dealloc(&mut self, ptr: NonNull<u8>, layout: Layout) {
        if let Some((size, _)) = block_of(layout) {
            // SAFETY: the block was handed out by `alloc` with this rounded size, so it is
            // UNIT-aligned, owned by us again, and disjoint from every hole.
            unsafe { self.insert(ptr.as_ptr() as usize, size) };
        }
    }
}

/// [`FreeList`] behind a spin lock, usable as `#[global_allocator]`.
#[derive(Debug, Default)]
pub struct LockedHeap(spin::Mutex<FreeList>);

impl LockedHeap {
    pub const fn empty() -> Self {
        Self(spin::Mutex::new(FreeList::empty()))
    }

    /// Hands memory to the heap.
    ///
    /// # Safety
    /// As [`FreeList::add_region`].
    pub unsafe fn add_region(&self, start: *mut u8, len: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.lock().add_region(start, len) }
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> usize {
        self.0.lock().free_bytes()
    }
}

// SAFETY: `alloc` returns UNIT-aligned (or more, as asked) blocks of at least the asked
// size from memory handed over by `add_region`, never handing out a byte twice; `dealloc`
// takes back exactly what was handed out.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .lock()
            .alloc(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block from `alloc` with its layout.
            unsafe { self.0.lock().dealloc(p, layout) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Arena([u8; 64 << 10]);

    fn arena() -> Box<Arena> {
        Box::new(Arena([0; 64 << 10]))
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_all_memory_comes_back() {
        let mut a = arena();
        let mut fl = FreeList::empty();
        // SAFETY: the arena outlives `fl` and is used by nothing else. Start off by 3 bytes
        // to check trimming.
        unsafe { fl.add_region(a.0.as_mut_ptr().add(3), a.0.len() - 3) };
        let total = fl.free_bytes();
        assert_eq!(total, (64 << 10) - UNIT);
        let mut live: Vec<(NonNull<u8>, Layout)> = Vec::new();
        let mut rng = 0x1234_5678_u64;
        for round in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if live.len() > 20 || (rng % 3 == 0 && !live.is_empty()) {
                let (p, l) = live.swap_remove((rng as usize / 3) % live.len());
                // SAFETY: `p` came from `fl.alloc(l)` and is not used again.
                unsafe { fl.dealloc(p, l) };
            } else {
                let size = 1 + (rng >> 8) as usize % 1500;
                let align = 1 << ((rng >> 20) % 10);
                let l = Layout::from_size_align(size, align).expect("layout");
                let Some(p) = fl.alloc(l) else { continue };
                assert_eq!(p.as_ptr() as usize % align, 0, "round {round}");
                let (s, e) = (p.as_ptr() as usize, p.as_ptr() as usize + size);
                for (q, m) in &live {
                    let (qs, qe) = (q.as_ptr() as usize, q.as_ptr() as usize + m.size());
                    assert!(e <= qs || qe <= s, "blocks overlap in round {round}");
                }
                // SAFETY: the block is ours, `size` bytes long.
                unsafe { ptr::write_bytes(p.as_ptr(), round as u8, size) };
                live.push((p, l));
            }
        }
        for (p, l) in live.drain(..) {
            // SAFETY: as above.
            unsafe { fl.dealloc(p, l) };
        }
        assert_eq!(fl.free_bytes(), total);
        assert_eq!(
            fl.holes(),
            1,
            "freed neighbours must merge back into one hole"
        );
    }

    #[test]
    fn exhaustion_returns_none_and_large_block_fits_after_frees() {
        let mut a = arena();
        let mut fl = FreeList::empty();
        // SAFETY: as above.
        unsafe { fl.add_region(a.0.as_mut_ptr(), a.0.len()) };
        let l = Layout::from_size_align(1024, 8).expect("layout");
        let blocks: Vec<_> = core::iter::from_fn(|| fl.alloc(l)).collect();
        assert_eq!(blocks.len(), 64);
        assert_eq!(fl.free_bytes(), 0);
        assert!(fl.alloc(Layout::new::<u8>()).is_none());
        for p in blocks {
            // SAFETY: as above.
            unsafe { fl.dealloc(p, l) };
        }
        let big = Layout::from_size_align(64 << 10, 4096).expect("layout");
        assert!(
            fl.alloc(big).is_some(),
            "coalesced holes satisfy the whole arena"
        );
    }

    #[test]
    fn locked_heap_as_global_alloc() {
        let mut a = arena();
        let heap = LockedHeap::empty();
        // SAFETY: as above.
        unsafe { heap.add_region(a.0.as_mut_ptr(), a.0.len()) };
        let l = Layout::from_size_align(100, 64).expect("layout");
        // SAFETY: a valid, non-zero layout.
        let p = unsafe { GlobalAlloc::alloc(&heap, l) };
        assert!(!p.is_null() && p as usize % 64 == 0);
        // SAFETY: `p` came from `heap.alloc(l)`.
        let q = unsafe { GlobalAlloc::realloc(&heap, p, l, 5000) };
        assert!(!q.is_null());
        // SAFETY: `q` came from realloc with the new size.
        unsafe { GlobalAlloc::dealloc(&heap, q, Layout::from_size_align(5000, 64).expect("l")) };
        assert_eq!(heap.free_bytes(), 64 << 10);
    }
}
