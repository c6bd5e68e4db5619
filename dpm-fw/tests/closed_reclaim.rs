//! A closed log keeps the block its persisted merge progress names while any earlier block
//! of it still holds live entries: unlinking that last block first left the progress
//! pointing outside the chain, and the region would not open again (found by crash
//! torture: `log N is corrupt: progress points outside the chain`).

use dinomo_shared::msg::{Request, Response};
use dpm_fw::testkit::{fresh, open_image, reopen, LogWriter, TestDpm};
use dpm_fw::Scratch;

/// Closes `w`'s log (merged to its tail, which becomes its fence point).
fn close(dpm: &TestDpm, w: &LogWriter) -> Response {
    let req = Request::CloseLog {
        log_id: w.log_id,
        generation: w.generation,
    };
    dpm.execute(req, &mut Scratch::default()).expect("close")
}

/// A log of KN 1 holding `cold` once, then enough updates of `hot` to fill several 4 KiB
/// blocks, flushed and closed; with the seq of its last entry.
fn closed_log_with_a_cold_key(dpm: &TestDpm, cold: &[u8]) -> (LogWriter, u64) {
    let mut a = LogWriter::open(dpm, 1, 0).expect("log a");
    a.put(b"cold", cold);
    for i in 0..120u32 {
        a.put(b"hot", format!("a-{i:04}-{}", "x".repeat(60)).as_bytes());
    }
    let tail = a.flush(dpm).expect("flush a");
    assert_eq!(close(dpm, &a), Response::Closed { merged_seq: tail });
    (a, tail)
}

#[test]
fn a_closed_log_with_live_entries_early_and_a_dead_last_block_reopens() {
    let (r, dpm) = fresh(31);
    let mut s = Scratch::default();
    let (a, _) = closed_log_with_a_cold_key(&dpm, b"written once, early");
    let blocks_of_a = || {
        dpm.stats()
            .logs
            .iter()
            .find(|l| l.log_id == a.log_id)
            .map_or(0, |l| l.blocks)
    };
    assert!(
        blocks_of_a() >= 2,
        "log a keeps its first and its last block"
    );

    // Another log supersedes `hot`: every block of `a` but the first is now dead.
    let mut b = LogWriter::open(&dpm, 2, 0).expect("log b");
    b.put(b"hot", b"b");
    b.flush(&dpm).expect("flush b");
    dpm.merge_all(b.log_id, &mut s).expect("merge b");
    dpm.reclaim_all();
    assert!(blocks_of_a() >= 1, "the block holding `cold` stays");

    for image in [r.durable_image(), r.crash_image(7, 50)] {
        let (_r2, dpm2) = open_image(&image);
        assert_eq!(dpm2.get(b"cold"), Some(b"written once, early".to_vec()));
        assert_eq!(dpm2.get(b"hot"), Some(b"b".to_vec()));
    }
    let _ = reopen(&r);
}

/// A region left by the earlier behaviour (the last block of a closed, fenced log unlinked
/// while an earlier one stays) opens: the log is past its fence point, so its cursor is
/// put at its tail and nothing of it is merged again.
#[test]
fn a_region_with_the_last_block_already_unlinked_is_repaired_at_open() {
    let (r, dpm) = fresh(32);
    let mut s = Scratch::default();
    let (a, _) = closed_log_with_a_cold_key(&dpm, b"early");
    // Unlink the chain's last block by hand, as the earlier reclaim did.
    let geo = *dpm.geometry();
    let head = dpm
        .pmem()
        .load_u32(geo.log_slot_off(a.log_id) + dinomo_shared::control::LogSlot::CHAIN_OFFSET);
    let mut chain = vec![head];
    loop {
        let h: dinomo_shared::block::BlockHeader = dpm
            .pmem()
            .read_pod(geo.block_off(*chain.last().expect("block")));
        if h.next == dinomo_shared::control::NO_BLOCK {
            break;
        }
        chain.push(h.next);
    }
    assert!(chain.len() >= 2, "{chain:?}");
    let before_last = chain[chain.len() - 2];
    let link = geo.block_off(before_last) + dinomo_shared::block::BlockHeader::NEXT_OFFSET;
    dpm.pmem().store_u32(link, dinomo_shared::control::NO_BLOCK);
    dpm.pmem().persist(link, 4);
    drop(dpm);

    let (r2, dpm) = reopen(&r);
    assert_eq!(dpm.get(b"cold"), Some(b"early".to_vec()));
    assert_eq!(
        dpm.get(b"hot").map(|v| v[..6].to_vec()),
        Some(b"a-0119".to_vec())
    );
    let log = dpm
        .stats()
        .logs
        .into_iter()
        .find(|l| l.log_id == a.log_id)
        .expect("the closed log is kept");
    assert_eq!(log.stall, None);
    assert!(log.merged_seq >= log.fence_seq.expect("fenced"));
    // It keeps working: new writes merge, and a restart opens again.
    let mut b = LogWriter::open(&dpm, 2, 0).expect("log b");
    b.put(b"hot", b"b");
    b.flush(&dpm).expect("flush b");
    dpm.merge_all(b.log_id, &mut s).expect("merge b");
    let (_r3, dpm) = reopen(&r2);
    assert_eq!(dpm.get(b"hot"), Some(b"b".to_vec()));
}

/// A closed log gives back the spare block its writer was granted but never wrote, and
/// then, once its last written block is dead, that block and its slot: a KN that leaves or
/// is fenced with a spare in hand left both blocks behind for good before.
#[test]
fn a_closed_log_gives_back_its_unwritten_spare_and_then_everything() {
    let (r, dpm) = fresh(33);
    let mut s = Scratch::default();
    let free_at_start = dpm.stats().blocks_free;
    let mut a = LogWriter::open(&dpm, 1, 0).expect("log a");
    a.put(b"k", b"a");
    a.flush(&dpm).expect("flush a");
    // The spare a KN asks for ahead of need.
    let spare = dpm
        .execute(
            Request::AllocBlock {
                log_id: a.log_id,
                generation: a.generation,
                next_seq: a.next_seq,
                last_block: a.block,
            },
            &mut s,
        )
        .expect("spare");
    assert!(matches!(spare, Response::BlockGranted { .. }));
    close(&dpm, &a);
    dpm.reclaim_all();
    let log_blocks = |dpm: &TestDpm| {
        dpm.stats()
            .logs
            .iter()
            .find(|l| l.log_id == a.log_id)
            .map(|l| l.blocks)
    };
    assert_eq!(
        log_blocks(&dpm),
        Some(1),
        "the unwritten spare is given back"
    );

    // Another log supersedes `k`: the closed log's last block is dead and goes too.
    let mut b = LogWriter::open(&dpm, 2, 0).expect("log b");
    b.put(b"k", b"b");
    b.flush(&dpm).expect("flush b");
    dpm.merge_all(b.log_id, &mut s).expect("merge b");
    dpm.reclaim_all();
    assert_eq!(log_blocks(&dpm), None, "the closed log is gone");
    assert_eq!(
        dpm.stats().blocks_free,
        free_at_start - 1,
        "only log b's block is in use"
    );
    let (_r2, dpm) = reopen(&r);
    assert_eq!(dpm.get(b"k"), Some(b"b".to_vec()));
}
