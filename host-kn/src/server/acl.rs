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
use dinomo_shared::resp::Out;

/// What a client-facing command is: its name and Redis's categories (for ACL rules), and
/// what `COMMAND` tells a client about it (cluster clients such as redis-py find a
/// command's keys, and so its slot, from that reply).
pub(crate) struct CommandInfo {
    pub(crate) name: &'static str,
    /// Redis's arity: the exact argument count with the name, or its negated minimum.
    pub(crate) arity: i64,
    flags: &'static [&'static str],
    /// Positions of the first and last key (negative: from the end) and the step between
    /// keys; `(0, 0, 0)` for a command without keys.
    keys: (i64, i64, i64),
    /// Redis's categories of the command itself (for a container such as `CLIENT`, only
    /// its own; ACL rules also count its subcommands', see [`CommandInfo::in_category`]).
    categories: &'static [&'static str],
    /// Redis's command tips (how a cluster client should fan out and merge a command).
    tips: &'static [&'static str],
    /// Redis 7's key specifications.
    specs: &'static [KeySpec],
    /// The subcommands this node serves (containers only).
    subs: &'static [SubInfo],
    doc: Doc,
}

/// A key specification: keys start at argument `index` (`begin_search` of type `index`)
/// and run to `last` (negative: from the end) by `step` (`find_keys` of type `range`).
pub(crate) struct KeySpec {
    flags: &'static [&'static str],
    index: i64,
    last: i64,
    step: i64,
}

/// What `COMMAND DOCS` says of a command.
#[derive(Clone, Copy)]
struct Doc {
    group: &'static str,
    since: &'static str,
    complexity: &'static str,
    summary: &'static str,
}

/// A subcommand (`client|id`): none has keys.
pub(crate) struct SubInfo {
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    categories: &'static [&'static str],
    tips: &'static [&'static str],
    since: &'static str,
    complexity: &'static str,
    summary: &'static str,
}

macro_rules! commands {
    ($($name:literal $arity:literal [$($flag:literal),*] ($first:literal, $last:literal, $step:literal)
        [$($cat:literal),*]
        tips [$($tip:literal),*]
        keys [$([$($kf:literal),*] $index:literal $klast:literal $kstep:literal),*]
        subs $subs:expr;
        doc $group:literal $since:literal $cx:literal $summary:literal),* $(,)?) => {
        &[$(CommandInfo {
            name: $name,
            arity: $arity,
            flags: &[$($flag),*],
            keys: ($first, $last, $step),
            categories: &[$($cat),*],
            tips: &[$($tip),*],
            specs: &[$(KeySpec { flags: &[$($kf),*], index: $index, last: $klast, step: $kstep }),*],
            subs: $subs,
            doc: Doc { group: $group, since: $since, complexity: $cx, summary: $summary },
        }),*]
    };
}

macro_rules! subs {
    ($($name:literal $arity:literal [$($flag:literal),*] [$($cat:literal),*] tips [$($tip:literal),*]
        $since:literal $cx:literal $summary:literal),* $(,)?) => {
        &[$(SubInfo {
            name: $name,
            arity: $arity,
            flags: &[$($flag),*],
            categories: &[$($cat),*],
            tips: &[$($tip),*],
            since: $since,
            complexity: $cx,
            summary: $summary,
        }),*]
    };
}

const CLIENT_SUBS: &[SubInfo] = subs! {
    "client|getname" 2 ["noscript", "loading", "stale"] ["slow", "connection"] tips []
        "2.6.9" "O(1)" "Returns the connection's name.",
    "client|id" 2 ["noscript", "loading", "stale"] ["slow", "connection"] tips []
        "5.0.0" "O(1)" "Returns the connection's id.",
    "client|info" 2 ["noscript", "loading", "stale"] ["slow", "connection"] tips ["nondeterministic_output"]
        "6.2.0" "O(1)" "Describes the connection.",
    "client|list" -2 ["admin", "noscript", "loading", "stale"] ["admin", "slow", "dangerous", "connection"] tips ["nondeterministic_output"]
        "2.4.0" "O(N) where N is the number of client connections" "Describes the open connections.",
    "client|no-evict" 3 ["admin", "noscript", "loading", "stale"] ["admin", "slow", "dangerous", "connection"] tips []
        "7.0.0" "O(1)" "Accepted for compatibility: no connection is evicted.",
    "client|no-touch" 3 ["noscript", "loading", "stale"] ["slow", "connection"] tips []
        "7.2.0" "O(1)" "Accepted for compatibility: there is no LRU clock to touch.",
    "client|reply" 3 ["noscript", "loading", "stale"] ["slow", "connection"] tips []
        "3.2.0" "O(1)" "Turns replies on (OFF and SKIP are not served).",
    "client|setinfo" 4 ["noscript", "loading", "stale"] ["slow", "connection"] tips []
        "7.2.0" "O(1)" "Records the client library's name or version.",
    "client|setname" 3 ["noscript", "loading", "stale"] ["slow", "connection"] tips []
        "2.6.9" "O(1)" "Names the connection.",
};

const COMMAND_SUBS: &[SubInfo] = subs! {
    "command|count" 2 ["loading", "stale"] ["slow", "connection"] tips []
        "2.8.13" "O(1)" "Returns the number of commands.",
    "command|docs" -2 ["loading", "stale"] ["slow", "connection"] tips ["nondeterministic_output_order"]
        "7.0.0" "O(N) where N is the number of commands to look up" "Documents commands.",
    "command|getkeys" -3 ["loading", "stale"] ["slow", "connection"] tips []
        "2.8.13" "O(N) where N is the number of arguments to the command" "Extracts the keys of a command line.",
    "command|getkeysandflags" -3 ["loading", "stale"] ["slow", "connection"] tips []
        "7.0.0" "O(N) where N is the number of arguments to the command" "Extracts the keys of a command line and their flags.",
    "command|info" -2 ["loading", "stale"] ["slow", "connection"] tips ["nondeterministic_output_order"]
        "2.8.13" "O(N) where N is the number of commands to look up" "Describes commands.",
    "command|list" -2 ["loading", "stale"] ["slow", "connection"] tips ["nondeterministic_output_order"]
        "7.0.0" "O(N) where N is the total number of commands" "Lists command names.",
};

