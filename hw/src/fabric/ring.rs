//! A single-producer, single-consumer ring of 64-byte control [`Frame`]s in raw shared
//! memory.
//!
//! The ring lives in memory that two parties map: a heap allocation shared by two threads, or
//! a `MAP_SHARED` file shared by two processes. It therefore holds no Rust references and no
//! pointers, only words accessed atomically, and starts with a fixed `repr(C)` header (magic,
//! capacity) so that a mapping made by another process can be validated before use.
//!
//! Layout (all offsets from the ring's base, which must be 64-byte aligned):
//!
//! ```text
//!   0   meta line: magic u64, capacity u64 (slots, a power of two), padding
//!  64   head line: frames consumed so far (written by the consumer only)
//! 128   tail line: frames produced so far (written by the producer only)
//! 192   capacity × 64-byte slots
//! ```
//!
//! Head and tail are free-running counters on separate cache lines, so the two parties never
//! write the same line except when they touch the same slot. A frame is published by storing
//! its eight words and then advancing `tail` with release ordering; it is taken by loading
//! `tail` with acquire ordering, copying the words, then advancing `head` with release
//! ordering, which hands the slot back to the producer.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use dinomo_shared::msg::{Frame, MSG_SIZE};

/// Identifies an initialised ring ("DNMORING").
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"DNMORING");

/// Bytes of the ring header (meta, head and tail lines).
pub const RING_HEADER_BYTES: usize = 3 * 64;

/// The ring header as laid out in memory. Only for documentation of the layout and size
/// checks: the ring itself accesses these words through atomics.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct RingHeader {
    pub magic: u64,
    pub capacity: u64,
    _meta_pad: [u64; 6],
    pub head: u64,
    _head_pad: [u64; 7],
    pub tail: u64,
    _tail_pad: [u64; 7],
}

const _: () = assert!(core::mem::size_of::<RingHeader>() == RING_HEADER_BYTES);
const _: () = assert!(MSG_SIZE == 64);

const OFF_MAGIC: usize = 0;
const OFF_CAPACITY: usize = 8;
const OFF_HEAD: usize = 64;
const OFF_TAIL: usize = 128;
const WORDS_PER_FRAME: usize = MSG_SIZE / 8;

/// Bytes a ring of `capacity` frames occupies.
pub const fn ring_bytes(capacity: u32) -> usize {
    RING_HEADER_BYTES + capacity as usize * MSG_SIZE
}

/// Why memory could not be used as a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring capacity {0} is not a non-zero power of two")]
    BadCapacity(u64),
    #[error("ring memory is not 64-byte aligned")]
    Misaligned,
    #[error("ring of {capacity} frames needs {need} bytes, only {have} available")]
    TooSmall {
        capacity: u64,
        need: usize,
        have: usize,
    },
    #[error("no ring here (magic {0:#018x})")]
    BadMagic(u64),
    #[error("ring counters are inconsistent (head {head}, tail {tail}, capacity {capacity})")]
    Corrupt { head: u64, tail: u64, capacity: u64 },
}

/// A view of a ring in raw memory. Cheap to copy; it does not own the memory.
///
/// Which side calls [`RingView::push`] and which calls [`RingView::pop`] is a protocol
/// matter (one producer, one consumer): breaking it can lose or duplicate frames but cannot
/// cause undefined behaviour, because every access is atomic.
#[derive(Clone, Copy)]
pub struct RingView {
    base: NonNull<u8>,
    mask: u64,
}

// SAFETY: a `RingView` only performs atomic accesses on memory that the constructor's
// contract keeps valid and shared; nothing in it is tied to a thread.
unsafe impl Send for RingView {}
// SAFETY: as above; `&RingView` allows only atomic loads and stores.
unsafe impl Sync for RingView {}

impl fmt::Debug for RingView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingView")
            .field("capacity", &self.capacity())
            .field("head", &self.head().load(Ordering::Relaxed))
            .field("tail", &self.tail().load(Ordering::Relaxed))
            .finish()
    }
}

fn check_memory(base: *mut u8, len: usize, capacity: u64) -> Result<NonNull<u8>, RingError> {
    if capacity == 0 || !capacity.is_power_of_two() || capacity > u32::MAX as u64 {
        return Err(RingError::BadCapacity(capacity));
    }
    let base = NonNull::new(base).ok_or(RingError::Misaligned)?;
    if base.as_ptr() as usize % 64 != 0 {
        return Err(RingError::Misaligned);
    }
    let need = ring_bytes(capacity as u32);
    if len < need {
        return Err(RingError::TooSmall {
            capacity,
            need,
            have: len,
        });
    }
    Ok(base)
}

