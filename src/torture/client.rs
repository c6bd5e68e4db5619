//! The torture's view of the cluster client: every command's outcome, exactly. A command
//! is answered, or never executed (no node reachable, or refused with `TRYAGAIN` or
//! `CLUSTERDOWN` until its deadline; `MOVED` is followed), or sent without a usable
//! answer, when a write may or may not have taken effect. It is never sent twice.

use std::time::{Duration, Instant};

use crate::redis_client::{Attempt, ClusterClient, Credentials, SendError, Timeouts};
use dinomo_shared::resp::Value;

/// How a command failed.
#[derive(Debug)]
pub enum Failure {
    /// Never executed: no node could be reached, or every node refused it until the deadline.
    NotSent,
    /// Sent, but the connection failed or timed out before the reply, or the reply was an
    /// error other than a refusal: a write may or may not have taken effect.
    Unknown(String),
}

/// A cluster client that reports outcomes as [`Failure`]s.
#[derive(Debug)]
pub struct Client(ClusterClient);

impl Client {
    /// `seeds`: every KN address (a node that is down is skipped); `reply_timeout`: how long
    /// a reply may take before the command's outcome counts as unknown.
    pub fn new(
        seeds: &[String],
        reply_timeout: Duration,
        credentials: Option<&Credentials>,
    ) -> Self {
        Self(
            ClusterClient::new(
                seeds,
                Timeouts {
                    connect: Some(Duration::from_millis(500)),
                    reply: Some(reply_timeout),
                },
            )
            .with_credentials(credentials.cloned()),
        )
    }

    /// Runs a command on `key`'s node (every key of a multi-key command shares its slot).
    pub fn exec(
        &mut self,
        key: &[u8],
        args: &[&[u8]],
        deadline: Instant,
    ) -> Result<Value, Failure> {
        while Instant::now() < deadline {
            match self.0.attempt(key, args) {
                Attempt::Reply(Value::Error(e)) => return Err(Failure::Unknown(e)),
                Attempt::Reply(v) => return Ok(v),
                Attempt::Moved => {}
                Attempt::TryAgain(_) => std::thread::sleep(Duration::from_millis(10)),
                Attempt::ClusterDown(_) => {
                    self.0.forget_slots();
                    std::thread::sleep(Duration::from_millis(10));
                }
                Attempt::NoRoute => std::thread::sleep(Duration::from_millis(20)),
                Attempt::Failed(SendError::NotConnected { .. }) => {
                    self.0.forget_slots();
                    std::thread::sleep(Duration::from_millis(20));
                }
                Attempt::Failed(e @ SendError::NoReply { .. }) => {
                    self.0.forget_slots();
                    return Err(Failure::Unknown(e.to_string()));
                }
            }
        }
        Err(Failure::NotSent)
    }
}
