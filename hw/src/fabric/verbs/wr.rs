//! Work-request translation and completion-status mapping: the parts of the verbs backend
//! that need no device, so they are tested everywhere.

use rdma_sys::{ibv_wc_status as st, ibv_wr_opcode};

use crate::fabric::{CompletionStatus, FabricError, LocalSlice, WorkRequest};

/// The verbs opcodes the fabric uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    Read,
    Write,
    Send,
    CompareSwap,
    FetchAdd,
}

impl Opcode {
    /// The `ibv_wr_opcode` value.
    pub const fn ibv(self) -> u32 {
        match self {
            Self::Read => ibv_wr_opcode::IBV_WR_RDMA_READ,
            Self::Write => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            Self::Send => ibv_wr_opcode::IBV_WR_SEND,
            Self::CompareSwap => ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP,
            Self::FetchAdd => ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD,
        }
    }
}

/// A scatter/gather entry: registered local memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// An `ibv_send_wr` in plain fields (the device-facing layer links and posts these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWr {
    pub wr_id: u64,
    pub opcode: Opcode,
    /// `None` for a zero-length READ (no scatter/gather entry).
    pub sge: Option<Sge>,
    pub remote_addr: u64,
    pub rkey: u32,
    /// CAS: the expected value; FAA: the addend.
    pub compare_add: u64,
    /// CAS: the new value.
    pub swap: u64,
    pub signaled: bool,
}

/// Which WRITEs ask for a completion. A completion costs the NIC a CQE write and the poller
/// a CQE read; an unsignaled WRITE's completion is implied by the next signaled request's
/// (a queue pair completes its sends in order). READs and atomics are always signaled:
/// their data or old value is what the caller waits for. Every `every`-th WRITE of a run
/// is signaled so that a long run of WRITEs still retires send queue entries as it goes;
/// the caller signals the last request of each post ([`SignalPolicy::signaled_last`]) so
/// that nothing waits on a completion that never comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalPolicy {
    every: u32,
    /// Unsignaled WRITEs since the last signaled request.
    run: u32,
}

impl SignalPolicy {
    /// `every` = 1 signals every request.
    pub fn new(every: u32) -> Self {
        Self {
            every: every.max(1),
            run: 0,
        }
    }

    /// Whether the next request, of `op`, is signaled.
    pub fn decide(&mut self, op: Opcode) -> bool {
        let signaled = op != Opcode::Write || self.run + 1 >= self.every;
        self.run = if signaled { 0 } else { self.run + 1 };
        signaled
    }

    /// The caller signaled the last request it posted whatever [`SignalPolicy::decide`]
    /// said.
    pub fn signaled_last(&mut self) {
        self.run = 0;
    }
}

/// A receive buffer to post.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWr {
    pub wr_id: u64,
    pub sge: Sge,
}

/// The DPM region as a KN addresses it: remote address = `base + offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub base: u64,
    pub len: u64,
    pub rkey: u32,
}

impl RemoteRegion {
    fn check(&self, off: u64, len: u64) -> Result<u64, CompletionStatus> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.base + off),
            _ => Err(CompletionStatus::RemoteAccessError),
        }
    }
}

/// How FLUSH makes earlier WRITEs durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FlushMode {
    /// A small READ of the range on the same QP: the responder serves it only after the
    /// earlier WRITEs are placed, so its completion means they reached the memory
    /// controller (with DDIO off, or ADR/eADR persistence domains).
    #[default]
    Read,
    /// The RDMA FLUSH opcode (IBTA 1.5, placement type "persistence"). `rdma-sys` 0.3
    /// exposes neither `IBV_WR_FLUSH` nor `ibv_wr_flush`, so this is refused at connect.
    Native,
}

impl std::str::FromStr for FlushMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Self::Read),
            "native" | "flush" => Ok(Self::Native),
            _ => Err(format!(
                "unknown flush mode `{s}` (expected `read` or `native`)"
            )),
        }
    }
}

/// Bytes a FLUSH-by-READ reads (from the start of the range).
pub const FLUSH_READ_BYTES: u64 = 8;

