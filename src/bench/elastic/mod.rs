//! `dinomo bench --scenario elastic`: the DINOMO paper's Figure 3, scaled down. A write-heavy,
//! low-skew, open-loop load at a base rate, then `factor` times the base, then the base
//! again; KNs are added and removed by the policy ([`dinomo_manager::policy`], fed per-KN reports
//! every period) or on a fixed `--schedule`, while clients keep running. Throughput is
//! sampled every 100 ms into a CSV and a figure, and every reconfiguration is judged by its
//! dip and the time to a new steady state ([`analysis`]). DINOMO moves only ownership;
//! DINOMO-N copies the moved slots' data and its clients wait meanwhile. In policy mode the
//! KNs' hot keys are reported too and outliers are replicated ([`replication`]).

pub mod analysis;
pub mod load;
pub mod plot;
pub mod replication;
pub mod schedule;
mod systems;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dinomo_shared::entry::padded_len;
use dinomo_shared::slot::key_slot;
use host_kn::{Router, ShardStats};
use indicatif::ProgressBar;
use serde::Serialize;

use super::workload::{key_into, value_into, Distribution, KeyChooser, Rng, Workload};
use super::{bar, load as load_keys, BenchConfig, Ops, System, Target};
use crate::cluster::ClusterConfig;
use crate::histogram::{self, Histogram};
use analysis::Recovery;
use dinomo_manager::policy::{Decision, KnReport, Policy, PolicyConfig};
use load::{ClientCounters, LoadShape};
use replication::{ReplicationCounts, ReplicationResult, Replicator};
use schedule::{Action, Schedule};

/// The most KNs a scenario may grow to (the region is formatted with room for their logs).
pub const MAX_KNS: usize = 64;

/// Length of one throughput sample.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The scenario.
#[derive(Clone, Debug)]
pub struct ElasticConfig {
    pub systems: Vec<System>,
    /// Keys, sizes, clients, initial KNs (`kns`), shards per KN, cache, NIC, seed, progress.
    pub bench: BenchConfig,
    pub shape: LoadShape,
    /// Fixed reconfigurations instead of the policy.
    pub schedule: Option<Schedule>,
    pub policy: PolicyConfig,
    /// A client further than this behind its schedule skips (and counts) the operations
    /// it missed, so that a stall is not followed by an unbounded catch-up burst.
    pub max_lag: Duration,
    /// Directory of elastic.csv, elastic.svg and elastic.png.
    pub out: PathBuf,
    /// The command that made it, recorded in the JSON.
    pub command: String,
}

impl ElasticConfig {
    pub fn validate(&self) -> Result<(), String> {
        for &system in &self.systems {
            BenchConfig {
                system,
                ..self.bench.clone()
            }
            .validate()?;
        }
        if self.systems.is_empty() {
            return Err("--systems needs at least one system".into());
        }
        if let Some(s) = self.systems.iter().find(|s| **s == System::Clover) {
            return Err(format!(
                "--scenario elastic runs dinomo and dinomo-n; {s} cannot add or remove KNs here"
            ));
        }
        if self.bench.workload == Workload::InsertHeavy {
            return Err(
                "--scenario elastic supports read-only, read-mostly and write-heavy".into(),
            );
        }
        let s = &self.shape;
        if !(s.base_rate.is_finite() && s.base_rate >= 1.0 && s.base_rate <= 1e8) {
            return Err(format!(
                "--base-rate {} is outside 1..=1e8 ops/s",
                s.base_rate
            ));
        }
        if !(s.factor.is_finite() && (1.0..=1000.0).contains(&s.factor)) {
            return Err(format!("--burst {} is outside 1..=1000", s.factor));
        }
        if [s.base, s.burst, s.tail].iter().any(|d| d.is_zero()) {
            return Err("--phases needs three positive durations".into());
        }
        let p = &self.policy;
        if p.period < Duration::from_millis(200) {
            return Err("--period must be at least 0.2 s".into());
        }
        if p.max_kns == 0 || p.max_kns > MAX_KNS {
            return Err(format!("--max-kns {} is outside 1..={MAX_KNS}", p.max_kns));
        }
        if p.min_kns == 0 || p.min_kns > p.max_kns {
            return Err(format!("--min-kns {} is outside 1..=--max-kns", p.min_kns));
        }
        if self.bench.kns as usize > p.max_kns {
            return Err(format!(
                "--kns {} exceeds --max-kns {}",
                self.bench.kns, p.max_kns
            ));
        }
        if let Some(sched) = &self.schedule {
            sched.validate(self.bench.kns, p.max_kns as u16, s.total())?;
        }
        Ok(())
    }

