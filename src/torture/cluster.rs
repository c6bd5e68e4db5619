//! The supervised process cluster of a torture run: a DPM, a manager and K KNs started
//! with the pieces of `dinomo up`, killed on request, and brought back until every slot is
//! served again. A process that exits, or does not serve within a deadline, is restarted
//! too (a collateral restart): e.g. KNs fenced by a restarted manager, or processes whose
//! control connection died with the DPM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Role;
use crate::redis_client::{Conn, Timeouts};
use crate::up::{Proc, UpConfig, UpError};
use dinomo_shared::resp::Value;
use dinomo_shared::slot::{key_slot, SLOTS};

/// Processes of the cluster, by role.
pub struct Cluster {
    pub cfg: UpConfig,
    log: PathBuf,
    dpm: Proc,
    manager: Proc,
    kns: Vec<Proc>,
    /// A key of every slot, for probes (never one of the load's keys).
    probe_keys: Vec<Vec<u8>>,
    /// Restarts the supervisor made beyond the planned one, by role.
    pub collateral: [u64; 3],
    started: Instant,
    /// When each process was last started (DPM, manager, KNs): one that exits right away
    /// (e.g. while the DPM is still recovering) is started again after a pause, not in a
    /// tight loop.
    last_start: Vec<Instant>,
}

/// What a probe sweep found.
struct Sweep {
    ok: bool,
    /// The manager did not answer.
    manager_down: bool,
    /// KNs (by index) that did not answer a probe, or are missing from the map.
    failed_kns: Vec<usize>,
}

impl Cluster {
    /// Formats a fresh region and starts every process; returns once every slot is served.
    pub fn start(cfg: UpConfig, limit: Duration, stop: &AtomicBool) -> Result<Self, UpError> {
        // 0700 and this user's: the default folder's name is predictable.
        dinomo_hw::region_file::ensure_private_dir(&cfg.dir)
            .map_err(|e| UpError::Failed(format!("cluster folder: {e}")))?;
        cfg.prepare_auth()?;
        let log = cfg.dir.join("cluster.log");
        let mut format = Proc::spawn_logged("dpm format", &cfg.format_args(), Some(&log))?;
        if !format.child.wait().is_ok_and(|s| s.success()) {
            return Err(UpError::Failed(format!(
                "cannot format {} (see {})",
                cfg.region_path().display(),
                log.display()
            )));
        }
        let dpm = Proc::spawn_logged("dpm", &cfg.dpm_args()?, Some(&log))?;
        let manager = Proc::spawn_logged("manager", &cfg.manager_args()?, Some(&log))?;
        let mut kns = Vec::new();
        for i in 0..cfg.kns {
            kns.push(Proc::spawn_logged(
                &format!("kn {i}"),
                &cfg.kn_args(i)?,
                Some(&log),
            )?);
        }
        let cfg_kns = cfg.kns;
        let mut c = Self {
            cfg,
            log,
            dpm,
            manager,
            kns,
            probe_keys: probe_keys(),
            collateral: [0; 3],
            started: Instant::now(),
            last_start: vec![Instant::now(); 2 + usize::from(cfg_kns)],
        };
        c.recover(limit, stop)?;
        c.collateral = [0; 3];
        Ok(c)
    }

    /// The client addresses of the KNs.
    pub fn kn_addrs(&self) -> Vec<String> {
        (0..self.cfg.kns).map(|i| self.cfg.kn_addr(i)).collect()
    }

    fn proc_mut(&mut self, role: Role, kn: usize) -> &mut Proc {
        match role {
            Role::Dpm => &mut self.dpm,
            Role::Manager => &mut self.manager,
            Role::Kn => &mut self.kns[kn],
        }
    }

