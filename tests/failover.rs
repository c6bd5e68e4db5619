//! Failover and reconfiguration of a cluster of processes (a DPM, a manager, KNs) on
//! loopback, with short leases:
//! - a KN killed with SIGKILL under a write load: every acknowledged write is readable
//!   afterwards with its last acknowledged value, and no read returns a value never written;
//! - a KN paused with SIGSTOP while a write to it sits in its socket: once the manager has
//!   fenced it and the new owner has taken a newer write, resuming the paused KN neither
//!   acknowledges nor applies the late write, and the paused KN stops serving;
//! - `dinomo ctl add-kn`, `rebalance` and `remove-kn` on a running cluster with a writer:
//!   every acknowledged write is readable at the end, and `status` shows the changes;
//! - the elasticity policy in the manager: it adds a KN when the latency objective is missed
//!   by a busy KN and removes idle KNs (thresholds set so that the outcome is certain);
//! - the DPM killed with SIGKILL and restarted under a write load: the KNs and the manager
//!   reconnect by themselves, writes that need new log blocks resume, a KN killed afterwards
//!   is fenced through the restarted DPM, and no acknowledged write is lost.
//!
//! Over shm by default; with `DINOMO_RDMA_DEVICE` (and `DINOMO_RDMA_GID_INDEX`) set, the
//! same tests run over RDMA verbs on that device (a build with `--features rdma`; see
//! `common::fabric`): there a fenced KN's queue pairs are also checked to be in error before
//! its slots move, and leases are 50 and reply timeouts 10 times longer, because the
//! soft-RoCE VM these runs are meant for is several times slower than the host.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fabric::{self, strs};
use common::proc_files;
use common::procs::{deadline, ready_addr, spawn_kn_on, wait_map, Client, Conn, Proc, BIN};
use common::{dinomo, dinomo_cmd, stderr, stdout};
use dinomo::resp::Value;
use dinomo::shared::manager_proto::{MapMsg, MgrClient, StatusMsg};
use dinomo::shared::slot::key_slot;

/// Leases of the failover tests: a dead KN's slots move within about a second.
const LEASE_MS: u64 = 600;
/// Leases of the tests that need no expiry: long enough that a KN starved of CPU on a
/// loaded machine is not fenced by mistake.
const CALM_LEASE_MS: u64 = 2000;
/// How long a client waits for one reply before it counts the connection as failed
/// (scaled like the leases).
fn reply_timeout() -> Duration {
    fabric::scaled(Duration::from_secs(2))
}

/// A DPM, a manager (that can start KNs) and KNs.
struct Cluster {
    _dir: tempfile::TempDir,
    region: PathBuf,
    /// How the processes reach the DPM (shm or verbs).
    fab: fabric::Dpm,
    /// The DPM's log (appended to across restarts).
    dpm_log: PathBuf,
    dpm: Option<Proc>,
    manager: Option<Proc>,
    mgr: String,
    /// (KN id, address, process) of the KNs the test started.
    kns: Vec<(u16, String, Option<Proc>)>,
}

impl Cluster {
    /// With short leases.
    fn start(kns: usize) -> Self {
        Self::start_opts(kns, LEASE_MS, true, &[])
    }

    /// With long leases; `spawn`: whether the manager gets what it needs to start KNs.
    fn start_calm(kns: usize, spawn: bool) -> Self {
        Self::start_opts(kns, CALM_LEASE_MS, spawn, &[])
    }

    /// `manager_args`: more flags for the manager.
    fn start_opts(kns: usize, lease_ms: u64, spawn: bool, manager_args: &[&str]) -> Self {
        Self::start_with(kns, lease_ms, spawn, manager_args, "1M")
    }

    /// `block`: the region's log block size.
    fn start_with(
        kns: usize,
        lease_ms: u64,
        spawn: bool,
        manager_args: &[&str],
        block: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let region = dir.path().join("region");
        common::format_region(&region, "64M", block);
        let r = region.to_str().expect("utf-8").to_string();
        let fab = fabric::Dpm::new(&r);
        let dpm_log = dir.path().join("dpm.log");
        let dpm = spawn_dpm(&fab, &dpm_log);
        let lease_ms = fabric::lease_ms(lease_ms);
        let dpm_args = fab.args();
        let mut args = vec!["manager"];
        args.extend(strs(&dpm_args));
        args.extend([
            "--listen",
            "127.0.0.1:0",
            "--lease-ms",
            &lease_ms,
            "--kn-threads",
            "1",
            "--kn-cache",
            "2M",
        ]);
        if spawn {
            args.extend(["--kn-exe", BIN]);
        }
        args.extend(manager_args);
        let (manager, out) = Proc::spawn(&args);
        let mgr = ready_addr(out);
        let mut c = Self {
            _dir: dir,
            region,
            fab,
            dpm_log,
            dpm: Some(dpm),
            manager: Some(manager),
            mgr,
            kns: Vec::new(),
        };
        for _ in 0..kns {
            c.start_kn();
        }
        c.wait_map(kns);
        c
    }

