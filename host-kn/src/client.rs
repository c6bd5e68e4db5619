//! The client API: routes each request to the shard that owns its key.
//!
//! While a slot changes owner (see `Cluster::reconfigure` in the root crate) the router
//! marks it *moving*: requests for it are refused with [`KvError::TryAgain`] before they
//! reach any shard, and the client retries them after a short sleep. A shard refuses keys it
//! does not own under its installed map with [`KvError::WrongOwner`]; the client then
//! re-reads the router's map and retries. Both are retried for up to
//! [`Client::set_retry_for`] (10 s by default), so a move is invisible to callers except as
//! latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dinomo_shared::slot::{key_slot, SLOTS};

use crate::error::KvError;
use crate::ownership::{shard_of, SlotMap};
use crate::replica::{ReplicaRoutes, ReplicaView, Replicas};
use crate::shard::{validate_key, Msg, Reply, Request, ShardTx};

/// Words of the moving-slots bitset.
const MOVING_WORDS: usize = (SLOTS as usize).div_ceil(64);

/// Where every KN's shards are, the current map, and which slots are moving.
#[derive(Debug)]
pub struct Router {
    map: RwLock<Arc<SlotMap>>,
    /// Shard queues by KN id.
    kns: RwLock<Vec<Vec<ShardTx>>>,
    /// One bit per slot; read with a relaxed-cost atomic load on every request, written only
    /// by reconfiguration (no lock on the hot path).
    moving: Box<[AtomicU64]>,
    replicas: ReplicaRoutes,
}

impl Router {
    pub fn new(map: Arc<SlotMap>) -> Self {
        Self {
            map: RwLock::new(map),
            kns: RwLock::new(Vec::new()),
            moving: (0..MOVING_WORDS).map(|_| AtomicU64::new(0)).collect(),
            replicas: ReplicaRoutes::default(),
        }
    }

    /// Registers (or replaces) the shard queues of KN `kn`.
    pub fn add_kn(&self, kn: u16, shards: Vec<ShardTx>) {
        let mut kns = self.kns.write().unwrap_or_else(|e| e.into_inner());
        if kns.len() <= kn as usize {
            kns.resize(kn as usize + 1, Vec::new());
        }
        kns[kn as usize] = shards;
    }

    /// Forgets the shard queues of KN `kn` (requests routed to it get `WrongOwner`).
    pub fn remove_kn(&self, kn: u16) {
        let mut kns = self.kns.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = kns.get_mut(kn as usize) {
            s.clear();
        }
    }

