//! The `dinomo` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dinomo::size::{human, parse_size};
use dinomo_hw::region_file::RegionFile;
use dinomo_shared::geometry::{FormatParams, Geometry};

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
    Dpm(DpmCommand),
    /// Latency and throughput of one-sided verbs over a fabric (like perftest's
    /// ib_read_lat / ib_write_bw).
    FabricBench(dinomo::fabric_bench::BenchArgs),
    /// Load, then run a YCSB-style workload against an in-process cluster and report
    /// throughput, latency, round trips, verbs and bytes per operation.
    Bench(Box<dinomo::bench::cli::BenchArgs>),
    /// Update-only load of many times the region's log capacity through an in-process
    /// cluster (merge workers with compaction, KN shards over the shm fabric); fails on
    /// RegionFull, a lost value, or a footprint that keeps growing.
    Soak(SoakArgs),
    /// A KVS node: attaches to the DPM, joins the cluster through the manager, and serves
    /// clients over the Redis protocol.
    Kn(KnArgs),
    /// The cluster manager: KN registration, leases, the durable slot map, failover.
    Manager(ManagerArgs),
    /// A whole local cluster (DPM, manager, N KNs as child processes); Ctrl-C stops it.
    Up(UpArgs),
    /// Operate a running cluster through its manager: status, add-kn, remove-kn, rebalance.
    Ctl(CtlArgs),
    /// Crash torture: a process cluster under a mixed load whose processes are SIGKILLed and
    /// restarted round after round; every round's history is checked (exit 1 on a violation).
    Torture(TortureArgs),
}

#[derive(Args, Debug)]
struct TortureArgs {
    /// Rounds (one kill each).
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Seed of the kill schedule and the load.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// KVS nodes.
    #[arg(long, default_value_t = 2)]
    kns: u16,
    /// Keys of the load.
    #[arg(long, default_value_t = 256)]
    keys: u64,
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Load time of a round in milliseconds (the kill falls inside it).
    #[arg(long, default_value_t = 1500)]
    round_ms: u64,
    /// No round starts after this long, e.g. 9m, 90s, 1h.
    #[arg(long, default_value = "9m", value_parser = dinomo::torture::parse_duration)]
    time_limit: std::time::Duration,
    /// Lease length in milliseconds.
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// Working folder (default: a new one in /dev/shm or the temp dir, removed after a
    /// passing run).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Roles to kill, e.g. dpm,manager,kn.
    #[arg(long, default_value = "dpm,manager,kn", value_parser = dinomo::torture::Role::parse_list)]
    roles: RoleList,
}

type RoleList = Vec<dinomo::torture::Role>;

#[derive(Args, Debug)]
struct KnArgs {
    /// The DPM: for the shm fabric, its region file (the control file is derived from it).
    #[arg(long)]
    dpm: PathBuf,
    /// Client address (Redis protocol); port 0 picks a free port.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Manager address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    manager: String,
    /// Shards (threads, each with its own fabric connection, log and cache).
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<u16>)]
    threads: u16,
    /// Threads serving client connections.
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<usize>)]
    io_threads: usize,
    /// Cache size of the whole KN, e.g. 64M (0: no cache, every read goes to the DPM).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    cache: u64,
}

#[derive(Args, Debug)]
struct ManagerArgs {
    /// The DPM: for the shm fabric, its region file.
    #[arg(long)]
    dpm: PathBuf,
    /// Address KNs register at (line-delimited JSON; see the `manager` module docs).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: std::net::SocketAddr,
    /// Lease length in milliseconds; a KN that has not renewed it for this long is fenced.
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// Virtual nodes per KN on the hash ring.
    #[arg(long, default_value_t = host_kn::ownership::DEFAULT_VNODES, value_parser = at_least_one::<u32>)]
    vnodes: u32,
    /// The `dinomo` executable to start new KNs with (`dinomo ctl add-kn`, the policy);
    /// without it the manager cannot start KNs. `dinomo up` passes it.
    #[arg(long)]
    kn_exe: Option<PathBuf>,
    /// Host KNs started by the manager listen on (any free port).
    #[arg(long, default_value = "127.0.0.1")]
    kn_host: String,
    /// Shards of KNs started by the manager.
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<u16>)]
    kn_threads: u16,
    /// Connection threads of KNs started by the manager.
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<usize>)]
    kn_io_threads: usize,
    /// Cache of KNs started by the manager, e.g. 64M.
    #[arg(long, default_value = "64M")]
    kn_cache: String,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The elasticity policy in the manager (off unless --policy); unset thresholds take the
