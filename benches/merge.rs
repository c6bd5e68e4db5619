//! Merge throughput of the memory node: entries replayed from KN logs into the index per
//! second, with 1 and 2 merge workers, over an in-memory region with real cache-line
//! write-back (CLWB/CLFLUSHOPT + SFENCE, as on persistent memory); and with 1 worker while
//! an indirect cell is active (every merged entry is checked against the replicated keys).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dinomo_hw::heap::{HeapPersist, HeapRegion};
use dinomo_hw::CpuPersist;
use dinomo_shared::geometry::FormatParams;
use dinomo_shared::index::EntryRef;
use dinomo_shared::msg::{Request, Response};
use dpm_fw::testkit::LogWriter;
use dpm_fw::{Dpm, Scratch};

const REGION: u64 = 256 << 20;
const LOGS: u32 = 2;
const ENTRIES_PER_LOG: u64 = 20_000;

/// A region with `LOGS` logs holding `ENTRIES_PER_LOG` unmerged 16 B-key / 128 B-value puts
/// each; with `cell`, a key of another log is replicated through an indirect cell first.
fn loaded(cell: bool) -> Dpm<HeapPersist<CpuPersist>> {
    let r = HeapRegion::new(REGION);
    let params = FormatParams {
        block_size: 1 << 20,
        ..FormatParams::for_size(REGION)
    };
    let dpm = Dpm::format(r.pmem(CpuPersist::detect()), &params, 1).expect("format");
    if cell {
        let mut w = LogWriter::open(&dpm, LOGS, 0).expect("open log");
        let at = dpm.geometry().block_off(w.block) + w.offset;
        w.put(b"replicated-key", b"v");
        w.flush(&dpm).expect("flush");
        let len = dinomo_shared::entry::padded_len(14, 1) as u64;
        let req = Request::AllocCell {
            log_id: w.log_id,
            generation: w.generation,
            eref: EntryRef::new(at, len).expect("ref").0,
        };
        let resp = dpm.execute(req, &mut Scratch::default());
        assert!(
            matches!(resp, Ok(Response::CellAllocated { .. })),
            "{resp:?}"
        );
    }
    let value = [0x5Au8; 128];
    for l in 0..LOGS {
        let mut w = LogWriter::open(&dpm, l, 0).expect("open log");
        for i in 0..ENTRIES_PER_LOG {
            w.put(format!("log{l}-key-{i:08}").as_bytes(), &value);
            if w.staged() == 64 {
                w.flush(&dpm).expect("flush");
            }
        }
        w.flush(&dpm).expect("flush");
    }
    dpm
}

fn merge_with(dpm: &Arc<Dpm<HeapPersist<CpuPersist>>>, workers: u32) -> Duration {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for w in 0..workers {
            let dpm = Arc::clone(dpm);
            s.spawn(move || {
                let mut scratch = Scratch::default();
                while dpm.merge_pass(w, workers, 256, &mut scratch) > 0 {}
            });
        }
    });
    t0.elapsed()
}

fn merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(LOGS as u64 * ENTRIES_PER_LOG));
    g.sample_size(10);
    for (name, workers, cell) in [
        ("1_workers", 1u32, false),
        ("2_workers", 2, false),
        ("1_workers_cell_active", 1, true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dpm = Arc::new(loaded(cell));
                    total += merge_with(&dpm, workers);
                    let items = LOGS as u64 * ENTRIES_PER_LOG + u64::from(cell);
                    assert_eq!(dpm.stats().index.items, items);
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, merge);
criterion_main!(benches);
