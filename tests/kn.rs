//! KVS nodes end to end over the shm fabric, in one process: correctness against a model of
//! acknowledged writes, merge workers restarted mid-run, exact round-trip accounting, and
//! typed errors.

use std::collections::HashMap;
use std::sync::Arc;

use dinomo::cluster::{Cluster, ClusterConfig};
use dinomo_shared::slot::key_slot;
use host_kn::KvError;

fn small(kns: u16, shards: u16, cache: u64) -> ClusterConfig {
    ClusterConfig {
        kns,
        shards_per_kn: shards,
        region_bytes: 64 << 20,
        block_size: Some(256 << 10),
        cache_bytes_per_kn: cache,
        ..ClusterConfig::default()
    }
}

fn key(t: usize, i: u64) -> Vec<u8> {
    format!("t{t}-key-{i:05}").into_bytes()
}

/// A deterministic value for (key, version) so readers can tell versions apart.
fn value(t: usize, i: u64, v: u64) -> Vec<u8> {
    let mut s = format!("t{t} k{i} v{v} ").into_bytes();
    s.resize(16 + ((i * 37 + v * 11) % 400) as usize, b'.');
    s
}

#[test]
fn put_get_delete_and_multi_get_across_kns() {
    let c = Cluster::start(&small(2, 2, 1 << 20)).expect("cluster");
    let mut cl = c.client();
    assert_eq!(cl.get(b"missing").expect("get"), None);
    for i in 0..200 {
        cl.put(&key(0, i), &value(0, i, 1)).expect("put");
    }
    for i in 0..200 {
        assert_eq!(cl.get(&key(0, i)).expect("get"), Some(value(0, i, 1)));
    }
    for i in (0..200).step_by(3) {
        cl.delete(&key(0, i)).expect("delete");
    }
    let keys: Vec<Vec<u8>> = (0..200).map(|i| key(0, i)).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let got = cl.multi_get(&refs).expect("multi_get");
    for (i, g) in got.iter().enumerate() {
        let want = (i % 3 != 0).then(|| value(0, i as u64, 1));
        assert_eq!(g, &want, "key {i}");
    }
    // Every KN served some of the keys.
    let per_kn: Vec<u64> = c.kns().iter().map(|k| k.stats().puts).collect();
    assert!(per_kn.iter().all(|&n| n > 0), "{per_kn:?}");
    c.stop();
}

