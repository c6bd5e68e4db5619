//! Control messages between KNs (and the cluster manager) and the DPM: fixed 64-byte frames.
//!
//! Frame: `kind: u16, status: u16, req_id: u32, args: [u64; 7]`. Requests carry
//! `status = 0`; a reply repeats the request's kind and id and carries an [`ErrorCode`].

use core::fmt;

use crate::cluster_map::{SlotRange, RANGES_PER_FRAME};
use crate::control::MAX_MAP_EPOCH;
use crate::{assert_size, impl_pod, pod::Pod, ErrorCode};

/// Bytes of one control frame.
pub const MSG_SIZE: usize = 64;

/// A raw control frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frame {
    pub kind: u16,
    pub status: u16,
    pub req_id: u32,
    pub args: [u64; 7],
}
assert_size!(Frame, MSG_SIZE);
impl_pod!(Frame);

impl Frame {
    /// The frame's bytes.
    pub fn to_bytes(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b.copy_from_slice(self.as_bytes());
        b
    }
    /// A frame from its bytes.
    pub fn from_bytes(b: &[u8; MSG_SIZE]) -> Self {
        Self::read_from(b).unwrap_or_default()
    }
}

const K_PING: u16 = 1;
const K_HELLO: u16 = 2;
const K_OPEN_LOG: u16 = 3;
const K_ALLOC_BLOCK: u16 = 4;
const K_MERGE_ALL: u16 = 5;
const K_CLOSE_LOG: u16 = 6;
const K_FENCE_KN: u16 = 7;
const K_ALLOC_CELL: u16 = 8;
const K_FREE_CELL: u16 = 9;
const K_CLUSTER_INFO: u16 = 10;
const K_READ_LEASE: u16 = 11;
const K_STORE_LEASE: u16 = 12;
const K_MAP_BEGIN: u16 = 13;
const K_MAP_RANGES: u16 = 14;
const K_MAP_COMMIT: u16 = 15;

/// What a KN, or the cluster manager, asks of the DPM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Liveness check.
    Ping,
    /// First message of a connection.
    Hello { kn_id: u32 },
    /// Open a new log for a KN shard; the DPM assigns a slot and a first block.
    OpenLog {
        kn_id: u32,
        shard: u32,
        lease_epoch: u32,
    },
    /// Give the log another block, linked after its current tail; `next_seq` is the seq
    /// the first entry in it will carry. `last_block` is the log's last block as the writer
    /// knows it: a retry of a request whose reply was lost (the DPM restarted) gets the block
    /// granted the first time instead of a second one linked after it.
    AllocBlock {
        log_id: u32,
        generation: u64,
        next_seq: u64,
        last_block: u32,
    },
    /// Merge the log up to its committed tail (at least `upto_seq`) before replying.
    MergeAll {
        log_id: u32,
        generation: u64,
        upto_seq: u64,
    },
    /// The writer is done with the log: merge it to its tail, then release it.
    CloseLog { log_id: u32, generation: u64 },
    /// A KN's lease expired (sent by the cluster manager): close every active log of the
    /// KN and merge each to its committed tail, so its acknowledged writes are in the index
    /// before its slots are given to other KNs. Each tail is persisted as the log's fence
    /// point before the reply: nothing the KN lands later is ever merged, and the logs'
    /// blocks are quarantined before reuse.
    FenceKn { kn_id: u32 },
    /// Replicate a key through an indirect cell. `eref` is a packed entry reference to an
    /// entry of the key in the owner's log `log_id` (its newest version, or a delete entry
    /// if the key does not exist). The DPM merges that log to its tail, takes a free cell,
    /// stores the key's newest entry reference in it (persisted) and from then on leaves
    /// the key's entries out of the index: the cell is the key's only authority.
    AllocCell {
        log_id: u32,
        generation: u64,
        eref: u64,
    },
    /// End the replication of the key of `cell` (every replica has stopped writing it and
    /// merged its logs): the DPM installs the cell's entry reference in the index and
    /// frees the cell.
    FreeCell { cell: u32 },
    /// The region's KN count and the epoch of the stored cluster map (sent by the manager,
    /// which keeps its durable state in the DPM's control area).
    ClusterInfo,
    /// The stored lease of KN `kn` (`kn < max_kns`).
    ReadLease { kn: u32 },
    /// Store the lease of KN `kn` (marking its row in use), persisted before the reply.
    StoreLease {
        kn: u32,
        lease_epoch: u32,
        expires_ms: u64,
        lease_ms: u64,
    },
    /// Start staging the cluster map of `epoch` (newer than the stored one): the copy the
    /// header does not name is cleared to no owner for any slot. A later `MapBegin`
    /// replaces a map still being staged.
    MapBegin { epoch: u64 },
    /// Set owners in the map being staged under `epoch`: each non-zero word is a packed
    /// [`SlotRange`]; zero words carry nothing.
    MapRanges {
        epoch: u64,
        ranges: [u64; RANGES_PER_FRAME],
    },
    /// Commit the map staged under `epoch` if the CRC-32C of its owner table (see
    /// [`owners_crc`](crate::cluster_map::owners_crc)) is `crc`: the table is persisted,
    /// then one persisted store of the header word makes it the stored map. Until that
    /// store, a crash leaves the previous map in force.
    MapCommit { epoch: u64, crc: u32 },
}

