//! A region backed by a file mapped `MAP_SHARED`, so that separate processes (the DPM and
//! every KN on the machine) see one pool of memory, as with CXL or a DAX device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::pmem::{CpuPersist, Persist, Pmem};

/// Mode of every region and control file: only its owner may read or write it, since
/// whoever maps the region can read and change every key and value.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the folder that holds them: nobody else may list, create or replace files in it.
pub const DIR_MODE: u32 = 0o700;

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
    /// The file system cannot back the whole file: mapped and written, the missing blocks
    /// would kill every process that maps it with SIGBUS once it fills.
    #[error(
        "not enough space for {path}: it needs {need} bytes allocated, the file system has \
         {free} bytes free; choose a smaller --size or a larger file system (for tmpfs: \
         `mount -o remount,size=...`)"
    )]
    NoSpace { path: PathBuf, need: u64, free: u64 },
    #[error(
        "folder {path} belongs to uid {owner}, not to this user (uid {me}); region and \
         control files must be in a folder only their user controls"
    )]
    ForeignFolder { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "folder {path} has mode {mode:04o}: other users could list, plant or replace the \
         region and control files in it; use a private folder (`mkdir -m 700 DIR`, or \
         `chmod 700 {path}`)"
    )]
    OpenFolder { path: PathBuf, mode: u32 },
    #[error("{path} is not a folder")]
    NotAFolder { path: PathBuf },
    #[error("cannot use folder {path}: {source}")]
    Folder { path: PathBuf, source: io::Error },
    #[error(
        "{path} belongs to uid {owner}, not to this user (uid {me}); refusing a region or \
         control file that another user controls"
    )]
    ForeignFile { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "{path} has mode {mode:04o}: other users could read or change the region; run \
         `chmod 600 {path}`"
    )]
    OpenFile { path: PathBuf, mode: u32 },
    #[error("cannot {what} region file {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Where a write to a mapped region is durable once [`Pmem::persist`] returns (see
/// docs/DESIGN.md, "Persistence domain").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistenceDomain {
    /// Mapped with `MAP_SYNC` from a DAX file system: CPU cache write-back reaches the
    /// persistent media (with ADR; eADR also covers the caches), and no page-cache state
    /// stands between the mapping and the media.
    Dax,
    /// A page-cache mapping (tmpfs, or a file system without DAX): a persisted write
    /// survives the crash of any process, but reaches the file only at `msync`
    /// ([`RegionFile::sync`], on a clean shutdown) or kernel write-back; on tmpfs it lives
    /// in RAM and does not survive a power cut or reboot.
    PageCache,
    /// A private copy-on-write mapping (inspection): nothing reaches the file.
    Private,
}

/// A mapped region file.
#[derive(Debug)]
pub struct RegionFile {
    map: Mapping,
    path: PathBuf,
    len: u64,
    domain: PersistenceDomain,
    _file: File,
}

/// Smallest file accepted by [`RegionFile::open`].
pub const MIN_FILE_LEN: u64 = 4096;

/// The effective user id of this process.
fn my_uid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (and missing parents) with mode 0700 if it does not exist; an existing
/// folder must be owned by this user and have no group or other permission bits (mode
/// 0700 or stricter). For a folder the tools choose themselves, such as the cluster folder
/// of `dinomo up` under the predictable `/dev/shm/dinomo-cluster`: another user who made
/// it first, or can list it, is refused. An existing folder is never changed, only refused.
pub fn ensure_private_dir(dir: &Path) -> Result<(), RegionFileError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| RegionFileError::Folder {
                path: dir.to_owned(),
                source,
            })?;
    }
    check_dir(dir, 0o077)
}

/// Checks the folder a region or control file is created in (a folder the user named): it
/// must belong to this user and no one else may create, remove or rename files in it (no
/// group or other write bit; shared folders such as `/tmp` and `/dev/shm` are refused even
/// with their sticky bit), so nobody can plant a file or link where the DPM creates one or
/// swap the region under it. Others may still list such a folder (a `tempfile` folder is
/// 0755), which shows names only: the files themselves are 0600.
pub fn check_private_dir(dir: &Path) -> Result<(), RegionFileError> {
    check_dir(dir, 0o022)
}

