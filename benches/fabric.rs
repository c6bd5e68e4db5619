//! One-sided verbs on the shared-memory fabric, one verb per iteration (post + wait), with
//! no NIC model: the software cost of the fabric itself.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dinomo::hw::fabric::{
    execute, Completion, CompletionStatus, ControlServer, Fabric, NicModel, NicProfile, ShmFabric,
    Verb, WorkRequest,
};
use dinomo::hw::region_file::RegionFile;

const REGION: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

fn run(f: &mut impl Fabric, wrs: &[(u64, WorkRequest)], out: &mut [Completion]) {
    match execute(f, wrs, out, TIMEOUT) {
        Ok(()) if out.iter().all(|c| c.status == CompletionStatus::Success) => {}
        r => panic!("fabric verb failed: {r:?} {out:?}"),
    }
}

fn fabric(c: &mut Criterion) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temporary directory: {e}"),
    };
    let region = match RegionFile::create(&dir.path().join("bench.region"), REGION) {
        Ok(r) => r,
        Err(e) => panic!("region file: {e}"),
    };
    let server = ControlServer::in_memory(1);
    let client = match server.client() {
        Ok(c) => c,
        Err(e) => panic!("control client: {e}"),
    };
    let mut f = ShmFabric::new(
        Arc::new(region.pmem()),
        client,
        NicModel::new(NicProfile::None),
    );
    let buf = match f.alloc_buf(1024) {
        Ok(b) => b,
        Err(e) => panic!("local buffer: {e}"),
    };
    let mut out = [Completion {
        wr_id: 0,
        verb: Verb::Read,
        status: CompletionStatus::Success,
        value: 0,
    }; 2];

    let mut g = c.benchmark_group("shm");
    for len in [64u32, 1024] {
        g.throughput(Throughput::Bytes(len as u64));
        let local = buf.slice(0, len);
        g.bench_with_input(BenchmarkId::new("read", len), &len, |b, _| {
            let wr = [(
                1,
                WorkRequest::Read {
                    remote: 4096,
                    local,
                },
            )];
            b.iter(|| run(&mut f, black_box(&wr), &mut out[..1]));
        });
        g.bench_with_input(BenchmarkId::new("write", len), &len, |b, _| {
            let wr = [(
                1,
                WorkRequest::Write {
                    remote: 4096,
                    local,
                },
            )];
            b.iter(|| run(&mut f, black_box(&wr), &mut out[..1]));
        });
        g.bench_with_input(BenchmarkId::new("write+flush", len), &len, |b, _| {
            let wrs = [
                (
                    1,
                    WorkRequest::Write {
                        remote: 8192,
                        local,
                    },
                ),
                (
                    2,
                    WorkRequest::Flush {
                        remote: 8192,
                        len: len as u64,
                    },
                ),
            ];
            b.iter(|| run(&mut f, black_box(&wrs), &mut out));
        });
    }
    g.throughput(Throughput::Bytes(8));
    g.bench_function(BenchmarkId::new("cas", 8), |b| {
        let mut v = 0u64;
        b.iter(|| {
            let wr = [(
                1,
                WorkRequest::Cas {
                    remote: 64,
                    expect: v,
                    new: v + 1,
                },
            )];
            run(&mut f, black_box(&wr), &mut out[..1]);
            v += 1;
        });
    });
    g.finish();
    drop(server);
}

criterion_group!(benches, fabric);
criterion_main!(benches);
