//! Checksums: CRC-32C for log entries and headers, CRC-16/XMODEM for key slots.

use crc::{Crc, Table, CRC_16_XMODEM, CRC_32_ISCSI};

/// CRC-32C (Castagnoli, as in iSCSI and ext4), slice-by-16 tables.
pub const CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);
/// CRC-16/XMODEM, the checksum behind Redis Cluster's key slots.
pub const CRC16_XMODEM: Crc<u16, Table<1>> = Crc::<u16, Table<1>>::new(&CRC_16_XMODEM);

/// CRC-32C of `bytes`.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

/// CRC-32C of several byte runs, as if they were concatenated, seeded with `seed` so that
/// the same bytes written under another seed (a reused log block) do not verify.
#[inline]
pub fn crc32c_seeded(seed: u32, parts: &[&[u8]]) -> u32 {
    let mut d = CRC32C.digest_with_initial(seed ^ 0xFFFF_FFFF);
    for p in parts {
        d.update(p);
    }
    d.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn seeded_crc_depends_on_seed_and_concatenates() {
        let a = crc32c_seeded(7, &[b"hello ", b"world"]);
        assert_eq!(a, crc32c_seeded(7, &[b"hello world"]));
        assert_ne!(a, crc32c_seeded(8, &[b"hello world"]));
    }

    #[test]
    fn crc16_xmodem_check_value() {
        // The value Redis's cluster specification gives for "123456789".
        assert_eq!(CRC16_XMODEM.checksum(b"123456789"), 0x31C3);
    }
}
