//! Setups for tests and benchmarks of the memory node in one process.
//!
//! [`LogWriter`] plays the KVS-node side against a [`Dpm`]: it encodes entries with the
//! block's salt, writes each batch with one copy and one persist (as a KN's WRITE + FLUSH
//! would), seals full blocks and asks for new ones. The real KN lives in `host-kn`.
//!
//! [`fresh`] formats a small region on the [`ShadowRegion`] backend, which keeps apart
//! what was persisted, so a test can cut the power at any persist point and recover with
//! [`reopen`] or [`open_image`]. The region is small so that a test fills blocks and runs
//! out of them quickly.

use std::sync::Arc;

use dinomo_hw::shadow::ShadowRegion;
use dinomo_shared::geometry::FormatParams;

use crate::Dpm;

pub use crate::logwriter::{LogWriter, Staged};

/// Bytes of the small test region.
pub const SMALL_REGION: u64 = 2 << 20;

/// A memory node over a shadow region.
pub type TestDpm = Dpm<Arc<ShadowRegion>>;

/// The small test region: [`SMALL_REGION`] bytes in 4 KiB blocks, 8 logs, 4 KNs and 16
/// indirect cells. Override fields for a test that needs fewer (see [`fresh_with`]).
pub fn small_params() -> FormatParams {
    FormatParams {
        block_size: 4096,
        max_logs: 8,
        max_kns: 4,
        indirect_cells: 16,
        ..FormatParams::for_size(SMALL_REGION)
    }
}

/// A newly formatted small region (see [`small_params`]) named `region_id`.
pub fn fresh(region_id: u64) -> (Arc<ShadowRegion>, TestDpm) {
    fresh_with(&small_params(), region_id)
}

/// A newly formatted region of `params.region_size` bytes named `region_id`.
pub fn fresh_with(params: &FormatParams, region_id: u64) -> (Arc<ShadowRegion>, TestDpm) {
    let r = ShadowRegion::new(params.region_size);
    let dpm = Dpm::format(r.pmem(), params, region_id).expect("format");
    (r, dpm)
}

/// Recovery from what `r` has made durable, as after a power failure.
pub fn reopen(r: &ShadowRegion) -> (Arc<ShadowRegion>, TestDpm) {
    open_image(&r.durable_image())
}

/// Recovery from a region image, e.g. [`ShadowRegion::crash_image`].
pub fn open_image(image: &[u8]) -> (Arc<ShadowRegion>, TestDpm) {
    let r = ShadowRegion::from_image(image);
    let dpm = Dpm::open(r.pmem()).expect("recovery");
    (r, dpm)
}
