//! Log entries: `{crc, op, flags, key_len, val_len, epoch, seq}` + key + value, padded to 8.
//!
//! The CRC-32C covers everything after itself (rest of header, key, value) and is seeded
//! with the block's salt. An entry is *committed* when its CRC matches and its seq is the
//! one its log expects next; anything else at the tail is torn or stale and is never merged.

use core::fmt;

use crate::{assert_offset, assert_size, impl_pod, pod::Pod};

/// Entry header size.
pub const ENTRY_HEADER_SIZE: usize = 24;
/// Entries are aligned to this many bytes within a block.
pub const ENTRY_ALIGN: usize = 8;
/// Longest key accepted anywhere in the system.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest value accepted anywhere in the system (blocks may impose a smaller bound); an
/// expiring entry stores its expiry time beside it.
pub const MAX_VALUE_LEN: usize = 1 << 20;

/// Entry flag: the key expires. The entry's value then begins with the expiry time, Unix
/// milliseconds as 8 bytes little-endian, followed by the key's value; the index reaches
/// the expiry with the entry, so it survives crashes, failover and ownership moves.
pub const FLAG_EXPIRES: u8 = 1;
/// Bytes of the expiry time that begins the value of an entry with [`FLAG_EXPIRES`].
pub const EXPIRY_LEN: usize = 8;
/// Every flag an entry may carry; an entry with any other bit set is refused.
pub const KNOWN_FLAGS: u8 = FLAG_EXPIRES;

/// What an entry does to its key.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Insert or update: the entry holds the new value.
    Put = 1,
    /// Delete: the entry carries no value.
    Delete = 2,
}

impl Op {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Put),
            2 => Some(Self::Delete),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub crc: u32,
    pub op: u8,
    pub flags: u8,
    pub key_len: u16,
    pub val_len: u32,
    /// The writer's lease epoch.
    pub epoch: u32,
    /// Position of the entry in its log, starting at 1 and without gaps.
    pub seq: u64,
}
assert_size!(EntryHeader, ENTRY_HEADER_SIZE);
assert_offset!(EntryHeader, key_len, 6);
assert_offset!(EntryHeader, seq, 16);
impl_pod!(EntryHeader);

/// Unpadded length of an entry.
#[inline]
pub const fn raw_len(key_len: usize, val_len: usize) -> usize {
    ENTRY_HEADER_SIZE + key_len + val_len
}

/// Bytes an entry occupies in a block (header + key + value, padded to 8).
#[inline]
pub const fn padded_len(key_len: usize, val_len: usize) -> usize {
    (raw_len(key_len, val_len) + ENTRY_ALIGN - 1) & !(ENTRY_ALIGN - 1)
}

/// Why bytes are not a committed entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// Fewer bytes than the header, or than the header says the entry needs.
    Truncated,
    /// The op byte is not a known op (e.g. zeroed, never-written space).
    BadOp(u8),
    /// A zero-length key, a key or value over the limits, a delete with a value, or an
    /// expiring put too short for its expiry time.
    BadLength,
    /// The flags byte has a bit this version does not know.
    BadFlags(u8),
    /// The CRC does not match: torn, bit-flipped, or left over from an earlier block use.
    BadChecksum,
    /// The entry verifies but is not the one the log expects next.
    SeqGap { expected: u64, found: u64 },
    /// The caller's buffer is too small to encode into.
    BufferTooSmall,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("entry is truncated"),
            Self::BadOp(op) => write!(f, "entry has unknown op {op}"),
            Self::BadLength => f.write_str("entry lengths are out of range"),
            Self::BadFlags(b) => write!(f, "entry has unknown flags {b:#04x}"),
            Self::BadChecksum => f.write_str("entry checksum mismatch"),
            Self::SeqGap { expected, found } => {
                write!(
                    f,
                    "entry seq {found} does not continue the log (expected {expected})"
                )
            }
            Self::BufferTooSmall => f.write_str("buffer too small for entry"),
        }
    }
}

/// A decoded, verified entry borrowing its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub op: Op,
    /// [`FLAG_EXPIRES`] or 0.
    pub flags: u8,
    pub epoch: u32,
    pub seq: u64,
    pub key: &'a [u8],
    /// The stored value: with [`FLAG_EXPIRES`], the expiry time comes first (see
    /// [`Entry::user_value`] and [`Entry::expire_at`]).
    pub value: &'a [u8],
    /// Padded length: the distance to the next entry.
    pub len: usize,
}

impl Entry<'_> {
    /// When the key expires (Unix ms), if it does.
    pub fn expire_at(&self) -> Option<u64> {
        expiry_of(self.flags, self.value)
    }

    /// The key's value, without the expiry time that may begin the stored bytes.
    pub fn user_value(&self) -> &[u8] {
        &self.value[expiry_prefix(self.flags)..]
    }
}

