//! The manager as a TCP service: it accepts KNs and tools (line-delimited JSON in
//! authenticated sessions, see [`dinomo_shared::manager_proto`]), ticks the state machine
//! (lease expiry, fencing), runs the load policy, and carries out the administrative
//! requests, which wait for the map to settle.
//!
//! Connections are tokio tasks on two threads, not a thread each: at most
//! [`MAX_CONNECTIONS`] at once (more are told so and closed), a hello of at most
//! [`MAX_HELLO_LINE`] bytes within [`HANDSHAKE_TIMEOUT`] (so unauthenticated peers hold
//! almost nothing), and lines of at most [`MAX_LINE`] bytes, bounded while they are read.
//! Requests that call the DPM or wait for a map run on a fixed pool of threads started with
//! the service (one per request allowed at once), so renewals never wait behind them and no
//! thread is started while serving: nothing a peer does can make the manager fail to start
//! one.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::auth::ClusterSecret;
use dinomo_shared::manager_proto::{
    key_from_hex, Hello, MgrReply, MgrRequest, Reconfig, ReplicaPhase, Role, Session,
    MAX_HELLO_LINE, MAX_LINE,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::policy::PolicyAction;
use crate::state::{Manager, Peer, ReplicaStep};

/// How long `add_kn`, `remove_kn` and `rebalance` wait for the new map to settle.
pub const ADMIN_WAIT: Duration = Duration::from_secs(30);

/// Connections served at once; more are told so and closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long a new connection has to send its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reply may take to be written before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Administrative requests under way at once (each may wait [`ADMIN_WAIT`]).
const ADMIN_AT_ONCE: usize = 4;

/// KN requests that call the DPM (register, join, leave) under way at once.
const KN_STORE_AT_ONCE: usize = 16;

/// A manager listening for KNs and tools.
#[derive(Debug)]
pub struct Service {
    manager: Arc<Manager>,
    listener: TcpListener,
    addr: SocketAddr,
    secret: Option<ClusterSecret>,
    /// A policy action (a KN being added or removed) is under way.
    policy_busy: Arc<AtomicBool>,
}

/// What every connection task shares.
struct Ctx {
    manager: Arc<Manager>,
    secret: Option<ClusterSecret>,
    addr: SocketAddr,
    admin: Semaphore,
    kn_store: Semaphore,
    pool: Pool,
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running the requests that block (DPM calls, waits for a map).
/// Each job holds a permit of `admin` or `kn_store`, so there is always a free thread.
struct Pool {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Pool {
    fn start(threads: usize) -> std::io::Result<(Self, Vec<std::thread::JoinHandle<()>>)> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let mut handles = Vec::with_capacity(threads);
        for _ in 0..threads {
            let rx = Arc::clone(&rx);
            handles.push(
                std::thread::Builder::new()
                    .name("manager-work".into())
                    .spawn(move || loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    })?,
            );
        }
        Ok((Self { jobs: tx }, handles))
    }

    /// Runs `f` on a pool thread and waits for its result.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

impl Service {
    /// Binds `listen` for `manager`; with `secret`, every session must prove it holds it.
    pub fn bind(
        manager: Arc<Manager>,
        listen: SocketAddr,
        secret: Option<ClusterSecret>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        Ok(Self {
            manager,
            listener,
            addr,
            secret,
            policy_busy: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Serves until `stop` is set.
    pub fn serve(&self, stop: &AtomicBool) -> std::io::Result<()> {
        let lease = self.manager.config().lease;
        let tick = (lease / 10).clamp(Duration::from_millis(10), Duration::from_millis(100));
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (m, stop, busy, addr) = (
                Arc::clone(&self.manager),
                Arc::clone(&ticker_stop),
                Arc::clone(&self.policy_busy),
                self.addr,
            );
            std::thread::Builder::new()
                .name("manager-tick".into())
                .spawn(move || ticks(&m, tick, &stop, &busy, addr))?
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("manager-io")
            .enable_all()
            .build()?;
        let (pool, workers) = Pool::start(ADMIN_AT_ONCE + KN_STORE_AT_ONCE)?;
        let listener = self.listener.try_clone()?;
        listener.set_nonblocking(true)?;
        let ctx = Arc::new(Ctx {
            manager: Arc::clone(&self.manager),
            secret: self.secret.clone(),
            addr: self.addr,
            admin: Semaphore::new(ADMIN_AT_ONCE),
            kn_store: Semaphore::new(KN_STORE_AT_ONCE),
            pool,
        });
        let served = rt.block_on(accept_loop(ctx, listener, stop));
        rt.shutdown_timeout(Duration::from_secs(1));
        // The pool's queue closed with the last connection task; a worker still waiting
        // for a map (at most ADMIN_WAIT) is not joined.
        drop(workers);
        ticker_stop.store(true, Ordering::Release);
        let _ = ticker.join();
        served
    }
}

async fn accept_loop(
    ctx: Arc<Ctx>,
    listener: TcpListener,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sessions = AtomicU64::new(1);
    while !stop.load(Ordering::Acquire) {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        let (s, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: the connections already open keep being served.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; closing a new one");
            let _ = s.try_write(
                b"{\"kind\":\"error\",\"message\":\"the manager serves too many connections\"}\n",
            );
            continue;
        };
        let session = sessions.fetch_add(1, Ordering::Relaxed);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            connection(&ctx, s, peer, session).await;
            drop(permit);
        });
    }
    Ok(())
}

/// Reads one line of at most `max` bytes, never buffering more (see
/// [`dinomo_shared::manager_proto::read_line_max`]).
async fn read_line_async<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<String>> {
    let mut bytes = Vec::new();
    let n = (&mut *r)
        .take(max as u64)
        .read_until(b'\n', &mut bytes)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    if bytes.last() != Some(&b'\n') {
        return Err(bad(if n >= max {
            format!("a line is longer than {max} bytes")
        } else {
            "the connection closed in the middle of a line".into()
        }));
    }
    bytes.pop();
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| bad("a line is not UTF-8".into()))
}

async fn send<W: AsyncWriteExt + Unpin>(w: &mut W, mut line: String) -> bool {
    line.push('\n');
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, w.write_all(line.as_bytes())).await,
        Ok(Ok(()))
    )
}

