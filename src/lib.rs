//! DINOMO: an elastic, scalable key-value store for disaggregated persistent memory.
//!
//! This facade re-exports the workspace crates.
pub use dinomo_hw as hw;
pub use dinomo_shared as shared;
pub use dpm_fw;
pub use host_kn;
