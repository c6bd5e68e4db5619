//! Setup shared by the tests that drive a memory node on a small in-memory region.
#![allow(dead_code)]

use std::sync::Arc;

use dinomo_hw::shadow::ShadowRegion;
use dinomo_shared::geometry::FormatParams;
use dpm_fw::Dpm;

/// Bytes of the test region: small, so a test fills blocks and runs out of them quickly.
pub const REGION: u64 = 2 << 20;

pub type TestDpm = Dpm<Arc<ShadowRegion>>;

/// A newly formatted region with small blocks and few logs, KNs and cells, named
/// `region_id`.
pub fn fresh(region_id: u64) -> (Arc<ShadowRegion>, TestDpm) {
    let params = FormatParams {
        block_size: 4096,
        max_logs: 8,
        max_kns: 4,
        indirect_cells: 16,
        ..FormatParams::for_size(REGION)
    };
    let r = ShadowRegion::new(REGION);
    let dpm = Dpm::format(r.pmem(), &params, region_id).expect("format");
    (r, dpm)
}

/// Recovery from what `r` has made durable, as after a power failure.
pub fn reopen(r: &ShadowRegion) -> (Arc<ShadowRegion>, TestDpm) {
    let r2 = ShadowRegion::from_image(&r.durable_image());
    let dpm = Dpm::open(r2.pmem()).expect("recovery");
    (r2, dpm)
}
