//! A moving workload (`dinomo bench --shift OPS`): the hot set moves every `OPS` measured
//! operations, counted over all clients, and the run is measured in windows so that the
//! report can say how fast a cache policy follows it.
//!
//! The windows are exact. Clients claim operation numbers from one shared counter (which
//! also gives each operation its phase, the same for every client) and stop at the end of
//! each window; when all of them have stopped (a barrier), one reads the shards' counters.
//! A shard answers that request from its queue behind every operation it was sent before,
//! and every client waits for each reply, so a window's round trips are exactly those of
//! its own operations. The barriers cost some throughput (a window ends with the slowest
//! client), never a count.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::time::Instant;

use host_kn::dac::oracle;
use host_kn::ownership::SlotMap;
use serde::Serialize;

use super::workload::{key_into, value_into, Rng, ShiftKind, ShiftedChooser};
use super::{bar, histogram, per_shard_oracle, BenchConfig, ClientOut, Ops, Target};

/// A window is back when its RTs per read are within this fraction above the bar.
pub const RECOVERY_TOLERANCE: f64 = 0.05;
/// The most windows a run may have (each ends in a barrier of all clients).
pub const MAX_WINDOWS: u64 = 100_000;

/// A moving workload's settings (`--shift`, `--shift-kind`, `--shift-by`, `--shift-window`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shift {
    /// Measured operations per phase, over all clients.
    pub every: u64,
    pub kind: ShiftKind,
    /// Keys the hot set moves per phase (jump: the stride; latest: the advance of the
    /// newest key); `None`: the kind's default ([`ShiftedChooser::new`]).
    pub by: Option<u64>,
    /// Operations per measurement window; `None`: 2% of a phase.
    pub window: Option<u64>,
}

impl Shift {
    /// Operations per measurement window.
    pub fn window_ops(&self) -> u64 {
        self.window.unwrap_or(self.every / 50).max(1)
    }

    /// Phases of a run of `ops` measured operations (the last may be shorter).
    pub fn phases(&self, ops: u64) -> u64 {
        ops.div_ceil(self.every.max(1))
    }

    /// Checks the settings against the run's operations and keys.
    pub fn validate(&self, ops: u64, keys: u64) -> Result<(), String> {
        if self.every == 0 {
            return Err("--shift must be at least 1 operation".into());
        }
        if let Some(w) = self.window {
            if w == 0 || w > self.every {
                return Err(format!(
                    "--shift-window {w} is outside 1..={} (--shift)",
                    self.every
                ));
            }
        }
        if self.by.is_some_and(|b| b % keys == 0) {
            return Err(format!(
                "--shift-by must not be a multiple of --keys {keys}: the hot set would not move"
            ));
        }
        let windows = plan_len(ops, self.every, self.window_ops());
        if windows > MAX_WINDOWS {
            return Err(format!(
                "--ops {ops} makes {windows} windows of {} operations; at most {MAX_WINDOWS} (raise --shift-window)",
                self.window_ops()
            ));
        }
        Ok(())
    }
}

/// One measurement window: operations `start..end` of the run, all of phase `phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub end: u64,
    pub phase: u64,
}

fn plan_len(ops: u64, every: u64, window: u64) -> u64 {
    let (full, rest) = (ops / every, ops % every);
    full * every.div_ceil(window) + rest.div_ceil(window)
}

/// The windows of `ops` operations: phases of `every` operations, each cut into windows of
/// `window` from its own start (so no window spans a shift; a phase's last window may be
/// shorter, and so may the run's last phase).
pub fn plan(ops: u64, every: u64, window: u64) -> Vec<Window> {
    let (every, window) = (every.max(1), window.max(1));
    let mut v = Vec::new();
    let mut phase_start = 0;
    while phase_start < ops {
        let phase_end = (phase_start + every).min(ops);
        let mut start = phase_start;
        while start < phase_end {
            let end = (start + window).min(phase_end);
            v.push(Window {
                start,
                end,
                phase: phase_start / every,
            });
            start = end;
        }
        phase_start = phase_end;
    }
    v
}

