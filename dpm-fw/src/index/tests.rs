//! Index tests: a model check, concurrent readers during merges and resizes, a power cut at
//! every persist point, and damaged regions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dinomo_hw::shadow::{catch_power_failure, ShadowRegion};
use dinomo_hw::Pmem;
use dinomo_shared::entry::{self, Op};
use dinomo_shared::geometry::{FormatParams, Geometry};
use dinomo_shared::hash::key_hash;
use dinomo_shared::index::{Bucket, EntryRef, RootWord, BUCKET_SIZE};
use proptest::prelude::*;

use super::*;

const SALT: u32 = 0x5EED;

type Pm = Pmem<Arc<ShadowRegion>>;

fn geometry(region_size: u64, index_percent: u32) -> Geometry {
    Geometry::compute(&FormatParams {
        region_size,
        block_size: 64 << 10,
        max_logs: 4,
        max_kns: 4,
        index_percent,
        indirect_cells: 8,
    })
    .expect("geometry")
}

fn key(k: usize) -> Vec<u8> {
    format!("key-{k:04}").into_bytes()
}

/// The value of version `v` of key `k` names both, so a reader can tell whose entry it got.
fn value(k: usize, v: usize) -> Vec<u8> {
    format!("value of key-{k:04} version {v}").into_bytes()
}

/// A formatted index over a shadow region whose log area holds `keys × versions` entries.
struct Fixture {
    region: Arc<ShadowRegion>,
    pm: Pm,
    geo: Geometry,
    /// `refs[k][v]`: the entry of version `v` of key `k`.
    refs: Vec<Vec<EntryRef>>,
}

impl Fixture {
    fn new(region_size: u64, index_percent: u32, log2: u32, keys: usize, versions: usize) -> Self {
        let geo = geometry(region_size, index_percent);
        let region = ShadowRegion::new(region_size);
        let pm = region.pmem();
        let mut at = geo.log_off;
        let mut buf = vec![0u8; 4096];
        let refs = (0..keys)
            .map(|k| {
                (0..versions)
                    .map(|v| {
                        let n = entry::encode(&mut buf, SALT, Op::Put, 1, 1, &key(k), &value(k, v))
                            .expect("encode");
                        pm.write(at, &buf[..n]);
                        let r = EntryRef::new(at, n as u64).expect("ref");
                        at += n as u64;
                        r
                    })
                    .collect()
            })
            .collect();
        assert!(at <= geo.log_off + geo.log_capacity());
        pm.persist(geo.log_off, at - geo.log_off);
        Index::format_with(&pm, &geo, log2).expect("format");
        Self {
            region,
            pm,
            geo,
            refs,
        }
    }

    fn open(&self) -> Index {
        Index::open(&self.pm, &self.geo).expect("open")
    }
}

/// Key → hash: the real one, or one that makes many keys collide.
#[derive(Clone, Copy, Debug)]
enum Hashing {
    Real,
    /// Keys `k % every == 0` all share one hash.
    Collide {
        every: usize,
    },
    /// Only `classes` distinct hashes.
    Few {
        classes: u64,
    },
}

impl Hashing {
    fn of(self, k: usize) -> u64 {
        match self {
            Self::Real => key_hash(&key(k)),
            Self::Collide { every } if k % every == 0 => 0x1234_5678_9ABC,
            Self::Collide { .. } => key_hash(&key(k)),
            Self::Few { classes } => key_hash(&key(k)) % classes + 1,
        }
    }
}

/// Reads the entry a ref points to and returns (key, value).
fn read_entry(pm: &Pm, r: EntryRef) -> (Vec<u8>, Vec<u8>) {
    pm.check(r.offset(), r.len())
        .expect("ref lies in the region");
    let mut bytes = vec![0u8; r.len() as usize];
    pm.read(r.offset(), &mut bytes);
    let e = entry::decode(&bytes, SALT).expect("a ref names a whole, valid entry");
    assert_eq!(
        e.len as u64,
        r.len(),
        "ref length is the entry's padded length"
    );
    (e.key.to_vec(), e.value.to_vec())
}

