//! The cluster manager: registers KNs, grants and renews their leases, computes the slot
//! map by consistent hashing, publishes every new map under a new epoch and stores it
//! durably in the DPM's control area; fences a KN whose lease expired.
//!
//! # Protocol
//!
//! Line-delimited JSON over TCP (loopback in a local cluster): one request object per line,
//! one reply object per line, on a connection a KN keeps open.
//!
//! | request (`op`) | fields | reply (`kind`) |
//! |---|---|---|
//! | `register` | `addr` (client address of the KN), `shards` | `registered`: `kn_id`, `lease_epoch`, `lease_ms` |
//! | `join` | `kn_id` | `lease` (the KN is in the map from the epoch it names) |
//! | `renew` | `kn_id`, `lease_epoch`, optional `load` | `lease`: `epoch` (current map), `settled`, `lease_ms`, `drain` |
//! | `ack` | `kn_id`, `epoch`, `release_us`, `entries_merged` | `lease` |
//! | `map` | — | `map`: `epoch`, `settled`, `kns` (`[id, addr]`), `ranges` and `moving` (`[first, last, kn]`) |
//! | `leave` | `kn_id` | `ok` |
//! | `status` | — | `status`: KNs (`kn_id`, `addr`, `lease_ms_left`, `slots`, `acked_epoch`, `draining`, `load`), `epoch`, `settled`, `reconfigs` |
//! | `add_kn` | — | `added`: `kn_id`, `addr`, `reconfig` (once its map settled) |
//! | `remove_kn` | `kn_id` | `removed`: `kn_id`, `reconfig` (once it left and the map settled) |
//! | `rebalance` | optional `slots` (`[first, last]`) and `to` (a KN) | `rebalanced`: `reconfig` (`null`: nothing to move) |
//!
//! `load` is the KN's load since its previous renewal (ops/s, occupancy, p99 latency, hot
//! keys); `ack` carries the KN's measurements of installing that map (`release_us`: flush +
//! merge of its logs, `entries_merged`: log entries the merges took in). `drain`: the KN was
//! asked to leave (`remove_kn`) and leaves through `leave`. `add_kn` needs a manager started
//! with spawn settings ([`SpawnConfig`]); it starts a `dinomo kn` child process. With a
//! [`LoadPolicy`] set, the manager also adds and removes KNs by itself every policy period.
//!
//! Any request may get `error` with a `message`; a `renew` of a KN that is not registered
//! (its lease expired and it was fenced) gets `error`, and the KN must stop serving.
//!
//! # Moving slots
//!
//! A new map moves slots from their old owners to new ones. Every KN, on seeing a new
//! epoch, installs it (dropping the cache of slots it lost), flushes its batches and has the
//! DPM merge its logs to their tails, then `ack`s the epoch. The map is *settled* once every
//! live KN has acknowledged it. Until then `moving` lists the slots whose previous (settled)
//! owner was another live KN: their new owner answers `-TRYAGAIN`. A KN whose lease expired
//! is first fenced (the DPM closes and merges its logs: `FenceKn`), so its slots need no
//! acknowledgement from it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dinomo_hw::fabric::{default_ctl_path, ControlClient, FabricError};
use dinomo_hw::region_file::{FilePersist, RegionFile};
use dinomo_hw::Pmem;
use dinomo_shared::control::{ClusterMapHeader, KnLease, CLUSTER_MAP_BYTES, NO_KN};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::slot::SLOTS;
use host_kn::SlotMap;
use serde::{Deserialize, Serialize};

/// A request to the manager.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MgrRequest {
    Register {
        addr: String,
        shards: u16,
    },
    Join {
        kn_id: u16,
    },
    Renew {
        kn_id: u16,
        lease_epoch: u32,
        /// The KN's load since its previous renewal.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load: Option<LoadReport>,
    },
    Ack {
        kn_id: u16,
        epoch: u64,
        /// Time the KN spent releasing slots for this map (flush + merge of its logs);
        /// 0 when it had installed the map already.
        #[serde(default)]
        release_us: u64,
        /// Log entries the DPM merged during that release (its MergeAll replies).
        #[serde(default)]
        entries_merged: u64,
    },
    Map,
    Leave {
        kn_id: u16,
    },
    Status,
    AddKn,
    RemoveKn {
        kn_id: u16,
    },
    Rebalance {
        /// Move only this range (`[first, last]`) ...
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slots: Option<(u16, u16)>,
        /// ... to this KN.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u16>,
    },
}

/// A KN's load over the interval since its previous report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub ops_per_sec: f64,
    /// Share of the interval its shards were busy (0..1; 0 when not measured).
    pub occupancy: f64,
    /// 99th percentile of request latency in its connection tasks.
    pub p99_us: u64,
    /// Hottest keys (lossy UTF-8) with their counts.
    #[serde(default)]
    pub hot_keys: Vec<(String, u64)>,
}

/// One map change and how long it took.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Reconfig {
    pub epoch: u64,
    /// Why: "kn 3 joined", "rebalance", ...
    pub reason: String,
    /// KNs in the new map.
    pub kns: usize,
    /// Slots whose owner changed.
    pub slots_moved: usize,
    /// Publish time (ms since the Unix epoch).
    pub published_ms: u64,
    /// Publish to settled: how long moving slots were refused. `None`: not settled (yet),
    /// or superseded by a newer map.
    pub settle_ms: Option<f64>,
    /// The slowest KN's release (flush + merge of its logs) for this map.
    pub max_release_ms: f64,
    /// Log entries merged by all releases for this map.
    pub entries_merged: u64,
}

/// One KN as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KnStatus {
    pub kn_id: u16,
    pub addr: String,
    pub lease_ms_left: u64,
    pub joined: bool,
    pub slots: usize,
    pub acked_epoch: u64,
    pub draining: bool,
    /// Whether the manager started it (`add_kn`).
    pub spawned: bool,
    pub load: Option<LoadReport>,
}