    /// Every write of the run (the offered load, half of it writes) plus room for copies of
    /// the data (DINOMO-N moves) on top of the loaded keys, with a quarter to spare.
    fn region_bytes(&self) -> u64 {
        let b = &self.bench;
        let entry = padded_len(b.key_size + dinomo_n_overhead(), b.value_size) as u64;
        let offered = self.shape.offered_until(self.shape.total().as_secs_f64());
        let writes = (offered * (1.0 - b.workload.read_fraction())) as u64;
        let copies = b.keys * 4;
        let data = (b.keys + writes + copies) * entry;
        let shards = self.policy.max_kns as u64 * b.threads_per_kn as u64;
        (data + data / 4 + (64 << 20) + shards * (16 << 20)).next_multiple_of(1 << 20)
    }

    fn cluster_config(&self) -> ClusterConfig {
        let b = &self.bench;
        ClusterConfig {
            kns: b.kns,
            shards_per_kn: b.threads_per_kn,
            region_bytes: self.region_bytes(),
            dpm_workers: b.dpm_workers,
            cache_bytes_per_kn: b.cache_per_kn(),
            policy: b.policy,
            nic: b.nic,
            max_kns: self.policy.max_kns as u16,
            ..ClusterConfig::default()
        }
    }

    fn mode(&self) -> &'static str {
        if self.schedule.is_some() {
            "schedule"
        } else {
            "policy"
        }
    }
}

fn dinomo_n_overhead() -> usize {
    crate::cluster::dinomo_n::MAX_KEY_OVERHEAD
}

/// What one reconfiguration did and cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reconfig {
    pub kn: u16,
    pub slots_moved: usize,
    /// Key and value bytes copied between partitions (zero when only ownership moves).
    pub bytes_moved: u64,
}

/// A system the scenario can grow and shrink (and replicate keys of) while clients run.
trait Elastic: Target + Replicator {
    /// Client `i`: it keeps retrying a moving slot for as long as any move can take, and
    /// clients spread over the replicas of a replicated key.
    fn patient_client(&self, i: usize) -> Self::C;
    /// The router clients route by (to attribute latencies to the owning KN).
    fn router(&self) -> Arc<Router>;
    /// Counters of one KN (all its shards).
    fn kn_stats(&self, kn: u16) -> Option<ShardStats>;
    fn add_kn(&mut self) -> anyhow::Result<Reconfig>;
    fn remove_kn(&mut self, kn: u16) -> anyhow::Result<Reconfig>;
}

/// One row of the CSV: an interval of [`INTERVAL`].
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// End of the interval, in seconds from the start of the run.
    pub t: f64,
    /// Operations completed within it.
    pub ops: u64,
    /// KNs serving at its end.
    pub kns: usize,
    /// Events within it, `;`-separated.
    pub event: String,
}

/// A reconfiguration as the results report it.
#[derive(Clone, Debug, Serialize)]
pub struct ReconfigResult {
    pub action: &'static str,
    pub kn: u16,
    pub started_s: f64,
    pub took_s: f64,
    pub slots_moved: usize,
    pub bytes_moved: u64,
    /// Dip and recovery (see `dip_definition`); absent if the run ended first.
    pub recovery: Option<Recovery>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencyUs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// What the policy saw at one decision.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyTick {
    pub t_s: f64,
    pub kns: Vec<KnSeen>,
    /// The add or remove it decided, if any.
    pub decision: Option<String>,
    /// The replications it decided (`replicate:<key>`, `dereplicate:<key>`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replication: Vec<String>,
}

/// One KN's report as the policy saw it.
#[derive(Clone, Debug, Serialize)]
pub struct KnSeen {
    pub kn: u16,
    pub ops_per_s: f64,
    pub occupancy: f64,
    pub p99_us: f64,
}

