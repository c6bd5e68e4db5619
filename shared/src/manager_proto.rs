//! The cluster manager's protocol, spoken by KNs (`register`, `join`, `renew`, `ack`,
//! `leave`), by `dinomo ctl` (`status`, `add_kn`, `remove_kn`, `rebalance`) and by anyone
//! who wants the map (`map`). Both sides import these types; nothing else defines them.
//!
//! Line-delimited JSON over TCP: one request object per line, one reply object per line, on
//! a connection the client keeps open. A line is at most [`MAX_LINE`] bytes; a longer one
//! ends the connection.
//!
//! # Sessions
//!
//! Every connection starts with a handshake ([`Greeting`], [`Hello`], [`Welcome`]): the
//! manager sends a fresh nonce; the client names its [`Role`] and identity, sends a nonce of
//! its own, and (when the cluster has a secret) a tag over both nonces, its role and its
//! identity ([`dinomo_shared::auth`](crate::auth)); the manager answers with a tag of its
//! own over the same fields, so each side knows the other holds the secret, and the secret
//! never crosses the wire. After that, every line in either direction is
//! `<tag> <json>`, the tag covering both nonces, the line's sequence number in its direction
//! and the JSON text ([`Session`]): a line of another connection, a replayed, dropped,
//! reordered or altered line fails its tag, and the connection ends. Without a secret
//! (loopback-only clusters) the handshake still names the role, and lines are bare JSON.
//!
//! KN requests (`register` .. `resume`) are served only on a session of role `kn`, and
//! those naming a KN only on the session that registered (or resumed) that KN, with its
//! lease epoch; `status` and the administrative requests only on a session of role `ctl`.
//!
//! | request (`op`) | fields | reply (`kind`) |
//! |---|---|---|
//! | `register` | `addr` (client address of the KN), `shards` | `registered`: `kn_id`, `lease_epoch`, `lease_ms` |
//! | `join` | `kn_id`, `lease_epoch` | `lease` (the KN is in the map from the epoch it names) |
//! | `renew` | `kn_id`, `lease_epoch`, optional `load` | `lease`: `epoch` (current map), `settled`, `lease_ms`, `drain` |
//! | `ack` | `kn_id`, `lease_epoch`, `epoch`, `release_us`, `entries_merged` | `lease` |
//! | `map` | — | `map`: `epoch`, `settled`, `kns` (`[id, addr]`), `ranges` and `moving` (`[first, last, kn]`), `replicas` |
//! | `leave` | `kn_id`, `lease_epoch` | `ok` (the KN stopped acknowledging and closed its logs before) |
//! | `resume` | `kn_id`, `lease_epoch`, `addr`, `lease_ms`, optional `map` | `lease` (this session is the KN's now) |
//! | `status` | — | `status`: KNs (`kn_id`, `addr`, `lease_ms_left`, `slots`, `acked_epoch`, `draining`, `load`), `epoch`, `settled`, `reconfigs` |
//! | `add_kn` | — | `added`: `kn_id`, `addr`, `reconfig` (once its map settled) |
//! | `remove_kn` | `kn_id` | `removed`: `kn_id`, `reconfig` (once it left and the map settled) |
//! | `rebalance` | optional `slots` (`[first, last]`) and `to` (a KN) | `rebalanced`: `reconfig` (`null`: nothing to move) |
//! | `replicate` | `key` (hex) | `replication`: `replicas` (once every live KN serves the key) |
//! | `dereplicate` | `key` (hex) | `replication`: `replicas` (once the owner alone serves it from the index) |
//!
//! `load` is the KN's load since its previous renewal (ops/s, occupancy, p99 latency, hot
//! keys); `ack` carries the KN's measurements of installing that map (`release_us`: flush +
//! merge of its logs, `entries_merged`: log entries the merges took in). `drain`: the KN was
//! asked to leave (`remove_kn`) and leaves through `leave`. A KN counts its lease from when
//! it sent the request that a `registered` or `lease` reply answers.
//!
//! Any request may get `error` with a `message`, or `retry` (a restarted manager that is
//! still re-adopting KNs); a `renew` of a KN that is not registered
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
//!
//! # Replicated keys
//!
//! The map also carries the replicated keys ([`ReplicaMsg`]): each step of replicating or
//! dereplicating a key is a map of its own (same slots, next epoch), and the next step
//! waits until it settled, i.e. every live KN installed it. A KN in a key's `kns` serves
//! reads and writes of it through the key's cell at the DPM even if another KN owns its
//! slot; KNs not in it answer `-MOVED` to the owner as for any key.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::{self, ClusterSecret, Nonce, Tag, NONCE_LEN, TAG_LEN};
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
        lease_epoch: u32,
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
        lease_epoch: u32,
        epoch: u64,
        /// Time the KN spent releasing slots for this map (flush + merge of its logs);
        /// 0 when it had installed the map already.
        #[serde(default)]
        release_us: u64,
        /// Log entries the DPM merged during that release (its MergeAll replies).
        #[serde(default)]
        entries_merged: u64,
        /// `(hex key, cell)` of every key the KN owns whose replication the map asks it to
        /// begin ([`ReplicaPhase::Begin`]) and whose cell it has now.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        cells: Vec<(String, u32)>,
        /// `(hex key, why)` of the keys whose replication it could not begin (no free
        /// cell at the DPM, say): the manager takes them back at once.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refused: Vec<(String, String)>,
    },
    Map,
    Leave {
        kn_id: u16,
        lease_epoch: u32,
    },
    /// A KN that holds lease `lease_epoch` of `kn_id` speaks on a new connection (its
    /// previous one broke, or the manager restarted): the session becomes the KN's, and the
    /// lease is renewed. A restarted manager re-adopts the KN from it: its client address,
    /// lease length and the map it serves (which must be the stored one).
    Resume {
        kn_id: u16,
        lease_epoch: u32,
        addr: String,
        lease_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        map: Option<MapMsg>,
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
    /// Replicate the key (hexadecimal) on every live KN.
    Replicate {
        key: String,
    },
    /// Return the key (hexadecimal) to its owner alone.
    Dereplicate {
        key: String,
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
    /// The same keys exactly (hexadecimal), in the same order: what the policy replicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hot_keys_hex: Vec<(String, u64)>,
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
    /// The replicated keys.
    #[serde(default)]
    pub replicas: Vec<ReplicaMsg>,
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
    /// The replicated keys once a `replicate` or `dereplicate` is done.
    Replication {
        replicas: Vec<ReplicaMsg>,
    },
    /// Not now: the manager is re-adopting the KNs of an earlier manager (it does not
    /// know the map yet). Ask again shortly.
    Retry {
        message: String,
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
    /// The replicated keys and where each stands ([`ReplicaMsg`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaMsg>,
}

/// Where the replication of a key stands. Each change is a new map epoch, and the next
/// step waits until every live KN acknowledged it, so no two KNs are more than one step
/// apart.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaPhase {
    /// The owner allocates the key's cell at the DPM (and reports it in its `ack`); every
    /// KN answers `-TRYAGAIN` for the key meanwhile.
    Begin,
    /// Every KN in `kns` serves the key through its cell, reads and writes alike.
    Serving,
    /// Only the owner serves it; the others dropped it, published their writes of it and
    /// merged their logs before acknowledging.
    Ending,
    /// The owner frees the cell (the DPM puts its entry in the index); every KN answers
    /// `-TRYAGAIN` for the key meanwhile. The next map no longer lists it.
    End,
}

/// One replicated key as the map carries it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaMsg {
    /// The key, hexadecimal.
    pub key: String,
    /// The KN owning the key's slot.
    pub owner: u16,
    /// The key's cell at the DPM (`None` until the owner reported it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<u32>,
    /// The KNs serving it (the owner first).
    pub kns: Vec<u16>,
    pub phase: ReplicaPhase,
}

