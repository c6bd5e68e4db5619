//! The KVS node (KN). Not yet built: its read and write paths, DAC cache and ownership
//! arrive with the KVS-node milestone; this crate only fixes its place in the workspace.
pub mod dac;
