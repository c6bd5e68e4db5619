//! Access to a persistent-memory region by offset.
//!
//! Every access to the DPM region goes through [`Pmem`]: loads and stores of aligned words
//! are atomic (the region is shared with other threads, processes and NICs), byte copies
//! are done a word at a time where aligned, and durability is asked for explicitly with
//! [`Pmem::persist`] (write back + fence). The [`Persist`] backend decides what persisting
//! means: CPU cache-line write-back ([`CpuPersist`]), nothing ([`NoPersist`]), or — in
//! tests — a shadow copy that can lose everything not yet persisted ([`crate::shadow`]).

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use dinomo_shared::pod::Pod;

use crate::persist::{self, FlushKind};

/// Makes written bytes durable.
pub trait Persist: Send + Sync {
    /// Starts writing back `[off, off + len)` of the region at `base` (not yet ordered).
    fn flush(&self, base: *const u8, off: u64, len: u64);
    /// Completes every earlier flush: after it returns, flushed bytes are durable.
    fn fence(&self);
}

impl<T: Persist + ?Sized> Persist for &T {
    fn flush(&self, base: *const u8, off: u64, len: u64) {
        (**self).flush(base, off, len)
    }
    fn fence(&self) {
        (**self).fence()
    }
}

#[cfg(feature = "alloc")]
impl<T: Persist + ?Sized> Persist for alloc::sync::Arc<T> {
    fn flush(&self, base: *const u8, off: u64, len: u64) {
        (**self).flush(base, off, len)
    }
    fn fence(&self) {
        (**self).fence()
    }
}

/// Cache-line write-back with the CPU's best instruction (see [`crate::persist`]).
#[derive(Clone, Copy, Debug)]
pub struct CpuPersist {
    kind: FlushKind,
}

impl CpuPersist {
    /// Uses the instruction detected for this CPU.
    pub fn detect() -> Self {
        Self {
            kind: persist::flush_kind(),
        }
    }
    /// Uses a given instruction (from a platform profile).
    pub const fn with_kind(kind: FlushKind) -> Self {
        Self { kind }
    }
    pub const fn kind(&self) -> FlushKind {
        self.kind
    }
}

impl Persist for CpuPersist {
    #[inline]
    fn flush(&self, base: *const u8, off: u64, len: u64) {
        persist::flush_range(base.wrapping_add(off as usize), len as usize, self.kind);
    }
    #[inline]
    fn fence(&self) {
        persist::fence();
    }
}

/// No write-back: for volatile regions and tests that do not simulate power failure.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPersist;

impl Persist for NoPersist {
    fn flush(&self, _: *const u8, _: u64, _: u64) {}
    fn fence(&self) {
        core::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// An access outside the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBounds {
    pub off: u64,
    pub len: u64,
    pub region_len: u64,
}

impl fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "access of {} bytes at offset {} is outside the region ({} bytes)",
            self.len, self.off, self.region_len
        )
    }
}

/// A mapped persistent-memory region.
///
/// Offsets are checked: an access outside the region panics, so code that follows offsets
/// read from the region (which may be corrupt) must validate them with [`Pmem::check`] first.
pub struct Pmem<P> {
    base: NonNull<u8>,
    len: u64,
    persist: P,
}

// SAFETY: `Pmem` only hands out copies of the region's bytes and performs atomic accesses
// on it; the memory itself is shared by design (other threads, processes, NICs).
unsafe impl<P: Send> Send for Pmem<P> {}
// SAFETY: as above; all accesses through `&Pmem` are atomic or copies.
unsafe impl<P: Sync> Sync for Pmem<P> {}

impl<P> fmt::Debug for Pmem<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pmem")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

impl<P: Persist> Pmem<P> {
    /// Wraps `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` must be 64-byte aligned and valid for reads and writes of `len` bytes for as
    /// long as the `Pmem` (and anything derived from it) lives, and every other party that
    /// writes the memory concurrently must do so with atomic accesses or accept torn reads.
    pub unsafe fn new(base: *mut u8, len: u64, persist: P) -> Self {
        assert!(
            base as usize % 64 == 0,
            "region base must be 64-byte aligned"
        );
        let base = NonNull::new(base).expect("region base must not be null");
        Self { base, len, persist }
    }