/// What the DPM answers on success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    Pong,
    Hello {
        region_id: u64,
        region_size: u64,
    },
    LogOpened {
        log_id: u32,
        generation: u64,
        block: u32,
        salt: u32,
    },
    BlockGranted {
        block: u32,
        salt: u32,
    },
    Merged {
        merged_seq: u64,
    },
    Closed {
        merged_seq: u64,
    },
    /// `logs` logs of the KN were closed and merged, `entries` entries in all.
    Fenced {
        logs: u32,
        entries: u64,
    },
    /// The key's indirect cell and the entry reference it holds.
    CellAllocated {
        cell: u32,
        eref: u64,
    },
    /// The cell is free; `eref` is what the index now holds for the key.
    CellFreed {
        eref: u64,
    },
    ClusterInfo {
        max_kns: u32,
        map_epoch: u64,
        /// Indirect cells in the region, and how many are active (a restarted manager
        /// that knows of no replicated key frees the active ones).
        cells: u32,
        active_cells: u32,
    },
    /// A lease row; `in_use` is false for a KN id never given a lease.
    Lease {
        kn: u32,
        in_use: bool,
        lease_epoch: u32,
        expires_ms: u64,
        lease_ms: u64,
    },
    LeaseStored,
    MapBegun,
    MapRangesStored,
    /// The map of `epoch` is the stored one now.
    MapStored {
        epoch: u64,
    },
}

/// A frame that is not a valid message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    UnknownKind(u16),
    /// A reply carried an unknown status code.
    UnknownStatus(u16),
    /// An argument does not fit its field.
    BadArgument,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKind(k) => write!(f, "unknown control message kind {k}"),
            Self::UnknownStatus(s) => write!(f, "unknown status code {s}"),
            Self::BadArgument => f.write_str("control message argument out of range"),
        }
    }
}

fn u32_arg(v: u64) -> Result<u32, DecodeError> {
    u32::try_from(v).map_err(|_| DecodeError::BadArgument)
}

fn bool_arg(v: u64) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::BadArgument),
    }
}

/// A cluster-map epoch: the header word has room for [`MAX_MAP_EPOCH`] at most.
fn epoch_arg(v: u64) -> Result<u64, DecodeError> {
    if v > MAX_MAP_EPOCH {
        return Err(DecodeError::BadArgument);
    }
    Ok(v)
}

/// Packed ranges: each word zero or a packed [`SlotRange`].
fn ranges_arg(words: &[u64]) -> Result<[u64; RANGES_PER_FRAME], DecodeError> {
    let mut ranges = [0; RANGES_PER_FRAME];
    if words.len() != RANGES_PER_FRAME {
        return Err(DecodeError::BadArgument);
    }
    for (r, &w) in ranges.iter_mut().zip(words) {
        if w != 0 && SlotRange::unpack(w).is_none() {
            return Err(DecodeError::BadArgument);
        }
        *r = w;
    }
    Ok(ranges)
}

