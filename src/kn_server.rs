//! A KVS node as a process (`dinomo kn`): attaches to the DPM over the shm fabric,
//! registers with the cluster manager, keeps its lease, follows the cluster map, and
//! serves clients over the Redis protocol (RESP2/RESP3) with tokio.
//!
//! A request goes from its connection task straight to the owner shard's queue (no lock
//! on the way: each connection keeps its own copy of the current view and reloads it only
//! when a version counter moves); the shard answers through a callback that completes a
//! oneshot channel. Keys whose slot another KN owns get `-MOVED slot host:port`; slots that
//! are still moving to this KN, and every slot once the lease could have lapsed, get
//! `-TRYAGAIN`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dinomo_hw::fabric::nic::NicProfile;
use dinomo_hw::fabric::{default_ctl_path, ShmFabric};
use dinomo_hw::region_file::{FilePersist, RegionFile};
use dinomo_shared::entry::{ENTRY_HEADER_SIZE, MAX_KEY_LEN, MAX_VALUE_LEN};
use dinomo_shared::slot::{key_slot, SLOTS};
use host_kn::dac::DacConfig;
use host_kn::ownership::shard_of;
use host_kn::shard::{LeaseGate, Msg, ReplyFn, Request};
use host_kn::{Kn, KvError, ShardConfig, ShardStats, SlotMap};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::latency::LatencyHist;
use crate::manager::{LoadReport, MapMsg, MgrClient, MgrReply, MgrRequest};
use crate::resp::{parse_command, Limits, Out, Proto};

/// How a KN process runs.
#[derive(Clone, Debug)]
pub struct KnConfig {
    /// Region file of the DPM (shm fabric); the control file is derived from it.
    pub region: PathBuf,
    /// Client address (port 0: any free port; the bound address is registered).
    pub listen: SocketAddr,
    /// Manager address.
    pub manager: String,
    /// Shards (threads with their own fabric connection, log and cache).
    pub threads: u16,
    /// Cache bytes for the whole KN.
    pub cache_bytes: u64,
    /// Threads serving client connections.
    pub io_threads: usize,
    /// Group-commit bound.
    pub flush_bound: Duration,
}

impl KnConfig {
    pub fn new(region: PathBuf, listen: SocketAddr, manager: String) -> Self {
        Self {
            region,
            listen,
            manager,
            threads: 2,
            cache_bytes: 64 << 20,
            io_threads: 2,
            flush_bound: Duration::from_micros(100),
        }
    }
}

/// Why a KN stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum KnServerError {
    #[error("cannot open the region: {0}")]
    Region(String),
    #[error("manager: {0}")]
    Manager(String),
    #[error("KVS node: {0}")]
    Kn(#[from] KvError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the lease was lost: the manager fenced this KN")]
    Fenced,
}

/// What this KN believes about the cluster.
#[derive(Debug)]
struct View {
    msg: MapMsg,
    map: Arc<SlotMap>,
    moving: Vec<bool>,
    addrs: HashMap<u16, String>,
}

impl View {
    fn new(msg: MapMsg) -> Self {
        Self {
            map: Arc::new(msg.slot_map()),
            moving: msg.moving_slots(),
            addrs: msg.kns.iter().cloned().collect(),
            msg,
        }
    }
}

#[derive(Debug)]
struct Shared {
    kn_id: u16,
    addr: String,
    shards: Vec<Sender<Msg>>,
    view: RwLock<Arc<View>>,
    version: AtomicU64,
    /// The lease, shared with the shards (they check it before every flush).
    lease: Arc<LeaseGate>,
    max_value: usize,
    limits: Limits,
    fenced: AtomicBool,
    /// The manager asked this KN to leave (`remove_kn`).
    drain: AtomicBool,
    /// Latency of requests in the connection tasks, drained at every renewal.
    latency: LatencyHist,
    /// Hands each connection its histogram stripe.
    conns: AtomicU64,
    /// The epoch of the last map every shard released slots for.
    released: AtomicU64,
    lease_epoch: u32,
    lease_len: Duration,
}

impl Shared {
    fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }
    fn set_view(&self, v: View) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
        self.version.fetch_add(1, Ordering::AcqRel);
    }
    fn lease_ok(&self) -> bool {
        self.lease.is_valid()
    }
    fn stats(&self) -> ShardStats {
        let mut total = ShardStats::default();
        for tx in &self.shards {
            let (stx, srx) = mpsc::channel();
            if tx.send(Msg::Stats(stx)).is_ok() {
                if let Ok(s) = srx.recv_timeout(Duration::from_secs(5)) {
                    total.add(&s);
                }
            }
        }
        total
    }
}

/// A 40-hex-digit node id, as Redis Cluster expects.
pub fn node_id(kn: u16) -> String {
    format!("{:040x}", 0xd1_0000_0000u64 + kn as u64)
}

