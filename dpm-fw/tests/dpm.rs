//! Memory-node behaviour end to end over an in-memory region: merging, torn batches,
//! block reuse, recovery, and power failure at every persist point.

use std::collections::BTreeMap;

use dinomo_hw::shadow::{catch_power_failure, ShadowRegion};
use dinomo_shared::block::BlockHeader;
use dinomo_shared::entry::{self, Op};
use dinomo_shared::ErrorCode;
use dpm_fw::testkit::{fresh, open_image, LogWriter, TestDpm, SMALL_REGION};
use dpm_fw::{Dpm, Scratch, Stall};

const REGION_ID: u64 = 7;

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:05}").into_bytes()
}

fn value(i: u64, version: u64) -> Vec<u8> {
    format!("value {i} v{version} {}", "x".repeat((i % 50) as usize)).into_bytes()
}

fn check_model(dpm: &TestDpm, model: &BTreeMap<Vec<u8>, Vec<u8>>, keys: u64) {
    for i in 0..keys {
        let k = key(i);
        assert_eq!(dpm.get(&k), model.get(&k).cloned(), "key {i}");
    }
}

#[test]
fn merges_puts_updates_and_deletes_across_blocks() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    let mut model = BTreeMap::new();
    for round in 0..4u64 {
        for i in 0..200u64 {
            if (i + round) % 7 == 0 {
                w.delete(&key(i));
                model.remove(&key(i));
            } else {
                w.put(&key(i), &value(i, round));
                model.insert(key(i), value(i, round));
            }
        }
        w.flush(&dpm).expect("flush");
    }
    let mut s = Scratch::default();
    let merged = dpm.merge_all(w.log_id, &mut s).expect("merge");
    assert_eq!(merged, 800);
    check_model(&dpm, &model, 200);
    let st = dpm.stats();
    assert_eq!(st.logs.len(), 1);
    assert_eq!((st.logs[0].merged_seq, st.logs[0].tail_seq), (800, 800));
    assert!(st.blocks_used > 1, "the log spans several blocks");
}

#[test]
fn torn_batches_are_never_merged() {
    let v = [5u8; 40];
    let entry_len = entry::padded_len(key(0).len(), v.len());
    let batch = 3 * entry_len;
    // A batch cut short at many lengths: its torn entry (and everything after) is never
    // merged; entries that were written whole before the cut are complete and may be.
    for cut in [
        0,
        1,
        8,
        23,
        24,
        40,
        entry_len - 1,
        entry_len,
        entry_len + 5,
        2 * entry_len + 30,
        batch - 1,
    ] {
        let (_r, dpm) = fresh(REGION_ID);
        let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
        for i in 0..10 {
            w.put(&key(i), &value(i, 0));
        }
        assert_eq!(w.flush(&dpm).expect("flush"), 10);
        for i in 10..13 {
            w.put(&key(i), &v);
        }
        w.flush_with(&dpm, Some(cut)).expect("torn flush");
        let raw = entry::raw_len(key(0).len(), v.len());
        let whole = (0..3).filter(|i| i * entry_len + raw <= cut).count() as u64;
        let mut s = Scratch::default();
        assert_eq!(
            dpm.merge_all(w.log_id, &mut s),
            Ok(10 + whole),
            "cut at {cut}"
        );
        for i in 10 + whole..13 {
            assert_eq!(
                dpm.get(&key(i)),
                None,
                "entry {i} of a batch cut at {cut} was merged"
            );
        }
    }
    // A bit flip in an otherwise complete batch stops the merge right there.
    let (_r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    for i in 0..5 {
        w.put(&key(i), &v);
    }
    w.flush(&dpm).expect("flush");
    let first = dpm.geometry().block_off(w.block) + 64;
    let victim = first + 2 * entry_len as u64 + 30; // inside the third entry
    let mut x = [0u8; 1];
    dpm.pmem().read(victim, &mut x);
    dpm.pmem().write(victim, &[x[0] ^ 0x10]);
    let mut s = Scratch::default();
    assert_eq!(dpm.merge_all(w.log_id, &mut s), Ok(2));
    assert!(dpm.get(&key(2)).is_none() && dpm.get(&key(3)).is_none());
}

#[test]
fn corruption_inside_a_sealed_block_stalls_the_log_and_is_reported() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    for i in 0..100 {
        w.put(&key(i), &value(i, 0));
    }
    w.flush(&dpm).expect("flush");
    let first_block = dpm.stats().logs[0].cursor.block;
    // Flip a byte of the first entry of the (sealed) first block.
    let off = dpm.geometry().block_off(first_block) + 64 + 26;
    let mut x = [0u8; 1];
    dpm.pmem().read(off, &mut x);
    dpm.pmem().write(off, &[x[0] ^ 1]);
    let mut s = Scratch::default();
    assert_eq!(dpm.merge_all(w.log_id, &mut s), Err(ErrorCode::Corrupt));
    let st = dpm.stats();
    assert!(
        matches!(st.logs[0].stall, Some(Stall::CorruptEntry { .. })),
        "{:?}",
        st.logs[0].stall
    );
    assert_eq!(st.logs[0].merged_seq, 0);
}

