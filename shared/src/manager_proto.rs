//! The cluster manager's protocol, spoken by KNs (`register`, `join`, `renew`, `ack`,
//! `leave`), by `dinomo ctl` (`status`, `add_kn`, `remove_kn`, `rebalance`) and by anyone
//! who wants the map (`map`). Both sides import these types; nothing else defines them.
//!
//! Line-delimited JSON over TCP: one request object per line, one reply object per line, on
//! a connection the client keeps open. A line is at most [`MAX_LINE`] bytes; a longer one
//! ends the connection.
//!
//! | request (`op`) | fields | reply (`kind`) |
//! |---|---|---|
//! | `register` | `addr` (client address of the KN), `shards` | `registered`: `kn_id`, `lease_epoch`, `lease_ms` |
//! | `join` | `kn_id` | `lease` (the KN is in the map from the epoch it names) |
//! | `renew` | `kn_id`, `lease_epoch`, optional `load` | `lease`: `epoch` (current map), `settled`, `lease_ms`, `drain` |
//! | `ack` | `kn_id`, `epoch`, `release_us`, `entries_merged` | `lease` |
//! | `map` | — | `map`: `epoch`, `settled`, `kns` (`[id, addr]`), `ranges` and `moving` (`[first, last, kn]`) |
//! | `leave` | `kn_id` | `ok` |
//! | `status` | — | `status`: KNs (`kn_id`, `addr`, `lease_ms_left`, `slots`, `acked_epoch`, `draining`, `load`), `epoch`, `settled`, `reconfigs` |
//! | `add_kn` | — | `added`: `kn_id`, `addr`, `reconfig` (once its map settled) |
//! | `remove_kn` | `kn_id` | `removed`: `kn_id`, `reconfig` (once it left and the map settled) |
//! | `rebalance` | optional `slots` (`[first, last]`) and `to` (a KN) | `rebalanced`: `reconfig` (`null`: nothing to move) |
//!
//! `load` is the KN's load since its previous renewal (ops/s, occupancy, p99 latency, hot
//! keys); `ack` carries the KN's measurements of installing that map (`release_us`: flush +
//! merge of its logs, `entries_merged`: log entries the merges took in). `drain`: the KN was
//! asked to leave (`remove_kn`) and leaves through `leave`. A KN counts its lease from when
//! it sent the request that a `registered` or `lease` reply answers.
//!
//! Any request may get `error` with a `message`; a `renew` of a KN that is not registered
//! (its lease expired and it was fenced) gets `error`, and the KN must stop serving.
//!
//! # Moving slots
//!
//! A new map moves slots from their old owners to new ones. Every KN, on seeing a new
//! epoch, installs it (dropping the cache of slots it lost), flushes its batches and has the
//! DPM merge its logs to their tails, then `ack`s the epoch. The map is *settled* once every
//! live KN has acknowledged it. Until then `moving` lists the slots whose previous (settled)
//! owner was another live KN: their new owner answers `-TRYAGAIN`. A KN whose lease expired
//! is first fenced (the DPM closes and merges its logs), so its slots need no
//! acknowledgement from it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster_map::map_ranges;
use crate::control::NO_KN;
use crate::ownership::SlotMap;
use crate::slot::SLOTS;

/// The longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 1 << 20;

/// A request to the manager.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MgrRequest {
    Register {
        addr: String,
        shards: u16,
    },
    Join {
        kn_id: u16,
    },
    Renew {
        kn_id: u16,
        lease_epoch: u32,
        /// The KN's load since its previous renewal.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load: Option<LoadReport>,
    },
    Ack {
        kn_id: u16,
        epoch: u64,
        /// Time the KN spent releasing slots for this map (flush + merge of its logs);
        /// 0 when it had installed the map already.
        #[serde(default)]
        release_us: u64,
        /// Log entries the DPM merged during that release (its MergeAll replies).
        #[serde(default)]
        entries_merged: u64,
    },
    Map,
    Leave {
        kn_id: u16,
    },
    Status,
    AddKn,
    RemoveKn {
        kn_id: u16,
    },
    Rebalance {
        /// Move only this range (`[first, last]`) ...
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slots: Option<(u16, u16)>,
        /// ... to this KN.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u16>,
    },
}

/// A KN's load over the interval since its previous report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub ops_per_sec: f64,
    /// Share of the interval its shards were busy (0..1; 0 when not measured).
    pub occupancy: f64,
    /// 99th percentile of request latency in its connection tasks.
    pub p99_us: u64,
    /// Hottest keys (lossy UTF-8, at most [`HOT_KEY_BYTES`] bytes each) with their counts.
    #[serde(default)]
    pub hot_keys: Vec<(String, u64)>,
}

