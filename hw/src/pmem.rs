//! Access to a persistent-memory region by offset.
//!
//! Every access to the DPM region goes through [`Pmem`], and durability is asked for
//! explicitly with [`Pmem::persist`] (write back + fence). The [`Persist`] backend decides
//! what persisting means: CPU cache-line write-back ([`CpuPersist`]), nothing
//! ([`NoPersist`]), or — in tests — a shadow copy that can lose everything not yet persisted
//! ([`crate::shadow`]).
//!
//! # Whole-word atomics only
//!
//! The region is shared with other threads, other processes and NICs, so every access races
//! with someone. [`Pmem`] touches region memory only with naturally aligned 8-byte atomics
//! ([`AtomicU64`]), never with 1-, 2- or 4-byte ones: racing atomic accesses of different
//! sizes to the same bytes (mixed-size atomics) are not defined by the Rust/C++ memory
//! model, so a byte store racing a word load of the same word would be undefined behaviour.
//!
//! - Aligned whole words (the body of [`Pmem::read`], [`Pmem::write`] and [`Pmem::fill`],
//!   and the 8-byte accessors) are one plain atomic load or store each.
//! - Where an access covers only part of a word (an unaligned head or tail, a 4-byte
//!   accessor), a read loads the whole word and keeps the wanted bytes, and a write replaces
//!   only the wanted bytes with a compare-exchange loop on the whole word
//!   (`new = (old & !mask) | (bytes & mask)`), so a concurrent write to the other bytes of
//!   that word is never lost.
//!
//! Those edge words must lie inside the region, so a region's base is 64-byte aligned and
//! its length a multiple of 8 ([`Pmem::new`] refuses anything else): the word holding any
//! byte of the region is then wholly inside it.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

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
///
/// Invariant: `base` is 64-byte aligned and `len` is a multiple of 8, so every naturally
/// aligned 8-byte word that holds a byte of the region lies wholly inside it. All accesses
/// are whole-word atomics (see the [module documentation](self)).
pub struct Pmem<P> {
    base: NonNull<u8>,
    len: u64,
    persist: P,
}

// SAFETY: `Pmem` only hands out copies of the region's bytes and accesses it with whole-word
// atomics; the memory itself is shared by design (other threads, processes, NICs).
unsafe impl<P: Send> Send for Pmem<P> {}
// SAFETY: as above; every access through `&Pmem` is a whole-word atomic.
unsafe impl<P: Sync> Sync for Pmem<P> {}

impl<P> fmt::Debug for Pmem<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pmem")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

/// Bytes in a word, the unit of every access to the region.
const WORD: u64 = 8;

/// The mask selecting bytes `[lo, hi)` of a word (in memory order), `lo < hi <= 8`.
#[inline]
fn byte_mask(lo: usize, hi: usize) -> u64 {
    let mut m = [0u8; 8];
    m[lo..hi].fill(0xFF);
    u64::from_ne_bytes(m)
}

impl<P: Persist> Pmem<P> {
    /// Wraps `len` bytes at `base`.
    ///
    /// # Panics
    /// If `base` is null or not 64-byte aligned, or `len` is not a multiple of 8: every
    /// access is made of whole 8-byte words, and the words at the edges of an access must
    /// stay inside the region.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes for as long as the `Pmem`
    /// (and anything derived from it) lives, and every other party that writes the memory
    /// concurrently must do so with naturally aligned 8-byte atomic accesses (or be a device
    /// outside the memory model, such as a NIC) or accept torn reads.
    pub unsafe fn new(base: *mut u8, len: u64, persist: P) -> Self {
        assert!(
            base as usize % 64 == 0,
            "region base must be 64-byte aligned"
        );
        assert!(
            len % WORD == 0,
            "region length {len} is not a multiple of {WORD} bytes"
        );
        let base = NonNull::new(base).expect("region base must not be null");
        Self { base, len, persist }
    }

    /// Region length in bytes (a multiple of 8).
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

    /// Panics unless `[off, off + len)` lies inside the region and `off` is `align`-aligned.
    #[inline]
    #[track_caller]
    fn check_access(&self, off: u64, len: u64, align: u64) {
        if let Err(e) = self.check(off, len) {
            panic!("{e}");
        }
        assert!(off % align == 0, "offset {off} is not {align}-byte aligned");
    }

