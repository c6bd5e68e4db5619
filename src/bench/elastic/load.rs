//! The offered load: an open-loop schedule of operations (base rate, a burst of `factor`
//! times the base, base again), rate-limited client threads that follow it, and what they
//! count (operations, dropped ones, per-KN latency histograms) for the sampler and policy.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::histogram::{self, Histogram};

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

/// Latencies in µs of one client thread's operations on the keys of one KN, recorded by
/// the client and drained by the controller every period. A mutex per client and KN rather
/// than one shared histogram: only its client records into it, so the lock is uncontended
/// but for the controller's drain once a period. (hdrhistogram's `SyncHistogram` would make
/// that drain wait for every client's next operation, and an open-loop client may be
/// asleep until its next one is due.)
#[derive(Debug)]
pub struct KnLatency(Mutex<Histogram>);

impl Default for KnLatency {
    fn default() -> Self {
        Self(Mutex::new(histogram::new()))
    }
}

impl KnLatency {
    pub fn record(&self, latency: Duration) {
        histogram::record_us(&mut self.lock(), latency);
    }

    /// Adds the counts into `into` and resets them.
    pub fn drain_into(&self, into: &mut Histogram) {
        let mut h = self.lock();
        histogram::merge(into, &h);
        h.reset();
    }

    fn lock(&self) -> MutexGuard<'_, Histogram> {
        // A client that panicked leaves counts that are still counts.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The nearest-rank `q` quantile of a histogram of µs; zero if empty.
pub fn quantile(h: &Histogram, q: f64) -> Duration {
    Duration::from_micros(h.value_at_quantile(q))
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
    pub latency: Vec<KnLatency>,
}

impl ClientCounters {
    pub fn new(max_kns: usize) -> Self {
        Self {
            ops: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..max_kns).map(|_| KnLatency::default()).collect(),
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
    fn latencies_keep_three_significant_digits() {
        for us in [0u64, 1, 7, 999, 2047, 2048, 12_345, 1_000_000, 123_456_789] {
            let h = KnLatency::default();
            h.record(Duration::from_micros(us));
            let mut c = histogram::new();
            h.drain_into(&mut c);
            let got = quantile(&c, 1.0).as_micros() as u64;
            assert!(
                got >= us && got - us <= us / 1000,
                "{us} us read back as {got}"
            );
        }
    }

    #[test]
    fn quantiles_of_a_histogram() {
        let h = KnLatency::default();
        for _ in 0..98 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(20));
        h.record(Duration::from_millis(20));
        let mut c = histogram::new();
        h.drain_into(&mut c);
        assert_eq!(quantile(&c, 0.5), Duration::from_micros(10));
        assert_eq!(quantile(&c, 0.98), Duration::from_micros(10));
        let p99 = quantile(&c, 0.99);
        assert!(
            p99 >= Duration::from_millis(20) && p99 <= Duration::from_micros(20_020),
            "{p99:?}"
        );
        // Drained: empty now, and what was drained adds up.
        let mut again = histogram::new();
        h.drain_into(&mut again);
        assert_eq!(quantile(&again, 0.99), Duration::ZERO);
        h.record(Duration::from_micros(10));
        h.drain_into(&mut c);
        assert_eq!(c.len(), 101);
    }
}
