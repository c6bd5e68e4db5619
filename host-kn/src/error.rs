//! Errors a client of the store can see.

use dinomo_hw::fabric::FabricError;
use dinomo_shared::ErrorCode;

/// The reply to a write the memory node has no room for (Redis's `-OOM` for `maxmemory`).
/// The write was refused before it was acknowledged and changed nothing; reads still work.
pub const REGION_FULL_REPLY: &str = "OOM the DINOMO region is full: the memory node grants no \
     more log space (it keeps room to merge every write already accepted), so this write \
     was refused and changed nothing. Reads still work. Delete keys you no longer need \
     (DEL; their space is reclaimed once merged) or start with a bigger region \
     (dinomo up --region-size)";

/// Why a request failed. A failed write was not acknowledged and may or may not be durable;
/// it never becomes visible half-written.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KvError {
    #[error("key is empty")]
    EmptyKey,
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge { len: usize, max: usize },
    #[error("this node does not own the key's slot: KN {owner} does (cluster map epoch {epoch})")]
    WrongOwner { owner: u16, epoch: u64 },
    /// The slot is changing owner; the client retries after a short pause.
    #[error("TRYAGAIN slot {slot} is moving to another node")]
    TryAgain { slot: u16 },
    #[error("the memory node has no free log block left")]
    RegionFull,
    #[error("the memory node refused the request: {0}")]
    Dpm(ErrorCode),
    #[error("fabric: {0}")]
    Fabric(String),
    /// The connection to the memory node is gone (it crashed or is restarting, or a request
    /// got no completion within its timeout). Kept apart
    /// from [`KvError::Fabric`] so that whoever sees it can reconnect and repeat what is safe
    /// to repeat; it reaches a client only once the wait for the memory node ran out.
    #[error("the memory node is unreachable: {0}")]
    Disconnected(String),
    #[error("data read from the memory node failed validation: {0}")]
    Corrupt(String),
    #[error("replication: {0}")]
    Replication(String),
    /// A scan cursor this node did not hand out (or one it can no longer continue).
    #[error("invalid cursor")]
    InvalidCursor,
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The lease lapsed while a batch was being written: the manager may have fenced this
    /// node first, in which case the memory node never merges the batch. Its outcome is
    /// unknown, and the node writes nothing more.
    #[error("this node's lease lapsed during the write: its outcome is unknown")]
    LeaseLapsed,
}

impl KvError {
    /// Whether the request was refused before it had any effect and may simply be sent
    /// again once the cluster map has settled.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::TryAgain { .. } | Self::WrongOwner { .. })
    }
}

impl From<FabricError> for KvError {
    fn from(e: FabricError) -> Self {
        match e {
            // A one-sided request with no completion within its timeout is as lost as one
            // that failed with its connection: its queue pair is not trusted any more (a
            // new one is made, see the shard's reconnect).
            FabricError::Disconnected(_) | FabricError::NotRunning(_) | FabricError::Timeout(_) => {
                Self::Disconnected(e.to_string())
            }
            e => Self::Fabric(e.to_string()),
        }
    }
}

impl From<ErrorCode> for KvError {
    fn from(e: ErrorCode) -> Self {
        match e {
            ErrorCode::RegionFull => Self::RegionFull,
            ErrorCode::ShuttingDown => Self::ShuttingDown,
            e => Self::Dpm(e),
        }
    }
}
