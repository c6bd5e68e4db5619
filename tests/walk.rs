//! Walks of a shard's keys in the DPM index (the pages behind SCAN, KEYS, DBSIZE and
//! CLUSTER COUNTKEYSINSLOT), in one process over the shm fabric: every key that exists
//! throughout a walk comes back at least once, also when it is an own unmerged write, when
//! it is rewritten or merged mid-walk, and when the index is resized mid-walk; deleted keys
//! do not come back; counts are exact; and a walk costs a bounded number of round trips.

use std::collections::{BTreeMap, HashSet};

use dinomo::cluster::{Cluster, ClusterConfig};
use dinomo_shared::slot::key_slot;
use host_kn::shard::{Msg, ScanMode, ScanPage, ScanRequest, ScanRestart, ShardTx};

/// 16 MiB: a 2 MiB index area whose first table (1024 head buckets) resizes at about
/// 2300 keys and again at about 4600.
fn cfg() -> ClusterConfig {
    ClusterConfig {
        kns: 2,
        shards_per_kn: 2,
        region_bytes: 16 << 20,
        block_size: Some(256 << 10),
        cache_bytes_per_kn: 1 << 20,
        ..ClusterConfig::default()
    }
}

fn shards(c: &Cluster) -> Vec<ShardTx> {
    c.kns()
        .iter()
        .flat_map(|k| k.senders().iter().cloned())
        .collect()
}

fn page(tx: &ShardTx, req: ScanRequest) -> ScanPage {
    let (otx, orx) = tokio::sync::oneshot::channel();
    tx.send(Msg::Scan { req, reply: otx }).expect("shard up");
    orx.blocking_recv().expect("reply").expect("scan page")
}

fn keys_req(cursor: u64, count: usize) -> ScanRequest {
    ScanRequest {
        cursor,
        count,
        now_ms: 0,
        slot: None,
        mode: ScanMode::Keys,
    }
}

/// A whole counting walk of one shard, paged (what DBSIZE does per shard).
fn count(tx: &ShardTx, slot: Option<u16>) -> u64 {
    let mut req = ScanRequest {
        cursor: 0,
        count: usize::MAX,
        now_ms: 0,
        slot,
        mode: ScanMode::Count,
    };
    let (mut own, mut index) = (0, 0);
    loop {
        let p = page(tx, req);
        match p.restart {
            ScanRestart::None => {}
            ScanRestart::Index => index = 0,
            ScanRestart::All => (own, index) = (0, 0),
        }
        if p.index_phase {
            index += p.counted;
        } else {
            own += p.counted;
        }
        if p.cursor == 0 {
            return own + index;
        }
        req.cursor = p.cursor;
    }
}

/// What a whole walk of one shard found and cost.
#[derive(Debug)]
struct Walk {
    found: u64,
    pages: u64,
    overflow_rts: u64,
    rts: u64,
}

fn walk(tx: &ShardTx, count: usize, mode: ScanMode) -> Walk {
    let t0 = round_trips(tx);
    let mut w = Walk {
        found: 0,
        pages: 0,
        overflow_rts: 0,
        rts: 0,
    };
    let mut req = ScanRequest {
        cursor: 0,
        count,
        now_ms: 0,
        slot: None,
        mode,
    };
    loop {
        let p = page(tx, req);
        assert_eq!(p.restart, ScanRestart::None);
        w.pages += 1;
        w.overflow_rts += u64::from(p.overflow_rts);
        w.found += p.keys.len() as u64 + p.counted;
        req.cursor = p.cursor;
        if p.cursor == 0 {
            break;
        }
    }
    w.rts = round_trips(tx) - t0;
    w
}

fn round_trips(tx: &ShardTx) -> u64 {
    let (stx, srx) = std::sync::mpsc::channel();
    tx.send(Msg::Stats(stx)).expect("shard up");
    srx.recv().expect("stats").fabric.round_trips
}

fn k(p: &str, i: u32) -> Vec<u8> {
    format!("{p}:{i:05}").into_bytes()
}

/// The model: keys written and not deleted since.
#[derive(Default)]
struct Model(HashSet<Vec<u8>>);

impl Model {
    fn put(&mut self, cl: &mut host_kn::Client, key: Vec<u8>) {
        cl.put(&key, b"value-of-a-key").expect("put");
        self.0.insert(key);
    }
    fn del(&mut self, cl: &mut host_kn::Client, key: Vec<u8>) {
        cl.delete(&key).expect("delete");
        self.0.remove(&key);
    }
}

#[test]
fn a_walk_returns_own_unmerged_keys_that_are_merged_into_walked_buckets_mid_walk() {
    walk_through_changes(false);
}

#[test]
fn a_walk_returns_every_key_that_exists_throughout_a_resize() {
    walk_through_changes(true);
}

