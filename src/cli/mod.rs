//! The `dinomo` command line: one module per subcommand, each parsing its arguments and
//! calling into the crates that do the work.

mod bench;
mod ctl;
mod dpm;
mod fabric;
mod fabric_bench;
mod kn;
mod manager;
mod secret;
mod soak;
mod torture;
mod up;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dinomo",
    version,
    about = "DINOMO: a key-value store for disaggregated persistent memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The memory node (DPM): format, serve and inspect a region.
    #[command(subcommand)]
    Dpm(dpm::DpmCommand),
    /// Latency and throughput of one-sided verbs over a fabric (like perftest's
    /// ib_read_lat / ib_write_bw).
    FabricBench(dinomo::fabric_bench::BenchArgs),
    /// Load, then run a YCSB-style workload against an in-process cluster and report
    /// throughput, latency, round trips, verbs and bytes per operation.
    Bench(Box<dinomo::bench::cli::BenchArgs>),
    /// Update-only load of many times the region's log capacity through an in-process
    /// cluster (merge workers with compaction, KN shards over the shm fabric); fails on
    /// RegionFull, a lost value, or a footprint that keeps growing.
    Soak(soak::SoakArgs),
    /// A KVS node: attaches to the DPM, joins the cluster through the manager, and serves
    /// clients over the Redis protocol.
    Kn(kn::KnArgs),
    /// The cluster manager: KN registration, leases, the durable slot map, failover.
    Manager(Box<manager::ManagerArgs>),
    /// A whole local cluster (DPM, manager, N KNs as child processes); Ctrl-C stops it.
    Up(up::UpArgs),
    /// Operate a running cluster through its manager: status, add-kn, remove-kn, rebalance.
    Ctl(ctl::CtlArgs),
    /// Crash torture: a process cluster under a mixed load whose processes are SIGKILLed and
    /// restarted round after round; every round's history is checked (exit 1 on a violation).
    Torture(torture::TortureArgs),
}

/// Exit status of a process ended by a panicking thread (Rust's own panic status).
pub(crate) const PANIC_EXIT: i32 = 101;

/// Makes a panic in any thread end the whole process: a DPM whose merge or control thread
/// died, or a KN whose shard died, would otherwise stay up but deaf while still holding
/// its region lock or lease, and no supervisor would restart it. The default hook prints
/// the panic (and a backtrace with RUST_BACKTRACE=1) first; then one line names the thread
/// and the process exits with status 101 without unwinding the other threads.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let at = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        eprintln!(
            "dinomo (pid {}): thread '{name}' panicked{at}; exiting with status {PANIC_EXIT} \
             so that the process is restarted rather than left running without it",
            std::process::id()
        );
        std::process::exit(PANIC_EXIT);
    }));
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    install_panic_hook();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.command {
        Command::Bench(a) => bench::run(&a),
        Command::Soak(a) => soak::run(&a),
        Command::Dpm(c) => dpm::run(c),
        Command::FabricBench(a) => fabric_bench::run(a),
        Command::Kn(a) => kn::run(a),
        Command::Manager(a) => manager::run(*a),
        Command::Up(a) => up::run(a),
        Command::Ctl(a) => ctl::run(a),
        Command::Torture(a) => torture::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line. Many errors already print their cause in their own
/// message (`cannot open region X: {source}`); a cause the line already ends with is not
/// repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.ends_with(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// Bad input: reported with exit code 2, like argument errors.
#[derive(Debug)]
pub(crate) struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A count that must be at least 1 (0 threads or 0 virtual nodes cannot work).
pub(crate) fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
{
    match s.trim().parse::<T>() {
        Ok(v) if v >= T::from(1) => Ok(v),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// Set by SIGINT and SIGTERM: the long-running commands stop cleanly.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

/// Makes SIGINT and SIGTERM set [`STOP`].
pub(crate) fn install_stop_handler() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("cannot install signal handler")?;
    }
    Ok(())
}

/// Prints a ready line (another process may wait for it) and flushes it at once.
pub(crate) fn ready(line: &str) {
    use std::io::Write;
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// The `--json` file of a run: checked writable before the run (which may take minutes), and
/// left as it was if the run fails (an existing file is not truncated; a new one is removed).
pub(crate) struct JsonOut<'a> {
    path: Option<&'a Path>,
    created: bool,
}

impl<'a> JsonOut<'a> {
    pub(crate) fn check(path: Option<&'a Path>) -> anyhow::Result<Self> {
        let mut created = false;
        if let Some(p) = path {
            created = !p.exists();
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .with_context(|| format!("cannot create {}", p.display()))?;
        }
        Ok(Self { path, created })
    }

    pub(crate) fn on_error<T>(&self, r: anyhow::Result<T>) -> anyhow::Result<T> {
        if let (Err(_), Some(p), true) = (&r, self.path, self.created) {
            let _ = std::fs::remove_file(p);
        }
        r
    }

    /// Writes `value` as pretty JSON to the file, if one was given.
    pub(crate) fn write<T: serde::Serialize>(&self, value: &T) -> anyhow::Result<()> {
        if let Some(p) = self.path {
            let mut text = serde_json::to_string_pretty(value)?;
            text.push('\n');
            std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?;
        }
        Ok(())
    }
}
