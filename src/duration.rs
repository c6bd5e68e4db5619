//! Durations on the command line, in humantime's syntax (`9m`, `90s`, `500ms`, `1h30m`,
//! `1.5s`), with the rules of each option that takes one.

use std::time::Duration;

/// The longest `dpm inspect --interval`: the command sleeps that long.
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

/// A duration that could not be parsed or is out of range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {input:?}: {reason} (e.g. 9m, 90s, 500ms, 1h)")]
    Invalid {
        input: String,
        reason: humantime::DurationError,
    },
    #[error("invalid interval {input:?}: {reason} (e.g. 1s, 500ms, 2m, or plain seconds: 1.5)")]
    InvalidInterval {
        input: String,
        reason: humantime::DurationError,
    },
    #[error("invalid interval {0:?}: must be more than 0 and at most a day")]
    IntervalOutOfRange(String),
}

/// A duration such as `9m`, `90s`, `500ms`, `1h` or `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|reason| DurationError::Invalid {
        input: s.to_owned(),
        reason,
    })
}

/// The time between two samples: a duration (`1s`, `500ms`, `2m`) or plain seconds
/// (`1.5`), more than 0 and at most a day.
pub fn parse_interval(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let out_of_range = || DurationError::IntervalOutOfRange(s.to_owned());
    let d = match t.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= MAX_INTERVAL.as_secs_f64() => {
            Duration::from_secs_f64(secs)
        }
        // Negative, zero, too long, infinite or NaN.
        Ok(_) => return Err(out_of_range()),
        Err(_) => {
            humantime::parse_duration(t).map_err(|reason| DurationError::InvalidInterval {
                input: s.to_owned(),
                reason,
            })?
        }
    };
    if d.is_zero() || d > MAX_INTERVAL {
        return Err(out_of_range());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("9m"), Ok(Duration::from_secs(540)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 500ms "), Ok(Duration::from_millis(500)));
        for bad in ["", "9", "m", "9x", "-1s", "1.5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let e = parse_duration("9x").expect_err("unknown unit").to_string();
        assert!(e.starts_with("invalid duration \"9x\": "), "{e}");
        assert!(e.ends_with("(e.g. 9m, 90s, 500ms, 1h)"), "{e}");
    }

    #[test]
    fn intervals_take_plain_seconds_and_are_bounded() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_interval("86400"), Ok(MAX_INTERVAL));
        assert_eq!(parse_interval("24h"), Ok(MAX_INTERVAL));
        for bad in ["soon", "", "1x", "ms"] {
            let e = parse_interval(bad).expect_err(bad).to_string();
            assert!(e.starts_with("invalid interval"), "{bad}: {e}");
        }
        for out in ["0", "0s", "0.0", "-1", "86401", "25h", "inf", "NaN"] {
            assert_eq!(
                parse_interval(out),
                Err(DurationError::IntervalOutOfRange(out.to_owned())),
                "{out}"
            );
        }
    }
}
