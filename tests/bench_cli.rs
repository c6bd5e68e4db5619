//! `dinomo bench`: bad input is refused with exit code 2 before anything is written; a
//! small run prints a table and writes the JSON fields the contract names.

mod common;

use common::{bench, dinomo_cmd, stderr, stdout};

#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("out.json");
    let j = json.to_str().expect("utf-8");
    let cases: &[(&[&str], &str)] = &[
        (&["--keys", "0"], "--keys"),
        (&["--key-size", "0"], "--key-size"),
        (&["--key-size", "2000"], "--key-size"),
        (&["--key-size", "3", "--keys", "100000"], "too small"),
        (&["--value-size", "0"], "--value-size"),
        (&["--value-size", "2000000"], "--value-size"),
        (&["--workload", "scan-heavy"], "unknown workload"),
        (&["--cache-ratio", "1.5"], "--cache-ratio"),
        (&["--cache-ratio", "-0.1"], "--cache-ratio"),
        (&["--zipf", "1.5"], "--zipf"),
        (&["--clients", "0"], "--clients"),
        (&["--kns", "0"], "--kns"),
        (&["--cache-policy", "lru"], "cache policy"),
        (&["--nic", "ethernet"], "ethernet"),
        (&["--ops", "0"], "--ops"),
        (&["--kn-cpu", "1,2,3"], "--kn-cpu"),
        (&["--kn-cores", "0"], "--kn-cores"),
        (&["--shift", "0"], "--shift"),
        (
            &["--shift", "100", "--system", "clover"],
            "per-shard caches",
        ),
        (&["--shift", "100", "--workload", "insert-heavy"], "--shift"),
        (&["--shift", "100", "--duration", "1"], "--duration"),
        (
            &["--shift", "100", "--shift-window", "101"],
            "--shift-window",
        ),
        (&["--shift", "100", "--shift-by", "100000"], "--shift-by"),
        (
            &["--shift", "100", "--shift-kind", "sideways"],
            "unknown shift kind",
        ),
        (
            &[
                "--shift",
                "100",
                "--shift-kind",
                "latest",
                "--dist",
                "uniform",
            ],
            "latest",
        ),
        (&["--shift-kind", "jump"], "--shift"),
        (&["--warmup", "soon"], "neither a number"),
    ];
    for (args, needle) in cases {
        let mut a = args.to_vec();
        a.extend(["--json", j]);
        let o = bench(&a);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: message should mention {needle:?}: {err}"
        );
        assert!(
            !json.exists(),
            "{args:?}: nothing may be written on bad input"
        );
    }
}