/// Index contents as hash → sorted refs, from `for_each`.
fn contents(idx: &Index, pm: &Pm) -> BTreeMap<u64, Vec<u64>> {
    let mut m: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    idx.for_each(pm, |h, r| m.entry(h).or_default().push(r.0));
    m.values_mut().for_each(|v| v.sort_unstable());
    m
}

fn model_contents(model: &HashMap<usize, EntryRef>, hashing: Hashing) -> BTreeMap<u64, Vec<u64>> {
    let mut m: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (&k, r) in model {
        m.entry(hashing.of(k)).or_default().push(r.0);
    }
    m.values_mut().for_each(|v| v.sort_unstable());
    m
}

/// Asserts that the index holds exactly `model`, by lookups and by a full visit.
fn assert_matches(
    idx: &Index,
    pm: &Pm,
    model: &HashMap<usize, EntryRef>,
    keys: usize,
    hashing: Hashing,
) {
    for k in 0..keys {
        assert_eq!(
            idx.get_hashed(pm, hashing.of(k), &key(k)),
            model.get(&k).copied(),
            "key {k}"
        );
    }
    assert_eq!(contents(idx, pm), model_contents(model, hashing));
    assert_eq!(idx.stats(pm).items, model.len() as u64);
}

// ---- model check ------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    Put(usize, usize),
    Remove(usize),
    Get(usize),
    ReplaceIf {
        k: usize,
        expected: usize,
        new: usize,
    },
}

const KEYS: usize = 40;
const VERSIONS: usize = 3;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0..KEYS, 0..VERSIONS).prop_map(|(k, v)| Step::Put(k, v)),
        2 => (0..KEYS).prop_map(Step::Remove),
        1 => (0..KEYS).prop_map(Step::Get),
        1 => (0..KEYS, 0..VERSIONS, 0..VERSIONS)
            .prop_map(|(k, expected, new)| Step::ReplaceIf { k, expected, new }),
    ]
}

fn hashing() -> impl Strategy<Value = Hashing> {
    prop_oneof![
        2 => Just(Hashing::Real),
        1 => (2..6usize).prop_map(|every| Hashing::Collide { every }),
        1 => (1..8u64).prop_map(|classes| Hashing::Few { classes }),
    ]
}