impl ReplicaMsg {
    /// The key's bytes (`None`: not hexadecimal).
    pub fn key_bytes(&self) -> Option<Vec<u8>> {
        key_from_hex(&self.key)
    }
}

/// A key as the protocol carries it (keys are bytes; JSON strings are text).
pub fn key_hex(key: &[u8]) -> String {
    auth::to_hex(key)
}

/// The bytes of a hexadecimal key; `None` for anything that is not an even number of hex
/// digits.
pub fn key_from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
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
            replicas: Vec::new(),
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
    read_line_max(r, MAX_LINE)
}

/// [`read_line`] with a limit of `max` bytes: never buffers more than that.
pub fn read_line_max<R: BufRead>(r: &mut R, max: usize) -> std::io::Result<Option<String>> {
    let mut bytes = Vec::new();
    let n = r.by_ref().take(max as u64).read_until(b'\n', &mut bytes)?;
    if n == 0 {
        return Ok(None);
    }
    if bytes.last() != Some(&b'\n') {
        let why = if n >= max {
            format!("a line is longer than {max} bytes")
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

/// Writes `msg` as one bare JSON line (the handshake; a session seals later lines).
pub fn write_line<W: Write, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let text = serde_json::to_string(msg).map_err(std::io::Error::other)?;
    write_raw_line(w, text)
}

/// Who opens a session.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A KVS node.
    Kn,
    /// An operator tool (`dinomo ctl`, `dinomo up`, tests).
    Ctl,
}

impl Role {
    fn name(self) -> &'static [u8] {
        match self {
            Self::Kn => b"kn",
            Self::Ctl => b"ctl",
        }
    }
}

