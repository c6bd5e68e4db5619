//! Selective replication in the process cluster: a DPM, a manager and three KNs on
//! loopback, reached over the Redis protocol.
//!
//! - By the operator (`dinomo ctl replicate`): a key is replicated on every KN; each
//!   non-owner KN then answers its `GET` and `SET` itself (no `-MOVED`); a write through
//!   one KN is read by every KN right after it was acknowledged (linearizable); `ctl
//!   status` lists the key; `ctl dereplicate` returns it to its owner while a writer keeps
//!   writing it through all KNs, and every acknowledged write is there afterwards (the last
//!   one is the value, the other keys are intact), with non-owners answering `-MOVED` again.
//! - By the policy (`dinomo manager --policy`, thresholds that make the outcome certain):
//!   a hot key under load is replicated and served by a non-owner without `-MOVED`; once
//!   the load stops it is returned to its owner with its last acknowledged value.
//! - Failover: the owner of a replicated key is killed (SIGKILL); once it is fenced the
//!   key's slot has a new owner that took over the key's cell, and the survivors serve
//!   every acknowledged write. A replica paused (SIGSTOP) past its lease is fenced; resumed,
//!   it acknowledges nothing and overwrites nothing.
//! - A cluster that dies whole (manager and every KN) with a key replicated: the next
//!   manager, finding no KN to re-adopt, frees the key's cell once the old KNs are fenced,
//!   so the key's newest version (written through the cell) is in the index.
//!
//! Over shm, or over verbs with `DINOMO_RDMA_DEVICE` set (`common::fabric`: leases and
//! deadlines scaled for a software device).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fabric;
use common::procs::{deadline, ready_addr, spawn_kn_on, Client, Conn, Proc};
use common::{dinomo, format_region, stdout};
use dinomo::resp::Value;
use dinomo::shared::manager_proto::{key_hex, MapMsg, MgrClient, ReplicaPhase};
use dinomo::shared::slot::key_slot;

/// Leases of 2 s (longer over verbs: see `common::fabric::lease_ms`).
fn lease_ms() -> String {
    fabric::lease_ms(2000)
}

/// How long a client waits for one reply.
fn reply_timeout() -> Duration {
    fabric::scaled(Duration::from_secs(20))
}

/// A DPM, a manager (started with `manager_args` besides its own) and three KNs.
struct Cluster {
    _dir: tempfile::TempDir,
    _dpm: Proc,
    _manager: Proc,
    kns: Vec<Proc>,
    mgr: String,
    /// Client address by KN id.
    addrs: Vec<(u16, String)>,
}

impl Cluster {
    fn start(manager_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let region = dir.path().join("region");
        let region_s = region.to_str().expect("utf-8").to_string();
        format_region(&region, "128M", "1M");
        let fab = fabric::Dpm::new(&region_s);
        let (dpm, _) = Proc::spawn(&fabric::strs(&fab.serve_cmd(&[])));
        let (dpm_args, lease) = (fab.args(), lease_ms());
        let mut args = vec!["manager"];
        args.extend(fabric::strs(&dpm_args));
        args.extend(["--listen", "127.0.0.1:0", "--lease-ms", &lease]);
        args.extend_from_slice(manager_args);
        let (manager, mout) = Proc::spawn(&args);
        let mgr = ready_addr(mout);
        let mut kns = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..3 {
            let (id, addr, p) = spawn_kn_on(&fab, &mgr, &["--threads", "2", "--cache", "4M"]);
            kns.push(p);
            addrs.push((id, addr));
        }
        let c = Self {
            _dir: dir,
            _dpm: dpm,
            _manager: manager,
            kns,
            mgr,
            addrs,
        };
        c.wait_map(|m| m.kns.len() == 3 && m.settled);
        c
    }

    fn addr(&self, kn: u16) -> &str {
        &self
            .addrs
            .iter()
            .find(|(id, _)| *id == kn)
            .expect("a KN of this cluster")
            .1
    }

