//! The baselines: a Clover read through one KN after writes through others sees the newest
//! value (it walks the version chain), and moving a DINOMO-N slot copies every key of the
//! slot into the new owner's partition without losing or changing any.

use std::sync::Arc;

use dinomo::cluster::clover::{CloverCluster, CloverConfig};
use dinomo::cluster::dinomo_n::DinomoN;
use dinomo::cluster::ClusterConfig;
use dinomo::hw::fabric::nic::NicProfile;
use dinomo::shared::slot::key_slot;

#[test]
fn clover_reads_after_another_kns_write_see_the_new_value() {
    let c = Arc::new(
        CloverCluster::start(&CloverConfig {
            kns: 3,
            lanes_per_kn: 1,
            max_key: 16,
            max_value: 128,
            slots: 2048,
            cache_bytes_per_kn: 1 << 20,
            nic: NicProfile::None,
        })
        .expect("clover"),
    );
    let keys: Vec<Vec<u8>> = (0..50).map(|i| format!("key-{i}").into_bytes()).collect();
    // Every KN learns every key (a shortcut to version 0).
    for k in &keys {
        c.put_on(0, 0, k, b"v0").expect("put");
        for kn in 0..3 {
            assert_eq!(c.get_on(kn, 0, k).expect("get"), Some(b"v0".to_vec()));
        }
    }
    // Rounds of writes through rotating KNs, each checked through the other two.
    for round in 1..=5u32 {
        for (i, k) in keys.iter().enumerate() {
            let writer = (i + round as usize) % 3;
            let v = format!("v{round}-{i}").into_bytes();
            c.put_on(writer, 0, k, &v).expect("put");
            for reader in (0..3).filter(|&r| r != writer) {
                assert_eq!(
                    c.get_on(reader, 0, k).expect("get"),
                    Some(v.clone()),
                    "round {round}, key {i}, written by KN {writer}, read by KN {reader}"
                );
            }
        }
    }
    let s = c.stats();
    assert!(s.chain_hops > 0, "stale shortcuts were followed: {s:?}");
    assert_eq!(s.kn.puts, 50 * 6);
}

#[test]
fn a_dinomo_n_slot_move_copies_every_key_and_loses_nothing() {
    let mut n = DinomoN::start(&ClusterConfig {
        kns: 2,
        shards_per_kn: 1,
        region_bytes: 64 << 20,
        cache_bytes_per_kn: 1 << 20,
        ..ClusterConfig::default()
    })
    .expect("cluster");
    let mut cl = n.client();
    let keys: Vec<String> = (0..3000).map(|i| format!("k{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        cl.put(k.as_bytes(), format!("value-{i}").as_bytes())
            .expect("put");
    }
    // The slot with the most keys moves to the other KN.
    let mut per_slot = std::collections::HashMap::<u16, u64>::new();
    for k in &keys {
        *per_slot.entry(key_slot(k.as_bytes())).or_default() += 1;
    }
    let (&slot, &count) = per_slot
        .iter()
        .max_by_key(|(s, c)| (**c, **s))
        .expect("slots");
    let from = n.owner(slot);
    let to = 1 - from;
    let rep = n.move_slot(slot, to).expect("move");
    assert_eq!((rep.from, rep.to, rep.keys), (from, to, count));
    let bytes: u64 = keys
        .iter()
        .enumerate()
        .filter(|(_, k)| key_slot(k.as_bytes()) == slot)
        .map(|(i, k)| (k.len() + format!("value-{i}").len()) as u64)
        .sum();
    assert_eq!(rep.bytes_moved, 2 * bytes, "read out and written in");
    assert_eq!(n.owner(slot), to);
    // Every key reads back, moved or not, through a new client and an old one.
    let mut fresh = n.client();
    for (i, k) in keys.iter().enumerate() {
        let want = Some(format!("value-{i}").into_bytes());
        assert_eq!(fresh.get(k.as_bytes()).expect("get"), want, "{k}");
        assert_eq!(cl.get(k.as_bytes()).expect("get"), want, "{k}");
    }
    // The old partition holds nothing of the slot any more; moving back restores it.
    let back = n.move_slot(slot, from).expect("move back");
    assert_eq!(back.keys, count);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            fresh.get(k.as_bytes()).expect("get"),
            Some(format!("value-{i}").into_bytes())
        );
    }
    n.stop();
}
