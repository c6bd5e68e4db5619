//! Where everything lives in the region, derived from the superblock alone so that the DPM
//! and every KN compute identical offsets.
//!
//! ```text
//! 0              superblock (4 KiB: geometry, then mutable state at 128)
//! control_off    control area: index root, cluster-map header, log-mapping table,
//!                progress table, KN leases, two cluster-map copies
//! index_off      index area: buckets, allocated by the DPM only (64-byte units)
//! indirect_off   indirect cells for replicated keys (8 bytes each)
//! log_off        log area: n_blocks blocks of block_size bytes
//! ```

use core::fmt;

use crate::control::{KnLease, LogSlot, ProgressSlot, CLUSTER_MAP_BYTES};
use crate::superblock::{Superblock, LAYOUT_VERSION, MAGIC, SUPERBLOCK_AREA};
use crate::{align_up, CACHE_LINE};

/// Alignment of every area.
pub const AREA_ALIGN: u64 = 4096;
/// Smallest and largest log block sizes accepted.
pub const MIN_BLOCK_SIZE: u64 = 4096;
pub const MAX_BLOCK_SIZE: u64 = 1 << 30;
/// Default log block size (as in the original implementation).
pub const DEFAULT_BLOCK_SIZE: u64 = 8 << 20;
/// Fewest log blocks a region may have.
pub const MIN_BLOCKS: u64 = 4;
/// Smallest index area: room for the first table and its resize.
pub const MIN_INDEX_LEN: u64 = 64 << 10;
/// Largest region an entry reference can address (40-bit offsets).
pub const MAX_REGION_SIZE: u64 = 1 << 40;
/// Default number of logs (KN shards) the log-mapping table can hold.
pub const DEFAULT_MAX_LOGS: u32 = 256;
/// Default number of KN leases.
pub const DEFAULT_MAX_KNS: u32 = 64;
/// Default share of the region given to the index, in percent.
pub const DEFAULT_INDEX_PERCENT: u32 = 12;
/// Default number of indirect cells.
pub const DEFAULT_INDIRECT_CELLS: u64 = 8192;

// Offsets inside the control area.
/// The index root word (see [`crate::index::RootWord`]) on its own cache line.
pub const CTRL_ROOT: u64 = 0;
/// The cluster-map header.
pub const CTRL_MAP_HEADER: u64 = 64;
/// The log-mapping table.
pub const CTRL_LOG_TABLE: u64 = 128;

/// What `format` is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatParams {
    pub region_size: u64,
    pub block_size: u64,
    pub max_logs: u32,
    pub max_kns: u32,
    pub index_percent: u32,
    pub indirect_cells: u64,
}

impl FormatParams {
    /// Defaults for a region of `region_size` bytes: 8 MiB blocks, or smaller ones (down to
    /// 64 KiB) when the region would otherwise hold fewer than 64 blocks.
    pub fn for_size(region_size: u64) -> Self {
        let mut block_size = DEFAULT_BLOCK_SIZE;
        while block_size > (64 << 10) && region_size / block_size < 64 {
            block_size /= 2;
        }
        Self {
            region_size,
            block_size,
            max_logs: DEFAULT_MAX_LOGS,
            max_kns: DEFAULT_MAX_KNS,
            index_percent: DEFAULT_INDEX_PERCENT,
            indirect_cells: DEFAULT_INDIRECT_CELLS,
        }
    }
}

/// Why a geometry cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeometryError {
    BlockSizeNotPowerOfTwo(u64),
    BlockSizeOutOfRange(u64),
    TooManyLogs(u32),
    TooManyKns(u32),
    IndexPercentOutOfRange(u32),
    RegionTooLarge(u64),
    /// More indirect cells than the largest region could hold.
    TooManyIndirectCells(u64),
    /// The region cannot hold the metadata plus [`MIN_BLOCKS`] blocks; `needed` is the least
    /// size that would.
    RegionTooSmall {
        size: u64,
        needed: u64,
    },
}

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BlockSizeNotPowerOfTwo(b) => write!(f, "block size {b} is not a power of two"),
            Self::BlockSizeOutOfRange(b) => write!(
                f,
                "block size {b} is outside {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE} bytes"
            ),
            Self::TooManyLogs(n) => write!(f, "max logs {n} is outside 1..=65535"),
            Self::TooManyKns(n) => write!(f, "max KNs {n} is outside 1..=65535"),
            Self::IndexPercentOutOfRange(p) => {
                write!(f, "index share {p}% is outside 1..=90 percent")
            }
            Self::RegionTooLarge(s) => {
                write!(
                    f,
                    "region size {s} exceeds the largest addressable ({MAX_REGION_SIZE})"
                )
            }
            Self::TooManyIndirectCells(n) => write!(
                f,
                "{n} indirect cells do not fit in the largest region ({MAX_REGION_SIZE} bytes)"
            ),
            Self::RegionTooSmall { size, needed } => write!(
                f,
                "region size {size} is too small: at least {needed} bytes are needed \
                 for the metadata, the index and {MIN_BLOCKS} log blocks"
            ),
        }
    }
}