/// The manager's first line on every connection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Greeting {
    /// Hexadecimal [`Nonce`], fresh for this connection.
    pub nonce: String,
    /// Whether the manager checks tags (it has a cluster secret).
    pub auth: bool,
}

/// The client's first line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub role: Role,
    /// Who the client says it is (a KN's client address, a tool's name); logged, and tagged.
    pub id: String,
    /// Hexadecimal [`Nonce`] of the client.
    pub nonce: String,
    /// Hexadecimal tag over (both nonces, role, id); empty without a secret.
    #[serde(default)]
    pub tag: String,
}

/// The manager's answer to a good [`Hello`] (a bad one gets [`MgrReply::Error`] and the
/// connection ends).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Welcome {
    /// Hexadecimal tag over the same fields under another domain; empty without a secret.
    pub welcome: String,
}

/// The longest [`Hello`] line: before it is checked, a peer gets no more.
pub const MAX_HELLO_LINE: usize = 4096;

const HELLO_DOMAIN: &[u8] = b"dinomo manager hello v1";
const WELCOME_DOMAIN: &[u8] = b"dinomo manager welcome v1";
const REQUEST_DOMAIN: &[u8] = b"dinomo manager request v1";
const REPLY_DOMAIN: &[u8] = b"dinomo manager reply v1";

/// Why a handshake or a line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the first line is not a hello: {0}")]
    BadHello(String),
    #[error("this manager requires the cluster secret (--secret-file or DINOMO_SECRET_FILE)")]
    SecretRequired,
    #[error(
        "the manager runs without authentication, but this process holds a cluster secret: \
         refusing to trust a manager that cannot prove it holds it"
    )]
    ManagerUnauthenticated,
    #[error("authentication failed: the peer does not hold this cluster's secret")]
    BadTag,
    #[error(
        "a line without a valid tag (replayed, reordered, altered, or from another connection)"
    )]
    BadLineTag,
    #[error("no randomness: {0}")]
    Random(String),
}

fn nonce_hex() -> Result<(Nonce, String), SessionError> {
    let n = auth::nonce().map_err(|e| SessionError::Random(e.to_string()))?;
    Ok((n, auth::to_hex(&n)))
}

fn hello_parts<'a>(s: &'a Nonce, c: &'a Nonce, role: Role, id: &'a str) -> [&'a [u8]; 4] {
    [s, c, role.name(), id.as_bytes()]
}

/// One side of an established session: seals the lines it sends and opens the ones it
/// receives, each direction with its own sequence number.
#[derive(Debug)]
pub struct Session {
    secret: Option<ClusterSecret>,
    server_nonce: Nonce,
    client_nonce: Nonce,
    /// Whether this is the manager's side (it receives requests, sends replies).
    manager_side: bool,
    sent: u64,
    received: u64,
}

impl Session {
    /// The manager's side: the greeting to send first (with its nonce) and a half-open
    /// handshake that [`ServerHandshake::accept`] completes.
    pub fn greet(
        secret: Option<ClusterSecret>,
    ) -> Result<(Greeting, ServerHandshake), SessionError> {
        let (nonce, hex) = nonce_hex()?;
        let auth = secret.is_some();
        Ok((
            Greeting { nonce: hex, auth },
            ServerHandshake { secret, nonce },
        ))
    }