    pub fn map(&self) -> Arc<SlotMap> {
        Arc::clone(&self.map.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_map(&self, map: Arc<SlotMap>) {
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Publishes the replicated keys: from now on clients send each to one of its replicas.
    pub fn set_replicas(&self, table: Arc<Replicas>) {
        self.replicas.publish(table);
    }

    /// The replicated keys as published.
    pub fn replicas(&self) -> Arc<Replicas> {
        self.replicas.table()
    }

    /// The queue of the shard of replica KN `kn` that serves replicated `key`.
    fn route_replica(&self, kn: u16, key: &[u8]) -> Result<ShardTx, KvError> {
        self.shard(kn, key_slot(key)).ok_or(KvError::ShuttingDown)
    }

    /// The queue of the shard of KN `kn` that serves `slot`, if the KN is running.
    fn shard(&self, kn: u16, slot: u16) -> Option<ShardTx> {
        let kns = self.kns.read().unwrap_or_else(|e| e.into_inner());
        let shards = kns.get(kn as usize).filter(|s| !s.is_empty())?;
        Some(shards[shard_of(slot, shards.len())].clone())
    }

    /// Marks `slots` as moving: requests for them get [`KvError::TryAgain`] until
    /// [`Router::clear_moving`]. Slots out of range are ignored.
    pub fn set_moving(&self, slots: &[u16]) {
        for &s in slots.iter().filter(|&&s| s < SLOTS) {
            self.moving[s as usize / 64].fetch_or(1 << (s % 64), Ordering::SeqCst);
        }
    }

    /// No slot is moving any more.
    pub fn clear_moving(&self) {
        for w in self.moving.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Whether `slot` is moving now.
    #[inline]
    pub fn is_moving(&self, slot: u16) -> bool {
        self.moving
            .get(slot as usize / 64)
            .is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (slot % 64)) != 0)
    }

    /// The shard queue for `key` under `map`; `TryAgain` if its slot is moving (unless
    /// `ignore_moving`), `WrongOwner` if its owner has no shards here.
    fn route(&self, map: &SlotMap, key: &[u8], ignore_moving: bool) -> Result<ShardTx, KvError> {
        let slot = key_slot(key);
        if !ignore_moving && self.is_moving(slot) {
            return Err(KvError::TryAgain { slot });
        }
        let owner = map.owner(slot);
        self.shard(owner, slot).ok_or(KvError::WrongOwner {
            owner,
            epoch: map.epoch(),
        })
    }
}

/// How long a client keeps retrying a moving or re-owned slot by default.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(10);

/// First pause before retrying a refused request; doubled per retry up to the maximum.
const RETRY_PAUSE_MIN: Duration = Duration::from_micros(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(2);

/// How long a client waits for a reply before giving up on a shard that went away.
const REPLY_LIMIT: Duration = Duration::from_secs(60);

/// A client: one per thread. Requests are synchronous, except `multi_get`, which sends all
/// its requests before waiting for any.
#[derive(Debug)]
pub struct Client {
    router: Arc<Router>,
    map: Arc<SlotMap>,
    tx: Sender<Reply>,
    rx: Receiver<Reply>,
    next_tag: u64,
    max_value: usize,
    retry_for: Duration,
    ignore_moving: bool,
    replicas: ReplicaView,
}

impl Client {
    pub fn new(router: Arc<Router>, max_value: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        let map = router.map();
        Self {
            router,
            map,
            tx,
            rx,
            next_tag: 0,
            max_value,
            retry_for: DEFAULT_RETRY_FOR,
            ignore_moving: false,
            replicas: ReplicaView::new(),
        }
    }

    /// Which replica this client sends replicated keys to: the `choice`-th of each key's
    /// replicas, modulo their number (by default, clients take turns).
    pub fn set_replica_choice(&mut self, choice: usize) {
        self.replicas.choice = choice;
    }

    /// Largest value accepted.
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// How long `TryAgain` and `WrongOwner` are retried before being returned
    /// (`Duration::ZERO`: never retried).
    pub fn set_retry_for(&mut self, d: Duration) {
        self.retry_for = d;
    }

    /// Sends requests of moving slots anyway (for copiers that move data of a slot while
    /// its ordinary clients are held back).
    pub fn set_ignore_moving(&mut self, yes: bool) {
        self.ignore_moving = yes;
    }

    fn send(&mut self, key: &[u8], op: Request) -> Result<u64, KvError> {
        self.replicas.refresh(&self.router.replicas);
        let shard = match self.replicas.pick(key) {
            Some(kn) => self.router.route_replica(kn, key)?,
            None => self.router.route(&self.map, key, self.ignore_moving)?,
        };
        self.next_tag += 1;
        let tag = self.next_tag;
        let sent = shard.send(Msg::Req {
            op,
            tag,
            reply: self.tx.clone(),
        });
        if sent.is_err() {
            // The shard stopped. If the map changed meanwhile, its slots are elsewhere now.
            let map = self.router.map();
            if !Arc::ptr_eq(&map, &self.map) {
                return Err(KvError::WrongOwner {
                    owner: map.owner(key_slot(key)),
                    epoch: map.epoch(),
                });
            }
            return Err(KvError::ShuttingDown);
        }
        Ok(tag)
    }

    fn wait(&mut self, tag: u64) -> Result<Option<Vec<u8>>, KvError> {
        loop {
            let r = recv_soon_for(&self.rx, REPLY_LIMIT).ok_or(KvError::ShuttingDown)?;
            if r.tag == tag {
                return r.result;
            }
        }
    }

    /// Sends `op` to the owner; retries `TryAgain` and `WrongOwner` (re-reading the map)
    /// for up to `retry_for`.
    fn call(&mut self, key: &[u8], op: impl Fn() -> Request) -> Result<Option<Vec<u8>>, KvError> {
        let mut retrying: Option<(Instant, Duration)> = None;
        loop {
            let r = match self.send(key, op()) {
                Ok(tag) => self.wait(tag),
                Err(e) => Err(e),
            };
            match r {
                Err(e) if e.is_retryable() => {
                    let (since, pause) = retrying.get_or_insert((Instant::now(), RETRY_PAUSE_MIN));
                    if since.elapsed() >= self.retry_for {
                        return Err(e);
                    }
                    let fresh = self.router.map();
                    let changed = !Arc::ptr_eq(&fresh, &self.map)
                        || self.replicas.is_stale(&self.router.replicas);
                    self.map = fresh;
                    // A new map (or replica table) is worth trying at once; otherwise wait
                    // for the move to end.
                    if !changed || matches!(e, KvError::TryAgain { .. }) {
                        std::thread::sleep(*pause);
                        *pause = (*pause * 2).min(RETRY_PAUSE_MAX);
                    }
                }
                r => return r,
            }
        }
    }

    /// The value of `key`, or `None` if it does not exist.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        validate_key(key)?;
        self.call(key, || Request::Get { key: key.to_vec() })
    }

    /// Sets `key` to `value`; returns once the write is durable.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        validate_key(key)?;
        if value.len() > self.max_value {
            return Err(KvError::ValueTooLarge {
                len: value.len(),
                max: self.max_value,
            });
        }
        self.call(key, || Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        })
        .map(|_| ())
    }

