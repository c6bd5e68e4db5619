//! A KVS node as a process (`dinomo kn`): attaches to the DPM over the fabric its
//! [`DpmSpec`] names (one connection per shard), registers with the cluster manager, keeps
//! its lease, follows the cluster map ([`membership`]), reports its load ([`load`]), and
//! serves clients over the Redis protocol, RESP2/RESP3, with tokio ([`conn`], [`commands`]).
//!
//! Thread per core, run to completion: an accepted connection is placed on a shard thread
//! (in turn), whose event loop serves it to the end. A pipeline is parsed whole before any
//! reply is awaited: `GET`s and `SET`s of that shard's keys are served in place (a cached
//! value is copied straight into the reply; `SET`s are staged and share one group commit),
//! those of other shards go there in one batch per shard and come back in one message; the
//! replies are written in command order. No lock on the way: each connection keeps its own
//! copy of the current view and reloads it only when a version counter moves. Other
//! commands go to their shard's queue and are answered through a oneshot. Keys whose slot another KN owns get `-MOVED slot host:port` unless the
//! map names this KN a replica of the key (then it serves the key through the key's cell
//! at the DPM, reads and writes alike); slots that are still moving to this KN, keys whose
//! replication is beginning or ending, and every key once the lease could have lapsed, get
//! `-TRYAGAIN`.

pub mod acl;
pub(crate) mod cmd;
mod commands;
mod conn;
mod latency;
mod load;
mod membership;
mod tls;
mod txn;
mod walk;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dinomo_hw::fabric::connect::wait_for_dpm;
use dinomo_hw::fabric::DpmSpec;
use dinomo_shared::auth::ClusterSecret;
use dinomo_shared::entry::{ENTRY_HEADER_SIZE, EXPIRY_LEN, MAX_KEY_LEN, MAX_VALUE_LEN};
use dinomo_shared::manager_proto::{
    MapMsg, MgrAuth, MgrClient, MgrReply, MgrRequest, ReplicaMsg, ReplicaPhase, Role,
};
use dinomo_shared::resp::Limits;

use crate::dac::DacConfig;
use crate::replica::{ReplicaSet, Replicas};
use crate::shard::{read_geometry, LeaseGate, Msg, ShardTx};
use crate::{Kn, KvError, ShardConfig, ShardStats, SlotMap};
pub use acl::{Acl, AclError};
use latency::LatencyHist;
use membership::{follow_map, heartbeat, keep_lease_while, set_lease};
pub use tls::{tls_config, TlsError};

/// How a KN process runs.
#[derive(Clone, Debug)]
pub struct KnConfig {
    /// The DPM and the fabric to reach it.
    pub dpm: DpmSpec,
    /// Client address (port 0: any free port; the bound address is registered).
    pub listen: SocketAddr,
    /// Manager address.
    pub manager: String,
    /// Shards (threads with their own fabric connection, log and cache, which also serve
    /// the client connections placed on them).
    pub threads: u16,
    /// Cache bytes for the whole KN.
    pub cache_bytes: u64,
    /// Threads accepting client connections (and running `INFO`'s counter gathering).
    pub io_threads: usize,
    /// Group-commit bound.
    pub flush_bound: Duration,
    /// The cluster secret the manager session is authenticated with (required by a
    /// manager that has one; without it the manager must be on loopback).
    pub secret: Option<ClusterSecret>,
    /// Who may use the client port, and for what (`requirepass`, ACL users).
    pub acl: Arc<Acl>,
    /// Redis's `protected-mode`: without any password, serve only loopback clients and
    /// refuse to listen on any other address.
    pub protected_mode: bool,
    /// What one client may make the KN hold.
    pub limits: ClientLimits,
    /// TLS on the client port ([`tls_config`]); `None`: plain TCP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// Per-client limits, with Redis's names (`CONFIG GET` shows them) and, where Redis has
/// one, its default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// `client-query-buffer-limit`: bytes of unparsed input plus the incomplete command a
    /// client may make the KN hold; above it the client gets an error and is disconnected.
    pub query_buffer: usize,
    /// `proto-max-bulk-len`: the longest bulk string in a command (never more than the
    /// largest value this KN can store: a longer one could not be stored anyway).
    pub proto_max_bulk_len: usize,
    /// `maxclients`: connections served at once; one more gets an error and is closed.
    pub maxclients: usize,
    /// `timeout`: a client idle this long is disconnected (zero: never).
    pub timeout: Duration,
    /// `client-reply-limit` (not in Redis): the largest reply to one command. A command
    /// whose reply would be larger (an `MGET` naming one large value many times) gets an
    /// error and the client is disconnected, as Redis does at its output buffer limit,
    /// before the reply is gathered.
    pub reply: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            query_buffer: 1 << 30,
            proto_max_bulk_len: 512 << 20,
            maxclients: 10_000,
            timeout: Duration::ZERO,
            reply: 64 << 20,
        }
    }
}

