//! `dinomo fabric-bench`: latency and throughput of one-sided verbs over a [`Fabric`], in
//! the manner of perftest's `ib_read_lat` / `ib_write_bw`.
//!
//! `depth` work requests are kept outstanding; each completion's latency is the time from
//! its post to the poll that returned it (with `--depth 1`, one round trip: the `_lat`
//! tools' figure), and throughput is completions over the measured run (the `_bw` tools'
//! figure, best with a deeper queue). Atomics always move 8 bytes.
//!
//! Ends:
//! - shm, default: one process runs both ends over a region in its own memory (NIC model
//!   `--nic`, default none), so the figures are the fabric's software cost.
//! - shm, `--server --path FILE`: creates a region file and its control file and serves
//!   until Ctrl-C; a client `--path FILE` in another process maps the region.
//! - verbs, `--server`: registers a region of `--region-size` and listens on `--port`;
//!   a client `--connect HOST:PORT` runs the benchmark. Without either, one process runs
//!   both ends over the device in loopback. (Do not point the benchmark at a live
//!   `dinomo dpm serve`: its WRITEs and atomics would clobber the region.)

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::connect::{parse_kind, DEFAULT_VERBS_PORT};
use dinomo_hw::fabric::nic::{NicModel, NicProfile};
use dinomo_hw::fabric::shm::ShmFabric;
use dinomo_hw::fabric::{
    default_ctl_path, Completion, CompletionStatus, ControlServer, DpmSpec, Fabric, FabricError,
    FabricKind, Verb, WorkRequest,
};
use dinomo_hw::heap::HeapRegion;
use dinomo_hw::region_file::RegionFile;
use dinomo_hw::NoPersist;
use dinomo_shared::msg::{Request, Response};

use crate::histogram::{self, Histogram};
use crate::size::parse_size;

/// Smallest and largest `--size`.
pub const MIN_SIZE: u64 = 8;
pub const MAX_SIZE: u64 = 65536;
/// Largest `--depth`.
pub const MAX_DEPTH: usize = 4096;
/// How long the benchmark waits for a completion before it gives up.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// Default TCP port of the verbs server.
pub const DEFAULT_PORT: u16 = DEFAULT_VERBS_PORT;
/// How long an idle verbs benchmark server sleeps between polls (it serves only connection
/// set-up and pings; the measured verbs are one-sided, like perftest's passive server).
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
const SERVER_IDLE: Duration = Duration::from_millis(5);

/// The verb measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchOp {
    Read,
    Write,
    Cas,
    Faa,
}

impl BenchOp {
    /// Bytes one operation moves.
    pub fn bytes(self, size: u32) -> u32 {
        match self {
            Self::Read | Self::Write => size,
            Self::Cas | Self::Faa => 8,
        }
    }
}

/// Arguments of `dinomo fabric-bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Fabric backend: shm or verbs.
    #[arg(long, default_value = "shm", value_parser = parse_kind)]
    pub fabric: FabricKind,
    /// RDMA device (verbs; default: the first).
    #[arg(long)]
    pub device: Option<String>,
    /// Operation.
    #[arg(long, value_enum, default_value_t = BenchOp::Read)]
    pub op: BenchOp,
    /// Bytes per READ/WRITE, 8..65536 (e.g. 64, 1K); atomics move 8.
    #[arg(long, default_value = "64", value_parser = parse_size)]
    pub size: u64,
    /// Work requests kept outstanding.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Distinct (local, remote) address pairs the requests cycle through (default: one per
    /// outstanding request). 1 reuses one buffer for every request, as perftest's `_bw`
    /// tools do for messages above 2 KiB.
    #[arg(long)]
    pub slots: Option<usize>,
    /// Measured operations.
    #[arg(long, default_value_t = 100_000)]
    pub iters: u64,
    /// Operations before measuring (default: a tenth of --iters, at most 10000).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run the server end (serves until Ctrl-C).
    #[arg(long)]
    pub server: bool,
    /// Verbs client: the server's HOST:PORT.
    #[arg(long)]
    pub connect: Option<String>,
    /// Verbs server: TCP port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Verbs, loopback and --server: of a run of WRITEs, every N-th asks for a completion
    /// (and the last of each post); 1 signals every WRITE, as perftest does by default.
    #[arg(long)]
    pub signal_every: Option<u32>,
    /// Verbs: GID index (default: the port's RoCE v2 entry of the interface's IPv4 address,
    /// or 0 on InfiniBand).
    #[arg(long)]
    pub gid_index: Option<u8>,
    /// shm server/client: the region file.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Server: bytes of the region.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub region_size: u64,
    /// shm: NIC latency model (none, cx3-fdr, …).
    #[arg(long, default_value = "none")]
    pub nic: String,
}

