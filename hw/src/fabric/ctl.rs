//! The control switchboard: 64-byte request/response frames between KNs and the DPM through
//! shared memory.
//!
//! A *control block* — a file next to the region (see [`default_ctl_path`]) or, for
//! in-process clusters, a heap allocation — holds a header and `M` connection slots. Each slot
//! has a state word, a request ring (KN → DPM) and a response ring (DPM → KN):
//!
//! ```text
//!   0                 header line: magic, version, slots, ring capacity, server pid, server state
//!  64 + i × stride    slot i: state line (state word, server-busy word)
//!                             request ring   (ring_bytes(capacity))
//!                             response ring  (ring_bytes(capacity))
//! ```
//!
//! A client claims a FREE slot by compare-and-swap, writing its pid and a new generation
//! number; the DPM ([`ControlServer`]) serves every CLAIMED slot. Releasing a slot must not
//! race with the server still answering on it (a late reply would reach the slot's next
//! owner), so the server marks a slot *busy* while it works on it and re-checks the state
//! word; the releasing client marks the slot CLOSING and waits for *busy* to clear before it
//! empties the rings and frees the slot. Both sides use sequentially consistent accesses for
//! this hand-off, so at least one of them sees the other. Slots of processes that died are
//! freed by [`ControlServer::reap_dead`].

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::msg::{Frame, Request, Response};
use memmap2::{MmapOptions, MmapRaw};

use super::ring::{ring_bytes, HeapBlock, RingView};
use super::{ControlChannel, FabricError};

/// Identifies an initialised control block ("DNMOCTL1").
pub const CTL_MAGIC: u64 = u64::from_le_bytes(*b"DNMOCTL1");
/// Layout version of the control block.
pub const CTL_VERSION: u64 = 1;
/// Frames per ring unless configured otherwise: enough for a pipelined burst of requests.
pub const DEFAULT_RING_CAPACITY: u32 = 64;
/// Upper bound on connection slots, to keep a corrupt header from mapping absurd sizes.
pub const MAX_SLOTS: u32 = 4096;

const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_SLOTS: usize = 16;
const H_RING_CAP: usize = 24;
const H_SERVER_PID: usize = 32;
const H_SERVER_STATE: usize = 40;
const HEADER_BYTES: usize = 64;

const SERVER_RUNNING: u64 = 1;
const SERVER_STOPPED: u64 = 2;

// State word: bits 0-1 tag, bits 2-31 claimant pid, bits 32-63 generation.
const TAG_MASK: u64 = 0b11;
const TAG_FREE: u64 = 0;
const TAG_CLAIMED: u64 = 1;
const TAG_CLOSING: u64 = 2;
/// Being emptied by whoever won the race to free a CLOSING or dead slot.
const TAG_RESETTING: u64 = 3;
const PID_LIMIT: u32 = 1 << 30;

const fn state_word(tag: u64, pid: u32, generation: u32) -> u64 {
    tag | (pid as u64) << 2 | (generation as u64) << 32
}
const fn state_tag(s: u64) -> u64 {
    s & TAG_MASK
}
const fn state_pid(s: u64) -> u32 {
    ((s >> 2) & (PID_LIMIT as u64 - 1)) as u32
}
const fn state_gen(s: u64) -> u32 {
    (s >> 32) as u32
}

