//! Control messages between KNs and the DPM: fixed 64-byte frames.
//!
//! Frame: `kind: u16, status: u16, req_id: u32, args: [u64; 7]`. Requests carry
//! `status = 0`; a reply repeats the request's kind and id and carries an [`ErrorCode`].

use core::fmt;

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

/// What a KN asks of the DPM.
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

impl Request {
    /// Encodes the request as a frame with id `req_id`.
    pub fn encode(&self, req_id: u32) -> Frame {
        let (kind, a): (u16, [u64; 4]) = match *self {
            Self::Ping => (K_PING, [0; 4]),
            Self::Hello { kn_id } => (K_HELLO, [kn_id as u64, 0, 0, 0]),
            Self::OpenLog {
                kn_id,
                shard,
                lease_epoch,
            } => (
                K_OPEN_LOG,
                [kn_id as u64, shard as u64, lease_epoch as u64, 0],
            ),
            Self::AllocBlock {
                log_id,
                generation,
                next_seq,
                last_block,
            } => (
                K_ALLOC_BLOCK,
                [log_id as u64, generation, next_seq, last_block as u64],
            ),
            Self::MergeAll {
                log_id,
                generation,
                upto_seq,
            } => (K_MERGE_ALL, [log_id as u64, generation, upto_seq, 0]),
            Self::CloseLog { log_id, generation } => {
                (K_CLOSE_LOG, [log_id as u64, generation, 0, 0])
            }
            Self::FenceKn { kn_id } => (K_FENCE_KN, [kn_id as u64, 0, 0, 0]),
            Self::AllocCell {
                log_id,
                generation,
                eref,
            } => (K_ALLOC_CELL, [log_id as u64, generation, eref, 0]),
            Self::FreeCell { cell } => (K_FREE_CELL, [cell as u64, 0, 0, 0]),
        };
        Frame {
            kind,
            status: 0,
            req_id,
            args: [a[0], a[1], a[2], a[3], 0, 0, 0],
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
            k => return Err(DecodeError::UnknownKind(k)),
        })
    }
}

impl Response {
    /// Encodes a successful reply to the request `kind`/`req_id`.
    pub fn encode(&self, req_id: u32) -> Frame {
        let (kind, a): (u16, [u64; 4]) = match *self {
            Self::Pong => (K_PING, [0; 4]),
            Self::Hello {
                region_id,
                region_size,
            } => (K_HELLO, [region_id, region_size, 0, 0]),
            Self::LogOpened {
                log_id,
                generation,
                block,
                salt,
            } => (
                K_OPEN_LOG,
                [log_id as u64, generation, block as u64, salt as u64],
            ),
            Self::BlockGranted { block, salt } => {
                (K_ALLOC_BLOCK, [block as u64, salt as u64, 0, 0])
            }
            Self::Merged { merged_seq } => (K_MERGE_ALL, [merged_seq, 0, 0, 0]),
            Self::Closed { merged_seq } => (K_CLOSE_LOG, [merged_seq, 0, 0, 0]),
            Self::Fenced { logs, entries } => (K_FENCE_KN, [logs as u64, entries, 0, 0]),
            Self::CellAllocated { cell, eref } => (K_ALLOC_CELL, [cell as u64, eref, 0, 0]),
            Self::CellFreed { eref } => (K_FREE_CELL, [eref, 0, 0, 0]),
        };
        Frame {
            kind,
            status: 0,
            req_id,
            args: [a[0], a[1], a[2], a[3], 0, 0, 0],
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
}
