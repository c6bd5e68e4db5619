//! Client connections: RESP framing, routing each key to its owner shard (or refusing it
//! with `MOVED`/`TRYAGAIN`), and the data commands.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::entry::MAX_KEY_LEN;
use dinomo_shared::manager_proto::ReplicaPhase;
use dinomo_shared::resp::{CommandParser, Limits, Out, Proto};
use dinomo_shared::slot::key_slot;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::acl::{command_id, keys_for_acl, runs_without_auth};
use super::cmd;
use super::commands::{upper, ClientReg};
use super::{Shared, View};
use crate::ownership::shard_of;
use crate::shard::{
    LocalShard, Msg, ReplyFn, ReplyResult, ReplySlots, ReplyTo, Request, ShardTx, Task,
};
use crate::KvError;

/// Accepts client connections until `stop` is set, the lease is lost, or the manager asked
/// this KN to leave.
pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve(Arc::clone(&shared), s, peer));
                }
                Err(e) => {
                    // Out of file descriptors (or memory): retrying at once would spin, and
                    // a connection that closes meanwhile is what frees one.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
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

/// One in this many gets served in place has its latency measured.
const LATENCY_SAMPLE: u64 = 8;

/// Redis's limits for a connection that has not authenticated yet: a handful of short
/// arguments is all AUTH and HELLO need, so an unauthenticated client cannot make the KN
/// buffer a large command.
const UNAUTHENTICATED: Limits = Limits {
    max_bulk: 16 << 10,
    max_args: 10,
    max_inline: 64 << 10,
};

/// How long, and for how many bytes, a connection closed for an error keeps reading (and
/// dropping) what its client still sends, so that the close does not reset the connection
/// before the client read the error.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 << 20;

/// Per-connection state.
pub(super) struct Conn {
    pub(super) shared: Arc<Shared>,
    pub(super) view: Arc<View>,
    version: u64,
    pub(super) proto: Proto,
    /// The user this connection is logged in as (an index into the ACL), if any.
    pub(super) user: Option<usize>,
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) name: Option<Vec<u8>>,
    pub(super) lib: (Option<Vec<u8>>, Option<Vec<u8>>),
    /// This connection's stripe of the latency histogram (its shard thread's: connections
    /// of one thread share a stripe, no two threads do).
    stripe: usize,
    /// Gets served in place so far (every `LATENCY_SAMPLE`-th is timed).
    served: u64,
    /// The ACL ids of the commands served in place.
    ids: FastIds,
    /// `MULTI` and `WATCH` state.
    pub(super) tx: super::txn::TxState,
    /// This connection's entry in the registry `CLIENT LIST` reads.
    pub(super) reg: ClientReg,
}

/// The ACL ids of `GET` and `SET`, looked up once per connection.
#[derive(Clone, Copy)]
struct FastIds {
    get: Option<usize>,
    set: Option<usize>,
}

/// One counted client connection; uncounted when dropped.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Writes `line` (an error frame) and closes the connection.
async fn refuse<S: Stream>(sock: &mut S, line: &str) {
    let mut out = Vec::new();
    Out {
        buf: &mut out,
        proto: Proto::Resp2,
    }
    .error(line);
    // No lingering: refusals are what a flood of connections gets, and each must cost
    // nothing once answered.
    if sock.write_all(&out).await.is_ok() {
        let _ = sock.shutdown().await;
    }
}

async fn linger_close<S: Stream>(sock: &mut S) {
    let _ = sock.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut scratch = vec![0u8; 16 << 10];
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, sock.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            _ => break,
        }
    }
}