fn apply(
    idx: &Index,
    f: &Fixture,
    model: &mut HashMap<usize, EntryRef>,
    s: &Step,
    hashing: Hashing,
) {
    let pm = &f.pm;
    match *s {
        Step::Put(k, v) => {
            let got = idx
                .upsert_hashed(pm, hashing.of(k), &key(k), f.refs[k][v])
                .expect("upsert");
            assert_eq!(got, model.insert(k, f.refs[k][v]), "upsert {k}");
        }
        Step::Remove(k) => {
            let got = idx
                .remove_hashed(pm, hashing.of(k), &key(k))
                .expect("remove");
            assert_eq!(got, model.remove(&k), "remove {k}");
        }
        Step::Get(k) => assert_eq!(
            idx.get_hashed(pm, hashing.of(k), &key(k)),
            model.get(&k).copied()
        ),
        Step::ReplaceIf { k, expected, new } => {
            let (e, n) = (f.refs[k][expected], f.refs[k][new]);
            let got = idx
                .replace_if_hashed(pm, hashing.of(k), &key(k), e, n)
                .expect("replace_if");
            let want = model.get(&k) == Some(&e);
            if want {
                model.insert(k, n);
            }
            assert_eq!(got, want, "replace_if {k}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_a_hash_map(steps in prop::collection::vec(step(), 1..160), hashing in hashing()) {
        let f = Fixture::new(1 << 20, 10, 0, KEYS, VERSIONS);
        let idx = f.open();
        let mut model = HashMap::new();
        for s in &steps {
            apply(&idx, &f, &mut model, s, hashing);
            assert_matches(&idx, &f.pm, &model, KEYS, hashing);
        }
        // Reopening the same memory, or the durable image, rebuilds the same index.
        let before = idx.stats(&f.pm);
        let again = f.open();
        assert_eq!(again.stats(&f.pm), before);
        assert_matches(&again, &f.pm, &model, KEYS, hashing);
        let restarted = ShadowRegion::from_image(&f.region.durable_image());
        let pm2 = restarted.pmem();
        let idx2 = Index::open(&pm2, &f.geo).expect("open the durable image");
        assert_eq!(idx2.stats(&pm2), before);
        assert_matches(&idx2, &pm2, &model, KEYS, hashing);
    }
}

#[test]
fn tiny_table_grows_through_many_resizes() {
    let keys = 300;
    let f = Fixture::new(1 << 20, 10, 0, keys, 2);
    let idx = f.open();
    let mut model = HashMap::new();
    for k in 0..keys {
        assert_eq!(idx.upsert(&f.pm, &key(k), f.refs[k][0]), Ok(None));
        model.insert(k, f.refs[k][0]);
    }
    let s = idx.stats(&f.pm);
    assert!(s.generation >= 8, "{s:?}");
    assert!(s.load_factor <= 0.75 && s.load_factor > 0.3, "{s:?}");
    assert_eq!(s.used_bytes, (s.buckets + s.overflow_buckets) * BUCKET_SIZE);
    for k in (0..keys).step_by(2) {
        assert_eq!(
            idx.upsert(&f.pm, &key(k), f.refs[k][1]),
            Ok(Some(f.refs[k][0]))
        );
        model.insert(k, f.refs[k][1]);
    }
    for k in (0..keys).step_by(3) {
        assert_eq!(idx.remove(&f.pm, &key(k)), Ok(model.remove(&k)));
    }
    assert_matches(&idx, &f.pm, &model, keys, Hashing::Real);
    assert_eq!(f.open().stats(&f.pm), idx.stats(&f.pm));
    for k in 0..keys {
        assert_eq!(idx.get(&f.pm, &key(k)), model.get(&k).copied());
    }
}

/// A resize never takes the units promised to overflow buckets: with the whole area
/// reserved the table only chains (and every key stays reachable); the reserve still free
/// afterwards is at least what was promised.
#[test]
fn a_resize_leaves_the_reserved_area_units_free() {
    let keys = 300;
    let f = Fixture::new(1 << 20, 10, 0, keys, 1);
    let idx = f.open();
    let reserve = idx.area_free_units();
    idx.set_area_reserve(reserve);
    for k in 0..keys {
        assert_eq!(idx.upsert(&f.pm, &key(k), f.refs[k][0]), Ok(None));
    }
    let s = idx.stats(&f.pm);
    assert_eq!(s.generation, 1, "no resize took reserved units: {s:?}");
    assert!(s.overflow_buckets > 0, "{s:?}");
    for k in 0..keys {
        assert_eq!(idx.get(&f.pm, &key(k)), Some(f.refs[k][0]));
    }
    // Without the reserve the same load resizes.
    let g = Fixture::new(1 << 20, 10, 0, keys, 1);
    let idx = g.open();
    for k in 0..keys {
        assert_eq!(idx.upsert(&g.pm, &key(k), g.refs[k][0]), Ok(None));
    }
    assert!(idx.stats(&g.pm).generation > 1);
}

#[test]
fn equal_hashes_are_told_apart_by_key() {
    let keys = 20;
    let f = Fixture::new(1 << 20, 10, 2, keys, 2);
    let idx = f.open();
    let h = 42;
    for k in 0..keys {
        assert_eq!(idx.upsert_hashed(&f.pm, h, &key(k), f.refs[k][0]), Ok(None));
    }
    // One chain of 7 buckets; the table grew while chains were long, but all keys share one.
    for k in 0..keys {
        assert_eq!(idx.get_hashed(&f.pm, h, &key(k)), Some(f.refs[k][0]));
    }
    assert_eq!(idx.get_hashed(&f.pm, h, b"key-9999"), None);
    assert_eq!(
        idx.get_hashed(&f.pm, h, b"key-00"),
        None,
        "a prefix is not the key"
    );
    assert_eq!(
        idx.upsert_hashed(&f.pm, h, &key(7), f.refs[7][1]),
        Ok(Some(f.refs[7][0]))
    );
    assert_eq!(
        idx.replace_if_hashed(&f.pm, h, &key(8), f.refs[7][1], f.refs[8][1]),
        Ok(false)
    );
    assert_eq!(
        idx.replace_if_hashed(&f.pm, h, &key(8), f.refs[8][0], f.refs[8][1]),
        Ok(true)
    );
    assert_eq!(idx.remove_hashed(&f.pm, h, &key(3)), Ok(Some(f.refs[3][0])));
    assert_eq!(idx.remove_hashed(&f.pm, h, &key(3)), Ok(None));
    // The freed slot is reused by the next insert.
    let used = idx.stats(&f.pm).used_bytes;
    assert_eq!(idx.upsert_hashed(&f.pm, h, &key(3), f.refs[3][1]), Ok(None));
    assert_eq!(idx.stats(&f.pm).used_bytes, used);
    for k in 0..keys {
        let want = match k {
            3 | 7 | 8 => f.refs[k][1],
            _ => f.refs[k][0],
        };
        assert_eq!(idx.get_hashed(&f.pm, h, &key(k)), Some(want), "key {k}");
    }
    assert_eq!(idx.stats(&f.pm).items, keys as u64);
}

#[test]
fn full_area_reports_full_and_keeps_working() {
    // The smallest index area (64 KiB = 1024 buckets).
    let keys = 4000;
    let f = Fixture::new(4 << 20, 1, 0, keys, 1);
    let idx = f.open();
    let mut n = 0;
    let err = loop {
        match idx.upsert(&f.pm, &key(n), f.refs[n][0]) {
            Ok(None) => n += 1,
            other => break other,
        }
        assert!(n < keys, "the area must fill up");
    };
    assert_eq!(err, Err(IndexError::Full));
    assert!(n > 2000, "{n}");
    // Updates and deletes need no room; what is indexed stays readable.
    for k in 0..n {
        assert_eq!(idx.get(&f.pm, &key(k)), Some(f.refs[k][0]));
    }
    assert_eq!(idx.remove(&f.pm, &key(0)), Ok(Some(f.refs[0][0])));
    assert_eq!(idx.upsert(&f.pm, &key(0), f.refs[0][0]), Ok(None));
    let s = idx.stats(&f.pm);
    assert_eq!(s.used_bytes, s.area_bytes, "{s:?}");
    assert_eq!(f.open().stats(&f.pm), idx.stats(&f.pm));
}

#[test]
fn a_full_area_grows_into_given_log_blocks_and_open_finds_them() {
    let keys = 6000;
    let f = Fixture::new(4 << 20, 1, 0, keys, 1);
    let idx = f.open();
    // Blocks past the entries the fixture wrote.
    let last = f.geo.n_blocks as u32 - 1;
    let mut given = Vec::new();
    for k in 0..keys {
        loop {
            match idx.upsert(&f.pm, &key(k), f.refs[k][0]) {
                Ok(None) => break,
                Err(IndexError::Full) => {
                    let b = last - given.len() as u32;
                    idx.add_block(b).expect("a new block");
                    given.push(b);
                }
                other => panic!("key {k}: {other:?}"),
            }
        }
    }
    assert!(!given.is_empty(), "6000 keys must outgrow a 64 KiB area");
    assert_eq!(
        idx.add_block(given[0]),
        Err(IndexError::Corrupt("log block given to the index twice"))
    );
    for k in 0..keys {
        assert_eq!(idx.get(&f.pm, &key(k)), Some(f.refs[k][0]), "key {k}");
    }
    let s = idx.stats(&f.pm);
    assert_eq!(s.items, keys as u64);
    assert_eq!(s.blocks, given.len() as u64);
    // Recovery finds exactly the blocks that hold reachable buckets, with the same room.
    let again = f.open();
    given.sort_unstable();
    assert_eq!(again.blocks(), given);
    assert_eq!(again.stats(&f.pm), s);
    assert_eq!(again.block_free_units(), idx.block_free_units());
    for k in (0..keys).step_by(7) {
        assert_eq!(again.get(&f.pm, &key(k)), Some(f.refs[k][0]));
    }
    // A block given but never used is not the index's after a restart.
    idx.add_block(0).expect("an unused block");
    assert_eq!(f.open().blocks(), given);
}

#[test]
fn a_power_cut_while_linking_into_a_log_block_loses_nothing() {
    let keys = 3400;
    let f = Fixture::new(4 << 20, 1, 0, keys, 1);
    let block = f.geo.n_blocks as u32 - 1;
    // Fill the area (its last units are used by the last few inserts).
    let idx = f.open();
    let mut n = 0;
    while let Ok(None) = idx.upsert(&f.pm, &key(n), f.refs[n][0]) {
        n += 1;
    }
    drop(idx);
    let base = f.region.durable_image();
    // The next 60 inserts go to the block: cut the power at each persist point of them.
    let run = |idx: &Index, pm: &Pm| {
        idx.add_block(block).expect("block");
        for k in n..n + 60 {
            idx.upsert(pm, &key(k), f.refs[k][0])
                .expect("room in the block");
        }
    };
    let r0 = ShadowRegion::from_image(&base);
    let pm0 = r0.pmem();
    let idx0 = Index::open(&pm0, &f.geo).expect("open");
    let start = r0.fences();
    run(&idx0, &pm0);
    let total = r0.fences() - start;
    assert!(total >= 60, "{total}");
    for k in 0..=total {
        let r = ShadowRegion::from_image(&base);
        let pm = r.pmem();
        let idx = Index::open(&pm, &f.geo).expect("open");
        r.set_crash_after(Some(k));
        let _ = catch_power_failure(|| run(&idx, &pm));
        drop(idx);
        for image in [r.durable_image(), r.crash_image(k * 31 + 7, 50)] {
            let r2 = ShadowRegion::from_image(&image);
            let pm2 = r2.pmem();
            let rec = Index::open(&pm2, &f.geo).expect("recovery");
            let items = rec.stats(&pm2).items as usize;
            assert!((n..=n + 60).contains(&items), "crash at {k}: {items} items");
            // A prefix of the inserts, every one of them readable.
            for j in 0..items {
                assert_eq!(rec.get(&pm2, &key(j)), Some(f.refs[j][0]), "crash at {k}");
            }
            // Key `n` found the area full: its bucket is the first in the block, so the
            // block is the index's exactly when that insert survived.
            let want = if items > n { vec![block] } else { vec![] };
            assert_eq!(rec.blocks(), want, "crash at {k}");
        }
    }
}

// ---- concurrency --------------------------------------------------------------------------

#[test]
fn readers_never_see_another_keys_entry_during_merges_and_resizes() {
    // Each round starts from a one-bucket table, so every round resizes several times
    // while readers run.
    let hits: u64 = (0..4).map(concurrent_round).sum();
    assert!(hits > 1000, "readers must have found keys ({hits})");
}

fn concurrent_round(round: u64) -> u64 {
    const KEYS: usize = 400;
    const VERSIONS: usize = 4;
    const OPS: u64 = 8000;
    /// Keys below this are present throughout (only updated): a reader must always find them.
    const STABLE: usize = 24;
    let f = Arc::new(Fixture::new(4 << 20, 10, 0, KEYS, VERSIONS));
    let idx = Arc::new(f.open());
    for k in 0..STABLE {
        idx.upsert(&f.pm, &key(k), f.refs[k][0]).expect("upsert");
    }
    let done = Arc::new(AtomicBool::new(false));
    let valid: Arc<Vec<HashSet<EntryRef>>> =
        Arc::new(f.refs.iter().map(|v| v.iter().copied().collect()).collect());

    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (f, idx) = (Arc::clone(&f), Arc::clone(&idx));
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (round * 2 + w + 1);
                for i in 0..OPS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Keys appear in waves so that the table keeps growing during the run;
                    // both writers work on the same keys.
                    let span = (KEYS as u64 * (i + 1) * 2 / OPS).clamp(8, KEYS as u64);
                    let k = (x % span) as usize;
                    let v = (x >> 32) as usize % VERSIONS;
                    match x % 8 {
                        0 if k >= STABLE => {
                            idx.remove(&f.pm, &key(k)).expect("remove");
                        }
                        1 => {
                            idx.replace_if(
                                &f.pm,
                                &key(k),
                                f.refs[k][v],
                                f.refs[k][(v + 1) % VERSIONS],
                            )
                            .expect("replace_if");
                        }
                        _ => {
                            idx.upsert(&f.pm, &key(k), f.refs[k][v]).expect("upsert");
                        }
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (f, idx, done, valid) = (
                Arc::clone(&f),
                Arc::clone(&idx),
                Arc::clone(&done),
                Arc::clone(&valid),
            );
            std::thread::spawn(move || {
                let (mut hits, mut x) = (0u64, 0x2545_F491_4F6C_DD1Du64 ^ (round * 2 + r));
                while !done.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = (x % KEYS as u64) as usize;
                    let found = idx.get(&f.pm, &key(k));
                    assert!(found.is_some() || k >= STABLE, "key {k} is always present");
                    if let Some(got) = found {
                        assert!(
                            valid[k].contains(&got),
                            "key {k}: ref {got:?} is not one of its entries"
                        );
                        let (ek, ev) = read_entry(&f.pm, got);
                        assert_eq!(ek, key(k));
                        assert!(
                            ev.starts_with(&value(k, 0)[..22]),
                            "entry value names another key"
                        );
                        hits += 1;
                    }
                }
                hits
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    done.store(true, Ordering::Relaxed);
    let hits = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    let s = idx.stats(&f.pm);
    assert!(
        s.generation >= 6,
        "resizes must have happened during the run: {s:?}"
    );
    // Quiescent: every indexed ref is an entry of a key with that hash, each key at most once.
    let mut seen = HashSet::new();
    idx.for_each(&f.pm, |h, r| {
        let (ek, _) = read_entry(&f.pm, r);
        assert_eq!(key_hash(&ek), h);
        assert!(seen.insert(ek), "a key is indexed twice");
    });
    assert_eq!(seen.len() as u64, s.items);
    assert_eq!(f.open().stats(&f.pm), s);
    hits
}

// ---- power failure --------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum CrashOp {
    Put(usize, usize),
    Remove(usize),
    ReplaceIf(usize, usize, usize),
}

const CRASH_KEYS: usize = 24;
const CRASH_HASHING: Hashing = Hashing::Collide { every: 4 };

/// Inserts (with equal hashes for every 4th key, so chains overflow), updates, deletes,
/// compare-replaces, and re-inserts, starting from a one-bucket table.
fn crash_ops() -> Vec<CrashOp> {
    let mut ops: Vec<_> = (0..CRASH_KEYS).map(|k| CrashOp::Put(k, 0)).collect();
    ops.extend((0..CRASH_KEYS).step_by(3).map(|k| CrashOp::Put(k, 1)));
    ops.extend((0..CRASH_KEYS).step_by(4).map(CrashOp::Remove));
    ops.extend([
        CrashOp::ReplaceIf(1, 1, 2),
        CrashOp::ReplaceIf(2, 0, 2),
        CrashOp::ReplaceIf(5, 0, 1),
    ]);
    ops.extend([CrashOp::Put(0, 2), CrashOp::Put(4, 2), CrashOp::Remove(9)]);
    ops
}

fn run_crash_op(idx: &Index, f: &Fixture, pm: &Pm, op: CrashOp) {
    let h = |k| CRASH_HASHING.of(k);
    match op {
        CrashOp::Put(k, v) => {
            idx.upsert_hashed(pm, h(k), &key(k), f.refs[k][v])
                .expect("upsert");
        }
        CrashOp::Remove(k) => {
            idx.remove_hashed(pm, h(k), &key(k)).expect("remove");
        }
        CrashOp::ReplaceIf(k, e, n) => {
            idx.replace_if_hashed(pm, h(k), &key(k), f.refs[k][e], f.refs[k][n])
                .expect("replace_if");
        }
    }
}

fn model_step(model: &mut HashMap<usize, EntryRef>, f: &Fixture, op: CrashOp) {
    match op {
        CrashOp::Put(k, v) => {
            model.insert(k, f.refs[k][v]);
        }
        CrashOp::Remove(k) => {
            model.remove(&k);
        }
        CrashOp::ReplaceIf(k, e, n) => {
            if model.get(&k) == Some(&f.refs[k][e]) {
                model.insert(k, f.refs[k][n]);
            }
        }
    }
}

#[test]
fn every_power_cut_leaves_a_consistent_index() {
    let f = Fixture::new(512 << 10, 1, 0, CRASH_KEYS, 3);
    let base = f.region.durable_image();
    let ops = crash_ops();
    let mut states = vec![HashMap::new()];
    for &op in &ops {
        let mut next = states[states.len() - 1].clone();
        model_step(&mut next, &f, op);
        states.push(next);
    }

    // Count the persist points of the whole sequence.
    let total = {
        let r = ShadowRegion::from_image(&base);
        let pm = r.pmem();
        let idx = Index::open(&pm, &f.geo).expect("open");
        let start = r.fences();
        for &op in &ops {
            run_crash_op(&idx, &f, &pm, op);
        }
        assert_matches(&idx, &pm, &states[ops.len()], CRASH_KEYS, CRASH_HASHING);
        let s = idx.stats(&pm);
        assert!(s.generation >= 4, "the sequence must resize: {s:?}");
        r.fences() - start
    };
    assert!(total > 60, "{total}");

    let mut outcomes = [0u32; 2];
    for k in 0..total {
        let r = ShadowRegion::from_image(&base);
        let pm = r.pmem();
        let idx = Index::open(&pm, &f.geo).expect("open");
        r.set_crash_after(Some(k));
        let mut done = 0;
        let res = catch_power_failure(|| {
            for &op in &ops {
                run_crash_op(&idx, &f, &pm, op);
                done += 1;
            }
        });
        assert!(res.is_err(), "persist point {} must cut the power", k + 1);
        for image in [r.durable_image(), r.crash_image(k * 7919 + 1, 50)] {
            let r2 = ShadowRegion::from_image(&image);
            let pm2 = r2.pmem();
            let idx2 = Index::open(&pm2, &f.geo)
                .unwrap_or_else(|e| panic!("open after a cut at persist point {}: {e}", k + 1));
            let got = contents(&idx2, &pm2);
            let which = (0..2)
                .find(|&d| got == model_contents(&states[done + d], CRASH_HASHING))
                .unwrap_or_else(|| {
                    panic!(
                        "cut at persist point {} during op {done}: neither before nor after",
                        k + 1
                    )
                });
            outcomes[which] += 1;
            let mut model = states[done + which].clone();
            assert_matches(&idx2, &pm2, &model, CRASH_KEYS, CRASH_HASHING);
            let s = idx2.stats(&pm2);
            assert_eq!(s.used_bytes, (s.buckets + s.overflow_buckets) * BUCKET_SIZE);
            // And it keeps working.
            for op in [
                CrashOp::Put(3, 2),
                CrashOp::Remove(5),
                CrashOp::Put(8, 1),
                CrashOp::Put(6, 2),
            ] {
                run_crash_op(&idx2, &f, &pm2, op);
                model_step(&mut model, &f, op);
            }
            assert_matches(&idx2, &pm2, &model, CRASH_KEYS, CRASH_HASHING);
            let again = Index::open(&pm2, &f.geo).expect("reopen");
            assert_eq!(again.stats(&pm2), idx2.stats(&pm2));
        }
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    println!("persist points: {total}; recovered before/after the cut op: {outcomes:?}");
}

// ---- damaged regions ------------------------------------------------------------------------

fn corrupt_err(f: &Fixture) -> IndexError {
    Index::open(&f.pm, &f.geo).expect_err("a damaged index must be refused")
}

#[test]
fn garbage_roots_are_refused() {
    let f = Fixture::new(1 << 20, 10, 2, 8, 1);
    let area_end = f.geo.index_off + f.geo.index_len;
    let roots = [
        0,
        u64::MAX,
        0x0123_4567_89AB_CDEF,
        RootWord::new(0, 2, 1).expect("root").0,
        RootWord::new(area_end, 0, 1).expect("root").0,
        RootWord::new(area_end - 64, 1, 1).expect("root").0,
        RootWord::new(f.geo.index_off, 40, 1).expect("root").0,
        RootWord::new(f.geo.index_off, 63, 1).expect("root").0,
        RootWord::new(f.geo.index_off, 2, 0).expect("root").0,
        RootWord::new(f.geo.index_off, 2, 2).expect("root").0,
        RootWord::new(f.geo.index_off + 64, 2, 1).expect("root").0,
    ];
    for root in roots {
        f.pm.store_u64(f.geo.root_off(), root);
        assert!(
            matches!(corrupt_err(&f), IndexError::Corrupt(_)),
            "root {root:#x}"
        );
    }
}

#[test]
fn bad_chain_pointers_are_refused() {
    let f = Fixture::new(1 << 20, 10, 1, 8, 1);
    let idx = f.open();
    for k in 0..8 {
        idx.upsert_hashed(&f.pm, 2, &key(k), f.refs[k][0])
            .expect("upsert"); // one chain
    }
    let root = RootWord(f.pm.load_u64(f.geo.root_off()));
    let head = root.bucket_of(2);
    let first_next = f.pm.load_u64(head + Bucket::NEXT_OFFSET);
    assert_ne!(first_next, 0);
    let region = f.pm.len();
    for bad in [
        region,
        region + 64,
        u64::MAX - 63,
        first_next + 1,
        f.geo.index_off - 64,
        f.geo.index_off + f.geo.index_len,
        head,
        root.base(),
        f.geo.log_off,
    ] {
        f.pm.store_u64(head + Bucket::NEXT_OFFSET, bad);
        assert!(
            matches!(corrupt_err(&f), IndexError::Corrupt(_)),
            "next {bad:#x}"
        );
        // An index opened before the damage does not panic either (a pointer into another
        // bucket of the area is only caught by `open`).
        let r = idx.upsert_hashed(&f.pm, 2, &key(7), f.refs[7][0]);
        if bad >= f.geo.index_off + f.geo.index_len || bad % 64 != 0 || bad < f.geo.index_off {
            assert!(
                matches!(r, Err(IndexError::Corrupt(_))),
                "next {bad:#x}: {r:?}"
            );
        }
        let _ = idx.get_hashed(&f.pm, 2, &key(7));
        idx.for_each(&f.pm, |_, _| {});
    }
    f.pm.store_u64(head + Bucket::NEXT_OFFSET, first_next);
    f.open();
    // An overflow bucket of another generation, and a slot pointing outside the region.
    let meta = f.pm.load_u64(first_next);
    f.pm.store_u64(first_next, Bucket::meta_for(77));
    assert!(matches!(corrupt_err(&f), IndexError::Corrupt(_)));
    f.pm.store_u64(first_next, meta);
    f.pm.store_u64(
        first_next + Bucket::slot_ref_offset(0),
        EntryRef::new(region - 8, 64).expect("ref").0,
    );
    assert!(matches!(corrupt_err(&f), IndexError::Corrupt(_)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random words anywhere in the index (root included) never make it panic.
    #[test]
    fn random_damage_never_panics(damage in prop::collection::vec((0u64..1 << 16, any::<u64>(), 0u8..4), 1..6)) {
        let f = Fixture::new(1 << 20, 1, 2, 24, 1);
        let idx = f.open();
        for k in 0..24 {
            idx.upsert(&f.pm, &key(k), f.refs[k][0]).expect("upsert");
        }
        let words = (f.geo.index_len / 8).min(1 << 16);
        for &(at, v, kind) in &damage {
            let off = match kind {
                0 => f.geo.root_off(),
                _ => f.geo.index_off + (at % words) * 8,
            };
            // Mostly plausible offsets, sometimes raw garbage.
            let v = match kind {
                1 => f.geo.index_off + v % (2 * f.geo.index_len),
                _ => v,
            };
            f.pm.store_u64(off, v);
        }
        let _ = idx.get(&f.pm, &key(1));
        let _ = idx.upsert(&f.pm, &key(2), f.refs[2][0]);
        if let Ok(idx) = Index::open(&f.pm, &f.geo) {
            for k in 0..24 {
                let _ = idx.get(&f.pm, &key(k));
                let _ = idx.upsert(&f.pm, &key(k), f.refs[k][0]);
                let _ = idx.remove(&f.pm, &key(k ^ 1));
            }
            idx.for_each(&f.pm, |_, _| {});
            let _ = idx.stats(&f.pm);
        }
    }
}

#[test]
fn errors_display() {
    assert_eq!(IndexError::Full.to_string(), "the index area is full");
    assert_eq!(
        IndexError::Corrupt("x").to_string(),
        "the index is corrupt: x"
    );
}
