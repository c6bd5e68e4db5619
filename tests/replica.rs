//! Selective replication of hot keys through indirect cells, end to end in one process:
//! round trips of replicated reads, concurrent writers on different replicas checked for
//! monotonic versions, dereplication (also under load) returning the key's newest version
//! to the index, refused requests, and hot-key tracking.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use dinomo::cluster::{Cluster, ClusterConfig};
use dinomo::lincheck::{Clock, History, Recorder};
use host_kn::{Client, KvError};

fn cluster(kns: u16, shards: u16) -> Cluster {
    Cluster::start(&ClusterConfig {
        kns,
        shards_per_kn: shards,
        region_bytes: 64 << 20,
        block_size: Some(256 << 10),
        cache_bytes_per_kn: 1 << 20,
        ..ClusterConfig::default()
    })
    .expect("cluster")
}

fn client_on(c: &Cluster, replica: usize) -> Client {
    let mut cl = c.client();
    cl.set_replica_choice(replica);
    cl
}

#[test]
fn a_replicated_read_with_a_cache_hit_costs_one_round_trip() {
    let mut c = cluster(3, 2);
    let key = b"hot-key".to_vec();
    let own = c.owner_of(&key);
    c.client().put(&key, b"v0").expect("put");
    let cell = c.replicate(&key, &[0, 1, 2]).expect("replicate");
    assert_eq!(c.replicated(), vec![key.clone()]);
    // The cell names the key's newest entry at once.
    assert!(c.dpm().cell_ref(cell).is_some());

    // replicas are [owner, then the others in order]
    let mut order = vec![own];
    order.extend((0..3).filter(|&k| k != own));
    for (choice, &kn) in order.iter().enumerate() {
        let mut cl = client_on(&c, choice);
        let before = c.kns()[kn as usize].stats();
        assert_eq!(cl.get(&key).expect("get"), Some(b"v0".to_vec()));
        let mid = c.kns()[kn as usize].stats();
        assert_eq!(cl.get(&key).expect("get"), Some(b"v0".to_vec()));
        let after = c.kns()[kn as usize].stats();
        let first = mid.since(&before);
        let second = after.since(&mid);
        assert_eq!(first.replica.gets, 1, "KN {kn} served the first read");
        assert!(first.read_rts <= 2, "cell + entry: {}", first.read_rts);
        assert_eq!(second.replica.cell_hits, 1, "KN {kn}: the cell matched");
        assert_eq!(second.read_rts, 1, "KN {kn}: a hit costs exactly one READ");
        assert_eq!(second.fabric.reads, 1);
    }

    // A write at one replica is seen by the others (which then read the new entry).
    let mut w = client_on(&c, 1);
    w.put(&key, b"v1").expect("put at a replica");
    let writer_kn = order[1] as usize;
    let ws = c.kns()[writer_kn].stats();
    assert!(ws.replica.writes >= 1, "the write went to KN {writer_kn}");
    for choice in 0..3 {
        assert_eq!(
            client_on(&c, choice).get(&key).expect("get"),
            Some(b"v1".to_vec()),
            "replica {choice}"
        );
    }
    // Deletes go through the cell too.
    client_on(&c, 2).delete(&key).expect("delete");
    for choice in 0..3 {
        assert_eq!(client_on(&c, choice).get(&key).expect("get"), None);
    }
    client_on(&c, 0).put(&key, b"v2").expect("put");

    c.dereplicate(&key).expect("dereplicate");
    assert!(c.replicated().is_empty());
    // The DPM put the cell's entry back into the index.
    assert_eq!(c.dpm().get(&key), Some(b"v2".to_vec()));
    for choice in 0..3 {
        assert_eq!(
            client_on(&c, choice).get(&key).expect("get"),
            Some(b"v2".to_vec())
        );
    }
    // An ordinary owned key again: written by its owner, merged into the index.
    c.client().put(&key, b"v3").expect("put");
    c.sync().expect("sync");
    assert_eq!(c.dpm().get(&key), Some(b"v3".to_vec()));
    assert_eq!(c.client().get(&key).expect("get"), Some(b"v3".to_vec()));
    c.stop();
}

