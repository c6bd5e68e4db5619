//! Compaction seen from the outside: a KN's shortcut to an entry that compaction moved (and
//! whose block was then reused) falls back to the miss path; a soak of several times the
//! region's log capacity neither fills the region nor keeps growing its footprint.

mod common;

use common::{dinomo_cmd, stderr, stdout};
use dinomo::cluster::{Cluster, ClusterConfig};
use dinomo::soak::{self, SoakConfig};
use dinomo_shared::block::BlockHeader;
use dpm_fw::Scratch;
use host_kn::dac::CachePolicy;

fn filler(i: u64) -> Vec<u8> {
    format!("filler-{i:06}").into_bytes()
}

#[test]
fn a_shortcut_to_an_entry_moved_by_compaction_into_a_reused_block_takes_the_miss_path() {
    let c = Cluster::start(&ClusterConfig {
        kns: 1,
        shards_per_kn: 1,
        region_bytes: 4 << 20,
        block_size: Some(16 << 10),
        cache_bytes_per_kn: 1 << 20,
        policy: CachePolicy::ShortcutOnly,
        max_kns: 1,
        ..ClusterConfig::default()
    })
    .expect("cluster");
    let dpm = std::sync::Arc::clone(c.dpm());
    let geo = *dpm.geometry();
    let mut cl = c.client();
    cl.put(b"target", b"the value").expect("put");
    for i in 0..400 {
        cl.put(&filler(i), &[b'a'; 100]).expect("put");
    }
    c.sync().expect("sync");
    // Cache a shortcut and use it once.
    assert_eq!(
        cl.get(b"target").expect("get").as_deref(),
        Some(&b"the value"[..])
    );
    assert_eq!(
        cl.get(b"target").expect("get").as_deref(),
        Some(&b"the value"[..])
    );
    let before = c.stats();
    assert!(before.hit_shortcut >= 1, "{before:?}");
    // Leave the target's block mostly dead, then compact until its entry has moved.
    for i in 0..400 {
        cl.put(&filler(i), &[b'b'; 100]).expect("put");
    }
    c.sync().expect("sync");
    let old = dpm.lookup(b"target").expect("indexed");
    let old_block = geo.block_of(old.offset()).expect("in a block");
    let old_salt: BlockHeader = dpm.pmem().read_pod(geo.block_off(old_block));
    let mut s = Scratch::default();
    let mut steps = 0;
    while dpm.lookup(b"target") == Some(old) {
        let step = dpm.compact_step(true, &mut s).expect("compact");
        // The memory node's merge workers compact too: a step may find nothing left
        // because they moved the target in the meantime.
        assert!(
            step.victim.is_some() || dpm.lookup(b"target") != Some(old),
            "nothing left to compact, target not moved"
        );
        steps += 1;
        assert!(steps < 1000);
    }
    assert!(dpm.compaction_totals().entries_moved >= 1);
    // Write until the old block is in use again under a new salt and filled (sealed), so
    // the old entry's bytes are overwritten.
    let mut round = 0u8;
    loop {
        let h: BlockHeader = dpm.pmem().read_pod(geo.block_off(old_block));
        if h.salt != old_salt.salt && h.magic == old_salt.magic && h.sealed_len != 0 {
            break;
        }
        round = round.wrapping_add(1);
        assert!(round < 200, "the freed block was never reused");
        for i in 0..150 {
            cl.put(&filler(i), &[round; 100]).expect("put");
        }
        c.sync().expect("sync");
    }
    assert_eq!(
        cl.get(b"target").expect("get").as_deref(),
        Some(&b"the value"[..])
    );
    let after = c.stats();
    assert_eq!(
        after.stale_shortcuts,
        before.stale_shortcuts + 1,
        "the moved entry's shortcut is counted stale once"
    );
    // The miss path cached a shortcut to the new place, which verifies.
    assert_eq!(
        cl.get(b"target").expect("get").as_deref(),
        Some(&b"the value"[..])
    );
    assert_eq!(c.stats().stale_shortcuts, after.stale_shortcuts);
    c.stop();
}

