//! DINOMO: an elastic, scalable key-value store for disaggregated persistent memory.
//!
//! This facade re-exports the workspace crates and holds the evaluation apparatus and the
//! pieces of the `dinomo` binary worth testing as a library: the in-process cluster and
//! its baselines, the benchmarks, the crash torture with its linearizability checker, the
//! soak, the region inspector, `dinomo up` and `dinomo ctl`.
pub use dinomo_hw as hw;
pub use dinomo_manager as manager;
pub use dinomo_shared as shared;
pub use dpm_fw;
pub use host_kn;

/// The Redis protocol (defined once, in `dinomo_shared`).
pub use dinomo_shared::resp;

pub mod bench;
pub mod cluster;
pub mod ctl;
pub mod duration;
pub mod fabric_bench;
pub mod histogram;
pub mod inspect;
pub mod lincheck;
pub mod redis_client;
pub mod size;
pub mod soak;
pub mod torture;
pub mod up;
