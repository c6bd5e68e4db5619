//! The cluster manager's durable state in the control area: the cluster map and the KN
//! leases.
//!
//! The manager reaches them only through control messages. A new map is staged in the
//! copy the header does not name, range by range, checked against the CRC the manager
//! sends, persisted, and committed with one persisted 8-byte store of the header word:
//! until that store a crash leaves the previous map in force. These requests touch only
//! the control area, so they are served while merging is paused and during shutdown.

use alloc::vec::Vec;

use dinomo_hw::Persist;
use dinomo_shared::cluster_map::SlotRange;
use dinomo_shared::control::{ClusterMapHeader, KnLease, CLUSTER_MAP_BYTES, MAX_MAP_EPOCH, NO_KN};
use dinomo_shared::crc::CRC32C;
use dinomo_shared::msg::Response;
use dinomo_shared::slot::SLOTS;
use dinomo_shared::ErrorCode;

use super::Dpm;

/// A map being staged (volatile: a restart forgets it, and the manager starts over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StagedMap {
    epoch: u64,
    /// The copy being filled: the one the header did not name at `MapBegin`.
    copy: u32,
}

/// Bytes read or written at a time while filling or checking a map copy (even: whole
/// owners).
const CHUNK: usize = 512;

// `MapBegin` clears a copy with 0xFF bytes: that must read back as no owner.
const _: () = assert!(NO_KN == u16::MAX);

impl<P: Persist> Dpm<P> {
    fn map_header(&self) -> ClusterMapHeader {
        self.pm.read_pod(self.geo.map_header_off())
    }

