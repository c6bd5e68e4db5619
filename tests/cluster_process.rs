//! A whole cluster as separate processes on loopback: a DPM, a manager and three KNs,
//! reached over the Redis protocol. Writes go through one KN and follow `MOVED`; reads go
//! to the owners; bad input gets errors and writes nothing; one KN is killed with SIGKILL
//! and, once its (short) lease expires, the others serve its slots with every acknowledged
//! write present; a new KN joins and serves moved slots with every write present; another
//! KN leaves gracefully and the rest serve everything; finally everything stops cleanly.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dinomo::manager::MgrClient;
use dinomo::resp::{encode_command, parse_value, Limits, Value};

const DEADLINE: Duration = Duration::from_secs(60);
const LEASE_MS: &str = "2000";

struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(args: &[&str]) -> (Self, ChildStdout) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dinomo"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dinomo");
        let out = child.stdout.take().expect("stdout");
        (Self { child }, out)
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(t0.elapsed() < DEADLINE, "process did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The first line the process prints, ending in an address.
fn ready_addr(out: ChildStdout) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(DEADLINE)
        .expect("process did not get ready");
    line.split_whitespace()
        .last()
        .expect("an address")
        .to_string()
}

/// One RESP connection.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: &str) -> Self {
        let s = TcpStream::connect(addr).expect("connect to KN");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Self { s, buf: Vec::new() }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
    }

    /// Reads one reply; `None` if the server closed the connection.
    fn read(&mut self) -> Option<Value> {
        loop {
            if let Some((v, n)) = parse_value(&self.buf, &Limits::default()).expect("valid reply") {
                self.buf.drain(..n);
                return Some(v);
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn cmd(&mut self, args: &[&[u8]]) -> Value {
        let mut b = Vec::new();
        encode_command(&mut b, args);
        self.send_raw(&b);
        self.read().expect("a reply")
    }
}

/// Connections by address; follows `MOVED` and retries `TRYAGAIN` and refused
/// connections (a KN that just died) until the deadline.
struct ClusterClient {
    conns: HashMap<String, Conn>,
    moved: u64,
}

impl ClusterClient {
    fn new() -> Self {
        Self {
            conns: HashMap::new(),
            moved: 0,
        }
    }

    fn cmd(&mut self, first: &str, args: &[&[u8]]) -> Value {
        let mut addr = first.to_string();
        let t0 = Instant::now();
        loop {
            assert!(t0.elapsed() < DEADLINE, "no answer for {args:?}");
            if !self.conns.contains_key(&addr) {
                match TcpStream::connect(&addr) {
                    Ok(_) => {
                        self.conns.insert(addr.clone(), Conn::open(&addr));
                    }
                    Err(_) => {
                        // A dead node: start over from the first address.
                        std::thread::sleep(Duration::from_millis(50));
                        addr = first.to_string();
                        continue;
                    }
                }
            }
            let c = self.conns.get_mut(&addr).expect("conn");
            let mut b = Vec::new();
            encode_command(&mut b, args);
            let reply = if c.s.write_all(&b).is_ok() {
                c.read()
            } else {
                None
            };
            match reply {
                None => {
                    self.conns.remove(&addr);
                    addr = first.to_string();
                    std::thread::sleep(Duration::from_millis(50));
                }
                Some(Value::Error(e)) if e.starts_with("MOVED ") => {
                    self.moved += 1;
                    addr = e.split_whitespace().nth(2).expect("address").to_string();
                }
                Some(Value::Error(e))
                    if e.starts_with("TRYAGAIN") || e.starts_with("CLUSTERDOWN") =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Some(v) => return v,
            }
        }
    }
}

fn format_region(region: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_dinomo"))
        .args(["dpm", "format", "--path"])
        .arg(region)
        .args(["--size", "128M", "--block-size", "1M"])
        .stdout(Stdio::null())
        .status()
        .expect("run dpm format");
    assert!(st.success());
}

/// Waits until the manager's map lists exactly `kns` and is settled.
fn wait_map(mgr: &str, kns: usize) -> dinomo::manager::MapMsg {
    let mut m = MgrClient::connect(mgr, DEADLINE).expect("manager");
    let t0 = Instant::now();
    loop {
        let map = m.map().expect("map");
        if map.kns.len() == kns && map.settled {
            return map;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "map did not settle on {kns} KNs: {map:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_kn_processes_serve_redis_clients_and_survive_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("region");
    let region_s = region.to_str().expect("utf-8").to_string();
    format_region(&region);
    let (dpm, _dpm_out) = Proc::spawn(&[
        "dpm",
        "serve",
        "--path",
        &region_s,
        "--workers",
        "1",
        "--no-pin",
    ]);
    let (manager, mout) = Proc::spawn(&[
        "manager",
        "--dpm",
        &region_s,
        "--listen",
        "127.0.0.1:0",
        "--lease-ms",
        LEASE_MS,
    ]);
    let mgr = ready_addr(mout);
    let mut kns = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let (p, out) = Proc::spawn(&[
            "kn",
            "--dpm",
            &region_s,
            "--listen",
            "127.0.0.1:0",
            "--manager",
            &mgr,
            "--threads",
            "2",
            "--cache",
            "4M",
        ]);
        kns.push(Some(p));
        addrs.push(ready_addr(out));
    }
    let map = wait_map(&mgr, 3);
    assert!(map.epoch >= 3, "{map:?}");

    // Writes through KN 0, following MOVED.
    let mut cl = ClusterClient::new();
    let mut acked: HashMap<String, String> = HashMap::new();
    for i in 0..300 {
        let (k, v) = (
            format!("key:{i}"),
            format!("value-{i}-{}", "x".repeat(i % 50)),
        );
        assert_eq!(
            cl.cmd(&addrs[0], &[b"SET", k.as_bytes(), v.as_bytes()]),
            Value::Simple("OK".into())
        );
        acked.insert(k, v);
    }
    assert!(
        cl.moved > 100,
        "only {} MOVED for 300 keys over 3 KNs",
        cl.moved
    );
    // Reads through the owners (starting from KN 1).
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd(&addrs[1], &[b"GET", k.as_bytes()]),
            Value::Bulk(v.clone().into_bytes()),
            "{k}"
        );
    }
    assert_eq!(cl.cmd(&addrs[2], &[b"GET", b"absent"]), Value::Nil);

    // Same-slot multi-key commands, and bad input on one connection.
    assert_eq!(
        cl.cmd(&addrs[0], &[b"MSET", b"{u}a", b"1", b"{u}b", b"2"]),
        Value::Simple("OK".into())
    );
    assert_eq!(
        cl.cmd(&addrs[0], &[b"MGET", b"{u}a", b"{u}b", b"{u}c"]),
        Value::Array(vec![
            Value::Bulk(b"1".to_vec()),
            Value::Bulk(b"2".to_vec()),
            Value::Nil
        ])
    );
    assert_eq!(
        cl.cmd(&addrs[0], &[b"EXISTS", b"{u}a", b"{u}c"]),
        Value::Int(1)
    );
    assert_eq!(
        cl.cmd(&addrs[0], &[b"DEL", b"{u}b", b"{u}c"]),
        Value::Int(1)
    );
    assert_eq!(cl.cmd(&addrs[0], &[b"GET", b"{u}b"]), Value::Nil);
    let mut c = Conn::open(&addrs[0]);
    assert!(
        matches!(c.cmd(&[b"NOSUCHCMD", b"x"]), Value::Error(e) if e.starts_with("ERR unknown command"))
    );
    assert!(
        matches!(c.cmd(&[b"MSET", b"a", b"1", b"b", b"2"]), Value::Error(e) if e.starts_with("CROSSSLOT"))
    );
    assert!(matches!(c.cmd(&[b"MGET", b"a", b"b"]), Value::Error(e) if e.starts_with("CROSSSLOT")));
    assert!(matches!(c.cmd(&[b"SET", b"k"]), Value::Error(e) if e.starts_with("ERR wrong number")));
    assert_eq!(c.cmd(&[b"PING"]), Value::Simple("PONG".into()));
    // Cluster introspection.
    let slot = c.cmd(&[b"CLUSTER", b"KEYSLOT", b"foo"]);
    assert_eq!(slot, Value::Int(12182));
    match c.cmd(&[b"CLUSTER", b"SLOTS"]) {
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
    match c.cmd(&[b"CLUSTER", b"NODES"]) {
        Value::Bulk(b) => {
            let t = String::from_utf8(b).expect("utf-8");
            assert_eq!(t.lines().count(), 3, "{t}");
            assert!(t.lines().any(|l| l.contains("myself")), "{t}");
        }
        other => panic!("CLUSTER NODES: {other:?}"),
    }
    match c.cmd(&[b"INFO"]) {
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
    assert!(matches!(c.cmd(&[b"HELLO", b"3"]), Value::Map(m) if m.len() == 7));
    assert!(matches!(c.cmd(&[b"HELLO", b"4"]), Value::Error(e) if e.starts_with("NOPROTO")));
    // A malformed frame gets an error and the connection is closed.
    c.send_raw(b"*1\r\n$x\r\n");
    assert!(matches!(c.read(), Some(Value::Error(e)) if e.contains("Protocol error")));
    assert_eq!(c.read(), None);
    // An oversized bulk string is refused from its header, nothing is written.
    let mut c = Conn::open(&addrs[0]);
    c.send_raw(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$999999999\r\n");
    assert!(matches!(c.read(), Some(Value::Error(e)) if e.contains("Protocol error")));
    assert_eq!(c.read(), None);
    assert_eq!(cl.cmd(&addrs[0], &[b"GET", b"big"]), Value::Nil);

    // `dinomo bench --target` drives the same cluster over RESP.
    let json = dir.path().join("bench.json");
    let st = Command::new(env!("CARGO_BIN_EXE_dinomo"))
        .args([
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

    // Kill KN 1 after a last round of acknowledged writes (some of them its own, likely
    // not merged yet).
    for i in 300..400 {
        let (k, v) = (format!("key:{i}"), format!("late-{i}"));
        assert_eq!(
            cl.cmd(&addrs[1], &[b"SET", k.as_bytes(), v.as_bytes()]),
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
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();

    // After the lease expires the manager fences KN 1 and gives its slots to the others.
    let after = wait_map(&mgr, 2);
    assert!(after.epoch > map.epoch);
    assert!(after.addr_of(victim_id).is_none());
    assert_eq!(after.slot_map().slots_of(victim_id), 0);
    let mut cl = ClusterClient::new();
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd(&addrs[2], &[b"GET", k.as_bytes()]),
            Value::Bulk(v.clone().into_bytes()),
            "{k} lost after failover"
        );
    }
    // The survivors take new writes on the dead KN's slots.
    for i in 0..50 {
        let k = format!("after:{i}");
        assert_eq!(
            cl.cmd(&addrs[0], &[b"SET", k.as_bytes(), b"v"]),
            Value::Simple("OK".into())
        );
    }

    // A new KN joins: slots move to it from live owners, which merge their logs before it
    // serves them (until then it answers TRYAGAIN); it starts cold and reads the DPM.
    let (joiner, out) = Proc::spawn(&[
        "kn",
        "--dpm",
        &region_s,
        "--listen",
        "127.0.0.1:0",
        "--manager",
        &mgr,
        "--threads",
        "1",
        "--cache",
        "1M",
    ]);
    kns.push(Some(joiner));
    let joiner_addr = ready_addr(out);
    let joined = wait_map(&mgr, 3);
    let joiner_id = joined
        .kns
        .iter()
        .find(|(_, a)| *a == joiner_addr)
        .map(|(id, _)| *id)
        .expect("the new KN is in the map");
    assert!(joined.slot_map().slots_of(joiner_id) > 0);
    let mut cl = ClusterClient::new();
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd(&joiner_addr, &[b"GET", k.as_bytes()]),
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
    let mut cl = ClusterClient::new();
    for (k, v) in &acked {
        assert_eq!(
            cl.cmd(&addrs[0], &[b"GET", k.as_bytes()]),
            Value::Bulk(v.clone().into_bytes()),
            "{k} lost after a graceful leave"
        );
    }
    for i in 0..50 {
        let k = format!("after:{i}");
        assert_eq!(
            cl.cmd(&addrs[0], &[b"GET", k.as_bytes()]),
            Value::Bulk(b"v".to_vec())
        );
    }

    // Clean stop: the last KN leaves, then the manager stops, then the DPM merges and marks
    // a clean shutdown.
    for k in kns.into_iter().flatten() {
        assert!(k.terminate().success());
    }
    assert!(manager.terminate().success());
    assert!(dpm.terminate().success());
    let out = Command::new(env!("CARGO_BIN_EXE_dinomo"))
        .args(["dpm", "inspect", "--json", "--path", &region_s])
        .output()
        .expect("inspect");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let text = report.to_string();
    assert!(
        text.contains("\"clean_shutdown\":true"),
        "region not marked clean: {text}"
    );
}
