//! Indirect cells on the memory node: a replicated key's entries stay out of the index and
//! their blocks out of reuse while its cell is active; freeing the cell installs what it
//! names; recovery rebuilds the active cells; bad requests change nothing.

use dinomo_hw::shadow::ShadowRegion;
use dinomo_shared::block::BLOCK_HEADER_SIZE;
use dinomo_shared::entry::{self, Op};
use dinomo_shared::index::EntryRef;
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::ErrorCode;
use dpm_fw::testkit::{fresh, reopen, LogWriter, TestDpm};
use dpm_fw::{Dpm, Scratch};

const REGION_ID: u64 = 13;
const HOT: &[u8] = b"hot-key";

/// Appends one entry and makes it durable, as a KN's write does; returns its ref.
fn write(w: &mut LogWriter, dpm: &TestDpm, op: Op, key: &[u8], value: &[u8]) -> EntryRef {
    let (block, offset) = (w.block, w.offset);
    match op {
        Op::Put => w.put(key, value),
        Op::Delete => w.delete(key),
    }
    w.flush(dpm).expect("flush");
    let at = if w.block == block {
        dpm.geometry().block_off(block) + offset
    } else {
        dpm.geometry().block_off(w.block) + BLOCK_HEADER_SIZE
    };
    EntryRef::new(at, entry::padded_len(key.len(), value.len()) as u64).expect("ref")
}

/// A KN's CAS of the cell from `old` to `new`.
fn cas_cell(dpm: &TestDpm, cell: u32, old: EntryRef, new: EntryRef) {
    let off = dpm.geometry().indirect_off(cell as u64);
    assert_eq!(dpm.pmem().cas_u64(off, old.0, new.0), Ok(old.0));
    dpm.pmem().persist(off, 8);
}

/// The key and value of the entry `r` names, if it is still intact.
fn entry_at(dpm: &TestDpm, r: EntryRef) -> Option<(Vec<u8>, Vec<u8>)> {
    let block = dpm.geometry().block_of(r.offset())?;
    let hdr: dinomo_shared::block::BlockHeader =
        dpm.pmem().read_pod(dpm.geometry().block_off(block));
    let mut buf = vec![0u8; r.len() as usize];
    dpm.pmem().read(r.offset(), &mut buf);
    let e = entry::decode(&buf, hdr.salt).ok()?;
    Some((e.key.to_vec(), e.value.to_vec()))
}

fn alloc(dpm: &TestDpm, w: &LogWriter, eref: EntryRef) -> Result<Response, ErrorCode> {
    let req = Request::AllocCell {
        log_id: w.log_id,
        generation: w.generation,
        eref: eref.0,
    };
    dpm.execute(req, &mut Scratch::default())
}

fn free(dpm: &TestDpm, cell: u32) -> Result<Response, ErrorCode> {
    dpm.execute(Request::FreeCell { cell }, &mut Scratch::default())
}

fn passes(dpm: &TestDpm) {
    let mut s = Scratch::default();
    for _ in 0..3 {
        dpm.merge_pass(0, 1, u64::MAX, &mut s);
    }
}

/// Every live count is an index ref, plus the pins of active cells.
fn assert_live_accounting(dpm: &TestDpm) {
    let st = dpm.stats();
    let pins: u64 = st.cells.iter().map(|c| c.pinned_entries).sum();
    assert_eq!(st.live_entries, st.index.items + pins);
}

/// Overwrites a few other keys through `w` for `blocks` blocks' worth, merging as it goes.
fn churn(dpm: &TestDpm, w: &mut LogWriter, tag: &str, blocks: u64) {
    let mut s = Scratch::default();
    let bytes = blocks * dpm.geometry().block_size;
    let mut written = 0;
    let mut round = 0u64;
    while written < bytes {
        for i in 0..8 {
            let k = format!("{tag}-{i}");
            w.put(k.as_bytes(), &[round as u8; 300]);
            written += entry::padded_len(k.len(), 300) as u64;
        }
        w.flush(dpm).expect("churn must not fill the region");
        dpm.merge_all(w.log_id, &mut s).expect("merge");
        round += 1;
    }
}

/// An owner log with the hot key at v0 (not merged yet) and a cell allocated for it.
fn allocated(dpm: &TestDpm) -> (LogWriter, EntryRef, u32) {
    let mut owner = LogWriter::open(dpm, 1, 0).expect("open");
    let r0 = write(&mut owner, dpm, Op::Put, HOT, b"v0");
    write(&mut owner, dpm, Op::Put, b"cold", b"c");
    let Ok(Response::CellAllocated { cell, eref }) = alloc(dpm, &owner, r0) else {
        panic!("allocation refused");
    };
    // The owner's log was merged first: the index's ref is the cell's.
    assert_eq!(eref, r0.0);
    assert_eq!(dpm.lookup(HOT), Some(r0));
    assert_eq!(dpm.get(b"cold").as_deref(), Some(&b"c"[..]));
    assert_eq!(dpm.cell_ref(cell), Some(r0));
    (owner, r0, cell)
}

