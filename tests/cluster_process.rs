//! A whole cluster as separate processes on loopback: a DPM, a manager and three KNs,
//! reached over the Redis protocol. Writes go through one KN and follow `MOVED`; reads go
//! to the owners; bad input gets errors and writes nothing; one KN is killed with SIGKILL
//! and, once its (short) lease expires, the others serve its slots with every acknowledged
//! write present; a new KN joins and serves moved slots with every write present; another
//! KN leaves gracefully and the rest serve everything; finally everything stops cleanly.
//! Throughout, the manager neither maps nor opens the region file (`/proc/<pid>/maps` and
//! `/proc/<pid>/fd`).
//!
//! Over shm by default; with `DINOMO_RDMA_DEVICE` (and `DINOMO_RDMA_GID_INDEX`) set, over
//! RDMA verbs on that device (see `common::fabric`; the lease is 50 times longer there).

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::fabric::{self, strs};
use common::procs::{ready_addr, spawn_kn_on, wait_map, Client, Conn, Proc};
use common::{dinomo, dinomo_cmd, format_region, proc_files};
use dinomo::resp::Value;
use nix::sys::signal::Signal;

const LEASE_MS: u64 = 2000;
/// How long a reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn three_kn_processes_serve_redis_clients_and_survive_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("region");
    let region_s = region.to_str().expect("utf-8").to_string();
    format_region(&region, "128M", "1M");
    let fab = fabric::Dpm::new(&region_s);
    let (dpm, _dpm_out) = Proc::spawn(&strs(&fab.serve_cmd(&[])));
    let lease_ms = fabric::lease_ms(LEASE_MS);
    let dpm_args = fab.args();
    let mut args = vec!["manager"];
    args.extend(strs(&dpm_args));
    args.extend(["--listen", "127.0.0.1:0", "--lease-ms", &lease_ms]);
    let (manager, mout) = Proc::spawn(&args);
    let mgr = ready_addr(mout);
    let mut kns = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let (_, addr, p) = spawn_kn_on(&fab, &mgr, &["--threads", "2", "--cache", "4M"]);
        kns.push(Some(p));
        addrs.push(addr);
    }
    let map = wait_map(&mgr, 3);
    assert!(map.epoch >= 3, "{map:?}");

    // The manager reaches the DPM through control messages only: it neither maps nor
    // opens the region file. A KN on the shm fabric maps it, which shows the check sees a
    // mapping when there is one; over verbs a KN reaches it only through its queue pairs.
    let manager_pid = manager.pid().as_raw() as u32;
    assert!(
        !proc_files::touches(manager_pid, &region),
        "the manager maps or opens {}: {:?} {:?}",
        region.display(),
        proc_files::mapped_files(manager_pid),
        proc_files::open_files(manager_pid)
    );
    let kn0 = kns[0].as_ref().expect("KN 0").pid().as_raw() as u32;
    assert_eq!(
        proc_files::touches(kn0, &region),
        !fab.is_verbs(),
        "a KN maps the region exactly when it is on the shm fabric"
    );

    // Writes through KN 0, following MOVED.
    let mut cl = Client::new(addrs.clone(), REPLY_TIMEOUT);
    let mut acked: HashMap<String, String> = HashMap::new();
    for i in 0..300 {
        let (k, v) = (
            format!("key:{i}"),
            format!("value-{i}-{}", "x".repeat(i % 50)),
        );
        assert_eq!(
            cl.cmd_at(&addrs[0], &[b"SET", k.as_bytes(), v.as_bytes()]),
            Value::Simple("OK".into())
        );
        acked.insert(k, v);
    }
    assert!(
        cl.moved() > 100,
        "only {} MOVED for 300 keys over 3 KNs",
        cl.moved()
    );
    // Reads through the owners (starting from KN 1).
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd_at(&addrs[1], &[b"GET", k.as_bytes()]),
            Value::Bulk(v.clone().into_bytes()),
            "{k}"
        );
    }
    assert_eq!(cl.cmd_at(&addrs[2], &[b"GET", b"absent"]), Value::Nil);

    // Same-slot multi-key commands, and bad input on one connection.
    assert_eq!(
        cl.cmd_at(&addrs[0], &[b"MSET", b"{u}a", b"1", b"{u}b", b"2"]),
        Value::Simple("OK".into())
    );
    assert_eq!(
        cl.cmd_at(&addrs[0], &[b"MGET", b"{u}a", b"{u}b", b"{u}c"]),
        Value::Array(vec![
            Value::Bulk(b"1".to_vec()),
            Value::Bulk(b"2".to_vec()),
            Value::Nil
        ])
    );
    assert_eq!(
        cl.cmd_at(&addrs[0], &[b"EXISTS", b"{u}a", b"{u}c"]),
        Value::Int(1)
    );
    assert_eq!(
        cl.cmd_at(&addrs[0], &[b"DEL", b"{u}b", b"{u}c"]),
        Value::Int(1)
    );
    assert_eq!(cl.cmd_at(&addrs[0], &[b"GET", b"{u}b"]), Value::Nil);
    let mut c = Conn::open(&addrs[0], REPLY_TIMEOUT).expect("connect to KN");
    assert!(
        matches!(c.call(&[b"NOSUCHCMD", b"x"]), Value::Error(e) if e.starts_with("ERR unknown command"))
    );
    assert!(
        matches!(c.call(&[b"MSET", b"a", b"1", b"b", b"2"]), Value::Error(e) if e.starts_with("CROSSSLOT"))
    );
    assert!(
        matches!(c.call(&[b"MGET", b"a", b"b"]), Value::Error(e) if e.starts_with("CROSSSLOT"))
    );
    assert!(
        matches!(c.call(&[b"SET", b"k"]), Value::Error(e) if e.starts_with("ERR wrong number"))
    );
    assert!(
        matches!(c.call(&[b"SELECT", b"1"]), Value::Error(e) if e.contains("SELECT is not allowed"))
    );
    assert!(
        matches!(c.call(&[b"SET", b"{u}opt", b"v", b"EX", b"10", b"NOSUCHOPTION"]), Value::Error(e) if e.starts_with("ERR syntax error"))
    );
    let long = vec![b'k'; 1025];
    assert!(
        matches!(c.call(&[b"SET", &long, b"v"]), Value::Error(e) if e.contains("key length 1025"))
    );
    assert_eq!(cl.cmd_at(&addrs[0], &[b"GET", b"{u}opt"]), Value::Nil);
    assert_eq!(c.call(&[b"PING"]), Value::Simple("PONG".into()));
    // Cluster introspection.
    let slot = c.call(&[b"CLUSTER", b"KEYSLOT", b"foo"]);
    assert_eq!(slot, Value::Int(12182));
    match c.call(&[b"CLUSTER", b"SLOTS"]) {
        Value::Array(r) => {
            let covered: i64 = r
                .iter()
                .map(|x| match x {
                    Value::Array(v) => match (&v[0], &v[1]) {
                        (Value::Int(a), Value::Int(b)) => b - a + 1,
                        _ => panic!("bad range {v:?}"),
                    },
                    _ => panic!("bad entry {x:?}"),
                })
                .sum();
            assert_eq!(covered, 16384);
        }
        other => panic!("CLUSTER SLOTS: {other:?}"),
    }
    match c.call(&[b"CLUSTER", b"NODES"]) {
        Value::Bulk(b) => {
            let t = String::from_utf8(b).expect("utf-8");
            assert_eq!(t.lines().count(), 3, "{t}");
            assert!(t.lines().any(|l| l.contains("myself")), "{t}");
        }
        other => panic!("CLUSTER NODES: {other:?}"),
    }
    match c.call(&[b"INFO"]) {
        Value::Bulk(b) => {
            let t = String::from_utf8(b).expect("utf-8");
            assert!(
                t.contains("rts_per_op:") && t.contains("cache_value_bytes:"),
                "{t}"
            );
        }
        other => panic!("INFO: {other:?}"),
    }
    // HELLO 3 switches to RESP3: maps and the RESP3 null.
    assert!(matches!(c.call(&[b"HELLO", b"3"]), Value::Map(m) if m.len() == 7));
    assert!(matches!(c.call(&[b"HELLO", b"4"]), Value::Error(e) if e.starts_with("NOPROTO")));
    // A malformed frame gets an error and the connection is closed.
    assert!(c.send_raw(b"*1\r\n$x\r\n"));
    assert!(matches!(c.read(), Some(Value::Error(e)) if e.contains("Protocol error")));
    c.assert_closed();
    // An oversized bulk string is refused from its header, nothing is written.
    let mut c = Conn::open(&addrs[0], REPLY_TIMEOUT).expect("connect to KN");
    assert!(c.send_raw(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$999999999\r\n"));
    assert!(
        matches!(c.read(), Some(Value::Error(e)) if e.contains("bulk length 999999999 exceeds the limit"))
    );
    c.assert_closed();
    assert_eq!(cl.cmd_at(&addrs[0], &[b"GET", b"big"]), Value::Nil);

    // `dinomo bench --target` drives the same cluster over RESP.
    let json = dir.path().join("bench.json");
    let st = dinomo_cmd([
        "bench",
        "--target",
        &addrs[2],
        "--keys",
        "300",
        "--ops",
        "1000",
        "--warmup",
        "100",
        "--clients",
        "2",
        "--value-size",
        "64",
        "--workload",
        "write-heavy",
        "--quiet",
        "--json",
    ])
    .arg(&json)
    .stdout(Stdio::null())
    .status()
    .expect("run dinomo bench --target");
    assert!(st.success());
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("bench json")).expect("json");
    assert_eq!(r["ops"], 1000, "{r}");
    assert_eq!(r["missing"], 0, "{r}");
    assert_eq!(r["nodes"], 3, "{r}");
    assert!(r["rts_per_op"].as_f64().is_some(), "{r}");
    // Half the operations are writes, and each reaches the memory node (its log append).
    assert!(r["verbs_per_op"].as_f64().is_some_and(|v| v > 0.0), "{r}");

    // Kill KN 1 after a last round of acknowledged writes (some of them its own, likely
    // not merged yet).
    for i in 300..400 {
        let (k, v) = (format!("key:{i}"), format!("late-{i}"));
        assert_eq!(
            cl.cmd_at(&addrs[1], &[b"SET", k.as_bytes(), v.as_bytes()]),
            Value::Simple("OK".into())
        );
        acked.insert(k, v);
    }
    let victim_id = map
        .kns
        .iter()
        .find(|(_, a)| *a == addrs[1])
        .map(|(id, _)| *id)
        .expect("KN 1 in the map");
    let victim_slots = map.slot_map().slots_of(victim_id);
    assert!(victim_slots > 0);
    let mut victim = kns[1].take().expect("KN 1");
    victim.signal(Signal::SIGKILL);
    victim.wait();

    // After the lease expires the manager fences KN 1 and gives its slots to the others.
    let after = wait_map(&mgr, 2);
    assert!(after.epoch > map.epoch);
    assert!(after.addr_of(victim_id).is_none());
    assert_eq!(after.slot_map().slots_of(victim_id), 0);
    let mut cl = Client::new(addrs.clone(), REPLY_TIMEOUT);
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd_at(&addrs[2], &[b"GET", k.as_bytes()]),
            Value::Bulk(v.clone().into_bytes()),
            "{k} lost after failover"
        );
    }
    // The survivors take new writes on the dead KN's slots.
    for i in 0..50 {
        let k = format!("after:{i}");
        assert_eq!(
            cl.cmd_at(&addrs[0], &[b"SET", k.as_bytes(), b"v"]),
            Value::Simple("OK".into())
        );
    }

    // A new KN joins: slots move to it from live owners, which merge their logs before it
    // serves them (until then it answers TRYAGAIN); it starts cold and reads the DPM.
    let (_, joiner_addr, joiner) = spawn_kn_on(&fab, &mgr, &["--threads", "1", "--cache", "1M"]);
    kns.push(Some(joiner));
    let joined = wait_map(&mgr, 3);
    let joiner_id = joined
        .kns
        .iter()
        .find(|(_, a)| *a == joiner_addr)
        .map(|(id, _)| *id)
        .expect("the new KN is in the map");
    assert!(joined.slot_map().slots_of(joiner_id) > 0);
    let mut cl = Client::new(addrs.clone(), REPLY_TIMEOUT);
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd_at(&joiner_addr, &[b"GET", k.as_bytes()]),
            Value::Bulk(v.clone().into_bytes()),
            "{k} lost after a join"
        );
    }

    // A graceful leave: KN 2 flushes, closes its logs and hands its slots back at once (no
    // lease expiry); the others then serve every key.
    let leaving = kns[2].take().expect("KN 2");
    assert!(leaving.terminate().success());
    let last = wait_map(&mgr, 2);
    assert!(last.addr_of(last.kns[0].0).is_some());
    assert!(last.kns.iter().all(|(_, a)| *a != addrs[2]));
    let mut cl = Client::new(addrs.clone(), REPLY_TIMEOUT);
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd_at(&addrs[0], &[b"GET", k.as_bytes()]),
            Value::Bulk(v.clone().into_bytes()),
            "{k} lost after a graceful leave"
        );
    }
    for i in 0..50 {
        let k = format!("after:{i}");
        assert_eq!(
            cl.cmd_at(&addrs[0], &[b"GET", k.as_bytes()]),
            Value::Bulk(b"v".to_vec())
        );
    }

    // Through a SIGKILLed KN, a join and a leave, the manager never touched the region.
    assert!(!proc_files::touches(manager_pid, &region));

    // Clean stop: the last KN leaves, then the manager stops, then the DPM merges and marks
    // a clean shutdown.
    for k in kns.into_iter().flatten() {
        assert!(k.terminate().success());
    }
    assert!(manager.terminate().success());
    assert!(dpm.terminate().success());
    let out = dinomo(&["dpm", "inspect", "--json", "--path", &region_s]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let text = report.to_string();
    assert!(
        text.contains("\"clean_shutdown\":true"),
        "region not marked clean: {text}"
    );
}
