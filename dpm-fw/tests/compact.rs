//! Compaction of mostly-dead blocks: moves, the compare that lets newer versions win,
//! bounded space, recovery, and power failures at random points of a mixed workload.

use std::collections::BTreeMap;
use std::sync::Arc;

use dinomo_hw::shadow::{catch_power_failure, ShadowRegion};
use dinomo_shared::control::COMPACTION_KN;
use dinomo_shared::geometry::FormatParams;
use dinomo_shared::ErrorCode;
use dpm_fw::index::Index;
use dpm_fw::testkit::{fresh, fresh_with, open_image, reopen, small_params, LogWriter, TestDpm};
use dpm_fw::{CompactConfig, Dpm, Scratch};

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:05}").into_bytes()
}

fn value(i: u64, version: u64) -> Vec<u8> {
    format!("value {i} v{version} {}", "x".repeat((i % 40) as usize)).into_bytes()
}

fn assert_counts_consistent(dpm: &TestDpm, what: &str) {
    assert_eq!(
        dpm.live_count_mismatch(),
        None,
        "{what}: live counts differ from a recount from the index"
    );
}

/// Writes `keys` keys, then updates all but every tenth, so early blocks are mostly dead.
fn cold_tail(dpm: &TestDpm, keys: u64) -> LogWriter {
    let mut w = LogWriter::open(dpm, 1, 0).expect("open");
    let mut s = Scratch::default();
    for i in 0..keys {
        w.put(&key(i), &value(i, 0));
    }
    w.flush(dpm).expect("flush");
    for i in (0..keys).filter(|i| i % 10 != 0) {
        w.put(&key(i), &value(i, 1));
    }
    w.flush(dpm).expect("flush");
    dpm.merge_all(w.log_id, &mut s).expect("merge");
    w
}

fn expected(i: u64) -> Vec<u8> {
    value(i, u64::from(i % 10 != 0))
}

#[test]
fn compaction_moves_live_entries_out_of_mostly_dead_blocks_and_frees_them() {
    let (r, dpm) = fresh(31);
    let keys = 400;
    let w = cold_tail(&dpm, keys);
    let mut s = Scratch::default();
    let before = dpm.stats();
    assert_eq!(before.compaction, Default::default());
    assert_eq!(dpm.compaction_log(), None);
    // Not due: the region has plenty of free blocks.
    assert_eq!(dpm.compact_step(false, &mut s), Ok(Default::default()));
    let mut freed = 0;
    let mut moved = 0;
    loop {
        let step = dpm.compact_step(true, &mut s).expect("compact");
        if step.victim.is_none() {
            break;
        }
        assert!(!step.busy && !step.region_full, "{step:?}");
        freed += step.freed as u64;
        moved += step.entries_moved;
        assert_counts_consistent(&dpm, "after a step");
    }
    assert!(freed >= 3, "several mostly-dead blocks are freed ({freed})");
    assert!(moved >= 20, "their live entries moved ({moved})");
    let after = dpm.stats();
    assert_eq!(after.compaction.blocks_freed, freed);
    assert_eq!(after.compaction.entries_moved, moved);
    assert_eq!(after.compaction.cas_failures, 0);
    assert!(after.compaction.bytes_moved > moved * 24);
    assert!(
        after.blocks_used < before.blocks_used,
        "{} blocks used before, {} after",
        before.blocks_used,
        after.blocks_used
    );
    let clog = dpm.compaction_log().expect("the compaction log is open");
    let cl = after
        .logs
        .iter()
        .find(|l| l.log_id == clog)
        .expect("listed");
    assert_eq!(cl.kn_id, COMPACTION_KN);
    for i in 0..keys {
        assert_eq!(dpm.get(&key(i)), Some(expected(i)), "key {i}");
    }
    // No KN can write into, close or merge the compaction log.
    let gen = cl.generation;
    let mut fake = LogWriter::open(&dpm, 9, 0).expect("open");
    fake.log_id = clog;
    fake.generation = gen;
    assert_eq!(fake.next_block(&dpm), Err(ErrorCode::NoSuchLog));

    // Recovery does not replay the compaction log, keeps the totals, and recounts the same.
    drop(w);
    drop(dpm);
    let (_r2, rec) = reopen(&r);
    assert_eq!(rec.compaction_log(), Some(clog));
    assert_eq!(rec.compaction_totals(), after.compaction);
    assert_counts_consistent(&rec, "after recovery");
    for i in 0..keys {
        assert_eq!(
            rec.get(&key(i)),
            Some(expected(i)),
            "key {i} after recovery"
        );
    }
    // The store keeps working: more updates, a merge, compaction again (its own blocks too).
    let mut w = LogWriter::open(&rec, 2, 0).expect("open");
    for i in (0..keys).filter(|i| i % 10 == 0) {
        w.put(&key(i), &value(i, 7));
    }
    w.flush(&rec).expect("flush");
    rec.merge_all(w.log_id, &mut s).expect("merge");
    while rec
        .compact_step(true, &mut s)
        .expect("compact")
        .victim
        .is_some()
    {}
    assert_counts_consistent(&rec, "after compacting again");
    for i in 0..keys {
        let want = if i % 10 == 0 {
            value(i, 7)
        } else {
            value(i, 1)
        };
        assert_eq!(rec.get(&key(i)), Some(want), "key {i}");
    }
}

