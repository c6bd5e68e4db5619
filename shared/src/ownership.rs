//! The cluster map: which KN owns each Redis Cluster slot, at one epoch.
//!
//! The manager computes maps and the KNs install them, so the type and the hashing that
//! places slots live here, once. New maps come from consistent hashing with virtual nodes,
//! so adding or removing a KN moves about 1/N of the slots.

use std::fmt;

use crate::control::NO_KN;
use crate::slot::SLOTS;

/// Which KN owns each slot, at one epoch.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotMap {
    epoch: u64,
    owners: Box<[u16]>,
}

impl fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kns: Vec<u16> = self.owners.to_vec();
        kns.sort_unstable();
        kns.dedup();
        f.debug_struct("SlotMap")
            .field("epoch", &self.epoch)
            .field("kns", &kns)
            .finish()
    }
}

/// Virtual nodes per KN on the hash ring by default.
pub const DEFAULT_VNODES: u32 = 64;

impl SlotMap {
    /// A map from an explicit owner per slot (`NO_KN` for none).
    pub fn from_owners(epoch: u64, owners: Vec<u16>) -> Option<Self> {
        (owners.len() == SLOTS as usize).then(|| Self {
            epoch,
            owners: owners.into_boxed_slice(),
        })
    }

    /// Consistent hashing: each KN places `vnodes` points on a 64-bit ring; a slot belongs to
    /// the first point at or after its own position.
    pub fn consistent(epoch: u64, kns: &[u16], vnodes: u32) -> Self {
        let mut ring: Vec<(u64, u16)> = kns
            .iter()
            .flat_map(|&kn| (0..vnodes.max(1)).map(move |v| (point(kn, v), kn)))
            .collect();
        ring.sort_unstable();
        let owners = (0..SLOTS)
            .map(|slot| {
                if ring.is_empty() {
                    return NO_KN;
                }
                let pos = slot_position(slot);
                let i = ring.partition_point(|&(p, _)| p < pos);
                ring[i % ring.len()].1
            })
            .collect();
        Self { epoch, owners }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The owner of `slot` (`NO_KN` if unowned).
    #[inline]
    pub fn owner(&self, slot: u16) -> u16 {
        self.owners.get(slot as usize).copied().unwrap_or(NO_KN)
    }

    /// The owner of every slot, in slot order.
    pub fn owners(&self) -> &[u16] {
        &self.owners
    }

    /// Slots owned by `kn`.
    pub fn slots_of(&self, kn: u16) -> usize {
        self.owners.iter().filter(|&&o| o == kn).count()
    }

    /// Slots whose owner differs between `self` and `other`.
    pub fn moved_slots(&self, other: &SlotMap) -> usize {
        self.owners
            .iter()
            .zip(other.owners.iter())
            .filter(|(a, b)| a != b)
            .count()
    }
}

fn point(kn: u16, vnode: u32) -> u64 {
    let mut b = [0u8; 8];
    b[..2].copy_from_slice(&kn.to_le_bytes());
    b[2..6].copy_from_slice(&vnode.to_le_bytes());
    b[6..].copy_from_slice(b"vn");
    crate::hash::key_hash(&b)
}

fn slot_position(slot: u16) -> u64 {
    let mut b = [0u8; 6];
    b[..2].copy_from_slice(&slot.to_le_bytes());
    b[2..].copy_from_slice(b"slot");
    crate::hash::key_hash(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_map_is_balanced_and_moves_little() {
        let kns: Vec<u16> = (0..4).collect();
        let m4 = SlotMap::consistent(1, &kns, DEFAULT_VNODES);
        for kn in 0..4 {
            let n = m4.slots_of(kn);
            assert!(
                (2048..=6144).contains(&n),
                "KN {kn} owns {n} of 16384 slots"
            );
        }
        let m5 = SlotMap::consistent(2, &[0, 1, 2, 3, 4], DEFAULT_VNODES);
        let moved = m4.moved_slots(&m5);
        // Adding a 5th KN should move about 1/5 of the slots, all of them to the new KN.
        assert!(moved < 16384 * 2 / 5, "moved {moved}");
        assert_eq!(moved, m5.slots_of(4));
        assert_eq!(SlotMap::consistent(3, &[], 8).owner(5), NO_KN);
    }
}
