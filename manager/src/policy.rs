//! The elasticity policy: when to add or remove a KVS node and which keys to replicate.
//!
//! Pure (no I/O, no clock of its own) so the cluster manager, the in-process benchmark and the
//! tests feed it the same per-KN reports and get the same decisions. The rules follow the
//! original system, with thresholds scaled for small machines:
//! - add a KN when the latency objective is missed (some report's p99 above `slo_p99`) and some
//!   KN is busy (occupancy above `busy_add`): the system is overloaded, not just slow;
//! - remove the least occupied KN when every KN is idle (occupancy below `idle_remove`);
//! - replicate a key whose access count is an outlier (above mean + `hot_sigmas` standard
//!   deviations of the reported counts), dereplicate one that has cooled down (at or below
//!   mean - `cold_sigmas` deviations) or is no longer reported at all.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use dinomo_shared::manager_proto::{key_from_hex, LoadReport};

/// The policy's thresholds. `Default` gives the values the system is tuned for.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// How often a decision is made; calls in between decide nothing.
    pub period: Duration,
    /// The latency objective: a p99 above it is a reason to add a KN.
    pub slo_p99: Duration,
    /// Occupancy (0..1) above which a KN counts as busy.
    pub busy_add: f64,
    /// Occupancy (0..1) below which a KN counts as idle.
    pub idle_remove: f64,
    /// A key is hot when its count exceeds mean + `hot_sigmas` * stddev.
    pub hot_sigmas: f64,
    /// A replicated key is cold when its count is at or below mean - `cold_sigmas` * stddev.
    pub cold_sigmas: f64,
    /// Never remove below this many KNs.
    pub min_kns: usize,
    /// Never add beyond this many KNs.
    pub max_kns: usize,
    /// Quiet time after an add or remove before the next one. It counts from the first decision
    /// after the change, because the reports of the period in which the change happened mix the
    /// old and the new configuration and say nothing reliable about the new one.
    pub cooldown: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let period = Duration::from_secs(2);
        PolicyConfig {
            period,
            slo_p99: Duration::from_millis(16),
            busy_add: 0.20,
            idle_remove: 0.15,
            hot_sigmas: 3.0,
            cold_sigmas: 1.0,
            min_kns: 1,
            max_kns: 16,
            cooldown: period,
        }
    }
}

/// What one KN measured over the last period.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KnReport {
    pub kn: u16,
    pub ops_per_sec: f64,
    /// Fraction of the period the KN's shard threads spent handling requests (0..1).
    pub occupancy: f64,
    /// 99th percentile request latency seen by clients of this KN.
    pub p99: Duration,
    /// The KN's hottest keys with their access counts over the period.
    pub hot_keys: Vec<(Vec<u8>, u64)>,
}

/// One action for the cluster to take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    AddKn,
    RemoveKn(u16),
    Replicate(Vec<u8>),
    Dereplicate(Vec<u8>),
}

