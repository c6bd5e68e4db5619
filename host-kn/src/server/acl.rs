//! Who may use the Redis protocol, and for what: the default user's password
//! (`requirepass`) and ACL users in a subset of Redis's ACL file syntax.
//!
//! Semantics follow Redis: `AUTH password` logs in as `default`, `AUTH user password` as
//! `user`; a user who is `off`, unknown, or given a wrong password gets the same
//! `WRONGPASS` answer; a logged-in user runs only the commands its rules allow
//! (`NOPERM`) on keys its patterns match. Passwords are kept as SHA-256 digests and
//! compared in constant time.
//!
//! The ACL file subset: one `user <name> <rule>...` per line; blank lines and lines
//! starting with `#` are skipped. Rules, applied left to right from a user with no rights:
//! `on`, `off`, `>password`, `<password`, `#<sha256 hex>`, `!<sha256 hex>`, `nopass`,
//! `resetpass`, `~<glob>`, `allkeys`, `resetkeys`, `+@<category>`, `-@<category>`,
//! `+<command>`, `-<command>`, `allcommands`, `nocommands`, `reset`; channel rules
//! (`&<glob>`, `allchannels`, `resetchannels`) are accepted and have no effect (there is no
//! pub/sub). Subcommand rules (`+config|get`), selectors and `%R~`/`%W~` key permissions are
//! refused. One difference from Redis: with an ACL file or a password, a `default` user
//! that nothing defines is `off` (Redis would leave it open with `nopass`), so naming an ACL
//! file never leaves a password-less way in.

use std::fmt;

use dinomo_shared::auth::{ct_eq, password_digest};

/// What a client-facing command is: its name and Redis's categories (for ACL rules), and
/// what `COMMAND` tells a client about it (cluster clients such as redis-py find a
/// command's keys, and so its slot, from that reply).
struct CommandInfo {
    name: &'static str,
    /// Redis's arity: the exact argument count with the name, or its negated minimum.
    arity: i64,
    flags: &'static [&'static str],
    /// Positions of the first and last key (negative: from the end) and the step between
    /// keys; `(0, 0, 0)` for a command without keys.
    keys: (i64, i64, i64),
    categories: &'static [&'static str],
}

macro_rules! commands {
    ($($name:literal $arity:literal [$($flag:literal),*] ($first:literal, $last:literal, $step:literal)
        => [$($cat:literal),*]),* $(,)?) => {
        &[$(CommandInfo {
            name: $name,
            arity: $arity,
            flags: &[$($flag),*],
            keys: ($first, $last, $step),
            categories: &[$($cat),*],
        }),*]
    };
}

/// Every command the KN serves, with the arity, flags, key positions and categories
/// Redis 7 gives it.
const COMMANDS: &[CommandInfo] = commands! {
    "GET" 2 ["readonly", "fast"] (1, 1, 1) => ["read", "string", "fast"],
    "SET" -3 ["write", "denyoom"] (1, 1, 1) => ["write", "string", "slow"],
    "MGET" -2 ["readonly", "fast"] (1, -1, 1) => ["read", "string", "fast"],
    "MSET" -3 ["write", "denyoom"] (1, -1, 2) => ["write", "string", "slow"],
    "DEL" -2 ["write"] (1, -1, 1) => ["keyspace", "write", "slow"],
    "UNLINK" -2 ["write", "fast"] (1, -1, 1) => ["keyspace", "write", "fast"],
    "EXISTS" -2 ["readonly", "fast"] (1, -1, 1) => ["keyspace", "read", "fast"],
    "PING" -1 ["fast"] (0, 0, 0) => ["fast", "connection"],
    "ECHO" 2 ["fast"] (0, 0, 0) => ["fast", "connection"],
    "HELLO" -1 ["noscript", "loading", "stale", "fast", "no_auth"] (0, 0, 0) => ["fast", "connection"],
    "AUTH" -2 ["noscript", "loading", "stale", "fast", "no_auth"] (0, 0, 0) => ["fast", "connection"],
    "QUIT" -1 ["noscript", "loading", "stale", "fast", "no_auth"] (0, 0, 0) => ["fast", "connection"],
    "RESET" 1 ["noscript", "loading", "stale", "fast", "no_auth"] (0, 0, 0) => ["fast", "connection"],
    "SELECT" 2 ["loading", "stale", "fast"] (0, 0, 0) => ["fast", "connection"],
    "CLIENT" -2 [] (0, 0, 0) => ["slow", "connection"],
    "READONLY" 1 ["loading", "stale", "fast"] (0, 0, 0) => ["fast", "connection"],
    "READWRITE" 1 ["loading", "stale", "fast"] (0, 0, 0) => ["fast", "connection"],
    "COMMAND" -1 ["loading", "stale"] (0, 0, 0) => ["slow", "connection"],
    "INFO" -1 ["loading", "stale"] (0, 0, 0) => ["slow", "dangerous"],
    "CONFIG" -2 [] (0, 0, 0) => ["admin", "slow", "dangerous"],
    "CLUSTER" -2 [] (0, 0, 0) => ["slow"],
    "SCAN" -2 ["readonly"] (0, 0, 0) => ["keyspace", "read", "slow"],
    "KEYS" 2 ["readonly"] (0, 0, 0) => ["keyspace", "read", "slow", "dangerous"],
    "DBSIZE" 1 ["readonly", "fast"] (0, 0, 0) => ["keyspace", "read", "fast"],
    "RANDOMKEY" 1 ["readonly"] (0, 0, 0) => ["keyspace", "read", "slow"],
    "FLUSHALL" -1 ["write"] (0, 0, 0) => ["keyspace", "write", "slow", "dangerous"],
    "FLUSHDB" -1 ["write"] (0, 0, 0) => ["keyspace", "write", "slow", "dangerous"],
};

