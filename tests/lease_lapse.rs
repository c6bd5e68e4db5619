//! A KN whose lease lapses while its batch is being written (the shard was paused between
//! its lease check and its WRITE) must not acknowledge that batch: the manager may have
//! fenced the KN first, and the memory node never merges past a fence.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_hw::fabric::nic::{NicModel, NicProfile};
use dinomo_hw::fabric::{
    Completion, ControlChannel, ControlServer, Fabric, FabricCounters, FabricError, LocalBuf,
    ShmFabric, WorkRequest, WrId,
};
use dinomo_hw::heap::{HeapPersist, HeapRegion};
use dinomo_hw::CpuPersist;
use dinomo_shared::geometry::FormatParams;
use dinomo_shared::msg::Frame;
use dpm_fw::runner::{DpmService, ServeConfig};
use dpm_fw::Dpm;
use host_kn::dac::DacConfig;
use host_kn::shard::LeaseGate;
use host_kn::{Client, Kn, KvError, Router, ShardConfig, SlotMap};

type P = HeapPersist<CpuPersist>;

/// The shm fabric, except that once `armed`, posting a WRITE first makes the lease lapse
/// for good: as if the shard had been stopped right after its lease check until the
/// manager gave up on it.
struct LapseOnWrite {
    inner: ShmFabric<P>,
    armed: Arc<AtomicBool>,
    gate: Arc<LeaseGate>,
}

impl Fabric for LapseOnWrite {
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
        let writes = wrs
            .iter()
            .any(|(_, wr)| matches!(wr, WorkRequest::Write { .. }));
        if writes && self.armed.load(Ordering::Acquire) {
            self.gate.set_lost();
        }
        self.inner.post(wrs)
    }
    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        self.inner.poll(out)
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
    fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<(), FabricError> {
        self.inner.wait(out, timeout)
    }
    fn counters(&self) -> &FabricCounters {
        self.inner.counters()
    }
}

impl ControlChannel for LapseOnWrite {
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError> {
        self.inner.send(frame)
    }
    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError> {
        self.inner.recv(timeout)
    }
    fn next_request_id(&mut self) -> u32 {
        self.inner.next_request_id()
    }
}

#[test]
fn a_batch_written_after_the_lease_lapsed_is_not_acknowledged() {
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

    let gate = Arc::new(LeaseGate::new(Duration::from_millis(50)));
    gate.extend_to(Instant::now() + Duration::from_secs(3600));
    let armed = Arc::new(AtomicBool::new(false));
    let mut cfg = ShardConfig::new(0, 0, 1, DacConfig::default());
    cfg.lease = Some(Arc::clone(&gate));
    let map = Arc::new(SlotMap::consistent(1, &[0], 4));
    let (g, a, r) = (Arc::clone(&gate), Arc::clone(&armed), Arc::clone(&region));
    let kn = Kn::start(vec![cfg], Arc::clone(&map), move |_| {
        let pm = Arc::new(r.pmem(CpuPersist::detect()));
        Ok(LapseOnWrite {
            inner: ShmFabric::new(pm, handle.client()?, NicModel::new(NicProfile::None)),
            armed: Arc::clone(&a),
            gate: Arc::clone(&g),
        })
    })
    .expect("KN");
    let router = Arc::new(Router::new(map));
    router.add_kn(0, kn.senders().to_vec());
    let mut client = Client::new(router, 4096);

    client
        .put(b"k", b"before")
        .expect("a write under a valid lease");
    assert_eq!(
        client.get(b"k").expect("get").as_deref(),
        Some(&b"before"[..])
    );

    armed.store(true, Ordering::Release);
    assert_eq!(client.put(b"k", b"late"), Err(KvError::LeaseLapsed));
    // The KN writes nothing more, and what it acknowledged stays as it was.
    assert!(client.put(b"other", b"x").is_err());
    assert!(gate.is_lost());
    kn.stop();
    let _ = service.stop();
}