    /// The stored cluster map: its epoch and the owner of each slot ([`NO_KN`]: none). A
    /// map being staged is not visible here until it is committed.
    pub fn stored_map(&self) -> (u64, Vec<u16>) {
        let h = self.map_header();
        let mut owners = Vec::with_capacity(SLOTS as usize);
        self.for_each_map_chunk(h.active_copy(), |bytes| {
            owners.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]])),
            );
        });
        (h.epoch(), owners)
    }

    /// The lease row of KN `kn` as stored (`kn_id == 0`: never given a lease); `None` if
    /// the region has no row `kn`.
    pub fn lease(&self, kn: u32) -> Option<KnLease> {
        (kn < self.geo.max_kns).then(|| self.pm.read_pod(self.geo.lease_off(kn)))
    }

    /// Serves [`Request::ClusterInfo`](dinomo_shared::msg::Request::ClusterInfo).
    pub(super) fn cluster_info(&self) -> Response {
        Response::ClusterInfo {
            max_kns: self.geo.max_kns,
            map_epoch: self.map_header().epoch(),
            cells: self.cells.count(),
            active_cells: u32::try_from(self.cells.active()).unwrap_or(u32::MAX),
        }
    }

    /// Serves [`Request::ReadLease`](dinomo_shared::msg::Request::ReadLease).
    pub(super) fn read_lease(&self, kn: u32) -> Result<Response, ErrorCode> {
        let l = self.lease(kn).ok_or(ErrorCode::InvalidArgument)?;
        Ok(Response::Lease {
            kn,
            in_use: l.kn_id != 0,
            lease_epoch: l.lease_epoch,
            expires_ms: l.expires_ms,
            lease_ms: l.lease_ms,
        })
    }

    /// Serves [`Request::StoreLease`](dinomo_shared::msg::Request::StoreLease): the row is
    /// persisted before the reply.
    pub(super) fn store_lease(
        &self,
        kn: u32,
        lease_epoch: u32,
        expires_ms: u64,
        lease_ms: u64,
    ) -> Result<Response, ErrorCode> {
        if kn >= self.geo.max_kns {
            return Err(ErrorCode::InvalidArgument);
        }
        let off = self.geo.lease_off(kn);
        let l = KnLease {
            kn_id: kn + 1,
            lease_epoch,
            expires_ms,
            lease_ms,
            reserved: [0; 5],
        };
        self.pm.write_pod(off, &l);
        self.pm.persist(off, KnLease::SIZE);
        Ok(Response::LeaseStored)
    }

    /// Serves [`Request::MapBegin`](dinomo_shared::msg::Request::MapBegin): clears the copy
    /// the header does not name to no owner and stages `epoch` in it.
    pub(super) fn map_begin(&self, epoch: u64) -> Result<Response, ErrorCode> {
        if epoch > MAX_MAP_EPOCH {
            return Err(ErrorCode::InvalidArgument);
        }
        let mut staged = self.staged_map.lock();
        let h = self.map_header();
        if epoch <= h.epoch() {
            return Err(ErrorCode::StaleEpoch);
        }
        let copy = 1 - h.active_copy();
        self.pm
            .fill(self.geo.map_off(copy), CLUSTER_MAP_BYTES, 0xFF);
        *staged = Some(StagedMap { epoch, copy });
        Ok(Response::MapBegun)
    }

    /// Serves [`Request::MapRanges`](dinomo_shared::msg::Request::MapRanges). Every range
    /// is checked before any is written, so a refused frame changes nothing.
    pub(super) fn map_ranges(&self, epoch: u64, ranges: &[u64]) -> Result<Response, ErrorCode> {
        let staged = self.staged_map.lock();
        let copy = match *staged {
            Some(s) if s.epoch == epoch => s.copy,
            _ => return Err(ErrorCode::InvalidArgument),
        };
        let fits =
            |&w: &u64| w == 0 || SlotRange::unpack(w).is_some_and(|r| r.fits(self.geo.max_kns));
        if !ranges.iter().all(fits) {
            return Err(ErrorCode::InvalidArgument);
        }
        for r in ranges.iter().filter_map(|&w| SlotRange::unpack(w)) {
            self.fill_owner(copy, r);
        }
        Ok(Response::MapRangesStored)
    }

    /// Serves [`Request::MapCommit`](dinomo_shared::msg::Request::MapCommit): checks the
    /// staged table against `crc`, persists it, then commits it with one persisted store
    /// of the header word.
    pub(super) fn map_commit(&self, epoch: u64, crc: u32) -> Result<Response, ErrorCode> {
        let mut staged = self.staged_map.lock();
        if epoch <= self.map_header().epoch() {
            return Err(ErrorCode::StaleEpoch);
        }
        let copy = match *staged {
            Some(s) if s.epoch == epoch => s.copy,
            _ => return Err(ErrorCode::InvalidArgument),
        };
        let mut digest = CRC32C.digest();
        self.for_each_map_chunk(copy, |bytes| digest.update(bytes));
        if digest.finalize() != crc {
            return Err(ErrorCode::InvalidArgument);
        }
        self.pm.persist(self.geo.map_off(copy), CLUSTER_MAP_BYTES);
        let hoff = self.geo.map_header_off();
        self.pm.store_u64(hoff, ClusterMapHeader::word(epoch, copy));
        self.pm.persist(hoff, 8);
        *staged = None;
        Ok(Response::MapStored { epoch })
    }

    /// Sets the owner of slots `r.first..=r.last` of map copy `copy` (not persisted).
    fn fill_owner(&self, copy: u32, r: SlotRange) {
        let mut buf = [0u8; CHUNK];
        for pair in buf.chunks_exact_mut(2) {
            pair.copy_from_slice(&r.kn.to_le_bytes());
        }
        let mut off = self.geo.map_off(copy) + r.first as u64 * 2;
        let end = self.geo.map_off(copy) + (r.last as u64 + 1) * 2;
        while off < end {
            let n = (end - off).min(CHUNK as u64);
            self.pm.write(off, &buf[..n as usize]);
            off += n;
        }
    }

    /// Passes the bytes of map copy `copy` to `f`, in order, a chunk at a time.
    fn for_each_map_chunk(&self, copy: u32, mut f: impl FnMut(&[u8])) {
        let base = self.geo.map_off(copy);
        let mut buf = [0u8; CHUNK];
        let mut at = 0;
        while at < CLUSTER_MAP_BYTES {
            let n = (CLUSTER_MAP_BYTES - at).min(CHUNK as u64) as usize;
            self.pm.read(base + at, &mut buf[..n]);
            f(&buf[..n]);
            at += n as u64;
        }
    }
}