impl KnConfig {
    pub fn new(dpm: DpmSpec, listen: SocketAddr, manager: String) -> Self {
        Self {
            dpm,
            listen,
            manager,
            threads: 2,
            cache_bytes: 64 << 20,
            io_threads: 1,
            flush_bound: Duration::from_micros(100),
            secret: None,
            acl: Arc::new(Acl::default()),
            protected_mode: true,
            limits: ClientLimits::default(),
            tls: None,
        }
    }
}

/// Why a KN stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum KnServerError {
    #[error("cannot reach the DPM ({dpm}): {why}")]
    Dpm { dpm: String, why: String },
    #[error("manager: {0}")]
    Manager(String),
    #[error("KVS node: {0}")]
    Kn(#[from] KvError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the lease was lost: the manager fenced this KN")]
    Fenced,
    #[error(
        "refusing to serve clients on {listen} without a password: anyone who reaches that \
         address could read and write every key. Give --requirepass-file or --acl-file, listen \
         on a loopback address, or turn protected mode off (--protected-mode no) if another \
         layer guards the network"
    )]
    Unprotected { listen: SocketAddr },
}

/// What this KN believes about the cluster.
#[derive(Debug)]
struct View {
    msg: MapMsg,
    map: Arc<SlotMap>,
    moving: Vec<bool>,
    addrs: HashMap<u16, String>,
    /// The replicated keys by key, as the map lists them.
    replicas: HashMap<Vec<u8>, ReplicaMsg>,
    /// What the shards serve through cells: the keys whose cell is known and that are
    /// served by some KN (phases `serving` and `ending`).
    table: Arc<Replicas>,
}

impl View {
    fn new(msg: MapMsg) -> Self {
        let mut replicas = HashMap::new();
        let mut table = Replicas::default();
        for r in &msg.replicas {
            let Some(key) = r.key_bytes() else {
                tracing::warn!(key = %r.key, "the map names a replicated key that is not hex");
                continue;
            };
            if let (Some(cell), ReplicaPhase::Serving | ReplicaPhase::Ending) = (r.cell, r.phase) {
                table = table.with(
                    &key,
                    ReplicaSet {
                        cell,
                        owner: r.owner,
                        kns: r.kns.clone(),
                    },
                );
            }
            replicas.insert(key, r.clone());
        }
        Self {
            map: Arc::new(msg.slot_map()),
            moving: msg.moving_slots(),
            addrs: msg.kns.iter().cloned().collect(),
            replicas,
            table: Arc::new(table),
            msg,
        }
    }
}

