//! DINOMO: an elastic, scalable key-value store for disaggregated persistent memory.
//!
//! This facade re-exports the workspace crates and holds the pieces of the `dinomo` binary
//! that are worth testing as a library.
pub use dinomo_hw as hw;
pub use dinomo_shared as shared;
pub use dpm_fw;
pub use host_kn;

pub mod bench;
pub mod cluster;
pub mod ctl;
pub mod duration;
pub mod fabric_bench;
pub mod histogram;
pub mod inspect;
pub mod kn_server;
pub mod latency;
pub mod lincheck;
pub mod manager;
pub mod policy;
pub mod redis_client;
pub mod resp;
pub mod size;
pub mod soak;
pub mod torture;
pub mod up;