fn json<T: serde::Serialize>(msg: &T) -> String {
    serde_json::to_string(msg).unwrap_or_else(|e| {
        format!("{{\"kind\":\"error\",\"message\":\"cannot encode a reply: {e}\"}}")
    })
}

fn error_line(message: String) -> String {
    json(&MgrReply::Error { message })
}

/// Serves one connection: the handshake, then requests until the peer closes it or sends
/// something it cannot vouch for (which is answered with a bare error, then closed).
async fn connection(ctx: &Ctx, s: TcpStream, from: SocketAddr, session_id: u64) {
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let (greeting, hs) = match Session::greet(ctx.secret.clone()) {
        Ok(g) => g,
        Err(e) => {
            let _ = send(&mut w, error_line(e.to_string())).await;
            return;
        }
    };
    if !send(&mut w, json(&greeting)).await {
        return;
    }
    let hello = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_line_async(&mut r, MAX_HELLO_LINE),
    )
    .await
    {
        Ok(Ok(Some(line))) => serde_json::from_str::<Hello>(&line)
            .map_err(|e| format!("bad hello: {e} (speak through dinomo ctl or a KN)")),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => Err(format!("bad hello: {e}")),
        Err(_) => Err(format!("no hello within {}s", HANDSHAKE_TIMEOUT.as_secs())),
    };
    let accepted = hello.and_then(|h| {
        hs.accept(&h)
            .map(|(welcome, session)| (h, welcome, session))
            .map_err(|e| e.to_string())
    });
    let (hello, welcome, mut session) = match accepted {
        Ok(a) => a,
        Err(why) => {
            tracing::warn!(peer = %from, %why, "refused a connection");
            let _ = send(&mut w, error_line(why)).await;
            return;
        }
    };
    if !send(&mut w, json(&welcome)).await {
        return;
    }
    tracing::debug!(peer = %from, role = ?hello.role, id = %hello.id, session_id, "session opened");
    let peer = Peer {
        session: session_id,
        role: hello.role,
    };
    loop {
        let line = match read_line_async(&mut r, MAX_LINE).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                let _ = send(&mut w, error_line(format!("bad request: {e}"))).await;
                return;
            }
        };
        let text = match session.open(&line) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "refused a request; closing");
                let _ = send(&mut w, error_line(e.to_string())).await;
                return;
            }
        };
        let reply = match serde_json::from_str::<MgrRequest>(text.trim()) {
            Ok(req) => dispatch(ctx, peer, req).await,
            Err(e) => MgrReply::Error {
                message: format!("bad request: {e}"),
            },
        };
        if !send(&mut w, session.seal(&json(&reply))).await {
            return;
        }
    }
}

