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

pub use clock::{Clock, SystemClock};
pub use service::Service;
pub use spawner::{KnSpawner, ProcessSpawner, SpawnConfig};
pub use state::{Manager, ManagerConfig, ManagerError};
pub use store::{DpmStore, DurableStore, StoreError};

/// Why the manager process could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Dpm(#[from] StoreError),
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Starts a manager process's service: connects to the DPM (waiting up to
/// `connect_timeout` for one that answers), fences the KNs an earlier manager left once
/// their leases lapsed, and listens on `listen`. [`Service::serve`] runs it.
pub fn start(
    dpm: &DpmSpec,
    cfg: ManagerConfig,
    listen: SocketAddr,
    connect_timeout: Duration,
    spawner: Option<Arc<dyn KnSpawner>>,
) -> Result<Service, StartError> {
    let store = DpmStore::connect(dpm, connect_timeout)?;
    let m = Manager::new(cfg, Box::new(store), Arc::new(SystemClock), spawner)?;
    // A KN of a manager that was killed may still be running and count its lease as held;
    // fencing it before that lease lapsed would merge and close its logs while it still
    // acknowledges writes into them, and those writes would be lost.
    let wait = m.leftover_wait();
    if !wait.is_zero() {
        tracing::info!(
            ?wait,
            "KNs of an earlier manager hold leases: fencing once they lapse"
        );
        std::thread::sleep(wait);
    }
    m.fence_leftovers()?;
    Service::bind(Arc::new(m), listen).map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })
}