#[test]
fn an_absent_key_can_be_replicated_written_and_dereplicated() {
    let mut c = cluster(2, 1);
    let key = b"never-written".to_vec();
    c.replicate(&key, &[0, 1]).expect("replicate");
    for choice in 0..2 {
        assert_eq!(client_on(&c, choice).get(&key).expect("get"), None);
    }
    client_on(&c, 1).put(&key, b"first").expect("put");
    assert_eq!(
        client_on(&c, 0).get(&key).expect("get"),
        Some(b"first".to_vec())
    );
    // A sync of every KN merges their logs; the key stays out of the index meanwhile.
    c.sync().expect("sync");
    assert_eq!(
        c.dpm().get(&key),
        None,
        "the cell is the key's only authority"
    );
    c.dereplicate(&key).expect("dereplicate");
    assert_eq!(c.dpm().get(&key), Some(b"first".to_vec()));
    c.sync().expect("sync");
    assert_eq!(
        c.dpm().get(&key),
        Some(b"first".to_vec()),
        "survives merges"
    );
    c.stop();
}

#[test]
fn bad_replication_requests_are_refused_and_change_nothing() {
    let mut c = cluster(2, 1);
    c.client().put(b"k", b"v").expect("put");
    assert!(matches!(
        c.replicate(b"", &[0]),
        Err(dinomo::cluster::ClusterError::Kn(KvError::EmptyKey))
    ));
    assert!(c.replicate(b"k", &[0, 7]).is_err(), "KN 7 does not exist");
    assert!(c.replicated().is_empty());
    assert!(c.dereplicate(b"k").is_err(), "not replicated");
    c.replicate(b"k", &[0, 1]).expect("replicate");
    assert!(c.replicate(b"k", &[0, 1]).is_err(), "already replicated");
    assert_eq!(c.replicated(), vec![b"k".to_vec()]);
    assert_eq!(c.client().get(b"k").expect("get"), Some(b"v".to_vec()));
    c.dereplicate(b"k").expect("dereplicate");
    assert_eq!(c.client().get(b"k").expect("get"), Some(b"v".to_vec()));
    c.stop();
}

fn encode(writer: u64, seq: u64) -> Vec<u8> {
    let mut v = format!("w{writer}:{seq:010}:").into_bytes();
    v.resize(32 + (seq % 64) as usize, b'#');
    v
}

fn decode(v: &[u8]) -> (u64, u64) {
    let s = std::str::from_utf8(v).expect("utf8 value");
    let mut parts = s.trim_end_matches('#').split(':');
    let w = parts.next().and_then(|w| w.strip_prefix('w'));
    let seq = parts.next();
    match (
        w.and_then(|w| w.parse().ok()),
        seq.and_then(|s| s.parse().ok()),
    ) {
        (Some(w), Some(s)) => (w, s),
        _ => panic!("not a written value: {s:?}"),
    }
}