/// Bytes of the stored value that are the expiry time: [`EXPIRY_LEN`] with
/// [`FLAG_EXPIRES`], else 0.
#[inline]
pub const fn expiry_prefix(flags: u8) -> usize {
    if flags & FLAG_EXPIRES != 0 {
        EXPIRY_LEN
    } else {
        0
    }
}

/// The expiry time carried by a stored value with these flags, if any.
#[inline]
pub fn expiry_of(flags: u8, stored: &[u8]) -> Option<u64> {
    if flags & FLAG_EXPIRES == 0 {
        return None;
    }
    let b: [u8; EXPIRY_LEN] = stored.get(..EXPIRY_LEN)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// Writes one entry at the start of `buf` and returns its padded length. Padding bytes are
/// zeroed so that a block's bytes are deterministic.
pub fn encode(
    buf: &mut [u8],
    salt: u32,
    op: Op,
    epoch: u32,
    seq: u64,
    key: &[u8],
    value: &[u8],
) -> Result<usize, EntryError> {
    encode_flagged(buf, salt, op, 0, epoch, seq, key, value)
}

/// [`encode`] with flags: with [`FLAG_EXPIRES`], `value` is the stored value, expiry time
/// first.
#[allow(clippy::too_many_arguments)]
pub fn encode_flagged(
    buf: &mut [u8],
    salt: u32,
    op: Op,
    flags: u8,
    epoch: u32,
    seq: u64,
    key: &[u8],
    value: &[u8],
) -> Result<usize, EntryError> {
    if flags & !KNOWN_FLAGS != 0 {
        return Err(EntryError::BadFlags(flags));
    }
    if op == Op::Delete && flags != 0 {
        return Err(EntryError::BadFlags(flags));
    }
    if value.len() < expiry_prefix(flags) {
        return Err(EntryError::BadLength);
    }
    if key.is_empty()
        || key.len() > MAX_KEY_LEN
        || value.len() > MAX_VALUE_LEN + expiry_prefix(flags)
    {
        return Err(EntryError::BadLength);
    }
    if op == Op::Delete && !value.is_empty() {
        return Err(EntryError::BadLength);
    }
    let raw = raw_len(key.len(), value.len());
    let padded = padded_len(key.len(), value.len());
    if buf.len() < padded {
        return Err(EntryError::BufferTooSmall);
    }
    let mut h = EntryHeader {
        crc: 0,
        op: op as u8,
        flags,
        key_len: key.len() as u16,
        val_len: value.len() as u32,
        epoch,
        seq,
    };
    h.crc = crate::crc::crc32c_seeded(salt, &[&h.as_bytes()[4..], key, value]);
    buf[..ENTRY_HEADER_SIZE].copy_from_slice(h.as_bytes());
    buf[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + key.len()].copy_from_slice(key);
    buf[ENTRY_HEADER_SIZE + key.len()..raw].copy_from_slice(value);
    buf[raw..padded].fill(0);
    Ok(padded)
}

/// Reads the header at the start of `bytes` and returns the entry's padded length without
/// verifying it (used to size the READ of the rest); `None` if the lengths are out of range.
pub fn peek_len(bytes: &[u8]) -> Option<usize> {
    let h = EntryHeader::read_from(bytes)?;
    let (k, v) = (h.key_len as usize, h.val_len as usize);
    (k > 0 && k <= MAX_KEY_LEN && v <= MAX_VALUE_LEN + expiry_prefix(h.flags))
        .then(|| padded_len(k, v))
}

/// Decodes and verifies the entry at the start of `bytes`, written under `salt`.
pub fn decode(bytes: &[u8], salt: u32) -> Result<Entry<'_>, EntryError> {
    let h = EntryHeader::read_from(bytes).ok_or(EntryError::Truncated)?;
    let op = Op::from_u8(h.op).ok_or(EntryError::BadOp(h.op))?;
    let (k, v) = (h.key_len as usize, h.val_len as usize);
    if k == 0
        || k > MAX_KEY_LEN
        || v > MAX_VALUE_LEN + expiry_prefix(h.flags)
        || (op == Op::Delete && v != 0)
    {
        return Err(EntryError::BadLength);
    }
    if h.flags & !KNOWN_FLAGS != 0 || (op == Op::Delete && h.flags != 0) {
        return Err(EntryError::BadFlags(h.flags));
    }
    if v < expiry_prefix(h.flags) {
        return Err(EntryError::BadLength);
    }
    let raw = raw_len(k, v);
    if bytes.len() < raw {
        return Err(EntryError::Truncated);
    }
    let key = &bytes[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + k];
    let value = &bytes[ENTRY_HEADER_SIZE + k..raw];
    let crc = crate::crc::crc32c_seeded(salt, &[&bytes[4..ENTRY_HEADER_SIZE], key, value]);
    if crc != h.crc {
        return Err(EntryError::BadChecksum);
    }
    Ok(Entry {
        op,
        flags: h.flags,
        epoch: h.epoch,
        seq: h.seq,
        key,
        value,
        len: padded_len(k, v),
    })
}

