//! Quarantine: blocks of a log closed by fencing its KN are not reused until the quarantine
//! has passed on the DPM's clock; blocks of a log its writer closed are reused at once.

use std::sync::Arc;

use dinomo_shared::msg::{Request, Response};
use dinomo_shared::ErrorCode;
use dpm_fw::testkit::{fresh, reopen, LogWriter, TestDpm};
use dpm_fw::{LogStats, Scratch, DEFAULT_QUARANTINE_MS};

const REGION_ID: u64 = 12;

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:04}").into_bytes()
}

fn log_of(dpm: &TestDpm, log_id: u32) -> Option<LogStats> {
    dpm.stats().logs.into_iter().find(|l| l.log_id == log_id)
}

fn pass(dpm: &TestDpm) {
    dpm.merge_pass(0, 1, 256, &mut Scratch::default());
}

/// KN 3 writes 60 keys over several blocks; KN 4 then deletes them all, so every block of
/// KN 3's log is dead. Returns KN 3's writer.
fn dead_log(dpm: &TestDpm) -> LogWriter {
    let mut s = Scratch::default();
    let mut a = LogWriter::open(dpm, 3, 0).expect("open");
    let mut b = LogWriter::open(dpm, 4, 0).expect("open");
    for i in 0..60 {
        a.put(&key(i), &[1u8; 200]);
    }
    a.flush(dpm).expect("flush");
    dpm.merge_all(a.log_id, &mut s).expect("merge");
    for i in 0..60 {
        b.delete(&key(i));
    }
    b.flush(dpm).expect("flush");
    dpm.merge_all(b.log_id, &mut s).expect("merge");
    a
}

#[test]
fn blocks_of_a_fenced_log_wait_out_the_quarantine() {
    let (_r, dpm) = fresh(REGION_ID);
    assert_eq!(dpm.quarantine_ms(), DEFAULT_QUARANTINE_MS);
    dpm.tick(1_000);
    let mut s = Scratch::default();
    let a = dead_log(&dpm);
    let free_before = dpm.stats().blocks_free;
    assert_eq!(
        dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s),
        Ok(Response::Fenced {
            logs: 1,
            entries: 0
        })
    );
    let log = log_of(&dpm, a.log_id).expect("the fenced log keeps its blocks");
    assert!(log.quarantined);
    assert!(log.blocks >= 3, "{} blocks", log.blocks);
    // The quarantine counts from the fence (clock 1 000), not from 0.
    for now in [1_000, 5_000, 1_000 + DEFAULT_QUARANTINE_MS - 1] {
        dpm.tick(now);
        pass(&dpm);
        dpm.reclaim_all();
        assert_eq!(dpm.stats().blocks_free, free_before, "clock {now}");
        assert!(log_of(&dpm, a.log_id).is_some_and(|l| l.quarantined));
    }
    dpm.tick(1_000 + DEFAULT_QUARANTINE_MS);
    pass(&dpm);
    assert!(
        log_of(&dpm, a.log_id).is_none(),
        "a dead log leaves after its quarantine"
    );
    assert_eq!(dpm.stats().blocks_free, free_before + log.blocks);
}

#[test]
fn blocks_of_a_log_its_writer_closed_are_reused_at_once() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut s = Scratch::default();
    let a = dead_log(&dpm);
    let blocks = log_of(&dpm, a.log_id).expect("log").blocks;
    let free_before = dpm.stats().blocks_free;
    let close = Request::CloseLog {
        log_id: a.log_id,
        generation: a.generation,
    };
    dpm.execute(close, &mut s).expect("close");
    assert!(log_of(&dpm, a.log_id).is_none());
    assert_eq!(dpm.stats().blocks_free, free_before + blocks);
}

#[test]
fn quarantine_survives_a_restart() {
    let (r, dpm) = fresh(REGION_ID);
    dpm.set_quarantine_ms(500);
    let a = dead_log(&dpm);
    dpm.execute(Request::FenceKn { kn_id: 3 }, &mut Scratch::default())
        .expect("fence");
    let (_r2, dpm2) = reopen(&r);
    dpm2.set_quarantine_ms(500);
    // The clock of the reopened region starts at 0: the quarantine starts over.
    pass(&dpm2);
    assert!(log_of(&dpm2, a.log_id).is_some_and(|l| l.quarantined));
    dpm2.tick(499);
    pass(&dpm2);
    assert!(log_of(&dpm2, a.log_id).is_some());
    dpm2.tick(500);
    pass(&dpm2);
    assert!(log_of(&dpm2, a.log_id).is_none());
}