/// The control file that goes with a region file: the region path with `.ctl` appended.
pub fn default_ctl_path(region_path: &Path) -> PathBuf {
    let mut s = region_path.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// Waits without burning a core: spins briefly, then yields, then sleeps in growing steps
/// up to a cap (the DPM control thread and KN threads share few cores).
#[derive(Clone, Debug)]
pub struct Backoff {
    step: u32,
    /// Where [`Backoff::reset`] starts over: 0, or past the spins and yields.
    first: u32,
    max_sleep: Duration,
    /// The sleep once idle for [`Backoff::IDLE_SLEEPS`] sleeps (none: `max_sleep` stays).
    idle_sleep: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    const SPINS: u32 = 64;
    const YIELDS: u32 = 16;

    /// Sleeps after which a loop counts as idle ([`Backoff::idle_after`]).
    const IDLE_SLEEPS: u32 = 2000;

    /// Sleeps capped at 100 µs.
    pub const fn new() -> Self {
        Self {
            step: 0,
            first: 0,
            max_sleep: Duration::from_micros(100),
            idle_sleep: None,
        }
    }
    /// Sleeps capped at `max_sleep`.
    pub const fn with_max_sleep(max_sleep: Duration) -> Self {
        Self {
            step: 0,
            first: 0,
            max_sleep,
            idle_sleep: None,
        }
    }
    /// Sleeps of `sleep` once nothing happened for 2000 sleeps (at least 0.2 s at the
    /// 100 µs cap): a polling loop of an idle server then costs a few wake-ups a
    /// millisecond instead of ten, and the first message after a long idle time waits at
    /// most `sleep` more.
    pub const fn idle_after(mut self, sleep: Duration) -> Self {
        self.idle_sleep = Some(sleep);
        self
    }
    /// Waits a little longer than last time.
    pub fn snooze(&mut self) {
        if self.step < Self::SPINS {
            std::hint::spin_loop();
        } else if self.step < Self::SPINS + Self::YIELDS {
            std::thread::yield_now();
        } else {
            let slept = self.step - Self::SPINS - Self::YIELDS;
            let sleep = match self.idle_sleep {
                Some(idle) if slept >= Self::IDLE_SLEEPS => idle,
                _ => Duration::from_micros(5u64 << slept.min(10)).min(self.max_sleep),
            };
            std::thread::sleep(sleep);
        }
        self.step = self.step.saturating_add(1);
    }
    /// Sleeps from the first snooze on, never spinning or yielding, for loops whose work
    /// is off every request's path (the DPM's merge workers), where a spin buys no latency
    /// anyone waits for and takes a core from the processes that serve requests.
    /// Every sleep is `max_sleep` long: work that comes within it waits for the next wake.
    pub const fn sleep_only(mut self) -> Self {
        // Past the growing sleeps too: 5 µs << 10 is above any cap.
        self.first = Self::SPINS + Self::YIELDS + 10;
        self.step = self.first;
        self
    }
    /// Starts over (after progress).
    pub fn reset(&mut self) {
        self.step = self.first;
    }
    /// Whether the next snooze will sleep rather than spin or yield.
    pub fn is_sleeping(&self) -> bool {
        self.step >= Self::SPINS + Self::YIELDS
    }
}

/// Whether process `pid` exists (it may belong to another user).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 performs only the existence and permission check; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The memory of a control block.
enum Backing {
    Heap {
        _block: HeapBlock,
    },
    File {
        _map: MmapRaw,
        _file: File,
        path: PathBuf,
    },
}

struct CtlMem {
    backing: Backing,
    base: *mut u8,
    len: usize,
    slots: u32,
    ring_capacity: u32,
}

// SAFETY: the block is only accessed through atomics (header and state words, `RingView`s);
// the backing memory is owned here and lives as long as the `CtlMem`.
unsafe impl Send for CtlMem {}
// SAFETY: as above.
unsafe impl Sync for CtlMem {}

impl fmt::Debug for CtlMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CtlMem")
            .field("path", &self.path())
            .field("slots", &self.slots)
            .field("ring_capacity", &self.ring_capacity)
            .finish()
    }
}

const fn slot_stride(ring_capacity: u32) -> usize {
    64 + 2 * ring_bytes(ring_capacity)
}

const fn block_bytes(slots: u32, ring_capacity: u32) -> usize {
    HEADER_BYTES + slots as usize * slot_stride(ring_capacity)
}

/// The parts of one connection slot.
#[derive(Clone, Copy, Debug)]
struct SlotView {
    state: *const AtomicU64,
    busy: *const AtomicU64,
    req: RingView,
    resp: RingView,
}

