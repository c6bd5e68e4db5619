//! Merge throughput of the memory node: entries replayed from KN logs into the index per
//! second, with 1 and 2 merge workers, over an in-memory region with real cache-line
//! write-back (CLWB/CLFLUSHOPT + SFENCE, as on persistent memory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dinomo_hw::heap::{HeapPersist, HeapRegion};
use dinomo_hw::CpuPersist;
use dinomo_shared::geometry::FormatParams;
use dpm_fw::testkit::LogWriter;
use dpm_fw::{Dpm, Scratch};

const REGION: u64 = 256 << 20;
const LOGS: u32 = 2;
const ENTRIES_PER_LOG: u64 = 20_000;

/// A region with `LOGS` logs holding `ENTRIES_PER_LOG` unmerged 16 B-key / 128 B-value puts each.
fn loaded() -> Dpm<HeapPersist<CpuPersist>> {
    let r = HeapRegion::new(REGION);
    let params = FormatParams {
        block_size: 1 << 20,
        ..FormatParams::for_size(REGION)
    };
    let dpm = Dpm::format(r.pmem(CpuPersist::detect()), &params, 1).expect("format");
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
    for workers in [1u32, 2] {
        g.bench_function(format!("{workers}_workers"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dpm = Arc::new(loaded());
                    total += merge_with(&dpm, workers);
                    assert_eq!(dpm.stats().index.items, LOGS as u64 * ENTRIES_PER_LOG);
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, merge);
criterion_main!(benches);
