//! The expiry times a shard knows: those of the keys it wrote or read with one, while it
//! owns them.
//!
//! A key's expiry lives in its log entry, so a read that goes to the memory node learns it
//! from the entry. A value served from the cache does not read the entry: for it, this
//! table is the one place the expiry is known, and it is kept exact for every cached key
//! (set when a value is cached, dropped when the key is written without one or deleted).
//! A heap ordered by time drives active expiry: due keys are deleted through the log like
//! any `DEL`, so their space is reclaimed by merge and compaction even if nobody reads
//! them again. Keys with a TTL that this shard never touched (say, after a slot moved
//! here, or before a restart) are deleted when read, written or met by a walk.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::rc::Rc;

use super::keyhash::KeyHash;

#[derive(Debug, Default)]
pub(super) struct Expiries {
    at: HashMap<Rc<[u8]>, u64, KeyHash>,
    /// (time, key) of every entry of `at`, plus stale ones skipped when popped.
    due: BinaryHeap<Reverse<(u64, Rc<[u8]>)>>,
}

impl Expiries {
    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    #[inline]
    pub(super) fn get(&self, key: &[u8]) -> Option<u64> {
        if self.at.is_empty() {
            return None;
        }
        self.at.get(key).copied()
    }

    /// Records that `key` now expires at `when` (None: never, or deleted).
    pub(super) fn note(&mut self, key: &Rc<[u8]>, when: Option<u64>) {
        match when {
            Some(t) => {
                if self.at.insert(Rc::clone(key), t) != Some(t) {
                    self.due.push(Reverse((t, Rc::clone(key))));
                }
            }
            None => self.forget(key),
        }
        // Stale heap entries (overwritten or deleted keys) are dropped when popped; should
        // they pile up, the heap is rebuilt from the table.
        if self.due.len() > 2 * self.at.len() + 1024 {
            self.due = self
                .at
                .iter()
                .map(|(k, &t)| Reverse((t, Rc::clone(k))))
                .collect();
        }
    }

    /// Records that `key` never expires (or is gone).
    pub(super) fn forget(&mut self, key: &[u8]) {
        if !self.at.is_empty() {
            self.at.remove(key);
        }
    }

    /// The next key whose time has come by `now`, taken off the table.
    pub(super) fn pop_due(&mut self, now: u64) -> Option<Rc<[u8]>> {
        while let Some(Reverse((t, _))) = self.due.peek() {
            if *t >= now {
                return None;
            }
            let Reverse((t, key)) = self.due.pop()?;
            if self.at.get(&key[..]) == Some(&t) {
                self.at.remove(&key[..]);
                return Some(key);
            }
        }
        None
    }

    /// Forgets the keys for which `keep` is false (their slots moved away).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        if self.at.is_empty() {
            return;
        }
        self.at.retain(|k, _| keep(k));
        self.due.retain(|Reverse((_, k))| keep(k));
    }

    pub(super) fn len(&self) -> usize {
        self.at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Rc<[u8]> {
        Rc::from(s.as_bytes())
    }

    #[test]
    fn keys_come_due_in_time_order_and_overwrites_win() {
        let mut e = Expiries::default();
        e.note(&k("a"), Some(30));
        e.note(&k("b"), Some(10));
        e.note(&k("c"), Some(20));
        e.note(&k("c"), None); // persisted
        e.note(&k("a"), Some(5)); // earlier now
        assert_eq!(e.get(b"a"), Some(5));
        assert_eq!(e.get(b"c"), None);
        assert_eq!(e.pop_due(4), None);
        assert_eq!(e.pop_due(100).as_deref(), Some(&b"a"[..]));
        assert_eq!(e.pop_due(100).as_deref(), Some(&b"b"[..]));
        assert_eq!(
            e.pop_due(100),
            None,
            "c was persisted, a's old time is stale"
        );
        assert!(e.is_empty());
    }

    #[test]
    fn the_heap_stays_bounded_under_rewrites() {
        let mut e = Expiries::default();
        let key = k("x");
        for t in 0..100_000u64 {
            e.note(&key, Some(t + 1));
        }
        assert!(e.due.len() <= 2 * e.len() + 1025);
        assert_eq!(e.pop_due(u64::MAX).as_deref(), Some(&b"x"[..]));
    }
}
