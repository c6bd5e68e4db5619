//! A block request repeated because its reply was lost (the DPM restarted in between) gets
//! the block granted the first time, so the log's chain never holds an empty block before
//! the one its writer fills; requests that do not name the log's tail are refused.

use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE};
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::ErrorCode;
use dpm_fw::testkit::{fresh, reopen, LogWriter, TestDpm};
use dpm_fw::Scratch;

fn alloc(dpm: &TestDpm, w: &LogWriter, last_block: u32) -> Result<(u32, u32), ErrorCode> {
    let req = Request::AllocBlock {
        log_id: w.log_id,
        generation: w.generation,
        next_seq: w.next_seq,
        last_block,
    };
    match dpm.execute(req, &mut Scratch::default())? {
        Response::BlockGranted { block, salt } => Ok((block, salt)),
        r => panic!("unexpected reply {r:?}"),
    }
}

#[test]
fn a_repeated_block_request_gets_the_same_block() {
    let (r, dpm) = fresh(21);
    let mut w = LogWriter::open(&dpm, 1, 0).expect("open log");
    for i in 0..10u32 {
        w.put(format!("k{i}").as_bytes(), b"before");
    }
    w.flush(&dpm).expect("flush");

    let granted = alloc(&dpm, &w, w.block).expect("first request");
    assert_ne!(granted.0, w.block);
    // The reply was lost; the DPM restarts (recovers from what was made durable).
    drop(dpm);
    let (r2, dpm) = reopen(&r);
    assert_eq!(
        alloc(&dpm, &w, w.block),
        Ok(granted),
        "a retry gets the block granted the first time"
    );
    // A request that names a block that is not the tail, or a retry whose first-entry seq
    // differs, is refused without linking anything.
    let mut other = LogWriter::open(&dpm, 2, 0).expect("another log");
    let blocks_free = dpm.stats().blocks_free;
    assert_eq!(
        alloc(&dpm, &other, w.block),
        Err(ErrorCode::InvalidArgument),
        "the block of another log"
    );
    w.next_seq += 1;
    assert_eq!(
        alloc(&dpm, &w, w.block),
        Err(ErrorCode::InvalidArgument),
        "a different request after the same block"
    );
    w.next_seq -= 1;
    assert_eq!(dpm.stats().blocks_free, blocks_free, "nothing was taken");

    // The writer moves to the granted block and fills on: the chain has no gap, so
    // everything merges, also after another restart.
    let before = w.block;
    let seal = dpm.geometry().block_off(before) + BlockHeader::SEALED_LEN_OFFSET;
    dpm.pmem().store_u32(seal, w.offset as u32);
    dpm.pmem().persist(seal, 4);
    (w.block, w.salt) = granted;
    w.offset = BLOCK_HEADER_SIZE;
    for i in 0..300u32 {
        w.put(
            format!("k{}", i % 40).as_bytes(),
            format!("after {i}").as_bytes(),
        );
    }
    let acked = w
        .flush(&dpm)
        .expect("flush into the granted block and beyond");
    let mut s = Scratch::default();
    assert_eq!(dpm.merge_all(w.log_id, &mut s), Ok(acked));
    for i in 260..300u32 {
        assert_eq!(
            dpm.get(format!("k{}", i % 40).as_bytes()),
            Some(format!("after {i}").into_bytes())
        );
    }
    other.put(b"x", b"y");
    other.flush(&dpm).expect("the other log still works");
    drop(dpm);
    let (_r3, dpm) = reopen(&r2);
    let log = dpm
        .stats()
        .logs
        .into_iter()
        .find(|l| l.log_id == w.log_id)
        .expect("the log");
    assert_eq!((log.merged_seq, log.tail_seq), (acked, acked));
    assert_eq!(dpm.get(b"k0"), Some(b"after 280".to_vec()));
}