/// The reply to `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusMsg {
    pub epoch: u64,
    pub settled: bool,
    pub kns: Vec<KnStatus>,
    /// The last map changes, oldest first.
    pub reconfigs: Vec<Reconfig>,
    /// Whether the manager can start KNs (`add_kn`).
    pub can_spawn: bool,
    /// Whether the load policy runs.
    pub policy: bool,
}

/// A reply of the manager.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MgrReply {
    Registered {
        kn_id: u16,
        lease_epoch: u32,
        lease_ms: u64,
    },
    Lease {
        epoch: u64,
        settled: bool,
        lease_ms: u64,
        /// Leave the cluster (`remove_kn`).
        #[serde(default)]
        drain: bool,
    },
    Map(MapMsg),
    Ok,
    Status(StatusMsg),
    Added {
        kn_id: u16,
        addr: String,
        reconfig: Option<Reconfig>,
    },
    Removed {
        kn_id: u16,
        reconfig: Option<Reconfig>,
    },
    Rebalanced {
        reconfig: Option<Reconfig>,
    },
    Error {
        message: String,
    },
}

/// A published cluster map.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapMsg {
    pub epoch: u64,
    pub settled: bool,
    /// `(kn_id, client address)` of every KN in the map.
    pub kns: Vec<(u16, String)>,
    /// `(first slot, last slot, kn)`, covering the owned slots.
    pub ranges: Vec<(u16, u16, u16)>,
    /// Slots that are still moving to their new owner, same form.
    pub moving: Vec<(u16, u16, u16)>,
}

impl MapMsg {
    /// The owner of every slot.
    pub fn slot_map(&self) -> SlotMap {
        let mut owners = vec![NO_KN; SLOTS as usize];
        expand(&self.ranges, &mut owners);
        SlotMap::from_owners(self.epoch, owners)
            .unwrap_or_else(|| SlotMap::consistent(self.epoch, &[], 1))
    }

    /// Which slots are moving.
    pub fn moving_slots(&self) -> Vec<bool> {
        let mut owners = vec![NO_KN; SLOTS as usize];
        expand(&self.moving, &mut owners);
        owners.into_iter().map(|o| o != NO_KN).collect()
    }

    /// The client address of KN `kn`.
    pub fn addr_of(&self, kn: u16) -> Option<&str> {
        self.kns
            .iter()
            .find(|(id, _)| *id == kn)
            .map(|(_, a)| a.as_str())
    }
}

fn expand(ranges: &[(u16, u16, u16)], owners: &mut [u16]) {
    for &(a, b, kn) in ranges {
        for s in a..=b.min(SLOTS - 1) {
            owners[s as usize] = kn;
        }
    }
}

/// Runs of equal owners (`NO_KN` left out).
pub fn ranges_of(owners: impl Iterator<Item = u16>) -> Vec<(u16, u16, u16)> {
    let mut out: Vec<(u16, u16, u16)> = Vec::new();
    for (s, o) in owners.enumerate() {
        let s = s as u16;
        if o == NO_KN {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.2 == o && last.1 + 1 == s => last.1 = s,
            _ => out.push((s, s, o)),
        }
    }
    out
}

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Region file of the DPM (shm fabric); the control file is derived from it.
    pub region: PathBuf,
    pub listen: SocketAddr,
    /// Lease length; a KN renews it every 100 ms (every quarter lease if shorter).
    pub lease: Duration,
    /// Virtual nodes per KN on the hash ring.
    pub vnodes: u32,
    /// How long to wait for the DPM to come up.
    pub connect_timeout: Duration,
    /// How to start new KNs (`add_kn`, the policy); `None`: the manager cannot.
    pub spawn: Option<SpawnConfig>,
}

/// What the manager needs to start a `dinomo kn` child process.
#[derive(Clone, Debug)]
pub struct SpawnConfig {
    /// The `dinomo` executable.
    pub exe: PathBuf,
    /// Host the new KN listens on (any free port).
    pub host: String,
    pub threads: u16,
    pub io_threads: usize,
    /// Cache per KN, e.g. "64M".
    pub cache: String,
}

/// What the load policy asks the manager to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    AddKn,
    RemoveKn(u16),
    /// Anything the multi-process cluster cannot do (logged, not acted on).
    Unsupported(String),
}

/// A load policy as the manager drives it: every `period`, the latest load report of every
/// live KN in, actions out.
pub trait LoadPolicy: Send {
    fn period(&self) -> Duration;
    fn decide(&mut self, now: Instant, loads: &[(u16, LoadReport)]) -> Vec<PolicyAction>;
}

/// The elasticity policy drives the multi-process cluster: it adds and removes KNs; keys
/// cannot be replicated across KN processes, so replication decisions are only logged.
impl LoadPolicy for crate::policy::Policy {
    fn period(&self) -> Duration {
        self.config().period
    }

    fn decide(&mut self, now: Instant, loads: &[(u16, LoadReport)]) -> Vec<PolicyAction> {
        use crate::policy::{Decision, KnReport};
        let reports: Vec<KnReport> = loads
            .iter()
            .map(|(kn, l)| KnReport {
                kn: *kn,
                ops_per_sec: l.ops_per_sec,
                occupancy: l.occupancy,
                p99: Duration::from_micros(l.p99_us),
                hot_keys: l
                    .hot_keys
                    .iter()
                    .map(|(k, c)| (k.as_bytes().to_vec(), *c))
                    .collect(),
            })
            .collect();
        crate::policy::Policy::decide(self, now, &reports, &[])
            .into_iter()
            .map(|d| match d {
                Decision::AddKn => PolicyAction::AddKn,
                Decision::RemoveKn(kn) => PolicyAction::RemoveKn(kn),
                d @ (Decision::Replicate(_) | Decision::Dereplicate(_)) => {
                    PolicyAction::Unsupported(format!("{d:?}"))
                }
            })
            .collect()
    }
}

