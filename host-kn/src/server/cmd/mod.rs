//! Redis's string, expiry and keyspace commands, with Redis 7.2's semantics and error
//! texts, run against an abstract [`Keyspace`] (one owner shard's keys). Pure: no I/O, no
//! clock of its own, no knowledge of shards or slots; the caller routes by [`keys`],
//! checks ACLs and `CROSSSLOT`, makes the staged writes durable, and sends the reply.
//!
//! The families live in sibling files: [`strings`] (SET, GET, INCR, ...), [`expire`]
//! (EXPIRE, TTL, PERSIST, ...), [`keys`](mod@keys) (DEL, EXISTS, RENAME, COPY, ...) and
//! [`other`] (the well-known commands of the data types this store does not hold: they
//! answer `WRONGTYPE` when a key they name holds a string, else Redis's unknown-command
//! error).
//!
//! Every argument or syntax error is answered before any write is staged, so bad input
//! changes nothing. Expiry times are kept absolute, in Unix milliseconds; a relative one is
//! [`Keyspace::now_ms`] plus the TTL, computed once per command with overflow checks, the
//! way Redis uses one time snapshot per command.
//!
//! # Where this differs from Redis 7.2
//!
//! * `INCRBYFLOAT` computes with `f64`, where Redis uses the x87 80-bit `long double`
//!   (64-bit mantissa, about 19 significant digits). Redis prints the result with `%.17Lf`
//!   and trims trailing zeros; its wider type hides the binary rounding of decimal inputs
//!   (`0.1 + 0.2` prints `0.3`). Here the result is printed as the decimal with the fewest
//!   significant digits within two units in the last place of the `f64` sum, in plain
//!   notation with at most 17 digits after the point, trailing zeros trimmed. The two
//!   agree whenever the exact decimal result has at most 15 significant digits (`10.5 +
//!   0.1` is `10.6`, `5.0e3 + 2.0e2` is `5200` in both); beyond that (integers above 2^53,
//!   or 16–17 significant digits, e.g. `0.30000000000000004 + 0`, which this prints `0.3`)
//!   the last digits can differ. Inputs beyond the `f64` range (`|x| >
//!   1.7976931348623157e308`; Redis's `long double` reads up to about `1.19e4932`) and
//!   hexadecimal floats (`0x1p3`, which C's `strtold` reads) are answered `ERR value is
//!   not a valid float`; a result beyond it is `ERR increment would produce NaN or
//!   Infinity`.
//! * A value longer than [`Keyspace::max_value`] is refused with Redis's
//!   `ERR string exceeds maximum allowed size (proto-max-bulk-len)` by every command that
//!   writes one (`SET`, `MSET`, `GETSET`, ... too, which Redis refuses at the protocol
//!   level instead, as the bulk length is read).
//! * `COPY ... DB n`: databases 0..=15 exist as in a default Redis; any `n` but 0 gets
//!   Redis's cluster-mode error (`ERR Copying to another database is not allowed in
//!   cluster mode`), out of range `ERR DB index is out of range`.
//! * `SET`/`GETEX` with `EXAT`/`PXAT` in the past: `SET` stores the key with that expiry
//!   time (so the keyspace hides it at once, as Redis's lazy expiry does) and `GETEX`
//!   deletes it, as Redis does.
//! * The data types other than strings are not held: see [`other`]. Bitmaps
//!   (`SETBIT`, `GETBIT`, `BITCOUNT`, ...), `LCS` and HyperLogLogs operate on strings in
//!   Redis, so they never answer `WRONGTYPE` here: always the unknown-command error; so do
//!   scripts and functions (`EVAL`, `FCALL`, ...). For the others, a missing key also gets
//!   the unknown-command error where Redis would create or read an empty value, and every
//!   key they name except an overwritten destination (`SUNIONSTORE dst ...`) is checked for
//!   `WRONGTYPE`, in order, where Redis checks some of them only on its way.

pub(crate) mod expire;
pub(crate) mod keys;
#[cfg(test)]
pub(crate) mod mem;
pub(crate) mod other;
pub(crate) mod strings;

use dinomo_shared::resp::Out;

use crate::error::KvError;

/// A key's live state as the owner shard holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    pub value: Vec<u8>,
    /// When the key expires, Unix milliseconds; None: never.
    pub expire_at: Option<u64>,
}

