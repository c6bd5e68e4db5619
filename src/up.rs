//! `dinomo up`: a whole local cluster — a DPM, a manager and N KNs as child processes of
//! this one — started in order, and stopped in the reverse order on Ctrl-C (KNs leave and
//! close their logs, the manager stops, the DPM merges everything and marks a clean
//! shutdown).
//!
//! Every setting can come from a TOML file (`--config`); a flag given on the command line
//! wins over the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dinomo_hw::fabric::{DpmSpec, FabricKind, ServeSpec, SpecError, VerbsDevice};
use serde::{Deserialize, Serialize};

use dinomo_shared::manager_proto::{MgrAuth, MgrClient};

mod plan;
pub use plan::plan;

/// Settings of a local cluster (the TOML file holds any subset of them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpConfig {
    /// KVS nodes.
    pub kns: u16,
    /// Folder for the region file (tmpfs is fastest).
    pub dir: PathBuf,
    /// Region size, e.g. "1G".
    pub region_size: String,
    /// Log block size, e.g. "8M" (default: chosen from the region size).
    pub block_size: Option<String>,
    /// Format a new region even if one exists (otherwise an existing region is recovered).
    pub fresh: bool,
    /// Address every process binds to.
    pub host: String,
    pub manager_port: u16,
    /// KN `i` listens on `base_port + i`.
    pub base_port: u16,
    /// Shards per KN.
    pub threads: u16,
    /// Threads accepting client connections per KN (connections are served by the shard
    /// threads).
    pub io_threads: usize,
    /// Cache per KN, e.g. "64M".
    pub cache: String,
    pub lease_ms: u64,
    pub dpm_workers: usize,
    /// Run the elasticity policy in the manager (with its default thresholds).
    pub policy: bool,
    /// Fabric the KNs and the manager reach the DPM through: "shm" or "verbs".
    pub fabric: String,
    /// Verbs: address of the DPM's connection exchange.
    pub dpm_listen: String,
    /// Verbs: RDMA device (default: the first one found).
    pub device: Option<String>,
    /// Verbs: GID index (default: chosen by the device's port: RoCE v2 of the interface's
    /// IPv4 address, or 0 on InfiniBand).
    pub gid_index: Option<u8>,
    /// Authentication on every surface: a cluster secret for the control traffic and a
    /// password for Redis clients, both kept in files of mode 0600 in `dir`. `false` is
    /// allowed only when every address is loopback (local experiments).
    pub auth: bool,
    /// Password of the default Redis user (default: the one in `dir/requirepass`, generated
    /// at the first start).
    pub requirepass: Option<String>,
    /// Where each role runs when the cluster spans hosts (a `[hosts]` table): `dinomo up
    /// --plan` then prints the commands for each host instead of starting anything here.
    pub hosts: Option<Hosts>,
}

/// The hosts of a cluster spread over machines: IP addresses of the interfaces each role
/// binds to (the DPM's is the one of its RDMA port; it may be a DPU's Arm cores).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hosts {
    /// The memory node: its verbs connection exchange listens at `dpm:<port of dpm_listen>`.
    pub dpm: String,
    /// The manager: it listens at `manager:<manager_port>`.
    pub manager: String,
    /// KN `i` runs on `kns[i % kns.len()]` and listens at `<base_port + i>`.
    pub kns: Vec<String>,
    /// The `dinomo` program on every host (default: `dinomo`, found on `PATH`).
    pub exe: Option<String>,
}

impl Hosts {
    /// Every host is an IP address, there is a KN host, and a cluster on more than one host
    /// reaches the DPM over verbs (shm reaches a region on its own host only).
    fn validate(&self, fabric: FabricKind) -> Result<(), UpError> {
        let bad = |m: String| Err(UpError::Invalid(m));
        if self.kns.is_empty() {
            return bad("[hosts] kns is empty: name at least one KN host".into());
        }
        let all: Vec<&String> = [&self.dpm, &self.manager]
            .into_iter()
            .chain(&self.kns)
            .collect();
        if let Some(a) = all.iter().find(|a| a.parse::<std::net::IpAddr>().is_err()) {
            return bad(format!(
                "[hosts] {a:?} is not an IP address: name the address of the interface the \
                 role binds to (e.g. 10.0.0.5)"
            ));
        }
        if fabric == FabricKind::Shm && all.iter().any(|a| *a != all[0]) {
            return bad(
                "[hosts] names more than one host but fabric = \"shm\", which reaches the \
                 region on the DPM's own host only: set fabric = \"verbs\""
                    .into(),
            );
        }
        Ok(())
    }