const CONFIG_SUBS: &[SubInfo] = subs! {
    "config|get" -3 ["admin", "noscript", "loading", "stale"] ["admin", "slow", "dangerous"] tips []
        "2.0.0" "O(N) when N is the number of configuration parameters provided" "Returns parameters' values.",
    "config|resetstat" 2 ["admin", "noscript", "loading", "stale"] ["admin", "slow", "dangerous"] tips []
        "2.0.0" "O(1)" "Resets the command counters.",
    "config|set" -4 ["admin", "noscript", "loading", "stale"] ["admin", "slow", "dangerous"] tips ["request_policy:all_nodes", "response_policy:all_succeeded"]
        "2.0.0" "O(N) when N is the number of configuration parameters provided" "Changes the parameters that may change at run time.",
};

const CLUSTER_SUBS: &[SubInfo] = subs! {
    "cluster|info" 2 ["stale"] ["slow"] tips ["nondeterministic_output"]
        "3.0.0" "O(1)" "Describes the cluster's state.",
    "cluster|keyslot" 3 ["stale"] ["slow"] tips []
        "3.0.0" "O(N) where N is the number of bytes in the key" "Returns a key's hash slot.",
    "cluster|myid" 2 ["stale"] ["slow"] tips []
        "3.0.0" "O(1)" "Returns this node's id.",
    "cluster|nodes" 2 ["stale"] ["slow"] tips ["nondeterministic_output"]
        "3.0.0" "O(N) where N is the total number of Cluster nodes" "Describes the nodes and their slots.",
    "cluster|shards" 2 ["stale"] ["slow"] tips ["nondeterministic_output"]
        "7.0.0" "O(N) where N is the total number of cluster nodes" "Describes the shards and their slots.",
    "cluster|slots" 2 ["stale"] ["slow"] tips ["nondeterministic_output"]
        "3.0.0" "O(N) where N is the total number of Cluster nodes" "Maps slot ranges to nodes.",
};