/// A frame's arguments: `a` first, the rest zero.
fn args(a: &[u64]) -> [u64; 7] {
    let mut out = [0; 7];
    for (o, &v) in out.iter_mut().zip(a) {
        *o = v;
    }
    out
}

impl Request {
    /// Encodes the request as a frame with id `req_id`.
    pub fn encode(&self, req_id: u32) -> Frame {
        let (kind, a) = match *self {
            Self::Ping => (K_PING, args(&[])),
            Self::Hello { kn_id } => (K_HELLO, args(&[kn_id as u64])),
            Self::OpenLog {
                kn_id,
                shard,
                lease_epoch,
            } => (
                K_OPEN_LOG,
                args(&[kn_id as u64, shard as u64, lease_epoch as u64]),
            ),
            Self::AllocBlock {
                log_id,
                generation,
                next_seq,
                last_block,
            } => (
                K_ALLOC_BLOCK,
                args(&[log_id as u64, generation, next_seq, last_block as u64]),
            ),
            Self::MergeAll {
                log_id,
                generation,
                upto_seq,
            } => (K_MERGE_ALL, args(&[log_id as u64, generation, upto_seq])),
            Self::CloseLog { log_id, generation } => {
                (K_CLOSE_LOG, args(&[log_id as u64, generation]))
            }
            Self::FenceKn { kn_id } => (K_FENCE_KN, args(&[kn_id as u64])),
            Self::AllocCell {
                log_id,
                generation,
                eref,
            } => (K_ALLOC_CELL, args(&[log_id as u64, generation, eref])),
            Self::FreeCell { cell } => (K_FREE_CELL, args(&[cell as u64])),
            Self::ClusterInfo => (K_CLUSTER_INFO, args(&[])),
            Self::ReadLease { kn } => (K_READ_LEASE, args(&[kn as u64])),
            Self::StoreLease {
                kn,
                lease_epoch,
                expires_ms,
                lease_ms,
            } => (
                K_STORE_LEASE,
                args(&[kn as u64, lease_epoch as u64, expires_ms, lease_ms]),
            ),
            Self::MapBegin { epoch } => (K_MAP_BEGIN, args(&[epoch])),
            Self::MapRanges { epoch, ranges } => {
                let mut a = [epoch, 0, 0, 0, 0, 0, 0];
                a[1..].copy_from_slice(&ranges);
                (K_MAP_RANGES, a)
            }
            Self::MapCommit { epoch, crc } => (K_MAP_COMMIT, args(&[epoch, crc as u64])),
        };
        Frame {
            kind,
            status: 0,
            req_id,
            args: a,
        }
    }

    /// Decodes a request frame.
    pub fn decode(f: &Frame) -> Result<Self, DecodeError> {
        let a = &f.args;
        Ok(match f.kind {
            K_PING => Self::Ping,
            K_HELLO => Self::Hello {
                kn_id: u32_arg(a[0])?,
            },
            K_OPEN_LOG => Self::OpenLog {
                kn_id: u32_arg(a[0])?,
                shard: u32_arg(a[1])?,
                lease_epoch: u32_arg(a[2])?,
            },
            K_ALLOC_BLOCK => Self::AllocBlock {
                log_id: u32_arg(a[0])?,
                generation: a[1],
                next_seq: a[2],
                last_block: u32_arg(a[3])?,
            },
            K_MERGE_ALL => Self::MergeAll {
                log_id: u32_arg(a[0])?,
                generation: a[1],
                upto_seq: a[2],
            },
            K_CLOSE_LOG => Self::CloseLog {
                log_id: u32_arg(a[0])?,
                generation: a[1],
            },
            K_FENCE_KN => Self::FenceKn {
                kn_id: u32_arg(a[0])?,
            },
            K_ALLOC_CELL => Self::AllocCell {
                log_id: u32_arg(a[0])?,
                generation: a[1],
                eref: a[2],
            },
            K_FREE_CELL => Self::FreeCell {
                cell: u32_arg(a[0])?,
            },
            K_CLUSTER_INFO => Self::ClusterInfo,
            K_READ_LEASE => Self::ReadLease { kn: u32_arg(a[0])? },
            K_STORE_LEASE => Self::StoreLease {
                kn: u32_arg(a[0])?,
                lease_epoch: u32_arg(a[1])?,
                expires_ms: a[2],
                lease_ms: a[3],
            },
            K_MAP_BEGIN => Self::MapBegin {
                epoch: epoch_arg(a[0])?,
            },
            K_MAP_RANGES => Self::MapRanges {
                epoch: epoch_arg(a[0])?,
                ranges: ranges_arg(&a[1..])?,
            },
            K_MAP_COMMIT => Self::MapCommit {
                epoch: epoch_arg(a[0])?,
                crc: u32_arg(a[1])?,
            },
            k => return Err(DecodeError::UnknownKind(k)),
        })
    }
}

