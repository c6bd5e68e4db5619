//! The memory node (DPM): persistent index, log blocks, merger, recovery, control handler.
//!
//! The core is `no_std` + `alloc` so that it can run on the wimpy cores of a DPU as well as
//! in the std runner (`feature = "std"`), which adds threads pinned to cores and the shm
//! control server.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod blocks;
mod cells;
pub mod dpm;
pub mod firmware;
pub mod index;
pub mod logwriter;
pub mod region;
#[cfg(feature = "std")]
pub mod runner;
#[cfg(feature = "std")]
pub mod testkit;

pub use dpm::{
    CellStats, CompactConfig, CompactStep, CompactTotals, Cursor, Dpm, DpmStats, LiveMismatch,
    LogStats, Scratch, Stall, Step, DEFAULT_QUARANTINE_MS,
};
pub use region::{FormatError, OpenError};
