//! Scaffolding of the tests that run a whole cluster as processes: the `dinomo` processes,
//! their ready lines, RESP connections to the KNs and the manager's map.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dinomo::redis_client::{self, ClusterClient, ReadError, Timeouts};
use dinomo::resp::Value;
use dinomo::shared::manager_proto::{MapMsg, MgrClient};
use nix::sys::signal::Signal;

/// How long any one step (a process getting ready, a map settling, a reply) may take.
pub const DEADLINE: Duration = Duration::from_secs(60);
// Re-exported for the tests that hand the binary to a process that spawns it (`--kn-exe`).
#[allow(unused_imports)]
pub use super::BIN;

/// [`DEADLINE`] as it applies to this run: longer over verbs (see [`super::fabric::scaled`]).
pub fn deadline() -> Duration {
    super::fabric::scaled(DEADLINE)
}

/// A `dinomo` process, killed (SIGKILL, which also ends a stopped process) when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `dinomo <args>` with its stdout piped back to the caller.
    pub fn spawn(args: &[&str]) -> (Self, ChildStdout) {
        Self::spawn_logging(args, "warn", Stdio::inherit())
    }

    /// [`Proc::spawn`] with log filter `rust_log` and its stderr (the log) to `stderr`.
    pub fn spawn_logging(args: &[&str], rust_log: &str, stderr: Stdio) -> (Self, ChildStdout) {
        let mut child = super::dinomo_cmd(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn dinomo");
        let out = child.stdout.take().expect("stdout");
        (Self { child }, out)
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(self.pid(), sig).expect("signal");
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// Waits (bounded) for the exit status.
    pub fn wait(&mut self) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(t0.elapsed() < deadline(), "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every thread of the process is stopped (SIGSTOP is delivered
    /// asynchronously: `kill` returns before the threads stop).
    pub fn wait_stopped(&self) {
        let tasks = format!("/proc/{}/task", self.child.id());
        let t0 = Instant::now();
        loop {
            let all_stopped = std::fs::read_dir(&tasks).expect("tasks").all(|t| {
                let stat = std::fs::read_to_string(t.expect("task").path().join("stat"))
                    .unwrap_or_default();
                // "pid (comm) S ...": the state follows the last ')'.
                let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
                state.is_some_and(|r| r.starts_with('T') || r.starts_with('t'))
            });
            if all_stopped {
                return;
            }
            assert!(t0.elapsed() < deadline(), "process did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The first line the process prints (its ready line), waited for at most `deadline()`.
pub fn first_line(out: ChildStdout) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(deadline())
        .expect("process did not get ready")
}

pub fn last_word(line: &str) -> String {
    line.split_whitespace()
        .last()
        .expect("an address")
        .to_string()
}

/// Starts `dinomo kn` on the shm region `region` with manager `mgr` and the further words
/// `extra`, listening on any free loopback port; returns its id, client address and process
/// once it said "kn <id> listening on <addr>".
pub fn spawn_kn(region: &str, mgr: &str, extra: &[&str]) -> (u16, String, Proc) {
    spawn_kn_on(&super::fabric::Dpm::shm(region), mgr, extra)
}

/// [`spawn_kn`] reaching the DPM as `dpm` says (shm or verbs, see [`super::fabric`]).
pub fn spawn_kn_on(dpm: &super::fabric::Dpm, mgr: &str, extra: &[&str]) -> (u16, String, Proc) {
    let dpm_args = dpm.args();
    let mut args = vec!["kn"];
    args.extend(super::fabric::strs(&dpm_args));
    args.extend(["--listen", "127.0.0.1:0", "--manager", mgr]);
    args.extend_from_slice(extra);
    let (p, out) = Proc::spawn(&args);
    let line = first_line(out);
    let w: Vec<&str> = line.split_whitespace().collect();
    (w[1].parse().expect("KN id"), w[4].to_string(), p)
}

/// The address a ready line ends in.
pub fn ready_addr(out: ChildStdout) -> String {
    last_word(&first_line(out))
}

/// Waits until the manager's map lists exactly `kns` KNs and is settled.
pub fn wait_map(mgr: &str, kns: usize) -> MapMsg {
    let mut m = MgrClient::connect(mgr, deadline()).expect("manager");
    let t0 = Instant::now();
    loop {
        let map = m.map().expect("map");
        if map.kns.len() == kns && map.settled {
            return map;
        }
        assert!(
            t0.elapsed() < deadline(),
            "map did not settle on {kns} KNs: {map:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One RESP connection, with the process tests' conventions: failures are `false` or
/// `None`, a malformed reply panics.
pub struct Conn(redis_client::Conn);

impl Conn {
    /// `timeout`: how long one read may wait.
    pub fn open(addr: &str, timeout: Duration) -> std::io::Result<Self> {
        let timeouts = Timeouts {
            connect: None,
            reply: Some(timeout),
        };
        redis_client::Conn::connect(addr, timeouts).map(Self)
    }

    /// Writes `bytes` as they are; false if the connection failed.
    pub fn send_raw(&mut self, bytes: &[u8]) -> bool {
        self.0.send_raw(bytes).is_ok()
    }

    /// Sends one command without waiting for its reply; false if the connection failed.
    pub fn send(&mut self, args: &[&[u8]]) -> bool {
        self.0.send(args).is_ok()
    }

    /// One reply; `None` if the connection closed or failed (or the read timed out).
    pub fn read(&mut self) -> Option<Value> {
        match self.0.read() {
            Ok(v) => Some(v),
            Err(ReadError::Protocol(e)) => panic!("invalid reply: {e}"),
            Err(_) => None,
        }
    }

    /// Asserts that the peer closed the connection: neither a reply nor a timeout.
    pub fn assert_closed(&mut self) {
        match self.0.read() {
            Err(ReadError::Closed) => {}
            other => panic!("the connection is still open: {other:?}"),
        }
    }

    /// One command and its reply; `None` if the connection closed or failed.
    pub fn cmd(&mut self, args: &[&[u8]]) -> Option<Value> {
        if !self.send(args) {
            return None;
        }
        self.read()
    }

    /// One command and its reply, which must come.
    pub fn call(&mut self, args: &[&[u8]]) -> Value {
        self.cmd(args).expect("a reply")
    }
}

/// A client of the KNs by address, following `MOVED`.
pub struct Client {
    inner: ClusterClient,
    addrs: Vec<String>,
    next: usize,
}

impl Client {
    /// `addrs`: where `once` and `must` start, in turn; `reply_timeout`: how long one
    /// reply may take before the connection counts as failed.
    pub fn new(addrs: Vec<String>, reply_timeout: Duration) -> Self {
        let timeouts = Timeouts {
            connect: None,
            reply: Some(reply_timeout),
        };
        Self {
            inner: ClusterClient::new(&addrs, timeouts),
            addrs,
            next: 0,
        }
    }

    /// `MOVED` replies followed so far.
    pub fn moved(&self) -> u64 {
        self.inner.counters().moved
    }

    /// One attempt starting at `addr`: the reply (after following up to 4 `MOVED`), or
    /// `None` if a connection failed (the command may or may not have been executed; the
    /// next `once` starts at another address) or there were more `MOVED`.
    pub fn once_at(&mut self, addr: &str, args: &[&[u8]]) -> Option<Value> {
        match self.inner.call_following(addr, args, 4) {
            Err(_) => {
                self.next += 1;
                None
            }
            // The redirections ran out.
            Ok(Value::Error(e)) if e.starts_with("MOVED ") => None,
            Ok(v) => Some(v),
        }
    }

    /// `once_at` the current one of its addresses; every outcome goes to the caller.
    pub fn once(&mut self, args: &[&[u8]]) -> Option<Value> {
        let addr = self.addrs[self.next % self.addrs.len()].clone();
        self.once_at(&addr, args)
    }

    /// Retries (bounded) until a reply that is not an error.
    pub fn must(&mut self, args: &[&[u8]]) -> Value {
        let t0 = Instant::now();
        loop {
            match self.once(args) {
                Some(Value::Error(_)) | None => {
                    assert!(t0.elapsed() < deadline(), "no answer for {args:?}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Some(v) => return v,
            }
        }
    }

    /// Sends to `first`, retrying (bounded) failed connections (a KN that just died),
    /// `TRYAGAIN` and `CLUSTERDOWN`; returns any other reply, errors included.
    pub fn cmd_at(&mut self, first: &str, args: &[&[u8]]) -> Value {
        let t0 = Instant::now();
        loop {
            match self.once_at(first, args) {
                Some(Value::Error(e))
                    if e.starts_with("TRYAGAIN") || e.starts_with("CLUSTERDOWN") => {}
                Some(v) => return v,
                None => {}
            }
            assert!(t0.elapsed() < deadline(), "no answer for {args:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
