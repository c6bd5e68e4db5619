//! `dinomo ctl`: operate a running cluster through its manager — show the KNs, the map and
//! the recent reconfigurations with their measurements; add a KN, remove one, rebalance;
//! replicate a key on every KN and return it to its owner.

use std::time::Duration;

use dinomo_shared::auth::ClusterSecret;
use dinomo_shared::manager_proto::{
    key_hex, MgrAuth, MgrClient, MgrReply, MgrRequest, Reconfig, ReplicaMsg, StatusMsg,
};

/// One `ctl` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtlCommand {
    Status,
    AddKn,
    RemoveKn(u16),
    /// Recompute the map, or move `slots` (first, last) to a KN.
    Rebalance(Option<((u16, u16), u16)>),
    /// Replicate this key on every live KN.
    Replicate(Vec<u8>),
    /// Return this key to its owner alone.
    Dereplicate(Vec<u8>),
}

/// Why a `ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("the manager at {addr} refused this session: {source}")]
    Denied {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the manager at {addr}")]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the manager refused: {0}")]
    Refused(String),
    #[error("unexpected reply from the manager: {0}")]
    Unexpected(String),
}

/// How long a command may take: adding or removing a KN waits for the map to settle.
const REPLY_TIMEOUT: Duration = Duration::from_secs(90);

/// Sends `cmd` to the manager at `addr` in a session opened with `secret` (required by a
/// manager that has one); the reply rendered as text, or as JSON.
pub fn run(
    addr: &str,
    secret: Option<ClusterSecret>,
    cmd: &CtlCommand,
    json: bool,
) -> Result<String, CtlError> {
    let unreachable = |source: std::io::Error| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ConnectionRefused
        ) && source.get_ref().is_some()
        {
            CtlError::Denied {
                addr: addr.to_string(),
                source,
            }
        } else {
            CtlError::Unreachable {
                addr: addr.to_string(),
                source,
            }
        }
    };
    let mut m = MgrClient::connect_with(addr, Duration::from_secs(2), &MgrAuth::ctl(secret))
        .map_err(unreachable)?;
    m.set_timeout(REPLY_TIMEOUT).map_err(unreachable)?;
    let req = match cmd {
        CtlCommand::Status => MgrRequest::Status,
        CtlCommand::AddKn => MgrRequest::AddKn,
        CtlCommand::RemoveKn(kn_id) => MgrRequest::RemoveKn { kn_id: *kn_id },
        CtlCommand::Rebalance(None) => MgrRequest::Rebalance {
            slots: None,
            to: None,
        },
        CtlCommand::Rebalance(Some((slots, to))) => MgrRequest::Rebalance {
            slots: Some(*slots),
            to: Some(*to),
        },
        CtlCommand::Replicate(key) => MgrRequest::Replicate { key: key_hex(key) },
        CtlCommand::Dereplicate(key) => MgrRequest::Dereplicate { key: key_hex(key) },
    };
    let reply = m.call(&req).map_err(unreachable)?;
    if let MgrReply::Error { message } = reply {
        return Err(CtlError::Refused(message));
    }
    if json {
        let mut t = serde_json::to_string_pretty(&reply)
            .map_err(|e| CtlError::Unexpected(e.to_string()))?;
        t.push('\n');
        return Ok(t);
    }
    Ok(match reply {
        MgrReply::Status(s) => render_status(&s),
        MgrReply::Added {
            kn_id,
            addr,
            reconfig,
        } => format!(
            "added KN {kn_id} at {addr}\n{}",
            render_reconfigs(reconfig.as_slice())
        ),
        MgrReply::Removed { kn_id, reconfig } => format!(
            "removed KN {kn_id}\n{}",
            render_reconfigs(reconfig.as_slice())
        ),
        MgrReply::Rebalanced { reconfig: None } => "nothing to move\n".into(),
        MgrReply::Rebalanced { reconfig: Some(r) } => {
            format!("rebalanced\n{}", render_reconfigs(&[r]))
        }
        MgrReply::Replication { replicas } => render_replicas(&replicas),
        other => return Err(CtlError::Unexpected(format!("{other:?}"))),
    })
}

/// Parses `A-B` (a slot range).
pub fn parse_slot_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("bad slot range {s:?}: expected FIRST-LAST, e.g. 0-4095");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    let last = dinomo_shared::slot::SLOTS - 1;
    if a > b || b > last {
        return Err(format!(
            "bad slot range {s:?}: FIRST must not be above LAST, and LAST at most {last}"
        ));
    }
    Ok((a, b))
}