/// Answers a request: quick ones on the connection's task, ones that call the DPM or wait
/// for a map to settle on a bounded pool of blocking threads.
async fn dispatch(ctx: &Ctx, peer: Peer, req: MgrRequest) -> MgrReply {
    let error = |message: String| MgrReply::Error { message };
    let admin = matches!(
        req,
        MgrRequest::AddKn
            | MgrRequest::RemoveKn { .. }
            | MgrRequest::Rebalance { .. }
            | MgrRequest::Replicate { .. }
            | MgrRequest::Dereplicate { .. }
    );
    let store = matches!(
        req,
        MgrRequest::Register { .. } | MgrRequest::Join { .. } | MgrRequest::Leave { .. }
    );
    if admin && peer.role != Role::Ctl {
        return error("administrative requests are for operator (ctl) sessions".into());
    }
    let _permit = if admin {
        match ctx.admin.try_acquire() {
            Ok(p) => Some(p),
            Err(_) => {
                return error(format!(
                    "{ADMIN_AT_ONCE} administrative requests are under way; try again later"
                ))
            }
        }
    } else if store {
        match ctx.kn_store.acquire().await {
            Ok(p) => Some(p),
            Err(_) => return error("the manager is stopping".into()),
        }
    } else {
        return ctx.manager.handle(&peer, req);
    };
    let (m, addr) = (Arc::clone(&ctx.manager), ctx.addr);
    ctx.pool
        .run(move || answer(&m, &peer, req, addr))
        .await
        .unwrap_or_else(|| error("the manager is stopping".into()))
}

/// Answers a request; administrative ones wait (bounded) for their map to settle.
pub fn answer(m: &Manager, peer: &Peer, req: MgrRequest, addr: SocketAddr) -> MgrReply {
    let error = |message: String| MgrReply::Error { message };
    match req {
        MgrRequest::AddKn => match add_kn(m, addr) {
            Ok((kn_id, addr, reconfig)) => MgrReply::Added {
                kn_id,
                addr,
                reconfig,
            },
            Err(e) => error(e),
        },
        MgrRequest::RemoveKn { kn_id } => match remove_kn(m, kn_id) {
            Ok(reconfig) => MgrReply::Removed { kn_id, reconfig },
            Err(e) => error(e),
        },
        MgrRequest::Rebalance { slots, to } => match rebalance(m, slots, to) {
            Ok(reconfig) => MgrReply::Rebalanced { reconfig },
            Err(e) => error(e),
        },
        MgrRequest::Replicate { key } | MgrRequest::Dereplicate { key }
            if key_from_hex(&key).is_none() =>
        {
            error(format!("key {key:?} is not hexadecimal"))
        }
        MgrRequest::Replicate { key } => {
            match replicate(m, &key_from_hex(&key).unwrap_or_default()) {
                Ok(()) => MgrReply::Replication {
                    replicas: m.replicas(),
                },
                Err(e) => error(e),
            }
        }
        MgrRequest::Dereplicate { key } => {
            match dereplicate(m, &key_from_hex(&key).unwrap_or_default()) {
                Ok(()) => MgrReply::Replication {
                    replicas: m.replicas(),
                },
                Err(e) => error(e),
            }
        }
        req => m.handle(peer, req),
    }
}

