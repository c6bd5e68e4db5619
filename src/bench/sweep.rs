//! `dinomo bench --sweep`: every combination of systems, KN counts and workloads, one
//! JSON line per point (the fields of [`BenchResult`]), a CSV table, and the figure.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use super::workload::{Distribution, Workload};
use super::{kn_cpu, run, BenchConfig, BenchResult, CacheSize, KnCpuSetting, System};

/// Named sweeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The DINOMO paper's Figure 2, scaled to this machine: the three systems at 1, 2, 4, 8
    /// and 16 KNs, read-only / read-mostly / write-heavy, Zipf 0.99, 8 B keys, 1 KiB values,
    /// and a fixed cache per KN of data × 0.5 / 16 (so 16 KNs cache half the data, as the
    /// paper's 1 GB per KN does for 32 GB).
    PaperFig2,
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "paper-fig2" => Ok(Self::PaperFig2),
            _ => Err(format!("unknown preset {s:?}; expected: paper-fig2")),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PaperFig2 => "paper-fig2",
        })
    }
}

/// Keys, operations and clients of the paper-fig2 preset (scaled from 32 M keys so that the
/// 45 points finish within 15 minutes on 2 cores).
pub const FIG2_KEYS: u64 = 50_000;
pub const FIG2_OPS: u64 = 150_000;
pub const FIG2_WARMUP: u64 = 200_000;
pub const FIG2_CLIENTS: usize = 16;
/// Threads (and cores) per KN of the preset's model: the paper's KNs run 8 threads.
pub const FIG2_MODEL_THREADS: u16 = 8;

impl Preset {
    /// Overrides what the preset fixes; the output directory and NIC profiles stay.
    pub fn apply(self, mut s: SweepConfig) -> SweepConfig {
        match self {
            Self::PaperFig2 => {
                s.systems = System::ALL.to_vec();
                s.kns = vec![1, 2, 4, 8, 16];
                s.workloads = vec![
                    Workload::ReadOnly,
                    Workload::ReadMostly,
                    Workload::WriteHeavy,
                ];
                let b = &mut s.base;
                b.dist = Distribution::Zipf(0.99);
                b.keys = FIG2_KEYS;
                b.key_size = 8;
                b.value_size = 1024;
                b.ops = FIG2_OPS;
                b.warmup_ops = FIG2_WARMUP;
                b.warmup_auto = None;
                b.duration = None;
                b.clients = FIG2_CLIENTS;
                b.threads_per_kn = 1;
                // The model as the paper's KNs: 8 worker threads on 8 cores each.
                b.model_threads_per_kn = Some(FIG2_MODEL_THREADS);
                b.kn_cores = Some(FIG2_MODEL_THREADS);
                b.cache = CacheSize::PerKn(b.data_bytes() / 2 / 16);
            }
        }
        s
    }
}

/// A sweep.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub systems: Vec<System>,
    pub kns: Vec<u16>,
    pub workloads: Vec<Workload>,
    /// Everything else of each point.
    pub base: BenchConfig,
    pub out: PathBuf,
    /// The command that made it, written beside the results.
    pub command: String,
}

impl SweepConfig {
    pub fn validate(&self) -> Result<(), String> {
        for &system in &self.systems {
            for &kns in &self.kns {
                for &workload in &self.workloads {
                    BenchConfig {
                        system,
                        kns,
                        workload,
                        ..self.base.clone()
                    }
                    .validate()?;
                }
            }
        }
        Ok(())
    }
}

/// CSV header; one row per point.
pub const CSV_HEADER: &str = "system,workload,kns,threads_per_kn,keys,ops,measured_ops_per_s,modelled_ops_per_s,model_nic,bottleneck,rts_per_op,read_rts_per_read,write_rts_per_write,verbs_per_op,bytes_per_op,hit_value,hit_shortcut,hit_miss,ms_requests_per_op,ms_us_per_request,chain_hops_per_op,cas_failures_per_op,cache_bytes_per_kn,model_threads_per_kn,kn_cores,kn_cpu_ns_per_op,kn_cpu_bound_ops_per_s,fabric_only_ops_per_s";

/// One CSV row.
pub fn csv_row(r: &BenchResult) -> String {
    format!(
        "{},{},{},{},{},{},{:.0},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.1},{:.4},{:.4},{:.4},{:.5},{},{:.5},{:.5},{},{},{},{},{},{}",
        r.system,
        r.workload,
        r.kns,
        r.threads_per_kn,
        r.keys,
        r.ops,
        r.throughput_ops,
        r.modeled.throughput_ops.map(|t| format!("{t:.0}")).unwrap_or_default(),
        r.modeled.nic,
        r.modeled.bottleneck,
        r.rts_per_op,
        r.read_rts_per_read,
        r.write_rts_per_write,
        r.verbs_per_op,
        r.bytes_per_op,
        r.hit.value,
        r.hit.shortcut,
        r.hit.miss,
        r.ms_requests_per_op,
        r.ms_us_per_request.map(|u| format!("{u:.3}")).unwrap_or_default(),
        r.chain_hops_per_op,
        r.cas_failures_per_op,
        r.cache.bytes_per_kn,
        r.modeled.threads_per_kn,
        r.modeled.kn_cores,
        opt(r.modeled.bounds.kn_cpu_ns_per_op, 1),
        opt(r.modeled.bounds.kn_cpu, 0),
        opt(fabric_only(r), 0),
    )
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_default()
}

