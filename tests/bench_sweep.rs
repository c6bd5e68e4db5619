//! `dinomo bench --system` and `--sweep`: the baselines run through the same driver and
//! report the same JSON fields; a sweep writes one JSON line and one CSV row per point and
//! draws the figure as SVG and PNG.

mod common;

use common::{bench, stderr};

const SMALL: &[&str] = &[
    "--keys",
    "500",
    "--ops",
    "1500",
    "--warmup",
    "500",
    "--clients",
    "2",
    "--threads-per-kn",
    "1",
];

#[test]
fn clover_reports_metadata_server_requests_and_chain_walks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("clover.json");
    let mut a = SMALL.to_vec();
    a.extend([
        "--system",
        "clover",
        "--kns",
        "3",
        "--workload",
        "write-heavy",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    let o = bench(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("parses");
    assert_eq!(v["system"], "clover");
    assert_eq!(v["hit"]["value"], 0.0, "Clover caches no values");
    // A write is at least WRITE + CAS: 2 RTs.
    assert!(
        v["write_rts_per_write"].as_f64().expect("f64") >= 2.0,
        "{v}"
    );
    assert!(v["ms_requests_per_op"].as_f64().expect("f64") > 0.0, "{v}");
    assert!(
        v["modeled"]["bounds"]["dpm_bandwidth"].as_f64().is_some(),
        "{v}"
    );
}

#[test]
fn a_sweep_writes_a_line_and_a_row_per_point_and_the_figure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let mut a = SMALL.to_vec();
    a.extend([
        "--sweep",
        "--systems",
        "dinomo,clover,dinomo-n",
        "--kns",
        "1,2",
        "--workloads",
        "read-mostly",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let o = bench(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = std::fs::read_to_string(out.join("sweep.jsonl")).expect("jsonl");
    let points: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(points.len(), 6);
    let mut seen: Vec<(String, u64)> = points
        .iter()
        .map(|p| {
            assert_eq!(p["workload"], "read-mostly");
            (
                p["system"].as_str().expect("system").to_owned(),
                p["kns"].as_u64().expect("kns"),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("clover".to_owned(), 1),
            ("clover".to_owned(), 2),
            ("dinomo".to_owned(), 1),
            ("dinomo".to_owned(), 2),
            ("dinomo-n".to_owned(), 1),
            ("dinomo-n".to_owned(), 2),
        ]
    );
    let csv = std::fs::read_to_string(out.join("sweep.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 7, "header + 6 rows");
    assert!(csv.starts_with("system,workload,kns,"));
    let svg = std::fs::read_to_string(out.join("sweep.svg")).expect("svg");
    assert!(svg.contains("<svg") && svg.contains("modelled") && svg.contains("measured"));
    let png = std::fs::read(out.join("sweep.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(std::fs::read_to_string(out.join("command.txt"))
        .expect("command")
        .contains("--sweep"));
}

#[test]
fn sweep_options_are_refused_without_sweep_and_lists_without_it() {
    let o = bench(&["--kns", "1,2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--sweep"));
    let o = bench(&["--systems", "clover"]);
    assert_eq!(o.status.code(), Some(2));
    let o = bench(&["--system", "anna"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown system"));
}
