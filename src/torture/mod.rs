//! `dinomo torture`: a crash-torture run of a whole process cluster.
//!
//! Every round runs a mixed load (SET/GET/DEL/MSET of self-validating values) against a
//! cluster of processes, SIGKILLs one of them (DPM, manager or a KN) at a random instant,
//! restarts it and supervises the cluster until every slot is served again. Then the load
//! stops and every key is read back through the cluster. A round passes when every key
//! holds its last acknowledged write (or a later write whose outcome is unknown), no value
//! read anywhere is torn or foreign, and the round's whole history (client operations and
//! the read-back) is linearizable ([`crate::lincheck`]).

mod client;
mod cluster;
mod fill;
mod load;
mod value;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::workload::Rng;
/// `--round`'s parser, where `main` finds it.
use crate::lincheck::{Clock, History, Op, Recorder};
use crate::up::UpConfig;
use client::{Client, Failure};
use cluster::Cluster;
use dinomo_shared::resp::Value;
use load::{ClientSpec, OpCounts};

/// A process role of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Dpm = 0,
    Manager = 1,
    Kn = 2,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Dpm, Role::Manager, Role::Kn];

    pub fn name(self) -> &'static str {
        match self {
            Role::Dpm => "dpm",
            Role::Manager => "manager",
            Role::Kn => "kn",
        }
    }

    /// Parses `dpm,manager,kn` (any subset, no repeats).
    pub fn parse_list(s: &str) -> Result<Vec<Role>, String> {
        let mut roles = Vec::new();
        for part in s.split(',').map(str::trim) {
            let r = match part {
                "dpm" => Role::Dpm,
                "manager" => Role::Manager,
                "kn" => Role::Kn,
                other => return Err(format!("unknown role {other:?} (dpm, manager, kn)")),
            };
            if roles.contains(&r) {
                return Err(format!("role {part} given twice"));
            }
            roles.push(r);
        }
        Ok(roles)
    }
}

/// How a torture run goes.
#[derive(Clone, Debug)]
pub struct TortureConfig {
    pub rounds: u32,
    pub seed: u64,
    pub kns: u16,
    pub keys: u64,
    pub clients: usize,
    /// Load time of a round (the kill falls inside it).
    pub round: Duration,
    /// No round starts after this much time.
    pub time_limit: Duration,
    pub lease_ms: u64,
    /// Working folder (the region and the processes' log); `None`: a new temporary one,
    /// removed after a passing run.
    pub dir: Option<PathBuf>,
    pub roles: Vec<Role>,
    /// The last round also fills the region to its limit (writes refused with `-OOM`) and
    /// kills its process while the region is full.
    pub fill: bool,
    /// Size of the region, e.g. "512M" (the last round's fill writes about this much).
    pub region_size: String,
    /// Fabric the KNs and the manager reach the DPM through: "shm" or "verbs" (the DPM's
    /// connection exchange then listens on a free loopback port, the same across its
    /// restarts).
    pub fabric: String,
    /// Verbs: RDMA device (default: the first one found).
    pub device: Option<String>,
    /// Verbs: GID index (`None`: the port's RoCE v2 GID of an IPv4 address).
    pub gid_index: Option<u8>,
    /// How long the cluster may take to serve every slot at the start and after each kill
    /// before the run fails (a slow host, e.g. a software RDMA device in an emulated VM,
    /// needs more).
    pub recovery_limit: Duration,
}

impl Default for TortureConfig {
    fn default() -> Self {
        Self {
            rounds: 20,
            seed: 1,
            kns: 2,
            keys: 256,
            clients: 4,
            round: Duration::from_millis(1500),
            time_limit: Duration::from_secs(9 * 60),
            lease_ms: 1000,
            dir: None,
            roles: Role::ALL.to_vec(),
            fill: true,
            region_size: "512M".into(),
            fabric: "shm".into(),
            device: None,
            gid_index: None,
            recovery_limit: Duration::from_secs(180),
        }
    }
}