    /// The client's side: checks the greeting and makes the [`Hello`] to send; the
    /// [`Welcome`] is then checked by [`ClientHandshake::finish`].
    pub fn hello(
        secret: Option<ClusterSecret>,
        greeting: &Greeting,
        role: Role,
        id: &str,
    ) -> Result<(Hello, ClientHandshake), SessionError> {
        let bad = || SessionError::BadHello("the greeting's nonce is not 32 hex digits".into());
        let server_nonce = auth::from_hex::<NONCE_LEN>(&greeting.nonce).ok_or_else(bad)?;
        match (&secret, greeting.auth) {
            (None, true) => return Err(SessionError::SecretRequired),
            (Some(_), false) => return Err(SessionError::ManagerUnauthenticated),
            _ => {}
        }
        let (client_nonce, hex) = nonce_hex()?;
        let tag = secret.as_ref().map_or_else(String::new, |k| {
            auth::to_hex(&k.tag(
                HELLO_DOMAIN,
                &hello_parts(&server_nonce, &client_nonce, role, id),
            ))
        });
        let hello = Hello {
            role,
            id: id.to_string(),
            nonce: hex,
            tag,
        };
        let expect = secret.as_ref().map(|k| {
            k.tag(
                WELCOME_DOMAIN,
                &hello_parts(&server_nonce, &client_nonce, role, id),
            )
        });
        Ok((
            hello,
            ClientHandshake {
                session: Session {
                    secret,
                    server_nonce,
                    client_nonce,
                    manager_side: false,
                    sent: 0,
                    received: 0,
                },
                expect,
            },
        ))
    }

    /// Whether lines carry tags.
    pub fn authenticated(&self) -> bool {
        self.secret.is_some()
    }

    fn domains(&self) -> (&'static [u8], &'static [u8]) {
        if self.manager_side {
            (REPLY_DOMAIN, REQUEST_DOMAIN)
        } else {
            (REQUEST_DOMAIN, REPLY_DOMAIN)
        }
    }

    /// The line (without newline) that carries `json`.
    pub fn seal(&mut self, json: &str) -> String {
        let seq = self.sent;
        self.sent = self.sent.wrapping_add(1);
        let (out, _) = self.domains();
        match &self.secret {
            None => json.to_string(),
            Some(k) => {
                let seq = seq.to_le_bytes();
                let tag = k.tag(
                    out,
                    &[
                        &self.server_nonce,
                        &self.client_nonce,
                        &seq,
                        json.as_bytes(),
                    ],
                );
                let mut line = auth::to_hex(&tag);
                line.push(' ');
                line.push_str(json);
                line
            }
        }
    }

    /// The JSON text of a received line, if its tag is the next one expected. A refused
    /// line leaves the session unusable (the caller ends the connection).
    pub fn open<'a>(&mut self, line: &'a str) -> Result<&'a str, SessionError> {
        let seq = self.received;
        self.received = self.received.wrapping_add(1);
        let (_, inbound) = self.domains();
        let Some(k) = &self.secret else {
            return Ok(line);
        };
        let (tag, json) = line.split_once(' ').ok_or(SessionError::BadLineTag)?;
        let tag = auth::from_hex::<TAG_LEN>(tag).ok_or(SessionError::BadLineTag)?;
        let seq = seq.to_le_bytes();
        if k.verify(
            inbound,
            &[
                &self.server_nonce,
                &self.client_nonce,
                &seq,
                json.as_bytes(),
            ],
            &tag,
        ) {
            Ok(json)
        } else {
            Err(SessionError::BadLineTag)
        }
    }
}

/// The manager's side of a handshake after the greeting.
#[derive(Debug)]
pub struct ServerHandshake {
    secret: Option<ClusterSecret>,
    nonce: Nonce,
}

impl ServerHandshake {
    /// Checks the client's hello; on success the [`Welcome`] to send and the session.
    pub fn accept(self, hello: &Hello) -> Result<(Welcome, Session), SessionError> {
        let client_nonce = auth::from_hex::<NONCE_LEN>(&hello.nonce)
            .ok_or_else(|| SessionError::BadHello("the nonce is not 32 hex digits".into()))?;
        let parts = hello_parts(&self.nonce, &client_nonce, hello.role, &hello.id);
        let welcome = match &self.secret {
            None => String::new(),
            Some(k) => {
                let tag = auth::from_hex::<TAG_LEN>(&hello.tag).ok_or(SessionError::BadTag)?;
                if !k.verify(HELLO_DOMAIN, &parts, &tag) {
                    return Err(SessionError::BadTag);
                }
                auth::to_hex(&k.tag(WELCOME_DOMAIN, &parts))
            }
        };
        Ok((
            Welcome { welcome },
            Session {
                secret: self.secret,
                server_nonce: self.nonce,
                client_nonce,
                manager_side: true,
                sent: 0,
                received: 0,
            },
        ))
    }
}

