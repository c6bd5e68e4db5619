//! `dinomo bench`: load, then run a YCSB-style workload against an in-process cluster, and
//! report what it cost in round trips, verbs and bytes, with measured throughput and
//! latency, a modelled throughput for a NIC profile, and the static-optimal cache bar.

pub mod cli;
pub mod elastic;
pub mod kn_cpu;
pub mod model;
pub mod moving;
pub mod plot;
pub mod sweep;
pub mod target;
pub mod workload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::nic::NicProfile;
use dinomo_shared::entry::padded_len;
use host_kn::dac::{oracle, CachePolicy, DacConfig, Oracle};
use host_kn::ownership::{shard_of, SlotMap};
use host_kn::ShardStats;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cluster::clover::{CloverClient, CloverCluster, CloverConfig};
use crate::cluster::dinomo_n::{DinomoN, DinomoNClient, MAX_KEY_OVERHEAD};
use crate::cluster::{Cluster, ClusterConfig};
use crate::histogram::{self, Histogram};
use workload::{
    key_digits, key_into, value_into, Distribution, KeyChooser, Rng, ShiftedChooser, Workload,
};

/// The system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum System {
    /// DINOMO: shared data, ownership partitioning, DAC.
    #[default]
    Dinomo,
    /// Clover: shared-everything, shortcut-only caches, version chains, metadata server.
    Clover,
    /// DINOMO-N: DINOMO's KNs over per-KN data partitions (shared-nothing).
    DinomoN,
}

impl System {
    pub const ALL: [Self; 3] = [Self::Dinomo, Self::Clover, Self::DinomoN];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Dinomo => "dinomo",
            Self::Clover => "clover",
            Self::DinomoN => "dinomo-n",
        }
    }
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for System {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s.trim())
            .ok_or_else(|| {
                format!("unknown system {s:?}; expected one of: dinomo, clover, dinomo-n")
            })
    }
}

/// How much cache the KNs get.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheSize {
    /// Total KN cache as a fraction of the loaded data (key + value bytes).
    Ratio(f64),
    /// Bytes per KN.
    PerKn(u64),
}

/// Where the model's KN CPU term comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum KnCpuSetting {
    /// No KN CPU term.
    Off,
    /// Measured by calibration phases before the run ([`kn_cpu::calibrate`]).
    Calibrate,
    /// Measured before (a sweep calibrates once per system) or given.
    Use(kn_cpu::KnCpuCalibration),
}

/// One benchmark run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub system: System,
    pub kns: u16,
    pub threads_per_kn: u16,
    pub workload: Workload,
    pub dist: Distribution,
    pub keys: u64,
    pub key_size: usize,
    pub value_size: usize,
    /// Measured operations (ignored when `duration` is set).
    pub ops: u64,
    pub duration: Option<Duration>,
    /// Unmeasured operations run first so that caches reach steady state.
    pub warmup_ops: u64,
    /// `Some(max)`: keep warming up after `warmup_ops` until the RTs per operation settle,
    /// up to `max` operations in all (`--warmup auto`, see [`warm_up`]); only read-only
    /// steady runs do.
    pub warmup_auto: Option<u64>,
    pub clients: usize,
    pub cache: CacheSize,
    pub policy: CachePolicy,
    /// Latency injected into the fabric.
    pub nic: NicProfile,
    /// Profile of the modelled throughput.
    pub model_nic: NicProfile,
    /// Worker threads per KN of the model's KN-latency ceiling (`None`: `threads_per_kn`).
    pub model_threads_per_kn: Option<u16>,
    /// Cores per KN of the model's KN CPU ceiling (`None`: the model's threads per KN).
    pub kn_cores: Option<u16>,
    /// The model's KN CPU term.
    pub kn_cpu: KnCpuSetting,
    pub seed: u64,
    pub dpm_workers: usize,
    pub progress: bool,
    /// A moving workload: the hot set moves every so many measured operations.
    pub shift: Option<moving::Shift>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            system: System::Dinomo,
            kns: 2,
            threads_per_kn: 2,
            workload: Workload::ReadMostly,
            dist: Distribution::Zipf(0.99),
            keys: 100_000,
            key_size: 8,
            value_size: 1024,
            ops: 1_000_000,
            duration: None,
            warmup_ops: 200_000,
            warmup_auto: None,
            clients: 8,
            cache: CacheSize::Ratio(0.5),
            policy: CachePolicy::Dac,
            nic: NicProfile::None,
            model_nic: NicProfile::Cx3Fdr,
            model_threads_per_kn: None,
            kn_cores: None,
            kn_cpu: KnCpuSetting::Calibrate,
            seed: 1,
            dpm_workers: 1,
            progress: true,
            shift: None,
        }
    }
}