#[test]
fn concurrent_clients_read_exactly_what_was_acknowledged_and_merge_restarts_lose_nothing() {
    let mut c = Cluster::start(&small(3, 2, 256 << 10)).expect("cluster");
    const THREADS: usize = 4;
    const KEYS: u64 = 150;
    const ROUNDS: usize = 3;
    let mut models: Vec<HashMap<u64, Option<u64>>> = vec![HashMap::new(); THREADS];
    for round in 0..ROUNDS {
        let results: Vec<HashMap<u64, Option<u64>>> = std::thread::scope(|s| {
            let handles: Vec<_> = models
                .iter()
                .cloned()
                .enumerate()
                .map(|(t, mut model)| {
                    let mut cl = c.client();
                    s.spawn(move || {
                        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1) ^ ((round as u64) << 32);
                        for n in 0..1500u64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let i = x % KEYS;
                            match x % 10 {
                                0..=4 => {
                                    let got = cl.get(&key(t, i)).expect("get");
                                    let want = model.get(&i).copied().flatten().map(|v| value(t, i, v));
                                    assert_eq!(got, want, "thread {t} key {i}: read is not the last acknowledged write");
                                }
                                5..=8 => {
                                    let v = (round as u64) << 20 | n;
                                    cl.put(&key(t, i), &value(t, i, v)).expect("put");
                                    model.insert(i, Some(v));
                                }
                                _ => {
                                    cl.delete(&key(t, i)).expect("delete");
                                    model.insert(i, None);
                                }
                            }
                        }
                        model
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        models = results;
        // Between rounds, stop and restart the DPM's merge workers: reads must not change.
        if round == 0 {
            c.pause_merging();
        } else if round == 1 {
            c.resume_merging().expect("resume merging");
        }
    }
    c.sync().expect("sync");
    let mut cl = c.client();
    for (t, model) in models.iter().enumerate() {
        for i in 0..KEYS {
            let want = model.get(&i).copied().flatten().map(|v| value(t, i, v));
            assert_eq!(
                cl.get(&key(t, i)).expect("get"),
                want,
                "after sync: thread {t} key {i}"
            );
        }
    }
    // The memory node's index agrees with the model too.
    for (t, model) in models.iter().enumerate() {
        for i in 0..KEYS {
            let want = model.get(&i).copied().flatten().map(|v| value(t, i, v));
            assert_eq!(
                c.dpm().get(&key(t, i)),
                want,
                "DPM index: thread {t} key {i}"
            );
        }
    }
    let st = c.stats();
    assert!(st.flushes > 0 && st.flushed_entries >= st.flushes);
    c.stop();
}

#[test]
fn round_trips_are_exact() {
    // Cache larger than the data: after warm-up every read is a value hit, 0 RTs.
    let c = Cluster::start(&small(1, 1, 8 << 20)).expect("cluster");
    let mut cl = c.client();
    for i in 0..300 {
        cl.put(&key(0, i), &value(0, i, 0)).expect("put");
    }
    c.sync().expect("sync");
    for i in 0..300 {
        cl.get(&key(0, i)).expect("warm-up get");
    }
    let before = c.stats();
    for _ in 0..3 {
        for i in 0..300 {
            assert!(cl.get(&key(0, i)).expect("get").is_some());
        }
    }
    let d = c.stats().since(&before);
    assert_eq!(d.gets, 900);
    assert_eq!(d.hit_value, 900);
    assert_eq!(d.fabric.round_trips, 0, "value hits cost no round trip");
    c.stop();

    // No cache: after the load is merged, every read is a miss of exactly 2 RTs
    // (bucket, entry) with the root word cached.
    let c = Cluster::start(&small(1, 1, 0)).expect("cluster");
    let mut cl = c.client();
    for i in 0..300 {
        cl.put(&key(0, i), &value(0, i, 0)).expect("put");
    }
    c.sync().expect("sync");
    cl.get(&key(0, 0)).expect("first read caches the root");
    let before = c.stats();
    for i in 0..300 {
        assert_eq!(cl.get(&key(0, i)).expect("get"), Some(value(0, i, 0)));
    }
    let d = c.stats().since(&before);
    assert_eq!(d.miss, 300);
    assert_eq!(
        d.fabric.round_trips, 600,
        "a miss is exactly 2 round trips: {d:?}"
    );
    assert_eq!(d.read_rts, 600);
    c.stop();
}

#[test]
fn group_commit_batches_concurrent_writers() {
    let c = Cluster::start(&small(1, 1, 1 << 20)).expect("cluster");
    std::thread::scope(|s| {
        for t in 0..8 {
            let mut cl = c.client();
            s.spawn(move || {
                for i in 0..200 {
                    cl.put(&key(t, i), &value(t, i, 0)).expect("put");
                }
            });
        }
    });
    let st = c.stats();
    assert_eq!(st.puts, 1600);
    assert_eq!(st.flushed_entries, 1600);
    // Every flush is one round trip (plus one for each block switch's control exchange is
    // not a data RT); with 8 concurrent writers batches hold more than one entry on average.
    assert!(
        st.flushes < st.flushed_entries,
        "no batching happened: {st:?}"
    );
    assert!(
        (st.write_rts as f64) / (st.puts as f64) < 1.0,
        "write RTs/op {} / {}",
        st.write_rts,
        st.puts
    );
    c.stop();
}

#[test]
fn bad_requests_get_typed_errors_and_change_nothing() {
    let c = Cluster::start(&small(2, 1, 1 << 20)).expect("cluster");
    let mut cl = c.client();
    assert_eq!(cl.put(b"", b"v"), Err(KvError::EmptyKey));
    assert_eq!(cl.get(b""), Err(KvError::EmptyKey));
    let long = vec![b'k'; 1025];
    assert_eq!(
        cl.put(&long, b"v"),
        Err(KvError::KeyTooLarge {
            len: 1025,
            max: 1024
        })
    );
    let big = vec![0u8; c.max_value() + 1];
    assert!(matches!(
        cl.put(b"k", &big),
        Err(KvError::ValueTooLarge { .. })
    ));
    assert_eq!(
        cl.get(b"k").expect("get"),
        None,
        "a refused write changes nothing"
    );
    let max = vec![7u8; c.max_value()];
    cl.put(b"k", &max)
        .expect("a value of exactly the limit is accepted");
    assert_eq!(cl.get(b"k").expect("get").map(|v| v.len()), Some(max.len()));

    // A shard refuses a key it does not own, naming the owner and epoch.
    let kn0 = &c.kns()[0];
    let foreign = (0..1000u32)
        .map(|i| format!("probe{i}").into_bytes())
        .find(|k| {
            c.kns().len() > 1
                && host_kn::SlotMap::consistent(1, &[0, 1], host_kn::ownership::DEFAULT_VNODES)
                    .owner(key_slot(k))
                    == 1
        })
        .expect("some key belongs to KN 1");
    let (tx, rx) = std::sync::mpsc::channel();
    kn0.senders()[0]
        .send(host_kn::shard::Msg::Req {
            op: host_kn::shard::Request::Get { key: foreign },
            tag: 7,
            reply: tx,
        })
        .expect("send");
    let r = rx.recv().expect("reply");
    assert_eq!(r.tag, 7);
    assert_eq!(r.result, Err(KvError::WrongOwner { owner: 1, epoch: 1 }));
    let _ = Arc::strong_count(c.dpm());
    c.stop();
}
