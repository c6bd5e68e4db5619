//! The manager's state machine: membership, leases, the map and its epochs, settling, and
//! the order of fencing. It does no I/O of its own: the durable store (the DPM), the clock
//! and the KN spawner are injected, and nothing here waits, so tests drive it request by
//! request without processes or sockets. The TCP service ([`crate::service`]) runs it.
//!
//! Store calls (a control message to the DPM each) never run under the state lock: a DPM
//! that is restarting must not hold up lease renewals, which need no store call at all.
//!
//! # Leases
//!
//! A renewal extends a KN's lease in memory. What is recorded at the DPM is the lease
//! epoch and length, once per registration, and the end of the lease when the KN is
//! fenced or leaves: a manager that takes over after a crash waits one lease length before
//! it fences the KNs it finds still holding leases (every lease the dead manager granted
//! ends by then), and needs no record of each renewal.
//!
//! # Identity
//!
//! Every request comes from a [`Peer`]: the session (one connection, authenticated with the
//! cluster secret when the manager has one) it arrived on and the role that session
//! claimed. A KN's `join`, `renew`, `ack` and `leave` are served only on the session that
//! registered that KN (or that `resume`d it, with its lease epoch, after a broken
//! connection or a manager restart), and only for its current lease epoch: another
//! connection can neither end a KN's lease nor settle a map for it.
//!
//! # Restart
//!
//! A manager that starts on a DPM whose lease rows show KNs that may still hold leases
//! does not fence them: it keeps them as *adopting* for one lease of the manager that
//! granted them. A KN that resumes within it, with its lease epoch, keeps its slots; the
//! first one that brings the stored map's epoch gives the manager the map (KNs are
//! members: they hold the cluster secret). Until the map is known, joins and map requests
//! are answered `retry` and nothing is published. A KN that does not come back within the
//! lease is fenced, as any KN whose lease lapsed.
//!
//! # Fencing order
//!
//! A KN that left or whose lease expired is marked *gone*; its slots stay where they are
//! until the DPM has fenced it (closed and merged its logs). Only then is it removed and a
//! map without it stored and published. A fence that fails is retried at every tick.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dinomo_shared::control::NO_KN;
use dinomo_shared::entry::MAX_KEY_LEN;
use dinomo_shared::manager_proto::{
    key_from_hex, key_hex, ranges_of, KnStatus, LoadReport, MapMsg, MgrReply, MgrRequest, Reconfig,
    ReplicaMsg, ReplicaPhase, Role, StatusMsg,
};
use dinomo_shared::ownership::SlotMap;
use dinomo_shared::slot::key_slot;
use dinomo_shared::slot::SLOTS;
use dinomo_shared::ErrorCode;

use crate::clock::Clock;
use crate::policy::{LoadPolicy, PolicyAction};
use crate::spawner::KnSpawner;
use crate::store::{DurableStore, LeaseRecord, StoreError, Stored};

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Lease length; a KN renews it every 100 ms (every quarter lease if shorter).
    pub lease: Duration,
    /// Virtual nodes per KN on the hash ring.
    pub vnodes: u32,
}

/// The replicated keys by key.
type ReplicaTable = BTreeMap<Vec<u8>, ReplicaMsg>;

/// Map changes kept for `status`.
const RECONFIGS_KEPT: usize = 16;

/// The most keys replicated at once: each travels in every map (a line of at most
/// [`dinomo_shared::manager_proto::MAX_LINE`] bytes) and holds a cell at the DPM.
pub const MAX_REPLICATED: usize = 64;

/// Longest wait for the leases of an earlier manager's KNs to lapse (a record further
/// ahead comes from a clock that jumped).
pub const MAX_LEFTOVER_LEASE_WAIT: Duration = Duration::from_secs(60);

/// Slack between the manager's clocks and the KNs' monotonic clocks.
pub const LEASE_CLOCK_MARGIN: Duration = Duration::from_millis(50);

/// Why the manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot read the cluster state from the DPM: {0}")]
    Load(StoreError),
    #[error("cannot fence KN {kn} left over from an earlier manager: {source}")]
    Leftover { kn: u16, source: StoreError },
    #[error("cannot free the cells of replicated keys left over from an earlier cluster: {0}")]
    Cells(StoreError),
}

/// Longest lease a KN may claim in `resume` (a bound on time arithmetic, not a policy).
const MAX_LEASE: Duration = Duration::from_secs(600);

/// Who sent a request: the session it came on and the role that session claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Unique per connection for the manager's lifetime.
    pub session: u64,
    pub role: Role,
}

/// Why a KN is leaving the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Left,
    Expired,
}

#[derive(Debug)]
struct KnInfo {
    addr: String,
    lease_epoch: u32,
    expires: Instant,
    joined: bool,
    acked: u64,
    /// Leaving or expired: kept (it may still own slots in the current map) until it is
    /// fenced and the map without it is published, so the map and its KN list change
    /// together.
    gone: Option<Exit>,
    /// A fence of it is under way.
    fencing: bool,
    /// Fenced at the DPM: removed with the next map change.
    fenced: bool,
    /// Its join is being served (the map with it is being stored): it cannot renew until
    /// the reply, so its lease does not run out meanwhile.
    joining: bool,
    /// Asked to leave (`remove_kn`); told so in its next lease reply.
    draining: bool,
    load: Option<LoadReport>,
    /// The session that registered or resumed it: the only one its requests are taken from.
    session: Option<u64>,
    /// Its lease length (a re-adopted KN keeps the longer of its own and this manager's).
    lease: Duration,
    /// Found holding a lease at start, not resumed yet.
    adopting: bool,
    /// The epoch of the map it serves, as it said when it resumed.
    view_epoch: u64,
}

impl KnInfo {
    /// A KN with a lease until `expires`, nothing else known yet.
    fn new(addr: String, lease_epoch: u32, expires: Instant, lease: Duration) -> Self {
        Self {
            addr,
            lease_epoch,
            expires,
            joined: false,
            acked: 0,
            gone: None,
            fencing: false,
            fenced: false,
            joining: false,
            draining: false,
            load: None,
            session: None,
            lease,
            adopting: false,
            view_epoch: 0,
        }
    }

    fn live(&self) -> bool {
        self.joined && self.gone.is_none()
    }
}