#[test]
fn a_small_soak_never_fills_the_region_and_settles_within_a_structural_bound() {
    let cfg = SoakConfig {
        region_bytes: 2 << 20,
        block_size: 16 << 10,
        keys: 2500,
        write_factor: 3.0,
        value_bytes: 128,
        threads: 2,
        ..SoakConfig::default()
    };
    let report = soak::run(&cfg, |_| {}).expect("no RegionFull, no lost value");
    let last = report.samples.last().expect("samples");
    assert!(last.capacity_multiple >= 3.0, "{last:?}");
    assert!(last.blocks_freed > 0, "compaction was needed: {last:?}");
    // Structural, not timing: once merged and compacted, every block left is more than
    // `live_pct` live (or a log's writing block or spare).
    assert!(
        report.settled_used <= report.settled_bound,
        "{} blocks used after compacting everything, bound {}",
        report.settled_used,
        report.settled_bound
    );
    assert!(
        report.settled_bound < report.n_blocks * 3 / 4,
        "the bound is tight enough to mean something: {} of {}",
        report.settled_bound,
        report.n_blocks
    );
}

#[test]
fn inspect_shows_the_live_share_and_compaction_totals_and_a_rate_between_two_samples() {
    use dinomo_hw::region_file::RegionFile;
    use dinomo_shared::geometry::FormatParams;
    use dpm_fw::testkit::LogWriter;
    use dpm_fw::Dpm;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.region");
    {
        let file = RegionFile::create(&path, 4 << 20).expect("create");
        let params = FormatParams {
            block_size: 16 << 10,
            ..FormatParams::for_size(4 << 20)
        };
        let dpm = Dpm::format(file.pmem(), &params, 5).expect("format");
        let mut w = LogWriter::open(&dpm, 1, 0).expect("open");
        let mut s = Scratch::default();
        for round in 0..2u8 {
            for i in 0..600u64 {
                // Every tenth key is written once only.
                if round == 0 || i % 10 != 0 {
                    w.put(&filler(i), &[b'a' + round; 100]);
                }
            }
            w.flush(&dpm).expect("flush");
        }
        dpm.merge_all(w.log_id, &mut s).expect("merge");
        while dpm
            .compact_step(true, &mut s)
            .expect("compact")
            .victim
            .is_some()
        {}
        assert!(dpm.compaction_totals().blocks_freed > 0);
        file.sync().expect("sync");
    }
    let o = dinomo_cmd(["dpm", "inspect", "--json", "--interval", "20ms", "--path"])
        .arg(&path)
        .output()
        .expect("run dinomo");
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let c = &j["compaction"];
    assert!(c["blocks_freed"].as_u64().expect("blocks_freed") > 0, "{c}");
    assert!(
        c["entries_moved"].as_u64().expect("entries_moved") >= 50,
        "{c}"
    );
    assert!(c["log_id"].as_u64().is_some(), "{c}");
    // Nothing compacts between the two samples of a region nobody serves.
    assert_eq!(c["rate"]["blocks_per_sec"].as_f64(), Some(0.0), "{c}");
    let live = j["space"]["live_fraction"].as_f64().expect("live_fraction");
    assert!(live > 0.0 && live <= 1.0, "{live}");
    // The table names the same figures; a bad interval is refused.
    let o = dinomo_cmd(["dpm", "inspect", "--path"])
        .arg(&path)
        .output()
        .expect("run dinomo");
    let table = stdout(&o);
    assert!(
        table.contains("compaction") && table.contains("% live"),
        "{table}"
    );
    assert!(
        table.contains(" dpm "),
        "the compaction log is listed: {table}"
    );
    let o = dinomo_cmd(["dpm", "inspect", "--interval", "soon", "--path"])
        .arg(&path)
        .output()
        .expect("run dinomo");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid interval"));
}