/// Writers on different replicas and readers on every replica: the history must be
/// linearizable, and (a direct check) a reader must never see a writer's version older
/// than one it saw before, or older than one that writer had completed before the read
/// started. `dereplicate_midway` ends the replication while the
/// load runs.
fn concurrent_writers_and_readers(dereplicate_midway: bool) {
    const WRITERS: u64 = 3;
    const READERS: usize = 3;
    const WRITES: u64 = 150;
    const MAX_READS: u64 = 1500;
    let mut c = cluster(3, 2);
    let key = b"contended".to_vec();
    let clock = Clock::new();
    let mut first = Recorder::new(clock);
    let t0 = first.now();
    client_on(&c, 0).put(&key, &encode(0, 0)).expect("put");
    first.put(&key, &encode(0, 0), t0, true);
    c.replicate(&key, &[0, 1, 2]).expect("replicate");

    let completed: Arc<Vec<AtomicU64>> =
        Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let halfway = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut cl = client_on(&c, w as usize);
        let (completed, key, halfway) = (Arc::clone(&completed), key.clone(), Arc::clone(&halfway));
        writers.push(thread::spawn(move || {
            let mut rec = Recorder::new(clock);
            for seq in 1..=WRITES {
                let value = encode(w, seq);
                let t0 = rec.now();
                cl.put(&key, &value).expect("put");
                rec.put(&key, &value, t0, true);
                completed[w as usize].store(seq, Ordering::SeqCst);
                if seq == WRITES / 2 {
                    halfway.fetch_add(1, Ordering::SeqCst);
                }
            }
            rec
        }));
    }
    let mut readers = Vec::new();
    for r in 0..READERS {
        let mut cl = client_on(&c, r);
        let (completed, key, stop) = (Arc::clone(&completed), key.clone(), Arc::clone(&stop));
        readers.push(thread::spawn(move || {
            let mut rec = Recorder::new(clock);
            let mut seen = vec![0u64; WRITERS as usize];
            let mut reads = 0u64;
            loop {
                let done = stop.load(Ordering::SeqCst) || reads >= MAX_READS;
                let floor: Vec<u64> = completed.iter().map(|a| a.load(Ordering::SeqCst)).collect();
                let t0 = rec.now();
                let got = cl.get(&key).expect("get");
                rec.get(&key, t0, got.clone());
                let v = got.expect("the key always exists");
                let (w, seq) = decode(&v);
                assert!(
                    seq >= seen[w as usize],
                    "reader {r}: writer {w} went back from {} to {seq}",
                    seen[w as usize]
                );
                assert!(
                    seq >= floor[w as usize] || (w == 0 && seq == 0 && floor[0] == 0),
                    "reader {r}: read writer {w}'s version {seq} after it completed {}",
                    floor[w as usize]
                );
                seen[w as usize] = seq;
                reads += 1;
                if done {
                    return rec;
                }
            }
        }));
    }
    if dereplicate_midway {
        while halfway.load(Ordering::SeqCst) < WRITERS {
            thread::yield_now();
        }
        c.dereplicate(&key).expect("dereplicate under load");
        assert!(c.replicated().is_empty());
    }
    let writers_done: Vec<Recorder> = writers
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    let mut recorders: Vec<Recorder> = writers_done;
    for t in readers {
        let rec = t.join().expect("reader");
        assert!(!rec.is_empty());
        recorders.push(rec);
    }
    recorders.push(first);
    let report = History::from_recorders(recorders)
        .check()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.ops > (WRITERS * WRITES) as usize);
    // Every replica read its own cell; some reads hit the cache.
    let s = c.stats();
    assert!(s.replica.gets > 0 && s.replica.writes > 0);

    // Quiescent: every replica returns the same last version, one of the writers' last.
    let last = client_on(&c, 0).get(&key).expect("get").expect("exists");
    let (w, seq) = decode(&last);
    assert!(w < WRITERS);
    assert_eq!(seq, WRITES, "the last write of writer {w} won");
    for choice in 1..3 {
        assert_eq!(
            client_on(&c, choice).get(&key).expect("get"),
            Some(last.clone())
        );
    }
    if !dereplicate_midway {
        c.dereplicate(&key).expect("dereplicate");
        assert_eq!(
            c.dpm().get(&key),
            Some(last.clone()),
            "the cell's entry is in the index"
        );
    }
    c.sync().expect("sync");
    assert_eq!(c.dpm().get(&key), Some(last.clone()), "merged and kept");
    assert_eq!(c.client().get(&key).expect("get"), Some(last));
    c.stop();
}

#[test]
fn concurrent_writers_on_three_replicas_never_go_back() {
    concurrent_writers_and_readers(false);
}

#[test]
fn dereplication_under_load_keeps_versions_monotonic() {
    concurrent_writers_and_readers(true);
}

