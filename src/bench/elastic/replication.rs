//! Hot-key replication in the scenario's policy mode: the policy's `Replicate(key)` is
//! acted on by replicating the key to every live KN (its owner included; skipped while only
//! one KN is live, where a replica set would be the owner alone), `Dereplicate(key)` by
//! ending that. Every change, refusal and failure is recorded, never dropped; a failure
//! does not end the run. DINOMO-N has no indirect cells, so its replications are recorded as
//! skipped. Which keys are replicated is always asked of the system, because a
//! reconfiguration ends the replication of keys whose owner or replicas change.

use serde::Serialize;

use dinomo_manager::policy::Decision;

/// What the scenario needs of a system to replicate keys.
pub(super) trait Replicator {
    fn live_kns(&self) -> Vec<u16>;
    /// KN `kn`'s hottest keys (user keys) since the last call, with their counts.
    fn hot_keys(&self, kn: u16) -> Vec<(Vec<u8>, u64)>;
    /// The keys replicated now.
    fn replicated(&self) -> Vec<Vec<u8>>;
    /// Why the system cannot replicate keys at all, if it cannot.
    fn cannot_replicate(&self) -> Option<&'static str>;
    /// Replicates `key` to `kns` (the owner is always one of the replicas).
    fn replicate(&mut self, key: &[u8], kns: &[u16]) -> anyhow::Result<()>;
    fn dereplicate(&mut self, key: &[u8]) -> anyhow::Result<()>;
}

/// One replication change as the results report it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicationResult {
    /// "replicate" or "dereplicate".
    pub action: &'static str,
    /// The key, printable (see [`show_key`]).
    pub key: String,
    pub started_s: f64,
    /// To the microsecond: a change takes about a millisecond.
    pub took_s: f64,
    /// KNs serving the key afterwards (0 unless the change was made).
    pub kns: usize,
    /// "done", "skipped: <why>", "failed: <error>", or "ended by <reconfiguration>".
    pub outcome: String,
}

impl ReplicationResult {
    pub fn done(&self) -> bool {
        self.outcome == "done"
    }

    /// The label of the event in the CSV (no `,` or `;`, which separate fields and events).
    pub fn event(&self) -> String {
        let what = format!("{}:{}", self.action, self.key);
        let label = if self.done() {
            format!("{what} {:.2} ms", self.took_s * 1e3)
        } else {
            format!("{what} {}", self.outcome)
        };
        label.replace([',', ';'], " ")
    }
}

/// Counts of replication changes over a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplicationCounts {
    pub replicated: u64,
    pub dereplicated: u64,
    /// Replications ended by adding or removing a KN.
    pub ended_by_reconfig: u64,
    /// Decisions the system could not act on (DINOMO-N).
    pub skipped: u64,
    pub failed: u64,
    /// Keys still replicated when the run ended.
    pub at_end: usize,
}

impl ReplicationCounts {
    pub fn of(log: &[ReplicationResult], at_end: usize) -> Self {
        let mut c = ReplicationCounts {
            at_end,
            ..Self::default()
        };
        for r in log {
            match (r.action, r.outcome.as_str()) {
                ("replicate", "done") => c.replicated += 1,
                ("dereplicate", "done") => c.dereplicated += 1,
                (_, o) if o.starts_with("ended by") => c.ended_by_reconfig += 1,
                (_, o) if o.starts_with("skipped") => c.skipped += 1,
                _ => c.failed += 1,
            }
        }
        c
    }
}