/// Translates one work request into a send WR, or the status it fails with before it
/// reaches the device (nothing invalid is posted: an RC QP would go to ERROR on it).
///
/// `local` is the caller's lookup of the request's local slice (READ/WRITE only; `None` if
/// the slice is outside its buffer). `scratch` is 8 registered bytes private to this
/// request: the target of an atomic's old value and of a FLUSH's READ.
pub fn translate(
    wr_id: u64,
    wr: &WorkRequest,
    remote: &RemoteRegion,
    local: impl FnOnce(LocalSlice) -> Option<Sge>,
    scratch: Sge,
) -> Result<SendWr, CompletionStatus> {
    let base = SendWr {
        wr_id,
        opcode: Opcode::Read,
        sge: None,
        remote_addr: 0,
        rkey: remote.rkey,
        compare_add: 0,
        swap: 0,
        signaled: true,
    };
    match *wr {
        WorkRequest::Read {
            remote: off,
            local: l,
        }
        | WorkRequest::Write {
            remote: off,
            local: l,
        } => {
            let sge = local(l).ok_or(CompletionStatus::LocalProtectionError)?;
            let remote_addr = remote.check(off, u64::from(l.len))?;
            let opcode = if matches!(wr, WorkRequest::Read { .. }) {
                Opcode::Read
            } else {
                Opcode::Write
            };
            Ok(SendWr {
                opcode,
                sge: Some(sge),
                remote_addr,
                ..base
            })
        }
        WorkRequest::Cas {
            remote: off,
            expect,
            new,
        } => Ok(SendWr {
            opcode: Opcode::CompareSwap,
            sge: Some(atomic_sge(scratch)),
            remote_addr: atomic_target(remote, off)?,
            compare_add: expect,
            swap: new,
            ..base
        }),
        WorkRequest::Faa { remote: off, add } => Ok(SendWr {
            opcode: Opcode::FetchAdd,
            sge: Some(atomic_sge(scratch)),
            remote_addr: atomic_target(remote, off)?,
            compare_add: add,
            ..base
        }),
        WorkRequest::Flush { remote: off, len } => {
            let remote_addr = remote.check(off, len)?;
            let n = len.min(FLUSH_READ_BYTES) as u32;
            Ok(SendWr {
                opcode: Opcode::Read,
                sge: (n > 0).then_some(Sge { len: n, ..scratch }),
                remote_addr,
                ..base
            })
        }
    }
}

fn atomic_sge(scratch: Sge) -> Sge {
    Sge { len: 8, ..scratch }
}

/// Atomics need an 8-byte aligned target inside the region (checked here, since a
/// misaligned atomic would break the QP rather than fail alone).
fn atomic_target(remote: &RemoteRegion, off: u64) -> Result<u64, CompletionStatus> {
    let addr = remote.check(off, 8)?;
    if addr % 8 != 0 {
        return Err(CompletionStatus::Misaligned);
    }
    Ok(addr)
}

/// The name of an `ibv_wc_status`, with the constant for searching.
pub fn wc_status_name(status: u32) -> &'static str {
    match status {
        st::IBV_WC_SUCCESS => "success (IBV_WC_SUCCESS)",
        st::IBV_WC_LOC_LEN_ERR => "local length error (IBV_WC_LOC_LEN_ERR)",
        st::IBV_WC_LOC_QP_OP_ERR => "local QP operation error (IBV_WC_LOC_QP_OP_ERR)",
        st::IBV_WC_LOC_EEC_OP_ERR => "local EE context operation error (IBV_WC_LOC_EEC_OP_ERR)",
        st::IBV_WC_LOC_PROT_ERR => "local protection error (IBV_WC_LOC_PROT_ERR)",
        st::IBV_WC_WR_FLUSH_ERR => "work request flushed (IBV_WC_WR_FLUSH_ERR)",
        st::IBV_WC_MW_BIND_ERR => "memory window bind error (IBV_WC_MW_BIND_ERR)",
        st::IBV_WC_BAD_RESP_ERR => "bad response (IBV_WC_BAD_RESP_ERR)",
        st::IBV_WC_LOC_ACCESS_ERR => "local access error (IBV_WC_LOC_ACCESS_ERR)",
        st::IBV_WC_REM_INV_REQ_ERR => "remote invalid request (IBV_WC_REM_INV_REQ_ERR)",
        st::IBV_WC_REM_ACCESS_ERR => "remote access error (IBV_WC_REM_ACCESS_ERR)",
        st::IBV_WC_REM_OP_ERR => "remote operation error (IBV_WC_REM_OP_ERR)",
        st::IBV_WC_RETRY_EXC_ERR => "transport retry counter exceeded (IBV_WC_RETRY_EXC_ERR)",
        st::IBV_WC_RNR_RETRY_EXC_ERR => "RNR retry counter exceeded (IBV_WC_RNR_RETRY_EXC_ERR)",
        st::IBV_WC_LOC_RDD_VIOL_ERR => "local RDD violation (IBV_WC_LOC_RDD_VIOL_ERR)",
        st::IBV_WC_REM_INV_RD_REQ_ERR => "remote invalid RD request (IBV_WC_REM_INV_RD_REQ_ERR)",
        st::IBV_WC_REM_ABORT_ERR => "remote aborted (IBV_WC_REM_ABORT_ERR)",
        st::IBV_WC_INV_EECN_ERR => "invalid EE context number (IBV_WC_INV_EECN_ERR)",
        st::IBV_WC_INV_EEC_STATE_ERR => "invalid EE context state (IBV_WC_INV_EEC_STATE_ERR)",
        st::IBV_WC_FATAL_ERR => "fatal device error (IBV_WC_FATAL_ERR)",
        st::IBV_WC_RESP_TIMEOUT_ERR => "response timeout (IBV_WC_RESP_TIMEOUT_ERR)",
        st::IBV_WC_GENERAL_ERR => "general error (IBV_WC_GENERAL_ERR)",
        st::IBV_WC_TM_ERR => "tag matching error (IBV_WC_TM_ERR)",
        st::IBV_WC_TM_RNDV_INCOMPLETE => {
            "tag matching rendezvous incomplete (IBV_WC_TM_RNDV_INCOMPLETE)"
        }
        _ => "unknown completion status",
    }
}