#[test]
fn a_small_run_reports_the_contract_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("out.json");
    let o = bench(&[
        "--keys",
        "2000",
        "--ops",
        "6000",
        "--warmup",
        "2000",
        "--clients",
        "2",
        "--kns",
        "2",
        "--threads-per-kn",
        "1",
        "--workload",
        "write-heavy",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(
        table.contains("ops/s") && table.contains("RTs/op"),
        "{table}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    for field in [
        "system",
        "kns",
        "workload",
        "dist",
        "zipf",
        "keys",
        "value_size",
        "ops",
        "elapsed_s",
        "throughput_ops",
        "rts_per_op",
        "bytes_per_op",
        "verbs_per_op",
        "hit",
        "latency_us",
        "modeled",
        "oracle_rts_per_op",
        "oracle_per_shard_rts_per_op",
        "warmup",
    ] {
        assert!(!v[field].is_null(), "missing {field}: {v}");
    }
    // A fixed warm-up is one round of exactly that many operations.
    let w = &v["warmup"];
    assert_eq!(
        (&w["ops"], &w["settled"]),
        (&2000.into(), &serde_json::Value::Null)
    );
    assert_eq!(w["rounds"].as_array().map(Vec::len), Some(1), "{w}");
    for f in ["value", "shortcut", "local", "miss"] {
        assert!(v["hit"][f].is_number(), "hit.{f}");
    }
    for f in ["p50", "p99", "p999"] {
        assert!(
            v["latency_us"][f].as_f64().expect("latency") > 0.0,
            "latency_us.{f}"
        );
    }
    assert_eq!(v["system"], "dinomo");
    let (global, shard) = (
        v["oracle_rts_per_op"].as_f64().expect("oracle"),
        v["oracle_per_shard_rts_per_op"]
            .as_f64()
            .expect("per-shard oracle"),
    );
    assert!(global <= shard + 1e-12, "{global} > {shard}");
    assert_eq!(v["ops"], 6000);
    assert_eq!(v["workload"], "write-heavy");
    let hits: f64 = ["value", "shortcut", "local", "miss"]
        .iter()
        .map(|f| v["hit"][*f].as_f64().expect("hit"))
        .sum();
    assert!(
        (hits - 1.0).abs() < 1e-9,
        "hit fractions add up to 1: {hits}"
    );
    assert!(v["modeled"]["throughput_ops"].as_f64().expect("modelled") > 0.0);
    assert_eq!(v["modeled"]["nic"], "cx3-fdr");
    // The KN CPU term is calibrated by default: every path of DINOMO has a cost, and the
    // ceiling is KNs x cores / (the run's mix of those costs).
    let cal = &v["modeled"]["kn_cpu"];
    assert_eq!(cal["source"], "calibrated", "{cal}");
    for f in ["value_hit_ns", "shortcut_hit_ns", "miss_ns", "write_ns"] {
        assert!(cal[f].as_f64().expect("ns") > 0.0, "{f}: {cal}");
    }
    let b = &v["modeled"]["bounds"];
    let ns = b["kn_cpu_ns_per_op"].as_f64().expect("ns per op");
    let cores = v["modeled"]["kn_cores"].as_f64().expect("cores");
    let ceiling = b["kn_cpu"].as_f64().expect("KN CPU ceiling");
    assert!(
        (ceiling - 2.0 * cores * 1e9 / ns).abs() < 1e-6 * ceiling,
        "{b}"
    );
    assert!(v["modeled"]["throughput_ops"].as_f64().expect("modelled") <= ceiling);
}

/// Given KN CPU costs: 2 KNs x 3 cores at 1500 ns per operation, whatever the mix, allow
/// exactly 4 M ops/s; the KN-latency ceiling counts the model's 8 threads per KN.
#[test]
fn given_kn_cpu_costs_make_the_ceiling_by_hand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("out.json");
    let o = bench(&[
        "--keys",
        "500",
        "--ops",
        "1000",
        "--warmup",
        "0",
        "--clients",
        "2",
        "--threads-per-kn",
        "1",
        "--kn-cpu",
        "1500,1500,1500,1500",
        "--kn-cores",
        "3",
        "--model-threads-per-kn",
        "8",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("kn cpu"), "{}", stdout(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    let m = &v["modeled"];
    assert_eq!(m["kn_cpu"]["source"], "given", "{m}");
    assert_eq!(m["kn_cores"], 3);
    assert_eq!(m["threads_per_kn"], 8);
    let b = &m["bounds"];
    assert!(
        (b["kn_cpu"].as_f64().expect("ceiling") - 4e6).abs() < 1.0,
        "{b}"
    );
    // 2 KNs x 8 threads / (RTs per op x 1.8 us).
    let rts = v["rts_per_op"].as_f64().expect("rts");
    let lat = b["kn_latency"].as_f64().expect("latency ceiling");
    assert!((lat - 16.0 / (rts * 1.8e-6)).abs() < 1e-6 * lat, "{b}");
    // Off: no KN CPU term.
    let o = bench(&[
        "--keys",
        "500",
        "--ops",
        "1000",
        "--warmup",
        "0",
        "--clients",
        "2",
        "--threads-per-kn",
        "1",
        "--kn-cpu",
        "off",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    assert!(v["modeled"]["kn_cpu"].is_null(), "{v}");
    assert!(v["modeled"]["bounds"]["kn_cpu"].is_null(), "{v}");
    assert_ne!(v["modeled"]["bottleneck"], "KN CPU");
}

/// A run that fails (here: no node at `--target`) leaves `--json` as it was: a new file is
/// not left behind empty, an existing one is not truncated.
#[test]
fn an_unreachable_target_fails_and_leaves_the_json_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let new = dir.path().join("new.json");
    let old = dir.path().join("old.json");
    std::fs::write(&old, b"previous result\n").expect("write");
    for j in [&new, &old] {
        let o = dinomo_cmd(["bench", "--quiet", "--target", "127.0.0.1:1", "--json"])
            .arg(j)
            .output()
            .expect("run dinomo bench");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("no node answers CLUSTER SLOTS"), "{err}");
        assert!(err.contains("127.0.0.1:1"), "{err}");
    }
    assert!(!new.exists(), "a failed run left a JSON file behind");
    assert_eq!(
        std::fs::read(&old).expect("read"),
        b"previous result\n",
        "a failed run truncated the JSON file"
    );
}

/// `--password-file` is checked before anything connects: a missing file, one others may
/// read, one with more than the password, and the flag without `--target` are usage errors.
#[test]
fn a_bad_password_file_is_refused_before_connecting() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let open = dir.path().join("open");
    std::fs::write(&open, "pw\n").expect("write");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let two = dir.path().join("two");
    std::fs::write(&two, "pw\nmore\n").expect("write");
    std::fs::set_permissions(&two, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let missing = dir.path().join("missing");
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--target".into(),
                "127.0.0.1:1".into(),
                "--password-file".into(),
                s(&missing),
            ],
            "--password-file",
        ),
        (
            vec![
                "--target".into(),
                "127.0.0.1:1".into(),
                "--password-file".into(),
                s(&open),
            ],
            "--password-file",
        ),
        (
            vec![
                "--target".into(),
                "127.0.0.1:1".into(),
                "--password-file".into(),
                s(&two),
            ],
            "one line",
        ),
        (vec!["--password-file".into(), s(&two)], "--target"),
    ];
    for (args, needle) in cases {
        let o = dinomo_cmd(["bench", "--quiet"])
            .args(&args)
            .output()
            .expect("run dinomo bench");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("CLUSTER SLOTS"), "{args:?} connected: {err}");
    }
}

