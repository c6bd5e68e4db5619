//! A fixed reconfiguration schedule (`--schedule "t=10:add,t=40:remove"`), the alternative
//! to the policy: the same moves at the same times for every system, so their dips can be
//! compared one to one.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What to do at a scheduled time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a KN and give it its share of the slots.
    Add,
    /// Remove the most recently added KN (`remove`), or a given one (`remove=<kn>`).
    Remove(Option<u16>),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Add => f.write_str("add"),
            Action::Remove(None) => f.write_str("remove"),
            Action::Remove(Some(kn)) => write!(f, "remove={kn}"),
        }
    }
}

/// One scheduled reconfiguration: `at` after the start of the measured run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub at: Duration,
    pub action: Action,
}

/// Reconfigurations in strictly increasing time order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule(pub Vec<Step>);

impl FromStr for Schedule {
    type Err = String;

    /// Parses `t=<seconds>:<add|remove|remove=<kn>>` items separated by commas.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut steps: Vec<Step> = Vec::new();
        for item in s.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!(
                    "--schedule {s:?}: empty item; expected t=<seconds>:add or t=<seconds>:remove, comma-separated"
                ));
            }
            let step = parse_step(item).map_err(|e| format!("--schedule item {item:?}: {e}"))?;
            if let Some(prev) = steps.last() {
                if step.at <= prev.at {
                    return Err(format!(
                        "--schedule item {item:?}: times must increase (previous at {} s)",
                        prev.at.as_secs_f64()
                    ));
                }
            }
            steps.push(step);
        }
        Ok(Schedule(steps))
    }
}

fn parse_step(item: &str) -> Result<Step, String> {
    let rest = item
        .strip_prefix("t=")
        .ok_or("expected t=<seconds>:<action>")?;
    let (t, action) = rest
        .split_once(':')
        .ok_or("expected t=<seconds>:<action>")?;
    let secs: f64 = t
        .trim()
        .parse()
        .map_err(|_| format!("{t:?} is not a number of seconds"))?;
    if !(secs.is_finite() && (0.0..1e6).contains(&secs)) {
        return Err(format!("{t} is not a time between 0 and 1e6 seconds"));
    }
    let action = match action.trim() {
        "add" => Action::Add,
        "remove" => Action::Remove(None),
        a => match a.strip_prefix("remove=") {
            Some(kn) => Action::Remove(Some(
                kn.trim()
                    .parse()
                    .map_err(|_| format!("{kn:?} is not a KN id"))?,
            )),
            None => {
                return Err(format!(
                    "unknown action {a:?}; expected add, remove or remove=<kn>"
                ))
            }
        },
    };
    Ok(Step {
        at: Duration::from_secs_f64(secs),
        action,
    })
}

impl Schedule {
    /// Checks the schedule against the run: every step within `run`, never fewer than one
    /// KN, never more than `max_kns`, and a named KN alive when it is removed (KN ids are
    /// the lowest free ones, as the cluster gives them).
    pub fn validate(&self, initial: u16, max_kns: u16, run: Duration) -> Result<(), String> {
        let mut live: Vec<u16> = (0..initial).collect();
        for step in &self.0 {
            let at = step.at.as_secs_f64();
            if step.at >= run {
                return Err(format!(
                    "--schedule: t={at} is not within the run ({} s)",
                    run.as_secs_f64()
                ));
            }
            match step.action {
                Action::Add => {
                    if live.len() >= max_kns as usize {
                        return Err(format!("--schedule: t={at}:add would exceed {max_kns} KNs"));
                    }
                    let id = (0..).find(|k| !live.contains(k)).unwrap_or(u16::MAX);
                    live.push(id);
                }
                Action::Remove(which) => {
                    if live.len() <= 1 {
                        return Err(format!(
                            "--schedule: t={at}:{} would remove the last KN",
                            step.action
                        ));
                    }
                    let kn = which.or(live.iter().copied().max()).unwrap_or(0);
                    let Some(i) = live.iter().position(|&k| k == kn) else {
                        return Err(format!("--schedule: t={at}: KN {kn} is not running then"));
                    };
                    live.remove(i);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn parses_steps_in_order() {
        let s: Schedule = "t=10:add, t=12.5:add,t=40:remove,t=50:remove=0"
            .parse()
            .expect("valid");
        assert_eq!(
            s.0,
            vec![
                Step {
                    at: secs(10.0),
                    action: Action::Add
                },
                Step {
                    at: secs(12.5),
                    action: Action::Add
                },
                Step {
                    at: secs(40.0),
                    action: Action::Remove(None)
                },
                Step {
                    at: secs(50.0),
                    action: Action::Remove(Some(0))
                },
            ]
        );
    }

    #[test]
    fn refuses_malformed_items_with_a_message_naming_them() {
        for (bad, needle) in [
            ("", "empty item"),
            ("t=10:add,", "empty item"),
            ("10:add", "expected t=<seconds>"),
            ("t=10", "expected t=<seconds>"),
            ("t=ten:add", "not a number"),
            ("t=-1:add", "not a time"),
            ("t=NaN:add", "not a time"),
            ("t=inf:add", "not a time"),
            ("t=10:grow", "unknown action"),
            ("t=10:remove=x", "not a KN id"),
            ("t=10:add,t=10:remove", "times must increase"),
            ("t=20:add,t=10:remove", "times must increase"),
        ] {
            let e = bad.parse::<Schedule>().expect_err(bad);
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn validate_follows_the_kn_count_through_the_run() {
        let run = secs(60.0);
        let ok: Schedule = "t=10:add,t=20:add,t=40:remove=1,t=50:remove"
            .parse()
            .expect("ok");
        ok.validate(1, 3, run).expect("valid");
        let e = ok.validate(1, 2, run).expect_err("exceeds max");
        assert!(e.contains("exceed 2 KNs"), "{e}");
        let last: Schedule = "t=10:remove".parse().expect("parses");
        assert!(last
            .validate(1, 4, run)
            .expect_err("last")
            .contains("last KN"));
        let gone: Schedule = "t=10:add,t=20:remove=1,t=30:remove=1"
            .parse()
            .expect("parses");
        let e = gone.validate(2, 4, run).expect_err("twice");
        assert!(e.contains("KN 1 is not running"), "{e}");
        // A removed KN's id is given to the next one added.
        let reuse: Schedule = "t=10:add,t=20:remove=0,t=30:add,t=40:remove=0"
            .parse()
            .expect("parses");
        reuse.validate(1, 4, run).expect("kn 0 is back");
        let late: Schedule = "t=60:add".parse().expect("parses");
        assert!(late
            .validate(1, 4, run)
            .expect_err("late")
            .contains("within the run"));
    }
}
