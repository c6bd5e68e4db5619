//! The shared-memory fabric: the region is memory this process can address (a mapped region
//! file shared with the DPM process, or a region in this process), so one-sided verbs are
//! memory operations, performed when posted. A [`NicModel`] decides when each completion may
//! be polled, so the fabric can stand in for a network; control frames go through the
//! control switchboard ([`ControlClient`]).

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::msg::{Frame, Request, Response};
use dinomo_shared::superblock::Superblock;

use super::ctl::{Backoff, ControlClient};
use super::nic::{NicModel, NicProfile};
use super::{
    wait_needed, Completion, CompletionStatus, ControlChannel, Fabric, FabricCounters, FabricError,
    LocalBuf, LocalSlice, WorkRequest, WrId,
};
use crate::pmem::{Persist, Pmem};
use crate::region_file::{FilePersist, RegionFile, RegionFileError};

/// Outstanding work requests allowed unless configured otherwise (a typical send-queue depth).
pub const DEFAULT_QUEUE_DEPTH: usize = 256;

/// Below this distance to the next ready time, `wait` spins and yields instead of sleeping
/// (a sleep overshoots by tens of µs).
const SLEEP_THRESHOLD_NS: u64 = 50_000;

#[derive(Clone, Copy, Debug)]
struct Pending {
    ready_ns: u64,
    completion: Completion,
}

/// A [`Fabric`] over memory shared with the DPM.
pub struct ShmFabric<P: Persist> {
    pmem: Arc<Pmem<P>>,
    bufs: Vec<Box<[u8]>>,
    /// In posting order; ready times never decrease (see [`NicModel::schedule`]).
    pending: VecDeque<Pending>,
    nic: NicModel,
    control: ControlClient,
    counters: FabricCounters,
    queue_depth: usize,
}

impl<P: Persist> fmt::Debug for ShmFabric<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmFabric")
            .field("region_len", &self.pmem.len())
            .field("bufs", &self.bufs.len())
            .field("outstanding", &self.pending.len())
            .field("nic", &self.nic.profile())
            .field("counters", &self.counters)
            .finish()
    }
}

impl<P: Persist> ShmFabric<P> {
    /// A connection to the region `pmem`, with control frames through `control` and
    /// completion times from `nic`.
    pub fn new(pmem: Arc<Pmem<P>>, control: ControlClient, nic: NicModel) -> Self {
        Self {
            pmem,
            bufs: Vec::new(),
            pending: VecDeque::new(),
            nic,
            control,
            counters: FabricCounters::default(),
            queue_depth: DEFAULT_QUEUE_DEPTH,
        }
    }

