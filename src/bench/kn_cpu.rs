//! The KN CPU term of the model (docs/MODEL.md, "KN CPU"): nanoseconds of KN CPU per
//! operation by path — value hit, shortcut hit, miss, write — measured on this machine.
//!
//! Calibration runs short phases, each on a fresh in-process cluster of **one KN with one
//! worker thread** (lane), driven by the run's number of closed-loop clients over a small
//! key set, so that each phase takes one path almost only:
//!
//! | phase | cluster | operations |
//! |---|---|---|
//! | value hits | cache 4x the data (DAC; Clover: shortcut LRU) | uniform reads, caches warm |
//! | shortcut hits | cache 4x the data, shortcut-only policy (DINOMO, DINOMO-N) | uniform reads, warm |
//! | misses | no cache | uniform reads |
//! | writes | the first cluster | uniform updates |
//!
//! KN CPU of a phase = CPU time of the whole process (`CLOCK_PROCESS_CPUTIME_ID`), minus the
//! threads of other roles (the memory node's `dpm-*` threads and Clover's `clover-ms`,
//! read from `/proc/self/task/*/schedstat`), minus what the bench's own client loop costs
//! (measured by the same loop against a target that does nothing). What remains is the
//! in-process client API (routing, the hand-off to the shard thread and back) and the
//! shard's request handling, the one-sided verbs' KN side included.
//!
//! Each phase's counters say how many operations took each path; the ns per path are the
//! least-squares solution of `Σ_path count[phase][path] × ns[path] = kn_cpu[phase]` over
//! the phases (exact when every phase is pure), so a phase that strays a little (a read
//! that misses in the value phase) is charged to the right path. Every phase runs
//! [`CAL_REPEATS`] times; each path's cost is the median of the repetitions' solutions.

use std::sync::Arc;

use host_kn::dac::CachePolicy;
use host_kn::ShardStats;
use serde::Serialize;

use super::model::PathNs;
use super::workload::{key_into, value_into, Rng};
use super::{BenchConfig, CacheSize, Counters, Ops, System, Target};
use crate::cluster::clover::CloverCluster;
use crate::cluster::dinomo_n::DinomoN;
use crate::cluster::Cluster;

/// Keys of a calibration (at most; fewer when the run has fewer).
pub const CAL_KEYS: u64 = 2_000;
/// Measured operations of a calibration phase (at most).
pub const CAL_OPS: u64 = 50_000;
/// Every phase runs this many times; each path's cost is the median of the repetitions'
/// solutions (this machine is shared, and one repetition can be disturbed).
pub const CAL_REPEATS: usize = 3;

/// What the calibration measured, as recorded in the bench JSON (`modeled.kn_cpu`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KnCpuCalibration {
    /// `calibrated` (measured by this run) or `given` (`--kn-cpu V,S,M,W`).
    pub source: &'static str,
    /// ns of KN CPU per value hit (`null`: the system has no such path).
    pub value_hit_ns: Option<f64>,
    pub shortcut_hit_ns: Option<f64>,
    pub miss_ns: Option<f64>,
    pub write_ns: Option<f64>,
    /// The bench loop's own CPU per read and per write, subtracted (ns).
    pub driver_read_ns: Option<f64>,
    pub driver_write_ns: Option<f64>,
    /// Shape of the calibration: 1 KN x 1 worker thread, these clients, keys and ops per
    /// phase.
    pub clients: usize,
    pub keys: u64,
    pub ops_per_phase: u64,
    /// Every phase of every repetition: its name, operations by path, and KN CPU in ns.
    pub phases: Vec<CalPhase>,
    /// Each repetition's solution (ns per value hit, shortcut hit, miss, write).
    pub repetitions: Vec<[Option<f64>; 4]>,
}

