//! Time as the manager sees it, injected so that its state machine can be driven by tests.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The manager's clocks.
pub trait Clock: Send + Sync {
    /// Monotonic time: lease expiry, settle times.
    fn now(&self) -> Instant;
    /// Milliseconds since the Unix epoch: durable lease records (read by a later manager,
    /// perhaps after a reboot) and reconfiguration reports.
    fn wall_ms(&self) -> u64;
}

/// The system's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    base_wall_ms: u64,
    offset: Mutex<Duration>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new(1_700_000_000_000)
    }
}

impl ManualClock {
    /// A clock whose wall time starts at `wall_ms`.
    pub fn new(wall_ms: u64) -> Self {
        Self {
            base: Instant::now(),
            base_wall_ms: wall_ms,
            offset: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves both clocks forward by `d`.
    pub fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) += d;
    }

    fn offset(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.offset()
    }
    fn wall_ms(&self) -> u64 {
        self.base_wall_ms + u64::try_from(self.offset().as_millis()).unwrap_or(u64::MAX)
    }
}