/// Why the benchmark did not run.
#[derive(Debug)]
pub enum BenchError {
    /// Bad arguments (exit code 2).
    Usage(String),
    Fabric(FabricError),
    Other(String),
}

impl std::error::Error for BenchError {}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(m) | Self::Other(m) => f.write_str(m),
            Self::Fabric(e) => write!(f, "{e}"),
        }
    }
}

impl From<FabricError> for BenchError {
    fn from(e: FabricError) -> Self {
        Self::Fabric(e)
    }
}

/// What one run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchParams {
    pub op: BenchOp,
    pub size: u32,
    pub depth: usize,
    /// Distinct address pairs, 1..=depth.
    pub slots: usize,
    pub iters: u64,
    pub warmup: u64,
}

impl BenchParams {
    /// Checks the arguments; the error is a usage message.
    pub fn from_args(a: &BenchArgs) -> Result<Self, BenchError> {
        if !(MIN_SIZE..=MAX_SIZE).contains(&a.size) {
            return Err(BenchError::Usage(format!(
                "--size {} is outside {MIN_SIZE}..={MAX_SIZE}",
                a.size
            )));
        }
        if a.depth == 0 || a.depth > MAX_DEPTH {
            return Err(BenchError::Usage(format!(
                "--depth {} is outside 1..={MAX_DEPTH}",
                a.depth
            )));
        }
        let slots = a.slots.unwrap_or(a.depth);
        if slots == 0 || slots > a.depth {
            return Err(BenchError::Usage(format!(
                "--slots {slots} is outside 1..=--depth ({})",
                a.depth
            )));
        }
        if a.iters == 0 {
            return Err(BenchError::Usage("--iters must be at least 1".into()));
        }
        Ok(Self {
            op: a.op,
            size: a.size as u32,
            depth: a.depth,
            slots,
            iters: a.iters,
            warmup: a.warmup.unwrap_or((a.iters / 10).min(10_000)),
        })
    }

    /// Local/remote bytes between consecutive slots (cache-line multiples).
    fn stride(&self) -> u64 {
        u64::from(self.op.bytes(self.size)).div_ceil(64) * 64
    }
}

/// Latency summary in nanoseconds: nearest-rank percentiles, to 3 significant digits.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct LatencyStats {
    pub min_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: f64,
}

impl LatencyStats {
    /// Summarizes a histogram of latencies in nanoseconds (all zero for none).
    pub fn from_histogram(h: &Histogram) -> Self {
        Self::from_ticks(h, 1.0)
    }

    /// Summarizes a histogram of latencies in clock ticks of `ns_per_tick` nanoseconds
    /// (percentiles commute with the scaling).
    pub fn from_ticks(h: &Histogram, ns_per_tick: f64) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ns = |t: u64| (t as f64 * ns_per_tick).round() as u64;
        Self {
            min_ns: ns(h.min()),
            p50_ns: ns(h.value_at_quantile(0.5)),
            p99_ns: ns(h.value_at_quantile(0.99)),
            p999_ns: ns(h.value_at_quantile(0.999)),
            max_ns: ns(h.max()),
            mean_ns: h.mean() * ns_per_tick,
        }
    }
}

