//! Arguments of `dinomo bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use dinomo_hw::fabric::nic::NicProfile;
use host_kn::dac::CachePolicy;

use super::elastic::load::LoadShape;
use super::elastic::schedule::Schedule;
use super::elastic::ElasticConfig;
use super::kn_cpu::{parse_ns, KnCpuCalibration};
use super::moving::Shift;
use super::sweep::{Preset, SweepConfig};
use super::workload::{Distribution, ShiftKind, Workload};
use super::{BenchConfig, CacheSize, KnCpuSetting, System};
use dinomo_manager::policy::PolicyConfig;

/// Distribution names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DistArg {
    Zipf,
    Uniform,
}

/// `--warmup`: a number of operations, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarmupArg {
    Ops(u64),
    Auto,
}

fn parse_warmup(s: &str) -> Result<WarmupArg, String> {
    if s == "auto" {
        return Ok(WarmupArg::Auto);
    }
    s.parse()
        .map(WarmupArg::Ops)
        .map_err(|_| format!("`{s}` is neither a number of operations nor `auto`"))
}

/// `dinomo bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// dinomo, clover (shared-everything baseline) or dinomo-n (shared-nothing baseline).
    #[arg(long, default_value = "dinomo")]
    pub system: System,
    /// KVS nodes; with --sweep a comma-separated list (e.g. 1,2,4,8,16); with --scenario
    /// the KNs it starts with [default: 2; 1 with --scenario elastic].
    #[arg(long)]
    pub kns: Option<String>,
    /// Shards (worker threads) per KN.
    #[arg(long, default_value_t = 2)]
    pub threads_per_kn: u16,
    /// read-only (100/0), read-mostly (95/5), write-heavy (50/50 reads/updates) or
    /// insert-heavy (50/50 reads/inserts of new keys) [default: read-mostly; write-heavy
    /// with --scenario elastic].
    #[arg(long)]
    pub workload: Option<Workload>,
    /// Key popularity.
    #[arg(long, value_enum, default_value_t = DistArg::Zipf)]
    pub dist: DistArg,
    /// Zipf skew (YCSB scrambled Zipfian), in (0, 1) [default: 0.99; 0.5 with --scenario
    /// elastic].
    #[arg(long, allow_negative_numbers = true)]
    pub zipf: Option<f64>,
    /// Keys loaded before the run.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub value_size: usize,
    /// Measured operations.
    #[arg(long, default_value_t = 1_000_000)]
    pub ops: u64,
    /// Run for this many seconds instead of a number of operations.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Unmeasured operations before the measurement: a number, or `auto`: a fifth of
    /// --ops, then (read-only runs only) doubling while a round lowers the RTs per
    /// operation by 1% or more, up to 64 M operations, so that the cache is measured at
    /// its steady state [default: auto; a fifth of --ops with --target or --shift].
    #[arg(long, value_parser = parse_warmup)]
    pub warmup: Option<WarmupArg>,
    /// Closed-loop client threads.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Total KN cache as a fraction of the loaded data.
    #[arg(
        long,
        default_value_t = 0.5,
        conflicts_with = "cache_mb",
        allow_negative_numbers = true
    )]
    pub cache_ratio: f64,
    /// Cache per KN in MiB (instead of --cache-ratio).
    #[arg(long)]
    pub cache_mb: Option<u64>,
    /// dac, shortcut-only or value-only.
    #[arg(long, default_value = "dac")]
    pub cache_policy: CachePolicy,
    /// NIC latency injected into the fabric: none, cx3-fdr, cx6, cxl.
    #[arg(long, default_value = "none")]
    pub nic: NicProfile,
    /// NIC profile of the modelled throughput (default: --nic, or cx3-fdr when --nic is none).
    #[arg(long)]
    pub model_nic: Option<NicProfile>,
    /// Worker threads per KN of the model's KN-latency ceiling [default: --threads-per-kn].
    #[arg(long)]
    pub model_threads_per_kn: Option<u16>,
    /// Cores per KN of the model's KN CPU ceiling [default: the model's threads per KN].
    #[arg(long)]
    pub kn_cores: Option<u16>,
    /// The model's KN CPU term: calibrate (measure ns of KN CPU per value hit, shortcut
    /// hit, miss and write on this machine before the run), off, or four ns values
    /// VALUE_HIT,SHORTCUT_HIT,MISS,WRITE (docs/MODEL.md).
    #[arg(long, default_value = "calibrate")]
    pub kn_cpu: String,
    /// Merge worker threads of the memory node.
    #[arg(long, default_value_t = 1)]
    pub dpm_workers: usize,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Drive a running cluster over the Redis protocol instead of an in-process one:
    /// HOST:PORT of one or more of its nodes, comma-separated (--kns, cache, NIC and DPM
    /// options do not apply).
    #[arg(long, conflicts_with_all = ["sweep", "scenario"])]
    pub target: Option<String>,
    /// With --target: a file holding the password of the cluster's default user on one
    /// line (`dinomo up` writes DIR/requirepass); every connection sends `AUTH` with it.
    #[arg(long, requires = "target")]
    pub password_file: Option<PathBuf>,
    /// A moving workload: the hot set moves every OPS measured operations (counted over
    /// all clients; the warm-up runs the first phase). The report adds every phase's read
    /// RTs per read, its static-optimal bars, and how many operations after the shift the
    /// RTs per read of a window take to come back within 5% of the per-shard bar
    /// (docs/PERFORMANCE.md, "A moving hot set"). DINOMO and DINOMO-N; not with --duration.
    #[arg(long, value_name = "OPS", conflicts_with_all = ["sweep", "scenario", "target", "duration"])]
    pub shift: Option<u64>,
    /// How the hot set moves with --shift: jump (the same popularity on other keys: the
    /// chooser's key k becomes k + phase x stride, mod --keys) or latest (YCSB's latest:
    /// the newest key hottest, Zipfian ranks counted back from it, the newest key
    /// advancing every phase) [default: jump].
    #[arg(long, value_name = "KIND", requires = "shift")]
    pub shift_kind: Option<ShiftKind>,
    /// Keys the hot set moves per phase: jump's stride [default: near 0.38 x --keys, where
    /// the keys drawing half of the accesses land on keys that were not among them in any
    /// earlier phase] or latest's advance [default: 1% of --keys].
    #[arg(long, value_name = "KEYS", requires = "shift")]
    pub shift_by: Option<u64>,
    /// Operations per measurement window of --shift (tumbling, from each phase's start;
    /// counted exactly) [default: 2% of --shift].
    #[arg(long, value_name = "OPS", requires = "shift")]
    pub shift_window: Option<u64>,
    /// Run every combination of --systems, --kns and --workloads; write one JSON line per
    /// point, a CSV table and the figure (SVG and PNG) into --out.
    #[arg(long)]
    pub sweep: bool,
    /// Systems of a sweep or a scenario, comma-separated [default: dinomo,clover,dinomo-n;
    /// dinomo,dinomo-n with --scenario elastic].
    #[arg(long)]
    pub systems: Option<String>,
    /// Workloads of a sweep, comma-separated.
    #[arg(
        long,
        default_value = "read-only,read-mostly,write-heavy",
        requires = "sweep"
    )]
    pub workloads: String,
    /// A named sweep: paper-fig2 (the DINOMO paper's Figure 2, scaled down; sets systems,
    /// KNs, workloads, keys, ops, cache and skew, see docs/PERFORMANCE.md).
    #[arg(long, requires = "sweep")]
    pub preset: Option<Preset>,
    /// Directory of the sweep's or scenario's outputs [default: bench-results].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A scenario over time instead of one measurement: elastic (the DINOMO paper's
    /// Figure 3, scaled down: load x1, x`--burst`, x1 while KNs are added and removed; see
    /// docs/PERFORMANCE.md).
    #[arg(long, value_enum, conflicts_with = "sweep")]
    pub scenario: Option<Scenario>,
    /// Offered operations per second of the elastic scenario's base load (open loop).
    #[arg(long, requires = "scenario")]
    pub base_rate: Option<f64>,
    /// The burst's load as a multiple of the base [default: 7].
    #[arg(long, requires = "scenario")]
    pub burst: Option<f64>,
    /// Seconds at the base load, at the burst, and at the base again [default: 15,30,15].
    #[arg(long, requires = "scenario")]
    pub phases: Option<String>,
    /// Fixed reconfigurations instead of the policy, e.g. "t=10:add,t=40:remove" (seconds
    /// from the start of the run; remove takes the highest KN id, remove=<kn> a given one).
    #[arg(long, requires = "scenario")]
    pub schedule: Option<String>,
    /// Seconds between policy decisions [default: 2]. Each decision may also replicate a
    /// hot key (or end that); --zipf makes hot keys (e.g. 0.99).
    #[arg(long, requires = "scenario")]
    pub period: Option<f64>,
    /// The policy's latency objective: p99 in milliseconds, measured by the open-loop
    /// clients from each operation's due time [default: 1; the system's default is 16 ms,
    /// for a real network].
    #[arg(long, requires = "scenario")]
    pub slo_p99_ms: Option<f64>,
    /// Occupancy (0..1, a KN's shards' busy time) above which a KN counts as busy
    /// [default: 0.04; the system's default is 0.20].
    #[arg(long, requires = "scenario")]
    pub busy_add: Option<f64>,
    /// Occupancy below which every KN must be for one to be removed [default: 0.02; the
    /// system's default is 0.15].
    #[arg(long, requires = "scenario")]
    pub idle_remove: Option<f64>,
    /// The most KNs the policy may run [default: 4].
    #[arg(long, requires = "scenario")]
    pub max_kns: Option<usize>,
}

