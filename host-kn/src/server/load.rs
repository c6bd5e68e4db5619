//! This KN's load as it reports it to the manager at renewals: ops/s and p99 from the
//! connection tasks' histogram, occupancy from the shards' busy time, the hottest keys.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use dinomo_shared::manager_proto::{key_hex, LoadReport, HOT_KEY_BYTES};

use super::Shared;
use crate::shard::Msg;

/// Where the previous load report ended.
pub(super) struct LoadMark {
    pub(super) at: Instant,
    pub(super) busy_ns: u64,
}

/// The time all shards spent handling messages, if every shard answers within `timeout`
/// (the lease thread must not wait long for a shard that itself waits for the lease).
pub(super) fn busy_ns(shared: &Shared, timeout: Duration) -> Option<u64> {
    let mut waits = Vec::with_capacity(shared.shards.len());
    for tx in &shared.shards {
        let (stx, srx) = mpsc::channel();
        tx.send(Msg::Stats(stx)).ok()?;
        waits.push(srx);
    }
    let deadline = Instant::now() + timeout;
    let mut total = 0;
    for w in waits {
        let left = deadline.saturating_duration_since(Instant::now());
        total += w.recv_timeout(left).ok()?.busy_ns;
    }
    Some(total)
}

/// Keys (as text) with their counts.
type HotKeys = Vec<(String, u64)>;

/// The KN's hottest keys since the last call (each key lives in one shard, so the shards'
/// lists are disjoint): the top 16, from the shards that answer within `timeout`. Each
/// twice: a name for the log line (lossy, short) and the exact key (hexadecimal), which the
/// manager's policy replicates.
fn hot_keys(shared: &Shared, timeout: Duration) -> (HotKeys, HotKeys) {
    let mut waits = Vec::with_capacity(shared.shards.len());
    for tx in &shared.shards {
        let (htx, hrx) = mpsc::channel();
        if tx.send(Msg::HotKeys(htx)).is_ok() {
            waits.push(hrx);
        }
    }
    let deadline = Instant::now() + timeout;
    let mut all: Vec<(Vec<u8>, u64)> = Vec::new();
    for w in waits {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(keys) = w.recv_timeout(left) {
            all.extend(keys);
        }
    }
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(16);
    let shown = all
        .iter()
        .map(|(k, c)| {
            let shown = &k[..k.len().min(HOT_KEY_BYTES)];
            (String::from_utf8_lossy(shown).into_owned(), *c)
        })
        .collect();
    let exact = all.iter().map(|(k, c)| (key_hex(k), *c)).collect();
    (shown, exact)
}

/// This KN's load since `mark` (which it moves): ops/s and p99 from the connection tasks'
/// histogram, occupancy from the time its shards spent handling messages, its hottest
/// keys. `None` (and the mark stays) if a shard is too slow to say.
pub(super) fn load_report(
    shared: &Shared,
    mark: &mut LoadMark,
    timeout: Duration,
) -> Option<LoadReport> {
    let busy_ns = busy_ns(shared, timeout)?;
    let lat = shared.latency.take();
    let now = Instant::now();
    let secs = now.duration_since(mark.at).as_secs_f64().max(1e-3);
    let busy = busy_ns.saturating_sub(mark.busy_ns) as f64 / 1e9;
    *mark = LoadMark { at: now, busy_ns };
    let (hot_keys, hot_keys_hex) = hot_keys(shared, timeout);
    Some(LoadReport {
        ops_per_sec: lat.count as f64 / secs,
        occupancy: (busy / (secs * shared.shards.len().max(1) as f64)).clamp(0.0, 1.0),
        p99_us: lat.p99.as_micros() as u64,
        hot_keys,
        hot_keys_hex,
    })
}
