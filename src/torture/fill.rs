//! The filler of the last round: it writes new keys of large values until the region is
//! full and keeps the region full while the round's process is killed. A write the
//! cluster refused (`-OOM`) must have changed nothing, and every write it acknowledged must
//! read back, also after the kill.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::client::{Client, Failure};
use crate::redis_client::Credentials;
use dinomo_shared::resp::Value;

/// Bytes of a filler value: large, so that the region fills in a few thousand writes, and
/// well inside a log block of the torture's region.
pub const FILL_VALUE_LEN: usize = 128 << 10;

/// The key of filler write `n` (never one of the load's or the probes' keys).
pub fn fill_key(n: u64) -> Vec<u8> {
    format!("torture-fill:{n}").into_bytes()
}

/// The value of filler write `n`: its number repeated, so that a value read back names the
/// write it came from.
pub fn fill_value(n: u64) -> Vec<u8> {
    n.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(FILL_VALUE_LEN)
        .collect()
}

/// What the filler did.
#[derive(Debug, Default)]
pub struct FillOut {
    /// Writes acknowledged with `+OK`.
    pub acked: Vec<u64>,
    /// Writes refused with `-OOM`: they must read back absent.
    pub refused: Vec<u64>,
    /// Writes whose outcome is unknown (no reply, another error): absent or their value.
    pub unknown: Vec<u64>,
}

/// Writes filler keys until `stop`; sets `full` at the first `-OOM`. Once the region is
/// full it keeps asking, slowly, so that it stays full until the round ends.
pub fn filler(
    seeds: &[String],
    credentials: Option<&Credentials>,
    op_timeout: Duration,
    full: &AtomicBool,
    stop: &AtomicBool,
) -> FillOut {
    let mut c = Client::new(seeds, op_timeout, credentials);
    let mut out = FillOut::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let key = fill_key(n);
        let value = fill_value(n);
        let deadline = Instant::now() + op_timeout;
        match c.exec(&key, &[b"SET", &key, &value], deadline) {
            Ok(Value::Simple(s)) if s == "OK" => out.acked.push(n),
            // An error reply from the node: `-OOM` is a definite refusal.
            Err(Failure::Unknown(e)) if e.starts_with("OOM") => {
                out.refused.push(n);
                full.store(true, Ordering::Release);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(_) | Err(Failure::Unknown(_)) => out.unknown.push(n),
            // Not sent: nothing to check.
            Err(Failure::NotSent) => {}
        }
        n += 1;
    }
    out
}

/// Reads every filler key back and returns the violations: an acknowledged write that does
/// not read its value, or a refused one that reads anything.
pub fn check(
    round: usize,
    out: &FillOut,
    seeds: &[String],
    credentials: Option<&Credentials>,
    op_timeout: Duration,
) -> Vec<String> {
    let mut c = Client::new(seeds, op_timeout, credentials);
    let mut violations = Vec::new();
    let mut read = |n: u64| -> Result<Option<Vec<u8>>, String> {
        let key = fill_key(n);
        let deadline = Instant::now() + Duration::from_secs(60);
        match c.exec(&key, &[b"GET", &key], deadline) {
            Ok(Value::Nil) => Ok(None),
            Ok(Value::Bulk(v)) => Ok(Some(v)),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(Failure::NotSent) => Err("no node served it within 60 s".into()),
            Err(Failure::Unknown(why)) => Err(why),
        }
    };
    for &n in &out.acked {
        match read(n) {
            Ok(Some(v)) if v == fill_value(n) => {}
            Ok(Some(_)) => violations.push(format!(
                "round {}: acknowledged filler write {n} reads another value",
                round + 1
            )),
            Ok(None) => violations.push(format!(
                "round {}: acknowledged filler write {n} was lost (reads absent)",
                round + 1
            )),
            Err(why) => violations.push(format!(
                "round {}: read-back of filler write {n}: {why}",
                round + 1
            )),
        }
    }
    for &n in &out.refused {
        match read(n) {
            Ok(None) => {}
            Ok(Some(_)) => violations.push(format!(
                "round {}: filler write {n} was refused with -OOM but reads a value",
                round + 1
            )),
            Err(why) => violations.push(format!(
                "round {}: read-back of refused filler write {n}: {why}",
                round + 1
            )),
        }
    }
    for &n in &out.unknown {
        match read(n) {
            Ok(None) => {}
            Ok(Some(v)) if v == fill_value(n) => {}
            Ok(Some(_)) => violations.push(format!(
                "round {}: filler write {n} (outcome unknown) reads another value",
                round + 1
            )),
            Err(why) => violations.push(format!(
                "round {}: read-back of filler write {n}: {why}",
                round + 1
            )),
        }
    }
    violations
}
