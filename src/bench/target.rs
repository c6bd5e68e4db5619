//! `dinomo bench --target HOST:PORT[,..]`: the workloads of the in-process benchmark,
//! driven over the Redis protocol against a running cluster (`dinomo up`, or any Redis
//! server: a server that is not in cluster mode gets every slot).
//!
//! Each client thread keeps one connection per node and a slot → node table filled from
//! `CLUSTER SLOTS` and corrected by `MOVED`; `TRYAGAIN` is retried. Throughput and latency
//! are measured at the client; round trips and hit ratios come from the KNs' `INFO`
//! counters before and after the measured phase (absent for servers that do not report
//! them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use super::workload::{key_into, value_into, KeyChooser, Rng, Workload};
use super::{BenchConfig, Hits, Latency};
use crate::histogram::{self, Histogram};
use crate::redis_client::{Attempt, ClusterClient, Credentials, Timeouts};
use dinomo_shared::resp::Value;

/// The result of a run against a running cluster. Field names follow
/// [`super::BenchResult`] where they mean the same.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TargetResult {
    pub system: &'static str,
    pub target: String,
    pub nodes: usize,
    pub clients: usize,
    pub workload: String,
    pub dist: &'static str,
    pub zipf: Option<f64>,
    pub keys: u64,
    pub key_size: usize,
    pub value_size: usize,
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    /// Reads of loaded keys that found nothing (should be 0).
    pub missing: u64,
    pub moved: u64,
    pub tryagain: u64,
    /// Commands sent again because their node left or died (its connection failed).
    pub reconnects: u64,
    pub elapsed_s: f64,
    /// Measured at the clients, over loopback TCP.
    pub throughput_ops: f64,
    pub latency_us: Latency,
    /// From the KNs' INFO counters over the measured phase (None: not reported).
    pub rts_per_op: Option<f64>,
    pub read_rts_per_read: Option<f64>,
    pub write_rts_per_write: Option<f64>,
    /// One-sided verbs at the memory node per operation (KNs' `fabric_verbs`).
    pub verbs_per_op: Option<f64>,
    pub hit: Option<Hits>,
    pub seed: u64,
}

const RETRIES: u32 = 2000;

/// One client thread's cluster client: resends after a failed connection (a benchmark's
/// writes are idempotent) and retries `TRYAGAIN`.
struct RespClient {
    c: ClusterClient,
    /// Commands sent again because their node's connection failed.
    reconnects: u64,
}

impl RespClient {
    /// Connects to the first seed that answers `CLUSTER SLOTS`.
    fn new(seeds: &[String], credentials: Option<&Credentials>) -> anyhow::Result<Self> {
        let timeouts = Timeouts {
            connect: None,
            reply: Some(Duration::from_secs(30)),
        };
        let mut c = ClusterClient::new(seeds, timeouts).with_credentials(credentials.cloned());
        c.load_slots()?;
        Ok(Self { c, reconnects: 0 })
    }

    /// Sends a single-key command to the key's node, following MOVED and retrying TRYAGAIN.
    fn call(&mut self, key: &[u8], args: &[&[u8]]) -> anyhow::Result<Value> {
        for _ in 0..RETRIES {
            match self.c.attempt(key, args) {
                Attempt::Reply(Value::Error(e)) | Attempt::ClusterDown(e) => bail!("{e}"),
                Attempt::Reply(v) => return Ok(v),
                Attempt::Moved => {}
                Attempt::TryAgain(_) => std::thread::sleep(Duration::from_millis(5)),
                // The slot has no known owner yet (the table was just reloaded).
                Attempt::NoRoute => std::thread::sleep(Duration::from_millis(20)),
                // The node left or died: its slots have (or soon will have) a new owner.
                Attempt::Failed(_) => {
                    self.reconnects += 1;
                    std::thread::sleep(Duration::from_millis(20));
                    let _ = self.c.load_slots();
                }
            }
        }
        bail!("no answer after {RETRIES} redirections or retries")
    }
}

/// Raw KN counters from INFO, summed over nodes.
#[derive(Clone, Copy, Debug, Default)]
struct KnCounters {
    gets: u64,
    puts: u64,
    deletes: u64,
    read_rts: u64,
    write_rts: u64,
    maintenance_rts: u64,
    hit_value: u64,
    hit_shortcut: u64,
    hit_local: u64,
    miss: u64,
    verbs: u64,
    /// Every node reported `fabric_verbs` (builds before it did not).
    verbs_reported: bool,
}