#[test]
fn a_newer_version_merged_during_compaction_always_wins() {
    let (_r, dpm) = fresh(32);
    let keys = 300;
    let _ = cold_tail(&dpm, keys);
    let dpm = &dpm;
    let last = std::thread::scope(|sc| {
        let writer = sc.spawn(move || {
            let mut w = LogWriter::open(dpm, 3, 0).expect("open");
            let mut s = Scratch::default();
            let mut last = BTreeMap::new();
            for round in 0..30u64 {
                for i in (0..keys).filter(|i| (i + round) % 7 == 0) {
                    let v = value(i, 100 + round);
                    w.put(&key(i), &v);
                    last.insert(i, v);
                }
                w.flush(dpm).expect("flush");
                dpm.merge_all(w.log_id, &mut s).expect("merge");
            }
            last
        });
        let mut s = Scratch::default();
        while !writer.is_finished() {
            dpm.compact_step(true, &mut s).expect("compact");
        }
        writer.join().expect("writer")
    });
    let mut s = Scratch::default();
    while dpm
        .compact_step(true, &mut s)
        .expect("compact")
        .victim
        .is_some()
    {}
    assert_counts_consistent(dpm, "after the race");
    for i in 0..keys {
        let want = last.get(&i).cloned().unwrap_or_else(|| expected(i));
        assert_eq!(dpm.get(&key(i)), Some(want), "key {i}");
    }
}

#[test]
fn update_only_load_of_many_times_the_log_area_never_fills_the_region() {
    let (_r, dpm) = fresh(33);
    let keys = 6_000u64;
    // Compact once half the blocks are used: the cold third alone spans more than that.
    let n = dpm.geometry().n_blocks;
    dpm.set_compaction_config(CompactConfig {
        low_watermark: n / 2,
        ..dpm.compaction_config()
    });
    let capacity = dpm.geometry().n_blocks * dpm.geometry().block_size;
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open");
    let mut s = Scratch::default();
    let mut written = 0u64;
    let mut version = 0u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut peak_used = 0;
    let mut used_at_5x = None;
    // Every key once; then every third key stays cold, leaving blocks with a third live
    // that only compaction frees (without it the region fills).
    for i in 0..keys {
        w.put(&key(i), &value(i, 0));
    }
    w.flush(&dpm).expect("flush");
    while written < 20 * capacity {
        version += 1;
        for _ in 0..64 {
            // Skewed: half of the updates go to a tenth of the keys.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut i = if x % 2 == 0 {
                x % (keys / 10)
            } else {
                x % keys
            };
            if i % 3 == 0 {
                i += 1;
            }
            let v = value(i, version);
            written += v.len() as u64 + 40;
            w.put(&key(i), &v);
        }
        w.flush(&dpm)
            .unwrap_or_else(|e| panic!("flush at {written} bytes: {e:?}"));
        dpm.merge_all(w.log_id, &mut s).expect("merge");
        while dpm.compaction_due() {
            let step = dpm.compact_step(false, &mut s).expect("compact");
            if step.victim.is_none() {
                break;
            }
        }
        let used = dpm.geometry().n_blocks - dpm.blocks_free();
        peak_used = peak_used.max(used);
        if used_at_5x.is_none() && written >= 5 * capacity {
            used_at_5x = Some(peak_used);
        }
    }
    // Stable: after the warm-up the footprint never exceeded the region minus the
    // watermark's reserve plus one step's worth.
    let bound = dpm.geometry().n_blocks - dpm.compaction_config().low_watermark + 2;
    assert!(peak_used <= bound, "peak {peak_used} blocks > {bound}");
    let warm = used_at_5x.expect("ran past 5x");
    assert!(
        peak_used <= warm + 2,
        "the footprint kept growing after the warm-up: {warm} -> {peak_used} blocks"
    );
    assert!(dpm.compaction_totals().blocks_freed > 0);
    assert_counts_consistent(&dpm, "after the run");
}

/// A deterministic generator for the workloads below.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WRITERS: u64 = 3;
const KEYS: u64 = 150;