/// One system's run.
#[derive(Clone, Debug, Serialize)]
pub struct SystemResult {
    pub system: &'static str,
    pub initial_kns: u16,
    pub final_kns: usize,
    pub peak_kns: usize,
    pub offered_ops: u64,
    pub ops: u64,
    pub dropped_ops: u64,
    pub errors: u64,
    /// From each operation's due time (open loop); nearest-rank, to 3 significant digits.
    pub latency_us: LatencyUs,
    pub reconfigs: Vec<ReconfigResult>,
    /// Longest dip of any reconfiguration, seconds.
    pub longest_dip_s: f64,
    pub bytes_moved: u64,
    /// Every policy decision with the reports behind it (policy mode).
    pub policy_log: Vec<PolicyTick>,
    /// Replication changes, counted (policy mode).
    pub replication: ReplicationCounts,
    /// Every replication change, refusal and failure, in order.
    pub replications: Vec<ReplicationResult>,
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicySummary {
    pub period_s: f64,
    pub slo_p99_us: f64,
    pub busy_add: f64,
    pub idle_remove: f64,
    pub min_kns: usize,
    pub max_kns: usize,
    pub cooldown_s: f64,
}

/// The whole scenario's result (the JSON of `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct ElasticResult {
    pub scenario: &'static str,
    pub command: String,
    pub workload: String,
    pub zipf: Option<f64>,
    pub keys: u64,
    pub key_size: usize,
    pub value_size: usize,
    pub clients: usize,
    pub threads_per_kn: u16,
    pub base_rate: f64,
    pub burst_factor: f64,
    pub phases_s: [f64; 3],
    pub interval_ms: u64,
    /// "policy" or "schedule".
    pub mode: &'static str,
    pub schedule: Option<String>,
    pub policy: PolicySummary,
    pub dip_definition: &'static str,
    pub systems: Vec<SystemResult>,
}

/// The definitions behind the figures, recorded beside them.
pub const DIP_DEFINITION: &str = "dip: longest run of consecutive 100 ms intervals below 50% of the median of the (up to) 2 s before a reconfiguration, from its start until 2 s after its end (or the next load change or reconfiguration, if sooner); window: from its start to the next load change or reconfiguration; steady state: first interval from which throughput stays within 20% of the window's final level (median of its last 2 s) for 1 s";

/// CSV header of the throughput series.
pub const CSV_HEADER: &str = "time_s,system,ops,kns,event";

/// Runs the scenario for every system; writes the CSV and the figure into `cfg.out`.
pub fn run(cfg: &ElasticConfig) -> anyhow::Result<ElasticResult> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&cfg.out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", cfg.out.display()))?;
    let mut results = Vec::new();
    for &system in &cfg.systems {
        let r = match system {
            System::Dinomo => {
                let mut c = crate::cluster::Cluster::start(&cfg.cluster_config())?;
                check_value(cfg, c.max_value())?;
                let r = run_system(&mut c, cfg, system);
                c.stop();
                r?
            }
            System::DinomoN => {
                let mut c = crate::cluster::dinomo_n::DinomoN::start(&cfg.cluster_config())?;
                check_value(cfg, c.max_value())?;
                let r = run_system(&mut c, cfg, system);
                c.stop();
                r?
            }
            System::Clover => anyhow::bail!("clover cannot add or remove KNs"),
        };
        results.push(r);
    }
    let result = summarise(cfg, results);
    write_csv(cfg, &result)?;
    plot::draw(
        &result,
        &cfg.out.join("elastic.svg"),
        &cfg.out.join("elastic.png"),
    )?;
    Ok(result)
}

/// Seconds to the millisecond, so the JSON shows what was measured and no float noise.
fn round_ms(s: f64) -> f64 {
    (s * 1e3).round() / 1e3
}

fn check_value(cfg: &ElasticConfig, max: usize) -> anyhow::Result<()> {
    if cfg.bench.value_size > max {
        anyhow::bail!(
            "--value-size {} exceeds the largest value this region accepts ({max})",
            cfg.bench.value_size
        );
    }
    Ok(())
}

