//! Ownership partitioning: key → slot (Redis Cluster's function) → KN (the cluster map, in
//! [`dinomo_shared::ownership`]) → shard (within the KN).

pub use dinomo_shared::ownership::{SlotMap, DEFAULT_VNODES};

/// The shard of a KN that serves `slot`, when the KN runs `shards` shards.
#[inline]
pub fn shard_of(slot: u16, shards: usize) -> usize {
    // Spread neighbouring slots (and hash tags) over shards.
    (dinomo_shared::hash::key_hash(&slot.to_le_bytes()) % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinomo_shared::slot::SLOTS;

    #[test]
    fn shards_cover_every_slot() {
        let mut seen = [0usize; 4];
        for s in 0..SLOTS {
            seen[shard_of(s, 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 3000), "{seen:?}");
        assert_eq!(shard_of(7, 1), 0);
    }
}