/// A region with a tiny first index table, so the workload makes it grow.
fn small_index_region(region_id: u64) -> (Arc<ShadowRegion>, TestDpm) {
    let (r, dpm) = fresh(region_id);
    let geo = *dpm.geometry();
    drop(dpm);
    Index::format_with(&r.pmem(), &geo, 1).expect("small index");
    let dpm = Dpm::open(r.pmem()).expect("open");
    (r, dpm)
}

/// What the workload has acknowledged, and what it had in flight when the power failed.
#[derive(Default)]
struct Model {
    acked: BTreeMap<u64, Option<Vec<u8>>>,
    in_flight: BTreeMap<u64, Vec<Option<Vec<u8>>>>,
}

/// Puts, updates and deletes by several writers (key `i` belongs to writer `i % WRITERS`,
/// as a key belongs to one KN), merges, logs closed and reopened (block reuse), and
/// compaction steps, interleaved by `seed`.
fn workload(dpm: &TestDpm, seed: u64, rounds: u64, model: &mut Model) {
    let mut rng = Rng(seed | 1);
    let mut s = Scratch::default();
    let mut writers: Vec<LogWriter> = (0..WRITERS)
        .map(|k| LogWriter::open(dpm, k as u32 + 1, 0).expect("open"))
        .collect();
    for round in 0..rounds {
        let wi = rng.below(WRITERS) as usize;
        let mut batch: BTreeMap<u64, Vec<Option<Vec<u8>>>> = BTreeMap::new();
        for _ in 0..1 + rng.below(12) {
            let i = rng.below(KEYS / WRITERS) * WRITERS + wi as u64;
            if rng.below(8) == 0 {
                writers[wi].delete(&key(i));
                batch.entry(i).or_default().push(None);
            } else {
                let v = value(i, round);
                writers[wi].put(&key(i), &v);
                batch.entry(i).or_default().push(Some(v));
            }
        }
        model.in_flight = batch;
        writers[wi].flush(dpm).expect("flush");
        for (i, vs) in std::mem::take(&mut model.in_flight) {
            model.acked.insert(i, vs.last().cloned().flatten());
        }
        match rng.below(10) {
            0..=3 => {
                dpm.merge_all(writers[wi].log_id, &mut s).expect("merge");
            }
            4..=5 => {
                dpm.compact_step(true, &mut s).expect("compact");
            }
            6 if rng.below(4) == 0 => {
                // Close the log (merged to its tail) and write on a new one: the old
                // log's blocks are reclaimed and reused.
                let w = &writers[wi];
                let req = dinomo_shared::msg::Request::CloseLog {
                    log_id: w.log_id,
                    generation: w.generation,
                };
                dpm.execute(req, &mut s).expect("close");
                // Closed logs keep their slots until their live entries are gone.
                writers[wi] = loop {
                    match LogWriter::open(dpm, wi as u32 + 1, 0) {
                        Err(ErrorCode::NoFreeLog) => {
                            let step = dpm.compact_step(true, &mut s).expect("compact");
                            assert!(step.victim.is_some(), "no slot and nothing to compact");
                        }
                        other => break other.expect("reopen"),
                    }
                };
            }
            _ => {}
        }
    }
}

/// After recovery: every acknowledged write is there with its last value (or a value of
/// the batch in flight), live counts recount the same, and the store keeps working.
fn check_recovered(rec: &TestDpm, model: &Model, what: &str) {
    let mut s = Scratch::default();
    for log_id in 0..rec.geometry().max_logs {
        let _ = rec.merge_all(log_id, &mut s);
    }
    for i in 0..KEYS {
        let got = rec.get(&key(i));
        let acked = model.acked.get(&i).cloned().flatten();
        let in_flight = model.in_flight.get(&i);
        let ok = got == acked || in_flight.is_some_and(|vs| vs.contains(&got));
        assert!(ok, "{what}: key {i} is {got:?}, acknowledged {acked:?}");
    }
    assert_counts_consistent(rec, what);
    let mut w = LogWriter::open(rec, 7, 0).expect("open after recovery");
    w.put(b"after", b"recovery");
    for i in 0..20 {
        w.put(&key(i), b"rewritten");
    }
    w.flush(rec).expect("flush after recovery");
    rec.merge_all(w.log_id, &mut s)
        .expect("merge after recovery");
    while rec
        .compact_step(true, &mut s)
        .expect("compact")
        .victim
        .is_some()
    {}
    assert_eq!(rec.get(b"after"), Some(b"recovery".to_vec()), "{what}");
    assert_eq!(rec.get(&key(3)), Some(b"rewritten".to_vec()), "{what}");
    assert_counts_consistent(rec, what);
}

const ROUNDS: u64 = 220;

