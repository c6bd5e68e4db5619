//! A shard's thread: a single-threaded event loop that owns the shard and runs, beside it,
//! the client connections placed on this thread (thread per core, run to completion).
//!
//! A connection on this thread serves requests for this shard's keys by calling the shard
//! directly: no message, no wake-up, no allocation for a cached value. Requests for other
//! shards' keys go there in one [`Msg::Batch`] per pipeline. Writes are staged as they come
//! and made durable by one group commit per turn of the loop: the flusher runs after every
//! task that was ready has staged its writes, so the writes of a pipeline, and of every
//! connection served in the same turn, share one flush.
//!
//! The shard sits in a `RefCell`: it is borrowed only inside synchronous calls, never across
//! an `.await`, so a borrow can never meet another one.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::Fabric;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Notify;

use super::{GetReply, Msg, ReplyTo, Shard, ShardStats};
use crate::error::KvError;

/// How long a stopping shard thread lets its connections write their last replies.
const LAST_REPLIES: Duration = Duration::from_millis(50);

/// What a connection on a shard's thread may do with that shard.
pub trait ShardOps {
    /// This shard's index in its KN.
    fn index(&self) -> u16;
    /// Serves a get; `emit` gets the answer (a cached value in place, without a copy).
    fn get(&self, key: &[u8], emit: &mut GetReply<'_>);
    /// Stages a put (`Some`) or delete (`None`); `reply` is answered once it is durable.
    fn write(&self, key: Vec<u8>, value: Option<Vec<u8>>, reply: ReplyTo);
    /// Asks for a group commit once every task that is ready now has run.
    fn flush_soon(&self);
    /// Counts time spent serving requests (the KN's load report).
    fn add_busy(&self, d: Duration);
    /// A connection placed on this thread opened (`true`) or closed.
    fn connection(&self, open: bool);
}

/// A shard, as the connections on its thread see it.
pub type LocalShard = Rc<dyn ShardOps>;

struct ShardCell<F: Fabric> {
    shard: RefCell<Shard<F>>,
    flush_wanted: Cell<bool>,
    wake_flusher: Notify,
    stopped: Cell<bool>,
    connections: Cell<usize>,
}

impl<F: Fabric> ShardCell<F> {
    fn flush(&self) {
        let t0 = Instant::now();
        let mut s = self.shard.borrow_mut();
        s.flush();
        s.stats.busy_ns += t0.elapsed().as_nanos() as u64;
    }
}

impl<F: Fabric> ShardOps for ShardCell<F> {
    fn index(&self) -> u16 {
        self.shard.borrow().cfg.shard
    }

    fn get(&self, key: &[u8], emit: &mut GetReply<'_>) {
        if self.stopped.get() {
            return emit(Err(KvError::ShuttingDown));
        }
        self.shard.borrow_mut().serve_get(key, emit);
    }

    fn write(&self, key: Vec<u8>, value: Option<Vec<u8>>, reply: ReplyTo) {
        if self.stopped.get() {
            return reply.send(super::Reply {
                tag: 0,
                result: Err(KvError::ShuttingDown),
            });
        }
        let mut s = self.shard.borrow_mut();
        s.serve_write(key, value, reply);
        // A stream of connections that never lets the loop turn still flushes in time (the
        // clock is read every few writes only).
        if s.pending.len() % 16 == 0 && s.flush_overdue() {
            s.flush();
        }
        drop(s);
        self.flush_soon();
    }

    fn flush_soon(&self) {
        if !self.flush_wanted.replace(true) {
            self.wake_flusher.notify_one();
        }
    }

    fn add_busy(&self, d: Duration) {
        self.shard.borrow_mut().stats.busy_ns += d.as_nanos() as u64;
    }

    fn connection(&self, open: bool) {
        let n = self.connections.get();
        self.connections
            .set(if open { n + 1 } else { n.saturating_sub(1) });
    }
}

/// Makes staged writes durable once per turn of the loop: woken by the first write of a
/// turn, it yields once so that every task that is ready stages its writes first.
async fn flusher<F: Fabric>(cell: Rc<ShardCell<F>>) {
    loop {
        cell.wake_flusher.notified().await;
        tokio::task::yield_now().await;
        cell.flush_wanted.set(false);
        if cell.stopped.get() {
            return;
        }
        if cell.shard.borrow().has_staged() {
            cell.flush();
        }
    }
}

/// How often a shard thread looks for keys whose expiry time has come.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Active expiry: deletes due keys every [`SWEEP_EVERY`] (their deletes share the turn's
/// group commit).
async fn expirer<F: Fabric>(cell: Rc<ShardCell<F>>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if cell.stopped.get() {
            return;
        }
        let mut shard = cell.shard.borrow_mut();
        shard.give_back_memory();
        if shard.sweep_expired() > 0 {
            drop(shard);
            cell.flush_soon();
        }
    }
}