/// Map changes kept for `status`.
const RECONFIGS_KEPT: usize = 16;
/// How long `add_kn`, `remove_kn` and `rebalance` wait for the new map to settle.
const ADMIN_WAIT: Duration = Duration::from_secs(30);

/// Why the manager failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot reach the DPM: {0}")]
    Dpm(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct KnInfo {
    addr: String,
    lease_epoch: u32,
    expires: Instant,
    joined: bool,
    acked: u64,
    /// Being fenced or leaving: kept (it still owns slots in the current map) until the
    /// map without it is published, so the map and its KN list change together.
    gone: bool,
    /// Asked to leave (`remove_kn`); told so in its next lease reply.
    draining: bool,
    load: Option<LoadReport>,
}

#[derive(Debug)]
struct State {
    kns: BTreeMap<u16, KnInfo>,
    map: SlotMap,
    /// The last map every live KN acknowledged.
    settled_map: SlotMap,
    settled: bool,
    /// When the current map was published.
    published: Instant,
    reconfigs: VecDeque<Reconfig>,
}

impl State {
    fn live(&self, kn: u16) -> bool {
        self.kns.get(&kn).is_some_and(|k| k.joined && !k.gone)
    }

    fn live_ids(&self) -> Vec<u16> {
        self.kns
            .iter()
            .filter(|(_, k)| k.joined && !k.gone)
            .map(|(&id, _)| id)
            .collect()
    }

    fn reconfig_mut(&mut self, epoch: u64) -> Option<&mut Reconfig> {
        self.reconfigs.iter_mut().rev().find(|r| r.epoch == epoch)
    }
}

/// Durable state in the DPM region and the DPM's control channel.
struct Dpm {
    pm: Pmem<FilePersist>,
    geo: Geometry,
    control: Mutex<ControlClient>,
    _file: Arc<RegionFile>,
}

impl std::fmt::Debug for Dpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dpm").field("geo", &self.geo).finish()
    }
}