/// One owner shard's keys, as a command sees them: reads see every earlier write of the same
/// command (and transaction); expired keys are already hidden by the implementation.
pub(crate) trait Keyspace {
    fn get(&mut self, key: &[u8]) -> Result<Option<Stored>, KvError>;
    /// Stages a put (durable before the reply is sent; the caller handles that).
    fn put(&mut self, key: &[u8], value: Vec<u8>, expire_at: Option<u64>) -> Result<(), KvError>;
    fn delete(&mut self, key: &[u8]) -> Result<(), KvError>;
    /// Wall-clock now, Unix milliseconds (one value for the whole command, like Redis).
    fn now_ms(&self) -> u64;
    /// Largest value accepted (larger: `ERR string exceeds maximum allowed size (proto-max-bulk-len)`-style error, see below).
    fn max_value(&self) -> usize;
}

/// Redis's reply to a command on a key of another type.
pub(crate) const WRONGTYPE: &str =
    "WRONGTYPE Operation against a key holding the wrong kind of value";
/// Redis's reply to an argument that is not a 64-bit integer (`string2ll`).
pub(crate) const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub(crate) const SYNTAX: &str = "ERR syntax error";
/// Redis's reply to a string that would grow past the largest value.
pub(crate) const TOO_BIG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

/// Which family serves a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Strings,
    Expire,
    Keys,
}

/// The Redis arity (negative: at least that many arguments, the name included) and family
/// of a command served here with its full semantics.
fn own(name: &str) -> Option<(i32, Family)> {
    use Family::*;
    Some(match name {
        "SET" => (-3, Strings),
        "SETNX" | "GETSET" | "APPEND" | "INCRBY" | "DECRBY" | "INCRBYFLOAT" => (3, Strings),
        "SETEX" | "PSETEX" | "GETRANGE" | "SUBSTR" | "SETRANGE" => (4, Strings),
        "GET" | "GETDEL" | "STRLEN" | "INCR" | "DECR" => (2, Strings),
        "GETEX" | "MGET" => (-2, Strings),
        "MSET" | "MSETNX" => (-3, Strings),
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => (-3, Expire),
        "TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" | "PERSIST" => (2, Expire),
        "DEL" | "UNLINK" | "EXISTS" | "TOUCH" => (-2, Keys),
        "TYPE" => (2, Keys),
        "RENAME" | "RENAMENX" => (3, Keys),
        "COPY" => (-3, Keys),
        _ => return None,
    })
}

/// Whether `argc` arguments (the name included) fit a Redis arity.
fn arity_fits(arity: i32, argc: usize) -> bool {
    let need = arity.unsigned_abs() as usize;
    if arity < 0 {
        argc >= need
    } else {
        argc == need
    }
}

/// Whether `name` (upper-case) is a command `run` serves.
pub(crate) fn serves(name: &str) -> bool {
    own(name).is_some() || other::spec(name).is_some()
}

/// The keys `args` names (args[0] is the command name), in order, for slot routing and ACL
/// checks; an empty vec for a malformed command (run() then answers the error).
pub(crate) fn keys<'a>(name: &str, args: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    let Some((arity, _)) = own(name) else {
        return other::keys(name, args);
    };
    if !arity_fits(arity, args.len()) {
        return Vec::new();
    }
    match name {
        "MGET" | "DEL" | "UNLINK" | "EXISTS" | "TOUCH" => {
            args[1..].iter().map(Vec::as_slice).collect()
        }
        "MSET" | "MSETNX" if args.len() % 2 == 0 => Vec::new(),
        "MSET" | "MSETNX" => args[1..].iter().step_by(2).map(Vec::as_slice).collect(),
        "RENAME" | "RENAMENX" | "COPY" => vec![&args[1], &args[2]],
        _ => vec![&args[1]],
    }
}

/// Runs one command (`name` upper-case, `args[0]` the name as sent) against `ks`, writing
/// its reply to `o`. Every argument/syntax error is answered in `o` BEFORE any write is
/// staged (bad input changes nothing). Err: the keyspace failed (the caller answers it).
pub(crate) fn run(
    name: &str,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    let Some((arity, family)) = own(name) else {
        return other::run(name, args, ks, o);
    };
    if !arity_fits(arity, args.len()) {
        arity_error(name, o);
        return Ok(());
    }
    match family {
        Family::Strings => strings::run(name, args, ks, o),
        Family::Expire => expire::run(name, args, ks, o),
        Family::Keys => keys::run(name, args, ks, o),
    }
}

/// `ERR wrong number of arguments for 'xxx' command`, the name in lower case.
pub(crate) fn arity_error(name: &str, o: &mut Out<'_>) {
    o.error(&format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ));
}

/// `ERR invalid expire time in 'xxx' command`, the name in lower case.
pub(crate) fn expire_time_error(name: &str, o: &mut Out<'_>) {
    o.error(&format!(
        "ERR invalid expire time in '{}' command",
        name.to_ascii_lowercase()
    ));
}

