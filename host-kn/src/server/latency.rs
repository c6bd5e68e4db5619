//! A cheap latency histogram for a KN's connection tasks: log-linear buckets (4 per power
//! of two, so a percentile is within ~19 %) of relaxed atomic counters, striped so that
//! connections on different threads rarely touch the same cache lines. The lease thread
//! drains it once per renewal to report ops/s and p99.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SUB: u32 = 4;
const BUCKETS: usize = 64 * SUB as usize;
const STRIPES: usize = 8;

/// Request latencies since the last [`LatencyHist::take`].
#[derive(Debug)]
pub struct LatencyHist {
    stripes: Box<[[AtomicU64; BUCKETS]]>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
        }
    }
}

fn bucket(ns: u64) -> usize {
    let ns = ns.max(1);
    let log = 63 - ns.leading_zeros();
    let sub = if log >= 2 {
        (ns >> (log - 2)) & (SUB as u64 - 1)
    } else {
        0
    };
    (log * SUB) as usize + sub as usize
}

/// The upper bound of a bucket, in nanoseconds.
fn bucket_top(b: usize) -> u64 {
    let (log, sub) = (b as u32 / SUB, b as u64 % SUB as u64);
    if log < 2 {
        return 1 << (log + 1);
    }
    let base = 1u64 << log;
    base.saturating_add((sub + 1) * (base / SUB as u64))
}

/// What a drained histogram says.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p99: Duration,
}

impl LatencyHist {
    /// Records one request; `stripe` is any number fixed per connection.
    #[inline]
    pub fn record(&self, stripe: usize, d: Duration) {
        self.record_n(stripe, d, 1);
    }

    /// Records `n` requests of latency `d` (one measured request standing for `n`, when
    /// requests are sampled).
    pub fn record_n(&self, stripe: usize, d: Duration, n: u64) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.stripes[stripe % STRIPES][bucket(ns)].fetch_add(n, Ordering::Relaxed);
    }

    /// Drains the counters: the number of requests and their 99th percentile (an upper
    /// bound, within one bucket).
    pub fn take(&self) -> LatencySummary {
        let mut counts = [0u64; BUCKETS];
        for s in self.stripes.iter() {
            for (c, a) in counts.iter_mut().zip(s.iter()) {
                *c += a.swap(0, Ordering::Relaxed);
            }
        }
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let rank = count - count / 100;
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return LatencySummary {
                    count,
                    p99: Duration::from_nanos(bucket_top(b)),
                };
            }
        }
        LatencySummary::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_lands_in_the_right_bucket_and_take_drains() {
        let h = LatencyHist::default();
        for i in 0..990 {
            h.record(i, Duration::from_micros(10));
        }
        for i in 0..10 {
            h.record(i, Duration::from_millis(5));
        }
        let s = h.take();
        assert_eq!(s.count, 1000);
        assert!(s.p99 >= Duration::from_micros(10) && s.p99 < Duration::from_micros(13));
        h.record(0, Duration::from_millis(5));
        for _ in 0..5 {
            h.record(3, Duration::from_millis(5));
        }
        let s = h.take();
        assert_eq!(s.count, 6);
        assert!(s.p99 >= Duration::from_millis(5) && s.p99 < Duration::from_millis(6));
        assert_eq!(h.take(), LatencySummary::default());
        for ns in [1u64, 2, 3, 7, 100, 1 << 40, u64::MAX] {
            assert!(bucket_top(bucket(ns)) >= ns.min(1 << 62), "{ns}");
            assert!(bucket(ns) < BUCKETS);
        }
    }
}