/// Merged keys, then (merging paused) own unmerged puts, deletes and rewrites; a walk of
/// every shard to past its first chunk of the index; then new keys, merging resumed (the
/// unmerged keys move into the index, also into buckets already walked) and, with
/// `resize`, enough new keys to resize the index; then the rest of the walk.
fn walk_through_changes(resize: bool) {
    let mut c = Cluster::start(&cfg()).expect("cluster");
    let mut cl = c.client();
    let mut m = Model::default();
    for i in 0..3000 {
        m.put(&mut cl, k("a", i));
    }
    c.sync().expect("sync");
    let dpm = std::sync::Arc::clone(c.dpm());
    let ix = || dpm.index().stats(dpm.pmem());
    let gen0 = ix().generation;
    // Own unmerged writes: new keys, deletes and rewrites of merged keys.
    c.pause_merging();
    for i in 0..400 {
        m.put(&mut cl, k("b", i));
    }
    let mut deleted = HashSet::new();
    for i in (0..3000).step_by(10) {
        m.del(&mut cl, k("a", i));
        deleted.insert(k("a", i));
    }
    for i in (5..3000).step_by(10) {
        m.put(&mut cl, k("a", i));
    }
    let throughout = m.0.clone();

    // Walk every shard until it is into the index (phase 1, past its first chunk).
    let txs = shards(&c);
    let mut seen: Vec<Vec<Vec<u8>>> = vec![Vec::new(); txs.len()];
    let mut cursors = vec![0u64; txs.len()];
    for (s, tx) in txs.iter().enumerate() {
        loop {
            let p = page(tx, keys_req(cursors[s], 20));
            seen[s].extend(p.keys.into_iter().map(|k| k.key));
            cursors[s] = p.cursor;
            assert_ne!(p.cursor, 0, "shard {s} finished before the resize");
            if p.index_phase {
                break;
            }
        }
    }
    // Mid-walk: new keys, merging goes on (unmerged keys move into walked buckets), and
    // enough keys for the index to resize.
    for i in 0..300 {
        m.put(&mut cl, k("c", i));
    }
    c.resume_merging().expect("resume");
    if resize {
        for i in 0..3000 {
            m.put(&mut cl, k("d", i));
        }
    }
    c.sync().expect("sync");
    assert_eq!(
        ix().generation > gen0,
        resize,
        "resized or not as planned: {:?}",
        ix()
    );
    let mut restarts = 0;
    for (s, tx) in txs.iter().enumerate() {
        while cursors[s] != 0 {
            let p = page(tx, keys_req(cursors[s], 20));
            restarts += usize::from(p.restart == ScanRestart::Index);
            assert_ne!(p.restart, ScanRestart::All, "the map did not change");
            seen[s].extend(p.keys.into_iter().map(|k| k.key));
            cursors[s] = p.cursor;
        }
    }
    let want = if resize { txs.len() } else { 0 };
    assert_eq!(restarts, want, "walks that restarted phase 1");
    let all: HashSet<&Vec<u8>> = seen.iter().flatten().collect();
    let missing: Vec<_> = throughout
        .iter()
        .filter(|k| !all.contains(k))
        .map(|k| String::from_utf8_lossy(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} keys missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for key in &all {
        assert!(
            m.0.contains(*key),
            "returned a key that does not exist: {:?}",
            String::from_utf8_lossy(key)
        );
        assert!(!deleted.contains(*key));
    }
    // Each shard returned only keys of its own slots: no key came from two shards.
    let total: usize = seen
        .iter()
        .map(|v| v.iter().collect::<HashSet<_>>().len())
        .sum();
    assert_eq!(total, all.len());
    c.stop();
}

#[test]
fn counts_are_exact_with_unmerged_writes_and_after_merging() {
    let mut c = Cluster::start(&cfg()).expect("cluster");
    let mut cl = c.client();
    let mut m = Model::default();
    for i in 0..2000 {
        m.put(&mut cl, k("a", i));
    }
    c.sync().expect("sync");
    c.pause_merging();
    for i in 0..300 {
        m.put(&mut cl, k("b", i));
    }
    for i in (0..2000).step_by(7) {
        m.del(&mut cl, k("a", i));
    }
    for i in (3..2000).step_by(7) {
        m.put(&mut cl, k("a", i));
    }
    let txs = shards(&c);
    let mut by_slot: BTreeMap<u16, u64> = BTreeMap::new();
    for key in &m.0 {
        *by_slot.entry(key_slot(key)).or_default() += 1;
    }
    let map = c.router().map();
    let kn_ids: Vec<u16> = c.kns().iter().map(|k| k.kn_id).collect();
    let slot_of = |slot: u16| -> &ShardTx {
        let kn = map.owner(slot);
        let kn_idx = kn_ids.iter().position(|&k| k == kn).expect("owner");
        let shard = host_kn::ownership::shard_of(slot, 2);
        &txs[kn_idx * 2 + shard]
    };
    for round in 0..2 {
        let total: u64 = txs.iter().map(|tx| count(tx, None)).sum();
        assert_eq!(total, m.0.len() as u64, "DBSIZE (round {round})");
        for (&slot, &n) in by_slot.iter().step_by(97) {
            assert_eq!(
                count(slot_of(slot), Some(slot)),
                n,
                "slot {slot} (round {round})"
            );
        }
        // A slot without keys counts 0.
        let empty = (0..16384u16)
            .find(|s| !by_slot.contains_key(s))
            .expect("an empty slot");
        assert_eq!(count(slot_of(empty), Some(empty)), 0);
        c.resume_merging().expect("resume");
        c.sync().expect("sync");
    }
    c.stop();
}

#[test]
fn a_walk_costs_a_bounded_number_of_round_trips() {
    let c = Cluster::start(&cfg()).expect("cluster");
    let mut cl = c.client();
    for i in 0..4000 {
        cl.put(&k("a", i), b"value-of-a-key").expect("put");
    }
    c.sync().expect("sync");
    let ix = c.dpm().index().stats(c.dpm().pmem());
    let txs = shards(&c);
    let head_bytes = ix.buckets * 64;
    for (s, tx) in txs.iter().enumerate() {
        // COUNT 1: 64 KiB chunks (the smallest); then a whole count (DBSIZE): 1 MiB chunks.
        let small = walk(tx, 1, ScanMode::Keys);
        let large = walk(tx, usize::MAX, ScanMode::Count);
        assert_eq!(small.found, large.found);
        eprintln!(
            "shard {s}: {} keys; index {} B ({} head + {} overflow buckets); COUNT 1: {} RTs, \
             {} pages, {} overflow RTs; whole count: {} RTs, {} pages, {} overflow RTs",
            small.found,
            (ix.buckets + ix.overflow_buckets) * 64,
            ix.buckets,
            ix.overflow_buckets,
            small.rts,
            small.pages,
            small.overflow_rts,
            large.rts,
            large.pages,
            large.overflow_rts
        );
        // A page is one round trip for its chunk of head buckets (with the root word), one
        // per level of overflow buckets (their READs coalesced), one for its entries (also
        // coalesced); one more for the root word at most once.
        for (w, chunk) in [(&small, 64u64 << 10), (&large, 1 << 20)] {
            assert!(w.pages <= head_bytes.div_ceil(chunk), "{w:?}");
            assert!(w.rts <= 2 * w.pages + w.overflow_rts + 1, "{w:?}");
        }
        assert!(large.rts <= 8, "{large:?}");
    }
    c.stop();
}

/// A walk begun before slots moved in (a KN left) starts over when it sees the new map,
/// and returns the keys of the slots that moved in too.
#[test]
fn a_walk_from_before_slots_moved_in_starts_over_and_returns_them() {
    let mut c = Cluster::start(&cfg()).expect("cluster");
    let mut cl = c.client();
    let mut m = Model::default();
    for i in 0..3000 {
        m.put(&mut cl, k("a", i));
    }
    c.sync().expect("sync");
    let stay: Vec<ShardTx> = c.kns()[0].senders().to_vec();
    let leaving = c.kns()[1].kn_id;
    let mut cursors = vec![0u64; stay.len()];
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for (s, tx) in stay.iter().enumerate() {
        loop {
            let p = page(tx, keys_req(cursors[s], 20));
            seen.extend(p.keys.into_iter().map(|k| k.key));
            cursors[s] = p.cursor;
            assert_ne!(p.cursor, 0, "{s}: {} seen, {:?}", seen.len(), p.restart);
            if p.index_phase {
                break;
            }
        }
    }
    c.remove_kn(leaving).expect("remove a KN");
    let mut restarts = 0;
    for (s, tx) in stay.iter().enumerate() {
        while cursors[s] != 0 {
            let p = page(tx, keys_req(cursors[s], 20));
            restarts += usize::from(p.restart == ScanRestart::All);
            seen.extend(p.keys.into_iter().map(|k| k.key));
            cursors[s] = p.cursor;
        }
    }
    assert_eq!(restarts, stay.len(), "every walk started over once");
    let missing = m.0.iter().filter(|k| !seen.contains(*k)).count();
    assert_eq!(missing, 0, "keys of every slot, moved in or not, come back");
    c.stop();
}

/// Keys that expired by the walk's clock, and deleted keys, are left out of keys and
/// counts; a key expiring exactly now is still there (as in Redis). The expiring entries
/// are written by another log, as a previous owner of the slots would have.
#[test]
fn expired_and_deleted_keys_are_left_out() {
    use dinomo_shared::block::BLOCK_HEADER_SIZE;
    use dinomo_shared::entry::{self, Op, FLAG_EXPIRES};

    let c = Cluster::start(&cfg()).expect("cluster");
    let mut cl = c.client();
    let mut m = Model::default();
    for i in 0..200 {
        m.put(&mut cl, k("live", i));
    }
    for i in (0..200).step_by(4) {
        m.del(&mut cl, k("live", i));
    }
    let dpm = std::sync::Arc::clone(c.dpm());
    let mut lw = dpm_fw::logwriter::LogWriter::open(&dpm, 7, 9).expect("open a log");
    let mut batch = Vec::new();
    for i in 0..50u32 {
        let at = 1000 + 100 * u64::from(i);
        let mut stored = at.to_le_bytes().to_vec();
        stored.extend_from_slice(b"expiring value");
        let key = k("exp", i);
        let len = entry::padded_len(key.len(), stored.len());
        let from = batch.len();
        batch.resize(from + len, 0);
        entry::encode_flagged(
            &mut batch[from..],
            lw.salt,
            Op::Put,
            FLAG_EXPIRES,
            1,
            lw.next_seq,
            &key,
            &stored,
        )
        .expect("encode");
        lw.next_seq += 1;
    }
    assert_eq!(lw.offset, BLOCK_HEADER_SIZE);
    let off = dpm.geometry().block_off(lw.block) + lw.offset;
    dpm.pmem().write(off, &batch);
    dpm.pmem().persist(off, batch.len() as u64);
    let t0 = std::time::Instant::now();
    while dpm.lookup(&k("exp", 49)).is_none() {
        assert!(
            t0.elapsed().as_secs() < 30,
            "the expiring entries were not merged"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    c.sync().expect("sync");
    // At 3500 ms: exp:00000..exp:00024 expired, exp:00025 expires exactly now.
    let now = 3500;
    let mut got = BTreeMap::new();
    let mut counted = 0;
    for tx in &shards(&c) {
        let mut req = ScanRequest {
            now_ms: now,
            ..keys_req(0, 100)
        };
        loop {
            let p = page(tx, req);
            for key in p.keys {
                got.insert(key.key, key.expire_at);
            }
            if p.cursor == 0 {
                break;
            }
            req.cursor = p.cursor;
        }
        let mut req = ScanRequest {
            now_ms: now,
            mode: ScanMode::Count,
            ..keys_req(0, usize::MAX)
        };
        loop {
            let p = page(tx, req);
            counted += p.counted;
            if p.cursor == 0 {
                break;
            }
            req.cursor = p.cursor;
        }
    }
    let mut want: BTreeMap<Vec<u8>, Option<u64>> = m.0.iter().map(|k| (k.clone(), None)).collect();
    for i in 25..50u32 {
        want.insert(k("exp", i), Some(1000 + 100 * u64::from(i)));
    }
    assert_eq!(got, want);
    assert_eq!(counted, want.len() as u64);
    // The walk deleted the keys it found expired (nobody read them): once merged, they are
    // gone from the index, their space reclaimable; the others are still there.
    c.sync().expect("sync");
    for i in 0..50u32 {
        assert_eq!(dpm.lookup(&k("exp", i)).is_some(), i >= 25, "exp:{i}");
    }
    assert_eq!(c.stats().expired, 25);
    c.stop();
}

/// Not a check: prints what whole walks cost on a larger index (`KEYS`, `VLEN` set the
/// keys and value size). `cargo test --release --test walk -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_walks_of_a_larger_index() {
    let keys: u32 = std::env::var("KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let vlen: usize = std::env::var("VLEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let c = Cluster::start(&ClusterConfig {
        kns: 2,
        shards_per_kn: 2,
        region_bytes: 256 << 20,
        block_size: Some(1 << 20),
        cache_bytes_per_kn: 1 << 20,
        ..ClusterConfig::default()
    })
    .expect("cluster");
    let mut cl = c.client();
    let v = vec![b'x'; vlen];
    for i in 0..keys {
        cl.put(format!("key:{i:08}").as_bytes(), &v).expect("put");
    }
    c.sync().expect("sync");
    let ix = c.dpm().index().stats(c.dpm().pmem());
    eprintln!("{keys} keys of {vlen} B values; index {:?}", ix);
    for (s, tx) in shards(&c).iter().enumerate() {
        for (count, mode) in [
            (10, ScanMode::Keys),
            (1000, ScanMode::Keys),
            (usize::MAX, ScanMode::Count),
        ] {
            let t = std::time::Instant::now();
            let w = walk(tx, count, mode);
            eprintln!(
                "shard {s} count {count} {mode:?}: {w:?}, {:.1} RTs/page, {:?}",
                w.rts as f64 / w.pages as f64,
                t.elapsed()
            );
        }
    }
    c.stop();
}
