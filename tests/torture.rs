//! `dinomo torture`: a tiny run (one round per role) passes with no violation and kills
//! every role; bad arguments are refused before anything starts.

mod common;

use common::{dinomo, dinomo_cmd, stderr, stdout};

#[test]
fn a_short_torture_run_kills_every_role_and_finds_no_violation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("torture.json");
    let out = dinomo_cmd([
        "torture",
        "--rounds",
        "3",
        "--seed",
        "7",
        "--keys",
        "64",
        "--clients",
        "2",
        "--round-ms",
        "600",
        "--lease-ms",
        "500",
        "--roles",
        "dpm,manager,kn",
        // The last round fills the region: a small one fills quickly.
        "--region-size",
        "48M",
        "--dir",
    ])
    .arg(dir.path().join("work"))
    .arg("--json")
    .arg(&json)
    .output()
    .expect("run dinomo torture");
    let stdout = stdout(&out);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("valid json");
    assert_eq!(r["violations"], 0, "{r}");
    assert_eq!(r["rounds"], 3, "{r}");
    for role in ["dpm", "manager", "kn"] {
        assert_eq!(r["roles"][role]["kills"], 1, "{role}: {r}");
        assert!(
            r["roles"][role]["recovery_max_ms"].is_number(),
            "{role}: {r}"
        );
    }
    assert!(r["ops"]["ok"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert!(r["lincheck_ops"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert!(stdout.contains("violations: 0"), "{stdout}");
    // The last round filled the region and killed its process while it was full.
    assert_eq!(r["fill"]["full_at_kill"], true, "{r}");
    assert!(r["fill"]["refused"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert!(r["fill"]["acked"].as_u64().is_some_and(|n| n > 0), "{r}");
}

#[test]
fn bad_arguments_are_refused_before_anything_starts() {
    for args in [
        &["torture", "--roles", "dpm,mds"][..],
        &["torture", "--time-limit", "soon"],
        &["torture", "--rounds", "0"],
        &["torture", "--kns", "0"],
    ] {
        let out = dinomo(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!stderr(&out).is_empty());
    }
}
