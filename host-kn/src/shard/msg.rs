//! What a shard thread receives and what it answers: the one way into a shard from another
//! thread, so its state needs no lock.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use crate::error::KvError;
use crate::ownership::SlotMap;
use crate::replica::{ReplicaCtl, Replicas};

use super::ShardStats;

/// A client request.
#[derive(Debug)]
pub enum Request {
    Get { key: Vec<u8> },
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

impl Request {
    pub fn key(&self) -> &[u8] {
        match self {
            Self::Get { key } | Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// The answer to a request: the value for a get (None: absent), None for writes.
#[derive(Debug)]
pub struct Reply {
    pub tag: u64,
    pub result: Result<Option<Vec<u8>>, KvError>,
}

/// A reply callback, for callers that do not wait on a std channel (e.g. an async server
/// completing a future). It runs on the shard thread, so it must be quick and not block.
pub struct ReplyFn(pub Box<dyn FnOnce(Reply) + Send>);

impl std::fmt::Debug for ReplyFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyFn")
    }
}

/// The queue of a shard thread. Sending never blocks: a shard takes what it is sent.
pub type ShardTx = tokio::sync::mpsc::UnboundedSender<Msg>;

/// Where a get served in place hands its answer: a cached value is lent, not copied.
pub type GetReply<'a> = dyn FnMut(Result<Option<&[u8]>, KvError>) + 'a;

/// [`GetReply`] with the key's expiry time (Unix ms), for commands that need it.
pub type StoredReply<'a> = dyn FnMut(Result<Option<(&[u8], Option<u64>)>, KvError>) + 'a;

/// What a request is answered with: the value for a get (`None`: absent), `None` for writes.
pub type ReplyResult = Result<Option<Vec<u8>>, KvError>;

/// Where a shard sends the answer to a request.
#[derive(Debug)]
pub enum ReplyTo {
    Chan(Sender<Reply>),
    Fn(ReplyFn),
    /// A slot of a batch of replies on the shard's own thread (no allocation, no wake-up
    /// of another thread per request).
    Slot(SlotRef),
}

impl ReplyTo {
    /// Delivers the reply (a caller that went away is not an error).
    pub fn send(self, r: Reply) {
        match self {
            Self::Chan(tx) => {
                let _ = tx.send(r);
            }
            Self::Fn(f) => (f.0)(r),
            Self::Slot(s) => s.fill(r.result),
        }
    }
}

/// The replies to a batch of requests, filled in on one thread as the requests complete.
/// When the last one is in, the batch wakes its waiter (a connection on the same thread) or
/// sends all of them back at once (a batch from another shard's thread).
#[derive(Debug, Default)]
pub struct ReplySlots {
    results: Vec<Option<ReplyResult>>,
    left: usize,
    waker: Option<Waker>,
    done: Option<tokio::sync::oneshot::Sender<Vec<Option<ReplyResult>>>>,
    /// Every slot of a batch with `done` is made: its replies may go once all are in.
    sealed: bool,
}

/// One slot of a [`ReplySlots`].
#[derive(Debug)]
pub struct SlotRef {
    slots: Rc<RefCell<ReplySlots>>,
    index: usize,
}

impl ReplySlots {
    /// Empty slots, whose completion is sent through `done` (if given).
    pub fn new(done: Option<tokio::sync::oneshot::Sender<Vec<Option<ReplyResult>>>>) -> Self {
        Self {
            done,
            ..Self::default()
        }
    }

    /// Forgets every slot (keeping the memory) for the next batch.
    pub fn clear(&mut self) {
        self.results.clear();
        self.left = 0;
        self.waker = None;
    }

    /// A new slot, to be filled through the returned reference.
    pub fn push(this: &Rc<RefCell<Self>>) -> SlotRef {
        let mut s = this.borrow_mut();
        s.results.push(None);
        s.left += 1;
        SlotRef {
            slots: Rc::clone(this),
            index: s.results.len() - 1,
        }
    }

    /// Slots not filled yet.
    pub fn left(&self) -> usize {
        self.left
    }

    /// Slot `i`'s reply, if it came.
    pub fn take(&mut self, i: usize) -> Option<ReplyResult> {
        self.results.get_mut(i).and_then(Option::take)
    }

    /// Wakes `w` when the last slot is filled.
    pub fn wake_when_done(&mut self, w: &Waker) {
        self.waker = Some(w.clone());
    }

    /// No more slots will be made: the replies go back once all are in (now, if they are).
    pub fn seal(&mut self) {
        self.sealed = true;
        self.finish_if_done();
    }

