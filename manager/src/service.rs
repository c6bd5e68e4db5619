//! The manager as a TCP service: it accepts KNs and tools (line-delimited JSON, see
//! [`dinomo_shared::manager_proto`]), ticks the state machine (lease expiry, fencing), runs
//! the load policy, and carries out the administrative requests, which wait for the map
//! to settle.

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::manager_proto::{read_line, write_line, MgrReply, MgrRequest, Reconfig};

use crate::policy::PolicyAction;
use crate::state::Manager;

/// How long `add_kn`, `remove_kn` and `rebalance` wait for the new map to settle.
pub const ADMIN_WAIT: Duration = Duration::from_secs(30);

/// Connections served at once; more are closed at once (each holds a thread).
pub const MAX_CONNECTIONS: usize = 1024;

/// A manager listening for KNs and tools.
#[derive(Debug)]
pub struct Service {
    manager: Arc<Manager>,
    listener: TcpListener,
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// A policy action (a KN being added or removed) is under way.
    policy_busy: Arc<AtomicBool>,
}

impl Service {
    /// Binds `listen` for `manager`.
    pub fn bind(manager: Arc<Manager>, listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        Ok(Self {
            manager,
            listener,
            addr,
            connections: Arc::new(AtomicUsize::new(0)),
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
        self.listener.set_nonblocking(true)?;
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
        while !stop.load(Ordering::Acquire) {
            match self.listener.accept() {
                Ok((s, peer)) => self.accept(s, peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        ticker_stop.store(true, Ordering::Release);
        let _ = ticker.join();
        Ok(())
    }

    fn accept(&self, s: TcpStream, peer: SocketAddr) {
        if self.connections.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            tracing::warn!(%peer, "too many connections; closing a new one");
            return;
        }
        self.connections.fetch_add(1, Ordering::AcqRel);
        let (m, count, addr) = (
            Arc::clone(&self.manager),
            Arc::clone(&self.connections),
            self.addr,
        );
        let spawned = std::thread::Builder::new()
            .name("manager-conn".into())
            .spawn(move || {
                connection(&m, s, addr);
                count.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            // The manager keeps serving the connections it has.
            self.connections.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%peer, error = %e, "cannot start a connection thread; closing it");
        }
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

/// Serves one connection until the peer closes it or sends something unreadable.
fn connection(m: &Manager, s: TcpStream, addr: SocketAddr) {
    let _ = s.set_nodelay(true);
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let line = match read_line(&mut r) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                let _ = write_line(
                    &mut w,
                    &MgrReply::Error {
                        message: format!("bad request: {e}"),
                    },
                );
                return;
            }
        };
        let reply = match serde_json::from_str::<MgrRequest>(line.trim()) {
            Ok(req) => answer(m, req, addr),
            Err(e) => MgrReply::Error {
                message: format!("bad request: {e}"),
            },
        };
        if write_line(&mut w, &reply).is_err() {
            return;
        }
    }
}

/// Answers a request; administrative ones wait (bounded) for their map to settle.
pub fn answer(m: &Manager, req: MgrRequest, addr: SocketAddr) -> MgrReply {
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
        req => m.handle(req),
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

/// One round of the load policy; an action runs in a thread of its own, one at a time.
fn run_policy(m: &Arc<Manager>, busy: &Arc<AtomicBool>, addr: SocketAddr) {
    for a in m.policy_actions() {
        if matches!(a, PolicyAction::Unsupported(_)) {
            tracing::warn!(action = ?a, "policy: not supported in the multi-process cluster");
            continue;
        }
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
                    PolicyAction::Unsupported(_) => Ok(()),
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