/// Every command the KN serves, with the arity, flags, key positions, categories, tips and
/// key specifications Redis gives it, sorted by name (so [`command_id`] is a binary
/// search); a command's index here is its ACL id.
const COMMANDS: &[CommandInfo] = commands! {
    "APPEND" 3 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "insert"] 1 0 1] subs &[];
        doc "string" "2.0.0" "O(1)" "Appends a string to a key's value.",
    "AUTH" -2 ["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "connection" "1.0.0" "O(N)" "Logs the connection in.",
    "CLIENT" -2 [] (0, 0, 0) ["slow"]
        tips [] keys [] subs CLIENT_SUBS;
        doc "connection" "2.4.0" "Depends on subcommand." "Commands about client connections.",
    "CLUSTER" -2 [] (0, 0, 0) ["slow"]
        tips [] keys [] subs CLUSTER_SUBS;
        doc "cluster" "3.0.0" "Depends on subcommand." "Commands about the cluster.",
    "COMMAND" -1 ["loading", "stale"] (0, 0, 0) ["slow", "connection"]
        tips ["nondeterministic_output_order"] keys [] subs COMMAND_SUBS;
        doc "server" "2.8.13" "O(N) where N is the total number of Redis commands" "Describes the commands the server serves.",
    "CONFIG" -2 [] (0, 0, 0) ["slow"]
        tips [] keys [] subs CONFIG_SUBS;
        doc "server" "2.0.0" "Depends on subcommand." "Commands about the server's parameters.",
    "COPY" -3 ["write", "denyoom"] (1, 2, 1) ["keyspace", "write", "slow"]
        tips [] keys [["RO", "access"] 1 0 1, ["OW", "update"] 2 0 1] subs &[];
        doc "generic" "6.2.0" "O(N) worst case for collections" "Copies a key's value to another key.",
    "DBSIZE" 1 ["readonly", "fast"] (0, 0, 0) ["keyspace", "read", "fast"]
        tips ["request_policy:all_shards", "response_policy:agg_sum"] keys [] subs &[];
        doc "server" "1.0.0" "O(1)" "Returns the number of keys.",
    "DECR" 2 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "update"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Subtracts one from a key's integer value.",
    "DECRBY" 3 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "update"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Subtracts an integer from a key's integer value.",
    "DEL" -2 ["write"] (1, -1, 1) ["keyspace", "write", "slow"]
        tips ["request_policy:multi_shard", "response_policy:agg_sum"] keys [["RM", "delete"] 1 -1 1] subs &[];
        doc "generic" "1.0.0" "O(N) where N is the number of keys that will be removed" "Deletes keys.",
    "DISCARD" 1 ["noscript", "loading", "stale", "fast", "allow_busy"] (0, 0, 0) ["fast", "transaction"]
        tips [] keys [] subs &[];
        doc "transactions" "2.0.0" "O(N)" "Drops the commands queued since MULTI.",
    "ECHO" 2 ["loading", "stale", "fast"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "connection" "1.0.0" "O(1)" "Returns its argument.",
    "EXEC" 1 ["noscript", "loading", "stale", "skip_slowlog"] (0, 0, 0) ["slow", "transaction"]
        tips [] keys [] subs &[];
        doc "transactions" "1.2.0" "Depends on commands in the transaction" "Runs the commands queued since MULTI.",
    "EXISTS" -2 ["readonly", "fast"] (1, -1, 1) ["keyspace", "read", "fast"]
        tips ["request_policy:multi_shard", "response_policy:agg_sum"] keys [["RO"] 1 -1 1] subs &[];
        doc "generic" "1.0.0" "O(N) where N is the number of keys to check." "Counts how many of the given keys exist.",
    "EXPIRE" -3 ["write", "fast"] (1, 1, 1) ["keyspace", "write", "fast"]
        tips [] keys [["RW", "update"] 1 0 1] subs &[];
        doc "generic" "1.0.0" "O(1)" "Sets a key's time to live in seconds.",
    "EXPIREAT" -3 ["write", "fast"] (1, 1, 1) ["keyspace", "write", "fast"]
        tips [] keys [["RW", "update"] 1 0 1] subs &[];
        doc "generic" "1.2.0" "O(1)" "Sets a key's expiry as a Unix time in seconds.",
    "EXPIRETIME" 2 ["readonly", "fast"] (1, 1, 1) ["keyspace", "read", "fast"]
        tips [] keys [["RO", "access"] 1 0 1] subs &[];
        doc "generic" "7.0.0" "O(1)" "Returns a key's expiry as a Unix time in seconds.",
    "FLUSHALL" -1 ["write"] (0, 0, 0) ["keyspace", "write", "slow", "dangerous"]
        tips ["request_policy:all_shards", "response_policy:all_succeeded"] keys [] subs &[];
        doc "server" "1.0.0" "O(N) where N is the total number of keys in all databases" "Deletes every key.",
    "FLUSHDB" -1 ["write"] (0, 0, 0) ["keyspace", "write", "slow", "dangerous"]
        tips ["request_policy:all_shards", "response_policy:all_succeeded"] keys [] subs &[];
        doc "server" "1.0.0" "O(N) where N is the number of keys in the selected database" "Deletes every key of the database.",
    "GET" 2 ["readonly", "fast"] (1, 1, 1) ["read", "string", "fast"]
        tips [] keys [["RO", "access"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Returns a key's string value.",
    "GETDEL" 2 ["write", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "delete"] 1 0 1] subs &[];
        doc "string" "6.2.0" "O(1)" "Returns a key's value and deletes the key.",
    "GETEX" -2 ["write", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "update"] 1 0 1] subs &[];
        doc "string" "6.2.0" "O(1)" "Returns a key's value and sets or clears its expiry.",
    "GETRANGE" 4 ["readonly"] (1, 1, 1) ["read", "string", "slow"]
        tips [] keys [["RO", "access"] 1 0 1] subs &[];
        doc "string" "2.4.0" "O(N) where N is the length of the returned string" "Returns a substring of a key's value.",
    "GETSET" 3 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "update"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Sets a key's value and returns its previous value.",
    "HELLO" -1 ["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "connection" "6.0.0" "O(1)" "Chooses the protocol version, optionally logs in, and describes the server.",
    "INCR" 2 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "update"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Adds one to a key's integer value.",
    "INCRBY" 3 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "update"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Adds an integer to a key's integer value.",
    "INCRBYFLOAT" 3 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["RW", "access", "update"] 1 0 1] subs &[];
        doc "string" "2.6.0" "O(1)" "Adds a floating-point number to a key's value.",
    "INFO" -1 ["loading", "stale"] (0, 0, 0) ["slow", "dangerous"]
        tips ["nondeterministic_output", "request_policy:all_shards", "response_policy:special"] keys [] subs &[];
        doc "server" "1.0.0" "O(1)" "Returns information and statistics about the server.",
    "KEYS" 2 ["readonly"] (0, 0, 0) ["keyspace", "read", "slow", "dangerous"]
        tips ["request_policy:all_shards", "nondeterministic_output_order"] keys [] subs &[];
        doc "generic" "1.0.0" "O(N) with N being the number of keys in the database" "Returns the keys matching a pattern.",
    "LASTSAVE" 1 ["loading", "stale", "fast"] (0, 0, 0) ["admin", "fast", "dangerous"]
        tips ["nondeterministic_output"] keys [] subs &[];
        doc "server" "1.0.0" "O(1)" "Returns the Unix time of the last save to disk.",
    "MGET" -2 ["readonly", "fast"] (1, -1, 1) ["read", "string", "fast"]
        tips ["request_policy:multi_shard"] keys [["RO", "access"] 1 -1 1] subs &[];
        doc "string" "1.0.0" "O(N) where N is the number of keys to retrieve." "Returns the values of several keys.",
    "MSET" -3 ["write", "denyoom"] (1, -1, 2) ["write", "string", "slow"]
        tips ["request_policy:multi_shard", "response_policy:all_succeeded"] keys [["OW", "update"] 1 -1 2] subs &[];
        doc "string" "1.0.1" "O(N) where N is the number of keys to set." "Sets several keys' values.",
    "MSETNX" -3 ["write", "denyoom"] (1, -1, 2) ["write", "string", "slow"]
        tips ["request_policy:multi_shard", "response_policy:agg_min"] keys [["OW", "insert"] 1 -1 2] subs &[];
        doc "string" "1.0.1" "O(N) where N is the number of keys to set." "Sets several keys' values only if none of them exists.",
    "MULTI" 1 ["noscript", "loading", "stale", "fast", "allow_busy"] (0, 0, 0) ["fast", "transaction"]
        tips [] keys [] subs &[];
        doc "transactions" "1.2.0" "O(1)" "Starts a transaction.",
    "PERSIST" 2 ["write", "fast"] (1, 1, 1) ["keyspace", "write", "fast"]
        tips [] keys [["RW", "update"] 1 0 1] subs &[];
        doc "generic" "2.2.0" "O(1)" "Removes a key's expiry.",
    "PEXPIRE" -3 ["write", "fast"] (1, 1, 1) ["keyspace", "write", "fast"]
        tips [] keys [["RW", "update"] 1 0 1] subs &[];
        doc "generic" "2.6.0" "O(1)" "Sets a key's time to live in milliseconds.",
    "PEXPIREAT" -3 ["write", "fast"] (1, 1, 1) ["keyspace", "write", "fast"]
        tips [] keys [["RW", "update"] 1 0 1] subs &[];
        doc "generic" "2.6.0" "O(1)" "Sets a key's expiry as a Unix time in milliseconds.",
    "PEXPIRETIME" 2 ["readonly", "fast"] (1, 1, 1) ["keyspace", "read", "fast"]
        tips [] keys [["RO", "access"] 1 0 1] subs &[];
        doc "generic" "7.0.0" "O(1)" "Returns a key's expiry as a Unix time in milliseconds.",
    "PING" -1 ["fast"] (0, 0, 0) ["fast", "connection"]
        tips ["request_policy:all_shards", "response_policy:all_succeeded"] keys [] subs &[];
        doc "connection" "1.0.0" "O(1)" "Answers PONG, or the argument given.",
    "PSETEX" 4 ["write", "denyoom"] (1, 1, 1) ["write", "string", "slow"]
        tips [] keys [["OW", "update"] 1 0 1] subs &[];
        doc "string" "2.6.0" "O(1)" "Sets a key's value and its expiry in milliseconds.",
    "PTTL" 2 ["readonly", "fast"] (1, 1, 1) ["keyspace", "read", "fast"]
        tips ["nondeterministic_output"] keys [["RO", "access"] 1 0 1] subs &[];
        doc "generic" "2.6.0" "O(1)" "Returns a key's time to live in milliseconds.",
    "QUIT" -1 ["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "connection" "1.0.0" "O(1)" "Closes the connection.",
    "RANDOMKEY" 1 ["readonly"] (0, 0, 0) ["keyspace", "read", "slow"]
        tips ["request_policy:all_shards", "nondeterministic_output"] keys [] subs &[];
        doc "generic" "1.0.0" "O(1)" "Returns a key chosen at random.",
    "READONLY" 1 ["loading", "stale", "fast"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "cluster" "3.0.0" "O(1)" "Allows reads from replicas on this connection.",
    "READWRITE" 1 ["loading", "stale", "fast"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "cluster" "3.0.0" "O(1)" "Ends READONLY on this connection.",
    "RENAME" 3 ["write"] (1, 2, 1) ["keyspace", "write", "slow"]
        tips [] keys [["RW", "access", "delete"] 1 0 1, ["OW", "update"] 2 0 1] subs &[];
        doc "generic" "1.0.0" "O(1)" "Renames a key, replacing the destination.",
    "RENAMENX" 3 ["write", "fast"] (1, 2, 1) ["keyspace", "write", "fast"]
        tips [] keys [["RW", "access", "delete"] 1 0 1, ["OW", "insert"] 2 0 1] subs &[];
        doc "generic" "1.0.0" "O(1)" "Renames a key if the new name does not exist.",
    "RESET" 1 ["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "connection" "6.2.0" "O(1)" "Returns the connection to its initial state.",
    "SCAN" -2 ["readonly"] (0, 0, 0) ["keyspace", "read", "slow"]
        tips ["nondeterministic_output", "request_policy:special"] keys [] subs &[];
        doc "generic" "2.8.0" "O(1) for every call" "Iterates over the keys with a cursor.",
    "SELECT" 2 ["loading", "stale", "fast"] (0, 0, 0) ["fast", "connection"]
        tips [] keys [] subs &[];
        doc "connection" "1.0.0" "O(1)" "Selects a database (only 0 in cluster mode).",
    "SET" -3 ["write", "denyoom"] (1, 1, 1) ["write", "string", "slow"]
        tips [] keys [["RW", "access", "update", "variable_flags"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Sets a key's string value, with an optional expiry and condition.",
    "SETEX" 4 ["write", "denyoom"] (1, 1, 1) ["write", "string", "slow"]
        tips [] keys [["OW", "update"] 1 0 1] subs &[];
        doc "string" "2.0.0" "O(1)" "Sets a key's value and its expiry in seconds.",
    "SETNX" 3 ["write", "denyoom", "fast"] (1, 1, 1) ["write", "string", "fast"]
        tips [] keys [["OW", "insert"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(1)" "Sets a key's value only if the key does not exist.",
    "SETRANGE" 4 ["write", "denyoom"] (1, 1, 1) ["write", "string", "slow"]
        tips [] keys [["RW", "update"] 1 0 1] subs &[];
        doc "string" "2.2.0" "O(1)" "Overwrites part of a key's value from an offset.",
    "STRLEN" 2 ["readonly", "fast"] (1, 1, 1) ["read", "string", "fast"]
        tips [] keys [["RO"] 1 0 1] subs &[];
        doc "string" "2.2.0" "O(1)" "Returns the length of a key's value.",
    "SUBSTR" 4 ["readonly"] (1, 1, 1) ["read", "string", "slow"]
        tips [] keys [["RO", "access"] 1 0 1] subs &[];
        doc "string" "1.0.0" "O(N) where N is the length of the returned string" "Returns a substring of a key's value (the old name of GETRANGE).",
    "TIME" 1 ["loading", "stale", "fast"] (0, 0, 0) ["fast"]
        tips ["nondeterministic_output"] keys [] subs &[];
        doc "server" "2.6.0" "O(1)" "Returns the server's time.",
    "TOUCH" -2 ["readonly", "fast"] (1, -1, 1) ["keyspace", "read", "fast"]
        tips ["request_policy:multi_shard", "response_policy:agg_sum"] keys [["RO"] 1 -1 1] subs &[];
        doc "generic" "3.2.1" "O(N) where N is the number of keys that will be touched." "Counts how many of the given keys exist, as an access.",
    "TTL" 2 ["readonly", "fast"] (1, 1, 1) ["keyspace", "read", "fast"]
        tips ["nondeterministic_output"] keys [["RO", "access"] 1 0 1] subs &[];
        doc "generic" "1.0.0" "O(1)" "Returns a key's time to live in seconds.",
    "TYPE" 2 ["readonly", "fast"] (1, 1, 1) ["keyspace", "read", "fast"]
        tips [] keys [["RO"] 1 0 1] subs &[];
        doc "generic" "1.0.0" "O(1)" "Returns the type of a key's value.",
    "UNLINK" -2 ["write", "fast"] (1, -1, 1) ["keyspace", "write", "fast"]
        tips ["request_policy:multi_shard", "response_policy:agg_sum"] keys [["RM", "delete"] 1 -1 1] subs &[];
        doc "generic" "4.0.0" "O(1) for each key removed regardless of its size" "Deletes keys.",
    "UNWATCH" 1 ["noscript", "loading", "stale", "fast", "allow_busy"] (0, 0, 0) ["fast", "transaction"]
        tips [] keys [] subs &[];
        doc "transactions" "2.2.0" "O(1)" "Forgets the watched keys.",
    "WAIT" 3 ["noscript"] (0, 0, 0) ["slow", "connection"]
        tips ["request_policy:all_shards", "response_policy:agg_min"] keys [] subs &[];
        doc "generic" "3.0.0" "O(1)" "Waits for replicas to acknowledge the writes of the connection.",
    "WATCH" -2 ["noscript", "loading", "stale", "fast", "allow_busy"] (1, -1, 1) ["fast", "transaction"]
        tips [] keys [["RO"] 1 -1 1] subs &[];
        doc "transactions" "2.2.0" "O(1) for every key." "Makes the next EXEC conditional on keys not changing.",
};

impl CommandInfo {
    /// Whether an ACL `+@cat`/`-@cat` rule covers this command: its own categories or a
    /// subcommand's (subcommands cannot be allowed one by one here).
    fn in_category(&self, cat: &str) -> bool {
        self.categories.contains(&cat) || self.subs.iter().any(|s| s.categories.contains(&cat))
    }

    fn has_keys(&self) -> bool {
        !self.specs.is_empty()
    }

    fn arity_ok(arity: i64, argc: usize) -> bool {
        let n = argc as i64;
        if arity >= 0 {
            n == arity
        } else {
            n >= -arity
        }
    }
}

/// Writes a `COMMAND` entry in Redis 7's layout: name, arity, flags, first key, last key,
/// step, categories, tips, key specifications, subcommands.
#[allow(clippy::too_many_arguments)]
fn entry(
    o: &mut Out<'_>,
    name: &str,
    arity: i64,
    flags: &[&str],
    keys: (i64, i64, i64),
    categories: &[&str],
    tips: &[&str],
    specs: &[KeySpec],
    subs: &[SubInfo],
) {
    o.array(10);
    o.bulk(name.to_ascii_lowercase().as_bytes());
    o.int(arity);
    o.array(flags.len());
    for f in flags {
        o.simple(f);
    }
    o.int(keys.0);
    o.int(keys.1);
    o.int(keys.2);
    o.array(categories.len());
    for cat in categories {
        o.simple(&format!("@{cat}"));
    }
    o.array(tips.len());
    for t in tips {
        o.bulk(t.as_bytes());
    }
    o.array(specs.len());
    for s in specs {
        o.map(3);
        o.bulk(b"flags");
        o.array(s.flags.len());
        for f in s.flags {
            o.simple(f);
        }
        o.bulk(b"begin_search");
        o.map(2);
        o.bulk(b"type");
        o.bulk(b"index");
        o.bulk(b"spec");
        o.map(1);
        o.bulk(b"index");
        o.int(s.index);
        o.bulk(b"find_keys");
        o.map(2);
        o.bulk(b"type");
        o.bulk(b"range");
        o.bulk(b"spec");
        o.map(3);
        o.bulk(b"lastkey");
        o.int(s.last);
        o.bulk(b"keystep");
        o.int(s.step);
        o.bulk(b"limit");
        o.int(0);
    }
    o.array(subs.len());
    for s in subs {
        entry(
            o,
            s.name,
            s.arity,
            s.flags,
            (0, 0, 0),
            s.categories,
            s.tips,
            &[],
            &[],
        );
    }
}

/// Writes the `COMMAND` entry of command `id`.
pub(crate) fn command_entry(id: usize, o: &mut Out<'_>) {
    let c = &COMMANDS[id];
    entry(
        o,
        c.name,
        c.arity,
        c.flags,
        c.keys,
        c.categories,
        c.tips,
        c.specs,
        c.subs,
    );
}

/// How many commands the KN serves (`COMMAND COUNT`; subcommands are not counted).
pub(crate) fn command_count() -> usize {
    COMMANDS.len()
}

/// The `COMMAND INFO` entry of `name` (a command, or a subcommand `container|sub`), or
/// `false` if this node serves no such command.
pub(crate) fn command_info_by_name(name: &[u8], o: &mut Out<'_>) -> bool {
    let lower = String::from_utf8_lossy(name).to_ascii_lowercase();
    if let Some((container, _)) = lower.split_once('|') {
        let Some(c) = command_id(&container.to_ascii_uppercase()) else {
            return false;
        };
        let Some(s) = COMMANDS[c].subs.iter().find(|s| s.name == lower) else {
            return false;
        };
        entry(
            o,
            s.name,
            s.arity,
            s.flags,
            (0, 0, 0),
            s.categories,
            s.tips,
            &[],
            &[],
        );
        return true;
    }
    match command_id(&lower.to_ascii_uppercase()) {
        Some(id) => {
            command_entry(id, o);
            true
        }
        None => false,
    }
}

/// `COMMAND LIST [FILTERBY MODULE name | ACLCAT category | PATTERN pattern]`: the names of
/// the commands and subcommands, lower-case, as Redis lists them. `Err` for a bad filter.
pub(crate) fn command_list(filter: &[Vec<u8>]) -> Result<Vec<&'static str>, String> {
    let mut names: Vec<(&'static str, &'static [&'static str])> = Vec::new();
    for c in COMMANDS {
        names.push((c.name, c.categories));
        for s in c.subs {
            names.push((s.name, s.categories));
        }
    }
    enum Filter {
        All,
        Nothing,
        Category(String),
        Pattern(Vec<u8>),
    }
    let keep = match filter {
        [] => Filter::All,
        [by, kind, arg] if by.eq_ignore_ascii_case(b"FILTERBY") => {
            match String::from_utf8_lossy(kind).to_ascii_uppercase().as_str() {
                // No command here comes from a module.
                "MODULE" => Filter::Nothing,
                "ACLCAT" => Filter::Category(String::from_utf8_lossy(arg).to_ascii_lowercase()),
                "PATTERN" => Filter::Pattern(arg.to_ascii_lowercase()),
                _ => return Err("ERR syntax error".into()),
            }
        }
        _ => return Err("ERR syntax error".into()),
    };
    let keep = |n: &str, cats: &[&str]| match &keep {
        Filter::All => true,
        Filter::Nothing => false,
        Filter::Category(c) => cats.contains(&c.as_str()),
        Filter::Pattern(p) => glob_match(p, n.to_ascii_lowercase().as_bytes()),
    };
    Ok(names
        .into_iter()
        .filter(|(n, cats)| keep(n, cats))
        .map(|(n, _)| n)
        .collect())
}

/// Writes the `COMMAND DOCS` entry of a command or subcommand (`name` then its map).
fn doc_entry(o: &mut Out<'_>, name: &str, doc: Doc, subs: &[SubInfo]) {
    o.bulk(name.to_ascii_lowercase().as_bytes());
    o.map(if subs.is_empty() { 5 } else { 6 });
    o.bulk(b"summary");
    o.bulk(doc.summary.as_bytes());
    o.bulk(b"since");
    o.bulk(doc.since.as_bytes());
    o.bulk(b"group");
    o.bulk(doc.group.as_bytes());
    o.bulk(b"complexity");
    o.bulk(doc.complexity.as_bytes());
    o.bulk(b"arguments");
    o.array(0);
    if !subs.is_empty() {
        o.bulk(b"subcommands");
        o.map(subs.len());
        for s in subs {
            let d = Doc {
                group: doc.group,
                since: s.since,
                complexity: s.complexity,
                summary: s.summary,
            };
            doc_entry(o, s.name, d, &[]);
        }
    }
}

/// `COMMAND DOCS [name...]`: a map of command name to its documentation (summary, since,
/// group, complexity, arguments, and a container's subcommands); unknown names are left
/// out, as Redis does. Argument lists are empty: this node does not describe them.
pub(crate) fn command_docs(names: &[Vec<u8>], o: &mut Out<'_>) {
    let ids: Vec<usize> = if names.is_empty() {
        (0..COMMANDS.len()).collect()
    } else {
        names
            .iter()
            .filter_map(|n| command_id(&String::from_utf8_lossy(n).to_ascii_uppercase()))
            .collect()
    };
    o.map(ids.len());
    for id in ids {
        let c = &COMMANDS[id];
        doc_entry(o, c.name, c.doc, c.subs);
    }
}

/// Keys found in a command line, each with its key specification's flags.
pub(crate) type KeysAndFlags<'a> = Vec<(&'a [u8], &'static [&'static str])>;

/// The keys of command line `args` (name first) and each key's flags, found from the
/// command's key specifications as Redis's `COMMAND GETKEYS` does, or Redis's error.
pub(crate) fn command_keys(args: &[Vec<u8>]) -> Result<KeysAndFlags<'_>, &'static str> {
    let Some(c) = args
        .first()
        .and_then(|n| command_id(&String::from_utf8_lossy(n).to_ascii_uppercase()))
        .map(|id| &COMMANDS[id])
    else {
        return Err("ERR Invalid command specified");
    };
    if !c.has_keys() {
        return Err("ERR The command has no key arguments");
    }
    if !CommandInfo::arity_ok(c.arity, args.len()) {
        return Err("ERR Invalid number of arguments specified for command");
    }
    let keys = keys_by_specs(c.specs, args);
    if keys.is_empty() {
        return Err("ERR Invalid arguments specified for command");
    }
    Ok(keys)
}

/// The keys of command line `args` (name first) by its key specifications, whatever its
/// arity (a short line gives the keys it has): what ACL key patterns should be checked
/// against for every command in the table. Empty for an unknown command or one without
/// keys.
pub(crate) fn keys_for_acl(args: &[Vec<u8>]) -> Vec<&[u8]> {
    args.first()
        .and_then(|n| command_id(&String::from_utf8_lossy(n).to_ascii_uppercase()))
        .map(|id| {
            keys_by_specs(COMMANDS[id].specs, args)
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default()
}

/// The keys the specifications `specs` find in `args` (name first), in spec order.
fn keys_by_specs<'a>(specs: &'static [KeySpec], args: &'a [Vec<u8>]) -> KeysAndFlags<'a> {
    let n = args.len() as i64;
    let mut keys = Vec::new();
    for s in specs {
        let first = s.index;
        let last = if s.last < 0 {
            n + s.last
        } else {
            first + s.last
        };
        let mut i = first;
        while i <= last && i < n && s.step > 0 {
            keys.push((args[i as usize].as_slice(), s.flags));
            i += s.step;
        }
    }
    keys
}

/// Commands a connection may run before it authenticates, and that every user may run
/// (what Redis flags `no-auth`, plus `QUIT`).
pub(crate) fn runs_without_auth(command: &str) -> bool {
    matches!(command, "AUTH" | "HELLO" | "QUIT" | "RESET")
}

/// The index of a command in [`COMMANDS`] (upper-case name): a binary search of the
/// sorted table.
pub(crate) fn command_id(name: &str) -> Option<usize> {
    COMMANDS.binary_search_by(|c| c.name.cmp(name)).ok()
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

/// A user that can log in.
#[derive(Clone)]
pub struct User {
    name: String,
    enabled: bool,
    nopass: bool,
    passwords: Vec<[u8; 32]>,
    /// Bit `i`: may run `COMMANDS[i]` (the table has fewer than 128 commands).
    commands: u128,
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
                            1u128 << id
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

fn all_commands() -> u128 {
    u128::MAX >> (128 - COMMANDS.len())
}

fn category_bits(cat: &str) -> Option<u128> {
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
            .filter(|(_, c)| c.in_category(&cat))
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
pub(crate) mod tests {
    use super::*;
    use dinomo_shared::resp::{parse_value, Limits, Proto, Value};

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
            ("user a on >x +bgsave", "unknown command"),
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

    /// Replies of redis-server 7.0.15 to `COMMAND INFO <name>` (observed with a raw
    /// socket), byte for byte; the KN's entry must be the same.
    const REDIS_COMMAND_INFO: &[(&str, &[u8])] = &[
        ("get", b"*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n*3\r\n+@read\r\n+@string\r\n+@fast\r\n*0\r\n*1\r\n*6\r\n$5\r\nflags\r\n*2\r\n+RO\r\n+access\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"),
        ("mset", b"*10\r\n$4\r\nmset\r\n:-3\r\n*2\r\n+write\r\n+denyoom\r\n:1\r\n:-1\r\n:2\r\n*3\r\n+@write\r\n+@string\r\n+@slow\r\n*2\r\n$26\r\nrequest_policy:multi_shard\r\n$29\r\nresponse_policy:all_succeeded\r\n*1\r\n*6\r\n$5\r\nflags\r\n*2\r\n+OW\r\n+update\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:-1\r\n$7\r\nkeystep\r\n:2\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"),
        ("copy", b"*10\r\n$4\r\ncopy\r\n:-3\r\n*2\r\n+write\r\n+denyoom\r\n:1\r\n:2\r\n:1\r\n*3\r\n+@keyspace\r\n+@write\r\n+@slow\r\n*0\r\n*2\r\n*6\r\n$5\r\nflags\r\n*2\r\n+RO\r\n+access\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*6\r\n$5\r\nflags\r\n*2\r\n+OW\r\n+update\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:2\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"),
        ("del", b"*10\r\n$3\r\ndel\r\n:-2\r\n*1\r\n+write\r\n:1\r\n:-1\r\n:1\r\n*3\r\n+@keyspace\r\n+@write\r\n+@slow\r\n*2\r\n$26\r\nrequest_policy:multi_shard\r\n$23\r\nresponse_policy:agg_sum\r\n*1\r\n*6\r\n$5\r\nflags\r\n*2\r\n+RM\r\n+delete\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:-1\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"),
        ("ping", b"*10\r\n$4\r\nping\r\n:-1\r\n*1\r\n+fast\r\n:0\r\n:0\r\n:0\r\n*2\r\n+@fast\r\n+@connection\r\n*2\r\n$25\r\nrequest_policy:all_shards\r\n$29\r\nresponse_policy:all_succeeded\r\n*0\r\n*0\r\n"),
        ("ttl", b"*10\r\n$3\r\nttl\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n*3\r\n+@keyspace\r\n+@read\r\n+@fast\r\n*1\r\n$23\r\nnondeterministic_output\r\n*1\r\n*6\r\n$5\r\nflags\r\n*2\r\n+RO\r\n+access\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"),
        ("watch", b"*10\r\n$5\r\nwatch\r\n:-2\r\n*5\r\n+noscript\r\n+loading\r\n+stale\r\n+fast\r\n+allow_busy\r\n:1\r\n:-1\r\n:1\r\n*2\r\n+@fast\r\n+@transaction\r\n*0\r\n*1\r\n*6\r\n$5\r\nflags\r\n*1\r\n+RO\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:-1\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"),
        ("getdel", b"*10\r\n$6\r\ngetdel\r\n:2\r\n*2\r\n+write\r\n+fast\r\n:1\r\n:1\r\n:1\r\n*3\r\n+@write\r\n+@string\r\n+@fast\r\n*0\r\n*1\r\n*6\r\n$5\r\nflags\r\n*3\r\n+RW\r\n+access\r\n+delete\r\n$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n*2\r\n$5\r\nindex\r\n:1\r\n$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n*6\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"),
        ("client|list", b"*10\r\n$11\r\nclient|list\r\n:-2\r\n*4\r\n+admin\r\n+noscript\r\n+loading\r\n+stale\r\n:0\r\n:0\r\n:0\r\n*4\r\n+@admin\r\n+@slow\r\n+@dangerous\r\n+@connection\r\n*1\r\n$23\r\nnondeterministic_output\r\n*0\r\n*0\r\n"),
    ];

    fn out(proto: Proto, f: impl FnOnce(&mut Out<'_>)) -> Vec<u8> {
        let mut buf = Vec::new();
        f(&mut Out {
            buf: &mut buf,
            proto,
        });
        buf
    }

    fn parse(buf: &[u8]) -> Value {
        let (v, used) = parse_value(buf, &Limits::default())
            .expect("well-formed")
            .expect("complete");
        assert_eq!(used, buf.len(), "one reply");
        v
    }

    fn args(line: &[&str]) -> Vec<Vec<u8>> {
        line.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn the_table_is_sorted_unique_and_fits_the_acl_bits() {
        assert!(COMMANDS.windows(2).all(|w| w[0].name < w[1].name));
        assert!(COMMANDS.len() <= 128);
        for (i, c) in COMMANDS.iter().enumerate() {
            assert_eq!(command_id(c.name), Some(i));
            assert_eq!(c.name, c.name.to_ascii_uppercase());
            for s in c.subs {
                let prefix = format!("{}|", c.name.to_ascii_lowercase());
                assert!(s.name.starts_with(&prefix), "{}", s.name);
            }
        }
        assert_eq!(command_id("NOSUCH"), None);
        assert_eq!(command_id("get"), None, "names are looked up upper-case");
        for name in "SET SETNX SETEX PSETEX GET GETEX GETDEL GETSET MGET MSET MSETNX APPEND \
                     STRLEN GETRANGE SETRANGE SUBSTR INCR DECR INCRBY DECRBY INCRBYFLOAT EXPIRE \
                     PEXPIRE EXPIREAT PEXPIREAT TTL PTTL EXPIRETIME PEXPIRETIME PERSIST DEL \
                     UNLINK EXISTS TOUCH TYPE RENAME RENAMENX COPY SCAN KEYS DBSIZE RANDOMKEY \
                     FLUSHALL FLUSHDB MULTI EXEC DISCARD WATCH UNWATCH WAIT PING ECHO HELLO AUTH \
                     QUIT RESET SELECT CLIENT READONLY READWRITE COMMAND INFO CONFIG CLUSTER TIME \
                     LASTSAVE"
            .split_whitespace()
        {
            assert!(command_id(name).is_some(), "{name}");
        }
        assert_eq!(COMMANDS.len(), 66);
    }

    #[test]
    fn command_info_matches_redis_byte_for_byte() {
        for (name, want) in REDIS_COMMAND_INFO {
            let got = out(Proto::Resp2, |o| {
                assert!(command_info_by_name(name.as_bytes(), o), "{name}");
            });
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(want),
                "{name}"
            );
        }
        assert!(!command_info_by_name(
            b"nosuch",
            &mut Out {
                buf: &mut Vec::new(),
                proto: Proto::Resp2
            }
        ));
        assert!(!command_info_by_name(
            b"client|kill",
            &mut Out {
                buf: &mut Vec::new(),
                proto: Proto::Resp2
            }
        ));
    }

    #[test]
    fn every_entry_parses_in_both_protocols_with_its_subcommands() {
        for proto in [Proto::Resp2, Proto::Resp3] {
            let buf = out(proto, |o| {
                o.array(command_count());
                for id in 0..command_count() {
                    command_entry(id, o);
                }
            });
            let Value::Array(entries) = parse(&buf) else {
                panic!("not an array")
            };
            assert_eq!(entries.len(), COMMANDS.len());
            for (e, c) in entries.iter().zip(COMMANDS) {
                let Value::Array(f) = e else { panic!("{e:?}") };
                assert_eq!(f.len(), 10, "{}", c.name);
                let Value::Array(specs) = &f[8] else {
                    panic!("{f:?}")
                };
                assert_eq!(specs.len(), c.specs.len(), "{}", c.name);
                let Value::Array(subs) = &f[9] else {
                    panic!("{f:?}")
                };
                assert_eq!(subs.len(), c.subs.len(), "{}", c.name);
                for (s, info) in subs.iter().zip(c.subs) {
                    let Value::Array(sf) = s else { panic!("{s:?}") };
                    assert_eq!(sf.len(), 10);
                    assert_eq!(sf[0], Value::Bulk(info.name.as_bytes().to_vec()));
                }
            }
        }
        let Value::Array(client) = parse(&out(Proto::Resp2, |o| {
            command_entry(command_id("CLIENT").expect("CLIENT"), o)
        })) else {
            panic!()
        };
        let Value::Array(subs) = &client[9] else {
            panic!()
        };
        assert!(subs.iter().any(|s| matches!(s,
            Value::Array(f) if f[0] == Value::Bulk(b"client|setinfo".to_vec()))));
    }

    /// What a client that reads only first/last/step finds (redis-py before key specs).
    fn keys_by_positions<'a>(c: &CommandInfo, args: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
        keys_at_positions(c.keys, args)
    }

    /// The keys at positions `first..=last` (negative: from the end) by `step` of `args`.
    pub(crate) fn keys_at_positions(
        (first, last, step): (i64, i64, i64),
        args: &[Vec<u8>],
    ) -> Vec<&[u8]> {
        if step == 0 {
            return Vec::new();
        }
        let last = if last < 0 {
            args.len() as i64 + last
        } else {
            last
        };
        (first..=last)
            .step_by(step as usize)
            .map(|p| args[p as usize].as_slice())
            .collect()
    }

    #[test]
    fn getkeys_from_key_specs_agrees_with_first_last_step() {
        let mut checked = 0;
        for c in COMMANDS {
            assert_eq!(c.has_keys(), c.keys.2 != 0, "{}", c.name);
            if !c.has_keys() {
                continue;
            }
            // The shortest and a longer valid argument list.
            let min = c.arity.unsigned_abs() as usize;
            let lens: Vec<usize> = if c.arity > 0 {
                vec![min]
            } else {
                vec![min, min + c.keys.2 as usize * 3]
            };
            for n in lens {
                let line: Vec<Vec<u8>> = std::iter::once(c.name.as_bytes().to_vec())
                    .chain((1..n).map(|i| format!("a{i}").into_bytes()))
                    .collect();
                let got: Vec<&[u8]> = command_keys(&line)
                    .unwrap_or_else(|e| panic!("{} {n}: {e}", c.name))
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                assert_eq!(got, keys_by_positions(c, &line), "{} with {n}", c.name);
                checked += 1;
            }
        }
        assert!(checked > 40);
        let keys = |l: &[&str]| -> Vec<Vec<u8>> {
            command_keys(&args(l))
                .expect("keys")
                .into_iter()
                .map(|(k, _)| k.to_vec())
                .collect()
        };
        assert_eq!(keys(&["MSET", "a", "1", "b", "2"]), args(&["a", "b"]));
        assert_eq!(
            keys(&["COPY", "src", "dst", "REPLACE"]),
            args(&["src", "dst"])
        );
        assert_eq!(keys(&["RENAME", "x", "y"]), args(&["x", "y"]));
        assert_eq!(keys(&["SET", "k", "v", "EX", "10"]), args(&["k"]));
        let copy = args(&["COPY", "a", "b"]);
        let flags = command_keys(&copy).expect("keys");
        assert_eq!(flags[0].1, &["RO", "access"]);
        assert_eq!(flags[1].1, &["OW", "update"]);
        // Redis's errors.
        assert_eq!(
            command_keys(&args(&["NOSUCH", "a"])).err(),
            Some("ERR Invalid command specified")
        );
        assert_eq!(
            command_keys(&args(&["PING"])).err(),
            Some("ERR The command has no key arguments")
        );
        assert_eq!(
            command_keys(&args(&["GET", "a", "b"])).err(),
            Some("ERR Invalid number of arguments specified for command")
        );
        assert_eq!(
            command_keys(&args(&["SET", "a"])).err(),
            Some("ERR Invalid number of arguments specified for command")
        );
    }

    #[test]
    fn acl_keys_come_from_the_key_specs_of_every_command() {
        let keys = |l: &[&str]| -> Vec<Vec<u8>> {
            keys_for_acl(&args(l))
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect()
        };
        assert_eq!(keys(&["getdel", "k"]), args(&["k"]));
        assert_eq!(keys(&["RENAME", "a", "b"]), args(&["a", "b"]));
        assert_eq!(keys(&["MSETNX", "a", "1", "b", "2"]), args(&["a", "b"]));
        assert_eq!(
            keys(&["MSET", "a", "1", "b"]),
            args(&["a", "b"]),
            "short line"
        );
        assert_eq!(keys(&["WATCH", "x", "y", "z"]), args(&["x", "y", "z"]));
        assert!(keys(&["GET"]).is_empty());
        assert!(keys(&["PING", "a"]).is_empty());
        assert!(keys(&["NOSUCH", "a"]).is_empty());
    }

    #[test]
    fn command_docs_parse_with_the_fields_clients_read() {
        for proto in [Proto::Resp2, Proto::Resp3] {
            let v = parse(&out(proto, |o| command_docs(&[], o)));
            let pairs: Vec<(Value, Value)> = match v {
                Value::Array(a) => a
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect(),
                Value::Map(m) => m,
                other => panic!("{other:?}"),
            };
            assert_eq!(pairs.len(), COMMANDS.len());
            for (name, doc) in pairs {
                let fields: Vec<Value> = match doc {
                    Value::Array(a) => a.iter().step_by(2).cloned().collect(),
                    Value::Map(m) => m.into_iter().map(|(k, _)| k).collect(),
                    other => panic!("{other:?}"),
                };
                for f in ["summary", "since", "group", "complexity", "arguments"] {
                    assert!(
                        fields.contains(&Value::Bulk(f.as_bytes().to_vec())),
                        "{name:?} lacks {f}"
                    );
                }
            }
        }
        // Unknown names are left out.
        let v = parse(&out(Proto::Resp2, |o| {
            command_docs(&args(&["get", "nosuch"]), o)
        }));
        let Value::Array(a) = v else { panic!() };
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], Value::Bulk(b"get".to_vec()));
    }

    #[test]
    fn command_list_filters_like_redis() {
        let mut tx = command_list(&args(&["FILTERBY", "ACLCAT", "transaction"])).expect("list");
        tx.sort_unstable();
        assert_eq!(tx, ["DISCARD", "EXEC", "MULTI", "UNWATCH", "WATCH"]);
        let all = command_list(&[]).expect("list");
        assert!(all.contains(&"client|id") && all.contains(&"GET"));
        let client = command_list(&args(&["filterby", "pattern", "client*"])).expect("list");
        assert!(client.contains(&"CLIENT") && client.contains(&"client|list"));
        assert!(!client.contains(&"GET"));
        assert!(command_list(&args(&["FILTERBY", "MODULE", "json"]))
            .expect("list")
            .is_empty());
        assert!(command_list(&args(&["FILTERBY", "x", "y"])).is_err());
        assert!(command_list(&args(&["FILTERBY"])).is_err());
    }

    #[test]
    fn acl_categories_of_a_container_include_its_subcommands() {
        let acl = Acl::new(
            Some("user ops on >pw ~* +@admin\nuser app on >pw ~* +@all -@dangerous"),
            None,
        )
        .expect("acl");
        let ops = acl.user(acl.authenticate(b"ops", b"pw").expect("ops"));
        assert!(ops.check(id("CONFIG"), &[]).is_ok());
        assert!(ops.check(id("LASTSAVE"), &[]).is_ok());
        assert!(ops.check(id("GET"), &[b"k"]).is_err());
        let app = acl.user(acl.authenticate(b"app", b"pw").expect("app"));
        assert!(app.check(id("CONFIG"), &[]).is_err());
        assert!(app.check(id("KEYS"), &[]).is_err());
        assert!(app.check(id("TIME"), &[]).is_ok());
        assert!(app.check(id("LASTSAVE"), &[]).is_err());
        assert!(app.check(id("SETRANGE"), &[b"k"]).is_ok());
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
