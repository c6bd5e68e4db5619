//! Giving freed heap memory back to the system.
//!
//! A shard frees large buffers as its cache's value arena is compacted or grows (a cache of
//! 1 KiB values that turns into shortcuts frees nearly its whole budget) and as a write
//! backlog merges. glibc's allocator keeps freed memory inside its arenas, resident, unless
//! made or asked to return it, so without this a KN would stay at its high-water mark
//! however its cache's contents change, and the cache budget would not bound its memory.

/// Large allocations (a value arena, a key table, the node slab) each get their own
/// mapping, returned to the system the moment they are freed. glibc otherwise raises its
/// mapping threshold after each such free, up to 32 MiB, and serves the next large
/// allocations from its arenas, where a freed one stays resident: measured, a KN whose
/// 64 MiB cache turned from values into shortcuts then held 139 MiB, against 74 MiB with
/// this.
/// A KN process calls this once, at start.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets an allocator parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Allocations from this size up are mappings of their own (glibc's initial default,
/// fixed so that it no longer moves).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 << 10;

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