/// A key as text: itself if it is printable ASCII without separators, else hex.
pub fn show_key(key: &[u8]) -> String {
    let plain = key
        .iter()
        .all(|&b| b.is_ascii_graphic() && !matches!(b, b',' | b';' | b':'));
    if plain && !key.is_empty() {
        String::from_utf8_lossy(key).into_owned()
    } else {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

/// Acts on the replication decisions among `decisions` (others are ignored), in order.
/// `clock` gives seconds from the start of the run.
pub(super) fn act<R: Replicator>(
    sys: &mut R,
    decisions: &[Decision],
    clock: impl Fn() -> f64,
) -> Vec<ReplicationResult> {
    let mut out = Vec::new();
    for d in decisions {
        let (action, key) = match d {
            Decision::Replicate(k) => ("replicate", k),
            Decision::Dereplicate(k) => ("dereplicate", k),
            Decision::AddKn | Decision::RemoveKn(_) => continue,
        };
        let started = clock();
        let result = |kns: usize, outcome: String, finished: f64| ReplicationResult {
            action,
            key: show_key(key),
            started_s: round_ms(started),
            took_s: ((finished - started) * 1e6).round() / 1e6,
            kns,
            outcome,
        };
        if let Some(why) = sys.cannot_replicate() {
            out.push(result(0, format!("skipped: {why}"), started));
            continue;
        }
        let r = match d {
            Decision::Replicate(_) => {
                let kns = sys.live_kns();
                if kns.len() < 2 {
                    out.push(result(0, "skipped: one live KN".into(), started));
                    continue;
                }
                sys.replicate(key, &kns).map(|()| kns.len())
            }
            _ => {
                // Already ended by a reconfiguration of this period: recorded there.
                if !sys.replicated().contains(key) {
                    continue;
                }
                sys.dereplicate(key).map(|()| 1)
            }
        };
        let finished = clock();
        out.push(match r {
            Ok(kns) => result(kns, "done".into(), finished),
            Err(e) => result(0, format!("failed: {e:#}"), finished),
        });
    }
    out
}

/// The replications a reconfiguration ended: keys replicated `before` and not `after`.
pub(super) fn ended_by(
    before: &[Vec<u8>],
    after: &[Vec<u8>],
    reconfig: &str,
    at: f64,
) -> Vec<ReplicationResult> {
    before
        .iter()
        .filter(|k| !after.contains(k))
        .map(|k| ReplicationResult {
            action: "dereplicate",
            key: show_key(k),
            started_s: round_ms(at),
            took_s: 0.0,
            kns: 1,
            outcome: format!("ended by {reconfig}"),
        })
        .collect()
}

fn round_ms(s: f64) -> f64 {
    (s * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use dinomo_manager::policy::{KnReport, Policy, PolicyConfig};

    /// A KN's hot keys with their counts.
    type Hot = Vec<(Vec<u8>, u64)>;

    /// A system of `kns` KNs whose replica table is a list; `fail` makes every replicate
    /// fail (as when the DPM has no free cell), `shared_nothing` makes it DINOMO-N-like.
    #[derive(Default)]
    struct Fake {
        kns: Vec<u16>,
        replicated: Vec<(Vec<u8>, Vec<u16>)>,
        hot: Vec<(u16, Hot)>,
        fail: bool,
        shared_nothing: bool,
    }

    impl Replicator for Fake {
        fn live_kns(&self) -> Vec<u16> {
            self.kns.clone()
        }
        fn hot_keys(&self, kn: u16) -> Vec<(Vec<u8>, u64)> {
            self.hot
                .iter()
                .find(|(k, _)| *k == kn)
                .map(|(_, h)| h.clone())
                .unwrap_or_default()
        }
        fn replicated(&self) -> Vec<Vec<u8>> {
            self.replicated.iter().map(|(k, _)| k.clone()).collect()
        }
        fn cannot_replicate(&self) -> Option<&'static str> {
            self.shared_nothing.then_some("shared-nothing")
        }
        fn replicate(&mut self, key: &[u8], kns: &[u16]) -> anyhow::Result<()> {
            if self.fail {
                anyhow::bail!("no free indirect cell");
            }
            if self.replicated.iter().any(|(k, _)| k == key) {
                anyhow::bail!("the key is already replicated");
            }
            self.replicated.push((key.to_vec(), kns.to_vec()));
            Ok(())
        }
        fn dereplicate(&mut self, key: &[u8]) -> anyhow::Result<()> {
            let before = self.replicated.len();
            self.replicated.retain(|(k, _)| k != key);
            anyhow::ensure!(self.replicated.len() < before, "the key is not replicated");
            Ok(())
        }
    }

    /// Twenty keys at 10 accesses on KN 0, "hot" at 500 on KN 1.
    fn skewed() -> Fake {
        let mut cold: Hot = (0..20u8).map(|i| (vec![b'k', i], 10)).collect();
        cold.sort();
        Fake {
            kns: vec![0, 1, 2],
            hot: vec![(0, cold), (1, vec![(b"hot".to_vec(), 500)])],
            ..Fake::default()
        }
    }

    /// One period of the scenario's loop: reports from the system, a decision, actions.
    fn period(sys: &mut Fake, p: &mut Policy, now: Instant) -> Vec<ReplicationResult> {
        let reports: Vec<KnReport> = sys
            .live_kns()
            .into_iter()
            .map(|kn| KnReport {
                kn,
                occupancy: 0.17,
                hot_keys: sys.hot_keys(kn),
                ..KnReport::default()
            })
            .collect();
        let replicated = sys.replicated();
        let decisions = p.decide(now, &reports, &replicated);
        act(sys, &decisions, || 1.0)
    }

    #[test]
    fn a_hot_key_is_replicated_to_every_live_kn_then_dereplicated_when_it_cools() {
        let mut sys = skewed();
        let mut p = Policy::new(PolicyConfig::default());
        let t0 = Instant::now();
        let log = period(&mut sys, &mut p, t0);
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!((log[0].action, log[0].key.as_str()), ("replicate", "hot"));
        assert!(log[0].done(), "{log:?}");
        assert_eq!(log[0].kns, 3);
        assert_eq!(sys.replicated, vec![(b"hot".to_vec(), vec![0, 1, 2])]);
        assert_eq!(log[0].event(), "replicate:hot 0.00 ms");

        // Still hot: nothing more to do.
        let t1 = t0 + Duration::from_secs(10);
        assert!(period(&mut sys, &mut p, t1).is_empty());

        // No longer reported at all: ended.
        sys.hot.retain(|(kn, _)| *kn != 1);
        let log = period(&mut sys, &mut p, t1 + Duration::from_secs(10));
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!((log[0].action, log[0].done()), ("dereplicate", true));
        assert!(sys.replicated.is_empty());
    }

    #[test]
    fn failures_and_shared_nothing_systems_are_recorded_and_change_nothing() {
        let mut sys = Fake {
            fail: true,
            ..skewed()
        };
        let mut p = Policy::new(PolicyConfig::default());
        let log = period(&mut sys, &mut p, Instant::now());
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].outcome, "failed: no free indirect cell");
        assert_eq!(
            log[0].event(),
            "replicate:hot failed: no free indirect cell"
        );
        assert!(sys.replicated.is_empty());

        let mut sys = Fake {
            shared_nothing: true,
            ..skewed()
        };
        let mut p = Policy::new(PolicyConfig::default());
        let log = period(&mut sys, &mut p, Instant::now());
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].outcome, "skipped: shared-nothing");
        assert!(sys.replicated.is_empty());
        let counts = ReplicationCounts::of(&log, 0);
        assert_eq!(
            (counts.skipped, counts.replicated, counts.failed),
            (1, 0, 0)
        );
    }

    #[test]
    fn with_one_live_kn_a_replication_is_skipped() {
        let mut sys = Fake {
            kns: vec![1],
            ..skewed()
        };
        let log = act(&mut sys, &[Decision::Replicate(b"hot".to_vec())], || 0.0);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].outcome, "skipped: one live KN");
        assert!(sys.replicated.is_empty());
    }

    #[test]
    fn a_dereplication_of_a_key_a_reconfiguration_already_ended_is_not_attempted() {
        let mut sys = skewed();
        let log = act(&mut sys, &[Decision::Dereplicate(b"gone".to_vec())], || 0.0);
        assert!(log.is_empty(), "{log:?}");
    }

    #[test]
    fn replications_ended_by_a_reconfiguration_are_listed_and_counted() {
        let before = [b"a".to_vec(), b"b".to_vec()];
        let ended = ended_by(&before, &[b"b".to_vec()], "remove kn1", 2.5);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].key, "a");
        assert_eq!(ended[0].event(), "dereplicate:a ended by remove kn1");
        let mut log = ended;
        log.push(ReplicationResult {
            action: "replicate",
            key: "b".into(),
            started_s: 1.0,
            took_s: 0.001,
            kns: 2,
            outcome: "done".into(),
        });
        let c = ReplicationCounts::of(&log, 1);
        assert_eq!(
            c,
            ReplicationCounts {
                replicated: 1,
                ended_by_reconfig: 1,
                at_end: 1,
                ..ReplicationCounts::default()
            }
        );
    }

    #[test]
    fn keys_are_shown_as_text_or_hex() {
        assert_eq!(show_key(b"00ab"), "00ab");
        assert_eq!(show_key(b"a,b"), "0x612c62");
        assert_eq!(show_key(&[0, 255]), "0x00ff");
        assert_eq!(show_key(b""), "0x");
    }
}
