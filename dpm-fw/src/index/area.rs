//! The index-area allocator: a volatile bitmap of 64-byte units.
//!
//! Nothing about allocation is persisted: after a restart `Index::open` marks exactly the
//! units reachable from the root (current table and its overflow chains), so anything an
//! interrupted operation had allocated but not linked is free again.
//!
//! Bucket arrays are taken first-fit from the low end and single overflow buckets from the
//! high end, so that overflow buckets do not fragment the space the next, larger table needs.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Bitmap over `units` units; a set bit is a unit in use.
pub(super) struct AreaAlloc {
    words: Vec<u64>,
    units: u64,
    used: u64,
    /// Every word above this index is full (so single-unit searches start here).
    top: usize,
}

impl fmt::Debug for AreaAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AreaAlloc")
            .field("units", &self.units)
            .field("used", &self.used)
            .finish()
    }
}

impl AreaAlloc {
    /// All `units` units free.
    pub(super) fn new(units: u64) -> Self {
        let n_words = units.div_ceil(64) as usize;
        let mut words = vec![0u64; n_words];
        // Bits past the end are permanently in use so that searches never return them.
        let tail = units % 64;
        if tail != 0 {
            if let Some(last) = words.last_mut() {
                *last = !0u64 << tail;
            }
        }
        Self {
            words,
            units,
            used: 0,
            top: n_words.saturating_sub(1),
        }
    }

    pub(super) fn free_units(&self) -> u64 {
        self.units - self.used
    }

    pub(super) fn used_units(&self) -> u64 {
        self.used
    }

    pub(super) fn is_used(&self, unit: u64) -> bool {
        unit >= self.units || self.words[(unit / 64) as usize] & (1 << (unit % 64)) != 0
    }

    /// Marks `[unit, unit + n)` in use; every unit must be free and in range.
    pub(super) fn mark(&mut self, unit: u64, n: u64) {
        for u in unit..unit + n {
            debug_assert!(!self.is_used(u));
            self.words[(u / 64) as usize] |= 1 << (u % 64);
        }
        self.used += n;
    }

    /// Frees `[unit, unit + n)`; every unit must be in use.
    pub(super) fn free(&mut self, unit: u64, n: u64) {
        for u in unit..unit + n {
            debug_assert!(u < self.units && self.is_used(u));
            self.words[(u / 64) as usize] &= !(1 << (u % 64));
        }
        self.used -= n;
        if n > 0 {
            self.top = self.top.max(((unit + n - 1) / 64) as usize);
        }
    }

    /// The lowest run of `n` free units, marked in use.
    pub(super) fn alloc_run(&mut self, n: u64) -> Option<u64> {
        if n == 0 || n > self.units - self.used {
            return None;
        }
        let mut u = 0u64;
        while u < self.units {
            // Skip to the next free unit.
            let w = self.words[(u / 64) as usize] | ((1u64 << (u % 64)) - 1);
            if w == !0 {
                u = (u / 64 + 1) * 64;
                continue;
            }
            let start = (u / 64) * 64 + (!w).trailing_zeros() as u64;
            // Measure the free run from `start`, up to `n`.
            let mut end = start;
            while end < self.units && end - start < n {
                let w = self.words[(end / 64) as usize] >> (end % 64);
                let free = if w == 0 {
                    64 - end % 64
                } else {
                    w.trailing_zeros() as u64
                };
                if free == 0 {
                    break;
                }
                end += free;
            }
            if end - start >= n {
                self.mark(start, n);
                return Some(start);
            }
            u = end;
        }
        None
    }

    /// The highest free unit, marked in use.
    pub(super) fn alloc_one(&mut self) -> Option<u64> {
        let mut i = self.top;
        loop {
            let w = *self.words.get(i)?;
            if w != !0 {
                let bit = 63 - (!w).leading_zeros() as u64;
                let unit = i as u64 * 64 + bit;
                self.top = i;
                self.mark(unit, 1);
                return Some(unit);
            }
            if i == 0 {
                self.top = 0;
                return None;
            }
            i -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_first_fit_and_singles_come_from_the_top() {
        let mut a = AreaAlloc::new(200);
        assert_eq!(a.alloc_run(10), Some(0));
        assert_eq!(a.alloc_one(), Some(199));
        assert_eq!(a.alloc_one(), Some(198));
        assert_eq!(a.alloc_run(70), Some(10));
        a.free(0, 10);
        assert_eq!(a.alloc_run(11), Some(80));
        assert_eq!(a.alloc_run(10), Some(0));
        assert_eq!(a.used_units(), 10 + 2 + 70 + 11);
        a.free(198, 2);
        assert_eq!(a.alloc_one(), Some(199));
        assert_eq!(a.alloc_run(109), None);
        assert_eq!(a.alloc_run(108), Some(91));
        assert_eq!(a.alloc_one(), None);
        assert_eq!(a.used_units(), 200);
    }

    #[test]
    fn exhaustive_small_sizes_agree_with_a_naive_model() {
        for units in 1..150u64 {
            let mut a = AreaAlloc::new(units);
            let mut model = vec![false; units as usize];
            let mut x = units * 7919 + 1;
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match x % 3 {
                    0 => {
                        let n = x / 3 % 20 + 1;
                        let want = (0..units)
                            .find(|&s| s + n <= units && (s..s + n).all(|u| !model[u as usize]));
                        assert_eq!(a.alloc_run(n), want);
                        if let Some(s) = want {
                            (s..s + n).for_each(|u| model[u as usize] = true);
                        }
                    }
                    1 => {
                        let want = (0..units).rev().find(|&u| !model[u as usize]);
                        assert_eq!(a.alloc_one(), want);
                        if let Some(u) = want {
                            model[u as usize] = true;
                        }
                    }
                    _ => {
                        let u = x / 3 % units;
                        if model[u as usize] {
                            a.free(u, 1);
                            model[u as usize] = false;
                        }
                    }
                }
                assert_eq!(a.used_units(), model.iter().filter(|&&b| b).count() as u64);
            }
        }
    }
}