    /// Region length in bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the region is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The persistence backend.
    pub fn persistence(&self) -> &P {
        &self.persist
    }
    /// Raw base pointer (for registering the region with a NIC).
    pub fn base_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Checks that `[off, off + len)` lies inside the region.
    #[inline]
    pub fn check(&self, off: u64, len: u64) -> Result<(), OutOfBounds> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds {
                off,
                len,
                region_len: self.len,
            }),
        }
    }

    #[inline]
    #[track_caller]
    fn ptr(&self, off: u64, len: u64, align: u64) -> *mut u8 {
        if let Err(e) = self.check(off, len) {
            panic!("{e}");
        }
        assert!(off % align == 0, "offset {off} is not {align}-byte aligned");
        // SAFETY: `off + len <= self.len` was checked, so the pointer stays in the mapping.
        unsafe { self.base.as_ptr().add(off as usize) }
    }

    #[inline]
    #[track_caller]
    fn atomic_u64(&self, off: u64) -> &AtomicU64 {
        let p = self.ptr(off, 8, 8);
        // SAFETY: `p` is in bounds and 8-aligned (checked); the region lives as long as `self`
        // and is only accessed atomically or by copies.
        unsafe { AtomicU64::from_ptr(p.cast()) }
    }

    #[inline]
    #[track_caller]
    fn atomic_u32(&self, off: u64) -> &AtomicU32 {
        let p = self.ptr(off, 4, 4);
        // SAFETY: as in `atomic_u64`, for 4 bytes.
        unsafe { AtomicU32::from_ptr(p.cast()) }
    }

    #[inline]
    #[track_caller]
    fn atomic_u8(&self, off: u64) -> &AtomicU8 {
        let p = self.ptr(off, 1, 1);
        // SAFETY: as in `atomic_u64`, for one byte.
        unsafe { AtomicU8::from_ptr(p) }
    }

    /// Atomic 8-byte load (acquire).
    #[inline]
    #[track_caller]
    pub fn load_u64(&self, off: u64) -> u64 {
        self.atomic_u64(off).load(Ordering::Acquire)
    }
    /// Atomic 8-byte store (release). Not durable until persisted.
    #[inline]
    #[track_caller]
    pub fn store_u64(&self, off: u64, v: u64) {
        self.atomic_u64(off).store(v, Ordering::Release)
    }
    /// Atomic 8-byte compare-and-swap; returns the previous value on success or the current
    /// one on failure.
    #[inline]
    #[track_caller]
    pub fn cas_u64(&self, off: u64, current: u64, new: u64) -> Result<u64, u64> {
        self.atomic_u64(off)
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
    }
    /// Atomic 8-byte fetch-and-add; returns the previous value.
    #[inline]
    #[track_caller]
    pub fn faa_u64(&self, off: u64, add: u64) -> u64 {
        self.atomic_u64(off).fetch_add(add, Ordering::AcqRel)
    }
    /// Atomic 4-byte load (acquire).
    #[inline]
    #[track_caller]
    pub fn load_u32(&self, off: u64) -> u32 {
        self.atomic_u32(off).load(Ordering::Acquire)
    }
    /// Atomic 4-byte store (release).
    #[inline]
    #[track_caller]
    pub fn store_u32(&self, off: u64, v: u32) {
        self.atomic_u32(off).store(v, Ordering::Release)
    }

    /// Copies `dst.len()` bytes from `off` (8-byte words atomically where aligned).
    #[track_caller]
    pub fn read(&self, off: u64, dst: &mut [u8]) {
        let n = dst.len() as u64;
        self.ptr(off, n, 1);
        let mut i = 0u64;
        while i < n {
            let o = off + i;
            if o % 8 == 0 && n - i >= 8 {
                let w = self.atomic_u64(o).load(Ordering::Acquire);
                dst[i as usize..i as usize + 8].copy_from_slice(&w.to_le_bytes());
                i += 8;
            } else {
                dst[i as usize] = self.atomic_u8(o).load(Ordering::Acquire);
                i += 1;
            }
        }
    }

    /// Copies `src` to `off` (8-byte words atomically where aligned). Not durable until
    /// persisted.
    #[track_caller]
    pub fn write(&self, off: u64, src: &[u8]) {
        let n = src.len() as u64;
        self.ptr(off, n, 1);
        let mut i = 0u64;
        while i < n {
            let o = off + i;
            if o % 8 == 0 && n - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&src[i as usize..i as usize + 8]);
                self.atomic_u64(o)
                    .store(u64::from_le_bytes(w), Ordering::Release);
                i += 8;
            } else {
                self.atomic_u8(o).store(src[i as usize], Ordering::Release);
                i += 1;
            }
        }
    }

    /// Fills `[off, off + len)` with `byte`.
    #[track_caller]
    pub fn fill(&self, off: u64, len: u64, byte: u8) {
        const CHUNK: usize = 512;
        let buf = [byte; CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64);
            self.write(off + done, &buf[..n as usize]);
            done += n;
        }
    }

    /// Reads a plain-old-data structure at `off`.
    #[track_caller]
    pub fn read_pod<T: Pod>(&self, off: u64) -> T {
        let mut v = T::zeroed();
        // SAFETY: `T: Pod` has no padding and accepts any bytes, so filling its storage with
        // region bytes yields a valid value.
        let bytes = unsafe {
            core::slice::from_raw_parts_mut(
                (&mut v as *mut T).cast::<u8>(),
                core::mem::size_of::<T>(),
            )
        };
        self.read(off, bytes);
        v
    }

    /// Writes a plain-old-data structure at `off` (not durable until persisted).
    #[track_caller]
    pub fn write_pod<T: Pod>(&self, off: u64, v: &T) {
        self.write(off, v.as_bytes());
    }

    /// Starts writing back `[off, off + len)`; durable after the next [`Pmem::fence`].
    #[inline]
    #[track_caller]
    pub fn flush(&self, off: u64, len: u64) {
        self.ptr(off, len, 1);
        self.persist.flush(self.base.as_ptr(), off, len);
    }
    /// Completes earlier flushes.
    #[inline]
    pub fn fence(&self) {
        self.persist.fence();
    }
    /// Makes `[off, off + len)` durable now (flush + fence): one persist point.
    #[inline]
    #[track_caller]
    pub fn persist(&self, off: u64, len: u64) {
        self.flush(off, len);
        self.fence();
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct Buf([u8; 4096]);

    #[test]
    fn accessors_round_trip() {
        let mut b = Box::new(Buf([0; 4096]));
        // SAFETY: the buffer is 64-aligned, 4096 bytes, and outlives `pm`.
        let pm = unsafe { Pmem::new(b.0.as_mut_ptr(), 4096, NoPersist) };
        pm.store_u64(8, 0xDEAD_BEEF);
        assert_eq!(pm.load_u64(8), 0xDEAD_BEEF);
        assert_eq!(pm.cas_u64(8, 1, 2), Err(0xDEAD_BEEF));
        assert_eq!(pm.cas_u64(8, 0xDEAD_BEEF, 5), Ok(0xDEAD_BEEF));
        assert_eq!(pm.faa_u64(8, 3), 5);
        assert_eq!(pm.load_u64(8), 8);
        let data: Vec<u8> = (0..100u8).collect();
        pm.write(13, &data);
        let mut out = vec![0u8; 100];
        pm.read(13, &mut out);
        assert_eq!(out, data);
        pm.fill(200, 1000, 0xAB);
        let mut out = vec![0u8; 1000];
        pm.read(200, &mut out);
        assert!(out.iter().all(|&x| x == 0xAB));
        assert!(pm.check(4090, 7).is_err());
        assert!(pm.check(u64::MAX, 2).is_err());
        pm.persist(0, 4096);
    }

    #[test]
    #[should_panic(expected = "outside the region")]
    fn out_of_bounds_panics_with_message() {
        let mut b = Box::new(Buf([0; 4096]));
        // SAFETY: as above.
        let pm = unsafe { Pmem::new(b.0.as_mut_ptr(), 4096, NoPersist) };
        pm.load_u64(4096);
    }
}
