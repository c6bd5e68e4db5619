//! The DPM-local index: lookups that hit and miss, inserts of fresh keys (resizes included),
//! and updates, over 100k 16-byte keys, without persistence and with real cache-line
//! write-back.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dinomo_hw::{CpuPersist, NoPersist, Persist, Pmem};
use dinomo_shared::entry::{self, Op};
use dinomo_shared::geometry::{FormatParams, Geometry};
use dinomo_shared::index::EntryRef;
use dpm_fw::index::Index;

const KEYS: usize = 100_000;
const REGION: u64 = 64 << 20;

#[repr(C, align(64))]
struct Line([u8; 64]);

/// 64-byte aligned heap memory that a `Pmem` borrows.
struct Heap(Vec<Line>);

impl Heap {
    fn new(len: u64) -> Self {
        Self((0..len.div_ceil(64)).map(|_| Line([0; 64])).collect())
    }
    fn pmem<P: Persist>(&mut self, persist: P) -> Pmem<P> {
        let len = self.0.len() as u64 * 64;
        // SAFETY: the buffer is 64-byte aligned (`Line`), `len` bytes long, never resized,
        // and every `Pmem` made here is dropped before the `Heap` (see `run`).
        unsafe { Pmem::new(self.0.as_mut_ptr().cast(), len, persist) }
    }
}

fn key(i: usize) -> [u8; 16] {
    let mut k = [0u8; 16];
    k.copy_from_slice(format!("k{i:015}").as_bytes());
    k
}

struct Setup {
    geo: Geometry,
    keys: Vec<[u8; 16]>,
    /// Two entries per indexed key (for updates) and one per fresh key.
    refs: Vec<[EntryRef; 2]>,
    fresh: Vec<[u8; 16]>,
    fresh_refs: Vec<EntryRef>,
}

/// Writes the entries of `KEYS` indexed and `KEYS` fresh keys into the log area.
fn write_entries<P: Persist>(pm: &Pmem<P>) -> Setup {
    let mut p = FormatParams::for_size(REGION);
    p.index_percent = 30;
    let geo = match Geometry::compute(&p) {
        Ok(g) => g,
        Err(e) => panic!("geometry: {e}"),
    };
    let mut at = geo.log_off;
    let mut buf = [0u8; 128];
    let mut put = |k: &[u8], v: u64| {
        let n = match entry::encode(&mut buf, 1, Op::Put, 1, v + 1, k, &v.to_le_bytes()) {
            Ok(n) => n,
            Err(e) => panic!("encode: {e}"),
        };
        pm.write(at, &buf[..n]);
        let r = EntryRef::new(at, n as u64).unwrap_or_else(|| panic!("entry ref"));
        at += n as u64;
        r
    };
    let keys: Vec<_> = (0..KEYS).map(key).collect();
    let refs = keys.iter().map(|k| [put(k, 0), put(k, 1)]).collect();
    let fresh: Vec<_> = (KEYS..2 * KEYS).map(key).collect();
    let fresh_refs = fresh.iter().map(|k| put(k, 0)).collect();
    assert!(
        at <= geo.log_off + geo.log_capacity(),
        "entries must fit the log area"
    );
    pm.persist(geo.log_off, at - geo.log_off);
    Setup {
        geo,
        keys,
        refs,
        fresh,
        fresh_refs,
    }
}

fn fresh_index<P: Persist>(pm: &Pmem<P>, geo: &Geometry) -> Index {
    if let Err(e) = Index::format(pm, geo) {
        panic!("format: {e}");
    }
    match Index::open(pm, geo) {
        Ok(i) => i,
        Err(e) => panic!("open: {e}"),
    }
}

fn run<P: Persist>(c: &mut Criterion, name: &str, persist: P) {
    let mut heap = Heap::new(REGION);
    let pm = heap.pmem(persist);
    let s = write_entries(&pm);
    let idx = fresh_index(&pm, &s.geo);
    for (k, r) in s.keys.iter().zip(&s.refs) {
        if let Err(e) = idx.upsert(&pm, k, r[0]) {
            panic!("preload: {e}");
        }
    }

    let mut g = c.benchmark_group(format!("index/{name}"));
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("get_hit", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(idx.get(&pm, &s.keys[i]))
        })
    });
    g.bench_function("get_miss", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(idx.get(&pm, &s.fresh[i]))
        })
    });
    let mut n = 0usize;
    g.bench_function("update", |b| {
        b.iter(|| {
            n += 1;
            let k = n % KEYS;
            let version = (n / KEYS + 1) % 2;
            black_box(idx.upsert(&pm, &s.keys[k], s.refs[k][version]))
        })
    });
    drop(idx);
    // Fresh keys into an index formatted anew for every `KEYS` inserts (not timed), so
    // the figure includes the resizes a growing index goes through.
    g.bench_function("insert", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let idx = fresh_index(&pm, &s.geo);
                let batch = left.min(KEYS);
                let start = Instant::now();
                for (k, r) in s.fresh[..batch].iter().zip(&s.fresh_refs) {
                    black_box(idx.upsert(&pm, k, *r)).ok();
                }
                total += start.elapsed();
                left -= batch;
            }
            total
        })
    });
    g.finish();
    drop(pm);
}

fn index(c: &mut Criterion) {
    run(c, "no_persist", NoPersist);
    run(c, "cpu_persist", CpuPersist::detect());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = index
}
criterion_main!(benches);
