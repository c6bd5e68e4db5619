//! The KN's Redis-protocol front door, as an attacker and as `redis-cli` meet it: a DPM, a
//! manager and one KN as processes on loopback, the KN started with a password file and an
//! ACL file. Unauthenticated and wrongly authenticated clients (raw RESP and `redis-cli`)
//! are refused and change nothing; a read-only ACL user cannot write; a command declaring
//! 65 536 arguments of 1 MiB and an `MGET` of one large value 65 535 times are cut off
//! with an error while the KN's peak memory stays within a few times the configured
//! limits; `maxclients` and `timeout` hold; a KN that would serve a non-loopback address
//! without a password, or whose password file others can read, refuses to start; with a
//! certificate the port speaks TLS (`redis-cli --tls`) and plain RESP gets nothing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::{ready_addr, spawn_kn, wait_map, Conn, Proc, DEADLINE};
use common::{dinomo, format_region, stderr};
use dinomo::resp::Value;

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "default-pw-1";
const ACL: &str = "# a read-write and a read-only user, and one limited to some keys\n\
                   user writer on >writer-pw ~* +@all\n\
                   user reader on >reader-pw ~* +@read +@connection\n\
                   user pub on >pub-pw ~pub:* +@all\n";

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A DPM, a manager and one KN started with `kn_args` (besides the password and ACL
/// files in `dir`).
struct Node {
    _dpm: Proc,
    _manager: Proc,
    kn: Proc,
    addr: String,
    port: String,
}

impl Node {
    fn start(dir: &Path, kn_args: &[&str]) -> Self {
        let region = dir.join("region");
        let region_s = region.to_str().expect("utf-8").to_string();
        // 4 MiB blocks: values of a full 1 MiB fit, so a 1 MiB bulk string is not refused
        // from its header and the query-buffer limit is what stops the big command.
        format_region(&region, "128M", "4M");
        let pass = dir.join("requirepass");
        private_file(&pass, &format!("{PASSWORD}\n"));
        let acl = dir.join("users.acl");
        private_file(&acl, ACL);
        let (dpm, _) = Proc::spawn(&[
            "dpm",
            "serve",
            "--path",
            &region_s,
            "--workers",
            "1",
            "--no-pin",
        ]);
        let (manager, mout) =
            Proc::spawn(&["manager", "--dpm", &region_s, "--listen", "127.0.0.1:0"]);
        let mgr = ready_addr(mout);
        let mut args = vec![
            "--threads",
            "1",
            "--cache",
            "1M",
            "--requirepass-file",
            pass.to_str().expect("utf-8"),
            "--acl-file",
            acl.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(kn_args);
        let (_, addr, kn) = spawn_kn(&region_s, &mgr, &args);
        wait_map(&mgr, 1);
        let port = addr.rsplit_once(':').expect("port").1.to_string();
        Self {
            _dpm: dpm,
            _manager: manager,
            kn,
            addr,
            port,
        }
    }

    fn conn(&self) -> Conn {
        Conn::open(&self.addr, REPLY_TIMEOUT).expect("connect")
    }

    /// A connection logged in as `user`.
    fn login(&self, user: &str, password: &str) -> Conn {
        let mut c = self.conn();
        assert_eq!(
            c.call(&[b"AUTH", user.as_bytes(), password.as_bytes()]),
            ok()
        );
        c
    }

    /// `redis-cli -p <port> <args>`: (stdout, stderr), both trimmed.
    fn redis_cli(&self, args: &[&str]) -> (String, String) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port, "--no-auth-warning"])
            .args(args)
            .output()
            .expect("redis-cli (install redis-tools)");
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    }

    /// The KN's peak resident memory so far (`VmHWM`), in bytes.
    fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.kn.pid())).expect("status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM");
        kb << 10
    }

    /// A parameter from `CONFIG GET`.
    fn config(&self, c: &mut Conn, name: &str) -> u64 {
        let Value::Array(v) = c.call(&[b"CONFIG", b"GET", name.as_bytes()]) else {
            panic!("CONFIG GET {name} is not an array");
        };
        match v.as_slice() {
            [Value::Bulk(_), Value::Bulk(n)] => String::from_utf8_lossy(n).parse().expect("n"),
            other => panic!("CONFIG GET {name}: {other:?}"),
        }
    }
}