/// A client's byte stream: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// How long a TLS client may take to finish its handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// One accepted connection: counted against `maxclients` from the start (a TLS handshake
/// in progress counts too) and checked against protected mode, then placed on a shard
/// thread, which serves it to the end (TLS handshake included).
async fn serve(shared: Arc<Shared>, mut sock: TcpStream, peer: SocketAddr) {
    let open = shared.clients.fetch_add(1, Ordering::AcqRel);
    let slot = ClientSlot(Arc::clone(&shared));
    let refusal = if open >= shared.intro.maxclients() {
        Some("ERR max number of clients reached")
    } else if shared.protected_mode && !shared.acl.requires_auth() && !peer.ip().is_loopback() {
        Some(
            "DENIED this node runs in protected mode: no password is set, so only loopback \
             clients are served. Start it with --requirepass-file or --acl-file, or with \
             --protected-mode no if another layer guards the network",
        )
    } else {
        None
    };
    match (&shared.tls, refusal) {
        (None, Some(line)) => return refuse(&mut sock, line).await,
        // Over TLS a refusal is not worth a handshake: the connection is just closed.
        (Some(_), Some(_)) => return,
        _ => {}
    }
    let Ok(std_sock) = sock.into_std() else {
        return;
    };
    // Connections are spread over the shard threads in turn; each then serves the keys of
    // its own shard in place and hands the others over in batches.
    let n = shared.shards.len().max(1);
    let shard = shared.placed.fetch_add(1, Ordering::Relaxed) as usize % n;
    let Some(queue) = shared.shards.get(shard).cloned() else {
        return;
    };
    let task = Task(Box::new(move |local: LocalShard| {
        tokio::task::spawn_local(async move {
            let _slot = slot;
            let Ok(sock) = TcpStream::from_std(std_sock) else {
                return;
            };
            local.connection(true);
            match shared.tls.clone() {
                None => connection(shared, sock, peer, &local).await,
                Some(cfg) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    // A peer that never finishes its handshake holds its slot only so long.
                    match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(sock)).await {
                        Ok(Ok(tls)) => connection(shared, tls, peer, &local).await,
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            local.connection(false);
        });
    }));
    // A stopped shard drops the connection (the KN is going away).
    let _ = queue.send(Msg::Task(task));
}

async fn connection<S: Stream>(
    shared: Arc<Shared>,
    mut sock: S,
    peer: SocketAddr,
    local: &LocalShard,
) {
    let client = shared.client;
    let version = shared.version.load(Ordering::Acquire);
    let id = shared.conns.fetch_add(1, Ordering::Relaxed);
    let stripe = usize::from(local.index());
    let user = shared.acl.initial_user();
    let reg = ClientReg::new(&shared, id + 1, peer, stripe, user);
    let mut c = Conn {
        view: shared.view(),
        user,
        shared,
        version,
        proto: Proto::Resp2,
        id: id + 1,
        peer,
        name: None,
        lib: (None, None),
        stripe,
        served: 0,
        ids: FastIds {
            get: command_id("GET"),
            set: command_id("SET"),
        },
        tx: Default::default(),
        reg,
    };
    let mut round = Round::new(Rc::clone(local), c.shared.shards.len());
    let window = c.window();
    let mut parser = CommandParser::default();
    let mut inbuf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut out: Vec<u8> = Vec::with_capacity(16 << 10);
    loop {
        let mut pos = 0;
        let mut close = false;
        let mut commands = 0;
        let busy_from = Instant::now();
        loop {
            let limits = if c.user.is_some() {
                c.shared.limits
            } else {
                UNAUTHENTICATED
            };
            match parser.feed(&inbuf[pos..], &limits) {
                Ok((n, Some(mut args))) => {
                    pos += n;
                    if args.is_empty() {
                        continue;
                    }
                    commands += 1;
                    // GET and SET are served in place or batched; their replies are put in
                    // order when the round ends. Anything else runs now, after what this
                    // connection sent other shards so far, so every shard sees the commands
                    // in order.
                    if !c.fast(&mut args, &mut round, &mut out) {
                        round.send_batches(&c.shared);
                        let t0 = Instant::now();
                        let quit = c.exec(&mut args, &mut out).await;
                        c.shared.latency.record(stripe, t0.elapsed());
                        if quit {
                            close = true;
                            break;
                        }
                    }
                    // Memory stays bounded as for MGET: at most `window` values of other
                    // shards wait in a round, and the output goes out past 1 MiB.
                    if out.len() > 1 << 20 || round.remote_gets >= window {
                        round.finish(&mut out, c.proto, &c.shared, stripe).await;
                        if sock.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
                Ok((n, None)) => {
                    pos += n;
                    break;
                }
                Err(e) => {
                    let why = if c.user.is_none() {
                        " (before AUTH a command may have at most 10 arguments of at most \
                         16384 bytes)"
                    } else {
                        ""
                    };
                    round.finish(&mut out, c.proto, &c.shared, stripe).await;
                    Out {
                        buf: &mut out,
                        proto: c.proto,
                    }
                    .error(&format!("ERR {e}{why}"));
                    close = true;
                    break;
                }
            }
        }
        local.add_busy(busy_from.elapsed());
        c.reg.read(commands, busy_from);
        // One group commit for the writes of the whole read, then the replies in order.
        round.finish(&mut out, c.proto, &c.shared, stripe).await;
        inbuf.drain(..pos);
        if !close && parser.held() + inbuf.len() > client.query_buffer {
            Out {
                buf: &mut out,
                proto: c.proto,
            }
            .error(&format!(
                "ERR Protocol error: the command exceeds client-query-buffer-limit ({} \
                 bytes); closing the connection",
                client.query_buffer
            ));
            close = true;
        }
        if !out.is_empty() {
            if sock.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            linger_close(&mut sock).await;
            return;
        }
        // A large buffer that was emptied is given back.
        if inbuf.is_empty() && inbuf.capacity() > 1 << 20 {
            inbuf = Vec::with_capacity(16 << 10);
        }
        // Memory stays bounded: a read adds at most the spare capacity, and the buffer was
        // checked against the limit above.
        inbuf.reserve(16 << 10);
        let read = sock.read_buf(&mut inbuf);
        let timeout = c.shared.intro.timeout();
        let got = if timeout.is_zero() {
            read.await
        } else {
            match tokio::time::timeout(timeout, read).await {
                Ok(r) => r,
                // Idle for `timeout`: closed without a reply, as Redis does.
                Err(_) => {
                    let _ = sock.shutdown().await;
                    return;
                }
            }
        };
        match got {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Which command a reply still to come answers.
#[derive(Clone, Copy)]
enum Kind {
    Get,
    Set,
}

/// Where a reply still to come will be.
#[derive(Clone, Copy)]
enum Src {
    /// A slot of the round's own shard's replies.
    Local(usize),
    /// Reply `index` of batch `batch`.
    Remote { batch: usize, index: usize },
}

/// A reply still to come, and where in the output it goes.
struct Piece {
    at: usize,
    kind: Kind,
    src: Src,
    since: Instant,
}

/// The requests of another shard in one round.
struct Batch {
    shard: usize,
    ops: Vec<Request>,
    wait: Option<tokio::sync::oneshot::Receiver<Vec<Option<ReplyResult>>>>,
    results: Vec<Option<ReplyResult>>,
}

/// The GETs and SETs of one read of a connection: those of this thread's shard are served
/// in place (a SET is staged and answered at the round's group commit), those of other
/// shards go there as one batch per shard. The replies are put in command order.
struct Round {
    local: LocalShard,
    mine: usize,
    slots: Rc<RefCell<ReplySlots>>,
    pieces: Vec<Piece>,
    batches: Vec<Batch>,
    /// The open (unsent) batch of each shard, as an index into `batches`.
    open: Vec<Option<usize>>,
    /// GETs of other shards in this round (their values wait here until it ends).
    remote_gets: usize,
    scratch: Vec<u8>,
}

impl Round {
    fn new(local: LocalShard, shards: usize) -> Self {
        Self {
            mine: local.index() as usize,
            local,
            slots: Rc::new(RefCell::new(ReplySlots::new(None))),
            pieces: Vec::new(),
            batches: Vec::new(),
            open: vec![None; shards],
            remote_gets: 0,
            scratch: Vec::new(),
        }
    }

    /// Queues `op` for `shard` (another shard's) and notes where its reply goes.
    fn remote(&mut self, shard: usize, op: Request, kind: Kind, at: usize) {
        let batch = match self.open.get(shard).copied().flatten() {
            Some(b) => b,
            None => {
                self.batches.push(Batch {
                    shard,
                    ops: Vec::new(),
                    wait: None,
                    results: Vec::new(),
                });
                let b = self.batches.len() - 1;
                if let Some(o) = self.open.get_mut(shard) {
                    *o = Some(b);
                }
                b
            }
        };
        let index = self.batches[batch].ops.len();
        self.batches[batch].ops.push(op);
        if matches!(kind, Kind::Get) {
            self.remote_gets += 1;
        }
        self.pieces.push(Piece {
            at,
            kind,
            src: Src::Remote { batch, index },
            since: Instant::now(),
        });
    }

    /// Stages a write on this thread's shard and notes where its reply goes.
    fn local_write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, at: usize) {
        let slot = ReplySlots::push(&self.slots);
        let index = slot.index();
        self.local.write(key, value, ReplyTo::Slot(slot));
        self.pieces.push(Piece {
            at,
            kind: Kind::Set,
            src: Src::Local(index),
            since: Instant::now(),
        });
    }

    /// Sends the open batches to their shards.
    fn send_batches(&mut self, shared: &Shared) {
        for o in self.open.iter_mut() {
            let Some(b) = o.take() else { continue };
            let batch = &mut self.batches[b];
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ops = std::mem::take(&mut batch.ops);
            let n = ops.len();
            match shared.shards.get(batch.shard) {
                Some(q) if q.send(Msg::Batch { ops, done: tx }).is_ok() => batch.wait = Some(rx),
                _ => batch.results = (0..n).map(|_| Some(Err(KvError::ShuttingDown))).collect(),
            }
        }
    }

    /// Waits for every reply of the round and puts them, in command order, at their places
    /// in `out`.
    async fn finish(&mut self, out: &mut Vec<u8>, proto: Proto, shared: &Shared, stripe: usize) {
        if self.pieces.is_empty() {
            return;
        }
        self.send_batches(shared);
        if self.slots.borrow().left() > 0 {
            self.local.flush_soon();
            std::future::poll_fn(|cx| {
                let mut s = self.slots.borrow_mut();
                if s.left() == 0 {
                    std::task::Poll::Ready(())
                } else {
                    s.wake_when_done(cx.waker());
                    std::task::Poll::Pending
                }
            })
            .await;
        }
        for b in &mut self.batches {
            if let Some(w) = b.wait.take() {
                b.results = w.await.unwrap_or_default();
            }
        }
        let now = Instant::now();
        let tmp = &mut self.scratch;
        tmp.clear();
        let mut from = 0;
        for p in self.pieces.drain(..) {
            tmp.extend_from_slice(&out[from..p.at]);
            from = p.at;
            let r = match p.src {
                Src::Local(i) => self.slots.borrow_mut().take(i),
                Src::Remote { batch, index } => self.batches[batch]
                    .results
                    .get_mut(index)
                    .and_then(Option::take),
            };
            let r = r.unwrap_or(Err(KvError::ShuttingDown));
            let mut o = Out { buf: tmp, proto };
            match (p.kind, r) {
                (Kind::Get, Ok(Some(v))) => o.bulk(&v),
                (Kind::Get, Ok(None)) => o.null(),
                (Kind::Set, Ok(_)) => o.simple("OK"),
                (_, Err(e)) => o.error(&kv_error(&e)),
            }
            shared.latency.record(stripe, now - p.since);
        }
        tmp.extend_from_slice(&out[from..]);
        std::mem::swap(out, tmp);
        self.batches.clear();
        self.remote_gets = 0;
        self.slots.borrow_mut().clear();
    }
}

/// Where a key's request goes.
enum Route {
    /// To this shard of this KN.
    Shard(usize),
    /// Refused with this error line.
    Refuse(String),
}

/// Sends one request to a shard and waits for its answer.
async fn call(tx: &ShardTx, op: Request) -> Result<Option<Vec<u8>>, KvError> {
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

pub(super) fn kv_error(e: &KvError) -> String {
    match e {
        KvError::WrongOwner { .. } => "TRYAGAIN the slot is changing owner".into(),
        e @ KvError::TryAgain { .. } => e.to_string(),
        KvError::ShuttingDown => "TRYAGAIN the node is shutting down".into(),
        KvError::RegionFull => crate::error::REGION_FULL_REPLY.into(),
        e => format!("ERR {e}"),
    }
}

impl Conn {
    pub(super) fn refresh(&mut self) {
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
        Route::Shard(shard_of(slot, self.shared.shards.len()))
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

    /// Whether this KN serves every one of `keys` as a replica (or owner) of a replicated
    /// key; `Err`: one of them is between owner-only and replicated (answer `-TRYAGAIN`).
    fn replicated_here(&self, keys: &[&[u8]]) -> Result<bool, String> {
        let v = &self.view;
        if v.replicas.is_empty() {
            return Ok(false);
        }
        let me = self.shared.kn_id;
        let mut all = true;
        for k in keys {
            match v.replicas.get(*k) {
                Some(r) if matches!(r.phase, ReplicaPhase::Begin | ReplicaPhase::End) => {
                    return Err("TRYAGAIN the key's replication is beginning or ending".into());
                }
                Some(r) if r.cell.is_some() && (r.owner == me || r.kns.contains(&me)) => {}
                _ => all = false,
            }
        }
        Ok(all)
    }

    /// The shard for `keys` (all in one slot), or the error to answer. Keys this KN serves
    /// as a replica go to its own shard whoever owns their slot; the others go by slot.
    pub(super) fn shard_index(&mut self, keys: &[&[u8]]) -> Result<usize, String> {
        self.refresh();
        let slot = self.slot_of(keys)?;
        if self.replicated_here(keys)? {
            if !self.shared.lease_ok() {
                return Err("TRYAGAIN this node's lease is being renewed".into());
            }
            return Ok(shard_of(slot, self.shared.shards.len()));
        }
        match self.route(slot) {
            Route::Shard(i) => Ok(i),
            Route::Refuse(e) => Err(e),
        }
    }

    /// The queue of the shard for `keys` ([`Conn::shard_index`]).
    pub(super) fn shard_for(&mut self, keys: &[&[u8]]) -> Result<ShardTx, String> {
        let i = self.shard_index(keys)?;
        self.shared
            .shards
            .get(i)
            .cloned()
            .ok_or_else(|| "TRYAGAIN the node is shutting down".to_owned())
    }

    /// Serves a plain `GET key` or `SET key value` of an authenticated client that may run
    /// it on every key, if `args` is one: in place when this thread's shard owns the key
    /// (a cached value is copied straight into the reply), else batched for the owner
    /// shard. False: `args` takes the general path (which also answers every error).
    fn fast(&mut self, args: &mut [Vec<u8>], round: &mut Round, out: &mut Vec<u8>) -> bool {
        if self.tx.in_multi() {
            return false;
        }
        let (kind, id) = match args.len() {
            2 if args[0].eq_ignore_ascii_case(b"GET") => (Kind::Get, self.ids.get),
            3 if args[0].eq_ignore_ascii_case(b"SET") => (Kind::Set, self.ids.set),
            _ => return false,
        };
        let (Some(user), Some(id)) = (self.user, id) else {
            return false;
        };
        let u = self.shared.acl.user(user);
        if !u.all_keys() || u.check(id, &[]).is_err() {
            return false;
        }
        if matches!(kind, Kind::Set) && args[2].len() > self.shared.max_value {
            return false;
        }
        let Ok(shard) = self.shard_index(&[&args[1]]) else {
            return false;
        };
        let at = out.len();
        let key = std::mem::take(&mut args[1]);
        match kind {
            Kind::Get if shard == round.mine => {
                // A get served in place takes about a microsecond: one in LATENCY_SAMPLE
                // is timed, standing for the others (two clock reads would be a few
                // percent of it).
                self.served += 1;
                let t0 = (self.served % LATENCY_SAMPLE == 0).then(Instant::now);
                let proto = self.proto;
                round.local.get(&key, &mut |r| {
                    let mut o = Out { buf: out, proto };
                    match r {
                        Ok(Some(v)) => o.bulk(v),
                        Ok(None) => o.null(),
                        Err(e) => o.error(&kv_error(&e)),
                    }
                });
                if let Some(t0) = t0 {
                    self.shared
                        .latency
                        .record_n(self.stripe, t0.elapsed(), LATENCY_SAMPLE);
                }
            }
            Kind::Get => round.remote(shard, Request::Get { key }, kind, at),
            Kind::Set => {
                let value = std::mem::take(&mut args[2]);
                if shard == round.mine {
                    round.local_write(key, Some(value), at);
                } else {
                    round.remote(shard, Request::Put { key, value }, kind, at);
                }
            }
        }
        true
    }

    /// How many reads one multi-key command keeps in flight: as many as fit the reply
    /// limit at the largest value size, so that values waiting to be taken stay within it.
    fn window(&self) -> usize {
        (self.shared.client.reply / self.shared.max_value.max(1)).clamp(1, 4096)
    }

    /// `AUTH` (and `HELLO ... AUTH`): logs in as `user`, or answers `WRONGPASS` and leaves
    /// the connection as it was.
    fn auth(&mut self, user: &[u8], password: &[u8], o: &mut Out<'_>) -> bool {
        match self.shared.acl.authenticate(user, password) {
            Some(u) => {
                self.user = Some(u);
                self.sync_client();
                o.simple("OK");
                true
            }
            None => {
                tracing::info!(peer = %self.peer, user = %String::from_utf8_lossy(user), "AUTH failed");
                o.error("WRONGPASS invalid username-password pair or user is disabled.");
                false
            }
        }
    }

    /// Executes one command; returns whether to close the connection afterwards.
    async fn exec(&mut self, args: &mut Vec<Vec<u8>>, buf: &mut Vec<u8>) -> bool {
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
        // Authentication and ACL rules come first: a client that may not run a command
        // learns nothing from it, not even whether its arguments were right.
        if !runs_without_auth(&name) {
            let Some(user) = self.user else {
                o.error("NOAUTH Authentication required.");
                return false;
            };
            if let Some(id) = command_id(&name) {
                let user = self.shared.acl.user(user);
                // Most users may touch every key: then no key list is built per request.
                let keys = if user.all_keys() {
                    Vec::new()
                } else {
                    keys_of(&name, args)
                };
                if let Err(e) = user.check(id, &keys) {
                    o.error(&e);
                    return false;
                }
            } else if cmd::serves(&name) {
                // A command of a type this node does not hold (not in the table, so no ACL
                // rule names it) only tells whether a key holds a string: answered to a
                // user who may read the type of every key, the unknown-command error for
                // everyone else.
                let user = self.shared.acl.user(user);
                let may_type = command_id("TYPE").is_some_and(|t| user.check(t, &[]).is_ok());
                if !(user.all_keys() && may_type) {
                    o.error(&unknown_command(args));
                    return false;
                }
            }
        }
        if self.tx.in_multi()
            && !matches!(
                name.as_str(),
                "EXEC" | "DISCARD" | "MULTI" | "WATCH" | "QUIT" | "RESET"
            )
        {
            self.queue(&name, std::mem::take(args), &mut o);
            return false;
        }
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
            "AUTH" => match argc {
                2 if self.shared.acl.initial_user().is_some()
                    && !self.shared.acl.default_has_password() =>
                {
                    o.error(
                        "ERR AUTH <password> called without any password configured for the \
                         default user. Are you sure your configuration is correct?",
                    )
                }
                2 => {
                    self.auth(b"default", &args[1], &mut o);
                }
                3 => {
                    self.auth(&args[1], &args[2], &mut o);
                }
                1 => arity(&mut o),
                _ => o.error("ERR syntax error"),
            },
            "RESET" if argc == 1 => {
                self.proto = Proto::Resp2;
                self.user = self.shared.acl.initial_user();
                self.name = None;
                self.lib = (None, None);
                self.reset_tx();
                self.sync_client();
                o.proto = Proto::Resp2;
                o.simple("RESET");
            }
            "SELECT" if argc == 2 => {
                if args[1] == b"0" {
                    o.simple("OK")
                } else {
                    o.error("ERR SELECT is not allowed in cluster mode")
                }
            }
            // Reading from replicas: every KN a key is replicated on serves its reads and
            // writes alike (through the key's cell, linearizably), whatever the flag says;
            // other keys are served by their owner (a Redis primary answers OK too).
            "READONLY" | "READWRITE" if argc == 1 => o.simple("OK"),
            "CLIENT" if argc >= 2 => self.client(args, &mut o),
            "COMMAND" => self.command(args, &mut o),
            "TIME" if argc == 1 => self.time(&mut o),
            "LASTSAVE" if argc == 1 => self.lastsave(&mut o),
            "CONFIG" if argc >= 2 => self.config(args, &mut o).await,
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
            "MGET" if argc >= 2 => {
                let keys: Vec<&[u8]> = args[1..].iter().map(Vec::as_slice).collect();
                match self.shard_for(&keys) {
                    Err(e) => o.error(&e),
                    Ok(tx) => {
                        let limit = self.shared.client.reply;
                        let mut vals = Vec::with_capacity(keys.len().min(1024));
                        let mut bytes = 0usize;
                        let fetched = fetch(&tx, &keys, self.window(), |_, v| {
                            // What the reply frame will take: the data and its header.
                            bytes += v.as_ref().map_or(5, |v| v.len() + 16);
                            vals.push(v);
                            if bytes > limit {
                                Err(Stop::TooLarge)
                            } else {
                                Ok(())
                            }
                        })
                        .await;
                        match fetched {
                            Ok(()) => {
                                o.array(vals.len());
                                for v in vals {
                                    match v {
                                        Some(v) => o.bulk(&v),
                                        None => o.null(),
                                    }
                                }
                            }
                            Err(Stop::TooLarge) => {
                                o.error(&format!(
                                    "ERR the reply would exceed client-reply-limit ({limit} \
                                     bytes); closing the connection"
                                ));
                                return true;
                            }
                            Err(Stop::Kv(e)) => o.error(&kv_error(&e)),
                        }
                    }
                }
            }
            "MULTI" if argc == 1 => self.multi(&mut o),
            "EXEC" if argc == 1 => self.exec_multi(&mut o).await,
            "DISCARD" if argc == 1 => self.discard(&mut o),
            "WATCH" if argc >= 2 => self.watch(args, &mut o).await,
            "UNWATCH" if argc == 1 => self.unwatch(&mut o),
            "WAIT" if argc == 3 => self.wait(args, &mut o),
            // Walks of the keyspace (server/walk.rs).
            "SCAN" if argc >= 2 => self.scan(args, &mut o).await,
            "KEYS" if argc == 2 => self.keys(&args[1], &mut o).await,
            "DBSIZE" if argc == 1 => self.dbsize(&mut o).await,
            "RANDOMKEY" if argc == 1 => self.randomkey(&mut o).await,
            "FLUSHALL" | "FLUSHDB" if argc <= 2 => self.flushall(args, &mut o).await,
            "CLUSTER"
                if argc >= 3
                    && matches!(
                        (upper(&args[1]).as_str(), argc),
                        ("COUNTKEYSINSLOT", 3) | ("GETKEYSINSLOT", 4)
                    ) =>
            {
                self.cluster_keys(args, &mut o).await
            }
            "SCAN" | "KEYS" | "DBSIZE" | "RANDOMKEY" | "FLUSHALL" | "FLUSHDB" => arity(&mut o),
            n if n != "MGET" && cmd::serves(n) => {
                self.data_command(n, std::mem::take(args), &mut o).await
            }
            "INFO" => {
                // The keyspace section counts this node's keys by a walk of the index: only
                // when it is shown.
                let shown = argc == 1
                    || args[1..].iter().any(|a| {
                        ["default", "all", "everything", "keyspace"]
                            .iter()
                            .any(|s| a.eq_ignore_ascii_case(s.as_bytes()))
                    });
                let keyspace = if shown {
                    self.count_keys().await.ok()
                } else {
                    None
                };
                self.info_command(args, keyspace, &mut o).await
            }
            "CLUSTER" if argc >= 2 => {
                self.refresh();
                self.cluster(args, &mut o);
            }
            "GET" | "MGET" | "ECHO" | "SELECT" | "CLUSTER" | "CLIENT" | "CONFIG" | "RESET"
            | "READONLY" | "READWRITE" | "MULTI" | "EXEC" | "DISCARD" | "WATCH" | "UNWATCH"
            | "WAIT" | "TIME" | "LASTSAVE" => arity(&mut o),
            _ => o.error(&unknown_command(args)),
        }
        false
    }
}

/// Redis's answer to a command it does not know (the error line without its `-`).
pub(super) fn unknown_command(args: &[Vec<u8>]) -> String {
    let mut b = Vec::new();
    cmd::unknown_command(
        args,
        &mut Out {
            buf: &mut b,
            proto: Proto::Resp2,
        },
    );
    String::from_utf8_lossy(b.get(1..b.len().saturating_sub(2)).unwrap_or_default()).into_owned()
}

/// Why [`fetch`] stopped early.
enum Stop {
    Kv(KvError),
    /// The reply would exceed `client-reply-limit`.
    TooLarge,
}

impl From<KvError> for Stop {
    fn from(e: KvError) -> Self {
        Self::Kv(e)
    }
}

/// Gets `keys` from one shard, handing each value (in key order) to `each`, with at most
/// `window` requests in flight: values wait in their channels until taken, so the window
/// bounds what a command naming one large value many times makes the KN hold.
async fn fetch<E: From<KvError>>(
    tx: &ShardTx,
    keys: &[&[u8]],
    window: usize,
    mut each: impl FnMut(usize, Option<Vec<u8>>) -> Result<(), E>,
) -> Result<(), E> {
    let mut waits = VecDeque::with_capacity(window.min(keys.len()));
    let mut next = 0;
    for i in 0..keys.len() {
        while next < keys.len() && waits.len() < window.max(1) {
            let (otx, orx) = tokio::sync::oneshot::channel();
            tx.send(Msg::ReqFn {
                op: Request::Get {
                    key: keys[next].to_vec(),
                },
                tag: 0,
                reply: ReplyFn(Box::new(move |r| {
                    let _ = otx.send(r.result);
                })),
            })
            .map_err(|_| E::from(KvError::ShuttingDown))?;
            waits.push_back(orx);
            next += 1;
        }
        let Some(w) = waits.pop_front() else {
            break;
        };
        let v = w.await.map_err(|_| KvError::ShuttingDown)??;
        each(i, v)?;
    }
    Ok(())
}

/// The keys a command names (what ACL key patterns are checked against): those its key
/// specifications in the command table find, for every command the table has.
fn keys_of<'a>(_name: &str, args: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    keys_for_acl(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::acl::tests::keys_at_positions;
    use crate::server::acl::{command_count, command_entry};
    use dinomo_shared::resp::{parse_value, Limits, Out, Proto, Value};

    /// The keys a cluster client finds from a `COMMAND` entry, the way redis-py does:
    /// positions first..=last (negative: from the end) by step.
    fn keys_by_spec<'a>(entry: &Value, args: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
        let Value::Array(e) = entry else {
            panic!("entry {entry:?}")
        };
        let int = |i: usize| match &e[i] {
            Value::Int(v) => *v,
            other => panic!("field {i}: {other:?}"),
        };
        keys_at_positions((int(3), int(4), int(5)), args)
    }

    /// `COMMAND` describes every command with the same keys the ACL checks use and the
    /// shards route by, so a cluster client sends a command to the node that owns the keys
    /// it names.
    #[test]
    fn the_command_table_names_the_keys_the_server_routes_by() {
        let mut buf = Vec::new();
        let mut o = Out {
            buf: &mut buf,
            proto: Proto::Resp2,
        };
        o.array(command_count());
        for id in 0..command_count() {
            command_entry(id, &mut o);
        }
        let (table, used) = parse_value(&buf, &Limits::default())
            .expect("well-formed")
            .expect("complete");
        assert_eq!(used, buf.len());
        let Value::Array(entries) = table else {
            panic!("not an array")
        };
        assert_eq!(entries.len(), command_count());
        let samples: &[&[&str]] = &[
            &["GET", "k"],
            &["SET", "k", "v", "EX", "10"],
            &["MGET", "a", "b", "c"],
            &["MSET", "a", "1", "b", "2"],
            &["DEL", "a", "b"],
            &["UNLINK", "a"],
            &["EXISTS", "a", "b"],
            &["MSETNX", "a", "1", "b", "2"],
            &["INCRBY", "k", "5"],
            &["RENAME", "a", "b"],
            &["COPY", "a", "b", "REPLACE"],
            &["EXPIRE", "k", "10", "NX"],
            &["GETEX", "k", "PERSIST"],
            &["PING"],
            &["INFO", "all"],
        ];
        for s in samples {
            let args: Vec<Vec<u8>> = s.iter().map(|a| a.as_bytes().to_vec()).collect();
            let id = command_id(s[0]).expect("served");
            let entry = &entries[id];
            let Value::Array(e) = entry else {
                panic!("{entry:?}")
            };
            assert_eq!(e[0], Value::Bulk(s[0].to_ascii_lowercase().into_bytes()));
            let Value::Int(arity) = e[1] else {
                panic!("{e:?}")
            };
            let n = args.len() as i64;
            assert!(
                if arity >= 0 { n == arity } else { n >= -arity },
                "{s:?} against arity {arity}"
            );
            assert_eq!(keys_by_spec(entry, &args), keys_of(s[0], &args), "{s:?}");
            if cmd::serves(s[0]) {
                assert_eq!(cmd::keys(s[0], &args), keys_of(s[0], &args), "{s:?}");
            }
        }
    }
}
