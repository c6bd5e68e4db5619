//! The hardware seam: persistence primitives, access to a persistent-memory region, and the
//! fabric through which KVS nodes reach the DPM.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "std")]
pub mod fabric;
#[cfg(feature = "std")]
pub mod heap;
pub mod persist;
pub mod platform;
pub mod pmem;
#[cfg(feature = "std")]
pub mod region_file;
#[cfg(feature = "std")]
pub mod shadow;

pub use pmem::{CpuPersist, NoPersist, Persist, Pmem};