/// Runs a KN until `stop` is set (then leaves the cluster cleanly) or its lease is lost.
/// `on_ready` gets the KN id and the bound client address once it serves.
pub fn run(
    cfg: &KnConfig,
    stop: &AtomicBool,
    on_ready: impl FnOnce(u16, SocketAddr),
) -> Result<(), KnServerError> {
    let file = RegionFile::open(&cfg.region).map_err(|e| KnServerError::Region(e.to_string()))?;
    let geo = dpm_fw::region::read_geometry(&file.pmem())
        .map_err(|e| KnServerError::Region(e.to_string()))?;
    drop(file);
    let listener = std::net::TcpListener::bind(cfg.listen)?;
    let addr = listener.local_addr()?;
    let mgr_err = |e: std::io::Error| KnServerError::Manager(e.to_string());
    let mut mgr = MgrClient::connect(&cfg.manager, Duration::from_secs(20)).map_err(mgr_err)?;
    let shards = cfg.threads.max(1);
    let (kn_id, lease_epoch, lease_ms) = match mgr
        .call(&MgrRequest::Register {
            addr: addr.to_string(),
            shards,
        })
        .map_err(mgr_err)?
    {
        MgrReply::Registered {
            kn_id,
            lease_epoch,
            lease_ms,
        } => (kn_id, lease_epoch, lease_ms),
        other => return Err(KnServerError::Manager(format!("{other:?}"))),
    };
    let registered_at = Instant::now();
    let lease = Duration::from_millis(lease_ms);
    // A flush waits for a late renewal only until the manager could expire the lease.
    let gate = Arc::new(LeaseGate::new(lease / 4));

    let max_entry = geo.max_entry_len() as usize;
    let batch_bytes = 64 << 10;
    let staging = max_entry
        .min(MAX_VALUE_LEN + MAX_KEY_LEN + 4096)
        .max(batch_bytes);
    let max_value =
        MAX_VALUE_LEN.min(staging.min(max_entry) - ENTRY_HEADER_SIZE - MAX_KEY_LEN) & !7;
    let configs = (0..shards)
        .map(|s| {
            let mut c = ShardConfig::new(
                kn_id,
                s,
                shards,
                DacConfig {
                    budget_bytes: cfg.cache_bytes / shards as u64,
                    ..DacConfig::default()
                },
            );
            c.lease_epoch = lease_epoch;
            c.lease = Some(Arc::clone(&gate));
            c.staging_bytes = staging;
            c.flush_bound = cfg.flush_bound;
            c
        })
        .collect();
    let (region, ctl) = (cfg.region.clone(), default_ctl_path(&cfg.region));
    let connect = move |_shard: u16| -> Result<ShmFabric<FilePersist>, KvError> {
        Ok(ShmFabric::connect_file(&region, &ctl, NicProfile::None)?)
    };
    let empty = MapMsg {
        epoch: 0,
        settled: false,
        kns: Vec::new(),
        ranges: Vec::new(),
        moving: Vec::new(),
    };
    let kn = Kn::start(configs, Arc::new(empty.slot_map()), connect)?;
    let shared = Arc::new(Shared {
        kn_id,
        addr: addr.to_string(),
        shards: kn.senders().to_vec(),
        view: RwLock::new(Arc::new(View::new(empty))),
        version: AtomicU64::new(0),
        lease: gate,
        max_value,
        limits: Limits {
            max_bulk: max_value.max(MAX_KEY_LEN),
            ..Limits::default()
        },
        fenced: AtomicBool::new(false),
        drain: AtomicBool::new(false),
        latency: LatencyHist::default(),
        conns: AtomicU64::new(0),
        released: AtomicU64::new(0),
        lease_epoch,
        lease_len: lease,
    });
    set_lease(&shared, registered_at, lease);

    // Join the map, then follow it.
    let joined = (|| -> std::io::Result<()> {
        let sent = Instant::now();
        match mgr.call(&MgrRequest::Join { kn_id })? {
            MgrReply::Lease { .. } => set_lease(&shared, sent, lease),
            other => return Err(std::io::Error::other(format!("{other:?}"))),
        }
        follow_map(&shared, &mut mgr)
    })();
    if let Err(e) = joined {
        kn.stop();
        return Err(KnServerError::Manager(e.to_string()));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.io_threads.max(1))
        .thread_name("kn-io")
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let hb_stop = Arc::new(AtomicBool::new(false));
    let hb = {
        let (shared, hb_stop, manager) = (
            Arc::clone(&shared),
            Arc::clone(&hb_stop),
            cfg.manager.clone(),
        );
        std::thread::Builder::new()
            .name("kn-lease".into())
            .spawn(move || heartbeat(&shared, mgr, &manager, lease_epoch, lease, &hb_stop))?
    };
    on_ready(kn_id, addr);
    tracing::info!(kn_id, %addr, "KN serving");
    let served = rt.block_on(accept_loop(Arc::clone(&shared), listener, stop));

    // Leave: stop the lease thread, flush and close every log (the DPM merges them), then
    // tell the manager, which republishes the map without this KN.
    hb_stop.store(true, Ordering::Release);
    let mgr = hb.join().ok().flatten();
    if !shared.lease.is_valid() {
        // Without a lease nothing more may be made durable: staged writes are dropped
        // (and were never acknowledged).
        shared.lease.set_lost();
    }
    let stats = kn.stop();
    tracing::info!(
        kn_id,
        gets = stats.gets,
        puts = stats.puts,
        "KN stopped its shards"
    );
    rt.shutdown_timeout(Duration::from_secs(1));
    if shared.fenced.load(Ordering::Acquire) {
        return Err(KnServerError::Fenced);
    }
    if let Some(mut m) = mgr {
        match m.call(&MgrRequest::Leave { kn_id }) {
            Ok(MgrReply::Ok) => tracing::info!(kn_id, "left the cluster"),
            r => tracing::warn!(kn_id, reply = ?r, "leaving the cluster failed"),
        }
    }
    served.map_err(KnServerError::Io)
}