/// Why a run could not be made (violations are in the report, not here).
#[derive(Debug, thiserror::Error)]
pub enum TortureError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Cluster(#[from] crate::up::UpError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// What the last round's filler did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FillReport {
    /// Filler writes acknowledged (each read back with its value after the kill).
    pub acked: u64,
    /// Filler writes refused with `-OOM` (each read back absent).
    pub refused: u64,
    /// Filler writes with an unknown outcome.
    pub unknown: u64,
    /// Bytes of acknowledged filler values.
    pub acked_bytes: u64,
    /// Whether the region was full when the round's process was killed.
    pub full_at_kill: bool,
}

/// Recovery times of one role.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Recovery {
    pub kills: u64,
    pub collateral_restarts: u64,
    pub recovery_p50_ms: Option<f64>,
    pub recovery_max_ms: Option<f64>,
}

/// The result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct TortureReport {
    pub seed: u64,
    pub rounds_requested: u32,
    pub rounds: u32,
    /// Rounds were cut short by the time limit.
    pub time_limit_reached: bool,
    /// Rounds were cut short by Ctrl-C.
    pub interrupted: bool,
    pub elapsed_s: f64,
    pub kns: u16,
    pub keys: u64,
    pub clients: usize,
    pub ops: OpCounts,
    pub roles: HashMap<&'static str, Recovery>,
    /// Operations given to the linearizability checker, and the time it took.
    pub lincheck_ops: u64,
    pub lincheck_s: f64,
    pub violations: u64,
    /// The first violations, described.
    pub violation_details: Vec<String>,
    /// The fill of the last round, if it ran.
    pub fill: Option<FillReport>,
    /// Where the region and the processes' log are (kept when a run fails).
    pub dir: String,
}

/// How long the last round's filler may take to fill the region before its kill.
const FILL_WAIT: Duration = Duration::from_secs(120);

/// Violations kept in the report.
const KEEP_DETAILS: usize = 50;

/// The role killed in each round: every role once per cycle, in an order drawn from the
/// seed.
fn schedule(roles: &[Role], rounds: u32, rng: &mut Rng) -> Vec<Role> {
    let mut out = Vec::with_capacity(rounds as usize);
    while out.len() < rounds as usize {
        let mut cycle = roles.to_vec();
        for i in (1..cycle.len()).rev() {
            cycle.swap(i, rng.below(i as u64 + 1) as usize);
        }
        out.extend(cycle);
    }
    out.truncate(rounds as usize);
    out
}

