//! Commands run on the owner shard's thread, whole: a read-modify-write (`INCR`, `APPEND`,
//! `SET ... GET`), a multi-key command within one slot, or a `MULTI`/`EXEC` transaction.
//!
//! Every key has one owner shard and a shard does one thing at a time, so a job sees no
//! other client's write between its reads and its writes: that is all the atomicity these
//! commands need, with no lock. The job's writes are staged like any other and share the
//! turn's group commit; its answer goes back only once they are all durable.
//!
//! `WATCH` is kept here too: a shard numbers the writes of its watched keys, and a
//! transaction runs only if none of its watched keys was written since it was watched.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use dinomo_hw::fabric::Fabric;

use crate::error::KvError;

use super::keyhash::KeyHash;
use super::msg::{ReplySlots, ReplyTo};
use super::{BatchDone, Shard};

/// A key's value and its expiry time (Unix ms), if it has one.
pub type TimedValue = (Vec<u8>, Option<u64>);

/// What a job does, given its shard's keys.
pub type JobFn = Box<dyn FnOnce(&mut dyn KeyAccess) + Send>;

/// What a job sees of its shard's keys. Reads see the job's own earlier writes; expired
/// keys read as absent (and are deleted).
pub trait KeyAccess {
    /// The key's value and expiry time (Unix ms), if it exists.
    fn read(&mut self, key: &[u8]) -> Result<Option<TimedValue>, KvError>;
    /// Stages a put (`Some`) or delete (`None`) of `key`, expiring at `expire_at`.
    fn write(
        &mut self,
        key: &[u8],
        value: Option<Vec<u8>>,
        expire_at: Option<u64>,
    ) -> Result<(), KvError>;
    /// The largest value accepted with `key`.
    fn max_value(&self, key: &[u8]) -> usize;
    /// Starts watching `key` (once per watcher); returns its write number.
    fn watch(&mut self, key: &[u8]) -> u64;
    /// Stops watching `key` (once per earlier `watch`).
    fn unwatch(&mut self, key: &[u8]);
    /// The write number of a watched key (None: nobody watches it).
    fn watched(&self, key: &[u8]) -> Option<u64>;
    /// The ownership epoch: it changes whenever the shard's slots may have changed.
    fn map_epoch(&self) -> u64;
}

/// Work sent to a shard to run on its thread (see the module docs).
pub struct ExecJob(pub JobFn);

impl std::fmt::Debug for ExecJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecJob")
    }
}

/// The watched keys of a shard: per key, how many watchers and its write number.
#[derive(Debug, Default)]
pub(super) struct Watches {
    keys: HashMap<Vec<u8>, (u32, u64), KeyHash>,
    clock: u64,
}

impl Watches {
    /// Counts a write of `key` (cheap when nothing is watched).
    #[inline]
    pub(super) fn wrote(&mut self, key: &[u8]) {
        if self.keys.is_empty() {
            return;
        }
        if let Some(w) = self.keys.get_mut(key) {
            self.clock += 1;
            w.1 = self.clock;
        }
    }

    /// Counts a write of every watched key (the shard's slots changed: a watched key may
    /// have been written elsewhere meanwhile).
    pub(super) fn wrote_all(&mut self) {
        self.clock += 1;
        let c = self.clock;
        for w in self.keys.values_mut() {
            w.1 = c;
        }
    }

    fn watch(&mut self, key: &[u8]) -> u64 {
        let w = self.keys.entry(key.to_vec()).or_insert((0, self.clock));
        w.0 += 1;
        w.1
    }

    fn unwatch(&mut self, key: &[u8]) {
        if let Some(w) = self.keys.get_mut(key) {
            w.0 -= 1;
            if w.0 == 0 {
                self.keys.remove(key);
            }
        }
    }

    fn get(&self, key: &[u8]) -> Option<u64> {
        self.keys.get(key).map(|w| w.1)
    }
}

/// A shard seen through [`KeyAccess`] while it runs one job.
struct Access<'a, F: Fabric> {
    shard: &'a mut Shard<F>,
    slots: &'a Rc<RefCell<ReplySlots>>,
}

impl<F: Fabric> KeyAccess for Access<'_, F> {
    fn read(&mut self, key: &[u8]) -> Result<Option<TimedValue>, KvError> {
        self.shard.read_stored(key)
    }

    fn write(
        &mut self,
        key: &[u8],
        value: Option<Vec<u8>>,
        expire_at: Option<u64>,
    ) -> Result<(), KvError> {
        // Checked here, before anything is staged, so that a job can answer the error
        // without having changed anything; the durable outcome comes through the slot.
        self.shard.check_write(key, value.as_deref(), expire_at)?;
        let reply = ReplyTo::Slot(ReplySlots::push(self.slots));
        self.shard
            .write_expiring(key.to_vec(), value, expire_at, 0, reply);
        Ok(())
    }

    fn max_value(&self, key: &[u8]) -> usize {
        self.shard.max_value(key.len())
    }

    fn watch(&mut self, key: &[u8]) -> u64 {
        self.shard.watches.watch(key)
    }

    fn unwatch(&mut self, key: &[u8]) {
        self.shard.watches.unwatch(key)
    }

    fn watched(&self, key: &[u8]) -> Option<u64> {
        self.shard.watches.get(key)
    }

    fn map_epoch(&self) -> u64 {
        self.shard.map_generation
    }
}

impl<F: Fabric> Shard<F> {
    /// Runs `job` now; `done` gets the outcome of its writes once they are all durable
    /// (at once if it wrote nothing).
    pub(super) fn exec(&mut self, job: ExecJob, done: BatchDone) {
        let slots = Rc::new(RefCell::new(ReplySlots::new(Some(done))));
        (job.0)(&mut Access {
            shard: self,
            slots: &slots,
        });
        slots.borrow_mut().seal();
    }
}
