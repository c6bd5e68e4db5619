//! The KVS node (KN): ownership of slots, per-shard logs with group commit, the DAC cache,
//! and reads over one-sided verbs — everything a KN does, over any [`dinomo_hw::fabric::Fabric`] —
//! and the KN process around it ([`server`]): the Redis-protocol front end, lease keeping
//! and map following.
//!
//! # Public API
//!
//! The crate root re-exports what a user of a KN needs: [`Kn`] (a node: its shards and their
//! threads), [`Client`] and [`Router`] (requests routed to the owner shard), [`SlotMap`],
//! [`KvError`], and a shard's [`ShardConfig`], [`ShardStats`] and [`ReleaseReport`].
//! A module is public only because code outside this crate uses its items by path:
//!
//! * [`client`]: the client and router, and the retry window a caller sets
//!   (`DEFAULT_RETRY_FOR`, used by the DINOMO-N baseline).
//! * [`dac`]: the cache's configuration, policies and counters, and the cache itself and the
//!   offline optimum, which the benchmarks drive directly.
//! * [`log`]: a shard's log, which tests drive by hand to write a KN log without a shard.
//! * [`ownership`]: the slot → shard function and the default virtual-node count, which the
//!   in-process cluster and the benchmarks share with the KN.
//! * [`replica`]: the replicated-key table and the control messages with which the
//!   in-process cluster, and a KN process following the map, make and drop replicas.
//! * [`server`]: the KN process, run by `dinomo kn`.
//! * [`shard`]: the messages a shard takes (the in-process cluster and tests send them to a
//!   shard's queue), the lease gate a test holds, and the key limits every node checks.
//!
//! Control requests to the memory node, the index reader, and the modules behind the root
//! re-exports (`error`, `kn`) are private.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod client;
pub mod clock;
mod control;
pub mod dac;
mod error;
mod kn;
pub mod log;
pub mod memory;
pub mod ownership;
mod reader;
pub mod replica;
pub mod server;
pub mod shard;

pub use client::{Client, Router};
pub use error::KvError;
pub use kn::Kn;
pub use ownership::SlotMap;
pub use shard::{ReleaseReport, ShardConfig, ShardStats};
