//! Opening a region whose bytes have been damaged: `region::read_geometry` and `Dpm::open`.
//!
//! A small region is formatted once and filled through the control path: a merged log, a
//! log with unmerged entries over several sealed blocks, an open log with a torn tail, a
//! delete and an indirect cell. Each input is a list of patches applied to a copy of that
//! image, each aimed at one area (superblock, superblock state, control area, index,
//! indirect cells, a block header, the log area), so the fuzzer gets past the magic and
//! checksum checks and reaches the recovery code. A patched superblock is resealed unless
//! the patch says otherwise. The damaged image must open or be refused with an error; an
//! opened region must then serve lookups, stats and merge passes.
//!
//! Patch format: `[area: u8][offset: u16 LE][len: u8][len bytes]`, repeated; offsets wrap
//! within the area. Area `0x80 | a` patches area `a` without resealing the superblock.
#![no_main]

use std::sync::{Arc, OnceLock};

use dinomo_hw::heap::HeapRegion;
use dinomo_hw::NoPersist;
use dinomo_shared::block::BLOCK_HEADER_SIZE;
use dinomo_shared::geometry::{FormatParams, Geometry};
use dinomo_shared::msg::{Frame, Request};
use dinomo_shared::pod::Pod;
use dinomo_shared::superblock::{Superblock, SUPERBLOCK_AREA};
use dpm_fw::testkit::LogWriter;
use dpm_fw::{region, Dpm, Scratch};
use libfuzzer_sys::fuzz_target;

const REGION: u64 = 192 << 10;

struct Base {
    image: Vec<u8>,
    geo: Geometry,
}

fn params() -> FormatParams {
    FormatParams {
        block_size: 4096,
        max_logs: 4,
        max_kns: 2,
        index_percent: 1,
        indirect_cells: 16,
        ..FormatParams::for_size(REGION)
    }
}

fn key(log: u32, i: u32) -> Vec<u8> {
    format!("k{log}-{i}").into_bytes()
}

fn build_base() -> Base {
    let mem = HeapRegion::new(REGION);
    let dpm = Dpm::format(mem.pmem(NoPersist), &params(), 7).expect("format the base region");
    let mut s = Scratch::default();
    // Log 0: merged into the index, one key replicated through an indirect cell.
    let mut merged = LogWriter::open(&dpm, 1, 0).expect("open log");
    for i in 0..24 {
        merged.put(&key(0, i), &[b'a'; 40]);
    }
    merged.delete(&key(0, 3));
    merged.flush(&dpm).expect("flush");
    dpm.merge_all(merged.log_id, &mut s).expect("merge");
    if let Some(r) = dpm.lookup(&key(0, 5)) {
        let req = Request::AllocCell {
            log_id: merged.log_id,
            generation: merged.generation,
            eref: r.0,
        };
        dpm.execute(req, &mut s).expect("alloc cell");
    }
    // Log 1: unmerged entries across sealed blocks.
    let mut unmerged = LogWriter::open(&dpm, 2, 0).expect("open log");
    for i in 0..60 {
        unmerged.put(&key(1, i), &[b'b'; 100]);
    }
    unmerged.flush(&dpm).expect("flush");
    // Log 2: an open block whose last batch was torn.
    let mut torn = LogWriter::open(&dpm, 2, 1).expect("open log");
    for i in 0..6 {
        torn.put(&key(2, i), b"v");
    }
    torn.flush(&dpm).expect("flush");
    for i in 6..9 {
        torn.put(&key(2, i), b"w");
    }
    torn.flush_with(&dpm, Some(50)).expect("torn flush");
    let mut image = vec![0u8; REGION as usize];
    dpm.pmem().read(0, &mut image);
    Base {
        image,
        geo: *dpm.geometry(),
    }
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(build_base)
}

/// The byte range patch area `area` covers.
fn area(geo: &Geometry, area: u8, offset: u16) -> (usize, usize) {
    let blocks = geo.n_blocks.max(1);
    let (start, len) = match area % 7 {
        0 => (0, core::mem::size_of::<Superblock>() as u64),
        1 => (0, SUPERBLOCK_AREA),
        2 => (geo.control_off, geo.control_len),
        3 => (geo.index_off, geo.index_len),
        4 => (geo.indirect_off, geo.indirect_len),
        5 => {
            let b = (u64::from(offset) >> 6) % blocks;
            (geo.block_off(b as u32), BLOCK_HEADER_SIZE)
        }
        _ => (geo.log_off, geo.n_blocks * geo.block_size),
    };
    (start as usize, len.max(1) as usize)
}

fn apply(image: &mut [u8], geo: &Geometry, mut input: &[u8]) {
    let mut reseal = true;
    while input.len() >= 4 {
        let sel = input[0];
        let offset = u16::from_le_bytes([input[1], input[2]]);
        let n = input[3] as usize;
        let data = &input[4..input.len().min(4 + n)];
        input = &input[4 + data.len()..];
        reseal &= sel & 0x80 == 0;
        let (start, len) = area(geo, sel & 0x7F, offset);
        let at = start + usize::from(offset) % len;
        let end = (start + len).min(image.len());
        if at < end {
            let n = data.len().min(end - at);
            image[at..at + n].copy_from_slice(&data[..n]);
        }
    }
    if reseal {
        if let Some(mut sb) = Superblock::read_from(image) {
            sb.seal();
            image[..core::mem::size_of::<Superblock>()].copy_from_slice(sb.as_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let mut image = base.image.clone();
    apply(&mut image, &base.geo, data);

    let mem: Arc<HeapRegion> = HeapRegion::new(REGION);
    let pm = mem.pmem(NoPersist);
    pm.write(0, &image);

    if region::read_geometry(&pm).is_err() {
        assert!(Dpm::open(pm).is_err(), "open must refuse a bad superblock");
        return;
    }
    let Ok(dpm) = Dpm::open(pm) else {
        return;
    };
    for log in 0..3 {
        for i in [0, 3, 5, 7, 59] {
            let _ = dpm.get(&key(log, i));
        }
    }
    let _ = dpm.stats();
    let mut s = Scratch::default();
    dpm.merge_pass(0, 1, 1024, &mut s);
    let _ = dpm.handle(&Frame::default(), &mut s);
    let _ = dpm.execute(Request::FenceKn { kn_id: 2 }, &mut s);
    let _ = dpm.stats();
});
