//! KVS-node paths: slot lookup, and a client get that ends in a value hit (0 RT), a
//! shortcut hit (1 RT) or an index miss (2 RTs), in an in-process cluster over the shm
//! fabric with no injected NIC latency (so the figures are the software cost of each path).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dinomo::cluster::{Cluster, ClusterConfig};
use dinomo_shared::slot::key_slot;
use host_kn::dac::CachePolicy;
use host_kn::ownership::{shard_of, SlotMap, DEFAULT_VNODES};

const KEYS: u64 = 2_000;

fn key(i: u64) -> Vec<u8> {
    format!("{i:08x}").into_bytes()
}

fn slot_lookup(c: &mut Criterion) {
    let map = SlotMap::consistent(1, &[0, 1, 2, 3], DEFAULT_VNODES);
    let keys: Vec<Vec<u8>> = (0..1024).map(key).collect();
    let mut i = 0;
    c.bench_function("kn/slot_lookup", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let s = key_slot(&keys[i]);
            (map.owner(s), shard_of(s, 4))
        })
    });
}

fn client_get(c: &mut Criterion) {
    let mut g = c.benchmark_group("kn/get");
    // (case, policy, cache bytes per KN)
    let cases = [
        ("value_hit", CachePolicy::Dac, 64u64 << 20),
        ("shortcut_hit", CachePolicy::ShortcutOnly, 1 << 20),
        ("miss", CachePolicy::Dac, 0),
    ];
    for (name, policy, cache) in cases {
        let cluster = Cluster::start(&ClusterConfig {
            kns: 1,
            shards_per_kn: 1,
            region_bytes: 64 << 20,
            cache_bytes_per_kn: cache,
            policy,
            ..ClusterConfig::default()
        })
        .expect("cluster");
        let mut cl = cluster.client();
        let value = vec![7u8; 1024];
        for i in 0..KEYS {
            cl.put(&key(i), &value).expect("put");
        }
        cluster.sync().expect("sync");
        for i in 0..KEYS {
            cl.get(&key(i)).expect("warm-up");
        }
        let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                cl.get(&keys[i]).expect("get")
            })
        });
        let st = cluster.stats();
        let hits = match name {
            "value_hit" => st.hit_value,
            "shortcut_hit" => st.hit_shortcut,
            _ => st.miss,
        };
        assert!(
            hits * 10 >= st.gets * 9,
            "{name}: the case measured must be the one named ({st:?})"
        );
        cluster.stop();
    }
    g.finish();
}

criterion_group!(benches, slot_lookup, client_get);
criterion_main!(benches);