#[test]
fn dead_blocks_are_reused_so_updates_never_fill_the_region() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    let mut s = Scratch::default();
    let capacity = dpm.geometry().log_capacity();
    let mut written = 0u64;
    let mut round = 0;
    // Overwrite a small key set until we have written 5x the log area.
    while written < 5 * capacity {
        for i in 0..50 {
            let v = value(i, round);
            written += entry::padded_len(key(i).len(), v.len()) as u64;
            w.put(&key(i), &v);
        }
        w.flush(&dpm)
            .expect("an update-only load must not fill the region");
        dpm.merge_all(w.log_id, &mut s).expect("merge");
        round += 1;
    }
    for i in 0..50 {
        assert_eq!(dpm.get(&key(i)), Some(value(i, round - 1)));
    }
    let st = dpm.stats();
    assert!(
        st.blocks_used <= 4,
        "live data fits a few blocks, {} are used",
        st.blocks_used
    );
    assert_eq!(st.blocks_free + st.blocks_used, dpm.geometry().n_blocks);
}

#[test]
fn region_full_is_reported_when_live_data_exceeds_the_log() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    let mut s = Scratch::default();
    let mut i = 0;
    let err = loop {
        w.put(&key(i), &[7u8; 900]);
        i += 1;
        if i % 20 == 0 {
            match w.flush(&dpm) {
                Ok(_) => {
                    dpm.merge_all(w.log_id, &mut s).expect("merge");
                }
                Err(e) => break e,
            }
        }
    };
    assert_eq!(err, ErrorCode::RegionFull);
    dpm.merge_all(w.log_id, &mut s).expect("merge");
    // Everything acknowledged before the failure is still there.
    for j in 0..w.durable_seq {
        assert_eq!(dpm.get(&key(j)).map(|v| v.len()), Some(900), "key {j}");
    }
}

#[test]
fn close_log_merges_and_releases_dead_blocks() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut s = Scratch::default();
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    for i in 0..30 {
        w.put(&key(i), &value(i, 0));
    }
    w.flush(&dpm).expect("flush");
    for i in 0..30 {
        w.delete(&key(i));
    }
    w.flush(&dpm).expect("flush");
    let req = dinomo_shared::msg::Request::CloseLog {
        log_id: w.log_id,
        generation: w.generation,
    };
    let resp = dpm.execute(req, &mut s).expect("close");
    assert_eq!(
        resp,
        dinomo_shared::msg::Response::Closed { merged_seq: 60 }
    );
    let st = dpm.stats();
    assert!(
        st.logs.is_empty(),
        "a closed log with no live data gives its slot back"
    );
    assert_eq!(st.blocks_free, dpm.geometry().n_blocks);
    // A stale writer is refused.
    assert_eq!(
        w.flush(&dpm).map(|_| ()),
        Ok(()),
        "an empty flush does nothing"
    );
    w.put(&key(1), b"late");
    assert!(w.next_block(&dpm).is_err());
}