#[test]
fn replica_writes_stay_out_of_the_index_and_free_installs_the_cell() {
    let (_r, dpm) = fresh(REGION_ID);
    let (mut owner, r0, cell) = allocated(&dpm);
    // The same key again: the same cell.
    assert_eq!(
        alloc(&dpm, &owner, r0),
        Ok(Response::CellAllocated { cell, eref: r0.0 })
    );
    let mut a = LogWriter::open(&dpm, 2, 0).expect("open");
    let mut b = LogWriter::open(&dpm, 3, 0).expect("open");
    let ra = write(&mut a, &dpm, Op::Put, HOT, b"va");
    cas_cell(&dpm, cell, r0, ra);
    let rb = write(&mut b, &dpm, Op::Put, HOT, b"vb");
    cas_cell(&dpm, cell, ra, rb);
    passes(&dpm);
    assert_eq!(dpm.lookup(HOT), Some(r0), "the index is untouched");
    assert_eq!(dpm.get(HOT).as_deref(), Some(&b"v0"[..]));
    assert_eq!(dpm.cell_ref(cell), Some(rb));
    let st = dpm.stats();
    assert_eq!(st.cells.len(), 1);
    assert_eq!((st.cells[0].cell, st.cells[0].eref), (cell, rb));
    assert_eq!(st.cells[0].key, HOT);
    assert_eq!(st.cells[0].pinned_entries, 2);
    assert_live_accounting(&dpm);
    // Both logs move on for many blocks: their old blocks are reclaimed and reused, all
    // but the ones holding the pinned entries.
    churn(&dpm, &mut a, "a", 40);
    churn(&dpm, &mut b, "b", 40);
    churn(&dpm, &mut owner, "o", 40);
    assert!(
        dpm.stats().blocks_used < 30,
        "dead blocks are reused ({} used)",
        dpm.stats().blocks_used
    );
    assert_eq!(entry_at(&dpm, ra), Some((HOT.to_vec(), b"va".to_vec())));
    assert_eq!(entry_at(&dpm, rb), Some((HOT.to_vec(), b"vb".to_vec())));
    assert_live_accounting(&dpm);
    // Free: the cell's entry goes to the index, the pins go.
    assert_eq!(free(&dpm, cell), Ok(Response::CellFreed { eref: rb.0 }));
    assert_eq!(dpm.lookup(HOT), Some(rb));
    assert_eq!(dpm.get(HOT).as_deref(), Some(&b"vb"[..]));
    assert_eq!(dpm.cell_ref(cell), None);
    assert_eq!(
        dpm.pmem()
            .load_u64(dpm.geometry().indirect_off(cell as u64)),
        0
    );
    assert!(dpm.stats().cells.is_empty());
    assert_live_accounting(&dpm);
    assert_eq!(free(&dpm, cell), Err(ErrorCode::NoSuchCell));
    // The key merges into the index again.
    write(&mut a, &dpm, Op::Put, HOT, b"after");
    passes(&dpm);
    assert_eq!(dpm.get(HOT).as_deref(), Some(&b"after"[..]));
}

#[test]
fn a_cell_naming_a_delete_removes_the_key_when_freed() {
    let (_r, dpm) = fresh(REGION_ID);
    let (_owner, r0, cell) = allocated(&dpm);
    let mut a = LogWriter::open(&dpm, 2, 0).expect("open");
    let rd = write(&mut a, &dpm, Op::Delete, HOT, b"");
    cas_cell(&dpm, cell, r0, rd);
    passes(&dpm);
    assert_eq!(dpm.lookup(HOT), Some(r0));
    assert_eq!(free(&dpm, cell), Ok(Response::CellFreed { eref: 0 }));
    assert_eq!(dpm.lookup(HOT), None);
    assert_live_accounting(&dpm);
}

#[test]
fn a_key_without_an_index_entry_gets_a_cell_naming_its_delete() {
    let (_r, dpm) = fresh(REGION_ID);
    let mut owner = LogWriter::open(&dpm, 1, 0).expect("open");
    write(&mut owner, &dpm, Op::Put, HOT, b"v0");
    let rd = write(&mut owner, &dpm, Op::Delete, HOT, b"");
    let Ok(Response::CellAllocated { cell, eref }) = alloc(&dpm, &owner, rd) else {
        panic!("allocation refused");
    };
    assert_eq!(eref, rd.0);
    assert_eq!(dpm.lookup(HOT), None);
    // The delete's block is pinned: the owner moving on does not reclaim it.
    churn(&dpm, &mut owner, "o", 20);
    assert_eq!(entry_at(&dpm, rd), Some((HOT.to_vec(), Vec::new())));
    assert_live_accounting(&dpm);
    assert_eq!(free(&dpm, cell), Ok(Response::CellFreed { eref: 0 }));
    assert_live_accounting(&dpm);
}

