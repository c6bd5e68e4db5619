//! Control requests to the memory node over a fabric connection.

use std::time::Duration;

use dinomo_hw::fabric::{ControlChannel, FabricError};
use dinomo_shared::msg::{Request, Response};

use crate::error::KvError;

/// How long a request waits for a DPM that went away to come back (a restart recovers the
/// region before it answers, which takes longer than a reply).
pub const RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// Sends `req` and waits for its reply, skipping stale replies to earlier requests.
///
/// If the DPM went away (it crashed or was restarted, or did not answer within `timeout`),
/// a request that is safe to repeat is
/// sent again over a new control connection once the DPM answers, waiting up to
/// [`RECONNECT_WAIT`]: a block request names the block it follows and gets the same block
/// again, merges, closes and fences are repeatable, and a key keeps its cell. Opening a log
/// and freeing a cell are not repeated (a second open would strand the first log; a second
/// free finds no cell): they fail as before.
pub fn call<C: ControlChannel + ?Sized>(
    f: &mut C,
    req: Request,
    timeout: Duration,
) -> Result<Response, KvError> {
    let mut reconnected = !repeatable(&req);
    loop {
        match call_once(f, &req, timeout) {
            Err(Lost::Gone(e)) if !reconnected => {
                tracing::warn!(error = %e, ?req, "the DPM went away; reconnecting");
                if let Err(again) = f.reconnect(RECONNECT_WAIT) {
                    return Err(reconnect_failed(&e, &again));
                }
                tracing::info!(?req, "reconnected to the DPM; sending again");
                reconnected = true;
            }
            Err(Lost::Gone(e)) => return Err(e.into()),
            Err(Lost::Kv(e)) => return Err(e),
            Ok(r) => return Ok(r),
        }
    }
}

/// The error of a reconnect that failed after `lost`: still [`KvError::Disconnected`] if
/// the memory node just did not come back in time, [`KvError::Fabric`] if it refused (e.g.
/// this KN was fenced) or the device failed.
pub fn reconnect_failed(lost: &FabricError, again: &FabricError) -> KvError {
    let why = format!("{lost} (reconnecting: {again})");
    if again.is_transient() {
        KvError::Disconnected(why)
    } else {
        KvError::Fabric(why)
    }
}

fn repeatable(req: &Request) -> bool {
    !matches!(req, Request::OpenLog { .. } | Request::FreeCell { .. })
}

/// Why one attempt failed: the DPM is gone (worth a reconnect), or anything else.
enum Lost {
    Gone(FabricError),
    Kv(KvError),
}

impl From<FabricError> for Lost {
    fn from(e: FabricError) -> Self {
        match e {
            FabricError::Disconnected(_) | FabricError::NotRunning(_) => Self::Gone(e),
            e => Self::Kv(e.into()),
        }
    }
}

fn call_once<C: ControlChannel + ?Sized>(
    f: &mut C,
    req: &Request,
    timeout: Duration,
) -> Result<Response, Lost> {
    match f.call(req, timeout) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(code)) => Err(Lost::Kv(code.into())),
        // A silent connection may be a dead one (over verbs a vanished DPM can leave the
        // queue pair without any completion): worth a reconnect, like a lost one.
        Err(FabricError::Timeout(_)) => Err(Lost::Gone(FabricError::Disconnected(format!(
            "no reply to {req:?} within {timeout:?}"
        )))),
        Err(e) => Err(e.into()),
    }
}
