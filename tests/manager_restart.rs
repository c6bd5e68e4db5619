//! A manager killed and replaced while its KN keeps running: the new manager fences the
//! KN only once the KN's lease has lapsed, so every write the old KN acknowledged is in
//! the logs that are merged. (Found by `dinomo torture`: a manager that fenced right away
//! lost writes the old KN acknowledged after the fence.)

mod common;

use std::time::Duration;

use common::proc_files;
use common::procs::{ready_addr, spawn_kn, wait_map, Client, Conn, Proc};
use dinomo::resp::Value;
use nix::sys::signal::Signal;

/// Long enough that the old KN still holds its lease when the new manager is up, unless
/// the new manager waits for it.
const LEASE_MS: &str = "3000";

fn manager(region: &str) -> (Proc, String) {
    let (p, out) = Proc::spawn(&[
        "manager",
        "--dpm",
        region,
        "--listen",
        "127.0.0.1:0",
        "--lease-ms",
        LEASE_MS,
    ]);
    (p, ready_addr(out))
}

fn kn(region: &str, mgr: &str) -> (Proc, String) {
    let (_, addr, p) = spawn_kn(region, mgr, &["--threads", "1", "--cache", "2M"]);
    (p, addr)
}

#[test]
fn writes_acknowledged_by_a_kn_of_a_killed_manager_survive_the_new_manager() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("region");
    common::format_region(&region, "64M", "1M");
    let r = region.to_str().expect("utf-8");
    let (_dpm, _) = Proc::spawn(&["dpm", "serve", "--path", r, "--workers", "1", "--no-pin"]);
    let (old_manager, old_mgr) = manager(r);
    let (_old_kn, old_addr) = kn(r, &old_mgr);
    wait_map(&old_mgr, 1);
    let mut conn = Conn::open(&old_addr, Duration::from_secs(30)).expect("connect");
    let set = |c: &mut Conn, v: &[u8]| c.cmd(&[b"SET", b"k", v]);
    assert_eq!(set(&mut conn, b"old"), Some(Value::Simple("OK".into())));

    old_manager.signal(Signal::SIGKILL);
    let mut old_manager = old_manager;
    old_manager.wait();
    // The old KN cannot renew any more (it knows only the old manager's address).
    let (new_manager, mgr) = manager(r);
    // The new manager is up (and has fenced the old KN): whatever the old KN still
    // acknowledges must be durable.
    let late = set(&mut conn, b"late");
    let acknowledged = late == Some(Value::Simple("OK".into()));

    let (_kn, addr) = kn(r, &mgr);
    wait_map(&mgr, 1);
    // The new manager found the old KN's lease and fenced it through control messages,
    // without ever mapping or opening the region file.
    let pid = new_manager.pid().as_raw() as u32;
    assert!(
        !proc_files::touches(pid, &region),
        "the manager touched the region"
    );
    let mut cl = Client::new(vec![addr], Duration::from_secs(5));
    let got = cl.must(&[b"GET", b"k"]);
    if acknowledged {
        assert_eq!(
            got,
            Value::Bulk(b"late".to_vec()),
            "a write the old KN acknowledged was lost"
        );
    } else {
        assert!(
            matches!(&got, Value::Bulk(v) if v == b"old" || v == b"late"),
            "{got:?}"
        );
    }
}
