//! The fabric: how a KVS node reaches the DPM.
//!
//! Modelled on verbs: one-sided READ, WRITE, CAS, FAA (and FLUSH, which makes earlier
//! WRITEs durable) are *posted* against region offsets and their completions *polled*;
//! control messages are sent and received as 64-byte frames. Local buffers are registered
//! with the connection ([`Fabric::alloc_buf`]) and named by handle, as a verbs memory region
//! would be, so no borrow has to outlive a post.
//!
//! Every call is counted ([`FabricCounters`]). A *round trip* is one wait on the fabric:
//! verbs posted while others are outstanding share the round trip of the first, so a batch
//! posted together and completed together counts once.
//!
//! Backends: [`shm::ShmFabric`] (memory shared with the DPM, completions timed by a
//! [`nic::NicModel`]); control frames travel through [`ctl`], rings of [`ring`].

use core::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub mod channel;
pub mod connect;
pub mod ctl;
pub mod nic;
pub mod ring;
pub mod shm;
#[cfg(feature = "rdma")]
pub mod verbs;

pub use channel::ControlChannel;
pub use connect::{
    Connection, DpmSpec, FabricKind, LocalDpm, ServeSpec, SpecError, VerbsDevice, VerbsSpec,
};
pub use ctl::{default_ctl_path, Backoff, ConnId, ControlClient, ControlHandle, ControlServer};
pub use nic::{
    modeled_ops_per_sec, Clock, ManualClock, MonotonicClock, NicModel, NicParams, NicProfile,
    UnknownNicProfile,
};
pub use ring::{HeapRing, RingView};
pub use shm::ShmFabric;

/// Identifies a posted work request in its completion.
pub type WrId = u64;

/// Handle of a registered local buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalBuf(pub u32);

/// A range of a registered local buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSlice {
    pub buf: LocalBuf,
    pub offset: u32,
    pub len: u32,
}

impl LocalBuf {
    /// The slice `[offset, offset + len)` of this buffer.
    pub const fn slice(self, offset: u32, len: u32) -> LocalSlice {
        LocalSlice {
            buf: self,
            offset,
            len,
        }
    }
}

/// The one-sided operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Read,
    Write,
    Cas,
    Faa,
    /// Makes earlier WRITEs to `[remote, remote + len)` durable (RDMA FLUSH, or a READ
    /// after the WRITEs on the same queue pair where FLUSH is missing).
    Flush,
}

/// A work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkRequest {
    /// Copy `local.len` bytes at region offset `remote` into `local`.
    Read { remote: u64, local: LocalSlice },
    /// Copy `local` to region offset `remote` (visible on completion, durable after FLUSH).
    Write { remote: u64, local: LocalSlice },
    /// 8-byte compare-and-swap at `remote` (8-aligned); the completion carries the old value.
    Cas { remote: u64, expect: u64, new: u64 },
    /// 8-byte fetch-and-add at `remote` (8-aligned); the completion carries the old value.
    Faa { remote: u64, add: u64 },
    /// Make `[remote, remote + len)` durable.
    Flush { remote: u64, len: u64 },
}

impl WorkRequest {
    pub const fn verb(&self) -> Verb {
        match self {
            Self::Read { .. } => Verb::Read,
            Self::Write { .. } => Verb::Write,
            Self::Cas { .. } => Verb::Cas,
            Self::Faa { .. } => Verb::Faa,
            Self::Flush { .. } => Verb::Flush,
        }
    }
}

/// How a work request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionStatus {
    Success,
    /// The remote range is outside the region (verbs: remote access error).
    RemoteAccessError,
    /// The local slice is outside its buffer (verbs: local protection error).
    LocalProtectionError,
    /// CAS/FAA on an unaligned offset.
    Misaligned,
    /// The peer is gone or the connection was torn down (verbs: retry exceeded / flush error).
    ConnectionLost,
}

impl fmt::Display for CompletionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Success => "success",
            Self::RemoteAccessError => "remote access error",
            Self::LocalProtectionError => "local protection error",
            Self::Misaligned => "misaligned atomic",
            Self::ConnectionLost => "connection lost",
        })
    }
}

/// A completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: WrId,
    pub verb: Verb,
    pub status: CompletionStatus,
    /// Old value for CAS and FAA; 0 otherwise.
    pub value: u64,
}

/// Per-connection counters. Each connection is used by one shard thread, so plain integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FabricCounters {
    pub reads: u64,
    pub writes: u64,
    pub cas: u64,
    pub faa: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub round_trips: u64,
    pub sends: u64,
    pub recvs: u64,
}