/// policy's defaults.
#[derive(Args, Debug)]
struct PolicyArgs {
    /// Run the elasticity policy: add a KN when p99 misses the objective and a KN is busy,
    /// remove the least occupied KN when all are idle (needs --kn-exe to add).
    #[arg(long)]
    policy: bool,
    /// Decision period in milliseconds [default: 2000].
    #[arg(long, requires = "policy")]
    policy_period_ms: Option<u64>,
    /// Latency objective (p99) in milliseconds [default: 16].
    #[arg(long, requires = "policy")]
    slo_p99_ms: Option<f64>,
    /// Occupancy (0..1) above which a KN counts as busy [default: 0.20].
    #[arg(long, requires = "policy")]
    busy_add: Option<f64>,
    /// Occupancy (0..1) below which a KN counts as idle [default: 0.15].
    #[arg(long, requires = "policy")]
    idle_remove: Option<f64>,
    /// Hot-key threshold in standard deviations above the mean [default: 3].
    #[arg(long, requires = "policy")]
    hot_sigmas: Option<f64>,
    /// Cold-key threshold in standard deviations below the mean [default: 1].
    #[arg(long, requires = "policy")]
    cold_sigmas: Option<f64>,
    /// Never remove below this many KNs [default: 1].
    #[arg(long, requires = "policy")]
    min_kns: Option<usize>,
    /// Never add beyond this many KNs [default: 16].
    #[arg(long, requires = "policy")]
    max_kns: Option<usize>,
    /// Quiet time after an add or remove, in milliseconds [default: one period].
    #[arg(long, requires = "policy")]
    cooldown_ms: Option<u64>,
}

impl PolicyArgs {
    /// The policy's configuration, or `None` when --policy is off.
    fn config(&self) -> Result<Option<dinomo::policy::PolicyConfig>, Usage> {
        use std::time::Duration;
        if !self.policy {
            return Ok(None);
        }
        let mut c = dinomo::policy::PolicyConfig::default();
        if let Some(v) = self.policy_period_ms {
            if v == 0 {
                return Err(Usage("--policy-period-ms must be above 0".into()));
            }
            c.period = Duration::from_millis(v);
            c.cooldown = c.period;
        }
        if let Some(v) = self.slo_p99_ms {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Usage(format!("--slo-p99-ms {v} is not a duration")));
            }
            c.slo_p99 = Duration::from_secs_f64(v / 1e3);
        }
        for (name, v, dst) in [
            ("--busy-add", self.busy_add, &mut c.busy_add),
            ("--idle-remove", self.idle_remove, &mut c.idle_remove),
        ] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    return Err(Usage(format!("{name} {v} is outside 0..=1")));
                }
                *dst = v;
            }
        }
        for (name, v, dst) in [
            ("--hot-sigmas", self.hot_sigmas, &mut c.hot_sigmas),
            ("--cold-sigmas", self.cold_sigmas, &mut c.cold_sigmas),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Usage(format!("{name} {v} must be a number >= 0")));
                }
                *dst = v;
            }
        }
        if let Some(v) = self.min_kns {
            c.min_kns = v.max(1);
        }
        if let Some(v) = self.max_kns {
            c.max_kns = v;
        }
        if c.min_kns > c.max_kns {
            return Err(Usage(format!(
                "--min-kns {} is above --max-kns {}",
                c.min_kns, c.max_kns
            )));
        }
        if let Some(v) = self.cooldown_ms {
            c.cooldown = Duration::from_millis(v);
        }
        Ok(Some(c))
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  dinomo ctl status                      KNs (slots, lease, load), map epoch, recent reconfigurations
  dinomo ctl add-kn                      the manager starts a new KN; slots move to it
  dinomo ctl remove-kn 2                 KN 2 merges its logs, leaves, its slots move
  dinomo ctl rebalance                   recompute the map over the live KNs
  dinomo ctl rebalance --slots 0-99 --to 1

