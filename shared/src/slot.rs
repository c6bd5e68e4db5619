//! Key → slot, exactly as Redis Cluster does it: CRC-16/XMODEM of the key (or of its
//! `{hash tag}`) modulo 16384.

use crate::crc::CRC16_XMODEM;

/// Number of ownership slots.
pub const SLOTS: u16 = 16384;

/// The part of `key` that decides its slot: the bytes between the first `{` and the first
/// `}` after it, if that is non-empty; otherwise the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The slot of `key`, in `0..SLOTS`.
#[inline]
pub fn key_slot(key: &[u8]) -> u16 {
    CRC16_XMODEM.checksum(hash_tag(key)) & (SLOTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_cluster_vectors() {
        // From Redis's CLUSTER KEYSLOT documentation and cluster specification.
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2515);
        assert_eq!(key_slot(b"bar{hash_tag}"), 2515);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 0x31C3 & (SLOTS - 1));
    }

    #[test]
    fn hash_tag_rules() {
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        // Empty tag: the whole key counts.
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        // Only the first `{` counts, and the first `}` after it.
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no-tag}{"), b"no-tag}{");
    }
}