/// The client's side of a handshake after its hello.
#[derive(Debug)]
pub struct ClientHandshake {
    session: Session,
    expect: Option<Tag>,
}

impl ClientHandshake {
    /// Checks the manager's welcome (that it holds the secret too).
    pub fn finish(self, welcome: &Welcome) -> Result<Session, SessionError> {
        if let Some(expect) = self.expect {
            let got = auth::from_hex::<TAG_LEN>(&welcome.welcome).ok_or(SessionError::BadTag)?;
            // Constant time is not needed: the expected tag is no secret once sent.
            if got != expect {
                return Err(SessionError::BadTag);
            }
        }
        Ok(self.session)
    }
}

/// How a client opens its sessions.
#[derive(Clone, Debug)]
pub struct MgrAuth {
    /// The cluster secret (required by a manager that has one).
    pub secret: Option<ClusterSecret>,
    pub role: Role,
    /// Who the client is (logged by the manager).
    pub id: String,
}

impl MgrAuth {
    /// A tool without a secret (loopback-only clusters).
    pub fn ctl(secret: Option<ClusterSecret>) -> Self {
        Self {
            secret,
            role: Role::Ctl,
            id: "ctl".into(),
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// A KN's (or a tool's) connection to the manager: an established [`Session`].
#[derive(Debug)]
pub struct MgrClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
    session: Session,
}

impl MgrClient {
    /// Connects to `addr` as a tool without a secret, retrying until `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Self> {
        Self::connect_with(addr, timeout, &MgrAuth::ctl(None))
    }

    /// Connects to `addr`, retrying until `timeout` (the manager may be starting), and
    /// opens a session as `who`. A refused handshake is an error of kind
    /// `PermissionDenied` that says why.
    pub fn connect_with(addr: &str, timeout: Duration, who: &MgrAuth) -> std::io::Result<Self> {
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
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let denied = |e: SessionError| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
        };
        let first = read_line(&mut r)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the manager closed the connection (too many connections?)",
            )
        })?;
        let greeting: Greeting = match serde_json::from_str(&first) {
            Ok(g) => g,
            Err(_) => {
                return Err(match serde_json::from_str::<MgrReply>(&first) {
                    Ok(MgrReply::Error { message }) => {
                        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, message)
                    }
                    _ => invalid(format!("{addr} is not a DINOMO manager")),
                })
            }
        };
        let (hello, hs) =
            Session::hello(who.secret.clone(), &greeting, who.role, &who.id).map_err(denied)?;
        write_line(&mut w, &hello)?;
        let line = read_line(&mut r)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the manager closed the connection during the handshake",
            )
        })?;
        let welcome: Welcome = match serde_json::from_str(&line) {
            Ok(w) => w,
            Err(_) => {
                let why = match serde_json::from_str::<MgrReply>(&line) {
                    Ok(MgrReply::Error { message }) => message,
                    _ => format!("unexpected handshake reply {line:?}"),
                };
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    why,
                ));
            }
        };
        let session = hs.finish(&welcome).map_err(denied)?;
        Ok(Self { w, r, session })
    }

    /// How long to wait for a reply (30 s unless set).
    pub fn set_timeout(&mut self, d: Duration) -> std::io::Result<()> {
        self.w.set_read_timeout(Some(d))
    }

    /// Sends one request and reads its reply.
    pub fn call(&mut self, req: &MgrRequest) -> std::io::Result<MgrReply> {
        let json = serde_json::to_string(req).map_err(std::io::Error::other)?;
        let line = self.session.seal(&json);
        write_raw_line(&mut self.w, line)?;
        let Some(line) = read_line(&mut self.r)? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the manager closed the connection",
            ));
        };
        match self.session.open(&line) {
            Ok(json) => serde_json::from_str(json.trim()).map_err(std::io::Error::other),
            // The manager refuses a line it cannot check with a bare error, then closes.
            Err(e) => Err(match serde_json::from_str::<MgrReply>(&line) {
                Ok(MgrReply::Error { message }) => {
                    std::io::Error::new(std::io::ErrorKind::PermissionDenied, message)
                }
                _ => invalid(e),
            }),
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

/// Writes one line (a newline is added), refusing one above [`MAX_LINE`].
pub fn write_raw_line<W: Write>(w: &mut W, mut text: String) -> std::io::Result<()> {
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
            replicas: vec![ReplicaMsg {
                key: key_hex(b"hot\xff"),
                owner: 1,
                cell: Some(3),
                kns: vec![1, 2],
                phase: ReplicaPhase::Serving,
            }],
        };
        assert_eq!(
            msg.replicas[0].key_bytes().as_deref(),
            Some(&b"hot\xff"[..])
        );
        assert_eq!(key_from_hex("0g"), None);
        assert_eq!(key_from_hex("abc"), None);
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

    fn secret(b: u8) -> Option<ClusterSecret> {
        Some(ClusterSecret::from_bytes([b; crate::auth::SECRET_LEN]))
    }

    /// A handshake between a manager holding `server` and a client holding `client`.
    fn handshake(
        server: Option<ClusterSecret>,
        client: Option<ClusterSecret>,
    ) -> Result<(Session, Session), SessionError> {
        let (greeting, hs) = Session::greet(server)?;
        let (hello, ch) = Session::hello(client, &greeting, Role::Kn, "127.0.0.1:1")?;
        let (welcome, manager) = hs.accept(&hello)?;
        Ok((manager, ch.finish(&welcome)?))
    }

    #[test]
    fn sessions_check_the_secret_and_every_line() {
        let (mut m, mut c) = handshake(secret(1), secret(1)).expect("same secret");
        let line = c.seal(r#"{"op":"map"}"#);
        assert!(
            !line.contains(&String::from_utf8_lossy(&secret(1).expect("s").to_hex()).to_string())
        );
        assert_eq!(m.open(&line), Ok(r#"{"op":"map"}"#));
        // The same line again (a replay) fails: the sequence number moved on.
        assert_eq!(m.open(&line), Err(SessionError::BadLineTag));
        // A reply the manager sealed opens only as a reply.
        let (mut m, mut c) = handshake(secret(1), secret(1)).expect("same secret");
        let reply = m.seal(r#"{"kind":"ok"}"#);
        assert_eq!(c.open(&reply), Ok(r#"{"kind":"ok"}"#));
        let req = c.seal(r#"{"op":"leave","kn_id":0,"lease_epoch":1}"#);
        // Altered JSON, a bare line, a line of another session: refused.
        let altered = req.replace("\"kn_id\":0", "\"kn_id\":1");
        assert_eq!(m.open(&altered), Err(SessionError::BadLineTag));
        let (mut m2, mut c2) = handshake(secret(1), secret(1)).expect("same secret");
        assert_eq!(m2.open(r#"{"op":"map"}"#), Err(SessionError::BadLineTag));
        let _ = c2.seal("x");
        assert_eq!(
            handshake(secret(1), secret(1))
                .map(|(mut m3, _)| m3.open(&req).is_err())
                .ok(),
            Some(true)
        );
        // Wrong secret, no secret, or a client with a secret facing a manager without one.
        assert_eq!(
            handshake(secret(1), secret(2)).err(),
            Some(SessionError::BadTag)
        );
        assert_eq!(
            handshake(secret(1), None).err(),
            Some(SessionError::SecretRequired)
        );
        assert_eq!(
            handshake(None, secret(1)).err(),
            Some(SessionError::ManagerUnauthenticated)
        );
        // A manager that does not hold the secret cannot fake the welcome.
        let (greeting, _) = Session::greet(secret(1)).expect("greet");
        let (hello, ch) = Session::hello(secret(1), &greeting, Role::Ctl, "ctl").expect("hello");
        let forged = Welcome {
            welcome: auth::to_hex(&[0u8; TAG_LEN]),
        };
        assert_eq!(ch.finish(&forged).err(), Some(SessionError::BadTag));
        let _ = hello;
        // Without secrets on both sides lines are bare JSON.
        let (mut m, mut c) = handshake(None, None).expect("no secret");
        assert_eq!(c.seal("{}"), "{}");
        assert_eq!(m.open("{}"), Ok("{}"));
    }
}