/// Scenarios over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Elastic,
}

fn parse_list<T: std::str::FromStr>(what: &str, s: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    let v: Vec<T> = s
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|e| format!("{what} {x:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err(format!("{what} needs at least one value"));
    }
    Ok(v)
}

impl BenchArgs {
    /// The configuration, or a message saying which option is wrong.
    pub fn to_config(&self) -> Result<BenchConfig, String> {
        self.stray_options()?;
        let dist = match self.dist {
            DistArg::Uniform => Distribution::Uniform,
            DistArg::Zipf => Distribution::Zipf(self.zipf.unwrap_or(0.99)),
        };
        let duration = match self.duration {
            Some(s) if !(s.is_finite() && s > 0.0 && s < 1e6) => {
                return Err(format!(
                    "--duration {s} must be a positive number of seconds"
                ))
            }
            Some(s) => Some(Duration::from_secs_f64(s)),
            None => None,
        };
        if self.dpm_workers == 0 || self.dpm_workers > 64 {
            return Err(format!(
                "--dpm-workers {} is outside 1..=64",
                self.dpm_workers
            ));
        }
        let cache = match self.cache_mb {
            Some(mb) => CacheSize::PerKn(mb.checked_mul(1 << 20).ok_or("--cache-mb is too large")?),
            None => CacheSize::Ratio(self.cache_ratio),
        };
        let model_nic = self.model_nic.unwrap_or(if self.nic == NicProfile::None {
            NicProfile::Cx3Fdr
        } else {
            self.nic
        });
        let kns: Vec<u16> = parse_list("--kns", self.kns.as_deref().unwrap_or("2"))?;
        if kns.len() > 1 && !self.sweep {
            return Err("--kns takes a list only with --sweep".into());
        }
        let kn_cpu = match self.kn_cpu.trim() {
            "calibrate" => KnCpuSetting::Calibrate,
            "off" => KnCpuSetting::Off,
            v => KnCpuSetting::Use(KnCpuCalibration::given(parse_ns(v)?)),
        };
        let cfg = BenchConfig {
            system: self.system,
            kns: kns[0],
            threads_per_kn: self.threads_per_kn,
            workload: self.workload.unwrap_or(Workload::ReadMostly),
            dist,
            keys: self.keys,
            key_size: self.key_size,
            value_size: self.value_size,
            ops: self.ops,
            duration,
            warmup_ops: match self.warmup {
                Some(WarmupArg::Ops(n)) => n,
                None | Some(WarmupArg::Auto) => self.ops / 5,
            },
            warmup_auto: match self.warmup {
                Some(WarmupArg::Ops(_)) => None,
                None | Some(WarmupArg::Auto) => Some(super::AUTO_WARMUP_MAX_OPS),
            },
            clients: self.clients,
            cache,
            policy: self.cache_policy,
            nic: self.nic,
            model_nic,
            model_threads_per_kn: self.model_threads_per_kn,
            kn_cores: self.kn_cores,
            kn_cpu,
            seed: self.seed,
            dpm_workers: self.dpm_workers,
            progress: !self.quiet,
            shift: self.shift.map(|every| Shift {
                every,
                kind: self.shift_kind.unwrap_or(ShiftKind::Jump),
                by: self.shift_by,
                window: self.shift_window,
            }),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The sweep these arguments ask for (`--sweep`).
    pub fn to_sweep(&self) -> Result<SweepConfig, String> {
        let base = self.to_config()?;
        let s = SweepConfig {
            systems: parse_list(
                "--systems",
                self.systems.as_deref().unwrap_or("dinomo,clover,dinomo-n"),
            )?,
            kns: parse_list("--kns", self.kns.as_deref().unwrap_or("2"))?,
            workloads: parse_list("--workloads", &self.workloads)?,
            base,
            out: self.out_dir(),
            command: String::new(),
        };
        let mut s = match self.preset {
            Some(p) => p.apply(s),
            None => s,
        };
        s.command = self.command_line();
        s.validate()?;
        Ok(s)
    }

    fn out_dir(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from("bench-results"))
    }

    /// The elastic scenario these arguments ask for (`--scenario elastic`).
    pub fn to_elastic(&self) -> Result<ElasticConfig, String> {
        let mut args = self.clone();
        args.workload.get_or_insert(Workload::WriteHeavy);
        args.zipf.get_or_insert(0.5);
        args.kns.get_or_insert_with(|| "1".into());
        let bench = args.to_config()?;
        let secs = |what: &str, s: f64| -> Result<Duration, String> {
            if s.is_finite() && s > 0.0 && s < 1e6 {
                Ok(Duration::from_secs_f64(s))
            } else {
                Err(format!("{what} {s} must be a positive number of seconds"))
            }
        };
        let phases: Vec<f64> =
            parse_list("--phases", self.phases.as_deref().unwrap_or("15,30,15"))?;
        let [base, burst, tail] = phases[..] else {
            return Err(format!(
                "--phases takes three durations (base, burst, base again), not {}",
                phases.len()
            ));
        };
        let shape = LoadShape {
            base_rate: self.base_rate.unwrap_or(5000.0),
            factor: self.burst.unwrap_or(7.0),
            base: secs("--phases", base)?,
            burst: secs("--phases", burst)?,
            tail: secs("--phases", tail)?,
        };
        let period = secs("--period", self.period.unwrap_or(2.0))?;
        let slo = self.slo_p99_ms.unwrap_or(1.0);
        if !(slo.is_finite() && slo > 0.0 && slo < 1e6) {
            return Err(format!("--slo-p99-ms {slo} must be a positive number"));
        }
        let fraction = |what: &str, x: f64| -> Result<f64, String> {
            if (0.0..=1.0).contains(&x) {
                Ok(x)
            } else {
                Err(format!("{what} {x} is outside [0, 1]"))
            }
        };
        // Thresholds scaled for one process on a laptop (docs/PERFORMANCE.md): a KN spends
        // a few microseconds per operation, so even the burst keeps its shards under 10%
        // busy, and latencies are microseconds, not a network's milliseconds.
        let policy = PolicyConfig {
            period,
            cooldown: period,
            slo_p99: Duration::from_secs_f64(slo / 1e3),
            busy_add: fraction("--busy-add", self.busy_add.unwrap_or(0.04))?,
            idle_remove: fraction("--idle-remove", self.idle_remove.unwrap_or(0.02))?,
            max_kns: self.max_kns.unwrap_or(4),
            ..PolicyConfig::default()
        };
        let schedule = match &self.schedule {
            Some(s) => Some(s.parse::<Schedule>()?),
            None => None,
        };
        let cfg = ElasticConfig {
            systems: parse_list(
                "--systems",
                self.systems.as_deref().unwrap_or("dinomo,dinomo-n"),
            )?,
            bench,
            shape,
            schedule,
            policy,
            max_lag: Duration::from_millis(250),
            out: self.out_dir(),
            command: self.command_line(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Options that belong to a sweep or a scenario, given without one.
    fn stray_options(&self) -> Result<(), String> {
        if self.sweep || self.scenario.is_some() {
            return Ok(());
        }
        if self.systems.is_some() {
            return Err("--systems needs --sweep or --scenario".into());
        }
        if self.out.is_some() {
            return Err("--out needs --sweep or --scenario".into());
        }
        Ok(())
    }

    /// The command line that reproduces these arguments (recorded next to sweep results).
    fn command_line(&self) -> String {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!("dinomo {}", args.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_takes_a_number_or_auto() {
        assert_eq!(parse_warmup("auto"), Ok(WarmupArg::Auto));
        assert_eq!(parse_warmup("0"), Ok(WarmupArg::Ops(0)));
        assert_eq!(parse_warmup("19000000"), Ok(WarmupArg::Ops(19_000_000)));
        for bad in ["", "Auto", "-1", "1e6", "2M"] {
            let e = parse_warmup(bad).expect_err(bad);
            assert!(e.contains("neither a number"), "{bad}: {e}");
        }
    }

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn config(args: &[&str]) -> BenchConfig {
        use clap::Parser;
        let cmd = Cmd::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .expect("arguments parse");
        cmd.bench.to_config().expect("a valid configuration")
    }

    /// The default warm-up is `auto` from a fifth of --ops; a number is exactly that many.
    #[test]
    fn the_default_warmup_is_auto() {
        for args in [
            &["--ops", "500000"][..],
            &["--ops", "500000", "--warmup", "auto"],
        ] {
            let c = config(args);
            assert_eq!(c.warmup_ops, 100_000, "{args:?}");
            assert_eq!(
                c.warmup_auto,
                Some(super::super::AUTO_WARMUP_MAX_OPS),
                "{args:?}"
            );
        }
        let c = config(&["--warmup", "7"]);
        assert_eq!((c.warmup_ops, c.warmup_auto), (7, None));
    }
}
