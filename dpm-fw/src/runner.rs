//! The std runner of the memory node: merge workers pinned to cores, and a control thread
//! that answers KNs over the shm control switchboard.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::{default_ctl_path, Backoff, ControlServer, FabricError};
use dinomo_hw::region_file::{FilePersist, PersistenceDomain, RegionFile, RegionFileError};
use dinomo_hw::Persist;

use crate::dpm::{CompactConfig, Dpm, Scratch, DEFAULT_QUARANTINE_MS, DEFAULT_STEP};

/// How often an idle DPM thread (merge worker, control loop) looks for work: an idle
/// memory node sharing a host's cores should not take a tenth of one per thread.
const IDLE_POLL: Duration = Duration::from_millis(1);

/// How long a merge worker that found nothing to merge sleeps: the longest a written entry
/// waits before a pass merges it (readers never wait for it: a KN reads its own unmerged
/// writes from its log). Each wake-up costs a context switch or two, which on a host whose
/// cores the memory node shares with KNs comes out of their time.
const MERGE_POLL: Duration = Duration::from_micros(500);
use crate::region::OpenError;

/// How the runner is set up.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Merge worker threads.
    pub workers: usize,
    /// Pin worker `i` to core `(i + 1) % cores` (the control thread keeps core 0).
    pub pin: bool,
    /// Entries a worker merges from one log before moving to the next.
    pub step: u64,
    /// Control connections (KN shards) the switchboard accepts at once.
    pub ctl_slots: u32,
    /// Control file path; default: the region path with `.ctl` appended.
    pub ctl_path: Option<PathBuf>,
    /// How long blocks of a log closed by fencing its KN stay out of reuse (a paused KN
    /// may still land a WRITE in them).
    pub quarantine: Duration,
    /// Compaction settings; `None`: [`CompactConfig::default_for`] the region. Workers
    /// compact while free blocks are below the low watermark.
    pub compaction: Option<CompactConfig>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            pin: true,
            step: DEFAULT_STEP,
            ctl_slots: 64,
            ctl_path: None,
            quarantine: Duration::from_millis(DEFAULT_QUARANTINE_MS),
            compaction: None,
        }
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    File(#[from] RegionFileError),
    #[error("cannot open region {path}: {source}")]
    Open { path: PathBuf, source: OpenError },
    #[error("control switchboard: {0}")]
    Control(#[from] FabricError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot sync region {path} to its file: {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeReport {
    pub entries_merged: u64,
    pub control_messages: u64,
    pub recovery_time: Duration,
    pub uptime: Duration,
}

/// Compaction steps a merge worker may run per pass while free blocks are below the low
/// watermark: enough to free blocks as fast as a pass merges them in.
pub const COMPACT_STEPS_PER_PASS: usize = 8;

/// Merge worker threads over a shared [`Dpm`]; stopped (and joined) on drop.
#[derive(Debug)]
pub struct MergeWorkers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl MergeWorkers {
    /// Starts `cfg.workers` workers; worker `w` merges logs `w, w + workers, ...`. Each
    /// pass ticks the DPM's clock with the time since `epoch`.
    pub fn start<P: Persist + 'static>(
        dpm: &Arc<Dpm<P>>,
        cfg: &ServeConfig,
        merged: &Arc<AtomicU64>,
        epoch: Instant,
    ) -> Result<Self, ServeError> {
        if let Some(c) = cfg.compaction {
            dpm.set_compaction_config(c);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let workers = cfg.workers.max(1) as u32;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = Vec::new();
        for w in 0..workers {
            let (dpm, halt, merged) = (Arc::clone(dpm), Arc::clone(&stop), Arc::clone(merged));
            let (pin, step) = (cfg.pin, cfg.step);
            let core = (w as usize + 1) % cores;
            let spawned = std::thread::Builder::new()
                .name(format!("dpm-merge-{w}"))
                .spawn(move || {
                    if pin {
                        pin_to_core(core);
                    }
                    fault_point(&format!("dpm-merge-{w}"));
                    let mut scratch = Scratch::default();
                    // Merging is asynchronous: a worker that found nothing sleeps, so that
                    // entries gather for its next pass rather than it waking for each.
                    let mut backoff = Backoff::with_max_sleep(MERGE_POLL)
                        .sleep_only()
                        .idle_after(IDLE_POLL);
                    while !halt.load(Ordering::Acquire) {
                        dpm.tick(millis_since(epoch));
                        let n = dpm.merge_pass(w, workers, step, &mut scratch);
                        // While free blocks are short: up to COMPACT_STEPS_PER_PASS victims
                        // per pass (one block's entries each, by one worker at a time), so
                        // the merge of this worker's logs waits a bounded time. A failed step
                        // (no free log slot, index error) is retried on a later pass.
                        let mut compacted = false;
                        for _ in 0..COMPACT_STEPS_PER_PASS {
                            if !dpm.compaction_due() {
                                break;
                            }
                            match dpm.compact_step(false, &mut scratch) {
                                Ok(c) if c.victim.is_some() => compacted = true,
                                _ => break,
                            }
                        }
                        if n == 0 && !compacted {
                            backoff.snooze();
                        } else if n == 0 {
                            backoff.reset();
                        } else {
                            merged.fetch_add(n, Ordering::Relaxed);
                            backoff.reset();
                        }
                    }
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    let mut partial = Self { stop, threads };
                    partial.stop();
                    return Err(ServeError::Thread(e));
                }
            }
        }
        Ok(Self { stop, threads })
    }

    /// Stops and joins the workers (a merge step in progress completes first).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MergeWorkers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running memory node: merge workers and a control thread over a shared [`Dpm`].
#[derive(Debug)]
pub struct DpmService<P: Persist + 'static> {
    dpm: Arc<Dpm<P>>,
    cfg: ServeConfig,
    workers: Option<MergeWorkers>,
    stop: Arc<AtomicBool>,
    merged: Arc<AtomicU64>,
    messages: Arc<AtomicU64>,
    control: Option<JoinHandle<()>>,
    started: Instant,
}

impl<P: Persist + 'static> DpmService<P> {
    /// Starts `cfg.workers` merge workers and a control thread polling `control`. The
    /// DPM's clock counts from here (see [`Dpm::tick`]).
    pub fn start(
        dpm: Arc<Dpm<P>>,
        mut control: ControlServer,
        cfg: &ServeConfig,
    ) -> Result<Self, ServeError> {
        let started = Instant::now();
        dpm.set_quarantine_ms(u64::try_from(cfg.quarantine.as_millis()).unwrap_or(u64::MAX));
        let stop = Arc::new(AtomicBool::new(false));
        let merged = Arc::new(AtomicU64::new(0));
        let messages = Arc::new(AtomicU64::new(0));
        let workers = MergeWorkers::start(&dpm, cfg, &merged, started)?;
        let (cdpm, cstop, cmsgs) = (Arc::clone(&dpm), Arc::clone(&stop), Arc::clone(&messages));
        let pin = cfg.pin;
        let h = std::thread::Builder::new()
            .name("dpm-control".into())
            .spawn(move || {
                if pin {
                    pin_to_core(0);
                }
                fault_point("dpm-control");
                let mut scratch = Scratch::default();
                let mut last_reap = Instant::now();
                serve_loop(&cstop, &cmsgs, Backoff::new().idle_after(IDLE_POLL), || {
                    // Fencing reads the clock: keep it current for the control thread too.
                    cdpm.tick(millis_since(started));
                    let n = control.poll(|_, frame| Some(cdpm.handle(frame, &mut scratch)));
                    if last_reap.elapsed() > Duration::from_millis(200) {
                        control.reap_dead();
                        last_reap = Instant::now();
                    }
                    n
                });
            })
            .map_err(ServeError::Thread)?;
        Ok(Self {
            dpm,
            cfg: cfg.clone(),
            workers: Some(workers),
            stop,
            merged,
            messages,
            control: Some(h),
            started,
        })
    }

    pub fn dpm(&self) -> &Arc<Dpm<P>> {
        &self.dpm
    }

    /// Entries merged by the workers so far.
    pub fn entries_merged(&self) -> u64 {
        self.merged.load(Ordering::Relaxed)
    }

    /// Stops the merge workers; control messages are still answered (a `MergeAll` request
    /// still merges, on the control thread).
    pub fn pause_merging(&mut self) {
        if let Some(mut w) = self.workers.take() {
            w.stop();
        }
    }

    /// Starts the merge workers again after [`DpmService::pause_merging`].
    pub fn resume_merging(&mut self) -> Result<(), ServeError> {
        if self.workers.is_none() {
            self.workers = Some(MergeWorkers::start(
                &self.dpm,
                &self.cfg,
                &self.merged,
                self.started,
            )?);
        }
        Ok(())
    }

    /// Stops the threads, merges every log to its tail and marks a clean shutdown.
    pub fn stop(mut self) -> ServeReport {
        self.shutdown();
        ServeReport {
            entries_merged: self.merged.load(Ordering::Relaxed),
            control_messages: self.messages.load(Ordering::Relaxed),
            recovery_time: Duration::ZERO,
            uptime: self.started.elapsed(),
        }
    }

    fn shutdown(&mut self) {
        let Some(control) = self.control.take() else {
            return;
        };
        self.pause_merging();
        self.stop.store(true, Ordering::Release);
        let _ = control.join();
        self.dpm.shutdown_clean(&mut Scratch::default());
    }
}

