//! DINOMO-N grows and shrinks while clients write and read: every moved slot's data is
//! copied to its new owner's partition, clients wait (TRYAGAIN) instead of seeing a stale
//! or missing value, and nothing acknowledged is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dinomo::cluster::dinomo_n::DinomoN;
use dinomo::cluster::ClusterConfig;

const KEYS: usize = 1500;
const WRITERS: usize = 2;

#[test]
fn add_and_remove_kn_move_the_data_while_clients_run() {
    let mut n = DinomoN::start(&ClusterConfig {
        kns: 1,
        shards_per_kn: 1,
        region_bytes: 64 << 20,
        cache_bytes_per_kn: 1 << 20,
        max_kns: 4,
        ..ClusterConfig::default()
    })
    .expect("cluster");
    let key = |i: usize| format!("key-{i}");
    let mut cl = n.client();
    for i in 0..KEYS {
        cl.put(key(i).as_bytes(), format!("v{i}-0").as_bytes())
            .expect("load");
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer owns the keys i % WRITERS == w: it writes a new value and reads it back.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut c = n.client();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<HashMap<usize, String>, String> {
                let mut last = HashMap::new();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    for i in (w..KEYS).step_by(WRITERS * 7) {
                        let v = format!("v{i}-{round}");
                        c.put(key(i).as_bytes(), v.as_bytes())
                            .map_err(|e| format!("put {i}: {e}"))?;
                        let got = c
                            .get(key(i).as_bytes())
                            .map_err(|e| format!("get {i}: {e}"))?;
                        if got.as_deref() != Some(v.as_bytes()) {
                            return Err(format!("key {i}: wrote {v}, read {got:?}"));
                        }
                        last.insert(i, v);
                    }
                }
                Ok(last)
            })
        })
        .collect();
    let added = n.add_kn().expect("add");
    assert_eq!(added.kn, 1);
    assert!(added.slots_moved > 0 && added.keys > 0, "{added:?}");
    assert!(added.bytes_moved >= 2 * added.keys * 6, "{added:?}");
    let second = n.add_kn().expect("add again");
    assert_eq!(second.kn, 2);
    let removed = n.remove_kn(1).expect("remove");
    assert_eq!(removed.kn, 1);
    assert!(removed.keys > 0, "{removed:?}");
    assert_eq!(n.cluster().live_kns(), vec![0, 2]);
    assert!(n.remove_kn(1).is_err(), "KN 1 is gone");
    stop.store(true, Ordering::Relaxed);
    let mut last = HashMap::new();
    for w in writers {
        last.extend(
            w.join()
                .expect("writer")
                .expect("writer saw its own writes"),
        );
    }
    // Every key reads back as last written, through a client made after the moves.
    let mut fresh = n.client();
    for i in 0..KEYS {
        let want = last.get(&i).cloned().unwrap_or(format!("v{i}-0"));
        assert_eq!(
            fresh.get(key(i).as_bytes()).expect("get"),
            Some(want.into_bytes()),
            "key {i}"
        );
    }
    n.stop();
}
