//! The manager's durable state and fencing, both kept by the DPM: the cluster map and the
//! KN lease records live in the region's control area, and fencing a KN is the DPM
//! closing and merging its logs. The manager reaches them only through control messages
//! ([`DpmStore`]); the layouts stay the DPM's business. Tests use any other
//! [`DurableStore`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::connect::wait_for_dpm;
use dinomo_hw::fabric::{ControlChannel, DpmSpec, FabricError};
use dinomo_shared::cluster_map::{map_ranges, owners_crc, range_frames};
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::ownership::SlotMap;
use dinomo_shared::ErrorCode;

/// A KN's lease as the manager records it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Bumped at every registration of the KN id.
    pub lease_epoch: u32,
    /// Wall-clock ms until which the KN held its lease when it was recorded; 0: ended (the
    /// KN left or was fenced).
    pub expires_ms: u64,
    /// The lease length the manager grants: a KN renewed by a manager that died stops
    /// serving at most this long after that manager's last renewal. 0 in records of
    /// managers that predate it (their `expires_ms` was kept current instead).
    pub lease_ms: u64,
}

impl LeaseRecord {
    /// Whether the KN may still hold a lease granted by the manager that wrote the record.
    pub const fn is_live(&self) -> bool {
        self.expires_ms != 0
    }
}

/// What a starting manager finds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// KN ids the region has lease rows for.
    pub max_kns: u16,
    /// Epoch of the stored map (the next map gets a higher one).
    pub map_epoch: u64,
    /// The lease record of every KN id that was ever used, by id.
    pub leases: Vec<(u16, LeaseRecord)>,
    /// Indirect cells in the region, and how many are active (replicated keys).
    pub cells: u32,
    pub active_cells: u32,
}

/// What fencing a KN did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fenced {
    /// Logs of the KN closed.
    pub logs: u32,
    /// Log entries merged while closing them.
    pub entries: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach the DPM: {0}")]
    Unreachable(String),
    #[error("the DPM refused {what}: {code}")]
    Refused { what: &'static str, code: ErrorCode },
    #[error("unexpected reply to {what}: {reply}")]
    Protocol { what: &'static str, reply: String },
}

/// Where the manager keeps its durable state and fences KNs.
pub trait DurableStore: Send {
    /// The stored map epoch, the region's KN rows and every lease record in use.
    fn load(&mut self) -> Result<Stored, StoreError>;
    /// Records KN `kn`'s lease (durable before this returns).
    fn store_lease(&mut self, kn: u16, record: &LeaseRecord) -> Result<(), StoreError>;
    /// Makes `map` the stored map (durable, all or nothing, before this returns); its
    /// epoch must be above the stored one.
    fn store_map(&mut self, map: &SlotMap) -> Result<(), StoreError>;
    /// Fences KN `kn`: closes its logs and merges each to its committed tail, so its
    /// acknowledged writes are in the index and nothing it lands later ever is.
    /// Repeatable: fencing a fenced KN (or one without logs) does nothing.
    fn fence(&mut self, kn: u16) -> Result<Fenced, StoreError>;
    /// Ends the replication of the key of `cell` at the DPM (its newest entry goes into
    /// the index); `false`: the cell was not active. Only when no KN serves the key.
    fn free_cell(&mut self, cell: u32) -> Result<bool, StoreError>;
}

/// How long a DPM may take over a control request (a map frame, a lease row).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the DPM may take to fence a KN (it merges the KN's logs first).
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a ping of a (re)connected DPM may take.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The durable store of a DPM, through a control channel of the fabric the DPM is named
/// by. A DPM that went away (crashed, restarting) is waited for, up to `reconnect_wait`,
/// and asked again: every request here is repeatable.
pub struct DpmStore {
    spec: DpmSpec,
    channel: Box<dyn ControlChannel>,
    reconnect_wait: Duration,
}

impl std::fmt::Debug for DpmStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpmStore")
            .field("dpm", &self.spec.to_string())
            .finish_non_exhaustive()
    }
}

/// A request failed because the DPM is gone (worth reconnecting), or for another reason.
enum Failure {
    Gone(String),
    Other(StoreError),
}

impl From<FabricError> for Failure {
    fn from(e: FabricError) -> Self {
        match e {
            // No reply within the timeout counts as gone too: over verbs a DPM that vanished
            // may leave the old queue pair silent (soft-RoCE reports no completion), and
            // every request here is repeatable on a new channel.
            FabricError::Disconnected(_) | FabricError::NotRunning(_) | FabricError::Timeout(_) => {
                Self::Gone(e.to_string())
            }
            e => Self::Other(StoreError::Unreachable(e.to_string())),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::Other(e)
    }
}

impl DpmStore {
    /// Connects to the DPM `spec` names, waiting up to `timeout` for one that answers.
    pub fn connect(spec: &DpmSpec, timeout: Duration) -> Result<Self, StoreError> {
        let channel = open(spec, timeout)?;
        Ok(Self {
            spec: spec.clone(),
            channel,
            reconnect_wait: Duration::from_secs(30),
        })
    }

