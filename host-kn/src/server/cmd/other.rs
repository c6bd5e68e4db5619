//! The well-known key-taking commands of the data types this store does not hold (lists,
//! hashes, sets, sorted sets, streams, geo) and of those that Redis keeps in strings but
//! this store does not serve (bitmaps, `LCS`, HyperLogLog), and scripts and functions.
//!
//! They are named here so that they are routed to the keys' owner like any other command
//! ([`keys`] gives their key positions, as Redis's key specs do). [`run`] answers
//! `WRONGTYPE` when a key the command reads holds a string (a destination it would
//! overwrite, such as `SUNIONSTORE`'s first key, is not checked), and otherwise Redis's
//! unknown-command error. Bitmaps, `LCS`, HyperLogLogs and scripts operate on strings or
//! have no type, so they always get the unknown-command error. A command too short to name
//! its keys gets the unknown-command error too. Pub/sub commands name channels, not keys,
//! and are not served here.

use dinomo_shared::resp::Out;

use super::{is, string2ll, Keyspace, WRONGTYPE};
use crate::error::KvError;

/// Where a command's keys are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyPos {
    /// Exactly these positions.
    At(&'static [usize]),
    /// From position `first` to the end, less `skip_last` arguments (a timeout).
    From { first: usize, skip_last: usize },
    /// A count at position `at`, then that many keys.
    Counted { at: usize },
    /// A destination at 1, a count at 2, then that many keys.
    DestCounted,
    /// XREAD / XREADGROUP: the first half of what follows `STREAMS`.
    Streams,
    /// GEORADIUS[BYMEMBER]: the key at 1, and the one after `STORE`/`STOREDIST` if any
    /// (not type-checked).
    GeoStore,
}

/// What kind of value a command operates on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A type other than string: a string key is `WRONGTYPE`.
    Typed,
    /// Like `Typed`, but the first key is a destination that is overwritten.
    TypedDest,
    /// Strings (bitmaps, HyperLogLogs, LCS) or no type (scripts): never `WRONGTYPE`.
    Untyped,
}

/// A command's arity (Redis's), key positions and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    pub arity: i32,
    pub keys: KeyPos,
    pub kind: Kind,
}

const K1: KeyPos = KeyPos::At(&[1]);
const K12: KeyPos = KeyPos::At(&[1, 2]);
const ALL: KeyPos = KeyPos::From {
    first: 1,
    skip_last: 0,
};
const ALL_BUT_TIMEOUT: KeyPos = KeyPos::From {
    first: 1,
    skip_last: 1,
};