/// `dir` is a folder owned by this user whose mode has none of the bits in `forbidden`.
fn check_dir(dir: &Path, forbidden: u32) -> Result<(), RegionFileError> {
    let meta = std::fs::metadata(dir).map_err(|source| RegionFileError::Folder {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(RegionFileError::NotAFolder {
            path: dir.to_owned(),
        });
    }
    let me = my_uid();
    if meta.uid() != me {
        return Err(RegionFileError::ForeignFolder {
            path: dir.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & forbidden != 0 {
        return Err(RegionFileError::OpenFolder {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The folder a file at `path` is created in.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks an existing region or control file: owned by this user, no group or other
/// permission bits.
pub fn check_private_file(file: &File, path: &Path) -> Result<(), RegionFileError> {
    let meta = file.metadata().map_err(|source| RegionFileError::Io {
        what: "stat",
        path: path.to_owned(),
        source,
    })?;
    let me = my_uid();
    if meta.uid() != me {
        return Err(RegionFileError::ForeignFile {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RegionFileError::OpenFile {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Opens a new file for a region or control block: mode 0600, never an existing file (nor
/// a symbolic link planted at `path`), in a folder [`check_private_dir`] accepts.
pub fn create_private_file(path: &Path) -> Result<File, RegionFileError> {
    check_private_dir(parent_dir(path))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                RegionFileError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                RegionFileError::Io {
                    what: "create",
                    path: path.to_owned(),
                    source: e,
                }
            }
        })
}

/// Bytes free for this user on the file system holding `file`.
fn free_bytes(file: &File) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `fstatvfs` writes a `statvfs` into the buffer we own; the descriptor is open.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fstatvfs` succeeded, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Bytes free for this user on the file system holding `dir`, plus what replacing the
/// file at `replacing` (if any) would give back: whether a region of some size fits, asked
/// before anything is removed (`format --force`).
pub fn space_for(dir: &Path, replacing: Option<&Path>) -> Result<u64, RegionFileError> {
    let folder = |source| RegionFileError::Folder {
        path: dir.to_owned(),
        source,
    };
    let d = File::open(dir).map_err(folder)?;
    let free = free_bytes(&d).map_err(folder)?;
    let back = replacing
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.blocks().saturating_mul(512));
    Ok(free.saturating_add(back))
}

/// Makes sure every block of the first `len` bytes of `file` is allocated, so that a write
/// through a shared mapping can never find the file system full (which the kernel reports
/// with SIGBUS, killing every process that maps the file). A file system that cannot back
/// the file is [`RegionFileError::NoSpace`], before anything is written.
///
/// `fresh`: the file was just created and nobody else maps it (see below for file systems
/// without `fallocate`).
pub fn allocate(file: &File, path: &Path, len: u64, fresh: bool) -> Result<(), RegionFileError> {
    let io = |what, source| RegionFileError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(|e| io("stat", e))?;
    let allocated = meta.blocks().saturating_mul(512);
    if allocated >= len {
        return Ok(());
    }
    let free = free_bytes(file).map_err(|e| io("measure the free space for", e))?;
    let need = len - allocated;
    if need > free {
        return Err(RegionFileError::NoSpace {
            path: path.to_owned(),
            need: len,
            free: free.saturating_add(allocated),
        });
    }
    let end = libc::off_t::try_from(len).map_err(|_| {
        io(
            "allocate",
            io::Error::new(io::ErrorKind::InvalidInput, "length too large"),
        )
    })?;
    // SAFETY: `fallocate` (mode 0) on a descriptor we own; it only allocates blocks and
    // never changes the bytes already in the file.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, end) };
    let rc = if rc == 0 {
        0
    } else {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    let rc = if rc == libc::EOPNOTSUPP && fresh {
        // A file system without fallocate (NFSv3, some FUSE): glibc's emulation writes a
        // zero byte into every block, safe only while nobody else writes the file (a new
        // one). An existing region on such a file system is used as it is.
        // SAFETY: as above; the file is new and not yet mapped by anyone.
        unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, end) }
    } else if rc == libc::EOPNOTSUPP {
        0
    } else {
        rc
    };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(RegionFileError::NoSpace {
            path: path.to_owned(),
            need: len,
            free: free_bytes(file).unwrap_or(0).saturating_add(allocated),
        }),
        e => Err(io("allocate", io::Error::from_raw_os_error(e))),
    }
}

/// A memory mapping of a file, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; `RegionFile` only hands it out through
// `Pmem`, whose accesses are whole-word atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` with `flags` (read and write).
    fn new(file: &File, len: usize, flags: libc::c_int) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), of a descriptor
        // we own; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { ptr, len })
    }

    /// A shared mapping, with `MAP_SYNC` where the file system offers it (DAX).
    fn shared(file: &File, len: usize) -> io::Result<(Self, PersistenceDomain)> {
        #[cfg(target_os = "linux")]
        {
            // MAP_SHARED_VALIDATE makes the kernel refuse MAP_SYNC (EOPNOTSUPP) where it
            // cannot honour it instead of ignoring it; old kernels say EINVAL.
            match Self::new(file, len, libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC) {
                Ok(m) => return Ok((m, PersistenceDomain::Dax)),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Self::new(file, len, libc::MAP_SHARED).map(|m| (m, PersistenceDomain::PageCache))
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our mapping.
        let rc = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once; nothing derived from it
        // outlives the `RegionFile` that owns it (every `Pmem` holds an `Arc` of it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl RegionFile {
    /// Creates a new zero-filled file of `len` bytes (mode 0600, in a private folder, see
    /// [`create_private_file`]), allocates all its blocks ([`allocate`]) and maps it. Never
    /// overwrites. `len` must be a multiple of 8 ([`RegionFileError::NotWholeWords`]
    /// otherwise). Nothing is left behind when it fails.
    pub fn create(path: &Path, len: u64) -> Result<Arc<Self>, RegionFileError> {
        check_whole_words(path, len)?;
        let file = create_private_file(path)?;
        let sized = file
            .set_len(len)
            .map_err(|source| RegionFileError::Io {
                what: "size",
                path: path.to_owned(),
                source,
            })
            .and_then(|()| allocate(&file, path, len, true));
        if let Err(e) = sized {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Self::map(file, path, len)
    }

    /// Maps an existing file, allocating any blocks it lacks (a sparse file, e.g. one
    /// copied or made by an older version) so a full file system is an error here rather
    /// than a SIGBUS later. The file must belong to this user and be 0600
    /// ([`check_private_file`]); its length a multiple of 8
    /// ([`RegionFileError::NotWholeWords`] otherwise).
    pub fn open(path: &Path) -> Result<Arc<Self>, RegionFileError> {
        let (file, len) = open_existing(path, true)?;
        check_private_file(&file, path)?;
        allocate(&file, path, len, false)?;
        Self::map(file, path, len)
    }

    /// Maps an existing file copy-on-write: changes stay in this process and never reach
    /// the file (for inspecting a region, even one being served, without touching it). Its
    /// length must be a multiple of 8, as for [`RegionFile::open`].
    pub fn open_private(path: &Path) -> Result<Arc<Self>, RegionFileError> {
        let (file, len) = open_existing(path, false)?;
        let size = usize::try_from(len).map_err(|_| RegionFileError::TooSmall {
            path: path.to_owned(),
            len,
        })?;
        // Private pages are copied on write, so a read-only descriptor is enough. Another
        // process may change the file while it is mapped; every access goes through `Pmem`
        // (whole-word atomics that never assume the bytes stay the same).
        let map =
            Mapping::new(&file, size, libc::MAP_PRIVATE).map_err(|source| RegionFileError::Io {
                what: "map",
                path: path.to_owned(),
                source,
            })?;
        Ok(Arc::new(Self {
            map,
            path: path.to_owned(),
            len,
            domain: PersistenceDomain::Private,
            _file: file,
        }))
    }

    fn map(file: File, path: &Path, len: u64) -> Result<Arc<Self>, RegionFileError> {
        let io = |source| RegionFileError::Io {
            what: "map",
            path: path.to_owned(),
            source,
        };
        let size = usize::try_from(len)
            .map_err(|_| io(io::Error::new(io::ErrorKind::InvalidInput, "too large")))?;
        let (map, domain) = Mapping::shared(&file, size).map_err(io)?;
        Ok(Arc::new(Self {
            map,
            path: path.to_owned(),
            len,
            domain,
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

    /// Where a persisted write is durable: DAX (`MAP_SYNC`), the page cache, or nowhere
    /// (a private mapping).
    pub fn persistence_domain(&self) -> PersistenceDomain {
        self.domain
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
        if self.domain == PersistenceDomain::Private {
            return Ok(());
        }
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
        unsafe { Pmem::new(self.map.ptr.as_ptr(), self.len, persist) }
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
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let r = RegionFile::open(&p).expect("a whole number of words opens");
        assert_eq!(r.pmem().len(), 4104);
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    #[test]
    fn region_and_control_files_are_0600_in_a_private_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r");
        let _r = RegionFile::create(&p, 1 << 16).expect("create");
        assert_eq!(mode_of(&p), 0o600);
        let ctl = crate::fabric::default_ctl_path(&p);
        let _server = crate::fabric::ControlServer::create(&ctl, 2).expect("control file");
        assert_eq!(mode_of(&ctl), 0o600);
        // `ensure_private_dir` makes a missing folder 0700 (parents included).
        let cluster = dir.path().join("a").join("cluster");
        ensure_private_dir(&cluster).expect("new private folder");
        assert_eq!(mode_of(&cluster), 0o700);
        ensure_private_dir(&cluster).expect("an existing private folder is accepted");
    }

    #[test]
    fn an_open_or_foreign_folder_is_refused_and_nothing_is_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let p = open.join("r");
        let e = RegionFile::create(&p, 1 << 16).expect_err("a folder like /tmp");
        assert!(
            matches!(e, RegionFileError::OpenFolder { mode: 0o1777, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 700"), "{e}");
        assert!(!p.exists(), "nothing is created in a refused folder");
        let ctl = open.join("r.ctl");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        let e = crate::fabric::ControlServer::create(&ctl, 2).expect_err("group-writable");
        assert!(e.to_string().contains("mode 0775"), "{e}");
        assert!(std::fs::read_dir(&open).expect("ls").next().is_none());
        // The cluster folder a tool picks itself must be 0700: others may not even list it.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(matches!(
            ensure_private_dir(&open),
            Err(RegionFileError::OpenFolder { .. })
        ));
        // A folder of another user: root can make one; anyone else finds one in `/`.
        let foreign = if my_uid() == 0 {
            let f = dir.path().join("foreign");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&f)
                .expect("mkdir");
            std::os::unix::fs::chown(&f, Some(12345), None).expect("chown");
            f
        } else {
            PathBuf::from("/")
        };
        let e = ensure_private_dir(&foreign).expect_err("foreign folder");
        assert!(matches!(e, RegionFileError::ForeignFolder { .. }), "{e}");
        assert!(e.to_string().contains("belongs to uid"), "{e}");
        let e = RegionFile::create(&foreign.join("r"), 1 << 16).expect_err("foreign folder");
        assert!(matches!(e, RegionFileError::ForeignFolder { .. }), "{e}");
        assert!(!foreign.join("r").exists());
    }

    #[test]
    fn a_region_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r");
        drop(RegionFile::create(&p, 1 << 16).expect("create"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = RegionFile::open(&p).expect_err("0644 region");
        assert!(
            matches!(e, RegionFileError::OpenFile { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_region_larger_than_the_free_space_is_refused_at_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let probe = File::open(dir.path()).expect("open folder");
        let free = free_bytes(&probe).expect("free space");
        let len = (free + (1 << 30)) & !7;
        let p = dir.path().join("r");
        let e = RegionFile::create(&p, len).expect_err("more than the free space");
        match &e {
            RegionFileError::NoSpace { need, .. } => assert_eq!(*need, len),
            other => panic!("expected NoSpace, got {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("not enough space") && msg.contains("free"),
            "{msg}"
        );
        assert!(!p.exists(), "a refused region leaves no file behind");
    }

    #[test]
    fn opening_a_sparse_region_allocates_its_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r");
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .expect("create");
        f.set_len(1 << 20).expect("sparse length");
        drop(f);
        let blocks = |p: &Path| std::fs::metadata(p).expect("stat").blocks() * 512;
        assert!(blocks(&p) < 1 << 20, "the file starts sparse");
        let r = RegionFile::open(&p).expect("open");
        assert!(blocks(&p) >= 1 << 20, "every block is allocated at open");
        assert_ne!(r.persistence_domain(), PersistenceDomain::Private);
    }

    /// The scenario of a user formatting a 64 MiB region on a 16 MiB tmpfs. Mounting needs
    /// root, so it is not part of the default run: `cargo test -p dinomo-hw -- --ignored
    /// tmpfs` as root.
    #[test]
    #[ignore = "mounts a tmpfs: needs root (run with --ignored)"]
    fn a_region_larger_than_a_small_tmpfs_is_refused_at_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16M,mode=0700", "tmpfs"])
            .arg(&mnt)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a tmpfs needs root");
        let p = mnt.join("r");
        let r = RegionFile::create(&p, 64 << 20);
        let exists = p.exists();
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        let e = r.expect_err("64 MiB on a 16 MiB tmpfs");
        assert!(
            matches!(e, RegionFileError::NoSpace { need, .. } if need == 64 << 20),
            "{e}"
        );
        assert!(!exists, "a refused region leaves no file behind");
        // On tmpfs the mapping is a page-cache one.
        assert!(e.to_string().contains("tmpfs"), "{e}");
    }
}
