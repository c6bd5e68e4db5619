//! Membership: the lease (renewed with the manager), following the cluster map (install,
//! release lost slots, acknowledge), and the final leave.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use dinomo_shared::manager_proto::{LoadReport, MgrClient, MgrReply, MgrRequest};

use super::load::{busy_ns, load_report, LoadMark};
use super::{Shared, View};
use dinomo_shared::manager_proto::ReplicaPhase;
use dinomo_shared::slot::key_slot;

use crate::ownership::shard_of;
use crate::replica::ReplicaCtl;
use crate::shard::{LeaseGate, Msg};

/// The lease granted by a reply to a request sent at `sent` holds until a quarter lease
/// before the manager could expire it.
pub(super) fn set_lease(gate: &LeaseGate, sent: Instant, lease: Duration) {
    gate.extend_to(sent + lease - lease / 4);
}

/// Fetches the map; installs it if it is new (shards take the replicated keys it lists,
/// drop lost slots, flush, merge their logs), carries out this KN's steps of replicating
/// or dereplicating the keys it owns, and acknowledges its epoch.
pub(super) fn follow_map(shared: &Shared, mgr: &mut MgrClient) -> std::io::Result<()> {
    let msg = mgr.map()?;
    let epoch = msg.epoch;
    // Not the view's epoch: a release that failed must be retried before the ack.
    let new_map = shared.released.load(Ordering::Acquire) != epoch;
    let view = View::new(msg);
    let map = Arc::clone(&view.map);
    if new_map {
        // The replicated keys before the view: a request routed to a shard by the new view
        // finds the shard serving (or no longer serving) its key. A shard that stops
        // serving one publishes its staged writes of it first, and the release below
        // merges its log, so the key's owner can end the replication after the ack.
        for tx in &shared.shards {
            let _ = tx.send(Msg::SetReplicas(Arc::clone(&view.table)));
        }
    }
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
        for w in waits {
            match wait_renewing(shared, mgr, &w)? {
                Ok(r) => entries_merged += r.entries_merged,
                Err(e) => {
                    return Err(std::io::Error::other(format!(
                        "a shard could not merge its log: {e}"
                    )))
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
    let (cells, refused) = owner_steps(shared, mgr)?;
    match mgr.call(&MgrRequest::Ack {
        kn_id: shared.kn_id,
        lease_epoch: shared.lease_epoch,
        epoch,
        release_us,
        entries_merged,
        cells,
        refused,
    })? {
        MgrReply::Lease { .. } => Ok(()),
        other => Err(std::io::Error::other(format!("{other:?}"))),
    }
}

/// Waits for a shard's answer to a step that flushes (a flush waits for a valid lease), so
/// renews the lease meanwhile (this thread is the one that renews). `Err`: the lease was
/// refused or the shard took over a minute.
fn wait_renewing<T>(
    shared: &Shared,
    mgr: &mut MgrClient,
    w: &mpsc::Receiver<Result<T, crate::KvError>>,
) -> std::io::Result<Result<T, crate::KvError>> {
    let t0 = Instant::now();
    loop {
        match w.recv_timeout(shared.lease_len / 8) {
            Ok(r) => return Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout) if t0.elapsed() < Duration::from_secs(60) => {
                renew_only(shared, mgr)?;
            }
            Err(e) => {
                return Err(std::io::Error::other(format!(
                    "a shard did not answer: {e:?}"
                )))
            }
        }
    }
}

/// This KN's part in the replication steps the current map asks of a key's owner: begin
/// (the shard serving the key has the DPM allocate its cell; answered with the cell) and
/// end (the shard has the DPM free it). Both are repeatable. A step that fails is logged
/// and left out of the ack; a begin that fails is named in it with the reason, so the
/// manager takes the key back at once (an end that fails makes its step time out).
type Steps = (Vec<(String, u32)>, Vec<(String, String)>);
fn owner_steps(shared: &Shared, mgr: &mut MgrClient) -> std::io::Result<Steps> {
    let v = shared.view();
    let mut cells = Vec::new();
    let mut refused = Vec::new();
    let n = shared.shards.len();
    for (key, r) in &v.replicas {
        if r.owner != shared.kn_id || !matches!(r.phase, ReplicaPhase::Begin | ReplicaPhase::End) {
            continue;
        }
        let tx = &shared.shards[shard_of(key_slot(key), n)];
        let step = if r.phase == ReplicaPhase::Begin {
            let (rtx, rrx) = mpsc::channel();
            let sent = tx.send(Msg::Replica(ReplicaCtl::Begin {
                key: key.clone(),
                reply: rtx,
            }));
            if sent.is_err() {
                return Err(std::io::Error::other("the KN is stopping"));
            }
            wait_renewing(shared, mgr, &rrx)?.map(|cell| {
                cells.push((r.key.clone(), cell));
                tracing::info!(key = %r.key, cell, "replication begun: the key has a cell");
            })
        } else {
            let (rtx, rrx) = mpsc::channel();
            let sent = tx.send(Msg::Replica(ReplicaCtl::End {
                key: key.clone(),
                cell: r.cell,
                reply: rtx,
            }));
            if sent.is_err() {
                return Err(std::io::Error::other("the KN is stopping"));
            }
            match wait_renewing(shared, mgr, &rrx)? {
                // Ended before (the ack was lost, or an earlier owner freed the cell).
                Err(crate::KvError::Replication(_)) => Ok(()),
                r => r,
            }
            .map(|()| tracing::info!(key = %r.key, "replication ended: the key is in the index"))
        };
        if let Err(e) = step {
            tracing::warn!(key = %r.key, phase = ?r.phase, error = %e, "replication step failed");
            if r.phase == ReplicaPhase::Begin {
                refused.push((r.key.clone(), e.to_string()));
            }
        }
    }
    Ok((cells, refused))
}

/// Asks the manager to renew lease `lease_epoch` of KN `kn_id` (reporting `load`); a grant
/// moves `gate` forward, counted from before the request was sent.
fn renew(
    mgr: &mut MgrClient,
    kn_id: u16,
    lease_epoch: u32,
    lease: Duration,
    gate: &LeaseGate,
    load: Option<LoadReport>,
) -> std::io::Result<MgrReply> {
    let sent = Instant::now();
    let reply = mgr.call(&MgrRequest::Renew {
        kn_id,
        lease_epoch,
        load,
    })?;
    if matches!(reply, MgrReply::Lease { .. }) {
        set_lease(gate, sent, lease);
    }
    Ok(reply)
}

/// Opens this KN's session on a new connection: the manager (perhaps a restarted one,
/// which re-adopts the KN from this) renews the lease. The map goes along once every shard
/// released slots for it, so a restarted manager can learn it.
fn resume(shared: &Shared, mgr: &mut MgrClient) -> std::io::Result<MgrReply> {
    let v = shared.view();
    let released = shared.released.load(Ordering::Acquire) == v.msg.epoch;
    let map = (released && v.msg.epoch > 0).then(|| v.msg.clone());
    let sent = Instant::now();
    let reply = mgr.call(&MgrRequest::Resume {
        kn_id: shared.kn_id,
        lease_epoch: shared.lease_epoch,
        addr: shared.addr.clone(),
        lease_ms: u64::try_from(shared.lease_len.as_millis()).unwrap_or(u64::MAX),
        map,
    })?;
    if matches!(reply, MgrReply::Lease { .. }) {
        set_lease(&shared.lease, sent, shared.lease_len);
    }
    Ok(reply)
}

/// Renews the lease (nothing else); a refusal means this KN was fenced.
fn renew_only(shared: &Shared, mgr: &mut MgrClient) -> std::io::Result<()> {
    let (kn_id, epoch, lease) = (shared.kn_id, shared.lease_epoch, shared.lease_len);
    match renew(mgr, kn_id, epoch, lease, &shared.lease, None)? {
        MgrReply::Lease { .. } => Ok(()),
        other => {
            tracing::error!(reply = ?other, "lease refused: this KN was fenced");
            shared.lease.set_lost();
            shared.fenced.store(true, Ordering::Release);
            Err(std::io::Error::other(format!("{other:?}")))
        }
    }
}

/// Renews the lease every 100 ms (a quarter lease if shorter), follows map changes and
/// reports the load every quarter lease. Returns the manager connection for the final
/// `leave`.
pub(super) fn heartbeat(
    shared: &Shared,
    mut mgr: MgrClient,
    manager: &str,
    stop: &AtomicBool,
) -> Option<MgrClient> {
    let lease = shared.lease_len;
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
        let fresh = conn.is_none();
        let m = match conn.as_mut() {
            Some(m) => m,
            None => {
                match MgrClient::connect_with(manager, Duration::from_millis(200), &shared.mgr_auth)
                {
                    Ok(m) => conn.insert(m),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot reach the manager");
                        continue;
                    }
                }
            }
        };
        // The load over at least a quarter lease, so its p99 means something.
        let load = if last_report.at.elapsed() >= every {
            load_report(shared, &mut last_report, lease / 8)
        } else {
            None
        };
        let r = if fresh {
            resume(shared, m)
        } else {
            renew(
                m,
                shared.kn_id,
                shared.lease_epoch,
                lease,
                &shared.lease,
                load,
            )
        };
        match r {
            Ok(MgrReply::Lease {
                epoch,
                settled,
                drain,
                ..
            }) => {
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

/// Runs `f` while a thread renews the lease of KN `kn_id` over `mgr` every quarter lease
/// (moving `gate` forward); returns `f`'s result, the manager connection, and whether
/// every renewal was granted.
pub(super) fn keep_lease_while<T: Send>(
    mgr: MgrClient,
    kn_id: u16,
    lease_epoch: u32,
    lease: Duration,
    gate: &LeaseGate,
    f: impl FnOnce() -> T + Send,
) -> (T, MgrClient, Result<(), String>) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let renewer = s.spawn(|| {
            let mut mgr = mgr;
            let mut last = Instant::now();
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10).min(lease / 8));
                if last.elapsed() < lease / 4 {
                    continue;
                }
                last = Instant::now();
                match renew(&mut mgr, kn_id, lease_epoch, lease, gate, None) {
                    Ok(MgrReply::Lease { .. }) => {}
                    Ok(other) => {
                        return (mgr, Err(format!("lease refused while starting: {other:?}")))
                    }
                    // Unreachable for now: the lease lapses if it stays so.
                    Err(e) => tracing::warn!(error = %e, "cannot renew the lease while starting"),
                }
            }
            (mgr, Ok(()))
        });
        let r = f();
        done.store(true, Ordering::Release);
        match renewer.join() {
            Ok((mgr, renewed)) => (r, mgr, renewed),
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}