/// Serves the shard's queue until `Stop` or until every sender is gone.
async fn serve_queue<F: Fabric + 'static>(
    cell: Rc<ShardCell<F>>,
    mut rx: UnboundedReceiver<Msg>,
) -> ShardStats {
    let mut stopping = false;
    while !stopping {
        let Some(first) = rx.recv().await else {
            break;
        };
        let t0 = Instant::now();
        let mut next = Some(first);
        // Take what is already waiting; the flusher then commits it with the connections'
        // writes of this turn.
        while let Some(m) = next.take() {
            match m {
                Msg::Task(t) => (t.0)(Rc::clone(&cell) as LocalShard),
                m => {
                    let mut s = cell.shard.borrow_mut();
                    if !s.handle(m) {
                        stopping = true;
                        break;
                    }
                    if s.flush_overdue() {
                        s.flush();
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        cell.shard.borrow_mut().stats.busy_ns += t0.elapsed().as_nanos() as u64;
        cell.flush_soon();
    }
    let stats = cell.shard.borrow_mut().stop(&mut rx);
    cell.stopped.set(true);
    cell.wake_flusher.notify_one();
    stats
}

/// Runs shard `shard` on this thread until it is stopped, with `rt` as the event loop of
/// the connections placed here; returns its counters.
pub fn run_thread<F: Fabric + 'static>(
    rt: &tokio::runtime::Runtime,
    shard: Shard<F>,
    rx: UnboundedReceiver<Msg>,
) -> ShardStats {
    let local = tokio::task::LocalSet::new();
    let cell = Rc::new(ShardCell {
        shard: RefCell::new(shard),
        flush_wanted: Cell::new(false),
        wake_flusher: Notify::new(),
        stopped: Cell::new(false),
        connections: Cell::new(0),
    });
    local.block_on(rt, async move {
        tokio::task::spawn_local(flusher(Rc::clone(&cell)));
        tokio::task::spawn_local(expirer(Rc::clone(&cell)));
        let stats = serve_queue(Rc::clone(&cell), rx).await;
        // Connections here answer what they were told (`TRYAGAIN`: shutting down) and
        // write their last replies before the thread, and with it they, go away.
        if cell.connections.get() > 0 {
            tokio::time::sleep(LAST_REPLIES).await;
        }
        stats
    })
}

/// Polls before blocking in [`run_blocking`].
const SPIN_POLLS: u32 = 16;

/// Runs shard `shard` on this thread for in-process clients only (a KN whose clients are
/// threads of the same process, as in `dinomo bench`): no event loop, so no connection can
/// be placed here. Waiting for a message first polls the queue briefly (yielding the core
/// between polls), because under load the next request comes within microseconds, then
/// blocks. The writes of what was queued share one group commit.
pub fn run_blocking<F: Fabric>(mut shard: Shard<F>, mut rx: UnboundedReceiver<Msg>) -> ShardStats {
    'serve: loop {
        let mut first = None;
        for _ in 0..SPIN_POLLS {
            match rx.try_recv() {
                Ok(m) => {
                    first = Some(m);
                    break;
                }
                Err(TryRecvError::Empty) => std::thread::yield_now(),
                Err(TryRecvError::Disconnected) => break 'serve,
            }
        }
        let Some(first) = first.or_else(|| rx.blocking_recv()) else {
            break;
        };
        let t0 = Instant::now();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            if let Msg::Task(_) = m {
                tracing::warn!("a connection was placed on a shard that has no event loop");
            } else if !shard.handle(m) {
                shard.stats.busy_ns += t0.elapsed().as_nanos() as u64;
                return shard.stop(&mut rx);
            }
            if shard.flush_overdue() {
                shard.flush();
            }
            next = rx.try_recv().ok();
        }
        shard.sweep_expired();
        shard.give_back_memory();
        shard.flush();
        shard.stats.busy_ns += t0.elapsed().as_nanos() as u64;
    }
    shard.close()
}