/// What one window measured (read counters only: the moving bar is about reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowCounts {
    pub phase: u64,
    pub start: u64,
    pub ops: u64,
    pub reads: u64,
    pub read_rts: u64,
    pub hit_value: u64,
    pub hit_shortcut: u64,
    pub miss: u64,
}

impl WindowCounts {
    fn rts_per_read(&self) -> f64 {
        super::ratio(self.read_rts, self.reads)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the operations of `plan` (consecutive windows) on `cfg.clients` clients of `sys`,
/// drawing keys from `chooser` in each window's phase, and returns what every client did
/// and the counters of every window.
pub(super) fn drive_windows<T: Target>(
    sys: &T,
    cfg: &BenchConfig,
    chooser: &ShiftedChooser,
    plan: &[Window],
    what: &str,
    seed: u64,
) -> anyhow::Result<(Vec<ClientOut>, Vec<WindowCounts>)> {
    let (Some(first), Some(last)) = (plan.first(), plan.last()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let pb = bar(cfg.progress, last.end - first.start, what);
    let next = AtomicU64::new(first.start);
    let reads = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(cfg.clients);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let windows = Mutex::new(Vec::with_capacity(plan.len()));
    let before = Mutex::new((sys.counters(), 0u64));
    let outs = std::thread::scope(|s| -> anyhow::Result<Vec<ClientOut>> {
        let hs: Vec<_> = (0..cfg.clients)
            .map(|t| {
                let mut cl = sys.client(t);
                let (next, reads, stop, barrier) = (&next, &reads, &stop, &barrier);
                let (failure, windows, before, pb) = (&failure, &windows, &before, &pb);
                s.spawn(move || -> ClientOut {
                    let mut rng = Rng::new(seed.wrapping_mul(0x100_0000_01B3) ^ t as u64);
                    let mut out = ClientOut {
                        latency_ns: histogram::new(),
                        reads: 0,
                        writes: 0,
                    };
                    let mut key = vec![0u8; cfg.key_size];
                    let mut val = vec![0u8; cfg.value_size];
                    let rf = cfg.workload.read_fraction();
                    for w in plan {
                        if !stop.load(Ordering::Relaxed) {
                            let r = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<()> {
                                while !stop.load(Ordering::Relaxed)
                                    && next.fetch_add(1, Ordering::Relaxed) < w.end
                                {
                                    let id = chooser.next(&mut rng, w.phase);
                                    key_into(id, &mut key);
                                    let t0 = Instant::now();
                                    if rf >= 1.0 || rng.next_f64() < rf {
                                        cl.get(&key)?;
                                        out.reads += 1;
                                        reads.fetch_add(1, Ordering::Relaxed);
                                    } else {
                                        value_into(id, rng.next_u64(), &mut val);
                                        cl.put(&key, &val)?;
                                        out.writes += 1;
                                    }
                                    histogram::record_ns(&mut out.latency_ns, t0.elapsed());
                                }
                                Ok(())
                            }));
                            let err = match r {
                                Ok(Ok(())) => None,
                                Ok(Err(e)) => Some(e),
                                Err(_) => Some(anyhow::anyhow!("a {what} client panicked")),
                            };
                            if let Some(e) = err {
                                stop.store(true, Ordering::Relaxed);
                                lock(failure).get_or_insert(e);
                            }
                        }
                        if barrier.wait().is_leader() {
                            // Every client is waiting: no operation is in flight.
                            let now = (sys.counters(), reads.load(Ordering::Relaxed));
                            let mut b = lock(before);
                            let d = now.0.kn.since(&b.0.kn);
                            lock(windows).push(WindowCounts {
                                phase: w.phase,
                                start: w.start,
                                ops: w.end - w.start,
                                reads: now.1 - b.1,
                                read_rts: d.read_rts,
                                hit_value: d.hit_value,
                                hit_shortcut: d.hit_shortcut,
                                miss: d.miss,
                            });
                            *b = now;
                            next.store(w.end, Ordering::Relaxed);
                            pb.set_position(w.end - first.start);
                        }
                        barrier.wait();
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    out
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a {what} client thread panicked"))
            })
            .collect()
    })?;
    pb.finish_and_clear();
    if let Some(e) = lock(&failure).take() {
        return Err(e);
    }
    let windows = std::mem::take(&mut *lock(&windows));
    Ok((outs, windows))
}

/// The static-optimal bars of one phase, in expected RTs per read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhaseBars {
    /// Every shard's own budget over its own keys (`per_shard_oracle`); `None` without a
    /// cluster map.
    pub per_shard: Option<f64>,
    /// The whole cache over all keys.
    pub global: f64,
}

/// Cache charges and budgets of a run: value charge, shortcut charge, the whole cache, one
/// shard's part.
pub type Costs = (u64, u64, u64, u64);

/// The bars of phase `phase`: that phase's popularity ([`ShiftedChooser::key_probabilities`],
/// the same values on other keys) split over the shards exactly as `per_shard_oracle` does
/// for a steady run (key → slot → owner in `map` → shard), and sorted for the global one.
pub fn phase_bars(
    chooser: &ShiftedChooser,
    phase: u64,
    cfg: &BenchConfig,
    map: Option<&SlotMap>,
    costs: Costs,
    miss_cost: f64,
) -> PhaseBars {
    let (vc, sc, total, shard_budget) = costs;
    let key_p = chooser.key_probabilities(phase);
    let per_shard = map.map(|m| {
        per_shard_oracle(
            &key_p,
            cfg.key_size,
            m,
            cfg.kns,
            cfg.threads_per_kn,
            (vc, sc, shard_budget),
            miss_cost,
        )
        .rts_per_read
    });
    let mut sorted = key_p;
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    PhaseBars {
        per_shard,
        global: oracle(&sorted, vc, sc, total, miss_cost).rts_per_read,
    }
}

/// `Σ_k min(p(k), q(k))`: the share of accesses two popularities have in common (1 when
/// equal, 0 when they draw disjoint keys).
pub fn overlap(p: &[f64], q: &[f64]) -> f64 {
    p.iter().zip(q).map(|(a, b)| a.min(*b)).sum()
}

/// One phase of a moving run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PhaseReport {
    pub phase: u64,
    /// The phase's first operation, counted from the start of the measurement.
    pub start_op: u64,
    pub ops: u64,
    pub reads: u64,
    /// Measured read RTs per read over the whole phase.
    pub rts_per_read: f64,
    /// Reads that hit a value / a shortcut / missed, fractions of the phase's reads.
    pub hit_value: f64,
    pub hit_shortcut: f64,
    pub miss: f64,
    /// The static optimum of every shard's budget over its own keys for this phase's
    /// popularity (null without per-shard caches).
    pub oracle_per_shard_rts_per_read: Option<f64>,
    /// The static optimum of the whole cache over all keys for this phase's popularity.
    pub oracle_rts_per_read: f64,
    /// `rts_per_read` over the per-shard bar (the global one without it).
    pub ratio: Option<f64>,
    /// Read RTs per read over the last quarter of the phase's windows (at least one).
    pub tail_rts_per_read: f64,
    /// Share of accesses this phase's popularity has in common with the previous phase's
    /// (`Σ min`; 1 for phase 0, which continues the warm-up).
    pub overlap_with_previous: f64,
    /// Operations from the phase's start to the end of its first window whose RTs per read
    /// are within `tolerance` above the per-shard bar (the global one without it); null:
    /// not within the phase.
    pub recovery_ops: Option<u64>,
    /// The same against the policy's own steady level: `steady_ratio` times this phase's
    /// bar. Null for phase 0 (the reference) or when not within the phase.
    pub recovery_to_steady_ops: Option<u64>,
}

/// One measurement window of a moving run.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct WindowReport {
    pub phase: u64,
    pub start_op: u64,
    pub ops: u64,
    pub reads: u64,
    pub read_rts: u64,
    pub rts_per_read: f64,
}

/// The moving part of a run's report (`moving` in the JSON).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MovingReport {
    /// jump or latest.
    pub kind: &'static str,
    /// Measured operations per phase (the warm-up ran phase 0's popularity).
    pub shift_every: u64,
    /// Keys the hot set moved per phase (jump: stride; latest: advance).
    pub step_keys: u64,
    /// Operations per window (tumbling, from each phase's start; exact counts).
    pub window_ops: u64,
    /// Recovery means a window within this fraction above its bar.
    pub tolerance: f64,
    /// Miss cost (RTs) the bars use: the run's measured one, as for the run's oracle.
    pub miss_cost: f64,
    /// The policy's own steady level: read RTs per read of the second half of phase 0's
    /// windows over phase 0's bar (null if that bar is 0).
    pub steady_ratio: Option<f64>,
    pub phases: Vec<PhaseReport>,
    pub windows: Vec<WindowReport>,
}