impl KnCpuCalibration {
    /// Values given on the command line.
    pub fn given(ns: PathNs) -> Self {
        Self {
            source: "given",
            value_hit_ns: Some(ns.value_hit),
            shortcut_hit_ns: Some(ns.shortcut_hit),
            miss_ns: Some(ns.miss),
            write_ns: Some(ns.write),
            driver_read_ns: None,
            driver_write_ns: None,
            clients: 0,
            keys: 0,
            ops_per_phase: 0,
            phases: Vec::new(),
            repetitions: Vec::new(),
        }
    }

    /// The costs the model uses (a path the system does not have costs 0; a negative
    /// least-squares estimate, possible only with noise, counts as 0).
    pub fn ns(&self) -> PathNs {
        let f = |x: Option<f64>| x.unwrap_or(0.0).max(0.0);
        PathNs {
            value_hit: f(self.value_hit_ns),
            shortcut_hit: f(self.shortcut_hit_ns),
            miss: f(self.miss_ns),
            write: f(self.write_ns),
        }
    }
}

/// One calibration phase.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CalPhase {
    pub name: &'static str,
    pub repetition: usize,
    /// Operations by path: value hits, shortcut hits, misses, writes.
    pub paths: [u64; 4],
    pub kn_cpu_ns: f64,
}

/// Parses `V,S,M,W` (ns per value hit, shortcut hit, miss, write).
pub fn parse_ns(s: &str) -> Result<PathNs, String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--kn-cpu {s:?}: {e}"))?;
    match v[..] {
        [a, b, c, d] if v.iter().all(|x| x.is_finite() && *x >= 0.0) => Ok(PathNs {
            value_hit: a,
            shortcut_hit: b,
            miss: c,
            write: d,
        }),
        _ => Err(format!(
            "--kn-cpu {s:?}: expected calibrate, off, or four non-negative ns values \
             VALUE_HIT,SHORTCUT_HIT,MISS,WRITE"
        )),
    }
}

/// Operations of a run by path (value hits include reads served from the KN's own
/// unmerged writes; writes include deletes).
pub fn path_counts(k: &ShardStats) -> [u64; 4] {
    [
        k.hit_value + k.hit_local,
        k.hit_shortcut,
        k.miss,
        k.puts + k.deletes,
    ]
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Whether a thread of this process belongs to another role than a KN's: the memory
/// node's threads and Clover's metadata server.
fn other_role(comm: &str) -> bool {
    comm.starts_with("dpm-") || comm == "clover-ms"
}

/// CPU time of this process's threads of other roles, in ns (`/proc/self/task/*/schedstat`:
/// its first field is the time on CPU in ns).
fn other_roles_ns() -> anyhow::Result<u64> {
    use anyhow::Context;
    let mut total = 0u64;
    let dir = std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")?;
    for t in dir.flatten() {
        let p = t.path();
        // A thread may end between the listing and the reads: skip it.
        let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
            continue;
        };
        if !other_role(comm.trim()) {
            continue;
        }
        let Ok(st) = std::fs::read_to_string(p.join("schedstat")) else {
            anyhow::bail!("cannot read {} (no scheduler statistics?)", p.display());
        };
        total += st
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
            .with_context(|| format!("unexpected {}: {st:?}", p.display()))?;
    }
    Ok(total)
}

/// KN CPU so far: the process's CPU time less that of other roles.
fn kn_ns() -> anyhow::Result<u64> {
    let others = other_roles_ns()?;
    Ok(clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(others))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Write,
}

/// Runs `ops` uniform reads or updates over `keys` keys from `clients` threads.
fn drive<T: Target>(
    sys: &T,
    clients: usize,
    keys: u64,
    (key_size, value_size): (usize, usize),
    ops: u64,
    kind: Kind,
    seed: u64,
) -> anyhow::Result<()> {
    super::on_clients(sys, clients, "calibration client", |t, cl| {
        let share = ops / clients as u64 + u64::from((t as u64) < ops % clients as u64);
        let mut rng = Rng::new(seed.wrapping_mul(0x100_0000_01B3) ^ t as u64);
        let mut key = vec![0u8; key_size];
        let mut val = vec![0u8; value_size];
        for _ in 0..share {
            let id = rng.below(keys);
            key_into(id, &mut key);
            match kind {
                Kind::Read => {
                    cl.get(&key)?;
                }
                Kind::Write => {
                    value_into(id, rng.next_u64(), &mut val);
                    cl.put(&key, &val)?;
                }
            }
        }
        Ok(())
    })
}