    /// Sets how many work requests may be outstanding (at least 1).
    pub fn with_queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth.max(1);
        self
    }

    pub fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    /// The region.
    pub fn pmem(&self) -> &Arc<Pmem<P>> {
        &self.pmem
    }

    pub fn nic(&self) -> &NicModel {
        &self.nic
    }

    /// The control connection (e.g. for [`ControlClient::call`]).
    pub fn control(&mut self) -> &mut ControlClient {
        &mut self.control
    }

    fn local(&mut self, s: LocalSlice) -> Option<&mut [u8]> {
        let buf = self.bufs.get_mut(s.buf.0 as usize)?;
        let start = s.offset as usize;
        buf.get_mut(start..start.checked_add(s.len as usize)?)
    }

    /// Performs one verb on the region; returns its status, old value and wire bytes.
    fn perform(&mut self, wr: &WorkRequest) -> (CompletionStatus, u64, u64) {
        use CompletionStatus as S;
        let c = &mut self.counters;
        match *wr {
            WorkRequest::Read { remote, local } => {
                c.reads += 1;
                c.read_bytes += local.len as u64;
                let pmem = Arc::clone(&self.pmem);
                let status = match self.local(local) {
                    None => S::LocalProtectionError,
                    Some(_) if pmem.check(remote, local.len as u64).is_err() => {
                        S::RemoteAccessError
                    }
                    Some(dst) => {
                        pmem.read(remote, dst);
                        S::Success
                    }
                };
                (status, 0, local.len as u64)
            }
            WorkRequest::Write { remote, local } => {
                c.writes += 1;
                c.write_bytes += local.len as u64;
                let pmem = Arc::clone(&self.pmem);
                let status = match self.local(local) {
                    None => S::LocalProtectionError,
                    Some(_) if pmem.check(remote, local.len as u64).is_err() => {
                        S::RemoteAccessError
                    }
                    Some(src) => {
                        pmem.write(remote, src);
                        S::Success
                    }
                };
                (status, 0, local.len as u64)
            }
            WorkRequest::Cas {
                remote,
                expect,
                new,
            } => {
                c.cas += 1;
                match self.atomic_target(remote) {
                    Err(s) => (s, 0, 8),
                    Ok(()) => {
                        let old = self
                            .pmem
                            .cas_u64(remote, expect, new)
                            .unwrap_or_else(|cur| cur);
                        (S::Success, old, 8)
                    }
                }
            }
            WorkRequest::Faa { remote, add } => {
                c.faa += 1;
                match self.atomic_target(remote) {
                    Err(s) => (s, 0, 8),
                    Ok(()) => (S::Success, self.pmem.faa_u64(remote, add), 8),
                }
            }
            WorkRequest::Flush { remote, len } => {
                c.flushes += 1;
                if self.pmem.check(remote, len).is_err() {
                    (S::RemoteAccessError, 0, 0)
                } else {
                    self.pmem.persist(remote, len);
                    (S::Success, 0, 0)
                }
            }
        }
    }

    fn atomic_target(&self, remote: u64) -> Result<(), CompletionStatus> {
        if self.pmem.check(remote, 8).is_err() {
            Err(CompletionStatus::RemoteAccessError)
        } else if remote % 8 != 0 {
            Err(CompletionStatus::Misaligned)
        } else {
            Ok(())
        }
    }

    /// Whether the first `n` outstanding completions are ready at `now`.
    fn first_ready(&self, n: usize, now: u64) -> bool {
        n == 0 || self.pending.get(n - 1).is_some_and(|p| p.ready_ns <= now)
    }
}

impl ShmFabric<FilePersist> {
    /// Connects a KN in another process: maps the region file and claims a slot in the
    /// control file made by the DPM.
    pub fn connect_file(
        region_path: &Path,
        ctl_path: &Path,
        profile: NicProfile,
    ) -> Result<Self, FabricError> {
        let region = RegionFile::open(region_path).map_err(|e| match e {
            RegionFileError::NotFound { path } => {
                // Not a DPM that is starting: the region is made before its DPM serves it.
                FabricError::Other(format!("region file {} does not exist", path.display()))
            }
            e => FabricError::Other(e.to_string()),
        })?;
        let control = ControlClient::connect(ctl_path)?;
        Ok(Self::new(
            Arc::new(region.pmem()),
            control,
            NicModel::new(profile),
        ))
    }
}

impl<P: Persist> Fabric for ShmFabric<P> {
    fn region_len(&self) -> u64 {
        self.pmem.len()
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
        self.bufs.push(vec![0u8; len].into_boxed_slice());
        Ok(LocalBuf(handle))
    }

    /// An unknown handle yields an empty slice.
    fn buf(&self, buf: LocalBuf) -> &[u8] {
        self.bufs.get(buf.0 as usize).map_or(&[], |b| b)
    }

    /// An unknown handle yields an empty slice.
    fn buf_mut(&mut self, buf: LocalBuf) -> &mut [u8] {
        self.bufs.get_mut(buf.0 as usize).map_or(&mut [], |b| b)
    }