/// Operations from the phase's start to the end of its first window with reads whose RTs
/// per read are at most `target`.
fn first_within(windows: &[&WindowCounts], phase_start: u64, target: f64) -> Option<u64> {
    windows
        .iter()
        .find(|w| w.reads > 0 && w.rts_per_read() <= target)
        .map(|w| w.start + w.ops - phase_start)
}

/// Summarises the windows of a moving run by phase, given every phase's bars and its
/// overlap with the previous phase (both indexed by phase).
pub fn summarize(
    shift: &Shift,
    chooser: &ShiftedChooser,
    windows: &[WindowCounts],
    bars: &[PhaseBars],
    overlaps: &[f64],
    miss_cost: f64,
) -> MovingReport {
    let phases = windows.iter().map(|w| w.phase + 1).max().unwrap_or(0);
    let by_phase: Vec<Vec<&WindowCounts>> = (0..phases)
        .map(|p| windows.iter().filter(|w| w.phase == p).collect())
        .collect();
    let bar_of = |p: u64| -> Option<f64> {
        bars.get(p as usize)
            .map(|b| b.per_shard.unwrap_or(b.global))
    };
    let sum = |ws: &[&WindowCounts]| -> WindowCounts {
        let mut t = WindowCounts::default();
        for w in ws {
            t.ops += w.ops;
            t.reads += w.reads;
            t.read_rts += w.read_rts;
            t.hit_value += w.hit_value;
            t.hit_shortcut += w.hit_shortcut;
            t.miss += w.miss;
        }
        t
    };
    let steady_ratio = by_phase.first().and_then(|ws| {
        let b = bar_of(0)?;
        let half = sum(&ws[ws.len() / 2..]);
        (b > 0.0 && half.reads > 0).then(|| half.rts_per_read() / b)
    });
    let tol = 1.0 + RECOVERY_TOLERANCE;
    let reports = by_phase
        .iter()
        .enumerate()
        .map(|(p, ws)| {
            let p = p as u64;
            let t = sum(ws);
            let start = ws.first().map_or(0, |w| w.start);
            let tail = sum(&ws[ws.len() - ws.len().div_ceil(4).min(ws.len())..]);
            let bar = bar_of(p);
            let pb = bars.get(p as usize);
            PhaseReport {
                phase: p,
                start_op: start,
                ops: t.ops,
                reads: t.reads,
                rts_per_read: t.rts_per_read(),
                hit_value: super::ratio(t.hit_value, t.reads),
                hit_shortcut: super::ratio(t.hit_shortcut, t.reads),
                miss: super::ratio(t.miss, t.reads),
                oracle_per_shard_rts_per_read: pb.and_then(|b| b.per_shard),
                oracle_rts_per_read: pb.map_or(f64::NAN, |b| b.global),
                ratio: bar.filter(|&b| b > 0.0).map(|b| t.rts_per_read() / b),
                tail_rts_per_read: tail.rts_per_read(),
                overlap_with_previous: overlaps.get(p as usize).copied().unwrap_or(1.0),
                recovery_ops: bar.and_then(|b| first_within(ws, start, b * tol)),
                recovery_to_steady_ops: match (p, bar, steady_ratio) {
                    (1.., Some(b), Some(r)) => first_within(ws, start, r * b * tol),
                    _ => None,
                },
            }
        })
        .collect();
    MovingReport {
        kind: chooser.kind().name(),
        shift_every: shift.every,
        step_keys: chooser.step(),
        window_ops: shift.window_ops(),
        tolerance: RECOVERY_TOLERANCE,
        miss_cost,
        steady_ratio,
        phases: reports,
        windows: windows
            .iter()
            .map(|w| WindowReport {
                phase: w.phase,
                start_op: w.start,
                ops: w.ops,
                reads: w.reads,
                read_rts: w.read_rts,
                rts_per_read: w.rts_per_read(),
            })
            .collect(),
    }
}