/// The resolved layout of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub region_size: u64,
    pub block_size: u64,
    pub max_logs: u32,
    pub max_kns: u32,
    pub control_off: u64,
    pub control_len: u64,
    pub index_off: u64,
    pub index_len: u64,
    pub indirect_off: u64,
    pub indirect_len: u64,
    pub log_off: u64,
    pub n_blocks: u64,
}

impl Geometry {
    /// Lays out a new region.
    pub fn compute(p: &FormatParams) -> Result<Self, GeometryError> {
        if !p.block_size.is_power_of_two() {
            return Err(GeometryError::BlockSizeNotPowerOfTwo(p.block_size));
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&p.block_size) {
            return Err(GeometryError::BlockSizeOutOfRange(p.block_size));
        }
        if p.max_logs == 0 || p.max_logs > u16::MAX as u32 {
            return Err(GeometryError::TooManyLogs(p.max_logs));
        }
        if p.max_kns == 0 || p.max_kns > u16::MAX as u32 {
            return Err(GeometryError::TooManyKns(p.max_kns));
        }
        if !(1..=90).contains(&p.index_percent) {
            return Err(GeometryError::IndexPercentOutOfRange(p.index_percent));
        }
        if p.region_size > MAX_REGION_SIZE {
            return Err(GeometryError::RegionTooLarge(p.region_size));
        }
        // Bounded before the layout arithmetic below, which would otherwise overflow.
        if p.indirect_cells > MAX_REGION_SIZE / 8 {
            return Err(GeometryError::TooManyIndirectCells(p.indirect_cells));
        }
        let control_off = SUPERBLOCK_AREA;
        let control_len = align_up(control_area_bytes(p.max_logs, p.max_kns), AREA_ALIGN);
        let index_off = control_off + control_len;
        let wanted_index = (p.region_size / 100) * p.index_percent as u64;
        let index_len = align_up(wanted_index.max(MIN_INDEX_LEN), AREA_ALIGN);
        let indirect_off = index_off + index_len;
        let indirect_len = align_up(p.indirect_cells.max(1) * 8, AREA_ALIGN);
        let log_off = align_up(indirect_off + indirect_len, AREA_ALIGN);
        let needed = log_off + MIN_BLOCKS * p.block_size;
        if p.region_size < needed {
            // Report the least size that works, taking the index share into account.
            let fixed = log_off - index_len + MIN_BLOCKS * p.block_size;
            let with_share = (fixed * 100).div_ceil(100 - p.index_percent as u64);
            return Err(GeometryError::RegionTooSmall {
                size: p.region_size,
                needed: align_up(needed.max(with_share), AREA_ALIGN),
            });
        }
        let n_blocks = (p.region_size - log_off) / p.block_size;
        Ok(Self {
            region_size: p.region_size,
            block_size: p.block_size,
            max_logs: p.max_logs,
            max_kns: p.max_kns,
            control_off,
            control_len,
            index_off,
            index_len,
            indirect_off,
            indirect_len,
            log_off,
            n_blocks,
        })
    }

    /// The superblock describing this geometry (sealed).
    pub fn superblock(&self, region_id: u64) -> Superblock {
        let mut sb = Superblock {
            magic: MAGIC,
            layout_version: LAYOUT_VERSION,
            features: 0,
            region_size: self.region_size,
            block_size: self.block_size,
            max_logs: self.max_logs,
            max_kns: self.max_kns,
            control_off: self.control_off,
            control_len: self.control_len,
            index_off: self.index_off,
            index_len: self.index_len,
            log_off: self.log_off,
            n_blocks: self.n_blocks,
            indirect_off: self.indirect_off,
            indirect_len: self.indirect_len,
            region_id,
            reserved: [0; 3],
            crc: 0,
        };
        sb.seal();
        sb
    }

