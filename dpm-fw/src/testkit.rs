//! A minimal log writer playing the KVS-node side against a [`Dpm`](crate::Dpm) in the same process:
//! it encodes entries with the block's salt, writes each batch with one copy and one
//! persist (as a KN's WRITE + FLUSH would), seals full blocks and asks for new ones. Used
//! by tests and benchmarks of the memory node; the real KN lives in `host-kn`.

pub use crate::logwriter::{LogWriter, Staged};