impl CtlMem {
    fn path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Heap { .. } => None,
            Backing::File { path, .. } => Some(path),
        }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len,
            "control word {off} outside the block"
        );
        // SAFETY: `off` is 8-aligned (base is page or 64 aligned) and inside the block, which
        // lives as long as `self` and is accessed only atomically.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    /// Writes a fresh header and empty slots. The magic goes last, so a client that maps the
    /// block early sees "not initialised" rather than half a header.
    fn init(&self, server_pid: u32) -> Result<(), FabricError> {
        self.word(H_MAGIC).store(0, Ordering::Release);
        self.word(H_VERSION).store(CTL_VERSION, Ordering::Relaxed);
        self.word(H_SLOTS)
            .store(self.slots as u64, Ordering::Relaxed);
        self.word(H_RING_CAP)
            .store(self.ring_capacity as u64, Ordering::Relaxed);
        self.word(H_SERVER_PID)
            .store(server_pid as u64, Ordering::Relaxed);
        self.word(H_SERVER_STATE)
            .store(SERVER_RUNNING, Ordering::Relaxed);
        let cap = self.ring_capacity;
        for i in 0..self.slots {
            let off = HEADER_BYTES + i as usize * slot_stride(cap);
            self.word(off)
                .store(state_word(TAG_FREE, 0, 0), Ordering::Relaxed);
            self.word(off + 8).store(0, Ordering::Relaxed);
            for r in 0..2 {
                let roff = off + 64 + r * ring_bytes(cap);
                // SAFETY: the ring's bytes lie inside the block (`block_bytes` covers every
                // slot), which outlives the view; nobody else uses it before the magic is set.
                unsafe { RingView::init(self.base.add(roff), ring_bytes(cap), cap) }
                    .map_err(|e| FabricError::Other(format!("control ring: {e}")))?;
            }
        }
        self.word(H_MAGIC).store(CTL_MAGIC, Ordering::Release);
        Ok(())
    }

    /// Reads and checks the header of a block made by the server, filling in its geometry.
    fn validate(&mut self) -> Result<(), FabricError> {
        let what = || {
            self.path().map_or_else(
                || "in-memory control block".to_owned(),
                |p| p.display().to_string(),
            )
        };
        if self.len < HEADER_BYTES {
            return Err(FabricError::NotRunning(format!(
                "control file {} is empty",
                what()
            )));
        }
        let magic = self.word(H_MAGIC).load(Ordering::Acquire);
        if magic != CTL_MAGIC {
            return Err(FabricError::NotRunning(format!(
                "control file {} is not initialised (magic {magic:#x})",
                what()
            )));
        }
        let version = self.word(H_VERSION).load(Ordering::Relaxed);
        let slots = self.word(H_SLOTS).load(Ordering::Relaxed);
        let cap = self.word(H_RING_CAP).load(Ordering::Relaxed);
        if version != CTL_VERSION {
            return Err(FabricError::Other(format!(
                "control file {} has layout version {version}, expected {CTL_VERSION}",
                what()
            )));
        }
        let ok_geometry = slots <= MAX_SLOTS as u64
            && cap.is_power_of_two()
            && cap <= 1 << 16
            && block_bytes(slots as u32, cap as u32) <= self.len;
        if !ok_geometry {
            return Err(FabricError::Other(format!(
                "control file {} has a bad geometry ({slots} slots, rings of {cap}, {} bytes)",
                what(),
                self.len
            )));
        }
        self.slots = slots as u32;
        self.ring_capacity = cap as u32;
        for i in 0..self.slots {
            self.slot(i)?;
        }
        Ok(())
    }

    fn slot(&self, i: u32) -> Result<SlotView, FabricError> {
        let cap = self.ring_capacity;
        let off = HEADER_BYTES + i as usize * slot_stride(cap);
        let attach = |roff: usize| {
            // SAFETY: the ring lies inside the block (geometry validated), which outlives every
            // view handed out by this `CtlMem`; all parties access it atomically.
            unsafe { RingView::attach(self.base.add(roff), ring_bytes(cap)) }
                .map_err(|e| FabricError::Other(format!("control slot {i}: {e}")))
        };
        Ok(SlotView {
            state: self.word(off),
            busy: self.word(off + 8),
            req: attach(off + 64)?,
            resp: attach(off + 64 + ring_bytes(cap))?,
        })
    }

    fn server_state(&self) -> u64 {
        self.word(H_SERVER_STATE).load(Ordering::Acquire)
    }

    fn server_pid(&self) -> u32 {
        self.word(H_SERVER_PID).load(Ordering::Relaxed) as u32
    }

    /// Why the server cannot answer, if it cannot.
    fn server_gone(&self) -> Option<String> {
        if self.server_state() == SERVER_STOPPED {
            return Some("the DPM closed the control channel".to_owned());
        }
        let pid = self.server_pid();
        if pid != 0 && !pid_alive(pid) {
            return Some(format!("the DPM process (pid {pid}) has exited"));
        }
        None
    }
}

impl SlotView {
    fn state(&self) -> &AtomicU64 {
        // SAFETY: points into the control block, which the owner of this view keeps alive.
        unsafe { &*self.state }
    }
    fn busy(&self) -> &AtomicU64 {
        // SAFETY: as for `state`.
        unsafe { &*self.busy }
    }
    /// Empties both rings and frees the slot if its state is still `from`; only when no
    /// party uses the rings. The intermediate RESETTING state makes exactly one of several
    /// would-be freers do it, and keeps the slot unclaimable until the rings are empty.
    fn try_free(&self, from: u64) -> bool {
        let resetting = (from & !TAG_MASK) | TAG_RESETTING;
        if self
            .state()
            .compare_exchange(from, resetting, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.req.reset();
        self.resp.reset();
        self.state()
            .store(state_word(TAG_FREE, 0, state_gen(from)), Ordering::SeqCst);
        true
    }
}

/// One connection, as the server sees it: the slot and the generation of its current claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub generation: u32,
}

