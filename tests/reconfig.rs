//! Online slot moves in the in-process cluster: clients keep running while slots change
//! owner (explicit maps, KNs added and removed), and every key's history stays
//! linearizable; nothing acknowledged is lost; a KN that regains a slot serves nothing
//! stale; bad reconfigurations are refused without effect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dinomo::cluster::{Cluster, ClusterConfig, ClusterError};
use dinomo::lincheck::{Clock, History, Recorder};
use dinomo_shared::slot::{key_slot, SLOTS};
use host_kn::{KvError, SlotMap};

fn config(kns: u16) -> ClusterConfig {
    ClusterConfig {
        kns,
        shards_per_kn: 2,
        region_bytes: 64 << 20,
        block_size: Some(256 << 10),
        cache_bytes_per_kn: 1 << 20,
        max_kns: 6,
        ..ClusterConfig::default()
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A map with the current epoch + 1 giving every slot a random live KN.
fn random_map(c: &Cluster, rng: &mut Rng) -> SlotMap {
    let live = c.live_kns();
    let owners = (0..SLOTS)
        .map(|_| live[rng.below(live.len() as u64) as usize])
        .collect();
    SlotMap::from_owners(c.router().map().epoch() + 1, owners).expect("a full map")
}

/// A map with the current epoch + 1 giving the slot of `key` to `kn`.
fn with_owner(c: &Cluster, key: &[u8], kn: u16) -> SlotMap {
    let cur = c.router().map();
    let slot = key_slot(key);
    let owners = (0..SLOTS)
        .map(|s| if s == slot { kn } else { cur.owner(s) })
        .collect();
    SlotMap::from_owners(cur.epoch() + 1, owners).expect("a full map")
}

const THREADS: usize = 4;
const KEYS: u64 = 64;
const OPS_PER_THREAD: usize = 6000;

#[test]
fn histories_stay_linearizable_while_slots_move() {
    let mut c = Cluster::start(&config(2)).expect("cluster");
    let clock = Clock::new();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let mut cl = c.client();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut rec = Recorder::new(clock);
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
                let mut errors = Vec::new();
                for n in 0..OPS_PER_THREAD {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("key-{:02}", rng.below(KEYS)).into_bytes();
                    let t0 = rec.now();
                    match rng.below(10) {
                        0..=3 => {
                            let value = format!("t{t}-n{n}").into_bytes();
                            let r = cl.put(&key, &value);
                            rec.put(&key, &value, t0, r.is_ok());
                            if let Err(e) = r {
                                errors.push(e);
                            }
                        }
                        4 => {
                            let r = cl.delete(&key);
                            rec.delete(&key, t0, r.is_ok());
                            if let Err(e) = r {
                                errors.push(e);
                            }
                        }
                        _ => match cl.get(&key) {
                            Ok(v) => rec.get(&key, t0, v),
                            Err(e) => errors.push(e),
                        },
                    }
                }
                (rec, errors)
            })
        })
        .collect();

    // Move slots back and forth while the clients run.
    let mut rng = Rng(0xD1_0000_5EED);
    let mut moved = 0;
    let mut merged = 0;
    for round in 0..48 {
        let report = match round % 6 {
            2 => c.add_kn().expect("add a KN").1,
            5 => {
                let live = c.live_kns();
                let victim = live[rng.below(live.len() as u64) as usize];
                c.remove_kn(victim).expect("remove a KN")
            }
            _ => {
                let next = random_map(&c, &mut rng);
                c.reconfigure(next).expect("reconfigure")
            }
        };
        assert_eq!(report.epoch, c.router().map().epoch());
        assert_eq!(report.bytes_moved, 0, "only ownership moves");
        moved += report.slots_moved;
        merged += report.entries_merged;
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let mut recorders = Vec::new();
    for w in workers {
        let (rec, errors) = w.join().expect("client thread");
        assert!(errors.is_empty(), "clients saw errors: {errors:?}");
        recorders.push(rec);
    }
    assert!(moved > SLOTS as usize, "slots moved: {moved}");

    // Hand every slot to a fresh KN, which reads everything cold from the index, and read
    // every key once more: an acknowledged write missing here fails the check below.
    let fresh = c.start_kn().expect("a fresh KN");
    let all = SlotMap::from_owners(c.router().map().epoch() + 1, vec![fresh; SLOTS as usize])
        .expect("a full map");
    merged += c.reconfigure(all).expect("move everything").entries_merged;
    let mut last = Recorder::new(clock);
    let mut cl = c.client();
    let mut present = 0;
    for k in 0..KEYS {
        let key = format!("key-{k:02}").into_bytes();
        let t0 = last.now();
        let v = cl.get(&key).expect("final read");
        present += usize::from(v.is_some());
        last.get(&key, t0, v);
    }
    recorders.push(last);
    let history = History::from_recorders(recorders);
    let report = history.check().unwrap_or_else(|e| panic!("{e}"));
    assert!(report.ops > 1000, "{report:?}");
    assert!(present > 0, "every key ended absent");
    assert!(merged > 0, "moves merged no entries");
    let stats = c.stop();
    assert!(stats.busy_ns > 0);
}