#[test]
fn recovery_after_clean_shutdown_and_after_crash() {
    let (r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    let mut model = BTreeMap::new();
    for i in 0..300 {
        w.put(&key(i), &value(i, 1));
        model.insert(key(i), value(i, 1));
    }
    w.flush(&dpm).expect("flush");
    let mut s = Scratch::default();
    // Merge only part of it: recovery must finish the rest.
    dpm.merge_step(w.log_id, 100, &mut s);
    let (_r2, dpm2) = open_image(&r.durable_image());
    check_model(&dpm2, &model, 300);
    assert!(!dpm2.stats().clean_shutdown);
    dpm2.shutdown_clean(&mut s);
    assert!(dpm2.stats().clean_shutdown);
}

#[test]
fn open_refuses_garbage_and_foreign_regions() {
    let mut img = vec![0u8; SMALL_REGION as usize];
    let r = ShadowRegion::from_image(&img);
    assert!(Dpm::open(r.pmem()).is_err());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in img.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let r = ShadowRegion::from_image(&img);
    let err = Dpm::open(r.pmem()).expect_err("random bytes are not a region");
    assert!(err.to_string().contains("not a DINOMO region"), "{err}");
    // A valid superblock over a corrupted log table is refused, not trusted.
    let (r, dpm) = fresh(REGION_ID);
    let w = LogWriter::open(&dpm, 1, 0).expect("open log");
    let slot = dpm.geometry().log_slot_off(w.log_id) + 16;
    dpm.pmem().store_u32(slot, 0xFFFF_FFF0);
    dpm.pmem().persist(slot, 4);
    let r2 = ShadowRegion::from_image(&r.durable_image());
    let err = Dpm::open(r2.pmem()).expect_err("corrupt chain");
    assert!(err.to_string().contains("log 0 is corrupt"), "{err}");
}

/// A scripted workload: batches of puts, updates and deletes with merges, block switches,
/// block reuse and an index resize. Returns the seq acknowledged before each step.
fn scripted(dpm: &TestDpm, ops: &[(Op, u64, u64)], acked: &mut u64) {
    let mut s = Scratch::default();
    let mut w = LogWriter::open(dpm, 1, 0).expect("open log");
    for (n, chunk) in ops.chunks(12).enumerate() {
        for &(op, k, v) in chunk {
            match op {
                Op::Put => w.put(&key(k), &value(k, v)),
                Op::Delete => w.delete(&key(k)),
            }
        }
        *acked = w.flush(dpm).expect("flush");
        if n % 2 == 1 {
            dpm.merge_step(w.log_id, 7, &mut s);
        }
    }
    dpm.merge_all(w.log_id, &mut s).expect("merge");
}

fn script() -> Vec<(Op, u64, u64)> {
    let mut ops = Vec::new();
    for v in 0..3u64 {
        for k in 0..40u64 {
            if v == 2 && k % 3 == 0 {
                ops.push((Op::Delete, k, v));
            } else {
                ops.push((Op::Put, (k * 7 + v) % 40, v));
            }
        }
    }
    ops
}

fn model_after(ops: &[(Op, u64, u64)], n: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    for &(op, k, v) in ops.iter().take(n as usize) {
        match op {
            Op::Put => {
                m.insert(key(k), value(k, v));
            }
            Op::Delete => {
                m.remove(&key(k));
            }
        }
    }
    m
}

#[test]
fn power_failure_at_every_persist_point_recovers_the_committed_prefix() {
    let ops = script();
    // Count the persist points of a full run.
    let (r, dpm) = fresh(REGION_ID);
    let base = r.fences();
    let mut acked = 0;
    scripted(&dpm, &ops, &mut acked);
    assert_eq!(acked, ops.len() as u64);
    let total = r.fences() - base;
    assert!(
        total > 100,
        "the script should exercise many persist points ({total})"
    );
    for k in 0..=total {
        let (r, dpm) = fresh(REGION_ID);
        r.set_crash_after(Some(k));
        let mut acked = 0;
        let res = catch_power_failure(|| scripted(&dpm, &ops, &mut acked));
        if k < total {
            assert!(res.is_err(), "the power must fail at persist point {k}");
        }
        drop(dpm);
        for (label, image) in [
            ("durable", r.durable_image()),
            ("evicted", r.crash_image(k * 31 + 1, 50)),
        ] {
            let (_r2, rec) = open_image(&image);
            let st = rec.stats();
            let merged = st.logs.first().map_or(0, |l| l.merged_seq);
            let tail = st.logs.first().map_or(0, |l| l.tail_seq);
            assert_eq!(
                merged, tail,
                "{label} image, crash at {k}: recovery stopped short of the tail"
            );
            assert!(
                merged >= acked,
                "{label} image, crash at {k}: acknowledged seq {acked} lost (recovered {merged})"
            );
            assert!(merged <= ops.len() as u64);
            let model = model_after(&ops, merged);
            for i in 0..40 {
                assert_eq!(
                    rec.get(&key(i)),
                    model.get(&key(i)).cloned(),
                    "{label} image, crash at {k}, key {i}"
                );
            }
            // The recovered store keeps working.
            let mut w = LogWriter::open(&rec, 2, 0).expect("open after recovery");
            w.put(b"after", b"recovery");
            w.flush(&rec).expect("flush after recovery");
            rec.merge_all(w.log_id, &mut Scratch::default())
                .expect("merge after recovery");
            assert_eq!(rec.get(b"after"), Some(b"recovery".to_vec()));
        }
    }
}

#[test]
fn seal_written_without_successor_is_a_tail_not_damage() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    w.put(b"a", b"1");
    w.flush(&dpm).expect("flush");
    let seal = dpm.geometry().block_off(w.block) + BlockHeader::SEALED_LEN_OFFSET;
    dpm.pmem().store_u32(seal, w.offset as u32);
    let mut s = Scratch::default();
    assert_eq!(dpm.merge_all(w.log_id, &mut s), Ok(1));
}
