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
//! | `renew` | `kn_id`, `lease_epoch` | `lease`: `epoch` (current map), `settled`, `lease_ms` |
//! | `ack` | `kn_id`, `epoch` | `lease` |
//! | `map` | — | `map`: `epoch`, `settled`, `kns` (`[id, addr]`), `ranges` and `moving` (`[first, last, kn]`) |
//! | `leave` | `kn_id` | `ok` |
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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dinomo_hw::fabric::{default_ctl_path, ControlClient};
use dinomo_hw::region_file::{FilePersist, RegionFile};
use dinomo_hw::Pmem;
use dinomo_shared::control::{ClusterMapHeader, KnLease, CLUSTER_MAP_BYTES, NO_KN};
use dinomo_shared::geometry::Geometry;
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::slot::SLOTS;
use host_kn::SlotMap;
use serde::{Deserialize, Serialize};

/// A request to the manager.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MgrRequest {
    Register { addr: String, shards: u16 },
    Join { kn_id: u16 },
    Renew { kn_id: u16, lease_epoch: u32 },
    Ack { kn_id: u16, epoch: u64 },
    Map,
    Leave { kn_id: u16 },
}

/// A reply of the manager.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
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
    },
    Map(MapMsg),
    Ok,
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
    /// Lease length; a KN renews it every quarter of it.
    pub lease: Duration,
    /// Virtual nodes per KN on the hash ring.
    pub vnodes: u32,
    /// How long to wait for the DPM to come up.
    pub connect_timeout: Duration,
}

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
}

#[derive(Debug)]
struct State {
    kns: BTreeMap<u16, KnInfo>,
    map: SlotMap,
    /// The last map every live KN acknowledged.
    settled_map: SlotMap,
    settled: bool,
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

    fn fence(&self, kn: u16) -> Result<(u32, u64), String> {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        match c.call(
            &Request::FenceKn { kn_id: kn as u32 },
            Duration::from_secs(30),
        ) {
            Ok(Ok(Response::Fenced { logs, entries })) => Ok((logs, entries)),
            Ok(Ok(r)) => Err(format!("unexpected reply {r:?}")),
            Ok(Err(code)) => Err(format!("DPM refused: {code:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A running manager.
#[derive(Debug)]
pub struct Manager {
    cfg: ManagerConfig,
    dpm: Dpm,
    state: Mutex<State>,
    addr: SocketAddr,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Manager {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address the manager listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis() as u64
    }

    /// Computes, stores and publishes a new map over the joined live KNs.
    fn republish(&self, st: &mut State) {
        let ids: Vec<u16> = st
            .kns
            .iter()
            .filter(|(_, k)| k.joined && !k.gone)
            .map(|(&id, _)| id)
            .collect();
        let epoch = st.map.epoch() + 1;
        st.map = SlotMap::consistent(epoch, &ids, self.cfg.vnodes);
        self.dpm.store_map(&st.map);
        self.update_settled(st);
        tracing::info!(epoch, kns = ?ids, "published cluster map");
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
            tracing::info!(epoch, "cluster map settled");
        }
        st.settled = all;
    }

    /// Settled, and no KN is being fenced or leaving (its slots are about to move).
    fn settled(st: &State) -> bool {
        st.settled && !st.kns.values().any(|k| k.gone)
    }

    fn map_msg(&self, st: &State) -> MapMsg {
        let live = |kn: u16| st.kns.get(&kn).is_some_and(|k| k.joined && !k.gone);
        let moving = (0..SLOTS).map(|s| {
            let (new, old) = (st.map.owner(s), st.settled_map.owner(s));
            if !st.settled && new != old && old != NO_KN && live(old) {
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

    fn lease_reply(&self, st: &State) -> MgrReply {
        MgrReply::Lease {
            epoch: st.map.epoch(),
            settled: Self::settled(st),
            lease_ms: self.lease_ms(),
        }
    }

    /// Answers one request.
    pub fn handle(&self, req: MgrRequest) -> MgrReply {
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
                    self.republish(&mut st);
                }
                self.lease_reply(&st)
            }
            MgrRequest::Renew { kn_id, lease_epoch } => {
                let Some(k) = st
                    .kns
                    .get_mut(&kn_id)
                    .filter(|k| k.lease_epoch == lease_epoch && !k.gone)
                else {
                    return unknown(kn_id);
                };
                k.expires = Instant::now() + self.cfg.lease;
                self.dpm
                    .store_lease(kn_id, lease_epoch, now_ms() + self.lease_ms());
                self.lease_reply(&st)
            }
            MgrRequest::Ack { kn_id, epoch } => {
                let Some(k) = st.kns.get_mut(&kn_id).filter(|k| !k.gone) else {
                    return unknown(kn_id);
                };
                k.acked = k.acked.max(epoch);
                self.update_settled(&mut st);
                self.lease_reply(&st)
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
                    self.republish(&mut st);
                }
                tracing::info!(kn_id, "KN left");
                MgrReply::Ok
            }
        }
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
        if expired.iter().any(|&(_, _, joined)| joined) {
            self.republish(&mut st);
        }
    }
}

/// Starts the manager: connects to the DPM, fences KNs left over from an earlier run,
/// and listens. Returns once listening; `serve` runs it.
pub fn start(cfg: ManagerConfig) -> Result<(Arc<Manager>, TcpListener), ManagerError> {
    let dpm = Dpm::connect(&cfg.region, cfg.connect_timeout)?;
    // KNs of an earlier run of the cluster are gone: merge whatever they left.
    let old = dpm.header();
    for kn in 0..(dpm.geo.max_kns.min(NO_KN as u32) as u16) {
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
        }),
        addr,
    };
    Ok((Arc::new(m), listener))
}

/// Serves KNs until `stop` is set.
pub fn serve(m: &Arc<Manager>, listener: TcpListener, stop: &AtomicBool) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let tick = (m.cfg.lease / 10).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut last_check = Instant::now();
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
            last_check = Instant::now();
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
                lease_epoch: 5
            }
        );
    }
}