#[test]
fn moved_slot_is_read_from_the_index_and_a_regained_slot_is_not_stale() {
    let mut c = Cluster::start(&config(2)).expect("cluster");
    // With the background merger stopped, only the move's own merge puts writes in the index.
    c.pause_merging();
    let key = b"regained-key";
    let first = c.router().map().owner(key_slot(key));
    let other = 1 - first;
    let mut cl = c.client();
    cl.put(key, b"v1").expect("put v1");
    assert_eq!(cl.get(key).expect("get"), Some(b"v1".to_vec()));

    let r = c
        .reconfigure(with_owner(&c, key, other))
        .expect("move away");
    assert_eq!(r.slots_moved, 1);
    assert!(r.entries_merged >= 1, "{r:?}");
    assert_eq!(
        cl.get(key).expect("get at the new owner"),
        Some(b"v1".to_vec())
    );
    cl.put(key, b"v2").expect("put v2");
    cl.delete(b"regained-gone").expect("delete");

    let r = c
        .reconfigure(with_owner(&c, key, first))
        .expect("move back");
    assert_eq!(r.slots_moved, 1);
    assert_eq!(
        cl.get(key).expect("get at the old owner again"),
        Some(b"v2".to_vec()),
        "the old owner served what it knew before the slot left"
    );
    c.resume_merging().expect("resume merging");
    c.stop();
}

#[test]
fn moving_slots_are_refused_with_tryagain_and_retried() {
    let c = Cluster::start(&config(2)).expect("cluster");
    let mut cl = c.client();
    cl.put(b"m", b"1").expect("put");
    let slot = key_slot(b"m");
    c.router().set_moving(&[slot]);
    assert!(c.router().is_moving(slot));
    cl.set_retry_for(Duration::ZERO);
    assert_eq!(cl.get(b"m"), Err(KvError::TryAgain { slot }));
    assert!(KvError::TryAgain { slot }
        .to_string()
        .starts_with("TRYAGAIN"));
    // Other slots are served meanwhile; copiers pass.
    cl.put(b"not-moving", b"2").expect("other slot");
    let mut copier = c.client();
    copier.set_ignore_moving(true);
    assert_eq!(copier.get(b"m").expect("copier"), Some(b"1".to_vec()));

    cl.set_retry_for(Duration::from_secs(30));
    let router = Arc::clone(c.router());
    let clear = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        router.clear_moving();
    });
    cl.put(b"m", b"3").expect("retried until the move ended");
    clear.join().expect("clear");
    assert_eq!(cl.get(b"m").expect("get"), Some(b"3".to_vec()));
    c.stop();
}

#[test]
fn kns_join_and_leave_and_keep_every_key() {
    let mut c = Cluster::start(&config(1)).expect("cluster");
    let mut cl = c.client();
    let keys: Vec<Vec<u8>> = (0..200).map(|i| format!("j{i}").into_bytes()).collect();
    for k in &keys {
        cl.put(k, k).expect("put");
    }
    let (kn, r) = c.add_kn().expect("add");
    assert_eq!(c.live_kns(), vec![0, kn]);
    let owned = c.router().map().slots_of(kn);
    assert_eq!(r.slots_moved, owned);
    assert!(owned > 0 && owned < SLOTS as usize, "{owned}");
    let (kn2, _) = c.add_kn().expect("add another");
    assert_eq!(c.live_kns(), vec![0, kn, kn2]);
    for k in &keys {
        assert_eq!(cl.get(k).expect("get"), Some(k.clone()));
    }
    let r = c.remove_kn(0).expect("remove KN 0");
    assert!(r.slots_moved > 0);
    assert_eq!(c.live_kns(), vec![kn, kn2]);
    assert_eq!(c.router().map().slots_of(0), 0);
    for k in &keys {
        assert_eq!(cl.get(k).expect("get after remove"), Some(k.clone()));
    }
    // The freed id is used again.
    assert_eq!(c.start_kn().expect("restart"), 0);
    c.stop_kn(0).expect("stop an idle KN");
    c.stop();
}

#[test]
fn bad_reconfigurations_are_refused_and_change_nothing() {
    let mut c = Cluster::start(&ClusterConfig {
        max_kns: 2,
        ..config(2)
    })
    .expect("cluster");
    let before = c.router().map();
    let stale = SlotMap::consistent(before.epoch(), &[0], 8);
    assert!(matches!(
        c.reconfigure(stale),
        Err(ClusterError::Reconfig(_))
    ));
    let ghost = SlotMap::consistent(before.epoch() + 1, &[0, 1, 5], 8);
    assert!(matches!(
        c.reconfigure(ghost),
        Err(ClusterError::Reconfig(_))
    ));
    assert!(matches!(c.stop_kn(1), Err(ClusterError::Reconfig(_))));
    assert!(matches!(c.stop_kn(9), Err(ClusterError::Reconfig(_))));
    assert!(matches!(c.start_kn(), Err(ClusterError::Reconfig(_))));
    assert_eq!(*c.router().map(), *before);
    assert_eq!(c.live_kns(), vec![0, 1]);
    c.remove_kn(1).expect("remove");
    assert!(matches!(c.remove_kn(0), Err(ClusterError::Reconfig(_))));
    let mut cl = c.client();
    cl.put(b"still", b"here").expect("put");
    assert_eq!(cl.get(b"still").expect("get"), Some(b"here".to_vec()));
    c.stop();
}
