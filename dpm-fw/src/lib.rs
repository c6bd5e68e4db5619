//! The memory node (DPM): persistent index, log blocks, merger, recovery, control handler.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod index;
