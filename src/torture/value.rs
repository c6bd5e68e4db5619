//! Self-validating values: each carries its key, its writer, its sequence number and a
//! checksum over all of it, so a value that is torn (cut short, mixed with another) or
//! foreign (written for another key) is recognized wherever it is read.
//!
//! Layout: `writer:seq:` + padding of a length chosen from `seq` + `:` + key + `#` + the
//! checksum (16 hex digits) of everything before the `#`.

use dinomo_shared::hash::key_hash;

/// The value `writer` writes to `key` as its write number `seq`, into `out` (cleared).
pub fn encode(key: &[u8], writer: u32, seq: u64, out: &mut Vec<u8>) {
    use std::io::Write;
    out.clear();
    let _ = write!(out, "{writer}:{seq}:");
    // Lengths vary from write to write, so a value torn at a block or entry boundary shows.
    let pad = ((seq.wrapping_mul(7919) ^ u64::from(writer)) % 200) as usize;
    out.extend((0..pad).map(|i| b'a' + ((seq as usize + i) % 26) as u8));
    out.push(b':');
    out.extend_from_slice(key);
    let sum = key_hash(out);
    let _ = write!(out, "#{sum:016x}");
}

/// The writer and sequence number of a value read from `key`, or why the value is not one
/// `encode` made for `key`.
pub fn decode(key: &[u8], value: &[u8]) -> Result<(u32, u64), String> {
    let Some(hash_at) = value.iter().rposition(|&b| b == b'#') else {
        return Err("no checksum".into());
    };
    let (body, sum) = (&value[..hash_at], &value[hash_at + 1..]);
    let sum = std::str::from_utf8(sum)
        .ok()
        .and_then(|s| {
            (s.len() == 16)
                .then(|| u64::from_str_radix(s, 16).ok())
                .flatten()
        })
        .ok_or("malformed checksum")?;
    if key_hash(body) != sum {
        return Err("checksum mismatch (torn value)".into());
    }
    let mut fields = body.splitn(4, |&b| b == b':');
    let num = |f: Option<&[u8]>| -> Option<u64> { std::str::from_utf8(f?).ok()?.parse().ok() };
    let writer = num(fields.next()).ok_or("malformed writer")?;
    let seq = num(fields.next()).ok_or("malformed sequence number")?;
    let _pad = fields.next();
    if fields.next() != Some(key) {
        return Err("written for another key (foreign value)".into());
    }
    let writer = u32::try_from(writer).map_err(|_| "malformed writer")?;
    Ok((writer, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_damage_is_detected() {
        let mut v = Vec::new();
        for seq in [0u64, 1, 77, 1 << 40] {
            encode(b"t{1}2", 3, seq, &mut v);
            assert_eq!(decode(b"t{1}2", &v), Ok((3, seq)));
        }
        encode(b"t{1}2", 3, 5, &mut v);
        assert!(decode(b"t{1}3", &v).is_err(), "foreign key");
        assert!(decode(b"t{1}2", &v[..v.len() - 1]).is_err(), "cut short");
        let mut torn = v.clone();
        torn[2] ^= 1;
        assert!(decode(b"t{1}2", &torn).is_err(), "flipped byte");
        let mut other = Vec::new();
        encode(b"t{1}2", 3, 6, &mut other);
        let mut mixed = v[..v.len() / 2].to_vec();
        mixed.extend_from_slice(&other[other.len() / 2..]);
        assert!(decode(b"t{1}2", &mixed).is_err(), "mixed values");
        assert!(decode(b"t{1}2", b"").is_err());
    }
}