/// The fabric status of a device completion status.
pub fn wc_status_to_completion(status: u32) -> CompletionStatus {
    match status {
        st::IBV_WC_SUCCESS => CompletionStatus::Success,
        st::IBV_WC_REM_ACCESS_ERR | st::IBV_WC_REM_INV_REQ_ERR | st::IBV_WC_REM_OP_ERR => {
            CompletionStatus::RemoteAccessError
        }
        st::IBV_WC_LOC_PROT_ERR | st::IBV_WC_LOC_LEN_ERR | st::IBV_WC_LOC_ACCESS_ERR => {
            CompletionStatus::LocalProtectionError
        }
        _ => CompletionStatus::ConnectionLost,
    }
}

/// Whether a status, seen as the first error on a QP, means the connection itself is gone
/// (the peer vanished, the path broke, the device failed) rather than one bad request.
pub fn is_connection_error(status: u32) -> bool {
    wc_status_to_completion(status) == CompletionStatus::ConnectionLost
}

/// The error for a failed or empty device list, or a device name not in it.
///
/// `errno` is that of a NULL `ibv_get_device_list` (ENOSYS: the kernel has no verbs
/// support); `count` devices were found; `wanted` is the requested device.
pub fn device_list_error(
    errno: Option<i32>,
    count: usize,
    wanted: Option<&str>,
    names: &[String],
) -> FabricError {
    match (errno, count, wanted) {
        (Some(libc::ENOSYS), _, _) => {
            FabricError::NoDevice("the kernel has no RDMA verbs support (ENOSYS)".into())
        }
        (Some(e), _, _) => FabricError::NoDevice(format!(
            "cannot list RDMA devices: {}",
            std::io::Error::from_raw_os_error(e)
        )),
        (None, 0, _) => FabricError::NoDevice("zero devices".into()),
        (None, _, Some(w)) => FabricError::Other(format!(
            "RDMA device `{w}` not found (this host has: {})",
            names.join(", ")
        )),
        (None, _, None) => FabricError::Other("RDMA device list error".into()),
    }
}

