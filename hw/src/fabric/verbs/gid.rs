//! Which GID a queue pair uses as its source address.
//!
//! On RoCE every IP address of the interface appears in the port's GID table, once per
//! RoCE version the device speaks; the index of the right entry differs per host and per
//! NIC (soft-RoCE: 0 is the IPv6 link-local address, 1 the IPv4 one; ConnectX: four or
//! more entries). Asking every operator to look it up is the most common way an RDMA setup
//! fails, so when no index is given the port's RoCE v2 entry of an IPv4 address is picked
//! (what `show_gids` users choose by hand, routable across subnets), and on InfiniBand
//! index 0 (the port GID). The table and each entry's type are read from sysfs
//! (`/sys/class/infiniband/DEV/ports/PORT/{gids,gid_attrs/types,gid_attrs/ndevs}/N`),
//! which every kernel with verbs has; `rdma-sys` 0.3 does not bind `ibv_query_gid_ex`.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// The usual sysfs root of RDMA devices.
pub const SYSFS_ROOT: &str = "/sys/class/infiniband";

/// What kind of address a GID table entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GidType {
    /// `IB/RoCE v1`: InfiniBand, or RoCE v1 (Ethernet, not routable).
    IbRoceV1,
    /// `RoCE v2`: RoCE over UDP/IP.
    RoceV2,
    /// Any other text the kernel reports.
    Other(String),
    /// Not known (the type file could not be read).
    Unknown,
}

impl GidType {
    fn parse(s: &str) -> Self {
        match s.trim() {
            "IB/RoCE v1" => Self::IbRoceV1,
            "RoCE v2" => Self::RoceV2,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for GidType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IbRoceV1 => f.write_str("IB/RoCE v1"),
            Self::RoceV2 => f.write_str("RoCE v2"),
            Self::Other(s) => f.write_str(s),
            Self::Unknown => f.write_str("type unknown"),
        }
    }
}

/// One entry of a port's GID table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: [u8; 16],
    pub kind: GidType,
    /// The network interface the entry belongs to (RoCE), if known.
    pub netdev: Option<String>,
}

impl GidEntry {
    /// An unused entry (all zero).
    pub fn is_empty(&self) -> bool {
        self.gid == [0; 16]
    }

    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        Ipv6Addr::from(self.gid).to_ipv4_mapped()
    }

    fn is_link_local(&self) -> bool {
        self.gid[0] == 0xfe && self.gid[1] & 0xc0 == 0x80
    }
}

impl fmt::Display for GidEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "{}: empty", self.index);
        }
        let addr = match self.ipv4() {
            Some(v4) => v4.to_string(),
            None => Ipv6Addr::from(self.gid).to_string(),
        };
        write!(f, "{}: {} {addr}", self.index, self.kind)?;
        if let Some(n) = &self.netdev {
            write!(f, " on {n}")?;
        }
        Ok(())
    }
}

/// Parses sysfs's GID text (`fe80:0000:0000:0000:...`, eight groups of four hex digits).
pub fn parse_gid(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    let mut groups = s.trim().split(':');
    for pair in out.chunks_exact_mut(2) {
        let g = groups.next()?;
        if g.is_empty() || g.len() > 4 {
            return None;
        }
        let v = u16::from_str_radix(g, 16).ok()?;
        pair.copy_from_slice(&v.to_be_bytes());
    }
    groups.next().is_none().then_some(out)
}

