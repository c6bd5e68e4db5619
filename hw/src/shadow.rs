//! A persistence backend for crash tests: it keeps a separate *durable image* that only
//! persisted bytes reach, and can cut the power at any persist point.
//!
//! Stores go to the working memory. [`Persist::flush`] marks cache lines; [`Persist::fence`]
//! is a persist point: it copies the marked lines into the durable image. With a crash
//! budget set, the fence after the budget is used up does not complete: it panics with
//! [`PowerFailure`], which the test catches ([`catch_power_failure`]). The image a restart
//! sees is then the durable image plus, optionally, any subset of the lines that were
//! dirty at the instant of the failure (caches may write back any line at any time).

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use dinomo_shared::CACHE_LINE;

use crate::pmem::{Persist, Pmem};

/// Panic payload of a simulated power failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerFailure {
    /// The persist point (1-based fence count) that did not complete.
    pub at_fence: u64,
}

#[repr(C, align(64))]
struct Line([AtomicU64; 8]);

struct State {
    durable: Vec<u8>,
    pending: Vec<u64>,
    fences: u64,
    budget: Option<u64>,
    failed: Option<PowerFailure>,
}

/// Working memory plus a durable image.
pub struct ShadowRegion {
    working: Box<[Line]>,
    len: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for ShadowRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowRegion")
            .field("len", &self.len)
            .finish()
    }
}

impl ShadowRegion {
    /// A zeroed region of `len` bytes (rounded up to whole cache lines).
    pub fn new(len: u64) -> Arc<Self> {
        Self::from_image(&vec![0u8; len as usize])
    }

    /// A region whose working memory and durable image both start as `image` (a restart).
    pub fn from_image(image: &[u8]) -> Arc<Self> {
        let lines = image.len().div_ceil(CACHE_LINE);
        let working: Box<[Line]> = (0..lines)
            .map(|i| {
                Line(core::array::from_fn(|w| {
                    let o = i * CACHE_LINE + w * 8;
                    let mut b = [0u8; 8];
                    if o < image.len() {
                        let n = (image.len() - o).min(8);
                        b[..n].copy_from_slice(&image[o..o + n]);
                    }
                    AtomicU64::new(u64::from_le_bytes(b))
                }))
            })
            .collect();
        let mut durable = image.to_vec();
        durable.resize(lines * CACHE_LINE, 0);
        Arc::new(Self {
            working,
            len: image.len() as u64,
            state: Mutex::new(State {
                durable,
                pending: Vec::new(),
                fences: 0,
                budget: None,
                failed: None,
            }),
        })
    }