/// The policy's state between decisions: when it last decided and when it last scaled.
#[derive(Debug)]
pub struct Policy {
    config: PolicyConfig,
    last_decision: Option<Instant>,
    last_scale: Option<Instant>,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        Policy {
            config,
            last_decision: None,
            last_scale: None,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Decides what to do given the reports of every live KN (one each) and the keys currently
    /// replicated. Returns nothing if less than a period passed since the last decision. At most
    /// one add or remove per decision; it comes first, replication changes follow.
    pub fn decide(
        &mut self,
        now: Instant,
        reports: &[KnReport],
        replicated: &[Vec<u8>],
    ) -> Vec<Decision> {
        if let Some(last) = self.last_decision {
            if now.saturating_duration_since(last) < self.config.period {
                return Vec::new();
            }
        }
        self.last_decision = Some(now);
        let mut decisions = Vec::new();
        if let Some(scale) = self.scale(now, reports) {
            self.last_scale = Some(now);
            decisions.push(scale);
        }
        decisions.extend(self.replication(reports, replicated));
        decisions
    }

    fn in_cooldown(&self, now: Instant) -> bool {
        self.last_scale.is_some_and(|at| {
            now.saturating_duration_since(at) < self.config.period + self.config.cooldown
        })
    }

    fn scale(&self, now: Instant, reports: &[KnReport]) -> Option<Decision> {
        if reports.is_empty() || self.in_cooldown(now) {
            return None;
        }
        let c = &self.config;
        let kns = reports.len();
        let slow = reports.iter().any(|r| r.p99 > c.slo_p99);
        let busy = reports.iter().any(|r| r.occupancy > c.busy_add);
        if slow && busy && kns < c.max_kns {
            return Some(Decision::AddKn);
        }
        let idle = reports.iter().all(|r| r.occupancy < c.idle_remove);
        if idle && kns > c.min_kns {
            // The least occupied; among equals the highest id (the most recently added).
            let victim = reports.iter().min_by(|a, b| {
                a.occupancy
                    .total_cmp(&b.occupancy)
                    .then_with(|| b.kn.cmp(&a.kn))
            })?;
            return Some(Decision::RemoveKn(victim.kn));
        }
        None
    }

    fn replication(&self, reports: &[KnReport], replicated: &[Vec<u8>]) -> Vec<Decision> {
        // A key reported by several KNs (e.g. served by replicas) counts once, summed.
        let mut counts: HashMap<&[u8], u64> = HashMap::new();
        for r in reports {
            for (key, count) in &r.hot_keys {
                // Counts come from the KNs' reports: saturate rather than overflow.
                let c = counts.entry(key.as_slice()).or_default();
                *c = c.saturating_add(*count);
            }
        }
        let mut decisions = Vec::new();
        let (mean, stddev) = mean_stddev(counts.values().map(|&c| c as f64));
        let hot_above = mean + self.config.hot_sigmas * stddev;
        let cold_at = mean - self.config.cold_sigmas * stddev;
        let already: HashSet<&[u8]> = replicated.iter().map(Vec::as_slice).collect();
        let mut hot: Vec<(&[u8], u64)> = counts
            .iter()
            .filter(|(key, &count)| count as f64 > hot_above && !already.contains(*key))
            .map(|(key, &count)| (*key, count))
            .collect();
        // Hottest first, then by key, so the order does not depend on hashing.
        hot.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        decisions.extend(
            hot.into_iter()
                .map(|(k, _)| Decision::Replicate(k.to_vec())),
        );
        for key in replicated {
            let cold = match counts.get(key.as_slice()) {
                Some(&count) => count as f64 <= cold_at,
                None => true,
            };
            if cold {
                decisions.push(Decision::Dereplicate(key.clone()));
            }
        }
        decisions
    }
}

/// Population mean and standard deviation; (0, 0) for no values.
fn mean_stddev(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.clone().sum::<f64>() / n as f64;
    let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

/// What the load policy asks the manager to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    AddKn,
    RemoveKn(u16),
    /// Replicate this key on every live KN.
    Replicate(Vec<u8>),
    /// Return this key to its owner alone.
    Dereplicate(Vec<u8>),
}

/// A load policy as the manager drives it: every `period`, the latest load report of every
/// live KN and the keys replicated now in, actions out.
pub trait LoadPolicy: Send {
    fn period(&self) -> Duration;
    fn decide(
        &mut self,
        now: Instant,
        loads: &[(u16, LoadReport)],
        replicated: &[Vec<u8>],
    ) -> Vec<PolicyAction>;
}

/// The hot keys of a report as bytes: exactly (from the hexadecimal list) when the KN sent
/// it, else the lossy names (a KN that predates the exact list; keys that are not short
/// UTF-8 are then not found again when replicated).
fn report_keys(l: &LoadReport) -> Vec<(Vec<u8>, u64)> {
    let exact: Option<Vec<(Vec<u8>, u64)>> = l
        .hot_keys_hex
        .iter()
        .map(|(k, c)| key_from_hex(k).map(|k| (k, *c)))
        .collect();
    match exact {
        Some(keys) if !keys.is_empty() => keys,
        _ => l
            .hot_keys
            .iter()
            .map(|(k, c)| (k.as_bytes().to_vec(), *c))
            .collect(),
    }
}

/// The elasticity policy drives the multi-process cluster: it adds and removes KNs and
/// replicates and dereplicates hot keys.
impl LoadPolicy for Policy {
    fn period(&self) -> Duration {
        self.config().period
    }