fn kn_counters(c: &mut RespClient) -> Option<KnCounters> {
    let mut total = KnCounters::default();
    let mut any = false;
    total.verbs_reported = true;
    for node in 0..c.c.nodes().len() {
        let Ok(Value::Bulk(b)) = c.c.call_node(node, &[b"INFO", b"dinomo"]) else {
            continue;
        };
        let text = String::from_utf8_lossy(&b);
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        };
        let Some(read_rts) = field("read_rts") else {
            continue;
        };
        any = true;
        total.read_rts += read_rts;
        total.gets += field("gets").unwrap_or(0);
        total.puts += field("puts").unwrap_or(0);
        total.deletes += field("deletes").unwrap_or(0);
        total.write_rts += field("write_rts").unwrap_or(0);
        total.maintenance_rts += field("maintenance_rts").unwrap_or(0);
        total.hit_value += field("hit_value").unwrap_or(0);
        total.hit_shortcut += field("hit_shortcut").unwrap_or(0);
        total.hit_local += field("hit_local").unwrap_or(0);
        total.miss += field("miss").unwrap_or(0);
        match field("fabric_verbs") {
            Some(v) => total.verbs += v,
            None => total.verbs_reported = false,
        }
    }
    any.then_some(total)
}

struct ClientOut {
    latency_ns: Histogram,
    reads: u64,
    writes: u64,
    missing: u64,
    moved: u64,
    tryagain: u64,
    reconnects: u64,
}

/// Loads the keys, warms up, measures; `targets` are `host:port` seeds, `credentials` the
/// user every connection authenticates as (a cluster with authentication on).
pub fn run(
    cfg: &BenchConfig,
    targets: &[String],
    credentials: Option<&Credentials>,
) -> anyhow::Result<TargetResult> {
    if targets.is_empty() {
        bail!("--target needs at least one host:port");
    }
    let clients = cfg.clients.max(1);
    let key_len = cfg.key_size;
    let mut probe = RespClient::new(targets, credentials)?;
    // Load.
    let next = AtomicU64::new(0);
    let loaded: anyhow::Result<()> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|_| {
                sc.spawn(|| -> anyhow::Result<()> {
                    let mut c = RespClient::new(targets, credentials)?;
                    let (mut k, mut v) = (vec![0u8; key_len], vec![0u8; cfg.value_size]);
                    loop {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        if id >= cfg.keys {
                            return Ok(());
                        }
                        key_into(id, &mut k);
                        value_into(id, 0, &mut v);
                        c.call(&k, &[b"SET", &k, &v])?;
                    }
                })
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow!("a client panicked"))?)
    });
    loaded.context("loading")?;
    // Warm up, then measure. Each phase's clients start from every node known so far, so
    // a seed that has left the cluster meanwhile is not needed.
    let seeds = |probe: &mut RespClient| {
        let _ = probe.c.load_slots();
        probe.c.nodes().to_vec()
    };
    phase(
        cfg,
        &seeds(&mut probe),
        credentials,
        clients,
        cfg.warmup_ops,
        None,
        1,
    )?;
    let before = kn_counters(&mut probe);
    let t0 = Instant::now();
    let outs = phase(
        cfg,
        &seeds(&mut probe),
        credentials,
        clients,
        cfg.ops,
        cfg.duration,
        2,
    )?;
    let elapsed = t0.elapsed().as_secs_f64();
    let after = kn_counters(&mut probe);

    let mut lat = histogram::new();
    for o in &outs {
        histogram::merge(&mut lat, &o.latency_ns);
    }
    let (reads, writes) = outs
        .iter()
        .fold((0, 0), |(r, w), o| (r + o.reads, w + o.writes));
    let ops = reads + writes;
    let kn = match (before, after) {
        (Some(b), Some(a)) => Some((b, a)),
        _ => None,
    };
    let d = |f: fn(&KnCounters) -> u64| kn.map(|(b, a)| f(&a).saturating_sub(f(&b)));
    let (gets, kwrites) = (d(|c| c.gets), d(|c| c.puts + c.deletes));
    let ratio = |n: Option<u64>, of: Option<u64>| match (n, of) {
        (Some(n), Some(of)) if of > 0 => Some(n as f64 / of as f64),
        _ => None,
    };
    let all_rts = d(|c| c.read_rts + c.write_rts + c.maintenance_rts);
    let hit = gets.filter(|&g| g > 0).map(|g| Hits {
        value: d(|c| c.hit_value).unwrap_or(0) as f64 / g as f64,
        shortcut: d(|c| c.hit_shortcut).unwrap_or(0) as f64 / g as f64,
        local: d(|c| c.hit_local).unwrap_or(0) as f64 / g as f64,
        miss: d(|c| c.miss).unwrap_or(0) as f64 / g as f64,
    });
    let (dist, zipf) = match cfg.dist {
        super::workload::Distribution::Uniform => ("uniform", None),
        super::workload::Distribution::Zipf(z) => ("zipf", Some(z)),
    };
    Ok(TargetResult {
        system: "resp",
        target: targets.join(","),
        nodes: probe.c.nodes().len(),
        clients,
        workload: cfg.workload.name().to_string(),
        dist,
        zipf,
        keys: cfg.keys,
        key_size: cfg.key_size,
        value_size: cfg.value_size,
        ops,
        reads,
        writes,
        missing: outs.iter().map(|o| o.missing).sum(),
        moved: outs.iter().map(|o| o.moved).sum(),
        tryagain: outs.iter().map(|o| o.tryagain).sum(),
        reconnects: outs.iter().map(|o| o.reconnects).sum(),
        elapsed_s: elapsed,
        throughput_ops: ops as f64 / elapsed.max(1e-9),
        latency_us: super::latency_us(&lat),
        rts_per_op: ratio(all_rts, gets.zip(kwrites).map(|(g, w)| g + w)),
        read_rts_per_read: ratio(d(|c| c.read_rts), gets),
        write_rts_per_write: ratio(d(|c| c.write_rts), kwrites),
        verbs_per_op: ratio(
            d(|c| c.verbs)
                .filter(|_| kn.is_some_and(|(b, a)| b.verbs_reported && a.verbs_reported)),
            gets.zip(kwrites).map(|(g, w)| g + w),
        ),
        hit,
        seed: cfg.seed,
    })
}

