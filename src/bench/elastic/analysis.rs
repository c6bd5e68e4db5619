//! What a throughput series says about one reconfiguration: how deep and long the dip was
//! and how long until throughput settled again.
//!
//! Definitions (on a series of fixed intervals, 100 ms in the benchmark):
//! - the *window* of a reconfiguration runs from the interval in which it started up to
//!   the next boundary (a load change or another reconfiguration) or the end of the run;
//! - the *reference* is the median throughput of the up to [`REFERENCE_INTERVALS`]
//!   intervals before the start, after the previous boundary: the steady throughput the
//!   reconfiguration interrupted;
//! - the *longest dip* is the longest run of consecutive intervals below [`DIP_FRACTION`]
//!   of the reference, from the start until [`DIP_AFTER_INTERVALS`] after the
//!   reconfiguration ended (within the window): later stalls are not its doing;
//! - the *new steady level* is the median of the last [`REFERENCE_INTERVALS`] intervals of
//!   the window (at most its second half);
//! - the *time to steady state* is from the start to the first interval from which
//!   throughput stays within ±[`STEADY_TOLERANCE`] of the new level for
//!   [`STEADY_HOLD_INTERVALS`] intervals (the whole window, if it is shorter).

use serde::Serialize;

/// Intervals of the reference before a reconfiguration (2 s of 100 ms intervals).
pub const REFERENCE_INTERVALS: usize = 20;
/// How long after a reconfiguration's end a dip still counts as its own (2 s).
pub const DIP_AFTER_INTERVALS: usize = 20;
/// An interval is in a dip below this fraction of the reference.
pub const DIP_FRACTION: f64 = 0.5;
/// Steady means within this relative distance of the new level...
pub const STEADY_TOLERANCE: f64 = 0.2;
/// ...for this many intervals in a row (1 s of 100 ms intervals).
pub const STEADY_HOLD_INTERVALS: usize = 10;

/// How a series behaved around one reconfiguration; times in seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recovery {
    pub event: String,
    /// When the reconfiguration started.
    pub at_s: f64,
    /// Operations per interval before it (median).
    pub reference_ops: f64,
    pub longest_dip_s: f64,
    /// Lowest interval of the window as a fraction of the reference.
    pub min_fraction: f64,
    pub new_steady_ops: f64,
    /// `None` if the window never held steady.
    pub to_steady_s: Option<f64>,
}

fn median(v: &[u64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2] as f64
    } else {
        (s[n / 2 - 1] + s[n / 2]) as f64 / 2.0
    }
}

