//! Fence points: once a log is closed (by its writer or by fencing its KN), entries its
//! writer lands later are never merged, also after a restart.

use dinomo_shared::control::{LogSlot, LOG_CLOSED};
use dinomo_shared::msg::{Request, Response};
use dpm_fw::testkit::{fresh, reopen, LogWriter, TestDpm};
use dpm_fw::Scratch;

const REGION_ID: u64 = 11;

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:03}").into_bytes()
}

/// Writes what a paused writer would land after its log was closed: valid entries with the
/// next seqs, in its current block. Returns the seq of the last one.
fn paused_writes(w: &mut LogWriter, dpm: &TestDpm) -> u64 {
    let block = w.block;
    w.put(&key(0), b"late");
    w.delete(&key(1));
    w.put(b"late-new", b"x");
    let last = w.flush(dpm).expect("the writes fit the current block");
    assert_eq!(w.block, block, "no new block was needed");
    last
}

/// What must hold after the fence at seq 25: the first writes are merged, none of the late ones.
fn assert_fenced_state(dpm: &TestDpm, log_id: u32) {
    assert_eq!(dpm.get(&key(0)).as_deref(), Some(&b"v2"[..]));
    assert_eq!(dpm.get(&key(1)).as_deref(), Some(&b"v2"[..]));
    assert_eq!(dpm.get(&key(19)).as_deref(), Some(&b"v1"[..]));
    assert_eq!(dpm.get(b"late-new"), None);
    let st = dpm.stats();
    let log = st
        .logs
        .iter()
        .find(|l| l.log_id == log_id)
        .expect("the log holds live entries, so it stays");
    assert_eq!(log.fence_seq, Some(25));
    assert_eq!((log.merged_seq, log.tail_seq), (25, 25));
}

/// 20 puts, then 5 updates: seq 25 is the committed tail.
fn write_first(w: &mut LogWriter, dpm: &TestDpm) {
    for i in 0..20 {
        w.put(&key(i), b"v1");
    }
    w.flush(dpm).expect("flush");
    for i in 0..5 {
        w.put(&key(i), b"v2");
    }
    assert_eq!(w.flush(dpm), Ok(25));
}

fn merge_passes(dpm: &TestDpm) {
    let mut s = Scratch::default();
    for _ in 0..3 {
        dpm.merge_pass(0, 1, 256, &mut s);
    }
}

#[test]
fn fenced_kn_entries_after_the_fence_point_are_never_merged() {
    let (r, dpm) = fresh(REGION_ID);
    let mut s = Scratch::default();
    let mut w = LogWriter::open(&dpm, 3, 0).expect("open");
    let mut other = LogWriter::open(&dpm, 4, 0).expect("open");
    write_first(&mut w, &dpm);
    other.put(b"other", b"o");
    other.flush(&dpm).expect("flush");
    assert_eq!(
        dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s),
        Ok(Response::Fenced {
            logs: 1,
            entries: 25
        })
    );
    assert_eq!(paused_writes(&mut w, &dpm), 28);
    merge_passes(&dpm);
    assert_eq!(dpm.merge_all(w.log_id, &mut s), Ok(25));
    assert_fenced_state(&dpm, w.log_id);
    // The other KN's log is not fenced and keeps merging.
    assert_eq!(dpm.get(b"other").as_deref(), Some(&b"o"[..]));
    let (_r2, dpm2) = reopen(&r);
    assert_fenced_state(&dpm2, w.log_id);
    merge_passes(&dpm2);
    assert_fenced_state(&dpm2, w.log_id);
    assert_eq!(
        dpm2.execute(Request::FenceKn { kn_id: 3 }, &mut s),
        Ok(Response::Fenced {
            logs: 0,
            entries: 0
        }),
        "a fenced log is not fenced again"
    );
}

#[test]
fn a_closed_log_has_a_fence_point_too() {
    let (r, dpm) = fresh(REGION_ID);
    let mut s = Scratch::default();
    let mut w = LogWriter::open(&dpm, 3, 0).expect("open");
    write_first(&mut w, &dpm);
    let close = Request::CloseLog {
        log_id: w.log_id,
        generation: w.generation,
    };
    assert_eq!(
        dpm.execute(close, &mut s),
        Ok(Response::Closed { merged_seq: 25 })
    );
    paused_writes(&mut w, &dpm);
    merge_passes(&dpm);
    assert_fenced_state(&dpm, w.log_id);
    let (_r2, dpm2) = reopen(&r);
    assert_fenced_state(&dpm2, w.log_id);
}

#[test]
fn recovery_fences_a_log_closed_without_a_fence_point() {
    let (r, dpm) = fresh(REGION_ID);
    let mut w = LogWriter::open(&dpm, 3, 0).expect("open");
    write_first(&mut w, &dpm);
    // A close cut short by a crash: the slot says closed, no fence point was persisted.
    let slot_off = dpm.geometry().log_slot_off(w.log_id);
    dpm.pmem().store_u32(slot_off, LOG_CLOSED);
    dpm.pmem().persist(slot_off, 4);
    let slot: LogSlot = dpm.pmem().read_pod(slot_off);
    assert_eq!(slot.fence_seq(), None);
    drop(dpm);
    // Recovery merges the closed log to its tail and fences it there.
    let (r2, dpm2) = reopen(&r);
    let slot: LogSlot = dpm2.pmem().read_pod(slot_off);
    assert_eq!(slot.fence_seq(), Some(25));
    paused_writes(&mut w, &dpm2);
    merge_passes(&dpm2);
    assert_fenced_state(&dpm2, w.log_id);
    let (_r3, dpm3) = reopen(&r2);
    assert_fenced_state(&dpm3, w.log_id);
}

/// A transport that can revoke access (verbs) learns every fenced KN once, in order, and
/// is told when it fell too far behind to see some.
#[test]
fn fenced_kns_are_reported_once_to_a_revoking_transport() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut scratch = Scratch::default();
    let mut cursor = 0;
    let mut seen = Vec::new();
    assert_eq!(dpm.fenced_since(&mut cursor, |kn| seen.push(kn)), 0);
    assert!(seen.is_empty());
    for kn in [3, 1] {
        let r = dpm.execute(Request::FenceKn { kn_id: kn }, &mut scratch);
        assert!(matches!(r, Ok(Response::Fenced { .. })), "{r:?}");
    }
    assert_eq!(dpm.fenced_since(&mut cursor, |kn| seen.push(kn)), 0);
    assert_eq!(seen, [3, 1]);
    assert_eq!(dpm.fenced_since(&mut cursor, |kn| seen.push(kn)), 0);
    assert_eq!(seen, [3, 1], "nothing is reported twice");
    for i in 0..40 {
        let _ = dpm.execute(Request::FenceKn { kn_id: i % 4 }, &mut scratch);
    }
    seen.clear();
    let missed = dpm.fenced_since(&mut cursor, |kn| seen.push(kn));
    assert_eq!(missed, 8);
    assert_eq!(seen.len(), 32);
    assert_eq!(seen.last(), Some(&3));
}