/// The spec of a command served here only to be refused.
pub(crate) fn spec(name: &str) -> Option<Spec> {
    use Kind::*;
    let (arity, keys, kind) = match name {
        // Lists.
        "LPUSH" | "RPUSH" | "LPUSHX" | "RPUSHX" | "LPOS" => (-3, K1, Typed),
        "LPOP" | "RPOP" => (-2, K1, Typed),
        "LLEN" => (2, K1, Typed),
        "LINDEX" => (3, K1, Typed),
        "LSET" | "LRANGE" | "LTRIM" | "LREM" => (4, K1, Typed),
        "LINSERT" => (5, K1, Typed),
        "RPOPLPUSH" => (3, K12, Typed),
        "BRPOPLPUSH" => (4, K12, Typed),
        "LMOVE" => (5, K12, Typed),
        "BLMOVE" => (6, K12, Typed),
        "BLPOP" | "BRPOP" => (-3, ALL_BUT_TIMEOUT, Typed),
        "LMPOP" => (-4, KeyPos::Counted { at: 1 }, Typed),
        "BLMPOP" => (-5, KeyPos::Counted { at: 2 }, Typed),
        // Hashes.
        "HSET" | "HMSET" => (-4, K1, Typed),
        "HSETNX" | "HINCRBY" | "HINCRBYFLOAT" => (4, K1, Typed),
        "HGET" | "HSTRLEN" | "HEXISTS" => (3, K1, Typed),
        "HMGET" | "HDEL" | "HSCAN" => (-3, K1, Typed),
        "HLEN" | "HKEYS" | "HVALS" | "HGETALL" => (2, K1, Typed),
        "HRANDFIELD" => (-2, K1, Typed),
        // Sets.
        "SADD" | "SREM" | "SMISMEMBER" | "SSCAN" => (-3, K1, Typed),
        "SMEMBERS" | "SCARD" => (2, K1, Typed),
        "SISMEMBER" => (3, K1, Typed),
        "SPOP" | "SRANDMEMBER" => (-2, K1, Typed),
        "SMOVE" => (4, K12, Typed),
        "SINTER" | "SUNION" | "SDIFF" => (-2, ALL, Typed),
        "SINTERSTORE" | "SUNIONSTORE" | "SDIFFSTORE" => (-3, ALL, TypedDest),
        "SINTERCARD" => (-3, KeyPos::Counted { at: 1 }, Typed),
        // Sorted sets.
        "ZADD" | "ZRANGE" | "ZREVRANGE" | "ZRANGEBYSCORE" | "ZREVRANGEBYSCORE" | "ZRANGEBYLEX"
        | "ZREVRANGEBYLEX" => (-4, K1, Typed),
        "ZINCRBY" | "ZCOUNT" | "ZLEXCOUNT" | "ZREMRANGEBYRANK" | "ZREMRANGEBYSCORE"
        | "ZREMRANGEBYLEX" => (4, K1, Typed),
        "ZREM" | "ZMSCORE" | "ZRANK" | "ZREVRANK" | "ZSCAN" => (-3, K1, Typed),
        "ZCARD" => (2, K1, Typed),
        "ZSCORE" => (3, K1, Typed),
        "ZPOPMIN" | "ZPOPMAX" | "ZRANDMEMBER" => (-2, K1, Typed),
        "BZPOPMIN" | "BZPOPMAX" => (-3, ALL_BUT_TIMEOUT, Typed),
        "ZRANGESTORE" => (-5, K12, TypedDest),
        "ZUNION" | "ZINTER" | "ZDIFF" | "ZINTERCARD" => (-3, KeyPos::Counted { at: 1 }, Typed),
        "ZUNIONSTORE" | "ZINTERSTORE" | "ZDIFFSTORE" => (-4, KeyPos::DestCounted, TypedDest),
        "ZMPOP" => (-4, KeyPos::Counted { at: 1 }, Typed),
        "BZMPOP" => (-5, KeyPos::Counted { at: 2 }, Typed),
        // Streams.
        "XADD" => (-5, K1, Typed),
        "XLEN" => (2, K1, Typed),
        "XRANGE" | "XREVRANGE" | "XTRIM" | "XACK" => (-4, K1, Typed),
        "XDEL" | "XPENDING" | "XSETID" => (-3, K1, Typed),
        "XCLAIM" | "XAUTOCLAIM" => (-6, K1, Typed),
        "XREAD" => (-4, KeyPos::Streams, Typed),
        "XREADGROUP" => (-7, KeyPos::Streams, Typed),
        // Geo (sorted sets).
        "GEOADD" => (-5, K1, Typed),
        "GEODIST" => (-4, K1, Typed),
        "GEOHASH" | "GEOPOS" => (-2, K1, Typed),
        "GEORADIUS" => (-6, KeyPos::GeoStore, Typed),
        "GEORADIUSBYMEMBER" => (-5, KeyPos::GeoStore, Typed),
        "GEORADIUS_RO" => (-6, K1, Typed),
        "GEORADIUSBYMEMBER_RO" => (-5, K1, Typed),
        "GEOSEARCH" => (-7, K1, Typed),
        "GEOSEARCHSTORE" => (-8, K12, TypedDest),
        // HyperLogLog (strings in Redis).
        "PFADD" => (-2, K1, Untyped),
        "PFCOUNT" | "PFMERGE" => (-2, ALL, Untyped),
        // Bitmaps and LCS (strings in Redis).
        "SETBIT" => (4, K1, Untyped),
        "GETBIT" => (3, K1, Untyped),
        "BITCOUNT" | "BITFIELD" | "BITFIELD_RO" => (-2, K1, Untyped),
        "BITPOS" => (-3, K1, Untyped),
        "BITOP" => (
            -4,
            KeyPos::From {
                first: 2,
                skip_last: 0,
            },
            Untyped,
        ),
        "LCS" => (-3, K12, Untyped),
        // Scripts and functions.
        "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" => {
            (-3, KeyPos::Counted { at: 2 }, Untyped)
        }
        _ => return None,
    };
    Some(Spec { arity, keys, kind })
}

