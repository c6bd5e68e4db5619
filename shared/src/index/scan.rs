//! The reader's step over one bucket copy: pure, so that a remote reader (64-byte READs over
//! the fabric) and the DPM-local lookup run the same algorithm.
//!
//! Lookup: read the root word; read the home bucket `root.bucket_of(hash)`; `scan_bucket`;
//! for each candidate read the entry and compare its key (hashes are not keys); on `Moved`
//! re-read the root and start over; otherwise follow `next` until it is 0.

use super::{Bucket, EntryRef, SLOTS_PER_BUCKET};
use crate::hash::EMPTY_HASH;

/// Entry refs of the slots of one bucket whose hash equals the one looked up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    refs: [EntryRef; SLOTS_PER_BUCKET],
    len: u8,
}

impl Candidates {
    pub fn as_slice(&self) -> &[EntryRef] {
        &self.refs[..self.len as usize]
    }
    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = EntryRef> + '_ {
        self.as_slice().iter().copied()
    }
}

/// What one bucket copy tells a reader looking for a hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// The bucket is not (or no longer) part of the table the reader holds: the table was
    /// replaced and maybe its memory reused. Re-read the root and start over.
    Moved,
    /// The bucket belongs to the reader's table. Check `candidates` by key; if none matches,
    /// continue at `next` (0: the key is absent).
    Slots { candidates: Candidates, next: u64 },
}

/// Scans a copy of a bucket of the table of `generation` for `hash`.
///
/// Slots are committed hash-last, so a slot whose hash matches has its ref in place. A
/// copy read concurrently with writers may still pair a hash with a newer ref of another
/// key (a delete and re-insert in between): that is why candidates are confirmed by key.
pub fn scan_bucket(bucket: &Bucket, generation: u32, hash: u64) -> Scan {
    if !bucket.belongs_to(generation) {
        return Scan::Moved;
    }
    let mut candidates = Candidates::default();
    if hash != EMPTY_HASH {
        for slot in &bucket.slots {
            let r = EntryRef(slot.eref);
            if slot.hash == hash && !r.is_empty() {
                candidates.refs[candidates.len as usize] = r;
                candidates.len += 1;
            }
        }
    }
    Scan::Slots {
        candidates,
        next: bucket.next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Slot, BUCKET_MOVED};

    fn bucket(generation: u32, slots: [(u64, u64); 3], next: u64) -> Bucket {
        Bucket {
            meta: Bucket::meta_for(generation),
            slots: slots.map(|(hash, eref)| Slot { hash, eref }),
            next,
        }
    }

    #[test]
    fn finds_all_equal_hashes_and_the_next_offset() {
        let r1 = EntryRef::new(4096, 48).expect("ref");
        let r2 = EntryRef::new(8192, 56).expect("ref");
        let b = bucket(3, [(7, r1.0), (9, 1), (7, r2.0)], 640);
        let Scan::Slots { candidates, next } = scan_bucket(&b, 3, 7) else {
            panic!("bucket belongs to generation 3");
        };
        assert_eq!(candidates.as_slice(), &[r1, r2]);
        assert_eq!(next, 640);
        let Scan::Slots { candidates, .. } = scan_bucket(&b, 3, 8) else {
            panic!("same table")
        };
        assert!(candidates.is_empty());
    }

    #[test]
    fn empty_hash_and_empty_refs_never_match() {
        let b = bucket(1, [(0, 5 << 40), (4, 0), (0, 0)], 0);
        for h in [0, 4] {
            let Scan::Slots { candidates, next } = scan_bucket(&b, 1, h) else {
                panic!("same table")
            };
            assert!(candidates.is_empty());
            assert_eq!(next, 0);
        }
    }

    #[test]
    fn moved_or_other_generation_restarts() {
        let mut b = bucket(5, [(1, 1 << 40); 3], 0);
        assert_eq!(scan_bucket(&b, 6, 1), Scan::Moved);
        b.meta |= 1; // a writer holds the lock: readers do not care
        assert!(matches!(scan_bucket(&b, 5, 1), Scan::Slots { .. }));
        b.meta |= BUCKET_MOVED;
        assert_eq!(scan_bucket(&b, 5, 1), Scan::Moved);
    }
}
