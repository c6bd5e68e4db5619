//! A region in this process's memory: for in-process clusters, benchmarks and tests that
//! need no file and no power-failure simulation.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::pmem::{Persist, Pmem};

/// Zeroed, 64-byte aligned memory that outlives every [`Pmem`] made from it. It is
/// allocated zeroed, so the operating system supplies pages lazily: a large region costs
/// nothing until it is touched.
pub struct HeapRegion {
    base: NonNull<u8>,
    layout: Layout,
    len: u64,
}

// SAFETY: the memory is only reached through `Pmem`, whose accesses are whole-word atomics.
unsafe impl Send for HeapRegion {}
// SAFETY: as above.
unsafe impl Sync for HeapRegion {}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: `base` was allocated in `new` with exactly `layout` and is freed once.
        unsafe { dealloc(self.base.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for HeapRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeapRegion")
            .field("len", &self.len)
            .finish()
    }
}

impl HeapRegion {
    /// `len` zeroed bytes (rounded up to whole cache lines).
    pub fn new(len: u64) -> Arc<Self> {
        let bytes = (len as usize).div_ceil(64).max(1) * 64;
        let layout = match Layout::from_size_align(bytes, 64) {
            Ok(l) => l,
            Err(_) => panic!("a region of {len} bytes cannot be laid out in memory"),
        };
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let Some(base) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        Arc::new(Self { base, layout, len })
    }

    /// A [`Pmem`] over this memory with persistence backend `persist`. Its length is `len`
    /// rounded up to a multiple of 8 (a [`Pmem`] is made of whole words); the extra bytes
    /// are part of the allocation and zeroed like the rest.
    pub fn pmem<P: Persist>(self: &Arc<Self>, persist: P) -> Pmem<HeapPersist<P>> {
        let base = self.base.as_ptr();
        let len = self.len.next_multiple_of(8);
        debug_assert!(len as usize <= self.layout.size());
        let persist = HeapPersist {
            _mem: Arc::clone(self),
            inner: persist,
        };
        // SAFETY: `base` is 64-byte aligned and the allocation is `len` rounded up to whole
        // cache lines, so at least `len` (rounded up to whole words) bytes; it is only
        // accessed through `Pmem` (whole-word atomics) and kept alive by the `Arc` inside
        // the returned `Pmem`.
        unsafe { Pmem::new(base, len, persist) }
    }
}

/// A persistence backend that also keeps its [`HeapRegion`] alive.
#[derive(Debug)]
pub struct HeapPersist<P> {
    _mem: Arc<HeapRegion>,
    inner: P,
}

impl<P: Persist> Persist for HeapPersist<P> {
    #[inline]
    fn flush(&self, base: *const u8, off: u64, len: u64) {
        self.inner.flush(base, off, len)
    }
    #[inline]
    fn fence(&self) {
        self.inner.fence()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmem::{CpuPersist, NoPersist};

    #[test]
    fn memory_outlives_the_region_handle() {
        let pm = {
            let r = HeapRegion::new(1000);
            r.pmem(NoPersist)
        };
        pm.store_u64(992, 9);
        assert_eq!(pm.load_u64(992), 9);
        let r = HeapRegion::new(4096);
        let pm = r.pmem(CpuPersist::detect());
        pm.write(100, b"abc");
        pm.persist(100, 3);
        let mut out = [0u8; 3];
        pm.read(100, &mut out);
        assert_eq!(&out, b"abc");
    }

    #[test]
    fn a_length_that_is_not_whole_words_is_rounded_up() {
        let r = HeapRegion::new(1001);
        let pm = r.pmem(NoPersist);
        assert_eq!(pm.len(), 1008);
        pm.write(1000, &[7; 8]);
        let mut out = [0u8; 9];
        pm.read(999, &mut out);
        assert_eq!(out, [0, 7, 7, 7, 7, 7, 7, 7, 7]);
        assert!(pm.check(1008, 1).is_err());
    }
}