fn ok() -> Value {
    Value::Simple("OK".into())
}

fn err(v: &Value) -> &str {
    match v {
        Value::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

const NOAUTH: &str = "NOAUTH Authentication required.";
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

#[test]
fn resp_clients_must_authenticate_and_read_only_users_cannot_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path(), &[]);

    // Raw RESP without AUTH: refused, and nothing was written.
    let mut anon = node.conn();
    for cmd in [
        &[&b"SET"[..], b"k", b"anon"][..],
        &[b"GET", b"k"],
        &[b"MSET", b"{t}a", b"1", b"{t}b", b"2"],
        &[b"DEL", b"k"],
        &[b"CONFIG", b"GET", b"*"],
        &[b"CLUSTER", b"SLOTS"],
        &[b"INFO"],
        &[b"PING"],
        &[b"NOSUCHCOMMAND"],
    ] {
        assert_eq!(err(&anon.call(cmd)), NOAUTH, "{cmd:?}");
    }
    // A wrong password, or an unknown or read-only user's password for another user.
    assert_eq!(err(&anon.call(&[b"AUTH", b"wrong"])), WRONGPASS);
    assert_eq!(
        err(&anon.call(&[b"AUTH", b"nobody", PASSWORD.as_bytes()])),
        WRONGPASS
    );
    assert_eq!(
        err(&anon.call(&[b"AUTH", b"writer", b"reader-pw"])),
        WRONGPASS
    );
    assert_eq!(err(&anon.call(&[b"SET", b"k", b"anon"])), NOAUTH);
    // HELLO: a wrong AUTH is refused and the protocol stays RESP2; without AUTH it is
    // refused too.
    assert_eq!(
        err(&anon.call(&[b"HELLO", b"3", b"AUTH", b"default", b"wrongpass"])),
        WRONGPASS
    );
    assert_eq!(
        err(&anon.call(&[b"HELLO", b"3", b"AUTH", b"writer", b"wrongpass"])),
        WRONGPASS
    );
    assert!(err(&anon.call(&[b"HELLO", b"3"])).starts_with("NOAUTH HELLO must be called"));
    assert_eq!(err(&anon.call(&[b"SET", b"k", b"anon"])), NOAUTH);
    // Before AUTH a command is small: a large one is a protocol error and the connection
    // closes (Redis's limits for unauthenticated clients).
    assert!(anon.send_raw(b"*11\r\n"));
    assert!(err(&anon.read().expect("a reply")).contains("before AUTH"));
    anon.assert_closed();

    // redis-cli, as a user would run it: refused without or with a wrong password.
    let (out, _) = node.redis_cli(&["SET", "k", "cli"]);
    assert_eq!(out, NOAUTH);
    let (out, errs) = node.redis_cli(&["-a", "wrong", "SET", "k", "cli"]);
    assert!(errs.contains("WRONGPASS"), "{errs}");
    assert_eq!(out, NOAUTH);
    let (out, errs) = node.redis_cli(&["--user", "reader", "--pass", "bad", "GET", "k"]);
    assert!(errs.contains("WRONGPASS"), "{errs}");
    assert_eq!(out, NOAUTH);

    // Nothing above was written.
    let mut admin = node.login("default", PASSWORD);
    assert_eq!(admin.call(&[b"GET", b"k"]), Value::Nil);
    assert_eq!(admin.call(&[b"EXISTS", b"{t}a", b"{t}b"]), Value::Int(0));

    // The right passwords work: `AUTH password`, `HELLO 3 AUTH`, redis-cli -a / --user.
    assert_eq!(admin.call(&[b"SET", b"k", b"v1"]), ok());
    let mut hello = node.conn();
    let reply = hello.call(&[b"HELLO", b"3", b"AUTH", b"writer", b"writer-pw"]);
    assert!(matches!(reply, Value::Map(_)), "{reply:?}");
    assert_eq!(hello.call(&[b"GET", b"k"]), Value::Bulk(b"v1".to_vec()));
    let (out, _) = node.redis_cli(&["-a", PASSWORD, "SET", "k", "v2"]);
    assert_eq!(out, "OK");
    let (out, _) = node.redis_cli(&["--user", "writer", "--pass", "writer-pw", "GET", "k"]);
    assert_eq!(out, "v2");

    // The read-only user reads but cannot write, over raw RESP or redis-cli.
    let mut reader = node.login("reader", "reader-pw");
    assert_eq!(reader.call(&[b"GET", b"k"]), Value::Bulk(b"v2".to_vec()));
    assert_eq!(reader.call(&[b"PING"]), Value::Simple("PONG".into()));
    let noperm = "NOPERM User reader has no permissions to run the 'set' command";
    assert_eq!(err(&reader.call(&[b"SET", b"k", b"ro"])), noperm);
    assert!(err(&reader.call(&[b"DEL", b"k"])).starts_with("NOPERM"));
    assert!(err(&reader.call(&[b"MSET", b"k", b"ro"])).starts_with("NOPERM"));
    assert!(err(&reader.call(&[b"CONFIG", b"GET", b"*"])).starts_with("NOPERM"));
    let (out, _) = node.redis_cli(&["--user", "reader", "--pass", "reader-pw", "SET", "k", "x"]);
    assert_eq!(out, noperm);
    assert_eq!(admin.call(&[b"GET", b"k"]), Value::Bulk(b"v2".to_vec()));
    // Read-modify-write commands are writes, and keys outside a user's patterns stay out
    // of reach, even through a command of a type this node does not hold (whose WRONGTYPE
    // would tell that the key holds a string).
    for cmd in [
        &[&b"INCR"[..], b"k"][..],
        &[b"APPEND", b"k", b"x"],
        &[b"EXPIRE", b"k", b"9"],
    ] {
        assert!(err(&reader.call(cmd)).starts_with("NOPERM"), "{cmd:?}");
    }
    let mut limited = node.login("pub", "pub-pw");
    assert!(err(&limited.call(&[b"GET", b"k"])).starts_with("NOPERM"));
    assert!(err(&limited.call(&[b"LPUSH", b"k", b"x"])).starts_with("ERR unknown command"));
    assert!(err(&admin.call(&[b"LPUSH", b"k", b"x"])).starts_with("WRONGTYPE"));
    assert_eq!(admin.call(&[b"GET", b"k"]), Value::Bulk(b"v2".to_vec()));

    // Honest answers: what is not supported says so, and changes nothing.
    let e = err(&admin.call(&[b"CONFIG", b"SET", b"requirepass", b"x"])).to_string();
    assert!(
        e.contains("not supported") && e.contains("requirepass"),
        "{e}"
    );
    let e = err(&admin.call(&[b"CLIENT", b"KILL", b"127.0.0.1:1"])).to_string();
    assert!(e.contains("CLIENT KILL is not supported"), "{e}");
    assert_eq!(err(&node.conn().call(&[b"AUTH", b"x"])), WRONGPASS);
    let (out, _) = node.redis_cli(&["-a", PASSWORD, "GET", "k"]);
    assert_eq!(out, "v2", "the password did not change");
    // RESET logs the connection out.
    assert_eq!(admin.call(&[b"RESET"]), Value::Simple("RESET".into()));
    assert_eq!(err(&admin.call(&[b"GET", b"k"])), NOAUTH);
}