impl BenchConfig {
    /// Checks every setting; the message says what is wrong and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if self.kns == 0 || self.kns > 1024 {
            return Err(format!("--kns {} is outside 1..=1024", self.kns));
        }
        if self.threads_per_kn == 0 || self.threads_per_kn > 256 {
            return Err(format!(
                "--threads-per-kn {} is outside 1..=256",
                self.threads_per_kn
            ));
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        let digits = key_digits(
            self.keys
                + if self.workload == Workload::InsertHeavy {
                    self.ops + self.warmup_ops
                } else {
                    0
                },
        );
        let max_key = match self.system {
            System::DinomoN => dinomo_shared::entry::MAX_KEY_LEN - MAX_KEY_OVERHEAD,
            System::Dinomo | System::Clover => dinomo_shared::entry::MAX_KEY_LEN,
        };
        if self.key_size == 0 || self.key_size > max_key {
            return Err(format!(
                "--key-size {} is outside 1..={max_key} for {}",
                self.key_size, self.system
            ));
        }
        if self.system == System::Clover && self.workload == Workload::InsertHeavy {
            return Err("--system clover supports read-only, read-mostly and write-heavy".into());
        }
        if self.key_size < digits {
            return Err(format!(
                "--key-size {} is too small for {} distinct keys: need at least {digits} bytes",
                self.key_size, self.keys
            ));
        }
        if self.value_size == 0 || self.value_size > dinomo_shared::entry::MAX_VALUE_LEN {
            return Err(format!(
                "--value-size {} is outside 1..={}",
                self.value_size,
                dinomo_shared::entry::MAX_VALUE_LEN
            ));
        }
        if let Distribution::Zipf(t) = self.dist {
            if !(t > 0.0 && t < 1.0) {
                return Err(format!("--zipf {t} is outside (0, 1)"));
            }
        }
        if self.ops == 0 && self.duration.is_none() {
            return Err("--ops must be at least 1 (or give --duration)".into());
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err("--duration must be positive".into());
        }
        for (what, v) in [
            ("--model-threads-per-kn", self.model_threads_per_kn),
            ("--kn-cores", self.kn_cores),
        ] {
            if let Some(v) = v.filter(|&v| v == 0 || v > 1024) {
                return Err(format!("{what} {v} is outside 1..=1024"));
            }
        }
        if self.clients == 0 || self.clients > 4096 {
            return Err(format!("--clients {} is outside 1..=4096", self.clients));
        }
        match self.cache {
            CacheSize::Ratio(r) if !(0.0..=1.0).contains(&r) => {
                return Err(format!("--cache-ratio {r} is outside [0, 1]"));
            }
            _ => {}
        }
        if let Some(s) = &self.shift {
            if self.system == System::Clover {
                return Err("--shift needs per-shard caches: --system dinomo or dinomo-n".into());
            }
            if self.workload == Workload::InsertHeavy {
                return Err(
                    "--shift takes read-only, read-mostly or write-heavy (inserts do not move)"
                        .into(),
                );
            }
            if self.duration.is_some() {
                return Err("--shift counts operations: give --ops, not --duration".into());
            }
            if s.kind == workload::ShiftKind::Latest && self.dist == Distribution::Uniform {
                return Err("--shift-kind latest needs --dist zipf".into());
            }
            s.validate(self.ops, self.keys)?;
        }
        Ok(())
    }

    /// The key chooser of a moving run (`None` for a steady one).
    pub fn shifted_chooser(&self) -> Result<Option<ShiftedChooser>, String> {
        self.shift
            .map(|s| ShiftedChooser::new(self.dist, self.keys, s.kind, s.by, s.phases(self.ops)))
            .transpose()
    }

    /// Worker threads per KN in the model.
    pub fn model_threads(&self) -> u16 {
        self.model_threads_per_kn.unwrap_or(self.threads_per_kn)
    }

    /// Cores per KN in the model.
    pub fn model_kn_cores(&self) -> u16 {
        self.kn_cores.unwrap_or(self.model_threads())
    }

    /// Loaded key + value bytes.
    pub fn data_bytes(&self) -> u64 {
        self.keys * (self.key_size + self.value_size) as u64
    }

    /// Cache bytes per KN.
    pub fn cache_per_kn(&self) -> u64 {
        match self.cache {
            CacheSize::Ratio(r) => (self.data_bytes() as f64 * r / self.kns as f64) as u64,
            CacheSize::PerKn(b) => b,
        }
    }

    fn region_bytes(&self) -> u64 {
        let entry = padded_len(self.key_size, self.value_size) as u64;
        let writes = match self.duration {
            // A timed run cannot know its writes in advance: assume 2M operations.
            Some(_) => 2_000_000,
            None => self.ops + self.warmup_ops,
        };
        let writes = (writes as f64 * (1.0 - self.workload.read_fraction())) as u64;
        // Blocks holding any live entry are not reclaimed until compaction exists, so the
        // region holds the loaded data plus every write of the run, with a quarter to spare,
        // plus metadata and two blocks per shard. Memory is touched only where written.
        let shards = self.kns as u64 * self.threads_per_kn as u64;
        let data = (self.keys + writes) * entry;
        (data + data / 4 + (64 << 20) + shards * (16 << 20)).next_multiple_of(1 << 20)
    }
}

/// Hit ratios by case, as fractions of reads.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Hits {
    pub value: f64,
    pub shortcut: f64,
    pub local: f64,
    pub miss: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub mean: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Modeled {
    pub nic: String,
    pub throughput_ops: Option<f64>,
    pub bottleneck: String,
    pub note: &'static str,
    /// Every ceiling of the model, in ops/s (null: does not limit).
    pub bounds: model::Bounds,
    /// Worker threads per KN of the KN-latency ceiling.
    pub threads_per_kn: u16,
    /// Cores per KN of the KN CPU ceiling.
    pub kn_cores: u16,
    /// The run's operations by path (fractions), weighting the KN CPU term.
    pub mix: model::PathMix,
    /// KN CPU per operation by path, measured on this machine (null: no KN CPU term).
    pub kn_cpu: Option<kn_cpu::KnCpuCalibration>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CacheReport {
    pub policy: String,
    pub bytes_per_kn: u64,
    pub values: u64,
    pub shortcuts: u64,
    pub value_bytes: u64,
    pub shortcut_bytes: u64,
    pub promotions: u64,
    pub demotions: u64,
    pub evictions: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Batching {
    pub flushes: u64,
    pub entries_per_flush: f64,
    pub batch_limit_entries: u64,
    pub batch_limit_bytes: u64,
}

/// The result of one run. Field names are a contract (more may be added).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BenchResult {
    pub system: &'static str,
    pub kns: u16,
    pub threads_per_kn: u16,
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
    pub elapsed_s: f64,
    /// Measured here, on this machine, in one process.
    pub throughput_ops: f64,
    pub rts_per_op: f64,
    pub read_rts_per_read: f64,
    pub write_rts_per_write: f64,
    pub bytes_per_op: f64,
    pub verbs_per_op: f64,
    pub hit: Hits,
    pub latency_us: Latency,
    pub modeled: Modeled,
    /// RTs per operation of the best static split of the same cache budget between values
    /// and shortcuts for this workload's key popularity (reads), plus the measured write RTs.
    /// The popularity is the exact one of the bench's key chooser (scrambling included).
    pub oracle_rts_per_op: f64,
    pub oracle_values: u64,
    pub oracle_shortcuts: u64,
    /// The same with every shard's own budget split over its own keys only (the keys the
    /// cluster map and the shard function give it), summed: the bar a per-shard cache
    /// really faces, never below the global one. Null where caches are not per shard
    /// (Clover).
    pub oracle_per_shard_rts_per_op: Option<f64>,
    pub oracle_per_shard_values: Option<u64>,
    pub oracle_per_shard_shortcuts: Option<u64>,
    pub cache: CacheReport,
    pub batching: Batching,
    pub nic_injected: String,
    pub seed: u64,
    /// Metadata-server requests per operation (Clover; each is also one of `rts_per_op`).
    pub ms_requests_per_op: f64,
    /// Measured CPU time of the metadata server per request it served, in µs (this machine).
    pub ms_us_per_request: Option<f64>,
    /// Version-chain hops per operation (Clover: stale shortcuts and lost CAS races).
    pub chain_hops_per_op: f64,
    pub cas_failures_per_op: f64,
    pub warmup: WarmupReport,
    /// A moving workload (`--shift`): every phase and window; absent for a steady run. The
    /// run's oracle fields are then those of the whole run's popularity (every phase's,
    /// weighted by its operations): the bar of a static cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving: Option<moving::MovingReport>,
}

/// The warm-up a steady run had.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WarmupReport {
    /// Operations run.
    pub ops: u64,
    /// `--warmup auto`: whether the RTs per operation settled (false: it stopped at its
    /// cap); null for a fixed warm-up.
    pub settled: Option<bool>,
    /// Its rounds in order (one for a fixed warm-up; none for a moving run's).
    pub rounds: Vec<WarmupRound>,
}