/// Analyses the reconfiguration that started in interval `start` and ended in `finish`
/// (labelled `event`), with `prev_boundary` the first interval after the previous boundary
/// and `next_boundary` the interval of the next one (or the series' length). `None` if no
/// interval precedes it.
pub fn recovery(
    ops: &[u64],
    interval_s: f64,
    event: &str,
    (start, finish): (usize, usize),
    prev_boundary: usize,
    next_boundary: usize,
) -> Option<Recovery> {
    let end = next_boundary.min(ops.len());
    if start >= end || start == 0 {
        return None;
    }
    let from = start
        .saturating_sub(REFERENCE_INTERVALS)
        .max(prev_boundary.min(start - 1));
    let reference = median(&ops[from..start]);
    let window = &ops[start..end];
    let threshold = reference * DIP_FRACTION;
    let (mut longest, mut run) = (0usize, 0usize);
    let dip_end = (finish.max(start) + 1 + DIP_AFTER_INTERVALS).min(end);
    for &o in &ops[start..dip_end] {
        if (o as f64) < threshold {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let min = window.iter().copied().min().unwrap_or(0) as f64;
    let tail = REFERENCE_INTERVALS.min(window.len().div_ceil(2)).max(1);
    let level = median(&window[window.len() - tail..]);
    let steady = |o: u64| (o as f64 - level).abs() <= STEADY_TOLERANCE * level;
    let hold = STEADY_HOLD_INTERVALS.min(window.len());
    let to_steady =
        (0..=window.len() - hold).find(|&k| window[k..k + hold].iter().all(|&o| steady(o)));
    let secs = |intervals: usize| (intervals as f64 * interval_s * 1e3).round() / 1e3;
    Some(Recovery {
        event: event.to_owned(),
        at_s: secs(start),
        reference_ops: reference,
        longest_dip_s: secs(longest),
        min_fraction: if reference > 0.0 {
            (min / reference * 1e3).round() / 1e3
        } else {
            1.0
        },
        new_steady_ops: level,
        to_steady_s: to_steady.map(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 30 intervals at 1000, then `dip` intervals at `low`, then 1000 again up to 80.
    fn series(dip: usize, low: u64) -> Vec<u64> {
        let mut v = vec![1000; 30];
        v.extend(std::iter::repeat_n(low, dip));
        v.resize(80, 1000);
        v
    }

    #[test]
    fn a_dip_is_the_longest_run_below_half_the_reference() {
        let r = recovery(&series(7, 100), 0.1, "add", (30, 30), 0, 80).expect("analysed");
        assert_eq!(r.reference_ops, 1000.0);
        assert!((r.longest_dip_s - 0.7).abs() < 1e-9, "{r:?}");
        assert!((r.min_fraction - 0.1).abs() < 1e-9);
        assert_eq!(r.new_steady_ops, 1000.0);
        assert!((r.to_steady_s.expect("steady") - 0.7).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn half_the_reference_is_not_a_dip_and_a_shallow_one_still_takes_time() {
        let r = recovery(&series(5, 500), 0.1, "add", (30, 30), 0, 80).expect("analysed");
        assert_eq!(r.longest_dip_s, 0.0);
        // 500 is 50% off the new level: not steady until it is over.
        assert!((r.to_steady_s.expect("steady") - 0.5).abs() < 1e-9);
    }

    #[test]
    fn separate_dips_count_separately() {
        let mut v = series(3, 0);
        for o in &mut v[40..45] {
            *o = 0;
        }
        let r = recovery(&v, 0.1, "add", (30, 30), 0, 80).expect("analysed");
        assert!((r.longest_dip_s - 0.5).abs() < 1e-9);
        assert!((r.to_steady_s.expect("steady") - 1.5).abs() < 1e-9);
    }

    #[test]
    fn the_reference_starts_after_the_previous_boundary() {
        // 15 intervals at the old load, 5 at the new one, then a dip and the new load.
        let mut v = vec![100; 15];
        v.extend(vec![700; 5]);
        v.extend(vec![300; 4]);
        v.extend(vec![700; 30]);
        let r = recovery(&v, 0.1, "add", (20, 20), 15, v.len()).expect("analysed");
        assert_eq!(r.reference_ops, 700.0);
        assert!((r.longest_dip_s - 0.4).abs() < 1e-9);
        // Without the boundary the reference would be the old load, and no dip seen.
        let r = recovery(&v, 0.1, "add", (20, 20), 0, v.len()).expect("analysed");
        assert_eq!(r.reference_ops, 100.0);
        assert_eq!(r.longest_dip_s, 0.0);
    }

    #[test]
    fn the_window_ends_at_the_next_boundary_and_the_new_level_can_differ() {
        // Throughput settles at 600 after the reconfiguration; the load changes at 60.
        let mut v = vec![1000; 30];
        v.extend(vec![0; 2]);
        v.extend(vec![600; 28]);
        v.extend(vec![0; 20]);
        let r = recovery(&v, 0.1, "remove", (30, 30), 0, 60).expect("analysed");
        assert!((r.longest_dip_s - 0.2).abs() < 1e-9, "{r:?}");
        assert_eq!(r.new_steady_ops, 600.0);
        assert!((r.to_steady_s.expect("steady") - 0.2).abs() < 1e-9);
    }

    #[test]
    fn never_steady_and_no_history() {
        let mut v = vec![1000; 30];
        v.extend((0..30).map(|i| if i % 2 == 0 { 100 } else { 1000 }));
        let r = recovery(&v, 0.1, "add", (30, 30), 0, 60).expect("analysed");
        assert_eq!(r.to_steady_s, None);
        assert!((r.longest_dip_s - 0.1).abs() < 1e-9);
        assert_eq!(recovery(&v, 0.1, "add", (0, 0), 0, 60), None);
        assert_eq!(recovery(&v, 0.1, "add", (30, 30), 0, 30), None);
    }

    #[test]
    fn a_stall_long_after_the_reconfiguration_is_not_its_dip() {
        // The reconfiguration takes 5 intervals (a 5-interval dip); a 10-interval stall
        // comes 30 intervals after its end.
        let mut v = series(5, 0);
        for o in &mut v[65..75] {
            *o = 0;
        }
        let r = recovery(&v, 0.1, "add", (30, 34), 0, 80).expect("analysed");
        assert!((r.longest_dip_s - 0.5).abs() < 1e-9, "{r:?}");
        // Counted when it comes within 2 s of the end.
        let r = recovery(&v, 0.1, "add", (30, 55), 0, 80).expect("analysed");
        assert!((r.longest_dip_s - 1.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3, 1, 2]), 2.0);
        assert_eq!(median(&[4, 1, 3, 2]), 2.5);
    }
}