/// The moving report of a run: every phase's bars and overlap, then [`summarize`].
pub fn report(
    cfg: &BenchConfig,
    shift: &Shift,
    chooser: &ShiftedChooser,
    windows: &[WindowCounts],
    map: Option<&SlotMap>,
    costs: Costs,
    miss_cost: f64,
) -> MovingReport {
    let phases = shift.phases(cfg.ops);
    let bars: Vec<PhaseBars> = (0..phases)
        .map(|p| phase_bars(chooser, p, cfg, map, costs, miss_cost))
        .collect();
    let mut overlaps = vec![1.0];
    let mut prev = chooser.key_probabilities(0);
    for p in 1..phases {
        let cur = chooser.key_probabilities(p);
        overlaps.push(overlap(&prev, &cur));
        prev = cur;
    }
    summarize(shift, chooser, windows, &bars, &overlaps, miss_cost)
}

/// The popularity of a whole moving run: every phase's, weighted by its operations (the
/// bar of a static cache that cannot follow the shifts).
pub fn run_popularity(shift: &Shift, chooser: &ShiftedChooser, ops: u64) -> Vec<f64> {
    let mut mix: Vec<f64> = Vec::new();
    for w in plan(ops, shift.every, shift.every) {
        let weight = (w.end - w.start) as f64 / ops.max(1) as f64;
        let p = chooser.key_probabilities(w.phase);
        if mix.is_empty() {
            mix = vec![0.0; p.len()];
        }
        for (m, q) in mix.iter_mut().zip(p) {
            *m += weight * q;
        }
    }
    mix
}