/// Runs the torture; `progress` is called after every round with a one-line summary.
/// Stops starting rounds once `interrupt` is set (and cuts a recovery short).
pub fn run(
    cfg: &TortureConfig,
    interrupt: &AtomicBool,
    mut progress: impl FnMut(u32, &str),
) -> Result<TortureReport, TortureError> {
    if cfg.rounds == 0 {
        return Err(TortureError::Invalid("--rounds must be at least 1".into()));
    }
    if cfg.kns == 0 || cfg.kns > 16 {
        return Err(TortureError::Invalid(format!(
            "--kns {} is outside 1..=16",
            cfg.kns
        )));
    }
    if cfg.keys == 0 || cfg.keys > 100_000 {
        return Err(TortureError::Invalid(format!(
            "--keys {} is outside 1..=100000",
            cfg.keys
        )));
    }
    if cfg.clients == 0 || cfg.clients > 64 {
        return Err(TortureError::Invalid(format!(
            "--clients {} is outside 1..=64",
            cfg.clients
        )));
    }
    if cfg.lease_ms < 100 {
        return Err(TortureError::Invalid(format!(
            "--lease-ms {} is below 100",
            cfg.lease_ms
        )));
    }
    if cfg.round < Duration::from_millis(100) {
        return Err(TortureError::Invalid(
            "--round-ms must be at least 100".into(),
        ));
    }
    if cfg.roles.is_empty() {
        return Err(TortureError::Invalid("--roles names no role".into()));
    }
    let t_run = Instant::now();
    let (dir, temporary) = match &cfg.dir {
        Some(d) => (d.clone(), false),
        None => {
            let shm = std::path::Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            (
                base.join(format!("dinomo-torture-{}-{nanos}", std::process::id())),
                true,
            )
        }
    };
    // The manager, the KNs and the DPM's verbs connection exchange.
    let first_port =
        crate::up::free_port_block(cfg.kns + 2).map_err(|source| TortureError::Io {
            what: format!("cannot find {} consecutive free ports", cfg.kns + 2),
            source,
        })?;
    let up = UpConfig {
        kns: cfg.kns,
        dir: dir.clone(),
        // Small blocks: every KN start takes a block per shard.
        region_size: cfg.region_size.clone(),
        block_size: Some("1M".into()),
        fresh: true,
        host: "127.0.0.1".into(),
        manager_port: first_port,
        base_port: first_port + 1,
        threads: 2,
        io_threads: 2,
        cache: "16M".into(),
        lease_ms: cfg.lease_ms,
        dpm_workers: 1,
        policy: false,
        fabric: cfg.fabric.clone(),
        dpm_listen: format!("127.0.0.1:{}", first_port + 1 + cfg.kns),
        device: cfg.device.clone(),
        gid_index: cfg.gid_index,
        ..UpConfig::default()
    };
    let mut cluster = Cluster::start(up, cfg.recovery_limit, interrupt)?;
    let seeds = cluster.kn_addrs();
    let credentials = cluster.cfg.credentials()?;
    let mut rng = Rng::new(cfg.seed);
    let plan = schedule(&cfg.roles, cfg.rounds, &mut rng);
    let mut ops = OpCounts::default();
    let mut kills: HashMap<Role, u64> = HashMap::new();
    let mut recovery: HashMap<Role, Vec<f64>> = HashMap::new();
    let mut violations: Vec<String> = Vec::new();
    let mut violation_count = 0u64;
    let mut lincheck_ops = 0u64;
    let mut lincheck_time = Duration::ZERO;
    // The value of every key the previous round's read-back found (the start of the next
    // round's history).
    let mut state: Vec<Option<Vec<u8>>> = vec![None; cfg.keys as usize];
    let mut rounds_done = 0u32;
    let mut time_limit_reached = false;
    let op_timeout = Duration::from_millis(cfg.lease_ms * 3).max(Duration::from_secs(3));
    let mut stuck = false;
    let mut interrupted = false;
    let mut fill_report: Option<FillReport> = None;
    for (round, &role) in plan.iter().enumerate() {
        if t_run.elapsed() >= cfg.time_limit {
            time_limit_reached = true;
            break;
        }
        if interrupt.load(Ordering::Acquire) {
            interrupted = true;
            break;
        }
        let mut round_violations: Vec<String> = Vec::new();
        let clock = Clock::new();
        let mut initial = Recorder::new(clock);
        for (i, v) in state.iter().enumerate() {
            if let Some(v) = v {
                let t = initial.now();
                initial.put(&load::key_name(i as u64), v, t, true);
            }
        }
        let stop = AtomicBool::new(false);
        let fill_round = cfg.fill && round + 1 == plan.len();
        let full = AtomicBool::new(false);
        let mut fill_out: Option<fill::FillOut> = None;
        let mut full_at_kill = false;
        let kill_at = cfg.round.mul_f64(0.2 + 0.6 * rng.next_f64());
        let kn = rng.below(u64::from(cfg.kns)) as usize;
        let round_seed = rng.next_u64();
        let t_round = Instant::now();
        let (outs, recovered) = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..cfg.clients)
                .map(|id| {
                    let spec = ClientSpec {
                        id,
                        clients: cfg.clients,
                        keys: cfg.keys,
                        seeds: &seeds,
                        credentials: credentials.as_ref(),
                        seed: round_seed,
                        seq_base: (round as u64 + 1) << 32,
                        op_timeout,
                    };
                    let stop = &stop;
                    sc.spawn(move || load::client(&spec, clock, stop))
                })
                .collect();
            let filler = fill_round.then(|| {
                let (seeds, credentials, stop, full) = (&seeds, credentials.as_ref(), &stop, &full);
                sc.spawn(move || fill::filler(seeds, credentials, op_timeout, full, stop))
            });
            std::thread::sleep(kill_at);
            if fill_round {
                // Kill only once the region is full (or give up waiting after a while; the
                // report says whether it was full).
                let t_fill = Instant::now();
                while !full.load(Ordering::Acquire)
                    && t_fill.elapsed() < FILL_WAIT
                    && !interrupt.load(Ordering::Acquire)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                full_at_kill = full.load(Ordering::Acquire);
            }
            cluster.kill(role, kn);
            let t_kill = Instant::now();
            let recovered = cluster
                .restart(role, kn)
                .and_then(|()| cluster.recover(cfg.recovery_limit, interrupt))
                .map(|()| t_kill.elapsed());
            // The load goes on for the rest of the round, at least a little after recovery.
            let rest = cfg
                .round
                .saturating_sub(t_round.elapsed())
                .max(Duration::from_millis(200));
            std::thread::sleep(rest);
            stop.store(true, Ordering::Release);
            let outs: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
            if let Some(f) = filler {
                match f.join() {
                    Ok(o) => fill_out = Some(o),
                    Err(_) => {
                        round_violations.push(format!("round {}: the filler panicked", round + 1))
                    }
                }
            }
            (outs, recovered)
        });
        *kills.entry(role).or_default() += 1;
        let recovered = match recovered {
            Ok(d) => {
                recovery
                    .entry(role)
                    .or_default()
                    .push(d.as_secs_f64() * 1e3);
                Some(d)
            }
            // Interrupted (Ctrl-C): this round is not counted; the report covers the
            // rounds before it.
            Err(_) if interrupt.load(Ordering::Acquire) => {
                interrupted = true;
                break;
            }
            Err(e) => {
                // A cluster that cannot serve again is a failure of the store (e.g. a
                // region the DPM cannot open any more): reported, and the run ends.
                round_violations.push(format!(
                    "round {}: the cluster did not recover after the kill of {}: {e}",
                    round + 1,
                    role.name()
                ));
                stuck = true;
                None
            }
        };
        let mut recorders = vec![initial];
        for o in outs {
            match o {
                Ok(o) => {
                    ops.add(&o.counts);
                    for (k, why) in o.bad_values {
                        round_violations.push(format!("round {}: read of {k}: {why}", round + 1));
                    }
                    recorders.push(o.recorder);
                }
                Err(_) => round_violations.push(format!("round {}: a client panicked", round + 1)),
            }
        }
        if !stuck {
            // Read back every key.
            let mut reader = Recorder::new(clock);
            let mut c = Client::new(&seeds, op_timeout, credentials.as_ref());
            let mut finals: Vec<Option<Option<Vec<u8>>>> = vec![None; cfg.keys as usize];
            for (i, f) in finals.iter_mut().enumerate() {
                let key = load::key_name(i as u64);
                let t = reader.now();
                let deadline = Instant::now() + Duration::from_secs(60);
                match c.exec(&key, &[b"GET", &key], deadline) {
                    Ok(Value::Nil) => {
                        reader.get(&key, t, None);
                        *f = Some(None);
                    }
                    Ok(Value::Bulk(v)) => {
                        if let Err(why) = value::decode(&key, &v) {
                            round_violations.push(format!(
                                "round {}: read-back of {}: {why}",
                                round + 1,
                                String::from_utf8_lossy(&key)
                            ));
                        }
                        reader.get(&key, t, Some(v.clone()));
                        *f = Some(Some(v));
                    }
                    Ok(other) => round_violations.push(format!(
                        "round {}: read-back of {}: unexpected reply {other:?}",
                        round + 1,
                        String::from_utf8_lossy(&key)
                    )),
                    Err(e) => round_violations.push(format!(
                        "round {}: read-back of {} failed: {}",
                        round + 1,
                        String::from_utf8_lossy(&key),
                        match e {
                            Failure::NotSent => "no node served it within 60 s".into(),
                            Failure::Unknown(why) => why,
                        }
                    )),
                }
            }
            recorders.push(reader);
            if let Some(f) = &fill_out {
                if !full_at_kill {
                    round_violations.push(format!(
                        "round {}: the region did not fill within {} s ({} filler writes acknowledged)",
                        round + 1,
                        FILL_WAIT.as_secs(),
                        f.acked.len()
                    ));
                }
                round_violations.extend(fill::check(
                    round,
                    f,
                    &seeds,
                    credentials.as_ref(),
                    op_timeout,
                ));
                fill_report = Some(FillReport {
                    acked: f.acked.len() as u64,
                    refused: f.refused.len() as u64,
                    unknown: f.unknown.len() as u64,
                    acked_bytes: (f.acked.len() * fill::FILL_VALUE_LEN) as u64,
                    full_at_kill,
                });
            }
            let history = History::from_recorders(recorders);
            round_violations.extend(check_last_writes(round, &history, &finals));
            let t_check = Instant::now();
            if let Err(e) = history.check() {
                round_violations.push(format!("round {}: lincheck: {e}", round + 1));
                if let crate::lincheck::CheckError::NotLinearizable { ops, .. } = &e {
                    let text: String = ops.iter().map(|o| format!("{o}\n")).collect();
                    let name = format!("round-{}-history.txt", round + 1);
                    let _ = std::fs::write(dir.join(name), text);
                }
            }
            lincheck_time += t_check.elapsed();
            lincheck_ops += history.ops().len() as u64;
            for (s, f) in state.iter_mut().zip(finals) {
                if let Some(f) = f {
                    *s = f;
                }
            }
        }
        rounds_done += 1;
        violation_count += round_violations.len() as u64;
        let summary = format!(
            "round {}/{}: killed {}{}, recovered in {}, {} violations",
            round + 1,
            cfg.rounds,
            role.name(),
            if role == Role::Kn {
                format!(" {kn}")
            } else {
                String::new()
            },
            match recovered {
                Some(d) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
                None => "(never)".into(),
            },
            round_violations.len()
        );
        for v in &round_violations {
            if violations.len() < KEEP_DETAILS {
                violations.push(v.clone());
            }
        }
        progress(round as u32 + 1, &summary);
        if stuck {
            break;
        }
    }
    let roles = Role::ALL
        .iter()
        .map(|&r| {
            let mut times = recovery.remove(&r).unwrap_or_default();
            times.sort_by(f64::total_cmp);
            let rec = Recovery {
                kills: kills.get(&r).copied().unwrap_or(0),
                collateral_restarts: cluster.collateral[r as usize],
                recovery_p50_ms: (!times.is_empty()).then(|| times[(times.len() - 1) / 2]),
                recovery_max_ms: times.last().copied(),
            };
            (r.name(), rec)
        })
        .collect();
    let stopped_cleanly = cluster.stop();
    if !stopped_cleanly && !stuck {
        violation_count += 1;
        violations.push("the DPM did not stop cleanly at the end of the run".into());
    }
    if violation_count == 0 && temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(TortureReport {
        seed: cfg.seed,
        rounds_requested: cfg.rounds,
        rounds: rounds_done,
        time_limit_reached,
        interrupted,
        elapsed_s: t_run.elapsed().as_secs_f64(),
        kns: cfg.kns,
        keys: cfg.keys,
        clients: cfg.clients,
        ops,
        roles,
        lincheck_ops,
        lincheck_s: lincheck_time.as_secs_f64(),
        violations: violation_count,
        violation_details: violations,
        fill: fill_report,
        dir: dir.display().to_string(),
    })
}

