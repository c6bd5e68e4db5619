//! Reclaiming the blocks of a closed log keeps the block that holds its merge progress
//! while earlier blocks of the log still hold live entries: otherwise the persisted
//! progress points outside the chain and the region cannot be opened again. (Found by
//! `dinomo torture`: a restarted DPM refused its region with "log N is corrupt: progress
//! points outside the chain".)

mod common;

use common::{fresh, reopen};
use dinomo_shared::msg::{Request, Response};
use dpm_fw::testkit::LogWriter;
use dpm_fw::Scratch;

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:04}").into_bytes()
}

#[test]
fn a_fenced_log_with_live_early_blocks_and_a_dead_tail_reopens() {
    let (r, dpm) = fresh(21);
    dpm.set_quarantine_ms(0);
    let mut s = Scratch::default();
    let mut a = LogWriter::open(&dpm, 3, 0).expect("open");
    let mut b = LogWriter::open(&dpm, 4, 0).expect("open");
    // KN 3 writes keys over several blocks; KN 4 then deletes the later ones, so KN 3's
    // first blocks stay live and its last block is dead.
    for i in 0..60 {
        a.put(&key(i), &[1u8; 200]);
    }
    a.flush(&dpm).expect("flush");
    dpm.merge_all(a.log_id, &mut s).expect("merge");
    for i in 40..60 {
        b.delete(&key(i));
    }
    b.flush(&dpm).expect("flush");
    dpm.merge_all(b.log_id, &mut s).expect("merge");
    assert!(matches!(
        dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s),
        Ok(Response::Fenced { .. })
    ));
    dpm.merge_pass(0, 1, 256, &mut s);
    dpm.reclaim_all();
    let (_r2, dpm2) = reopen(&r);
    for i in 0..40 {
        assert_eq!(dpm2.get(&key(i)), Some(vec![1u8; 200]), "key {i}");
    }
    for i in 40..60 {
        assert_eq!(dpm2.get(&key(i)), None, "key {i}");
    }
}
