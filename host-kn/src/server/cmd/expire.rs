//! The expiry commands: EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT (with NX, XX, GT, LT), TTL,
//! PTTL, EXPIRETIME, PEXPIRETIME, PERSIST.
//!
//! As Redis's `expireGenericCommand`: the options are checked, then the time (an integer,
//! which may be negative; an overflow converting seconds or adding the present time is
//! `ERR invalid expire time in '<cmd>' command`), then the key (absent: 0), then the
//! condition (a key without expiry counts as never expiring: GT fails, LT passes), and a
//! time not after now deletes the key and answers 1.

use dinomo_shared::resp::Out;

use super::{expire_time_error, is, now_i64, string2ll, Keyspace, NOT_INTEGER};
use crate::error::KvError;

pub(crate) fn run(
    name: &str,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    let key = args[1].as_slice();
    match name {
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => expire(name, args, ks, o),
        "TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" => {
            let Some(s) = ks.get(key)? else {
                o.int(-2);
                return Ok(());
            };
            let Some(at) = s.expire_at else {
                o.int(-1);
                return Ok(());
            };
            let at = i64::try_from(at).unwrap_or(i64::MAX);
            let absolute = name.ends_with("EXPIRETIME");
            let ms = if absolute {
                at
            } else {
                at.saturating_sub(now_i64(ks)).max(0)
            };
            // Seconds are rounded to the nearest (Redis's `(ttl+500)/1000`).
            o.int(if name.starts_with('P') {
                ms
            } else {
                ms.saturating_add(500) / 1000
            });
            Ok(())
        }
        "PERSIST" => {
            match ks.get(key)? {
                Some(s) if s.expire_at.is_some() => {
                    ks.put(key, s.value, None)?;
                    o.int(1);
                }
                _ => o.int(0),
            }
            Ok(())
        }
        _ => {
            super::unknown_command(args, o);
            Ok(())
        }
    }
}