/// The ticker: upkeep every `every` (or, after this process was not scheduled for a
/// while, extending the leases by the pause) and the load policy every period.
fn ticks(
    m: &Arc<Manager>,
    every: Duration,
    stop: &AtomicBool,
    busy: &Arc<AtomicBool>,
    addr: SocketAddr,
) {
    let lease = m.config().lease;
    let mut last = Instant::now();
    let mut last_policy = Instant::now();
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(
            every
                .saturating_sub(last.elapsed())
                .max(Duration::from_millis(1)),
        );
        let gap = last.elapsed();
        last = Instant::now();
        if gap > lease / 4 {
            // Renewals may be waiting unread: a lease that looks expired may not be.
            m.extend_leases(gap);
        } else {
            m.tick();
        }
        if let Some(p) = m.policy_period() {
            if last_policy.elapsed() >= p {
                run_policy(m, busy, addr);
                last_policy = Instant::now();
            }
        }
    }
}

/// Waits (bounded) until `done` holds.
fn wait_for(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if done() {
            return true;
        }
        if t0.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a KN and waits until it serves its slots.
fn add_kn(m: &Manager, addr: SocketAddr) -> Result<(u16, String, Option<Reconfig>), String> {
    let (kn_id, kn_addr) = m.spawn_kn(addr)?;
    if wait_for(ADMIN_WAIT, || m.kn_serving(kn_id)) {
        Ok((kn_id, kn_addr, m.reconfig(m.epoch())))
    } else {
        Err(format!(
            "KN {kn_id} ({kn_addr}) started but the map (epoch {}) did not settle within {}s",
            m.epoch(),
            ADMIN_WAIT.as_secs()
        ))
    }
}

/// Marks `kn` draining and waits until it has left and the map without it settled.
fn remove_kn(m: &Manager, kn: u16) -> Result<Option<Reconfig>, String> {
    m.mark_draining(kn)?;
    if !wait_for(ADMIN_WAIT, || !m.has_kn(kn)) {
        return Err(format!(
            "KN {kn} did not leave within {}s; it stays marked draining",
            ADMIN_WAIT.as_secs()
        ));
    }
    let _ = wait_for(ADMIN_WAIT, || m.is_settled());
    Ok(m.departure_of(kn))
}

/// Recomputes the map (or moves one slot range) and waits for it to settle.
fn rebalance(
    m: &Manager,
    slots: Option<(u16, u16)>,
    to: Option<u16>,
) -> Result<Option<Reconfig>, String> {
    let Some(epoch) = m.rebalance(slots, to)? else {
        return Ok(None);
    };
    if !wait_for(ADMIN_WAIT, || m.settled_or_superseded(epoch)) {
        return Err(format!(
            "map epoch {epoch} did not settle within {}s",
            ADMIN_WAIT.as_secs()
        ));
    }
    Ok(m.reconfig(epoch))
}

/// One replication at a time: each takes several maps, each waited for.
static REPLICATING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits until the map published by a replication step settled: every live KN installed
/// it (a later map that settled was installed after it).
fn wait_step(m: &Manager, epoch: u64, what: &str) -> Result<(), String> {
    if wait_for(ADMIN_WAIT, || m.is_settled() && m.epoch() >= epoch) {
        Ok(())
    } else {
        Err(format!(
            "{what}: map epoch {epoch} did not settle within {}s",
            ADMIN_WAIT.as_secs()
        ))
    }
}

/// Replicates `key` on every live KN: its owner allocates the key's cell at the DPM,
/// then every KN serves it through the cell. A failure leaves the key where it got
/// (`dereplicate` takes it back from any step).
fn replicate(m: &Manager, key: &[u8]) -> Result<(), String> {
    let _one = REPLICATING.lock().unwrap_or_else(|e| e.into_inner());
    let shown = String::from_utf8_lossy(key).into_owned();
    let epoch = m.replica_step(key, ReplicaStep::Begin)?;
    let has_cell = || m.replica(key).is_some_and(|r| r.cell.is_some());
    let begun = wait_for(ADMIN_WAIT, || {
        m.replica_refused(key).is_some() || (has_cell() && m.is_settled() && m.epoch() >= epoch)
    });
    if let Some(why) = m.replica_refused(key).filter(|_| !has_cell()) {
        // Back to its owner alone at once (the key is answered TRYAGAIN until then).
        dereplicate_held(m, key)?;
        return Err(format!("cannot replicate {shown:?}: {why}"));
    }
    if !begun {
        return Err(format!(
            "the owner of {shown:?} did not report its cell within {}s (the key stays in \
             phase begin, answered TRYAGAIN: dereplicate it)",
            ADMIN_WAIT.as_secs()
        ));
    }
    let epoch = m.replica_step(key, ReplicaStep::Serve)?;
    wait_step(m, epoch, "serving from replicas")?;
    tracing::info!(key = %shown, replicas = ?m.replica(key).map(|r| r.kns), "key replicated");
    Ok(())
}

/// Returns `key` to its owner alone: the other KNs stop serving it and merge their
/// writes of it, then the owner frees its cell (the DPM installs its newest entry in the
/// index), then the map stops listing it. Every acknowledged write is in the index then.
fn dereplicate(m: &Manager, key: &[u8]) -> Result<(), String> {
    let _one = REPLICATING.lock().unwrap_or_else(|e| e.into_inner());
    dereplicate_held(m, key)
}

/// [`dereplicate`] by the holder of `REPLICATING`.
fn dereplicate_held(m: &Manager, key: &[u8]) -> Result<(), String> {
    let shown = String::from_utf8_lossy(key).into_owned();
    let Some(r) = m.replica(key) else {
        return Err(format!("{shown:?} is not replicated"));
    };
    // A key whose cell was never reported may still have one: the owner ends it anyway
    // (it knows its cell if it allocated one).
    if matches!(r.phase, ReplicaPhase::Serving | ReplicaPhase::Begin) {
        let epoch = m.replica_step(key, ReplicaStep::Ending)?;
        wait_step(m, epoch, "dropping the replicas")?;
    }
    if r.phase != ReplicaPhase::End {
        let epoch = m.replica_step(key, ReplicaStep::End)?;
        wait_step(m, epoch, "freeing the cell")?;
    }
    let epoch = m.replica_step(key, ReplicaStep::Remove)?;
    wait_step(m, epoch, "serving from the index")?;
    tracing::info!(key = %shown, "key dereplicated");
    Ok(())
}

/// One round of the load policy; an action runs in a thread of its own, one at a time.
fn run_policy(m: &Arc<Manager>, busy: &Arc<AtomicBool>, addr: SocketAddr) {
    for a in m.policy_actions() {
        if busy.swap(true, Ordering::AcqRel) {
            tracing::info!(action = ?a, "policy: an earlier action is still under way");
            continue;
        }
        tracing::info!(action = ?a, "policy decision");
        let (m, done) = (Arc::clone(m), Arc::clone(busy));
        let spawned = std::thread::Builder::new()
            .name("manager-policy".into())
            .spawn(move || {
                let r = match a {
                    PolicyAction::AddKn => add_kn(&m, addr).map(|_| ()),
                    PolicyAction::RemoveKn(kn) => remove_kn(&m, kn).map(|_| ()),
                    PolicyAction::Replicate(key) => replicate(&m, &key),
                    PolicyAction::Dereplicate(key) => dereplicate(&m, &key),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "policy action failed");
                }
                done.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            busy.store(false, Ordering::Release);
        }
    }
}
