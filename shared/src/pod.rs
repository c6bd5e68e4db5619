//! Plain-old-data conversion for on-DPM structures.

/// A type whose every bit pattern is valid and which has no padding bytes.
///
/// # Safety
/// Implementors must be `repr(C)`, contain only integer fields (or arrays of them), and have
/// no padding, so that viewing them as bytes and building them from any bytes is sound.
pub unsafe trait Pod: Copy + 'static {
    /// The value with every byte zero.
    fn zeroed() -> Self {
        // SAFETY: `Pod` guarantees every bit pattern, including all zeros, is valid.
        unsafe { core::mem::zeroed() }
    }

    /// Views the value as its raw little-endian bytes.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Pod` types have no padding, so all `size_of::<Self>()` bytes are initialised.
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                core::mem::size_of::<Self>(),
            )
        }
    }

    /// Reads a value from the start of `bytes`; `None` if `bytes` is too short.
    fn read_from(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked above, `read_unaligned` has no alignment requirement,
        // and `Pod` makes every bit pattern a valid `Self`.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

/// Implements [`Pod`] for types whose layout is asserted elsewhere.
#[macro_export]
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is `repr(C)` with integer fields only; its size assertion
            // (next to its definition) equals the sum of its fields, so it has no padding.
            unsafe impl $crate::pod::Pod for $t {}
        )*
    };
}
