//! What a shard thread receives and what it answers: the one way into a shard, so its
//! state needs no lock.

use std::sync::mpsc::Sender;
use std::sync::Arc;
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

/// Where a shard sends the answer to a request.
#[derive(Debug)]
pub enum ReplyTo {
    Chan(Sender<Reply>),
    Fn(ReplyFn),
}

impl ReplyTo {
    /// Delivers the reply (a caller that went away is not an error).
    pub fn send(self, r: Reply) {
        match self {
            Self::Chan(tx) => {
                let _ = tx.send(r);
            }
            Self::Fn(f) => (f.0)(r),
        }
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
}

/// What handing over slots cost one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Log entries the DPM merged to bring the index up to the log's tail.
    pub entries_merged: u64,
    /// Time from the merge request to its reply.
    pub merge: Duration,
}
