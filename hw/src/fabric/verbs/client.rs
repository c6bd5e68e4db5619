//! The KN end: a [`Fabric`] over an RC queue pair to the DPM.

use std::collections::VecDeque;
use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use dinomo_shared::msg::Frame;

use super::handshake::{check_dial, client_exchange};
use super::link::{CtlSlots, Device, Link};
use super::sys::{Access, MemoryRegion, WorkCompletion, CQ_BATCH};
use super::wire::{write_msg, Msg};
use super::wr::{
    is_connection_error, translate, wc_status_name, wc_status_to_completion, RemoteRegion, SendWr,
    Sge, SignalPolicy, CTL_SEND_BIT,
};
use super::VerbsConfig;
use crate::fabric::{
    wait_needed, Completion, CompletionStatus, ControlChannel, Fabric, FabricCounters, FabricError,
    LocalBuf, LocalSlice, Verb, WorkRequest, WrId,
};

/// How long a control receive or a wait polls without sleeping (after 1024 bare spins it
/// yields).
const RECV_SPIN: Duration = Duration::from_micros(200);
/// The pause between polls of a control receive or a wait that has waited longer than
/// [`RECV_SPIN`].
const RECV_NAP: Duration = Duration::from_micros(50);

/// A posted (or locally failed) one-sided request, in posting order.
#[derive(Clone, Copy, Debug)]
struct Slot {
    wr_id: WrId,
    verb: Verb,
    done: Option<Completion>,
    /// Handed to the device (a request that failed before posting was not).
    posted: bool,
    /// Posted with `IBV_SEND_SIGNALED`: the device reports its completion; an unsignaled
    /// request's completion is inferred from the next signaled one after it.
    signaled: bool,
}

/// Why the queue pair stopped working.
#[derive(Clone, Debug)]
struct Broken {
    message: String,
    /// The connection is gone (as opposed to one bad request breaking the QP).
    lost: bool,
}

/// A connection from a KN shard to the DPM over RDMA verbs.
pub struct VerbsFabric {
    // Field order is drop order: the QP goes before the buffers (the QP also keeps every
    // attached buffer registered until it is destroyed).
    link: Option<Link>,
    tcp: Option<TcpStream>,
    bufs: Vec<MemoryRegion>,
    /// 8 bytes per queue slot: atomics' old values and FLUSH READs land here.
    scratch: MemoryRegion,
    ctl: CtlSlots,
    dev: Device,
    cfg: VerbsConfig,
    addr: String,
    remote: RemoteRegion,
    pending: VecDeque<Slot>,
    /// Sequence number of `pending[0]`; the device's `wr_id` of a one-sided request.
    front_seq: u64,
    broken: Option<Broken>,
    rx: VecDeque<Frame>,
    counters: FabricCounters,
    next_req_id: u32,
    batch: Vec<SendWr>,
    signal: SignalPolicy,
}

impl fmt::Debug for VerbsFabric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsFabric")
            .field("device", &self.dev.name())
            .field("peer", &self.addr)
            .field("region_len", &self.remote.len)
            .field("outstanding", &self.pending.len())
            .field("broken", &self.broken.as_ref().map(|b| &b.message))
            .field("counters", &self.counters)
            .finish()
    }
}

impl VerbsFabric {
    /// Connects to the DPM listening at `addr` (`host:port`) through RDMA device `device`
    /// (`None`: the first device).
    pub fn connect(
        addr: &str,
        device: Option<&str>,
        cfg: &VerbsConfig,
    ) -> Result<Self, FabricError> {
        let dev = Device::open(device, cfg)?;
        let depth = cfg.queue_depth;
        let scratch = dev.pd.alloc(depth * 8, Access::LOCAL)?;
        let ctl = CtlSlots::new(&dev, cfg.ctl_slots)?;
        let mut f = Self {
            link: None,
            tcp: None,
            bufs: Vec::new(),
            scratch,
            ctl,
            dev,
            cfg: cfg.clone(),
            addr: addr.to_owned(),
            remote: RemoteRegion {
                base: 0,
                len: 0,
                rkey: 0,
            },
            pending: VecDeque::with_capacity(depth),
            front_seq: 0,
            broken: None,
            rx: VecDeque::new(),
            counters: FabricCounters::default(),
            next_req_id: 1,
            batch: Vec::with_capacity(depth),
            signal: SignalPolicy::new(cfg.signal_every),
        };
        f.establish()?;
        Ok(f)
    }