/// Redis's unknown-command error: the name as sent (at most 128 bytes) and the arguments,
/// each quoted and followed by a space, while what is shown is under 128 bytes (the last
/// one cut to fit).
pub(crate) fn unknown_command(args: &[Vec<u8>], o: &mut Out<'_>) {
    let name = args.first().map_or(&[][..], Vec::as_slice);
    let mut shown: Vec<u8> = Vec::new();
    for a in args.iter().skip(1) {
        if shown.len() >= 128 {
            break;
        }
        let room = 128 - shown.len();
        shown.push(b'\'');
        shown.extend_from_slice(&a[..a.len().min(room)]);
        shown.extend_from_slice(b"' ");
    }
    o.error(&format!(
        "ERR unknown command '{}', with args beginning with: {}",
        String::from_utf8_lossy(&name[..name.len().min(128)]),
        String::from_utf8_lossy(&shown)
    ));
}

/// Whether `arg` is the option `word` (ASCII, any case).
pub(crate) fn is(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

/// Redis's `string2ll`: an optional `-` and decimal digits, no leading zeros (`0` alone
/// excepted), no `+`, no spaces, at most 20 bytes, within `i64`.
pub(crate) fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s[0] {
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// A bulk string, or the protocol's null (`$-1` in RESP2, `_` in RESP3).
pub(crate) fn bulk_or_null(o: &mut Out<'_>, v: Option<&[u8]>) {
    match v {
        Some(v) => o.bulk(v),
        None => o.null(),
    }
}

/// The present time as Redis compares expiry times (a signed millisecond count).
pub(crate) fn now_i64(ks: &dyn Keyspace) -> i64 {
    i64::try_from(ks.now_ms()).unwrap_or(i64::MAX)
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Runs commands against a [`Mem`] keyspace and compares the RESP2 bytes.

    use dinomo_shared::resp::{Out, Proto};

    use super::mem::Mem;

    /// Runs `words` (the command name first, any case) and returns the RESP2 reply.
    pub(crate) fn exec_with(ks: &mut Mem, proto: Proto, words: &[&[u8]]) -> String {
        let args: Vec<Vec<u8>> = words.iter().map(|w| w.to_vec()).collect();
        let name = String::from_utf8_lossy(words[0]).to_ascii_uppercase();
        let mut buf = Vec::new();
        let mut o = Out {
            buf: &mut buf,
            proto,
        };
        super::run(&name, &args, ks, &mut o).expect("the in-memory keyspace never fails");
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Runs a command given as words.
    pub(crate) fn exec(ks: &mut Mem, words: &[&str]) -> String {
        let w: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
        exec_with(ks, Proto::Resp2, &w)
    }

    /// Runs a command that must fail with `err` (without the leading `-`) and change nothing.
    pub(crate) fn exec_err(ks: &mut Mem, words: &[&str], err: &str) {
        let before = ks.map.clone();
        ks.writes = 0;
        assert_eq!(exec(ks, words), format!("-{err}\r\n"), "{words:?}");
        assert_eq!(ks.map, before, "{words:?} changed the keyspace");
        assert_eq!(ks.writes, 0, "{words:?} staged a write");
    }

    pub(crate) fn bulk(s: &str) -> String {
        format!("${}\r\n{s}\r\n", s.len())
    }

    pub(crate) fn int(v: i64) -> String {
        format!(":{v}\r\n")
    }

    pub(crate) const OK: &str = "+OK\r\n";
    pub(crate) const NIL: &str = "$-1\r\n";
}

#[cfg(test)]
mod tests {
    use super::mem::Mem;
    use super::test_util::*;
    use super::*;

    #[test]
    fn string2ll_is_redis_strict() {
        assert_eq!(string2ll(b"0"), Some(0));
        assert_eq!(string2ll(b"-1"), Some(-1));
        assert_eq!(string2ll(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"+1",
            b" 1",
            b"1 ",
            b"01",
            b"00",
            b"-0",
            b"1.0",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"123456789012345678901",
            b"1e3",
            b"0x10",
        ] {
            assert_eq!(string2ll(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn keys_names_the_keys_of_served_commands() {
        let a = |w: &[&str]| -> Vec<Vec<u8>> { w.iter().map(|s| s.as_bytes().to_vec()).collect() };
        let k = |name: &str, w: &[&str]| -> Vec<String> {
            let args = a(w);
            keys(name, &args)
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect()
        };
        assert_eq!(k("SET", &["set", "a", "1", "EX", "5"]), ["a"]);
        assert_eq!(k("SET", &["set", "a"]), Vec::<String>::new());
        assert_eq!(k("MSET", &["mset", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(k("MSET", &["mset", "a", "1", "b"]), Vec::<String>::new());
        assert_eq!(k("DEL", &["del", "a", "b", "a"]), ["a", "b", "a"]);
        assert_eq!(k("COPY", &["copy", "a", "b", "REPLACE"]), ["a", "b"]);
        assert_eq!(k("RENAME", &["rename", "a", "b"]), ["a", "b"]);
        assert_eq!(k("TTL", &["ttl", "a", "b"]), Vec::<String>::new());
        assert_eq!(k("EXPIRE", &["expire", "a", "1", "NX"]), ["a"]);
        assert_eq!(k("PING", &["ping"]), Vec::<String>::new());
        assert!(serves("GETEX") && serves("LPUSH") && !serves("PING") && !serves("PUBLISH"));
    }

    #[test]
    fn arity_errors_name_the_command_in_lower_case() {
        let mut ks = Mem::new();
        exec_err(
            &mut ks,
            &["get"],
            "ERR wrong number of arguments for 'get' command",
        );
        exec_err(
            &mut ks,
            &["Set", "a"],
            "ERR wrong number of arguments for 'set' command",
        );
        exec_err(
            &mut ks,
            &["TTL", "a", "b"],
            "ERR wrong number of arguments for 'ttl' command",
        );
        exec_err(
            &mut ks,
            &["mset", "a", "1", "b"],
            "ERR wrong number of arguments for 'mset' command",
        );
        exec_err(
            &mut ks,
            &["msetnx", "a"],
            "ERR wrong number of arguments for 'msetnx' command",
        );
        exec_err(
            &mut ks,
            &["copy", "a"],
            "ERR wrong number of arguments for 'copy' command",
        );
        exec_err(
            &mut ks,
            &["getrange", "a", "1"],
            "ERR wrong number of arguments for 'getrange' command",
        );
    }

    /// A keyspace whose every access fails.
    #[derive(Debug)]
    struct Down;

    impl Keyspace for Down {
        fn get(&mut self, _: &[u8]) -> Result<Option<Stored>, KvError> {
            Err(KvError::ShuttingDown)
        }
        fn put(&mut self, _: &[u8], _: Vec<u8>, _: Option<u64>) -> Result<(), KvError> {
            Err(KvError::ShuttingDown)
        }
        fn delete(&mut self, _: &[u8]) -> Result<(), KvError> {
            Err(KvError::ShuttingDown)
        }
        fn now_ms(&self) -> u64 {
            0
        }
        fn max_value(&self) -> usize {
            16
        }
    }

    #[test]
    fn keyspace_failures_reach_the_caller_and_input_errors_do_not_touch_it() {
        let mut buf = Vec::new();
        let mut o = Out {
            buf: &mut buf,
            proto: dinomo_shared::resp::Proto::Resp2,
        };
        let args =
            |w: &[&str]| -> Vec<Vec<u8>> { w.iter().map(|s| s.as_bytes().to_vec()).collect() };
        assert_eq!(
            run("GET", &args(&["GET", "a"]), &mut Down, &mut o),
            Err(KvError::ShuttingDown)
        );
        // Bad input is answered without a look at the keyspace.
        for (name, w) in [
            ("SET", &["SET", "a", "b", "EX", "0"][..]),
            ("INCRBY", &["INCRBY", "a", "x"]),
            ("EXPIRE", &["EXPIRE", "a", "1", "NX", "XX"]),
            ("COPY", &["COPY", "a", "b", "DB", "1"]),
            ("GETRANGE", &["GETRANGE", "a", "x", "1"]),
        ] {
            o.buf.clear();
            assert_eq!(run(name, &args(w), &mut Down, &mut o), Ok(()), "{w:?}");
            assert_eq!(o.buf.first(), Some(&b'-'), "{w:?}");
        }
    }

    #[test]
    fn resp3_nulls() {
        let mut ks = Mem::new();
        ks.set("a", "1", None);
        let r3 = |ks: &mut Mem, w: &[&[u8]]| exec_with(ks, dinomo_shared::resp::Proto::Resp3, w);
        assert_eq!(r3(&mut ks, &[b"SET", b"a", b"2", b"NX"]), "_\r\n");
        assert_eq!(r3(&mut ks, &[b"GETDEL", b"x"]), "_\r\n");
        assert_eq!(r3(&mut ks, &[b"GETEX", b"x"]), "_\r\n");
        assert_eq!(r3(&mut ks, &[b"SET", b"b", b"2", b"GET"]), "_\r\n");
        assert_eq!(r3(&mut ks, &[b"TYPE", b"a"]), "+string\r\n");
    }
}