    /// Rebuilds the geometry from a superblock and checks that it is self-consistent and
    /// fits in `actual_len` bytes. Never trusts a field it has not checked.
    pub fn from_superblock(sb: &Superblock, actual_len: u64) -> Result<Self, SuperblockError> {
        if sb.magic != MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        if sb.layout_version != LAYOUT_VERSION {
            return Err(SuperblockError::UnsupportedVersion(sb.layout_version));
        }
        if sb.crc != sb.compute_crc() {
            return Err(SuperblockError::BadChecksum);
        }
        if sb.features != 0 {
            return Err(SuperblockError::UnknownFeatures(sb.features));
        }
        if sb.region_size > actual_len {
            return Err(SuperblockError::Truncated {
                recorded: sb.region_size,
                actual: actual_len,
            });
        }
        let p = FormatParams {
            region_size: sb.region_size,
            block_size: sb.block_size,
            max_logs: sb.max_logs,
            max_kns: sb.max_kns,
            index_percent: 1,
            indirect_cells: sb.indirect_len / 8,
        };
        let mut g = Self::compute(&p).map_err(SuperblockError::Geometry)?;
        // Bounded before it is added to offsets (which would otherwise overflow).
        if sb.index_len > sb.region_size {
            return Err(SuperblockError::Inconsistent);
        }
        // The index share is not stored; take the recorded length and re-derive the rest.
        g.index_len = sb.index_len;
        g.indirect_off = g.index_off + g.index_len;
        g.log_off = align_up(g.indirect_off + g.indirect_len, AREA_ALIGN);
        let consistent = sb.index_len >= MIN_INDEX_LEN
            && sb.index_len % AREA_ALIGN == 0
            && g.control_off == sb.control_off
            && g.control_len == sb.control_len
            && g.index_off == sb.index_off
            && g.indirect_off == sb.indirect_off
            && g.indirect_len == sb.indirect_len
            && g.log_off == sb.log_off
            && sb.log_off <= sb.region_size
            && (sb.region_size - sb.log_off) / sb.block_size == sb.n_blocks
            && sb.n_blocks >= MIN_BLOCKS
            && sb.n_blocks < u32::MAX as u64;
        if !consistent {
            return Err(SuperblockError::Inconsistent);
        }
        g.n_blocks = sb.n_blocks;
        Ok(g)
    }

    /// Offset of the index root word.
    pub const fn root_off(&self) -> u64 {
        self.control_off + CTRL_ROOT
    }
    /// Offset of the cluster-map header.
    pub const fn map_header_off(&self) -> u64 {
        self.control_off + CTRL_MAP_HEADER
    }
    /// Offset of log slot `log` in the log-mapping table.
    pub const fn log_slot_off(&self, log: u32) -> u64 {
        self.control_off + CTRL_LOG_TABLE + log as u64 * LogSlot::SIZE
    }
    /// Offset of the progress slot of `log`.
    pub const fn progress_off(&self, log: u32) -> u64 {
        self.control_off
            + CTRL_LOG_TABLE
            + self.max_logs as u64 * LogSlot::SIZE
            + log as u64 * ProgressSlot::SIZE
    }
    /// Offset of the lease of KN `kn`.
    pub const fn lease_off(&self, kn: u32) -> u64 {
        self.control_off
            + CTRL_LOG_TABLE
            + self.max_logs as u64 * (LogSlot::SIZE + ProgressSlot::SIZE)
            + kn as u64 * KnLease::SIZE
    }
    /// Offset of cluster-map copy `copy` (0 or 1): one `u16` KN id per slot.
    pub const fn map_off(&self, copy: u32) -> u64 {
        self.lease_off(self.max_kns) + copy as u64 * CLUSTER_MAP_BYTES
    }
    /// Offset of log block `block`.
    pub const fn block_off(&self, block: u32) -> u64 {
        self.log_off + block as u64 * self.block_size
    }
    /// The block containing region offset `off`, if it lies in the log area.
    pub const fn block_of(&self, off: u64) -> Option<u32> {
        if off < self.log_off {
            return None;
        }
        let b = (off - self.log_off) / self.block_size;
        if b < self.n_blocks {
            Some(b as u32)
        } else {
            None
        }
    }
    /// Offset of indirect cell `cell`.
    pub const fn indirect_off(&self, cell: u64) -> u64 {
        self.indirect_off + cell * 8
    }
    /// Indirect cells in the region (the whole area, at least as many as formatted for).
    pub const fn indirect_cells(&self) -> u64 {
        self.indirect_len / 8
    }
    /// Bytes of log space (all blocks).
    pub const fn log_capacity(&self) -> u64 {
        self.n_blocks * self.block_size
    }
    /// The largest entry (header + key + value, padded) that fits a block.
    pub const fn max_entry_len(&self) -> u64 {
        self.block_size - crate::block::BLOCK_HEADER_SIZE
    }
}