    /// A [`Pmem`] over the working memory that persists into this shadow. Its length is the
    /// region's rounded up to a multiple of 8 (a [`Pmem`] is made of whole words); the
    /// images stay the region's length.
    pub fn pmem(self: &Arc<Self>) -> Pmem<Arc<Self>> {
        let base = self.working.as_ptr() as *mut u8;
        let len = self.len.next_multiple_of(8);
        // SAFETY: `working` is 64-byte aligned (`Line` is) and `len` rounded up to whole
        // cache lines long, so it holds `len` rounded up to whole words; it is only
        // accessed atomically, with whole words, and kept alive by the `Arc` held inside
        // the returned `Pmem`.
        unsafe { Pmem::new(base, len, Arc::clone(self)) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A power failure panics while no guard is held, so poisoning only follows a real bug;
        // the state is still consistent then.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power at persist point `budget + 1` (`None`: never).
    pub fn set_crash_after(&self, budget: Option<u64>) {
        let mut s = self.state();
        s.budget = budget.map(|b| s.fences + b);
    }
    /// Persist points completed so far.
    pub fn fences(&self) -> u64 {
        self.state().fences
    }
    /// The power failure, if one happened.
    pub fn failure(&self) -> Option<PowerFailure> {
        self.state().failed
    }

    fn working_line(&self, i: usize) -> [u8; CACHE_LINE] {
        let mut out = [0u8; CACHE_LINE];
        for (w, word) in self.working[i].0.iter().enumerate() {
            out[w * 8..w * 8 + 8].copy_from_slice(&word.load(Ordering::Acquire).to_le_bytes());
        }
        out
    }

    /// What survives a power failure now: exactly the persisted bytes.
    pub fn durable_image(&self) -> Vec<u8> {
        let mut d = self.state().durable.clone();
        d.truncate(self.len as usize);
        d
    }

    /// What survives a power failure now if the caches had written back some dirty lines on
    /// their own: the durable image plus each line that differs from it in working memory
    /// with probability `percent`/100, chosen by `seed`.
    pub fn crash_image(&self, seed: u64, percent: u8) -> Vec<u8> {
        let mut d = self.state().durable.clone();
        let mut x = seed | 1;
        for i in 0..self.working.len() {
            let line = self.working_line(i);
            let span = i * CACHE_LINE..(i + 1) * CACHE_LINE;
            if d[span.clone()] != line {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 100 < percent as u64 {
                    d[span].copy_from_slice(&line);
                }
            }
        }
        d.truncate(self.len as usize);
        d
    }
}

impl Persist for ShadowRegion {
    fn flush(&self, _base: *const u8, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / CACHE_LINE as u64;
        let last = (off + len - 1) / CACHE_LINE as u64;
        let mut s = self.state();
        s.pending.extend(first..=last);
    }

    fn fence(&self) {
        let mut s = self.state();
        if let Some(f) = s.failed {
            // Power is already off: nothing more completes.
            drop(s);
            panic::panic_any(f);
        }
        s.fences += 1;
        if matches!(s.budget, Some(b) if s.fences > b) {
            let f = PowerFailure { at_fence: s.fences };
            s.failed = Some(f);
            drop(s);
            panic::panic_any(f);
        }
        let pending = std::mem::take(&mut s.pending);
        for line in pending {
            let bytes = self.working_line(line as usize);
            let at = line as usize * CACHE_LINE;
            s.durable[at..at + CACHE_LINE].copy_from_slice(&bytes);
        }
    }
}

/// Runs `f`, turning a simulated power failure into `Err`. Other panics propagate.
pub fn catch_power_failure<T>(f: impl FnOnce() -> T) -> Result<T, PowerFailure> {
    silence_power_failure_panics();
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => match payload.downcast::<PowerFailure>() {
            Ok(pf) => Err(*pf),
            Err(other) => panic::resume_unwind(other),
        },
    }
}

/// Keeps simulated power failures out of the test output; other panics print as usual.
pub fn silence_power_failure_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<PowerFailure>().is_none() {
                prev(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_persisted_lines_survive() {
        let r = ShadowRegion::new(4096);
        let pm = r.pmem();
        pm.store_u64(0, 1);
        pm.store_u64(64, 2);
        pm.persist(0, 8);
        let img = r.durable_image();
        assert_eq!(img[0], 1);
        assert_eq!(img[64], 0, "an unpersisted line must not be durable");
        let all = r.crash_image(7, 100);
        assert_eq!(all[64], 2, "with 100% eviction every dirty line is durable");
    }

    #[test]
    fn power_fails_at_the_chosen_fence() {
        let r = ShadowRegion::new(4096);
        let pm = r.pmem();
        r.set_crash_after(Some(2));
        let res = catch_power_failure(|| {
            for i in 0..10u64 {
                pm.store_u64(i * 64, i + 1);
                pm.persist(i * 64, 8);
            }
        });
        assert_eq!(res, Err(PowerFailure { at_fence: 3 }));
        let img = r.durable_image();
        assert_eq!((img[0], img[64], img[128]), (1, 2, 0));
        // Restart from the image.
        let r2 = ShadowRegion::from_image(&img);
        assert_eq!(r2.pmem().load_u64(64), 2);
    }
}