/// Check (a): the read-back value of every key is its last acknowledged write, or a write
/// issued after it whose outcome is unknown. Every key has one writer during the load, so
/// its operations in invocation order are that writer's order.
fn check_last_writes(
    round: usize,
    history: &History,
    finals: &[Option<Option<Vec<u8>>>],
) -> Vec<String> {
    let mut by_key: HashMap<&[u8], Vec<&crate::lincheck::Operation>> = HashMap::new();
    for o in history.ops() {
        if !matches!(o.op, Op::Get(_)) {
            by_key.entry(&o.key).or_default().push(o);
        }
    }
    let mut out = Vec::new();
    for (i, f) in finals.iter().enumerate() {
        let Some(found) = f else { continue };
        let key = load::key_name(i as u64);
        let mut writes = by_key.remove(key.as_slice()).unwrap_or_default();
        writes.sort_by_key(|o| o.invoke);
        let last_ack = writes.iter().rposition(|o| o.response.is_some());
        let value_of = |o: &crate::lincheck::Operation| match &o.op {
            Op::Put(v) => Some(v.clone()),
            _ => None,
        };
        let mut allowed: Vec<Option<Vec<u8>>> = Vec::new();
        match last_ack {
            Some(a) => allowed.push(value_of(writes[a])),
            None => allowed.push(None),
        }
        let after = last_ack.map_or(0, |a| a + 1);
        allowed.extend(writes[after..].iter().map(|o| value_of(o)));
        if !allowed.contains(found) {
            let show = |v: &Option<Vec<u8>>| match v {
                Some(v) => match value::decode(&key, v) {
                    Ok((writer, seq)) => format!("writer {writer}'s write {seq:#x}"),
                    Err(why) => format!("a bad value ({why})"),
                },
                None => "absent".into(),
            };
            out.push(format!(
                "round {}: key {} reads {} but its last acknowledged write left {}",
                round + 1,
                String::from_utf8_lossy(&key),
                show(found),
                show(&allowed[0])
            ));
        }
    }
    out
}