impl Response {
    /// Encodes a successful reply to the request `kind`/`req_id`.
    pub fn encode(&self, req_id: u32) -> Frame {
        let (kind, a) = match *self {
            Self::Pong => (K_PING, args(&[])),
            Self::Hello {
                region_id,
                region_size,
            } => (K_HELLO, args(&[region_id, region_size])),
            Self::LogOpened {
                log_id,
                generation,
                block,
                salt,
            } => (
                K_OPEN_LOG,
                args(&[log_id as u64, generation, block as u64, salt as u64]),
            ),
            Self::BlockGranted { block, salt } => {
                (K_ALLOC_BLOCK, args(&[block as u64, salt as u64]))
            }
            Self::Merged { merged_seq } => (K_MERGE_ALL, args(&[merged_seq])),
            Self::Closed { merged_seq } => (K_CLOSE_LOG, args(&[merged_seq])),
            Self::Fenced { logs, entries } => (K_FENCE_KN, args(&[logs as u64, entries])),
            Self::CellAllocated { cell, eref } => (K_ALLOC_CELL, args(&[cell as u64, eref])),
            Self::CellFreed { eref } => (K_FREE_CELL, args(&[eref])),
            Self::ClusterInfo {
                max_kns,
                map_epoch,
                cells,
                active_cells,
            } => (
                K_CLUSTER_INFO,
                args(&[max_kns as u64, map_epoch, cells as u64, active_cells as u64]),
            ),
            Self::Lease {
                kn,
                in_use,
                lease_epoch,
                expires_ms,
                lease_ms,
            } => (
                K_READ_LEASE,
                args(&[
                    kn as u64,
                    in_use as u64,
                    lease_epoch as u64,
                    expires_ms,
                    lease_ms,
                ]),
            ),
            Self::LeaseStored => (K_STORE_LEASE, args(&[])),
            Self::MapBegun => (K_MAP_BEGIN, args(&[])),
            Self::MapRangesStored => (K_MAP_RANGES, args(&[])),
            Self::MapStored { epoch } => (K_MAP_COMMIT, args(&[epoch])),
        };
        Frame {
            kind,
            status: 0,
            req_id,
            args: a,
        }
    }

    /// An error reply to `req` (a frame of any kind).
    pub fn error(req: &Frame, code: ErrorCode) -> Frame {
        Frame {
            kind: req.kind,
            status: code as u16,
            req_id: req.req_id,
            args: [0; 7],
        }
    }