#[derive(Debug)]
struct Shared {
    kn_id: u16,
    addr: String,
    shards: Vec<ShardTx>,
    view: RwLock<Arc<View>>,
    version: AtomicU64,
    /// The lease, shared with the shards (they check it before every flush).
    lease: Arc<LeaseGate>,
    max_value: usize,
    /// The parser's limits once a client authenticated.
    limits: Limits,
    client: ClientLimits,
    acl: Arc<Acl>,
    protected_mode: bool,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Client connections open now (`maxclients`).
    clients: std::sync::atomic::AtomicUsize,
    fenced: AtomicBool,
    /// The manager asked this KN to leave (`remove_kn`).
    drain: AtomicBool,
    /// Latency of requests in the connection tasks, drained at every renewal.
    latency: LatencyHist,
    /// Hands each connection its histogram stripe.
    conns: AtomicU64,
    /// Connections placed on shard threads so far (they are placed in turn).
    placed: AtomicU64,
    /// The epoch of the last map every shard released slots for.
    released: AtomicU64,
    lease_epoch: u32,
    lease_len: Duration,
    /// How it opens manager sessions (again after a broken connection or a restart).
    mgr_auth: MgrAuth,
    /// Counters, the connection registry and the run-time parameters (`INFO`, `CLIENT
    /// LIST`, `CONFIG SET`).
    intro: commands::Introspection,
    /// The shards' count of expired keys at the last `CONFIG RESETSTAT` (`INFO`'s
    /// `expired_keys` counts from there).
    expired_base: AtomicU64,
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

/// How long a KN waits for a DPM that is not up yet.
const DPM_WAIT: Duration = Duration::from_secs(30);

/// How long a KN waits to join while a restarted manager re-adopts KNs.
const JOIN_WAIT: Duration = Duration::from_secs(120);

/// How long reading the region's geometry may take.
const GEOMETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// A 40-hex-digit node id, as Redis Cluster expects.
fn node_id(kn: u16) -> String {
    format!("{:040x}", 0xd1_0000_0000u64 + kn as u64)
}

/// File descriptors kept for what is not a client: fabric connections, the manager, the
/// listener, the runtime.
const RESERVED_FDS: u64 = 128;

/// Like Redis: raises the soft limit on open files toward what `maxclients` needs, and
/// lowers `maxclients` to what the limit allows, so that a client past the limit gets
/// `-ERR max number of clients reached` rather than a failed `accept`.
fn fit_maxclients(want: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return want;
    }
    let need = (want as u64).saturating_add(RESERVED_FDS);
    if lim.rlim_cur < need {
        let raised = libc::rlimit {
            rlim_cur: need.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given, which outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    let fit = usize::try_from(lim.rlim_cur.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(want);
    if fit < want {
        tracing::warn!(
            maxclients = want,
            open_files = lim.rlim_cur,
            lowered_to = fit,
            "the open-file limit is too low for maxclients; maxclients lowered (raise the \
             limit with ulimit -n)"
        );
    }
    want.min(fit)
}

/// Runs a KN until `stop` is set (then leaves the cluster cleanly) or its lease is lost.
/// `on_ready` gets the KN id and the bound client address once it serves.
pub fn run(
    cfg: &KnConfig,
    stop: &AtomicBool,
    on_ready: impl FnOnce(u16, SocketAddr),
) -> Result<(), KnServerError> {
    if cfg.protected_mode && !cfg.acl.requires_auth() && !cfg.listen.ip().is_loopback() {
        return Err(KnServerError::Unprotected { listen: cfg.listen });
    }
    // Reach the DPM first: a KN that cannot is no use to the manager.
    let dpm_err = |why: String| KnServerError::Dpm {
        dpm: cfg.dpm.to_string(),
        why,
    };
    // A DPM that is starting (`dinomo up` starts every process at once) is waited for.
    let mut probe =
        wait_for_dpm(DPM_WAIT, || cfg.dpm.connect()).map_err(|e| dpm_err(e.to_string()))?;
    let geo = read_geometry(&mut probe, GEOMETRY_TIMEOUT).map_err(|e| dpm_err(e.to_string()))?;
    drop(probe);
    let listener = std::net::TcpListener::bind(cfg.listen)?;
    let addr = listener.local_addr()?;
    let mgr_err = |e: std::io::Error| KnServerError::Manager(e.to_string());
    let mgr_auth = MgrAuth {
        secret: cfg.secret.clone(),
        role: Role::Kn,
        id: addr.to_string(),
    };
    let mut mgr = MgrClient::connect_with(&cfg.manager, Duration::from_secs(20), &mgr_auth)
        .map_err(mgr_err)?;
    let shards = cfg.threads.max(1);
    // A manager that still knows a KN at this address (a predecessor that died, whose
    // lease has not lapsed yet) asks to register again later.
    let t_register = Instant::now();
    let (kn_id, lease_epoch, lease_ms) = loop {
        match mgr
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
            } => break (kn_id, lease_epoch, lease_ms),
            MgrReply::Retry { message } if t_register.elapsed() < JOIN_WAIT => {
                tracing::info!(%message, "registering later");
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return Err(KnServerError::Manager(format!("{other:?}"))),
        }
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
    // Room for the largest key, and for an expiry time beside the value.
    let max_value = MAX_VALUE_LEN
        .min(staging.min(max_entry) - ENTRY_HEADER_SIZE - MAX_KEY_LEN - EXPIRY_LEN)
        & !7;
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
    // Shard connections name the KN, so fencing it revokes them (verbs).
    let spec = cfg.dpm.clone().for_kn(u32::from(kn_id));
    let connect = move |_shard: u16| Ok(spec.connect()?);
    let empty = MapMsg::empty();
    // The shards open their logs at the DPM, which can take longer than a lease on a
    // loaded machine: keep the lease meanwhile.
    set_lease(&gate, registered_at, lease);
    let (started, mut mgr, renewed) =
        keep_lease_while(mgr, kn_id, lease_epoch, lease, &gate, || {
            Kn::start_serving(configs, Arc::new(empty.slot_map()), connect)
        });
    let kn = started?;
    if let Err(why) = renewed {
        kn.stop();
        return Err(KnServerError::Manager(why));
    }
    let client = ClientLimits {
        proto_max_bulk_len: cfg
            .limits
            .proto_max_bulk_len
            .min(max_value.max(MAX_KEY_LEN)),
        maxclients: fit_maxclients(cfg.limits.maxclients),
        ..cfg.limits
    };
    let shared = Arc::new(Shared {
        kn_id,
        addr: addr.to_string(),
        shards: kn.senders().to_vec(),
        view: RwLock::new(Arc::new(View::new(empty))),
        version: AtomicU64::new(0),
        lease: gate,
        max_value,
        limits: Limits {
            max_bulk: cfg
                .limits
                .proto_max_bulk_len
                .min(max_value.max(MAX_KEY_LEN)),
            ..Limits::default()
        },
        client,
        intro: commands::Introspection::new(&client, cfg.cache_bytes),
        expired_base: AtomicU64::new(0),
        acl: Arc::clone(&cfg.acl),
        protected_mode: cfg.protected_mode,
        tls: cfg.tls.clone(),
        clients: std::sync::atomic::AtomicUsize::new(0),
        fenced: AtomicBool::new(false),
        drain: AtomicBool::new(false),
        latency: LatencyHist::default(),
        conns: AtomicU64::new(0),
        placed: AtomicU64::new(0),
        released: AtomicU64::new(0),
        lease_epoch,
        lease_len: lease,
        mgr_auth,
    });

    // Join the map, then follow it. A manager that is re-adopting the KNs of an earlier
    // one asks to wait: keep the lease meanwhile.
    let joined = (|| -> std::io::Result<()> {
        let t0 = Instant::now();
        loop {
            let sent = Instant::now();
            match mgr.call(&MgrRequest::Join { kn_id, lease_epoch })? {
                MgrReply::Lease { .. } => {
                    set_lease(&shared.lease, sent, lease);
                    break;
                }
                MgrReply::Retry { message } if t0.elapsed() < JOIN_WAIT => {
                    tracing::info!(%message, "joining later");
                    std::thread::sleep(lease / 8);
                    let sent = Instant::now();
                    match mgr.call(&MgrRequest::Renew {
                        kn_id,
                        lease_epoch,
                        load: None,
                    })? {
                        MgrReply::Lease { .. } => set_lease(&shared.lease, sent, lease),
                        other => return Err(std::io::Error::other(format!("{other:?}"))),
                    }
                }
                other => return Err(std::io::Error::other(format!("{other:?}"))),
            }
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
            .spawn(move || heartbeat(&shared, mgr, &manager, &hb_stop))?
    };
    on_ready(kn_id, addr);
    tracing::info!(kn_id, %addr, "KN serving");
    let served = rt.block_on(conn::accept_loop(Arc::clone(&shared), listener, stop));

    // Leave: stop the lease thread, flush and close every log (the DPM merges them), stop
    // acknowledging anything, then tell the manager, which fences (a no-op now) and
    // republishes the map without this KN. Nothing is acknowledged after the `leave`.
    hb_stop.store(true, Ordering::Release);
    let mgr = hb.join().ok().flatten();
    if !shared.lease.is_valid() {
        // Without a lease nothing more may be made durable: staged writes are dropped
        // (and were never acknowledged).
        shared.lease.set_lost();
    }
    let stats = kn.stop();
    // The shards are gone; no connection task can have a write acknowledged any more.
    shared.lease.set_lost();
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
        match m.call(&MgrRequest::Leave { kn_id, lease_epoch }) {
            Ok(MgrReply::Ok) => tracing::info!(kn_id, "left the cluster"),
            r => tracing::warn!(kn_id, reply = ?r, "leaving the cluster failed"),
        }
    }
    served.map_err(KnServerError::Io)
}