/// The benchmark's clock: the CPU's time-stamp counter on x86_64 (as perftest's
/// `get_cycles`), converted to nanoseconds by the ratio of ticks to `Instant` over the
/// whole run. Two timestamps per operation must cost next to nothing against one round
/// trip; `Instant::now` costs a system call where the kernel's clocksource is not the TSC
/// (HPET or ACPI PM timer on some VMs, which under emulation takes microseconds).
#[derive(Clone, Copy, Debug)]
struct Clock {
    wall: Instant,
    ticks: u64,
}

impl Clock {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            ticks: ticks(),
        }
    }

    /// Nanoseconds per tick over the time since [`Clock::start`].
    fn ns_per_tick(&self) -> f64 {
        let ns = self.wall.elapsed().as_nanos() as f64;
        let t = ticks().wrapping_sub(self.ticks);
        if t == 0 {
            1.0
        } else {
            ns / t as f64
        }
    }
}

/// A timestamp in ticks.
#[cfg(target_arch = "x86_64")]
fn ticks() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no memory effects and every x86_64 CPU has it.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// A timestamp in ticks (nanoseconds since the first call, where there is no TSC).
#[cfg(not(target_arch = "x86_64"))]
fn ticks() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Operations per second over `elapsed`.
pub fn ops_per_sec(ops: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s == 0.0 {
        0.0
    } else {
        ops as f64 / s
    }
}

/// Payload throughput in Gb/s (10^9 bits per second), as perftest reports it.
pub fn gbps(ops: u64, bytes_per_op: u32, elapsed: Duration) -> f64 {
    ops_per_sec(ops, elapsed) * f64::from(bytes_per_op) * 8.0 / 1e9
}

/// A benchmark result.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchReport {
    #[serde(serialize_with = "kind_name")]
    pub fabric: FabricKind,
    pub op: BenchOp,
    pub bytes: u32,
    pub depth: usize,
    pub iters: u64,
    pub warmup: u64,
    pub elapsed_ns: u64,
    pub latency: LatencyStats,
    pub ops_per_sec: f64,
    pub gbps: f64,
    pub round_trips: u64,
}