/// A cloneable handle to an in-memory (or file) control block, for making clients in other
/// threads while the server is owned elsewhere.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    mem: Arc<CtlMem>,
}

impl ControlHandle {
    /// Claims a free slot.
    pub fn client(&self) -> Result<ControlClient, FabricError> {
        ControlClient::claim(Arc::clone(&self.mem), 0)
    }
}

/// The DPM side of the switchboard.
#[derive(Debug)]
pub struct ControlServer {
    mem: Arc<CtlMem>,
    slots: Vec<SlotView>,
    /// Replies that did not fit in a response ring, with the state word they belong to.
    outbox: Vec<(u64, VecDeque<Frame>)>,
}

// SAFETY: the raw pointers in `slots` point into `mem`, which the server keeps alive and
// which is only accessed atomically.
unsafe impl Send for ControlServer {}

impl ControlServer {
    /// Creates (replacing any old one) a control file with `slots` connection slots. The DPM
    /// owns the file; it is removed when the server is dropped.
    pub fn create(path: &Path, slots: u32) -> Result<Self, FabricError> {
        Self::create_with(path, slots, DEFAULT_RING_CAPACITY)
    }

    /// As [`ControlServer::create`], with rings of `ring_capacity` frames (a power of two).
    pub fn create_with(path: &Path, slots: u32, ring_capacity: u32) -> Result<Self, FabricError> {
        check_geometry(slots, ring_capacity)?;
        let io = |what, source| FabricError::ControlFile {
            what,
            path: path.to_owned(),
            source,
        };
        // The block is built under a temporary name and renamed into place once it is
        // initialised, so a client that finds the file never sees a half-made block. A new
        // file rather than truncating the old one: clients still mapping a previous file
        // keep seeing it as stopped instead of having their slots wiped underneath them.
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        // Mode 0600 in a folder only this user controls: whoever can write the control
        // block can speak for any KN, and whoever can read it sees every request.
        let file = crate::region_file::create_private_file(&tmp)
            .map_err(|e| FabricError::Other(format!("control file: {e}")))?;
        let built = (|| {
            let len = block_bytes(slots, ring_capacity);
            file.set_len(len as u64).map_err(|e| io("size", e))?;
            let map = MmapOptions::new()
                .len(len)
                .map_raw(&file)
                .map_err(|e| io("map", e))?;
            let base = map.as_mut_ptr();
            let mem = CtlMem {
                backing: Backing::File {
                    _map: map,
                    _file: file,
                    path: path.to_owned(),
                },
                base,
                len,
                slots,
                ring_capacity,
            };
            let server = Self::start(mem, std::process::id())?;
            std::fs::rename(&tmp, path).map_err(|e| io("publish", e))?;
            Ok(server)
        })();
        if built.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        built
    }

    /// A control block in this process's memory, for in-process clusters and tests.
    pub fn in_memory(slots: u32) -> Self {
        match Self::in_memory_with(slots, DEFAULT_RING_CAPACITY) {
            Ok(s) => s,
            // The default ring capacity is valid, so only an absurd slot count gets here.
            Err(e) => panic!("{e}"),
        }
    }

    /// As [`ControlServer::in_memory`], with rings of `ring_capacity` frames.
    pub fn in_memory_with(slots: u32, ring_capacity: u32) -> Result<Self, FabricError> {
        check_geometry(slots, ring_capacity)?;
        let block = HeapBlock::new(block_bytes(slots, ring_capacity));
        let (base, len) = (block.as_ptr(), block.len());
        let mem = CtlMem {
            backing: Backing::Heap { _block: block },
            base,
            len,
            slots,
            ring_capacity,
        };
        Self::start(mem, 0)
    }

    fn start(mem: CtlMem, pid: u32) -> Result<Self, FabricError> {
        mem.init(pid)?;
        let slots = (0..mem.slots)
            .map(|i| mem.slot(i))
            .collect::<Result<Vec<_>, _>>()?;
        let outbox = vec![(0, VecDeque::new()); slots.len()];
        Ok(Self {
            mem: Arc::new(mem),
            slots,
            outbox,
        })
    }

    /// A handle for making in-process clients.
    pub fn handle(&self) -> ControlHandle {
        ControlHandle {
            mem: Arc::clone(&self.mem),
        }
    }

    /// Claims a free slot from this process (pid 0 for in-memory blocks).
    pub fn client(&self) -> Result<ControlClient, FabricError> {
        self.handle().client()
    }

    /// The control file, if file-backed.
    pub fn path(&self) -> Option<&Path> {
        self.mem.path()
    }

    /// Connection slots.
    pub fn slot_count(&self) -> u32 {
        self.mem.slots
    }

