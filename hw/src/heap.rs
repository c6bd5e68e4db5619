//! A region in this process's memory: for in-process clusters, benchmarks and tests that
//! need no file and no power-failure simulation.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::pmem::{Persist, Pmem};

#[repr(C, align(64))]
struct Line([AtomicU64; 8]);

/// Zeroed, 64-byte aligned memory that outlives every [`Pmem`] made from it.
pub struct HeapRegion {
    lines: Box<[Line]>,
    len: u64,
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
        let lines = (len as usize).div_ceil(64);
        let lines = (0..lines).map(|_| Line(Default::default())).collect();
        Arc::new(Self { lines, len })
    }

    /// A [`Pmem`] over this memory with persistence backend `persist`.
    pub fn pmem<P: Persist>(self: &Arc<Self>, persist: P) -> Pmem<HeapPersist<P>> {
        let base = self.lines.as_ptr() as *mut u8;
        let persist = HeapPersist {
            _mem: Arc::clone(self),
            inner: persist,
        };
        // SAFETY: `lines` is 64-byte aligned, at least `len` bytes, only accessed atomically
        // or by copies, and kept alive by the `Arc` inside the returned `Pmem`.
        unsafe { Pmem::new(base, self.len, persist) }
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
}
