//! `dinomo bench --scenario elastic`: a few seconds of the scenario on a fixed schedule
//! writes a CSV, a figure and JSON of the expected shape, with the reconfigurations in
//! them; bad schedules and options are refused with exit code 2 before anything is written.
//! In policy mode a skewed load gets its hottest key replicated on DINOMO (and the decision
//! recorded as skipped on DINOMO-N).

mod common;

use std::process::Output;

use common::{stderr, stdout};

/// `dinomo bench --quiet --scenario elastic <args>`.
fn elastic(args: &[&str]) -> Output {
    common::bench(&[&["--scenario", "elastic"], args].concat())
}

#[test]
fn a_short_scheduled_run_writes_csv_figure_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let json = dir.path().join("elastic.json");
    let o = elastic(&[
        "--systems",
        "dinomo,dinomo-n",
        "--keys",
        "2000",
        "--value-size",
        "256",
        "--clients",
        "2",
        "--threads-per-kn",
        "1",
        "--base-rate",
        "300",
        "--burst",
        "3",
        "--phases",
        "1.5,2,1.5",
        "--schedule",
        "t=2:add,t=3.5:remove",
        "--out",
        out.to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let stdout = stdout(&o);
    assert!(o.status.success(), "{stdout}\n{}", stderr(&o));
    assert!(stdout.contains("longest dip"), "{stdout}");

    let csv = std::fs::read_to_string(out.join("elastic.csv")).expect("csv written");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("time_s,system,ops,kns,event"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.splitn(5, ',').collect()).collect();
    for system in ["dinomo", "dinomo-n"] {
        let mine: Vec<&Vec<&str>> = rows.iter().filter(|r| r[1] == system).collect();
        // 5 s of 100 ms intervals (the last may be cut short by the end of the run).
        assert!(
            (49..=50).contains(&mine.len()),
            "{system}: {} rows",
            mine.len()
        );
        let kns: Vec<u32> = mine.iter().map(|r| r[3].parse().expect("kns")).collect();
        assert_eq!(kns.first(), Some(&1), "{system}");
        assert_eq!(kns.iter().max(), Some(&2), "{system}");
        assert_eq!(kns.last(), Some(&1), "{system}");
        let events: Vec<&str> = mine
            .iter()
            .map(|r| r[4])
            .filter(|e| !e.is_empty())
            .collect();
        let all = events.join(";");
        for e in [
            "load x3",
            "add start",
            "add kn1 done",
            "remove kn1 start",
            "remove kn1 done",
            "load x1",
        ] {
            assert!(all.contains(e), "{system}: {e:?} missing from {events:?}");
        }
        let ops: u64 = mine.iter().map(|r| r[2].parse::<u64>().expect("ops")).sum();
        assert!(ops > 0, "{system}");
    }
    for f in ["elastic.svg", "elastic.png"] {
        let len = std::fs::metadata(out.join(f)).expect(f).len();
        assert!(len > 1000, "{f}: {len} bytes");
    }

    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    assert_eq!(v["scenario"], "elastic");
    assert_eq!(v["mode"], "schedule");
    assert_eq!(v["workload"], "write-heavy");
    assert_eq!(v["zipf"], 0.5);
    assert!(v["dip_definition"]
        .as_str()
        .is_some_and(|d| d.contains("50%")));
    let systems = v["systems"].as_array().expect("systems");
    assert_eq!(systems.len(), 2);
    for s in systems {
        let name = s["system"].as_str().expect("name");
        assert_eq!(s["errors"], 0, "{name}");
        assert_eq!(s["initial_kns"], 1);
        assert_eq!(s["final_kns"], 1);
        assert_eq!(s["peak_kns"], 2);
        let rc = s["reconfigs"].as_array().expect("reconfigs");
        let actions: Vec<&str> = rc
            .iter()
            .map(|r| r["action"].as_str().expect("action"))
            .collect();
        assert_eq!(actions, ["add", "remove"], "{name}");
        for r in rc {
            assert_eq!(r["kn"], 1);
            assert!(r["slots_moved"].as_u64().expect("slots") > 0);
            assert!(
                r["recovery"]["longest_dip_s"].as_f64().is_some(),
                "{name}: {r}"
            );
        }
        let moved = s["bytes_moved"].as_u64().expect("bytes_moved");
        match name {
            // Ownership moves only.
            "dinomo" => assert_eq!(moved, 0),
            // Every moved key is read from one partition and written to another.
            _ => assert!(moved > 2 * 256, "{moved}"),
        }
        assert!(s["longest_dip_s"].as_f64().is_some());
    }
}

#[test]
fn without_a_schedule_the_policy_decides_every_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("elastic.json");
    let o = elastic(&[
        "--systems",
        "dinomo",
        "--keys",
        "1000",
        "--value-size",
        "128",
        "--clients",
        "2",
        "--threads-per-kn",
        "1",
        "--base-rate",
        "200",
        "--phases",
        "1,1.5,1",
        "--period",
        "0.5",
        "--out",
        dir.path().to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    assert_eq!(v["mode"], "policy");
    assert_eq!(v["schedule"], serde_json::Value::Null);
    assert_eq!(v["policy"]["period_s"], 0.5);
    let s = &v["systems"][0];
    let ticks = s["policy_log"].as_array().expect("policy_log");
    // 3.5 s at one decision per 0.5 s (fewer if a reconfiguration took time).
    assert!((3..=7).contains(&ticks.len()), "{} ticks", ticks.len());
    for t in ticks {
        let kns = t["kns"].as_array().expect("kns");
        assert!(!kns.is_empty(), "{t}");
        for k in kns {
            let occ = k["occupancy"].as_f64().expect("occupancy");
            assert!((0.0..=1.0).contains(&occ), "{t}");
            assert!(k["ops_per_s"].as_f64().expect("ops") >= 0.0);
        }
    }
    // Every decision taken shows up as a reconfiguration.
    let decided = ticks.iter().filter(|t| !t["decision"].is_null()).count();
    assert_eq!(decided, s["reconfigs"].as_array().expect("reconfigs").len());
    assert_eq!(s["errors"], 0);
}

#[test]
fn in_policy_mode_a_skewed_load_gets_its_hot_key_replicated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("elastic.json");
    // Two KNs, never idle nor busy enough to change (--idle-remove 0, --busy-add 1);
    // zipf 0.99 over 1000 keys: the hottest key is an outlier among the hot keys.
    let o = elastic(&[
        "--systems",
        "dinomo,dinomo-n",
        "--keys",
        "1000",
        "--value-size",
        "128",
        "--clients",
        "2",
        "--kns",
        "2",
        "--idle-remove",
        "0",
        "--busy-add",
        "1",
        "--threads-per-kn",
        "1",
        "--zipf",
        "0.99",
        // Enough operations for the one-in-16 sample to single out the hottest key.
        "--base-rate",
        "1000",
        "--burst",
        "2",
        "--phases",
        "1,1,1",
        "--period",
        "0.5",
        "--out",
        dir.path().to_str().expect("utf-8"),
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let stdout = stdout(&o);
    assert!(o.status.success(), "{stdout}\n{}", stderr(&o));
    assert!(stdout.contains("replicated"), "{stdout}");
    assert!(stdout.contains("shared-nothing"), "{stdout}");

    let csv = std::fs::read_to_string(dir.path().join("elastic.csv")).expect("csv written");
    let events = |system: &str| -> Vec<String> {
        csv.lines()
            .skip(1)
            .map(|l| l.splitn(5, ',').collect::<Vec<_>>())
            .filter(|r| r[1] == system)
            .flat_map(|r| r[4].split(';').map(str::to_owned).collect::<Vec<_>>())
            .filter(|e| e.starts_with("replicate:"))
            .collect()
    };
    let dinomo = events("dinomo");
    assert!(
        dinomo.iter().any(|e| e.ends_with(" ms")),
        "a replicate event with its time: {dinomo:?}"
    );
    let dinomo_n = events("dinomo-n");
    assert!(
        !dinomo_n.is_empty() && dinomo_n.iter().all(|e| e.contains("skipped")),
        "{dinomo_n:?}"
    );

    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    for s in v["systems"].as_array().expect("systems") {
        let name = s["system"].as_str().expect("name");
        assert_eq!(s["errors"], 0, "{name}");
        assert_eq!(s["final_kns"], 2, "{name}");
        let log = s["replications"].as_array().expect("replications");
        let counts = &s["replication"];
        assert_eq!(counts["failed"], 0, "{name}: {log:?}");
        let replicates: Vec<&serde_json::Value> =
            log.iter().filter(|r| r["action"] == "replicate").collect();
        assert!(!replicates.is_empty(), "{name}");
        // Every decision is recorded in the policy log too.
        let decided: usize = s["policy_log"]
            .as_array()
            .expect("policy_log")
            .iter()
            .filter_map(|t| t["replication"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(decided, log.len(), "{name}");
        match name {
            "dinomo" => {
                let done: Vec<_> = replicates
                    .iter()
                    .filter(|r| r["outcome"] == "done")
                    .collect();
                assert!(!done.is_empty(), "{log:?}");
                for r in done {
                    assert_eq!(r["kns"], 2, "to every live KN: {r}");
                    assert!(r["took_s"].as_f64().is_some());
                }
                assert!(counts["replicated"].as_u64().expect("count") >= 1);
                assert_eq!(counts["skipped"], 0);
            }
            _ => {
                assert_eq!(counts["replicated"], 0);
                assert_eq!(counts["skipped"].as_u64(), Some(log.len() as u64));
            }
        }
    }
}

#[test]
fn bad_scenario_input_exits_2_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let json = dir.path().join("out.json");
    let cases: &[(&[&str], &str)] = &[
        (&["--schedule", "x"], "expected t=<seconds>"),
        (&["--schedule", ""], "empty item"),
        (&["--schedule", "t=1:grow"], "unknown action"),
        (&["--schedule", "t=abc:add"], "not a number"),
        (&["--schedule", "t=5:add,t=2:remove"], "times must increase"),
        (&["--schedule", "t=1:remove"], "last KN"),
        (
            &["--schedule", "t=1:add,t=2:remove=7"],
            "KN 7 is not running",
        ),
        (&["--schedule", "t=100:add"], "within the run"),
        (
            &["--schedule", "t=1:add,t=2:add", "--max-kns", "2"],
            "exceed 2 KNs",
        ),
        (&["--systems", "clover"], "cannot add or remove KNs"),
        (&["--systems", "anna"], "unknown system"),
        (&["--phases", "1,2"], "three durations"),
        (&["--phases", "1,0,2"], "--phases"),
        (&["--base-rate", "0"], "--base-rate"),
        (&["--burst", "0.5"], "--burst"),
        (&["--period", "0"], "--period"),
        (&["--kns", "3", "--max-kns", "2"], "exceeds --max-kns"),
        (&["--workload", "insert-heavy"], "supports read-only"),
    ];
    for (args, needle) in cases {
        let mut a = args.to_vec();
        a.extend(["--out", out.to_str().expect("utf-8")]);
        a.extend(["--json", json.to_str().expect("utf-8")]);
        let o = elastic(&a);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: should mention {needle:?}: {err}"
        );
        assert!(
            !json.exists() && !out.exists(),
            "{args:?}: nothing may be written"
        );
    }
}

#[test]
fn scenario_options_need_the_scenario() {
    for args in [
        &["--schedule", "t=1:add"][..],
        &["--base-rate", "100"],
        &["--phases", "1,1,1"],
    ] {
        let o = common::bench(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains("--scenario"), "{args:?}");
    }
}
