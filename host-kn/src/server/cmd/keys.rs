//! The keyspace commands: DEL, UNLINK, EXISTS, TOUCH, TYPE, RENAME, RENAMENX, COPY.
//!
//! The keys of one command are in one slot (the caller answers `CROSSSLOT` otherwise).
//! RENAME and COPY carry the source's expiry time to the destination, as Redis does.

use dinomo_shared::resp::Out;

use super::{is, string2ll, Keyspace, NOT_INTEGER, SYNTAX};
use crate::error::KvError;

/// Databases a default Redis has (`databases 16`); in cluster mode only 0 is usable.
const DATABASES: i64 = 16;

pub(crate) fn run(
    name: &str,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    match name {
        "DEL" | "UNLINK" => {
            let mut n = 0;
            for k in &args[1..] {
                if ks.get(k)?.is_some() {
                    ks.delete(k)?;
                    n += 1;
                }
            }
            o.int(n);
        }
        "EXISTS" | "TOUCH" => {
            // EXISTS counts a key named twice twice; so does TOUCH.
            let mut n = 0;
            for k in &args[1..] {
                if ks.get(k)?.is_some() {
                    n += 1;
                }
            }
            o.int(n);
        }
        "TYPE" => {
            let t = if ks.get(&args[1])?.is_some() {
                "string"
            } else {
                "none"
            };
            o.simple(t);
        }
        "RENAME" | "RENAMENX" => rename(name == "RENAMENX", args, ks, o)?,
        "COPY" => copy(args, ks, o)?,
        _ => super::unknown_command(args, o),
    }
    Ok(())
}

/// `RENAME src dst` / `RENAMENX src dst`.
fn rename(
    nx: bool,
    args: &[Vec<u8>],
    ks: &mut dyn Keyspace,
    o: &mut Out<'_>,
) -> Result<(), KvError> {
    let (src, dst) = (args[1].as_slice(), args[2].as_slice());
    let Some(s) = ks.get(src)? else {
        o.error("ERR no such key");
        return Ok(());
    };
    // The same name: nothing to do, though a missing key is still an error.
    if src == dst {
        if nx {
            o.int(0);
        } else {
            o.simple("OK");
        }
        return Ok(());
    }
    if nx && ks.get(dst)?.is_some() {
        o.int(0);
        return Ok(());
    }
    ks.put(dst, s.value, s.expire_at)?;
    ks.delete(src)?;
    if nx {
        o.int(1);
    } else {
        o.simple("OK");
    }
    Ok(())
}