/// The modelled throughput without the KN CPU term: the least of the other ceilings.
pub fn fabric_only(r: &BenchResult) -> Option<f64> {
    let b = &r.modeled.bounds;
    [
        b.dpm_msg_rate,
        b.dpm_bandwidth,
        b.kn_latency,
        b.metadata_server,
    ]
    .into_iter()
    .flatten()
    .reduce(f64::min)
}

/// Runs the sweep, writing `sweep.jsonl`, `sweep.csv`, `sweep.svg`, `sweep.png` and
/// `command.txt` into the output directory as it goes.
pub fn sweep(s: &SweepConfig) -> anyhow::Result<Vec<BenchResult>> {
    use anyhow::Context;
    std::fs::create_dir_all(&s.out)
        .with_context(|| format!("cannot create {}", s.out.display()))?;
    let path = |name: &str| s.out.join(name);
    std::fs::write(path("command.txt"), format!("{}\n", s.command))?;
    let mut jsonl = std::fs::File::create(path("sweep.jsonl"))?;
    let mut csv = std::fs::File::create(path("sweep.csv"))?;
    writeln!(csv, "{CSV_HEADER}")?;
    let total = s.systems.len() * s.kns.len() * s.workloads.len();
    // The KN CPU term is calibrated once per system, before the points, and used by all.
    let mut cals = Vec::new();
    for &system in &s.systems {
        let cfg = BenchConfig {
            system,
            ..s.base.clone()
        };
        let setting = match &cfg.kn_cpu {
            KnCpuSetting::Calibrate => {
                let t0 = std::time::Instant::now();
                let c = kn_cpu::calibrate(&cfg)?;
                let us = |x: Option<f64>| x.map_or("-".into(), |ns| format!("{:.2}", ns / 1e3));
                eprintln!(
                    "KN CPU of {system} (us per value hit / shortcut hit / miss / write): {} / {} / {} / {}, {:.1} s",
                    us(c.value_hit_ns),
                    us(c.shortcut_hit_ns),
                    us(c.miss_ns),
                    us(c.write_ns),
                    t0.elapsed().as_secs_f64()
                );
                KnCpuSetting::Use(c)
            }
            other => other.clone(),
        };
        cals.push((system, setting));
    }
    let mut out = Vec::with_capacity(total);
    for &workload in &s.workloads {
        for &(system, ref kn_cpu) in &cals {
            for &kns in &s.kns {
                let cfg = BenchConfig {
                    system,
                    kns,
                    workload,
                    kn_cpu: kn_cpu.clone(),
                    ..s.base.clone()
                };
                let t0 = std::time::Instant::now();
                let r = run(&cfg)?;
                eprintln!(
                    "[{}/{total}] {system} {workload} {kns} KNs: {:.3} RTs/op, modelled {:.0} ops/s ({}), measured {:.0} ops/s, {:.1} s",
                    out.len() + 1,
                    r.rts_per_op,
                    r.modeled.throughput_ops.unwrap_or(f64::INFINITY),
                    r.modeled.bottleneck,
                    r.throughput_ops,
                    t0.elapsed().as_secs_f64()
                );
                writeln!(jsonl, "{}", serde_json::to_string(&r)?)?;
                writeln!(csv, "{}", csv_row(&r))?;
                out.push(r);
            }
        }
    }
    let title = format!(
        "{} vs KNs: {} keys, Zipf {}, {} B values, cache/KN {} B; modelled on {}",
        s.systems
            .iter()
            .map(|x| x.name())
            .collect::<Vec<_>>()
            .join(" / "),
        s.base.keys,
        match s.base.dist {
            Distribution::Zipf(t) => t.to_string(),
            Distribution::Uniform => "-".into(),
        },
        s.base.value_size,
        out.first().map(|r| r.cache.bytes_per_kn).unwrap_or(0),
        s.base.model_nic
    );
    super::plot::draw(&out, &path("sweep.svg"), &path("sweep.png"), &title)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_fig2_fixes_the_cache_per_kn_at_half_the_data_over_16() {
        let s = Preset::PaperFig2.apply(SweepConfig {
            systems: vec![System::Dinomo],
            kns: vec![2],
            workloads: vec![Workload::InsertHeavy],
            base: BenchConfig::default(),
            out: PathBuf::from("x"),
            command: String::new(),
        });
        assert_eq!(s.kns, [1, 2, 4, 8, 16]);
        assert_eq!(s.systems, System::ALL);
        assert_eq!(s.workloads.len(), 3);
        let data = FIG2_KEYS * (8 + 1024);
        for kns in [1u16, 16] {
            let c = BenchConfig {
                kns,
                ..s.base.clone()
            };
            assert_eq!(c.cache_per_kn(), data / 32, "{kns} KNs");
        }
        // 16 KNs together cache half the data.
        assert_eq!(16 * s.base.cache_per_kn(), data / 2);
        // The model counts the paper's 8 threads on 8 cores per KN; the points run 1.
        assert_eq!(s.base.threads_per_kn, 1);
        assert_eq!(s.base.model_threads(), 8);
        assert_eq!(s.base.model_kn_cores(), 8);
        assert!(s.validate().is_ok());
    }
}
