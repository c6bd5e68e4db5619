//! What files a process has mapped or open, read from `/proc/<pid>/maps` and
//! `/proc/<pid>/fd`: the manager must reach the DPM only through control messages and
//! never touch the region file.

use std::path::{Path, PathBuf};

/// The files mapped into process `pid` (the path column of its maps).
pub fn mapped_files(pid: u32) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    maps.lines()
        .filter_map(|l| {
            // address perms offset dev inode [path]: the path starts at the 6th column.
            let path = l.split_whitespace().nth(5)?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The files process `pid` has open.
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}

/// Whether process `pid` maps or opens `file`.
pub fn touches(pid: u32, file: &Path) -> bool {
    let file = file.canonicalize().expect("canonical path");
    mapped_files(pid)
        .iter()
        .chain(open_files(pid).iter())
        .any(|p| *p == file)
}
