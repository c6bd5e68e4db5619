//! The `dinomo` binary: formatting, inspecting, and refusing bad input clearly.

mod common;

use std::path::Path;

use common::{dinomo, dinomo_cmd, stderr, stdout};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn format_then_inspect_json_prints_the_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path().join("r.region");
    let o = dinomo(&[
        "dpm",
        "format",
        "--path",
        p(&r),
        "--size",
        "32M",
        "--block-size",
        "256K",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dinomo(&["dpm", "inspect", "--path", p(&r), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("inspect --json prints JSON");
    assert_eq!(v["region_size"], 32 << 20);
    assert_eq!(v["layout"]["block_size"], 256 << 10);
    assert_eq!(v["layout_version"], 1);
    assert_eq!(v["clean_shutdown"], true);
    let blocks = v["blocks"]["total"].as_u64().expect("block count");
    assert_eq!(v["blocks"]["free"].as_u64(), Some(blocks));
    assert_eq!(v["blocks"]["used"], 0);
    assert!(v["index"]["buckets"].as_u64().expect("buckets") > 0);
    assert_eq!(v["index"]["items"], 0);
    assert_eq!(v["logs"].as_array().map(Vec::len), Some(0));
    // Areas are laid out in order and fit the region.
    let area = |n: &str| {
        (
            v["layout"][n]["offset"].as_u64().expect("offset"),
            v["layout"][n]["bytes"].as_u64().expect("bytes"),
        )
    };
    let mut end = 0;
    for n in ["superblock", "control", "index", "indirect", "log"] {
        let (off, len) = area(n);
        assert!(off >= end, "{n} overlaps the area before it");
        end = off + len;
    }
    assert!(end <= 32 << 20);
    // The table form works too, and inspecting changed nothing.
    let before = std::fs::read(&r).expect("read region");
    let o = dinomo(&["dpm", "inspect", "--path", p(&r)]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("blocks      free"));
    assert_eq!(
        std::fs::read(&r).expect("read region"),
        before,
        "inspect must not modify the region"
    );
}

#[test]
fn inspect_refuses_files_that_are_not_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk");
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&junk, &bytes).expect("write junk");
    let o = dinomo(&["dpm", "inspect", "--path", p(&junk)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a DINOMO region"), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).lines().count(),
        1,
        "one clear line: {}",
        stderr(&o)
    );

    let missing = dir.path().join("missing");
    let o = dinomo(&["dpm", "inspect", "--path", p(&missing), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());

    let tiny = dir.path().join("tiny");
    std::fs::write(&tiny, b"DINOMO").expect("write tiny");
    let o = dinomo(&["dpm", "inspect", "--path", p(&tiny)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("too small"), "{}", stderr(&o));
}

#[test]
fn format_refuses_bad_sizes_and_existing_files_without_touching_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path().join("r.region");
    let o = dinomo(&["dpm", "format", "--path", p(&r), "--size", "100K"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("too small"), "{}", stderr(&o));
    assert!(!r.exists(), "a refused format must not create the file");

    let o = dinomo(&["dpm", "format", "--path", p(&r), "--size", "12Q"]);
    assert_eq!(o.status.code(), Some(2));
    let o = dinomo(&[
        "dpm",
        "format",
        "--path",
        p(&r),
        "--size",
        "16M",
        "--block-size",
        "3000",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("power of two"), "{}", stderr(&o));

    std::fs::write(&r, b"precious").expect("write");
    let o = dinomo(&["dpm", "format", "--path", p(&r), "--size", "16M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&r).expect("read"), b"precious");
    let o = dinomo(&["dpm", "format", "--path", p(&r), "--size", "16M", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn serve_refuses_a_missing_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = dinomo(&[
        "dpm",
        "serve",
        "--path",
        p(&dir.path().join("nope")),
        "--no-pin",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

/// Serve refuses a foreign, a truncated and a damaged region in one line that names the
/// reason once, and leaves each file as it was.
#[test]
fn serve_refuses_damaged_regions_in_one_line_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path().join("r.region");
    let o = dinomo(&["dpm", "format", "--path", p(&r), "--size", "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let good = std::fs::read(&r).expect("read region");

    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, vec![0x5au8; 1 << 20]).expect("write foreign");
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &good[..4096]).expect("write truncated");
    let damaged = dir.path().join("damaged");
    let mut bytes = good.clone();
    bytes[16..24].copy_from_slice(b"XXXXXXXX");
    std::fs::write(&damaged, &bytes).expect("write damaged");
    for f in [&foreign, &truncated, &damaged] {
        // Only the owner may read a region (a 0644 one is refused before its contents).
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
    }

    for (file, reason) in [
        (&foreign, "not a DINOMO region"),
        (&truncated, "region is truncated"),
        (&damaged, "checksum mismatch"),
    ] {
        let before = std::fs::read(file).expect("read");
        let o = dinomo(&["dpm", "serve", "--path", p(file), "--no-pin"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.matches(reason).count(), 1, "reason said once: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert_eq!(std::fs::read(file).expect("read"), before, "{reason}");
    }

    let o = dinomo(&[
        "dpm",
        "format",
        "--path",
        p(&dir.path().join("no-such-dir").join("r")),
        "--size",
        "16M",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "cause said once: {err}");
}

#[test]
fn a_second_dpm_on_the_same_region_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path().join("r.region");
    let o = dinomo(&["dpm", "format", "--path", p(&r), "--size", "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut first = dinomo_cmd([
        "dpm",
        "serve",
        "--path",
        p(&r),
        "--no-pin",
        "--workers",
        "1",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("spawn first server");
    // Wait until the first server is up (its control file exists).
    let ctl = dinomo::hw::fabric::default_ctl_path(&r);
    let t0 = std::time::Instant::now();
    while !ctl.exists() && t0.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ctl.exists(), "the first server did not come up");
    let o = dinomo(&["dpm", "serve", "--path", p(&r), "--no-pin"]);
    // Nor may `format --force` replace the region under the running server.
    use std::os::unix::fs::MetadataExt;
    let inode = |f: &Path| std::fs::metadata(f).expect("stat region").ino();
    let before = inode(&r);
    let forced = dinomo(&["dpm", "format", "--path", p(&r), "--size", "16M", "--force"]);
    let after = inode(&r);
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("already being served"),
        "{}",
        stderr(&o)
    );
    assert_eq!(forced.status.code(), Some(1), "{}", stderr(&forced));
    assert!(
        stderr(&forced).contains("already being served"),
        "{}",
        stderr(&forced)
    );
    assert_eq!(
        before, after,
        "a refused format --force replaced the region file"
    );
}

#[test]
fn inspect_shows_fence_points_quarantined_logs_and_active_cells() {
    use dinomo_hw::region_file::RegionFile;
    use dinomo_shared::geometry::FormatParams;
    use dinomo_shared::index::EntryRef;
    use dinomo_shared::msg::{Request, Response};
    use dpm_fw::testkit::LogWriter;
    use dpm_fw::{Dpm, Scratch};

    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path().join("r.region");
    let size = 4 << 20;
    let file = RegionFile::create(&r, size).expect("create");
    let params = FormatParams {
        block_size: 64 << 10,
        ..FormatParams::for_size(size)
    };
    let dpm = Dpm::format(file.pmem(), &params, 5).expect("format");
    let mut s = Scratch::default();
    // KN 1's log is fenced at seq 2; KN 2's key "hot" is replicated through a cell.
    let mut fenced = LogWriter::open(&dpm, 1, 0).expect("open");
    fenced.put(b"a", b"1");
    fenced.put(b"b", b"2");
    fenced.flush(&dpm).expect("flush");
    dpm.execute(Request::FenceKn { kn_id: 1 }, &mut s)
        .expect("fence");
    let mut owner = LogWriter::open(&dpm, 2, 0).expect("open");
    let at = dpm.geometry().block_off(owner.block) + owner.offset;
    owner.put(b"hot", b"v");
    owner.flush(&dpm).expect("flush");
    let eref = EntryRef::new(at, dinomo_shared::entry::padded_len(3, 1) as u64).expect("ref");
    let req = Request::AllocCell {
        log_id: owner.log_id,
        generation: owner.generation,
        eref: eref.0,
    };
    let Ok(Response::CellAllocated { cell, .. }) = dpm.execute(req, &mut s) else {
        panic!("cell refused");
    };
    drop(dpm);
    file.sync().expect("sync");
    drop(file);
    let o = dinomo(&["dpm", "inspect", "--path", p(&r), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let logs = v["logs"].as_array().expect("logs");
    let log = |kn: u64| {
        logs.iter()
            .find(|l| l["kn_id"] == kn)
            .unwrap_or_else(|| panic!("log of KN {kn}"))
    };
    assert_eq!(log(1)["fence_seq"], 2);
    assert_eq!(log(1)["quarantined"], true);
    assert_eq!(log(2)["fence_seq"], serde_json::Value::Null);
    assert_eq!(log(2)["quarantined"], false);
    let cells = v["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 1);
    assert_eq!(cells[0]["cell"], cell);
    assert_eq!(cells[0]["key"], "hot");
    assert_eq!(cells[0]["offset"], eref.offset());
    let o = dinomo(&["dpm", "inspect", "--path", p(&r)]);
    let table = stdout(&o);
    assert!(table.contains("2 q"), "{table}");
    assert!(table.contains("hot"), "{table}");
}

/// Counts that cannot work, policy thresholds without the policy and reversed slot ranges
/// are refused as usage errors (exit 2) before anything starts or connects.
#[test]
fn unusable_counts_and_options_are_usage_errors() {
    let region = "/nonexistent/region";
    for (args, says) in [
        (
            vec![
                "kn",
                "--dpm",
                region,
                "--listen",
                "127.0.0.1:0",
                "--io-threads",
                "0",
            ],
            "must be at least 1",
        ),
        (
            vec![
                "kn",
                "--dpm",
                region,
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "0",
            ],
            "must be at least 1",
        ),
        (
            vec!["manager", "--dpm", region, "--vnodes", "0"],
            "must be at least 1",
        ),
        (
            vec!["manager", "--dpm", region, "--kn-io-threads", "0"],
            "must be at least 1",
        ),
        (
            vec!["manager", "--dpm", region, "--busy-add", "0.5"],
            "--policy",
        ),
        (
            vec!["ctl", "rebalance", "--slots", "5-2", "--to", "0"],
            "FIRST must not be above LAST",
        ),
    ] {
        let o = dinomo(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

/// `up` with a region too small to format says why in one error line and starts nothing.
#[test]
fn up_reports_a_failed_format_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // `up` makes its folder 0700 (an existing 0755 one, like a tempdir, is refused).
    let dir = tmp.path().join("cluster");
    let o = dinomo(&["up", "--region-size", "1K", "--dir", p(&dir), "--fresh"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(
        err.contains("cannot format") && err.contains("too small"),
        "{err}"
    );
    assert!(!dir.join("region").exists(), "no region was made");
}

/// `soak` refuses settings it cannot run with before it prints anything or starts a cluster.
#[test]
fn soak_refuses_unusable_settings_before_starting() {
    for (args, says) in [
        (
            vec!["soak", "--write-factor", "0"],
            "write factor must be positive",
        ),
        (vec!["soak", "--keys", "0"], "must be positive"),
    ] {
        let o = dinomo(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?} printed {:?}", o.stdout);
    }
    let o = dinomo(&["soak", "--region-size", "1K"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("too small"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
}
