//! Formatting a region and reading its geometry back.

use core::fmt;

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::control::{ClusterMapHeader, CLUSTER_MAP_BYTES};
use dinomo_shared::geometry::{FormatParams, Geometry, GeometryError, SuperblockError};
use dinomo_shared::pod::Pod;
use dinomo_shared::superblock::{SuperState, Superblock, STATE_OFFSET, SUPERBLOCK_AREA};

use crate::index::{Index, IndexError};

/// Why a region could not be formatted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// The memory is smaller than the size asked for.
    MemoryTooSmall {
        have: u64,
        want: u64,
    },
    Geometry(GeometryError),
    Index(IndexError),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MemoryTooSmall { have, want } => {
                write!(
                    f,
                    "the memory holds {have} bytes but the region needs {want}"
                )
            }
            Self::Geometry(e) => write!(f, "{e}"),
            Self::Index(e) => write!(f, "cannot create the index: {e}"),
        }
    }
}

/// Why a region could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Too small to even hold a superblock.
    TooSmall(u64),
    Superblock(SuperblockError),
    Index(IndexError),
    /// Log metadata failed validation.
    CorruptLog {
        log: u32,
        what: &'static str,
    },
    /// An active indirect cell does not name a valid entry.
    CorruptCell {
        cell: u32,
        what: &'static str,
    },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooSmall(n) => write!(f, "{n} bytes is too small to be a DINOMO region"),
            Self::Superblock(e) => write!(f, "{e}"),
            Self::Index(e) => write!(f, "index: {e}"),
            Self::CorruptLog { log, what } => write!(f, "log {log} is corrupt: {what}"),
            Self::CorruptCell { cell, what } => {
                write!(f, "indirect cell {cell} is corrupt: {what}")
            }
        }
    }
}

/// Lays out a fresh region in `pm`. The superblock is written last, so a format cut short
/// by a crash leaves memory that `open` refuses rather than a half-initialised region.
pub fn format<P: Persist>(
    pm: &Pmem<P>,
    params: &FormatParams,
    region_id: u64,
) -> Result<Geometry, FormatError> {
    if pm.len() < params.region_size {
        return Err(FormatError::MemoryTooSmall {
            have: pm.len(),
            want: params.region_size,
        });
    }
    let geo = Geometry::compute(params).map_err(FormatError::Geometry)?;
    // Invalidate any earlier superblock first, then clear the metadata.
    pm.fill(0, SUPERBLOCK_AREA, 0);
    pm.persist(0, SUPERBLOCK_AREA);
    pm.fill(geo.control_off, geo.control_len, 0);
    pm.fill(geo.indirect_off, geo.indirect_len, 0);
    // Both cluster-map copies start with no owner for any slot.
    for copy in 0..2 {
        pm.fill(geo.map_off(copy), CLUSTER_MAP_BYTES, 0xFF);
    }
    pm.write_pod(geo.map_header_off(), &ClusterMapHeader::zeroed());
    pm.persist(geo.control_off, geo.control_len);
    pm.persist(geo.indirect_off, geo.indirect_len);
    Index::format(pm, &geo).map_err(FormatError::Index)?;
    // A freshly formatted region is consistent: it counts as cleanly shut down.
    let state = SuperState {
        flags: dinomo_shared::superblock::FLAG_CLEAN_SHUTDOWN,
        ..SuperState::zeroed()
    };
    pm.write_pod(STATE_OFFSET, &state);
    pm.persist(STATE_OFFSET, core::mem::size_of::<SuperState>() as u64);
    pm.write_pod(0, &geo.superblock(region_id));
    pm.persist(0, core::mem::size_of::<Superblock>() as u64);
    Ok(geo)
}

/// Reads and validates the superblock.
pub fn read_geometry<P: Persist>(pm: &Pmem<P>) -> Result<Geometry, OpenError> {
    if pm.len() < SUPERBLOCK_AREA {
        return Err(OpenError::TooSmall(pm.len()));
    }
    let sb: Superblock = pm.read_pod(0);
    Geometry::from_superblock(&sb, pm.len()).map_err(OpenError::Superblock)
}

/// The superblock as stored (valid only after [`read_geometry`] succeeded).
pub fn superblock<P: Persist>(pm: &Pmem<P>) -> Superblock {
    pm.read_pod(0)
}

/// The mutable superblock state.
pub fn state<P: Persist>(pm: &Pmem<P>) -> SuperState {
    pm.read_pod(STATE_OFFSET)
}

/// Sets or clears the clean-shutdown flag (one 8-byte store, persisted).
pub fn set_clean<P: Persist>(pm: &Pmem<P>, clean: bool) {
    let off = STATE_OFFSET + core::mem::offset_of!(SuperState, flags) as u64;
    let flags = pm.load_u64(off);
    let flags = if clean {
        flags | dinomo_shared::superblock::FLAG_CLEAN_SHUTDOWN
    } else {
        flags & !dinomo_shared::superblock::FLAG_CLEAN_SHUTDOWN
    };
    pm.store_u64(off, flags);
    pm.persist(off, 8);
}

/// Counts one more mount (persisted). The count only varies block salts between mounts,
/// so it wraps rather than refusing a region whose stored count is at its limit.
pub fn bump_mount_count<P: Persist>(pm: &Pmem<P>) -> u64 {
    let off = STATE_OFFSET + core::mem::offset_of!(SuperState, mount_count) as u64;
    let n = pm.load_u64(off).wrapping_add(1);
    pm.store_u64(off, n);
    pm.persist(off, 8);
    n
}

#[cfg(feature = "std")]
impl std::error::Error for FormatError {}
#[cfg(feature = "std")]
impl std::error::Error for OpenError {}

#[cfg(all(test, feature = "std"))]
mod tests {
    use dinomo_shared::superblock::{SuperState, STATE_OFFSET};

    use crate::testkit::fresh;
    use crate::Dpm;

    /// Found by the `region` fuzz target: a stored mount count of `u64::MAX` made `open`
    /// panic on overflow.
    #[test]
    fn a_mount_count_at_its_limit_wraps() {
        let (r, dpm) = fresh(1);
        drop(dpm);
        let off = STATE_OFFSET + core::mem::offset_of!(SuperState, mount_count) as u64;
        let pm = r.pmem();
        pm.store_u64(off, u64::MAX);
        let dpm = Dpm::open(r.pmem()).expect("open");
        assert_eq!(super::state(dpm.pmem()).mount_count, 0);
    }
}
