//! The keyspace walks over the Redis protocol, as `redis-cli` uses them: a DPM, a manager
//! and one KN (two shards) as processes on loopback. `SCAN` (with `MATCH`, `COUNT`, `TYPE`
//! and Redis's errors), `KEYS`, `DBSIZE`, `RANDOMKEY`, `CLUSTER COUNTKEYSINSLOT` and
//! `GETKEYSINSLOT`, and `FLUSHALL`, checked against the keys written.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::format_region;
use common::procs::{ready_addr, spawn_kn, wait_map, Conn, Proc};
use dinomo::resp::Value;
use dinomo_shared::slot::key_slot;

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

fn bulk_set(v: &Value) -> Vec<Vec<u8>> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::Bulk(b) => b.clone(),
                other => panic!("not a key: {other:?}"),
            })
            .collect(),
        other => panic!("not an array: {other:?}"),
    }
}

/// `SCAN cursor ...`: (next cursor, keys).
fn scan(c: &mut Conn, cursor: &str, extra: &[&str]) -> (String, Vec<Vec<u8>>) {
    let mut args: Vec<&[u8]> = vec![b"SCAN", cursor.as_bytes()];
    args.extend(extra.iter().map(|a| a.as_bytes()));
    match c.call(&args) {
        Value::Array(a) if a.len() == 2 => {
            let Value::Bulk(next) = &a[0] else {
                panic!("cursor {:?}", a[0])
            };
            (
                String::from_utf8(next.clone()).expect("digits"),
                bulk_set(&a[1]),
            )
        }
        other => panic!("SCAN answered {other:?}"),
    }
}

/// A whole `SCAN` walk: every key it returned (with repeats) and the pages it took.
fn scan_all(c: &mut Conn, extra: &[&str]) -> (Vec<Vec<u8>>, usize) {
    let (mut cursor, mut all, mut pages) = ("0".to_string(), Vec::new(), 0);
    loop {
        let (next, keys) = scan(c, &cursor, extra);
        all.extend(keys);
        pages += 1;
        assert!(pages < 10_000, "the walk does not end");
        if next == "0" {
            return (all, pages);
        }
        cursor = next;
    }
}

fn err(v: Value) -> String {
    match v {
        Value::Error(e) => e,
        other => panic!("not an error: {other:?}"),
    }
}