    fn post(&mut self, wrs: &[(WrId, WorkRequest)]) -> Result<(), FabricError> {
        if self.pending.len() + wrs.len() > self.queue_depth {
            return Err(FabricError::QueueFull {
                depth: self.queue_depth,
            });
        }
        if wrs.is_empty() {
            return Ok(());
        }
        if self.pending.is_empty() {
            self.counters.round_trips += 1;
        }
        let now = if self.nic.is_instant() {
            0
        } else {
            self.nic.now_ns()
        };
        for &(wr_id, ref wr) in wrs {
            let (status, value, bytes) = self.perform(wr);
            let ready_ns = self.nic.schedule(now, bytes);
            self.pending.push_back(Pending {
                ready_ns,
                completion: Completion {
                    wr_id,
                    verb: wr.verb(),
                    status,
                    value,
                },
            });
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        let Some(front) = self.pending.front() else {
            return Ok(0);
        };
        let now = if front.ready_ns == 0 {
            0
        } else {
            self.nic.now_ns()
        };
        let mut n = 0;
        while n < out.len() {
            match self.pending.front() {
                Some(p) if p.ready_ns <= now => {
                    out[n] = p.completion;
                    self.pending.pop_front();
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

    /// Takes nothing unless all `out.len()` completions are ready, so a timeout loses none.
    fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<(), FabricError> {
        let n = out.len();
        if !wait_needed(n, self.pending.len())? {
            return Ok(());
        }
        let start = Instant::now();
        let mut backoff = Backoff::with_max_sleep(Duration::from_micros(20));
        loop {
            let last_ready = self.pending[n - 1].ready_ns;
            let now = if last_ready == 0 {
                0
            } else {
                self.nic.now_ns()
            };
            if self.first_ready(n, now) {
                break;
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Err(FabricError::Timeout(timeout));
            }
            let ahead = last_ready - now;
            if ahead > SLEEP_THRESHOLD_NS {
                // Wake a little early and finish by spinning, so the overshoot stays small.
                let nap =
                    Duration::from_nanos(ahead - SLEEP_THRESHOLD_NS / 2).min(timeout - elapsed);
                std::thread::sleep(nap);
            } else {
                backoff.snooze();
            }
        }
        for slot in out.iter_mut() {
            if let Some(p) = self.pending.pop_front() {
                *slot = p.completion;
            }
        }
        Ok(())
    }

    fn counters(&self) -> &FabricCounters {
        &self.counters
    }
}

impl<P: Persist> ControlChannel for ShmFabric<P> {
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError> {
        self.control.send(frame)?;
        self.counters.sends += 1;
        Ok(())
    }

    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError> {
        let f = self.control.recv(timeout)?;
        if f.is_some() {
            self.counters.recvs += 1;
        }
        Ok(f)
    }

    /// The region stays mapped (a restarted DPM serves the same file); only the control
    /// connection is made again, and the DPM must serve the region this fabric maps.
    fn reconnect(&mut self, timeout: Duration) -> Result<(), FabricError> {
        self.control.reconnect(timeout)?;
        let ours: Superblock = self.pmem.read_pod(0);
        match ControlChannel::call(&mut self.control, &Request::Hello { kn_id: 0 }, timeout) {
            Ok(Ok(Response::Hello {
                region_id,
                region_size,
            })) if region_id == ours.region_id && region_size == self.pmem.len() => Ok(()),
            Ok(Ok(Response::Hello { region_id, .. })) => Err(FabricError::Other(format!(
                "the restarted DPM serves another region ({region_id:#x}, not {:#x})",
                ours.region_id
            ))),
            Ok(other) => Err(FabricError::Other(format!(
                "unexpected reply to Hello: {other:?}"
            ))),
            Err(e) => Err(e),
        }
    }

    fn next_request_id(&mut self) -> u32 {
        self.control.next_request_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::ctl::ControlServer;
    use crate::fabric::execute;
    use crate::fabric::nic::ManualClock;
    use crate::fabric::Verb;
    use crate::shadow::ShadowRegion;
    use dinomo_shared::msg::{Request, Response};

    const T: Duration = Duration::from_secs(10);

    fn fabric(
        profile: NicProfile,
        clock: Option<Arc<ManualClock>>,
    ) -> (ShmFabric<Arc<ShadowRegion>>, ControlServer) {
        let region = ShadowRegion::new(1 << 16);
        let server = ControlServer::in_memory(4);
        let nic = match clock {
            Some(c) => NicModel::with_clock(profile, c),
            None => NicModel::new(profile),
        };
        let f = ShmFabric::new(
            Arc::new(region.pmem()),
            server.client().expect("client"),
            nic,
        );
        (f, server)
    }

    fn one(f: &mut impl Fabric, wr: WorkRequest) -> Completion {
        let mut out = [Completion {
            wr_id: 0,
            verb: Verb::Read,
            status: CompletionStatus::Success,
            value: 0,
        }];
        execute(f, &[(7, wr)], &mut out, T).expect("execute");
        assert_eq!(out[0].wr_id, 7);
        assert_eq!(out[0].verb, wr.verb());
        out[0]
    }

    fn empty() -> Completion {
        Completion {
            wr_id: u64::MAX,
            verb: Verb::Read,
            status: CompletionStatus::ConnectionLost,
            value: 0,
        }
    }

    #[test]
    fn every_verb_and_its_errors() {
        use CompletionStatus as S;
        let (mut f, _server) = fabric(NicProfile::None, None);
        let len = f.region_len();
        let b = f.alloc_buf(256).expect("buf");
        for (i, x) in f.buf_mut(b).iter_mut().enumerate() {
            *x = i as u8;
        }
        // WRITE then READ back into another part of the buffer.
        assert_eq!(
            one(
                &mut f,
                WorkRequest::Write {
                    remote: 1000,
                    local: b.slice(0, 100)
                }
            )
            .status,
            S::Success
        );
        assert_eq!(
            one(
                &mut f,
                WorkRequest::Read {
                    remote: 1000,
                    local: b.slice(128, 100)
                }
            )
            .status,
            S::Success
        );
        let (lo, hi) = f.buf(b).split_at(128);
        assert_eq!(&lo[..100], &hi[..100]);
        assert_eq!(
            one(
                &mut f,
                WorkRequest::Flush {
                    remote: 1000,
                    len: 100
                }
            )
            .status,
            S::Success
        );
        // CAS: success and failure both return the old value.
        let c = one(
            &mut f,
            WorkRequest::Cas {
                remote: 2048,
                expect: 0,
                new: 5,
            },
        );
        assert_eq!((c.status, c.value), (S::Success, 0));
        let c = one(
            &mut f,
            WorkRequest::Cas {
                remote: 2048,
                expect: 0,
                new: 9,
            },
        );
        assert_eq!((c.status, c.value), (S::Success, 5));
        assert_eq!(f.pmem().load_u64(2048), 5);
        let c = one(
            &mut f,
            WorkRequest::Faa {
                remote: 2048,
                add: 10,
            },
        );
        assert_eq!((c.status, c.value), (S::Success, 5));
        assert_eq!(f.pmem().load_u64(2048), 15);
        // Errors become statuses.
        let oob = [
            WorkRequest::Read {
                remote: len - 10,
                local: b.slice(0, 11),
            },
            WorkRequest::Write {
                remote: u64::MAX,
                local: b.slice(0, 2),
            },
            WorkRequest::Cas {
                remote: len,
                expect: 0,
                new: 1,
            },
            WorkRequest::Faa {
                remote: len - 4,
                add: 1,
            },
            WorkRequest::Flush {
                remote: len - 1,
                len: 2,
            },
        ];
        for wr in oob {
            assert_eq!(one(&mut f, wr).status, S::RemoteAccessError, "{wr:?}");
        }
        assert_eq!(
            one(
                &mut f,
                WorkRequest::Cas {
                    remote: 2052,
                    expect: 0,
                    new: 1
                }
            )
            .status,
            S::Misaligned
        );
        assert_eq!(
            one(&mut f, WorkRequest::Faa { remote: 1, add: 1 }).status,
            S::Misaligned
        );
        let bad_local = [
            WorkRequest::Read {
                remote: 0,
                local: b.slice(200, 57),
            },
            WorkRequest::Write {
                remote: 0,
                local: b.slice(u32::MAX, 2),
            },
            WorkRequest::Read {
                remote: 0,
                local: LocalBuf(99).slice(0, 1),
            },
        ];
        for wr in bad_local {
            assert_eq!(one(&mut f, wr).status, S::LocalProtectionError, "{wr:?}");
        }
        assert!(f.buf(LocalBuf(99)).is_empty());
        assert_eq!(f.pmem().load_u64(2048), 15, "failed atomics change nothing");
        let c = f.counters();
        assert_eq!(
            (c.reads, c.writes, c.cas, c.faa, c.flushes),
            (4, 3, 4, 3, 2)
        );
        assert_eq!(c.read_bytes, 100 + 11 + 57 + 1);
        assert_eq!(c.write_bytes, 100 + 2 + 2);
        assert_eq!(c.round_trips, c.verbs());
    }

    #[test]
    fn round_trips_are_shared_by_verbs_in_flight() {
        let (mut f, _server) = fabric(NicProfile::None, None);
        let b = f.alloc_buf(64).expect("buf");
        let wrs: Vec<_> = (0..3)
            .map(|i| {
                (
                    i,
                    WorkRequest::Read {
                        remote: i * 64,
                        local: b.slice(0, 8),
                    },
                )
            })
            .collect();
        let mut out = [empty(); 3];
        execute(&mut f, &wrs, &mut out, T).expect("batch");
        assert_eq!(out.map(|c| c.wr_id), [0, 1, 2]);
        assert_eq!(f.counters().round_trips, 1);
        for wr in &wrs {
            execute(&mut f, std::slice::from_ref(wr), &mut out[..1], T).expect("one");
        }
        assert_eq!(f.counters().round_trips, 4);
        // Posted while another is outstanding: shares its round trip.
        f.post(&wrs[..1]).expect("post");
        f.post(&wrs[1..]).expect("post");
        f.wait(&mut out, T).expect("wait");
        assert_eq!(f.counters().round_trips, 5);
        assert_eq!(f.counters().reads, 9);
        // Nothing lost by waiting for more than is outstanding.
        assert!(f.wait(&mut out[..1], T).is_err());
    }

    #[test]
    fn queue_depth_is_enforced() {
        let (f, _server) = fabric(NicProfile::None, None);
        let mut f = f.with_queue_depth(2);
        let wr = (1, WorkRequest::Faa { remote: 0, add: 1 });
        f.post(&[wr, wr]).expect("two fit");
        assert!(matches!(
            f.post(&[wr]),
            Err(FabricError::QueueFull { depth: 2 })
        ));
        let mut out = [empty(); 2];
        assert_eq!(f.poll(&mut out).expect("poll"), 2);
        f.post(&[wr]).expect("room again");
        assert_eq!(f.pmem().load_u64(0), 3, "the refused post did nothing");
    }

    #[test]
    fn completions_wait_for_their_modelled_time() {
        let clock = ManualClock::new(10_000);
        let (mut f, _server) = fabric(NicProfile::Cx3Fdr, Some(clock.clone()));
        let big = f.alloc_buf(1 << 20).expect("buf");
        let wr = |id| {
            (
                id,
                WorkRequest::Write {
                    remote: 0,
                    local: big.slice(0, 1 << 20),
                },
            )
        };
        f.post(&[wr(1), wr(2)]).expect("post");
        // The WRITEs are done in memory at once, but not pollable yet.
        let mut out = [empty(); 2];
        assert_eq!(f.poll(&mut out).expect("poll"), 0);
        assert!(matches!(
            f.wait(&mut out, Duration::from_millis(1)),
            Err(FabricError::Timeout(_))
        ));
        assert_eq!(f.outstanding(), 2, "a timed-out wait takes nothing");
        let ser = f.nic().occupancy_ns(1 << 20);
        let first = 10_000 + ser + 1_800;
        clock.set(first - 1);
        assert_eq!(f.poll(&mut out).expect("poll"), 0);
        clock.set(first);
        assert_eq!(f.poll(&mut out).expect("poll"), 1);
        assert_eq!(out[0].wr_id, 1);
        // The second waited for the first to leave the link.
        clock.set(first + ser - 1);
        assert_eq!(f.poll(&mut out).expect("poll"), 0);
        clock.set(first + ser);
        f.wait(&mut out[..1], T).expect("ready now");
        assert_eq!(out[0].wr_id, 2);
        assert_eq!(f.counters().round_trips, 1);
    }

    #[test]
    fn control_frames_are_counted() {
        let (mut f, mut server) = fabric(NicProfile::None, None);
        f.send(&Request::Ping.encode(3)).expect("send");
        server.poll(|_, r| Some(Response::Pong.encode(r.req_id)));
        let r = f.recv(T).expect("recv").expect("reply");
        assert_eq!(r.req_id, 3);
        assert_eq!((f.counters().sends, f.counters().recvs), (1, 1));
        assert_eq!(f.recv(Duration::ZERO).expect("recv"), None);
        assert_eq!(f.counters().recvs, 1);
    }

    #[test]
    fn two_mappings_of_a_region_file_see_each_others_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let region_path = dir.path().join("r.region");
        let ctl_path = crate::fabric::default_ctl_path(&region_path);
        let dpm_region = RegionFile::create(&region_path, 1 << 16).expect("region");
        let dpm = dpm_region.pmem();
        let mut server = ControlServer::create(&ctl_path, 2).expect("ctl");
        let mut kn =
            ShmFabric::connect_file(&region_path, &ctl_path, NicProfile::None).expect("connect");
        let mut kn2 =
            ShmFabric::connect_file(&region_path, &ctl_path, NicProfile::None).expect("connect");
        assert!(matches!(
            ShmFabric::connect_file(&region_path, &ctl_path, NicProfile::None),
            Err(FabricError::NoFreeSlot { slots: 2 })
        ));
        let b = kn.alloc_buf(64).expect("buf");
        kn.buf_mut(b).copy_from_slice(&[0xA5; 64]);
        one(
            &mut kn,
            WorkRequest::Write {
                remote: 4096,
                local: b.slice(0, 64),
            },
        );
        one(
            &mut kn,
            WorkRequest::Flush {
                remote: 4096,
                len: 64,
            },
        );
        let mut seen = [0u8; 64];
        dpm.read(4096, &mut seen);
        assert_eq!(seen, [0xA5; 64]);
        dpm.store_u64(8192, 41);
        let c = one(
            &mut kn2,
            WorkRequest::Faa {
                remote: 8192,
                add: 1,
            },
        );
        assert_eq!(c.value, 41);
        let b2 = kn2.alloc_buf(8).expect("buf");
        one(
            &mut kn2,
            WorkRequest::Read {
                remote: 8192,
                local: b2.slice(0, 8),
            },
        );
        assert_eq!(kn2.buf(b2), 42u64.to_le_bytes());
        // A control round trip over the file, served on another thread.
        let t = std::thread::spawn(move || {
            let mut backoff = Backoff::new();
            while server.poll(|_, r| Some(Response::Pong.encode(r.req_id))) == 0 {
                backoff.snooze();
            }
            server
        });
        assert_eq!(
            kn.control().call(&Request::Ping, T).expect("call"),
            Ok(Response::Pong)
        );
        let server = t.join().expect("server");
        drop(server);
        assert!(matches!(
            ShmFabric::connect_file(&region_path, &ctl_path, NicProfile::None),
            Err(FabricError::NotRunning(_))
        ));
        // A missing region is no DPM that is starting: waiting would not help.
        let missing = dir.path().join("missing.region");
        let e =
            ShmFabric::connect_file(&missing, &ctl_path, NicProfile::None).expect_err("no region");
        assert!(
            !e.is_transient() && e.to_string().contains("does not exist"),
            "{e}"
        );
    }
}