impl Dpm {
    fn connect(region: &Path, timeout: Duration) -> Result<Self, ManagerError> {
        let t0 = Instant::now();
        let ctl = default_ctl_path(region);
        loop {
            let attempt = (|| -> Result<Self, String> {
                let file = RegionFile::open(region).map_err(|e| e.to_string())?;
                let pm = file.pmem();
                let geo = dpm_fw::region::read_geometry(&pm).map_err(|e| e.to_string())?;
                let mut control = ControlClient::connect(&ctl).map_err(|e| e.to_string())?;
                match control.call(&Request::Ping, Duration::from_secs(2)) {
                    Ok(Ok(Response::Pong)) => {}
                    other => return Err(format!("DPM does not answer a ping: {other:?}")),
                }
                Ok(Self {
                    pm,
                    geo,
                    control: Mutex::new(control),
                    _file: file,
                })
            })();
            match attempt {
                Ok(d) => return Ok(d),
                Err(e) if t0.elapsed() >= timeout => return Err(ManagerError::Dpm(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn header(&self) -> ClusterMapHeader {
        self.pm.read_pod(self.geo.map_header_off())
    }

    /// Writes `map` to the inactive copy, persists it, then commits it with one persisted
    /// 8-byte store of the header word.
    fn store_map(&self, map: &SlotMap) {
        let h = self.header();
        let copy = 1 - h.active_copy();
        let mut bytes = Vec::with_capacity(CLUSTER_MAP_BYTES as usize);
        for s in 0..SLOTS {
            bytes.extend_from_slice(&map.owner(s).to_le_bytes());
        }
        let off = self.geo.map_off(copy);
        self.pm.write(off, &bytes);
        self.pm.persist(off, CLUSTER_MAP_BYTES);
        let hoff = self.geo.map_header_off();
        self.pm.store_u64(hoff, map.epoch() << 1 | copy as u64);
        self.pm.persist(hoff, 8);
    }

    fn lease(&self, kn: u16) -> KnLease {
        self.pm.read_pod(self.geo.lease_off(kn as u32))
    }

    fn store_lease(&self, kn: u16, lease_epoch: u32, expires_ms: u64) {
        let off = self.geo.lease_off(kn as u32);
        let l = KnLease {
            kn_id: kn as u32 + 1,
            lease_epoch,
            expires_ms,
            reserved: [0; 6],
        };
        self.pm.write_pod(off, &l);
        self.pm.persist(off, KnLease::SIZE);
    }

    /// Fences `kn` at the DPM. A DPM that went away (crashed, restarting) is waited for and
    /// asked again: fencing is repeatable.
    fn fence(&self, kn: u16) -> Result<(u32, u64), String> {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let req = Request::FenceKn { kn_id: kn as u32 };
        let mut reply = c.call(&req, FENCE_TIMEOUT);
        if let Err(FabricError::Disconnected(why) | FabricError::NotRunning(why)) = &reply {
            tracing::warn!(kn, %why, "the DPM went away; reconnecting to fence");
            c.reconnect(RECONNECT_WAIT).map_err(|e| e.to_string())?;
            reply = c.call(&req, FENCE_TIMEOUT);
        }
        match reply {
            Ok(Ok(Response::Fenced { logs, entries })) => Ok((logs, entries)),
            Ok(Ok(r)) => Err(format!("unexpected reply {r:?}")),
            Ok(Err(code)) => Err(format!("DPM refused: {code:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// How long the DPM may take to fence a KN (it merges the KN's logs first).
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fence waits for a DPM that went away to come back.
const RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// A KN process this manager started.
#[derive(Debug)]
struct SpawnedKn {
    kn_id: Option<u16>,
    child: Child,
}

/// A running manager.
pub struct Manager {
    cfg: ManagerConfig,
    dpm: Dpm,
    state: Mutex<State>,
    addr: SocketAddr,
    spawned: Mutex<Vec<SpawnedKn>>,
    spawner: Spawner,
    policy: Mutex<Option<Box<dyn LoadPolicy>>>,
    /// A policy action (a KN being added or removed) is under way.
    policy_busy: Arc<AtomicBool>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("cfg", &self.cfg)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Manager {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address the manager listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `policy` every period (see [`serve`]).
    pub fn set_policy(&self, policy: Box<dyn LoadPolicy>) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy);
    }

    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis() as u64
    }

    /// Computes, stores and publishes a new map over the joined live KNs.
    fn republish(&self, st: &mut State, reason: String) {
        let ids = st.live_ids();
        let epoch = st.map.epoch() + 1;
        let map = SlotMap::consistent(epoch, &ids, self.cfg.vnodes);
        self.publish(st, map, reason);
    }

    /// Stores and publishes `map` (its epoch one above the current one) and starts its
    /// record in the reconfiguration history.
    fn publish(&self, st: &mut State, map: SlotMap, reason: String) {
        let epoch = map.epoch();
        let slots_moved = (0..SLOTS)
            .filter(|&s| map.owner(s) != st.map.owner(s))
            .count();
        st.map = map;
        st.published = Instant::now();
        self.dpm.store_map(&st.map);
        let kns = st.live_ids();
        tracing::info!(epoch, kns = ?kns, slots_moved, %reason, "published cluster map");
        if st.reconfigs.len() == RECONFIGS_KEPT {
            st.reconfigs.pop_front();
        }
        st.reconfigs.push_back(Reconfig {
            epoch,
            reason,
            kns: kns.len(),
            slots_moved,
            published_ms: now_ms(),
            ..Reconfig::default()
        });
        self.update_settled(st);
    }

    fn update_settled(&self, st: &mut State) {
        let epoch = st.map.epoch();
        let all = st
            .kns
            .values()
            .filter(|k| k.joined && !k.gone)
            .all(|k| k.acked >= epoch);
        if all && !st.settled {
            st.settled_map = st.map.clone();
            let took = ms(st.published.elapsed());
            if let Some(r) = st.reconfig_mut(epoch) {
                r.settle_ms = Some(took);
            }
            tracing::info!(epoch, settle_ms = took, "cluster map settled");
        }
        st.settled = all;
    }

    /// Settled, and no KN is being fenced or leaving (its slots are about to move).
    fn settled(st: &State) -> bool {
        st.settled && !st.kns.values().any(|k| k.gone)
    }

    fn map_msg(&self, st: &State) -> MapMsg {
        let moving = (0..SLOTS).map(|s| {
            let (new, old) = (st.map.owner(s), st.settled_map.owner(s));
            if !st.settled && new != old && old != NO_KN && st.live(old) {
                new
            } else {
                NO_KN
            }
        });
        MapMsg {
            epoch: st.map.epoch(),
            settled: Self::settled(st),
            kns: st
                .kns
                .iter()
                .filter(|(_, k)| k.joined)
                .map(|(&id, k)| (id, k.addr.clone()))
                .collect(),
            ranges: ranges_of((0..SLOTS).map(|s| st.map.owner(s))),
            moving: ranges_of(moving),
        }
    }

    fn lease_reply(&self, st: &State, kn: u16) -> MgrReply {
        MgrReply::Lease {
            epoch: st.map.epoch(),
            settled: Self::settled(st),
            lease_ms: self.lease_ms(),
            drain: st.kns.get(&kn).is_some_and(|k| k.draining),
        }
    }

    fn status(&self) -> StatusMsg {
        let spawned: Vec<u16> = self
            .spawned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|c| c.kn_id)
            .collect();
        let st = self.lock();
        let now = Instant::now();
        StatusMsg {
            epoch: st.map.epoch(),
            settled: Self::settled(&st),
            kns: st
                .kns
                .iter()
                .filter(|(_, k)| !k.gone)
                .map(|(&id, k)| KnStatus {
                    kn_id: id,
                    addr: k.addr.clone(),
                    lease_ms_left: k.expires.saturating_duration_since(now).as_millis() as u64,
                    joined: k.joined,
                    slots: st.map.slots_of(id),
                    acked_epoch: k.acked,
                    draining: k.draining,
                    spawned: spawned.contains(&id),
                    load: k.load.clone(),
                })
                .collect(),
            reconfigs: st.reconfigs.iter().cloned().collect(),
            can_spawn: self.cfg.spawn.is_some(),
            policy: self
                .policy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some(),
        }
    }

    /// Answers one request.
    pub fn handle(&self, req: MgrRequest) -> MgrReply {
        let error = |message: String| MgrReply::Error { message };
        match req {
            MgrRequest::Status => return MgrReply::Status(self.status()),
            MgrRequest::AddKn => {
                return match self.add_kn() {
                    Ok((kn_id, addr, reconfig)) => MgrReply::Added {
                        kn_id,
                        addr,
                        reconfig,
                    },
                    Err(e) => error(e),
                }
            }
            MgrRequest::RemoveKn { kn_id } => {
                return match self.remove_kn(kn_id) {
                    Ok(reconfig) => MgrReply::Removed { kn_id, reconfig },
                    Err(e) => error(e),
                }
            }
            MgrRequest::Rebalance { slots, to } => {
                return match self.rebalance(slots, to) {
                    Ok(reconfig) => MgrReply::Rebalanced { reconfig },
                    Err(e) => error(e),
                }
            }
            _ => {}
        }
        let mut st = self.lock();
        let unknown = |kn| MgrReply::Error {
            message: format!("KN {kn} is not registered (lease expired?)"),
        };
        match req {
            MgrRequest::Register { addr, shards } => {
                let _ = shards;
                let max = (self.dpm.geo.max_kns as usize).min(NO_KN as usize);
                let Some(kn_id) = (0..max as u16).find(|id| !st.kns.contains_key(id)) else {
                    return MgrReply::Error {
                        message: format!("all {max} KN slots are taken"),
                    };
                };
                let lease_epoch = self.dpm.lease(kn_id).lease_epoch.wrapping_add(1).max(1);
                self.dpm
                    .store_lease(kn_id, lease_epoch, now_ms() + self.lease_ms());
                st.kns.insert(
                    kn_id,
                    KnInfo {
                        addr: addr.clone(),
                        lease_epoch,
                        expires: Instant::now() + self.cfg.lease,
                        joined: false,
                        acked: 0,
                        gone: false,
                        draining: false,
                        load: None,
                    },
                );
                tracing::info!(kn_id, %addr, lease_epoch, "KN registered");
                MgrReply::Registered {
                    kn_id,
                    lease_epoch,
                    lease_ms: self.lease_ms(),
                }
            }
            MgrRequest::Join { kn_id } => {
                let Some(k) = st.kns.get_mut(&kn_id).filter(|k| !k.gone) else {
                    return unknown(kn_id);
                };
                if !k.joined {
                    k.joined = true;
                    self.republish(&mut st, format!("kn {kn_id} joined"));
                }
                self.lease_reply(&st, kn_id)
            }
            MgrRequest::Renew {
                kn_id,
                lease_epoch,
                load,
            } => {
                let Some(k) = st
                    .kns
                    .get_mut(&kn_id)
                    .filter(|k| k.lease_epoch == lease_epoch && !k.gone)
                else {
                    return unknown(kn_id);
                };
                k.expires = Instant::now() + self.cfg.lease;
                if load.is_some() {
                    k.load = load;
                }
                self.dpm
                    .store_lease(kn_id, lease_epoch, now_ms() + self.lease_ms());
                self.lease_reply(&st, kn_id)
            }
            MgrRequest::Ack {
                kn_id,
                epoch,
                release_us,
                entries_merged,
            } => {
                let Some(k) = st.kns.get_mut(&kn_id).filter(|k| !k.gone) else {
                    return unknown(kn_id);
                };
                k.acked = k.acked.max(epoch);
                if let Some(r) = st.reconfig_mut(epoch) {
                    r.max_release_ms = r.max_release_ms.max(release_us as f64 / 1e3);
                    r.entries_merged += entries_merged;
                }
                self.update_settled(&mut st);
                self.lease_reply(&st, kn_id)
            }
            MgrRequest::Map => MgrReply::Map(self.map_msg(&st)),
            MgrRequest::Leave { kn_id } => {
                let Some(k) = st.kns.get_mut(&kn_id).filter(|k| !k.gone) else {
                    return unknown(kn_id);
                };
                k.gone = true;
                let (lease_epoch, joined) = (k.lease_epoch, k.joined);
                // The KN closed its logs before leaving; fencing again is a cheap no-op
                // that also covers a KN that could not close them.
                drop(st);
                if let Err(e) = self.dpm.fence(kn_id) {
                    tracing::warn!(kn_id, error = %e, "fencing a leaving KN failed");
                }
                self.dpm.store_lease(kn_id, lease_epoch, 0);
                let mut st = self.lock();
                st.kns.remove(&kn_id);
                if joined {
                    self.republish(&mut st, format!("kn {kn_id} left"));
                }
                tracing::info!(kn_id, "KN left");
                MgrReply::Ok
            }
            MgrRequest::Status
            | MgrRequest::AddKn
            | MgrRequest::RemoveKn { .. }
            | MgrRequest::Rebalance { .. } => error("answered above".into()),
        }
    }

    /// Waits (bounded) until `done` holds for the state; `Err` with the last state's
    /// epoch on timeout.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> Result<(), u64> {
        let t0 = Instant::now();
        loop {
            {
                let st = self.lock();
                if done(&st) {
                    return Ok(());
                }
                if t0.elapsed() >= timeout {
                    return Err(st.map.epoch());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn reconfig_of(&self, epoch: u64) -> Option<Reconfig> {
        self.lock().reconfig_mut(epoch).cloned()
    }

    /// Starts a `dinomo kn` child process and waits until it serves its slots.
    fn add_kn(&self) -> Result<(u16, String, Option<Reconfig>), String> {
        let Some(sp) = &self.cfg.spawn else {
            return Err(
                "this manager cannot start KNs: it was started without --kn-exe \
                        (`dinomo up` passes it)"
                    .into(),
            );
        };
        let mut cmd = Command::new(&sp.exe);
        cmd.arg("kn")
            .arg("--dpm")
            .arg(&self.cfg.region)
            .args(["--listen", &format!("{}:0", sp.host)])
            .args(["--manager", &self.addr.to_string()])
            .args(["--threads", &sp.threads.to_string()])
            .args(["--io-threads", &sp.io_threads.to_string()])
            .args(["--cache", &sp.cache])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = self
            .spawner
            .spawn(cmd)
            .map_err(|e| format!("cannot start {}: {e}", sp.exe.display()))?;
        let ready = child.stdout.take().map(ready_line);
        let pid = child.id();
        let slot = {
            let mut sp = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
            sp.push(SpawnedKn { kn_id: None, child });
            sp.len() - 1
        };
        let line = ready.and_then(|rx| rx.recv_timeout(ADMIN_WAIT).ok());
        // "kn <id> listening on <addr>"
        let parsed = line.as_deref().and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["kn", id, "listening", "on", addr] => {
                    Some((id.parse::<u16>().ok()?, addr.to_string()))
                }
                _ => None,
            }
        });
        let Some((kn_id, addr)) = parsed else {
            let mut list = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = list.iter().position(|c| c.child.id() == pid) {
                let mut c = list.remove(i);
                let _ = c.child.kill();
                let status = c.child.wait();
                return Err(format!(
                    "the new KN did not start ({:?}); see the manager's log",
                    status.map(|s| s.to_string())
                ));
            }
            return Err("the new KN did not start; see the manager's log".into());
        };
        {
            let mut list = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = list.get_mut(slot).filter(|c| c.child.id() == pid) {
                c.kn_id = Some(kn_id);
            } else if let Some(c) = list.iter_mut().find(|c| c.child.id() == pid) {
                c.kn_id = Some(kn_id);
            }
        }
        tracing::info!(kn_id, %addr, "started a KN");
        let joined = self.wait_for(ADMIN_WAIT, |st| {
            st.kns
                .get(&kn_id)
                .is_some_and(|k| k.joined && k.acked >= st.map.epoch())
                && Self::settled(st)
        });
        match joined {
            Ok(()) => {
                let epoch = self.lock().map.epoch();
                Ok((kn_id, addr, self.reconfig_of(epoch)))
            }
            Err(epoch) => Err(format!(
                "KN {kn_id} ({addr}) started but the map (epoch {epoch}) did not settle within {}s",
                ADMIN_WAIT.as_secs()
            )),
        }
    }

    /// Marks `kn` draining (it leaves on its next renewal) and waits until it has left
    /// and the map without it settled.
    fn remove_kn(&self, kn: u16) -> Result<Option<Reconfig>, String> {
        {
            let mut st = self.lock();
            let live = st.live_ids();
            let others = st
                .kns
                .iter()
                .filter(|(&id, k)| id != kn && k.joined && !k.gone && !k.draining)
                .count();
            let Some(k) = st.kns.get_mut(&kn).filter(|k| !k.gone) else {
                return Err(format!("unknown KN {kn} (live KNs: {live:?})"));
            };
            if k.joined && others == 0 {
                return Err(format!(
                    "KN {kn} is the last KN that is not leaving; it cannot be removed"
                ));
            }
            k.draining = true;
        }
        tracing::info!(kn, "draining KN");
        let left = self.wait_for(ADMIN_WAIT, |st| !st.kns.contains_key(&kn));
        if left.is_err() {
            return Err(format!(
                "KN {kn} did not leave within {}s; it stays marked draining",
                ADMIN_WAIT.as_secs()
            ));
        }
        let _ = self.wait_for(ADMIN_WAIT, Self::settled);
        let st = self.lock();
        Ok(st
            .reconfigs
            .iter()
            .rev()
            .find(|r| r.reason.starts_with(&format!("kn {kn} ")))
            .cloned())
    }

    /// Recomputes the map over the live KNs, or moves `slots` to `to`.
    fn rebalance(
        &self,
        slots: Option<(u16, u16)>,
        to: Option<u16>,
    ) -> Result<Option<Reconfig>, String> {
        let epoch = {
            let mut st = self.lock();
            if !Self::settled(&st) {
                return Err(format!(
                    "the map (epoch {}) is still settling; try again",
                    st.map.epoch()
                ));
            }
            let epoch = st.map.epoch() + 1;
            let (next, reason) = match (slots, to) {
                (None, None) => (
                    SlotMap::consistent(epoch, &st.live_ids(), self.cfg.vnodes),
                    "rebalance".to_string(),
                ),
                (Some((a, b)), Some(kn)) => {
                    if a > b || b >= SLOTS {
                        return Err(format!(
                            "bad slot range {a}-{b}: need first <= last <= {}",
                            SLOTS - 1
                        ));
                    }
                    if !st.live(kn) || st.kns.get(&kn).is_some_and(|k| k.draining) {
                        return Err(format!("unknown KN {kn} (live KNs: {:?})", st.live_ids()));
                    }
                    let owners = (0..SLOTS)
                        .map(|s| {
                            if (a..=b).contains(&s) {
                                kn
                            } else {
                                st.map.owner(s)
                            }
                        })
                        .collect();
                    let Some(m) = SlotMap::from_owners(epoch, owners) else {
                        return Err("cannot build the map".into());
                    };
                    (m, format!("move slots {a}-{b} to kn {kn}"))
                }
                _ => return Err("give both slots and to, or neither".into()),
            };
            if (0..SLOTS).all(|s| next.owner(s) == st.map.owner(s)) {
                return Ok(None);
            }
            self.publish(&mut st, next, reason);
            epoch
        };
        let settled = self.wait_for(ADMIN_WAIT, |st| st.map.epoch() != epoch || st.settled);
        if settled.is_err() {
            return Err(format!(
                "map epoch {epoch} did not settle within {}s",
                ADMIN_WAIT.as_secs()
            ));
        }
        Ok(self.reconfig_of(epoch))
    }

    fn extend_leases(&self, by: Duration) {
        let mut st = self.lock();
        for k in st.kns.values_mut() {
            k.expires += by;
        }
        tracing::warn!(
            pause_ms = by.as_millis() as u64,
            "manager paused; leases extended"
        );
    }

    /// Fences and removes every KN whose lease has expired, then publishes a new map.
    fn expire(&self) {
        // (id, lease epoch, joined) of every KN whose lease ran out.
        let expired: Vec<(u16, u32, bool)> = {
            let mut st = self.lock();
            let now = Instant::now();
            st.kns
                .iter_mut()
                .filter(|(_, k)| !k.gone && k.expires <= now)
                .map(|(&id, k)| {
                    k.gone = true;
                    (id, k.lease_epoch, k.joined)
                })
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        for &(kn, lease_epoch, _) in &expired {
            // The slots must not change hands before the dead KN's log is merged.
            loop {
                match self.dpm.fence(kn) {
                    Ok((logs, entries)) => {
                        tracing::warn!(kn, logs, entries, "lease expired: KN fenced");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(kn, error = %e, "cannot fence KN; retrying");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            self.dpm.store_lease(kn, lease_epoch, 0);
        }
        // Removing the fenced KNs and publishing the map without them is one step.
        let mut st = self.lock();
        for &(kn, _, _) in &expired {
            st.kns.remove(&kn);
        }
        let joined: Vec<String> = expired
            .iter()
            .filter(|e| e.2)
            .map(|&(kn, _, _)| kn.to_string())
            .collect();
        if !joined.is_empty() {
            let reason = format!("kn {} fenced (lease expired)", joined.join(", "));
            self.republish(&mut st, reason);
        }
    }

    /// Reaps KN children that exited.
    fn reap(&self) {
        let mut list = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
        list.retain_mut(|c| match c.child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(kn = ?c.kn_id, %status, "a KN the manager started exited");
                false
            }
            _ => true,
        });
    }

    /// Asks every KN this manager started to leave (SIGTERM) and waits for them, up to
    /// `grace`; kills the rest. The manager keeps answering them meanwhile.
    pub fn stop_spawned(&self, grace: Duration) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let mut list = std::mem::take(&mut *self.spawned.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &list {
            let _ = kill(Pid::from_raw(c.child.id() as i32), Signal::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < grace && !list.is_empty() {
            list.retain_mut(|c| !matches!(c.child.try_wait(), Ok(Some(_))));
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut c in list {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }

    /// One round of the load policy.
    fn run_policy(self: &Arc<Self>) {
        let loads: Vec<(u16, LoadReport)> = {
            let st = self.lock();
            let live: Vec<_> = st
                .kns
                .iter()
                .filter(|(_, k)| k.joined && !k.gone && !k.draining)
                .collect();
            // The policy counts KNs by their reports: wait until every KN has reported.
            if live.iter().any(|(_, k)| k.load.is_none()) {
                return;
            }
            live.into_iter()
                .filter_map(|(&id, k)| k.load.clone().map(|l| (id, l)))
                .collect()
        };
        let actions = {
            let mut p = self.policy.lock().unwrap_or_else(|e| e.into_inner());
            let Some(p) = p.as_mut() else { return };
            p.decide(Instant::now(), &loads)
        };
        for a in actions {
            if matches!(a, PolicyAction::Unsupported(_)) {
                tracing::warn!(action = ?a, "policy: not supported in the multi-process cluster");
                continue;
            }
            if self.policy_busy.swap(true, Ordering::AcqRel) {
                tracing::info!(action = ?a, "policy: an earlier action is still under way");
                continue;
            }
            tracing::info!(action = ?a, "policy decision");
            let (m, busy) = (Arc::clone(self), Arc::clone(&self.policy_busy));
            let spawned = std::thread::Builder::new()
                .name("manager-policy".into())
                .spawn(move || {
                    let r = match a {
                        PolicyAction::AddKn => m.add_kn().map(|_| ()),
                        PolicyAction::RemoveKn(kn) => m.remove_kn(kn).map(|_| ()),
                        PolicyAction::Unsupported(_) => Ok(()),
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "policy action failed");
                    }
                    busy.store(false, Ordering::Release);
                });
            if spawned.is_err() {
                self.policy_busy.store(false, Ordering::Release);
            }
        }
    }
}

/// Reads the first line of a child's stdout in a thread (and discards the rest, so the
/// child never writes to a closed pipe).
fn ready_line(out: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("kn-stdout".into())
        .spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
    rx
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts child processes from one thread that lives as long as the manager: the
/// parent-death signal fires when the *thread* that forked exits, so children must not be
/// forked from short-lived connection threads.
struct Spawner(Mutex<mpsc::Sender<SpawnJob>>);

impl Spawner {
    fn start() -> Self {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let _ = std::thread::Builder::new()
            .name("manager-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    die_with_parent(&mut cmd);
                    let _ = reply.send(cmd.spawn());
                }
            });
        Self(Mutex::new(tx))
    }

    fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((cmd, tx));
        if sent.is_err() {
            return Err(std::io::Error::other("the spawner thread is gone"));
        }
        rx.recv()
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
    }
}

/// The child gets SIGTERM (and leaves the cluster) if the manager dies.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Longest wait for the leases of an earlier manager's KNs to lapse (an expiry further
/// ahead comes from a clock that jumped).
const MAX_LEFTOVER_LEASE_WAIT: Duration = Duration::from_secs(60);

/// Slack between the wall clock of stored expiries and the KNs' monotonic clocks.
const LEASE_CLOCK_MARGIN: Duration = Duration::from_millis(50);

/// Starts the manager: connects to the DPM, fences KNs left over from an earlier run
/// (once their leases lapsed),
/// and listens. Returns once listening; `serve` runs it.
pub fn start(cfg: ManagerConfig) -> Result<(Arc<Manager>, TcpListener), ManagerError> {
    let dpm = Dpm::connect(&cfg.region, cfg.connect_timeout)?;
    // KNs of an earlier run of the cluster are gone, or soon will be: merge whatever they
    // left. A KN of a manager that was killed may still be running and count its lease as
    // held; fencing it before that lease lapsed would merge and close its logs while it
    // still acknowledges writes into them, and those writes would be lost. Its lease
    // expires (as it counts it: from before its last renewal was sent) no later than the
    // expiry the earlier manager stored, so fencing waits for that.
    let old = dpm.header();
    let max_kns = dpm.geo.max_kns.min(NO_KN as u32) as u16;
    let last_expiry = (0..max_kns)
        .map(|kn| dpm.lease(kn))
        .filter(|l| l.kn_id != 0)
        .map(|l| l.expires_ms)
        .max();
    if let Some(expires_ms) = last_expiry {
        let wait =
            Duration::from_millis(expires_ms.saturating_sub(now_ms())).min(MAX_LEFTOVER_LEASE_WAIT);
        if !wait.is_zero() {
            tracing::info!(
                ?wait,
                "KNs of an earlier manager hold leases: fencing once they lapse"
            );
            std::thread::sleep(wait + LEASE_CLOCK_MARGIN);
        }
    }
    for kn in 0..max_kns {
        if dpm.lease(kn).kn_id != 0 {
            let _ = dpm.fence(kn);
            dpm.store_lease(kn, dpm.lease(kn).lease_epoch, 0);
        }
    }
    let empty = SlotMap::consistent(old.epoch(), &[], 1);
    let listener = TcpListener::bind(cfg.listen).map_err(|source| ManagerError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ManagerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let m = Manager {
        cfg,
        dpm,
        state: Mutex::new(State {
            kns: BTreeMap::new(),
            map: empty.clone(),
            settled_map: empty,
            settled: true,
            published: Instant::now(),
            reconfigs: VecDeque::new(),
        }),
        addr,
        spawned: Mutex::new(Vec::new()),
        spawner: Spawner::start(),
        policy: Mutex::new(None),
        policy_busy: Arc::new(AtomicBool::new(false)),
    };
    Ok((Arc::new(m), listener))
}

/// Serves KNs until `stop` is set.
pub fn serve(m: &Arc<Manager>, listener: TcpListener, stop: &AtomicBool) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let tick = (m.cfg.lease / 10).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut last_check = Instant::now();
    let mut last_policy = Instant::now();
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((s, _)) => {
                let m = Arc::clone(m);
                std::thread::Builder::new()
                    .name("manager-conn".into())
                    .spawn(move || connection(&m, s))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
        let gap = last_check.elapsed();
        if gap >= tick {
            if gap > m.cfg.lease / 4 {
                // This process was not scheduled for a while: renewals may be waiting
                // unread, so a lease that looks expired may not be. Extend every lease by
                // the pause instead of fencing live KNs.
                m.extend_leases(gap);
            } else {
                m.expire();
            }
            m.reap();
            last_check = Instant::now();
        }
        let period = m
            .policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| p.period());
        if let Some(p) = period {
            if last_policy.elapsed() >= p {
                m.run_policy();
                last_policy = Instant::now();
            }
        }
    }
    Ok(())
}

fn connection(m: &Manager, s: TcpStream) {
    let _ = s.set_nodelay(true);
    let Ok(w) = s.try_clone() else { return };
    let mut w = std::io::BufWriter::new(w);
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > 4096 {
            return;
        }
        let reply = match serde_json::from_str::<MgrRequest>(line.trim()) {
            Ok(req) => m.handle(req),
            Err(e) => MgrReply::Error {
                message: format!("bad request: {e}"),
            },
        };
        let Ok(mut text) = serde_json::to_string(&reply) else {
            return;
        };
        text.push('\n');
        if w.write_all(text.as_bytes())
            .and_then(|_| w.flush())
            .is_err()
        {
            return;
        }
    }
}

/// A KN's (or a tool's) connection to the manager.
#[derive(Debug)]
pub struct MgrClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl MgrClient {
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Self> {
        let t0 = Instant::now();
        let s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() >= timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// How long to wait for a reply (30 s unless set).
    pub fn set_timeout(&mut self, d: Duration) -> std::io::Result<()> {
        self.w.set_read_timeout(Some(d))
    }

    /// Sends one request and reads its reply.
    pub fn call(&mut self, req: &MgrRequest) -> std::io::Result<MgrReply> {
        let mut text = serde_json::to_string(req).map_err(std::io::Error::other)?;
        text.push('\n');
        self.w.write_all(text.as_bytes())?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the manager closed the connection",
            ));
        }
        serde_json::from_str(line.trim()).map_err(std::io::Error::other)
    }

    /// The current map.
    pub fn map(&mut self) -> std::io::Result<MapMsg> {
        match self.call(&MgrRequest::Map)? {
            MgrReply::Map(m) => Ok(m),
            other => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_and_expand() {
        let owners = [0u16, 0, 1, NO_KN, 1, 1, 2];
        let r = ranges_of(owners.iter().copied());
        assert_eq!(r, vec![(0, 1, 0), (2, 2, 1), (4, 5, 1), (6, 6, 2)]);
        let msg = MapMsg {
            epoch: 3,
            settled: true,
            kns: vec![(1, "127.0.0.1:1".into())],
            ranges: r,
            moving: vec![(4, 4, 1)],
        };
        let m = msg.slot_map();
        assert_eq!((m.owner(1), m.owner(3), m.owner(6)), (0, NO_KN, 2));
        assert!(msg.moving_slots()[4] && !msg.moving_slots()[5]);
        assert_eq!(msg.addr_of(1), Some("127.0.0.1:1"));
        let json = serde_json::to_string(&MgrReply::Map(msg.clone())).expect("json");
        assert_eq!(
            serde_json::from_str::<MgrReply>(&json).expect("parse"),
            MgrReply::Map(msg)
        );
        let req: MgrRequest =
            serde_json::from_str(r#"{"op":"renew","kn_id":2,"lease_epoch":5}"#).expect("req");
        assert_eq!(
            req,
            MgrRequest::Renew {
                kn_id: 2,
                lease_epoch: 5,
                load: None
            }
        );
    }
}