#[derive(Debug)]
struct State {
    kns: BTreeMap<u16, KnInfo>,
    /// Ids being registered (their lease is being recorded).
    registering: BTreeSet<u16>,
    /// The last lease epoch handed out per KN id.
    lease_epochs: BTreeMap<u16, u32>,
    map: SlotMap,
    /// The last map every live KN acknowledged.
    settled_map: SlotMap,
    settled: bool,
    /// When the current map was published.
    published: Instant,
    reconfigs: VecDeque<Reconfig>,
    /// A map change that could not be stored yet; retried at every tick.
    pending_republish: Option<String>,
    /// The stored epoch is at least this (a store whose reply was lost may have stored
    /// a map this manager does not know of).
    epoch_floor: u64,
    /// Whether `map` is the map KNs serve. False after a restart with KNs to re-adopt,
    /// until one of them brings the stored map (or none is left to).
    map_known: bool,
    /// The newest map a resuming KN brought that was not the stored one.
    resumed_map: Option<MapMsg>,
    /// Slots that were still moving in a re-adopted map that had not settled: refused by
    /// their new owner until it settles.
    adopted_moving: Vec<bool>,
    /// The replicated keys, published with the map (see [`Manager::replica_step`]).
    replicas: ReplicaTable,
    /// Keys whose owner reported it could not begin their replication, and why.
    replica_refused: BTreeMap<Vec<u8>, String>,
}

impl State {
    fn live(&self, kn: u16) -> bool {
        self.kns.get(&kn).is_some_and(KnInfo::live)
    }

    fn live_ids(&self) -> Vec<u16> {
        self.kns
            .iter()
            .filter(|(_, k)| k.live())
            .map(|(&id, _)| id)
            .collect()
    }

    fn next_epoch(&self) -> u64 {
        self.map.epoch().max(self.epoch_floor).saturating_add(1)
    }

    fn reconfig_mut(&mut self, epoch: u64) -> Option<&mut Reconfig> {
        self.reconfigs.iter_mut().rev().find(|r| r.epoch == epoch)
    }

    /// Settled, and no KN is being fenced or leaving (its slots are about to move).
    fn settled_now(&self) -> bool {
        self.map_known && self.settled && !self.kns.values().any(|k| k.gone.is_some())
    }

    /// Takes `m`, which a re-adopted KN serves, as the current map if it is the stored
    /// one; remembers the newest other one.
    fn adopt_map(&mut self, m: &MapMsg) {
        let stored = self.map.epoch();
        // Only a map over the KNs this manager found holding leases: any other owner is
        // not a map the earlier manager stored.
        let known = |kn: &u16| {
            self.kns
                .get(kn)
                .is_some_and(|k| k.adopting || k.session.is_some())
        };
        if !m.ranges.iter().chain(&m.moving).all(|r| known(&r.2))
            || !m.kns.iter().all(|(kn, _)| known(kn))
        {
            tracing::warn!(
                epoch = m.epoch,
                "a resuming KN brought a map over unknown KNs; ignored"
            );
            return;
        }
        if m.epoch != stored {
            if m.epoch < stored
                && self
                    .resumed_map
                    .as_ref()
                    .map_or(true, |r| r.epoch < m.epoch)
            {
                self.resumed_map = Some(m.clone());
            }
            return;
        }
        self.install_adopted(m, m.settled);
        tracing::info!(
            epoch = m.epoch,
            settled = m.settled,
            "re-adopted the stored map"
        );
    }

    /// Makes `m` the current map, settled (every KN in it had acknowledged it) or with its
    /// moving slots refused until every KN in it acknowledges it.
    fn install_adopted(&mut self, m: &MapMsg, settled: bool) {
        let map = m.slot_map();
        let epoch = map.epoch();
        for (id, k) in self
            .kns
            .iter_mut()
            .filter(|(_, k)| k.adopting || k.session.is_none())
        {
            if let Some((_, addr)) = m.kns.iter().find(|(i, _)| i == id) {
                if k.adopting {
                    k.addr = addr.clone();
                }
            } else if k.adopting {
                // Registered but never in the map: nothing to keep for it.
                k.joined = false;
            }
        }
        for k in self.kns.values_mut().filter(|k| k.joined) {
            k.acked = if settled || k.view_epoch == epoch {
                epoch
            } else {
                0
            };
        }
        self.adopted_moving = if settled {
            Vec::new()
        } else {
            m.moving_slots()
        };
        self.settled_map = map.clone();
        self.map = map;
        self.settled = settled;
        self.map_known = true;
        // The replicated keys come with the map: the KNs that serve them are the ones that
        // know them (see `Manager::replica_step` on why the manager does not store them).
        self.replicas = m
            .replicas
            .iter()
            .filter_map(|r| Some((r.key_bytes()?, r.clone())))
            .collect();
    }

    /// Fits the replicated keys to the map `next` about to be published: a key whose slot
    /// moved gets the slot's new owner (which takes over its cell, or begins or ends its
    /// replication in its place), and KNs not live any more stop being replicas.
    fn fit_replicas(&mut self, next: &SlotMap) {
        let live = self.live_ids();
        for (key, r) in self.replicas.iter_mut() {
            let owner = next.owner(key_slot(key));
            if owner == NO_KN {
                continue;
            }
            let mut kns = vec![owner];
            kns.extend(
                r.kns
                    .iter()
                    .copied()
                    .filter(|kn| *kn != owner && live.contains(kn)),
            );
            if r.owner != owner {
                tracing::info!(key = %r.key, from = r.owner, to = owner, "a replicated key's slot moved: new owner");
            }
            // Ending: only the owner serves it; whoever it is now.
            if r.phase != ReplicaPhase::Serving {
                kns.truncate(1);
            }
            r.owner = owner;
            r.kns = kns;
        }
    }

    /// The KN `kn_id` if `peer` may speak for it under lease `lease_epoch`.
    fn owned(
        &mut self,
        peer: &Peer,
        kn_id: u16,
        lease_epoch: u32,
    ) -> Result<&mut KnInfo, MgrReply> {
        if peer.role != Role::Kn {
            return Err(refuse(format!(
                "only a KN session may speak for KN {kn_id} (this one is {:?})",
                peer.role
            )));
        }
        let Some(k) = self.kns.get_mut(&kn_id).filter(|k| k.gone.is_none()) else {
            return Err(Manager::unknown(kn_id));
        };
        if k.lease_epoch != lease_epoch {
            return Err(refuse(format!(
                "lease epoch {lease_epoch} is not KN {kn_id}'s lease (lease expired?)"
            )));
        }
        if k.session != Some(peer.session) {
            return Err(refuse(format!(
                "KN {kn_id} did not register or resume on this connection"
            )));
        }
        Ok(k)
    }

    fn update_settled(&mut self, now: Instant) {
        let epoch = self.map.epoch();
        let all = self
            .kns
            .values()
            .filter(|k| k.live())
            .all(|k| k.acked >= epoch);
        if all && !self.settled {
            self.settled_map = self.map.clone();
            self.adopted_moving.clear();
            let took = ms(now.saturating_duration_since(self.published));
            if let Some(r) = self.reconfig_mut(epoch) {
                r.settle_ms = Some(took);
            }
            tracing::info!(epoch, settle_ms = took, "cluster map settled");
        }
        self.settled = all;
    }
}