/// How much of a hot key a load report carries (enough to name it in a log line).
pub const HOT_KEY_BYTES: usize = 128;

/// One map change and how long it took.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Reconfig {
    pub epoch: u64,
    /// Why: "kn 3 joined", "rebalance", ...
    pub reason: String,
    /// KNs in the new map.
    pub kns: usize,
    /// Slots whose owner changed.
    pub slots_moved: usize,
    /// Publish time (ms since the Unix epoch).
    pub published_ms: u64,
    /// Publish to settled: how long moving slots were refused. `None`: not settled (yet),
    /// or superseded by a newer map.
    pub settle_ms: Option<f64>,
    /// The slowest KN's release (flush + merge of its logs) for this map.
    pub max_release_ms: f64,
    /// Log entries merged by all releases for this map.
    pub entries_merged: u64,
}

/// One KN as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KnStatus {
    pub kn_id: u16,
    pub addr: String,
    pub lease_ms_left: u64,
    pub joined: bool,
    pub slots: usize,
    pub acked_epoch: u64,
    pub draining: bool,
    /// Whether the manager started it (`add_kn`).
    pub spawned: bool,
    pub load: Option<LoadReport>,
}

/// The reply to `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusMsg {
    pub epoch: u64,
    pub settled: bool,
    pub kns: Vec<KnStatus>,
    /// The last map changes, oldest first.
    pub reconfigs: Vec<Reconfig>,
    /// Whether the manager can start KNs (`add_kn`).
    pub can_spawn: bool,
    /// Whether the load policy runs.
    pub policy: bool,
}

/// A reply of the manager.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MgrReply {
    Registered {
        kn_id: u16,
        lease_epoch: u32,
        lease_ms: u64,
    },
    Lease {
        epoch: u64,
        settled: bool,
        lease_ms: u64,
        /// Leave the cluster (`remove_kn`).
        #[serde(default)]
        drain: bool,
    },
    Map(MapMsg),
    Ok,
    Status(StatusMsg),
    Added {
        kn_id: u16,
        addr: String,
        reconfig: Option<Reconfig>,
    },
    Removed {
        kn_id: u16,
        reconfig: Option<Reconfig>,
    },
    Rebalanced {
        reconfig: Option<Reconfig>,
    },
    Error {
        message: String,
    },
}

/// A published cluster map.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapMsg {
    pub epoch: u64,
    pub settled: bool,
    /// `(kn_id, client address)` of every KN in the map.
    pub kns: Vec<(u16, String)>,
    /// `(first slot, last slot, kn)`, covering the owned slots.
    pub ranges: Vec<(u16, u16, u16)>,
    /// Slots that are still moving to their new owner, same form.
    pub moving: Vec<(u16, u16, u16)>,
}

impl MapMsg {
    /// A map that owns nothing (what a KN believes before it joined).
    pub fn empty() -> Self {
        Self {
            epoch: 0,
            settled: false,
            kns: Vec::new(),
            ranges: Vec::new(),
            moving: Vec::new(),
        }
    }

    /// The owner of every slot.
    pub fn slot_map(&self) -> SlotMap {
        let mut owners = vec![NO_KN; SLOTS as usize];
        expand(&self.ranges, &mut owners);
        SlotMap::from_owners(self.epoch, owners)
            .unwrap_or_else(|| SlotMap::consistent(self.epoch, &[], 1))
    }

    /// Which slots are moving.
    pub fn moving_slots(&self) -> Vec<bool> {
        let mut owners = vec![NO_KN; SLOTS as usize];
        expand(&self.moving, &mut owners);
        owners.into_iter().map(|o| o != NO_KN).collect()
    }

    /// The client address of KN `kn`.
    pub fn addr_of(&self, kn: u16) -> Option<&str> {
        self.kns
            .iter()
            .find(|(id, _)| *id == kn)
            .map(|(_, a)| a.as_str())
    }
}

fn expand(ranges: &[(u16, u16, u16)], owners: &mut [u16]) {
    for &(a, b, kn) in ranges {
        for s in a..=b.min(SLOTS - 1) {
            owners[s as usize] = kn;
        }
    }
}

/// Runs of equal owners (`NO_KN` left out), as `(first, last, kn)`.
pub fn ranges_of(owners: impl Iterator<Item = u16>) -> Vec<(u16, u16, u16)> {
    map_ranges(owners)
        .map(|r| (r.first, r.last, r.kn))
        .collect()
}