/// Writes the `COMMAND` entry of command `id` in Redis 7's layout: name, arity, flags,
/// first key, last key, step, categories, tips, key specifications, subcommands (the last
/// three empty).
pub(crate) fn command_entry(id: usize, o: &mut dinomo_shared::resp::Out<'_>) {
    let c = &COMMANDS[id];
    o.array(10);
    o.bulk(c.name.to_ascii_lowercase().as_bytes());
    o.int(c.arity);
    o.array(c.flags.len());
    for f in c.flags {
        o.simple(f);
    }
    o.int(c.keys.0);
    o.int(c.keys.1);
    o.int(c.keys.2);
    o.array(c.categories.len());
    for cat in c.categories {
        o.simple(&format!("@{cat}"));
    }
    for _ in 0..3 {
        o.array(0);
    }
}

/// How many commands the KN serves (`COMMAND COUNT`).
pub(crate) fn command_count() -> usize {
    COMMANDS.len()
}

/// Redis's command categories; the ones no command here belongs to are accepted so that
/// an ACL file written for Redis reads the same.
const CATEGORIES: &[&str] = &[
    "all",
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
];

/// Commands a connection may run before it authenticates, and that every user may run
/// (what Redis flags `no-auth`, plus `QUIT`).
pub(crate) fn runs_without_auth(command: &str) -> bool {
    matches!(command, "AUTH" | "HELLO" | "QUIT" | "RESET")
}

/// The index of a command in [`COMMANDS`] (upper-case name).
pub(crate) fn command_id(name: &str) -> Option<usize> {
    COMMANDS.iter().position(|c| c.name == name)
}

/// A user that can log in.
#[derive(Clone)]
pub struct User {
    name: String,
    enabled: bool,
    nopass: bool,
    passwords: Vec<[u8; 32]>,
    /// Bit `i`: may run `COMMANDS[i]`.
    commands: u64,
    /// Glob patterns of the keys the user may touch.
    keys: Vec<Vec<u8>>,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("enabled", &self.enabled)
            .field("nopass", &self.nopass)
            .field("passwords", &self.passwords.len())
            .finish_non_exhaustive()
    }
}