    /// Sends the replies back, or wakes the waiter, if none is missing. A batch sent back
    /// through `done` waits for [`ReplySlots::seal`]: its first replies can come while its
    /// later requests are still being made.
    fn finish_if_done(&mut self) {
        if self.left == 0 && (self.sealed || self.done.is_none()) {
            if let Some(tx) = self.done.take() {
                let _ = tx.send(std::mem::take(&mut self.results));
            }
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

impl SlotRef {
    /// Which slot of its batch this is.
    pub fn index(&self) -> usize {
        self.index
    }

    fn fill(self, r: ReplyResult) {
        let mut s = self.slots.borrow_mut();
        if let Some(slot) = s.results.get_mut(self.index) {
            if slot.is_none() {
                *slot = Some(r);
                s.left -= 1;
            }
        }
        s.finish_if_done();
    }
}

/// Work run on a shard's own thread, next to the shard (a client connection placed there).
pub struct Task(pub Box<dyn FnOnce(super::LocalShard) + Send>);

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Task")
    }
}

/// What a shard thread receives.
#[derive(Debug)]
pub enum Msg {
    Req {
        op: Request,
        tag: u64,
        reply: Sender<Reply>,
    },
    /// A request answered through a callback instead of a channel.
    ReqFn {
        op: Request,
        tag: u64,
        reply: ReplyFn,
    },
    /// Requests from a connection on another shard's thread, answered all at once (in
    /// order) when the last is done: one message and one wake-up each way per pipeline.
    Batch {
        ops: Vec<Request>,
        done: tokio::sync::oneshot::Sender<Vec<Option<ReplyResult>>>,
    },
    /// Run this command on the shard, whole (see `exec`); `done` gets the outcome of its
    /// writes once all are durable.
    Exec {
        job: super::ExecJob,
        done: tokio::sync::oneshot::Sender<Vec<Option<ReplyResult>>>,
    },
    /// Run this on the shard's thread (a connection placed there).
    Task(Task),
    /// A new cluster map; entries of slots no longer owned are dropped from the cache.
    SetMap(Arc<SlotMap>),
    /// Hand over the slots this shard loses under `map`: install it (so their requests are
    /// refused from now on and their cached entries dropped), flush, have the DPM merge this
    /// shard's log to its tail, then forget own unmerged writes of the lost slots. After the
    /// reply, the index holds every write this shard acknowledged, so a new owner reading it
    /// cold sees them all. Requests queued before this message are answered before it.
    Release {
        map: Arc<SlotMap>,
        reply: Sender<Result<ReleaseReport, KvError>>,
    },
    Stats(Sender<ShardStats>),
    /// Flush, have the DPM merge this shard's log to its tail, forget the merged own writes,
    /// then answer (used to start a measurement from a merged state).
    Sync(Sender<Result<(), KvError>>),
    /// Flush, close the log (the DPM merges it to its tail) and exit.
    Stop,
    /// The replicated keys: this shard serves those of its slots listed for its KN.
    SetReplicas(Arc<Replicas>),
    /// Allocate or free a replicated key's cell (sent to the owning shard).
    Replica(ReplicaCtl),
    /// The shard's hottest keys since the last such request.
    HotKeys(Sender<Vec<(Vec<u8>, u64)>>),
    /// One page of a walk of the shard's keys (SCAN, KEYS, DBSIZE, ...).
    Scan {
        req: super::ScanRequest,
        reply: tokio::sync::oneshot::Sender<Result<super::ScanPage, KvError>>,
    },
}

/// What handing over slots cost one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Log entries the DPM merged to bring the index up to the log's tail.
    pub entries_merged: u64,
    /// Time from the merge request to its reply.
    pub merge: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch whose first request is answered at once is not sent back before its later
    /// requests are even made: it waits for `seal`, then for its last reply.
    #[test]
    fn a_batch_goes_back_whole_and_in_order() {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let slots = Rc::new(RefCell::new(ReplySlots::new(Some(tx))));
        ReplySlots::push(&slots).fill(Ok(Some(b"a".to_vec())));
        assert!(rx.try_recv().is_err(), "sent before the batch was complete");
        let write = ReplySlots::push(&slots);
        ReplySlots::push(&slots).fill(Ok(None));
        slots.borrow_mut().seal();
        assert!(rx.try_recv().is_err(), "sent before its write was durable");
        write.fill(Err(KvError::RegionFull));
        let got = rx.try_recv().expect("sent once complete");
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Some(Ok(Some(v))) if v == b"a"));
        assert!(matches!(&got[1], Some(Err(KvError::RegionFull))));
        assert!(matches!(&got[2], Some(Ok(None))));
    }
}