#[test]
fn recovery_rebuilds_active_cells() {
    let (r, dpm) = fresh(REGION_ID);
    let (owner, r0, cell) = allocated(&dpm);
    let mut a = LogWriter::open(&dpm, 2, 0).expect("open");
    let ra = write(&mut a, &dpm, Op::Put, HOT, b"va");
    cas_cell(&dpm, cell, r0, ra);
    passes(&dpm);
    // Written and swapped in, not merged: recovery merges it, and must keep it out.
    let rb = write(&mut a, &dpm, Op::Put, HOT, b"vb");
    cas_cell(&dpm, cell, ra, rb);
    drop(dpm);
    let (_r2, dpm2) = reopen(&r);
    assert_eq!(dpm2.cell_ref(cell), Some(rb));
    assert_eq!(dpm2.lookup(HOT), Some(r0), "recovery left the index alone");
    assert_eq!(dpm2.stats().cells[0].key, HOT);
    assert_live_accounting(&dpm2);
    // The table is rebuilt: the key gets its cell again.
    assert_eq!(
        alloc(&dpm2, &owner, r0),
        Ok(Response::CellAllocated { cell, eref: rb.0 })
    );
    let rc = write(&mut a, &dpm2, Op::Put, HOT, b"vc");
    cas_cell(&dpm2, cell, rb, rc);
    churn(&dpm2, &mut a, "a", 20);
    assert_eq!(dpm2.lookup(HOT), Some(r0));
    assert_eq!(entry_at(&dpm2, rc), Some((HOT.to_vec(), b"vc".to_vec())));
    assert_eq!(free(&dpm2, cell), Ok(Response::CellFreed { eref: rc.0 }));
    assert_eq!(dpm2.get(HOT).as_deref(), Some(&b"vc"[..]));
    assert_live_accounting(&dpm2);
}

#[test]
fn bad_cells_and_bad_entry_refs_change_nothing() {
    let (r, dpm) = fresh(REGION_ID);
    let mut owner = LogWriter::open(&dpm, 1, 0).expect("open");
    let mut other = LogWriter::open(&dpm, 2, 0).expect("open");
    let r0 = write(&mut owner, &dpm, Op::Put, HOT, b"v0");
    let theirs = write(&mut other, &dpm, Op::Put, b"x", b"y");
    let cells = dpm.geometry().indirect_cells() as u32;
    for cell in [0, 3, cells - 1, cells, u32::MAX] {
        assert_eq!(free(&dpm, cell), Err(ErrorCode::NoSuchCell), "cell {cell}");
    }
    let index_area = EntryRef::new(dpm.geometry().index_off, r0.len()).expect("ref");
    let bad = [
        EntryRef(0),
        index_area,
        EntryRef::new(r0.offset(), r0.len() + 8).expect("ref"),
        EntryRef::new(r0.offset(), r0.len() - 8).expect("ref"),
        EntryRef::new(r0.offset() + 8, r0.len()).expect("ref"),
        EntryRef::new(r0.offset() + 4, r0.len()).expect("ref"),
        // A valid entry, but of another log.
        theirs,
        EntryRef(u64::MAX),
    ];
    for eref in bad {
        assert_eq!(
            alloc(&dpm, &owner, eref),
            Err(ErrorCode::InvalidArgument),
            "{eref:?}"
        );
    }
    let stale = Request::AllocCell {
        log_id: owner.log_id,
        generation: owner.generation + 1,
        eref: r0.0,
    };
    assert_eq!(
        dpm.execute(stale, &mut Scratch::default()),
        Err(ErrorCode::NoSuchLog)
    );
    let no_log = Request::AllocCell {
        log_id: 7,
        generation: 1,
        eref: r0.0,
    };
    assert_eq!(
        dpm.execute(no_log, &mut Scratch::default()),
        Err(ErrorCode::NoSuchLog)
    );
    // Nothing changed: no cell, nothing merged, the cells area still zero.
    let st = dpm.stats();
    assert!(st.cells.is_empty());
    assert!(st.logs.iter().all(|l| l.merged_seq == 0));
    assert!((0..cells).all(|c| dpm.cell_ref(c).is_none()));
    let mut area = vec![0u8; dpm.geometry().indirect_len as usize];
    dpm.pmem().read(dpm.geometry().indirect_off, &mut area);
    assert!(area.iter().all(|&b| b == 0));
    assert_eq!(dpm.lookup(HOT), None);
    // A cell naming garbage (a KN's bad CAS) makes the region refuse to open rather than
    // guess which key it replicates.
    let off = dpm.geometry().indirect_off(5);
    dpm.pmem().store_u64(off, r0.0 + 8);
    dpm.pmem().persist(off, 8);
    let r2 = ShadowRegion::from_image(&r.durable_image());
    let err = Dpm::open(r2.pmem()).expect_err("a corrupt cell");
    assert!(err.to_string().contains("indirect cell 5"), "{err}");
}