    /// Runs `op` on the channel; if the DPM went away, reconnects once and runs it again.
    fn repeat<T>(
        &mut self,
        what: &'static str,
        mut op: impl FnMut(&mut dyn ControlChannel) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        match op(self.channel.as_mut()) {
            Ok(v) => Ok(v),
            Err(Failure::Other(e)) => Err(e),
            Err(Failure::Gone(why)) => {
                tracing::warn!(%why, what, "the DPM went away; reconnecting");
                self.channel = open(&self.spec, self.reconnect_wait)?;
                match op(self.channel.as_mut()) {
                    Ok(v) => Ok(v),
                    Err(Failure::Other(e)) => Err(e),
                    Err(Failure::Gone(why)) => Err(StoreError::Unreachable(why)),
                }
            }
        }
    }
}

/// Opens a control channel to a DPM that answers a ping, trying until `timeout`.
fn open(spec: &DpmSpec, timeout: Duration) -> Result<Box<dyn ControlChannel>, StoreError> {
    wait_for_dpm(timeout, || {
        let mut c = spec.control()?;
        match c.call(&Request::Ping, PING_TIMEOUT)? {
            Ok(Response::Pong) => Ok(c),
            other => Err(FabricError::Other(format!(
                "the DPM does not answer a ping: {other:?}"
            ))),
        }
    })
    .map_err(|e| StoreError::Unreachable(format!("{spec}: {e}")))
}

/// One request and its successful reply.
fn call(
    c: &mut dyn ControlChannel,
    what: &'static str,
    req: Request,
    timeout: Duration,
) -> Result<Response, Failure> {
    match c.call(&req, timeout)? {
        Ok(r) => Ok(r),
        Err(code) => Err(StoreError::Refused { what, code }.into()),
    }
}

/// `MapRanges` frames in flight at once. Slots sit on the hash ring in hashed order, so a
/// map of two KNs already has about 8000 ranges (some 1350 frames), and over a network each
/// round trip costs about what a whole window does; the DPM stores every frame where its
/// ranges say, so their order does not matter, and the commit is sent only once every frame
/// was answered. Fits the smallest control queue (16 frames over verbs, 64 over shm).
const MAP_WINDOW: usize = 16;

/// Sends the map's range frames, [`MAP_WINDOW`] at a time, and checks every reply.
fn store_ranges(
    c: &mut dyn ControlChannel,
    epoch: u64,
    frames: impl IntoIterator<Item = [u64; dinomo_shared::cluster_map::RANGES_PER_FRAME]>,
) -> Result<(), Failure> {
    let mut frames = frames.into_iter();
    let mut waiting: VecDeque<u32> = VecDeque::with_capacity(MAP_WINDOW);
    loop {
        while waiting.len() < MAP_WINDOW {
            let Some(ranges) = frames.next() else { break };
            let id = c.next_request_id();
            c.send(&Request::MapRanges { epoch, ranges }.encode(id))?;
            waiting.push_back(id);
        }
        if waiting.is_empty() {
            return Ok(());
        }
        // Wait for one of them (replies to earlier, timed-out requests are skipped).
        let deadline = Instant::now() + CALL_TIMEOUT;
        let frame = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match c.recv(left)? {
                Some(f) if waiting.contains(&f.req_id) => break f,
                Some(_) => continue,
                None => return Err(FabricError::Timeout(CALL_TIMEOUT).into()),
            }
        };
        waiting.retain(|&id| id != frame.req_id);
        match Response::decode(&frame) {
            Ok(Ok(Response::MapRangesStored)) => {}
            Ok(Ok(r)) => return Err(unexpected("MapRanges", &r)),
            Ok(Err(code)) => {
                return Err(StoreError::Refused {
                    what: "MapRanges",
                    code,
                }
                .into())
            }
            Err(e) => {
                return Err(StoreError::Protocol {
                    what: "MapRanges",
                    reply: e.to_string(),
                }
                .into())
            }
        }
    }
}

fn unexpected(what: &'static str, r: &Response) -> Failure {
    StoreError::Protocol {
        what,
        reply: format!("{r:?}"),
    }
    .into()
}