#[test]
fn hot_keys_name_the_hottest_key_of_each_kn() {
    let c = cluster(2, 2);
    let mut cl = c.client();
    let hot = b"the-hot-one".to_vec();
    cl.put(&hot, b"x").expect("put");
    for i in 0..200u32 {
        cl.put(format!("cold-{i}").as_bytes(), b"y").expect("put");
    }
    for i in 0..4000u32 {
        if i % 4 == 0 {
            let _ = cl.get(format!("cold-{}", i % 200).as_bytes()).expect("get");
        } else {
            let _ = cl.get(&hot).expect("get");
        }
    }
    let own = c.owner_of(&hot);
    let top = c.hot_keys(own);
    assert_eq!(
        top.first().map(|(k, _)| k.clone()),
        Some(hot.clone()),
        "{top:?}"
    );
    let count = top[0].1;
    assert!(
        (1500..=6000).contains(&count),
        "about 3000 requests: {count}"
    );
    assert!(c.hot_keys(own).is_empty(), "counts start over");
}

#[test]
fn a_key_last_written_by_an_earlier_owner_can_be_replicated() {
    let mut c = cluster(2, 1);
    let key = b"moved-then-hot".to_vec();
    c.client().put(&key, b"by the first owner").expect("put");
    c.sync().expect("sync");
    // Hand the key's slot to the other KN: its newest entry is in the old owner's log.
    let first = c.owner_of(&key);
    let slot = dinomo_shared::slot::key_slot(&key);
    let map = c.router().map();
    let owners: Vec<u16> = (0..dinomo_shared::slot::SLOTS)
        .map(|s| if s == slot { 1 - first } else { map.owner(s) })
        .collect();
    let next = Arc::new(host_kn::SlotMap::from_owners(map.epoch() + 1, owners).expect("map"));
    c.install_map(&next).expect("move the slot");
    assert_eq!(c.owner_of(&key), 1 - first);
    c.replicate(&key, &[0, 1]).expect("replicate");
    for choice in 0..2 {
        assert_eq!(
            client_on(&c, choice).get(&key).expect("get"),
            Some(b"by the first owner".to_vec())
        );
    }
    client_on(&c, 1).put(&key, b"by a replica").expect("put");
    c.dereplicate(&key).expect("dereplicate");
    assert_eq!(c.dpm().get(&key), Some(b"by a replica".to_vec()));
    c.stop();
}

#[test]
fn moving_a_replicated_keys_slot_or_stopping_a_replica_ends_its_replication() {
    let mut c = cluster(3, 1);
    let a = b"replicated-a".to_vec();
    c.client().put(&a, b"a0").expect("put");
    let own = c.owner_of(&a);
    let others: Vec<u16> = (0..3).filter(|&k| k != own).collect();
    c.replicate(&a, &[0, 1, 2]).expect("replicate");
    client_on(&c, 1).put(&a, b"a1").expect("put at a replica");
    // Stopping a replica KN (it owns no slots once they moved away) ends the replication.
    let report = c.remove_kn(others[0]).expect("remove a replica KN");
    assert!(report.slots_moved > 0);
    assert!(c.replicated().is_empty(), "{:?}", c.replicated());
    assert_eq!(c.client().get(&a).expect("get"), Some(b"a1".to_vec()));
    assert_eq!(c.dpm().get(&a), Some(b"a1".to_vec()));

    // Moving the slot of a replicated key away from its owner ends it too.
    let own = c.owner_of(&a);
    let other = c
        .live_kns()
        .into_iter()
        .find(|&k| k != own)
        .expect("another KN");
    c.replicate(&a, &[own, other]).expect("replicate again");
    client_on(&c, 1).put(&a, b"a2").expect("put at a replica");
    let map = c.router().map();
    let slot = dinomo_shared::slot::key_slot(&a);
    let owners: Vec<u16> = (0..dinomo_shared::slot::SLOTS)
        .map(|s| if s == slot { other } else { map.owner(s) })
        .collect();
    let next = host_kn::SlotMap::from_owners(map.epoch() + 1, owners).expect("map");
    c.reconfigure(next).expect("move the slot");
    assert!(c.replicated().is_empty());
    assert_eq!(c.owner_of(&a), other);
    assert_eq!(c.client().get(&a).expect("get"), Some(b"a2".to_vec()));
    c.client().put(&a, b"a3").expect("put at the new owner");
    c.sync().expect("sync");
    assert_eq!(c.dpm().get(&a), Some(b"a3".to_vec()));
    c.stop();
}