    /// Sets up a new queue pair and exchange with the DPM. Registered buffers keep their
    /// handles.
    fn establish(&mut self) -> Result<(), FabricError> {
        self.link = None;
        self.tcp = None;
        let send_wrs = (self.cfg.queue_depth as u32).saturating_add(self.cfg.ctl_slots);
        let mut link = Link::new(&self.dev, &self.cfg, send_wrs, self.cfg.ctl_slots, false)?;
        link.qp.attach(&self.scratch);
        for b in &self.bufs {
            link.qp.attach(b);
        }
        self.ctl.arm(&mut link.qp)?;
        let mut tcp = self.dial()?;
        let peer = &self.addr;
        let proto = |e: super::wire::ExchangeError| {
            FabricError::Disconnected(format!("connection exchange with {peer} failed: {e}"))
        };
        let offer = client_exchange(
            &mut tcp,
            peer,
            link.local,
            self.cfg.kn_id,
            self.cfg.secret.as_ref(),
        )?;
        let (ep, rkey, base, len) = (offer.ep, offer.rkey, offer.base, offer.len);
        link.connect(&ep)?;
        write_msg(&mut tcp, &Msg::Ready).map_err(proto)?;
        self.remote = RemoteRegion { base, len, rkey };
        self.link = Some(link);
        self.tcp = Some(tcp);
        self.broken = None;
        Ok(())
    }