#[test]
fn scan_keys_dbsize_and_flushall_over_resp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("region");
    let region_s = region.to_str().expect("utf-8").to_string();
    format_region(&region, "64M", "1M");
    let (_dpm, _) = Proc::spawn(&[
        "dpm",
        "serve",
        "--path",
        &region_s,
        "--workers",
        "1",
        "--no-pin",
    ]);
    let (_manager, mout) = Proc::spawn(&["manager", "--dpm", &region_s, "--listen", "127.0.0.1:0"]);
    let mgr = ready_addr(mout);
    let (_, addr, _kn) = spawn_kn(&region_s, &mgr, &["--threads", "2", "--cache", "1M"]);
    wait_map(&mgr, 1);
    let mut c = Conn::open(&addr, REPLY_TIMEOUT).expect("connect");

    let mut model: HashSet<Vec<u8>> = HashSet::new();
    for i in 0..2000 {
        let k = format!("k:{i:04}");
        assert_eq!(
            c.call(&[b"SET", k.as_bytes(), b"v"]),
            Value::Simple("OK".into())
        );
        model.insert(k.into_bytes());
    }
    for i in (0..2000).step_by(20) {
        let k = format!("k:{i:04}");
        assert_eq!(c.call(&[b"DEL", k.as_bytes()]), Value::Int(1));
        model.remove(k.as_bytes());
    }

    // SCAN: every key at least once, nothing else; pages near COUNT in size.
    let (all, pages) = scan_all(&mut c, &["COUNT", "100"]);
    let got: HashSet<Vec<u8>> = all.iter().cloned().collect();
    assert_eq!(got, model);
    assert!(pages >= 2, "{pages} pages");
    let (matched, _) = scan_all(&mut c, &["MATCH", "k:01*", "COUNT", "50"]);
    let want: HashSet<Vec<u8>> = model
        .iter()
        .filter(|k| k.starts_with(b"k:01"))
        .cloned()
        .collect();
    assert_eq!(matched.into_iter().collect::<HashSet<_>>(), want);
    assert_eq!(scan(&mut c, "0", &["TYPE", "hash"]), ("0".into(), vec![]));
    assert!(!scan(&mut c, "0", &["TYPE", "STRING", "COUNT", "5000"])
        .1
        .is_empty());

    // Redis's errors; a cursor the KN did not hand out is refused, never followed.
    for (args, want) in [
        (&["SCAN", "abc"][..], "ERR invalid cursor"),
        (&["SCAN", "-1"], "ERR invalid cursor"),
        (&["SCAN", "12345"], "ERR invalid cursor"),
        (&["SCAN", "18446744073709551615"], "ERR invalid cursor"),
        (&["SCAN", "0", "COUNT", "0"], "ERR syntax error"),
        (
            &["SCAN", "0", "COUNT", "x"],
            "ERR value is not an integer or out of range",
        ),
        (&["SCAN", "0", "MATCH"], "ERR syntax error"),
        (&["SCAN", "0", "BOGUS", "1"], "ERR syntax error"),
        (&["CLUSTER", "COUNTKEYSINSLOT", "16384"], "ERR Invalid slot"),
        (
            &["CLUSTER", "GETKEYSINSLOT", "1", "-1"],
            "ERR Invalid slot or number of keys",
        ),
    ] {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        assert_eq!(err(c.call(&a)), want, "{args:?}");
    }
    // A cursor forged from a valid one (its position moved far past the index) is refused.
    let (next, _) = scan(&mut c, "0", &["COUNT", "1"]);
    let n: u64 = next.parse().expect("u64");
    let forged = (n | ((1 << 37) - 1)) | (1 << 53);
    let e = c.call(&[b"SCAN", forged.to_string().as_bytes()]);
    assert!(
        matches!(&e, Value::Error(m) if m == "ERR invalid cursor") || matches!(&e, Value::Array(_)),
        "{e:?}"
    );

    // KEYS, DBSIZE, RANDOMKEY, CLUSTER COUNTKEYSINSLOT / GETKEYSINSLOT.
    let keys = bulk_set(&c.call(&[b"KEYS", b"k:00*"]));
    let want: HashSet<Vec<u8>> = model
        .iter()
        .filter(|k| k.starts_with(b"k:00"))
        .cloned()
        .collect();
    assert_eq!(keys.len(), want.len(), "KEYS returns each key once");
    assert_eq!(keys.into_iter().collect::<HashSet<_>>(), want);
    assert_eq!(c.call(&[b"DBSIZE"]), Value::Int(model.len() as i64));
    match c.call(&[b"RANDOMKEY"]) {
        Value::Bulk(k) => assert!(model.contains(&k)),
        other => panic!("RANDOMKEY answered {other:?}"),
    }
    let slot = key_slot(b"k:0005");
    let in_slot: HashSet<Vec<u8>> = model
        .iter()
        .filter(|k| key_slot(k) == slot)
        .cloned()
        .collect();
    let s = slot.to_string();
    assert_eq!(
        c.call(&[b"CLUSTER", b"COUNTKEYSINSLOT", s.as_bytes()]),
        Value::Int(in_slot.len() as i64)
    );
    let got = bulk_set(&c.call(&[b"CLUSTER", b"GETKEYSINSLOT", s.as_bytes(), b"1000"]));
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), in_slot);
    let one = bulk_set(&c.call(&[b"CLUSTER", b"GETKEYSINSLOT", s.as_bytes(), b"1"]));
    assert_eq!(one.len(), 1);

    // FLUSHALL deletes everything (through the logged delete path).
    assert_eq!(c.call(&[b"FLUSHALL", b"SYNC"]), Value::Simple("OK".into()));
    assert_eq!(c.call(&[b"DBSIZE"]), Value::Int(0));
    assert_eq!(c.call(&[b"RANDOMKEY"]), Value::Nil);
    assert_eq!(scan_all(&mut c, &[]).0, Vec::<Vec<u8>>::new());
    assert_eq!(c.call(&[b"GET", b"k:0001"]), Value::Nil);
    assert_eq!(err(c.call(&[b"FLUSHDB", b"LATER"])), "ERR syntax error");
    assert_eq!(c.call(&[b"FLUSHDB"]), Value::Simple("OK".into()));
}