fn summarise(cfg: &ElasticConfig, systems: Vec<SystemResult>) -> ElasticResult {
    let b = &cfg.bench;
    let p = &cfg.policy;
    ElasticResult {
        scenario: "elastic",
        command: cfg.command.clone(),
        workload: b.workload.name().into(),
        zipf: match b.dist {
            Distribution::Zipf(t) => Some(t),
            Distribution::Uniform => None,
        },
        keys: b.keys,
        key_size: b.key_size,
        value_size: b.value_size,
        clients: b.clients,
        threads_per_kn: b.threads_per_kn,
        base_rate: cfg.shape.base_rate,
        burst_factor: cfg.shape.factor,
        phases_s: [
            cfg.shape.base.as_secs_f64(),
            cfg.shape.burst.as_secs_f64(),
            cfg.shape.tail.as_secs_f64(),
        ],
        interval_ms: INTERVAL.as_millis() as u64,
        mode: cfg.mode(),
        schedule: cfg.schedule.as_ref().map(|s| {
            s.0.iter()
                .map(|st| format!("t={}:{}", st.at.as_secs_f64(), st.action))
                .collect::<Vec<_>>()
                .join(",")
        }),
        policy: PolicySummary {
            period_s: p.period.as_secs_f64(),
            slo_p99_us: p.slo_p99.as_secs_f64() * 1e6,
            busy_add: p.busy_add,
            idle_remove: p.idle_remove,
            min_kns: p.min_kns,
            max_kns: p.max_kns,
            cooldown_s: p.cooldown.as_secs_f64(),
        },
        dip_definition: DIP_DEFINITION,
        systems,
    }
}

/// The CSV rows of every system.
pub fn csv(result: &ElasticResult) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in &result.systems {
        for x in &r.samples {
            s += &format!("{:.1},{},{},{},{}\n", x.t, r.system, x.ops, x.kns, x.event);
        }
    }
    s
}