impl RingView {
    /// Writes an empty ring of `capacity` frames at `base` and returns a view of it.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes for as long as this view or
    /// any copy of it is used, and every other party must access that memory only with
    /// atomic 8-byte operations (as another `RingView` does). No other party may be using
    /// the ring while it is initialised.
    pub unsafe fn init(base: *mut u8, len: usize, capacity: u32) -> Result<Self, RingError> {
        let base = check_memory(base, len, capacity as u64)?;
        let ring = Self {
            base,
            mask: capacity as u64 - 1,
        };
        // Zero every slot so a fresh ring never shows stale bytes.
        for i in 0..capacity as u64 {
            for w in 0..WORDS_PER_FRAME {
                ring.slot_word(i, w).store(0, Ordering::Relaxed);
            }
        }
        ring.word(OFF_CAPACITY)
            .store(capacity as u64, Ordering::Relaxed);
        ring.head().store(0, Ordering::Relaxed);
        ring.tail().store(0, Ordering::Relaxed);
        ring.word(OFF_MAGIC).store(RING_MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// Attaches to a ring initialised earlier (perhaps by another process) at `base`,
    /// validating its header against the `len` bytes available.
    ///
    /// # Safety
    /// As for [`RingView::init`], except that the ring may be in use.
    pub unsafe fn attach(base: *mut u8, len: usize) -> Result<Self, RingError> {
        // Validate what can be validated before reading the header.
        check_memory(base, len, 1)?;
        let probe = Self {
            base: NonNull::new(base).ok_or(RingError::Misaligned)?,
            mask: 0,
        };
        let magic = probe.word(OFF_MAGIC).load(Ordering::Acquire);
        if magic != RING_MAGIC {
            return Err(RingError::BadMagic(magic));
        }
        let capacity = probe.word(OFF_CAPACITY).load(Ordering::Relaxed);
        let base = check_memory(base, len, capacity)?;
        let ring = Self {
            base,
            mask: capacity - 1,
        };
        let (head, tail) = (
            ring.head().load(Ordering::Acquire),
            ring.tail().load(Ordering::Acquire),
        );
        if tail.wrapping_sub(head) > capacity {
            return Err(RingError::Corrupt {
                head,
                tail,
                capacity,
            });
        }
        Ok(ring)
    }

    #[inline]
    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off < RING_HEADER_BYTES);
        // SAFETY: `off` is a multiple of 8 inside the header, which the constructor checked
        // to lie in valid, 64-aligned memory that is only accessed atomically.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    #[inline]
    fn head(&self) -> &AtomicU64 {
        self.word(OFF_HEAD)
    }

    #[inline]
    fn tail(&self) -> &AtomicU64 {
        self.word(OFF_TAIL)
    }

    #[inline]
    fn slot_word(&self, index: u64, w: usize) -> &AtomicU64 {
        let slot = (index & self.mask) as usize;
        let off = RING_HEADER_BYTES + slot * MSG_SIZE + w * 8;
        debug_assert!(w < WORDS_PER_FRAME);
        // SAFETY: `slot < capacity` (masked) and `w < 8`, so the word lies inside the
        // `ring_bytes(capacity)` bytes checked by the constructor; it is 8-aligned because the
        // base is 64-aligned and every offset here is a multiple of 8.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    /// Frames the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.mask as usize + 1
    }

    /// Frames waiting to be consumed (a snapshot).
    pub fn len(&self) -> usize {
        let tail = self.tail().load(Ordering::Acquire);
        let head = self.head().load(Ordering::Acquire);
        tail.wrapping_sub(head).min(self.mask + 1) as usize
    }

    /// Whether no frame is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a push would fail now (a snapshot).
    pub fn is_full(&self) -> bool {
        self.len() == self.capacity()
    }

    /// Appends a frame (producer side). Returns `false`, changing nothing, if the ring is full.
    pub fn push(&self, frame: &Frame) -> bool {
        let tail = self.tail().load(Ordering::Relaxed);
        let head = self.head().load(Ordering::Acquire);
        if tail.wrapping_sub(head) > self.mask {
            return false;
        }
        for (w, v) in frame_words(frame).into_iter().enumerate() {
            self.slot_word(tail, w).store(v, Ordering::Relaxed);
        }
        self.tail().store(tail.wrapping_add(1), Ordering::Release);
        true
    }

    /// Takes the oldest frame (consumer side), if any.
    pub fn pop(&self) -> Option<Frame> {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        if tail == head {
            return None;
        }
        let mut words = [0u64; WORDS_PER_FRAME];
        for (w, v) in words.iter_mut().enumerate() {
            *v = self.slot_word(head, w).load(Ordering::Relaxed);
        }
        self.head().store(head.wrapping_add(1), Ordering::Release);
        Some(words_frame(&words))
    }

    /// Empties the ring. Only while neither party uses it (e.g. when a connection slot
    /// changes hands).
    pub fn reset(&self) {
        let tail = self.tail().load(Ordering::Acquire);
        self.head().store(tail, Ordering::Release);
    }
}

fn frame_words(f: &Frame) -> [u64; WORDS_PER_FRAME] {
    let mut w = [0u64; WORDS_PER_FRAME];
    w[0] = f.kind as u64 | (f.status as u64) << 16 | (f.req_id as u64) << 32;
    w[1..].copy_from_slice(&f.args);
    w
}

fn words_frame(w: &[u64; WORDS_PER_FRAME]) -> Frame {
    let mut args = [0u64; 7];
    args.copy_from_slice(&w[1..]);
    Frame {
        kind: w[0] as u16,
        status: (w[0] >> 16) as u16,
        req_id: (w[0] >> 32) as u32,
        args,
    }
}

/// 64-byte aligned, zeroed storage for rings and control blocks in one process.
#[derive(Debug)]
pub struct HeapBlock {
    lines: Box<[CacheLine]>,
}

#[repr(C, align(64))]
#[derive(Debug)]
struct CacheLine([AtomicU64; 8]);

impl HeapBlock {
    /// At least `len` zeroed bytes (rounded up to whole cache lines).
    pub fn new(len: usize) -> Self {
        let lines = (0..len.div_ceil(64))
            .map(|_| CacheLine(Default::default()))
            .collect();
        Self { lines }
    }
    /// Bytes available.
    pub fn len(&self) -> usize {
        self.lines.len() * 64
    }
    /// Whether the block is empty.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
    /// The base address; the memory is interior-mutable (atomics), so sharing it is sound.
    pub fn as_ptr(&self) -> *mut u8 {
        self.lines.as_ptr().cast_mut().cast()
    }
}

/// A ring in its own heap allocation, shared by threads of one process.
#[derive(Debug)]
pub struct HeapRing {
    _mem: HeapBlock,
    view: RingView,
}

impl HeapRing {
    /// An empty ring of `capacity` frames (a non-zero power of two).
    pub fn new(capacity: u32) -> Result<Self, RingError> {
        let mem = HeapBlock::new(ring_bytes(capacity));
        // SAFETY: `mem` is 64-aligned, at least `ring_bytes(capacity)` bytes, made of atomics,
        // and owned by the returned value, which hands out the view only by reference.
        let view = unsafe { RingView::init(mem.as_ptr(), mem.len(), capacity)? };
        Ok(Self { _mem: mem, view })
    }
    /// The ring; valid as long as `self`.
    pub fn view(&self) -> &RingView {
        &self.view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: u64) -> Frame {
        Frame {
            kind: i as u16,
            status: (i >> 3) as u16,
            req_id: i as u32 ^ 0xABCD_0000,
            args: [i, i + 1, i + 2, i + 3, i + 4, i + 5, u64::MAX - i],
        }
    }

