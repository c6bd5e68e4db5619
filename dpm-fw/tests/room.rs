//! A full index area: the index grows into free log blocks, the memory node grants log
//! blocks only while everything granted can still be merged, and nothing acknowledged is
//! lost, also across a power failure at any persist point while the index grows.

use dinomo_hw::shadow::catch_power_failure;
use dinomo_shared::geometry::FormatParams;
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::ErrorCode;
use dpm_fw::testkit::{fresh_with, open_image, small_params, LogWriter, TestDpm};
use dpm_fw::Scratch;

const REGION_ID: u64 = 15;

/// The small test region with the smallest index area (64 KiB, about 3 000 keys).
fn params() -> FormatParams {
    FormatParams {
        index_percent: 1,
        ..small_params()
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    format!("v{i}").into_bytes()
}

/// Every block is free, in a log chain, or the index's, and never two of these.
fn assert_blocks_accounted(dpm: &TestDpm) {
    let st = dpm.stats();
    assert_eq!(
        st.blocks_free + st.blocks_used + st.index.blocks,
        dpm.geometry().n_blocks,
        "{st:?}"
    );
}

/// Writes `key(seq)` for every seq in batches of `batch`, merging every `merge_every`
/// batches (0: never), until the memory node refuses a block. Returns the error and the
/// last acknowledged seq.
fn fill(dpm: &TestDpm, w: &mut LogWriter, batch: u64, merge_every: u64) -> (ErrorCode, u64) {
    let mut s = Scratch::default();
    let mut n = 0;
    loop {
        let first = w.next_seq;
        for i in 0..batch {
            w.put(&key(first + i), &value(first + i));
        }
        if let Err(e) = w.flush(dpm) {
            return (e, w.durable_seq);
        }
        n += 1;
        if merge_every > 0 && n % merge_every == 0 {
            dpm.merge_all(w.log_id, &mut s).expect("merge never fails");
        }
    }
}

fn assert_all_readable(dpm: &TestDpm, acked: u64) {
    for seq in 1..=acked {
        assert_eq!(
            dpm.get(&key(seq)),
            Some(value(seq)),
            "acknowledged key {seq}"
        );
    }
}

#[test]
fn a_full_index_area_grows_into_log_blocks_until_the_region_is_full() {
    let (r, dpm) = fresh_with(&params(), REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open");
    let (err, acked) = fill(&dpm, &mut w, 20, 3);
    assert_eq!(err, ErrorCode::RegionFull);
    let area_keys = dpm.index().stats(dpm.pmem()).area_bytes / 64 * 3;
    assert!(
        acked > 2 * area_keys,
        "only {acked} keys before the region was full"
    );
    // The fence merges everything granted: the index had room for all of it.
    match dpm.execute(Request::FenceKn { kn_id: 1 }, &mut Scratch::default()) {
        Ok(Response::Fenced { logs: 1, .. }) => {}
        other => panic!("fence: {other:?}"),
    }
    let st = dpm.stats();
    assert!(st.logs.iter().all(|l| l.stall.is_none()), "{:?}", st.logs);
    assert!(st.index.blocks > 0, "the index never grew: {:?}", st.index);
    assert_eq!(st.index.items, acked);
    assert_all_readable(&dpm, acked);
    assert_blocks_accounted(&dpm);
    let room = dpm.room();
    assert!(room.available_units >= room.reserved_units, "{room:?}");
    // A restart finds the same blocks in the index and gives none of them to a log.
    let blocks = dpm.index().blocks();
    drop(dpm);
    let (_r2, dpm2) = open_image(&r.durable_image());
    assert_eq!(dpm2.index().blocks(), blocks);
    assert_all_readable(&dpm2, acked);
    assert_blocks_accounted(&dpm2);
    let mut w2 = LogWriter::open(&dpm2, 2, 0).expect("a fenced log's room is free again");
    w2.put(b"after", b"restart");
    w2.flush(&dpm2).expect("flush");
    dpm2.merge_all(w2.log_id, &mut Scratch::default())
        .expect("merge");
    assert_eq!(dpm2.get(b"after"), Some(b"restart".to_vec()));
    for b in blocks {
        assert!(
            dpm2.stats().logs.iter().all(|l| l.cursor.block != b),
            "index block {b} was given to a log"
        );
    }
}

#[test]
fn without_any_merging_every_granted_entry_still_fits_the_index() {
    // Merge workers that never get to run: the KN fills what it is granted, and the fence
    // must still merge all of it (before, the index area filled up and the merge stalled,
    // the fence answered `Corrupt`, and a retried fence lost the unmerged writes).
    let (_r, dpm) = fresh_with(&params(), REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open");
    let (err, acked) = fill(&dpm, &mut w, 20, 0);
    assert_eq!(err, ErrorCode::RegionFull);
    assert!(acked > 3_000, "{acked}");
    let r = dpm.execute(Request::FenceKn { kn_id: 1 }, &mut Scratch::default());
    assert!(matches!(r, Ok(Response::Fenced { logs: 1, .. })), "{r:?}");
    assert_all_readable(&dpm, acked);
    assert_blocks_accounted(&dpm);
}

/// After `base`'s writes the index area is nearly full; these spill into a log block.
fn window(dpm: &TestDpm, w: &mut LogWriter, from: u64, keys: u64, acked: &mut u64) {
    let mut s = Scratch::default();
    let mut seq = from;
    while seq < from + keys {
        for _ in 0..6 {
            w.put(&key(seq), &value(seq));
            seq += 1;
        }
        *acked = w.flush(dpm).expect("flush");
        dpm.merge_all(w.log_id, &mut s).expect("merge");
    }
}

#[test]
fn power_failure_at_every_persist_point_while_the_index_grows_into_a_block() {
    let (r, dpm) = fresh_with(&params(), REGION_ID);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open");
    let mut s = Scratch::default();
    // Fill the index area until about 20 units are left.
    loop {
        let st = dpm.index().stats(dpm.pmem());
        if st.used_bytes + 20 * 64 >= st.area_bytes {
            break;
        }
        assert_eq!(st.blocks, 0);
        let first = w.next_seq;
        for i in 0..10 {
            w.put(&key(first + i), &value(first + i));
        }
        w.flush(&dpm).expect("flush");
        dpm.merge_all(w.log_id, &mut s).expect("merge");
    }
    let base_acked = w.durable_seq;
    let base = r.durable_image();
    // The writer's state matches the base image (everything it wrote is durable).
    let writer = |_: &TestDpm| w.clone();
    // The whole window once, counting its persist points.
    let keys = 90;
    let (r0, dpm0) = open_image(&base);
    let mut w0 = writer(&dpm0);
    let start = r0.fences();
    let mut acked = 0;
    window(&dpm0, &mut w0, base_acked + 1, keys, &mut acked);
    let total = r0.fences() - start;
    assert!(
        dpm0.index().blocks().len() == 1,
        "the window must spill into a block: {:?}",
        dpm0.index().stats(dpm0.pmem())
    );
    for k in 0..=total {
        let (r1, dpm1) = open_image(&base);
        let mut w1 = writer(&dpm1);
        r1.set_crash_after(Some(k));
        let mut acked = base_acked;
        let res = catch_power_failure(|| window(&dpm1, &mut w1, base_acked + 1, keys, &mut acked));
        if k < total {
            assert!(res.is_err(), "the power must fail at persist point {k}");
        }
        drop(dpm1);
        for (label, image) in [
            ("durable", r1.durable_image()),
            ("evicted", r1.crash_image(k * 7919 + 3, 50)),
        ] {
            let (_r2, rec) = open_image(&image);
            let st = rec.stats();
            let log = st.logs.first().expect("the log survives");
            assert_eq!(log.merged_seq, log.tail_seq, "{label}, crash at {k}");
            assert!(log.stall.is_none(), "{label}, crash at {k}");
            assert!(
                log.merged_seq >= acked,
                "{label}, crash at {k}: acknowledged {acked}, recovered {}",
                log.merged_seq
            );
            assert_all_readable(&rec, log.merged_seq);
            assert_eq!(st.index.items, log.merged_seq, "{label}, crash at {k}");
            assert_blocks_accounted(&rec);
            // Still growing after recovery.
            let mut w2 = LogWriter::open(&rec, 2, 0).expect("open after recovery");
            for i in 0..40 {
                w2.put(format!("after-{i}").as_bytes(), b"x");
            }
            w2.flush(&rec).expect("flush after recovery");
            rec.merge_all(w2.log_id, &mut Scratch::default())
                .expect("merge after recovery");
            assert_eq!(rec.get(b"after-39"), Some(b"x".to_vec()), "{label}, {k}");
            assert_blocks_accounted(&rec);
        }
    }
}