    fn dial(&self) -> Result<TcpStream, FabricError> {
        let addrs: Vec<_> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| FabricError::Other(format!("cannot resolve {}: {e}", self.addr)))?
            .collect();
        check_dial(&addrs, &self.addr, self.cfg.secret.as_ref())?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.cfg.connect_timeout) {
                Ok(s) => {
                    let t = Some(self.cfg.connect_timeout);
                    s.set_read_timeout(t)
                        .and_then(|_| s.set_write_timeout(t))
                        .and_then(|_| s.set_nodelay(true))
                        .map_err(|e| FabricError::Other(format!("TCP to {a}: {e}")))?;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(FabricError::NotRunning(format!(
            "no DPM answers at {} ({}); start one with `dinomo dpm serve --fabric verbs`",
            self.addr,
            last.map_or_else(|| "no address".to_owned(), |e| e.to_string())
        )))
    }

    /// Tears the queue pair down and connects again (after a DPM restart or a QP error).
    /// Work requests still outstanding are dropped; registered buffers stay valid.
    pub fn reconnect(&mut self) -> Result<(), FabricError> {
        self.front_seq += self.pending.len() as u64;
        self.pending.clear();
        self.rx.clear();
        let r = self.establish();
        if let Err(e) = &r {
            self.broken = Some(Broken {
                message: format!("reconnecting to {} failed: {e}", self.addr),
                lost: true,
            });
        }
        r
    }

    /// The device in use.
    pub fn device_name(&self) -> &str {
        self.dev.name()
    }

    /// The device's capabilities.
    pub fn device_caps(&self) -> super::DeviceCaps {
        self.dev.caps
    }

    /// Doorbells rung on the current queue pair: one per [`Fabric::post`] (a linked list of
    /// all its requests), one per control SEND.
    pub fn doorbells(&self) -> u64 {
        self.link.as_ref().map_or(0, |l| l.qp.doorbells())
    }

    /// The GID index in use (the configured one, or the automatic choice).
    pub fn gid_index(&self) -> u8 {
        self.dev.gid_index
    }

    /// Inline payload bytes the device granted the current queue pair (0: none).
    pub fn max_inline(&self) -> u32 {
        self.link.as_ref().map_or(0, |l| l.qp.max_inline())
    }

    /// Why the connection does not work, if it does not.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_ref().map(|b| b.message.as_str())
    }

    fn lost_error(&self) -> Option<FabricError> {
        match &self.broken {
            Some(b) if b.lost => Some(FabricError::Disconnected(b.message.clone())),
            _ => None,
        }
    }

    /// Moves device completions into `pending` (and frees control send slots).
    fn reap(&mut self) -> Result<(), FabricError> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let mut wcs = [WorkCompletion::default(); CQ_BATCH];
        loop {
            let n = link.send_cq.poll(&mut wcs)?;
            for wc in &wcs[..n] {
                if wc.wr_id & CTL_SEND_BIT != 0 {
                    self.ctl.send_done(wc.wr_id);
                    if wc.status != 0 && self.broken.is_none() {
                        self.broken = Some(Broken {
                            message: format!(
                                "a control message to {} completed with {}; call reconnect()",
                                self.addr,
                                wc_status_name(wc.status)
                            ),
                            lost: is_connection_error(wc.status),
                        });
                    }
                    continue;
                }
                let Some(i) = wc.wr_id.checked_sub(self.front_seq) else {
                    continue;
                };
                let Some(slot) = self.pending.get(i as usize).copied() else {
                    continue;
                };
                let status = wc_status_to_completion(wc.status);
                let value = if status == CompletionStatus::Success
                    && matches!(slot.verb, Verb::Cas | Verb::Faa)
                {
                    let at = (wc.wr_id % self.cfg.queue_depth as u64) as usize * 8;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.scratch.bytes()[at..at + 8]);
                    u64::from_ne_bytes(b)
                } else {
                    0
                };
                let first_error = wc.status != 0 && self.broken.is_none();
                complete_in_order(&mut self.pending, i as usize, status, value, first_error);
                if first_error {
                    let lost = is_connection_error(wc.status);
                    self.broken = Some(Broken {
                        message: format!(
                            "work request {} ({:?}) to {} completed with {}; {}",
                            slot.wr_id,
                            slot.verb,
                            self.addr,
                            wc_status_name(wc.status),
                            if lost {
                                "the DPM is unreachable or the connection was torn down; call reconnect()"
                            } else {
                                "the queue pair is now in error; call reconnect()"
                            }
                        ),
                        lost,
                    });
                }
            }
            if n < wcs.len() {
                return Ok(());
            }
        }
    }

    /// After a lost connection: drop what is outstanding and report it.
    fn fail_lost(&mut self) -> Result<(), FabricError> {
        if let Some(e) = self.lost_error() {
            self.front_seq += self.pending.len() as u64;
            self.pending.clear();
            return Err(e);
        }
        Ok(())
    }

    fn resolve(&self, s: LocalSlice) -> Option<Sge> {
        self.bufs
            .get(s.buf.0 as usize)
            .and_then(|b| {
                (u64::from(s.offset) + u64::from(s.len) <= b.bytes().len() as u64).then_some(b)
            })
            .and_then(|b| b.sge(u64::from(s.offset), s.len))
    }

    fn count(&mut self, wr: &WorkRequest) {
        let c = &mut self.counters;
        match *wr {
            WorkRequest::Read { local, .. } => {
                c.reads += 1;
                c.read_bytes += u64::from(local.len);
            }
            WorkRequest::Write { local, .. } => {
                c.writes += 1;
                c.write_bytes += u64::from(local.len);
            }
            WorkRequest::Cas { .. } => c.cas += 1,
            WorkRequest::Faa { .. } => c.faa += 1,
            WorkRequest::Flush { .. } => c.flushes += 1,
        }
    }
}

impl Fabric for VerbsFabric {
    fn region_len(&self) -> u64 {
        self.remote.len
    }

    fn alloc_buf(&mut self, len: usize) -> Result<LocalBuf, FabricError> {
        if u32::try_from(len).is_err() {
            return Err(FabricError::BufferAlloc {
                len,
                why: "local slices address at most 4 GiB",
            });
        }
        let handle = u32::try_from(self.bufs.len()).map_err(|_| FabricError::BufferAlloc {
            len,
            why: "too many registered buffers",
        })?;
        let mr = self.dev.pd.alloc(len, Access::LOCAL)?;
        if let Some(link) = self.link.as_mut() {
            link.qp.attach(&mr);
        }
        self.bufs.push(mr);
        Ok(LocalBuf(handle))
    }

    /// An unknown handle yields an empty slice.
    fn buf(&self, buf: LocalBuf) -> &[u8] {
        self.bufs.get(buf.0 as usize).map_or(&[], |b| b.bytes())
    }

    /// An unknown handle yields an empty slice. The NIC writes a buffer while a READ into
    /// it is outstanding; change a buffer only when no work request uses it.
    fn buf_mut(&mut self, buf: LocalBuf) -> &mut [u8] {
        self.bufs
            .get_mut(buf.0 as usize)
            .map_or(&mut [], |b| b.bytes_mut())
    }