/// Runs `ops` operations (or for `duration`) over `clients` threads.
fn phase(
    cfg: &BenchConfig,
    targets: &[String],
    credentials: Option<&Credentials>,
    clients: usize,
    ops: u64,
    duration: Option<Duration>,
    salt: u64,
) -> anyhow::Result<Vec<ClientOut>> {
    if ops == 0 && duration.is_none() {
        return Ok(Vec::new());
    }
    let chooser = KeyChooser::new(cfg.dist, cfg.keys.max(1));
    let per = ops.div_ceil(clients as u64);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|id| {
                let chooser = &chooser;
                sc.spawn(move || -> anyhow::Result<ClientOut> {
                    let mut c = RespClient::new(targets, credentials)?;
                    let mut rng = Rng::new(cfg.seed ^ (salt << 32) ^ ((id as u64 + 1) * 0x9E37));
                    let (mut k, mut v) = (vec![0u8; cfg.key_size], vec![0u8; cfg.value_size]);
                    let mut out = ClientOut {
                        latency_ns: histogram::new(),
                        reads: 0,
                        writes: 0,
                        missing: 0,
                        moved: 0,
                        tryagain: 0,
                        reconnects: 0,
                    };
                    let t0 = Instant::now();
                    let mut inserted = 0u64;
                    for n in 0.. {
                        match duration {
                            Some(d) if t0.elapsed() >= d => break,
                            None if n >= per => break,
                            _ => {}
                        }
                        let read = rng.next_f64() < cfg.workload.read_fraction();
                        let start = Instant::now();
                        if read {
                            let id = chooser.next(&mut rng);
                            key_into(id, &mut k);
                            if c.call(&k, &[b"GET", &k])? == Value::Nil {
                                out.missing += 1;
                            }
                            out.reads += 1;
                        } else {
                            let id = if cfg.workload == Workload::InsertHeavy {
                                inserted += 1;
                                // Disjoint new ids per client and phase.
                                cfg.keys + ((salt * 1024 + id as u64) << 32) + inserted
                            } else {
                                chooser.next(&mut rng)
                            };
                            if !key_into(id, &mut k) {
                                // Keys too short for new ids: overwrite an existing one.
                                key_into(chooser.next(&mut rng), &mut k);
                            }
                            value_into(id, n + 1, &mut v);
                            c.call(&k, &[b"SET", &k, &v])?;
                            out.writes += 1;
                        }
                        histogram::record_ns(&mut out.latency_ns, start.elapsed());
                    }
                    let counters = c.c.counters();
                    out.moved = counters.moved;
                    out.tryagain = counters.tryagain;
                    out.reconnects = c.reconnects;
                    Ok(out)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a client panicked"))?)
            .collect()
    })
}

/// A short text report.
pub fn render(r: &TargetResult) -> String {
    let mut s = format!(
        "target {} ({} nodes), {} clients, {} / {}{}, {} keys of {} B, values {} B\n",
        r.target,
        r.nodes,
        r.clients,
        r.workload,
        r.dist,
        r.zipf.map(|z| format!(" {z}")).unwrap_or_default(),
        r.keys,
        r.key_size,
        r.value_size
    );
    s += &format!(
        "measured: {:.0} ops/s over {:.2} s ({} reads, {} writes); latency us p50 {:.1} p99 {:.1} p99.9 {:.1} mean {:.1}\n",
        r.throughput_ops, r.elapsed_s, r.reads, r.writes, r.latency_us.p50, r.latency_us.p99,
        r.latency_us.p999, r.latency_us.mean
    );
    s += &format!(
        "redirections: {} MOVED, {} TRYAGAIN, {} resent after a node left; reads of loaded keys that found nothing: {}\n",
        r.moved, r.tryagain, r.reconnects, r.missing
    );
    match (r.rts_per_op, r.hit) {
        (Some(rts), Some(h)) => {
            let verbs = r
                .verbs_per_op
                .map(|v| format!(", {v:.3} verbs/op"))
                .unwrap_or_default();
            s += &format!(
                "KN counters: {rts:.3} RTs/op{verbs}; reads hit value {:.1}% shortcut {:.1}% local {:.1}% miss {:.1}%\n",
                h.value * 100.0,
                h.shortcut * 100.0,
                h.local * 100.0,
                h.miss * 100.0
            );
        }
        _ => s += "KN counters: not reported by the server\n",
    }
    s
}