fn kind_name<S: serde::Serializer>(k: &FabricKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

impl BenchReport {
    /// A perftest-like table.
    pub fn render(&self) -> String {
        let us = |ns: u64| ns as f64 / 1e3;
        format!(
            "{:<6} {:<5} {:>7} {:>6} {:>9} {:>10} {:>10} {:>10} {:>10} {:>12} {:>9}\n\
             {:<6} {:<5} {:>7} {:>6} {:>9} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>12.0} {:>9.3}\n",
            "fabric",
            "op",
            "#bytes",
            "depth",
            "#iters",
            "t_min[us]",
            "t_p50[us]",
            "t_p99[us]",
            "t_max[us]",
            "ops/s",
            "BW[Gb/s]",
            self.fabric.as_str(),
            format!("{:?}", self.op).to_lowercase(),
            self.bytes,
            self.depth,
            self.iters,
            us(self.latency.min_ns),
            us(self.latency.p50_ns),
            us(self.latency.p99_ns),
            us(self.latency.max_ns),
            self.ops_per_sec,
            self.gbps,
        )
    }
}

/// Runs the benchmark on `f` (nothing outstanding on it) and reports.
pub fn run(
    f: &mut dyn Fabric,
    fabric: FabricKind,
    p: &BenchParams,
) -> Result<BenchReport, BenchError> {
    let stride = p.stride();
    let span = stride * p.slots as u64;
    if span > f.region_len() {
        return Err(BenchError::Usage(format!(
            "{} slots × {stride} bytes do not fit the {}-byte region",
            p.slots,
            f.region_len()
        )));
    }
    let buf = f.alloc_buf(span as usize)?;
    let bytes = p.op.bytes(p.size);
    let wr = |id: u64| {
        let slot = id % p.slots as u64;
        let remote = slot * stride;
        let local = buf.slice((slot * stride) as u32, bytes);
        match p.op {
            BenchOp::Read => WorkRequest::Read { remote, local },
            BenchOp::Write => WorkRequest::Write { remote, local },
            BenchOp::Cas => WorkRequest::Cas {
                remote,
                expect: 0,
                new: 0,
            },
            BenchOp::Faa => WorkRequest::Faa { remote, add: 1 },
        }
    };
    let total = p.warmup + p.iters;
    let clock = Clock::start();
    let mut posted_at = vec![0u64; p.depth];
    let mut out = vec![
        Completion {
            wr_id: 0,
            verb: Verb::Read,
            status: CompletionStatus::Success,
            value: 0,
        };
        p.depth
    ];
    let mut wrs = Vec::with_capacity(p.depth);
    let mut samples = histogram::new();
    let (mut posted, mut completed) = (0u64, 0u64);
    let mut start = Instant::now();
    // Empty polls since the last completion, and when they had become many (the clock is
    // read only then: it may be a system call).
    let mut idle_spins = 0u32;
    let mut stalled_since: Option<Instant> = None;
    let mut rt_start = f.counters().round_trips;
    while completed < total {
        let room = (p.depth - f.outstanding()) as u64;
        let n = room.min(total - posted);
        if n > 0 {
            wrs.clear();
            wrs.extend((posted..posted + n).map(|id| (id, wr(id))));
            let t = ticks();
            for id in posted..posted + n {
                posted_at[(id % p.depth as u64) as usize] = t;
            }
            f.post(&wrs)?;
            posted += n;
        }
        let got = f.poll(&mut out)?;
        if got == 0 {
            idle_spins = idle_spins.wrapping_add(1);
            if idle_spins % 4096 == 0 {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > PROGRESS_TIMEOUT {
                    return Err(FabricError::Timeout(PROGRESS_TIMEOUT).into());
                }
            }
            std::hint::spin_loop();
            continue;
        }
        let t = ticks();
        idle_spins = 0;
        stalled_since = None;
        for c in &out[..got] {
            if c.status != CompletionStatus::Success {
                return Err(BenchError::Other(format!(
                    "work request {} ({:?}) failed: {}",
                    c.wr_id, c.verb, c.status
                )));
            }
            if completed >= p.warmup {
                let at = posted_at[(c.wr_id % p.depth as u64) as usize];
                histogram::record(&mut samples, t.saturating_sub(at));
            }
            completed += 1;
            if completed == p.warmup {
                start = Instant::now();
                rt_start = f.counters().round_trips;
            }
        }
    }
    let elapsed = start.elapsed();
    let latency = LatencyStats::from_ticks(&samples, clock.ns_per_tick());
    Ok(BenchReport {
        fabric,
        op: p.op,
        bytes,
        depth: p.depth,
        iters: p.iters,
        warmup: p.warmup,
        elapsed_ns: elapsed.as_nanos() as u64,
        latency,
        ops_per_sec: ops_per_sec(p.iters, elapsed),
        gbps: gbps(p.iters, bytes, elapsed),
        round_trips: f.counters().round_trips - rt_start,
    })
}

/// Answers pings; other control frames get no reply.
fn ping_only(frame: &dinomo_shared::msg::Frame) -> Option<dinomo_shared::msg::Frame> {
    match Request::decode(frame) {
        Ok(Request::Ping) => Some(Response::Pong.encode(frame.req_id)),
        _ => None,
    }
}

/// Runs `dinomo fabric-bench` with parsed arguments; `stop` ends a server.
pub fn main(a: &BenchArgs, stop: &AtomicBool) -> Result<Option<BenchReport>, BenchError> {
    let p = BenchParams::from_args(a)?;
    let report = match a.fabric {
        FabricKind::Shm => shm(a, &p, stop)?,
        FabricKind::Verbs => verbs(a, &p, stop)?,
    };
    if let (Some(r), Some(path)) = (&report, &a.json) {
        let json = serde_json::to_string_pretty(r).map_err(|e| BenchError::Other(e.to_string()))?;
        std::fs::write(path, json + "\n")
            .map_err(|e| BenchError::Other(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(report)
}

fn shm(
    a: &BenchArgs,
    p: &BenchParams,
    stop: &AtomicBool,
) -> Result<Option<BenchReport>, BenchError> {
    let profile: NicProfile = a
        .nic
        .parse()
        .map_err(|e: dinomo_hw::fabric::UnknownNicProfile| BenchError::Usage(e.to_string()))?;
    if a.connect.is_some() {
        return Err(BenchError::Usage(
            "--connect is for --fabric verbs; an shm client takes --path".into(),
        ));
    }
    match (&a.path, a.server) {
        (None, true) => Err(BenchError::Usage(
            "an shm server needs --path FILE for the region it creates".into(),
        )),
        (Some(path), true) => {
            let region = RegionFile::create(path, a.region_size)
                .map_err(|e| BenchError::Other(e.to_string()))?;
            let ctl = default_ctl_path(path);
            let mut server = ControlServer::create(&ctl, 64)?;
            eprintln!(
                "serving a {}-byte region at {} (control {}); Ctrl-C stops",
                region.len(),
                path.display(),
                ctl.display()
            );
            while !stop.load(Ordering::Acquire) {
                if server.poll(|_, f| ping_only(f)) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            drop(server);
            let _ = std::fs::remove_file(&ctl);
            let _ = std::fs::remove_file(path);
            Ok(None)
        }
        (Some(path), false) => {
            let spec = DpmSpec::Shm {
                region: path.clone(),
                ctl: default_ctl_path(path),
                nic: profile,
            };
            let mut f = spec.connect_with_queue_depth(p.depth)?;
            run(&mut f, FabricKind::Shm, p).map(Some)
        }
        (None, false) => {
            let heap = HeapRegion::new(a.region_size);
            let server = ControlServer::in_memory(1);
            let mut f = ShmFabric::new(
                Arc::new(heap.pmem(NoPersist)),
                server.client()?,
                NicModel::new(profile),
            )
            .with_queue_depth(p.depth);
            run(&mut f, FabricKind::Shm, p).map(Some)
        }
    }
}

#[cfg(not(feature = "rdma"))]
fn verbs(
    _: &BenchArgs,
    _: &BenchParams,
    _: &AtomicBool,
) -> Result<Option<BenchReport>, BenchError> {
    Err(BenchError::Other(
        dinomo_hw::fabric::connect::NO_RDMA_SUPPORT.into(),
    ))
}

#[cfg(feature = "rdma")]
fn verbs(
    a: &BenchArgs,
    p: &BenchParams,
    stop: &AtomicBool,
) -> Result<Option<BenchReport>, BenchError> {
    use dinomo_hw::fabric::verbs::{VerbsConfig, VerbsFabric, VerbsServer};
    use dinomo_hw::fabric::{DpmSpec, VerbsDevice};
    use std::net::SocketAddr;
    let mut cfg = VerbsConfig {
        gid_index: a.gid_index,
        queue_depth: p.depth.max(1),
        ..Default::default()
    };
    if let Some(n) = a.signal_every {
        if a.connect.is_some() {
            return Err(BenchError::Usage(
                "--signal-every applies to the loopback run and --server; a --connect client \
                 uses the default"
                    .into(),
            ));
        }
        cfg.signal_every = n;
    }
    cfg.validate()?;
    // Fail first on a host without RDMA, whatever else is asked.
    dinomo_hw::fabric::verbs::device_names()?;
    let device = a.device.as_deref();
    let region = || Arc::new(HeapRegion::new(a.region_size).pmem(NoPersist));
    if a.server {
        let listen = SocketAddr::from(([0, 0, 0, 0], a.port));
        let mut server = VerbsServer::bind(device, listen, region(), &cfg)?;
        eprintln!(
            "serving a {}-byte region over {} on {listen}; Ctrl-C stops",
            a.region_size,
            server.device_name()
        );
        while !stop.load(Ordering::Acquire) {
            if server.poll(|_, f| ping_only(f)) == 0 {
                // The benchmark is one-sided: the server's CPU has nothing to do but accept
                // connections, so it sleeps rather than take a core from the client (and,
                // on soft-RoCE, from the kernel doing the NIC's work).
                std::thread::sleep(SERVER_IDLE);
            }
            for e in server.drain_events() {
                eprintln!("{e}");
            }
        }
        return Ok(None);
    }
    if let Some(addr) = &a.connect {
        let spec = DpmSpec::parse(
            FabricKind::Verbs,
            addr,
            VerbsDevice {
                name: a.device.clone(),
                gid_index: a.gid_index,
            },
        )
        .map_err(|e| BenchError::Usage(e.0))?;
        let mut f = spec.connect_with_queue_depth(p.depth)?;
        return run(&mut f, FabricKind::Verbs, p).map(Some);
    }
    // Loopback: both ends in this process.
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut server = VerbsServer::bind(device, listen, region(), &cfg)?;
    let addr = server
        .local_addr()
        .ok_or_else(|| BenchError::Other("the loopback server has no address".into()))?;
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let t = std::thread::spawn(move || {
        while !d.load(Ordering::Acquire) {
            if server.poll(|_, f| ping_only(f)) == 0 {
                std::thread::sleep(SERVER_IDLE);
            }
        }
    });
    let result = VerbsFabric::connect(&addr.to_string(), device, &cfg)
        .map_err(BenchError::from)
        .and_then(|mut f| {
            eprintln!(
                "fabric-bench: {} GID index {} ({}), {} bytes inline",
                f.device_name(),
                f.gid_index(),
                if a.gid_index.is_some() {
                    "given"
                } else {
                    "chosen"
                },
                f.max_inline()
            );
            run(&mut f, FabricKind::Verbs, p)
        });
    done.store(true, Ordering::Release);
    let _ = t.join();
    result.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).expect("parse").a
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let of = |samples: &[u64]| {
            let mut h = histogram::new();
            for &s in samples {
                histogram::record(&mut h, s);
            }
            h
        };
        let s: Vec<u64> = (1..=100).rev().collect();
        let st = LatencyStats::from_histogram(&of(&s));
        assert_eq!(
            (st.min_ns, st.p50_ns, st.p99_ns, st.max_ns),
            (1, 50, 99, 100)
        );
        assert_eq!(st.p999_ns, 100);
        assert!((st.mean_ns - 50.5).abs() < 1e-9);
        assert_eq!(of(&[7]).value_at_quantile(0.5), 7);
        assert_eq!(of(&[7]).value_at_quantile(0.0), 7);
        assert_eq!(of(&[]).value_at_quantile(0.5), 0);
        assert_eq!(of(&[1, 2, 3, 4]).value_at_quantile(0.5), 2);
        assert_eq!(of(&[1, 2, 3, 4]).value_at_quantile(0.51), 3);
        let one = LatencyStats::from_histogram(&of(&[7]));
        assert_eq!((one.min_ns, one.p999_ns, one.max_ns), (7, 7, 7));
        assert_eq!(
            LatencyStats::from_histogram(&of(&[])),
            LatencyStats::default()
        );
    }

    #[test]
    fn tick_percentiles_scale_to_nanoseconds() {
        let mut h = histogram::new();
        for t in [100u64, 200, 300, 400] {
            histogram::record(&mut h, t);
        }
        let st = LatencyStats::from_ticks(&h, 0.5);
        assert_eq!((st.min_ns, st.p50_ns, st.max_ns), (50, 100, 200));
        assert!((st.mean_ns - 125.0).abs() < 1e-9);
        assert_eq!(
            LatencyStats::from_ticks(&h, 1.0),
            LatencyStats::from_histogram(&h)
        );
        // The clock's scale is positive whatever the machine.
        let c = Clock::start();
        assert!(c.ns_per_tick() > 0.0);
    }

    #[test]
    fn throughput_in_gigabits() {
        // 1 M ops of 1 KiB in one second: 8.192 Gb/s.
        let g = gbps(1_000_000, 1024, Duration::from_secs(1));
        assert!((g - 8.192).abs() < 1e-9, "{g}");
        assert!((ops_per_sec(500, Duration::from_millis(250)) - 2000.0).abs() < 1e-9);
        assert_eq!(ops_per_sec(5, Duration::ZERO), 0.0);
        assert_eq!(BenchOp::Cas.bytes(4096), 8);
        assert_eq!(BenchOp::Read.bytes(4096), 4096);
    }

    #[test]
    fn arguments_are_checked() {
        let ok = BenchParams::from_args(&args(&["--size", "1K", "--depth", "16", "--op", "write"]))
            .expect("valid");
        assert_eq!((ok.size, ok.depth, ok.op), (1024, 16, BenchOp::Write));
        assert_eq!(ok.slots, 16, "one slot per outstanding request by default");
        let one = BenchParams::from_args(&args(&["--depth", "8", "--slots", "1"])).expect("1");
        assert_eq!((one.depth, one.slots), (8, 1));
        assert_eq!(ok.warmup, 10_000);
        for bad in [
            &["--size", "4"][..],
            &["--size", "65537"],
            &["--depth", "0"],
            &["--iters", "0"],
            &["--depth", "4", "--slots", "5"],
            &["--slots", "0"],
        ] {
            assert!(
                matches!(
                    BenchParams::from_args(&args(bad)),
                    Err(BenchError::Usage(_))
                ),
                "{bad:?}"
            );
        }
        assert!(Cli::try_parse_from(["x", "--op", "swap"]).is_err());
    }

    #[test]
    fn shm_single_process_run_measures_every_op() {
        for op in ["read", "write", "cas", "faa"] {
            let a = args(&[
                "--op",
                op,
                "--iters",
                "500",
                "--depth",
                "4",
                "--region-size",
                "1M",
            ]);
            let stop = AtomicBool::new(false);
            let r = main(&a, &stop).expect("bench").expect("a report");
            assert_eq!(r.iters, 500);
            assert!(r.latency.min_ns <= r.latency.p50_ns && r.latency.p50_ns <= r.latency.max_ns);
            assert!(
                r.round_trips >= 1 && r.round_trips <= 500,
                "{}",
                r.round_trips
            );
            assert!(r.render().contains(op));
        }
        // JSON output.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        let a = args(&["--iters", "100", "--json", path.to_str().expect("utf-8")]);
        main(&a, &AtomicBool::new(false)).expect("bench");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("json")).expect("parse");
        assert_eq!(v["op"], "read");
        assert_eq!(v["bytes"], 64);
        assert!(v["latency"]["p99_ns"].is_u64());
    }

    #[test]
    fn a_region_too_small_for_the_queue_is_a_usage_error() {
        let a = args(&["--size", "64K", "--depth", "64", "--region-size", "1M"]);
        assert!(matches!(
            main(&a, &AtomicBool::new(false)),
            Err(BenchError::Usage(_))
        ));
        // One slot shared by every request fits.
        let a = args(&[
            "--op",
            "write",
            "--size",
            "64K",
            "--depth",
            "64",
            "--slots",
            "1",
            "--iters",
            "200",
            "--region-size",
            "1M",
        ]);
        let r = main(&a, &AtomicBool::new(false))
            .expect("bench")
            .expect("report");
        assert_eq!((r.bytes, r.depth), (65536, 64));
    }
}