    fn post(&mut self, wrs: &[(WrId, WorkRequest)]) -> Result<(), FabricError> {
        if let Some(b) = &self.broken {
            return Err(FabricError::Disconnected(b.message.clone()));
        }
        let depth = self.cfg.queue_depth;
        if self.pending.len() + wrs.len() > depth {
            return Err(FabricError::QueueFull { depth });
        }
        if wrs.is_empty() {
            return Ok(());
        }
        let before = (self.pending.len(), self.counters, self.signal);
        if self.pending.is_empty() {
            self.counters.round_trips += 1;
        }
        // Send queue accounting: a request leaves `pending` only once its completion was
        // polled or inferred from a later polled one, by which time the device has retired
        // its send queue entry. So at most `queue_depth` one-sided entries (plus the
        // control SENDs, each signaled and holding a control slot) are ever in the send
        // queue, which has room for exactly that.
        self.batch.clear();
        let mut last_posted = None;
        for &(wr_id, ref wr) in wrs {
            self.count(wr);
            let seq = self.front_seq + self.pending.len() as u64;
            let scratch = self
                .scratch
                .sge((seq % depth as u64) * 8, 8)
                .unwrap_or_default();
            let local = |s: LocalSlice| self.resolve(s);
            let (done, signaled) = match translate(seq, wr, &self.remote, local, scratch) {
                Ok(mut sw) => {
                    sw.signaled = self.signal.decide(sw.opcode);
                    self.batch.push(sw);
                    last_posted = Some(self.pending.len());
                    (None, sw.signaled)
                }
                Err(status) => (
                    Some(Completion {
                        wr_id,
                        verb: wr.verb(),
                        status,
                        value: 0,
                    }),
                    false,
                ),
            };
            self.pending.push_back(Slot {
                wr_id,
                verb: wr.verb(),
                done,
                posted: done.is_none(),
                signaled,
            });
        }
        // The newest posted request always asks for a completion, so every unsignaled one
        // has a signaled one after it that reports it.
        if let (Some(last), Some(i)) = (self.batch.last_mut(), last_posted) {
            last.signaled = true;
            self.signal.signaled_last();
            if let Some(s) = self.pending.get_mut(i) {
                s.signaled = true;
            }
        }
        // One `ibv_post_send` of the linked list: one doorbell for the whole post.
        let posted = match self.link.as_mut() {
            Some(link) => link.qp.post_send(&self.batch),
            None => Err(FabricError::Disconnected(format!(
                "not connected to {}; call reconnect()",
                self.addr
            ))),
        };
        if let Err(e) = posted {
            self.pending.truncate(before.0);
            self.counters = before.1;
            self.signal = before.2;
            return Err(e);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        self.reap()?;
        self.fail_lost()?;
        let mut n = 0;
        while n < out.len() {
            match self.pending.front() {
                Some(Slot { done: Some(c), .. }) => {
                    out[n] = *c;
                    self.pending.pop_front();
                    self.front_seq += 1;
                    n += 1;
                }
                _ => break,
            }
        }
        Ok(n)
    }

    fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Busy-polls (a verbs completion is microseconds away); takes nothing unless all
    /// `out.len()` completions are ready, so a timeout loses none.
    fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<(), FabricError> {
        let n = out.len();
        if !wait_needed(n, self.pending.len())? {
            return Ok(());
        }
        // The clock is first read after 1024 empty polls: a round trip is usually over by
        // then, and reading it may be a system call (HPET or ACPI PM clocksources). The
        // timeout thus runs from a little after the call.
        // Past [`RECV_SPIN`] the request is slow (a loaded or software device, a DPM that is
        // away): it naps between polls instead of taking a core from whoever must answer.
        let mut start = None;
        let mut spins = 0u32;
        let mut napping = false;
        loop {
            self.reap()?;
            self.fail_lost()?;
            if self.pending.iter().take(n).all(|s| s.done.is_some()) {
                break;
            }
            spins = spins.wrapping_add(1);
            if napping || spins % 1024 == 0 {
                let waited = start.get_or_insert_with(Instant::now).elapsed();
                if waited >= timeout {
                    return Err(FabricError::Timeout(timeout));
                }
                if napping || waited >= RECV_SPIN {
                    napping = true;
                    std::thread::sleep(RECV_NAP.min(timeout - waited));
                } else {
                    std::thread::yield_now();
                }
            } else {
                std::hint::spin_loop();
            }
        }
        self.poll(out).map(|_| ())
    }

    fn counters(&self) -> &FabricCounters {
        &self.counters
    }
}

impl ControlChannel for VerbsFabric {
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError> {
        if let Some(b) = &self.broken {
            return Err(FabricError::Disconnected(b.message.clone()));
        }
        let start = Instant::now();
        loop {
            self.reap()?;
            if let Some(e) = self.lost_error() {
                return Err(e);
            }
            let Some(link) = self.link.as_mut() else {
                return Err(FabricError::Disconnected(format!(
                    "not connected to {}; call reconnect()",
                    self.addr
                )));
            };
            if self.ctl.send(&mut link.qp, frame)? {
                self.counters.sends += 1;
                return Ok(());
            }
            if start.elapsed() > self.cfg.connect_timeout {
                return Err(FabricError::ControlFull);
            }
            std::thread::yield_now();
        }
    }