/// Internal `wr_id`s: bit 63 marks a control SEND (low bits: its send slot); otherwise the
/// id is the one-sided request's sequence number.
pub const CTL_SEND_BIT: u64 = 1 << 63;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::LocalBuf;

    const REMOTE: RemoteRegion = RemoteRegion {
        base: 0x7f00_0000_0000,
        len: 1 << 20,
        rkey: 0xabcd,
    };
    const SCRATCH: Sge = Sge {
        addr: 0x5000,
        len: 8,
        lkey: 77,
    };

    fn lookup(s: LocalSlice) -> Option<Sge> {
        // One 4 KiB buffer at 0x1000 with lkey 9.
        let end = s.offset.checked_add(s.len)?;
        (s.buf == LocalBuf(0) && end <= 4096).then_some(Sge {
            addr: 0x1000 + u64::from(s.offset),
            len: s.len,
            lkey: 9,
        })
    }

    fn t(wr: WorkRequest) -> Result<SendWr, CompletionStatus> {
        translate(42, &wr, &REMOTE, lookup, SCRATCH)
    }

    #[test]
    fn every_nth_write_and_every_other_verb_is_signaled() {
        let mut p = SignalPolicy::new(4);
        let w: Vec<bool> = (0..9).map(|_| p.decide(Opcode::Write)).collect();
        assert_eq!(
            w,
            [false, false, false, true, false, false, false, true, false]
        );
        // A READ or atomic is signaled and restarts the run.
        assert!(p.decide(Opcode::Read));
        assert!(!p.decide(Opcode::Write));
        assert!(p.decide(Opcode::CompareSwap));
        assert!(p.decide(Opcode::FetchAdd));
        assert!(p.decide(Opcode::Send));
        p.decide(Opcode::Write);
        p.decide(Opcode::Write);
        p.signaled_last();
        assert!(!p.decide(Opcode::Write));
        assert!(!p.decide(Opcode::Write));
        assert!(!p.decide(Opcode::Write));
        assert!(p.decide(Opcode::Write));
        let mut all = SignalPolicy::new(1);
        assert!((0..5).all(|_| all.decide(Opcode::Write)));
        assert!(SignalPolicy::new(0).decide(Opcode::Write), "0 means 1");
    }

    #[test]
    fn read_and_write_address_base_plus_offset() {
        let r = t(WorkRequest::Read {
            remote: 4096,
            local: LocalBuf(0).slice(100, 64),
        })
        .expect("read");
        assert_eq!(r.opcode, Opcode::Read);
        assert_eq!(r.opcode.ibv(), ibv_wr_opcode::IBV_WR_RDMA_READ);
        assert_eq!(r.remote_addr, REMOTE.base + 4096);
        assert_eq!(r.rkey, 0xabcd);
        assert_eq!(
            r.sge,
            Some(Sge {
                addr: 0x1000 + 100,
                len: 64,
                lkey: 9
            })
        );
        assert_eq!(r.wr_id, 42);
        assert!(r.signaled);
        let w = t(WorkRequest::Write {
            remote: (1 << 20) - 64,
            local: LocalBuf(0).slice(0, 64),
        })
        .expect("write at the very end");
        assert_eq!(w.opcode.ibv(), ibv_wr_opcode::IBV_WR_RDMA_WRITE);
        assert_eq!(w.remote_addr, REMOTE.base + (1 << 20) - 64);
        assert_eq!(w.sge.map(|s| s.len), Some(64));
    }

    #[test]
    fn atomics_carry_operands_and_use_the_scratch_slot() {
        let c = t(WorkRequest::Cas {
            remote: 64,
            expect: 5,
            new: 9,
        })
        .expect("cas");
        assert_eq!(c.opcode.ibv(), ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP);
        assert_eq!((c.compare_add, c.swap), (5, 9));
        assert_eq!(c.remote_addr, REMOTE.base + 64);
        assert_eq!(c.sge, Some(SCRATCH));
        let f = t(WorkRequest::Faa { remote: 8, add: 3 }).expect("faa");
        assert_eq!(f.opcode.ibv(), ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD);
        assert_eq!((f.compare_add, f.swap), (3, 0));
        assert_eq!(f.sge.map(|s| s.len), Some(8));
    }

    #[test]
    fn bad_requests_fail_before_posting() {
        use CompletionStatus as S;
        let cases = [
            (
                WorkRequest::Cas {
                    remote: 12,
                    expect: 0,
                    new: 1,
                },
                S::Misaligned,
            ),
            (WorkRequest::Faa { remote: 1, add: 1 }, S::Misaligned),
            (
                WorkRequest::Faa {
                    remote: (1 << 20) - 4,
                    add: 1,
                },
                S::RemoteAccessError,
            ),
            (
                WorkRequest::Cas {
                    remote: 1 << 20,
                    expect: 0,
                    new: 1,
                },
                S::RemoteAccessError,
            ),
            (
                WorkRequest::Read {
                    remote: (1 << 20) - 10,
                    local: LocalBuf(0).slice(0, 11),
                },
                S::RemoteAccessError,
            ),
            (
                WorkRequest::Write {
                    remote: u64::MAX,
                    local: LocalBuf(0).slice(0, 2),
                },
                S::RemoteAccessError,
            ),
            (
                WorkRequest::Read {
                    remote: 0,
                    local: LocalBuf(0).slice(4000, 97),
                },
                S::LocalProtectionError,
            ),
            (
                WorkRequest::Write {
                    remote: u64::MAX,
                    local: LocalBuf(3).slice(0, 1),
                },
                S::LocalProtectionError,
            ),
            (
                WorkRequest::Flush {
                    remote: (1 << 20) - 1,
                    len: 2,
                },
                S::RemoteAccessError,
            ),
        ];
        for (wr, want) in cases {
            assert_eq!(t(wr), Err(want), "{wr:?}");
        }
        // A misaligned base would also be caught (the region base is page-aligned in
        // practice; the check is on the final address).
        let odd = RemoteRegion { base: 4, ..REMOTE };
        assert_eq!(
            translate(
                1,
                &WorkRequest::Faa { remote: 8, add: 1 },
                &odd,
                lookup,
                SCRATCH
            ),
            Err(S::Misaligned)
        );
    }

    #[test]
    fn flush_is_a_small_read_of_the_range() {
        let f = t(WorkRequest::Flush {
            remote: 1000,
            len: 4096,
        })
        .expect("flush");
        assert_eq!(f.opcode, Opcode::Read);
        assert_eq!(f.remote_addr, REMOTE.base + 1000);
        assert_eq!(f.sge, Some(Sge { len: 8, ..SCRATCH }));
        let f = t(WorkRequest::Flush {
            remote: 1000,
            len: 4,
        })
        .expect("short flush");
        assert_eq!(f.sge.map(|s| s.len), Some(4));
        let f = t(WorkRequest::Flush {
            remote: 1000,
            len: 0,
        })
        .expect("empty flush");
        assert_eq!(f.sge, None, "a zero-length READ carries no SGE");
        assert_eq!("read".parse::<FlushMode>(), Ok(FlushMode::Read));
        assert_eq!("native".parse::<FlushMode>(), Ok(FlushMode::Native));
        assert!("fast".parse::<FlushMode>().is_err());
    }

    #[test]
    fn statuses_are_named_and_mapped() {
        assert!(wc_status_name(st::IBV_WC_RETRY_EXC_ERR).contains("retry"));
        assert!(wc_status_name(st::IBV_WC_RETRY_EXC_ERR).contains("exceeded"));
        assert!(wc_status_name(st::IBV_WC_WR_FLUSH_ERR).contains("flushed"));
        assert!(wc_status_name(st::IBV_WC_REM_ACCESS_ERR).contains("IBV_WC_REM_ACCESS_ERR"));
        assert_eq!(wc_status_name(999), "unknown completion status");
        for code in 0..=st::IBV_WC_TM_RNDV_INCOMPLETE {
            assert_ne!(wc_status_name(code), "unknown completion status", "{code}");
        }
        use CompletionStatus as S;
        assert_eq!(wc_status_to_completion(st::IBV_WC_SUCCESS), S::Success);
        assert_eq!(
            wc_status_to_completion(st::IBV_WC_REM_ACCESS_ERR),
            S::RemoteAccessError
        );
        assert_eq!(
            wc_status_to_completion(st::IBV_WC_LOC_PROT_ERR),
            S::LocalProtectionError
        );
        for lost in [
            st::IBV_WC_RETRY_EXC_ERR,
            st::IBV_WC_RNR_RETRY_EXC_ERR,
            st::IBV_WC_WR_FLUSH_ERR,
            st::IBV_WC_FATAL_ERR,
        ] {
            assert_eq!(wc_status_to_completion(lost), S::ConnectionLost);
            assert!(is_connection_error(lost));
        }
        assert!(!is_connection_error(st::IBV_WC_REM_ACCESS_ERR));
        assert!(!is_connection_error(st::IBV_WC_SUCCESS));
    }

    #[test]
    fn device_list_errors_become_no_device() {
        let e = device_list_error(Some(libc::ENOSYS), 0, None, &[]);
        assert!(matches!(e, FabricError::NoDevice(_)), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("no RDMA device found"), "{msg}");
        assert!(msg.contains("ENOSYS"), "{msg}");
        assert!(msg.contains("--fabric shm"), "{msg}");
        assert!(msg.contains("rxe"), "{msg}");
        let e = device_list_error(None, 0, Some("mlx5_0"), &[]);
        assert!(matches!(e, FabricError::NoDevice(ref m) if m.contains("zero devices")));
        let e = device_list_error(Some(libc::EACCES), 0, None, &[]);
        assert!(matches!(e, FabricError::NoDevice(_)));
        let names = vec!["rxe0".to_string(), "mlx5_1".to_string()];
        let e = device_list_error(None, 2, Some("mlx5_0"), &names);
        let msg = e.to_string();
        assert!(!matches!(e, FabricError::NoDevice(_)));
        assert!(
            msg.contains("`mlx5_0` not found") && msg.contains("rxe0, mlx5_1"),
            "{msg}"
        );
    }
}