fn write_csv(cfg: &ElasticConfig, result: &ElasticResult) -> anyhow::Result<()> {
    let path = cfg.out.join("elastic.csv");
    let mut f = std::fs::File::create(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    f.write_all(csv(result).as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// Shared between the client threads, the sampler and the controller of one run.
struct Shared {
    t0: Instant,
    stop: AtomicBool,
    live_kns: AtomicUsize,
    counters: Vec<ClientCounters>,
    /// (seconds from t0, label), appended by the controller.
    events: Mutex<Vec<(f64, String)>>,
}

impl Shared {
    fn event(&self, label: String) -> f64 {
        let t = self.t0.elapsed().as_secs_f64();
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((t, label));
        t
    }
    fn ops(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.ops.load(Ordering::Relaxed))
            .sum()
    }
}

/// A reconfiguration as it happened.
struct Done {
    action: &'static str,
    started: f64,
    finished: f64,
    r: Reconfig,
}

fn run_system<S: Elastic>(
    sys: &mut S,
    cfg: &ElasticConfig,
    system: System,
) -> anyhow::Result<SystemResult> {
    let b = &cfg.bench;
    load_keys(&*sys, b)?;
    sys.settle()?;
    let max_kns = cfg.policy.max_kns;
    let shared = Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        live_kns: AtomicUsize::new(sys.live_kns().len()),
        counters: (0..b.clients)
            .map(|_| ClientCounters::new(max_kns))
            .collect(),
        events: Mutex::new(Vec::new()),
    };
    let total = cfg.shape.total();
    let pb = bar(b.progress, total.as_secs().max(1), system.name());
    let clients: Vec<S::C> = (0..b.clients).map(|i| sys.patient_client(i)).collect();
    let router = sys.router();
    let chooser = KeyChooser::new(b.dist, b.keys);
    let mut done: Vec<Done> = Vec::new();
    let mut ticks: Vec<PolicyTick> = Vec::new();
    let mut replications: Vec<ReplicationResult> = Vec::new();
    let mut latency = histogram::new();
    let samples = std::thread::scope(|s| -> anyhow::Result<Vec<(u64, usize)>> {
        let shared = &shared;
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, cl)| {
                let (router, chooser) = (Arc::clone(&router), &chooser);
                s.spawn(move || client_loop(cl, i, cfg, shared, &router, chooser))
            })
            .collect();
        let sampler = s.spawn(|| sample_loop(shared, total, &pb));
        let mut log = Log {
            done: &mut done,
            ticks: &mut ticks,
            replications: &mut replications,
        };
        let controlled = control(sys, cfg, shared, &mut log, &mut latency, &pb);
        shared.stop.store(true, Ordering::Release);
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        }
        let samples = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
        controlled?;
        Ok(samples)
    })?;
    pb.finish_and_clear();
    for c in &shared.counters {
        for h in &c.latency {
            h.drain_into(&mut latency);
        }
    }
    let ops = shared.ops();
    let dropped = shared
        .counters
        .iter()
        .map(|c| c.dropped.load(Ordering::Relaxed))
        .sum();
    let errors = shared
        .counters
        .iter()
        .map(|c| c.errors.load(Ordering::Relaxed))
        .sum();
    let mut events = shared
        .events
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    for (at, label) in cfg.shape.changes() {
        events.push((at.as_secs_f64(), label));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let ops_series: Vec<u64> = samples.iter().map(|s| s.0).collect();
    let interval = INTERVAL.as_secs_f64();
    let idx = |t: f64| ((t / interval) as usize).min(samples.len());
    let mut rows: Vec<Sample> = samples
        .iter()
        .enumerate()
        .map(|(i, &(ops, kns))| Sample {
            t: (i + 1) as f64 * interval,
            ops,
            kns,
            event: String::new(),
        })
        .collect();
    for (t, label) in &events {
        if let Some(row) = rows.get_mut(idx(*t)) {
            if !row.event.is_empty() {
                row.event.push(';');
            }
            row.event.push_str(label);
        }
    }
    // Boundaries: load changes and reconfiguration starts (a reconfiguration's own end is
    // inside its window).
    let mut boundaries: Vec<usize> = cfg
        .shape
        .changes()
        .iter()
        .map(|(at, _)| idx(at.as_secs_f64()))
        .collect();
    boundaries.extend(done.iter().map(|d| idx(d.started)));
    boundaries.sort_unstable();
    let reconfigs: Vec<ReconfigResult> = done
        .iter()
        .map(|d| {
            let start = idx(d.started);
            // The reference starts after the latest earlier boundary and after the end of
            // any earlier reconfiguration; the window ends at the next boundary.
            let prev = boundaries
                .iter()
                .copied()
                .filter(|&x| x < start)
                .max()
                .map_or(0, |x| x + 1);
            let prev = done
                .iter()
                .map(|o| idx(o.finished) + 1)
                .filter(|&x| x <= start)
                .fold(prev, usize::max);
            let next = boundaries
                .iter()
                .copied()
                .find(|&x| x > start)
                .unwrap_or(ops_series.len());
            let label = format!("{} kn{}", d.action, d.r.kn);
            ReconfigResult {
                action: d.action,
                kn: d.r.kn,
                started_s: round_ms(d.started),
                took_s: round_ms(d.finished - d.started),
                slots_moved: d.r.slots_moved,
                bytes_moved: d.r.bytes_moved,
                recovery: analysis::recovery(
                    &ops_series,
                    interval,
                    &label,
                    (start, idx(d.finished)),
                    prev,
                    next,
                ),
            }
        })
        .collect();
    let q = |x: f64| load::quantile(&latency, x).as_secs_f64() * 1e6;
    Ok(SystemResult {
        system: system.name(),
        initial_kns: b.kns,
        final_kns: sys.live_kns().len(),
        peak_kns: rows.iter().map(|r| r.kns).max().unwrap_or(0),
        offered_ops: cfg.shape.offered_until(total.as_secs_f64()) as u64,
        ops,
        dropped_ops: dropped,
        errors,
        latency_us: LatencyUs {
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
        },
        longest_dip_s: reconfigs
            .iter()
            .filter_map(|r| r.recovery.as_ref().map(|x| x.longest_dip_s))
            .fold(0.0, f64::max),
        bytes_moved: reconfigs.iter().map(|r| r.bytes_moved).sum(),
        reconfigs,
        policy_log: ticks,
        replication: ReplicationCounts::of(&replications, sys.replicated().len()),
        replications,
        samples: rows,
    })
}

/// How early a client may issue an operation rather than sleep until it is due: fewer,
/// longer sleeps (two cores cannot afford a wake-up per operation), invisible at 100 ms.
const EARLY: f64 = 0.0005;