/// One round of a warm-up.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WarmupRound {
    pub ops: u64,
    pub rts_per_op: f64,
}

struct ClientOut {
    latency_ns: Histogram,
    reads: u64,
    writes: u64,
}

fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    b.set_style(style);
    b.set_prefix(what.to_owned());
    b
}

/// What a benchmark drives: a running system and its clients.
trait Target: Sync {
    type C: Ops + Send;
    fn client(&self, id: usize) -> Self::C;
    fn counters(&self) -> Counters;
    /// Brings the system to a merged, quiet state after loading.
    fn settle(&self) -> anyhow::Result<()>;
}

/// The operations a benchmark client issues.
trait Ops {
    fn get(&mut self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>>;
    fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()>;
}

/// Counters of any system: KN-side ones in DINOMO's shape plus the metadata server's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub kn: ShardStats,
    /// Requests KNs sent to a metadata server (Clover), one round trip each.
    pub ms_requests: u64,
    /// CPU time the metadata server spent serving them (measured).
    pub ms_cpu_ns: u64,
    /// Requests the metadata server served (including those sent when loading).
    pub ms_served: u64,
    pub chain_hops: u64,
    pub cas_failures: u64,
}

impl Counters {
    /// Round trips of every kind: the fabric's, and Clover's metadata-server requests.
    fn round_trips(&self) -> u64 {
        self.kn.fabric.round_trips + self.ms_requests
    }

    fn since(&self, e: &Self) -> Self {
        Self {
            kn: self.kn.since(&e.kn),
            ms_requests: self.ms_requests - e.ms_requests,
            ms_cpu_ns: self.ms_cpu_ns - e.ms_cpu_ns,
            ms_served: self.ms_served - e.ms_served,
            chain_hops: self.chain_hops - e.chain_hops,
            cas_failures: self.cas_failures - e.cas_failures,
        }
    }
}

impl Target for Cluster {
    type C = host_kn::Client;
    fn client(&self, _: usize) -> Self::C {
        Cluster::client(self)
    }
    fn counters(&self) -> Counters {
        Counters {
            kn: self.stats(),
            ..Counters::default()
        }
    }
    fn settle(&self) -> anyhow::Result<()> {
        Ok(self.sync()?)
    }
}

impl Ops for host_kn::Client {
    fn get(&mut self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(host_kn::Client::get(self, key)?)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        Ok(host_kn::Client::put(self, key, value)?)
    }
}

impl Target for DinomoN {
    type C = DinomoNClient;
    fn client(&self, _: usize) -> Self::C {
        DinomoN::client(self)
    }
    fn counters(&self) -> Counters {
        Counters {
            kn: self.stats(),
            ..Counters::default()
        }
    }
    fn settle(&self) -> anyhow::Result<()> {
        Ok(self.sync()?)
    }
}

impl Ops for DinomoNClient {
    fn get(&mut self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(DinomoNClient::get(self, key)?)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        Ok(DinomoNClient::put(self, key, value)?)
    }
}

