//! Everything the memory node (DPM) and the KVS nodes (KNs) must agree on, byte for byte.
//!
//! All on-DPM structures are `repr(C)`, little-endian, and checked at compile time for size
//! and field offsets. Offsets, never pointers, are stored in the region, so any process can
//! map it at any address. A layout constant lives here and only here.
//!
//! With feature `std`, the protocols between host processes live here too, each defined
//! once for both of its sides: the cluster map ([`ownership`]), the manager's protocol
//! ([`manager_proto`]) and the Redis protocol KNs serve ([`resp`]).
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(not(target_endian = "little"))]
compile_error!("DINOMO's on-DPM layouts are little-endian; big-endian targets are not supported");

pub mod auth;
pub mod block;
pub mod cluster_map;
pub mod control;
pub mod crc;
pub mod entry;
pub mod error;
pub mod geometry;
pub mod hash;
pub mod index;
#[cfg(feature = "std")]
pub mod manager_proto;
pub mod msg;
#[cfg(any(feature = "std", test))]
pub mod ownership;
pub mod pod;
#[cfg(any(feature = "std", test))]
pub mod resp;
pub mod slot;
pub mod superblock;

pub use error::ErrorCode;

/// Size of a cache line on every supported platform, and the persistence granule.
pub const CACHE_LINE: usize = 64;

/// Rounds `v` up to a multiple of `align` (a power of two).
#[inline]
pub const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

/// Asserts at compile time that a type has the given size.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

/// Asserts at compile time that a field sits at the given byte offset.
#[macro_export]
macro_rules! assert_offset {
    ($t:ty, $f:ident, $n:expr) => {
        const _: () = assert!(core::mem::offset_of!($t, $f) == $n);
    };
}