    /// Decodes a reply frame: the response, or the DPM's error code.
    pub fn decode(f: &Frame) -> Result<Result<Self, ErrorCode>, DecodeError> {
        match ErrorCode::from_u16(f.status) {
            None => return Err(DecodeError::UnknownStatus(f.status)),
            Some(ErrorCode::Ok) => {}
            Some(code) => return Ok(Err(code)),
        }
        let a = &f.args;
        Ok(Ok(match f.kind {
            K_PING => Self::Pong,
            K_HELLO => Self::Hello {
                region_id: a[0],
                region_size: a[1],
            },
            K_OPEN_LOG => Self::LogOpened {
                log_id: u32_arg(a[0])?,
                generation: a[1],
                block: u32_arg(a[2])?,
                salt: u32_arg(a[3])?,
            },
            K_ALLOC_BLOCK => Self::BlockGranted {
                block: u32_arg(a[0])?,
                salt: u32_arg(a[1])?,
            },
            K_MERGE_ALL => Self::Merged { merged_seq: a[0] },
            K_CLOSE_LOG => Self::Closed { merged_seq: a[0] },
            K_FENCE_KN => Self::Fenced {
                logs: u32_arg(a[0])?,
                entries: a[1],
            },
            K_ALLOC_CELL => Self::CellAllocated {
                cell: u32_arg(a[0])?,
                eref: a[1],
            },
            K_FREE_CELL => Self::CellFreed { eref: a[0] },
            K_CLUSTER_INFO => Self::ClusterInfo {
                max_kns: u32_arg(a[0])?,
                map_epoch: epoch_arg(a[1])?,
                cells: u32_arg(a[2])?,
                active_cells: u32_arg(a[3])?,
            },
            K_READ_LEASE => Self::Lease {
                kn: u32_arg(a[0])?,
                in_use: bool_arg(a[1])?,
                lease_epoch: u32_arg(a[2])?,
                expires_ms: a[3],
                lease_ms: a[4],
            },
            K_STORE_LEASE => Self::LeaseStored,
            K_MAP_BEGIN => Self::MapBegun,
            K_MAP_RANGES => Self::MapRangesStored,
            K_MAP_COMMIT => Self::MapStored {
                epoch: epoch_arg(a[0])?,
            },
            k => return Err(DecodeError::UnknownKind(k)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Ping,
            Request::Hello { kn_id: 3 },
            Request::OpenLog {
                kn_id: 1,
                shard: 2,
                lease_epoch: 9,
            },
            Request::AllocBlock {
                log_id: 4,
                generation: 77,
                next_seq: 1000,
                last_block: 12,
            },
            Request::MergeAll {
                log_id: 4,
                generation: 77,
                upto_seq: u64::MAX,
            },
            Request::CloseLog {
                log_id: 4,
                generation: 77,
            },
            Request::FenceKn { kn_id: 2 },
            Request::AllocCell {
                log_id: 3,
                generation: 8,
                eref: 0x1234_5678_9abc,
            },
            Request::FreeCell { cell: 17 },
            Request::ClusterInfo,
            Request::ReadLease { kn: 3 },
            Request::StoreLease {
                kn: 2,
                lease_epoch: u32::MAX,
                expires_ms: 1_700_000_000_000,
                lease_ms: 3000,
            },
            Request::MapBegin {
                epoch: MAX_MAP_EPOCH,
            },
            Request::MapRanges {
                epoch: 7,
                ranges: [
                    SlotRange {
                        first: 0,
                        last: 99,
                        kn: 1,
                    }
                    .pack(),
                    0,
                    SlotRange {
                        first: 100,
                        last: 16383,
                        kn: 0xFFFF,
                    }
                    .pack(),
                    0,
                    0,
                    0,
                ],
            },
            Request::MapCommit {
                epoch: 7,
                crc: 0xE306_9283,
            },
        ];
        for (i, r) in reqs.iter().enumerate() {
            let f = Frame::from_bytes(&r.encode(i as u32).to_bytes());
            assert_eq!(f.req_id, i as u32);
            assert_eq!(Request::decode(&f), Ok(*r));
        }
    }

    #[test]
    fn responses_round_trip_and_errors() {
        let resps = [
            Response::Pong,
            Response::Hello {
                region_id: 5,
                region_size: 1 << 30,
            },
            Response::LogOpened {
                log_id: 1,
                generation: 2,
                block: 3,
                salt: 4,
            },
            Response::BlockGranted {
                block: 9,
                salt: 0xFFFF_FFFF,
            },
            Response::Merged { merged_seq: 12 },
            Response::Closed { merged_seq: 13 },
            Response::Fenced {
                logs: 2,
                entries: 40,
            },
            Response::CellAllocated {
                cell: 5,
                eref: 0xdead_beef,
            },
            Response::CellFreed { eref: 42 },
            Response::ClusterInfo {
                max_kns: 64,
                map_epoch: 12,
                cells: 4096,
                active_cells: 3,
            },
            Response::Lease {
                kn: 5,
                in_use: true,
                lease_epoch: 3,
                expires_ms: u64::MAX,
                lease_ms: 1000,
            },
            Response::Lease {
                kn: 0,
                in_use: false,
                lease_epoch: 0,
                expires_ms: 0,
                lease_ms: 0,
            },
            Response::LeaseStored,
            Response::MapBegun,
            Response::MapRangesStored,
            Response::MapStored { epoch: 13 },
        ];
        for r in resps {
            assert_eq!(Response::decode(&r.encode(1)), Ok(Ok(r)));
        }
        let req = Request::Ping.encode(9);
        let e = Response::error(&req, ErrorCode::RegionFull);
        assert_eq!(Response::decode(&e), Ok(Err(ErrorCode::RegionFull)));
        assert_eq!(e.req_id, 9);
    }

    #[test]
    fn garbage_is_refused() {
        let f = Frame {
            kind: 999,
            ..Frame::default()
        };
        assert_eq!(Request::decode(&f), Err(DecodeError::UnknownKind(999)));
        let f = Frame {
            kind: K_HELLO,
            args: [u64::MAX, 0, 0, 0, 0, 0, 0],
            ..Frame::default()
        };
        assert_eq!(Request::decode(&f), Err(DecodeError::BadArgument));
        let f = Frame {
            kind: K_PING,
            status: 500,
            ..Frame::default()
        };
        assert_eq!(Response::decode(&f), Err(DecodeError::UnknownStatus(500)));
    }

    #[test]
    fn cluster_state_arguments_out_of_range_are_refused() {
        let bad_requests = [
            (K_READ_LEASE, [1 << 32, 0, 0, 0, 0, 0, 0]),
            (K_STORE_LEASE, [0, 1 << 32, 0, 0, 0, 0, 0]),
            // The header word has no room for the top bit of an epoch.
            (K_MAP_BEGIN, [MAX_MAP_EPOCH + 1, 0, 0, 0, 0, 0, 0]),
            (K_MAP_RANGES, [u64::MAX, 0, 0, 0, 0, 0, 0]),
            // A word that is not a packed range: present bit clear, then a reserved bit set.
            (K_MAP_RANGES, [1, 0, 0, 0, 0, 0, 5]),
            (K_MAP_RANGES, [1, 1 << 63 | 1 << 48, 0, 0, 0, 0, 0]),
            (K_MAP_COMMIT, [1, 1 << 32, 0, 0, 0, 0, 0]),
        ];
        for (kind, args) in bad_requests {
            let f = Frame {
                kind,
                args,
                ..Frame::default()
            };
            assert_eq!(Request::decode(&f), Err(DecodeError::BadArgument), "{f:?}");
        }
        let bad_replies = [
            (K_CLUSTER_INFO, [1 << 32, 0, 0, 0, 0, 0, 0]),
            (K_READ_LEASE, [0, 2, 0, 0, 0, 0, 0]),
            (K_MAP_COMMIT, [u64::MAX, 0, 0, 0, 0, 0, 0]),
        ];
        for (kind, args) in bad_replies {
            let f = Frame {
                kind,
                args,
                ..Frame::default()
            };
            assert_eq!(Response::decode(&f), Err(DecodeError::BadArgument), "{f:?}");
        }
        let req = Request::MapCommit { epoch: 3, crc: 1 }.encode(4);
        let e = Response::error(&req, ErrorCode::StaleEpoch);
        assert_eq!(Response::decode(&e), Ok(Err(ErrorCode::StaleEpoch)));
    }
}