Reconfigurations show: slots moved, SETTLE_MS (publish to settled: how long moving slots
were refused), RELEASE_MS (the slowest old owner's flush + merge), MERGED (log entries merged).
Exit code 0 on success, 1 when the manager is unreachable or refuses (e.g. unknown KN).")]
struct CtlArgs {
    /// Manager address.
    #[arg(long, default_value = "127.0.0.1:7000", global = true)]
    manager: String,
    /// Print the manager's reply as JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlSub,
}

#[derive(Subcommand, Debug)]
enum CtlSub {
    /// KNs, the map, and the recent reconfigurations with their measurements.
    Status,
    /// Start a new KN (the manager spawns it) and move slots to it.
    AddKn,
    /// Drain KN `ID`: it merges its logs and leaves; its slots move to the others.
    RemoveKn {
        /// KN id (see `status`).
        id: u16,
    },
    /// Recompute the map over the live KNs, or move one slot range to one KN.
    Rebalance {
        /// Slot range FIRST-LAST to move (needs --to).
        #[arg(long, value_parser = dinomo::ctl::parse_slot_range, requires = "to")]
        slots: Option<(u16, u16)>,
        /// KN to move --slots to.
        #[arg(long, requires = "slots")]
        to: Option<u16>,
    },
}

#[derive(Args, Debug)]
struct UpArgs {
    /// KVS nodes to start.
    #[arg(long)]
    kns: Option<u16>,
    /// TOML file with any of the settings below (flags win over it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder for the region file.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Region size, e.g. 1G.
    #[arg(long)]
    region_size: Option<String>,
    /// Format a new region even if one exists.
    #[arg(long)]
    fresh: bool,
    /// Manager port.
    #[arg(long)]
    manager_port: Option<u16>,
    /// KN i listens on base-port + i.
    #[arg(long)]
    base_port: Option<u16>,
    /// Shards per KN.
    #[arg(long)]
    threads: Option<u16>,
    /// Lease length in milliseconds.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Run the elasticity policy in the manager (adds and removes KNs by load).
    #[arg(long)]
    policy: bool,
}

#[derive(Subcommand, Debug)]
enum DpmCommand {
    /// Create and format a new region file.
    Format(FormatArgs),
    /// Serve a region: recover it, merge KN logs into the index, answer control messages.
    Serve(ServeArgs),
    /// Show a region's layout, space, logs and index without changing it.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct FormatArgs {
    /// Region file to create (refused if it exists, unless --force).
    #[arg(long)]
    path: PathBuf,
    /// Region size, e.g. 1G, 512M.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Log block size (power of two, 4K..1G); default 8M, smaller for small regions.
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Logs (KN shards) the region can hold at once.
    #[arg(long, default_value_t = dinomo_shared::geometry::DEFAULT_MAX_LOGS)]
    max_logs: u32,
    /// KN leases the region can hold.
    #[arg(long, default_value_t = dinomo_shared::geometry::DEFAULT_MAX_KNS)]
    max_kns: u32,
    /// Share of the region given to the index, in percent.
    #[arg(long, default_value_t = dinomo_shared::geometry::DEFAULT_INDEX_PERCENT)]
    index_percent: u32,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Region file (made with `dinomo dpm format`).
    #[arg(long)]
    path: PathBuf,
    /// Merge worker threads.
    #[arg(long, default_value_t = default_workers())]
    workers: usize,
    /// Do not pin threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// Control file KNs connect to (default: the region path with `.ctl` appended).
    #[arg(long)]
    ctl: Option<PathBuf>,
    /// Control connections accepted at once.
    #[arg(long, default_value_t = 64)]
    ctl_slots: u32,
    /// Fabric KNs reach the region through (verbs also serves the shm switchboard).
    #[arg(long, value_enum, default_value_t = dinomo::fabric_bench::FabricKind::Shm)]
    fabric: dinomo::fabric_bench::FabricKind,
    /// RDMA device for --fabric verbs (default: the first).
    #[arg(long)]
    device: Option<String>,
    /// TCP port for the verbs connection exchange.
    #[arg(long, default_value_t = dinomo::fabric_bench::DEFAULT_PORT)]
    port: u16,
    /// GID index for --fabric verbs (RoCE: the entry of the address to use).
    #[arg(long, default_value_t = 0)]
    gid_index: u8,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Region file.
    #[arg(long)]
    path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Inspect twice this far apart (e.g. 1s, 500ms) and add the compaction rate between
    /// the two samples; without it, totals only.
    #[arg(long, value_parser = dinomo::inspect::parse_interval)]
    interval: Option<std::time::Duration>,
}

#[derive(Args, Debug)]
struct SoakArgs {
    /// Region size, e.g. 32M.
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    region_size: u64,
    /// Log block size, e.g. 64K.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    block_size: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 20_000)]
    keys: u64,
    /// Bytes of entries to write, as a multiple of the region's log capacity.
    #[arg(long, default_value_t = 20.0)]
    write_factor: f64,
    /// Zipfian skew of the updates (0 < s < 1, e.g. 0.99); uniform without it.
    #[arg(long)]
    zipf: Option<f64>,
    /// Value size in bytes.
    #[arg(long, value_parser = parse_size, default_value = "256")]
    value_size: u64,
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Compaction victim threshold: live share of a block, in percent.
    #[arg(long)]
    live_pct: Option<u32>,
    /// Also write the samples and summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A count that must be at least 1 (0 threads or 0 virtual nodes cannot work).
fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
{
    match s.trim().parse::<T>() {
        Ok(v) if v >= T::from(1) => Ok(v),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .clamp(1, 3)
}

/// Bad input: reported with exit code 2, like argument errors.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(a) => bench(&a),
        Command::Soak(a) => soak(&a),
        Command::Dpm(DpmCommand::Format(a)) => format(a),
        Command::Dpm(DpmCommand::Serve(a)) => serve(a),
        Command::Dpm(DpmCommand::Inspect(a)) => {
            let mut report = dinomo::inspect::inspect(&a.path)?;
            if let Some(interval) = a.interval {
                std::thread::sleep(interval);
                let later = dinomo::inspect::inspect(&a.path)?;
                report = dinomo::inspect::with_rate(&report, later, interval);
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", dinomo::inspect::render(&report));
            }
            Ok(())
        }
        Command::FabricBench(a) => fabric_bench(a),
        Command::Kn(a) => kn(a),
        Command::Manager(a) => manager(a),
        Command::Up(a) => up(a),
        Command::Ctl(a) => ctl(a),
        Command::Torture(a) => torture(a),
    }
}

fn kn(a: KnArgs) -> anyhow::Result<()> {
    if a.threads == 0 || a.threads > 64 {
        return Err(Usage(format!("--threads {} is outside 1..=64", a.threads)).into());
    }
    install_stop_handler()?;
    let mut cfg = dinomo::kn_server::KnConfig::new(a.dpm, a.listen, a.manager);
    cfg.threads = a.threads;
    cfg.io_threads = a.io_threads;
    cfg.cache_bytes = a.cache;
    dinomo::kn_server::run(&cfg, &STOP, |id, addr| {
        use std::io::Write;
        println!("kn {id} listening on {addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}

fn manager(a: ManagerArgs) -> anyhow::Result<()> {
    if a.lease_ms < 100 {
        return Err(Usage(format!("--lease-ms {} is below 100", a.lease_ms)).into());
    }
    if a.kn_threads == 0 || a.kn_threads > 64 {
        return Err(Usage(format!("--kn-threads {} is outside 1..=64", a.kn_threads)).into());
    }
    parse_size(&a.kn_cache).map_err(|e| Usage(format!("--kn-cache: {e}")))?;
    let policy = a.policy.config()?;
    install_stop_handler()?;
    let cfg = dinomo::manager::ManagerConfig {
        region: a.dpm,
        listen: a.listen,
        lease: std::time::Duration::from_millis(a.lease_ms),
        vnodes: a.vnodes,
        connect_timeout: std::time::Duration::from_secs(30),
        spawn: a.kn_exe.map(|exe| dinomo::manager::SpawnConfig {
            exe,
            host: a.kn_host,
            threads: a.kn_threads,
            io_threads: a.kn_io_threads,
            cache: a.kn_cache,
        }),
    };
    let (m, listener) = dinomo::manager::start(cfg)?;
    if let Some(p) = policy {
        tracing::info!(config = ?p, "elasticity policy on");
        m.set_policy(Box::new(dinomo::policy::Policy::new(p)));
    }
    {
        use std::io::Write;
        println!("manager listening on {}", m.addr());
        let _ = std::io::stdout().flush();
    }
    dinomo::manager::serve(&m, listener, &STOP)?;
    m.stop_spawned(std::time::Duration::from_secs(20));
    Ok(())
}

fn ctl(a: CtlArgs) -> anyhow::Result<()> {
    use dinomo::ctl::CtlCommand;
    let cmd = match a.command {
        CtlSub::Status => CtlCommand::Status,
        CtlSub::AddKn => CtlCommand::AddKn,
        CtlSub::RemoveKn { id } => CtlCommand::RemoveKn(id),
        CtlSub::Rebalance { slots, to } => CtlCommand::Rebalance(slots.zip(to)),
    };
    let out = dinomo::ctl::run(&a.manager, &cmd, a.json)?;
    print!("{out}");
    Ok(())
}

fn up(a: UpArgs) -> anyhow::Result<()> {
    use dinomo::up::{UpConfig, UpError};
    let mut cfg = match &a.config {
        Some(p) => UpConfig::load(p).map_err(|e| Usage(e.to_string()))?,
        None => UpConfig::default(),
    };
    if let Some(v) = a.kns {
        cfg.kns = v;
    }
    if let Some(v) = a.dir {
        cfg.dir = v;
    }
    if let Some(v) = a.region_size {
        cfg.region_size = v;
    }
    cfg.fresh |= a.fresh;
    cfg.policy |= a.policy;
    if let Some(v) = a.manager_port {
        cfg.manager_port = v;
    }
    if let Some(v) = a.base_port {
        cfg.base_port = v;
    }
    if let Some(v) = a.threads {
        cfg.threads = v;
    }
    if let Some(v) = a.lease_ms {
        cfg.lease_ms = v;
    }
    install_stop_handler()?;
    match dinomo::up::run(&cfg, &STOP) {
        Err(UpError::Invalid(m)) => Err(Usage(m).into()),
        r => Ok(r?),
    }
}

fn torture(a: TortureArgs) -> anyhow::Result<()> {
    use dinomo::torture::{TortureConfig, TortureError};
    use std::io::IsTerminal;
    let cfg = TortureConfig {
        rounds: a.rounds,
        seed: a.seed,
        kns: a.kns,
        keys: a.keys,
        clients: a.clients,
        round: std::time::Duration::from_millis(a.round_ms),
        time_limit: a.time_limit,
        lease_ms: a.lease_ms,
        dir: a.dir,
        roles: a.roles,
    };
    let json = JsonOut::check(a.json.as_deref())?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(u64::from(cfg.rounds));
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rounds {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    install_stop_handler()?;
    let r = dinomo::torture::run(&cfg, &STOP, |done, line| match &bar {
        Some(b) => {
            b.set_position(u64::from(done));
            b.set_message(line.to_string());
        }
        None => eprintln!("{line}"),
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let r = match r {
        Err(TortureError::Invalid(m)) => return json.on_error(Err(Usage(m).into())),
        r => json.on_error(r.map_err(anyhow::Error::from))?,
    };
    print!("{}", dinomo::torture::render(&r));
    if let Some(p) = &a.json {
        let mut text = serde_json::to_string_pretty(&r)?;
        text.push('\n');
        std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if r.violations > 0 {
        anyhow::bail!("{} violations", r.violations);
    }
    Ok(())
}

fn fabric_bench(a: dinomo::fabric_bench::BenchArgs) -> anyhow::Result<()> {
    use dinomo::fabric_bench::BenchError;
    if a.server {
        install_stop_handler()?;
    }
    match dinomo::fabric_bench::main(&a, &STOP) {
        Ok(Some(report)) => {
            print!("{}", report.render());
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(BenchError::Usage(m)) => Err(Usage(m).into()),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

fn install_stop_handler() -> anyhow::Result<()> {
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

/// `dpm serve --fabric verbs`.
#[cfg(feature = "rdma")]
fn serve_verbs(
    cfg: &dpm_fw::runner::ServeConfig,
    path: &std::path::Path,
    device: Option<String>,
    port: u16,
    gid_index: u8,
) -> anyhow::Result<dpm_fw::runner::ServeReport> {
    let vcfg = dpm_fw::runner::VerbsServeConfig {
        device,
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], port)),
        verbs: dinomo_hw::fabric::verbs::VerbsConfig {
            gid_index,
            ..Default::default()
        },
    };
    Ok(dpm_fw::runner::serve_verbs(path, cfg, &vcfg, &STOP)?)
}

#[cfg(not(feature = "rdma"))]
fn serve_verbs(
    _: &dpm_fw::runner::ServeConfig,
    _: &std::path::Path,
    _: Option<String>,
    _: u16,
    _: u8,
) -> anyhow::Result<dpm_fw::runner::ServeReport> {
    anyhow::bail!("{}", dinomo::fabric_bench::NO_RDMA_SUPPORT)
}

fn format(a: FormatArgs) -> anyhow::Result<()> {
    let mut p = FormatParams::for_size(a.size);
    if let Some(b) = a.block_size {
        p.block_size = b;
    }
    p.max_logs = a.max_logs;
    p.max_kns = a.max_kns;
    p.index_percent = a.index_percent;
    // Validate everything before touching the file system.
    let geo = Geometry::compute(&p).map_err(|e| Usage(e.to_string()))?;
    if a.force {
        dinomo_hw::region_file::remove_unserved(&a.path)?;
    }
    let file = RegionFile::create(&a.path, a.size)?;
    let region_id = random_id();
    let formatted = dpm_fw::region::format(&file.pmem(), &p, region_id);
    if let Err(e) = formatted {
        drop(file);
        let _ = std::fs::remove_file(&a.path);
        anyhow::bail!("cannot format {}: {e}", a.path.display());
    }
    file.sync()
        .with_context(|| format!("cannot sync {}", a.path.display()))?;
    println!(
        "formatted {}: {} region, {} log blocks of {}, index {}, {} logs, id {region_id:016x}",
        a.path.display(),
        human(geo.region_size),
        geo.n_blocks,
        human(geo.block_size),
        human(geo.index_len),
        geo.max_logs
    );
    Ok(())
}

fn soak(a: &SoakArgs) -> anyhow::Result<()> {
    use dinomo::soak::{self, SoakConfig};
    use std::io::IsTerminal;
    let cfg = SoakConfig {
        region_bytes: a.region_size,
        block_size: a.block_size,
        keys: a.keys,
        write_factor: a.write_factor,
        zipf: a.zipf,
        value_bytes: usize::try_from(a.value_size).context("value size")?,
        threads: a.threads,
        live_pct: a.live_pct,
        ..SoakConfig::default()
    };
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template("soak [{bar:40}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    cfg.validate().map_err(|e| Usage(e.to_string()))?;
    let mut header = false;
    let report = soak::run(&cfg, |s| {
        if !std::mem::replace(&mut header, true) {
            bar.suspend(|| {
                println!(
                    "{:>8} {:>10} {:>7}  blocks / live share / compaction (entries, bytes, blocks freed, compare failures)",
                    "time", "written", "x cap"
                )
            });
        }
        bar.set_position((s.capacity_multiple / cfg.write_factor * 1000.0).min(1000.0) as u64);
        bar.set_message(format!(
            "{:.1}x  used {}",
            s.capacity_multiple, s.blocks_used
        ));
        bar.suspend(|| println!("{}", soak::render_sample(s)));
    });
    bar.finish_and_clear();
    let report = report?;
    println!(
        "{} blocks ({} log capacity), low watermark {}; peak used: warm-up {}, then {} (first half {}, second half {}); {} puts in {:.1}s",
        report.n_blocks,
        human(report.log_capacity),
        report.low_watermark,
        report.peak_used_warmup,
        report.peak_used_after,
        report.peak_used_first_half,
        report.peak_used_second_half,
        report.puts,
        report.elapsed_secs
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "settled (merged, compacted): {} blocks used, bound {}",
        report.settled_used, report.settled_bound
    );
    if report.settled_used > report.settled_bound {
        anyhow::bail!(
            "{} blocks still used after compacting everything, more than the bound {}",
            report.settled_used,
            report.settled_bound
        );
    }
    if report.still_growing() {
        anyhow::bail!(
            "the footprint kept growing: {} blocks in the first half after the warm-up, {} in the second",
            report.peak_used_first_half,
            report.peak_used_second_half
        );
    }
    Ok(())
}

fn bench(a: &dinomo::bench::cli::BenchArgs) -> anyhow::Result<()> {
    if a.sweep {
        let s = a.to_sweep().map_err(Usage)?;
        dinomo::bench::sweep::sweep(&s)?;
        return Ok(());
    }
    if a.scenario.is_some() {
        let e = a.to_elastic().map_err(Usage)?;
        let json = JsonOut::check(a.json.as_deref())?;
        let r = json.on_error(dinomo::bench::elastic::run(&e))?;
        print!("{}", dinomo::bench::elastic::render(&r));
        println!(
            "wrote {}",
            ["elastic.csv", "elastic.svg", "elastic.png"]
                .map(|f| e.out.join(f).display().to_string())
                .join(", ")
        );
        if let Some(p) = &a.json {
            let mut text = serde_json::to_string_pretty(&r)?;
            text.push('\n');
            std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?;
        }
        return Ok(());
    }
    let cfg = a.to_config().map_err(Usage)?;
    let json = JsonOut::check(a.json.as_deref())?;
    if let Some(t) = &a.target {
        let targets: Vec<String> = t.split(',').map(|s| s.trim().to_string()).collect();
        let r = json.on_error(dinomo::bench::target::run(&cfg, &targets))?;
        print!("{}", dinomo::bench::target::render(&r));
        if let Some(p) = &a.json {
            let mut text = serde_json::to_string_pretty(&r)?;
            text.push('\n');
            std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?;
        }
        return Ok(());
    }
    let r = json.on_error(dinomo::bench::run(&cfg))?;
    print!("{}", dinomo::bench::render(&r));
    if let Some(p) = &a.json {
        let mut text = serde_json::to_string_pretty(&r)?;
        text.push('\n');
        std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// The `--json` file of a run: checked writable before the run (which may take minutes), and
/// left as it was if the run fails (an existing file is not truncated; a new one is removed).
struct JsonOut<'a> {
    path: Option<&'a Path>,
    created: bool,
}

impl<'a> JsonOut<'a> {
    fn check(path: Option<&'a Path>) -> anyhow::Result<Self> {
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

    fn on_error<T>(&self, r: anyhow::Result<T>) -> anyhow::Result<T> {
        if let (Err(_), Some(p), true) = (&r, self.path, self.created) {
            let _ = std::fs::remove_file(p);
        }
        r
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.workers == 0 || a.workers > 256 {
        return Err(Usage(format!("--workers {} is outside 1..=256", a.workers)).into());
    }
    if a.ctl_slots == 0 {
        return Err(Usage("--ctl-slots must be at least 1".into()).into());
    }
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
    let cfg = dpm_fw::runner::ServeConfig {
        workers: a.workers,
        pin: !a.no_pin,
        ctl_slots: a.ctl_slots,
        ctl_path: a.ctl,
        ..Default::default()
    };
    let report = match a.fabric {
        dinomo::fabric_bench::FabricKind::Shm => dpm_fw::runner::serve(&a.path, &cfg, &STOP)?,
        dinomo::fabric_bench::FabricKind::Verbs => {
            serve_verbs(&cfg, &a.path, a.device, a.port, a.gid_index)?
        }
    };
    eprintln!(
        "dpm stopped cleanly: recovered in {:.1} ms, merged {} entries, {} control messages, up {:.1} s",
        report.recovery_time.as_secs_f64() * 1e3,
        report.entries_merged,
        report.control_messages,
        report.uptime.as_secs_f64()
    );
    Ok(())
}

/// A region id unlikely to repeat: time, pid and a stack address, hashed.
fn random_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let marker = 0u8;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&t.to_le_bytes());
    bytes.extend_from_slice(&std::process::id().to_le_bytes());
    bytes.extend_from_slice(&(&marker as *const u8 as usize).to_le_bytes());
    dinomo_shared::hash::key_hash(&bytes)
}