fn refuse(message: String) -> MgrReply {
    MgrReply::Error { message }
}

/// A KN's client address as clients will be sent to it (`-MOVED`): an IP address and a
/// port, neither unspecified.
fn check_kn_addr(addr: &str) -> Result<(), String> {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() || a.port() == 0 => Err(format!(
            "KN address {addr} cannot be reached by clients (unspecified address or port 0)"
        )),
        Ok(_) => Ok(()),
        Err(_) => Err(format!("KN address {addr:?} is not IP:PORT")),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The running manager.
pub struct Manager {
    cfg: ManagerConfig,
    clock: Arc<dyn Clock>,
    store: Mutex<Box<dyn DurableStore>>,
    spawner: Option<Arc<dyn KnSpawner>>,
    /// KN ids the region has lease rows for.
    max_kns: u16,
    /// The lease records found at start that may still be held (fenced by
    /// [`Manager::fence_leftovers`]).
    leftovers: Mutex<Vec<(u16, LeaseRecord)>>,
    leftover_wait: Duration,
    state: Mutex<State>,
    /// One map change at a time, from computing it to publishing it.
    publishing: Mutex<()>,
    policy: Mutex<Option<Box<dyn LoadPolicy>>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("cfg", &self.cfg)
            .field("max_kns", &self.max_kns)
            .finish_non_exhaustive()
    }
}

/// How long a manager starting at wall time `now_ms`, granting leases of `lease`, waits
/// before it fences the KNs `stored` shows holding leases: one lease length of the manager
/// that granted them (whichever is longer), or, for records that do not say it, until
/// their recorded expiry. Zero when no lease may be held.
pub fn leftover_wait(stored: &Stored, now_ms: u64, lease: Duration) -> Duration {
    stored
        .leases
        .iter()
        .filter(|(_, r)| r.is_live())
        .map(|(_, r)| {
            if r.lease_ms > 0 {
                Duration::from_millis(r.lease_ms).max(lease)
            } else {
                Duration::from_millis(r.expires_ms.saturating_sub(now_ms))
            }
        })
        .max()
        .map_or(Duration::ZERO, |w| {
            (w + LEASE_CLOCK_MARGIN).min(MAX_LEFTOVER_LEASE_WAIT)
        })
}

impl Manager {
    /// A manager over `store`: reads the stored map epoch and lease records. KNs of an
    /// earlier manager may still hold leases: wait [`Manager::leftover_wait`], then
    /// [`Manager::fence_leftovers`] before serving.
    pub fn new(
        cfg: ManagerConfig,
        mut store: Box<dyn DurableStore>,
        clock: Arc<dyn Clock>,
        spawner: Option<Arc<dyn KnSpawner>>,
    ) -> Result<Self, ManagerError> {
        let stored = store.load().map_err(ManagerError::Load)?;
        let wait = leftover_wait(&stored, clock.wall_ms(), cfg.lease);
        let now = clock.now();
        let empty = SlotMap::consistent(stored.map_epoch, &[], 1);
        let lease_epochs = stored
            .leases
            .iter()
            .map(|(kn, r)| (*kn, r.lease_epoch))
            .collect();
        // KNs that may hold a lease are kept for re-adoption until the lease of the manager
        // that granted it ran out; ended leases are fenced once more at start (a no-op
        // for a KN that closed its logs).
        let (live, ended): (Vec<_>, Vec<_>) =
            stored.leases.into_iter().partition(|(_, r)| r.is_live());
        let kns: BTreeMap<u16, KnInfo> = live
            .iter()
            .map(|&(kn, r)| {
                let lease = Duration::from_millis(r.lease_ms)
                    .min(MAX_LEASE)
                    .max(cfg.lease);
                let info = KnInfo {
                    joined: true,
                    acked: stored.map_epoch,
                    adopting: true,
                    view_epoch: stored.map_epoch,
                    ..KnInfo::new(String::new(), r.lease_epoch, now + wait, lease)
                };
                (kn, info)
            })
            .collect();
        if !kns.is_empty() {
            tracing::info!(
                kns = ?kns.keys().collect::<Vec<_>>(),
                ?wait,
                "KNs of an earlier manager may hold leases: re-adopting those that resume"
            );
        }
        let map_known = kns.is_empty();
        Ok(Self {
            max_kns: stored.max_kns,
            leftovers: Mutex::new(ended),
            leftover_wait: wait,
            cfg,
            clock,
            store: Mutex::new(store),
            spawner,
            state: Mutex::new(State {
                kns,
                registering: BTreeSet::new(),
                lease_epochs,
                map: empty.clone(),
                settled_map: empty,
                settled: true,
                published: now,
                reconfigs: VecDeque::new(),
                pending_republish: None,
                epoch_floor: stored.map_epoch,
                map_known,
                resumed_map: None,
                adopted_moving: Vec::new(),
                replicas: BTreeMap::new(),
                replica_refused: BTreeMap::new(),
            }),
            publishing: Mutex::new(()),
            policy: Mutex::new(None),
        })
    }

    /// How long KNs of an earlier manager have to resume before they are fenced (see
    /// [`leftover_wait`]).
    pub fn leftover_wait(&self) -> Duration {
        self.leftover_wait
    }

