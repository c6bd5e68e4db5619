//! Control frames to the DPM: the channel every connection to it has (a KN shard's fabric,
//! or the manager's control-only connection), and the one request/reply exchange over it.

use std::time::{Duration, Instant};

use dinomo_shared::msg::{Frame, Request, Response};
use dinomo_shared::ErrorCode;

use super::FabricError;

/// A channel of 64-byte control frames to the DPM.
pub trait ControlChannel: Send {
    /// Sends a control frame to the DPM.
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError>;
    /// Receives a control frame from the DPM, waiting up to `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError>;
    /// The id of the next request; ids of one channel do not repeat for 2^32 requests, so
    /// a late reply to an earlier request is never taken for the reply to a later one.
    fn next_request_id(&mut self) -> u32;

    /// Re-establishes the channel after the DPM restarted, waiting up to `timeout` for one
    /// that answers; registered buffers and one-sided access stay as they are. A transport
    /// whose connection cannot be re-established in place says so with an error, and the
    /// caller gives up as before.
    fn reconnect(&mut self, timeout: Duration) -> Result<(), FabricError> {
        let _ = timeout;
        Err(FabricError::Other(
            "this fabric cannot re-establish a connection in place".into(),
        ))
    }

    /// Sends `req` and waits up to `timeout` for its reply: the DPM's response or its error
    /// code. Replies to earlier requests (which timed out) are skipped.
    fn call(
        &mut self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Result<Response, ErrorCode>, FabricError> {
        let id = self.next_request_id();
        self.send(&req.encode(id))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(f) if f.req_id == id => {
                    return Response::decode(&f)
                        .map_err(|e| FabricError::Other(format!("bad reply to {req:?}: {e}")));
                }
                Some(_) => continue,
                None => return Err(FabricError::Timeout(timeout)),
            }
        }
    }
}

impl<C: ControlChannel + ?Sized> ControlChannel for Box<C> {
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError> {
        (**self).send(frame)
    }
    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError> {
        (**self).recv(timeout)
    }
    fn next_request_id(&mut self) -> u32 {
        (**self).next_request_id()
    }
    fn reconnect(&mut self, timeout: Duration) -> Result<(), FabricError> {
        (**self).reconnect(timeout)
    }
}
