//! Starting KNs (`add_kn`, the policy): the manager asks a [`KnSpawner`]. The process one
//! runs `dinomo kn` children; tests inject their own.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// Starts KNs for the manager.
pub trait KnSpawner: Send + Sync {
    /// Starts a KN that registers with the manager at `manager`; returns once it serves:
    /// its KN id and client address.
    fn spawn(&self, manager: SocketAddr) -> Result<(u16, String), String>;
    /// Ids of the running KNs it started.
    fn spawned(&self) -> Vec<u16>;
    /// Forgets KNs that exited.
    fn reap(&self);
    /// Asks every KN it started to leave (SIGTERM) and waits up to `grace`; kills the rest.
    fn stop_all(&self, grace: Duration);
}

/// What the manager needs to start a `dinomo kn` child process.
#[derive(Clone, Debug)]
pub struct SpawnConfig {
    /// The `dinomo` executable.
    pub exe: PathBuf,
    /// The words that name the DPM and its fabric (`--fabric ... --dpm ...`).
    pub dpm_args: Vec<String>,
    /// Host the new KN listens on (any free port).
    pub host: String,
    pub threads: u16,
    pub io_threads: usize,
    /// Cache per KN, e.g. "64M".
    pub cache: String,
    /// Further words for every KN it starts (`--secret-file PATH`, client authentication).
    pub kn_args: Vec<String>,
}

/// How long a new KN may take to say it serves.
const READY_WAIT: Duration = Duration::from_secs(30);

/// A KN process this manager started.
#[derive(Debug)]
struct ChildKn {
    kn_id: Option<u16>,
    child: Child,
}

/// Starts `dinomo kn` children of this process.
#[derive(Debug)]
pub struct ProcessSpawner {
    cfg: SpawnConfig,
    forker: Forker,
    children: Mutex<Vec<ChildKn>>,
}

impl ProcessSpawner {
    pub fn new(cfg: SpawnConfig) -> Self {
        Self {
            cfg,
            forker: Forker::start(),
            children: Mutex::new(Vec::new()),
        }
    }

    fn children(&self) -> std::sync::MutexGuard<'_, Vec<ChildKn>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KnSpawner for ProcessSpawner {
    fn spawn(&self, manager: SocketAddr) -> Result<(u16, String), String> {
        let sp = &self.cfg;
        let mut cmd = Command::new(&sp.exe);
        cmd.arg("kn")
            .args(&sp.dpm_args)
            .args(["--listen", &format!("{}:0", sp.host)])
            .args(["--manager", &manager.to_string()])
            .args(["--threads", &sp.threads.to_string()])
            .args(["--io-threads", &sp.io_threads.to_string()])
            .args(["--cache", &sp.cache])
            .args(&sp.kn_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = self
            .forker
            .spawn(cmd)
            .map_err(|e| format!("cannot start {}: {e}", sp.exe.display()))?;
        let ready = child.stdout.take().map(ready_line);
        let pid = child.id();
        self.children().push(ChildKn { kn_id: None, child });
        let line = ready.and_then(|rx| rx.recv_timeout(READY_WAIT).ok());
        // "kn <id> listening on <addr>"
        let parsed = line.as_deref().and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["kn", id, "listening", "on", addr] => {
                    Some((id.parse::<u16>().ok()?, addr.to_string()))
                }
                _ => None,
            }
        });
        let mut list = self.children();
        let at = list.iter().position(|c| c.child.id() == pid);
        match (parsed, at) {
            (Some((kn_id, addr)), Some(i)) => {
                list[i].kn_id = Some(kn_id);
                Ok((kn_id, addr))
            }
            (_, Some(i)) => {
                let mut c = list.remove(i);
                let _ = c.child.kill();
                let status = c.child.wait();
                Err(format!(
                    "the new KN did not start ({:?}); see the manager's log",
                    status.map(|s| s.to_string())
                ))
            }
            (_, None) => Err("the new KN exited while starting; see the manager's log".into()),
        }
    }

    fn spawned(&self) -> Vec<u16> {
        self.children().iter().filter_map(|c| c.kn_id).collect()
    }

    fn reap(&self) {
        self.children().retain_mut(|c| match c.child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(kn = ?c.kn_id, %status, "a KN the manager started exited");
                false
            }
            _ => true,
        });
    }

    fn stop_all(&self, grace: Duration) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let mut list = std::mem::take(&mut *self.children());
        for c in &list {
            if let Ok(pid) = i32::try_from(c.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let t0 = Instant::now();
        while t0.elapsed() < grace && !list.is_empty() {
            list.retain_mut(|c| !matches!(c.child.try_wait(), Ok(Some(_))));
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut c in list {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}

/// Reads the first line of a child's stdout in a thread (and discards the rest, so the
/// child never writes to a closed pipe).
fn ready_line(out: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("kn-stdout".into())
        .spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
    rx
}

type ForkJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts child processes from one thread that lives as long as the manager: the
/// parent-death signal fires when the *thread* that forked exits, so children must not be
/// forked from short-lived connection threads.
#[derive(Debug)]
struct Forker(Mutex<mpsc::Sender<ForkJob>>);

impl Forker {
    fn start() -> Self {
        let (tx, rx) = mpsc::channel::<ForkJob>();
        let _ = std::thread::Builder::new()
            .name("manager-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    die_with_parent(&mut cmd);
                    let _ = reply.send(cmd.spawn());
                }
            });
        Self(Mutex::new(tx))
    }

    fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((cmd, tx));
        if sent.is_err() {
            return Err(std::io::Error::other("the spawner thread is gone"));
        }
        rx.recv()
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
    }
}

/// The child gets SIGTERM (and leaves the cluster) if the manager dies.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