    /// The settled map once `done` holds for it.
    fn wait_map(&self, done: impl Fn(&MapMsg) -> bool) -> MapMsg {
        let mut m = MgrClient::connect(&self.mgr, deadline()).expect("manager");
        let t0 = Instant::now();
        loop {
            let map = m.map().expect("map");
            if map.settled && done(&map) {
                return map;
            }
            assert!(
                t0.elapsed() < deadline(),
                "the map never got there: {map:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn owner(&self, key: &[u8]) -> u16 {
        self.wait_map(|_| true).slot_map().owner(key_slot(key))
    }

    fn ctl(&self, args: &[&str]) -> String {
        let mut all = vec!["ctl", "--manager", self.mgr.as_str()];
        all.extend_from_slice(args);
        let o = dinomo(&all);
        assert!(
            o.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        stdout(&o)
    }
}

/// Whether the map serves `key` from every KN of `kns` (and lists exactly those).
fn served_by(map: &MapMsg, key: &[u8], kns: usize) -> bool {
    map.replicas.iter().any(|r| {
        r.key == key_hex(key)
            && r.phase == ReplicaPhase::Serving
            && r.cell.is_some()
            && r.kns.len() == kns
    })
}

/// One command on a fresh connection to `addr`, retrying `-TRYAGAIN` (bounded); any
/// other reply, `-MOVED` included, is returned.
fn direct(addr: &str, args: &[&[u8]]) -> Value {
    let t0 = Instant::now();
    loop {
        let mut c = Conn::open(addr, reply_timeout()).expect("connect");
        match c.call(args) {
            Value::Error(e) if e.starts_with("TRYAGAIN") => {
                assert!(t0.elapsed() < deadline(), "{args:?} at {addr}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            v => return v,
        }
    }
}

/// Waits until the manager at `mgr` has a settled map over `kns` KNs.
fn wait_settled(mgr: &str, kns: usize) {
    let mut m = MgrClient::connect(mgr, deadline()).expect("manager");
    let t0 = Instant::now();
    loop {
        let map = m.map().expect("map");
        if map.settled && map.kns.len() == kns {
            return;
        }
        assert!(
            t0.elapsed() < deadline(),
            "no settled map on {kns} KNs: {map:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bulk(v: &str) -> Value {
    Value::Bulk(v.as_bytes().to_vec())
}

fn ok() -> Value {
    Value::Simple("OK".into())
}

#[test]
fn an_operator_replicates_a_key_over_kn_processes_and_returns_it_to_its_owner() {
    let c = Cluster::start(&[]);
    let all: Vec<String> = c.addrs.iter().map(|(_, a)| a.clone()).collect();
    let mut cl = Client::new(all.clone(), reply_timeout());
    // Other keys, written before, stay intact throughout.
    for i in 0..100 {
        let (k, v) = (format!("other:{i}"), format!("v{i}"));
        assert_eq!(
            cl.cmd_at(&all[0], &[b"SET", k.as_bytes(), v.as_bytes()]),
            ok()
        );
    }
    let key = b"hot:key";
    let owner = c.owner(key);
    let others: Vec<u16> = c
        .addrs
        .iter()
        .map(|(id, _)| *id)
        .filter(|&id| id != owner)
        .collect();
    assert_eq!(cl.cmd_at(c.addr(owner), &[b"SET", key, b"v0"]), ok());
    // Before: a non-owner redirects the key.
    let before = direct(c.addr(others[0]), &[b"GET", key]);
    assert!(
        matches!(&before, Value::Error(e) if e.starts_with("MOVED ")),
        "{before:?}"
    );
    // Bad input changes nothing.
    let o = dinomo(&["ctl", "--manager", &c.mgr, "dereplicate", "hot:key"]);
    assert!(
        !o.status.success(),
        "dereplicating a key that is not replicated"
    );

    let out = c.ctl(&["replicate", "hot:key"]);
    assert!(out.contains("hot:key") && out.contains("serving"), "{out}");
    let map = c.wait_map(|m| served_by(m, key, 3));
    let r = &map.replicas[0];
    assert_eq!((r.owner, r.kns[0]), (owner, owner), "{r:?}");
    let o = dinomo(&["ctl", "--manager", &c.mgr, "replicate", "hot:key"]);
    assert!(!o.status.success(), "replicating a key twice");
    let status = c.ctl(&["status"]);
    let row = status
        .lines()
        .find(|l| l.starts_with("hot:key "))
        .unwrap_or_else(|| panic!("no replicated key in status:\n{status}"));
    assert!(row.contains("serving"), "{row}");

    // Every KN answers the key itself, reads and writes, and every write acknowledged by
    // one KN is read by every KN right afterwards.
    for &kn in &others {
        assert_eq!(direct(c.addr(kn), &[b"GET", key]), bulk("v0"), "KN {kn}");
    }
    let ids: Vec<u16> = c.addrs.iter().map(|(id, _)| *id).collect();
    for round in 0..30 {
        let writer = ids[round % ids.len()];
        let v = format!("v{}", round + 1);
        assert_eq!(
            direct(c.addr(writer), &[b"SET", key, v.as_bytes()]),
            ok(),
            "write at KN {writer}"
        );
        for &reader in &ids {
            assert_eq!(
                direct(c.addr(reader), &[b"GET", key]),
                bulk(&v),
                "KN {reader} after KN {writer} wrote {v}"
            );
        }
    }

    // Dereplicate while a writer keeps writing the key through every KN (following
    // MOVED, retrying TRYAGAIN): the last acknowledged write is the value afterwards.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, all) = (Arc::clone(&stop), all.clone());
        std::thread::spawn(move || {
            let mut cl = Client::new(all.clone(), reply_timeout());
            let mut last = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) || n < 50 {
                n += 1;
                let v = format!("w{n}");
                let at = &all[n as usize % all.len()];
                if cl.cmd_at(at, &[b"SET", b"hot:key", v.as_bytes()]) == ok() {
                    last = Some(v);
                }
            }
            (n, last)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let out = c.ctl(&["dereplicate", "hot:key"]);
    assert!(!out.contains("hot:key"), "{out}");
    stop.store(true, Ordering::Release);
    let (writes, last) = writer.join().expect("writer");
    let last = last.expect("some write acknowledged");
    assert!(writes >= 50);
    let map = c.wait_map(|m| m.replicas.is_empty());
    assert_eq!(map.slot_map().owner(key_slot(key)), owner);
    assert_eq!(direct(c.addr(owner), &[b"GET", key]), bulk(&last));
    for &kn in &others {
        let v = direct(c.addr(kn), &[b"GET", key]);
        assert!(
            matches!(&v, Value::Error(e) if e.starts_with("MOVED ")),
            "KN {kn} after dereplication: {v:?}"
        );
    }
    assert_eq!(cl.cmd_at(&all[1], &[b"GET", key]), bulk(&last));
    for i in 0..100 {
        let (k, v) = (format!("other:{i}"), format!("v{i}"));
        assert_eq!(cl.cmd_at(&all[2], &[b"GET", k.as_bytes()]), bulk(&v), "{k}");
    }
    let status = c.ctl(&["status"]);
    assert!(
        !status.lines().any(|l| l.starts_with("hot:key ")),
        "{status}"
    );
}

#[test]
fn the_policy_replicates_a_hot_key_and_returns_it_once_it_cooled() {
    // Decide every 500 ms; never add or remove a KN; a key is hot above mean + 2 sigma.
    let c = Cluster::start(&[
        "--policy",
        "--policy-period-ms",
        "500",
        "--busy-add",
        "1",
        "--idle-remove",
        "0",
        "--min-kns",
        "3",
        "--max-kns",
        "3",
        "--hot-sigmas",
        "2",
    ]);
    let all: Vec<String> = c.addrs.iter().map(|(_, a)| a.clone()).collect();
    let key = b"policy:hot";
    let owner = c.owner(key);
    let other = c
        .addrs
        .iter()
        .map(|(id, _)| *id)
        .find(|&id| id != owner)
        .expect("a non-owner");
    // Load: the hot key half the time, twenty cold keys the rest, until it is replicated.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, all) = (Arc::clone(&stop), all.clone());
        std::thread::spawn(move || {
            let mut cl = Client::new(all.clone(), reply_timeout());
            let mut last = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                if i % 2 == 0 {
                    let v = format!("p{i}");
                    if cl.cmd_at(&all[0], &[b"SET", b"policy:hot", v.as_bytes()]) == ok() {
                        last = Some(v);
                    }
                } else {
                    let k = format!("cold:{}", i % 20);
                    let _ = cl.cmd_at(&all[0], &[b"GET", k.as_bytes()]);
                }
            }
            last
        })
    };
    c.wait_map(|m| served_by(m, key, 3));
    // While it is hot, a non-owner serves the key itself.
    let v = direct(c.addr(other), &[b"GET", key]);
    assert!(
        matches!(&v, Value::Bulk(b) if b.starts_with(b"p")),
        "KN {other}: {v:?}"
    );
    stop.store(true, Ordering::Release);
    let last = load.join().expect("load").expect("some write acknowledged");
    // Unloaded, the key is no longer reported hot: returned to its owner.
    c.wait_map(|m| m.replicas.is_empty());
    assert_eq!(direct(c.addr(owner), &[b"GET", key]), bulk(&last));
    let v = direct(c.addr(other), &[b"GET", key]);
    assert!(
        matches!(&v, Value::Error(e) if e.starts_with("MOVED ")),
        "{v:?}"
    );
}

#[test]
fn a_replicated_key_survives_its_owners_sigkill_and_a_fenced_replica_changes_nothing() {
    let c = Cluster::start(&[]);
    let key = b"fail:key";
    let owner = c.owner(key);
    c.ctl(&["replicate", "fail:key"]);
    c.wait_map(|m| served_by(m, key, 3));
    let ids: Vec<u16> = c.addrs.iter().map(|(id, _)| *id).collect();
    let others: Vec<u16> = ids.iter().copied().filter(|&k| k != owner).collect();
    // Writes through every KN; the last one through a replica that is not the owner.
    for (i, kn) in ids.iter().cycle().take(9).enumerate() {
        let v = format!("a{i}");
        assert_eq!(direct(c.addr(*kn), &[b"SET", key, v.as_bytes()]), ok());
    }
    assert_eq!(
        direct(c.addr(others[0]), &[b"SET", key, b"before-kill"]),
        ok()
    );

    // The owner dies: once its lease lapsed and it was fenced, the key's slot has a new
    // owner, which took over the cell; both survivors still serve the key themselves.
    let i = c
        .addrs
        .iter()
        .position(|(id, _)| *id == owner)
        .expect("owner");
    c.kns[i].signal(nix::sys::signal::Signal::SIGKILL);
    let map = c.wait_map(|m| m.kns.len() == 2 && served_by(m, key, 2));
    let r = &map.replicas[0];
    assert_ne!(r.owner, owner);
    assert_eq!(map.slot_map().owner(key_slot(key)), r.owner);
    for &kn in &others {
        assert_eq!(
            direct(c.addr(kn), &[b"GET", key]),
            bulk("before-kill"),
            "KN {kn}"
        );
    }
    assert_eq!(
        direct(c.addr(others[1]), &[b"SET", key, b"after-kill"]),
        ok()
    );
    assert_eq!(
        direct(c.addr(others[0]), &[b"GET", key]),
        bulk("after-kill")
    );

    // A replica paused past its lease is fenced; resumed, it acknowledges nothing and
    // changes nothing: the value written by the survivor meanwhile stays.
    let paused = others
        .iter()
        .copied()
        .find(|&k| k != r.owner)
        .expect("a replica");
    let survivor = r.owner;
    let j = c
        .addrs
        .iter()
        .position(|(id, _)| *id == paused)
        .expect("paused");
    let mut zombie = Conn::open(c.addr(paused), reply_timeout()).expect("connect");
    c.kns[j].signal(nix::sys::signal::Signal::SIGSTOP);
    c.kns[j].wait_stopped();
    // Sent while it is stopped: served (or not) only after it resumes.
    assert!(zombie.send(&[b"SET", key, b"from-the-paused-kn"]));
    let map = c.wait_map(|m| m.kns.len() == 1 && served_by(m, key, 1));
    assert_eq!(map.replicas[0].owner, survivor);
    assert_eq!(direct(c.addr(survivor), &[b"SET", key, b"survivor"]), ok());
    c.kns[j].signal(nix::sys::signal::Signal::SIGCONT);
    match zombie.read() {
        None => {}
        Some(Value::Error(_)) => {}
        Some(v) => panic!("a fenced KN answered {v:?}"),
    }
    assert_eq!(direct(c.addr(survivor), &[b"GET", key]), bulk("survivor"));

    // Returned to the survivor, the last acknowledged value is in the index.
    c.ctl(&["dereplicate", "fail:key"]);
    c.wait_map(|m| m.replicas.is_empty());
    assert_eq!(direct(c.addr(survivor), &[b"GET", key]), bulk("survivor"));
}

#[test]
fn a_key_replicated_by_a_cluster_that_died_whole_is_in_the_index_for_the_next_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("region");
    let region_s = region.to_str().expect("utf-8").to_string();
    format_region(&region, "128M", "1M");
    let fab = fabric::Dpm::new(&region_s);
    let (_dpm, _) = Proc::spawn(&fabric::strs(&fab.serve_cmd(&[])));
    let manager = || {
        let (dpm_args, lease) = (fab.args(), lease_ms());
        let mut args = vec!["manager"];
        args.extend(fabric::strs(&dpm_args));
        args.extend(["--listen", "127.0.0.1:0", "--lease-ms", &lease]);
        let (p, out) = Proc::spawn(&args);
        (p, ready_addr(out))
    };
    let key = b"orphan:key";
    // The first cluster: the key written, replicated, written through a replica.
    {
        let (_m, mgr) = manager();
        let kns: Vec<(u16, String, Proc)> = (0..2)
            .map(|_| spawn_kn_on(&fab, &mgr, &["--threads", "1", "--cache", "2M"]))
            .collect();
        wait_settled(&mgr, 2);
        let all: Vec<String> = kns.iter().map(|k| k.1.clone()).collect();
        let mut cl = Client::new(all.clone(), reply_timeout());
        assert_eq!(cl.cmd_at(&all[0], &[b"SET", key, b"before"]), ok());
        let o = dinomo(&["ctl", "--manager", &mgr, "replicate", "orphan:key"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for (_, addr, _) in &kns {
            assert_eq!(direct(addr, &[b"SET", key, b"through-the-cell"]), ok());
        }
        // Everything dies at once (the guards SIGKILL the manager and the KNs).
    }
    // The next manager finds no KN coming back: once their leases lapsed and they are
    // fenced, it frees the cell, so the key's newest version is in the index.
    let (_m, mgr) = manager();
    let (_, addr, _kn) = spawn_kn_on(&fab, &mgr, &["--threads", "1", "--cache", "2M"]);
    assert_eq!(direct(&addr, &[b"GET", key]), bulk("through-the-cell"));
    assert_eq!(direct(&addr, &[b"SET", key, b"after"]), ok());
    assert_eq!(direct(&addr, &[b"GET", key]), bulk("after"));
}