/// One open-loop client: operation `i + k * clients` is due at `shape.due(..)`; it sleeps
/// when early, and skips what it missed when it is more than `max_lag` late.
fn client_loop<C: Ops>(
    mut cl: C,
    i: usize,
    cfg: &ElasticConfig,
    shared: &Shared,
    router: &Router,
    chooser: &KeyChooser,
) {
    let b = &cfg.bench;
    let shape = &cfg.shape;
    let n_clients = b.clients as u64;
    let total = shape.total().as_secs_f64();
    let lag = cfg.max_lag.as_secs_f64();
    let me = &shared.counters[i];
    let mut rng = Rng::new(b.seed.wrapping_mul(0x100_0000_01B3) ^ (i as u64 + 0xE1A5));
    let mut key = vec![0u8; b.key_size];
    let mut val = vec![0u8; b.value_size];
    let rf = b.workload.read_fraction();
    let mut k = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let n = i as u64 + k * n_clients;
        let due = shape.due(n);
        if due >= total {
            break;
        }
        let now = shared.t0.elapsed().as_secs_f64();
        if now + EARLY < due {
            std::thread::sleep(Duration::from_secs_f64(due - now));
        } else if now - due > lag {
            // Resume with the first operation due within the lag.
            let first = shape.offered_until(now - lag).ceil() as u64;
            let next_k = first
                .saturating_sub(i as u64)
                .div_ceil(n_clients)
                .max(k + 1);
            me.dropped.fetch_add(next_k - k, Ordering::Relaxed);
            k = next_k;
            continue;
        }
        // Latency counts from the due time, or from the start if issued early.
        let from = due.min(shared.t0.elapsed().as_secs_f64());
        let id = chooser.next(&mut rng);
        key_into(id, &mut key);
        let owner = router.map().owner(key_slot(&key)) as usize;
        let r = if rf >= 1.0 || rng.next_f64() < rf {
            cl.get(&key).map(|_| ())
        } else {
            value_into(id, rng.next_u64(), &mut val);
            cl.put(&key, &val)
        };
        match r {
            Ok(()) => {
                let at = shared.t0.elapsed().as_secs_f64();
                if let Some(h) = me.latency.get(owner) {
                    h.record(Duration::from_secs_f64((at - from).max(0.0)));
                }
                me.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                me.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        k += 1;
    }
}

/// Every [`INTERVAL`]: the operations completed within it and the live KNs at its end.
fn sample_loop(shared: &Shared, total: Duration, pb: &ProgressBar) -> Vec<(u64, usize)> {
    let n = (total.as_nanos() / INTERVAL.as_nanos()) as u32;
    let mut out = Vec::with_capacity(n as usize);
    let mut last = 0;
    for i in 1..=n {
        let at = shared.t0 + INTERVAL * i;
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let ops = shared.ops();
        out.push((ops - last, shared.live_kns.load(Ordering::Relaxed)));
        last = ops;
        if i % 10 == 0 {
            pb.set_position(u64::from(i / 10));
        }
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    out
}

/// What the controller records.
struct Log<'a> {
    done: &'a mut Vec<Done>,
    ticks: &'a mut Vec<PolicyTick>,
    replications: &'a mut Vec<ReplicationResult>,
}

impl Log<'_> {
    /// Records replication changes, as results and as events of the time series.
    fn replicated(&mut self, shared: &Shared, pb: &ProgressBar, rs: Vec<ReplicationResult>) {
        for r in rs {
            pb.println(format!("{:>8} t={:.1}s {}", "", r.started_s, r.event()));
            shared
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((r.started_s, r.event()));
            self.replications.push(r);
        }
    }
}

