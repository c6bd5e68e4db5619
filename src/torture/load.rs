//! The mixed load of a round: client threads issuing SET, GET, DEL and MSET over RESP, each
//! recording every operation (with its outcome) for the checks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::client::{Client, Failure};
use super::value;
use crate::bench::workload::Rng;
use crate::lincheck::{Clock, Recorder};
use dinomo_shared::resp::Value;

/// Keys per hash-tag group: an MSET writes two keys of one group (one slot).
pub const GROUP: u64 = 4;

/// The name of load key `i`.
pub fn key_name(i: u64) -> Vec<u8> {
    format!("t{{{}}}{}", i / GROUP, i % GROUP).into_bytes()
}

/// The client that owns key `i` (the only one writing or reading it during the load, so
/// the last acknowledged write of a key is well defined).
pub fn owner(i: u64, clients: usize) -> usize {
    ((i / GROUP) % clients as u64) as usize
}

/// Counts of one client's operations.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct OpCounts {
    /// Answered (writes acknowledged, reads returned).
    pub ok: u64,
    /// Never executed (refused or unreachable until their deadline), or reads that failed.
    pub failed: u64,
    /// Writes sent without a usable answer: outcome unknown.
    pub unknown: u64,
    /// Writes refused because the region was full (`-OOM`): definitely not applied.
    pub refused: u64,
}

impl OpCounts {
    pub fn add(&mut self, o: &OpCounts) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.unknown += o.unknown;
        self.refused += o.refused;
    }
}

/// What a client thread hands back.
pub struct ClientOut {
    pub recorder: Recorder,
    pub counts: OpCounts,
    /// Values read that are torn or foreign: (key, why).
    pub bad_values: Vec<(String, String)>,
}

/// One client thread's settings.
pub struct ClientSpec<'a> {
    pub id: usize,
    pub clients: usize,
    pub keys: u64,
    pub seeds: &'a [String],
    /// How the load's clients authenticate.
    pub credentials: Option<&'a crate::redis_client::Credentials>,
    pub seed: u64,
    /// First sequence number of this round's writes (unique across rounds).
    pub seq_base: u64,
    pub op_timeout: Duration,
}

/// Whether an error reply is a definite refusal: the region is full (`-OOM`), and the
/// node refused the write before writing anything.
fn is_refusal(error: &str) -> bool {
    error.starts_with("OOM")
}

/// Issues operations until `stop`.
pub fn client(spec: &ClientSpec<'_>, clock: Clock, stop: &AtomicBool) -> ClientOut {
    let mine: Vec<u64> = (0..spec.keys)
        .filter(|&i| owner(i, spec.clients) == spec.id)
        .collect();
    let mut out = ClientOut {
        recorder: Recorder::new(clock),
        counts: OpCounts::default(),
        bad_values: Vec::new(),
    };
    if mine.is_empty() {
        return out;
    }
    let mut c = Client::new(spec.seeds, spec.op_timeout, spec.credentials);
    let mut rng = Rng::new(spec.seed ^ ((spec.id as u64 + 1) << 40));
    let mut seq = spec.seq_base;
    let (mut v1, mut v2) = (Vec::new(), Vec::new());
    let writer = spec.id as u32;
    let mut unknown_seen = 0;
    while !stop.load(Ordering::Acquire) {
        if out.counts.unknown > unknown_seen {
            // The cluster is failing: back off rather than pile up writes whose outcome is
            // unknown (each one widens what the checker must consider).
            unknown_seen = out.counts.unknown;
            std::thread::sleep(Duration::from_millis(20));
        }
        let i = mine[rng.below(mine.len() as u64) as usize];
        let key = key_name(i);
        let dice = rng.below(100);
        let deadline = Instant::now() + spec.op_timeout;
        let rec = &mut out.recorder;
        if dice < 40 {
            seq += 1;
            value::encode(&key, writer, seq, &mut v1);
            let t = rec.now();
            match c.exec(&key, &[b"SET", &key, &v1], deadline) {
                Ok(Value::Simple(s)) if s == "OK" => {
                    rec.put(&key, &v1, t, true);
                    out.counts.ok += 1;
                }
                // The region is full: refused before anything was written (not recorded,
                // so a read that finds this value is a violation).
                Err(Failure::Unknown(e)) if is_refusal(&e) => out.counts.refused += 1,
                Ok(_) | Err(Failure::Unknown(_)) => {
                    rec.put(&key, &v1, t, false);
                    out.counts.unknown += 1;
                }
                Err(Failure::NotSent) => out.counts.failed += 1,
            }
        } else if dice < 50 {
            let t = rec.now();
            match c.exec(&key, &[b"DEL", &key], deadline) {
                Ok(Value::Int(_)) => {
                    rec.delete(&key, t, true);
                    out.counts.ok += 1;
                }
                Err(Failure::Unknown(e)) if is_refusal(&e) => out.counts.refused += 1,
                Ok(_) | Err(Failure::Unknown(_)) => {
                    rec.delete(&key, t, false);
                    out.counts.unknown += 1;
                }
                Err(Failure::NotSent) => out.counts.failed += 1,
            }
        } else if dice < 60 {
            // Two keys of the same group (one slot).
            let j = (i / GROUP) * GROUP + (i % GROUP + 1 + rng.below(GROUP - 1)) % GROUP;
            let key2 = key_name(j);
            if j >= spec.keys {
                continue;
            }
            seq += 1;
            value::encode(&key, writer, seq, &mut v1);
            seq += 1;
            value::encode(&key2, writer, seq, &mut v2);
            let t = rec.now();
            let ok = match c.exec(&key, &[b"MSET", &key, &v1, &key2, &v2], deadline) {
                Ok(Value::Simple(s)) if s == "OK" => Some(true),
                Err(Failure::Unknown(e)) if is_refusal(&e) => {
                    out.counts.refused += 1;
                    continue;
                }
                Ok(_) | Err(Failure::Unknown(_)) => Some(false),
                Err(Failure::NotSent) => None,
            };
            match ok {
                Some(ok) => {
                    rec.put(&key, &v1, t, ok);
                    rec.put(&key2, &v2, t, ok);
                    if ok {
                        out.counts.ok += 1;
                    } else {
                        out.counts.unknown += 1;
                    }
                }
                None => out.counts.failed += 1,
            }
        } else {
            let t = rec.now();
            match c.exec(&key, &[b"GET", &key], deadline) {
                Ok(Value::Nil) => {
                    rec.get(&key, t, None);
                    out.counts.ok += 1;
                }
                Ok(Value::Bulk(v)) => {
                    if let Err(why) = value::decode(&key, &v) {
                        out.bad_values
                            .push((String::from_utf8_lossy(&key).into_owned(), why));
                    }
                    rec.get(&key, t, Some(v));
                    out.counts.ok += 1;
                }
                // A read that failed says nothing.
                Ok(_) | Err(_) => out.counts.failed += 1,
            }
        }
    }
    out
}
