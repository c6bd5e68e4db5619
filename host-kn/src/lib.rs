//! The KVS node (KN): ownership of slots, per-shard logs with group commit, the DAC cache,
//! and reads over one-sided verbs — everything a KN does, over any [`dinomo_hw::fabric::Fabric`] —
//! and the KN process around it ([`server`]): the Redis-protocol front end, lease keeping
//! and map following.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod client;
pub mod control;
pub mod dac;
pub mod error;
pub mod kn;
pub mod log;
pub mod ownership;
pub mod reader;
pub mod replica;
pub mod server;
pub mod shard;

pub use client::{Client, Router};
pub use error::KvError;
pub use kn::Kn;
pub use ownership::SlotMap;
pub use shard::{ReleaseReport, ShardConfig, ShardStats};
