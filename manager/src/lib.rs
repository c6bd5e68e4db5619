//! The DINOMO cluster manager: registers KNs, grants and renews their leases, computes the
//! slot map by consistent hashing, stores every new map under a new epoch at the DPM and
//! publishes it, fences a KN whose lease expired, and runs the elasticity policy.
//!
//! - [`state`]: the state machine, with its durable store ([`store`]), clock ([`clock`])
//!   and KN spawner ([`spawner`]) injected;
//! - [`service`]: the TCP service that runs it;
//! - [`policy`]: when to add and remove KNs.
//!
//! The protocol KNs and tools speak to it is [`dinomo_shared::manager_proto`]. The manager
//! reaches the DPM only through control messages over the fabric its [`DpmSpec`] names: it
//! never maps the region, so it can run on any host that reaches the DPM.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod clock;
pub mod policy;
pub mod service;
pub mod spawner;
pub mod state;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dinomo_hw::fabric::DpmSpec;
use dinomo_shared::auth::ClusterSecret;

pub use clock::{Clock, SystemClock};
pub use service::Service;
pub use spawner::{KnSpawner, ProcessSpawner, SpawnConfig};
pub use state::{Manager, ManagerConfig, ManagerError, Peer};
pub use store::{DpmStore, DurableStore, StoreError};

/// Why the manager process could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Dpm(#[from] StoreError),
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error(
        "refusing to listen on {0} without a cluster secret: anyone who reaches it could \
         fence KNs and move slots; pass --secret-file, or listen on a loopback address"
    )]
    Unauthenticated(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Starts a manager process's service: connects to the DPM (waiting up to
/// `connect_timeout` for one that answers), fences KNs whose leases an earlier manager
/// ended, keeps those that may still hold one for re-adoption (see [`state`]), and listens
/// on `listen`, checking every session with `secret` when there is one. [`Service::serve`]
/// runs it.
pub fn start(
    dpm: &DpmSpec,
    cfg: ManagerConfig,
    listen: SocketAddr,
    connect_timeout: Duration,
    spawner: Option<Arc<dyn KnSpawner>>,
    secret: Option<ClusterSecret>,
) -> Result<Service, StartError> {
    if secret.is_none() && !listen.ip().is_loopback() {
        return Err(StartError::Unauthenticated(listen));
    }
    let store = DpmStore::connect(dpm, connect_timeout)?;
    let m = Manager::new(cfg, Box::new(store), Arc::new(SystemClock), spawner)?;
    // A KN of a manager that was killed may still be running and count its lease as held:
    // it is not fenced before that lease lapsed (it would keep acknowledging writes into
    // logs already merged), and if it resumes within it, it keeps its slots.
    m.fence_leftovers()?;
    Service::bind(Arc::new(m), listen, secret).map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })
}