/// A human-readable table of the phases.
pub fn render(m: &MovingReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "moving     {} every {} ops, {} keys per phase; windows of {} ops (exact); recovery: first window within {:.0}% of the bar",
        m.kind,
        m.shift_every,
        m.step_keys,
        m.window_ops,
        m.tolerance * 100.0
    );
    if let Some(r) = m.steady_ratio {
        let _ = writeln!(
            s,
            "           steady level (2nd half of phase 0): {r:.3} x the per-shard oracle"
        );
    }
    let _ = writeln!(
        s,
        "  phase        ops  RTs/read  per-shard oracle  ratio  global oracle  last quarter  overlap  recovery (oracle+5%)  recovery (steady+5%)"
    );
    let ops = |x: Option<u64>| x.map_or_else(|| "not recovered".into(), |v| v.to_string());
    for p in &m.phases {
        let _ = writeln!(
            s,
            "  {:>5} {:>10} {:>9.3} {:>17} {:>6} {:>14.3} {:>13.3} {:>8.3} {:>21} {:>21}",
            p.phase,
            p.ops,
            p.rts_per_read,
            p.oracle_per_shard_rts_per_read
                .map_or_else(|| "-".into(), |o| format!("{o:.3}")),
            p.ratio.map_or_else(|| "-".into(), |r| format!("{r:.3}")),
            p.oracle_rts_per_read,
            p.tail_rts_per_read,
            p.overlap_with_previous,
            ops(p.recovery_ops),
            if p.phase == 0 {
                "(reference)".into()
            } else {
                ops(p.recovery_to_steady_ops)
            },
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::{Distribution, KeyChooser};
    use host_kn::dac::DacConfig;

    #[test]
    fn windows_tile_the_run_and_never_span_a_shift() {
        // 2.5 phases of 10, windows of 4: 4+4+2 | 4+4+2 | 4+1.
        let p = plan(25, 10, 4);
        let got: Vec<(u64, u64, u64)> = p.iter().map(|w| (w.start, w.end, w.phase)).collect();
        assert_eq!(
            got,
            [
                (0, 4, 0),
                (4, 8, 0),
                (8, 10, 0),
                (10, 14, 1),
                (14, 18, 1),
                (18, 20, 1),
                (20, 24, 2),
                (24, 25, 2)
            ]
        );
        assert_eq!(plan_len(25, 10, 4), p.len() as u64);
        for (ops, every, window) in [(1, 1, 1), (100, 7, 3), (1000, 1000, 1000), (999, 10, 10)] {
            let p = plan(ops, every, window);
            assert_eq!(plan_len(ops, every, window), p.len() as u64);
            assert_eq!(p.first().map(|w| w.start), Some(0));
            assert_eq!(p.last().map(|w| w.end), Some(ops));
            for w in &p {
                assert!(w.end > w.start && w.end - w.start <= window, "{w:?}");
                assert_eq!(w.start / every, w.phase, "{w:?}");
                assert_eq!((w.end - 1) / every, w.phase, "{w:?}");
            }
            assert!(p.windows(2).all(|x| x[0].end == x[1].start));
        }
        let s = Shift {
            every: 10,
            kind: ShiftKind::Jump,
            by: None,
            window: Some(4),
        };
        assert_eq!(s.phases(25), 3);
        assert!(s.validate(25, 100).is_ok());
        assert!(Shift { by: Some(200), ..s }.validate(25, 100).is_err());
        assert!(Shift {
            window: Some(11),
            ..s
        }
        .validate(25, 100)
        .is_err());
        assert!(Shift { every: 0, ..s }.validate(25, 100).is_err());
    }

    /// A phase's bars are those of its own popularity: for a jump, phase 0's key
    /// probabilities moved by the stride (built here independently) and put through
    /// `per_shard_oracle`; the global bar is the same in every phase (the popularity is a
    /// permutation of phase 0's), the per-shard one is not (other keys, other shards).
    #[test]
    fn every_phase_has_the_bars_of_its_own_popularity() {
        let cfg = BenchConfig {
            kns: 2,
            threads_per_kn: 2,
            keys: 4_000,
            ..BenchConfig::default()
        };
        let n = cfg.keys;
        let map = SlotMap::consistent(1, &[0, 1], host_kn::ownership::DEFAULT_VNODES);
        let dac = DacConfig::default();
        let (vc, sc) = (dac.value_charge(8, 1024), dac.shortcut_bytes());
        let costs = (vc, sc, 400 * vc, 100 * vc);
        let dist = Distribution::Zipf(0.99);
        let ch = ShiftedChooser::new(dist, n, ShiftKind::Jump, None, 4).expect("chooser");
        let base = KeyChooser::new(dist, n).key_probabilities();
        let stride = ch.step();
        assert!(stride > 0 && stride < n);
        let mut per_shard = Vec::new();
        for p in 0..4u64 {
            let mut moved = vec![0.0; n as usize];
            for (k, &q) in base.iter().enumerate() {
                moved[((k as u64 + p * stride) % n) as usize] = q;
            }
            let want = per_shard_oracle(&moved, 8, &map, 2, 2, (vc, sc, 100 * vc), 2.0);
            let b = phase_bars(&ch, p, &cfg, Some(&map), costs, 2.0);
            assert_eq!(b.per_shard, Some(want.rts_per_read), "phase {p}");
            let b0 = phase_bars(&ch, 0, &cfg, Some(&map), costs, 2.0);
            assert!((b.global - b0.global).abs() < 1e-12, "phase {p}");
            assert!(b.global <= want.rts_per_read + 1e-12);
            per_shard.push(want.rts_per_read);
        }
        assert!(
            per_shard.windows(2).any(|w| w[0] != w[1]),
            "the shards see other keys: {per_shard:?}"
        );
        // Without a map only the global bar.
        assert_eq!(
            phase_bars(&ch, 1, &cfg, None, costs, 2.0).per_shard,
            None,
            "no map"
        );
    }

    /// Recovery is the end of the first window within 5% of the phase's bar, counted from
    /// the phase's start; a phase that never gets there has none.
    #[test]
    fn recovery_is_counted_from_each_shift() {
        let shift = Shift {
            every: 40,
            kind: ShiftKind::Jump,
            by: None,
            window: Some(10),
        };
        let ch = ShiftedChooser::new(Distribution::Zipf(0.99), 100, ShiftKind::Jump, None, 3)
            .expect("chooser");
        // RTs per read of each window (10 reads each), by phase; the bars are 0.5, 0.4, 0.5.
        let rts: [[u64; 4]; 3] = [[6, 6, 5, 5], [15, 9, 5, 4], [20, 19, 18, 17]];
        let mut windows = Vec::new();
        for (p, phase) in rts.iter().enumerate() {
            for (i, &r) in phase.iter().enumerate() {
                windows.push(WindowCounts {
                    phase: p as u64,
                    start: p as u64 * 40 + i as u64 * 10,
                    ops: 10,
                    reads: 10,
                    read_rts: r,
                    hit_value: 10 - r.min(10),
                    ..WindowCounts::default()
                });
            }
        }
        let bars = [0.5, 0.4, 0.5].map(|b| PhaseBars {
            per_shard: Some(b),
            global: b - 0.01,
        });
        let m = summarize(&shift, &ch, &windows, &bars, &[1.0, 0.1, 0.2], 2.0);
        assert_eq!(m.phases.len(), 3);
        let got: Vec<_> = m.phases.iter().map(|p| p.recovery_ops).collect();
        // Phase 0: 0.6, 0.6, 0.5 (≤ 0.525) → 30; phase 1: 1.5, 0.9, 0.5, 0.4 ≤ 0.42 → 40 —
        // 0.5 is not within 5% of 0.4; phase 2 never below 0.525.
        assert_eq!(got, [Some(30), Some(40), None]);
        // Steady: phase 0's second half 0.5 / 0.5 = 1.0.
        assert_eq!(m.steady_ratio, Some(1.0));
        let steady: Vec<_> = m.phases.iter().map(|p| p.recovery_to_steady_ops).collect();
        assert_eq!(steady, [None, Some(40), None]);
        let p1 = &m.phases[1];
        assert_eq!((p1.start_op, p1.ops, p1.reads), (40, 40, 40));
        assert!((p1.rts_per_read - 33.0 / 40.0).abs() < 1e-12);
        assert!((p1.tail_rts_per_read - 0.4).abs() < 1e-12);
        assert_eq!(p1.ratio, Some(33.0 / 40.0 / 0.4));
        assert!((p1.oracle_rts_per_read - 0.39).abs() < 1e-12);
        assert_eq!(p1.overlap_with_previous, 0.1);
        assert_eq!(m.windows.len(), 12);
        assert_eq!(m.windows[5].rts_per_read, 0.9);
    }

    #[test]
    fn the_run_popularity_weights_phases_by_their_operations() {
        let shift = Shift {
            every: 30,
            kind: ShiftKind::Latest,
            by: Some(10),
            window: None,
        };
        let ch = ShiftedChooser::new(Distribution::Zipf(0.9), 50, ShiftKind::Latest, Some(10), 2)
            .expect("chooser");
        // 40 operations: phase 0 three quarters, phase 1 a quarter.
        let mix = run_popularity(&shift, &ch, 40);
        let (p0, p1) = (ch.key_probabilities(0), ch.key_probabilities(1));
        for k in 0..50 {
            assert!(
                (mix[k] - (0.75 * p0[k] + 0.25 * p1[k])).abs() < 1e-12,
                "key {k}"
            );
        }
        assert!((overlap(&p0, &p0) - 1.0).abs() < 1e-9);
        let o = overlap(&p0, &p1);
        assert!(o > 0.0 && o < 1.0, "{o}");
    }
}