/// Reads one line of at most [`MAX_LINE`] bytes (without its newline). `Ok(None)`: the
/// peer closed the connection. A longer line is an error, and the stream cannot be used
/// any more.
pub fn read_line<R: BufRead>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut bytes = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut bytes)?;
    if n == 0 {
        return Ok(None);
    }
    if bytes.last() != Some(&b'\n') {
        let why = if n >= MAX_LINE {
            format!("a line is longer than {MAX_LINE} bytes")
        } else {
            "the connection closed in the middle of a line".into()
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    bytes.pop();
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a line is not UTF-8"))
}

/// Writes `msg` as one JSON line.
pub fn write_line<W: Write, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_string(msg).map_err(std::io::Error::other)?;
    text.push('\n');
    if text.len() > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "a message of {} bytes exceeds the line limit of {MAX_LINE}",
                text.len()
            ),
        ));
    }
    w.write_all(text.as_bytes())?;
    w.flush()
}

/// A KN's (or a tool's) connection to the manager.
#[derive(Debug)]
pub struct MgrClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl MgrClient {
    /// Connects to `addr`, retrying until `timeout` (the manager may be starting).
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Self> {
        let t0 = Instant::now();
        let s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() >= timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// How long to wait for a reply (30 s unless set).
    pub fn set_timeout(&mut self, d: Duration) -> std::io::Result<()> {
        self.w.set_read_timeout(Some(d))
    }

    /// Sends one request and reads its reply.
    pub fn call(&mut self, req: &MgrRequest) -> std::io::Result<MgrReply> {
        write_line(&mut self.w, req)?;
        match read_line(&mut self.r)? {
            Some(line) => serde_json::from_str(line.trim()).map_err(std::io::Error::other),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the manager closed the connection",
            )),
        }
    }

    /// The current map.
    pub fn map(&mut self) -> std::io::Result<MapMsg> {
        match self.call(&MgrRequest::Map)? {
            MgrReply::Map(m) => Ok(m),
            other => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_and_expand() {
        let owners = [0u16, 0, 1, NO_KN, 1, 1, 2];
        let r = ranges_of(owners.iter().copied());
        assert_eq!(r, vec![(0, 1, 0), (2, 2, 1), (4, 5, 1), (6, 6, 2)]);
        let msg = MapMsg {
            epoch: 3,
            settled: true,
            kns: vec![(1, "127.0.0.1:1".into())],
            ranges: r,
            moving: vec![(4, 4, 1)],
        };
        let m = msg.slot_map();
        assert_eq!((m.owner(1), m.owner(3), m.owner(6)), (0, NO_KN, 2));
        assert!(msg.moving_slots()[4] && !msg.moving_slots()[5]);
        assert_eq!(msg.addr_of(1), Some("127.0.0.1:1"));
        let json = serde_json::to_string(&MgrReply::Map(msg.clone())).expect("json");
        assert_eq!(
            serde_json::from_str::<MgrReply>(&json).expect("parse"),
            MgrReply::Map(msg)
        );
        let req: MgrRequest =
            serde_json::from_str(r#"{"op":"renew","kn_id":2,"lease_epoch":5}"#).expect("req");
        assert_eq!(
            req,
            MgrRequest::Renew {
                kn_id: 2,
                lease_epoch: 5,
                load: None
            }
        );
    }

    #[test]
    fn lines_are_bounded() {
        let mut ok = std::io::Cursor::new(b"{\"op\":\"map\"}\nrest".to_vec());
        assert_eq!(
            read_line(&mut ok).expect("a line").as_deref(),
            Some("{\"op\":\"map\"}")
        );
        // The unterminated tail is an error, not a message.
        assert!(read_line(&mut ok).is_err());
        assert!(read_line(&mut ok).expect("end").is_none());
        let long = vec![b'x'; MAX_LINE + 10];
        let mut r = std::io::Cursor::new(long);
        let e = read_line(&mut r).expect_err("too long");
        assert!(e.to_string().contains("longer than"), "{e}");
        let mut sink = Vec::new();
        write_line(&mut sink, &MgrRequest::Status).expect("write");
        assert_eq!(sink, b"{\"op\":\"status\"}\n");
        let huge = MgrRequest::Register {
            addr: "x".repeat(MAX_LINE),
            shards: 1,
        };
        assert!(write_line(&mut Vec::new(), &huge).is_err());
    }
}