    /// Slots currently claimed.
    pub fn connections(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| state_tag(s.state().load(Ordering::Acquire)) == TAG_CLAIMED)
            .count()
    }

    /// Serves every claimed slot: takes each waiting request, passes it to `handler`, and
    /// queues the reply it returns (if any). Returns the number of requests handled.
    pub fn poll(&mut self, mut handler: impl FnMut(ConnId, &Frame) -> Option<Frame>) -> usize {
        let mut handled = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let s = slot.state().load(Ordering::Acquire);
            match state_tag(s) {
                TAG_CLAIMED => {}
                TAG_CLOSING => {
                    // This server is not busy on the slot, so its client may free it at any
                    // moment; if it gave up waiting, free it here (`try_free` picks one).
                    slot.try_free(s);
                    continue;
                }
                _ => continue,
            }
            slot.busy().store(s, Ordering::SeqCst);
            if slot.state().load(Ordering::SeqCst) != s {
                slot.busy().store(0, Ordering::Release);
                continue;
            }
            let conn = ConnId {
                slot: i as u32,
                generation: state_gen(s),
            };
            let (owner, outbox) = &mut self.outbox[i];
            if *owner != s {
                *owner = s;
                outbox.clear();
            }
            while let Some(f) = outbox.front() {
                if !slot.resp.push(f) {
                    break;
                }
                outbox.pop_front();
            }
            // At most one ring's worth per poll, so one chatty client cannot starve others.
            for _ in 0..slot.req.capacity() {
                let Some(req) = slot.req.pop() else { break };
                handled += 1;
                if let Some(reply) = handler(conn, &req) {
                    if !outbox.is_empty() || !slot.resp.push(&reply) {
                        outbox.push_back(reply);
                    }
                }
            }
            slot.busy().store(0, Ordering::SeqCst);
        }
        handled
    }

    /// Frees slots whose claimant process no longer exists (and slots left closing).
    /// Returns how many were freed.
    pub fn reap_dead(&mut self) -> usize {
        let mut freed = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let s = slot.state().load(Ordering::Acquire);
            let dead = match state_tag(s) {
                TAG_CLAIMED => state_pid(s) != 0 && !pid_alive(state_pid(s)),
                TAG_CLOSING => true,
                _ => false,
            };
            if dead && slot.try_free(s) {
                self.outbox[i].1.clear();
                freed += 1;
            }
        }
        freed
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.mem
            .word(H_SERVER_STATE)
            .store(SERVER_STOPPED, Ordering::Release);
        if let Some(path) = self.mem.path() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn check_geometry(slots: u32, ring_capacity: u32) -> Result<(), FabricError> {
    if slots == 0 || slots > MAX_SLOTS {
        return Err(FabricError::Other(format!(
            "control slots must be 1..={MAX_SLOTS}, not {slots}"
        )));
    }
    if !ring_capacity.is_power_of_two() || ring_capacity > 1 << 16 {
        return Err(FabricError::Other(format!(
            "control ring capacity must be a power of two up to 65536, not {ring_capacity}"
        )));
    }
    Ok(())
}

/// The KN side of one connection slot. Released when dropped.
#[derive(Debug)]
pub struct ControlClient {
    mem: Arc<CtlMem>,
    slot: SlotView,
    index: u32,
    claim: u64,
    next_req_id: u32,
}

// SAFETY: the raw pointers in `slot` point into `mem`, which the client keeps alive and which
// is only accessed atomically.
unsafe impl Send for ControlClient {}

/// Bounds of the ping that checks a reconnected DPM answers.
const PING_MIN: Duration = Duration::from_millis(100);
const PING_MAX: Duration = Duration::from_secs(2);
/// Pause between attempts to reach a restarting DPM.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);