const fn control_area_bytes(max_logs: u32, max_kns: u32) -> u64 {
    CTRL_LOG_TABLE
        + max_logs as u64 * (LogSlot::SIZE + ProgressSlot::SIZE)
        + max_kns as u64 * KnLease::SIZE
        + 2 * CLUSTER_MAP_BYTES
        + CACHE_LINE as u64
}

/// Why a superblock was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuperblockError {
    /// Not a DINOMO region.
    BadMagic,
    UnsupportedVersion(u32),
    BadChecksum,
    UnknownFeatures(u32),
    Truncated {
        recorded: u64,
        actual: u64,
    },
    Geometry(GeometryError),
    /// Fields disagree with each other.
    Inconsistent,
}

impl fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("not a DINOMO region (bad magic)"),
            Self::UnsupportedVersion(v) => write!(
                f,
                "region layout version {v} is not supported (this build reads version {LAYOUT_VERSION})"
            ),
            Self::BadChecksum => f.write_str("superblock checksum mismatch: the region is corrupt"),
            Self::UnknownFeatures(x) => write!(f, "region uses unknown feature bits {x:#x}"),
            Self::Truncated { recorded, actual } => write!(
                f,
                "region is truncated: the superblock records {recorded} bytes but only {actual} are present"
            ),
            Self::Geometry(e) => write!(f, "superblock geometry is invalid: {e}"),
            Self::Inconsistent => f.write_str("superblock fields are inconsistent: the region is corrupt"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_and_round_trip() {
        for size in [4u64 << 20, 64 << 20, 1 << 30, 16 << 30] {
            let p = FormatParams::for_size(size);
            let g = Geometry::compute(&p).expect("default geometry");
            assert!(g.n_blocks >= MIN_BLOCKS);
            assert!(g.log_off + g.n_blocks * g.block_size <= size);
            assert!(g.map_off(2) <= g.control_off + g.control_len);
            let sb = g.superblock(42);
            assert_eq!(Geometry::from_superblock(&sb, size), Ok(g));
        }
    }

    #[test]
    fn too_small_reports_needed_size_that_works() {
        let mut p = FormatParams::for_size(100_000);
        let Err(GeometryError::RegionTooSmall { needed, .. }) = Geometry::compute(&p) else {
            panic!("expected RegionTooSmall");
        };
        p.region_size = needed;
        Geometry::compute(&p).expect("the reported size suffices");
    }

    #[test]
    fn refuses_bad_superblocks() {
        let g = Geometry::compute(&FormatParams::for_size(8 << 20)).expect("geometry");
        let sb = g.superblock(1);
        let mut bad = sb;
        bad.magic ^= 1;
        assert_eq!(
            Geometry::from_superblock(&bad, 8 << 20),
            Err(SuperblockError::BadMagic)
        );
        let mut bad = sb;
        bad.n_blocks += 1;
        assert_eq!(
            Geometry::from_superblock(&bad, 8 << 20),
            Err(SuperblockError::BadChecksum)
        );
        bad.seal();
        assert_eq!(
            Geometry::from_superblock(&bad, 8 << 20),
            Err(SuperblockError::Inconsistent)
        );
        assert!(matches!(
            Geometry::from_superblock(&sb, 4 << 20),
            Err(SuperblockError::Truncated { .. })
        ));
    }

    /// Found by the `region` fuzz target: huge recorded lengths overflowed the layout
    /// arithmetic (a panic with overflow checks, a wrong geometry without).
    #[test]
    fn huge_lengths_are_refused_without_overflow() {
        let g = Geometry::compute(&FormatParams::for_size(8 << 20)).expect("geometry");
        for indirect_len in [
            u64::MAX,
            u64::MAX - 4095,
            1 << 62,
            (MAX_REGION_SIZE / 8 + 1) * 8,
        ] {
            let mut bad = g.superblock(1);
            bad.indirect_len = indirect_len;
            bad.seal();
            assert_eq!(
                Geometry::from_superblock(&bad, 8 << 20),
                Err(SuperblockError::Geometry(
                    GeometryError::TooManyIndirectCells(indirect_len / 8)
                ))
            );
        }
        for index_len in [u64::MAX, u64::MAX - 4095, 1 << 62] {
            let mut bad = g.superblock(1);
            bad.index_len = index_len;
            bad.seal();
            assert_eq!(
                Geometry::from_superblock(&bad, 8 << 20),
                Err(SuperblockError::Inconsistent)
            );
        }
        let p = FormatParams {
            indirect_cells: u64::MAX,
            ..FormatParams::for_size(8 << 20)
        };
        assert_eq!(
            Geometry::compute(&p),
            Err(GeometryError::TooManyIndirectCells(u64::MAX))
        );
    }
}