    /// Busy-polls while a reply is microseconds away, then yields, and once it has waited
    /// [`RECV_SPIN`] naps between polls: a control reply that is slow (the DPM is merging,
    /// fencing or restarting) must not cost a whole core, which on a small host (a DPU, a
    /// VM) is the core the DPM needs to answer.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError> {
        let start = Instant::now();
        let mut wcs = [WorkCompletion::default(); CQ_BATCH];
        let mut empty = 0u32;
        loop {
            if let Some(f) = self.rx.pop_front() {
                self.counters.recvs += 1;
                return Ok(Some(f));
            }
            if let Some(e) = self.lost_error() {
                return Err(e);
            }
            let Some(link) = self.link.as_mut() else {
                return Err(FabricError::Disconnected(format!(
                    "not connected to {}; call reconnect()",
                    self.addr
                )));
            };
            let n = link.recv_cq.poll(&mut wcs)?;
            for wc in &wcs[..n] {
                if wc.status == 0 {
                    let f = self.ctl.take_frame(&mut link.qp, wc.wr_id)?;
                    self.rx.push_back(f);
                } else {
                    let message = format!(
                        "control receive from {} completed with {}; call reconnect()",
                        self.addr,
                        wc_status_name(wc.status)
                    );
                    if self.broken.is_none() {
                        self.broken = Some(Broken {
                            message,
                            lost: true,
                        });
                    }
                }
            }
            if n == 0 {
                // Send completions also tell of a lost peer.
                self.reap()?;
                empty = empty.saturating_add(1);
                if empty < 1024 && !timeout.is_zero() {
                    std::hint::spin_loop();
                    continue;
                }
                let waited = start.elapsed();
                if waited >= timeout {
                    return Ok(None);
                }
                if waited < RECV_SPIN {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(RECV_NAP.min(timeout - waited));
                }
            }
        }
    }

    fn next_request_id(&mut self) -> u32 {
        let id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1);
        id
    }

    /// A new queue pair to the (restarted) DPM; see [`super::reconnect`].
    fn reconnect(&mut self, timeout: Duration) -> Result<(), FabricError> {
        self.reconnect_within(timeout)
    }
}

