//! The client API: routes each request to the shard that owns its key.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, RwLock};

use dinomo_shared::slot::key_slot;

use crate::error::KvError;
use crate::ownership::{shard_of, SlotMap};
use crate::shard::{validate_key, Msg, Reply, Request};

/// Where every KN's shards are, and the current map.
#[derive(Debug)]
pub struct Router {
    map: RwLock<Arc<SlotMap>>,
    /// Shard queues by KN id.
    kns: RwLock<Vec<Vec<Sender<Msg>>>>,
}

impl Router {
    pub fn new(map: Arc<SlotMap>) -> Self {
        Self {
            map: RwLock::new(map),
            kns: RwLock::new(Vec::new()),
        }
    }

    /// Registers (or replaces) the shard queues of KN `kn`.
    pub fn add_kn(&self, kn: u16, shards: Vec<Sender<Msg>>) {
        let mut kns = self.kns.write().unwrap_or_else(|e| e.into_inner());
        if kns.len() <= kn as usize {
            kns.resize(kn as usize + 1, Vec::new());
        }
        kns[kn as usize] = shards;
    }

    pub fn map(&self) -> Arc<SlotMap> {
        Arc::clone(&self.map.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_map(&self, map: Arc<SlotMap>) {
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    fn route(&self, map: &SlotMap, key: &[u8]) -> Result<Sender<Msg>, KvError> {
        let slot = key_slot(key);
        let owner = map.owner(slot);
        let kns = self.kns.read().unwrap_or_else(|e| e.into_inner());
        let shards =
            kns.get(owner as usize)
                .filter(|s| !s.is_empty())
                .ok_or(KvError::WrongOwner {
                    owner,
                    epoch: map.epoch(),
                })?;
        Ok(shards[shard_of(slot, shards.len())].clone())
    }
}

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
        }
    }

    /// Largest value accepted.
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    fn send(&mut self, key: &[u8], op: Request) -> Result<u64, KvError> {
        let shard = self.router.route(&self.map, key)?;
        self.next_tag += 1;
        let tag = self.next_tag;
        shard
            .send(Msg::Req {
                op,
                tag,
                reply: self.tx.clone(),
            })
            .map_err(|_| KvError::ShuttingDown)?;
        Ok(tag)
    }

    fn wait(&mut self, tag: u64) -> Result<Option<Vec<u8>>, KvError> {
        loop {
            let r = recv_soon(&self.rx).ok_or(KvError::ShuttingDown)?;
            if r.tag == tag {
                return r.result;
            }
        }
    }

    /// Sends `op` to the owner; on `WrongOwner` refreshes the map once and retries.
    fn call(&mut self, key: &[u8], op: impl Fn() -> Request) -> Result<Option<Vec<u8>>, KvError> {
        let tag = self.send(key, op())?;
        match self.wait(tag) {
            Err(KvError::WrongOwner { .. }) if !Arc::ptr_eq(&self.map, &self.router.map()) => {
                self.map = self.router.map();
                let tag = self.send(key, op())?;
                self.wait(tag)
            }
            r => r,
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
    pub fn multi_get(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        for k in keys {
            validate_key(k)?;
        }
        let mut tags = Vec::with_capacity(keys.len());
        for k in keys {
            tags.push(self.send(k, Request::Get { key: k.to_vec() })?);
        }
        let mut out: Vec<Option<Result<Option<Vec<u8>>, KvError>>> =
            (0..keys.len()).map(|_| None).collect();
        let mut left = keys.len();
        let first = tags.first().copied().unwrap_or(0);
        while left > 0 {
            let r = self.rx.recv().map_err(|_| KvError::ShuttingDown)?;
            if let Some(i) = r
                .tag
                .checked_sub(first)
                .map(|d| d as usize)
                .filter(|&i| i < tags.len() && tags[i] == r.tag)
            {
                if out[i].is_none() {
                    out[i] = Some(r.result);
                    left -= 1;
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(KvError::ShuttingDown)))
            .collect()
    }
}

/// Receives from `rx`, first polling briefly (yielding the core between polls) because the
/// reply usually arrives within microseconds; then blocks. Saves a futex sleep and wake-up
/// per request under load.
pub(crate) fn recv_soon<T>(rx: &Receiver<T>) -> Option<T> {
    for _ in 0..SPIN_POLLS {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
            Err(mpsc::TryRecvError::Disconnected) => return None,
        }
    }
    rx.recv().ok()
}

/// Polls before blocking in [`recv_soon`].
const SPIN_POLLS: u32 = 16;