/// The keys of a command served here only to be refused; empty when malformed.
pub(crate) fn keys<'a>(name: &str, args: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    let Some(spec) = spec(name) else {
        return Vec::new();
    };
    if !super::arity_fits(spec.arity, args.len()) {
        return Vec::new();
    }
    let n = args.len();
    let range = |from: usize, to: usize| -> Vec<&'a [u8]> {
        args[from.min(n)..to.min(n)]
            .iter()
            .map(Vec::as_slice)
            .collect()
    };
    match spec.keys {
        KeyPos::At(at) => at
            .iter()
            .filter_map(|&i| args.get(i).map(Vec::as_slice))
            .collect(),
        KeyPos::From { first, skip_last } => range(first, n.saturating_sub(skip_last)),
        KeyPos::Counted { at } => match numkeys(args, at) {
            Some(k) => range(at + 1, at + 1 + k),
            None => Vec::new(),
        },
        KeyPos::DestCounted => match numkeys(args, 2) {
            Some(k) => {
                let mut v = vec![args[1].as_slice()];
                v.extend(range(3, 3 + k));
                v
            }
            None => Vec::new(),
        },
        KeyPos::Streams => streams(name, args),
        KeyPos::GeoStore => {
            let mut v = vec![args[1].as_slice()];
            // The last STORE/STOREDIST names the destination (Redis searches from the end).
            let store = (2..n.saturating_sub(1))
                .rev()
                .find(|&i| is(&args[i], "STORE") || is(&args[i], "STOREDIST"));
            if let Some(i) = store {
                v.push(&args[i + 1]);
            }
            v
        }
    }
}

/// The key count at `at`, if it is a non-negative integer and that many keys follow.
fn numkeys(args: &[Vec<u8>], at: usize) -> Option<usize> {
    let k = usize::try_from(string2ll(args.get(at)?)?).ok()?;
    (k <= args.len().saturating_sub(at + 1)).then_some(k)
}

/// XREAD [COUNT n] [BLOCK ms] STREAMS key... id... ; XREADGROUP GROUP g c [COUNT n]
/// [BLOCK ms] [NOACK] STREAMS key... id...
fn streams<'a>(name: &str, args: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    let group = name == "XREADGROUP";
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        if is(a, "STREAMS") {
            let rest = &args[i + 1..];
            if rest.is_empty() || rest.len() % 2 != 0 {
                return Vec::new();
            }
            return rest[..rest.len() / 2].iter().map(Vec::as_slice).collect();
        } else if is(a, "COUNT") || is(a, "BLOCK") {
            i += 2;
        } else if group && is(a, "GROUP") {
            i += 3;
        } else if group && is(a, "NOACK") {
            i += 1;
        } else {
            return Vec::new();
        }
    }
    Vec::new()
}