/// `[P]EXPIRE[AT] key time [NX|XX|GT|LT ...]`.
fn expire(
    name: &str,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    let key = args[1].as_slice();
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for a in &args[3..] {
        if is(a, "NX") {
            nx = true;
        } else if is(a, "XX") {
            xx = true;
        } else if is(a, "GT") {
            gt = true;
        } else if is(a, "LT") {
            lt = true;
        } else {
            o.error(&format!(
                "ERR Unsupported option {}",
                String::from_utf8_lossy(a)
            ));
            return Ok(());
        }
    }
    if nx && (xx || gt || lt) {
        o.error("ERR NX and XX, GT or LT options at the same time are not compatible");
        return Ok(());
    }
    if gt && lt {
        o.error("ERR GT and LT options at the same time are not compatible");
        return Ok(());
    }
    let Some(mut when) = string2ll(&args[2]) else {
        o.error(NOT_INTEGER);
        return Ok(());
    };
    if !name.starts_with('P') {
        let Some(ms) = when.checked_mul(1000) else {
            expire_time_error(name, o);
            return Ok(());
        };
        when = ms;
    }
    if !name.ends_with("AT") {
        let Some(at) = when.checked_add(now_i64(ks)) else {
            expire_time_error(name, o);
            return Ok(());
        };
        when = at;
    }
    let Some(s) = ks.get(key)? else {
        o.int(0);
        return Ok(());
    };
    let current = s.expire_at.map(|at| i64::try_from(at).unwrap_or(i64::MAX));
    let refused = (nx && current.is_some())
        || (xx && current.is_none())
        || (gt && current.map_or(true, |c| when <= c))
        || (lt && current.is_some_and(|c| when >= c));
    if refused {
        o.int(0);
        return Ok(());
    }
    if when <= now_i64(ks) {
        ks.delete(key)?;
    } else {
        ks.put(key, s.value, Some(when as u64))?;
    }
    o.int(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::mem::Mem;
    use super::super::test_util::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn expire_family_sets_absolute_times() {
        let mut ks = Mem::new();
        ks.set("a", "v", None);
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "10"]), int(1));
        assert_eq!(ks.expiry("a"), Some(NOW + 10_000));
        assert_eq!(exec(&mut ks, &["PEXPIRE", "a", "1234"]), int(1));
        assert_eq!(ks.expiry("a"), Some(NOW + 1234));
        assert_eq!(exec(&mut ks, &["EXPIREAT", "a", "1800000000"]), int(1));
        assert_eq!(ks.expiry("a"), Some(1_800_000_000_000));
        assert_eq!(exec(&mut ks, &["PEXPIREAT", "a", "1800000000001"]), int(1));
        assert_eq!(ks.expiry("a"), Some(1_800_000_000_001));
        assert_eq!(ks.value("a").as_deref(), Some("v"));
        assert_eq!(exec(&mut ks, &["EXPIRE", "missing", "10"]), int(0));
        assert_eq!(ks.value("missing"), None);
        // A time in the past (or now) deletes the key and answers 1.
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "-1"]), int(1));
        assert!(!ks.map.contains_key(&b"a"[..]));
        ks.set("b", "v", None);
        assert_eq!(exec(&mut ks, &["PEXPIRE", "b", "0"]), int(1));
        assert_eq!(ks.value("b"), None);
        ks.set("c", "v", None);
        assert_eq!(exec(&mut ks, &["EXPIREAT", "c", "1"]), int(1));
        assert_eq!(ks.value("c"), None);
    }

    #[test]
    fn expire_conditions() {
        let mut ks = Mem::new();
        ks.set("a", "v", None);
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "10", "XX"]), int(0));
        assert_eq!(
            exec(&mut ks, &["EXPIRE", "a", "10", "GT"]),
            int(0),
            "no TTL is infinite"
        );
        assert_eq!(ks.expiry("a"), None);
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "100", "LT"]), int(1));
        assert_eq!(ks.expiry("a"), Some(NOW + 100_000));
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "10", "nx"]), int(0));
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "200", "LT"]), int(0));
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "50", "GT"]), int(0));
        assert_eq!(
            exec(&mut ks, &["EXPIRE", "a", "100", "GT"]),
            int(0),
            "equal is not greater"
        );
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "200", "GT", "XX"]), int(1));
        assert_eq!(ks.expiry("a"), Some(NOW + 200_000));
        assert_eq!(exec(&mut ks, &["EXPIRE", "a", "20", "XX", "LT"]), int(1));
        assert_eq!(ks.expiry("a"), Some(NOW + 20_000));
        ks.set("b", "v", None);
        assert_eq!(exec(&mut ks, &["EXPIRE", "b", "20", "NX"]), int(1));
        assert_eq!(ks.expiry("b"), Some(NOW + 20_000));
    }

    #[test]
    fn expire_errors_change_nothing() {
        let mut ks = Mem::new();
        ks.set("a", "v", Some(NOW + 5000));
        let nx = "ERR NX and XX, GT or LT options at the same time are not compatible";
        exec_err(&mut ks, &["EXPIRE", "a", "10", "NX", "XX"], nx);
        exec_err(&mut ks, &["EXPIRE", "a", "10", "GT", "NX"], nx);
        exec_err(&mut ks, &["PEXPIRE", "a", "10", "NX", "LT"], nx);
        exec_err(
            &mut ks,
            &["EXPIRE", "a", "10", "GT", "LT"],
            "ERR GT and LT options at the same time are not compatible",
        );
        exec_err(
            &mut ks,
            &["EXPIRE", "a", "10", "FOO"],
            "ERR Unsupported option FOO",
        );
        // Options are checked before the time.
        exec_err(
            &mut ks,
            &["EXPIRE", "a", "x", "FOO"],
            "ERR Unsupported option FOO",
        );
        exec_err(&mut ks, &["EXPIRE", "a", "x"], NOT_INTEGER_REPLY);
        exec_err(&mut ks, &["EXPIRE", "a", "1.5"], NOT_INTEGER_REPLY);
        exec_err(
            &mut ks,
            &["EXPIRE", "a", "9223372036854776"],
            "ERR invalid expire time in 'expire' command",
        );
        exec_err(
            &mut ks,
            &["EXPIRE", "a", "-9223372036854776"],
            "ERR invalid expire time in 'expire' command",
        );
        exec_err(
            &mut ks,
            &["PEXPIRE", "a", "9223372036854775807"],
            "ERR invalid expire time in 'pexpire' command",
        );
        exec_err(
            &mut ks,
            &["EXPIREAT", "a", "9223372036854776"],
            "ERR invalid expire time in 'expireat' command",
        );
        // Checked even when the key does not exist.
        exec_err(
            &mut ks,
            &["EXPIRE", "missing", "9223372036854776"],
            "ERR invalid expire time in 'expire' command",
        );
        assert_eq!(ks.expiry("a"), Some(NOW + 5000));
    }

    const NOT_INTEGER_REPLY: &str = "ERR value is not an integer or out of range";

    #[test]
    fn ttl_family_rounds_like_redis() {
        let mut ks = Mem::new();
        ks.set("forever", "v", None);
        ks.set("a", "v", Some(NOW + 1499));
        ks.set("b", "v", Some(NOW + 1500));
        ks.set("z", "v", Some(NOW));
        assert_eq!(exec(&mut ks, &["TTL", "missing"]), int(-2));
        assert_eq!(exec(&mut ks, &["PTTL", "missing"]), int(-2));
        assert_eq!(exec(&mut ks, &["TTL", "forever"]), int(-1));
        assert_eq!(exec(&mut ks, &["PTTL", "forever"]), int(-1));
        assert_eq!(exec(&mut ks, &["EXPIRETIME", "forever"]), int(-1));
        assert_eq!(exec(&mut ks, &["PEXPIRETIME", "missing"]), int(-2));
        assert_eq!(exec(&mut ks, &["TTL", "a"]), int(1));
        assert_eq!(exec(&mut ks, &["TTL", "b"]), int(2));
        assert_eq!(exec(&mut ks, &["PTTL", "a"]), int(1499));
        assert_eq!(exec(&mut ks, &["TTL", "z"]), int(0));
        assert_eq!(
            exec(&mut ks, &["PEXPIRETIME", "a"]),
            int((NOW + 1499) as i64)
        );
        assert_eq!(exec(&mut ks, &["EXPIRETIME", "a"]), int(1_700_000_001));
        assert_eq!(exec(&mut ks, &["EXPIRETIME", "b"]), int(1_700_000_002));
        // Time passes: the key expires.
        ks.now += 1500;
        assert_eq!(exec(&mut ks, &["PTTL", "b"]), int(0));
        assert_eq!(exec(&mut ks, &["TTL", "a"]), int(-2));
    }

    #[test]
    fn persist_removes_the_ttl() {
        let mut ks = Mem::new();
        ks.set("a", "v", Some(NOW + 1000));
        ks.set("b", "v", None);
        assert_eq!(exec(&mut ks, &["PERSIST", "a"]), int(1));
        assert_eq!(ks.expiry("a"), None);
        assert_eq!(ks.value("a").as_deref(), Some("v"));
        assert_eq!(exec(&mut ks, &["PERSIST", "a"]), int(0));
        ks.writes = 0;
        assert_eq!(exec(&mut ks, &["PERSIST", "b"]), int(0));
        assert_eq!(exec(&mut ks, &["PERSIST", "missing"]), int(0));
        assert_eq!(ks.writes, 0);
    }
}
