//! `dinomo fabric-bench` and `dinomo dpm serve --fabric verbs` from the command line:
//! argument errors, the shm benchmark in one and in two processes, and the one-line errors
//! of `--fabric verbs` on a host without RDMA (or a build without it).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{dinomo, dinomo_cmd, stderr, stdout};

/// Whether this host has RDMA devices (then the no-device message cannot be checked).
fn host_has_rdma() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

#[test]
fn verbs_without_a_device_or_support_fails_with_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("r.region");
    let region = region.to_str().expect("utf-8");
    let runs = [
        dinomo(&["fabric-bench", "--fabric", "verbs", "--iters", "10"]),
        dinomo(&[
            "dpm", "serve", "--fabric", "verbs", "--device", "rxe0", "--path", region,
        ]),
        // A KN and a manager of a DPM on another host reach the verbs connect path.
        dinomo(&[
            "kn",
            "--fabric",
            "verbs",
            "--dpm",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--manager",
            "127.0.0.1:1",
        ]),
        dinomo(&[
            "manager",
            "--fabric",
            "verbs",
            "--dpm",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
        ]),
    ];
    for o in &runs {
        let err = stderr(o);
        assert!(!o.status.success(), "{err}");
        assert_eq!(o.status.code(), Some(1), "{err}");
        let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        if cfg!(feature = "rdma") {
            if host_has_rdma() {
                eprintln!("this host has RDMA devices: the no-device message is not checked");
                continue;
            }
            assert_eq!(lines.len(), 1, "one line: {err}");
            assert!(lines[0].contains("no RDMA device found"), "{err}");
            assert!(lines[0].contains("--fabric shm"), "{err}");
            assert!(lines[0].contains("rdma link add rxe0"), "{err}");
        } else {
            assert_eq!(lines.len(), 1, "one line: {err}");
            assert!(lines[0].contains("built without RDMA support"), "{err}");
            assert!(
                lines[0].contains("cargo build --release --features rdma"),
                "{err}"
            );
        }
    }
    assert!(!Path::new(region).exists(), "nothing was created");
}

#[test]
fn every_role_takes_the_fabric_options() {
    for (args, words) in [
        (
            &["kn", "--help"][..],
            &["--fabric", "--dpm", "--device", "--gid-index"][..],
        ),
        (
            &["manager", "--help"],
            &["--fabric", "--dpm", "--device", "--gid-index"],
        ),
        (
            &["dpm", "serve", "--help"],
            &["--fabric", "--listen", "--device", "--gid-index"],
        ),
        (
            &["fabric-bench", "--help"],
            &["--fabric", "--device", "--gid-index"],
        ),
        (&["up", "--help"], &["--fabric", "--device", "--gid-index"]),
    ] {
        let o = dinomo(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let help = stdout(&o);
        for w in words {
            assert!(help.contains(w), "{args:?} does not show {w}:\n{help}");
        }
    }
    // A verbs DPM is named by HOST:PORT, and the fabric by one of its names.
    for args in [
        &[
            "kn",
            "--fabric",
            "verbs",
            "--dpm",
            "/dev/shm/region",
            "--listen",
            "127.0.0.1:0",
        ][..],
        &["manager", "--fabric", "tcp", "--dpm", "x"],
    ] {
        let o = dinomo(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn bad_bench_arguments_exit_2() {
    for args in [
        &["fabric-bench", "--size", "4"][..],
        &["fabric-bench", "--size", "65537"],
        &["fabric-bench", "--size", "1M"],
        &["fabric-bench", "--depth", "0"],
        &["fabric-bench", "--op", "swap"],
        &["fabric-bench", "--fabric", "tcp"],
        &["fabric-bench", "--server"],
    ] {
        let o = dinomo(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty());
    }
    let o = dinomo(&["fabric-bench", "--depth", "0"]);
    assert!(
        stderr(&o).contains("--depth 0 is outside"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn shm_bench_prints_a_table_and_writes_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("out.json");
    let o = dinomo(&[
        "fabric-bench",
        "--op",
        "write",
        "--size",
        "1K",
        "--depth",
        "8",
        "--iters",
        "2000",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("t_p99[us]") && out.contains("BW[Gb/s]"),
        "{out}"
    );
    assert!(out.contains("write") && out.contains("1024"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    assert_eq!(v["fabric"], "shm");
    assert_eq!(v["depth"], 8);
    assert_eq!(v["iters"], 2000);
}

#[test]
fn shm_bench_across_two_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("bench.region");
    let path = region.to_str().expect("utf-8");
    let mut server = dinomo_cmd([
        "fabric-bench",
        "--server",
        "--path",
        path,
        "--region-size",
        "4M",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn server");
    let ctl = dir.path().join("bench.region.ctl");
    let t0 = Instant::now();
    while !ctl.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "server did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = dinomo(&[
        "fabric-bench",
        "--path",
        path,
        "--op",
        "faa",
        "--iters",
        "1000",
    ]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let status = server.wait().expect("wait");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("faa"));
    assert!(
        status.success(),
        "the server stops cleanly on SIGTERM: {status}"
    );
    assert!(
        !region.exists() && !ctl.exists(),
        "the server removes its files"
    );
}