    #[test]
    fn fifo_full_empty_and_wraparound() {
        let ring = HeapRing::new(4).expect("ring");
        let r = ring.view();
        assert!(r.is_empty());
        assert_eq!(r.pop(), None);
        for i in 0..4 {
            assert!(r.push(&frame(i)));
        }
        assert!(r.is_full());
        assert!(!r.push(&frame(99)), "a full ring refuses");
        assert_eq!(r.len(), 4);
        // Many laps around the four slots, with the ring kept partly full.
        let mut next_in = 4;
        let mut next_out = 0;
        for _ in 0..50 {
            assert_eq!(r.pop(), Some(frame(next_out)));
            next_out += 1;
            assert_eq!(r.pop(), Some(frame(next_out)));
            next_out += 1;
            assert!(r.push(&frame(next_in)));
            assert!(r.push(&frame(next_in + 1)));
            next_in += 2;
            assert!(r.is_full());
        }
        while let Some(f) = r.pop() {
            assert_eq!(f, frame(next_out));
            next_out += 1;
        }
        assert_eq!(next_out, next_in);
        assert!(r.is_empty());
    }

    #[test]
    fn attach_validates_header() {
        let mem = HeapBlock::new(ring_bytes(8));
        // SAFETY: `mem` is 64-aligned, large enough, atomics only, and outlives the views.
        let a = unsafe { RingView::attach(mem.as_ptr(), mem.len()) };
        assert_eq!(a.err(), Some(RingError::BadMagic(0)));
        // SAFETY: as above.
        let r = unsafe { RingView::init(mem.as_ptr(), mem.len(), 8) }.expect("init");
        assert!(r.push(&frame(7)));
        // SAFETY: as above.
        let b = unsafe { RingView::attach(mem.as_ptr(), mem.len()) }.expect("attach");
        assert_eq!(b.capacity(), 8);
        assert_eq!(b.pop(), Some(frame(7)));
        // SAFETY: as above; the length is deliberately too short.
        let short = unsafe { RingView::attach(mem.as_ptr(), ring_bytes(4)) };
        assert!(matches!(
            short,
            Err(RingError::TooSmall { capacity: 8, .. })
        ));
        // SAFETY: as above.
        let bad = unsafe { RingView::init(mem.as_ptr(), mem.len(), 6) };
        assert_eq!(bad.err(), Some(RingError::BadCapacity(6)));
        assert!(HeapRing::new(0).is_err());
    }

    #[test]
    fn two_threads_transfer_in_order() {
        let ring = std::sync::Arc::new(HeapRing::new(8).expect("ring"));
        const N: u64 = 20_000;
        let producer = {
            let ring = std::sync::Arc::clone(&ring);
            std::thread::spawn(move || {
                for i in 0..N {
                    while !ring.view().push(&frame(i)) {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut i = 0;
        while i < N {
            match ring.view().pop() {
                Some(f) => {
                    assert_eq!(f, frame(i));
                    i += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        producer.join().expect("producer");
        assert!(ring.view().is_empty());
    }
}