impl Target for Arc<CloverCluster> {
    type C = CloverClient;
    fn client(&self, id: usize) -> Self::C {
        CloverCluster::client(self, id)
    }
    fn counters(&self) -> Counters {
        let s = self.stats();
        Counters {
            kn: s.kn,
            ms_requests: s.ms_requests,
            ms_cpu_ns: s.ms.cpu_ns,
            ms_served: s.ms.requests,
            chain_hops: s.chain_hops,
            cas_failures: s.cas_failures,
        }
    }
    fn settle(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

impl Ops for CloverClient {
    fn get(&mut self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(CloverClient::get(self, key)?)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        Ok(CloverClient::put(self, key, value)?)
    }
}

/// Log block size of a run's region: the region's default (8 MiB, or smaller so that there
/// are at least 64 blocks), halved until there are 64 + 16 blocks per shard (down to
/// 64 KiB), so that many shards on a small region do not run out of log blocks.
fn bench_block_size(region: u64, shards: u64) -> u64 {
    let mut b = dinomo_shared::geometry::FormatParams::for_size(region).block_size;
    while b > (64 << 10) && region / b < 64 + 16 * shards {
        b /= 2;
    }
    b
}

/// The in-process cluster of a run (DINOMO and DINOMO-N).
fn cluster_config(cfg: &BenchConfig) -> ClusterConfig {
    ClusterConfig {
        kns: cfg.kns,
        shards_per_kn: cfg.threads_per_kn,
        region_bytes: cfg.region_bytes(),
        block_size: Some(bench_block_size(
            cfg.region_bytes(),
            cfg.kns as u64 * cfg.threads_per_kn as u64,
        )),
        dpm_workers: cfg.dpm_workers,
        cache_bytes_per_kn: cfg.cache_per_kn(),
        policy: cfg.policy,
        nic: cfg.nic,
        ..ClusterConfig::default()
    }
}

/// The Clover cluster of a run.
fn clover_config(cfg: &BenchConfig) -> CloverConfig {
    // Live versions, plus the versions a run writes before reclamation catches up.
    CloverConfig {
        kns: cfg.kns,
        lanes_per_kn: cfg.threads_per_kn,
        max_key: cfg.key_size,
        max_value: cfg.value_size,
        slots: cfg.keys + cfg.keys / 4,
        cache_bytes_per_kn: cfg.cache_per_kn(),
        nic: cfg.nic,
    }
}

/// Runs one benchmark (calibrating the KN CPU term first when asked to).
pub fn run(cfg: &BenchConfig) -> anyhow::Result<BenchResult> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    if cfg.kn_cpu == KnCpuSetting::Calibrate {
        let cal = kn_cpu::calibrate(cfg)?;
        return run(&BenchConfig {
            kn_cpu: KnCpuSetting::Use(cal),
            ..cfg.clone()
        });
    }
    let cluster_cfg = cluster_config(cfg);
    let check_value = |max: usize| {
        if cfg.value_size > max {
            anyhow::bail!(
                "--value-size {} exceeds the largest value this region accepts ({max})",
                cfg.value_size
            );
        }
        Ok(())
    };
    let chooser = cfg.shifted_chooser().map_err(anyhow::Error::msg)?;
    let ch = chooser.as_ref();
    let (dr, map) = match cfg.system {
        System::Dinomo => {
            let c = Cluster::start(&cluster_cfg)?;
            check_value(c.max_value())?;
            let dr = drive(&c, cfg, ch)?;
            let map = c.router().map();
            c.stop();
            (dr, Some(map))
        }
        System::DinomoN => {
            let c = DinomoN::start(&cluster_cfg)?;
            check_value(c.max_value())?;
            let dr = drive(&c, cfg, ch)?;
            // A stored key's hash tag keeps the user key's slot, so shards are the same.
            let map = c.cluster().router().map();
            c.stop();
            (dr, Some(map))
        }
        System::Clover => {
            let c = Arc::new(CloverCluster::start(&clover_config(cfg))?);
            let dr = drive(&c, cfg, ch)?;
            drop(c);
            (dr, None)
        }
    };
    let map = map.as_deref();
    let key_p = match (cfg.shift, ch) {
        (Some(s), Some(ch)) => moving::run_popularity(&s, ch, cfg.ops),
        _ => KeyChooser::new(cfg.dist, cfg.keys).key_probabilities(),
    };
    let mut r = report(cfg, &dr, map, key_p);
    if let (Some(s), Some(ch)) = (cfg.shift, ch) {
        r.moving = Some(moving::report(
            cfg,
            &s,
            ch,
            &dr.windows,
            map,
            cache_costs(cfg),
            miss_cost(&dr.delta.kn),
        ));
    }
    Ok(r)
}

/// What [`drive`] measured.
struct Driven {
    /// Counters of the measurement.
    delta: Counters,
    /// Counters at its end.
    now: Counters,
    /// What every client did.
    outs: Vec<ClientOut>,
    elapsed: Duration,
    /// A moving run's windows (empty for a steady one).
    windows: Vec<moving::WindowCounts>,
    warmup: WarmupReport,
}

/// Loads, warms up and measures (a moving run with `chooser`, in windows).
fn drive<T: Target>(
    sys: &T,
    cfg: &BenchConfig,
    chooser: Option<&ShiftedChooser>,
) -> anyhow::Result<Driven> {
    load(sys, cfg)?;
    sys.settle()?;
    let warm_seed = cfg.seed ^ 0x5741_524D;
    if let (Some(shift), Some(ch)) = (cfg.shift, chooser) {
        // The warm-up runs phase 0's popularity, in one window.
        let warmup = WarmupReport {
            ops: cfg.warmup_ops,
            settled: None,
            rounds: Vec::new(),
        };
        if cfg.warmup_ops > 0 {
            let w = moving::Window {
                start: 0,
                end: cfg.warmup_ops,
                phase: 0,
            };
            moving::drive_windows(sys, cfg, ch, &[w], "warm-up", warm_seed)?;
        }
        let plan = moving::plan(cfg.ops, shift.every, shift.window_ops());
        let before = sys.counters();
        let t0 = Instant::now();
        let (outs, windows) = moving::drive_windows(sys, cfg, ch, &plan, "run", cfg.seed)?;
        let elapsed = t0.elapsed();
        let now = sys.counters();
        return Ok(Driven {
            delta: now.since(&before),
            now,
            outs,
            elapsed,
            windows,
            warmup,
        });
    }
    let next_insert = Arc::new(AtomicU64::new(cfg.keys));
    let warmup = warm_up(sys, cfg, &next_insert, warm_seed)?;
    let before = sys.counters();
    let t0 = Instant::now();
    let outs = phase(
        sys,
        cfg,
        cfg.ops,
        cfg.duration,
        &next_insert,
        "run",
        cfg.seed,
    )?;
    let elapsed = t0.elapsed();
    let now = sys.counters();
    Ok(Driven {
        delta: now.since(&before),
        now,
        outs,
        elapsed,
        windows: Vec::new(),
        warmup,
    })
}

/// `--warmup auto`: a round of warm-up that lowers the RTs per operation by less than this
/// fraction against the round before it ends the warm-up.
pub const AUTO_WARMUP_SETTLED: f64 = 0.01;

/// `--warmup auto` runs at most this many operations.
pub const AUTO_WARMUP_MAX_OPS: u64 = 64_000_000;

/// Runs the warm-up of a steady run: `warmup_ops` operations, then, with `warmup_auto` on
/// a read-only run, rounds that double the warm-up so far until one lowers the RTs per
/// operation by less than [`AUTO_WARMUP_SETTLED`] against the round before, or the next
/// would take the warm-up past its cap ([`AUTO_WARMUP_MAX_OPS`] from the command line).
/// A cache that learns from counts needs many reads per key before it tells the keys near
/// its value/shortcut boundary apart (20 M reads of 100 000 Zipf keys,
/// docs/PERFORMANCE.md); a fixed warm-up short of that measures the learning, not the
/// policy. The rule looks only at the measured RTs, never at the workload's popularity,
/// and a read-only run writes nothing, so the region is sized as for a fixed warm-up.
fn warm_up<T: Target>(
    sys: &T,
    cfg: &BenchConfig,
    next_insert: &Arc<AtomicU64>,
    seed: u64,
) -> anyhow::Result<WarmupReport> {
    let cap = cfg
        .warmup_auto
        .filter(|_| cfg.workload == Workload::ReadOnly && cfg.warmup_ops > 0);
    let mut rep = WarmupReport {
        ops: 0,
        settled: cap.map(|_| false),
        rounds: Vec::new(),
    };
    let mut round = cfg.warmup_ops;
    while round > 0 {
        let before = sys.counters();
        let label = if rep.rounds.is_empty() {
            "warm-up".to_owned()
        } else {
            format!("warm-up {}", rep.rounds.len() + 1)
        };
        phase(
            sys,
            cfg,
            round,
            None,
            next_insert,
            &label,
            seed.wrapping_add(rep.rounds.len() as u64),
        )?;
        let d = sys.counters().since(&before);
        let rts = ratio(d.round_trips(), round);
        rep.ops += round;
        let prev = rep.rounds.last().map(|r| r.rts_per_op);
        rep.rounds.push(WarmupRound {
            ops: round,
            rts_per_op: rts,
        });
        let Some(cap) = cap else {
            break;
        };
        if prev.is_some_and(|p| rts >= p * (1.0 - AUTO_WARMUP_SETTLED)) {
            rep.settled = Some(true);
            break;
        }
        round = rep.ops;
        if rep.ops + round > cap {
            break;
        }
    }
    Ok(rep)
}

/// Runs `work(t, client)` on `clients` threads, each with client `t` of `sys`, and waits
/// for all of them; the first error is returned.
fn on_clients<T: Target>(
    sys: &T,
    clients: usize,
    what: &str,
    work: impl Fn(usize, &mut T::C) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = (0..clients)
            .map(|t| {
                let mut cl = sys.client(t);
                let work = &work;
                s.spawn(move || work(t, &mut cl))
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("a {what} thread panicked"))??;
        }
        Ok(())
    })
}

