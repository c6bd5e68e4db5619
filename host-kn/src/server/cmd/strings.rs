//! The string commands: SET and its options, SETNX, SETEX, PSETEX, GET, GETEX, GETDEL,
//! GETSET, MGET, MSET, MSETNX, APPEND, STRLEN, GETRANGE (and its old name SUBSTR),
//! SETRANGE, INCR, DECR, INCRBY, DECRBY, INCRBYFLOAT.
//!
//! Commands that modify a value in place (APPEND, SETRANGE, INCR and the like) keep the
//! key's expiry time, as Redis does; those that replace it (SET without KEEPTTL, GETSET,
//! MSET, ...) drop it.

use dinomo_shared::resp::Out;

use super::{
    bulk_or_null, expire_time_error, is, now_i64, string2ll, Keyspace, NOT_INTEGER, SYNTAX, TOO_BIG,
};
use crate::error::KvError;

/// Redis's reply to a number that is not a float (`string2ld`).
const NOT_FLOAT: &str = "ERR value is not a valid float";

/// How an expiry argument is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpKind {
    /// `EX seconds`
    Ex,
    /// `PX milliseconds`
    Px,
    /// `EXAT unix-seconds`
    ExAt,
    /// `PXAT unix-milliseconds`
    PxAt,
}

impl ExpKind {
    fn of(arg: &[u8]) -> Option<Self> {
        [
            ("EX", Self::Ex),
            ("PX", Self::Px),
            ("EXAT", Self::ExAt),
            ("PXAT", Self::PxAt),
        ]
        .into_iter()
        .find(|(w, _)| is(arg, w))
        .map(|(_, k)| k)
    }
    fn seconds(self) -> bool {
        matches!(self, Self::Ex | Self::ExAt)
    }
    fn relative(self) -> bool {
        matches!(self, Self::Ex | Self::Px)
    }
}

/// The options of SET (`set == true`) or GETEX, as Redis's
/// `parseExtendedStringArgumentsOrReply` accepts them: NX and XX exclude each other, an
/// expiry kind excludes the other kinds, KEEPTTL and PERSIST; repeating an option is
/// allowed (the last expiry wins).
#[derive(Debug, Default)]
struct Opts<'a> {
    nx: bool,
    xx: bool,
    get: bool,
    keepttl: bool,
    persist: bool,
    expire: Option<(ExpKind, &'a [u8])>,
}

fn parse_opts(args: &[Vec<u8>], from: usize, set: bool) -> Option<Opts<'_>> {
    let mut o = Opts::default();
    let mut j = from;
    while j < args.len() {
        let a = args[j].as_slice();
        let next = args.get(j + 1);
        let kind = o.expire.map(|(k, _)| k);
        if set && is(a, "NX") && !o.xx {
            o.nx = true;
        } else if set && is(a, "XX") && !o.nx {
            o.xx = true;
        } else if set && is(a, "GET") {
            o.get = true;
        } else if set && is(a, "KEEPTTL") && !o.persist && kind.is_none() {
            o.keepttl = true;
        } else if !set && is(a, "PERSIST") && !o.keepttl && kind.is_none() {
            o.persist = true;
        } else if let (Some(k), Some(v)) = (ExpKind::of(a), next) {
            if o.keepttl || o.persist || kind.is_some_and(|old| old != k) {
                return None;
            }
            o.expire = Some((k, v));
            j += 1;
        } else {
            return None;
        }
        j += 1;
    }
    Some(o)
}