impl FabricCounters {
    /// All one-sided verbs.
    pub const fn verbs(&self) -> u64 {
        self.reads + self.writes + self.cas + self.faa + self.flushes
    }
    /// Counts accumulated since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            reads: self.reads - earlier.reads,
            writes: self.writes - earlier.writes,
            cas: self.cas - earlier.cas,
            faa: self.faa - earlier.faa,
            flushes: self.flushes - earlier.flushes,
            read_bytes: self.read_bytes - earlier.read_bytes,
            write_bytes: self.write_bytes - earlier.write_bytes,
            round_trips: self.round_trips - earlier.round_trips,
            sends: self.sends - earlier.sends,
            recvs: self.recvs - earlier.recvs,
        }
    }
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Self) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.cas += other.cas;
        self.faa += other.faa;
        self.flushes += other.flushes;
        self.read_bytes += other.read_bytes;
        self.write_bytes += other.write_bytes;
        self.round_trips += other.round_trips;
        self.sends += other.sends;
        self.recvs += other.recvs;
    }
}

/// A fabric failure (not a failed completion, which is reported in its [`Completion`]).
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("too many outstanding work requests (queue depth {depth})")]
    QueueFull { depth: usize },
    #[error("local buffer {0:?} is not registered")]
    UnknownBuffer(LocalBuf),
    #[error("cannot register a local buffer of {len} bytes: {why}")]
    BufferAlloc { len: usize, why: &'static str },
    #[error("the control channel is full")]
    ControlFull,
    #[error("the peer is gone: {0}")]
    Disconnected(String),
    #[error("timed out after {0:?} waiting for the fabric")]
    Timeout(Duration),
    #[error("no RDMA device found ({0}); use `--fabric shm` on one machine, or set up soft-RoCE (`rdma link add rxe0 type rxe netdev eth0`)")]
    NoDevice(String),
    #[error("the DPM is not running: {0}")]
    NotRunning(String),
    #[error("no free control slot (all {slots} are in use)")]
    NoFreeSlot { slots: u32 },
    #[error("cannot {what} control file {path}: {source}")]
    ControlFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl FabricError {
    /// Whether the DPM may answer if asked again later: it is not up yet, restarting, or
    /// busy.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::NotRunning(_)
                | Self::Disconnected(_)
                | Self::Timeout(_)
                | Self::NoFreeSlot { .. }
        )
    }
}

/// One connection from a KN shard to the DPM: one-sided verbs on the region, and control
/// frames ([`ControlChannel`]).
pub trait Fabric: ControlChannel {
    /// Bytes of the remote region.
    fn region_len(&self) -> u64;

    /// Registers a zeroed local buffer of `len` bytes.
    fn alloc_buf(&mut self, len: usize) -> Result<LocalBuf, FabricError>;
    /// A registered buffer's bytes.
    fn buf(&self, buf: LocalBuf) -> &[u8];
    /// A registered buffer's bytes, mutable (do not change a buffer a posted WRITE reads).
    fn buf_mut(&mut self, buf: LocalBuf) -> &mut [u8];

    /// Posts work requests with one doorbell; each gets a completion with its id.
    fn post(&mut self, wrs: &[(WrId, WorkRequest)]) -> Result<(), FabricError>;
    /// Takes up to `out.len()` ready completions without blocking.
    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError>;
    /// Work requests posted and not yet polled.
    fn outstanding(&self) -> usize;

    /// Waits until `out.len()` completions have been taken, or `timeout` passes.
    fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<(), FabricError>;

    /// The counters of this connection.
    fn counters(&self) -> &FabricCounters;
}

/// Checks a [`Fabric::wait`] for `wanted` completions with `outstanding` work requests in
/// flight: an error if more are wanted than were posted, `false` if there is nothing to wait
/// for.
pub(crate) fn wait_needed(wanted: usize, outstanding: usize) -> Result<bool, FabricError> {
    if wanted > outstanding {
        return Err(FabricError::Other(format!(
            "waiting for {wanted} completions with only {outstanding} work requests outstanding"
        )));
    }
    Ok(wanted > 0)
}

/// Posts `wrs` and waits for all their completions: one round trip. Nothing else may be
/// outstanding, so that `out[i]` is the completion of `wrs[i]`.
pub fn execute<F: Fabric + ?Sized>(
    f: &mut F,
    wrs: &[(WrId, WorkRequest)],
    out: &mut [Completion],
    timeout: Duration,
) -> Result<(), FabricError> {
    if f.outstanding() != 0 {
        return Err(FabricError::Other(format!(
            "execute needs an idle connection, but {} work requests are outstanding",
            f.outstanding()
        )));
    }
    if out.len() != wrs.len() {
        return Err(FabricError::Other(format!(
            "execute of {} work requests given room for {} completions",
            wrs.len(),
            out.len()
        )));
    }
    f.post(wrs)?;
    f.wait(out, timeout)
}