#[test]
fn cells_run_out_with_no_free_cell() {
    let (_r, dpm) = fresh(REGION_ID);
    let cells = dpm.geometry().indirect_cells();
    let mut owner = LogWriter::open(&dpm, 1, 0).expect("open");
    let mut s = Scratch::default();
    let mut first = None;
    for i in 0..cells {
        let r = write(&mut owner, &dpm, Op::Put, format!("k{i}").as_bytes(), b"v");
        first.get_or_insert(r);
        let Ok(Response::CellAllocated { cell, .. }) = alloc(&dpm, &owner, r) else {
            panic!("cell {i} refused");
        };
        assert_eq!(cell as u64, i, "the lowest free cell is taken");
    }
    let last = write(&mut owner, &dpm, Op::Put, b"one-too-many", b"v");
    assert_eq!(alloc(&dpm, &owner, last), Err(ErrorCode::NoFreeCell));
    // An active key still gets its cell.
    let first = first.expect("at least one cell");
    assert_eq!(
        alloc(&dpm, &owner, first),
        Ok(Response::CellAllocated {
            cell: 0,
            eref: first.0
        })
    );
    assert_eq!(
        free(&dpm, 7),
        Ok(Response::CellFreed {
            eref: dpm.lookup(b"k7").expect("k7").0
        })
    );
    assert_eq!(
        alloc(&dpm, &owner, last).map(|r| matches!(r, Response::CellAllocated { cell: 7, .. })),
        Ok(true)
    );
    dpm.merge_all(owner.log_id, &mut s).expect("merge");
    assert_live_accounting(&dpm);
}

/// Allocates a cell for the hot key, swaps in a replica's write, merges, frees the cell.
/// Returns the refs of the two versions; `done` is set once FreeCell has answered.
fn cell_script(dpm: &TestDpm, refs: &mut Vec<EntryRef>, done: &mut bool) {
    let mut owner = LogWriter::open(dpm, 1, 0).expect("open");
    let mut replica = LogWriter::open(dpm, 2, 0).expect("open");
    let r0 = write(&mut owner, dpm, Op::Put, HOT, b"v0");
    refs.push(r0);
    let Ok(Response::CellAllocated { cell, .. }) = alloc(dpm, &owner, r0) else {
        panic!("allocation refused");
    };
    assert_eq!(cell, 0);
    let r1 = write(&mut replica, dpm, Op::Put, HOT, b"v1");
    refs.push(r1);
    cas_cell(dpm, cell, r0, r1);
    passes(dpm);
    assert_eq!(free(dpm, cell), Ok(Response::CellFreed { eref: r1.0 }));
    *done = true;
}

#[test]
fn power_failure_at_every_persist_point_of_a_cells_lifetime() {
    let (r, dpm) = fresh(REGION_ID);
    let base = r.fences();
    cell_script(&dpm, &mut Vec::new(), &mut false);
    let total = r.fences() - base;
    for k in 0..=total {
        let (r, dpm) = fresh(REGION_ID);
        r.set_crash_after(Some(k));
        let (mut refs, mut done) = (Vec::new(), false);
        let res =
            dinomo_hw::shadow::catch_power_failure(|| cell_script(&dpm, &mut refs, &mut done));
        assert_eq!(res.is_ok(), k == total, "crash at {k}");
        drop(dpm);
        let (_r2, rec) = reopen(&r);
        assert_live_accounting(&rec);
        let index = rec.lookup(HOT);
        match rec.cell_ref(0) {
            // Active: it names a version, and the index holds one (the old one, or the
            // cell's own if the free was cut short after installing it).
            Some(c) => {
                assert!(refs.contains(&c), "crash at {k}: cell names {c:?}");
                assert!(index.is_some_and(|i| refs.contains(&i)), "crash at {k}");
                assert_eq!(free(&rec, 0), Ok(Response::CellFreed { eref: c.0 }));
                assert_eq!(rec.lookup(HOT), Some(c));
                assert_live_accounting(&rec);
            }
            // Never allocated, or freed: the index holds the newest version that was
            // merged (an answered FreeCell installed the replica's).
            None => {
                assert!(index.is_none() || index.is_some_and(|i| refs.contains(&i)));
                if done {
                    assert_eq!(index, refs.get(1).copied(), "crash at {k}");
                }
            }
        }
        assert!(rec.stats().cells.is_empty());
    }
}