impl DurableStore for DpmStore {
    fn load(&mut self) -> Result<Stored, StoreError> {
        self.repeat("the cluster state", |c| {
            let (max_kns, map_epoch, cells, active_cells) =
                match call(c, "ClusterInfo", Request::ClusterInfo, CALL_TIMEOUT)? {
                    Response::ClusterInfo {
                        max_kns,
                        map_epoch,
                        cells,
                        active_cells,
                    } => (max_kns, map_epoch, cells, active_cells),
                    r => return Err(unexpected("ClusterInfo", &r)),
                };
            let max_kns = u16::try_from(max_kns.min(u32::from(dinomo_shared::control::NO_KN)))
                .unwrap_or(dinomo_shared::control::NO_KN);
            let mut leases = Vec::new();
            for kn in 0..max_kns {
                match call(
                    c,
                    "ReadLease",
                    Request::ReadLease { kn: u32::from(kn) },
                    CALL_TIMEOUT,
                )? {
                    Response::Lease {
                        in_use: true,
                        lease_epoch,
                        expires_ms,
                        lease_ms,
                        ..
                    } => leases.push((
                        kn,
                        LeaseRecord {
                            lease_epoch,
                            expires_ms,
                            lease_ms,
                        },
                    )),
                    Response::Lease { in_use: false, .. } => {}
                    r => return Err(unexpected("ReadLease", &r)),
                }
            }
            Ok(Stored {
                max_kns,
                map_epoch,
                leases,
                cells,
                active_cells,
            })
        })
    }

    fn store_lease(&mut self, kn: u16, record: &LeaseRecord) -> Result<(), StoreError> {
        let req = Request::StoreLease {
            kn: u32::from(kn),
            lease_epoch: record.lease_epoch,
            expires_ms: record.expires_ms,
            lease_ms: record.lease_ms,
        };
        self.repeat("StoreLease", |c| {
            match call(c, "StoreLease", req, CALL_TIMEOUT)? {
                Response::LeaseStored => Ok(()),
                r => Err(unexpected("StoreLease", &r)),
            }
        })
    }

    fn store_map(&mut self, map: &SlotMap) -> Result<(), StoreError> {
        let epoch = map.epoch();
        let owners = map.owners();
        let crc = owners_crc(owners.iter().copied());
        let mut attempt = 0;
        self.repeat("the cluster map", |c| {
            attempt += 1;
            match call(c, "MapBegin", Request::MapBegin { epoch }, CALL_TIMEOUT) {
                Ok(Response::MapBegun) => {}
                // A retry after the reply to an earlier commit was lost: the map is stored
                // if the DPM's epoch is ours.
                Err(Failure::Other(StoreError::Refused {
                    code: ErrorCode::StaleEpoch,
                    ..
                })) if attempt > 1 => {
                    return match call(c, "ClusterInfo", Request::ClusterInfo, CALL_TIMEOUT)? {
                        Response::ClusterInfo { map_epoch, .. } if map_epoch == epoch => Ok(()),
                        _ => Err(StoreError::Refused {
                            what: "MapBegin",
                            code: ErrorCode::StaleEpoch,
                        }
                        .into()),
                    };
                }
                Ok(r) => return Err(unexpected("MapBegin", &r)),
                Err(e) => return Err(e),
            }
            store_ranges(c, epoch, range_frames(map_ranges(owners.iter().copied())))?;
            match call(
                c,
                "MapCommit",
                Request::MapCommit { epoch, crc },
                CALL_TIMEOUT,
            )? {
                Response::MapStored { epoch: e } if e == epoch => Ok(()),
                r => Err(unexpected("MapCommit", &r)),
            }
        })
    }

    fn free_cell(&mut self, cell: u32) -> Result<bool, StoreError> {
        self.repeat("FreeCell", |c| {
            match call(c, "FreeCell", Request::FreeCell { cell }, FENCE_TIMEOUT) {
                Ok(Response::CellFreed { .. }) => Ok(true),
                Err(Failure::Other(StoreError::Refused {
                    code: ErrorCode::NoSuchCell,
                    ..
                })) => Ok(false),
                Ok(r) => Err(unexpected("FreeCell", &r)),
                Err(e) => Err(e),
            }
        })
    }

    fn fence(&mut self, kn: u16) -> Result<Fenced, StoreError> {
        let req = Request::FenceKn {
            kn_id: u32::from(kn),
        };
        self.repeat("FenceKn", |c| {
            match call(c, "FenceKn", req, FENCE_TIMEOUT)? {
                Response::Fenced { logs, entries } => Ok(Fenced { logs, entries }),
                r => Err(unexpected("FenceKn", &r)),
            }
        })
    }
}
