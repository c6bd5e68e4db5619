//! A KN shard whose one-sided access finds the memory node gone (over verbs: the DPM died or
//! restarted, and only a new queue pair reaches its region) reconnects and repeats what is
//! safe to repeat: a batch whose WRITE may or may not have landed is written again, with the
//! same bytes at the same offsets, and acknowledged only after its FLUSH; a read is read
//! again. A reconnect that fails leaves the write unacknowledged, with the error's kind.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dinomo_hw::fabric::nic::{NicModel, NicProfile};
use dinomo_hw::fabric::{
    Completion, CompletionStatus, ControlChannel, ControlServer, Fabric, FabricCounters,
    FabricError, LocalBuf, ShmFabric, Verb, WorkRequest, WrId,
};
use dinomo_hw::heap::{HeapPersist, HeapRegion};
use dinomo_hw::CpuPersist;
use dinomo_shared::geometry::FormatParams;
use dinomo_shared::msg::Frame;
use dpm_fw::runner::{DpmService, ServeConfig};
use dpm_fw::Dpm;
use host_kn::dac::DacConfig;
use host_kn::{Client, Kn, KvError, Router, ShardConfig, SlotMap};

type P = HeapPersist<CpuPersist>;

/// No fault armed.
const NONE: u8 = 0;
/// The next batch with a WRITE lands, then the connection is lost before its completions.
const AFTER_WRITE: u8 = 1;
/// The next batch with a WRITE is lost before it executes.
const BEFORE_WRITE: u8 = 2;
/// The next batch of READs only is lost before it executes.
const BEFORE_READ: u8 = 3;

/// What the test arms and sees.
#[derive(Default)]
struct Faults {
    armed: AtomicU8,
    /// Reconnects fail (the memory node does not come back).
    refuse: AtomicBool,
    reconnects: std::sync::atomic::AtomicU32,
}

/// The shm fabric, with a connection that is lost where `faults` says: until `reconnect`,
/// every one-sided request then fails with `Disconnected`, as over verbs.
struct Flaky {
    inner: ShmFabric<P>,
    faults: Arc<Faults>,
    lost: bool,
}

impl Flaky {
    fn gone(&self) -> Result<(), FabricError> {
        if self.lost {
            return Err(FabricError::Disconnected("test: the DPM went away".into()));
        }
        Ok(())
    }
}

impl Fabric for Flaky {
    fn region_len(&self) -> u64 {
        self.inner.region_len()
    }
    fn alloc_buf(&mut self, len: usize) -> Result<LocalBuf, FabricError> {
        self.inner.alloc_buf(len)
    }
    fn buf(&self, buf: LocalBuf) -> &[u8] {
        self.inner.buf(buf)
    }
    fn buf_mut(&mut self, buf: LocalBuf) -> &mut [u8] {
        self.inner.buf_mut(buf)
    }
    fn post(&mut self, wrs: &[(WrId, WorkRequest)]) -> Result<(), FabricError> {
        self.gone()?;
        let writes = wrs
            .iter()
            .any(|(_, w)| matches!(w, WorkRequest::Write { .. }));
        let fault = match self.faults.armed.load(Ordering::Acquire) {
            AFTER_WRITE | BEFORE_WRITE if writes => self.faults.armed.swap(NONE, Ordering::AcqRel),
            BEFORE_READ if !writes => self.faults.armed.swap(NONE, Ordering::AcqRel),
            _ => NONE,
        };
        match fault {
            AFTER_WRITE => {
                self.inner.post(wrs)?;
                let mut out = vec![
                    Completion {
                        wr_id: 0,
                        verb: Verb::Write,
                        status: CompletionStatus::Success,
                        value: 0,
                    };
                    wrs.len()
                ];
                self.inner.wait(&mut out, Duration::from_secs(5))?;
                self.lost = true;
                Ok(())
            }
            BEFORE_WRITE | BEFORE_READ => {
                self.lost = true;
                self.gone()
            }
            _ => self.inner.post(wrs),
        }
    }
    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        self.gone()?;
        self.inner.poll(out)
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
    fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<(), FabricError> {
        self.gone()?;
        self.inner.wait(out, timeout)
    }
    fn counters(&self) -> &FabricCounters {
        self.inner.counters()
    }
}