/// Decodes the entry at the start of `bytes` and checks that it is the one expected next.
pub fn decode_next(bytes: &[u8], salt: u32, expected_seq: u64) -> Result<Entry<'_>, EntryError> {
    let e = decode(bytes, salt)?;
    if e.seq != expected_seq {
        return Err(EntryError::SeqGap {
            expected: expected_seq,
            found: e.seq,
        });
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(salt: u32, op: Op, seq: u64, k: &[u8], v: &[u8]) -> ([u8; 256], usize) {
        let mut buf = [0xAAu8; 256];
        let n = encode(&mut buf, salt, op, 3, seq, k, v).expect("encode");
        (buf, n)
    }

    #[test]
    fn round_trip() {
        let (buf, n) = enc(11, Op::Put, 7, b"key", b"value!");
        assert_eq!(n, padded_len(3, 6));
        assert_eq!(n % 8, 0);
        let e = decode_next(&buf, 11, 7).expect("decode");
        assert_eq!(
            (e.op, e.seq, e.epoch, e.key, e.value, e.len),
            (Op::Put, 7, 3, &b"key"[..], &b"value!"[..], n)
        );
        assert_eq!(peek_len(&buf), Some(n));
    }

    #[test]
    fn an_expiring_entry_carries_its_expiry_before_the_value() {
        let mut buf = [0u8; 128];
        let mut stored = 1_700_000_000_123u64.to_le_bytes().to_vec();
        stored.extend_from_slice(b"val");
        let n = encode_flagged(&mut buf, 9, Op::Put, FLAG_EXPIRES, 1, 2, b"k", &stored)
            .expect("encode");
        let e = decode_next(&buf[..n], 9, 2).expect("decode");
        assert_eq!(e.flags, FLAG_EXPIRES);
        assert_eq!(e.expire_at(), Some(1_700_000_000_123));
        assert_eq!(e.user_value(), b"val");
        let plain = enc(9, Op::Put, 2, b"k", b"val").0;
        let e = decode(&plain, 9).expect("decode");
        assert_eq!((e.expire_at(), e.user_value()), (None, &b"val"[..]));
        // Too short for its expiry, an unknown flag, a flagged delete: all refused.
        assert_eq!(
            encode_flagged(&mut buf, 9, Op::Put, FLAG_EXPIRES, 1, 2, b"k", b"short"),
            Err(EntryError::BadLength)
        );
        assert_eq!(
            encode_flagged(&mut buf, 9, Op::Put, 0x80, 1, 2, b"k", b"v"),
            Err(EntryError::BadFlags(0x80))
        );
        assert_eq!(
            encode_flagged(&mut buf, 9, Op::Delete, FLAG_EXPIRES, 1, 2, b"k", b""),
            Err(EntryError::BadFlags(FLAG_EXPIRES))
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let (buf, n) = enc(5, Op::Put, 1, b"k1", b"some value bytes");
        let raw = raw_len(2, 16);
        for bit in 0..raw * 8 {
            let mut b = buf;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_next(&b[..n], 5, 1).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_wrong_salt_and_gaps_are_detected() {
        let (buf, n) = enc(5, Op::Put, 4, b"k", b"vvvvvvvv");
        for cut in 0..raw_len(1, 8) {
            assert!(decode(&buf[..cut], 5).is_err(), "cut at {cut}");
        }
        assert_eq!(decode(&buf[..n], 6), Err(EntryError::BadChecksum));
        assert_eq!(
            decode_next(&buf[..n], 5, 3),
            Err(EntryError::SeqGap {
                expected: 3,
                found: 4
            })
        );
        assert_eq!(decode(&[0u8; 64], 5), Err(EntryError::BadOp(0)));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut buf = [0u8; 64];
        assert_eq!(
            encode(&mut buf, 0, Op::Put, 0, 1, b"", b"v"),
            Err(EntryError::BadLength)
        );
        assert_eq!(
            encode(&mut buf, 0, Op::Delete, 0, 1, b"k", b"v"),
            Err(EntryError::BadLength)
        );
        assert_eq!(
            encode(&mut buf, 0, Op::Put, 0, 1, b"k", &[0u8; 64]),
            Err(EntryError::BufferTooSmall)
        );
    }
}
