//! The offered load: an open-loop schedule of operations (base rate, a burst of `factor`
//! times the base, base again), rate-limited client threads that follow it, and what they
//! count (operations, dropped ones, per-KN latency histograms) for the sampler and policy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Base rate for `base`, `factor` x base for `burst`, base again for `tail`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadShape {
    /// Operations per second.
    pub base_rate: f64,
    pub factor: f64,
    pub base: Duration,
    pub burst: Duration,
    pub tail: Duration,
}

impl LoadShape {
    pub fn total(&self) -> Duration {
        self.base + self.burst + self.tail
    }

    /// Offered operations per second at `t`.
    pub fn rate_at(&self, t: Duration) -> f64 {
        if t >= self.base && t < self.base + self.burst {
            self.base_rate * self.factor
        } else {
            self.base_rate
        }
    }

    /// The phases as (start, rate) pairs.
    fn phases(&self) -> [(f64, f64); 3] {
        let (b, u) = (self.base.as_secs_f64(), self.burst.as_secs_f64());
        [
            (0.0, self.base_rate),
            (b, self.base_rate * self.factor),
            (b + u, self.base_rate),
        ]
    }

    /// When operation `n` (counting from 0 over all clients) is due, in seconds from the
    /// start: the inverse of the offered operations so far.
    pub fn due(&self, n: u64) -> f64 {
        let n = n as f64;
        let p = self.phases();
        let mut ops_before = 0.0;
        for (i, &(start, rate)) in p.iter().enumerate() {
            let end = p.get(i + 1).map(|&(s, _)| s);
            let in_phase = end.map(|e| (e - start) * rate);
            match in_phase {
                Some(k) if n >= ops_before + k => ops_before += k,
                _ => return start + (n - ops_before) / rate.max(1e-9),
            }
        }
        f64::INFINITY
    }

    /// Offered operations in `[0, t)`.
    pub fn offered_until(&self, t: f64) -> f64 {
        let p = self.phases();
        let mut ops = 0.0;
        for (i, &(start, rate)) in p.iter().enumerate() {
            let end = p.get(i + 1).map_or(f64::INFINITY, |&(s, _)| s);
            if t > start {
                ops += (t.min(end) - start) * rate;
            }
        }
        ops
    }

    /// The load changes as (time, label), for the event column.
    pub fn changes(&self) -> Vec<(Duration, String)> {
        vec![
            (self.base, format!("load x{}", self.factor)),
            (self.base + self.burst, "load x1".to_owned()),
        ]
    }
}

/// Latency buckets: four per power of two of microseconds, up to about 4 s.
pub const BUCKETS: usize = 84;

/// The bucket of a latency.
pub fn bucket(latency: Duration) -> usize {
    let us = latency.as_micros().min(u64::MAX as u128) as u64;
    if us < 4 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (e - 2)) & 3) as usize;
    ((e - 1) * 4 + sub).min(BUCKETS - 1)
}

/// The upper bound of a bucket (exclusive), in microseconds.
pub fn bucket_upper_us(b: usize) -> u64 {
    if b < 4 {
        return b as u64 + 1;
    }
    let (e, sub) = (b / 4 + 1, (b % 4) as u64);
    (5 + sub) << (e - 2)
}

/// A latency histogram written by one client thread and drained by the controller.
#[derive(Debug)]
pub struct Histogram([AtomicU64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Histogram {
    pub fn record(&self, latency: Duration) {
        self.0[bucket(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the counts into `into` and resets them.
    pub fn drain_into(&self, into: &mut [u64; BUCKETS]) {
        for (i, c) in self.0.iter().enumerate() {
            into[i] += c.swap(0, Ordering::Relaxed);
        }
    }
}

/// The `q` quantile of bucket counts, as its bucket's upper bound; zero if empty.
pub fn quantile(counts: &[u64; BUCKETS], q: f64) -> Duration {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return Duration::ZERO;
    }
    let want = ((total as f64 * q).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (b, &c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Duration::from_micros(bucket_upper_us(b));
        }
    }
    Duration::from_micros(bucket_upper_us(BUCKETS - 1))
}

/// What one client thread counts, read by the sampler and the controller while it runs.
/// Its own cache lines, so client threads do not share a hot counter.
#[derive(Debug)]
#[repr(align(128))]
pub struct ClientCounters {
    pub ops: AtomicU64,
    /// Operations skipped because the client fell more than the lag limit behind.
    pub dropped: AtomicU64,
    pub errors: AtomicU64,
    /// Latency by the KN that owned the key when the request was issued.
    pub latency: Vec<Histogram>,
}

impl ClientCounters {
    pub fn new(max_kns: usize) -> Self {
        Self {
            ops: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..max_kns).map(|_| Histogram::default()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> LoadShape {
        LoadShape {
            base_rate: 100.0,
            factor: 7.0,
            base: Duration::from_secs(10),
            burst: Duration::from_secs(20),
            tail: Duration::from_secs(10),
        }
    }

    #[test]
    fn rates_and_offered_operations_follow_the_phases() {
        let s = shape();
        assert_eq!(s.total(), Duration::from_secs(40));
        assert_eq!(s.rate_at(Duration::from_secs(9)), 100.0);
        assert_eq!(s.rate_at(Duration::from_secs(10)), 700.0);
        assert_eq!(s.rate_at(Duration::from_secs(30)), 100.0);
        assert_eq!(s.offered_until(5.0), 500.0);
        assert_eq!(s.offered_until(20.0), 1000.0 + 7000.0);
        assert_eq!(s.offered_until(40.0), 1000.0 + 14000.0 + 1000.0);
    }

    #[test]
    fn due_inverts_offered() {
        let s = shape();
        for t in [0.0, 3.3, 10.0, 17.25, 30.0, 39.9] {
            let n = s.offered_until(t);
            assert!(
                (s.due(n as u64) - t).abs() < 0.01,
                "t={t}: {}",
                s.due(n as u64)
            );
        }
        assert_eq!(s.due(0), 0.0);
        assert!((s.due(1000) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn buckets_are_ordered_and_bound_their_latencies() {
        let mut last = 0;
        for us in [
            0u64, 1, 3, 4, 5, 7, 8, 9, 15, 16, 100, 1000, 16_000, 1_000_000,
        ] {
            let b = bucket(Duration::from_micros(us));
            assert!(b >= last, "{us}");
            last = b;
            assert!(bucket_upper_us(b) > us, "{us} in bucket {b}");
            if b > 0 {
                assert!(bucket_upper_us(b - 1) <= us, "{us} in bucket {b}");
            }
        }
        assert_eq!(bucket(Duration::from_secs(100)), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_a_histogram() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(20));
        h.record(Duration::from_millis(20));
        let mut c = [0u64; BUCKETS];
        h.drain_into(&mut c);
        assert!(quantile(&c, 0.5) <= Duration::from_micros(12));
        let p99 = quantile(&c, 0.99);
        assert!(
            p99 > Duration::from_millis(20) && p99 <= Duration::from_millis(25),
            "{p99:?}"
        );
        // Drained: empty now.
        let mut again = [0u64; BUCKETS];
        h.drain_into(&mut again);
        assert_eq!(quantile(&again, 0.99), Duration::ZERO);
    }
}