/// The absolute expiry time an expiry argument names, checked as Redis's
/// `getExpireMillisecondsOrReply`: a positive integer, no overflow converting seconds or
/// adding the present time. `Err(())`: the error was answered.
fn expire_ms(
    name: &str,
    kind: ExpKind,
    raw: &[u8],
    ks: &dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<u64, ()> {
    let Some(v) = string2ll(raw) else {
        o.error(NOT_INTEGER);
        return Err(());
    };
    let ms = if v <= 0 {
        None
    } else if kind.seconds() {
        v.checked_mul(1000)
    } else {
        Some(v)
    };
    let at = ms.and_then(|ms| {
        if kind.relative() {
            ms.checked_add(now_i64(ks))
        } else {
            Some(ms)
        }
    });
    match at {
        Some(at) if at > 0 => Ok(at as u64),
        _ => {
            expire_time_error(name, o);
            Err(())
        }
    }
}

/// Answers the size error if `len` exceeds the largest value.
fn too_big(len: usize, ks: &dyn Keyspace, o: &mut Out<'_>) -> bool {
    if len > ks.max_value() {
        o.error(TOO_BIG);
        true
    } else {
        false
    }
}

pub(crate) fn run(
    name: &str,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    let key = args[1].as_slice();
    match name {
        "SET" => set(args, ks, o),
        "SETNX" => {
            if too_big(args[2].len(), ks, o) {
                return Ok(());
            }
            if ks.get(key)?.is_some() {
                o.int(0);
            } else {
                ks.put(key, args[2].clone(), None)?;
                o.int(1);
            }
            Ok(())
        }
        "SETEX" | "PSETEX" => {
            let kind = if name == "SETEX" {
                ExpKind::Ex
            } else {
                ExpKind::Px
            };
            let Ok(at) = expire_ms(name, kind, &args[2], ks, o) else {
                return Ok(());
            };
            if too_big(args[3].len(), ks, o) {
                return Ok(());
            }
            ks.put(key, args[3].clone(), Some(at))?;
            o.simple("OK");
            Ok(())
        }
        "GET" => {
            let v = ks.get(key)?;
            bulk_or_null(o, v.as_ref().map(|s| s.value.as_slice()));
            Ok(())
        }
        "GETEX" => getex(args, ks, o),
        "GETDEL" => {
            match ks.get(key)? {
                Some(s) => {
                    ks.delete(key)?;
                    o.bulk(&s.value);
                }
                None => o.null(),
            }
            Ok(())
        }
        "GETSET" => {
            if too_big(args[2].len(), ks, o) {
                return Ok(());
            }
            let old = ks.get(key)?;
            ks.put(key, args[2].clone(), None)?;
            bulk_or_null(o, old.as_ref().map(|s| s.value.as_slice()));
            Ok(())
        }
        "MGET" => {
            o.array(args.len() - 1);
            for k in &args[1..] {
                let v = ks.get(k)?;
                bulk_or_null(o, v.as_ref().map(|s| s.value.as_slice()));
            }
            Ok(())
        }
        "MSET" | "MSETNX" => mset(name, args, ks, o),
        "APPEND" => {
            let add = &args[2];
            let (value, expire_at) = match ks.get(key)? {
                Some(s) => (s.value, s.expire_at),
                None => (Vec::new(), None),
            };
            if too_big(value.len().saturating_add(add.len()), ks, o) {
                return Ok(());
            }
            let mut value = value;
            value.extend_from_slice(add);
            let len = value.len();
            ks.put(key, value, expire_at)?;
            o.int(len as i64);
            Ok(())
        }
        "STRLEN" => {
            let len = ks.get(key)?.map_or(0, |s| s.value.len());
            o.int(len as i64);
            Ok(())
        }
        "GETRANGE" | "SUBSTR" => getrange(args, ks, o),
        "SETRANGE" => setrange(args, ks, o),
        "INCR" => incr_by(key, 1, ks, o),
        "DECR" => incr_by(key, -1, ks, o),
        "INCRBY" | "DECRBY" => {
            let Some(by) = string2ll(&args[2]) else {
                o.error(NOT_INTEGER);
                return Ok(());
            };
            let by = if name == "INCRBY" {
                by
            } else if by == i64::MIN {
                o.error("ERR decrement would overflow");
                return Ok(());
            } else {
                -by
            };
            incr_by(key, by, ks, o)
        }
        "INCRBYFLOAT" => incr_by_float(key, &args[2], ks, o),
        _ => {
            super::unknown_command(args, o);
            Ok(())
        }
    }
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT ts|PXAT ms-ts|KEEPTTL]`.
fn set(args: &[Vec<u8>], ks: &mut dyn Keyspace, o: &mut Out<'_>) -> Result<(), KvError> {
    let (key, value) = (args[1].as_slice(), &args[2]);
    let Some(opts) = parse_opts(args, 3, true) else {
        o.error(SYNTAX);
        return Ok(());
    };
    let mut at = None;
    if let Some((kind, raw)) = opts.expire {
        let Ok(ms) = expire_ms("SET", kind, raw, ks, o) else {
            return Ok(());
        };
        at = Some(ms);
    }
    if too_big(value.len(), ks, o) {
        return Ok(());
    }
    let old = ks.get(key)?;
    if opts.get {
        bulk_or_null(o, old.as_ref().map(|s| s.value.as_slice()));
    }
    let found = old.is_some();
    if (opts.nx && found) || (opts.xx && !found) {
        if !opts.get {
            o.null();
        }
        return Ok(());
    }
    if opts.keepttl {
        at = old.and_then(|s| s.expire_at);
    }
    ks.put(key, value.clone(), at)?;
    if !opts.get {
        o.simple("OK");
    }
    Ok(())
}

/// `GETEX key [EX s|PX ms|EXAT ts|PXAT ms-ts|PERSIST]`.
fn getex(args: &[Vec<u8>], ks: &mut dyn Keyspace, o: &mut Out<'_>) -> Result<(), KvError> {
    let key = args[1].as_slice();
    let Some(opts) = parse_opts(args, 2, false) else {
        o.error(SYNTAX);
        return Ok(());
    };
    let mut at = None;
    if let Some((kind, raw)) = opts.expire {
        let Ok(ms) = expire_ms("GETEX", kind, raw, ks, o) else {
            return Ok(());
        };
        at = Some(ms);
    }
    let Some(s) = ks.get(key)? else {
        o.null();
        return Ok(());
    };
    o.bulk(&s.value);
    if let Some(at) = at {
        // A time already past deletes the key (Redis's `checkAlreadyExpired`).
        if at as i64 <= now_i64(ks) {
            ks.delete(key)?;
        } else {
            ks.put(key, s.value, Some(at))?;
        }
    } else if opts.persist && s.expire_at.is_some() {
        ks.put(key, s.value, None)?;
    }
    Ok(())
}

/// `MSET key value [key value ...]` and `MSETNX` (all or nothing).
fn mset(
    name: &str,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    if args.len() % 2 == 0 {
        super::arity_error(name, o);
        return Ok(());
    }
    if args[2..]
        .iter()
        .step_by(2)
        .any(|v| v.len() > ks.max_value())
    {
        o.error(TOO_BIG);
        return Ok(());
    }
    let nx = name == "MSETNX";
    if nx {
        for k in args[1..].iter().step_by(2) {
            if ks.get(k)?.is_some() {
                o.int(0);
                return Ok(());
            }
        }
    }
    for kv in args[1..].chunks_exact(2) {
        ks.put(&kv[0], kv[1].clone(), None)?;
    }
    if nx {
        o.int(1);
    } else {
        o.simple("OK");
    }
    Ok(())
}

/// `GETRANGE key start end`: inclusive, negative indices from the end, clamped.
fn getrange(args: &[Vec<u8>], ks: &mut dyn Keyspace, o: &mut Out<'_>) -> Result<(), KvError> {
    let (Some(mut start), Some(mut end)) = (string2ll(&args[2]), string2ll(&args[3])) else {
        o.error(NOT_INTEGER);
        return Ok(());
    };
    let Some(s) = ks.get(&args[1])? else {
        o.bulk(b"");
        return Ok(());
    };
    let len = s.value.len() as i64;
    if start < 0 && end < 0 && start > end {
        o.bulk(b"");
        return Ok(());
    }
    if start < 0 {
        start = len.saturating_add(start);
    }
    if end < 0 {
        end = len.saturating_add(end);
    }
    start = start.max(0);
    end = end.max(0).min(len - 1);
    if start > end || len == 0 {
        o.bulk(b"");
    } else {
        o.bulk(&s.value[start as usize..=end as usize]);
    }
    Ok(())
}

/// `SETRANGE key offset value`: overwrites from `offset`, zero-padding past the end.
fn setrange(args: &[Vec<u8>], ks: &mut dyn Keyspace, o: &mut Out<'_>) -> Result<(), KvError> {
    let (key, patch) = (args[1].as_slice(), &args[3]);
    let Some(offset) = string2ll(&args[2]) else {
        o.error(NOT_INTEGER);
        return Ok(());
    };
    if offset < 0 {
        o.error("ERR offset is out of range");
        return Ok(());
    }
    let old = ks.get(key)?;
    if patch.is_empty() {
        // Nothing to write: the length as it is (0, and no key made, if there is none).
        o.int(old.map_or(0, |s| s.value.len() as i64));
        return Ok(());
    }
    let end = usize::try_from(offset)
        .ok()
        .and_then(|off| off.checked_add(patch.len()));
    let Some(end) = end.filter(|&e| e <= ks.max_value()) else {
        o.error(TOO_BIG);
        return Ok(());
    };
    let (mut value, expire_at) = old.map_or((Vec::new(), None), |s| (s.value, s.expire_at));
    let off = end - patch.len();
    if value.len() < end {
        value.resize(end, 0);
    }
    value[off..end].copy_from_slice(patch);
    let len = value.len();
    ks.put(key, value, expire_at)?;
    o.int(len as i64);
    Ok(())
}

/// INCR, DECR, INCRBY, DECRBY: the value must be a `string2ll` integer (a missing key
/// counts as 0); the expiry time stays.
fn incr_by(key: &[u8], by: i64, ks: &mut dyn Keyspace, o: &mut Out<'_>) -> Result<(), KvError> {
    let old = ks.get(key)?;
    let (cur, expire_at) = match &old {
        Some(s) => match string2ll(&s.value) {
            Some(v) => (v, s.expire_at),
            None => {
                o.error(NOT_INTEGER);
                return Ok(());
            }
        },
        None => (0, None),
    };
    let Some(new) = cur.checked_add(by) else {
        o.error("ERR increment or decrement would overflow");
        return Ok(());
    };
    ks.put(key, new.to_string().into_bytes(), expire_at)?;
    o.int(new);
    Ok(())
}

/// `INCRBYFLOAT key increment`: the result as a bulk string (RESP2 and RESP3 alike).
fn incr_by_float(
    key: &[u8],
    by: &[u8],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    let old = ks.get(key)?;
    let (cur, expire_at) = match &old {
        Some(s) => (string2ld(&s.value), s.expire_at),
        None => (Some(0.0), None),
    };
    let (Some(cur), Some(by)) = (cur, string2ld(by)) else {
        o.error(NOT_FLOAT);
        return Ok(());
    };
    let new = cur + by;
    if !new.is_finite() {
        o.error("ERR increment would produce NaN or Infinity");
        return Ok(());
    }
    let text = ld2string_human(new);
    if too_big(text.len(), ks, o) {
        return Ok(());
    }
    ks.put(key, text.clone().into_bytes(), expire_at)?;
    o.bulk(text.as_bytes());
    Ok(())
}

/// Redis's `string2ld`, with `f64`: no leading space, nothing after the number, not NaN,
/// not out of range (an overflow to infinity is refused; the literal `inf` is read).
pub(crate) fn string2ld(s: &[u8]) -> Option<f64> {
    if s.is_empty() || s.len() >= 5 * 1024 {
        return None;
    }
    let text = std::str::from_utf8(s).ok()?;
    let v: f64 = text.parse().ok()?;
    if v.is_nan() {
        return None;
    }
    if v.is_infinite() {
        // Only "inf"/"infinity" (any case, optional sign) is infinity by itself; a finite
        // literal that overflowed is out of range.
        let word = text.trim_start_matches(['+', '-']);
        if !(word.eq_ignore_ascii_case("inf") || word.eq_ignore_ascii_case("infinity")) {
            return None;
        }
    }
    Some(v)
}

/// Redis's `ld2string(.., LD_STR_HUMAN)` (`%.17Lf` of a `long double`, trailing zeros and
/// point trimmed, `-0` as `0`), emulated for `f64`: the decimal with the fewest significant
/// digits within two units in the last place of `v` (which absorbs the rounding of the
/// inputs and of the sum, as Redis's wider `long double` does: `0.1 + 0.2` is `0.3`), in
/// plain notation with at most 17 digits after the point. See the module docs.
pub(crate) fn ld2string_human(v: f64) -> String {
    let mag = v.abs();
    if mag == 0.0 || !v.is_finite() {
        return "0".to_string();
    }
    let ulp = f64::from_bits(mag.to_bits() + 1) - mag;
    let mut w = v;
    for digits in 1..=17usize {
        let text = format!("{:.*e}", digits - 1, v);
        if let Ok(p) = text.parse::<f64>() {
            if (p - v).abs() <= 2.0 * ulp {
                w = p;
                break;
            }
        }
    }
    let mut s = format!("{w}");
    if s.find('.').is_some_and(|dot| s.len() - dot - 1 > 17) {
        s = format!("{w:.17}");
    }
    if s.contains('.') {
        let trimmed = s.trim_end_matches('0').trim_end_matches('.').len();
        s.truncate(trimmed);
    }
    if s == "-0" {
        s = "0".to_string();
    }
    s
}

#[cfg(test)]
mod tests {
    use dinomo_shared::resp::Proto;

    use super::super::mem::Mem;
    use super::super::test_util::*;
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn set_get_and_their_options() {
        let mut ks = Mem::new();
        assert_eq!(exec(&mut ks, &["SET", "a", "1"]), OK);
        assert_eq!(exec(&mut ks, &["get", "a"]), bulk("1"));
        assert_eq!(exec(&mut ks, &["GET", "b"]), NIL);
        assert_eq!(
            exec_with(&mut ks, Proto::Resp3, &[b"GET", b"b"]),
            "_\r\n",
            "RESP3 null"
        );
        // NX / XX
        assert_eq!(exec(&mut ks, &["SET", "a", "2", "nx"]), NIL);
        assert_eq!(ks.value("a").as_deref(), Some("1"));
        assert_eq!(exec(&mut ks, &["SET", "b", "2", "XX"]), NIL);
        assert_eq!(ks.value("b"), None);
        assert_eq!(exec(&mut ks, &["SET", "a", "2", "XX"]), OK);
        assert_eq!(ks.value("a").as_deref(), Some("2"));
        // GET returns the old value, with NX too (Redis 7.0+).
        assert_eq!(exec(&mut ks, &["SET", "a", "3", "GET"]), bulk("2"));
        assert_eq!(exec(&mut ks, &["SET", "c", "1", "GET"]), NIL);
        assert_eq!(ks.value("c").as_deref(), Some("1"));
        assert_eq!(exec(&mut ks, &["SET", "a", "4", "NX", "GET"]), bulk("3"));
        assert_eq!(ks.value("a").as_deref(), Some("3"));
        assert_eq!(exec(&mut ks, &["SET", "d", "4", "XX", "GET"]), NIL);
        assert_eq!(ks.value("d"), None);
        // Expiry kinds.
        assert_eq!(exec(&mut ks, &["SET", "e", "v", "EX", "10"]), OK);
        assert_eq!(ks.expiry("e"), Some(NOW + 10_000));
        assert_eq!(exec(&mut ks, &["SET", "e", "v", "px", "1500"]), OK);
        assert_eq!(ks.expiry("e"), Some(NOW + 1500));
        assert_eq!(exec(&mut ks, &["SET", "e", "v", "EXAT", "1800000000"]), OK);
        assert_eq!(ks.expiry("e"), Some(1_800_000_000_000));
        assert_eq!(
            exec(&mut ks, &["SET", "e", "v", "PXAT", "1800000000123"]),
            OK
        );
        assert_eq!(ks.expiry("e"), Some(1_800_000_000_123));
        // The last of a repeated option wins.
        assert_eq!(exec(&mut ks, &["SET", "e", "v", "EX", "1", "EX", "2"]), OK);
        assert_eq!(ks.expiry("e"), Some(NOW + 2000));
        // KEEPTTL keeps it, a plain SET clears it.
        assert_eq!(exec(&mut ks, &["SET", "e", "w", "KEEPTTL"]), OK);
        assert_eq!(ks.expiry("e"), Some(NOW + 2000));
        assert_eq!(ks.value("e").as_deref(), Some("w"));
        assert_eq!(exec(&mut ks, &["SET", "e", "x"]), OK);
        assert_eq!(ks.expiry("e"), None);
        // An absolute time in the past: stored expired, so gone.
        assert_eq!(exec(&mut ks, &["SET", "e", "x", "PXAT", "1"]), OK);
        assert_eq!(exec(&mut ks, &["GET", "e"]), NIL);
        // Binary-safe values.
        assert_eq!(
            exec_with(&mut ks, Proto::Resp2, &[b"SET", b"bin", b"a\r\n\0b"]),
            OK
        );
        assert_eq!(exec(&mut ks, &["STRLEN", "bin"]), int(5));
    }

    #[test]
    fn set_errors_change_nothing() {
        let mut ks = Mem::new();
        ks.set("a", "1", Some(NOW + 5000));
        let syntax = "ERR syntax error";
        for bad in [
            &["SET", "a", "2", "NX", "XX"][..],
            &["SET", "a", "2", "XX", "NX"],
            &["SET", "a", "2", "EX", "1", "PX", "1"],
            &["SET", "a", "2", "EX", "1", "KEEPTTL"],
            &["SET", "a", "2", "KEEPTTL", "PXAT", "1"],
            &["SET", "a", "2", "EX"],
            &["SET", "a", "2", "PERSIST"],
            &["SET", "a", "2", "FOO"],
            &["SET", "a", "2", "NXX"],
        ] {
            exec_err(&mut ks, bad, syntax);
        }
        let bad_time = "ERR invalid expire time in 'set' command";
        exec_err(&mut ks, &["SET", "a", "2", "EX", "0"], bad_time);
        exec_err(&mut ks, &["SET", "a", "2", "PX", "-5"], bad_time);
        exec_err(&mut ks, &["SET", "a", "2", "EXAT", "0"], bad_time);
        exec_err(
            &mut ks,
            &["SET", "a", "2", "EX", "9223372036854775"],
            bad_time,
        );
        exec_err(
            &mut ks,
            &["SET", "a", "2", "PX", "9223372036854775807"],
            bad_time,
        );
        exec_err(
            &mut ks,
            &["SET", "a", "2", "EX", "1.5"],
            "ERR value is not an integer or out of range",
        );
        exec_err(
            &mut ks,
            &["SET", "a", "2", "EX", " 1"],
            "ERR value is not an integer or out of range",
        );
        // A syntax error is found before a bad time.
        exec_err(&mut ks, &["SET", "a", "2", "EX", "0", "FOO"], syntax);
        ks.max = 3;
        exec_err(&mut ks, &["SET", "a", "toolong"], TOO_BIG);
        exec_err(&mut ks, &["SET", "a", "toolong", "GET"], TOO_BIG);
        exec_err(&mut ks, &["SETNX", "z", "toolong"], TOO_BIG);
        exec_err(&mut ks, &["GETSET", "a", "toolong"], TOO_BIG);
        exec_err(&mut ks, &["SETEX", "a", "5", "toolong"], TOO_BIG);
        exec_err(&mut ks, &["MSET", "x", "1", "y", "toolong"], TOO_BIG);
        assert_eq!(ks.value("a").as_deref(), Some("1"));
        assert_eq!(ks.expiry("a"), Some(NOW + 5000));
    }

    #[test]
    fn setnx_setex_psetex_getset_getdel() {
        let mut ks = Mem::new();
        assert_eq!(exec(&mut ks, &["SETNX", "a", "1"]), int(1));
        assert_eq!(exec(&mut ks, &["SETNX", "a", "2"]), int(0));
        assert_eq!(ks.value("a").as_deref(), Some("1"));
        assert_eq!(exec(&mut ks, &["SETEX", "b", "10", "v"]), OK);
        assert_eq!(ks.expiry("b"), Some(NOW + 10_000));
        assert_eq!(exec(&mut ks, &["PSETEX", "b", "10", "w"]), OK);
        assert_eq!(ks.expiry("b"), Some(NOW + 10));
        assert_eq!(ks.value("b").as_deref(), Some("w"));
        exec_err(
            &mut ks,
            &["SETEX", "b", "0", "v"],
            "ERR invalid expire time in 'setex' command",
        );
        exec_err(
            &mut ks,
            &["PSETEX", "b", "-1", "v"],
            "ERR invalid expire time in 'psetex' command",
        );
        exec_err(&mut ks, &["SETEX", "b", "x", "v"], NOT_INTEGER);
        // GETSET returns the old value and drops the TTL.
        assert_eq!(exec(&mut ks, &["GETSET", "b", "n"]), bulk("w"));
        assert_eq!(ks.expiry("b"), None);
        assert_eq!(ks.value("b").as_deref(), Some("n"));
        assert_eq!(exec(&mut ks, &["GETSET", "new", "n"]), NIL);
        assert_eq!(ks.value("new").as_deref(), Some("n"));
        assert_eq!(exec(&mut ks, &["GETDEL", "b"]), bulk("n"));
        assert_eq!(ks.value("b"), None);
        assert_eq!(exec(&mut ks, &["GETDEL", "b"]), NIL);
    }

    #[test]
    fn getex_sets_or_removes_the_ttl() {
        let mut ks = Mem::new();
        ks.set("a", "v", Some(NOW + 5000));
        assert_eq!(exec(&mut ks, &["GETEX", "a"]), bulk("v"));
        assert_eq!(ks.expiry("a"), Some(NOW + 5000));
        assert_eq!(exec(&mut ks, &["GETEX", "a", "EX", "100"]), bulk("v"));
        assert_eq!(ks.expiry("a"), Some(NOW + 100_000));
        assert_eq!(
            exec(&mut ks, &["GETEX", "a", "PXAT", "1800000000000"]),
            bulk("v")
        );
        assert_eq!(ks.expiry("a"), Some(1_800_000_000_000));
        assert_eq!(exec(&mut ks, &["GETEX", "a", "PERSIST"]), bulk("v"));
        assert_eq!(ks.expiry("a"), None);
        assert_eq!(ks.value("a").as_deref(), Some("v"));
        assert_eq!(exec(&mut ks, &["GETEX", "missing", "EX", "5"]), NIL);
        assert_eq!(ks.value("missing"), None);
        // A time in the past deletes the key, after replying its value.
        assert_eq!(exec(&mut ks, &["GETEX", "a", "EXAT", "1"]), bulk("v"));
        assert!(!ks.map.contains_key(&b"a"[..]));
        ks.set("a", "v", None);
        for bad in [
            &["GETEX", "a", "PERSIST", "EX", "1"][..],
            &["GETEX", "a", "EX", "1", "PERSIST"],
            &["GETEX", "a", "KEEPTTL"],
            &["GETEX", "a", "NX"],
            &["GETEX", "a", "GET"],
            &["GETEX", "a", "EX"],
            &["GETEX", "a", "EX", "1", "PX", "1"],
        ] {
            exec_err(&mut ks, bad, SYNTAX);
        }
        exec_err(
            &mut ks,
            &["GETEX", "a", "EX", "0"],
            "ERR invalid expire time in 'getex' command",
        );
        exec_err(&mut ks, &["GETEX", "a", "PX", "nope"], NOT_INTEGER);
    }

    #[test]
    fn mget_mset_msetnx() {
        let mut ks = Mem::new();
        ks.set("a", "old", Some(NOW + 1000));
        assert_eq!(exec(&mut ks, &["MSET", "a", "1", "b", "2"]), OK);
        assert_eq!(ks.expiry("a"), None, "MSET drops the TTL");
        assert_eq!(
            exec(&mut ks, &["MGET", "a", "x", "b", "a"]),
            format!("*4\r\n{}{NIL}{}{}", bulk("1"), bulk("2"), bulk("1"))
        );
        assert_eq!(
            exec_with(&mut ks, Proto::Resp3, &[b"MGET", b"x"]),
            "*1\r\n_\r\n"
        );
        // MSETNX: all or nothing.
        ks.writes = 0;
        assert_eq!(exec(&mut ks, &["MSETNX", "c", "3", "a", "9"]), int(0));
        assert_eq!(ks.value("c"), None);
        assert_eq!(ks.value("a").as_deref(), Some("1"));
        assert_eq!(ks.writes, 0);
        assert_eq!(exec(&mut ks, &["MSETNX", "c", "3", "d", "4"]), int(1));
        assert_eq!(ks.value("d").as_deref(), Some("4"));
        // The same key twice: the last value.
        assert_eq!(exec(&mut ks, &["MSET", "e", "1", "e", "2"]), OK);
        assert_eq!(ks.value("e").as_deref(), Some("2"));
    }

    #[test]
    fn append_strlen_keep_the_ttl() {
        let mut ks = Mem::new();
        assert_eq!(exec(&mut ks, &["APPEND", "a", "Hello"]), int(5));
        assert_eq!(ks.expiry("a"), None);
        ks.set("a", "Hello", Some(NOW + 9000));
        assert_eq!(exec(&mut ks, &["APPEND", "a", " World"]), int(11));
        assert_eq!(ks.value("a").as_deref(), Some("Hello World"));
        assert_eq!(ks.expiry("a"), Some(NOW + 9000));
        assert_eq!(exec(&mut ks, &["STRLEN", "a"]), int(11));
        assert_eq!(exec(&mut ks, &["STRLEN", "nope"]), int(0));
        assert_eq!(exec(&mut ks, &["APPEND", "a", ""]), int(11));
        ks.max = 12;
        exec_err(&mut ks, &["APPEND", "a", "!!"], TOO_BIG);
        exec_err(&mut ks, &["APPEND", "new", "0123456789abc"], TOO_BIG);
        assert_eq!(exec(&mut ks, &["APPEND", "a", "!"]), int(12));
    }

    #[test]
    fn getrange_counts_from_either_end() {
        let mut ks = Mem::new();
        ks.set("s", "This is a string", None);
        let r = |ks: &mut Mem, a: &str, b: &str| exec(ks, &["GETRANGE", "s", a, b]);
        assert_eq!(r(&mut ks, "0", "3"), bulk("This"));
        assert_eq!(r(&mut ks, "-3", "-1"), bulk("ing"));
        assert_eq!(r(&mut ks, "0", "-1"), bulk("This is a string"));
        assert_eq!(r(&mut ks, "10", "100"), bulk("string"));
        assert_eq!(r(&mut ks, "5", "3"), bulk(""));
        assert_eq!(r(&mut ks, "-1", "-5"), bulk(""));
        assert_eq!(r(&mut ks, "-100", "2"), bulk("Thi"));
        assert_eq!(r(&mut ks, "-100", "-100"), bulk("T"));
        // Both negative and start after end: empty, before any clamping.
        assert_eq!(r(&mut ks, "-100", "-200"), bulk(""));
        assert_eq!(r(&mut ks, "100", "200"), bulk(""));
        assert_eq!(
            r(&mut ks, "-9223372036854775808", "9223372036854775807"),
            bulk("This is a string")
        );
        assert_eq!(exec(&mut ks, &["SUBSTR", "s", "0", "3"]), bulk("This"));
        assert_eq!(exec(&mut ks, &["GETRANGE", "none", "0", "3"]), bulk(""));
        ks.set("e", "", None);
        assert_eq!(exec(&mut ks, &["GETRANGE", "e", "0", "-1"]), bulk(""));
        exec_err(&mut ks, &["GETRANGE", "s", "a", "1"], NOT_INTEGER);
        exec_err(&mut ks, &["GETRANGE", "s", "0", "1.0"], NOT_INTEGER);
    }

    #[test]
    fn setrange_pads_with_zeros() {
        let mut ks = Mem::new();
        ks.set("k", "Hello World", Some(NOW + 100));
        assert_eq!(exec(&mut ks, &["SETRANGE", "k", "6", "Redis"]), int(11));
        assert_eq!(ks.value("k").as_deref(), Some("Hello Redis"));
        assert_eq!(ks.expiry("k"), Some(NOW + 100), "keeps the TTL");
        assert_eq!(exec(&mut ks, &["SETRANGE", "n", "3", "ab"]), int(5));
        assert_eq!(ks.value("n").as_deref(), Some("\0\0\0ab"));
        assert_eq!(exec(&mut ks, &["SETRANGE", "k", "13", "!"]), int(14));
        assert_eq!(ks.value("k").as_deref(), Some("Hello Redis\0\0!"));
        // An empty value: the length, and no key made.
        ks.writes = 0;
        assert_eq!(exec(&mut ks, &["SETRANGE", "none", "5", ""]), int(0));
        assert_eq!(exec(&mut ks, &["SETRANGE", "k", "100", ""]), int(14));
        assert_eq!(ks.writes, 0);
        assert_eq!(ks.value("none"), None);
        exec_err(
            &mut ks,
            &["SETRANGE", "k", "-1", "x"],
            "ERR offset is out of range",
        );
        exec_err(&mut ks, &["SETRANGE", "k", "x", "x"], NOT_INTEGER);
        ks.max = 20;
        exec_err(&mut ks, &["SETRANGE", "k", "20", "x"], TOO_BIG);
        exec_err(
            &mut ks,
            &["SETRANGE", "k", "9223372036854775807", "x"],
            TOO_BIG,
        );
        assert_eq!(exec(&mut ks, &["SETRANGE", "k", "19", "x"]), int(20));
    }

    #[test]
    fn incr_family_is_strict_and_checks_overflow() {
        let mut ks = Mem::new();
        assert_eq!(exec(&mut ks, &["INCR", "n"]), int(1));
        assert_eq!(exec(&mut ks, &["INCRBY", "n", "41"]), int(42));
        assert_eq!(exec(&mut ks, &["DECR", "n"]), int(41));
        assert_eq!(exec(&mut ks, &["DECRBY", "n", "-9"]), int(50));
        assert_eq!(exec(&mut ks, &["DECRBY", "m", "5"]), int(-5));
        assert_eq!(ks.value("n").as_deref(), Some("50"));
        ks.set("t", "10", Some(NOW + 7000));
        assert_eq!(exec(&mut ks, &["INCR", "t"]), int(11));
        assert_eq!(ks.expiry("t"), Some(NOW + 7000), "INCR keeps the TTL");
        ks.set("max", &i64::MAX.to_string(), None);
        exec_err(
            &mut ks,
            &["INCR", "max"],
            "ERR increment or decrement would overflow",
        );
        exec_err(
            &mut ks,
            &["INCRBY", "n", "9223372036854775807"],
            "ERR increment or decrement would overflow",
        );
        ks.set("min", &i64::MIN.to_string(), None);
        exec_err(
            &mut ks,
            &["DECR", "min"],
            "ERR increment or decrement would overflow",
        );
        exec_err(
            &mut ks,
            &["DECRBY", "n", "-9223372036854775808"],
            "ERR decrement would overflow",
        );
        assert_eq!(ks.value("max"), Some(i64::MAX.to_string()));
        for v in [
            " 1",
            "+1",
            "1 ",
            "01",
            "1.0",
            "abc",
            "",
            "9223372036854775808",
        ] {
            ks.set("bad", v, None);
            exec_err(&mut ks, &["INCR", "bad"], NOT_INTEGER);
        }
        exec_err(&mut ks, &["INCRBY", "n", "1.5"], NOT_INTEGER);
        exec_err(&mut ks, &["INCRBY", "n", "+1"], NOT_INTEGER);
        exec_err(&mut ks, &["DECRBY", "n", ""], NOT_INTEGER);
    }

    #[test]
    fn incrbyfloat_formats_like_redis() {
        let mut ks = Mem::new();
        ks.set("f", "10.50", Some(NOW + 3000));
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "f", "0.1"]), bulk("10.6"));
        assert_eq!(ks.expiry("f"), Some(NOW + 3000), "keeps the TTL");
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "f", "-5"]), bulk("5.6"));
        ks.set("g", "5.0e3", None);
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "g", "2.0e2"]), bulk("5200"));
        assert_eq!(ks.value("g").as_deref(), Some("5200"));
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "new", "3"]), bulk("3"));
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "new", "-3"]), bulk("0"));
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "new", "-0.0"]), bulk("0"));
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "new", "+.5"]), bulk("0.5"));
        assert_eq!(exec(&mut ks, &["INCRBYFLOAT", "new", "1e-20"]), bulk("0.5"));
        assert_eq!(
            exec(&mut ks, &["INCRBYFLOAT", "big", "1e20"]),
            bulk("100000000000000000000")
        );
        // RESP3 answers a bulk string too.
        assert_eq!(
            exec_with(&mut ks, Proto::Resp3, &[b"INCRBYFLOAT", b"new", b"1"]),
            bulk("1.5")
        );
        let nan = "ERR increment would produce NaN or Infinity";
        exec_err(&mut ks, &["INCRBYFLOAT", "new", "inf"], nan);
        ks.set("inf", "inf", None);
        exec_err(&mut ks, &["INCRBYFLOAT", "inf", "-inf"], nan);
        ks.set("huge", "1.7976931348623157e308", None);
        exec_err(&mut ks, &["INCRBYFLOAT", "huge", "1e308"], nan);
        // "1e400" and "0x10" are read by Redis's strtold into a long double; refused here
        // (see the module docs).
        for bad in ["abc", " 1", "1 ", "", "nan", "1e400", "0x10", "1,5"] {
            exec_err(&mut ks, &["INCRBYFLOAT", "new", bad], NOT_FLOAT);
        }
        ks.set("s", "hello", None);
        exec_err(&mut ks, &["INCRBYFLOAT", "s", "1"], NOT_FLOAT);
    }

    #[test]
    fn ld2string_trims_like_redis() {
        assert_eq!(ld2string_human(1.0), "1");
        assert_eq!(ld2string_human(-0.0), "0");
        assert_eq!(ld2string_human(-1.25), "-1.25");
        assert_eq!(ld2string_human(1e-18), "0");
        assert_eq!(ld2string_human(1.6e-17), "0.00000000000000002");
        assert_eq!(ld2string_human(3.0e15), "3000000000000000");
        // The binary rounding of the inputs does not show (Redis's long double hides it).
        assert_eq!(ld2string_human(0.1 + 0.2), "0.3");
        assert_eq!(ld2string_human(10.5 + 0.1), "10.6");
        assert_eq!(ld2string_human(1.1 * 1.1), "1.21");
        // Digits that are there are kept.
        assert_eq!(
            ld2string_human(1234567890123456.0 + 1.0),
            "1234567890123457"
        );
        assert_eq!(ld2string_human(1.0 / 3.0), "0.3333333333333333");
        assert_eq!(ld2string_human(-2.5e-3), "-0.0025");
    }
}
