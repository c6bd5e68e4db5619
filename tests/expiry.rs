//! Expiry times and whole-command jobs at the shard level, in one process over shm: an
//! expiring write is read back with its time (from the cache and from the memory node),
//! a key whose time came reads as absent and is deleted (lazily when read, actively when
//! nobody reads it), a later write without a time clears it, and a watched key's write
//! number changes with every write.

use std::time::{Duration, Instant};

use dinomo::cluster::{Cluster, ClusterConfig};
use dinomo_shared::slot::key_slot;
use host_kn::clock::now_ms;
use host_kn::ownership::shard_of;
use host_kn::shard::{ExecJob, KeyAccess, Msg, ReplyResult};
use host_kn::KvError;

fn cluster() -> Cluster {
    Cluster::start(&ClusterConfig {
        kns: 1,
        shards_per_kn: 2,
        region_bytes: 64 << 20,
        block_size: Some(256 << 10),
        cache_bytes_per_kn: 1 << 20,
        ..ClusterConfig::default()
    })
    .expect("cluster")
}

/// A key of shard 0 of the only KN.
fn key_of_shard0(tag: &str) -> Vec<u8> {
    (0..)
        .map(|i| format!("{tag}:{i}").into_bytes())
        .find(|k| shard_of(key_slot(k), 2) == 0)
        .expect("a key")
}

/// Runs `job` on shard 0; returns what it returned and the outcome of its writes.
fn run<T: Send + 'static>(
    c: &Cluster,
    job: impl FnOnce(&mut dyn KeyAccess) -> T + Send + 'static,
) -> (T, Vec<Option<ReplyResult>>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (done, durable) = tokio::sync::oneshot::channel();
    let job = ExecJob(Box::new(move |acc: &mut dyn KeyAccess| {
        let _ = tx.send(job(acc));
    }));
    c.kns()[0].senders()[0]
        .send(Msg::Exec { job, done })
        .expect("shard 0");
    let out = rx.recv().expect("job ran");
    (out, durable.blocking_recv().expect("writes answered"))
}

fn all_ok(r: &[Option<ReplyResult>]) -> bool {
    r.iter().all(|x| matches!(x, Some(Ok(_))))
}

#[test]
fn an_expiring_key_is_read_with_its_time_and_is_gone_once_it_came() {
    let c = cluster();
    let k = key_of_shard0("exp");
    let t = now_ms() + 400;
    let (k2, (read, writes)) = (k.clone(), {
        let k = k.clone();
        run(&c, move |acc| {
            acc.write(&k, Some(b"hello".to_vec()), Some(t))
                .expect("write");
            // The job's own write is seen by its next read (the batch is flushed first).
            acc.read(&k)
        })
    });
    assert!(all_ok(&writes));
    assert_eq!(read.expect("read"), Some((b"hello".to_vec(), Some(t))));
    // From the cache (the write cached the value): the time comes with it.
    let mut cl = c.client();
    assert_eq!(cl.get(&k2).expect("get"), Some(b"hello".to_vec()));
    let (again, _) = run(&c, {
        let k = k2.clone();
        move |acc| acc.read(&k)
    });
    assert_eq!(again.expect("read"), Some((b"hello".to_vec(), Some(t))));
    let expired0 = c.kns()[0].stats().expired;
    while now_ms() <= t {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        cl.get(&k2).expect("get"),
        None,
        "an expired key is never returned"
    );
    // Deleted once, by the read or by the sweep that any message triggers.
    assert_eq!(c.kns()[0].stats().expired, expired0 + 1);
    // The delete was logged: the key stays absent after a merge and a cold read.
    c.kns()[0].sync().expect("sync");
    assert_eq!(cl.get(&k2).expect("get"), None);
    c.stop();
}

#[test]
fn a_key_nobody_reads_is_deleted_when_its_time_comes() {
    let c = cluster();
    let k = key_of_shard0("sweep");
    let t = now_ms() + 200;
    let (_, writes) = run(&c, {
        let k = k.clone();
        move |acc| acc.write(&k, Some(b"v".to_vec()), Some(t))
    });
    assert!(all_ok(&writes));
    let deletes0 = c.kns()[0].stats().deletes;
    let t0 = Instant::now();
    // Any message makes the shard look for due keys; the key itself is never read.
    while c.kns()[0].stats().deletes == deletes0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the expired key was never deleted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(now_ms() > t, "deleted before its time");
    assert!(c.kns()[0].stats().expired >= 1);
    c.stop();
}

#[test]
fn a_write_without_a_time_clears_it_and_bad_writes_change_nothing() {
    let c = cluster();
    let k = key_of_shard0("persist");
    let far = now_ms() + 3_600_000;
    let ((first, second, too_big), writes) = run(&c, {
        let k = k.clone();
        move |acc| {
            acc.write(&k, Some(b"a".to_vec()), Some(far))
                .expect("write");
            let first = acc.read(&k);
            acc.write(&k, Some(b"b".to_vec()), None).expect("write");
            let second = acc.read(&k);
            let max = acc.max_value(&k);
            // A value that fits without its expiry time but not with it is refused.
            let too_big = acc.write(&k, Some(vec![0; max]), Some(far));
            (first, second, too_big)
        }
    });
    assert!(all_ok(&writes));
    assert_eq!(first.expect("read"), Some((b"a".to_vec(), Some(far))));
    assert_eq!(second.expect("read"), Some((b"b".to_vec(), None)));
    assert!(
        matches!(too_big, Err(KvError::ValueTooLarge { .. })),
        "{too_big:?}"
    );
    let (after, _) = run(&c, move |acc| acc.read(&k));
    assert_eq!(after.expect("read"), Some((b"b".to_vec(), None)));
    c.stop();
}

#[test]
fn a_watched_key_changes_its_write_number_with_every_write() {
    let c = cluster();
    let k = key_of_shard0("watch");
    let ((v0, unwatched), _) = run(&c, {
        let k = k.clone();
        move |acc| {
            let v0 = acc.watch(&k);
            (v0, acc.watched(b"nobody-watches-this"))
        }
    });
    assert_eq!(unwatched, None);
    let (still, _) = run(&c, {
        let k = k.clone();
        move |acc| acc.watched(&k)
    });
    assert_eq!(still, Some(v0), "nothing wrote it");
    let mut cl = c.client();
    cl.put(&k, b"x").expect("put");
    let (after, _) = run(&c, {
        let k = k.clone();
        move |acc| {
            let n = acc.watched(&k);
            acc.unwatch(&k);
            (n, acc.watched(&k))
        }
    });
    assert_ne!(after.0, Some(v0), "a write changes the number");
    assert!(after.0.is_some());
    assert_eq!(after.1, None, "forgotten once its last watcher left");
    c.stop();
}
