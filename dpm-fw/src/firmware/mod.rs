//! The hardware-independent parts of the bare-metal memory-node image
//! (`src/bin/dpm-fw-image`): its heap allocator, the device-tree probe for the PSCI
//! conduit, mounting the region handed over by the platform, and the self-test. They live
//! in the library so that host tests exercise exactly the code the image runs.

use core::fmt;

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::geometry::{FormatParams, SuperblockError};

use crate::dpm::Dpm;
use crate::region::{self, FormatError, OpenError};

pub mod fdt;
pub mod heap;
pub mod selftest;

/// What [`mount`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mounted {
    /// The memory held no region (no superblock magic): a fresh one was formatted.
    Formatted,
    /// An existing region was opened and recovered.
    Recovered,
}

/// Why [`mount`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountError {
    /// The memory holds a region that does not open; it is left untouched.
    Open(OpenError),
    /// Formatting blank memory failed.
    Format(FormatError),
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open(e) => write!(f, "the region does not open (left as it is): {e}"),
            Self::Format(e) => write!(f, "cannot format the region: {e}"),
        }
    }
}

/// Opens the region in `pm`, or formats it with `params` if the memory holds no region at
/// all. A region whose superblock carries the magic but fails validation is never
/// reformatted: that would destroy data a repair tool might still save.
pub fn mount<P: Persist>(
    pm: Pmem<P>,
    params: &FormatParams,
    region_id: u64,
) -> Result<(Dpm<P>, Mounted), MountError> {
    match region::read_geometry(&pm) {
        Err(OpenError::Superblock(SuperblockError::BadMagic)) => Dpm::format(pm, params, region_id)
            .map(|d| (d, Mounted::Formatted))
            .map_err(MountError::Format),
        Err(e) => Err(MountError::Open(e)),
        Ok(_) => Dpm::open(pm)
            .map(|d| (d, Mounted::Recovered))
            .map_err(MountError::Open),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinomo_hw::NoPersist;

    #[repr(C, align(64))]
    struct Line([u8; 64]);

    fn memory(bytes: usize) -> Vec<Line> {
        (0..bytes / 64).map(|_| Line([0; 64])).collect()
    }

    #[test]
    fn mount_formats_blank_memory_then_recovers_and_refuses_damage() {
        let len = 2u64 << 20;
        let mut mem = memory(len as usize);
        let base = mem.as_mut_ptr().cast::<u8>();
        let params = FormatParams {
            block_size: 64 << 10,
            ..FormatParams::for_size(len)
        };
        // SAFETY: `mem` is 64-aligned, `len` bytes, and outlives every `Pmem` made here.
        let pm = unsafe { Pmem::new(base, len, NoPersist) };
        let (dpm, how) = mount(pm, &params, 9).expect("blank memory formats");
        assert_eq!(how, Mounted::Formatted);
        assert_eq!(dpm.region_id(), 9);
        drop(dpm);
        // SAFETY: as above.
        let pm = unsafe { Pmem::new(base, len, NoPersist) };
        let (dpm, how) = mount(pm, &params, 10).expect("formatted region opens");
        assert_eq!(how, Mounted::Recovered);
        assert_eq!(dpm.region_id(), 9, "an existing region keeps its id");
        drop(dpm);
        // Damage the superblock behind its magic: mount must refuse, not reformat.
        mem[0].0[40] ^= 0xFF;
        let damaged = mem[0].0;
        // SAFETY: as above.
        let pm = unsafe { Pmem::new(base, len, NoPersist) };
        let err = mount(pm, &params, 11).expect_err("a damaged region is refused");
        assert!(matches!(err, MountError::Open(_)), "{err}");
        assert_eq!(mem[0].0, damaged, "a refused region is not rewritten");
    }
}
