//! The KN's lease as its shards see it: a flush waits for it, so nothing is acknowledged
//! after the manager may have fenced the KN.

use std::time::{Duration, Instant};

/// A KN's lease as its shards see it: valid until a deadline that the lease keeper moves
/// forward on every renewal; lost for good once the manager refused a renewal or the
/// deadline passed long ago.
#[derive(Debug)]
pub struct LeaseGate {
    base: Instant,
    /// `base` on the coarse monotonic clock, in ns (see [`coarse_ns`]).
    base_coarse_ns: u64,
    /// Milliseconds since `base` until which the lease surely holds.
    until_ms: std::sync::atomic::AtomicU64,
    /// How long after the deadline a flush keeps waiting for a renewal before giving up.
    grace: Duration,
    lost: std::sync::atomic::AtomicBool,
}

impl LeaseGate {
    /// A gate that is not valid until the first [`LeaseGate::extend_to`].
    pub fn new(grace: Duration) -> Self {
        Self {
            base_coarse_ns: coarse_ns(),
            base: Instant::now(),
            until_ms: std::sync::atomic::AtomicU64::new(0),
            grace,
            lost: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The lease surely holds until `until` (never moves the deadline back).
    pub fn extend_to(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.until_ms
            .fetch_max(ms, std::sync::atomic::Ordering::AcqRel);
    }

    /// The lease is gone (fenced, or the KN is stopping without it).
    pub fn set_lost(&self) {
        self.lost.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the lease holds now.
    ///
    /// Every request asks, so this reads the coarse clock (a few ns instead of a precise
    /// read): it lags by at most one kernel tick (1 to 10 ms), far inside the quarter of a
    /// lease by which the deadline precedes the manager's expiry.
    pub fn is_valid(&self) -> bool {
        let elapsed_ms = coarse_ns().saturating_sub(self.base_coarse_ns) / 1_000_000;
        !self.is_lost() && elapsed_ms < self.until_ms.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until the lease holds (`true`) or is lost (`false`); a deadline more than the
    /// grace period in the past counts as lost.
    pub fn wait_valid(&self) -> bool {
        loop {
            if self.is_valid() {
                return true;
            }
            if self.is_lost() {
                return false;
            }
            let until = self.until_ms.load(std::sync::atomic::Ordering::Acquire);
            if self.base.elapsed().as_millis() as u64 > until + self.grace.as_millis() as u64 {
                self.set_lost();
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Now on `CLOCK_MONOTONIC_COARSE` (the clock `Instant` reads, at the last kernel tick), in
/// ns; the precise clock if the coarse one cannot be read.
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given, which outlives the call.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } == 0;
    if !ok {
        // SAFETY: as above.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_gate_holds_until_its_deadline_and_then_gives_up() {
        let g = LeaseGate::new(Duration::from_millis(20));
        assert!(!g.is_valid(), "no lease before the first renewal");
        g.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(g.is_valid() && g.wait_valid());
        // The deadline never moves back.
        g.extend_to(Instant::now());
        assert!(g.is_valid());
        g.set_lost();
        assert!(!g.is_valid() && !g.wait_valid());

        let g = LeaseGate::new(Duration::from_millis(20));
        g.extend_to(Instant::now());
        // Past the deadline and past the grace: lost for good.
        assert!(!g.wait_valid());
        assert!(g.is_lost());
        g.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(
            !g.is_valid(),
            "a lost lease is not revived by a late renewal"
        );
    }
}