/// A moving run (`--shift`): the report has every phase with its bars and recovery, and
/// exact windows that tile each phase; both kinds of shift.
#[test]
fn a_moving_run_reports_phases_and_recovery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("out.json");
    for kind in ["jump", "latest"] {
        let o = bench(&[
            "--keys",
            "2000",
            "--ops",
            "9000",
            "--warmup",
            "2000",
            "--clients",
            "3",
            "--threads-per-kn",
            "2",
            "--workload",
            "read-only",
            "--cache-ratio",
            "0.1",
            "--kn-cpu",
            "off",
            "--shift",
            "3000",
            "--shift-kind",
            kind,
            "--shift-window",
            "700",
            "--json",
            json.to_str().expect("utf-8"),
        ]);
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        let table = stdout(&o);
        assert!(
            table.contains("moving") && table.contains("recovery"),
            "{table}"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("valid JSON");
        let m = &v["moving"];
        assert_eq!(m["kind"], kind, "{m}");
        assert_eq!(m["shift_every"], 3000);
        assert_eq!(m["window_ops"], 700);
        assert!(m["step_keys"].as_u64().expect("step") > 0);
        let phases = m["phases"].as_array().expect("phases");
        assert_eq!(phases.len(), 3, "{m}");
        for (i, p) in phases.iter().enumerate() {
            assert_eq!(p["phase"], i as u64);
            assert_eq!(p["start_op"], 3000 * i as u64);
            assert_eq!(p["ops"], 3000);
            // Read-only: every operation is a read.
            assert_eq!(p["reads"], 3000);
            let bar = p["oracle_per_shard_rts_per_read"].as_f64().expect("bar");
            let global = p["oracle_rts_per_read"].as_f64().expect("global bar");
            assert!(global <= bar + 1e-12 && global > 0.0, "{p}");
            assert!(p["rts_per_read"].as_f64().expect("rts") > 0.0, "{p}");
            for f in ["recovery_ops", "recovery_to_steady_ops", "ratio"] {
                assert!(p.get(f).is_some(), "missing {f}: {p}");
            }
            if let Some(r) = p["recovery_ops"].as_u64() {
                assert!(r > 0 && r <= 3000, "{p}");
            }
            let o = p["overlap_with_previous"].as_f64().expect("overlap");
            assert!(if i == 0 { o == 1.0 } else { o < 0.9 }, "{p}");
        }
        assert!(phases[0]["recovery_to_steady_ops"].is_null());
        // Windows: 700, 700, 700, 700, 200 per phase, and their RTs add up to the run's.
        let windows = m["windows"].as_array().expect("windows");
        assert_eq!(windows.len(), 15);
        let ops: Vec<u64> = windows[..5]
            .iter()
            .map(|w| w["ops"].as_u64().expect("ops"))
            .collect();
        assert_eq!(ops, [700, 700, 700, 700, 200]);
        let rts: u64 = windows
            .iter()
            .map(|w| w["read_rts"].as_u64().expect("rts"))
            .sum();
        let run = v["read_rts_per_read"].as_f64().expect("run rts") * 9000.0;
        assert!((rts as f64 - run).abs() < 1e-6, "{rts} vs {run}");
    }
}
