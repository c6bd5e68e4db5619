//! Hashing for a shard's own tables of keys: the never-randomised XXH3 key hash instead of
//! std's SipHash, which cost a few percent of a write. A shard's tables hold only keys of
//! its own clients' writes, and a flood of colliding keys would have to defeat XXH3 with a
//! fixed seed: the same exposure as the DAC cache's table and the DPM's index.

use std::hash::{BuildHasherDefault, Hasher};

use dinomo_shared::hash::key_hash;

/// Hashes byte strings with [`key_hash`] and integers (already hashes) as they are.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = self.0.rotate_left(29) ^ key_hash(bytes);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = self.0.rotate_left(29) ^ v;
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

/// A `HashMap`/`HashSet` hasher of [`KeyHasher`]s.
pub(crate) type KeyHash = BuildHasherDefault<KeyHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn tables_keyed_by_bytes_or_hashes_work() {
        let mut m: HashMap<Vec<u8>, u32, KeyHash> = HashMap::default();
        for i in 0..1000u32 {
            m.insert(format!("key:{i}").into_bytes(), i);
        }
        assert!((0..1000u32).all(|i| m.get(format!("key:{i}").as_bytes()) == Some(&i)));
        assert_eq!(m.get(&b"key:1000"[..]), None);
        let s: HashSet<u64, KeyHash> = (0..1000).map(|i| key_hash(&[i as u8, 7])).collect();
        assert!(s.contains(&key_hash(&[3, 7])));
    }
}