fn load<T: Target>(sys: &T, cfg: &BenchConfig) -> anyhow::Result<()> {
    let pb = bar(cfg.progress, cfg.keys, "load");
    let loaded = AtomicU64::new(0);
    on_clients(sys, cfg.clients, "load", |t, cl| {
        let mut key = vec![0u8; cfg.key_size];
        let mut val = vec![0u8; cfg.value_size];
        let mut id = t as u64;
        while id < cfg.keys {
            key_into(id, &mut key);
            value_into(id, 0, &mut val);
            cl.put(&key, &val)?;
            if loaded.fetch_add(1, Ordering::Relaxed) % 1024 == 0 {
                pb.set_position(loaded.load(Ordering::Relaxed));
            }
            id += cfg.clients as u64;
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(())
}

fn phase<T: Target>(
    sys: &T,
    cfg: &BenchConfig,
    ops: u64,
    duration: Option<Duration>,
    next_insert: &Arc<AtomicU64>,
    what: &str,
    seed: u64,
) -> anyhow::Result<Vec<ClientOut>> {
    let chooser = KeyChooser::new(cfg.dist, cfg.keys);
    let pb = match duration {
        Some(d) => bar(cfg.progress, d.as_secs().max(1), what),
        None => bar(cfg.progress, ops, what),
    };
    let done = AtomicU64::new(0);
    let deadline = duration.map(|d| Instant::now() + d);
    let started = Instant::now();
    let outs = std::thread::scope(|s| -> anyhow::Result<Vec<ClientOut>> {
        let hs: Vec<_> = (0..cfg.clients)
            .map(|t| {
                let mut cl = sys.client(t);
                let (pb, done, chooser) = (&pb, &done, &chooser);
                let share =
                    ops / cfg.clients as u64 + u64::from((t as u64) < ops % cfg.clients as u64);
                s.spawn(move || -> anyhow::Result<ClientOut> {
                    let mut rng = Rng::new(seed.wrapping_mul(0x100_0000_01B3) ^ t as u64);
                    let mut key = vec![0u8; cfg.key_size];
                    let mut val = vec![0u8; cfg.value_size];
                    let mut out = ClientOut {
                        latency_ns: histogram::new(),
                        reads: 0,
                        writes: 0,
                    };
                    let rf = cfg.workload.read_fraction();
                    let mut n = 0u64;
                    loop {
                        let over = match deadline {
                            Some(dl) => n % 64 == 0 && Instant::now() >= dl,
                            None => n >= share,
                        };
                        if over {
                            break;
                        }
                        let read = rf >= 1.0 || rng.next_f64() < rf;
                        let t0 = Instant::now();
                        if read {
                            key_into(chooser.next(&mut rng), &mut key);
                            cl.get(&key)?;
                            out.reads += 1;
                        } else {
                            let id = if cfg.workload == Workload::InsertHeavy {
                                next_insert.fetch_add(1, Ordering::Relaxed)
                            } else {
                                chooser.next(&mut rng)
                            };
                            key_into(id, &mut key);
                            value_into(id, rng.next_u64(), &mut val);
                            cl.put(&key, &val)?;
                            out.writes += 1;
                        }
                        histogram::record_ns(&mut out.latency_ns, t0.elapsed());
                        n += 1;
                        if n % 1024 == 0 {
                            let all = done.fetch_add(1024, Ordering::Relaxed) + 1024;
                            match duration {
                                Some(_) => pb.set_position(started.elapsed().as_secs()),
                                None => pb.set_position(all),
                            }
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
            })
            .collect()
    })?;
    pb.finish_and_clear();
    Ok(outs)
}

/// Nearest-rank percentiles and the mean of latencies in ns, in µs (all zero for none).
pub(crate) fn latency_us(h: &Histogram) -> Latency {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    Latency {
        p50: us(0.5),
        p99: us(0.99),
        p999: us(0.999),
        mean: h.mean() / 1e3,
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The static optimum of every shard's own budget (`budget` each) over its own keys: each
/// key goes to the shard the cluster would give it (key bytes → slot → owner in `map` →
/// `shard_of`), and the shards' expected RTs per read (over all reads) add up. Key ids
/// index `key_p`, in the bench's key format of `key_size` bytes.
pub fn per_shard_oracle(
    key_p: &[f64],
    key_size: usize,
    map: &SlotMap,
    kns: u16,
    shards_per_kn: u16,
    costs: (u64, u64, u64),
    miss_cost: f64,
) -> Oracle {
    let (value_charge, shortcut_charge, budget) = costs;
    let shards = shards_per_kn.max(1) as usize;
    let mut by_shard: Vec<Vec<f64>> = vec![Vec::new(); kns as usize * shards];
    let mut key = vec![0u8; key_size];
    for (id, &p) in key_p.iter().enumerate() {
        key_into(id as u64, &mut key);
        let slot = dinomo_shared::slot::key_slot(&key);
        let kn = map.owner(slot) as usize;
        if let Some(v) = by_shard.get_mut(kn * shards + shard_of(slot, shards)) {
            v.push(p);
        }
    }
    let mut sum = Oracle {
        values: 0,
        shortcuts: 0,
        rts_per_read: 0.0,
    };
    for mut p in by_shard {
        p.sort_unstable_by(|a, b| b.total_cmp(a));
        let o = oracle(&p, value_charge, shortcut_charge, budget, miss_cost);
        sum.values += o.values;
        sum.shortcuts += o.shortcuts;
        if o.rts_per_read.is_finite() {
            sum.rts_per_read += o.rts_per_read;
        }
    }
    sum
}

/// The miss cost the oracles use: the run's measured RTs per miss of a present key (at
/// least 1), or 2 (bucket, entry) if it had none.
fn miss_cost(d: &ShardStats) -> f64 {
    if d.miss > d.absent {
        ratio(d.miss_rts, d.miss).max(1.0)
    } else {
        2.0
    }
}

/// Value charge, shortcut charge, the whole cache and one shard's part of it, as the
/// oracles count them. Each shard's DAC gets an equal part of its KN's cache
/// (`Cluster::launch_kn`).
fn cache_costs(cfg: &BenchConfig) -> moving::Costs {
    let dac = DacConfig::default();
    (
        dac.value_charge(cfg.key_size, cfg.value_size),
        dac.shortcut_bytes(),
        cfg.cache_per_kn() * cfg.kns as u64,
        cfg.cache_per_kn() / cfg.threads_per_kn.max(1) as u64,
    )
}

fn report(cfg: &BenchConfig, dr: &Driven, map: Option<&SlotMap>, key_p: Vec<f64>) -> BenchResult {
    let (dc, elapsed) = (&dr.delta, dr.elapsed);
    let (d, now) = (&dc.kn, &dr.now.kn);
    let reads: u64 = dr.outs.iter().map(|o| o.reads).sum();
    let writes: u64 = dr.outs.iter().map(|o| o.writes).sum();
    let ops = reads + writes;
    let mut lat = histogram::new();
    for o in &dr.outs {
        histogram::merge(&mut lat, &o.latency_ns);
    }
    let verbs_per_op = ratio(d.fabric.verbs(), ops);
    let bytes_per_op = ratio(d.fabric.read_bytes + d.fabric.write_bytes, ops);
    let rts_per_op = ratio(dc.round_trips(), ops);
    let ms_requests_per_op = ratio(dc.ms_requests, ops);
    let ms_us_per_request =
        (dc.ms_served > 0).then(|| dc.ms_cpu_ns as f64 / dc.ms_served as f64 / 1e3);
    let paths = kn_cpu::path_counts(d);
    let mix = model::PathMix {
        value_hit: ratio(paths[0], ops),
        shortcut_hit: ratio(paths[1], ops),
        miss: ratio(paths[2], ops),
        write: ratio(paths[3], ops),
    };
    let cal = match &cfg.kn_cpu {
        KnCpuSetting::Use(c) => Some(c.clone()),
        KnCpuSetting::Off | KnCpuSetting::Calibrate => None,
    };
    let (tput, bottleneck, bounds) = model::model(&model::ModelInput {
        nic: cfg.model_nic,
        kns: cfg.kns,
        threads_per_kn: cfg.model_threads(),
        kn_cores: cfg.model_kn_cores(),
        kn_cpu: cal.as_ref().map(|c| c.ns()),
        mix,
        verbs_per_op,
        bytes_per_op,
        rts_per_op,
        ms_requests_per_op,
        ms_us_per_request,
    });
    let write_rts_per_write = ratio(d.write_rts, writes);
    // The oracle: the best static split of the whole cache between values and shortcuts.
    let miss_cost = miss_cost(d);
    let (value_charge, shortcut_charge, total_cache, shard_budget) = cache_costs(cfg);
    let mut popularity = key_p.clone();
    popularity.sort_unstable_by(|a, b| b.total_cmp(a));
    let o = oracle(
        &popularity,
        value_charge,
        shortcut_charge,
        total_cache,
        miss_cost,
    );
    let os = map.map(|m| {
        per_shard_oracle(
            &key_p,
            cfg.key_size,
            m,
            cfg.kns,
            cfg.threads_per_kn,
            (value_charge, shortcut_charge, shard_budget),
            miss_cost,
        )
    });
    let rf = ratio(reads, ops);
    BenchResult {
        system: cfg.system.name(),
        kns: cfg.kns,
        threads_per_kn: cfg.threads_per_kn,
        clients: cfg.clients,
        workload: cfg.workload.name().into(),
        dist: match cfg.dist {
            Distribution::Uniform => "uniform",
            Distribution::Zipf(_) => "zipf",
        },
        zipf: match cfg.dist {
            Distribution::Zipf(t) => Some(t),
            Distribution::Uniform => None,
        },
        keys: cfg.keys,
        key_size: cfg.key_size,
        value_size: cfg.value_size,
        ops,
        reads,
        writes,
        elapsed_s: elapsed.as_secs_f64(),
        throughput_ops: ratio(ops, 1) / elapsed.as_secs_f64().max(1e-9),
        rts_per_op,
        read_rts_per_read: ratio(d.read_rts, reads),
        write_rts_per_write,
        bytes_per_op,
        verbs_per_op,
        hit: Hits {
            value: ratio(d.hit_value, d.gets),
            shortcut: ratio(d.hit_shortcut, d.gets),
            local: ratio(d.hit_local, d.gets),
            miss: ratio(d.miss, d.gets),
        },
        latency_us: latency_us(&lat),
        modeled: Modeled {
            nic: cfg.model_nic.to_string(),
            throughput_ops: tput.is_finite().then_some(tput),
            bottleneck: bottleneck.into(),
            note: "least of: memory-node NIC message rate / verbs per op, its bandwidth / bytes per op, KNs x threads / (RTs per op x RT latency), metadata-server capacity / MS requests per op, KNs x cores / KN CPU ns per op (docs/MODEL.md)",
            bounds,
            threads_per_kn: cfg.model_threads(),
            kn_cores: cfg.model_kn_cores(),
            mix,
            kn_cpu: cal,
        },
        ms_requests_per_op,
        ms_us_per_request,
        chain_hops_per_op: ratio(dc.chain_hops, ops),
        cas_failures_per_op: ratio(dc.cas_failures, ops),
        warmup: dr.warmup.clone(),
        moving: None,
        oracle_rts_per_op: rf * o.rts_per_read + (1.0 - rf) * write_rts_per_write,
        oracle_values: o.values,
        oracle_shortcuts: o.shortcuts,
        oracle_per_shard_rts_per_op: os
            .map(|o| rf * o.rts_per_read + (1.0 - rf) * write_rts_per_write),
        oracle_per_shard_values: os.map(|o| o.values),
        oracle_per_shard_shortcuts: os.map(|o| o.shortcuts),
        cache: CacheReport {
            policy: match cfg.system {
                System::Clover => "shortcut-only (LRU, Clover)".into(),
                System::Dinomo | System::DinomoN => cfg.policy.to_string(),
            },
            bytes_per_kn: cfg.cache_per_kn(),
            values: now.cache.values,
            shortcuts: now.cache.shortcuts,
            value_bytes: now.cache.value_bytes,
            shortcut_bytes: now.cache.shortcut_bytes,
            promotions: d.cache.promotions,
            demotions: d.cache.demotions,
            evictions: d.cache.evictions,
        },
        batching: Batching {
            flushes: d.flushes,
            entries_per_flush: ratio(d.flushed_entries, d.flushes),
            batch_limit_entries: ClusterConfig::default().batch_entries,
            batch_limit_bytes: ClusterConfig::default().batch_bytes as u64,
        },
        nic_injected: cfg.nic.to_string(),
        seed: cfg.seed,
    }
}

/// A human-readable summary.
pub fn render(r: &BenchResult) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let dist = match r.zipf {
        Some(t) => format!("zipf {t}"),
        None => "uniform".into(),
    };
    let _ = writeln!(
        s,
        "{} | {} KNs x {} shards | {} clients | {} | {} | {} keys of {} B, values {} B",
        r.system,
        r.kns,
        r.threads_per_kn,
        r.clients,
        r.workload,
        dist,
        r.keys,
        r.key_size,
        r.value_size
    );
    let _ = writeln!(
        s,
        "measured   {:>12.0} ops/s   {} ops in {:.2} s (in-process, this machine)",
        r.throughput_ops, r.ops, r.elapsed_s
    );
    if r.warmup.ops > 0 {
        let how = match r.warmup.settled {
            None => "fixed".to_owned(),
            Some(true) => "auto: the RTs/op settled".to_owned(),
            Some(false) => "auto: stopped at its cap before the RTs/op settled".to_owned(),
        };
        let rounds: Vec<String> = r
            .warmup
            .rounds
            .iter()
            .map(|w| format!("{:.3}", w.rts_per_op))
            .collect();
        let _ = write!(s, "warm-up    {} ops ({how})", r.warmup.ops);
        let _ = if rounds.len() > 1 {
            writeln!(s, "   RTs/op by round {}", rounds.join(" "))
        } else {
            writeln!(s)
        };
    }
    let _ = writeln!(
        s,
        "latency    p50 {:.1} us   p99 {:.1} us   p99.9 {:.1} us   mean {:.1} us",
        r.latency_us.p50, r.latency_us.p99, r.latency_us.p999, r.latency_us.mean
    );
    let _ = writeln!(
        s,
        "fabric     {:.3} RTs/op ({:.3} per read, {:.3} per write)   {:.2} verbs/op   {:.0} B/op",
        r.rts_per_op, r.read_rts_per_read, r.write_rts_per_write, r.verbs_per_op, r.bytes_per_op
    );
    let _ = writeln!(
        s,
        "reads      value {:.1}%   shortcut {:.1}%   local {:.1}%   miss {:.1}%",
        r.hit.value * 100.0,
        r.hit.shortcut * 100.0,
        r.hit.local * 100.0,
        r.hit.miss * 100.0
    );
    let _ = writeln!(s, "cache      {} ({} per KN): {} values, {} shortcuts   oracle {:.3} RTs/op ({} values, {} shortcuts)", r.cache.policy, crate::size::human(r.cache.bytes_per_kn), r.cache.values, r.cache.shortcuts, r.oracle_rts_per_op, r.oracle_values, r.oracle_shortcuts);
    if let (Some(o), Some(v), Some(sc)) = (
        r.oracle_per_shard_rts_per_op,
        r.oracle_per_shard_values,
        r.oracle_per_shard_shortcuts,
    ) {
        let _ = writeln!(
            s,
            "           per-shard oracle {o:.3} RTs/op ({v} values, {sc} shortcuts; each shard's budget over its own keys)"
        );
    }
    if r.writes > 0 && r.batching.flushes > 0 {
        let _ = writeln!(
            s,
            "batching   {} flushes, {:.1} entries per flush (limits {} entries / {})",
            r.batching.flushes,
            r.batching.entries_per_flush,
            r.batching.batch_limit_entries,
            crate::size::human(r.batching.batch_limit_bytes)
        );
    }
    if r.ms_requests_per_op > 0.0 || r.chain_hops_per_op > 0.0 {
        let _ = writeln!(
            s,
            "clover     {:.4} MS requests/op ({:.2} us MS CPU each, measured)   {:.4} chain hops/op   {:.4} CAS failures/op",
            r.ms_requests_per_op,
            r.ms_us_per_request.unwrap_or(0.0),
            r.chain_hops_per_op,
            r.cas_failures_per_op
        );
    }
    if let Some(c) = &r.modeled.kn_cpu {
        let us = |x: Option<f64>| match x {
            Some(ns) => format!("{:.2} us", ns / 1e3),
            None => "-".into(),
        };
        let _ = writeln!(
            s,
            "kn cpu     value hit {}   shortcut hit {}   miss {}   write {} ({}, this machine)",
            us(c.value_hit_ns),
            us(c.shortcut_hit_ns),
            us(c.miss_ns),
            us(c.write_ns),
            c.source
        );
        if let (Some(ns), Some(b)) = (r.modeled.bounds.kn_cpu_ns_per_op, r.modeled.bounds.kn_cpu) {
            let _ = writeln!(
                s,
                "           {:.2} us per op at this mix: {} KNs x {} cores allow {:.0} ops/s",
                ns / 1e3,
                r.kns,
                r.modeled.kn_cores,
                b
            );
        }
    }
    match r.modeled.throughput_ops {
        Some(t) => {
            let _ = writeln!(
                s,
                "modelled   {:>12.0} ops/s on {} (bottleneck: {})",
                t, r.modeled.nic, r.modeled.bottleneck
            );
        }
        None => {
            let _ = writeln!(s, "modelled   unbounded on {}", r.modeled.nic);
        }
    }
    if let Some(m) = &r.moving {
        s.push_str(&moving::render(m));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_figures_are_microseconds_of_the_nearest_rank() {
        let mut h = histogram::new();
        for us in 1..=100 {
            histogram::record_ns(&mut h, Duration::from_micros(us));
        }
        let l = latency_us(&h);
        let near = |got: f64, want: f64| (got - want).abs() <= want / 1000.0;
        assert!(near(l.p50, 50.0), "{l:?}");
        assert!(near(l.p99, 99.0), "{l:?}");
        assert!(near(l.p999, 100.0), "{l:?}");
        assert!(near(l.mean, 50.5), "{l:?}");
        assert_eq!(latency_us(&histogram::new()), Latency::default());
    }

    #[test]
    fn per_shard_oracle_is_the_global_one_for_one_shard_and_above_it_otherwise() {
        let k = KeyChooser::new(Distribution::Zipf(0.99), 5_000);
        let key_p = k.key_probabilities();
        let sorted = k.popularity();
        let dac = DacConfig::default();
        let (vc, sc) = (dac.value_charge(8, 1024), dac.shortcut_bytes());
        let budget = 200 * vc;
        let one = SlotMap::consistent(1, &[0], host_kn::ownership::DEFAULT_VNODES);
        let g = oracle(&sorted, vc, sc, budget, 2.0);
        let s = per_shard_oracle(&key_p, 8, &one, 1, 1, (vc, sc, budget), 2.0);
        assert_eq!((s.values, s.shortcuts), (g.values, g.shortcuts));
        assert!((s.rts_per_read - g.rts_per_read).abs() < 1e-12);
        let four = SlotMap::consistent(1, &[0, 1], host_kn::ownership::DEFAULT_VNODES);
        let s4 = per_shard_oracle(&key_p, 8, &four, 2, 2, (vc, sc, budget / 4), 2.0);
        assert!(s4.rts_per_read >= g.rts_per_read - 1e-12, "{s4:?} vs {g:?}");
        // Four shards' hottest keys are not the global hottest keys cut in four.
        assert!(s4.rts_per_read > g.rts_per_read, "{s4:?} vs {g:?}");
    }

    /// `--warmup auto` doubles the warm-up while a round lowers the RTs per operation by at
    /// least 1% and stops at the first round that does not (or at its cap); a run with
    /// writes keeps its fixed warm-up.
    #[test]
    fn an_auto_warmup_doubles_until_the_rts_settle() {
        let cfg = BenchConfig {
            kns: 1,
            threads_per_kn: 2,
            workload: Workload::ReadOnly,
            dist: Distribution::Zipf(0.99),
            keys: 4_000,
            ops: 20_000,
            warmup_ops: 5_000,
            warmup_auto: Some(640_000),
            clients: 2,
            cache: CacheSize::Ratio(0.2),
            kn_cpu: KnCpuSetting::Off,
            progress: false,
            ..BenchConfig::default()
        };
        let w = run(&cfg).expect("bench run").warmup;
        let rounds = &w.rounds;
        assert!(rounds.len() >= 2, "{w:?}");
        assert_eq!(rounds[0].ops, 5_000, "{w:?}");
        let mut total = 0;
        for (i, r) in rounds.iter().enumerate() {
            if i > 0 {
                assert_eq!(r.ops, total, "round {i} doubles the warm-up: {w:?}");
            }
            total += r.ops;
        }
        assert_eq!(w.ops, total, "{w:?}");
        assert!(w.ops <= 640_000, "{w:?}");
        let settled = |i: usize| rounds[i].rts_per_op >= rounds[i - 1].rts_per_op * 0.99;
        for i in 1..rounds.len() - 1 {
            assert!(
                !settled(i),
                "round {i} had settled but the warm-up went on: {w:?}"
            );
        }
        match w.settled {
            Some(true) => assert!(settled(rounds.len() - 1), "{w:?}"),
            Some(false) => assert!(2 * w.ops > 640_000, "{w:?}"),
            None => panic!("an auto warm-up reports whether it settled: {w:?}"),
        }
        // A cold cache of a fifth of the data costs more than the warm one it becomes.
        assert!(
            rounds[0].rts_per_op > rounds[rounds.len() - 1].rts_per_op,
            "{w:?}"
        );

        let mixed = run(&BenchConfig {
            workload: Workload::ReadMostly,
            ..cfg
        })
        .expect("bench run")
        .warmup;
        assert_eq!((mixed.ops, mixed.settled), (5_000, None), "{mixed:?}");
        assert_eq!(mixed.rounds.len(), 1, "{mixed:?}");
    }

    /// No cache policy can beat the static optimum of its own budget over its own keys in
    /// expectation (the keys are drawn independently, so the best a cache can do is hold the
    /// most popular ones statically): DAC's measured RTs per read must not be below the
    /// per-shard oracle by more than the sampling noise of the measured stream.
    #[test]
    fn dac_is_not_below_the_oracle() {
        let cfg = BenchConfig {
            kns: 2,
            threads_per_kn: 2,
            workload: Workload::ReadOnly,
            dist: Distribution::Zipf(0.99),
            keys: 10_000,
            ops: 300_000,
            warmup_ops: 100_000,
            clients: 2,
            cache: CacheSize::Ratio(0.05),
            kn_cpu: KnCpuSetting::Off,
            progress: false,
            ..BenchConfig::default()
        };
        let r = run(&cfg).expect("bench run");
        assert_eq!(r.reads, 300_000);
        let global = r.oracle_rts_per_op;
        let shard = r.oracle_per_shard_rts_per_op.expect("per-shard oracle");
        // Splitting one budget into per-shard parts can only cost more.
        assert!(
            global <= shard + 1e-12,
            "global {global} > per shard {shard}"
        );
        assert!(global > 0.0, "the cache does not hold every key: {global}");
        // Noise: a read costs c in [0, m] RTs (m the miss cost: 2, plus overflow buckets;
        // 2.04 measured with no cache, 3 taken here), so its
        // variance is at most E[c²] ≤ m·E[c]; the mean of N reads of the static optimum thus
        // has a standard error of at most sqrt(m·oracle/N) (about 0.001 here). Five of
        // them: a false failure is below 1e-6 for the static split, and an adaptive cache
        // that fits the sampled stream gains on it only through those same fluctuations.
        let m = 3.0;
        let margin = 5.0 * (m * shard / r.reads as f64).sqrt();
        eprintln!(
            "DAC {} RTs/read, per-shard oracle {shard}, global {global}, margin {margin}",
            r.read_rts_per_read
        );
        assert!(
            r.read_rts_per_read >= shard - margin,
            "DAC {} below the per-shard oracle {shard} - {margin} (global {global})",
            r.read_rts_per_read
        );
        // And DAC is a useful cache at all: far below every read missing.
        assert!(r.read_rts_per_read < 1.0, "{}", r.read_rts_per_read);
    }
}