    /// Fences every KN whose lease an earlier manager recorded as ended (a no-op unless it
    /// could not close its logs) and records the lease as ended. KNs that may still hold
    /// a lease are not among them: they are re-adopted or, once their lease lapsed,
    /// fenced by the ticks.
    pub fn fence_leftovers(&self) -> Result<(), ManagerError> {
        let mut left = self.leftovers.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(kn, record)) = left.first() {
            let fenced = self
                .fence_and_end(kn, record.lease_epoch, record.lease_ms)
                .map_err(|source| ManagerError::Leftover { kn, source })?;
            if record.is_live() {
                tracing::info!(
                    kn,
                    logs = fenced.logs,
                    entries = fenced.entries,
                    "fenced a KN of an earlier manager"
                );
            }
            left.remove(0);
        }
        drop(left);
        // No KN may hold a lease: none serves a replicated key, and any cell still active
        // was left by a cluster that is gone (keys no map names any more).
        if self.lock().kns.is_empty() {
            self.sweep_cells().map_err(ManagerError::Cells)?;
        }
        Ok(())
    }

    /// Frees every active cell at the DPM: their keys' newest entries go into the index.
    /// Only while no KN serves any replicated key and every KN that did was fenced (its
    /// logs merged), so nothing merges an older entry of such a key afterwards.
    fn sweep_cells(&self) -> Result<u32, StoreError> {
        let stored = self.store().load()?;
        let mut freed = 0;
        for cell in 0..stored.cells {
            if freed >= stored.active_cells {
                break;
            }
            if self.store().free_cell(cell)? {
                freed += 1;
            }
        }
        if freed > 0 {
            tracing::warn!(
                freed,
                "freed the cells of replicated keys that no KN knows of any more (their \
                 newest versions are in the index)"
            );
        }
        Ok(freed)
    }

    /// Fences `kn` at the DPM, then records its lease as ended (a failure to record it is
    /// only logged: a later manager then waits a lease and fences it again, which does
    /// nothing).
    fn fence_and_end(
        &self,
        kn: u16,
        lease_epoch: u32,
        lease_ms: u64,
    ) -> Result<crate::store::Fenced, StoreError> {
        let fenced = self.store().fence(kn)?;
        let ended = LeaseRecord {
            lease_epoch,
            expires_ms: 0,
            lease_ms,
        };
        if let Err(e) = self.store().store_lease(kn, &ended) {
            tracing::warn!(kn, error = %e, "cannot record the end of a lease");
        }
        Ok(fenced)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self) -> MutexGuard<'_, Box<dyn DurableStore>> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Runs `policy` every period (see [`Manager::policy_actions`]).
    pub fn set_policy(&self, policy: Box<dyn LoadPolicy>) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy);
    }

    /// The policy's decision period, if a policy is set.
    pub fn policy_period(&self) -> Option<Duration> {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| p.period())
    }

    fn lease_ms(&self) -> u64 {
        millis(self.cfg.lease)
    }

    /// Answers one request of a KN or a tool, from `peer`. The administrative requests
    /// (`add_kn`, `remove_kn`, `rebalance`) take a while and are carried out by the service
    /// with the steps below ([`Manager::spawn_kn`], [`Manager::mark_draining`],
    /// [`Manager::rebalance`]); here they get an error.
    pub fn handle(&self, peer: &Peer, req: MgrRequest) -> MgrReply {
        let kn_only = matches!(
            req,
            MgrRequest::Register { .. }
                | MgrRequest::Join { .. }
                | MgrRequest::Renew { .. }
                | MgrRequest::Ack { .. }
                | MgrRequest::Leave { .. }
                | MgrRequest::Resume { .. }
        );
        if kn_only && peer.role != Role::Kn {
            return refuse("only a KN session may send KN requests".into());
        }
        match req {
            MgrRequest::Register { addr, shards } => self.register(peer, addr, shards),
            MgrRequest::Join { kn_id, lease_epoch } => self.join(peer, kn_id, lease_epoch),
            MgrRequest::Renew {
                kn_id,
                lease_epoch,
                load,
            } => self.renew(peer, kn_id, lease_epoch, load),
            MgrRequest::Ack {
                kn_id,
                lease_epoch,
                epoch,
                release_us,
                entries_merged,
                cells,
                refused,
            } => {
                let r = self.ack(peer, kn_id, lease_epoch, epoch, release_us, entries_merged);
                if matches!(r, MgrReply::Lease { .. }) {
                    self.cells_begun(kn_id, &cells, &refused);
                }
                r
            }
            MgrRequest::Resume {
                kn_id,
                lease_epoch,
                addr,
                lease_ms,
                map,
            } => self.resume(peer, kn_id, lease_epoch, addr, lease_ms, map),
            MgrRequest::Map => {
                if !self.lock().map_known {
                    return Self::readopting();
                }
                MgrReply::Map(self.map())
            }
            MgrRequest::Leave { kn_id, lease_epoch } => self.leave(peer, kn_id, lease_epoch),
            MgrRequest::Status if peer.role == Role::Ctl => MgrReply::Status(self.status()),
            MgrRequest::Status => refuse("status is for operator (ctl) sessions".into()),
            MgrRequest::AddKn
            | MgrRequest::RemoveKn { .. }
            | MgrRequest::Rebalance { .. }
            | MgrRequest::Replicate { .. }
            | MgrRequest::Dereplicate { .. } => MgrReply::Error {
                message: "administrative requests are served by the manager's service".into(),
            },
        }
    }

    fn unknown(kn: u16) -> MgrReply {
        MgrReply::Error {
            message: format!("KN {kn} is not registered (lease expired?)"),
        }
    }

    fn readopting() -> MgrReply {
        MgrReply::Retry {
            message: "the manager restarted and is re-adopting the KNs that hold leases; \
                      the map is known once one of them resumes"
                .into(),
        }
    }

    fn lease_reply(&self, st: &State, kn: u16) -> MgrReply {
        let k = st.kns.get(&kn);
        MgrReply::Lease {
            // Until the map is known, a KN is told the epoch it serves, so that it keeps
            // serving it rather than fetching a map the manager does not have.
            epoch: if st.map_known {
                st.map.epoch()
            } else {
                k.map_or(0, |k| k.view_epoch)
            },
            settled: st.settled_now(),
            lease_ms: k.map_or_else(|| self.lease_ms(), |k| millis(k.lease)),
            drain: k.is_some_and(|k| k.draining),
        }
    }

    fn register(&self, peer: &Peer, addr: String, shards: u16) -> MgrReply {
        let _ = shards;
        if let Err(e) = check_kn_addr(&addr) {
            return refuse(e);
        }
        let (kn_id, lease_epoch) = {
            let mut st = self.lock();
            if let Some((&other, _)) = st
                .kns
                .iter()
                .find(|(_, k)| k.gone.is_none() && k.addr == addr)
            {
                // A KN restarted on its old address (its predecessor died) registers once the
                // predecessor's lease lapsed and it was fenced: ask it to try again.
                return MgrReply::Retry {
                    message: format!(
                        "KN {other} already serves at {addr}; a new KN may register there \
                         once that KN's lease lapsed"
                    ),
                };
            }
            let free = (0..self.max_kns)
                .find(|id| !st.kns.contains_key(id) && !st.registering.contains(id));
            let Some(kn_id) = free else {
                return MgrReply::Error {
                    message: format!("all {} KN slots are taken", self.max_kns),
                };
            };
            let epoch = st
                .lease_epochs
                .get(&kn_id)
                .copied()
                .unwrap_or(0)
                .wrapping_add(1)
                .max(1);
            st.registering.insert(kn_id);
            (kn_id, epoch)
        };
        let record = LeaseRecord {
            lease_epoch,
            expires_ms: self.clock.wall_ms().saturating_add(self.lease_ms()),
            lease_ms: self.lease_ms(),
        };
        let stored = self.store().store_lease(kn_id, &record);
        let mut st = self.lock();
        st.registering.remove(&kn_id);
        if let Err(e) = stored {
            return MgrReply::Error {
                message: format!("cannot record the lease at the DPM: {e}"),
            };
        }
        st.lease_epochs.insert(kn_id, lease_epoch);
        let view_epoch = st.map.epoch();
        st.kns.insert(
            kn_id,
            KnInfo {
                session: Some(peer.session),
                view_epoch,
                ..KnInfo::new(
                    addr.clone(),
                    lease_epoch,
                    self.clock.now() + self.cfg.lease,
                    self.cfg.lease,
                )
            },
        );
        tracing::info!(kn_id, %addr, lease_epoch, "KN registered");
        MgrReply::Registered {
            kn_id,
            lease_epoch,
            lease_ms: self.lease_ms(),
        }
    }

    fn join(&self, peer: &Peer, kn_id: u16, lease_epoch: u32) -> MgrReply {
        {
            let mut st = self.lock();
            if !st.map_known {
                return Self::readopting();
            }
            let k = match st.owned(peer, kn_id, lease_epoch) {
                Ok(k) => k,
                Err(r) => return r,
            };
            if k.joined {
                return self.lease_reply(&st, kn_id);
            }
            k.joined = true;
            k.joining = true;
        }
        let published = self.republish(format!("kn {kn_id} joined"));
        // The KN could not renew while it waited for this reply (storing the map takes a
        // round trip to the DPM per frame): its lease counts from now.
        let now = self.clock.now();
        let mut st = self.lock();
        if let Some(k) = st.kns.get_mut(&kn_id) {
            k.joining = false;
            k.expires = k.expires.max(now + k.lease);
            if published.is_err() {
                k.joined = false;
            }
        }
        if let Err(e) = published {
            return MgrReply::Error {
                message: format!("cannot store the map with KN {kn_id} at the DPM: {e}"),
            };
        }
        self.lease_reply(&st, kn_id)
    }

    fn renew(
        &self,
        peer: &Peer,
        kn_id: u16,
        lease_epoch: u32,
        load: Option<LoadReport>,
    ) -> MgrReply {
        let now = self.clock.now();
        let mut st = self.lock();
        let k = match st.owned(peer, kn_id, lease_epoch) {
            Ok(k) => k,
            Err(r) => return r,
        };
        k.expires = now + k.lease;
        if load.is_some() {
            k.load = load;
        }
        self.lease_reply(&st, kn_id)
    }

    /// A KN that holds lease `lease_epoch` speaks on a new session: the session becomes
    /// its own and the lease is renewed; a KN of an earlier manager is re-adopted.
    fn resume(
        &self,
        peer: &Peer,
        kn_id: u16,
        lease_epoch: u32,
        addr: String,
        lease_ms: u64,
        map: Option<dinomo_shared::manager_proto::MapMsg>,
    ) -> MgrReply {
        let now = self.clock.now();
        let mut st = self.lock();
        let Some(k) = st
            .kns
            .get_mut(&kn_id)
            .filter(|k| k.gone.is_none() && k.lease_epoch == lease_epoch)
        else {
            return Self::unknown(kn_id);
        };
        if k.adopting {
            if let Err(e) = check_kn_addr(&addr) {
                return refuse(e);
            }
            // A KN counts its lease with its own length: never expire it sooner.
            k.lease = Duration::from_millis(lease_ms)
                .min(MAX_LEASE)
                .max(self.cfg.lease);
            k.addr = addr;
            k.adopting = false;
            k.view_epoch = map.as_ref().map_or(0, |m| m.epoch);
            tracing::info!(kn_id, lease_epoch, addr = %k.addr, "re-adopted a KN of an earlier manager");
        } else if k.addr != addr {
            return refuse(format!(
                "KN {kn_id} registered at {}, not at {addr}",
                k.addr
            ));
        }
        k.session = Some(peer.session);
        k.expires = k.expires.max(now + k.lease);
        if !st.map_known {
            if let Some(m) = map {
                st.adopt_map(&m);
            }
        }
        self.lease_reply(&st, kn_id)
    }

    fn ack(
        &self,
        peer: &Peer,
        kn_id: u16,
        lease_epoch: u32,
        epoch: u64,
        release_us: u64,
        entries_merged: u64,
    ) -> MgrReply {
        let now = self.clock.now();
        let mut st = self.lock();
        let (current, known) = (st.map.epoch(), st.map_known);
        let k = match st.owned(peer, kn_id, lease_epoch) {
            Ok(k) => k,
            Err(r) => return r,
        };
        // Only a map this manager published can be acknowledged: a higher epoch would
        // settle a map before its old owners released their slots.
        if !known || epoch > current {
            return MgrReply::Error {
                message: format!("epoch {epoch} was not published (the current map is {current})"),
            };
        }
        k.acked = k.acked.max(epoch);
        if let Some(r) = st.reconfig_mut(epoch) {
            r.max_release_ms = r.max_release_ms.max(release_us as f64 / 1e3);
            r.entries_merged = r.entries_merged.saturating_add(entries_merged);
        }
        st.update_settled(now);
        self.lease_reply(&st, kn_id)
    }

    /// The KN stopped acknowledging writes and closed its logs, then sent this: it is
    /// fenced (a no-op then) and removed with the next map.
    fn leave(&self, peer: &Peer, kn_id: u16, lease_epoch: u32) -> MgrReply {
        {
            let mut st = self.lock();
            let k = match st.owned(peer, kn_id, lease_epoch) {
                Ok(k) => k,
                Err(r) => return r,
            };
            k.gone = Some(Exit::Left);
        }
        // The KN closed its logs before leaving; fencing it anyway is a cheap no-op that
        // also covers a KN that could not close them. A fence that fails is retried by
        // the ticks; the KN is done either way.
        self.retire_gone();
        tracing::info!(kn_id, "KN left");
        MgrReply::Ok
    }

    /// The current map as KNs and clients see it.
    pub fn map(&self) -> MapMsg {
        let st = self.lock();
        let moving = (0..SLOTS).map(|s| {
            let (new, old) = (st.map.owner(s), st.settled_map.owner(s));
            let adopted = st.adopted_moving.get(usize::from(s)).copied() == Some(true);
            if !st.settled && (adopted || (new != old && old != NO_KN && st.live(old))) {
                new
            } else {
                NO_KN
            }
        });
        MapMsg {
            epoch: st.map.epoch(),
            settled: st.settled_now(),
            kns: st
                .kns
                .iter()
                .filter(|(_, k)| k.joined)
                .map(|(&id, k)| (id, k.addr.clone()))
                .collect(),
            ranges: ranges_of(st.map.owners().iter().copied()),
            moving: ranges_of(moving),
            replicas: st.replicas.values().cloned().collect(),
        }
    }

    /// The reply to `status`.
    pub fn status(&self) -> StatusMsg {
        let spawned = self.spawner.as_ref().map_or_else(Vec::new, |s| s.spawned());
        let policy = self
            .policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let st = self.lock();
        let now = self.clock.now();
        StatusMsg {
            epoch: st.map.epoch(),
            settled: st.settled_now(),
            kns: st
                .kns
                .iter()
                .filter(|(_, k)| k.gone.is_none())
                .map(|(&id, k)| KnStatus {
                    kn_id: id,
                    addr: k.addr.clone(),
                    lease_ms_left: millis(k.expires.saturating_duration_since(now)),
                    joined: k.joined,
                    slots: st.map.slots_of(id),
                    acked_epoch: k.acked,
                    draining: k.draining,
                    spawned: spawned.contains(&id),
                    load: k.load.clone(),
                })
                .collect(),
            reconfigs: st.reconfigs.iter().cloned().collect(),
            can_spawn: self.spawner.is_some(),
            policy,
            replicas: st.replicas.values().cloned().collect(),
        }
    }

    /// Computes, stores and publishes a new map over the joined live KNs.
    fn republish(&self, reason: String) -> Result<(), StoreError> {
        let _one = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let next = {
            let mut st = self.lock();
            if !st.map_known {
                // Publishing over a map the KNs serve but this manager does not know could
                // give their slots to others: wait until re-adoption ends.
                st.pending_republish = Some(reason);
                return Ok(());
            }
            SlotMap::consistent(st.next_epoch(), &st.live_ids(), self.cfg.vnodes)
        };
        let r = self.install(next, reason.clone());
        let mut st = self.lock();
        st.pending_republish = r.is_err().then_some(reason);
        r
    }

    /// Stores `next` at the DPM, then publishes it and starts its record in the
    /// reconfiguration history. The caller holds `publishing`.
    fn install(&self, next: SlotMap, reason: String) -> Result<(), StoreError> {
        self.install_with(next, reason, None)
    }

    /// [`Manager::install`], applying `change` to the replicated keys as the map is
    /// published.
    fn install_with(
        &self,
        next: SlotMap,
        reason: String,
        change: Option<&dyn Fn(&mut ReplicaTable)>,
    ) -> Result<(), StoreError> {
        let stored = self.store().store_map(&next);
        if let Err(e) = stored {
            if matches!(
                e,
                StoreError::Refused {
                    code: ErrorCode::StaleEpoch,
                    ..
                }
            ) {
                // The DPM holds a newer map than this manager knows (a store whose reply
                // was lost): publish above it next time.
                if let Ok(stored) = self.store().load() {
                    let mut st = self.lock();
                    st.epoch_floor = st.epoch_floor.max(stored.map_epoch);
                }
            }
            tracing::warn!(epoch = next.epoch(), %reason, error = %e, "cannot store the new map");
            return Err(e);
        }
        let now = self.clock.now();
        let wall = self.clock.wall_ms();
        let mut st = self.lock();
        let epoch = next.epoch();
        let slots_moved = next.moved_slots(&st.map);
        if let Some(change) = change {
            change(&mut st.replicas);
        }
        st.fit_replicas(&next);
        st.map = next;
        // KNs that were fenced leave the KN list with the map that no longer has them.
        st.kns.retain(|_, k| !k.fenced);
        st.published = now;
        st.settled = false;
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
            published_ms: wall,
            ..Reconfig::default()
        });
        st.update_settled(now);
        Ok(())
    }

    /// One round of upkeep: expires leases, fences and removes KNs that are gone, stores a
    /// map change that failed before, forgets exited children.
    pub fn tick(&self) {
        self.expire();
        self.end_adoption();
        self.retire_gone();
        // Again: with no KN back, adoption ends only once they are fenced (just above).
        self.end_adoption();
        let pending = self.lock().pending_republish.clone();
        if let Some(reason) = pending {
            let _ = self.republish(reason);
        }
        if let Some(s) = &self.spawner {
            s.reap();
        }
    }

    /// This process was not scheduled for `by` (renewals may be waiting unread, so a lease
    /// that looks expired may not be): extends every lease by the pause instead of
    /// fencing live KNs.
    pub fn extend_leases(&self, by: Duration) {
        let mut st = self.lock();
        for k in st.kns.values_mut() {
            k.expires = k.expires.checked_add(by).unwrap_or(k.expires);
        }
        tracing::warn!(pause_ms = millis(by), "manager paused; leases extended");
    }

    /// Once no KN of an earlier manager is left to resume and none brought the stored map,
    /// takes the newest map one brought (its slots moving until every KN in it
    /// acknowledges a new map), so that the map is known again and KNs that lapsed can be
    /// fenced and their slots moved.
    fn end_adoption(&self) {
        let mut st = self.lock();
        if st.map_known || st.kns.values().any(|k| k.adopting && k.gone.is_none()) {
            return;
        }
        if st.resumed_map.is_none() {
            // No KN came back: the replicated keys (which travel with the map) are known
            // to nobody, but their cells may be active. Once every KN of the earlier
            // manager is fenced, free them, before any KN serves a slot.
            if st.kns.values().any(|k| k.adopting && !k.fenced) {
                return;
            }
            drop(st);
            if let Err(e) = self.sweep_cells() {
                tracing::error!(error = %e, "cannot free left-over cells; retrying");
                return;
            }
            st = self.lock();
            if st.map_known {
                return;
            }
        }
        let stored = st.map.epoch();
        match st.resumed_map.take() {
            Some(m) => {
                tracing::warn!(
                    stored,
                    epoch = m.epoch,
                    "no re-adopted KN served the stored map: taking the newest one they served"
                );
                st.install_adopted(&m, false);
                st.pending_republish = Some("re-adopted KNs".into());
            }
            None => {
                let empty = MapMsg {
                    epoch: stored,
                    ..MapMsg::empty()
                };
                st.install_adopted(&empty, true);
            }
        }
    }

    /// Marks every KN whose lease has expired as gone.
    fn expire(&self) {
        let now = self.clock.now();
        let mut st = self.lock();
        for (&id, k) in st.kns.iter_mut() {
            if k.gone.is_none() && !k.joining && k.expires <= now {
                tracing::warn!(kn = id, "lease expired");
                k.gone = Some(Exit::Expired);
            }
        }
    }

    /// Fences every gone KN at the DPM, records its lease as ended, then stores and
    /// publishes the map without it (which removes it from the KN list). The slots of a KN
    /// change hands only after its fence succeeded; one that fails is tried again at the
    /// next call, and so is a map that could not be stored.
    fn retire_gone(&self) {
        let todo: Vec<(u16, u32, Exit)> = {
            let mut st = self.lock();
            st.kns
                .iter_mut()
                .filter(|(_, k)| !k.fencing && !k.fenced)
                .filter_map(|(&id, k)| {
                    let exit = k.gone?;
                    k.fencing = true;
                    Some((id, k.lease_epoch, exit))
                })
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let mut done = Vec::new();
        for (kn, lease_epoch, exit) in todo {
            match self.fence_and_end(kn, lease_epoch, self.lease_ms()) {
                Ok(f) => {
                    if exit == Exit::Expired {
                        tracing::warn!(
                            kn,
                            logs = f.logs,
                            entries = f.entries,
                            "lease expired: KN fenced"
                        );
                    }
                    done.push((kn, exit));
                }
                Err(e) => tracing::error!(kn, error = %e, "cannot fence KN; retrying"),
            }
        }
        let reasons: Vec<String> = {
            let mut st = self.lock();
            for k in st.kns.values_mut() {
                k.fencing = false;
            }
            let mut reasons = Vec::new();
            for (kn, exit) in done {
                let Some(k) = st.kns.get_mut(&kn) else {
                    continue;
                };
                k.fenced = true;
                if k.joined {
                    reasons.push(match exit {
                        Exit::Left => format!("kn {kn} left"),
                        Exit::Expired => format!("kn {kn} fenced (lease expired)"),
                    });
                } else {
                    // Never in a map: nothing to publish.
                    st.kns.remove(&kn);
                }
            }
            reasons
        };
        if !reasons.is_empty() {
            let _ = self.republish(reasons.join(", "));
        }
    }

    // ----- administrative steps (the service waits between them) -----

    /// Whether this manager can start KNs.
    pub fn can_spawn(&self) -> bool {
        self.spawner.is_some()
    }

    /// Starts a KN (through the spawner) that registers with the manager at `manager`;
    /// returns its id and address once it serves.
    pub fn spawn_kn(&self, manager: std::net::SocketAddr) -> Result<(u16, String), String> {
        let Some(s) = &self.spawner else {
            return Err(
                "this manager cannot start KNs: it was started without --kn-exe \
                        (`dinomo up` passes it)"
                    .into(),
            );
        };
        let (kn, addr) = s.spawn(manager)?;
        tracing::info!(kn_id = kn, %addr, "started a KN");
        Ok((kn, addr))
    }

    /// Whether KN `kn` is in the current map, has installed it, and the map settled.
    pub fn kn_serving(&self, kn: u16) -> bool {
        let st = self.lock();
        st.kns
            .get(&kn)
            .is_some_and(|k| k.live() && k.acked >= st.map.epoch())
            && st.settled_now()
    }

    /// Whether KN `kn` is registered (and not yet removed).
    pub fn has_kn(&self, kn: u16) -> bool {
        self.lock().kns.contains_key(&kn)
    }

    /// Settled, and no KN is leaving.
    pub fn is_settled(&self) -> bool {
        self.lock().settled_now()
    }

    /// The current map's epoch.
    pub fn epoch(&self) -> u64 {
        self.lock().map.epoch()
    }

    /// The record of the map change to `epoch`, if it is still kept.
    pub fn reconfig(&self, epoch: u64) -> Option<Reconfig> {
        self.lock().reconfig_mut(epoch).cloned()
    }

    /// The last map change that moved KN `kn` out of the map.
    pub fn departure_of(&self, kn: u16) -> Option<Reconfig> {
        let st = self.lock();
        let (left, fenced) = (format!("kn {kn} left"), format!("kn {kn} fenced"));
        st.reconfigs
            .iter()
            .rev()
            .find(|r| r.reason.contains(&left) || r.reason.contains(&fenced))
            .cloned()
    }

    /// Asks KN `kn` to leave (told in its next lease reply); it then leaves by itself.
    pub fn mark_draining(&self, kn: u16) -> Result<(), String> {
        let mut st = self.lock();
        let live = st.live_ids();
        let others = st
            .kns
            .iter()
            .filter(|(&id, k)| id != kn && k.live() && !k.draining)
            .count();
        let Some(k) = st.kns.get_mut(&kn).filter(|k| k.gone.is_none()) else {
            return Err(format!("unknown KN {kn} (live KNs: {live:?})"));
        };
        if k.joined && others == 0 {
            return Err(format!(
                "KN {kn} is the last KN that is not leaving; it cannot be removed"
            ));
        }
        k.draining = true;
        tracing::info!(kn, "draining KN");
        Ok(())
    }

    /// Recomputes the map over the live KNs, or moves `slots` to `to`; stores and
    /// publishes it. `Ok(None)`: nothing would move. Otherwise the new epoch.
    pub fn rebalance(
        &self,
        slots: Option<(u16, u16)>,
        to: Option<u16>,
    ) -> Result<Option<u64>, String> {
        let _one = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let (next, reason) = {
            let st = self.lock();
            if !st.settled_now() {
                return Err(format!(
                    "the map (epoch {}) is still settling; try again",
                    st.map.epoch()
                ));
            }
            let epoch = st.next_epoch();
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
            if next.moved_slots(&st.map) == 0 {
                return Ok(None);
            }
            (next, reason)
        };
        let epoch = next.epoch();
        self.install(next, reason)
            .map_err(|e| format!("cannot store the new map at the DPM: {e}"))?;
        Ok(Some(epoch))
    }

    /// Whether the map of `epoch` settled or was superseded.
    pub fn settled_or_superseded(&self, epoch: u64) -> bool {
        let st = self.lock();
        st.map.epoch() != epoch || st.settled
    }

    /// One round of the load policy: the latest report of every live KN in, actions out.
    /// Nothing until every such KN has reported.
    pub fn policy_actions(&self) -> Vec<PolicyAction> {
        let (loads, replicated): (Vec<(u16, LoadReport)>, Vec<Vec<u8>>) = {
            let st = self.lock();
            let live: Vec<_> = st
                .kns
                .iter()
                .filter(|(_, k)| k.live() && !k.draining)
                .collect();
            if live.iter().any(|(_, k)| k.load.is_none()) {
                return Vec::new();
            }
            let loads = live
                .into_iter()
                .filter_map(|(&id, k)| k.load.clone().map(|l| (id, l)))
                .collect();
            (loads, st.replicas.keys().cloned().collect())
        };
        let now = self.clock.now();
        let mut p = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        match p.as_mut() {
            Some(p) => p.decide(now, &loads, &replicated),
            None => Vec::new(),
        }
    }

    // ----- replication of hot keys (the service waits between the steps) -----

    /// The owner's `ack` names the cells of the keys whose replication it began, and the
    /// keys whose replication it could not begin.
    fn cells_begun(&self, kn: u16, cells: &[(String, u32)], refused: &[(String, String)]) {
        if cells.is_empty() && refused.is_empty() {
            return;
        }
        let mut st = self.lock();
        for (hex, why) in refused {
            let Some(key) = key_from_hex(hex) else {
                continue;
            };
            let begun = st
                .replicas
                .get(&key)
                .is_some_and(|r| r.phase == ReplicaPhase::Begin && r.owner == kn);
            if begun {
                tracing::warn!(key = %hex, kn, %why, "the owner could not begin a replication");
                st.replica_refused
                    .insert(key, format!("KN {kn} could not begin it: {why}"));
            }
        }
        for (hex, cell) in cells {
            let Some(key) = key_from_hex(hex) else {
                continue;
            };
            if let Some(r) = st.replicas.get_mut(&key) {
                if r.phase == ReplicaPhase::Begin && r.owner == kn && r.cell.is_none() {
                    tracing::info!(key = %r.key, kn, cell, "replicated key has its cell");
                    r.cell = Some(*cell);
                }
            }
        }
    }

    /// Why the owner could not begin replicating `key` (since its `begin` step).
    pub fn replica_refused(&self, key: &[u8]) -> Option<String> {
        self.lock().replica_refused.get(key).cloned()
    }

    /// The replicated keys.
    pub fn replicas(&self) -> Vec<ReplicaMsg> {
        self.lock().replicas.values().cloned().collect()
    }

    /// The replication of `key` as the current map lists it.
    pub fn replica(&self, key: &[u8]) -> Option<ReplicaMsg> {
        self.lock().replicas.get(key).cloned()
    }

    /// Takes `key` one step further and publishes it as a map of its own (the same slots,
    /// the next epoch); returns that epoch. The caller waits until it settled before the
    /// next step, so every live KN has carried out this one:
    /// - [`ReplicaStep::Begin`]: the key (not replicated yet) is listed in phase `begin`
    ///   with its owner alone; the owner allocates its cell and reports it in its `ack`;
    /// - [`ReplicaStep::Serve`]: the key (with its cell) is served by every live KN that is
    ///   not leaving;
    /// - [`ReplicaStep::Ending`]: only its owner serves it (the others published and merged
    ///   their writes of it before acknowledging);
    /// - [`ReplicaStep::End`]: the owner frees the cell (the DPM puts the key's newest
    ///   entry in the index);
    /// - [`ReplicaStep::Remove`]: the key is not listed any more.
    ///
    /// The set is not stored at the DPM: it travels with the map, and a restarted manager
    /// learns it with the map from the first KN that resumes with the stored epoch (the
    /// KNs that serve the keys know them). What is durable is each key's cell, the DPM's
    /// authority for its newest version while it is replicated.
    pub fn replica_step(&self, key: &[u8], step: ReplicaStep) -> Result<u64, String> {
        let _one = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let (next, entry) = {
            let st = self.lock();
            if !st.settled_now() {
                return Err(format!(
                    "the map (epoch {}) is still settling; try again",
                    st.map.epoch()
                ));
            }
            let cur = st.replicas.get(key);
            let entry = match (step, cur) {
                (ReplicaStep::Begin, None) => {
                    if st.replicas.len() >= MAX_REPLICATED {
                        return Err(format!(
                            "{MAX_REPLICATED} keys are replicated already (the most the map \
                             carries); dereplicate one first"
                        ));
                    }
                    if key.is_empty() || key.len() > MAX_KEY_LEN {
                        return Err(format!(
                            "a key of {} bytes cannot be replicated (1..={MAX_KEY_LEN})",
                            key.len()
                        ));
                    }
                    let owner = st.map.owner(key_slot(key));
                    if !st.live(owner) {
                        return Err("the key's slot has no live owner".into());
                    }
                    let serving = st.kns.values().filter(|k| k.live() && !k.draining).count();
                    if serving < 2 {
                        // Through its cell a key costs a round trip per read that its
                        // owner's cache would save: worth it only to spread its load.
                        return Err("replicating a key needs at least two KNs".into());
                    }
                    Some(ReplicaMsg {
                        key: key_hex(key),
                        owner,
                        cell: None,
                        kns: vec![owner],
                        phase: ReplicaPhase::Begin,
                    })
                }
                (ReplicaStep::Begin, Some(_)) => {
                    return Err("the key is replicated already".into());
                }
                (_, None) => return Err("the key is not replicated".into()),
                (ReplicaStep::Serve, Some(r)) => {
                    if r.phase != ReplicaPhase::Begin || r.cell.is_none() {
                        return Err(format!(
                            "the key cannot be served by replicas from phase {:?} (cell {:?})",
                            r.phase, r.cell
                        ));
                    }
                    let mut kns = vec![r.owner];
                    kns.extend(
                        st.kns
                            .iter()
                            .filter(|(&id, k)| id != r.owner && k.live() && !k.draining)
                            .map(|(&id, _)| id),
                    );
                    Some(ReplicaMsg {
                        kns,
                        phase: ReplicaPhase::Serving,
                        ..r.clone()
                    })
                }
                (ReplicaStep::Ending, Some(r)) => Some(ReplicaMsg {
                    kns: vec![r.owner],
                    phase: ReplicaPhase::Ending,
                    ..r.clone()
                }),
                (ReplicaStep::End, Some(r)) => Some(ReplicaMsg {
                    kns: vec![r.owner],
                    phase: ReplicaPhase::End,
                    ..r.clone()
                }),
                (ReplicaStep::Remove, Some(_)) => None,
            };
            let Some(next) = SlotMap::from_owners(st.next_epoch(), st.map.owners().to_vec()) else {
                return Err("cannot build the map".into());
            };
            (next, entry)
        };
        let epoch = next.epoch();
        let reason = format!("{step:?} replication of {}", key_hex(key)).to_lowercase();
        if step == ReplicaStep::Begin {
            self.lock().replica_refused.remove(key);
        }
        let change = |t: &mut ReplicaTable| {
            match &entry {
                Some(e) => {
                    // A cell the owner reported meanwhile is kept.
                    let cell = e.cell.or_else(|| t.get(key).and_then(|r| r.cell));
                    t.insert(key.to_vec(), ReplicaMsg { cell, ..e.clone() });
                }
                None => {
                    t.remove(key);
                }
            }
        };
        self.install_with(next, reason, Some(&change))
            .map_err(|e| format!("cannot store the new map at the DPM: {e}"))?;
        Ok(epoch)
    }
}

/// One step of [`Manager::replica_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaStep {
    Begin,
    Serve,
    Ending,
    End,
    Remove,
}

#[cfg(test)]
mod tests;