/// The GID table of `port` of `dev` as sysfs under `root` shows it, in index order.
/// Entries whose GID cannot be read are left out; an entry whose type file cannot be read
/// (the kernel refuses it for unused entries) has [`GidType::Unknown`].
pub fn read_sysfs_gids(root: &Path, dev: &str, port: u8) -> std::io::Result<Vec<GidEntry>> {
    let base = root.join(dev).join("ports").join(port.to_string());
    let mut indexes: Vec<u32> = std::fs::read_dir(base.join("gids"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    indexes.sort_unstable();
    let mut out = Vec::with_capacity(indexes.len());
    for index in indexes {
        let n = index.to_string();
        let Some(gid) = std::fs::read_to_string(base.join("gids").join(&n))
            .ok()
            .and_then(|s| parse_gid(&s))
        else {
            continue;
        };
        let kind = std::fs::read_to_string(base.join("gid_attrs/types").join(&n))
            .map_or(GidType::Unknown, |s| GidType::parse(&s));
        let netdev = std::fs::read_to_string(base.join("gid_attrs/ndevs").join(&n))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        out.push(GidEntry {
            index,
            gid,
            kind,
            netdev,
        });
    }
    Ok(out)
}

/// The GID index to use on a port: `requested` if it names a populated entry, or (when
/// `None`) the automatic choice. `ethernet` is the port's link layer (RoCE). The error
/// names the device, port and every populated entry with its type.
///
/// Automatic choice, on RoCE: the first RoCE v2 entry of an IPv4 address; else the first
/// RoCE v2 entry that is not link-local; else the first RoCE v2 entry; else (types
/// unknown) the first entry of an IPv4 address; else the first populated entry. On InfiniBand: index 0 (the port GID).
pub fn choose_gid_index(
    table: &[GidEntry],
    ethernet: bool,
    requested: Option<u8>,
    dev: &str,
    port: u8,
) -> Result<u8, String> {
    let populated: Vec<&GidEntry> = table.iter().filter(|e| !e.is_empty()).collect();
    let listing = || {
        if populated.is_empty() {
            "it has no populated entries (is the interface up and does it have an address?)"
                .to_owned()
        } else {
            let l: Vec<String> = populated.iter().map(|e| e.to_string()).collect();
            format!("valid indexes: {}", l.join("; "))
        }
    };
    if let Some(i) = requested {
        return match table.iter().find(|e| e.index == u32::from(i)) {
            Some(e) if !e.is_empty() => Ok(i),
            Some(_) => Err(format!(
                "GID index {i} of port {port} of RDMA device {dev} is empty; {}",
                listing()
            )),
            None => Err(format!(
                "GID index {i} does not exist on port {port} of RDMA device {dev} ({} \
                 entries); {}",
                table.len(),
                listing()
            )),
        };
    }
    let pick = if ethernet {
        let v2 = || populated.iter().filter(|e| e.kind == GidType::RoceV2);
        v2().find(|e| e.ipv4().is_some())
            .or_else(|| v2().find(|e| !e.is_link_local()))
            .or_else(|| v2().next())
            // Types unknown (no sysfs): an IPv4 address is still the best guess.
            .or_else(|| {
                populated
                    .iter()
                    .find(|e| e.kind == GidType::Unknown && e.ipv4().is_some())
            })
            .or_else(|| populated.first())
    } else {
        populated.iter().find(|e| e.index == 0)
    };
    match pick {
        Some(e) => u8::try_from(e.index).map_err(|_| {
            format!(
                "the GID chosen on port {port} of RDMA device {dev} has index {}, above 255; \
                 pass one with --gid-index; {}",
                e.index,
                listing()
            )
        }),
        None => Err(format!(
            "no usable GID on port {port} of RDMA device {dev}; {}",
            listing()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake sysfs port: `(index, gid text, type text or None for an unreadable type)`.
    fn fake(root: &Path, dev: &str, port: u8, entries: &[(u32, &str, Option<&str>)]) {
        let base = root.join(dev).join("ports").join(port.to_string());
        for d in ["gids", "gid_attrs/types", "gid_attrs/ndevs"] {
            fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        for &(i, gid, ty) in entries {
            fs::write(base.join("gids").join(i.to_string()), format!("{gid}\n")).expect("gid");
            if let Some(t) = ty {
                fs::write(
                    base.join("gid_attrs/types").join(i.to_string()),
                    format!("{t}\n"),
                )
                .expect("type");
                fs::write(base.join("gid_attrs/ndevs").join(i.to_string()), "eth0\n")
                    .expect("ndev");
            }
        }
    }

    const ZERO: &str = "0000:0000:0000:0000:0000:0000:0000:0000";
    const LINK_LOCAL: &str = "fe80:0000:0000:0000:5c6d:3aff:fe1b:7d01";
    const V4: &str = "0000:0000:0000:0000:0000:ffff:c000:0201";
    const V6: &str = "2001:0db8:0000:0000:0000:0000:0000:0001";

    fn table(entries: &[(u32, &str, Option<&str>)]) -> Vec<GidEntry> {
        let dir = tempfile::tempdir().expect("tempdir");
        fake(dir.path(), "dev0", 1, entries);
        read_sysfs_gids(dir.path(), "dev0", 1).expect("read")
    }

    #[test]
    fn gid_text_parses_like_sysfs_writes_it() {
        let g = parse_gid(V4).expect("v4");
        assert_eq!(&g[10..], &[0xff, 0xff, 192, 0, 2, 1]);
        assert_eq!(parse_gid(ZERO), Some([0; 16]));
        assert_eq!(parse_gid("fe80::1"), None, "sysfs never abbreviates");
        assert_eq!(parse_gid("0000:0000"), None);
        assert_eq!(parse_gid(&format!("{V4}:0000")), None);
        assert_eq!(parse_gid("zzzz:0000:0000:0000:0000:ffff:c000:0201"), None);
    }

    #[test]
    fn soft_roce_picks_the_ipv4_roce_v2_entry() {
        // rxe on a dummy interface: 0 link-local, 1 the IPv4 address, rest unused (whose
        // type file the kernel refuses to read).
        let t = table(&[
            (0, LINK_LOCAL, Some("RoCE v2")),
            (1, V4, Some("RoCE v2")),
            (2, ZERO, None),
            (10, ZERO, None),
        ]);
        assert_eq!(t.len(), 4);
        assert_eq!(t[3].index, 10, "indexes sort numerically");
        assert_eq!(t[2].kind, GidType::Unknown);
        assert_eq!(t[1].netdev.as_deref(), Some("eth0"));
        assert_eq!(choose_gid_index(&t, true, None, "rxe0", 1), Ok(1));
        assert_eq!(choose_gid_index(&t, true, Some(0), "rxe0", 1), Ok(0));
    }

    #[test]
    fn connectx_like_tables_pick_v2_over_v1() {
        // mlx5: each address once per RoCE version, v1 first.
        let t = table(&[
            (0, LINK_LOCAL, Some("IB/RoCE v1")),
            (1, LINK_LOCAL, Some("RoCE v2")),
            (2, V4, Some("IB/RoCE v1")),
            (3, V4, Some("RoCE v2")),
        ]);
        assert_eq!(choose_gid_index(&t, true, None, "mlx5_0", 1), Ok(3));
        // Without an IPv4 address: the global IPv6 v2 entry, not the link-local one.
        let t = table(&[
            (0, LINK_LOCAL, Some("IB/RoCE v1")),
            (1, LINK_LOCAL, Some("RoCE v2")),
            (2, V6, Some("IB/RoCE v1")),
            (3, V6, Some("RoCE v2")),
        ]);
        assert_eq!(choose_gid_index(&t, true, None, "mlx5_0", 1), Ok(3));
        // Only link-local: the v2 one.
        let t = table(&[
            (0, LINK_LOCAL, Some("IB/RoCE v1")),
            (1, LINK_LOCAL, Some("RoCE v2")),
        ]);
        assert_eq!(choose_gid_index(&t, true, None, "mlx5_0", 1), Ok(1));
    }

    #[test]
    fn infiniband_takes_index_zero() {
        let t = table(&[
            (
                0,
                "fe80:0000:0000:0000:0002:c903:0001:2345",
                Some("IB/RoCE v1"),
            ),
            (1, ZERO, None),
        ]);
        assert_eq!(choose_gid_index(&t, false, None, "mlx4_0", 1), Ok(0));
    }

    #[test]
    fn without_types_an_ipv4_entry_is_still_preferred() {
        let entry = |index, gid| GidEntry {
            index,
            gid: parse_gid(gid).expect("gid"),
            kind: GidType::Unknown,
            netdev: None,
        };
        let t = [entry(0, LINK_LOCAL), entry(1, V4)];
        assert_eq!(choose_gid_index(&t, true, None, "rxe0", 1), Ok(1));
        let t = [entry(0, LINK_LOCAL), entry(1, V6)];
        assert_eq!(choose_gid_index(&t, true, None, "rxe0", 1), Ok(0));
    }

    #[test]
    fn bad_indexes_and_empty_tables_name_the_valid_entries() {
        let t = table(&[
            (0, LINK_LOCAL, Some("RoCE v2")),
            (1, V4, Some("RoCE v2")),
            (2, ZERO, None),
        ]);
        let e = choose_gid_index(&t, true, Some(2), "rxe0", 1).expect_err("empty");
        assert!(e.contains("GID index 2") && e.contains("empty"), "{e}");
        assert!(e.contains("0: RoCE v2 fe80::"), "{e}");
        assert!(e.contains("1: RoCE v2 192.0.2.1 on eth0"), "{e}");
        assert!(e.contains("rxe0") && e.contains("port 1"), "{e}");
        let e = choose_gid_index(&t, true, Some(9), "rxe0", 1).expect_err("missing");
        assert!(
            e.contains("does not exist") && e.contains("3 entries"),
            "{e}"
        );
        assert!(e.contains("1: RoCE v2 192.0.2.1"), "{e}");
        let none = table(&[(0, ZERO, None), (1, ZERO, None)]);
        let e = choose_gid_index(&none, true, None, "rxe0", 1).expect_err("no GIDs");
        assert!(
            e.contains("no usable GID") && e.contains("no populated"),
            "{e}"
        );
        let e = choose_gid_index(&none, false, Some(0), "mlx4_0", 1).expect_err("empty 0");
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn a_missing_sysfs_port_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(read_sysfs_gids(dir.path(), "nodev", 1).is_err());
    }
}
