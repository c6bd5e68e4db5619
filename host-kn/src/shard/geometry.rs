//! The region's geometry, read from its superblock before a shard (or a KN process) can
//! find the log, the index or the progress slots.

use std::time::Duration;

use dinomo_hw::fabric::Fabric;
use dinomo_shared::geometry::Geometry;
use dinomo_shared::pod::Pod;

use crate::error::KvError;

/// Reads the region's geometry through the fabric (one READ of the superblock).
pub fn read_geometry<F: Fabric + ?Sized>(
    f: &mut F,
    timeout: Duration,
) -> Result<Geometry, KvError> {
    use dinomo_hw::fabric::{execute, Completion, CompletionStatus, Verb, WorkRequest};
    use dinomo_shared::superblock::Superblock;
    let buf = f.alloc_buf(core::mem::size_of::<Superblock>())?;
    let wr = [(
        0,
        WorkRequest::Read {
            remote: 0,
            local: buf.slice(0, core::mem::size_of::<Superblock>() as u32),
        },
    )];
    let mut out = [Completion {
        wr_id: 0,
        verb: Verb::Read,
        status: CompletionStatus::Success,
        value: 0,
    }];
    execute(f, &wr, &mut out, timeout)?;
    if out[0].status != CompletionStatus::Success {
        return Err(KvError::Fabric(format!(
            "reading the superblock: {}",
            out[0].status
        )));
    }
    let sb = Superblock::read_from(f.buf(buf))
        .ok_or_else(|| KvError::Corrupt("short superblock".into()))?;
    Geometry::from_superblock(&sb, f.region_len()).map_err(|e| KvError::Corrupt(e.to_string()))
}