/// The controller: applies the schedule, or asks the policy every period and acts on its
/// decisions (an add or remove, then replication changes).
fn control<S: Elastic>(
    sys: &mut S,
    cfg: &ElasticConfig,
    shared: &Shared,
    log: &mut Log<'_>,
    latency: &mut Histogram,
    pb: &ProgressBar,
) -> anyhow::Result<()> {
    let total = cfg.shape.total();
    let mut policy = Policy::new(cfg.policy.clone());
    let mut steps = cfg.schedule.as_ref().map(|s| s.0.iter().peekable());
    let mut last: Vec<(u16, ShardStats)> = sys
        .live_kns()
        .into_iter()
        .filter_map(|k| sys.kn_stats(k).map(|s| (k, s)))
        .collect();
    // The first period's hot keys start now, not with the load before the run.
    for kn in sys.live_kns() {
        sys.hot_keys(kn);
    }
    let mut last_at = Instant::now();
    let mut next_tick = shared.t0 + cfg.policy.period;
    let clock = || shared.t0.elapsed().as_secs_f64();
    loop {
        let wake = match steps.as_mut() {
            Some(st) => match st.peek() {
                Some(step) => shared.t0 + step.at,
                None => shared.t0 + total,
            },
            None => next_tick,
        };
        let wake = wake.min(shared.t0 + total);
        if let Some(d) = wake.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        if shared.t0.elapsed() >= total {
            return Ok(());
        }
        let (action, decisions) = match steps.as_mut() {
            Some(st) => (st.next().map(|step| step.action), Vec::new()),
            None => {
                next_tick = Instant::now() + cfg.policy.period;
                let now = Instant::now();
                let reports = reports(sys, cfg, shared, &mut last, now - last_at, latency);
                last_at = now;
                let decisions = policy.decide(now, &reports, &sys.replicated());
                let action = decisions.iter().find_map(|d| match d {
                    Decision::AddKn => Some(Action::Add),
                    Decision::RemoveKn(kn) => Some(Action::Remove(Some(*kn))),
                    Decision::Replicate(_) | Decision::Dereplicate(_) => None,
                });
                log.ticks.push(PolicyTick {
                    t_s: round_ms(shared.t0.elapsed().as_secs_f64()),
                    kns: reports
                        .iter()
                        .map(|r| KnSeen {
                            kn: r.kn,
                            ops_per_s: r.ops_per_sec.round(),
                            occupancy: (r.occupancy * 1000.0).round() / 1000.0,
                            p99_us: r.p99.as_secs_f64() * 1e6,
                        })
                        .collect(),
                    decision: action.map(|a| a.to_string()),
                    replication: decisions
                        .iter()
                        .filter_map(|d| match d {
                            Decision::Replicate(k) => {
                                Some(format!("replicate:{}", replication::show_key(k)))
                            }
                            Decision::Dereplicate(k) => {
                                Some(format!("dereplicate:{}", replication::show_key(k)))
                            }
                            Decision::AddKn | Decision::RemoveKn(_) => None,
                        })
                        .collect(),
                });
                (action, decisions)
            }
        };
        // The add or remove first, as the policy orders them: it ends the replication of
        // keys whose slot moves or whose replica stops, and replicating after it reaches
        // the KNs live from now on.
        if let Some(action) = action {
            reconfigure(sys, action, shared, log, pb)?;
            // The policy's next window starts after the change.
            last = sys
                .live_kns()
                .into_iter()
                .filter_map(|k| sys.kn_stats(k).map(|s| (k, s)))
                .collect();
            last_at = Instant::now();
        }
        let changes = replication::act(sys, &decisions, clock);
        log.replicated(shared, pb, changes);
    }
}

/// Adds or removes a KN and records it, with the replications it ended.
fn reconfigure<S: Elastic>(
    sys: &mut S,
    action: Action,
    shared: &Shared,
    log: &mut Log<'_>,
    pb: &ProgressBar,
) -> anyhow::Result<()> {
    let replicated_before = sys.replicated();
    let (name, started, result) = match action {
        Action::Add => {
            let t = shared.event("add start".into());
            ("add", t, sys.add_kn())
        }
        Action::Remove(which) => {
            let live = sys.live_kns();
            let kn = which.or(live.iter().copied().max()).unwrap_or(0);
            let t = shared.event(format!("remove kn{kn} start"));
            ("remove", t, sys.remove_kn(kn))
        }
    };
    let r = result?;
    let finished = shared.event(format!("{name} kn{} done", r.kn));
    shared
        .live_kns
        .store(sys.live_kns().len(), Ordering::Relaxed);
    pb.println(format!(
        "{:>8} t={started:.1}s {name} kn{}: {:.0} ms, {} slots, {} moved",
        "",
        r.kn,
        (finished - started) * 1e3,
        r.slots_moved,
        crate::size::human(r.bytes_moved)
    ));
    let ended = replication::ended_by(
        &replicated_before,
        &sys.replicated(),
        &format!("{name} kn{}", r.kn),
        started,
    );
    log.replicated(shared, pb, ended);
    log.done.push(Done {
        action: name,
        started,
        finished,
        r,
    });
    Ok(())
}

