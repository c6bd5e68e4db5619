//! Arguments of `dinomo bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use dinomo_hw::fabric::nic::NicProfile;
use host_kn::dac::CachePolicy;

use super::sweep::{Preset, SweepConfig};
use super::workload::{Distribution, Workload};
use super::{BenchConfig, CacheSize, System};

/// Distribution names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DistArg {
    Zipf,
    Uniform,
}

/// `dinomo bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// dinomo, clover (shared-everything baseline) or dinomo-n (shared-nothing baseline).
    #[arg(long, default_value = "dinomo")]
    pub system: System,
    /// KVS nodes; with --sweep a comma-separated list (e.g. 1,2,4,8,16).
    #[arg(long, default_value = "2")]
    pub kns: String,
    /// Shards (worker threads) per KN.
    #[arg(long, default_value_t = 2)]
    pub threads_per_kn: u16,
    /// read-only (100/0), read-mostly (95/5), write-heavy (50/50 reads/updates) or
    /// insert-heavy (50/50 reads/inserts of new keys).
    #[arg(long, default_value = "read-mostly")]
    pub workload: Workload,
    /// Key popularity.
    #[arg(long, value_enum, default_value_t = DistArg::Zipf)]
    pub dist: DistArg,
    /// Zipf skew (YCSB scrambled Zipfian), in (0, 1).
    #[arg(long, default_value_t = 0.99, allow_negative_numbers = true)]
    pub zipf: f64,
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
    /// Unmeasured operations before the measurement (default: a fifth of --ops).
    #[arg(long)]
    pub warmup: Option<u64>,
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
    #[arg(long, conflicts_with = "sweep")]
    pub target: Option<String>,
    /// Run every combination of --systems, --kns and --workloads; write one JSON line per
    /// point, a CSV table and the figure (SVG and PNG) into --out.
    #[arg(long)]
    pub sweep: bool,
    /// Systems of a sweep, comma-separated.
    #[arg(long, default_value = "dinomo,clover,dinomo-n", requires = "sweep")]
    pub systems: String,
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
    /// Directory of the sweep's outputs.
    #[arg(long, default_value = "bench-results", requires = "sweep")]
    pub out: PathBuf,
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
        let dist = match self.dist {
            DistArg::Uniform => Distribution::Uniform,
            DistArg::Zipf => Distribution::Zipf(self.zipf),
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
        let kns: Vec<u16> = parse_list("--kns", &self.kns)?;
        if kns.len() > 1 && !self.sweep {
            return Err("--kns takes a list only with --sweep".into());
        }
        let cfg = BenchConfig {
            system: self.system,
            kns: kns[0],
            threads_per_kn: self.threads_per_kn,
            workload: self.workload,
            dist,
            keys: self.keys,
            key_size: self.key_size,
            value_size: self.value_size,
            ops: self.ops,
            duration,
            warmup_ops: self.warmup.unwrap_or(self.ops / 5),
            clients: self.clients,
            cache,
            policy: self.cache_policy,
            nic: self.nic,
            model_nic,
            seed: self.seed,
            dpm_workers: self.dpm_workers,
            progress: !self.quiet,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The sweep these arguments ask for (`--sweep`).
    pub fn to_sweep(&self) -> Result<SweepConfig, String> {
        let base = self.to_config()?;
        let s = SweepConfig {
            systems: parse_list("--systems", &self.systems)?,
            kns: parse_list("--kns", &self.kns)?,
            workloads: parse_list("--workloads", &self.workloads)?,
            base,
            out: self.out.clone(),
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

    /// The command line that reproduces these arguments (recorded next to sweep results).
    fn command_line(&self) -> String {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!("dinomo {}", args.join(" "))
    }
}