fn set_lease(shared: &Shared, sent: Instant, lease: Duration) {
    // Stop serving a quarter lease before the manager could expire it.
    shared.lease.extend_to(sent + lease - lease / 4);
}

/// Fetches the map; installs it if it is new (shards drop lost slots, flush, merge their
/// logs), and acknowledges its epoch.
fn follow_map(shared: &Shared, mgr: &mut MgrClient) -> std::io::Result<()> {
    let msg = mgr.map()?;
    let epoch = msg.epoch;
    // Not the view's epoch: a release that failed must be retried before the ack.
    let new_map = shared.released.load(Ordering::Acquire) != epoch;
    let view = View::new(msg);
    let map = Arc::clone(&view.map);
    shared.set_view(view);
    let (mut release_us, mut entries_merged) = (0, 0);
    if new_map {
        // Every shard at once: install, flush, merge its log to its tail.
        let t0 = Instant::now();
        let mut waits = Vec::new();
        for tx in &shared.shards {
            let (rtx, rrx) = mpsc::channel();
            let release = Msg::Release {
                map: Arc::clone(&map),
                reply: rtx,
            };
            if tx.send(release).is_ok() {
                waits.push(rrx);
            }
        }
        // A shard's flush waits for a valid lease, so keep renewing it meanwhile (this
        // thread is the one that renews).
        for w in waits {
            loop {
                match w.recv_timeout(shared.lease_len / 8) {
                    Ok(Ok(r)) => {
                        entries_merged += r.entries_merged;
                        break;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout)
                        if t0.elapsed() < Duration::from_secs(60) =>
                    {
                        renew_only(shared, mgr)?;
                    }
                    other => {
                        return Err(std::io::Error::other(format!(
                            "a shard could not merge its log: {other:?}"
                        )))
                    }
                }
            }
        }
        release_us = t0.elapsed().as_micros() as u64;
        shared.released.store(epoch, Ordering::Release);
        tracing::info!(
            kn_id = shared.kn_id,
            epoch,
            slots = map.slots_of(shared.kn_id),
            release_us,
            entries_merged,
            "installed cluster map"
        );
    }
    match mgr.call(&MgrRequest::Ack {
        kn_id: shared.kn_id,
        epoch,
        release_us,
        entries_merged,
    })? {
        MgrReply::Lease { .. } => Ok(()),
        other => Err(std::io::Error::other(format!("{other:?}"))),
    }
}

/// Renews the lease (nothing else); a refusal means this KN was fenced.
fn renew_only(shared: &Shared, mgr: &mut MgrClient) -> std::io::Result<()> {
    let sent = Instant::now();
    match mgr.call(&MgrRequest::Renew {
        kn_id: shared.kn_id,
        lease_epoch: shared.lease_epoch,
        load: None,
    })? {
        MgrReply::Lease { .. } => {
            set_lease(shared, sent, shared.lease_len);
            Ok(())
        }
        other => {
            tracing::error!(reply = ?other, "lease refused: this KN was fenced");
            shared.lease.set_lost();
            shared.fenced.store(true, Ordering::Release);
            Err(std::io::Error::other(format!("{other:?}")))
        }
    }
}

/// Where the previous load report ended.
struct LoadMark {
    at: Instant,
    busy_ns: u64,
}

/// The time all shards spent handling messages, if every shard answers within `timeout`
/// (the lease thread must not wait long for a shard that itself waits for the lease).
fn busy_ns(shared: &Shared, timeout: Duration) -> Option<u64> {
    let mut waits = Vec::with_capacity(shared.shards.len());
    for tx in &shared.shards {
        let (stx, srx) = mpsc::channel();
        tx.send(Msg::Stats(stx)).ok()?;
        waits.push(srx);
    }
    let deadline = Instant::now() + timeout;
    let mut total = 0;
    for w in waits {
        let left = deadline.saturating_duration_since(Instant::now());
        total += w.recv_timeout(left).ok()?.busy_ns;
    }
    Some(total)
}

