//! Re-establishing a KN's connection in place after the DPM restarted.
//!
//! A restarted DPM registers its region anew (new rkey and base) and makes new queue pairs,
//! so the old queue pair only ever fails ("retry exceeded"): every one-sided request and
//! control frame reports [`FabricError::Disconnected`] until the KN makes a new one. This
//! waits for the DPM to answer again and makes it. Registered buffers keep their handles
//! (they stay registered in the same protection domain and are attached to the new queue
//! pair), so whoever holds a [`LocalBuf`](crate::fabric::LocalBuf) carries on; work requests
//! outstanding on the old queue pair are dropped without completions, and their outcome is
//! unknown to the caller (a WRITE or CAS may have executed before the DPM went away).

use std::time::{Duration, Instant};

use super::client::VerbsFabric;
use crate::fabric::FabricError;

/// Pause between attempts to reach a restarting DPM (each refused dial is immediate).
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

impl VerbsFabric {
    /// Makes a new queue pair to the DPM, trying until one handshake completes or `timeout`
    /// passes. Only transient failures are tried again (nobody listens yet, the exchange
    /// broke off, the DPM was slow): a DPM that refuses this KN (it was fenced) or a device
    /// error ends the wait at once with that error.
    pub(super) fn reconnect_within(&mut self, timeout: Duration) -> Result<(), FabricError> {
        let deadline = Instant::now() + timeout;
        loop {
            let err = match self.reconnect() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if !err.is_transient() || left.is_zero() {
                return Err(err);
            }
            std::thread::sleep(RECONNECT_PAUSE.min(left));
        }
    }
}