    /// Appends a line about what the supervisor did to the processes' log.
    pub fn note(&self, what: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(
                f,
                "torture {:.3}s: {what}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// SIGKILLs the process and waits until it is gone.
    pub fn kill(&mut self, role: Role, kn: usize) {
        self.note(&format!("SIGKILL {} {kn}", role.name()));
        let p = self.proc_mut(role, kn);
        if p.exited().is_none() {
            let _ = p.child.kill();
        }
        let _ = p.child.wait();
    }

    /// Starts the process of `role` again (the old one must be gone).
    pub fn restart(&mut self, role: Role, kn: usize) -> Result<(), UpError> {
        let (name, args) = match role {
            Role::Dpm => ("dpm".to_string(), self.cfg.dpm_args()?),
            Role::Manager => ("manager".to_string(), self.cfg.manager_args()?),
            Role::Kn => (format!("kn {kn}"), self.cfg.kn_args(kn as u16)?),
        };
        self.note(&format!("start {name}"));
        self.last_start[slot_of(role, kn)] = Instant::now();
        let p = Proc::spawn_logged(&name, &args, Some(&self.log))?;
        *self.proc_mut(role, kn) = p;
        Ok(())
    }

    /// Kills and restarts one process as a collateral restart.
    fn restart_collateral(&mut self, role: Role, kn: usize, why: &str) -> Result<(), UpError> {
        self.note(&format!(
            "collateral restart of {} {kn}: {why}",
            role.name()
        ));
        self.kill(role, kn);
        self.collateral[role as usize] += 1;
        self.restart(role, kn)
    }

    /// Supervises until a probe sweep succeeds: restarts processes that exit, and, when the
    /// cluster does not serve within a stall deadline, the processes that do not answer
    /// (escalating to the manager and every KN). Fails after `limit`.
    pub fn recover(&mut self, limit: Duration, stop: &AtomicBool) -> Result<(), UpError> {
        let t0 = Instant::now();
        let stall = Duration::from_millis(self.cfg.lease_ms * 4).max(Duration::from_secs(5));
        let mut clock = StallClock::new(stall, Instant::now());
        let mut escalations = 0u32;
        let mut dpm_exits = 0u32;
        let mut dpm_seen = false;
        loop {
            let mut acted = false;
            let mut procs = vec![(Role::Dpm, 0), (Role::Manager, 0)];
            procs.extend((0..self.kns.len()).map(|i| (Role::Kn, i)));
            for (role, kn) in procs {
                let since_start = self.last_start[slot_of(role, kn)].elapsed();
                if since_start > RESTART_PAUSE && self.proc_mut(role, kn).exited().is_some() {
                    if role == Role::Dpm {
                        dpm_exits += 1;
                        if dpm_exits >= MAX_DPM_EXITS {
                            return Err(UpError::Failed(format!(
                                "the DPM exited {dpm_exits} times in a row after being started \
                                 (see {})",
                                self.log.display()
                            )));
                        }
                    }
                    self.restart_collateral(role, kn, "exited")?;
                    acted = true;
                }
            }
            if acted {
                clock.acted(Instant::now());
            }
            let started = Instant::now();
            let dpm_before = dpm_answers(&self.cfg);
            let sweep = self.sweep();
            let mut dpm_seen_now = dpm_before;
            let verdict = clock.look(
                started,
                dpm_before,
                sweep.ok,
                || {
                    dpm_seen_now = dpm_answers(&self.cfg);
                    dpm_seen_now
                },
                Instant::now(),
            );
            if dpm_seen_now && !dpm_seen {
                self.note("the DPM serves (it published its control file)");
                dpm_seen = true;
            }
            if verdict == Verdict::Recovered {
                self.note("every slot served");
                return Ok(());
            }
            if stop.load(Ordering::Acquire) {
                return Err(UpError::Failed("interrupted".into()));
            }
            if t0.elapsed() > limit {
                return Err(UpError::Failed(format!(
                    "the cluster did not serve every slot within {limit:?} (see {})",
                    self.log.display()
                )));
            }
            if verdict == Verdict::Stalled {
                escalations += 1;
                if sweep.manager_down || escalations % 3 == 0 {
                    self.restart_collateral(Role::Manager, 0, "no service within the deadline")?;
                }
                let kns: Vec<usize> = if sweep.failed_kns.is_empty() || escalations % 2 == 0 {
                    (0..self.kns.len()).collect()
                } else {
                    sweep.failed_kns
                };
                for i in kns {
                    self.restart_collateral(Role::Kn, i, "no service within the deadline")?;
                }
                clock.acted(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One probe sweep: the manager's map is settled with every KN, and a SET of a probe key
    /// in every slot range succeeds at the range's owner.
    /// How many times longer than over shm a probe may take: over verbs every request is
    /// a round trip through the device, which on a software one in a VM is slow.
    fn patience(&self) -> u32 {
        if self.cfg.fabric == "verbs" {
            10
        } else {
            1
        }
    }

    fn sweep(&mut self) -> Sweep {
        let mut s = Sweep {
            ok: false,
            manager_down: false,
            failed_kns: Vec::new(),
        };
        let patience = self.patience();
        let map = self
            .cfg
            .manager_client(Duration::from_millis(300) * patience)
            .and_then(|mut m| {
                m.set_timeout(Duration::from_secs(2) * patience)?;
                m.map()
            });
        let Ok(map) = map else {
            s.manager_down = true;
            return s;
        };
        let addrs = self.kn_addrs();
        for (i, a) in addrs.iter().enumerate() {
            if !map.kns.iter().any(|(_, m)| m == a) {
                s.failed_kns.push(i);
            }
        }
        if map.kns.len() != addrs.len() || !map.settled || !s.failed_kns.is_empty() {
            return s;
        }
        let credentials = self.cfg.credentials().ok().flatten();
        let mut conns: Vec<Option<Conn>> = addrs
            .iter()
            .map(|a| {
                let t = Timeouts {
                    connect: PROBE_TIMEOUTS.connect.map(|d| d * patience),
                    reply: PROBE_TIMEOUTS.reply.map(|d| d * patience),
                };
                Conn::connect_as(a, t, credentials.as_ref()).ok()
            })
            .collect();
        let mut covered = 0usize;
        // Over verbs a probe is a group commit through the device (tens of milliseconds on
        // a software one), and a map has thousands of ranges: there every KN's first range
        // and an even sample of the others are probed, which still catches a KN (or a
        // shard) that does not serve.
        let stride = if self.cfg.fabric == "verbs" {
            (map.ranges.len() / VERBS_PROBES).max(1)
        } else {
            1
        };
        let mut probed = vec![false; addrs.len()];
        for (n, &(first, last, kn)) in map.ranges.iter().enumerate() {
            covered += usize::from(last - first) + 1;
            let Some(i) = map
                .addr_of(kn)
                .and_then(|a| addrs.iter().position(|x| x == a))
            else {
                return s;
            };
            if n % stride != 0 && probed[i] {
                continue;
            }
            probed[i] = true;
            let key = &self.probe_keys[first as usize];
            // The owner serves the slot when it answers the write definitely: `+OK`, or
            // `-OOM` while the region is full (the last round fills it).
            let ok = conns[i].as_mut().is_some_and(|c| {
                c.call(&[b"SET", key, b"probe"]).is_ok_and(|v| match v {
                    Value::Simple(s) => s == "OK",
                    Value::Error(e) => e.starts_with("OOM"),
                    _ => false,
                })
            });
            if !ok {
                conns[i] = None;
                if !s.failed_kns.contains(&i) {
                    s.failed_kns.push(i);
                }
            }
        }
        s.ok = s.failed_kns.is_empty() && covered == SLOTS as usize;
        s
    }

    /// Stops every process in order (KNs, manager, DPM); whether the DPM stopped cleanly.
    pub fn stop(mut self) -> bool {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for k in &mut self.kns {
            if k.exited().is_none() {
                let _ = kill(Pid::from_raw(k.child.id() as i32), Signal::SIGTERM);
            }
        }
        for k in &mut self.kns {
            k.stop(Duration::from_secs(20));
        }
        self.manager.stop(Duration::from_secs(10));
        self.dpm
            .stop(Duration::from_secs(60))
            .is_some_and(|s| s.success())
    }
}

/// Probes of the slots' owners: a live KN on loopback connects and answers quickly.
const PROBE_TIMEOUTS: Timeouts = Timeouts {
    connect: Some(Duration::from_millis(300)),
    reply: Some(Duration::from_secs(2)),
};

/// A DPM that exits this many times in a row within one recovery cannot open its region.
const MAX_DPM_EXITS: u32 = 5;

/// Shortest time between two starts of one process by the supervisor.
const RESTART_PAUSE: Duration = Duration::from_millis(500);

/// Index of a process in per-process tables: DPM, manager, then KNs.
fn slot_of(role: Role, kn: usize) -> usize {
    match role {
        Role::Dpm => 0,
        Role::Manager => 1,
        Role::Kn => 2 + kn,
    }
}

/// What one look at a recovering cluster (a DPM ping and a probe sweep) concludes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The DPM answers and every slot was served.
    Recovered,
    /// Still recovering: look again.
    Wait,
    /// Nothing moved for the stall deadline: restart what does not answer.
    Stalled,
}

/// Tells a cluster that is still recovering from one that is stuck. The deadline counts
/// from the last sign of progress: a process (re)started, a DPM that did not answer yet (its
/// recovery is not a stall), or a sweep in which every slot was served. A sweep takes one
/// probe round trip per slot range (thousands once slots have moved between KNs), so on a
/// busy machine it can outlast the deadline by itself; its time is never counted as a
/// stall when it ends with every slot served or began before the DPM answered, and a DPM
/// that came up during the sweep is asked again rather than taken as still absent.
#[derive(Debug)]
struct StallClock {
    stall: Duration,
    last_progress: Instant,
}

impl StallClock {
    fn new(stall: Duration, now: Instant) -> Self {
        Self {
            stall,
            last_progress: now,
        }
    }

    /// A process was started or restarted at `now`.
    fn acted(&mut self, now: Instant) {
        self.last_progress = now;
    }

    /// One look that began at `started` (the DPM answered then: `dpm_before`) and ended at
    /// `now` with a sweep that served every slot (`sweep_ok`) or not; `dpm_now` asks the DPM
    /// again, only when the answer matters.
    fn look(
        &mut self,
        started: Instant,
        dpm_before: bool,
        sweep_ok: bool,
        dpm_now: impl FnOnce() -> bool,
        now: Instant,
    ) -> Verdict {
        debug_assert!(started <= now);
        if sweep_ok {
            if dpm_before || dpm_now() {
                return Verdict::Recovered;
            }
            self.last_progress = now;
            return Verdict::Wait;
        }
        if !dpm_before {
            // Nothing can serve before the DPM does; its recovery is not a stall.
            self.last_progress = now;
            return Verdict::Wait;
        }
        if now.saturating_duration_since(self.last_progress) > self.stall {
            self.last_progress = now;
            return Verdict::Stalled;
        }
        Verdict::Wait
    }
}

/// Whether a DPM answers a ping (a killed DPM leaves its control file behind, and a new
/// one may get the same inode, so the file alone does not say).
fn dpm_answers(cfg: &UpConfig) -> bool {
    use dinomo_shared::msg::{Request, Response};
    // Through the control file beside the region, which a DPM serves over either fabric:
    // over verbs a probe would need a queue pair and the cluster secret for each ping.
    let spec = dinomo_hw::fabric::ServeSpec::Shm.local_client(cfg.region_path());
    spec.control().is_ok_and(|mut c| {
        matches!(
            c.call(&Request::Ping, Duration::from_millis(200)),
            Ok(Ok(Response::Pong))
        )
    })
}

/// How many slot ranges a sweep probes over verbs (besides each KN's first).
const VERBS_PROBES: usize = 64;

/// A key of every slot: `probe:N` for the first N that lands in it.
fn probe_keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Option<Vec<u8>>> = vec![None; SLOTS as usize];
    let mut left = SLOTS as usize;
    let mut n = 0u64;
    while left > 0 {
        let k = format!("probe:{n}").into_bytes();
        let slot = key_slot(&k) as usize;
        if keys[slot].is_none() {
            keys[slot] = Some(k);
            left -= 1;
        }
        n += 1;
    }
    keys.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(5);
    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_long_sweep_that_began_before_the_dpm_answered_ends_the_recovery() {
        // The DPM was restarted; the sweep began before it answered and, probing thousands
        // of slot ranges on a busy machine, took longer than the stall deadline, serving every
        // slot. The DPM answers by then: the cluster recovered, nothing is restarted.
        let t0 = Instant::now();
        let mut clock = StallClock::new(STALL, t0);
        assert_eq!(
            clock.look(t0, false, true, || true, t0 + s(15)),
            Verdict::Recovered
        );
    }

    #[test]
    fn a_sweep_that_served_every_slot_is_progress_while_the_dpm_is_still_away() {
        let t0 = Instant::now();
        let mut clock = StallClock::new(STALL, t0);
        assert_eq!(
            clock.look(t0, false, true, || false, t0 + s(15)),
            Verdict::Wait
        );
        // The next look (DPM up, a probe refused) counts from the end of that sweep.
        assert_eq!(
            clock.look(t0 + s(15), true, false, || true, t0 + s(19)),
            Verdict::Wait
        );
        assert_eq!(
            clock.look(t0 + s(19), true, false, || true, t0 + s(21)),
            Verdict::Stalled
        );
    }

    #[test]
    fn a_cluster_that_does_not_serve_with_the_dpm_up_stalls_after_the_deadline() {
        let t0 = Instant::now();
        let mut clock = StallClock::new(STALL, t0);
        let mut asked = false;
        assert_eq!(
            clock.look(
                t0,
                true,
                false,
                || {
                    asked = true;
                    true
                },
                t0 + s(2)
            ),
            Verdict::Wait
        );
        assert!(
            !asked,
            "the DPM is asked again only when the answer matters"
        );
        assert_eq!(
            clock.look(t0 + s(2), true, false, || true, t0 + s(6)),
            Verdict::Stalled
        );
        // Escalating restarts the clock, and so does restarting a process.
        assert_eq!(
            clock.look(t0 + s(6), true, false, || true, t0 + s(8)),
            Verdict::Wait
        );
        clock.acted(t0 + s(10));
        assert_eq!(
            clock.look(t0 + s(10), true, false, || true, t0 + s(14)),
            Verdict::Wait
        );
        // While the DPM does not answer, nothing stalls.
        assert_eq!(
            clock.look(t0 + s(14), false, false, || false, t0 + s(40)),
            Verdict::Wait
        );
    }
}