/// The KN's hottest keys since the last call (each key lives in one shard, so the shards'
/// lists are disjoint): the top 16, from the shards that answer within `timeout`.
fn hot_keys(shared: &Shared, timeout: Duration) -> Vec<(String, u64)> {
    let mut waits = Vec::with_capacity(shared.shards.len());
    for tx in &shared.shards {
        let (htx, hrx) = mpsc::channel();
        if tx.send(Msg::HotKeys(htx)).is_ok() {
            waits.push(hrx);
        }
    }
    let deadline = Instant::now() + timeout;
    let mut all: Vec<(Vec<u8>, u64)> = Vec::new();
    for w in waits {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(keys) = w.recv_timeout(left) {
            all.extend(keys);
        }
    }
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(16);
    all.into_iter()
        .map(|(k, c)| (String::from_utf8_lossy(&k).into_owned(), c))
        .collect()
}

/// This KN's load since `mark` (which it moves): ops/s and p99 from the connection tasks'
/// histogram, occupancy from the time its shards spent handling messages, its hottest
/// keys. `None` (and the mark stays) if a shard is too slow to say.
fn load_report(shared: &Shared, mark: &mut LoadMark, timeout: Duration) -> Option<LoadReport> {
    let busy_ns = busy_ns(shared, timeout)?;
    let lat = shared.latency.take();
    let now = Instant::now();
    let secs = now.duration_since(mark.at).as_secs_f64().max(1e-3);
    let busy = busy_ns.saturating_sub(mark.busy_ns) as f64 / 1e9;
    *mark = LoadMark { at: now, busy_ns };
    Some(LoadReport {
        ops_per_sec: lat.count as f64 / secs,
        occupancy: (busy / (secs * shared.shards.len().max(1) as f64)).clamp(0.0, 1.0),
        p99_us: lat.p99.as_micros() as u64,
        hot_keys: hot_keys(shared, timeout),
    })
}

/// Renews the lease every 100 ms (a quarter lease if shorter), follows map changes and
/// reports the load every quarter lease. Returns the manager connection for the final
/// `leave`.
fn heartbeat(
    shared: &Shared,
    mut mgr: MgrClient,
    manager: &str,
    lease_epoch: u32,
    lease: Duration,
    stop: &AtomicBool,
) -> Option<MgrClient> {
    let every = lease / 4;
    let mut last = Instant::now();
    let mut last_report = LoadMark {
        at: Instant::now(),
        busy_ns: busy_ns(shared, lease / 8).unwrap_or(0),
    };
    let mut conn = Some(mgr);
    while !stop.load(Ordering::Acquire) {
        if shared.fenced.load(Ordering::Acquire) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10).min(every));
        // While slots are moving, ask often: they are refused until the map settles.
        let unsettled = {
            let v = shared.view();
            !v.msg.settled || v.moving.iter().any(|&b| b)
        };
        // Otherwise often enough that a new map (which KNs learn of from renewals) is
        // picked up within ~100 ms: until then the slots it moves are refused.
        let period = if unsettled {
            every.min(Duration::from_millis(50))
        } else {
            every.min(Duration::from_millis(100))
        };
        if last.elapsed() < period {
            continue;
        }
        last = Instant::now();
        let m = match conn.as_mut() {
            Some(m) => m,
            None => match MgrClient::connect(manager, Duration::from_millis(200)) {
                Ok(m) => conn.insert(m),
                Err(_) => continue,
            },
        };
        // The load over at least a quarter lease, so its p99 means something.
        let load = if last_report.at.elapsed() >= every {
            load_report(shared, &mut last_report, lease / 8)
        } else {
            None
        };
        let sent = Instant::now();
        let r = m.call(&MgrRequest::Renew {
            kn_id: shared.kn_id,
            lease_epoch,
            load,
        });
        match r {
            Ok(MgrReply::Lease {
                epoch,
                settled,
                drain,
                ..
            }) => {
                set_lease(shared, sent, lease);
                if drain && !shared.drain.swap(true, Ordering::AcqRel) {
                    tracing::info!(kn_id = shared.kn_id, "asked to leave: draining");
                }
                let v = shared.view();
                let moving = v.moving.iter().any(|&b| b);
                let unreleased = shared.released.load(Ordering::Acquire) != epoch;
                if v.map.epoch() != epoch
                    || unreleased
                    || (moving && settled)
                    || !v.msg.settled && settled
                {
                    if let Err(e) = follow_map(shared, m) {
                        tracing::warn!(error = %e, "cannot follow the cluster map");
                        conn = None;
                    }
                }
            }
            Ok(MgrReply::Error { message }) => {
                tracing::error!(%message, "lease refused: this KN was fenced");
                shared.lease.set_lost();
                shared.fenced.store(true, Ordering::Release);
                return None;
            }
            Ok(other) => tracing::warn!(reply = ?other, "unexpected manager reply"),
            Err(e) => {
                tracing::warn!(error = %e, "manager unreachable");
                conn = None;
            }
        }
    }
    mgr = conn?;
    Some(mgr)
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(connection(Arc::clone(&shared), s));
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = tick.tick() => {
                if stop.load(Ordering::Acquire)
                    || shared.fenced.load(Ordering::Acquire)
                    || shared.drain.load(Ordering::Acquire)
                {
                    return Ok(());
                }
            }
        }
    }
}

