//! `dinomo up` as a user runs it: authentication on by default (a private secret and
//! password beside the region, and the `redis-cli` line that uses them), `--no-auth` only on
//! loopback, and a KN that dies is restarted and serves again.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::procs::DEADLINE;
use common::{dinomo, dinomo_cmd, stderr};
use dinomo::redis_client::{Conn, Credentials, Timeouts};
use dinomo::resp::Value;

/// `dinomo up`, stopped with SIGINT (then killed) when dropped.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Up {
    fn start(args: &[&str]) -> Self {
        let mut child = dinomo_cmd(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dinomo up");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Lines printed up to and including the one that contains `what`.
    fn wait_for(&self, what: &str) -> Vec<String> {
        let t0 = Instant::now();
        let mut seen = Vec::new();
        while t0.elapsed() < DEADLINE {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let done = l.contains(what);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("`up` did not print {what:?}; it printed {seen:?}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids of the processes whose parent is `parent` and whose command line has `word`.
fn children_with(parent: u32, word: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "pid (comm) S ppid ...": the fields after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).any(|w| w == word.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Some(Duration::from_secs(2)),
        reply: Some(Duration::from_secs(10)),
    }
}

/// SET then GET of `key` through the KN at `addr` as the default user, following nothing:
/// `key` must belong to that KN. `None` while the KN does not serve it.
fn set_get(addr: &str, creds: &Credentials, key: &[u8]) -> Option<Value> {
    let mut c = Conn::connect_as(addr, timeouts(), Some(creds)).ok()?;
    match c.call(&[b"SET", key, b"v"]).ok()? {
        Value::Simple(s) if s == "OK" => {}
        _ => return None,
    }
    c.call(&[b"GET", key]).ok()
}

#[test]
fn up_authenticates_by_default_and_restarts_a_killed_kn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // `up` makes its folder itself, mode 0700 (a shared one is refused).
    let dir = tmp.path().join("cluster");
    let d = dir.to_str().expect("utf-8");
    let port = dinomo::up::free_port_block(3).expect("ports");
    let (mgr, base) = (port.to_string(), (port + 1).to_string());
    let up = Up::start(&[
        "up",
        "--kns",
        "2",
        "--dir",
        d,
        "--region-size",
        "64M",
        "--fresh",
        "--threads",
        "1",
        "--lease-ms",
        "1000",
        "--manager-port",
        &mgr,
        "--base-port",
        &base,
    ]);
    let lines = up.wait_for("redis-cli");
    let text = lines.join("\n");
    let secret = dir.join("secret");
    let pass_file = dir.join("requirepass");
    assert_eq!(mode(&dir), 0o700);
    assert!(text.contains("authentication on"), "{text}");
    assert!(
        text.contains(&format!("cat {}", pass_file.display())),
        "{text}"
    );
    assert_eq!(mode(&secret), 0o600);
    assert_eq!(mode(&pass_file), 0o600);
    let password = std::fs::read_to_string(&pass_file)
        .expect("password")
        .trim()
        .to_string();
    let creds = Credentials {
        user: None,
        password,
    };
    let kn0 = format!("127.0.0.1:{}", port + 1);

    // Without the password nothing runs; with it, commands do.
    let mut anon = Conn::connect(&kn0, timeouts()).expect("connect");
    match anon.call(&[b"SET", b"k", b"v"]).expect("reply") {
        Value::Error(e) => assert!(e.starts_with("NOAUTH"), "{e}"),
        other => panic!("an unauthenticated SET answered {other:?}"),
    }
    let wrong = Credentials {
        user: None,
        password: "not-the-password".into(),
    };
    assert!(Conn::connect_as(&kn0, timeouts(), Some(&wrong)).is_err());
    let mut c = Conn::connect_as(&kn0, timeouts(), Some(&creds)).expect("auth");
    assert!(matches!(c.call(&[b"PING"]), Ok(Value::Simple(s)) if s == "PONG"));

    // KN 0 dies; `up` restarts it and it serves again (its slots come back to it or go to
    // KN 1; either way every key is served through the cluster).
    let up_pid = up.child.id();
    let kn_pids = children_with(up_pid, "kn");
    assert_eq!(kn_pids.len(), 2, "two KN children: {kn_pids:?}");
    let victim = children_with(up_pid, &kn0)
        .into_iter()
        .find(|p| kn_pids.contains(p))
        .expect("KN 0's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let t0 = Instant::now();
    loop {
        let now = children_with(up_pid, &kn0);
        let restarted = now.iter().any(|p| *p != victim);
        if restarted {
            // The new KN 0 serves a key of its own once it has joined (any key it owns:
            // try a few until one is not MOVED).
            let served = (0..64).any(|i| {
                let key = format!("after-restart-{i}");
                matches!(set_get(&kn0, &creds, key.as_bytes()), Some(Value::Bulk(v)) if v == b"v")
            });
            if served {
                break;
            }
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "KN 0 was not restarted and serving within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn no_auth_is_refused_unless_every_address_is_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("up.toml");
    std::fs::write(&cfg, "host = \"0.0.0.0\"\nauth = false\n").expect("config");
    let o = dinomo(&[
        "up",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("allowed only when every address is loopback"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("region").exists(), "nothing was started");
    let o = dinomo(&["up", "--no-auth", "--requirepass", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