impl ControlClient {
    /// Connects through the control file at `path` (made by the DPM).
    pub fn connect(path: &Path) -> Result<Self, FabricError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    FabricError::NotRunning(format!(
                        "control file {} does not exist",
                        path.display()
                    ))
                } else {
                    FabricError::ControlFile {
                        what: "open",
                        path: path.to_owned(),
                        source: e,
                    }
                }
            })?;
        let io = |what, source| FabricError::ControlFile {
            what,
            path: path.to_owned(),
            source,
        };
        crate::region_file::check_private_file(&file, path)
            .map_err(|e| FabricError::Other(format!("control file: {e}")))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        let len = usize::try_from(len).map_err(|_| {
            FabricError::Other(format!("control file {} too large", path.display()))
        })?;
        if len < HEADER_BYTES {
            return Err(FabricError::NotRunning(format!(
                "control file {} is not initialised",
                path.display()
            )));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| io("map", e))?;
        let base = map.as_mut_ptr();
        let mut mem = CtlMem {
            backing: Backing::File {
                _map: map,
                _file: file,
                path: path.to_owned(),
            },
            base,
            len,
            slots: 0,
            ring_capacity: 1,
        };
        mem.validate()?;
        if let Some(why) = mem.server_gone() {
            return Err(FabricError::NotRunning(format!(
                "{why} (control file {})",
                path.display()
            )));
        }
        let pid = std::process::id();
        if pid >= PID_LIMIT {
            return Err(FabricError::Other(format!(
                "process id {pid} does not fit a control slot"
            )));
        }
        Self::claim(Arc::new(mem), pid)
    }

    fn claim(mem: Arc<CtlMem>, pid: u32) -> Result<Self, FabricError> {
        if let Some(why) = mem.server_gone() {
            return Err(FabricError::Disconnected(why));
        }
        for i in 0..mem.slots {
            let slot = mem.slot(i)?;
            let s = slot.state().load(Ordering::Acquire);
            if state_tag(s) != TAG_FREE {
                continue;
            }
            let claim = state_word(TAG_CLAIMED, pid, state_gen(s).wrapping_add(1));
            if slot
                .state()
                .compare_exchange(s, claim, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                // Start request ids from the generation so a reply meant for an earlier
                // owner of the slot could never match.
                let next_req_id = state_gen(claim).wrapping_mul(0x9E37_79B9) | 1;
                return Ok(Self {
                    mem,
                    slot,
                    index: i,
                    claim,
                    next_req_id,
                });
            }
        }
        Err(FabricError::NoFreeSlot { slots: mem.slots })
    }

    /// Connects again through the same control file, waiting up to `timeout` for a DPM
    /// that answers a ping: a DPM that restarted made a new control file, and the old
    /// connection's slot went with the old one. Frames not yet received are lost with the
    /// old connection. Only a client made by [`ControlClient::connect`] can reconnect.
    pub fn reconnect(&mut self, timeout: Duration) -> Result<(), FabricError> {
        let path = self.mem.path().map(Path::to_path_buf).ok_or_else(|| {
            FabricError::Other("an in-process control connection cannot reconnect".into())
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match Self::connect(&path) {
                Ok(mut c) => match c.call(&Request::Ping, left.clamp(PING_MIN, PING_MAX)) {
                    Ok(Ok(Response::Pong)) => {
                        *self = c;
                        return Ok(());
                    }
                    Ok(other) => {
                        FabricError::Other(format!("unexpected reply to a ping: {other:?}"))
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if left.is_zero() {
                return Err(err);
            }
            std::thread::sleep(RECONNECT_PAUSE.min(left));
        }
    }

    /// This connection as the server sees it.
    pub fn conn_id(&self) -> ConnId {
        ConnId {
            slot: self.index,
            generation: state_gen(self.claim),
        }
    }

    /// Takes a frame from the DPM without waiting.
    pub fn try_recv(&mut self) -> Option<Frame> {
        self.slot.resp.pop()
    }

    /// Why this connection can no longer work, if it cannot.
    fn lost(&self) -> Option<String> {
        if self.slot.state().load(Ordering::Acquire) != self.claim {
            return Some(format!("control slot {} was taken away", self.index));
        }
        self.mem.server_gone()
    }
}

impl ControlChannel for ControlClient {
    /// Queues a frame for the DPM.
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError> {
        if let Some(why) = self.lost() {
            return Err(FabricError::Disconnected(why));
        }
        if self.slot.req.push(frame) {
            Ok(())
        } else {
            Err(FabricError::ControlFull)
        }
    }

    /// Receives a frame from the DPM, waiting up to `timeout`. `Ok(None)` on timeout;
    /// an error if the DPM is gone.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new();
        loop {
            if let Some(f) = self.try_recv() {
                return Ok(Some(f));
            }
            if backoff.is_sleeping() {
                if let Some(why) = self.lost() {
                    return Err(FabricError::Disconnected(why));
                }
                if Instant::now() >= deadline {
                    return Ok(None);
                }
            }
            backoff.snooze();
        }
    }

    fn next_request_id(&mut self) -> u32 {
        let id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1);
        id
    }

    fn reconnect(&mut self, timeout: Duration) -> Result<(), FabricError> {
        ControlClient::reconnect(self, timeout)
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        let closing = (self.claim & !TAG_MASK) | TAG_CLOSING;
        if self
            .slot
            .state()
            .compare_exchange(self.claim, closing, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return; // Already reaped.
        }
        // Wait (bounded) for a server that is answering on this slot to finish, so that no
        // late reply reaches the slot's next owner.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut backoff = Backoff::new();
        while self.slot.busy().load(Ordering::SeqCst) == self.claim {
            if self.mem.server_gone().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                return; // The server frees CLOSING slots itself once it is done.
            }
            backoff.snooze();
        }
        self.slot.try_free(closing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merge worker's backoff sleeps from its first snooze, also after progress; an
    /// ordinary one spins and yields first.
    #[test]
    fn a_sleep_only_backoff_never_spins() {
        let mut b = Backoff::new()
            .sleep_only()
            .idle_after(Duration::from_millis(1));
        assert!(b.is_sleeping());
        b.snooze();
        b.reset();
        assert!(b.is_sleeping());
        let mut b = Backoff::new();
        assert!(!b.is_sleeping());
        for _ in 0..Backoff::SPINS + Backoff::YIELDS {
            b.snooze();
        }
        assert!(b.is_sleeping());
    }
    use dinomo_shared::ErrorCode;

    fn ping_server(server: &mut ControlServer) -> usize {
        server.poll(|_, f| match Request::decode(f) {
            Ok(Request::Ping) => Some(Response::Pong.encode(f.req_id)),
            Ok(Request::Hello { kn_id }) => Some(
                Response::Hello {
                    region_id: kn_id as u64,
                    region_size: 4096,
                }
                .encode(f.req_id),
            ),
            Ok(_) => Some(Response::error(f, ErrorCode::InvalidArgument)),
            Err(_) => Some(Response::error(f, ErrorCode::UnknownMessage)),
        })
    }

    #[test]
    fn ctl_path_appends_suffix() {
        assert_eq!(
            default_ctl_path(Path::new("a/b.region")),
            PathBuf::from("a/b.region.ctl")
        );
    }

    #[test]
    fn in_memory_send_recv_and_slots() {
        let mut server = ControlServer::in_memory(2);
        let mut a = server.client().expect("a");
        let b = server.client().expect("b");
        assert!(matches!(
            server.client(),
            Err(FabricError::NoFreeSlot { slots: 2 })
        ));
        assert_eq!(server.connections(), 2);
        a.send(&Request::Ping.encode(42)).expect("send");
        assert_eq!(ping_server(&mut server), 1);
        let f = a
            .recv(Duration::from_secs(5))
            .expect("recv")
            .expect("a reply");
        assert_eq!(f.req_id, 42);
        assert_eq!(Response::decode(&f), Ok(Ok(Response::Pong)));
        assert_eq!(a.recv(Duration::ZERO).expect("recv"), None);
        let gen = b.conn_id().generation;
        drop(b);
        assert_eq!(server.connections(), 1);
        let c = server.client().expect("slot freed by drop");
        assert_eq!(c.conn_id().generation, gen + 1);
    }

    #[test]
    fn full_request_ring_and_outbox() {
        let mut server = ControlServer::in_memory_with(1, 2).expect("server");
        let mut c = server.client().expect("client");
        c.send(&Request::Ping.encode(1)).expect("1");
        c.send(&Request::Ping.encode(2)).expect("2");
        assert!(matches!(
            c.send(&Request::Ping.encode(3)),
            Err(FabricError::ControlFull)
        ));
        assert_eq!(ping_server(&mut server), 2);
        c.send(&Request::Ping.encode(3)).expect("3");
        c.send(&Request::Ping.encode(4)).expect("4");
        // The response ring holds two replies; the other two wait in the outbox.
        assert_eq!(ping_server(&mut server), 2);
        let mut ids = Vec::new();
        for _ in 0..2 {
            ids.push(c.try_recv().expect("reply").req_id);
        }
        assert_eq!(c.try_recv(), None);
        assert_eq!(ping_server(&mut server), 0);
        while let Some(f) = c.try_recv() {
            ids.push(f.req_id);
        }
        assert_eq!(ids, [1, 2, 3, 4]);
    }

    #[test]
    fn call_over_a_control_file_across_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = default_ctl_path(&dir.path().join("r.region"));
        assert!(matches!(
            ControlClient::connect(&path),
            Err(FabricError::NotRunning(_))
        ));
        let mut server = ControlServer::create(&path, 4).expect("create");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let served = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0;
                let mut backoff = Backoff::new();
                while !stop.load(Ordering::Acquire) {
                    if ping_server(&mut server) > 0 {
                        n += 1;
                        backoff.reset();
                    } else {
                        backoff.snooze();
                    }
                }
                (server, n)
            })
        };
        let mut c = ControlClient::connect(&path).expect("connect");
        let t = Duration::from_secs(10);
        assert_eq!(c.call(&Request::Ping, t).expect("ping"), Ok(Response::Pong));
        assert_eq!(
            c.call(&Request::Hello { kn_id: 7 }, t).expect("hello"),
            Ok(Response::Hello {
                region_id: 7,
                region_size: 4096
            })
        );
        assert_eq!(
            c.call(
                &Request::CloseLog {
                    log_id: 1,
                    generation: 1
                },
                t
            )
            .expect("close"),
            Err(ErrorCode::InvalidArgument)
        );
        // A frame sent by hand (a request whose caller gave up), then a call: the call's
        // reply is matched by id, and the earlier reply is skipped, not left behind.
        c.send(&Request::Ping.encode(5)).expect("send");
        assert_eq!(c.call(&Request::Ping, t).expect("ping"), Ok(Response::Pong));
        assert_eq!(c.recv(Duration::from_millis(50)).expect("recv"), None);
        drop(c);
        stop.store(true, Ordering::Release);
        let (server, handled) = served.join().expect("server thread");
        assert!(handled > 0);
        assert_eq!(server.connections(), 0);
        drop(server);
        assert!(!path.exists(), "the control file goes with the server");
        assert!(matches!(
            ControlClient::connect(&path),
            Err(FabricError::NotRunning(_))
        ));
    }

    #[test]
    fn released_slots_never_deliver_stale_replies() {
        let mut server = ControlServer::in_memory(2);
        let handle = server.handle();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let serving = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if ping_server(&mut server) == 0 {
                        std::thread::yield_now();
                    }
                }
                server
            })
        };
        let workers: Vec<_> = (0..2u32)
            .map(|w| {
                let handle = handle.clone();
                std::thread::spawn(move || {
                    for k in 0..300u32 {
                        let mut c = loop {
                            match handle.client() {
                                Ok(c) => break c,
                                Err(FabricError::NoFreeSlot { .. }) => std::thread::yield_now(),
                                Err(e) => panic!("{e}"),
                            }
                        };
                        let id = w << 16 | k;
                        // Every other connection leaves with a reply possibly in flight.
                        c.send(&Request::Ping.encode(id)).expect("send");
                        c.send(&Request::Ping.encode(id)).expect("send");
                        let f = c
                            .recv(Duration::from_secs(10))
                            .expect("recv")
                            .expect("reply");
                        assert_eq!(
                            f.req_id, id,
                            "a reply meant for an earlier owner of the slot"
                        );
                        if k % 2 == 0 {
                            let f = c
                                .recv(Duration::from_secs(10))
                                .expect("recv")
                                .expect("reply");
                            assert_eq!(f.req_id, id);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        stop.store(true, Ordering::Release);
        let server = serving.join().expect("server");
        assert_eq!(server.connections(), 0);
    }

    #[test]
    fn server_gone_is_reported() {
        let server = ControlServer::in_memory(1);
        let mut c = server.client().expect("client");
        drop(server);
        assert!(matches!(
            c.call(&Request::Ping, Duration::from_secs(5)),
            Err(FabricError::Disconnected(_))
        ));
        // A live server that does not answer: a timeout.
        let server = ControlServer::in_memory(1);
        let mut c = server.client().expect("client");
        assert!(matches!(
            c.call(&Request::Ping, Duration::from_millis(1)),
            Err(FabricError::Timeout(_))
        ));
    }

    #[test]
    fn dead_claimants_are_reaped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.ctl");
        let mut server = ControlServer::create_with(&path, 2, 4).expect("create");
        // A child process that exits at once gives a pid that no longer exists.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn `true`");
        let dead_pid = child.id();
        child.wait().expect("wait");
        let live = ControlClient::connect(&path).expect("connect");
        let s = server.slots[1].state().load(Ordering::Acquire);
        assert_eq!(state_tag(s), TAG_FREE);
        // Claim slot 1 as the dead process would have, leaving a request behind.
        let dead = state_word(TAG_CLAIMED, dead_pid, state_gen(s) + 1);
        server.slots[1].state().store(dead, Ordering::SeqCst);
        assert!(server.slots[1].req.push(&Request::Ping.encode(1)));
        assert!(matches!(
            ControlClient::connect(&path),
            Err(FabricError::NoFreeSlot { .. })
        ));
        assert_eq!(server.reap_dead(), 1, "only the dead claimant is reaped");
        assert_eq!(server.connections(), 1);
        assert!(server.slots[1].req.is_empty(), "its rings are emptied");
        let again = ControlClient::connect(&path).expect("the slot is free again");
        assert_eq!(
            again.conn_id(),
            ConnId {
                slot: 1,
                generation: state_gen(dead) + 1
            }
        );
        drop((live, again));
        assert_eq!(server.reap_dead(), 0);
        assert_eq!(server.connections(), 0);
    }
}