#[test]
fn power_failure_at_random_points_of_merges_resizes_reuse_and_compaction() {
    let points: u64 = std::env::var("DINOMO_COMPACT_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seeds = [11u64, 29];
    let per_seed = points.div_ceil(seeds.len() as u64);
    for seed in seeds {
        // A full run: the workload exercises every mechanism named in the test's title.
        let (r, dpm) = small_index_region(40 + seed);
        let base = r.fences();
        let mut model = Model::default();
        workload(&dpm, seed, ROUNDS, &mut model);
        let total = r.fences() - base;
        let st = dpm.stats();
        assert!(st.index.generation > 1, "the index grew");
        assert!(st.compaction.entries_moved > 0, "entries were moved");
        assert!(st.compaction.blocks_freed > 0, "compaction freed blocks");
        check_recovered(&dpm, &model, "no crash");
        drop(dpm);
        let mut pick = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
        for n in 0..per_seed {
            let k = pick.below(total);
            let (r, dpm) = small_index_region(40 + seed);
            r.set_crash_after(Some(k));
            let mut model = Model::default();
            let res = catch_power_failure(|| workload(&dpm, seed, ROUNDS, &mut model));
            assert!(res.is_err(), "seed {seed}: the power must fail at {k}");
            drop(dpm);
            let image = if n % 2 == 0 {
                r.durable_image()
            } else {
                r.crash_image(k * 31 + 1, 50)
            };
            let (_r2, rec) = open_image(&image);
            check_recovered(&rec, &model, &format!("seed {seed}, crash at {k}"));
        }
    }
}

#[test]
fn power_failure_at_every_persist_point_of_a_compaction_step() {
    let setup = || {
        let (r, dpm) = fresh(34);
        let w = cold_tail(&dpm, 300);
        drop(w);
        // A first step opens the compaction log; the step under test moves a full victim.
        let mut s = Scratch::default();
        dpm.compact_step(true, &mut s).expect("compact");
        (r, dpm)
    };
    let (r, dpm) = setup();
    let base = r.fences();
    let step = dpm
        .compact_step(true, &mut Scratch::default())
        .expect("compact");
    let total = r.fences() - base;
    assert!(step.entries_moved > 3 && step.freed, "{step:?}");
    assert!(total > 4, "{total} persist points");
    drop(dpm);
    for k in 0..=total {
        let (r, dpm) = setup();
        r.set_crash_after(Some(k));
        let res = catch_power_failure(|| dpm.compact_step(true, &mut Scratch::default()));
        assert_eq!(res.is_err(), k < total, "crash at {k} of {total}");
        drop(dpm);
        for image in [r.durable_image(), r.crash_image(k + 7, 50)] {
            let (_r2, rec) = open_image(&image);
            for i in 0..300 {
                assert_eq!(rec.get(&key(i)), Some(expected(i)), "crash at {k}: key {i}");
            }
            assert_counts_consistent(&rec, "after a crash in a step");
            let mut s = Scratch::default();
            while rec
                .compact_step(true, &mut s)
                .expect("compact")
                .victim
                .is_some()
            {}
            for i in 0..300 {
                assert_eq!(rec.get(&key(i)), Some(expected(i)), "crash at {k}: key {i}");
            }
            assert_counts_consistent(&rec, "compacted after recovery");
        }
    }
}

#[test]
fn a_region_without_a_compaction_log_opens_and_compaction_is_configurable() {
    let params = FormatParams {
        max_logs: 2,
        max_kns: 2,
        indirect_cells: 4,
        ..small_params()
    };
    let (_r, dpm) = fresh_with(&params, 35);
    let cfg = dpm.compaction_config();
    assert!(cfg.low_watermark >= 4 && cfg.live_pct > 0 && cfg.live_pct <= 100);
    dpm.set_compaction_config(CompactConfig {
        live_pct: 500,
        low_watermark: 0,
    });
    assert_eq!(dpm.compaction_config().live_pct, 100);
    assert!(!dpm.compaction_due());
    // Both log slots in use by KNs: compaction has nowhere to write and says so, changing
    // nothing.
    let mut a = LogWriter::open(&dpm, 1, 0).expect("open");
    let _b = LogWriter::open(&dpm, 2, 0).expect("open");
    for i in 0..200 {
        a.put(&key(i), &value(i, 0));
    }
    a.flush(&dpm).expect("flush");
    for i in 0..200 {
        a.put(&key(i), &value(i, 1));
    }
    a.flush(&dpm).expect("flush");
    let mut s = Scratch::default();
    dpm.merge_all(a.log_id, &mut s).expect("merge");
    let used = dpm.stats().blocks_used;
    assert_eq!(dpm.compact_step(true, &mut s), Err(ErrorCode::NoFreeLog));
    assert_eq!(dpm.stats().blocks_used, used);
    assert_eq!(dpm.compaction_totals(), Default::default());
}
