//! Control requests to the memory node over a fabric connection.

use std::time::{Duration, Instant};

use dinomo_hw::fabric::Fabric;
use dinomo_shared::msg::{Request, Response};

use crate::error::KvError;

/// Sends `req` and waits for its reply, skipping stale replies to earlier requests.
pub fn call<F: Fabric + ?Sized>(
    f: &mut F,
    next_id: &mut u32,
    req: Request,
    timeout: Duration,
) -> Result<Response, KvError> {
    *next_id = next_id.wrapping_add(1);
    let id = *next_id;
    f.send(&req.encode(id))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match f.recv(left)? {
            Some(frame) if frame.req_id == id => {
                return match Response::decode(&frame) {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(code)) => Err(code.into()),
                    Err(e) => Err(KvError::Corrupt(format!("control reply: {e}"))),
                };
            }
            Some(_) => continue,
            None => {
                return Err(KvError::Fabric(format!(
                    "no reply to {req:?} within {timeout:?}"
                )))
            }
        }
    }
}