#[test]
fn region_full_while_only_quarantined_blocks_remain() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut s = Scratch::default();
    // KN 4's log exists first, so it has a block with room for the deletes below.
    let mut b = LogWriter::open(&dpm, 4, 0).expect("open");
    let mut a = LogWriter::open(&dpm, 3, 0).expect("open");
    // KN 3 fills the region with one entry per block (merged as it goes: unmerged blocks
    // keep room in reserve for the index).
    let value = [9u8; 3_900];
    let err = loop {
        a.put(&key(a.next_seq), &value);
        if let Err(e) = a.flush(&dpm) {
            break e;
        }
        dpm.merge_all(a.log_id, &mut s).expect("merge");
    };
    assert_eq!(err, ErrorCode::RegionFull);
    let written = a.durable_seq;
    assert!(written > 100, "{written} entries");
    dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s)
        .expect("fence");
    // KN 4 deletes 100 of them: their blocks are dead, but quarantined.
    for i in 1..=100 {
        b.delete(&key(i));
    }
    b.flush(&dpm).expect("the deletes fit KN 4's first block");
    dpm.merge_all(b.log_id, &mut s).expect("merge");
    assert_eq!(dpm.get(&key(1)), None);
    pass(&dpm);
    // The fence released the room kept for KN 3's unmerged blocks: KN 4 gets a few of
    // those blocks, and then only the blocks reserved for compaction and the index's room
    // for what is granted but unmerged are left (and no block is a victim).
    let mut extra = 0;
    let err = loop {
        match b.next_block(&dpm) {
            Ok(()) => extra += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err, ErrorCode::RegionFull);
    assert!(extra <= 8, "{extra} blocks granted after the fence");
    let room = dpm.room();
    assert!(
        room.free_blocks <= dpm_fw::dpm::COMPACTION_RESERVE + 12,
        "{room:?}"
    );
    assert_eq!(b.next_block(&dpm), Err(ErrorCode::RegionFull));
    // The headroom kept for opening logs lets a replacement KN open its logs, no more.
    let mut opened = Vec::new();
    let err = loop {
        match LogWriter::open(&dpm, 5, opened.len() as u32) {
            Ok(w) => opened.push(w),
            Err(e) => break e,
        }
    };
    assert_eq!(err, ErrorCode::RegionFull);
    assert!(
        opened.len() as u64 <= dpm_fw::dpm::OPEN_HEADROOM_LOGS,
        "{} logs opened",
        opened.len()
    );
    // Past the quarantine the dead blocks come back.
    dpm.tick(DEFAULT_QUARANTINE_MS);
    assert_eq!(b.next_block(&dpm), Ok(()));
    assert_eq!(dpm.get(&key(101)).map(|v| v.len()), Some(value.len()));
    assert!(dpm.stats().blocks_free >= 98);
}

#[test]
fn the_runner_ticks_the_clock_and_applies_the_configured_quarantine() {
    use dinomo_hw::fabric::ControlServer;
    use dpm_fw::runner::{DpmService, ServeConfig};
    use std::time::{Duration, Instant};

    let (_r, dpm) = fresh(REGION_ID);
    let a = dead_log(&dpm);
    let cfg = ServeConfig {
        workers: 1,
        pin: false,
        quarantine: Duration::from_millis(50),
        ..ServeConfig::default()
    };
    assert_eq!(
        ServeConfig::default().quarantine,
        Duration::from_millis(DEFAULT_QUARANTINE_MS)
    );
    let service =
        DpmService::start(Arc::new(dpm), ControlServer::in_memory(4), &cfg).expect("start");
    let dpm = service.dpm();
    assert_eq!(dpm.quarantine_ms(), 50);
    dpm.execute(Request::FenceKn { kn_id: 3 }, &mut Scratch::default())
        .expect("fence");
    // The merge workers free the dead log's blocks once the clock passes the quarantine.
    let deadline = Instant::now() + Duration::from_secs(30);
    while log_of(dpm, a.log_id).is_some() {
        assert!(Instant::now() < deadline, "the quarantine never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dpm.now_ms() >= 50);
    service.stop();
}
