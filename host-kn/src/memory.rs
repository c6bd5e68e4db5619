//! Giving freed heap memory back to the system.
//!
//! A shard's cache frees value allocations as it demotes and evicts (a cache of 1 KiB values
//! that turns into shortcuts frees nearly its whole budget). glibc's allocator keeps freed
//! chunks inside its arenas, resident, unless asked to return them, so without this a KN
//! would stay at the high-water mark of its cache's values however the cache's contents
//! change, and the cache budget would not bound its memory.

/// Returns the free pages of every allocator arena to the system (glibc's `malloc_trim`).
/// Costs a walk of the arenas, so callers use it only after freeing a lot; a no-op where
/// the allocator is not glibc's.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointers and only releases pages the allocator holds
    // free; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