/// Every key read once by the client that loaded it (caches fill).
fn read_all<T: Target>(sys: &T, cfg: &BenchConfig) -> anyhow::Result<()> {
    super::on_clients(sys, cfg.clients, "calibration client", |t, cl| {
        let mut key = vec![0u8; cfg.key_size];
        let mut id = t as u64;
        while id < cfg.keys {
            key_into(id, &mut key);
            cl.get(&key)?;
            id += cfg.clients as u64;
        }
        Ok(())
    })
}

/// A target that does nothing: the bench loop's own cost.
struct Null;
struct NullOps;

impl Ops for NullOps {
    fn get(&mut self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        std::hint::black_box(key);
        Ok(None)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        std::hint::black_box((key, value));
        Ok(())
    }
}

impl Target for Null {
    type C = NullOps;
    fn client(&self, _: usize) -> NullOps {
        NullOps
    }
    fn counters(&self) -> Counters {
        Counters::default()
    }
    fn settle(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

struct Shape {
    clients: usize,
    keys: u64,
    sizes: (usize, usize),
    ops: u64,
    seed: u64,
}

/// One measured phase: KN CPU (driver cost subtracted) and operations by path.
fn measure<T: Target>(
    sys: &T,
    sh: &Shape,
    kind: Kind,
    driver_ns: f64,
    name: &'static str,
    repetition: usize,
) -> anyhow::Result<CalPhase> {
    let c0 = sys.counters();
    let t0 = kn_ns()?;
    let seed = sh.seed ^ (repetition as u64) << 32;
    drive(sys, sh.clients, sh.keys, sh.sizes, sh.ops, kind, seed)?;
    let t1 = kn_ns()?;
    let d = sys.counters().since(&c0);
    Ok(CalPhase {
        name,
        repetition,
        paths: path_counts(&d.kn),
        kn_cpu_ns: ((t1 - t0) as f64 - sh.ops as f64 * driver_ns).max(0.0),
    })
}

/// Loads, settles and warms a calibration cluster, then measures `reads` (and writes).
fn on<T: Target>(
    sys: &T,
    cfg: &BenchConfig,
    sh: &Shape,
    driver: (f64, f64),
    reads: &'static str,
    writes: Option<&'static str>,
) -> anyhow::Result<Vec<CalPhase>> {
    super::load(sys, cfg)?;
    sys.settle()?;
    read_all(sys, cfg)?;
    read_all(sys, cfg)?;
    let mut out = Vec::new();
    for r in 0..CAL_REPEATS {
        out.push(measure(sys, sh, Kind::Read, driver.0, reads, r)?);
        if let Some(w) = writes {
            out.push(measure(sys, sh, Kind::Write, driver.1, w, r)?);
        }
    }
    Ok(out)
}

/// Least squares: `ns` minimising `Σ_phase (Σ_path paths·ns − cpu)²` over the paths that
/// occur in some phase (`None` for the others). `None` when the phases do not separate the
/// paths.
pub fn solve(phases: &[CalPhase]) -> Option<[Option<f64>; 4]> {
    let active: Vec<usize> = (0..4)
        .filter(|&j| phases.iter().any(|p| p.paths[j] > 0))
        .collect();
    let n = active.len();
    if n == 0 || phases.len() < n {
        return None;
    }
    // Normal equations A^T A x = A^T b, scaled per phase by its operations so that every
    // phase weighs the same whatever its length.
    let mut m = vec![vec![0.0f64; n + 1]; n];
    for p in phases {
        let ops: u64 = p.paths.iter().sum();
        if ops == 0 {
            continue;
        }
        let w = 1.0 / ops as f64;
        let row: Vec<f64> = active.iter().map(|&j| p.paths[j] as f64 * w).collect();
        let b = p.kn_cpu_ns * w;
        for r in 0..n {
            for c in 0..n {
                m[r][c] += row[r] * row[c];
            }
            m[r][n] += row[r] * b;
        }
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..n {
        let piv = (col..n).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[piv][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, piv);
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut out = [None; 4];
    for (i, &j) in active.iter().enumerate() {
        out[j] = Some(m[i][n] / m[i][i]);
    }
    Some(out)
}

/// Measures the KN CPU per operation by path of `run.system` on this machine.
pub fn calibrate(run: &BenchConfig) -> anyhow::Result<KnCpuCalibration> {
    let keys = run.keys.clamp(1, CAL_KEYS);
    let ops = match run.duration {
        Some(_) => CAL_OPS,
        None => (run.ops / 3).clamp(1_000, CAL_OPS),
    };
    let sh = Shape {
        clients: run.clients,
        keys,
        sizes: (run.key_size, run.value_size),
        ops,
        seed: run.seed ^ 0xCA1B,
    };
    let base = BenchConfig {
        kns: 1,
        threads_per_kn: 1,
        keys,
        ops,
        duration: None,
        warmup_ops: 0,
        workload: super::workload::Workload::ReadMostly,
        nic: dinomo_hw::fabric::nic::NicProfile::None,
        progress: false,
        shift: None,
        ..run.clone()
    };
    let big = CacheSize::PerKn(base.data_bytes() * 4 + (4 << 20));
    let with = |cache: CacheSize, policy: CachePolicy| BenchConfig {
        cache,
        policy,
        ..base.clone()
    };
    // The bench loop alone.
    let driver = {
        let mut per = [0.0; 2];
        for (i, kind) in [Kind::Read, Kind::Write].into_iter().enumerate() {
            let t0 = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
            drive(&Null, sh.clients, keys, sh.sizes, ops, kind, sh.seed)?;
            per[i] = (clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - t0) as f64 / ops as f64;
        }
        (per[0], per[1])
    };
    let mut phases = Vec::new();
    match run.system {
        System::Dinomo | System::DinomoN => {
            let dinomo_n = run.system == System::DinomoN;
            for (cfg, reads, writes) in [
                (with(big, CachePolicy::Dac), "value hits", Some("writes")),
                (with(big, CachePolicy::ShortcutOnly), "shortcut hits", None),
                (with(CacheSize::PerKn(0), CachePolicy::Dac), "misses", None),
            ] {
                let cc = super::cluster_config(&cfg);
                phases.extend(if dinomo_n {
                    let c = DinomoN::start(&cc)?;
                    let r = on(&c, &cfg, &sh, driver, reads, writes);
                    c.stop();
                    r?
                } else {
                    let c = Cluster::start(&cc)?;
                    let r = on(&c, &cfg, &sh, driver, reads, writes);
                    c.stop();
                    r?
                });
            }
        }
        System::Clover => {
            for (cfg, reads, writes) in [
                (with(big, CachePolicy::Dac), "shortcut hits", Some("writes")),
                (with(CacheSize::PerKn(0), CachePolicy::Dac), "misses", None),
            ] {
                let c = Arc::new(CloverCluster::start(&super::clover_config(&cfg))?);
                phases.extend(on(&c, &cfg, &sh, driver, reads, writes)?);
            }
        }
    }
    let mut reps = Vec::new();
    for r in 0..CAL_REPEATS {
        let these: Vec<CalPhase> = phases
            .iter()
            .filter(|p| p.repetition == r)
            .cloned()
            .collect();
        reps.push(solve(&these).ok_or_else(|| {
            anyhow::anyhow!("KN CPU calibration: the phases do not separate the paths: {these:?}")
        })?);
    }
    let ns = median(&reps);
    Ok(KnCpuCalibration {
        source: "calibrated",
        value_hit_ns: ns[0],
        shortcut_hit_ns: ns[1],
        miss_ns: ns[2],
        write_ns: ns[3],
        driver_read_ns: Some(driver.0),
        driver_write_ns: Some(driver.1),
        clients: sh.clients,
        keys,
        ops_per_phase: ops,
        phases,
        repetitions: reps,
    })
}

/// Per path, the median of the repetitions' estimates (`None` where none has one).
pub fn median(reps: &[[Option<f64>; 4]]) -> [Option<f64>; 4] {
    let mut out = [None; 4];
    for (j, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f64> = reps.iter().filter_map(|r| r[j]).collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        *o = Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(paths: [u64; 4], ns: [f64; 4]) -> CalPhase {
        CalPhase {
            name: "t",
            repetition: 0,
            paths,
            kn_cpu_ns: paths.iter().zip(ns).map(|(&c, n)| c as f64 * n).sum(),
        }
    }

    #[test]
    fn solve_separates_slightly_mixed_phases() {
        // Each phase strays a little into another path; the solution is exact.
        let ns = [2000.0, 3000.0, 5000.0, 8000.0];
        let phases = [
            phase([990, 0, 10, 0], ns),
            phase([0, 980, 20, 0], ns),
            phase([0, 0, 1000, 0], ns),
            phase([5, 0, 0, 995], ns),
        ];
        let got = solve(&phases).expect("solvable");
        for (g, w) in got.iter().zip(ns) {
            assert!((g.expect("path") - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn solve_leaves_absent_paths_out_and_refuses_too_few_phases() {
        // Clover: no value hits.
        let ns = [0.0, 1500.0, 4000.0, 6000.0];
        let phases = [
            phase([0, 1000, 3, 0], ns),
            phase([0, 0, 1000, 0], ns),
            phase([0, 0, 0, 1000], ns),
        ];
        let got = solve(&phases).expect("solvable");
        assert_eq!(got[0], None);
        assert!((got[1].expect("sc") - 1500.0).abs() < 1e-6);
        assert!((got[3].expect("w") - 6000.0).abs() < 1e-6);
        // Two paths always together cannot be told apart.
        assert_eq!(solve(&[phase([500, 500, 0, 0], ns)]), None);
        assert_eq!(
            solve(&[phase([500, 500, 0, 0], ns), phase([250, 250, 0, 0], ns)]),
            None
        );
    }

    #[test]
    fn the_median_of_repetitions_drops_a_disturbed_one() {
        let m = median(&[
            [Some(3.0), Some(4.0), None, Some(6.0)],
            [Some(2.9), Some(40.0), None, Some(6.5)],
            [Some(3.1), Some(4.2), None, Some(6.2)],
        ]);
        assert_eq!(m, [Some(3.0), Some(4.2), None, Some(6.2)]);
        assert_eq!(median(&[[Some(1.0); 4], [Some(2.0); 4]])[0], Some(1.5));
    }

    #[test]
    fn kn_cpu_values_parse() {
        let ns = parse_ns("1000, 2000,3000,4000.5").expect("parses");
        assert_eq!(ns.write, 4000.5);
        assert!(parse_ns("1,2,3").is_err());
        assert!(parse_ns("1,2,3,-4").is_err());
        assert!(parse_ns("1,2,x,4").is_err());
    }

    #[test]
    fn other_roles_are_the_memory_node_and_the_metadata_server() {
        assert!(other_role("dpm-merge-0"));
        assert!(other_role("dpm-control"));
        assert!(other_role("clover-ms"));
        assert!(!other_role("kn0-shard0"));
        assert!(!other_role("dinomo"));
    }
}