/// Sends `*65536` and then `$1048576` arguments with their data until the KN answers;
/// returns the answer and how many bytes were sent.
fn huge_command(addr: &str, give_up_after: usize) -> (String, usize) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
    let mut auth = Vec::new();
    dinomo::resp::encode_command(&mut auth, &[b"AUTH", PASSWORD.as_bytes()]);
    s.write_all(&auth).expect("auth");
    let mut line = [0u8; 5];
    s.read_exact(&mut line).expect("+OK");
    assert_eq!(&line, b"+OK\r\n");
    let mut chunk = b"$1048576\r\n".to_vec();
    chunk.resize(chunk.len() + (1 << 20), b'x');
    chunk.extend_from_slice(b"\r\n");
    s.write_all(b"*65536\r\n").expect("header");
    let mut sent = 0;
    let mut peek = [0u8; 1];
    while sent < give_up_after {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
        s.set_nonblocking(true).expect("nonblocking");
        let ready = matches!(s.peek(&mut peek), Ok(n) if n > 0);
        s.set_nonblocking(false).expect("blocking");
        if ready {
            break;
        }
    }
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        match s.read(&mut byte) {
            Ok(1) => reply.push(byte[0]),
            _ => break,
        }
    }
    // Then the KN closes the connection: EOF (or a reset), never more data.
    let mut rest = [0u8; 64];
    let t0 = Instant::now();
    loop {
        match s.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(t0.elapsed() < DEADLINE, "the connection stayed open"),
        }
    }
    (String::from_utf8_lossy(&reply).to_string(), sent)
}

