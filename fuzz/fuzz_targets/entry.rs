//! The log-entry decoder, on its own and as a walk over the entries of a block.
//!
//! Input: a 4-byte salt, then the bytes of a block body. The walk decodes entry after entry
//! with the seq each one is expected to carry, as the merger does, and stops at the first
//! byte that is not a committed entry.
//!
//! Checked besides "no panic": a decoded entry lies within its bytes, `peek_len` agrees
//! with it, and encoding its fields (flags included) again under the same salt yields the
//! same bytes.
#![no_main]

use dinomo_shared::entry::{self, raw_len, ENTRY_ALIGN, ENTRY_HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fn check_entry(bytes: &[u8], salt: u32, e: &entry::Entry<'_>) {
    let raw = raw_len(e.key.len(), e.value.len());
    assert!(raw <= bytes.len());
    assert!(e.len >= raw && e.len < raw + ENTRY_ALIGN && e.len.is_multiple_of(ENTRY_ALIGN));
    assert_eq!(entry::peek_len(bytes), Some(e.len));
    let mut again = vec![0u8; e.len];
    let n = entry::encode_flagged(
        &mut again, salt, e.op, e.flags, e.epoch, e.seq, e.key, e.value,
    )
    .expect("a decoded entry encodes");
    assert_eq!(n, e.len);
    assert_eq!(entry::decode(&again, salt), Ok(*e));
    // Encoding is deterministic: every byte the CRC covers, and the CRC, come out the same
    // (the padding is not covered by the CRC). A decoded entry's flags are known ones, and
    // an expiring entry carries its expiry time before its value.
    assert_eq!(again[..raw], bytes[..raw]);
    assert_eq!(e.flags & !entry::KNOWN_FLAGS, 0);
    if e.expire_at().is_some() {
        assert_eq!(e.user_value().len() + entry::EXPIRY_LEN, e.value.len());
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let salt = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let body = &data[4..];

    if let Ok(e) = entry::decode(body, salt) {
        check_entry(body, salt, &e);
    }

    let mut at = 0usize;
    let mut expected_seq = match entry::decode(body, salt) {
        Ok(e) => e.seq,
        Err(_) => return,
    };
    while at + ENTRY_HEADER_SIZE <= body.len() {
        let Ok(e) = entry::decode_next(&body[at..], salt, expected_seq) else {
            break;
        };
        check_entry(&body[at..], salt, &e);
        at += e.len;
        expected_seq = match expected_seq.checked_add(1) {
            Some(s) => s,
            None => break,
        };
    }
});