    /// Deletes `key` (deleting an absent key is not an error); returns once durable.
    pub fn delete(&mut self, key: &[u8]) -> Result<(), KvError> {
        validate_key(key)?;
        self.call(key, || Request::Delete { key: key.to_vec() })
            .map(|_| ())
    }

    /// Gets several keys, possibly from several shards, with all requests in flight at once.
    /// Keys refused because their slot is moving or changed owner are retried one by one.
    pub fn multi_get(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        for k in keys {
            validate_key(k)?;
        }
        let mut out: Vec<Option<Result<Option<Vec<u8>>, KvError>>> =
            (0..keys.len()).map(|_| None).collect();
        // (tag, index) in increasing tag order.
        let mut sent: Vec<(u64, usize)> = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            match self.send(k, Request::Get { key: k.to_vec() }) {
                Ok(tag) => sent.push((tag, i)),
                Err(e) if e.is_retryable() => out[i] = Some(Err(e)),
                Err(e) => return Err(e),
            }
        }
        let mut left = sent.len();
        while left > 0 {
            let r = recv_soon_for(&self.rx, REPLY_LIMIT).ok_or(KvError::ShuttingDown)?;
            if let Ok(j) = sent.binary_search_by_key(&r.tag, |&(t, _)| t) {
                let i = sent[j].1;
                if out[i].is_none() {
                    out[i] = Some(r.result);
                    left -= 1;
                }
            }
        }
        let mut values = Vec::with_capacity(keys.len());
        for (i, r) in out.into_iter().enumerate() {
            match r {
                Some(Err(e)) if e.is_retryable() => values.push(self.get(keys[i])?),
                Some(r) => values.push(r?),
                None => return Err(KvError::ShuttingDown),
            }
        }
        Ok(values)
    }
}

/// Receives from `rx`, first polling briefly (yielding the core between polls) because the
/// reply usually arrives within microseconds; then blocks (for at most `limit`). Saves a futex sleep and wake-up
/// per request under load.
fn recv_soon_for<T>(rx: &Receiver<T>, limit: Duration) -> Option<T> {
    for _ in 0..SPIN_POLLS {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            Err(mpsc::TryRecvError::Disconnected) => return None,
        }
    }
    rx.recv_timeout(limit).ok()
}

