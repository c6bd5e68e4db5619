//! The manager's durable store against a real memory node (in this process, over the
//! shm fabric's control switchboard): leases and maps round-trip through control
//! messages, a map reaches the control area exactly, fencing closes a KN's logs, and a
//! manager started on the same DPM finds what the previous one left.

use std::sync::Arc;
use std::time::Duration;

use dinomo_hw::fabric::nic::NicProfile;
use dinomo_hw::fabric::{ControlChannel, ControlServer, DpmSpec, LocalDpm};
use dinomo_hw::heap::HeapRegion;
use dinomo_hw::CpuPersist;
use dinomo_manager::clock::ManualClock;
use dinomo_manager::store::{DpmStore, DurableStore, LeaseRecord};
use dinomo_manager::{Manager, ManagerConfig, Peer};
use dinomo_shared::geometry::FormatParams;
use dinomo_shared::manager_proto::{MgrReply, MgrRequest, Role};
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::ownership::SlotMap;
use dpm_fw::runner::{DpmService, ServeConfig};
use dpm_fw::Dpm;

const REGION: u64 = 32 << 20;
const T: Duration = Duration::from_secs(10);

type Service = DpmService<dinomo_hw::heap::HeapPersist<CpuPersist>>;

/// A memory node serving a fresh region, and how to reach it.
fn dpm() -> (Service, DpmSpec) {
    let region = HeapRegion::new(REGION);
    let mut params = FormatParams::for_size(REGION);
    params.block_size = 1 << 20;
    let dpm = Dpm::format(region.pmem(CpuPersist::detect()), &params, 77).expect("format");
    let control = ControlServer::in_memory(16);
    let handle = control.handle();
    let cfg = ServeConfig {
        workers: 1,
        pin: false,
        ..ServeConfig::default()
    };
    let service = DpmService::start(Arc::new(dpm), control, &cfg).expect("serve");
    let spec = DpmSpec::Local(LocalDpm {
        region,
        control: handle,
        nic: NicProfile::None,
    });
    (service, spec)
}

#[test]
fn leases_maps_and_fences_go_through_control_messages() {
    let (service, spec) = dpm();
    let mut store = DpmStore::connect(&spec, T).expect("connect");
    let stored = store.load().expect("load");
    assert_eq!(stored.map_epoch, 0);
    assert!(stored.max_kns > 2);
    assert!(stored.leases.is_empty(), "{stored:?}");

    let rec = LeaseRecord {
        lease_epoch: 4,
        expires_ms: 1_700_000_000_000,
        lease_ms: 1500,
    };
    store.store_lease(2, &rec).expect("store lease");
    assert_eq!(store.load().expect("load").leases, vec![(2, rec)]);
    let row = service.dpm().lease(2).expect("row");
    assert_eq!((row.kn_id, row.lease_epoch, row.lease_ms), (3, 4, 1500));

    // A map with many ranges (several frames) lands exactly.
    let map = SlotMap::consistent(5, &[0, 1, 2], 64);
    store.store_map(&map).expect("store map");
    let (epoch, owners) = service.dpm().stored_map();
    assert_eq!(epoch, 5);
    assert_eq!(owners, map.owners());
    assert_eq!(store.load().expect("load").map_epoch, 5);
    // Not newer: refused, and the stored map stays.
    assert!(store.store_map(&SlotMap::consistent(5, &[0], 64)).is_err());
    assert_eq!(service.dpm().stored_map().1, map.owners());

    // Fencing a KN closes the logs it opened.
    let mut kn = spec.connect().expect("KN connection");
    let opened = kn
        .call(
            &Request::OpenLog {
                kn_id: 2,
                shard: 0,
                lease_epoch: 4,
            },
            T,
        )
        .expect("open log");
    assert!(
        matches!(opened, Ok(Response::LogOpened { .. })),
        "{opened:?}"
    );
    let fenced = store.fence(2).expect("fence");
    assert_eq!(fenced.logs, 1);
    assert_eq!(store.fence(2).expect("fence again").logs, 0, "repeatable");
    drop(service);
}

#[test]
fn a_manager_on_the_dpm_stores_what_it_publishes_and_a_successor_finds_it() {
    let (service, spec) = dpm();
    let cfg = ManagerConfig {
        lease: Duration::from_millis(800),
        vnodes: 16,
    };
    let clock = Arc::new(ManualClock::default());
    let m = Manager::new(
        cfg.clone(),
        Box::new(DpmStore::connect(&spec, T).expect("connect")),
        clock.clone(),
        None,
    )
    .expect("manager");
    assert_eq!(m.leftover_wait(), Duration::ZERO);
    m.fence_leftovers().expect("nothing left over");
    let kn = Peer {
        session: 1,
        role: Role::Kn,
    };
    let MgrReply::Registered {
        kn_id, lease_epoch, ..
    } = m.handle(
        &kn,
        MgrRequest::Register {
            addr: "127.0.0.1:7001".into(),
            shards: 1,
        },
    )
    else {
        panic!("register");
    };
    assert!(matches!(
        m.handle(&kn, MgrRequest::Join { kn_id, lease_epoch }),
        MgrReply::Lease { epoch: 1, .. }
    ));
    let (epoch, owners) = service.dpm().stored_map();
    assert_eq!(epoch, 1);
    assert!(owners.iter().all(|&o| o == kn_id));

    // The manager dies; its successor sees the live lease and keeps it for re-adoption: the
    // KN does not come back, so once one lease lapsed it is fenced, its lease recorded as
    // ended, and a map without it is published above the stored epoch.
    drop(m);
    let next = Manager::new(
        cfg,
        Box::new(DpmStore::connect(&spec, T).expect("connect")),
        clock.clone(),
        None,
    )
    .expect("successor");
    assert!(next.leftover_wait() >= Duration::from_millis(800));
    next.fence_leftovers().expect("nothing ended to fence");
    let row = service.dpm().lease(u32::from(kn_id)).expect("row");
    assert_ne!(row.expires_ms, 0, "not fenced while the lease may be held");
    clock.advance(next.leftover_wait());
    next.tick();
    let row = service.dpm().lease(u32::from(kn_id)).expect("row");
    assert_eq!(row.expires_ms, 0, "the leftover lease is recorded as ended");
    let MgrReply::Registered {
        kn_id: again,
        lease_epoch,
        ..
    } = next.handle(
        &kn,
        MgrRequest::Register {
            addr: "127.0.0.1:7002".into(),
            shards: 1,
        },
    )
    else {
        panic!("register");
    };
    next.handle(
        &kn,
        MgrRequest::Join {
            kn_id: again,
            lease_epoch,
        },
    );
    assert!(service.dpm().stored_map().0 >= 2);
}