impl ControlChannel for Flaky {
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError> {
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError> {
        self.inner.recv(timeout)
    }
    fn next_request_id(&mut self) -> u32 {
        self.inner.next_request_id()
    }
    fn reconnect(&mut self, _: Duration) -> Result<(), FabricError> {
        if self.faults.refuse.load(Ordering::Acquire) {
            return Err(FabricError::NotRunning("test: nobody listens".into()));
        }
        self.lost = false;
        self.faults.reconnects.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

#[test]
fn a_lost_connection_is_reconnected_and_nothing_acknowledged_is_lost() {
    const REGION: u64 = 32 << 20;
    let region = HeapRegion::new(REGION);
    let params = FormatParams::for_size(REGION);
    let dpm = Dpm::format(region.pmem(CpuPersist::detect()), &params, 7).expect("format");
    let control = ControlServer::in_memory(params.max_logs + 8);
    let handle = control.handle();
    let serve = ServeConfig {
        workers: 1,
        pin: false,
        ..ServeConfig::default()
    };
    let service = DpmService::start(Arc::new(dpm), control, &serve).expect("memory node");
    let map = Arc::new(SlotMap::consistent(1, &[0], 4));
    let faults = Arc::new(Faults::default());
    let start_kn = || {
        let (f, r, h) = (Arc::clone(&faults), Arc::clone(&region), handle.clone());
        let cfg = ShardConfig::new(0, 0, 1, DacConfig::default());
        let kn = Kn::start(vec![cfg], Arc::clone(&map), move |_| {
            let pm = Arc::new(r.pmem(CpuPersist::detect()));
            Ok(Flaky {
                inner: ShmFabric::new(pm, h.client()?, NicModel::new(NicProfile::None)),
                faults: Arc::clone(&f),
                lost: false,
            })
        })
        .expect("KN");
        let router = Arc::new(Router::new(Arc::clone(&map)));
        router.add_kn(0, kn.senders().to_vec());
        (kn, Client::new(router, 4096))
    };
    let (kn, mut client) = start_kn();
    client.put(b"a", b"1").expect("put");

    // The batch landed, its completion did not: written again, then acknowledged.
    faults.armed.store(AFTER_WRITE, Ordering::Release);
    client
        .put(b"a", b"2")
        .expect("acknowledged after the reconnect");
    assert_eq!(faults.reconnects.load(Ordering::Acquire), 1);
    // The batch never left: written after the reconnect.
    faults.armed.store(BEFORE_WRITE, Ordering::Release);
    client
        .put(b"b", b"3")
        .expect("acknowledged after the reconnect");
    assert_eq!(faults.reconnects.load(Ordering::Acquire), 2);
    // A read of the index that found the DPM gone is read again.
    faults.armed.store(BEFORE_READ, Ordering::Release);
    assert_eq!(client.get(b"absent").expect("read again"), None);
    assert_eq!(faults.reconnects.load(Ordering::Acquire), 3);
    assert_eq!(client.get(b"a").expect("get").as_deref(), Some(&b"2"[..]));
    assert_eq!(client.get(b"b").expect("get").as_deref(), Some(&b"3"[..]));
    let stats = kn.stats();
    assert_eq!(stats.reconnects, 3, "{stats:?}");

    // The memory node does not come back: the write is not acknowledged, and the error
    // says why (its kind kept, not flattened into a fabric error).
    faults.refuse.store(true, Ordering::Release);
    faults.armed.store(BEFORE_WRITE, Ordering::Release);
    let e = client.put(b"c", b"4").expect_err("no DPM");
    assert!(matches!(e, KvError::Disconnected(_)), "{e:?}");
    assert!(
        client.put(b"d", b"5").is_err(),
        "the log is not trusted any more"
    );
    faults.refuse.store(false, Ordering::Release);
    kn.stop();

    // A new KN, cold, reads what the DPM merged from the log: the acknowledged writes, each
    // once (the batch written twice is one batch).
    let (kn, mut client) = start_kn();
    assert_eq!(client.get(b"a").expect("get").as_deref(), Some(&b"2"[..]));
    assert_eq!(client.get(b"b").expect("get").as_deref(), Some(&b"3"[..]));
    assert_eq!(client.get(b"d").expect("get"), None, "never staged");
    client.put(b"e", b"6").expect("put");
    assert_eq!(client.get(b"e").expect("get").as_deref(), Some(&b"6"[..]));
    kn.stop();
    let _ = service.stop();
}