    /// The host of KN `i`.
    pub fn kn(&self, i: u16) -> &str {
        self.kns
            .get(usize::from(i) % self.kns.len().max(1))
            .map_or("127.0.0.1", String::as_str)
    }
}

impl Default for UpConfig {
    fn default() -> Self {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        Self {
            kns: 3,
            dir: base.join("dinomo-cluster"),
            region_size: "1G".into(),
            block_size: None,
            fresh: false,
            host: "127.0.0.1".into(),
            manager_port: 7000,
            base_port: 7001,
            threads: 2,
            io_threads: 1,
            cache: "64M".into(),
            lease_ms: 3000,
            dpm_workers: 1,
            policy: false,
            fabric: "shm".into(),
            dpm_listen: format!(
                "127.0.0.1:{}",
                dinomo_hw::fabric::connect::DEFAULT_VERBS_PORT
            ),
            device: None,
            gid_index: None,
            auth: true,
            requirepass: None,
            hosts: None,
        }
    }
}

impl UpConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, UpError> {
        let text = std::fs::read_to_string(path).map_err(|e| UpError::Config {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| UpError::Config {
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    /// Checks the settings before anything is started here: [`Self::validate_settings`],
    /// and that this build can serve the fabric they name.
    pub fn validate(&self) -> Result<(), UpError> {
        self.validate_settings()?;
        if self.serve_spec()?.kind() == FabricKind::Verbs && !cfg!(feature = "rdma") {
            return Err(UpError::Invalid(
                dinomo_hw::fabric::connect::NO_RDMA_SUPPORT.into(),
            ));
        }
        Ok(())
    }

    /// Checks the settings themselves (whichever build runs them: a plan for other hosts
    /// may be printed by a build without RDMA support).
    pub fn validate_settings(&self) -> Result<(), UpError> {
        let bad = |m: String| Err(UpError::Invalid(m));
        if self.kns == 0 || self.kns > 64 {
            return bad(format!("kns = {} is outside 1..=64", self.kns));
        }
        if self.threads == 0 || self.threads > 64 {
            return bad(format!("threads = {} is outside 1..=64", self.threads));
        }
        if self.lease_ms < 100 {
            return bad(format!("lease_ms = {} is below 100", self.lease_ms));
        }
        if self.base_port as u32 + self.kns as u32 > 65536 {
            return bad("base_port + kns exceeds the port range".into());
        }
        for s in [
            Some(&self.region_size),
            Some(&self.cache),
            self.block_size.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            crate::size::parse_size(s).map_err(|e| UpError::Invalid(e.to_string()))?;
        }
        if let Some(p) = &self.requirepass {
            if p.is_empty() || p.chars().any(|c| c.is_control()) {
                return bad("requirepass must be non-empty and printable".into());
            }
            if !self.auth {
                return bad("requirepass with auth = false (--no-auth): choose one".into());
            }
        }
        if let Some(h) = &self.hosts {
            h.validate(self.serve_spec()?.kind())?;
        }
        if !self.auth {
            let mut open = Vec::new();
            if !dinomo_shared::auth::is_loopback(&self.host) {
                open.push(format!("host = {:?}", self.host));
            }
            if self.serve_spec()?.kind() == FabricKind::Verbs
                && !dinomo_shared::auth::is_loopback(&self.dpm_listen)
            {
                open.push(format!("dpm_listen = {:?}", self.dpm_listen));
            }
            if let Some(h) = &self.hosts {
                let all = [&h.dpm, &h.manager].into_iter().chain(&h.kns);
                for a in all.filter(|a| !dinomo_shared::auth::is_loopback(a)) {
                    open.push(format!("host {a:?} of [hosts]"));
                }
            }
            if !open.is_empty() {
                return bad(format!(
                    "auth = false (--no-auth) is allowed only when every address is loopback, \
                     and {} is not: anyone who reaches it could read and overwrite every \
                     key; keep authentication on (the default)",
                    open.join(" and ")
                ));
            }
        }
        Ok(())
    }

    /// The cluster secret's file (with `auth`).
    pub fn secret_path(&self) -> PathBuf {
        self.dir.join("secret")
    }

    /// The file with the default Redis user's password (with `auth`).
    pub fn requirepass_path(&self) -> PathBuf {
        self.dir.join("requirepass")
    }

    /// The words that hand the cluster secret to a process (none without `auth`).
    fn secret_words(&self) -> Vec<String> {
        if self.auth {
            vec![
                "--secret-file".into(),
                self.secret_path().to_string_lossy().into_owned(),
            ]
        } else {
            Vec::new()
        }
    }

    /// The password a Redis client of this cluster authenticates with (`None` without
    /// `auth`, or before the first start made one).
    pub fn password(&self) -> Result<Option<String>, UpError> {
        if !self.auth {
            return Ok(None);
        }
        if let Some(p) = &self.requirepass {
            return Ok(Some(p.clone()));
        }
        use dinomo_shared::auth::{read_private_file, AuthError};
        match read_private_file(&self.requirepass_path()) {
            Ok(p) => Ok(Some(p.trim_end_matches(['\r', '\n']).to_string())),
            Err(AuthError::Io { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(UpError::Failed(e.to_string())),
        }
    }

    /// A `ctl` session with the cluster's manager (with the cluster secret under `auth`).
    pub fn manager_client(&self, timeout: Duration) -> std::io::Result<MgrClient> {
        let secret = if self.auth {
            Some(
                dinomo_shared::auth::ClusterSecret::load(&self.secret_path())
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            )
        } else {
            None
        };
        MgrClient::connect_with(&self.manager_addr(), timeout, &MgrAuth::ctl(secret))
    }

    /// How a Redis client of this cluster authenticates (`None` without `auth`).
    pub fn credentials(&self) -> Result<Option<crate::redis_client::Credentials>, UpError> {
        Ok(self
            .password()?
            .map(|password| crate::redis_client::Credentials {
                user: None,
                password,
            }))
    }

    /// Makes the secret and the password files (with `auth`): the secret is kept once
    /// made (members that hold it stay members), the password is the configured one or the
    /// one made at the first start.
    pub fn prepare_auth(&self) -> Result<(), UpError> {
        if !self.auth {
            return Ok(());
        }
        dinomo_shared::auth::ClusterSecret::load_or_create(&self.secret_path())
            .map_err(|e| UpError::Failed(e.to_string()))?;
        let path = self.requirepass_path();
        let password = match (&self.requirepass, self.password()?) {
            (Some(p), _) => p.clone(),
            (None, Some(existing)) => existing,
            (None, None) => {
                let secret = dinomo_shared::auth::ClusterSecret::generate()
                    .map_err(|e| UpError::Failed(e.to_string()))?;
                // 128 bits of the random bytes, as text a shell and redis-cli take as is.
                let hex = secret.to_hex();
                String::from_utf8_lossy(&hex[..32]).into_owned()
            }
        };
        write_private(&path, &password).map_err(|source| UpError::Io {
            what: format!("cannot write {}", path.display()),
            source,
        })
    }

    /// How the DPM serves the region.
    pub fn serve_spec(&self) -> Result<ServeSpec, UpError> {
        let bad = |e: SpecError| UpError::Invalid(e.0);
        let kind: FabricKind = self.fabric.parse().map_err(bad)?;
        let listen: SocketAddr = self.dpm_listen.parse().map_err(|_| {
            UpError::Invalid(format!(
                "dpm_listen = {:?} is not HOST:PORT",
                self.dpm_listen
            ))
        })?;
        let listen = match &self.hosts {
            Some(h) => {
                let ip = h.dpm.parse().map_err(|_| {
                    UpError::Invalid(format!(
                        "hosts.dpm = {:?} is not an IP address (the DPM binds to it)",
                        h.dpm
                    ))
                })?;
                SocketAddr::new(ip, listen.port())
            }
            None => listen,
        };
        let device = VerbsDevice {
            name: self.device.clone(),
            gid_index: self.gid_index,
        };
        ServeSpec::parse(kind, listen, device).map_err(bad)
    }

    /// How the manager and the KNs reach the DPM.
    pub fn dpm_spec(&self) -> Result<DpmSpec, UpError> {
        Ok(self.serve_spec()?.local_client(self.region_path()))
    }

    /// The words that name the DPM to the manager and the KNs.
    fn dpm_words(&self) -> Result<Vec<String>, UpError> {
        let spec = self.dpm_spec()?;
        spec.to_args()
            .ok_or_else(|| UpError::Invalid(format!("the DPM {spec} cannot be named to a process")))
    }

    pub fn region_path(&self) -> PathBuf {
        self.dir.join("region")
    }
    pub fn manager_addr(&self) -> String {
        let host = self.hosts.as_ref().map_or(&*self.host, |h| &*h.manager);
        format!("{host}:{}", self.manager_port)
    }
    pub fn kn_addr(&self, i: u16) -> String {
        let host = self.hosts.as_ref().map_or(&*self.host, |h| h.kn(i));
        format!("{host}:{}", self.base_port + i)
    }

    fn region_arg(&self) -> String {
        self.region_path().to_string_lossy().into_owned()
    }

    /// Arguments of `dinomo dpm format` for a new region (replacing any old one).
    pub fn format_args(&self) -> Vec<String> {
        let mut args = vec![
            "dpm".into(),
            "format".into(),
            "--path".into(),
            self.region_arg(),
            "--size".into(),
            self.region_size.clone(),
            "--force".into(),
        ];
        if let Some(b) = &self.block_size {
            args.extend(["--block-size".into(), b.clone()]);
        }
        args
    }

    /// Arguments of `dinomo dpm serve`.
    pub fn dpm_args(&self) -> Result<Vec<String>, UpError> {
        let mut args: Vec<String> = vec![
            "dpm".into(),
            "serve".into(),
            "--path".into(),
            self.region_arg(),
            "--workers".into(),
            self.dpm_workers.to_string(),
            "--no-pin".into(),
        ];
        args.extend(self.serve_spec()?.to_args());
        args.extend(self.secret_words());
        Ok(args)
    }

    /// Arguments of `dinomo manager` (it starts KNs with this same program).
    pub fn manager_args(&self) -> Result<Vec<String>, UpError> {
        let exe = std::env::current_exe().map_err(|source| UpError::Io {
            what: "cannot find this program".into(),
            source,
        })?;
        let mut args: Vec<String> = vec!["manager".into()];
        args.extend(self.dpm_words()?);
        args.extend([
            "--listen".into(),
            self.manager_addr(),
            "--lease-ms".into(),
            self.lease_ms.to_string(),
            "--kn-exe".into(),
            exe.to_string_lossy().into_owned(),
            "--kn-host".into(),
            self.host.clone(),
            "--kn-threads".into(),
            self.threads.to_string(),
            "--kn-io-threads".into(),
            self.io_threads.to_string(),
            "--kn-cache".into(),
            self.cache.clone(),
        ]);
        if self.policy {
            args.push("--policy".into());
        }
        args.extend(self.secret_words());
        if self.auth {
            args.extend([
                "--kn-requirepass-file".into(),
                self.requirepass_path().to_string_lossy().into_owned(),
            ]);
        }
        Ok(args)
    }

    /// Arguments of `dinomo kn` for KN `i` (listening on `kn_addr(i)`).
    pub fn kn_args(&self, i: u16) -> Result<Vec<String>, UpError> {
        let mut args: Vec<String> = vec!["kn".into()];
        args.extend(self.dpm_words()?);
        args.extend([
            "--listen".into(),
            self.kn_addr(i),
            "--manager".into(),
            self.manager_addr(),
            "--threads".into(),
            self.threads.to_string(),
            "--io-threads".into(),
            self.io_threads.to_string(),
            "--cache".into(),
            self.cache.clone(),
        ]);
        args.extend(self.secret_words());
        if self.auth {
            args.extend([
                "--requirepass-file".into(),
                self.requirepass_path().to_string_lossy().into_owned(),
            ]);
        }
        Ok(args)
    }
}

/// Replaces `path` with `line`, never readable by others: written to a new 0600 file, then
/// renamed over the old one.
fn write_private(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{line}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A first port on loopback such that it and the `n - 1` after it are free (checked by
/// binding them): the manager's and the KNs' ports of a cluster started for a test or a
/// torture run.
pub fn free_port_block(n: u16) -> std::io::Result<u16> {
    use std::net::TcpListener;
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if u32::from(first) + u32::from(n) > 65535 {
            continue;
        }
        let all: Result<Vec<_>, _> = (first..first + n)
            .map(|p| TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if all.is_ok() {
            return Ok(first);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("found no {n} consecutive free ports"),
    ))
}

/// Why the cluster could not run.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("cannot read {path}: {why}")]
    Config { path: PathBuf, why: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

/// A child process, killed if still running when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
}

impl Proc {
    fn spawn(name: &str, args: &[String]) -> Result<Self, UpError> {
        Self::spawn_logged(name, args, None)
    }

    /// Like `spawn`; with `log`, the child's stdout and stderr go to that file (appended)
    /// and its log level defaults to `warn`.
    pub(crate) fn spawn_logged(
        name: &str,
        args: &[String],
        log: Option<&Path>,
    ) -> Result<Self, UpError> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().map_err(|source| UpError::Io {
            what: "cannot find this program".into(),
            source,
        })?;
        let mut cmd = Command::new(exe);
        cmd.args(args).stdin(Stdio::null());
        if let Some(path) = log {
            let open = || {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| UpError::Io {
                        what: format!("cannot open {}", path.display()),
                        source,
                    })
            };
            cmd.stdout(open()?).stderr(open()?);
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
        }
        let child = cmd
            // Its own process group: Ctrl-C reaches only `up`, which stops the cluster in order.
            .process_group(0)
            .spawn()
            .map_err(|source| UpError::Io {
                what: format!("cannot start {name}"),
                source,
            })?;
        Ok(Self {
            name: name.into(),
            child,
        })
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub(crate) fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if let Some(s) = self.exited() {
            return Some(s);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `dinomo dpm format`; its output is shown on success, and its error becomes this
/// one's cause (one error line, not the child's and then ours).
fn format_region(region: &str, args: &[String]) -> Result<(), UpError> {
    let exe = std::env::current_exe().map_err(|source| UpError::Io {
        what: "cannot find this program".into(),
        source,
    })?;
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| UpError::Io {
            what: "cannot start dpm format".into(),
            source,
        })?;
    if out.status.success() {
        print!("{}", String::from_utf8_lossy(&out.stdout));
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr);
    let why = why.trim().trim_start_matches("error:").trim();
    Err(UpError::Failed(if why.is_empty() {
        format!("cannot format {region} ({})", out.status)
    } else {
        format!("cannot format {region}: {why}")
    }))
}

/// A process `up` keeps running: restarted when it exits, after a pause that doubles with
/// every exit in a row (from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`]); a run of
/// [`STABLE_RUN`] resets the pause.
#[derive(Debug)]
struct Supervised {
    name: String,
    args: Vec<String>,
    proc: Option<Proc>,
    started: Instant,
    /// Exits in a row, each after less than `STABLE_RUN`.
    exits: u32,
    restart_at: Option<Instant>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE_RUN: Duration = Duration::from_secs(60);

impl Supervised {
    fn new(proc: Proc, args: Vec<String>) -> Self {
        Self {
            name: proc.name.clone(),
            args,
            proc: Some(proc),
            started: Instant::now(),
            exits: 0,
            restart_at: None,
        }
    }

    fn backoff(&self) -> Duration {
        FIRST_BACKOFF
            .saturating_mul(1 << self.exits.min(10))
            .min(MAX_BACKOFF)
    }

    /// Notices an exit and restarts the process when its pause is over.
    fn supervise(&mut self) {
        let now = Instant::now();
        if let Some(status) = self.proc.as_mut().and_then(Proc::exited) {
            if self.started.elapsed() >= STABLE_RUN {
                self.exits = 0;
            }
            let pause = self.backoff();
            self.exits = self.exits.saturating_add(1);
            eprintln!(
                "{} exited ({status}); restarting it in {}",
                self.name,
                humantime::format_duration(pause)
            );
            self.proc = None;
            self.restart_at = Some(now + pause);
        }
        match self.restart_at {
            Some(at) if self.proc.is_none() && now >= at => {
                match Proc::spawn(&self.name, &self.args) {
                    Ok(p) => {
                        eprintln!("{} restarted (pid {})", self.name, p.child.id());
                        self.proc = Some(p);
                        self.started = now;
                        self.restart_at = None;
                    }
                    Err(e) => {
                        let pause = self.backoff();
                        self.exits = self.exits.saturating_add(1);
                        eprintln!("cannot restart {}: {e}; trying again", self.name);
                        self.restart_at = Some(now + pause);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Starts the cluster, waits for `stop`, then stops it in order. While it runs, a DPM, a
/// manager or a KN that exits is restarted (with a growing pause when it keeps exiting).
pub fn run(cfg: &UpConfig, stop: &AtomicBool) -> Result<(), UpError> {
    if cfg.hosts.is_some() {
        return Err(UpError::Invalid(
            "[hosts] places the roles on other hosts, so `up` starts nothing here: \
             `dinomo up --config FILE --plan` prints the command for each host"
                .into(),
        ));
    }
    cfg.validate()?;
    // 0700 and this user's: the default folder's name is predictable.
    dinomo_hw::region_file::ensure_private_dir(&cfg.dir)
        .map_err(|e| UpError::Failed(format!("cluster folder: {e}")))?;
    cfg.prepare_auth()?;
    let region = cfg.region_path();
    let region_s = region.to_string_lossy().into_owned();
    if cfg.fresh || !region.exists() {
        format_region(&region_s, &cfg.format_args())?;
    }
    let dpm_args = cfg.dpm_args()?;
    let manager_args = cfg.manager_args()?;
    let mut dpm = Proc::spawn("dpm", &dpm_args)?;
    let mut manager = Proc::spawn("manager", &manager_args)?;
    let mut kns = Vec::new();
    for i in 0..cfg.kns {
        kns.push((
            Proc::spawn(&format!("kn {i}"), &cfg.kn_args(i)?)?,
            cfg.kn_args(i)?,
        ));
    }
    let ready = {
        let mut core: Vec<&mut Proc> = vec![&mut dpm, &mut manager];
        core.extend(kns.iter_mut().map(|(p, _)| p));
        wait_ready(cfg, stop, &mut core)
    };
    let mut dpm = Supervised::new(dpm, dpm_args);
    let mut manager = Supervised::new(manager, manager_args);
    let mut kns: Vec<Supervised> = kns
        .into_iter()
        .map(|(p, args)| Supervised::new(p, args))
        .collect();
    match &ready {
        Ok(()) => {
            println!(
                "cluster up: {} KNs at {} (manager {}, region {region_s}); Ctrl-C stops it",
                cfg.kns,
                (0..cfg.kns)
                    .map(|i| cfg.kn_addr(i))
                    .collect::<Vec<_>>()
                    .join(", "),
                cfg.manager_addr()
            );
            if cfg.auth {
                let pass = cfg.requirepass_path();
                println!(
                    "authentication on: cluster secret in {}, Redis password in {}",
                    cfg.secret_path().display(),
                    pass.display()
                );
                println!(
                    "connect: REDISCLI_AUTH=\"$(cat {})\" redis-cli -c -h {} -p {}",
                    pass.display(),
                    cfg.host,
                    cfg.base_port
                );
            } else {
                println!("authentication off (--no-auth): every process listens on loopback only");
            }
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
                dpm.supervise();
                manager.supervise();
                for k in &mut kns {
                    k.supervise();
                }
            }
        }
        Err(e) => eprintln!("the cluster did not come up: {e}"),
    }
    eprintln!("stopping the cluster");
    // KNs first, all at once: each closes its logs and leaves.
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut kns: Vec<Proc> = kns.into_iter().filter_map(|k| k.proc).collect();
    for k in &mut kns {
        if k.exited().is_none() {
            let _ = kill(Pid::from_raw(k.child.id() as i32), Signal::SIGTERM);
        }
    }
    for k in &mut kns {
        k.stop(Duration::from_secs(20));
    }
    if let Some(m) = manager.proc.as_mut() {
        m.stop(Duration::from_secs(10));
    }
    let dpm_status = match dpm.proc.as_mut() {
        Some(d) => d.stop(Duration::from_secs(60)),
        None => None,
    };
    ready?;
    match dpm_status {
        Some(s) if s.success() => {
            eprintln!("cluster stopped cleanly");
            Ok(())
        }
        s => Err(UpError::Failed(format!(
            "the DPM did not stop cleanly: {s:?}"
        ))),
    }
}

/// Waits until the manager's map holds every KN and is settled; fails as soon as one of
/// `procs` exits (e.g. a KN whose port is taken).
fn wait_ready(cfg: &UpConfig, stop: &AtomicBool, procs: &mut [&mut Proc]) -> Result<(), UpError> {
    let t0 = Instant::now();
    let deadline = Duration::from_secs(60);
    let mut mgr: Option<MgrClient> = None;
    while t0.elapsed() < deadline && !stop.load(Ordering::Acquire) {
        for p in procs.iter_mut() {
            if let Some(s) = p.exited() {
                return Err(UpError::Failed(format!("{} exited ({s})", p.name)));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        if mgr.is_none() {
            mgr = cfg.manager_client(Duration::from_millis(100)).ok();
        }
        let Some(m) = mgr.as_mut() else { continue };
        match m.map() {
            Ok(map) if map.kns.len() == cfg.kns as usize && map.settled => {
                let credentials = cfg.credentials().ok().flatten();
                let up = (0..cfg.kns)
                    .all(|i| kn_settled(&cfg.kn_addr(i), map.epoch, credentials.as_ref()));
                if up {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(_) => mgr = None,
        }
    }
    Err(UpError::Failed(
        "not every KN joined within 60 s (see the messages above)".into(),
    ))
}

/// Whether the KN at `addr` serves map `epoch`, settled (asked with `INFO`).
pub(crate) fn kn_settled(
    addr: &str,
    epoch: u64,
    credentials: Option<&crate::redis_client::Credentials>,
) -> bool {
    use crate::redis_client::{Conn, Timeouts};
    use dinomo_shared::resp::Value;
    let timeouts = Timeouts {
        connect: Some(Duration::from_secs(1)),
        reply: Some(Duration::from_secs(2)),
    };
    match Conn::connect_as(addr, timeouts, credentials).map(|mut c| c.call(&[b"INFO", b"dinomo"])) {
        Ok(Ok(Value::Bulk(b))) => {
            let t = String::from_utf8_lossy(&b);
            t.contains(&format!("map_epoch:{epoch}\r\n")) && t.contains("map_settled:1")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c: UpConfig =
            toml::from_str("kns = 5\nbase_port = 8001\ncache = \"16M\"\n").expect("valid config");
        assert_eq!((c.kns, c.base_port, c.cache.as_str()), (5, 8001, "16M"));
        assert_eq!(c.threads, UpConfig::default().threads);
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<UpConfig>("knz = 5\n").is_err());
        let bad = UpConfig {
            kns: 0,
            ..UpConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = UpConfig {
            cache: "lots".into(),
            ..UpConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn every_process_is_told_the_same_fabric() {
        let shm = UpConfig::default();
        let region = shm.region_path().to_string_lossy().into_owned();
        let kn = shm.kn_args(0).expect("kn args");
        assert!(kn
            .windows(4)
            .any(|w| w == ["--fabric", "shm", "--dpm", region.as_str()]));
        let verbs = UpConfig {
            fabric: "verbs".into(),
            dpm_listen: "10.0.0.5:18515".into(),
            device: Some("rxe0".into()),
            gid_index: Some(1),
            ..UpConfig::default()
        };
        let dpm = verbs.dpm_args().expect("dpm args");
        assert!(dpm
            .windows(4)
            .any(|w| w == ["--fabric", "verbs", "--listen", "10.0.0.5:18515"]));
        for args in [
            verbs.manager_args().expect("manager"),
            verbs.kn_args(2).expect("kn"),
        ] {
            assert!(
                args.windows(4)
                    .any(|w| w == ["--fabric", "verbs", "--dpm", "10.0.0.5:18515"]),
                "{args:?}"
            );
            assert!(
                args.windows(2).any(|w| w == ["--device", "rxe0"]),
                "{args:?}"
            );
        }
        let bad = UpConfig {
            fabric: "tcp".into(),
            ..UpConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