    fn decide(
        &mut self,
        now: Instant,
        loads: &[(u16, LoadReport)],
        replicated: &[Vec<u8>],
    ) -> Vec<PolicyAction> {
        let reports: Vec<KnReport> = loads
            .iter()
            .map(|(kn, l)| KnReport {
                kn: *kn,
                ops_per_sec: l.ops_per_sec,
                occupancy: l.occupancy,
                p99: Duration::from_micros(l.p99_us),
                hot_keys: report_keys(l),
            })
            .collect();
        Policy::decide(self, now, &reports, replicated)
            .into_iter()
            .map(|d| match d {
                Decision::AddKn => PolicyAction::AddKn,
                Decision::RemoveKn(kn) => PolicyAction::RemoveKn(kn),
                Decision::Replicate(k) => PolicyAction::Replicate(k),
                Decision::Dereplicate(k) => PolicyAction::Dereplicate(k),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn report(kn: u16, occupancy: f64, p99_ms: u64) -> KnReport {
        KnReport {
            kn,
            ops_per_sec: 1000.0,
            occupancy,
            p99: MS * p99_ms as u32,
            hot_keys: Vec::new(),
        }
    }

    fn policy() -> (Policy, Instant) {
        (Policy::new(PolicyConfig::default()), Instant::now())
    }

    fn period() -> Duration {
        PolicyConfig::default().period
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = PolicyConfig::default();
        assert_eq!(c.period, Duration::from_secs(2));
        assert_eq!(c.slo_p99, Duration::from_millis(16));
        assert_eq!((c.busy_add, c.idle_remove), (0.20, 0.15));
        assert_eq!((c.hot_sigmas, c.cold_sigmas), (3.0, 1.0));
        assert_eq!((c.min_kns, c.max_kns), (1, 16));
        assert_eq!(c.cooldown, c.period);
    }

    #[test]
    fn adds_a_kn_when_slow_and_busy() {
        let (mut p, t0) = policy();
        let reports = [report(0, 0.9, 40), report(1, 0.5, 5)];
        assert_eq!(p.decide(t0, &reports, &[]), vec![Decision::AddKn]);
    }

    #[test]
    fn slow_but_not_busy_or_busy_but_fast_adds_nothing() {
        let (mut p, t0) = policy();
        // Slow, but nobody is busy: the latency comes from elsewhere.
        assert!(p.decide(t0, &[report(0, 0.18, 40)], &[]).is_empty());
        // Busy, but within the objective.
        let t1 = t0 + period();
        assert!(p.decide(t1, &[report(0, 0.9, 16)], &[]).is_empty());
    }

    #[test]
    fn never_adds_beyond_max_kns() {
        let mut p = Policy::new(PolicyConfig {
            max_kns: 2,
            ..PolicyConfig::default()
        });
        let reports = [report(0, 0.9, 40), report(1, 0.9, 40)];
        assert!(p.decide(Instant::now(), &reports, &[]).is_empty());
    }

    #[test]
    fn removes_the_least_occupied_kn_when_all_are_idle() {
        let (mut p, t0) = policy();
        let reports = [report(0, 0.10, 1), report(3, 0.02, 1), report(5, 0.05, 1)];
        assert_eq!(p.decide(t0, &reports, &[]), vec![Decision::RemoveKn(3)]);
    }

    #[test]
    fn remove_ties_go_to_the_highest_id() {
        let (mut p, t0) = policy();
        let reports = [report(2, 0.0, 1), report(7, 0.0, 1), report(4, 0.0, 1)];
        assert_eq!(p.decide(t0, &reports, &[]), vec![Decision::RemoveKn(7)]);
    }

    #[test]
    fn one_busy_kn_or_min_kns_prevents_removal() {
        let (mut p, t0) = policy();
        assert!(p
            .decide(t0, &[report(0, 0.01, 1), report(1, 0.16, 1)], &[])
            .is_empty());
        assert!(p
            .decide(t0 + period(), &[report(0, 0.0, 1)], &[])
            .is_empty());
    }

    #[test]
    fn decides_at_most_once_per_period() {
        let (mut p, t0) = policy();
        let idle = [report(0, 0.0, 1), report(1, 0.0, 1), report(2, 0.0, 1)];
        assert_eq!(p.decide(t0, &idle, &[]).len(), 1);
        // Not even a replication decision within the period.
        let hot = hot_reports();
        assert!(p.decide(t0 + period() - MS, &hot, &[]).is_empty());
    }

    #[test]
    fn cooldown_skips_the_period_after_a_change_then_allows_the_next() {
        let (mut p, t0) = policy();
        let overloaded = [report(0, 0.9, 40)];
        assert_eq!(p.decide(t0, &overloaded, &[]), vec![Decision::AddKn]);
        // The next period's reports straddle the change: no scaling.
        let t1 = t0 + period();
        assert!(p.decide(t1, &overloaded, &[]).is_empty());
        // A cooldown (one period) later, scaling is allowed again.
        let t2 = t1 + period();
        assert_eq!(p.decide(t2, &overloaded, &[]), vec![Decision::AddKn]);
    }

    #[test]
    fn zero_cooldown_allows_scaling_on_the_next_decision() {
        let mut p = Policy::new(PolicyConfig {
            cooldown: Duration::ZERO,
            ..PolicyConfig::default()
        });
        let t0 = Instant::now();
        let idle = [report(0, 0.0, 1), report(1, 0.0, 1), report(2, 0.0, 1)];
        assert_eq!(p.decide(t0, &idle, &[]), vec![Decision::RemoveKn(2)]);
        let idle = &idle[..2];
        assert_eq!(
            p.decide(t0 + period(), idle, &[]),
            vec![Decision::RemoveKn(1)]
        );
    }

    #[test]
    fn replication_is_not_held_back_by_the_cooldown() {
        let (mut p, t0) = policy();
        assert_eq!(
            p.decide(t0, &[report(0, 0.9, 40)], &[]),
            vec![Decision::AddKn]
        );
        let d = p.decide(t0 + period(), &hot_reports(), &[]);
        assert_eq!(d, vec![Decision::Replicate(b"hot".to_vec())]);
    }

    #[test]
    fn empty_reports_decide_nothing() {
        let (mut p, t0) = policy();
        assert!(p.decide(t0, &[], &[]).is_empty());
    }

    /// Neither busy nor idle KNs seeing twenty keys at 10 accesses, "hot" at 1000 (counted on two KNs), "warm" at 30.
    fn hot_reports() -> Vec<KnReport> {
        let mut a = report(0, 0.17, 1);
        let mut b = report(1, 0.17, 1);
        for i in 0..20u8 {
            a.hot_keys.push((vec![b'k', i], 10));
        }
        a.hot_keys.push((b"hot".to_vec(), 600));
        b.hot_keys.push((b"hot".to_vec(), 400));
        b.hot_keys.push((b"warm".to_vec(), 30));
        vec![a, b]
    }

    #[test]
    fn replicates_outliers_summed_over_kns() {
        let (mut p, t0) = policy();
        let d = p.decide(t0, &hot_reports(), &[]);
        assert_eq!(d, vec![Decision::Replicate(b"hot".to_vec())]);
    }

    #[test]
    fn a_summed_count_can_make_a_key_hot_that_no_single_kn_sees_as_hot() {
        // 16 keys at 10, "other" at 70 on one KN, "split" at 70 on each of two (140 in all).
        let mut a = report(0, 0.17, 1);
        let mut b = report(1, 0.17, 1);
        for i in 0..16u8 {
            a.hot_keys.push((vec![b'k', i], 10));
        }
        a.hot_keys.push((b"other".to_vec(), 70));
        a.hot_keys.push((b"split".to_vec(), 70));
        b.hot_keys.push((b"split".to_vec(), 70));
        let (mut p, t0) = policy();
        assert_eq!(
            p.decide(t0, &[a.clone(), b], &[]),
            vec![Decision::Replicate(b"split".to_vec())]
        );
        // Counted on one KN only, 70 is not an outlier among these counts.
        let (mut p, t0) = policy();
        assert!(p.decide(t0, &[a], &[]).is_empty());
    }

    #[test]
    fn does_not_replicate_a_key_twice() {
        let (mut p, t0) = policy();
        let d = p.decide(t0, &hot_reports(), &[b"hot".to_vec()]);
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn uniform_counts_have_no_outlier() {
        let mut a = report(0, 0.17, 1);
        for i in 0..10u8 {
            a.hot_keys.push((vec![i], 100));
        }
        let (mut p, t0) = policy();
        assert!(p.decide(t0, &[a], &[]).is_empty());
    }

    #[test]
    fn dereplicates_cold_and_vanished_keys() {
        // Counts 10 x 8, "cool" at 2, "hot" at 1000: mean ~108, stddev ~297.
        let mut a = report(0, 0.17, 1);
        for i in 0..8u8 {
            a.hot_keys.push((vec![b'k', i], 10));
        }
        a.hot_keys.push((b"cool".to_vec(), 2));
        a.hot_keys.push((b"hot".to_vec(), 1000));
        let mut p = Policy::new(PolicyConfig {
            cold_sigmas: 0.25,
            ..PolicyConfig::default()
        });
        let replicated = [b"hot".to_vec(), b"cool".to_vec(), b"gone".to_vec()];
        let d = p.decide(Instant::now(), &[a], &replicated);
        assert_eq!(
            d,
            vec![
                Decision::Dereplicate(b"cool".to_vec()),
                Decision::Dereplicate(b"gone".to_vec())
            ]
        );
    }

    #[test]
    fn scaling_comes_before_replication() {
        let mut reports = hot_reports();
        reports[0].occupancy = 0.9;
        reports[0].p99 = MS * 50;
        let (mut p, t0) = policy();
        assert_eq!(
            p.decide(t0, &reports, &[]),
            vec![Decision::AddKn, Decision::Replicate(b"hot".to_vec())]
        );
    }

    #[test]
    fn the_manager_policy_replicates_exact_keys_and_knows_what_is_replicated() {
        let load = |keys: &[(&[u8], u64)]| LoadReport {
            ops_per_sec: 1000.0,
            occupancy: 0.17,
            p99_us: 1000,
            hot_keys: keys
                .iter()
                .map(|(k, c)| (String::from_utf8_lossy(k).into_owned(), *c))
                .collect(),
            hot_keys_hex: keys
                .iter()
                .map(|(k, c)| (dinomo_shared::manager_proto::key_hex(k), *c))
                .collect(),
        };
        let mut keys: Vec<(Vec<u8>, u64)> = (0..20u8).map(|i| (vec![b'k', i], 10)).collect();
        keys.push((b"hot\xff".to_vec(), 1000));
        let refs: Vec<(&[u8], u64)> = keys.iter().map(|(k, c)| (&k[..], *c)).collect();
        let loads = [(0, load(&refs))];
        let mut p = Policy::new(PolicyConfig::default());
        let t0 = Instant::now();
        // Not valid UTF-8: only the exact list names it.
        assert_eq!(
            LoadPolicy::decide(&mut p, t0, &loads, &[]),
            vec![PolicyAction::Replicate(b"hot\xff".to_vec())]
        );
        // Replicated already and still hot: nothing; once it is gone from the reports, it
        // is returned to its owner.
        let t1 = t0 + period();
        assert!(LoadPolicy::decide(&mut p, t1, &loads, &[b"hot\xff".to_vec()]).is_empty());
        let cold = [(0, load(&refs[..20]))];
        assert_eq!(
            LoadPolicy::decide(&mut p, t1 + period(), &cold, &[b"hot\xff".to_vec()]),
            vec![PolicyAction::Dereplicate(b"hot\xff".to_vec())]
        );
    }

    #[test]
    fn mean_and_stddev() {
        assert_eq!(mean_stddev([].into_iter()), (0.0, 0.0));
        let (m, s) = mean_stddev([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0].into_iter());
        assert_eq!((m, s), (5.0, 2.0));
    }
}