/// `COPY src dst [DB n] [REPLACE]`.
fn copy(args: &[Vec<u8>], ks: &mut dyn Keyspace, o: &mut Out<'_>) -> Result<(), KvError> {
    let (src, dst) = (args[1].as_slice(), args[2].as_slice());
    let mut replace = false;
    let mut db = 0;
    let mut j = 3;
    while j < args.len() {
        if is(&args[j], "REPLACE") {
            replace = true;
        } else if is(&args[j], "DB") && j + 1 < args.len() {
            let Some(n) = string2ll(&args[j + 1]).filter(|n| i32::try_from(*n).is_ok()) else {
                o.error(NOT_INTEGER);
                return Ok(());
            };
            if !(0..DATABASES).contains(&n) {
                o.error("ERR DB index is out of range");
                return Ok(());
            }
            db = n;
            j += 1;
        } else {
            o.error(SYNTAX);
            return Ok(());
        }
        j += 1;
    }
    if db != 0 {
        o.error("ERR Copying to another database is not allowed in cluster mode");
        return Ok(());
    }
    if src == dst {
        o.error("ERR source and destination objects are the same");
        return Ok(());
    }
    let Some(s) = ks.get(src)? else {
        o.int(0);
        return Ok(());
    };
    if !replace && ks.get(dst)?.is_some() {
        o.int(0);
        return Ok(());
    }
    ks.put(dst, s.value, s.expire_at)?;
    o.int(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::mem::Mem;
    use super::super::test_util::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn del_unlink_exists_touch_type() {
        let mut ks = Mem::new();
        ks.set("a", "1", None);
        ks.set("b", "2", None);
        ks.set("c", "3", None);
        ks.set("gone", "x", Some(NOW - 1));
        assert_eq!(
            exec(&mut ks, &["EXISTS", "a", "a", "b", "x", "gone"]),
            int(3)
        );
        assert_eq!(exec(&mut ks, &["TOUCH", "a", "x"]), int(1));
        assert_eq!(exec(&mut ks, &["TYPE", "a"]), "+string\r\n");
        assert_eq!(exec(&mut ks, &["TYPE", "x"]), "+none\r\n");
        assert_eq!(exec(&mut ks, &["TYPE", "gone"]), "+none\r\n");
        assert_eq!(exec(&mut ks, &["DEL", "a", "a", "x", "gone"]), int(1));
        assert_eq!(ks.value("a"), None);
        assert_eq!(exec(&mut ks, &["UNLINK", "b", "c"]), int(2));
        assert_eq!(exec(&mut ks, &["EXISTS", "a", "b", "c"]), int(0));
        ks.writes = 0;
        assert_eq!(exec(&mut ks, &["DEL", "none"]), int(0));
        assert_eq!(ks.writes, 0);
    }

    #[test]
    fn rename_keeps_the_ttl() {
        let mut ks = Mem::new();
        ks.set("a", "1", Some(NOW + 4000));
        ks.set("b", "2", None);
        assert_eq!(exec(&mut ks, &["RENAME", "a", "b"]), OK);
        assert_eq!(ks.value("a"), None);
        assert_eq!(ks.value("b").as_deref(), Some("1"));
        assert_eq!(ks.expiry("b"), Some(NOW + 4000));
        // Renaming over a key with a TTL, from one without: no TTL.
        ks.set("c", "3", None);
        assert_eq!(exec(&mut ks, &["RENAME", "c", "b"]), OK);
        assert_eq!(ks.expiry("b"), None);
        assert_eq!(exec(&mut ks, &["RENAME", "b", "b"]), OK);
        assert_eq!(ks.value("b").as_deref(), Some("3"));
        exec_err(&mut ks, &["RENAME", "none", "b"], "ERR no such key");
        exec_err(&mut ks, &["RENAME", "none", "none"], "ERR no such key");
        exec_err(&mut ks, &["RENAMENX", "none", "x"], "ERR no such key");
        ks.set("d", "4", Some(NOW + 10));
        assert_eq!(exec(&mut ks, &["RENAMENX", "d", "b"]), int(0));
        assert_eq!(ks.value("d").as_deref(), Some("4"));
        assert_eq!(exec(&mut ks, &["RENAMENX", "d", "d"]), int(0));
        assert_eq!(exec(&mut ks, &["RENAMENX", "d", "e"]), int(1));
        assert_eq!(ks.value("e").as_deref(), Some("4"));
        assert_eq!(ks.expiry("e"), Some(NOW + 10));
        assert_eq!(ks.value("d"), None);
    }

    #[test]
    fn copy_with_and_without_replace() {
        let mut ks = Mem::new();
        ks.set("a", "1", Some(NOW + 4000));
        ks.set("b", "2", None);
        assert_eq!(exec(&mut ks, &["COPY", "a", "c"]), int(1));
        assert_eq!(ks.value("c").as_deref(), Some("1"));
        assert_eq!(ks.expiry("c"), Some(NOW + 4000));
        assert_eq!(ks.value("a").as_deref(), Some("1"));
        ks.writes = 0;
        assert_eq!(exec(&mut ks, &["COPY", "a", "b"]), int(0));
        assert_eq!(exec(&mut ks, &["COPY", "none", "b", "REPLACE"]), int(0));
        assert_eq!(ks.writes, 0);
        assert_eq!(ks.value("b").as_deref(), Some("2"));
        assert_eq!(
            exec(&mut ks, &["COPY", "a", "b", "replace", "DB", "0"]),
            int(1)
        );
        assert_eq!(ks.value("b").as_deref(), Some("1"));
        assert_eq!(ks.expiry("b"), Some(NOW + 4000));
        exec_err(
            &mut ks,
            &["COPY", "a", "b", "DB", "1"],
            "ERR Copying to another database is not allowed in cluster mode",
        );
        exec_err(
            &mut ks,
            &["COPY", "a", "b", "DB", "16"],
            "ERR DB index is out of range",
        );
        exec_err(
            &mut ks,
            &["COPY", "a", "b", "DB", "-1"],
            "ERR DB index is out of range",
        );
        exec_err(
            &mut ks,
            &["COPY", "a", "b", "DB", "x"],
            "ERR value is not an integer or out of range",
        );
        exec_err(
            &mut ks,
            &["COPY", "a", "b", "DB", "4294967296"],
            "ERR value is not an integer or out of range",
        );
        exec_err(&mut ks, &["COPY", "a", "b", "DB"], "ERR syntax error");
        exec_err(&mut ks, &["COPY", "a", "b", "FOO"], "ERR syntax error");
        exec_err(
            &mut ks,
            &["COPY", "a", "a"],
            "ERR source and destination objects are the same",
        );
    }
}