/// Records the device's completion (`status`, `value`) of `pending[i]` and what it implies:
/// a send queue completes in order, so every unsignaled request before it that has no
/// completion yet completed successfully (up to the previous signaled request, whose own
/// completion settled those before it). On the queue pair's first error, every posted
/// request after `i` is flushed by the device (which reports unsignaled ones on some
/// devices and not on others), so those fail now, as the device would fail them.
fn complete_in_order(
    pending: &mut VecDeque<Slot>,
    i: usize,
    status: CompletionStatus,
    value: u64,
    first_error: bool,
) {
    let done = |s: &Slot, status, value| Completion {
        wr_id: s.wr_id,
        verb: s.verb,
        status,
        value,
    };
    for j in (0..i.min(pending.len())).rev() {
        let s = &mut pending[j];
        if s.signaled {
            break;
        }
        if s.done.is_none() {
            s.done = Some(done(s, CompletionStatus::Success, 0));
        }
    }
    if let Some(s) = pending.get_mut(i) {
        s.done = Some(done(s, status, value));
    }
    if first_error {
        let flushed = wc_status_to_completion(rdma_sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR);
        for s in pending.iter_mut().skip(i + 1) {
            if s.posted && s.done.is_none() {
                s.done = Some(done(s, flushed, 0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` posted slots; `signaled` lists the signaled ones.
    fn slots(n: usize, signaled: &[usize]) -> VecDeque<Slot> {
        (0..n)
            .map(|i| Slot {
                wr_id: 100 + i as u64,
                verb: Verb::Write,
                done: None,
                posted: true,
                signaled: signaled.contains(&i),
            })
            .collect()
    }

    fn statuses(p: &VecDeque<Slot>) -> Vec<Option<CompletionStatus>> {
        p.iter().map(|s| s.done.map(|c| c.status)).collect()
    }

    #[test]
    fn a_signaled_completion_completes_the_unsignaled_before_it() {
        use CompletionStatus::Success as S;
        let mut p = slots(6, &[2, 5]);
        complete_in_order(&mut p, 2, S, 0, false);
        assert_eq!(
            statuses(&p),
            vec![Some(S), Some(S), Some(S), None, None, None]
        );
        for (k, s) in p.iter().enumerate().take(3) {
            let c = s.done.expect("done");
            assert_eq!(c.wr_id, 100 + k as u64, "each keeps its own WrId");
        }
        complete_in_order(&mut p, 5, S, 0, false);
        assert!(p.iter().all(|s| s.done.map(|c| c.status) == Some(S)));
    }

    #[test]
    fn inference_stops_at_the_previous_signaled_request() {
        use CompletionStatus as C;
        // Slot 0 failed before posting; 1 is a signaled READ that completed (say, with an
        // error of its own already recorded); 3 signaled.
        let mut p = slots(4, &[1, 3]);
        p[0].posted = false;
        p[0].done = Some(Completion {
            wr_id: 100,
            verb: Verb::Write,
            status: C::LocalProtectionError,
            value: 0,
        });
        p[1].done = Some(Completion {
            wr_id: 101,
            verb: Verb::Read,
            status: C::Success,
            value: 0,
        });
        complete_in_order(&mut p, 3, C::Success, 0, false);
        assert_eq!(
            statuses(&p),
            vec![
                Some(C::LocalProtectionError),
                Some(C::Success),
                Some(C::Success),
                Some(C::Success)
            ]
        );
        // A locally failed request between unsignaled ones does not stop the inference.
        let mut p = slots(4, &[3]);
        p[1].posted = false;
        p[1].done = Some(Completion {
            wr_id: 101,
            verb: Verb::Write,
            status: C::RemoteAccessError,
            value: 0,
        });
        complete_in_order(&mut p, 3, C::Success, 0, false);
        assert_eq!(
            statuses(&p),
            vec![
                Some(C::Success),
                Some(C::RemoteAccessError),
                Some(C::Success),
                Some(C::Success)
            ]
        );
    }

    #[test]
    fn the_first_error_fails_what_follows_and_not_what_precedes() {
        use CompletionStatus as C;
        // An unsignaled WRITE (2) fails: devices report errors whether signaled or not.
        let mut p = slots(6, &[4]);
        p[5].posted = false;
        p[5].done = Some(Completion {
            wr_id: 105,
            verb: Verb::Write,
            status: C::Misaligned,
            value: 0,
        });
        complete_in_order(&mut p, 2, C::RemoteAccessError, 0, true);
        assert_eq!(
            statuses(&p),
            vec![
                Some(C::Success),
                Some(C::Success),
                Some(C::RemoteAccessError),
                Some(C::ConnectionLost),
                Some(C::ConnectionLost),
                Some(C::Misaligned)
            ]
        );
        // The flush completion of the signaled one arrives later and changes nothing.
        complete_in_order(&mut p, 4, C::ConnectionLost, 0, false);
        assert_eq!(p[2].done.map(|c| c.status), Some(C::RemoteAccessError));
        assert_eq!(p[3].done.map(|c| c.status), Some(C::ConnectionLost));
    }

    #[test]
    fn an_atomic_keeps_its_value() {
        let mut p = slots(2, &[0, 1]);
        p[1].verb = Verb::Faa;
        complete_in_order(&mut p, 1, CompletionStatus::Success, 41, false);
        let c = p[1].done.expect("done");
        assert_eq!((c.verb, c.value), (Verb::Faa, 41));
        assert_eq!(
            p[0].done, None,
            "a signaled request waits for its own completion"
        );
    }
}