    /// The word at byte offset `w`.
    ///
    /// # Safety
    /// `w` must be a multiple of 8 with `w + 8 <= self.len`.
    #[inline(always)]
    unsafe fn word(&self, w: u64) -> &AtomicU64 {
        debug_assert!(w % WORD == 0 && w + WORD <= self.len);
        // SAFETY: the caller guarantees the word is in bounds and 8-aligned (the base is
        // 64-aligned); the region lives as long as `self` and is only accessed atomically,
        // with whole words, by everyone (see `new`).
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(w as usize).cast()) }
    }

    /// The word at `off`, which must be in bounds and 8-aligned (panics otherwise).
    #[inline]
    #[track_caller]
    fn atomic_u64(&self, off: u64) -> &AtomicU64 {
        self.check_access(off, WORD, WORD);
        // SAFETY: `off` is 8-aligned and `off + 8 <= len` (checked).
        unsafe { self.word(off) }
    }

    /// The bytes of the word at `w`, in memory order, from one atomic load (acquire).
    ///
    /// # Safety
    /// As [`Pmem::word`].
    #[inline]
    unsafe fn load_word_bytes(&self, w: u64) -> [u8; 8] {
        // SAFETY: forwarded from the caller.
        unsafe { self.word(w) }
            .load(Ordering::Acquire)
            .to_ne_bytes()
    }

    /// Replaces the bytes of the word at `w` selected by `mask` with those of `bytes`,
    /// leaving the others as they are even if someone writes them concurrently: a
    /// compare-exchange loop on the whole word (release on success, like a store).
    ///
    /// # Safety
    /// As [`Pmem::word`].
    #[inline]
    unsafe fn store_masked(&self, w: u64, bytes: u64, mask: u64) {
        // SAFETY: forwarded from the caller.
        let a = unsafe { self.word(w) };
        let mut old = a.load(Ordering::Relaxed);
        loop {
            let new = (old & !mask) | (bytes & mask);
            match a.compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(cur) => old = cur,
            }
        }
    }

    /// Writes `src` at byte `lo` of the word at `w` (`lo + src.len() <= 8`), masked.
    ///
    /// # Safety
    /// As [`Pmem::word`].
    #[inline]
    unsafe fn write_part(&self, w: u64, lo: usize, src: &[u8]) {
        let hi = lo + src.len();
        let mut b = [0u8; 8];
        b[lo..hi].copy_from_slice(src);
        // SAFETY: forwarded from the caller.
        unsafe { self.store_masked(w, u64::from_ne_bytes(b), byte_mask(lo, hi)) }
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
    /// Atomic 4-byte load (acquire) at a 4-aligned `off`: half of one atomic load of the
    /// word that holds it.
    #[inline]
    #[track_caller]
    pub fn load_u32(&self, off: u64) -> u32 {
        self.check_access(off, 4, 4);
        let (w, lo) = (off & !(WORD - 1), (off % WORD) as usize);
        // SAFETY: `off` is in bounds, so its word is too (`len` is a multiple of 8).
        let b = unsafe { self.load_word_bytes(w) };
        u32::from_ne_bytes([b[lo], b[lo + 1], b[lo + 2], b[lo + 3]])
    }
    /// Atomic 4-byte store (release) at a 4-aligned `off`: a masked update of the word that
    /// holds it, which leaves the word's other half alone. Not durable until persisted.
    #[inline]
    #[track_caller]
    pub fn store_u32(&self, off: u64, v: u32) {
        self.check_access(off, 4, 4);
        let (w, lo) = (off & !(WORD - 1), (off % WORD) as usize);
        // SAFETY: `off` is in bounds, so its word is too (`len` is a multiple of 8).
        unsafe { self.write_part(w, lo, &v.to_ne_bytes()) }
    }

    /// Copies `dst.len()` bytes from `off`: aligned words with one atomic load each, the
    /// partial words at the edges by loading the whole word and keeping the wanted bytes.
    #[track_caller]
    pub fn read(&self, off: u64, dst: &mut [u8]) {
        let n = dst.len() as u64;
        self.check_access(off, n, 1);
        if n == 0 {
            return;
        }
        let end = off + n;
        let mut i = 0usize;
        let mut o = off;
        let head = (off % WORD) as usize;
        if head != 0 {
            let w = off - head as u64;
            let take = (WORD as usize - head).min(dst.len());
            // SAFETY: `w` is 8-aligned and `w + 8 <= len` because the region holds `off`
            // and its length is a multiple of 8.
            let b = unsafe { self.load_word_bytes(w) };
            dst[..take].copy_from_slice(&b[head..head + take]);
            i = take;
            o = w + WORD;
        }
        let body_end = end & !(WORD - 1);
        if o < body_end {
            let words = ((body_end - o) / WORD) as usize;
            for (k, chunk) in dst[i..i + words * 8].chunks_exact_mut(8).enumerate() {
                // SAFETY: `o + 8 * k` is 8-aligned and ends by `body_end <= end <= len`.
                let v = unsafe { self.word(o + (k as u64) * WORD) }.load(Ordering::Acquire);
                chunk.copy_from_slice(&v.to_ne_bytes());
            }
            i += words * 8;
            o = body_end;
        }
        if o < end {
            let take = (end - o) as usize;
            // SAFETY: `o` is 8-aligned and below `end <= len`, a multiple of 8.
            let b = unsafe { self.load_word_bytes(o) };
            dst[i..i + take].copy_from_slice(&b[..take]);
        }
    }

    /// Copies `src` to `off`: aligned words with one atomic store each, the partial words
    /// at the edges with a masked compare-exchange that leaves their other bytes alone. Not
    /// durable until persisted.
    #[track_caller]
    pub fn write(&self, off: u64, src: &[u8]) {
        let n = src.len() as u64;
        self.check_access(off, n, 1);
        if n == 0 {
            return;
        }
        let end = off + n;
        let mut i = 0usize;
        let mut o = off;
        let head = (off % WORD) as usize;
        if head != 0 {
            let w = off - head as u64;
            let take = (WORD as usize - head).min(src.len());
            // SAFETY: as in `read`, the word holding `off` is inside the region.
            unsafe { self.write_part(w, head, &src[..take]) };
            i = take;
            o = w + WORD;
        }
        let body_end = end & !(WORD - 1);
        if o < body_end {
            let words = ((body_end - o) / WORD) as usize;
            for (k, chunk) in src[i..i + words * 8].chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                // SAFETY: `o + 8 * k` is 8-aligned and ends by `body_end <= end <= len`.
                unsafe { self.word(o + (k as u64) * WORD) }
                    .store(u64::from_ne_bytes(b), Ordering::Release);
            }
            i += words * 8;
            o = body_end;
        }
        if o < end {
            // SAFETY: as in `read`, `o` is 8-aligned and below `end <= len`.
            unsafe { self.write_part(o, 0, &src[i..]) };
        }
    }

    /// Fills `[off, off + len)` with `byte` (whole words where aligned, masked at the edges,
    /// as [`Pmem::write`]). Not durable until persisted.
    #[track_caller]
    pub fn fill(&self, off: u64, len: u64, byte: u8) {
        self.check_access(off, len, 1);
        if len == 0 {
            return;
        }
        let pattern = u64::from_ne_bytes([byte; 8]);
        let end = off + len;
        let mut o = off;
        let head = (off % WORD) as usize;
        if head != 0 {
            let w = off - head as u64;
            let hi = WORD.min(head as u64 + len) as usize;
            // SAFETY: as in `read`, the word holding `off` is inside the region.
            unsafe { self.store_masked(w, pattern, byte_mask(head, hi)) };
            o = w + WORD;
        }
        let body_end = end & !(WORD - 1);
        while o < body_end {
            // SAFETY: `o` is 8-aligned and `o + 8 <= body_end <= len`.
            unsafe { self.word(o) }.store(pattern, Ordering::Release);
            o += WORD;
        }
        if o < end {
            // SAFETY: as in `read`, `o` is 8-aligned and below `end <= len`.
            unsafe { self.store_masked(o, pattern, byte_mask(0, (end - o) as usize)) };
        }
    }

    /// Reads a plain-old-data structure at `off` (as [`Pmem::read`]).
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

    /// Writes a plain-old-data structure at `off` (as [`Pmem::write`]; not durable until
    /// persisted).
    #[track_caller]
    pub fn write_pod<T: Pod>(&self, off: u64, v: &T) {
        self.write(off, v.as_bytes());
    }

    /// Starts writing back `[off, off + len)`; durable after the next [`Pmem::fence`].
    #[inline]
    #[track_caller]
    pub fn flush(&self, off: u64, len: u64) {
        self.check_access(off, len, 1);
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

    #[test]
    #[should_panic(expected = "not a multiple of 8")]
    fn a_length_that_is_not_whole_words_is_refused() {
        let mut b = Box::new(Buf([0; 4096]));
        // SAFETY: as above (the constructor refuses before any access).
        let _ = unsafe { Pmem::new(b.0.as_mut_ptr(), 4092, NoPersist) };
    }

    /// A 4096-byte region over fresh memory.
    fn region(b: &mut Buf) -> Pmem<NoPersist> {
        // SAFETY: the buffer is 64-aligned, 4096 bytes, and outlives the returned `Pmem` (the
        // borrow of `b` ties them together).
        unsafe { Pmem::new(b.0.as_mut_ptr(), 4096, NoPersist) }
    }

    /// Background bytes, each different from its neighbours and from `!background`.
    fn background(i: usize) -> u8 {
        (i as u8).wrapping_mul(7).wrapping_add(3)
    }

    /// Where the exhaustive tests work: two cache lines, so offsets 0..=15 plus lengths
    /// 0..=24 stay inside, with neighbours on both sides.
    const WIN: u64 = 64;
    const WIN_LEN: usize = 128;

    fn set_background(pm: &Pmem<NoPersist>) -> Vec<u8> {
        let bg: Vec<u8> = (0..WIN_LEN).map(background).collect();
        for (k, w) in bg.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            pm.store_u64(WIN + 8 * k as u64, u64::from_ne_bytes(b));
        }
        bg
    }

    fn window(pm: &Pmem<NoPersist>) -> Vec<u8> {
        let mut out = vec![0u8; WIN_LEN];
        for (k, w) in out.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&pm.load_u64(WIN + 8 * k as u64).to_ne_bytes());
        }
        out
    }

    #[test]
    fn unaligned_reads_see_exactly_the_bytes_asked_for() {
        let mut b = Box::new(Buf([0; 4096]));
        let pm = region(&mut b);
        let bg = set_background(&pm);
        for off in 0..=15usize {
            for len in 0..=24usize {
                let at = 16 + off;
                let mut out = vec![!0u8; len];
                pm.read(WIN + at as u64, &mut out);
                assert_eq!(out, bg[at..at + len], "read of {len} bytes at +{off}");
            }
        }
        assert_eq!(window(&pm), bg, "reads change nothing");
    }

    #[test]
    fn unaligned_writes_round_trip_and_leave_neighbours_alone() {
        let mut b = Box::new(Buf([0; 4096]));
        let pm = region(&mut b);
        for off in 0..=15usize {
            for len in 0..=24usize {
                let mut model = set_background(&pm);
                let at = 16 + off;
                let data: Vec<u8> = (at..at + len).map(|i| !background(i)).collect();
                pm.write(WIN + at as u64, &data);
                model[at..at + len].copy_from_slice(&data);
                assert_eq!(window(&pm), model, "write of {len} bytes at +{off}");
                let mut out = vec![0u8; len];
                pm.read(WIN + at as u64, &mut out);
                assert_eq!(out, data, "read back {len} bytes at +{off}");
            }
        }
    }

    #[test]
    fn unaligned_fills_cover_exactly_their_range() {
        let mut b = Box::new(Buf([0; 4096]));
        let pm = region(&mut b);
        for off in 0..=15usize {
            for len in 0..=24usize {
                let mut model = set_background(&pm);
                let at = 16 + off;
                pm.fill(WIN + at as u64, len as u64, 0xEE);
                model[at..at + len].fill(0xEE);
                assert_eq!(window(&pm), model, "fill of {len} bytes at +{off}");
            }
        }
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Trio {
        a: u64,
        b: u32,
        c: u32,
    }
    const _: () = assert!(core::mem::size_of::<Trio>() == 16);
    dinomo_shared::impl_pod!(Trio);

    #[test]
    fn pods_at_unaligned_offsets_round_trip() {
        let mut b = Box::new(Buf([0; 4096]));
        let pm = region(&mut b);
        for off in 0..=15u64 {
            let mut model = set_background(&pm);
            let v = Trio {
                a: 0x0102_0304_0506_0708 ^ off,
                b: 0x1112_1314,
                c: 0x2122_2324 + off as u32,
            };
            pm.write_pod(WIN + 16 + off, &v);
            assert_eq!(pm.read_pod::<Trio>(WIN + 16 + off), v);
            let at = 16 + off as usize;
            model[at..at + 16].copy_from_slice(v.as_bytes());
            assert_eq!(window(&pm), model, "pod at +{off}");
        }
    }

    #[test]
    fn u32_accessors_leave_the_other_half_of_the_word_alone() {
        let mut b = Box::new(Buf([0; 4096]));
        let pm = region(&mut b);
        let word = u64::from_ne_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        pm.store_u64(128, word);
        assert_eq!(pm.load_u32(128), u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(pm.load_u32(132), u32::from_ne_bytes([5, 6, 7, 8]));
        pm.store_u32(132, 0xA0B0_C0D0);
        assert_eq!(pm.load_u32(128), u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(pm.load_u32(132), 0xA0B0_C0D0);
        let mut out = [0u8; 8];
        pm.read(128, &mut out);
        let hi = 0xA0B0_C0D0u32.to_ne_bytes();
        assert_eq!(out, [1, 2, 3, 4, hi[0], hi[1], hi[2], hi[3]]);
        pm.store_u32(128, 0x1122_3344);
        assert_eq!(pm.load_u32(132), 0xA0B0_C0D0);
        assert_eq!(pm.load_u32(128), 0x1122_3344);
        assert_eq!(pm.load_u64(120), 0, "the word before is untouched");
        assert_eq!(pm.load_u64(136), 0, "the word after is untouched");
    }

    #[test]
    #[should_panic(expected = "not 4-byte aligned")]
    fn u32_accessors_want_4_byte_alignment() {
        let mut b = Box::new(Buf([0; 4096]));
        let pm = region(&mut b);
        pm.store_u32(130, 1);
    }

    /// Accesses that touch the first and last bytes of a region stay inside it: a region of
    /// 48 bytes at the start of a larger buffer whose other bytes are watched.
    #[test]
    fn edge_words_stay_inside_the_region() {
        const LEN: u64 = 48;
        let mut b = Box::new(Buf([0; 4096]));
        let whole = region(&mut b);
        whole.fill(LEN, 64, 0x5A);
        // SAFETY: the first 48 bytes of the same buffer, which outlives `pm`; both handles
        // access it only with whole-word atomics.
        let pm = unsafe { Pmem::new(whole.base_ptr(), LEN, NoPersist) };
        let mut model = vec![0u8; LEN as usize];
        for len in 0..=24u64 {
            for off in (0..=LEN - len).filter(|&o| o < 16 || o + len + 16 > LEN) {
                let data: Vec<u8> = (0..len).map(|i| (off * 31 + i) as u8 | 1).collect();
                pm.write(off, &data);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                let mut out = vec![0u8; len as usize];
                pm.read(off, &mut out);
                assert_eq!(out, data, "{len} bytes at {off}");
                pm.fill(off, len, len as u8);
                model[off as usize..(off + len) as usize].fill(len as u8);
            }
        }
        let mut all = vec![0u8; LEN as usize];
        pm.read(0, &mut all);
        assert_eq!(all, model);
        let mut beyond = vec![0u8; 64];
        whole.read(LEN, &mut beyond);
        assert!(
            beyond.iter().all(|&x| x == 0x5A),
            "bytes past the region changed"
        );
    }

    /// The value byte `i` gets in `round` of a race: different from round to round.
    fn racing_value(round: u32, i: usize) -> u8 {
        (round as u8).wrapping_add(i as u8)
    }

    /// Two threads write alternate `step`-byte pieces of one word many times with
    /// `write_one`; each checks after every round that its own bytes hold what it wrote
    /// last (nobody else writes them), and at the end every byte holds its writer's last
    /// value. An update of part of a word that rewrote the other part from a stale copy
    /// (a load and a store instead of a compare-exchange) fails this.
    fn race_disjoint_writers(step: usize, write_one: impl Fn(&Pmem<NoPersist>, u64, &[u8]) + Sync) {
        const BYTES: usize = 8;
        const ROUNDS: u32 = 200_000;
        let mut b = Box::new(Buf([0; 4096]));
        let pm = region(&mut b);
        let barrier = std::sync::Barrier::new(2);
        let mine = |who: usize, i: usize| (i / step) % 2 == who;
        std::thread::scope(|s| {
            for who in 0..2usize {
                let (pm, barrier, write_one) = (&pm, &barrier, &write_one);
                s.spawn(move || {
                    barrier.wait();
                    let mut out = [0u8; BYTES];
                    for round in 0..ROUNDS {
                        for i in (0..BYTES).step_by(step).filter(|&i| mine(who, i)) {
                            let mut v = [0u8; BYTES];
                            for (j, x) in v[..step].iter_mut().enumerate() {
                                *x = racing_value(round, i + j);
                            }
                            write_one(pm, i as u64, &v[..step]);
                        }
                        pm.read(0, &mut out);
                        for (i, &x) in out.iter().enumerate().filter(|&(i, _)| mine(who, i)) {
                            assert_eq!(
                                x,
                                racing_value(round, i),
                                "writer {who} lost byte {i} in round {round}"
                            );
                        }
                    }
                });
            }
        });
        let mut out = [0u8; BYTES];
        pm.read(0, &mut out);
        for (i, &x) in out.iter().enumerate() {
            assert_eq!(x, racing_value(ROUNDS - 1, i), "byte {i} at the end");
        }
    }

    #[test]
    fn racing_single_byte_writers_of_one_word_lose_nothing() {
        race_disjoint_writers(1, |pm, off, v| pm.write(off, v));
    }

    #[test]
    fn racing_u32_writers_of_one_word_lose_nothing() {
        race_disjoint_writers(4, |pm, off, v| {
            let mut b = [0u8; 4];
            b.copy_from_slice(v);
            pm.store_u32(off, u32::from_ne_bytes(b));
        });
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, Vec<u8>),
        Fill(u64, u64, u8),
        StoreU32(u64, u32),
        StoreU64(u64, u64),
        Read(u64, u64),
    }

    /// The region of the model test.
    const MODEL_LEN: u64 = 256;

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..MODEL_LEN, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(o, mut d)| {
                d.truncate((MODEL_LEN - o) as usize);
                Op::Write(o, d)
            }),
            (0..MODEL_LEN, 0..40u64, any::<u8>()).prop_map(|(o, n, b)| Op::Fill(
                o,
                n.min(MODEL_LEN - o),
                b
            )),
            (0..MODEL_LEN / 4, any::<u32>()).prop_map(|(k, v)| Op::StoreU32(4 * k, v)),
            (0..MODEL_LEN / 8, any::<u64>()).prop_map(|(k, v)| Op::StoreU64(8 * k, v)),
            (0..MODEL_LEN, 0..40u64).prop_map(|(o, n)| Op::Read(o, n.min(MODEL_LEN - o))),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn accesses_behave_like_a_byte_array(ops in proptest::collection::vec(op(), 1..64)) {
            let mut b = Box::new(Buf([0; 4096]));
            let pm = region(&mut b);
            let mut model = vec![0u8; MODEL_LEN as usize];
            for op in &ops {
                match *op {
                    Op::Write(o, ref d) => {
                        pm.write(o, d);
                        model[o as usize..o as usize + d.len()].copy_from_slice(d);
                    }
                    Op::Fill(o, n, x) => {
                        pm.fill(o, n, x);
                        model[o as usize..(o + n) as usize].fill(x);
                    }
                    Op::StoreU32(o, v) => {
                        pm.store_u32(o, v);
                        model[o as usize..o as usize + 4].copy_from_slice(&v.to_ne_bytes());
                        proptest::prop_assert_eq!(pm.load_u32(o), v);
                    }
                    Op::StoreU64(o, v) => {
                        pm.store_u64(o, v);
                        model[o as usize..o as usize + 8].copy_from_slice(&v.to_ne_bytes());
                    }
                    Op::Read(o, n) => {
                        let mut out = vec![0u8; n as usize];
                        pm.read(o, &mut out);
                        proptest::prop_assert_eq!(&out[..], &model[o as usize..(o + n) as usize]);
                    }
                }
            }
            let mut all = vec![0u8; MODEL_LEN as usize];
            pm.read(0, &mut all);
            proptest::prop_assert_eq!(all, model);
            let mut rest = vec![0u8; 64];
            pm.read(MODEL_LEN, &mut rest);
            proptest::prop_assert!(rest.iter().all(|&x| x == 0), "bytes past the model changed");
        }
    }
}