impl User {
    /// A user with no rights, as `ACL SETUSER` makes one.
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            enabled: false,
            nopass: false,
            passwords: Vec::new(),
            commands: 0,
            keys: Vec::new(),
        }
    }

    /// `on nopass ~* +@all`: Redis's default user without a password.
    fn open(name: &str) -> Self {
        Self {
            enabled: true,
            nopass: true,
            commands: all_commands(),
            keys: vec![b"*".to_vec()],
            ..Self::new(name)
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn apply(&mut self, rule: &str) -> Result<(), String> {
        let hex_digest = |h: &str| {
            dinomo_shared::auth::from_hex::<32>(&h.to_ascii_lowercase())
                .ok_or_else(|| format!("'{rule}': a password hash is 64 hexadecimal digits"))
        };
        match rule {
            "on" => self.enabled = true,
            "off" => self.enabled = false,
            "nopass" => {
                self.nopass = true;
                self.passwords.clear();
            }
            "resetpass" => {
                self.nopass = false;
                self.passwords.clear();
            }
            "allkeys" => self.keys = vec![b"*".to_vec()],
            "resetkeys" => self.keys.clear(),
            "allcommands" => self.commands = all_commands(),
            "nocommands" => self.commands = 0,
            "allchannels" | "resetchannels" => {}
            "reset" => *self = Self::new(&self.name),
            _ => {
                let (head, rest) = rule.split_at(rule.chars().next().map_or(0, char::len_utf8));
                match head {
                    ">" => {
                        self.nopass = false;
                        let d = password_digest(rest.as_bytes());
                        if !self.passwords.contains(&d) {
                            self.passwords.push(d);
                        }
                    }
                    "<" => {
                        let d = password_digest(rest.as_bytes());
                        self.passwords.retain(|p| *p != d);
                    }
                    "#" => {
                        self.nopass = false;
                        let d = hex_digest(rest)?;
                        if !self.passwords.contains(&d) {
                            self.passwords.push(d);
                        }
                    }
                    "!" => {
                        let d = hex_digest(rest)?;
                        self.passwords.retain(|p| *p != d);
                    }
                    "~" if !rest.is_empty() => self.keys.push(rest.as_bytes().to_vec()),
                    "&" => {}
                    "+" | "-" => {
                        let bits = if let Some(cat) = rest.strip_prefix('@') {
                            category_bits(cat)
                                .ok_or_else(|| format!("'{rule}': unknown command category"))?
                        } else if rest.contains('|') {
                            return Err(format!(
                                "'{rule}': subcommand rules are not supported; allow or deny \
                                 the whole command"
                            ));
                        } else {
                            let id = command_id(&rest.to_ascii_uppercase())
                                .ok_or_else(|| format!("'{rule}': unknown command"))?;
                            1 << id
                        };
                        if head == "+" {
                            self.commands |= bits;
                        } else {
                            self.commands &= !bits;
                        }
                    }
                    _ => {
                        return Err(format!(
                            "'{rule}' is not a supported ACL rule (see `dinomo kn --help` for \
                             the subset this node reads)"
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `password` opens this user (`nopass`: any does), checked against every
    /// password of the user in constant time each.
    fn accepts(&self, password: &[u8]) -> bool {
        let d = password_digest(password);
        let mut ok = false;
        for p in &self.passwords {
            ok |= ct_eq(p, &d);
        }
        self.enabled && (ok || self.nopass)
    }

    /// Whether this user may access every key (`~*`, `allkeys`): then no command's keys
    /// need to be gathered for [`User::check`].
    pub(crate) fn all_keys(&self) -> bool {
        self.keys.iter().any(|p| p.as_slice() == b"*")
    }

    /// Why this user may not run command `id` on `keys`, if it may not.
    pub(crate) fn check(&self, id: usize, keys: &[&[u8]]) -> Result<(), String> {
        if self.commands & (1 << id) == 0 {
            return Err(format!(
                "NOPERM User {} has no permissions to run the '{}' command",
                self.name,
                COMMANDS[id].name.to_ascii_lowercase()
            ));
        }
        if !keys
            .iter()
            .all(|k| self.keys.iter().any(|p| glob_match(p, k)))
        {
            return Err("NOPERM No permissions to access a key".into());
        }
        Ok(())
    }
}

fn all_commands() -> u64 {
    (1u64 << COMMANDS.len()) - 1
}

fn category_bits(cat: &str) -> Option<u64> {
    let cat = cat.to_ascii_lowercase();
    if !CATEGORIES.contains(&cat.as_str()) {
        return None;
    }
    if cat == "all" {
        return Some(all_commands());
    }
    Some(
        COMMANDS
            .iter()
            .enumerate()
            .filter(|(_, c)| c.categories.contains(&cat.as_str()))
            .fold(0, |b, (i, _)| b | 1 << i),
    )
}

/// Why an ACL file or password cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("ACL file line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("{0}")]
    Invalid(String),
}

/// The users of a KN.
#[derive(Clone, Debug)]
pub struct Acl {
    users: Vec<User>,
}

impl Default for Acl {
    /// No authentication: the default user is `on nopass ~* +@all`, as in Redis without
    /// `requirepass`.
    fn default() -> Self {
        Self {
            users: vec![User::open("default")],
        }
    }
}

impl Acl {
    /// The users of an ACL file (`text`) and/or a `requirepass` password for the default
    /// user. With neither, [`Acl::default`].
    pub fn new(acl_file: Option<&str>, requirepass: Option<&[u8]>) -> Result<Self, AclError> {
        if acl_file.is_none() && requirepass.is_none() {
            return Ok(Self::default());
        }
        let mut users: Vec<User> = Vec::new();
        for (i, raw) in acl_file.unwrap_or_default().lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| AclError::Line { line: i + 1, why };
            let mut words = line.split_ascii_whitespace();
            if words.next() != Some("user") {
                return Err(bad("expected `user <name> <rule>...`".into()));
            }
            let name = words
                .next()
                .ok_or_else(|| bad("a user needs a name".into()))?;
            if users.iter().any(|u| u.name == name) {
                return Err(bad(format!("user '{name}' is defined twice")));
            }
            let mut u = User::new(name);
            for rule in words {
                u.apply(rule).map_err(bad)?;
            }
            users.push(u);
        }
        if let Some(pw) = requirepass {
            if pw.is_empty() {
                return Err(AclError::Invalid(
                    "the requirepass password is empty".into(),
                ));
            }
            if users.iter().any(|u| u.name == "default") {
                return Err(AclError::Invalid(
                    "both the ACL file and the requirepass file set the default user; \
                     define it in one place"
                        .into(),
                ));
            }
            let mut u = User::open("default");
            u.nopass = false;
            u.passwords = vec![password_digest(pw)];
            users.push(u);
        }
        if !users.iter().any(|u| u.name == "default") {
            users.push(User::new("default"));
        }
        Ok(Self { users })
    }

    /// The user a new connection is logged in as before any `AUTH`: `default` if it is on
    /// and needs no password, otherwise none (every command but AUTH/HELLO/QUIT/RESET gets
    /// `NOAUTH`).
    pub fn initial_user(&self) -> Option<usize> {
        self.users
            .iter()
            .position(|u| u.name == "default" && u.enabled && u.nopass)
    }

    /// Whether clients must authenticate (some way in needs a password).
    pub fn requires_auth(&self) -> bool {
        self.initial_user().is_none()
    }

    /// The user `name` logs in as with `password`, or `None` (`WRONGPASS`) whether the user
    /// is unknown, off or the password wrong.
    pub fn authenticate(&self, name: &[u8], password: &[u8]) -> Option<usize> {
        let i = self.users.iter().position(|u| u.name.as_bytes() == name);
        match i {
            Some(i) if self.users[i].accepts(password) => Some(i),
            Some(_) => None,
            None => {
                // The same work as for a known user, so timing does not tell names apart.
                let _ = User::new("").accepts(password);
                None
            }
        }
    }

    pub fn user(&self, i: usize) -> &User {
        &self.users[i]
    }

    /// Whether the default user has a password that `AUTH <password>` could match.
    pub fn default_has_password(&self) -> bool {
        self.users
            .iter()
            .any(|u| u.name == "default" && !u.nopass && !u.passwords.is_empty())
    }
}

/// Redis's glob (`stringmatch`): `*`, `?`, `[abc]`, `[^a-z]` and `\` escapes.
pub(crate) fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, string index).
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, i));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => class_match(pattern, p + 1, s[i]),
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == s[i]).then_some(p + 2),
            Some(&c) => (c == s[i]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(np), _) => {
                p = np;
                i += 1;
            }
            (None, Some((sp, si))) => {
                p = sp;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting after `[` at `at`; the index after `]` if it
/// matches.
fn class_match(pattern: &[u8], mut at: usize, c: u8) -> Option<usize> {
    let negate = pattern.get(at) == Some(&b'^');
    if negate {
        at += 1;
    }
    let mut hit = false;
    loop {
        match pattern.get(at) {
            None => return None,
            Some(b']') => break,
            Some(b'\\') if at + 1 < pattern.len() => {
                hit |= pattern[at + 1] == c;
                at += 2;
            }
            Some(&a) if pattern.get(at + 1) == Some(&b'-') && at + 2 < pattern.len() => {
                let b = pattern[at + 2];
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                hit |= (lo..=hi).contains(&c);
                at += 3;
            }
            Some(&a) => {
                hit |= a == c;
                at += 1;
            }
        }
    }
    (hit != negate).then_some(at + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: &str) -> usize {
        command_id(n).expect("a command")
    }

    #[test]
    fn without_passwords_everyone_is_the_open_default_user() {
        let acl = Acl::new(None, None).expect("acl");
        assert!(!acl.requires_auth());
        let u = acl.user(acl.initial_user().expect("default"));
        assert!(u.check(id("SET"), &[b"k"]).is_ok());
    }

    #[test]
    fn requirepass_sets_the_default_users_password() {
        let acl = Acl::new(None, Some(b"s3cret")).expect("acl");
        assert!(acl.requires_auth());
        assert_eq!(acl.initial_user(), None);
        assert!(acl.authenticate(b"default", b"s3cret").is_some());
        assert!(acl.authenticate(b"default", b"s3creT").is_none());
        assert!(acl.authenticate(b"nobody", b"s3cret").is_none());
        assert!(Acl::new(None, Some(b"")).is_err());
    }

    #[test]
    fn acl_files_give_read_only_and_read_write_users() {
        let text = "# users\n\
                    user alice on >apw ~* +@all\n\
                    user reader on >rpw #5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8 ~app:* +@read +@connection -echo\n\
                    user gone off >gpw ~* +@all\n";
        let acl = Acl::new(Some(text), None).expect("acl");
        assert!(acl.requires_auth(), "an undefined default user is off");
        assert!(acl.authenticate(b"default", b"").is_none());
        assert!(acl.authenticate(b"gone", b"gpw").is_none(), "off");
        let a = acl.user(acl.authenticate(b"alice", b"apw").expect("alice"));
        assert!(a.check(id("SET"), &[b"x"]).is_ok());
        // A password given by its SHA-256 ("password").
        let r = acl.user(acl.authenticate(b"reader", b"password").expect("hash"));
        assert!(acl.authenticate(b"reader", b"rpw").is_some());
        assert!(r.check(id("GET"), &[b"app:1"]).is_ok());
        assert!(r.check(id("PING"), &[]).is_ok());
        assert_eq!(
            r.check(id("SET"), &[b"app:1"]),
            Err("NOPERM User reader has no permissions to run the 'set' command".into())
        );
        assert!(r.check(id("ECHO"), &[]).is_err());
        assert_eq!(
            r.check(id("MGET"), &[b"app:1", b"other"]),
            Err("NOPERM No permissions to access a key".into())
        );
    }

    #[test]
    fn bad_acl_files_are_refused_with_their_line() {
        for (text, want) in [
            ("user a on >x +@nosuch", "line 1"),
            ("\nuser a on >x +config|get", "line 2"),
            ("user a on >x +hset", "unknown command"),
            ("user a on\nuser a off", "twice"),
            ("group a", "expected"),
            ("user a %R~x", "not a supported"),
            ("user a #abc", "64 hexadecimal"),
        ] {
            let Err(e) = Acl::new(Some(text), None) else {
                panic!("accepted {text:?}");
            };
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
        assert!(Acl::new(Some("user default on >x"), Some(b"y")).is_err());
    }

    #[test]
    fn globs_match_like_redis() {
        for (p, s, want) in [
            ("*", "anything", true),
            ("app:*", "app:1", true),
            ("app:*", "ap", false),
            ("a?c", "abc", true),
            ("a[bx]c", "axc", true),
            ("a[^bx]c", "abc", false),
            ("a[a-c]*z", "abbbz", true),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
            ("*:*:x", "a:b:c:x", true),
            ("", "", true),
            ("[", "a", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), want, "{p} {s}");
        }
    }
}