    fn start_kn(&mut self) {
        let (id, addr, p) = spawn_kn_on(&self.fab, &self.mgr, &["--threads", "2", "--cache", "2M"]);
        self.kns.push((id, addr, Some(p)));
    }

    /// Starts the DPM process on the region (again; over verbs on the same port).
    fn start_dpm(&mut self) {
        self.dpm = Some(spawn_dpm(&self.fab, &self.dpm_log));
    }

    /// What the DPM logged so far.
    fn dpm_log(&self) -> String {
        std::fs::read_to_string(&self.dpm_log).unwrap_or_default()
    }

    /// Over verbs: waits until the DPM logged that fencing KN `kn` moved its queue pairs to
    /// error (the DPM does so before it answers the fence, hence before the manager moves
    /// the KN's slots; its log line may come just after the answer). Returns how many.
    fn wait_revoked(&self, kn: u16) -> usize {
        let needle = format!("KN {kn} fenced: connection");
        let t0 = Instant::now();
        loop {
            let n = self.dpm_log().matches(&needle).count();
            if n > 0 {
                return n;
            }
            assert!(
                t0.elapsed() < deadline(),
                "the DPM never revoked KN {kn}'s queue pairs:\n{}",
                self.dpm_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the map lists exactly `kns` KNs and is settled.
    fn wait_map(&self, kns: usize) -> MapMsg {
        wait_map(&self.mgr, kns)
    }

    fn addrs(&self) -> Vec<String> {
        self.wait_map_any()
            .kns
            .into_iter()
            .map(|(_, a)| a)
            .collect()
    }

    fn wait_map_any(&self) -> MapMsg {
        MgrClient::connect(&self.mgr, deadline())
            .expect("manager")
            .map()
            .expect("map")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        dinomo_cmd(["ctl", "--manager", &self.mgr])
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run dinomo ctl")
    }

    fn status(&self) -> StatusMsg {
        let o = self.ctl(&["status", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        match serde_json::from_slice(&o.stdout).expect("status json") {
            dinomo::shared::manager_proto::MgrReply::Status(s) => s,
            other => panic!("not a status: {other:?}"),
        }
    }

    /// Every KN leaves, then the manager and the DPM stop cleanly. Whatever the test did,
    /// the manager never mapped or opened the region file.
    fn stop(mut self) {
        let pid = self.manager.as_ref().expect("manager").pid().as_raw() as u32;
        assert!(
            !proc_files::touches(pid, &self.region),
            "the manager touched the region"
        );
        for (_, _, p) in &mut self.kns {
            if let Some(p) = p.take() {
                p.terminate();
            }
        }
        assert!(self.manager.take().expect("manager").terminate().success());
        assert!(self.dpm.take().expect("dpm").terminate().success());
    }
}

/// Starts the DPM of `fab`, its log (info level: the queue pairs it revokes) appended to
/// `log`.
fn spawn_dpm(fab: &fabric::Dpm, log: &std::path::Path) -> Proc {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("DPM log");
    let args = fab.serve_cmd(&[]);
    let (dpm, _) = Proc::spawn_logging(&strs(&args), "info", file.into());
    dpm
}

/// What a writer knows about one key.
#[derive(Clone, Debug, Default)]
struct KeyLog {
    /// The last value whose SET got +OK.
    acked: Option<String>,
    /// Values written after it whose SET failed (they may or may not be durable).
    uncertain: Vec<String>,
}

/// Writes `keys` keys round-robin (each value unique) until `stop`, retrying a failed
/// value until it is acknowledged; returns what it knows.
fn writer(
    name: &str,
    addrs: Vec<String>,
    keys: usize,
    stop: &AtomicBool,
) -> HashMap<String, KeyLog> {
    let mut cl = Client::new(addrs, reply_timeout());
    let mut log: HashMap<String, KeyLog> = HashMap::new();
    let mut round = 0u64;
    let mut acked = 0u64;
    while !stop.load(Ordering::Acquire) {
        round += 1;
        for i in 0..keys {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let k = format!("{name}:{i}");
            let v = format!("{name}-{i}-r{round}");
            let e = log.entry(k.clone()).or_default();
            loop {
                match cl.once(&[b"SET", k.as_bytes(), v.as_bytes()]) {
                    Some(Value::Simple(ok)) if ok == "OK" => {
                        e.acked = Some(v.clone());
                        e.uncertain.clear();
                        acked += 1;
                        break;
                    }
                    Some(Value::Error(err)) if err.starts_with("CROSSSLOT") => {
                        panic!("{err}")
                    }
                    // -TRYAGAIN, -CLUSTERDOWN, a dead or fenced node: not acknowledged.
                    _ => {
                        if !e.uncertain.contains(&v) {
                            e.uncertain.push(v.clone());
                        }
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }
    assert!(acked > 0, "{name}: no write was acknowledged");
    log
}

/// Every key reads as its last acknowledged value or a later failed write; never a value
/// that was not written, never an acknowledged write lost.
fn check(cl: &mut Client, logs: &HashMap<String, KeyLog>) {
    for (k, l) in logs {
        let got = match cl.must(&[b"GET", k.as_bytes()]) {
            Value::Bulk(b) => Some(String::from_utf8(b).expect("utf-8")),
            Value::Nil => None,
            other => panic!("GET {k}: {other:?}"),
        };
        let ok = got == l.acked || got.as_ref().is_some_and(|g| l.uncertain.contains(g));
        assert!(ok, "{k}: read {got:?}, last acknowledged {l:?}");
    }
}

#[test]
fn sigkill_under_a_write_load_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3);
    let map = c.wait_map(3);
    let stop = Arc::new(AtomicBool::new(false));
    // Fewer keys over verbs in the VM, where a write takes hundreds of milliseconds: each
    // writer still goes through all of its keys before the failover ends.
    let keys = if c.fab.is_verbs() { 20 } else { 150 };
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (addrs, stop) = (c.addrs(), Arc::clone(&stop));
            std::thread::spawn(move || writer(&format!("w{w}"), addrs, keys, &stop))
        })
        .collect();
    std::thread::sleep(fabric::scaled(Duration::from_millis(700)));
    let (victim, _, p) = &mut c.kns[1];
    let victim = *victim;
    assert!(map.slot_map().slots_of(victim) > 0);
    let mut p = p.take().expect("KN");
    p.signal(nix::sys::signal::Signal::SIGKILL);
    p.wait();
    // The writers keep going through the failover and a little after it.
    let after = c.wait_map(2);
    assert!(after.addr_of(victim).is_none());
    std::thread::sleep(fabric::scaled(Duration::from_millis(300)));
    stop.store(true, Ordering::Release);
    let logs: HashMap<String, KeyLog> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    assert_eq!(logs.len(), 2 * keys);
    let mut cl = Client::new(c.addrs(), reply_timeout());
    check(&mut cl, &logs);
    c.stop();
}

#[test]
fn a_paused_kn_is_fenced_and_its_late_write_never_lands() {
    let mut c = Cluster::start(2);
    let map = c.wait_map(2);
    let (victim, victim_addr) = (c.kns[0].0, c.kns[0].1.clone());
    let owners = map.slot_map();
    let key = (0..)
        .map(|i| format!("paused:{i}"))
        .find(|k| owners.owner(key_slot(k.as_bytes())) == victim)
        .expect("a key of the victim");
    let mut conn = Conn::open(&victim_addr, Duration::from_secs(30)).expect("connect");
    assert_eq!(
        conn.cmd(&[b"SET", key.as_bytes(), b"old"]),
        Some(Value::Simple("OK".into()))
    );

    // Pause it, then send a SET the kernel buffers until it resumes.
    let p = c.kns[0].2.take().expect("KN");
    p.signal(nix::sys::signal::Signal::SIGSTOP);
    p.wait_stopped();
    assert!(conn.send(&[b"SET", key.as_bytes(), b"late"]));

    // The manager fences it and the other KN takes its slots. Over verbs the DPM moved the
    // paused KN's queue pairs (one per shard) to error when it was fenced, so that it
    // cannot land a WRITE after the fence even if it got past its lease check.
    let after = c.wait_map(1);
    assert!(after.addr_of(victim).is_none());
    if c.fab.is_verbs() {
        assert!(c.wait_revoked(victim) >= 2, "{}", c.dpm_log());
    }
    let status = c.status();
    assert!(status.kns.iter().all(|k| k.kn_id != victim), "{status:?}");
    let mut cl = Client::new(vec![c.kns[1].1.clone()], reply_timeout());
    assert_eq!(
        cl.must(&[b"SET", key.as_bytes(), b"new"]),
        Value::Simple("OK".into())
    );

    // Resume it: the late SET is not acknowledged and the KN stops serving.
    p.signal(nix::sys::signal::Signal::SIGCONT);
    let late = conn.read();
    assert!(
        !matches!(&late, Some(Value::Simple(s)) if s == "OK"),
        "the fenced KN acknowledged a late write: {late:?}"
    );
    let mut p = p;
    let status = p.wait();
    assert!(
        !status.success(),
        "a fenced KN exits with an error: {status}"
    );
    assert!(
        Conn::open(&victim_addr, Duration::from_secs(1))
            .ok()
            .and_then(|mut c| c.cmd(&[b"GET", key.as_bytes()]))
            .is_none(),
        "the fenced KN still serves"
    );

    let read = |cl: &mut Client| cl.must(&[b"GET", key.as_bytes()]);
    assert_eq!(read(&mut cl), Value::Bulk(b"new".to_vec()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(read(&mut cl), Value::Bulk(b"new".to_vec()));

    // Once everything is merged: a new KN takes over (cold, reading the DPM's index) and
    // the survivor leaves, merging and closing its logs.
    let added = c.ctl(&["add-kn"]);
    assert!(added.status.success(), "{}", stderr(&added));
    let survivor = c.kns[1].0;
    let removed = c.ctl(&["remove-kn", &survivor.to_string()]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    let _ = c.kns[1].2.take().expect("survivor").wait();
    let last = c.wait_map(1);
    let mut cl = Client::new(
        last.kns.iter().map(|(_, a)| a.clone()).collect(),
        reply_timeout(),
    );
    assert_eq!(read(&mut cl), Value::Bulk(b"new".to_vec()));
    c.stop();
}

#[test]
fn ctl_adds_rebalances_and_removes_kns_under_a_writer() {
    let c = Cluster::start_calm(2, true);
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addrs, stop) = (c.addrs(), Arc::clone(&stop));
        std::thread::spawn(move || writer("c", addrs, 200, &stop))
    };
    std::thread::sleep(Duration::from_millis(300));

    let out = |o: &Output| format!("{}{}", stdout(o), stderr(o));
    let added = c.ctl(&["add-kn"]);
    assert!(added.status.success(), "{}", out(&added));
    assert!(out(&added).contains("added KN"), "{}", out(&added));
    let s = c.status();
    assert_eq!(s.kns.len(), 3, "{s:?}");
    let new = s
        .kns
        .iter()
        .find(|k| k.spawned)
        .expect("the added KN")
        .kn_id;
    assert!(s.kns.iter().all(|k| k.slots > 0), "{s:?}");

    let moved = c.ctl(&["rebalance", "--slots", "0-99", "--to", &new.to_string()]);
    assert!(moved.status.success(), "{}", out(&moved));
    let map = c.wait_map(3).slot_map();
    assert!((0..100).all(|s| map.owner(s) == new));
    // Bad input: refused, nothing changes.
    let epoch = c.status().epoch;
    for bad in [
        vec!["rebalance", "--slots", "9-3", "--to", "0"],
        vec!["rebalance", "--slots", "0-9", "--to", "99"],
        vec!["remove-kn", "99"],
    ] {
        let o = c.ctl(&bad);
        assert!(!o.status.success(), "{bad:?}: {}", out(&o));
        assert!(
            out(&o).contains("bad slot range") || out(&o).contains("unknown KN"),
            "{bad:?}: {}",
            out(&o)
        );
    }
    assert_eq!(c.status().epoch, epoch);

    let rebalanced = c.ctl(&["rebalance"]);
    assert!(rebalanced.status.success(), "{}", out(&rebalanced));
    let first = c.kns[0].0;
    let removed = c.ctl(&["remove-kn", &first.to_string()]);
    assert!(removed.status.success(), "{}", out(&removed));
    let s = c.status();
    assert_eq!(s.kns.len(), 2, "{s:?}");
    assert!(s.kns.iter().all(|k| k.kn_id != first));

    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let logs = w.join().expect("writer");
    let mut cl = Client::new(
        s.kns.iter().map(|k| k.addr.clone()).collect(),
        reply_timeout(),
    );
    check(&mut cl, &logs);

    // The history: a join, an explicit move, a rebalance and a leave, each measured.
    let reasons: Vec<&str> = s.reconfigs.iter().map(|r| r.reason.as_str()).collect();
    for want in [
        format!("kn {new} joined"),
        format!("move slots 0-99 to kn {new}"),
        "rebalance".into(),
        format!("kn {first} left"),
    ] {
        assert!(
            reasons.contains(&want.as_str()),
            "{want} not in {reasons:?}"
        );
    }
    // Every KN releases (flushes and merges) for every new map. How many entries those
    // merges take in depends on how far the DPM's background merger got: not checked.
    for r in &s.reconfigs {
        assert!(
            r.slots_moved > 0 && r.settle_ms.is_some() && r.max_release_ms > 0.0,
            "{r:?}"
        );
    }
    let table = c.ctl(&["status"]);
    assert!(out(&table).contains("SETTLE_MS"), "{}", out(&table));
    let mut c = c;
    // KN `first` left on its own (exit code 0).
    assert!(c.kns[0].2.take().expect("KN").wait().success());
    c.stop();
}

#[test]
fn ctl_refuses_what_the_cluster_cannot_do() {
    let c = Cluster::start_calm(1, false);
    let o = c.ctl(&["add-kn"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot start KNs"), "{}", stderr(&o));
    let only = c.kns[0].0.to_string();
    let o = c.ctl(&["remove-kn", &only]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("last KN"), "{}", stderr(&o));
    let o = c.ctl(&["rebalance"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("nothing to move"));
    let s = c.status();
    assert!(
        !s.can_spawn && s.kns.len() == 1 && !s.kns[0].draining,
        "{s:?}"
    );
    c.stop();
    let help = stdout(&dinomo(&["ctl", "--help"]));
    for word in [
        "status",
        "add-kn",
        "remove-kn",
        "rebalance",
        "--json",
        "SETTLE_MS",
    ] {
        assert!(help.contains(word), "{word} not in {help}");
    }
    // No manager: a clear error and a failing exit code.
    let o = dinomo(&["ctl", "--manager", "127.0.0.1:1", "status"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot reach the manager"),
        "{}",
        stderr(&o)
    );
}

/// Waits until `status` satisfies `done`.
fn wait_status(c: &Cluster, done: impl Fn(&StatusMsg) -> bool) -> StatusMsg {
    let t0 = Instant::now();
    loop {
        let s = c.status();
        if done(&s) {
            return s;
        }
        assert!(t0.elapsed() < deadline(), "status never got there: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_policy_adds_a_kn_under_load_and_removes_idle_ones() {
    // Any latency misses a 0 ms objective and any work makes a KN busy: a KN is added (up
    // to 2); nothing is ever idle enough to be removed.
    let c = Cluster::start_opts(
        1,
        CALM_LEASE_MS,
        true,
        &[
            "--policy",
            "--policy-period-ms",
            "300",
            "--slo-p99-ms",
            "0",
            "--busy-add",
            "0",
            "--idle-remove",
            "0",
            "--max-kns",
            "2",
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (addrs, stop) = (c.addrs(), Arc::clone(&stop));
        std::thread::spawn(move || writer("p", addrs, 100, &stop))
    };
    // (A KN counts as started by the manager once the manager read its ready line.)
    let s = wait_status(&c, |s| {
        s.kns.len() == 2 && s.settled && s.kns.iter().any(|k| k.spawned)
    });
    assert!(s.policy);
    let added = s
        .kns
        .iter()
        .find(|k| k.spawned)
        .expect("a KN the policy added");
    assert!(added.slots > 0, "{s:?}");
    let first = s.kns.iter().find(|k| !k.spawned).expect("the first KN");
    let load = first.load.as_ref().expect("the first KN reported its load");
    assert!(
        load.ops_per_sec > 0.0 && load.occupancy > 0.0 && load.p99_us > 0,
        "{load:?}"
    );
    // The shards' hot keys come with the load (sampled: wait for a report that has some).
    let s = wait_status(&c, |s| {
        s.kns
            .iter()
            .any(|k| k.load.as_ref().is_some_and(|l| !l.hot_keys.is_empty()))
    });
    for k in &s.kns {
        for (key, count) in k.load.iter().flat_map(|l| &l.hot_keys) {
            assert!(key.starts_with("p:") && *count > 0, "{key} {count}");
        }
    }
    stop.store(true, Ordering::Release);
    let logs = w.join().expect("writer");
    let mut cl = Client::new(
        s.kns.iter().map(|k| k.addr.clone()).collect(),
        reply_timeout(),
    );
    check(&mut cl, &logs);
    c.stop();

    // Every KN is idle below an occupancy of 1: KNs are removed down to the minimum.
    let mut c = Cluster::start_opts(
        3,
        CALM_LEASE_MS,
        true,
        &[
            "--policy",
            "--policy-period-ms",
            "300",
            "--idle-remove",
            "1",
            "--min-kns",
            "2",
        ],
    );
    let s = wait_status(&c, |s| s.kns.len() == 2 && s.settled);
    let gone: Vec<u16> = c
        .kns
        .iter()
        .map(|k| k.0)
        .filter(|id| s.kns.iter().all(|k| k.kn_id != *id))
        .collect();
    assert_eq!(gone.len(), 1, "{s:?}");
    let reason = format!("kn {} left", gone[0]);
    assert!(s.reconfigs.iter().any(|r| r.reason == reason), "{s:?}");
    // It left on its own (exit code 0) and the policy stops at the minimum.
    let i = c.kns.iter().position(|k| k.0 == gone[0]).expect("KN");
    assert!(c.kns[i].2.take().expect("KN").wait().success());
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(c.status().kns.len(), 2);
    c.stop();
}

/// Writes `bulk:<i>` with values of `len` bytes, each key once, until `stop`; `acked` counts
/// the acknowledged ones. Returns what it knows of every key.
fn bulk_writer(
    addrs: Vec<String>,
    len: usize,
    acked: &std::sync::atomic::AtomicU64,
    stop: &AtomicBool,
) -> HashMap<String, KeyLog> {
    let mut cl = Client::new(addrs, reply_timeout());
    let mut log: HashMap<String, KeyLog> = HashMap::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        let k = format!("bulk:{i}");
        let v = format!("{i:08}{}", "v".repeat(len - 8));
        let e = log.entry(k.clone()).or_default();
        match cl.once(&[b"SET", k.as_bytes(), v.as_bytes()]) {
            Some(Value::Simple(ok)) if ok == "OK" => {
                e.acked = Some(v);
                acked.fetch_add(1, Ordering::AcqRel);
            }
            _ => {
                e.uncertain.push(v);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        i += 1;
    }
    log
}

#[test]
fn a_restarted_dpm_is_rejoined_by_its_kns_and_manager_and_loses_nothing() {
    // Small blocks, so that writes after the restart need new ones from the new DPM.
    let mut c = Cluster::start_with(2, LEASE_MS, false, &[], "64K");
    c.wait_map(2);
    let stop = Arc::new(AtomicBool::new(false));
    let bulk_acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (addrs, stop) = (c.addrs(), Arc::clone(&stop));
            std::thread::spawn(move || writer(&format!("d{w}"), addrs, 100, &stop))
        })
        .collect();
    let bulk = {
        let (addrs, stop, acked) = (c.addrs(), Arc::clone(&stop), Arc::clone(&bulk_acked));
        std::thread::spawn(move || bulk_writer(addrs, 2048, &acked, &stop))
    };
    let wait_bulk = |n: u64| {
        let (t0, from) = (Instant::now(), bulk_acked.load(Ordering::Acquire));
        while bulk_acked.load(Ordering::Acquire) < from + n {
            assert!(
                t0.elapsed() < deadline(),
                "bulk writes stopped being acknowledged"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_bulk(100);

    let mut dpm = c.dpm.take().expect("DPM");
    dpm.signal(nix::sys::signal::Signal::SIGKILL);
    dpm.wait();
    std::thread::sleep(Duration::from_millis(300));
    c.start_dpm();
    // 400 values of 2 KiB after the restart: 800 KiB over four logs of 64 KiB blocks, so
    // every log needs blocks the restarted DPM grants.
    wait_bulk(400);

    // A KN killed now is fenced through the restarted DPM, and its slots move.
    let (victim, _, p) = &mut c.kns[1];
    let victim = *victim;
    let mut p = p.take().expect("KN");
    p.signal(nix::sys::signal::Signal::SIGKILL);
    p.wait();
    let after = c.wait_map(1);
    assert!(after.addr_of(victim).is_none());
    wait_bulk(50);
    stop.store(true, Ordering::Release);
    let mut logs: HashMap<String, KeyLog> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    logs.extend(bulk.join().expect("bulk writer"));
    assert!(
        c.kns[0].2.as_mut().expect("KN 0").try_wait().is_none(),
        "the surviving KN rode out the DPM restart in the same process"
    );
    let mut cl = Client::new(c.addrs(), reply_timeout());
    check(&mut cl, &logs);
    c.stop();
}

/// A counter from a KN's `INFO` reply.
fn info_counter(conn: &mut Conn, name: &str) -> u64 {
    let text = match conn.call(&[b"INFO", b"dinomo"]) {
        Value::Bulk(b) => String::from_utf8(b).expect("utf-8"),
        other => panic!("INFO: {other:?}"),
    };
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO has no {name}: {text}"))
}

/// A pipeline is dispatched whole: its replies come back in command order although its
/// keys live on both shards of the KN and other commands sit between them; the SETs of a
/// pipeline share group commits (far fewer flushes than SETs); and every SET acknowledged
/// in a pipeline survives the KN's SIGKILL, because a reply is written only once its batch
/// is durable.
#[test]
fn a_pipeline_is_answered_in_order_and_its_acknowledged_writes_survive_a_sigkill() {
    let mut c = Cluster::start(2);
    let map = c.wait_map(2);
    let (victim, victim_addr) = (c.kns[0].0, c.kns[0].1.clone());
    let owners = map.slot_map();
    let keys: Vec<String> = (0..)
        .map(|i| format!("pipe:{i}"))
        .filter(|k| owners.owner(key_slot(k.as_bytes())) == victim)
        .take(64)
        .collect();
    let shards: std::collections::HashSet<usize> = keys
        .iter()
        .map(|k| dinomo::host_kn::ownership::shard_of(key_slot(k.as_bytes()), 2))
        .collect();
    assert_eq!(shards.len(), 2, "the keys cover both shards of the KN");
    let other = (0..)
        .map(|i| format!("elsewhere:{i}"))
        .find(|k| owners.owner(key_slot(k.as_bytes())) != victim)
        .expect("a key of the other KN");
    let mut conn =
        Conn::open(&victim_addr, fabric::scaled(Duration::from_secs(30))).expect("connect");

    // SET, GET of the same key, GET of a key never written, a key of the other KN and a
    // PING now and then: all in one write.
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let v = format!("first{i}");
        dinomo::resp::encode_command(&mut bytes, &[b"SET", k.as_bytes(), v.as_bytes()]);
        want.push(Value::Simple("OK".into()));
        dinomo::resp::encode_command(&mut bytes, &[b"GET", k.as_bytes()]);
        want.push(Value::Bulk(v.into_bytes()));
        let absent = format!("{k}:absent");
        if owners.owner(key_slot(absent.as_bytes())) == victim {
            dinomo::resp::encode_command(&mut bytes, &[b"GET", absent.as_bytes()]);
            want.push(Value::Nil);
        }
        if i % 16 == 7 {
            dinomo::resp::encode_command(&mut bytes, &[b"PING"]);
            want.push(Value::Simple("PONG".into()));
            dinomo::resp::encode_command(&mut bytes, &[b"GET", other.as_bytes()]);
            want.push(Value::Error(String::new()));
        }
    }
    assert!(conn.send_raw(&bytes));
    for (i, w) in want.iter().enumerate() {
        let got = conn
            .read()
            .unwrap_or_else(|| panic!("reply {i} of {}", want.len()));
        match w {
            Value::Error(_) => assert!(
                matches!(&got, Value::Error(e) if e.starts_with("MOVED ")),
                "reply {i}: {got:?}, want MOVED"
            ),
            w => assert_eq!(&got, w, "reply {i}"),
        }
    }

    // A pipeline of SETs only: far fewer group commits than SETs.
    let flushes = info_counter(&mut conn, "flushes");
    let mut bytes = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        dinomo::resp::encode_command(
            &mut bytes,
            &[b"SET", k.as_bytes(), format!("last{i}").as_bytes()],
        );
    }
    assert!(conn.send_raw(&bytes));
    for i in 0..keys.len() {
        assert_eq!(
            conn.read(),
            Some(Value::Simple("OK".into())),
            "SET reply {i}"
        );
    }
    let spent = info_counter(&mut conn, "flushes") - flushes;
    assert!(
        spent <= keys.len() as u64 / 4,
        "{} pipelined SETs took {spent} group commits",
        keys.len()
    );

    // Killed at once: every acknowledged SET is read back through the other KN.
    let mut p = c.kns[0].2.take().expect("KN");
    p.signal(nix::sys::signal::Signal::SIGKILL);
    p.wait();
    let after = c.wait_map(1);
    assert!(after.addr_of(victim).is_none());
    let mut cl = Client::new(vec![c.kns[1].1.clone()], reply_timeout());
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            cl.must(&[b"GET", k.as_bytes()]),
            Value::Bulk(format!("last{i}").into_bytes()),
            "{k}"
        );
    }
    c.stop();
}

/// Expiry times live in the log entries and the index reaches them with the entries: a
/// KN killed, then the memory node killed and restarted, changes no key's expiry time
/// (`PEXPIRETIME` exactly as set, `TTL` counting down, not reset), a `PERSIST` stays, and
/// keys whose time came are never returned again.
#[test]
fn expiry_times_survive_a_kn_sigkill_and_a_dpm_restart() {
    let mut c = Cluster::start(2);
    let map = c.wait_map(2);
    let victim = c.kns[0].0;
    let owners = map.slot_map();
    let keys: Vec<String> = (0..)
        .map(|i| format!("ttl:{i}"))
        .filter(|k| owners.owner(key_slot(k.as_bytes())) == victim)
        .take(40)
        .collect();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64
    };
    let at = now_ms() + 3_600_000;
    let short_ms = fabric::scaled(Duration::from_millis(1500)).as_millis() as i64;
    let mut cl = Client::new(c.addrs(), reply_timeout());
    for (i, k) in keys.iter().enumerate() {
        let k = k.as_bytes();
        let v = format!("v{i}");
        let v = v.as_bytes();
        let ok = Value::Simple("OK".into());
        match i % 4 {
            0 => assert_eq!(
                cl.must(&[b"SET", k, v, b"PXAT", at.to_string().as_bytes()]),
                ok
            ),
            1 => assert_eq!(cl.must(&[b"SET", k, v, b"EX", b"3600"]), ok),
            2 => {
                assert_eq!(cl.must(&[b"SET", k, v, b"EX", b"3600"]), ok);
                assert_eq!(cl.must(&[b"PERSIST", k]), Value::Int(1));
            }
            _ => assert_eq!(
                cl.must(&[b"SET", k, v, b"PX", short_ms.to_string().as_bytes()]),
                ok
            ),
        }
    }
    let set_done = now_ms();
    // Every short-lived key's time has come once this is past.
    let short_until = set_done + short_ms;

    let mut p = c.kns[0].2.take().expect("KN");
    p.signal(nix::sys::signal::Signal::SIGKILL);
    p.wait();
    assert!(c.wait_map(1).addr_of(victim).is_none());
    let mut dpm = c.dpm.take().expect("DPM");
    dpm.signal(nix::sys::signal::Signal::SIGKILL);
    dpm.wait();
    c.start_dpm();

    let mut cl = Client::new(vec![c.kns[1].1.clone()], reply_timeout());
    for (i, k) in keys.iter().enumerate() {
        let kb = k.as_bytes();
        match i % 4 {
            0 => assert_eq!(cl.must(&[b"PEXPIRETIME", kb]), Value::Int(at), "{k}"),
            1 => {
                let Value::Int(ttl) = cl.must(&[b"TTL", kb]) else {
                    panic!("TTL {k}")
                };
                let elapsed = (now_ms() - set_done) / 1000 + 1;
                assert!(
                    (3600 - elapsed..=3600).contains(&ttl),
                    "{k}: TTL {ttl} after {elapsed} s"
                );
            }
            2 => assert_eq!(cl.must(&[b"TTL", kb]), Value::Int(-1), "{k}"),
            _ => {}
        }
        if i % 4 != 3 {
            assert_eq!(
                cl.must(&[b"GET", kb]),
                Value::Bulk(format!("v{i}").into_bytes()),
                "{k}"
            );
        }
    }
    // The short-lived keys: gone once their time has come, and they stay gone.
    while now_ms() <= short_until {
        std::thread::sleep(Duration::from_millis(50));
    }
    for k in keys.iter().skip(3).step_by(4) {
        let kb = k.as_bytes();
        assert_eq!(cl.must(&[b"GET", kb]), Value::Nil, "{k}");
        assert_eq!(cl.must(&[b"TTL", kb]), Value::Int(-2), "{k}");
        assert_eq!(cl.must(&[b"EXISTS", kb]), Value::Int(0), "{k}");
    }
    let mut dpm = c.dpm.take().expect("DPM");
    dpm.signal(nix::sys::signal::Signal::SIGKILL);
    dpm.wait();
    c.start_dpm();
    for k in keys.iter().skip(3).step_by(4) {
        assert_eq!(cl.must(&[b"GET", k.as_bytes()]), Value::Nil, "{k}");
    }
    c.stop();
}