impl<P: Persist + 'static> Drop for DpmService<P> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs `poll` (which returns how many control messages it handled) until `stop` is set,
/// backing off while idle and counting the messages.
fn serve_loop(
    stop: &AtomicBool,
    messages: &AtomicU64,
    mut backoff: Backoff,
    mut poll: impl FnMut() -> usize,
) {
    while !stop.load(Ordering::Acquire) {
        let n = poll();
        if n == 0 {
            backoff.snooze();
        } else {
            messages.fetch_add(n as u64, Ordering::Relaxed);
            backoff.reset();
        }
    }
}

/// Fault injection for tests of what a panicking thread does to its process: with
/// `DINOMO_FAULT_PANIC=<thread name>` in the environment (`dpm-merge-0`, `dpm-control`,
/// `dpm-verbs`), that runner thread panics as it starts. Compiled into debug builds only;
/// a release build ignores the variable.
#[cfg(debug_assertions)]
pub fn fault_point(thread: &str) {
    if std::env::var("DINOMO_FAULT_PANIC").is_ok_and(|t| t == thread) {
        panic!("fault injected by DINOMO_FAULT_PANIC={thread}");
    }
}

/// Release builds have no fault injection.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn fault_point(_thread: &str) {}

/// Milliseconds since `epoch`, the DPM's clock reading.
fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Pins the calling thread to `core`; a failure is logged and otherwise ignored (the
/// runner still works unpinned, e.g. in a container with a restricted CPU set).
fn pin_to_core(core: usize) {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    if let Err(e) = set
        .set(core)
        .and_then(|_| sched_setaffinity(Pid::from_raw(0), &set))
    {
        tracing::warn!(core, error = %e, "cannot pin thread to core; running unpinned");
    }
}

/// Says where the region's persisted writes are durable (docs/DESIGN.md, "Persistence
/// domain"): a DAX mapping with `MAP_SYNC`, or the page cache, which is not persistent
/// memory (the file is brought up to date on a clean shutdown).
pub fn log_persistence_domain(file: &RegionFile) {
    match file.persistence_domain() {
        PersistenceDomain::Dax => tracing::info!(
            region = %file.path().display(),
            "region mapped with MAP_SYNC (DAX): a persisted write is on the media"
        ),
        _ => tracing::info!(
            region = %file.path().display(),
            "region mapped through the page cache (no DAX, MAP_SYNC unavailable): a \
             persisted write survives process crashes; it reaches the file at msync or a \
             clean shutdown, and on tmpfs lives in RAM only"
        ),
    }
}

/// Opens (recovering if needed) the region file at `path` and serves it until `stop` is
/// set; then merges everything, marks a clean shutdown and syncs the file.
pub fn serve(path: &Path, cfg: &ServeConfig, stop: &AtomicBool) -> Result<ServeReport, ServeError> {
    let file = RegionFile::open(path)?;
    file.lock_exclusive()?;
    let t0 = Instant::now();
    let dpm: Dpm<FilePersist> = Dpm::open(file.pmem()).map_err(|source| ServeError::Open {
        path: path.to_owned(),
        source,
    })?;
    let recovery_time = t0.elapsed();
    let ctl_path = cfg
        .ctl_path
        .clone()
        .unwrap_or_else(|| default_ctl_path(path));
    let control = ControlServer::create(&ctl_path, cfg.ctl_slots)?;
    log_persistence_domain(&file);
    tracing::info!(
        region = %path.display(),
        control = %ctl_path.display(),
        workers = cfg.workers,
        recovery_ms = recovery_time.as_secs_f64() * 1e3,
        "dpm serving"
    );
    let service = DpmService::start(Arc::new(dpm), control, cfg)?;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut report = service.stop();
    report.recovery_time = recovery_time;
    file.sync().map_err(|source| ServeError::Sync {
        path: path.to_owned(),
        source,
    })?;
    let _ = std::fs::remove_file(&ctl_path);
    Ok(report)
}

// ----- RDMA verbs control endpoint (feature `rdma`) -----

#[cfg(feature = "rdma")]
pub use verbs_serve::{serve_verbs, VerbsControl, VerbsServeConfig, VerbsServeError};

#[cfg(feature = "rdma")]
mod verbs_serve {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use dinomo_hw::fabric::verbs::{VerbsConfig, VerbsServer, DEFAULT_TCP_PORT};
    use dinomo_hw::fabric::{default_ctl_path, Backoff, ControlServer, FabricError};
    use dinomo_hw::region_file::{FilePersist, RegionFile};
    use dinomo_hw::Persist;

    use super::{pin_to_core, DpmService, ServeConfig, ServeError, ServeReport};
    use crate::dpm::{Dpm, Scratch};

    /// Where and how the DPM serves KNs over verbs.
    #[derive(Clone, Debug)]
    pub struct VerbsServeConfig {
        /// RDMA device (`None`: the first one).
        pub device: Option<String>,
        /// TCP address for the connection exchange.
        pub listen: SocketAddr,
        /// Connection settings; `verbs.secret` authenticates the handshake (required
        /// unless `listen` is loopback).
        pub verbs: VerbsConfig,
    }

    impl Default for VerbsServeConfig {
        fn default() -> Self {
            Self {
                device: None,
                // Loopback unless told otherwise; any other address needs the secret.
                listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_TCP_PORT)),
                verbs: VerbsConfig::default(),
            }
        }
    }

    /// Why serving over verbs failed.
    #[derive(Debug, thiserror::Error)]
    pub enum VerbsServeError {
        #[error(transparent)]
        Fabric(#[from] FabricError),
        #[error(transparent)]
        Serve(#[from] ServeError),
    }

    /// A thread feeding control frames from a [`VerbsServer`] to [`Dpm::handle`], beside
    /// the shm switchboard's control thread of a [`DpmService`].
    #[derive(Debug)]
    pub struct VerbsControl {
        stop: Arc<AtomicBool>,
        messages: Arc<AtomicU64>,
        thread: Option<JoinHandle<()>>,
    }

    impl VerbsControl {
        /// Starts serving `server`'s connections with `dpm`.
        pub fn start<P: Persist + 'static>(
            dpm: Arc<Dpm<P>>,
            mut server: VerbsServer,
            pin: bool,
        ) -> Result<Self, ServeError> {
            let stop = Arc::new(AtomicBool::new(false));
            let messages = Arc::new(AtomicU64::new(0));
            let (s, m) = (Arc::clone(&stop), Arc::clone(&messages));
            let thread = std::thread::Builder::new()
                .name("dpm-verbs".into())
                .spawn(move || {
                    if pin {
                        pin_to_core(0);
                    }
                    super::fault_point("dpm-verbs");
                    let mut scratch = Scratch::default();
                    let backoff = Backoff::with_max_sleep(Duration::from_micros(50))
                        .idle_after(super::IDLE_POLL);
                    // Fences already recorded belong to connections that no longer exist.
                    let mut fences = 0;
                    dpm.fenced_since(&mut fences, |_| {});
                    // A KN fenced before this DPM (re)started is still refused: its lease
                    // row says the lease ended, until the manager stores a new one.
                    for kn in ended_leases(&dpm) {
                        server.revoke(kn);
                    }
                    let mut readmit = Vec::new();
                    super::serve_loop(&s, &m, backoff, || {
                        let n = server.poll(|_, frame| {
                            let reply = dpm.handle(frame, &mut scratch);
                            if let Some(kn) = new_lease(frame, &reply) {
                                readmit.push(kn);
                            }
                            Some(reply)
                        });
                        // A KN given a new lease (it registered again) may connect again.
                        for kn in readmit.drain(..) {
                            server.readmit(kn);
                        }
                        // A fenced KN's queue pairs go to error: on verbs, unlike shm, a KN
                        // that was only paused loses its access to the region.
                        let missed = dpm.fenced_since(&mut fences, |kn| {
                            server.revoke(kn);
                        });
                        if missed > 0 {
                            tracing::warn!(missed, "fences were recorded faster than revoked");
                        }
                        for e in server.drain_events() {
                            tracing::info!(device = server.device_name(), "{e}");
                        }
                        n
                    });
                })
                .map_err(ServeError::Thread)?;
            Ok(Self {
                stop,
                messages,
                thread: Some(thread),
            })
        }

        /// Control messages handled so far.
        pub fn messages(&self) -> u64 {
            self.messages.load(Ordering::Relaxed)
        }

        /// Stops the thread (closing every KN connection); returns the messages handled.
        pub fn stop(mut self) -> u64 {
            self.shutdown();
            self.messages()
        }

        fn shutdown(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    impl Drop for VerbsControl {
        fn drop(&mut self) {
            self.shutdown();
        }
    }

    /// The KNs whose stored lease row is in use but ended (the manager fenced them and
    /// recorded it): the handshake refuses them until they register again.
    fn ended_leases<P: Persist>(dpm: &Dpm<P>) -> Vec<u32> {
        (0..dpm.geometry().max_kns)
            .filter(|&kn| {
                dpm.lease(kn)
                    .is_some_and(|l| l.kn_id != 0 && l.expires_ms == 0)
            })
            .collect()
    }

    /// The KN a request stored a live lease for, if it is one that did (`StoreLease` with
    /// an expiry, answered without error): the manager registered that KN again.
    fn new_lease(
        frame: &dinomo_shared::msg::Frame,
        reply: &dinomo_shared::msg::Frame,
    ) -> Option<u32> {
        use dinomo_shared::msg::{Request, Response};
        match Request::decode(frame).ok()? {
            Request::StoreLease { kn, expires_ms, .. }
                if expires_ms > 0 && matches!(Response::decode(reply), Ok(Ok(_))) =>
            {
                Some(kn)
            }
            _ => None,
        }
    }

    /// [`super::serve`] plus a verbs endpoint: KNs reach the region with one-sided verbs
    /// and send control frames over RDMA SEND (the shm switchboard is served as well).
    /// The device is opened before the region, so a host without RDMA fails at once.
    pub fn serve_verbs(
        path: &Path,
        cfg: &ServeConfig,
        vcfg: &VerbsServeConfig,
        stop: &AtomicBool,
    ) -> Result<ServeReport, VerbsServeError> {
        vcfg.verbs.validate()?;
        dinomo_hw::fabric::verbs::handshake::check_listen(vcfg.listen, vcfg.verbs.secret.as_ref())?;
        // Fail fast on a host without the device, before recovery work.
        dinomo_hw::fabric::verbs::device_names()?;
        let file = RegionFile::open(path).map_err(ServeError::from)?;
        file.lock_exclusive().map_err(ServeError::from)?;
        let t0 = Instant::now();
        let dpm: Dpm<FilePersist> = Dpm::open(file.pmem()).map_err(|source| ServeError::Open {
            path: path.to_owned(),
            source,
        })?;
        let recovery_time = t0.elapsed();
        // A second handle on the same mapping keeps it registered while the server lives.
        let server = VerbsServer::bind(
            vcfg.device.as_deref(),
            vcfg.listen,
            Arc::new(file.pmem()),
            &vcfg.verbs,
        )?;
        let ctl_path = cfg
            .ctl_path
            .clone()
            .unwrap_or_else(|| default_ctl_path(path));
        let control = ControlServer::create(&ctl_path, cfg.ctl_slots).map_err(ServeError::from)?;
        super::log_persistence_domain(&file);
        tracing::info!(
            region = %path.display(),
            device = server.device_name(),
            listen = %vcfg.listen,
            authenticated = vcfg.verbs.secret.is_some(),
            control = %ctl_path.display(),
            workers = cfg.workers,
            recovery_ms = recovery_time.as_secs_f64() * 1e3,
            "dpm serving over verbs"
        );
        let dpm = Arc::new(dpm);
        let service = DpmService::start(Arc::clone(&dpm), control, cfg)?;
        let verbs = VerbsControl::start(dpm, server, cfg.pin)?;
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let verbs_messages = verbs.stop();
        let mut report = service.stop();
        report.recovery_time = recovery_time;
        report.control_messages += verbs_messages;
        file.sync().map_err(|source| ServeError::Sync {
            path: path.to_owned(),
            source,
        })?;
        let _ = std::fs::remove_file(&ctl_path);
        Ok(report)
    }
}
