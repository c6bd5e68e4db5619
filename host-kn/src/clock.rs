//! Wall-clock time for key expiry.
//!
//! Expiry times are absolute Unix milliseconds, as Redis keeps them, so that they mean the
//! same on every KN that comes to own the key: a KN's clock is assumed to be synchronised
//! (NTP or PTP) with the others' to well within the TTLs its clients set. As in Redis, a
//! key is expired once now is past its time (at exactly its time it is still there).

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds (0 for a clock set before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
