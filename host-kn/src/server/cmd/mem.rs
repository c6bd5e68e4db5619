//! An in-memory [`Keyspace`] for the tests: a map with a settable clock.

use std::collections::HashMap;

use super::{Keyspace, Stored};
use crate::error::KvError;

/// Keys in a `HashMap`; a key whose expiry time has passed (`now > expire_at`, Redis's
/// rule) is hidden from `get` as the real keyspace hides it.
#[derive(Debug)]
pub(crate) struct Mem {
    pub map: HashMap<Vec<u8>, Stored>,
    /// The clock, Unix milliseconds.
    pub now: u64,
    pub max: usize,
    /// Puts and deletes staged since this was last reset.
    pub writes: usize,
}

impl Mem {
    pub(crate) fn new() -> Self {
        Self {
            map: HashMap::new(),
            now: 1_700_000_000_000,
            max: 512 << 20,
            writes: 0,
        }
    }

    /// Stores `key` directly (no write counted).
    pub(crate) fn set(&mut self, key: &str, value: &str, expire_at: Option<u64>) {
        self.map.insert(
            key.as_bytes().to_vec(),
            Stored {
                value: value.as_bytes().to_vec(),
                expire_at,
            },
        );
    }

    /// The live value of `key`, as a string.
    pub(crate) fn value(&self, key: &str) -> Option<String> {
        self.live(key.as_bytes())
            .map(|s| String::from_utf8_lossy(&s.value).into_owned())
    }

    /// The expiry time of `key` (None: absent or no expiry).
    pub(crate) fn expiry(&self, key: &str) -> Option<u64> {
        self.live(key.as_bytes()).and_then(|s| s.expire_at)
    }

    fn live(&self, key: &[u8]) -> Option<&Stored> {
        self.map
            .get(key)
            .filter(|s| s.expire_at.map_or(true, |at| self.now <= at))
    }
}

impl Keyspace for Mem {
    fn get(&mut self, key: &[u8]) -> Result<Option<Stored>, KvError> {
        Ok(self.live(key).cloned())
    }
    fn put(&mut self, key: &[u8], value: Vec<u8>, expire_at: Option<u64>) -> Result<(), KvError> {
        self.writes += 1;
        self.map.insert(key.to_vec(), Stored { value, expire_at });
        Ok(())
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.writes += 1;
        self.map.remove(key);
        Ok(())
    }
    fn now_ms(&self) -> u64 {
        self.now
    }
    fn max_value(&self) -> usize {
        self.max
    }
}
