//! A shard's own writes that the DPM has not merged yet: the newest per key (what a read
//! must see before the index does), and the order they were written in (what a merge
//! progress reading lets the shard forget).
//!
//! The order queue gets an entry on every write, also of a key already present; one that a
//! newer write of the same key replaced is dead weight. The queue is compacted to the live
//! entries whenever it grows past twice the map plus [`COMPACT_SLACK`], so its size stays
//! proportional to the distinct unmerged keys, however long the DPM takes to merge (2 M
//! writes of one key keep it at a few thousand entries, not 2 M).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use dinomo_shared::index::EntryRef;

use super::keyhash::KeyHash;

/// Dead queue entries tolerated before a compaction, so that compacting costs O(1) per
/// write amortized.
pub(crate) const COMPACT_SLACK: usize = 1024;

#[derive(Debug)]
pub(crate) struct Unmerged {
    pub(crate) seq: u64,
    /// `None`: a delete.
    pub(crate) eref: Option<EntryRef>,
}

/// The newest unmerged write per key and the order of writes; the key is shared between
/// the two (one allocation per write; a shard is one thread, so `Rc` suffices).
#[derive(Debug, Default)]
pub(crate) struct UnmergedWrites {
    map: HashMap<Rc<[u8]>, Unmerged, KeyHash>,
    order: VecDeque<(u64, Rc<[u8]>)>,
}

impl UnmergedWrites {
    /// Records a durable write of `key` with log seq `seq` (seqs only grow).
    pub(crate) fn record(&mut self, seq: u64, key: Rc<[u8]>, eref: Option<EntryRef>) {
        self.order.push_back((seq, Rc::clone(&key)));
        self.map.insert(key, Unmerged { seq, eref });
        if self.order.len() > 2 * self.map.len() + COMPACT_SLACK {
            self.compact();
        }
    }

    /// Drops queue entries that a newer write of their key replaced.
    fn compact(&mut self) {
        let map = &self.map;
        self.order
            .retain(|(seq, key)| map.get(&**key).is_some_and(|u| u.seq == *seq));
    }

    /// Forgets writes up to `merged_seq`; returns about how many bytes that freed.
    pub(crate) fn forget_merged(&mut self, merged_seq: u64) -> u64 {
        let mut freed = 0;
        while let Some((seq, _)) = self.order.front() {
            if *seq > merged_seq {
                break;
            }
            let Some((seq, key)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&*key).is_some_and(|u| u.seq == seq) {
                self.map.remove(&*key);
                // The key's allocation (with its two reference counts).
                freed += key.len() as u64 + 16;
            }
        }
        freed + self.shrink()
    }

    /// Gives back the room of a backlog that merged: a burst of writes grows the map and
    /// the queue to its size, and neither shrinks by itself, so without this a KN would
    /// keep the memory of its largest backlog for good. Amortized O(1): it shrinks only
    /// once the tables are four times larger than needed, to twice their contents.
    /// Returns about how many bytes it freed.
    fn shrink(&mut self) -> u64 {
        let (len, queued) = (self.map.len(), self.order.len());
        let (map_before, order_before) = (self.map.capacity(), self.order.capacity());
        if map_before > 4 * len + COMPACT_SLACK {
            self.map.shrink_to(2 * len);
        }
        if order_before > 4 * queued + COMPACT_SLACK {
            self.order.shrink_to(2 * queued);
        }
        let map_entry = core::mem::size_of::<(Rc<[u8]>, Unmerged)>() + 1;
        let order_entry = core::mem::size_of::<(u64, Rc<[u8]>)>();
        ((map_before - self.map.capacity()) * map_entry
            + (order_before - self.order.capacity()) * order_entry) as u64
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Unmerged> {
        self.map.get(key)
    }

    /// Every key with an unmerged write and its newest write.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &Unmerged)> + '_ {
        self.map.iter().map(|(k, u)| (&**k, u))
    }

    pub(crate) fn remove(&mut self, key: &[u8]) {
        self.map.remove(key);
    }

    /// Keeps only the keys `keep` accepts (their queue entries go at the next compaction or
    /// merge reading).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        self.map.retain(|k, _| keep(k));
        if self.order.len() > 2 * self.map.len() + COMPACT_SLACK {
            self.compact();
        }
    }

    /// Distinct keys with an unmerged write.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Entries in the order queue (for the bound on it).
    pub(crate) fn queued(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_million_writes_of_one_key_keep_the_bookkeeping_flat() {
        let mut u = UnmergedWrites::default();
        let key: Rc<[u8]> = Rc::from(&b"hot"[..]);
        let mut most = 0;
        // The DPM merges nothing meanwhile: the worst case for the queue.
        for seq in 1..=2_000_000u64 {
            u.record(seq, Rc::clone(&key), EntryRef::new(seq * 8, 32));
            most = most.max(u.queued());
        }
        assert_eq!(u.len(), 1);
        assert!(most <= 2 + COMPACT_SLACK, "queue reached {most} entries");
        assert_eq!(u.get(b"hot").map(|w| w.seq), Some(2_000_000));
        u.forget_merged(2_000_000);
        assert_eq!((u.len(), u.queued()), (0, 0));
    }

    #[test]
    fn a_merged_backlog_gives_its_room_back() {
        let mut u = UnmergedWrites::default();
        for seq in 1..=100_000u64 {
            u.record(seq, Rc::from(seq.to_le_bytes().as_slice()), None);
        }
        assert!(u.map.capacity() >= 100_000);
        u.forget_merged(99_990);
        assert_eq!(u.len(), 10);
        assert!(
            u.map.capacity() <= 4 * 10 + COMPACT_SLACK,
            "{}",
            u.map.capacity()
        );
        assert!(
            u.order.capacity() <= 4 * 10 + COMPACT_SLACK,
            "{}",
            u.order.capacity()
        );
        assert_eq!(
            u.get(&100_000u64.to_le_bytes()).map(|w| w.seq),
            Some(100_000)
        );
    }

    #[test]
    fn many_keys_stay_proportional_and_the_newest_write_wins() {
        let mut u = UnmergedWrites::default();
        let keys: Vec<Rc<[u8]>> = (0..5000u32)
            .map(|i| Rc::from(i.to_le_bytes().as_slice()))
            .collect();
        for seq in 1..=200_000u64 {
            let k = &keys[(seq * 7919 % 5000) as usize];
            u.record(seq, Rc::clone(k), None);
            assert!(u.queued() <= 2 * u.len() + COMPACT_SLACK + 1);
        }
        assert_eq!(u.len(), 5000);
        // Forgetting up to a seq keeps exactly the keys written after it.
        u.forget_merged(199_000);
        assert!(u.len() <= 1000);
        for k in &keys {
            if let Some(w) = u.get(k) {
                assert!(w.seq > 199_000);
            }
        }
        u.retain(|_| false);
        assert_eq!(u.len(), 0);
        u.forget_merged(u64::MAX);
        assert_eq!(u.queued(), 0);
    }
}
