//! Writes the binary seeds of the `entry` and `region` targets into `corpus/` (the `resp`
//! and `msg` seeds are small enough to read as they are). Run from `fuzz/`:
//! `cargo run --example make_seeds`.

use std::fs;
use std::path::Path;

use dinomo_shared::entry::{self, Op};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("create the corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
}

/// A block body of `entries` (op, seq, key, value) under `salt`, prefixed with the salt as
/// the `entry` target reads it.
fn block(salt: u32, entries: &[(Op, u64, &[u8], &[u8])]) -> Vec<u8> {
    let mut out = salt.to_le_bytes().to_vec();
    for &(op, seq, key, value) in entries {
        let at = out.len();
        out.resize(at + entry::padded_len(key.len(), value.len()), 0);
        entry::encode(&mut out[at..], salt, op, 1, seq, key, value).expect("encode a seed");
    }
    out
}

/// One patch for the `region` target.
fn patch(area: u8, offset: u16, bytes: &[u8]) -> Vec<u8> {
    let mut p = vec![area];
    p.extend_from_slice(&offset.to_le_bytes());
    p.push(bytes.len() as u8);
    p.extend_from_slice(bytes);
    p
}

fn main() {
    write(
        "entry",
        "put",
        &block(0x5eed, &[(Op::Put, 1, b"key", b"value")]),
    );
    write(
        "entry",
        "delete",
        &block(7, &[(Op::Delete, 9, b"gone", b"")]),
    );
    write(
        "entry",
        "run-of-three",
        &block(
            42,
            &[
                (Op::Put, 1, b"a", b"1"),
                (Op::Put, 2, b"bb", &[0xAB; 30]),
                (Op::Delete, 3, b"a", b""),
            ],
        ),
    );
    let mut gap = block(42, &[(Op::Put, 1, b"a", b"1"), (Op::Put, 3, b"c", b"3")]);
    write("entry", "seq-gap", &gap);
    let last = gap.len() - 1;
    gap[last] ^= 0x40;
    write("entry", "torn-tail", &gap);
    write(
        "entry",
        "long-key",
        &block(1, &[(Op::Put, 1, &[b'k'; entry::MAX_KEY_LEN], b"v")]),
    );

    // The region target's areas: 0 superblock (resealed), 1 superblock area, 2 control,
    // 3 index, 4 indirect cells, 5 a block header, 6 the log area; 0x80 | area: no reseal.
    write("region", "unchanged", &[]);
    write(
        "region",
        "region-size",
        &patch(0, 16, &(1u64 << 20).to_le_bytes()),
    );
    write("region", "max-logs", &patch(0, 40, &u32::MAX.to_le_bytes()));
    write(
        "region",
        "index-len",
        &patch(0, 56, &(1u64 << 62).to_le_bytes()),
    );
    write("region", "bad-crc", &patch(0x80, 104, &[1, 2, 3, 4]));
    write("region", "state-flags", &patch(1, 128, &[0; 8]));
    write("region", "log-slot", &patch(2, 128, &[0xFF; 32]));
    write("region", "map-header", &patch(2, 64, &[0x11; 16]));
    write("region", "index-root", &patch(3, 0, &[0xEE; 64]));
    write(
        "region",
        "cell",
        &patch(4, 0, &[0x01, 0, 0, 0, 0, 0, 0, 0x80]),
    );
    write(
        "region",
        "sealed-len",
        &patch(5, (1 << 6) | 12, &[0xF0, 0xFF, 0, 0]),
    );
    write(
        "region",
        "next-link",
        &patch(5, (2 << 6) | 16, &[0xFE, 0xFF, 0xFF, 0x0F]),
    );
    write("region", "block-magic", &patch(5, 3 << 6, b"XBLK"));
    write(
        "region",
        "entry-bytes",
        &patch(6, 4096 + 64 + 5, &[0xFF, 0xFF, 0x7F]),
    );
    let mut two = patch(5, 12, &[0x40, 0, 0, 0]);
    two.extend(patch(6, 90, &[0; 24]));
    write("region", "header-and-entry", &two);
}