/// Answers a command of a type not held: `WRONGTYPE` if a key it reads holds a string,
/// else the unknown-command error.
pub(crate) fn run(
    name: &str,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    if let Some(spec) = spec(name) {
        let all = keys(name, args);
        let checked: &[&[u8]] = match (spec.kind, spec.keys) {
            (Kind::Untyped, _) => &[],
            // The STORE destination is overwritten.
            (Kind::Typed, KeyPos::GeoStore) => &all[..all.len().min(1)],
            (Kind::Typed, _) => &all,
            (Kind::TypedDest, _) => all.get(1..).unwrap_or(&[]),
        };
        for k in checked {
            if ks.get(k)?.is_some() {
                o.error(WRONGTYPE);
                return Ok(());
            }
        }
    }
    super::unknown_command(args, o);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::mem::Mem;
    use super::super::test_util::*;
    use super::super::{keys as cmd_keys, serves};

    fn k(words: &[&str]) -> Vec<String> {
        let args: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        let name = words[0].to_ascii_uppercase();
        cmd_keys(&name, &args)
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    const NONE: [&str; 0] = [];

    #[test]
    fn key_positions_follow_redis() {
        assert_eq!(k(&["LPUSH", "l", "a", "b"]), ["l"]);
        assert_eq!(k(&["LPUSH", "l"]), NONE);
        assert_eq!(k(&["LMOVE", "a", "b", "LEFT", "RIGHT"]), ["a", "b"]);
        assert_eq!(k(&["BLPOP", "a", "b", "0"]), ["a", "b"]);
        assert_eq!(k(&["SUNIONSTORE", "d", "a", "b"]), ["d", "a", "b"]);
        assert_eq!(
            k(&["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"]),
            ["d", "a", "b"]
        );
        assert_eq!(k(&["ZUNIONSTORE", "d", "3", "a", "b"]), NONE);
        assert_eq!(k(&["ZINTER", "2", "a", "b", "WITHSCORES"]), ["a", "b"]);
        assert_eq!(k(&["BZMPOP", "0", "2", "a", "b", "MIN"]), ["a", "b"]);
        assert_eq!(k(&["EVAL", "return 1", "2", "a", "b", "x"]), ["a", "b"]);
        assert_eq!(k(&["EVAL", "return 1", "0"]), NONE);
        assert_eq!(k(&["EVAL", "return 1", "-1", "a"]), NONE);
        assert_eq!(
            k(&["XREAD", "COUNT", "2", "STREAMS", "s1", "s2", "0", "0"]),
            ["s1", "s2"]
        );
        assert_eq!(k(&["XREAD", "STREAMS", "s1", "s2", "0"]), NONE);
        assert_eq!(
            k(&[
                "XREADGROUP",
                "GROUP",
                "streams",
                "c",
                "NOACK",
                "STREAMS",
                "s",
                ">"
            ]),
            ["s"]
        );
        assert_eq!(
            k(&["GEORADIUS", "g", "0", "0", "1", "km", "STORE", "d"]),
            ["g", "d"]
        );
        assert_eq!(k(&["GEORADIUS", "g", "0", "0", "1", "km"]), ["g"]);
        assert_eq!(k(&["BITOP", "AND", "d", "a", "b"]), ["d", "a", "b"]);
        assert_eq!(k(&["PFCOUNT", "h1", "h2"]), ["h1", "h2"]);
        assert!(serves("HSET") && serves("XADD") && serves("SETBIT") && serves("FCALL"));
        assert!(!serves("SUBSCRIBE") && !serves("PUBLISH") && !serves("FOO"));
    }

    #[test]
    fn strings_are_the_wrong_type_else_unknown() {
        let mut ks = Mem::new();
        ks.set("s", "v", None);
        let wrong = "WRONGTYPE Operation against a key holding the wrong kind of value";
        exec_err(&mut ks, &["LPUSH", "s", "a"], wrong);
        exec_err(&mut ks, &["HGET", "s", "f"], wrong);
        exec_err(&mut ks, &["SINTER", "x", "s"], wrong);
        exec_err(&mut ks, &["ZUNIONSTORE", "d", "2", "x", "s"], wrong);
        exec_err(&mut ks, &["XREAD", "STREAMS", "s", "0"], wrong);
        exec_err(
            &mut ks,
            &["lpush", "x", "a"],
            "ERR unknown command 'lpush', with args beginning with: 'x' 'a' ",
        );
        // A destination that would be overwritten is not checked.
        exec_err(
            &mut ks,
            &["SUNIONSTORE", "s", "x"],
            "ERR unknown command 'SUNIONSTORE', with args beginning with: 's' 'x' ",
        );
        exec_err(
            &mut ks,
            &["GEORADIUS", "g", "0", "0", "1", "km", "STORE", "s"],
            "ERR unknown command 'GEORADIUS', with args beginning with: 'g' '0' '0' '1' 'km' 'STORE' 's' ",
        );
        // Strings in Redis, not served here: never WRONGTYPE.
        exec_err(
            &mut ks,
            &["SETBIT", "s", "1", "1"],
            "ERR unknown command 'SETBIT', with args beginning with: 's' '1' '1' ",
        );
        exec_err(
            &mut ks,
            &["EVAL", "x", "1", "s"],
            "ERR unknown command 'EVAL', with args beginning with: 'x' '1' 's' ",
        );
        // Too short to name a key.
        exec_err(
            &mut ks,
            &["LPUSH", "s"],
            "ERR unknown command 'LPUSH', with args beginning with: 's' ",
        );
        // The arguments shown stop once 128 bytes are.
        let long = "x".repeat(200);
        exec_err(
            &mut ks,
            &["HGET", "h", &long, "y"],
            &format!(
                "ERR unknown command 'HGET', with args beginning with: 'h' '{}' ",
                "x".repeat(124)
            ),
        );
    }
}