/// One report per live KN over the last `elapsed`: operations, occupancy from the shards'
/// busy time, the p99 latency clients saw for keys it owned, and its sampled hot keys.
fn reports<S: Elastic>(
    sys: &S,
    cfg: &ElasticConfig,
    shared: &Shared,
    last: &mut Vec<(u16, ShardStats)>,
    elapsed: Duration,
    latency: &mut Histogram,
) -> Vec<KnReport> {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let shards = cfg.bench.threads_per_kn.max(1) as f64;
    let mut out = Vec::new();
    let mut now = Vec::new();
    for kn in sys.live_kns() {
        let Some(stats) = sys.kn_stats(kn) else {
            continue;
        };
        let before = last
            .iter()
            .find(|(k, _)| *k == kn)
            .map(|(_, s)| *s)
            .unwrap_or_default();
        let d = stats.since(&before);
        let mut counts = histogram::new();
        for c in &shared.counters {
            if let Some(h) = c.latency.get(kn as usize) {
                h.drain_into(&mut counts);
            }
        }
        histogram::merge(latency, &counts);
        out.push(KnReport {
            kn,
            ops_per_sec: (d.gets + d.puts + d.deletes) as f64 / secs,
            occupancy: (d.busy_ns as f64 / 1e9 / secs / shards).clamp(0.0, 1.0),
            p99: load::quantile(&counts, 0.99),
            hot_keys: sys.hot_keys(kn),
        });
        now.push((kn, stats));
    }
    *last = now;
    out
}

/// A short text summary of one system's run.
pub fn render_system(r: &SystemResult) -> String {
    let mut s = format!(
        "{:<9} {} -> {} KNs (peak {}), {} ops of {} offered ({} dropped, {} errors), latency p50 {:.0} us p99 {:.0} us\n",
        r.system,
        r.initial_kns,
        r.final_kns,
        r.peak_kns,
        r.ops,
        r.offered_ops,
        r.dropped_ops,
        r.errors,
        r.latency_us.p50,
        r.latency_us.p99
    );
    for c in &r.reconfigs {
        let (dip, steady) = match &c.recovery {
            Some(x) => (
                format!("{:.1} s", x.longest_dip_s),
                x.to_steady_s
                    .map_or("not reached".into(), |t| format!("{t:.1} s")),
            ),
            None => ("-".into(), "-".into()),
        };
        s += &format!(
            "          t={:>5.1}s {:<6} kn{:<2} took {:>7.3} s, {:>5} slots, {:>9} moved; dip {dip}, steady after {steady}\n",
            c.started_s,
            c.action,
            c.kn,
            c.took_s,
            c.slots_moved,
            crate::size::human(c.bytes_moved)
        );
    }
    let c = &r.replication;
    if !r.replications.is_empty() {
        let took: Vec<f64> = r
            .replications
            .iter()
            .filter(|x| x.done())
            .map(|x| x.took_s * 1e3)
            .collect();
        let longest = match took.iter().copied().reduce(f64::max) {
            Some(max) => format!(" (longest {max:.2} ms)"),
            None => String::new(),
        };
        s += &format!(
            "          replication: {} replicated, {} dereplicated{longest}, {} ended by reconfiguration, {} skipped, {} failed; {} replicated at the end\n",
            c.replicated, c.dereplicated, c.ended_by_reconfig, c.skipped, c.failed, c.at_end
        );
        let mut reasons: Vec<&str> = r
            .replications
            .iter()
            .filter_map(|x| x.outcome.strip_prefix("skipped: "))
            .collect();
        reasons.sort_unstable();
        reasons.dedup();
        for why in reasons {
            s += &format!("          replication skipped: {why}\n");
        }
    }
    s += &format!(
        "          longest dip {:.1} s, {} moved in all\n",
        r.longest_dip_s,
        crate::size::human(r.bytes_moved)
    );
    s
}

/// The summary of every system.
pub fn render(r: &ElasticResult) -> String {
    let mut s = format!(
        "elastic: {} {}, {} keys, {} clients open-loop, base {:.0} ops/s x{} for {}/{}/{} s, {} mode\n",
        r.workload,
        r.zipf.map_or("uniform".into(), |z| format!("zipf {z}")),
        r.keys,
        r.clients,
        r.base_rate,
        r.burst_factor,
        r.phases_s[0],
        r.phases_s[1],
        r.phases_s[2],
        r.mode
    );
    for x in &r.systems {
        s += &render_system(x);
    }
    s
}