/// The `status` reply as tables.
pub fn render_status(s: &StatusMsg) -> String {
    let mut t = format!(
        "map epoch {} ({}), {} KNs{}{}\n\n",
        s.epoch,
        if s.settled { "settled" } else { "settling" },
        s.kns.len(),
        if s.can_spawn {
            ""
        } else {
            ", cannot start KNs"
        },
        if s.policy { ", policy on" } else { "" }
    );
    t.push_str(&format!(
        "{:>4}  {:<22} {:>6} {:>9} {:>6} {:<9} {:>9} {:>6} {:>8}\n",
        "KN", "ADDRESS", "SLOTS", "LEASE_MS", "ACKED", "STATE", "OPS/S", "OCC", "P99_US"
    ));
    for k in &s.kns {
        let state = if k.draining {
            "draining"
        } else if !k.joined {
            "joining"
        } else {
            "serving"
        };
        let (ops, occ, p99) = match &k.load {
            Some(l) => (
                format!("{:.0}", l.ops_per_sec),
                format!("{:.2}", l.occupancy),
                l.p99_us.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        t.push_str(&format!(
            "{:>4}  {:<22} {:>6} {:>9} {:>6} {:<9} {:>9} {:>6} {:>8}\n",
            k.kn_id, k.addr, k.slots, k.lease_ms_left, k.acked_epoch, state, ops, occ, p99
        ));
    }
    for k in &s.kns {
        let hot = k.load.iter().flat_map(|l| &l.hot_keys).take(5);
        let hot: Vec<String> = hot.map(|(key, n)| format!("{key} ({n})")).collect();
        if !hot.is_empty() {
            t.push_str(&format!("KN {} hot keys: {}\n", k.kn_id, hot.join(", ")));
        }
    }
    t.push_str("\nreplicated keys\n");
    t.push_str(&render_replicas(&s.replicas));
    t.push_str("\nrecent reconfigurations\n");
    t.push_str(&render_reconfigs(&s.reconfigs));
    t
}

/// The replicated keys as a table (keys shown as text where they are printable UTF-8,
/// else as `0x` and hex).
pub fn render_replicas(rs: &[ReplicaMsg]) -> String {
    let mut t = format!(
        "{:<24} {:>5} {:>6} {:<8} {}\n",
        "KEY", "OWNER", "CELL", "PHASE", "KNS"
    );
    for r in rs {
        let bytes = r.key_bytes().unwrap_or_default();
        let key = match std::str::from_utf8(&bytes) {
            Ok(k) if k.chars().all(|c| !c.is_control() && c != ' ') => k.to_string(),
            _ => format!("0x{}", r.key),
        };
        let cell = r.cell.map_or_else(|| "-".to_string(), |c| c.to_string());
        let kns: Vec<String> = r.kns.iter().map(u16::to_string).collect();
        t.push_str(&format!(
            "{:<24} {:>5} {:>6} {:<8} {}\n",
            key,
            r.owner,
            cell,
            format!("{:?}", r.phase).to_lowercase(),
            kns.join(",")
        ));
    }
    t
}

/// Reconfiguration records as a table.
pub fn render_reconfigs(rs: &[Reconfig]) -> String {
    let mut t = format!(
        "{:>6} {:>4} {:>7} {:>10} {:>11} {:>8}  {}\n",
        "EPOCH", "KNS", "MOVED", "SETTLE_MS", "RELEASE_MS", "MERGED", "REASON"
    );
    for r in rs {
        let settle = r
            .settle_ms
            .map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        t.push_str(&format!(
            "{:>6} {:>4} {:>7} {:>10} {:>11.1} {:>8}  {}\n",
            r.epoch, r.kns, r.slots_moved, settle, r.max_release_ms, r.entries_merged, r.reason
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ranges_parse_or_explain() {
        assert_eq!(parse_slot_range("0-4095"), Ok((0, 4095)));
        assert_eq!(parse_slot_range(" 7 - 7"), Ok((7, 7)));
        for bad in ["", "5", "a-b", "1-", "-3", "1-70000", "5-2", "0-16384"] {
            assert!(parse_slot_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_renders_kns_and_reconfigurations() {
        use dinomo_shared::manager_proto::{KnStatus, LoadReport};
        let s = StatusMsg {
            epoch: 7,
            settled: false,
            kns: vec![KnStatus {
                kn_id: 3,
                addr: "127.0.0.1:7003".into(),
                lease_ms_left: 2500,
                joined: true,
                slots: 8192,
                acked_epoch: 6,
                draining: true,
                spawned: false,
                load: Some(LoadReport {
                    ops_per_sec: 1234.4,
                    occupancy: 0.25,
                    p99_us: 800,
                    hot_keys: vec![("user:7".into(), 96)],
                    hot_keys_hex: Vec::new(),
                }),
            }],
            reconfigs: vec![Reconfig {
                epoch: 7,
                reason: "kn 3 joined".into(),
                kns: 2,
                slots_moved: 8192,
                settle_ms: None,
                max_release_ms: 1.25,
                ..Reconfig::default()
            }],
            can_spawn: false,
            policy: true,
            replicas: vec![ReplicaMsg {
                key: key_hex(b"user:7"),
                owner: 3,
                cell: Some(5),
                kns: vec![3, 0],
                phase: dinomo_shared::manager_proto::ReplicaPhase::Serving,
            }],
        };
        let t = render_status(&s);
        assert!(t.starts_with("map epoch 7 (settling), 1 KNs, cannot start KNs, policy on"));
        let row = t
            .lines()
            .find(|l| l.contains("127.0.0.1:7003"))
            .expect("KN row");
        for f in ["8192", "2500", "draining", "1234", "0.25", "800"] {
            assert!(row.contains(f), "{f} not in {row}");
        }
        assert!(t.contains("KN 3 hot keys: user:7 (96)"), "{t}");
        let row = t
            .lines()
            .find(|l| l.starts_with("user:7 "))
            .expect("replica row");
        for f in ["3", "5", "serving", "3,0"] {
            assert!(row.contains(f), "{f} not in {row}");
        }
        let row = t
            .lines()
            .find(|l| l.contains("kn 3 joined"))
            .expect("reconfig row");
        assert!(row.contains(" - ") && row.contains("1.2"), "{row}");
    }

    #[test]
    fn an_unreachable_manager_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        let e = run(&addr, None, &CtlCommand::Status, false).expect_err("nobody listens");
        assert!(matches!(e, CtlError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("cannot reach the manager"), "{e}");
    }
}
