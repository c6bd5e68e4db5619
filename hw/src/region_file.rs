//! A region backed by a file mapped `MAP_SHARED`, so that separate processes (the DPM and
//! every KN on the machine) see one pool of memory, as with CXL or a DAX device.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use crate::pmem::{CpuPersist, Persist, Pmem};

/// Why a region file could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum RegionFileError {
    #[error("region file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("region file {path} already exists (refusing to overwrite it)")]
    AlreadyExists { path: PathBuf },
    #[error("region file {path} is {len} bytes, too small to hold a region")]
    TooSmall { path: PathBuf, len: u64 },
    /// A region is made of whole 8-byte words (see [`Pmem`]).
    #[error("region file {path} is {len} bytes, not a multiple of 8")]
    NotWholeWords { path: PathBuf, len: u64 },
    #[error("region file {path} is already being served by another process")]
    Busy { path: PathBuf },
    #[error("cannot {what} region file {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// A mapped region file.
#[derive(Debug)]
pub struct RegionFile {
    map: MmapRaw,
    path: PathBuf,
    len: u64,
    _file: File,
}

/// Smallest file accepted by [`RegionFile::open`].
pub const MIN_FILE_LEN: u64 = 4096;

impl RegionFile {
    /// Creates a new zero-filled file of `len` bytes and maps it. Never overwrites. `len`
    /// must be a multiple of 8 ([`RegionFileError::NotWholeWords`] otherwise).
    pub fn create(path: &Path, len: u64) -> Result<Arc<Self>, RegionFileError> {
        check_whole_words(path, len)?;
        let io = |what, source| RegionFileError::Io {
            what,
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    RegionFileError::AlreadyExists {
                        path: path.to_owned(),
                    }
                } else {
                    io("create", e)
                }
            })?;
        if let Err(e) = file.set_len(len) {
            let _ = std::fs::remove_file(path);
            return Err(io("size", e));
        }
        Self::map(file, path, len)
    }

    /// Maps an existing file. Its length must be a multiple of 8
    /// ([`RegionFileError::NotWholeWords`] otherwise).
    pub fn open(path: &Path) -> Result<Arc<Self>, RegionFileError> {
        let (file, len) = open_existing(path, true)?;
        Self::map(file, path, len)
    }

    /// Maps an existing file copy-on-write: changes stay in this process and never reach
    /// the file (for inspecting a region, even one being served, without touching it). Its
    /// length must be a multiple of 8, as for [`RegionFile::open`].
    pub fn open_private(path: &Path) -> Result<Arc<Self>, RegionFileError> {
        let (file, len) = open_existing(path, false)?;
        let io = |what, source| RegionFileError::Io {
            what,
            path: path.to_owned(),
            source,
        };
        // SAFETY: another process may change the file while it is mapped; every access to the
        // mapping goes through `Pmem`, which reads and writes with whole-word atomics and
        // never assumes the bytes stay the same, so concurrent changes cannot cause UB.
        let map = unsafe { MmapOptions::new().len(len as usize).map_copy(&file) }
            .map_err(|e| io("map", e))?;
        Ok(Arc::new(Self {
            map: map.into(),
            path: path.to_owned(),
            len,
            _file: file,
        }))
    }

    fn map(file: File, path: &Path, len: u64) -> Result<Arc<Self>, RegionFileError> {
        let map = MmapOptions::new()
            .len(len as usize)
            .map_raw(&file)
            .map_err(|source| RegionFileError::Io {
                what: "map",
                path: path.to_owned(),
                source,
            })?;
        Ok(Arc::new(Self {
            map,
            path: path.to_owned(),
            len,
            _file: file,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes an exclusive advisory lock on the file for as long as this mapping lives, so
    /// that no second memory node serves the same region; fails at once if another process
    /// holds it. KNs and `inspect` map the file without taking it.
    pub fn lock_exclusive(&self) -> Result<(), RegionFileError> {
        try_lock(&self._file, &self.path)
    }

    /// Asks the kernel to write the mapping back to the file (for a clean shutdown when the
    /// file is not on a DAX device).
    pub fn sync(&self) -> io::Result<()> {
        self.map.flush()
    }

    /// A [`Pmem`] over the mapping; the returned value keeps the mapping alive.
    pub fn pmem(self: &Arc<Self>) -> Pmem<FilePersist> {
        let persist = FilePersist {
            file: Arc::clone(self),
            cpu: CpuPersist::detect(),
        };
        // SAFETY: the mapping is page aligned, `len` bytes long (a multiple of 8, checked
        // when the file was created or opened), and kept alive by the `Arc` inside
        // `persist`; other processes reach it only through `Pmem` too (whole-word atomics).
        unsafe { Pmem::new(self.map.as_mut_ptr(), self.len, persist) }
    }
}

/// Removes the region file at `path` (for `format --force`), refusing with
/// [`RegionFileError::Busy`] while a memory node serves it: the server would go on with the
/// unlinked file while KNs attach to the new one. The lock is held across the unlink so no
/// server can start on the old file in between. A missing file is not an error.
pub fn remove_unserved(path: &Path) -> Result<(), RegionFileError> {
    let file = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(RegionFileError::Io {
                what: "open",
                path: path.to_owned(),
                source,
            })
        }
    };
    try_lock(&file, path)?;
    std::fs::remove_file(path).map_err(|source| RegionFileError::Io {
        what: "remove",
        path: path.to_owned(),
        source,
    })
}

/// Takes the exclusive advisory lock a serving memory node holds; fails at once if another
/// process holds it.
fn try_lock(file: &File, path: &Path) -> Result<(), RegionFileError> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` on a file descriptor the caller owns; it has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Err(RegionFileError::Busy {
            path: path.to_owned(),
        })
    } else {
        Err(RegionFileError::Io {
            what: "lock",
            path: path.to_owned(),
            source: e,
        })
    }
}

/// Opens an existing region file (read-write or read-only) and checks its size.
fn open_existing(path: &Path, write: bool) -> Result<(File, u64), RegionFileError> {
    let io = |what, source| RegionFileError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                RegionFileError::NotFound {
                    path: path.to_owned(),
                }
            } else {
                io("open", e)
            }
        })?;
    let len = file.metadata().map_err(|e| io("stat", e))?.len();
    if len < MIN_FILE_LEN {
        return Err(RegionFileError::TooSmall {
            path: path.to_owned(),
            len,
        });
    }
    check_whole_words(path, len)?;
    Ok((file, len))
}

/// A [`Pmem`] is made of whole 8-byte words, so a region's length must be a multiple of 8.
fn check_whole_words(path: &Path, len: u64) -> Result<(), RegionFileError> {
    if len % 8 == 0 {
        Ok(())
    } else {
        Err(RegionFileError::NotWholeWords {
            path: path.to_owned(),
            len,
        })
    }
}

/// CPU write-back for a mapped file; holds the mapping alive.
#[derive(Debug, Clone)]
pub struct FilePersist {
    file: Arc<RegionFile>,
    cpu: CpuPersist,
}

impl FilePersist {
    pub fn file(&self) -> &Arc<RegionFile> {
        &self.file
    }
}

impl Persist for FilePersist {
    #[inline]
    fn flush(&self, base: *const u8, off: u64, len: u64) {
        self.cpu.flush(base, off, len)
    }
    #[inline]
    fn fence(&self) {
        self.cpu.fence()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_process_may_hold_the_serving_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r");
        let a = RegionFile::create(&p, 1 << 16).expect("create");
        a.lock_exclusive().expect("first lock");
        // A second open file description (as a second process would have) is refused.
        let b = RegionFile::open(&p).expect("open");
        assert!(matches!(
            b.lock_exclusive(),
            Err(RegionFileError::Busy { .. })
        ));
        drop(a);
        b.lock_exclusive()
            .expect("the lock is released with the mapping");
    }

    #[test]
    fn two_mappings_share_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r");
        let a = RegionFile::create(&p, 1 << 16).expect("create");
        let b = RegionFile::open(&p).expect("open");
        let (pa, pb) = (a.pmem(), b.pmem());
        pa.store_u64(4096, 77);
        assert_eq!(pb.load_u64(4096), 77);
        assert!(matches!(
            RegionFile::create(&p, 4096),
            Err(RegionFileError::AlreadyExists { .. })
        ));
        // A private mapping sees the file but never changes it.
        let c = RegionFile::open_private(&p).expect("open private");
        let pc = c.pmem();
        assert_eq!(pc.load_u64(4096), 77);
        pc.store_u64(4096, 5);
        assert_eq!(pa.load_u64(4096), 77);
        assert!(matches!(
            RegionFile::open(&dir.path().join("missing")),
            Err(RegionFileError::NotFound { .. })
        ));
    }

    #[test]
    fn a_length_that_is_not_whole_words_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r");
        assert!(matches!(
            RegionFile::create(&p, 4097),
            Err(RegionFileError::NotWholeWords { len: 4097, .. })
        ));
        assert!(!p.exists(), "nothing is created for a refused length");
        std::fs::write(&p, vec![0u8; 4100]).expect("write");
        assert!(matches!(
            RegionFile::open(&p),
            Err(RegionFileError::NotWholeWords { len: 4100, .. })
        ));
        assert!(matches!(
            RegionFile::open_private(&p),
            Err(RegionFileError::NotWholeWords { len: 4100, .. })
        ));
        std::fs::write(&p, vec![0u8; 4104]).expect("write");
        let r = RegionFile::open(&p).expect("a whole number of words opens");
        assert_eq!(r.pmem().len(), 4104);
    }
}
