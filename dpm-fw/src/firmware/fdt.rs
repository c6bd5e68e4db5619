//! Just enough of a flattened-device-tree reader to learn how to call PSCI.
//!
//! QEMU's `virt` board handles PSCI itself and says in the device tree which conduit it
//! listens on (`/psci`, property `method`: `"hvc"` when the guest boots at EL1, `"smc"` with
//! `virtualization=on`); firmware on a DPU describes it the same way. Reading the tree beats
//! guessing from the exception level. Malformed input yields `None`, never a panic.

use dinomo_hw::platform::PsciConduit;

/// Device-tree blob magic (big-endian `0xd00dfeed`).
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// Largest blob [`psci_conduit`] looks at.
pub const MAX_FDT_SIZE: usize = 2 << 20;

const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn cstr(b: &[u8], at: usize) -> Option<&[u8]> {
    let s = b.get(at..)?;
    let n = s.iter().position(|&c| c == 0)?;
    Some(&s[..n])
}

/// Total size recorded in the header of a blob starting with `head` (at least 8 bytes), if
/// the magic is there and the size is plausible.
pub fn blob_size(head: &[u8]) -> Option<usize> {
    if be32(head, 0)? != FDT_MAGIC {
        return None;
    }
    let size = be32(head, 4)? as usize;
    (40..=MAX_FDT_SIZE).contains(&size).then_some(size)
}

/// The `method` of the top-level `psci` node (name `psci` or `psci@...`), if any.
pub fn psci_conduit(blob: &[u8]) -> Option<PsciConduit> {
    let size = blob_size(blob)?;
    let blob = blob.get(..size)?;
    let structs = be32(blob, 8)? as usize;
    let strings = be32(blob, 12)? as usize;
    let mut at = structs;
    let mut depth = 0u32;
    // Depth at which we are inside the psci node, if we are.
    let mut in_psci = false;
    loop {
        let token = be32(blob, at)?;
        at += 4;
        match token {
            BEGIN_NODE => {
                let name = cstr(blob, at)?;
                at = (at + name.len() + 1 + 3) & !3;
                depth += 1;
                in_psci = depth == 2 && (name == b"psci" || name.starts_with(b"psci@"));
            }
            END_NODE => {
                depth = depth.checked_sub(1)?;
                in_psci = false;
            }
            PROP => {
                let len = be32(blob, at)? as usize;
                let name_off = be32(blob, at + 4)? as usize;
                let value = blob.get(at + 8..(at + 8).checked_add(len)?)?;
                at = (at + 8 + len + 3) & !3;
                if in_psci && cstr(blob, strings.checked_add(name_off)?)? == b"method" {
                    return match value.split(|&c| c == 0).next()? {
                        b"hvc" => Some(PsciConduit::Hvc),
                        b"smc" => Some(PsciConduit::Smc),
                        _ => None,
                    };
                }
            }
            NOP => {}
            END => return None,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a blob: root { name: psci-like node { method = <method> } }.
    fn blob(node: &str, method: &str) -> Vec<u8> {
        let mut st = Vec::new();
        let mut strings = Vec::new();
        let push_name = |st: &mut Vec<u8>, n: &str| {
            st.extend_from_slice(n.as_bytes());
            st.push(0);
            while st.len() % 4 != 0 {
                st.push(0);
            }
        };
        let mut prop = |st: &mut Vec<u8>, name: &str, val: &[u8]| {
            let off = strings.len() as u32;
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            st.extend_from_slice(&PROP.to_be_bytes());
            st.extend_from_slice(&(val.len() as u32).to_be_bytes());
            st.extend_from_slice(&off.to_be_bytes());
            st.extend_from_slice(val);
            while st.len() % 4 != 0 {
                st.push(0);
            }
        };
        st.extend_from_slice(&BEGIN_NODE.to_be_bytes());
        push_name(&mut st, "");
        prop(&mut st, "method", b"smc\0"); // root-level decoy
        st.extend_from_slice(&BEGIN_NODE.to_be_bytes());
        push_name(&mut st, "cpus");
        prop(&mut st, "method", b"smc\0"); // decoy in another node
        st.extend_from_slice(&END_NODE.to_be_bytes());
        st.extend_from_slice(&NOP.to_be_bytes());
        st.extend_from_slice(&BEGIN_NODE.to_be_bytes());
        push_name(&mut st, node);
        prop(&mut st, "compatible", b"arm,psci-1.0\0arm,psci-0.2\0");
        let mut m = method.as_bytes().to_vec();
        m.push(0);
        prop(&mut st, "method", &m);
        st.extend_from_slice(&END_NODE.to_be_bytes());
        st.extend_from_slice(&END_NODE.to_be_bytes());
        st.extend_from_slice(&END.to_be_bytes());
        let structs = 40u32;
        let strings_off = structs + st.len() as u32;
        let total = strings_off + strings.len() as u32;
        let mut out = Vec::new();
        for w in [FDT_MAGIC, total, structs, strings_off, 0, 17, 16, 0, 0, 0] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend_from_slice(&st);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_the_psci_method() {
        assert_eq!(psci_conduit(&blob("psci", "hvc")), Some(PsciConduit::Hvc));
        assert_eq!(psci_conduit(&blob("psci@0", "smc")), Some(PsciConduit::Smc));
        assert_eq!(psci_conduit(&blob("psci", "foo")), None);
        assert_eq!(psci_conduit(&blob("notpsci", "hvc")), None);
    }

    #[test]
    fn malformed_blobs_give_none() {
        let good = blob("psci", "hvc");
        assert_eq!(blob_size(&good), Some(good.len()));
        for cut in 0..good.len() {
            // Truncated blobs: the header still claims the full size, so nothing is read
            // past the end.
            let _ = psci_conduit(&good[..cut]);
        }
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(psci_conduit(&bad), None);
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(psci_conduit(&bad), None);
        let mut noise = good;
        for (i, b) in noise.iter_mut().enumerate().skip(40) {
            *b ^= (i * 131) as u8;
        }
        let _ = psci_conduit(&noise);
    }
}