#[test]
fn oversized_commands_and_replies_are_cut_off_with_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    const QUERY_LIMIT: u64 = 16 << 20;
    const REPLY_LIMIT: u64 = 8 << 20;
    let node = Node::start(
        dir.path(),
        &[
            "--client-query-buffer-limit",
            "16mb",
            "--client-reply-limit",
            "8mb",
            "--maxclients",
            "4",
            "--timeout",
            "2",
        ],
    );
    let mut admin = node.login("default", PASSWORD);
    assert_eq!(
        node.config(&mut admin, "client-query-buffer-limit"),
        QUERY_LIMIT
    );
    assert_eq!(node.config(&mut admin, "client-reply-limit"), REPLY_LIMIT);
    assert_eq!(node.config(&mut admin, "maxclients"), 4);
    assert_eq!(node.config(&mut admin, "timeout"), 2);
    let max_bulk = node.config(&mut admin, "proto-max-bulk-len");
    assert!(
        max_bulk >= 1 << 20,
        "a 1 MiB value fits this region: {max_bulk}"
    );
    // A large value, stored and read back, before the attacks.
    let big = vec![b'v'; 1 << 20];
    assert_eq!(admin.call(&[b"SET", b"big", &big]), ok());
    assert_eq!(admin.call(&[b"GET", b"big"]), Value::Bulk(big.clone()));
    drop(admin);
    let base = node.peak_rss();

    // 65 536 arguments of 1 MiB (64 GiB): cut off at the query-buffer limit with an
    // error; the KN never held much more than the limit.
    let (reply, sent) = huge_command(&node.addr, 256 << 20);
    assert!(
        reply.starts_with("-ERR Protocol error: the command exceeds client-query-buffer-limit"),
        "{reply:?} after {sent} bytes"
    );
    let grew = node.peak_rss().saturating_sub(base);
    assert!(
        grew < 3 * QUERY_LIMIT,
        "the KN's peak memory grew by {grew} bytes for a {QUERY_LIMIT}-byte limit"
    );

    // MGET of the 1 MiB value 65 535 times (a 64 GiB reply): an error, then the
    // connection closes; the KN held about the reply limit at most.
    let mut c = node.login("default", PASSWORD);
    let mut args: Vec<&[u8]> = vec![b"MGET"];
    args.resize(65_536, &b"big"[..]);
    let reply = c.call(&args);
    assert!(
        err(&reply).starts_with("ERR the reply would exceed client-reply-limit"),
        "{reply:?}"
    );
    c.assert_closed();
    let grew = node.peak_rss().saturating_sub(base);
    assert!(
        grew < 3 * QUERY_LIMIT,
        "the KN's peak memory grew by {grew} bytes"
    );
    // Nothing was written by either attempt, and MGETs under the limit still work.
    let mut c = node.login("default", PASSWORD);
    let reply = c.call(&[b"MGET", b"big", b"big", b"{big}none"]);
    assert!(
        reply == Value::Array(vec![Value::Bulk(big.clone()), Value::Bulk(big), Value::Nil]),
        "MGET under the limit answered wrongly"
    );

    // maxclients 4: once the connections above are gone, four are served and a fifth is
    // refused with Redis's error.
    let t0 = Instant::now();
    loop {
        let Value::Bulk(info) = c.call(&[b"INFO"]) else {
            panic!("INFO");
        };
        if String::from_utf8_lossy(&info).contains("connected_clients:1\r\n") {
            break;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "earlier connections are still open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut held: Vec<Conn> = (0..3).map(|_| node.conn()).collect();
    for h in &mut held {
        assert_eq!(err(&h.call(&[b"GET", b"x"])), NOAUTH, "served");
    }
    let mut fifth = node.conn();
    assert_eq!(
        err(&fifth.read().expect("a refusal")),
        "ERR max number of clients reached"
    );
    fifth.assert_closed();
    // timeout 2: idle clients are disconnected.
    for h in &mut held {
        h.assert_closed();
    }
    c.assert_closed();
    let mut again = node.login("default", PASSWORD);
    assert_eq!(again.call(&[b"PING"]), Value::Simple("PONG".into()));
}

#[test]
fn a_kn_without_protection_or_with_a_readable_password_file_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("no-region");
    let region = region.to_str().expect("utf-8");
    let o = dinomo(&["kn", "--dpm", region, "--listen", "0.0.0.0:0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("without a password"), "{}", stderr(&o));
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "pw\n").expect("write");
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let pass_s = pass.to_str().expect("utf-8");
    let o = dinomo(&[
        "kn",
        "--dpm",
        region,
        "--listen",
        "0.0.0.0:0",
        "--requirepass-file",
        pass_s,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    let acl = dir.path().join("acl");
    private_file(&acl, "user a on >x ~* +@all\nuser b on >y +config|set\n");
    let o = dinomo(&[
        "kn",
        "--dpm",
        region,
        "--listen",
        "127.0.0.1:0",
        "--acl-file",
        acl.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("line 2") && stderr(&o).contains("subcommand"),
        "{}",
        stderr(&o)
    );
}

/// A self-signed certificate for 127.0.0.1 (`openssl`), its key private.
fn make_cert(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (
        cert.to_str().expect("utf-8").to_string(),
        key.to_str().expect("utf-8").to_string(),
    )
}

#[test]
fn the_client_port_can_speak_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(dir.path());
    let node = Node::start(
        dir.path(),
        &["--tls-cert-file", &cert, "--tls-key-file", &key],
    );
    let tls = ["--tls", "--cacert", cert.as_str()];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = tls.to_vec();
        a.extend_from_slice(extra);
        node.redis_cli(&a)
    };
    assert_eq!(with(&["-a", PASSWORD, "SET", "k", "over-tls"]).0, "OK");
    assert_eq!(with(&["-a", PASSWORD, "GET", "k"]).0, "over-tls");
    assert_eq!(with(&["GET", "k"]).0, NOAUTH, "TLS does not replace AUTH");
    // Plain RESP gets no answer: the KN expects a TLS handshake and closes.
    let mut plain = node.conn();
    assert!(plain.send(&[b"AUTH", PASSWORD.as_bytes()]));
    plain.assert_closed();
    let (out, errs) = node.redis_cli(&["-a", PASSWORD, "GET", "k"]);
    assert!(!out.contains("over-tls"), "{out} {errs}");
}

/// Transactions over raw RESP: queued commands run together at `EXEC` and answer in order;
/// a command refused while queueing discards the transaction; a watched key written by
/// another client makes `EXEC` a null array and changes nothing; keys of two slots are
/// `CROSSSLOT`; `DISCARD` forgets the queue.
#[test]
fn multi_exec_runs_whole_and_watch_sees_other_clients_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path(), &[]);
    let mut a = node.login("writer", "writer-pw");
    let mut b = node.login("writer", "writer-pw");
    let queued = || Value::Simple("QUEUED".into());

    assert_eq!(a.call(&[b"SET", b"{t}n", b"10"]), ok());
    assert_eq!(a.call(&[b"MULTI"]), ok());
    assert_eq!(a.call(&[b"INCR", b"{t}n"]), queued());
    assert_eq!(a.call(&[b"APPEND", b"{t}s", b"ab"]), queued());
    assert_eq!(a.call(&[b"GET", b"{t}n"]), queued());
    assert_eq!(a.call(&[b"PING"]), queued());
    assert_eq!(
        a.call(&[b"EXEC"]),
        Value::Array(vec![
            Value::Int(11),
            Value::Int(2),
            Value::Bulk(b"11".to_vec()),
            Value::Simple("PONG".into()),
        ])
    );

    // A command refused while queueing (wrong arity) discards the whole transaction.
    assert_eq!(a.call(&[b"MULTI"]), ok());
    assert_eq!(a.call(&[b"INCR", b"{t}n"]), queued());
    assert!(err(&a.call(&[b"ECHO"])).starts_with("ERR wrong number of arguments"));
    assert!(err(&a.call(&[b"EXEC"])).starts_with("EXECABORT"));
    assert_eq!(a.call(&[b"GET", b"{t}n"]), Value::Bulk(b"11".to_vec()));

    // WATCH: another client's write in between voids the transaction.
    assert_eq!(a.call(&[b"WATCH", b"{t}n"]), ok());
    assert_eq!(b.call(&[b"INCR", b"{t}n"]), Value::Int(12));
    assert_eq!(a.call(&[b"MULTI"]), ok());
    assert_eq!(a.call(&[b"SET", b"{t}n", b"0"]), queued());
    assert_eq!(a.call(&[b"EXEC"]), Value::Nil, "a null array");
    assert_eq!(a.call(&[b"GET", b"{t}n"]), Value::Bulk(b"12".to_vec()));
    // Unchanged since WATCH: it runs.
    assert_eq!(a.call(&[b"WATCH", b"{t}n"]), ok());
    assert_eq!(a.call(&[b"MULTI"]), ok());
    assert_eq!(a.call(&[b"SET", b"{t}n", b"0"]), queued());
    assert_eq!(a.call(&[b"EXEC"]), Value::Array(vec![ok()]));

    // Two slots in one transaction: CROSSSLOT, nothing written.
    assert_eq!(a.call(&[b"MULTI"]), ok());
    assert_eq!(a.call(&[b"SET", b"{t}x", b"1"]), queued());
    assert_eq!(a.call(&[b"SET", b"{u}x", b"1"]), queued());
    assert!(err(&a.call(&[b"EXEC"])).starts_with("CROSSSLOT"));
    assert_eq!(a.call(&[b"EXISTS", b"{t}x", b"{t}x"]), Value::Int(0));

    // DISCARD forgets the queue; EXEC and DISCARD without MULTI are errors.
    assert_eq!(a.call(&[b"MULTI"]), ok());
    assert_eq!(a.call(&[b"SET", b"{t}y", b"1"]), queued());
    assert_eq!(a.call(&[b"DISCARD"]), ok());
    assert_eq!(a.call(&[b"GET", b"{t}y"]), Value::Nil);
    assert!(err(&a.call(&[b"EXEC"])).starts_with("ERR EXEC without MULTI"));
    assert!(err(&a.call(&[b"DISCARD"])).starts_with("ERR DISCARD without MULTI"));
}