/// Polls before blocking in [`recv_soon_for`].
const SPIN_POLLS: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A stand-in shard: answers gets with `answer(kn)` until its queue closes.
    fn fake_kn(kn: u16, refuse: bool) -> (ShardTx, thread::JoinHandle<u64>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Msg>();
        let h = thread::spawn(move || {
            let mut served = 0;
            while let Some(m) = rx.blocking_recv() {
                if let Msg::Req { tag, reply, .. } = m {
                    let result = if refuse {
                        Err(KvError::WrongOwner {
                            owner: 1 - kn,
                            epoch: 1,
                        })
                    } else {
                        served += 1;
                        Ok(Some(vec![kn as u8]))
                    };
                    let _ = reply.send(Reply { tag, result });
                }
            }
            served
        });
        (tx, h)
    }

    fn map_of(epoch: u64, kn: u16) -> Arc<SlotMap> {
        Arc::new(SlotMap::from_owners(epoch, vec![kn; SLOTS as usize]).expect("full map"))
    }

    #[test]
    fn moving_bits_are_per_slot_and_cleared_together() {
        let r = Router::new(map_of(1, 0));
        r.set_moving(&[0, 63, 64, SLOTS - 1, SLOTS]);
        for s in [0, 63, 64, SLOTS - 1] {
            assert!(r.is_moving(s), "slot {s}");
        }
        assert!(!r.is_moving(1) && !r.is_moving(65) && !r.is_moving(SLOTS));
        r.clear_moving();
        assert!((0..SLOTS).all(|s| !r.is_moving(s)));
    }

    #[test]
    fn moving_slot_is_refused_with_tryagain_and_retried_until_cleared() {
        let router = Arc::new(Router::new(map_of(1, 0)));
        let (tx, h) = fake_kn(0, false);
        router.add_kn(0, vec![tx]);
        let slot = key_slot(b"k");
        router.set_moving(&[slot]);

        let mut c = Client::new(Arc::clone(&router), 64);
        c.set_retry_for(Duration::ZERO);
        assert_eq!(c.get(b"k"), Err(KvError::TryAgain { slot }));
        assert_eq!(c.get(b"other-slot"), Ok(Some(vec![0])));

        // A copier passes through.
        let mut copier = Client::new(Arc::clone(&router), 64);
        copier.set_ignore_moving(true);
        assert_eq!(copier.get(b"k"), Ok(Some(vec![0])));

        // An ordinary client waits for the move to end.
        c.set_retry_for(Duration::from_secs(30));
        let r2 = Arc::clone(&router);
        let clearer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            r2.clear_moving();
        });
        assert_eq!(c.get(b"k"), Ok(Some(vec![0])));
        clearer.join().expect("clearer");
        router.remove_kn(0);
        drop((c, copier));
        drop(router);
        assert_eq!(h.join().expect("fake shard"), 3);
    }

    #[test]
    fn wrong_owner_rereads_the_map_and_retries_at_the_new_owner() {
        let router = Arc::new(Router::new(map_of(1, 0)));
        let (tx0, h0) = fake_kn(0, true);
        let (tx1, h1) = fake_kn(1, false);
        router.add_kn(0, vec![tx0]);
        router.add_kn(1, vec![tx1]);
        let mut c = Client::new(Arc::clone(&router), 64);

        c.set_retry_for(Duration::ZERO);
        assert!(matches!(c.put(b"k", b"v"), Err(KvError::WrongOwner { .. })));

        c.set_retry_for(Duration::from_secs(30));
        let r2 = Arc::clone(&router);
        let publisher = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            r2.set_map(map_of(2, 1));
        });
        assert_eq!(c.get(b"k"), Ok(Some(vec![1])));
        publisher.join().expect("publisher");
        let keys: [&[u8]; 3] = [b"a", b"b", b"c"];
        assert_eq!(c.multi_get(&keys), Ok(vec![Some(vec![1]); 3]));

        router.remove_kn(0);
        router.remove_kn(1);
        drop(c);
        assert_eq!(h0.join().expect("kn0"), 0);
        assert_eq!(h1.join().expect("kn1"), 4);
    }

    #[test]
    fn multi_get_retries_only_the_moving_keys() {
        let router = Arc::new(Router::new(map_of(1, 0)));
        let (tx, h) = fake_kn(0, false);
        router.add_kn(0, vec![tx]);
        router.set_moving(&[key_slot(b"b")]);
        let mut c = Client::new(Arc::clone(&router), 64);
        c.set_retry_for(Duration::ZERO);
        let keys: [&[u8]; 3] = [b"a", b"b", b"c"];
        assert_eq!(
            c.multi_get(&keys),
            Err(KvError::TryAgain {
                slot: key_slot(b"b")
            })
        );
        router.clear_moving();
        assert_eq!(c.multi_get(&keys), Ok(vec![Some(vec![0]); 3]));
        router.remove_kn(0);
        drop(c);
        assert_eq!(h.join().expect("fake shard"), 5);
    }
}