/// Per-connection state.
struct Conn {
    shared: Arc<Shared>,
    view: Arc<View>,
    version: u64,
    proto: Proto,
}

async fn connection(shared: Arc<Shared>, mut sock: tokio::net::TcpStream) {
    let version = shared.version.load(Ordering::Acquire);
    let stripe = shared.conns.fetch_add(1, Ordering::Relaxed) as usize;
    let mut c = Conn {
        view: shared.view(),
        shared,
        version,
        proto: Proto::Resp2,
    };
    let limits = c.shared.limits;
    let mut inbuf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut out: Vec<u8> = Vec::with_capacity(16 << 10);
    loop {
        let mut pos = 0;
        let mut close = false;
        loop {
            match parse_command(&inbuf[pos..], &limits) {
                Ok(Some((args, n))) => {
                    pos += n;
                    if args.is_empty() {
                        continue;
                    }
                    let t0 = Instant::now();
                    let quit = c.exec(&args, &mut out).await;
                    c.shared.latency.record(stripe, t0.elapsed());
                    if quit {
                        close = true;
                        break;
                    }
                    if out.len() > 1 << 20 {
                        if sock.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    Out {
                        buf: &mut out,
                        proto: c.proto,
                    }
                    .error(&format!("ERR {e}"));
                    close = true;
                    break;
                }
            }
        }
        inbuf.drain(..pos);
        if !out.is_empty() {
            if sock.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            let _ = sock.shutdown().await;
            return;
        }
        inbuf.reserve(16 << 10);
        match sock.read_buf(&mut inbuf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Where a key's request goes.
enum Route {
    Shard(Sender<Msg>),
    /// Refused with this error line.
    Refuse(String),
}

/// Sends one request to a shard and waits for its answer.
async fn call(tx: &Sender<Msg>, op: Request) -> Result<Option<Vec<u8>>, KvError> {
    let (otx, orx) = tokio::sync::oneshot::channel();
    tx.send(Msg::ReqFn {
        op,
        tag: 0,
        reply: ReplyFn(Box::new(move |r| {
            let _ = otx.send(r.result);
        })),
    })
    .map_err(|_| KvError::ShuttingDown)?;
    orx.await.map_err(|_| KvError::ShuttingDown)?
}

fn kv_error(e: &KvError) -> String {
    match e {
        KvError::WrongOwner { .. } => "TRYAGAIN the slot is changing owner".into(),
        e @ KvError::TryAgain { .. } => e.to_string(),
        KvError::ShuttingDown => "TRYAGAIN the node is shutting down".into(),
        e => format!("ERR {e}"),
    }
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

fn split_addr(a: &str) -> (&str, u16) {
    match a.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().unwrap_or(0)),
        None => (a, 0),
    }
}

impl Conn {
    fn refresh(&mut self) {
        let v = self.shared.version.load(Ordering::Acquire);
        if v != self.version {
            self.view = self.shared.view();
            self.version = v;
        }
    }

    fn route(&self, slot: u16) -> Route {
        let v = &self.view;
        let owner = v.map.owner(slot);
        if owner != self.shared.kn_id {
            return match v.addrs.get(&owner) {
                Some(a) => Route::Refuse(format!("MOVED {slot} {a}")),
                None => Route::Refuse("CLUSTERDOWN Hash slot not served".into()),
            };
        }
        if v.moving[slot as usize] {
            return Route::Refuse("TRYAGAIN the slot is moving to this node".into());
        }
        if !self.shared.lease_ok() {
            return Route::Refuse("TRYAGAIN this node's lease is being renewed".into());
        }
        let shards = &self.shared.shards;
        Route::Shard(shards[shard_of(slot, shards.len())].clone())
    }

    /// The common slot of `keys`, or the error to answer.
    fn slot_of(&self, keys: &[&[u8]]) -> Result<u16, String> {
        let first = key_slot(keys.first().copied().unwrap_or_default());
        if keys.iter().any(|k| key_slot(k) != first) {
            return Err("CROSSSLOT Keys in request don't hash to the same slot".into());
        }
        for k in keys {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(format!(
                    "ERR key length {} is outside 1..={MAX_KEY_LEN}",
                    k.len()
                ));
            }
        }
        Ok(first)
    }

    /// The shard for `keys` (all in one slot), or the error to answer.
    fn shard_for(&mut self, keys: &[&[u8]]) -> Result<Sender<Msg>, String> {
        self.refresh();
        let slot = self.slot_of(keys)?;
        match self.route(slot) {
            Route::Shard(tx) => Ok(tx),
            Route::Refuse(e) => Err(e),
        }
    }

    /// Executes one command; returns whether to close the connection afterwards.
    async fn exec(&mut self, args: &[Vec<u8>], buf: &mut Vec<u8>) -> bool {
        let name = upper(&args[0]);
        let argc = args.len();
        let proto = self.proto;
        let mut o = Out { buf, proto };
        let arity = |o: &mut Out<'_>| {
            o.error(&format!(
                "ERR wrong number of arguments for '{}' command",
                name.to_ascii_lowercase()
            ))
        };
        match name.as_str() {
            "PING" => match argc {
                1 => o.simple("PONG"),
                2 => o.bulk(&args[1]),
                _ => arity(&mut o),
            },
            "ECHO" if argc == 2 => o.bulk(&args[1]),
            "QUIT" => {
                o.simple("OK");
                return true;
            }
            "HELLO" => self.hello(args, &mut o),
            "SELECT" if argc == 2 => {
                if args[1] == b"0" {
                    o.simple("OK")
                } else {
                    o.error("ERR SELECT is not allowed in cluster mode")
                }
            }
            "CLIENT" | "READONLY" | "READWRITE" | "RESET" => o.simple("OK"),
            "COMMAND" => o.array(0),
            "CONFIG" => o.map(0),
            "GET" if argc == 2 => match self.shard_for(&[&args[1]]) {
                Err(e) => o.error(&e),
                Ok(tx) => match call(
                    &tx,
                    Request::Get {
                        key: args[1].clone(),
                    },
                )
                .await
                {
                    Ok(Some(v)) => o.bulk(&v),
                    Ok(None) => o.null(),
                    Err(e) => o.error(&kv_error(&e)),
                },
            },
            "SET" if argc >= 3 => {
                if argc != 3 {
                    o.error("ERR syntax error (only plain SET key value is supported)");
                } else if args[2].len() > self.shared.max_value {
                    o.error(&format!(
                        "ERR value of {} bytes exceeds the limit of {} bytes",
                        args[2].len(),
                        self.shared.max_value
                    ));
                } else {
                    match self.shard_for(&[&args[1]]) {
                        Err(e) => o.error(&e),
                        Ok(tx) => {
                            let op = Request::Put {
                                key: args[1].clone(),
                                value: args[2].clone(),
                            };
                            match call(&tx, op).await {
                                Ok(_) => o.simple("OK"),
                                Err(e) => o.error(&kv_error(&e)),
                            }
                        }
                    }
                }
            }
            "DEL" | "UNLINK" | "EXISTS" if argc >= 2 => {
                let keys: Vec<&[u8]> = args[1..].iter().map(Vec::as_slice).collect();
                match self.shard_for(&keys) {
                    Err(e) => o.error(&e),
                    Ok(tx) => match count_keys(&tx, &keys, name != "EXISTS").await {
                        Ok(n) => o.int(n),
                        Err(e) => o.error(&kv_error(&e)),
                    },
                }
            }
            "MGET" if argc >= 2 => {
                let keys: Vec<&[u8]> = args[1..].iter().map(Vec::as_slice).collect();
                match self.shard_for(&keys) {
                    Err(e) => o.error(&e),
                    Ok(tx) => match mget(&tx, &keys).await {
                        Ok(vals) => {
                            o.array(vals.len());
                            for v in vals {
                                match v {
                                    Some(v) => o.bulk(&v),
                                    None => o.null(),
                                }
                            }
                        }
                        Err(e) => o.error(&kv_error(&e)),
                    },
                }
            }
            "MSET" if argc >= 3 && argc % 2 == 1 => {
                let keys: Vec<&[u8]> = args[1..].iter().step_by(2).map(Vec::as_slice).collect();
                let too_big = args[2..]
                    .iter()
                    .step_by(2)
                    .any(|v| v.len() > self.shared.max_value);
                match self.shard_for(&keys) {
                    Err(e) => o.error(&e),
                    Ok(_) if too_big => o.error(&format!(
                        "ERR a value exceeds the limit of {} bytes",
                        self.shared.max_value
                    )),
                    Ok(tx) => match mset(&tx, &args[1..]).await {
                        Ok(()) => o.simple("OK"),
                        Err(e) => o.error(&kv_error(&e)),
                    },
                }
            }
            "INFO" => {
                let shared = Arc::clone(&self.shared);
                let stats = tokio::task::spawn_blocking(move || shared.stats())
                    .await
                    .unwrap_or_default();
                self.refresh();
                o.text(&self.info(&stats));
            }
            "CLUSTER" if argc >= 2 => {
                self.refresh();
                self.cluster(args, &mut o);
            }
            "GET" | "SET" | "DEL" | "UNLINK" | "EXISTS" | "MGET" | "MSET" | "ECHO" | "SELECT"
            | "CLUSTER" => arity(&mut o),
            _ => {
                let mut shown = String::new();
                for a in args.iter().skip(1).take(8) {
                    shown.push('\'');
                    shown.push_str(&String::from_utf8_lossy(&a[..a.len().min(64)]));
                    shown.push_str("' ");
                }
                o.error(&format!(
                    "ERR unknown command '{}', with args beginning with: {shown}",
                    String::from_utf8_lossy(&args[0][..args[0].len().min(64)])
                ));
            }
        }
        false
    }

    fn hello(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        if let Some(v) = args.get(1) {
            match v.as_slice() {
                b"2" => self.proto = Proto::Resp2,
                b"3" => self.proto = Proto::Resp3,
                _ => {
                    o.error("NOPROTO unsupported protocol version");
                    return;
                }
            }
        }
        o.proto = self.proto;
        o.map(7);
        o.bulk(b"server");
        o.bulk(b"dinomo");
        o.bulk(b"version");
        o.bulk(env!("CARGO_PKG_VERSION").as_bytes());
        o.bulk(b"proto");
        o.int(if self.proto == Proto::Resp3 { 3 } else { 2 });
        o.bulk(b"id");
        o.int(self.shared.kn_id as i64);
        o.bulk(b"mode");
        o.bulk(b"cluster");
        o.bulk(b"role");
        o.bulk(b"master");
        o.bulk(b"modules");
        o.array(0);
    }

    fn info(&self, s: &ShardStats) -> String {
        let v = &self.view;
        let ops = (s.gets + s.puts + s.deletes).max(1) as f64;
        let gets = s.gets.max(1) as f64;
        let writes = (s.puts + s.deletes).max(1) as f64;
        let mut t = String::new();
        let mut kv = |k: &str, v: String| {
            t.push_str(k);
            t.push(':');
            t.push_str(&v);
            t.push_str("\r\n");
        };
        kv("# Server\r\nredis_version", "7.0.0".into());
        kv("dinomo_version", env!("CARGO_PKG_VERSION").into());
        kv("redis_mode", "cluster".into());
        kv("process_id", std::process::id().to_string());
        kv("tcp_port", split_addr(&self.shared.addr).1.to_string());
        kv("\r\n# Cluster\r\ncluster_enabled", "1".into());
        kv("\r\n# DINOMO\r\nkn_id", self.shared.kn_id.to_string());
        kv("map_epoch", v.map.epoch().to_string());
        kv("map_settled", u8::from(v.msg.settled).to_string());
        kv("slots_owned", v.map.slots_of(self.shared.kn_id).to_string());
        kv("shards", self.shared.shards.len().to_string());
        kv("gets", s.gets.to_string());
        kv("puts", s.puts.to_string());
        kv("deletes", s.deletes.to_string());
        kv(
            "rts_per_op",
            format!(
                "{:.3}",
                (s.read_rts + s.write_rts + s.maintenance_rts) as f64 / ops
            ),
        );
        kv(
            "read_rts_per_get",
            format!("{:.3}", s.read_rts as f64 / gets),
        );
        kv(
            "write_rts_per_write",
            format!("{:.3}", s.write_rts as f64 / writes),
        );
        kv(
            "hit_ratio_value",
            format!("{:.4}", s.hit_value as f64 / gets),
        );
        kv(
            "hit_ratio_shortcut",
            format!("{:.4}", s.hit_shortcut as f64 / gets),
        );
        kv(
            "hit_ratio_local",
            format!("{:.4}", s.hit_local as f64 / gets),
        );
        kv("miss_ratio", format!("{:.4}", s.miss as f64 / gets));
        kv("cache_value_bytes", s.cache.value_bytes.to_string());
        kv("cache_shortcut_bytes", s.cache.shortcut_bytes.to_string());
        kv("cache_budget_bytes", s.cache.budget_bytes.to_string());
        kv("cache_values", s.cache.values.to_string());
        kv("cache_shortcuts", s.cache.shortcuts.to_string());
        kv("unmerged_entries", s.unmerged.to_string());
        kv("flushes", s.flushes.to_string());
        kv(
            "entries_per_flush",
            format!("{:.2}", s.flushed_entries as f64 / s.flushes.max(1) as f64),
        );
        kv("wrong_owner", s.wrong_owner.to_string());
        // Raw counters, so that a client can compute figures over an interval.
        kv("read_rts", s.read_rts.to_string());
        kv("write_rts", s.write_rts.to_string());
        kv("maintenance_rts", s.maintenance_rts.to_string());
        kv("hit_value", s.hit_value.to_string());
        kv("hit_shortcut", s.hit_shortcut.to_string());
        kv("hit_local", s.hit_local.to_string());
        kv("miss", s.miss.to_string());
        kv(
            "fabric_bytes",
            (s.fabric.read_bytes + s.fabric.write_bytes).to_string(),
        );
        t
    }

    fn cluster(&self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let v = &self.view;
        let sub = upper(&args[1]);
        let node = |o: &mut Out<'_>, kn: u16, addr: &str| {
            let (host, port) = split_addr(addr);
            o.array(3);
            o.bulk(host.as_bytes());
            o.int(port as i64);
            o.bulk(node_id(kn).as_bytes());
        };
        match (sub.as_str(), args.len()) {
            ("KEYSLOT", 3) => o.int(key_slot(&args[2]) as i64),
            ("MYID", 2) => o.bulk(node_id(self.shared.kn_id).as_bytes()),
            ("SLOTS", 2) => {
                o.array(v.msg.ranges.len());
                for &(a, b, kn) in &v.msg.ranges {
                    o.array(3);
                    o.int(a as i64);
                    o.int(b as i64);
                    node(o, kn, v.addrs.get(&kn).map_or("", String::as_str));
                }
            }
            ("SHARDS", 2) => {
                o.array(v.msg.kns.len());
                for (kn, addr) in &v.msg.kns {
                    let mine: Vec<_> = v.msg.ranges.iter().filter(|r| r.2 == *kn).collect();
                    let (host, port) = split_addr(addr);
                    o.map(2);
                    o.bulk(b"slots");
                    o.array(mine.len() * 2);
                    for r in &mine {
                        o.int(r.0 as i64);
                        o.int(r.1 as i64);
                    }
                    o.bulk(b"nodes");
                    o.array(1);
                    o.map(7);
                    o.bulk(b"id");
                    o.bulk(node_id(*kn).as_bytes());
                    o.bulk(b"port");
                    o.int(port as i64);
                    o.bulk(b"ip");
                    o.bulk(host.as_bytes());
                    o.bulk(b"endpoint");
                    o.bulk(host.as_bytes());
                    o.bulk(b"role");
                    o.bulk(b"master");
                    o.bulk(b"replication-offset");
                    o.int(0);
                    o.bulk(b"health");
                    o.bulk(b"online");
                }
            }
            ("NODES", 2) => {
                let mut t = String::new();
                for (kn, addr) in &v.msg.kns {
                    let (host, port) = split_addr(addr);
                    let flags = if *kn == self.shared.kn_id {
                        "myself,master"
                    } else {
                        "master"
                    };
                    t.push_str(&format!(
                        "{} {host}:{port}@{} {flags} - 0 0 {} connected",
                        node_id(*kn),
                        port.checked_add(10000).unwrap_or(0),
                        v.map.epoch()
                    ));
                    for r in v.msg.ranges.iter().filter(|r| r.2 == *kn) {
                        if r.0 == r.1 {
                            t.push_str(&format!(" {}", r.0));
                        } else {
                            t.push_str(&format!(" {}-{}", r.0, r.1));
                        }
                    }
                    t.push('\n');
                }
                o.bulk(t.as_bytes());
            }
            ("INFO", 2) => {
                let assigned: usize = v.msg.ranges.iter().map(|r| (r.1 - r.0) as usize + 1).sum();
                let ok = assigned == SLOTS as usize;
                let t = format!(
                    "cluster_enabled:1\r\ncluster_state:{}\r\ncluster_slots_assigned:{assigned}\r\ncluster_slots_ok:{assigned}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{n}\r\ncluster_size:{n}\r\ncluster_current_epoch:{e}\r\ncluster_my_epoch:{e}\r\n",
                    if ok { "ok" } else { "fail" },
                    n = v.msg.kns.len(),
                    e = v.map.epoch()
                );
                o.text(&t);
            }
            _ => o.error(&format!(
                "ERR unknown subcommand or wrong number of arguments for 'cluster|{}'",
                sub.to_ascii_lowercase()
            )),
        }
    }
}