/// The report as a table.
pub fn render(r: &TortureReport) -> String {
    let mut s = format!(
        "torture: {} of {} rounds in {:.1} s (seed {}, {} KNs, {} keys, {} clients){}\n",
        r.rounds,
        r.rounds_requested,
        r.elapsed_s,
        r.seed,
        r.kns,
        r.keys,
        r.clients,
        if r.time_limit_reached {
            "; stopped by the time limit"
        } else if r.interrupted {
            "; interrupted"
        } else {
            ""
        }
    );
    s += &format!(
        "operations: {} ok, {} failed, {} unknown outcome, {} refused (region full)\n",
        r.ops.ok, r.ops.failed, r.ops.unknown, r.ops.refused
    );
    if let Some(f) = &r.fill {
        s += &format!(
            "fill (last round): {} writes acknowledged ({} MiB), {} refused with -OOM, {} unknown; \
             region full at the kill: {}\n",
            f.acked,
            f.acked_bytes >> 20,
            f.refused,
            f.unknown,
            if f.full_at_kill { "yes" } else { "no" }
        );
    }
    s += &format!(
        "{:<8} {:>6} {:>11} {:>14} {:>14}\n",
        "ROLE", "KILLS", "COLLATERAL", "RECOVERY_P50", "RECOVERY_MAX"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
    for role in Role::ALL {
        if let Some(x) = r.roles.get(role.name()) {
            s += &format!(
                "{:<8} {:>6} {:>11} {:>14} {:>14}\n",
                role.name(),
                x.kills,
                x.collateral_restarts,
                ms(x.recovery_p50_ms),
                ms(x.recovery_max_ms)
            );
        }
    }
    s += &format!(
        "lincheck: {} operations checked in {:.2} s\n",
        r.lincheck_ops, r.lincheck_s
    );
    s += &format!("violations: {}\n", r.violations);
    for v in r.violation_details.iter().take(10) {
        s += &format!("  {v}\n");
    }
    if r.violations > 0 {
        s += &format!("region and process log kept in {}\n", r.dir);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::parse_duration;

    #[test]
    fn durations_and_roles_parse() {
        assert_eq!(parse_duration("9m"), Ok(Duration::from_secs(540)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "9", "m", "9x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(Role::parse_list("kn,dpm"), Ok(vec![Role::Kn, Role::Dpm]));
        assert!(Role::parse_list("kn,kn").is_err());
        assert!(Role::parse_list("mds").is_err());
    }

    #[test]
    fn every_role_is_killed_once_per_cycle() {
        let mut rng = Rng::new(7);
        let plan = schedule(&Role::ALL, 7, &mut rng);
        for cycle in plan.chunks(3).filter(|c| c.len() == 3) {
            for r in Role::ALL {
                assert!(cycle.contains(&r), "{plan:?}");
            }
        }
    }
}