/// Gets (and with `delete`, deletes) `keys` on one shard; returns how many existed.
async fn count_keys(tx: &Sender<Msg>, keys: &[&[u8]], delete: bool) -> Result<i64, KvError> {
    let mut n = 0;
    for (i, v) in mget(tx, keys).await?.into_iter().enumerate() {
        if v.is_some() {
            n += 1;
            if delete {
                call(
                    tx,
                    Request::Delete {
                        key: keys[i].to_vec(),
                    },
                )
                .await?;
            }
        }
    }
    Ok(n)
}

/// Gets `keys` from one shard with every request in flight at once.
async fn mget(tx: &Sender<Msg>, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
    let mut waits = Vec::with_capacity(keys.len());
    for k in keys {
        let (otx, orx) = tokio::sync::oneshot::channel();
        tx.send(Msg::ReqFn {
            op: Request::Get { key: k.to_vec() },
            tag: 0,
            reply: ReplyFn(Box::new(move |r| {
                let _ = otx.send(r.result);
            })),
        })
        .map_err(|_| KvError::ShuttingDown)?;
        waits.push(orx);
    }
    let mut out = Vec::with_capacity(keys.len());
    for w in waits {
        out.push(w.await.map_err(|_| KvError::ShuttingDown)??);
    }
    Ok(out)
}

/// Sets key/value pairs on one shard (they share one group commit when they fit a batch).
async fn mset(tx: &Sender<Msg>, kv: &[Vec<u8>]) -> Result<(), KvError> {
    let mut waits = Vec::new();
    for pair in kv.chunks_exact(2) {
        let (otx, orx) = tokio::sync::oneshot::channel();
        tx.send(Msg::ReqFn {
            op: Request::Put {
                key: pair[0].clone(),
                value: pair[1].clone(),
            },
            tag: 0,
            reply: ReplyFn(Box::new(move |r| {
                let _ = otx.send(r.result);
            })),
        })
        .map_err(|_| KvError::ShuttingDown)?;
        waits.push(orx);
    }
    for w in waits {
        w.await.map_err(|_| KvError::ShuttingDown)??;
    }
    Ok(())
}
