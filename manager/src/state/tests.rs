//! The state machine driven request by request, with a manual clock, a store that records
//! every call (and fails when told to) and a spawner that starts nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dinomo_shared::manager_proto::{MapMsg, MgrReply, MgrRequest, Role};
use dinomo_shared::ownership::SlotMap;
use dinomo_shared::ErrorCode;

use super::*;
use crate::clock::ManualClock;
use crate::store::{Fenced, LeaseRecord, StoreError, Stored};

const LEASE: Duration = Duration::from_millis(1000);

/// The session the harness's KNs speak on.
const KN: Peer = Peer {
    session: 1,
    role: Role::Kn,
};
/// Another KN's session (holds the secret, but did not register the KNs above).
const OTHER_KN: Peer = Peer {
    session: 2,
    role: Role::Kn,
};
const CTL: Peer = Peer {
    session: 3,
    role: Role::Ctl,
};

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Lease(u16, LeaseRecord),
    /// A stored map: its epoch and the KNs that own slots in it.
    Map(u64, BTreeSet<u16>),
    Fence(u16),
    FreeCell(u32),
}

#[derive(Debug, Default)]
struct World {
    ops: Vec<Op>,
    stored: Stored,
    fail_fence: BTreeSet<u16>,
    fail_map: bool,
    fail_lease: bool,
    /// Active cells at the DPM.
    active: BTreeSet<u32>,
}

#[derive(Clone, Debug, Default)]
struct FakeStore(Arc<Mutex<World>>);

impl FakeStore {
    fn with(f: impl FnOnce(&mut World)) -> Self {
        let s = Self::default();
        f(&mut s.world());
        s
    }
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().expect("world")
    }
    fn ops(&self) -> Vec<Op> {
        std::mem::take(&mut self.world().ops)
    }
}

fn unreachable_dpm() -> StoreError {
    StoreError::Unreachable("the DPM is down".into())
}

impl DurableStore for FakeStore {
    fn load(&mut self) -> Result<Stored, StoreError> {
        Ok(self.world().stored.clone())
    }
    fn store_lease(&mut self, kn: u16, record: &LeaseRecord) -> Result<(), StoreError> {
        let mut w = self.world();
        if w.fail_lease {
            return Err(unreachable_dpm());
        }
        w.ops.push(Op::Lease(kn, *record));
        w.stored.leases.retain(|(k, _)| *k != kn);
        w.stored.leases.push((kn, *record));
        Ok(())
    }
    fn store_map(&mut self, map: &SlotMap) -> Result<(), StoreError> {
        let mut w = self.world();
        if w.fail_map {
            return Err(unreachable_dpm());
        }
        if map.epoch() <= w.stored.map_epoch {
            return Err(StoreError::Refused {
                what: "MapBegin",
                code: ErrorCode::StaleEpoch,
            });
        }
        w.stored.map_epoch = map.epoch();
        w.ops
            .push(Op::Map(map.epoch(), map.owners().iter().copied().collect()));
        Ok(())
    }
    fn free_cell(&mut self, cell: u32) -> Result<bool, StoreError> {
        let mut w = self.world();
        if w.fail_map {
            return Err(unreachable_dpm());
        }
        let active = w.active.remove(&cell);
        w.stored.active_cells = w.active.len() as u32;
        w.ops.push(Op::FreeCell(cell));
        Ok(active)
    }
    fn fence(&mut self, kn: u16) -> Result<Fenced, StoreError> {
        let mut w = self.world();
        if w.fail_fence.contains(&kn) {
            return Err(unreachable_dpm());
        }
        w.ops.push(Op::Fence(kn));
        Ok(Fenced {
            logs: 2,
            entries: 10,
        })
    }
}

struct Harness {
    m: Manager,
    clock: Arc<ManualClock>,
    store: FakeStore,
    leases: Mutex<BTreeMap<u16, u32>>,
}

fn harness(store: FakeStore) -> Harness {
    {
        let mut w = store.world();
        if w.stored.max_kns == 0 {
            w.stored.max_kns = 8;
        }
    }
    let clock = Arc::new(ManualClock::default());
    let m = Manager::new(
        ManagerConfig {
            lease: LEASE,
            vnodes: 16,
        },
        Box::new(store.clone()),
        clock.clone(),
        None,
    )
    .expect("manager");
    m.fence_leftovers().expect("no leftovers");
    store.ops();
    Harness {
        m,
        clock,
        store,
        leases: Mutex::default(),
    }
}

impl Harness {
    fn register(&self, addr: &str) -> (u16, u32) {
        match self.m.handle(
            &KN,
            MgrRequest::Register {
                addr: addr.into(),
                shards: 2,
            },
        ) {
            MgrReply::Registered {
                kn_id, lease_epoch, ..
            } => {
                self.leases
                    .lock()
                    .expect("leases")
                    .insert(kn_id, lease_epoch);
                (kn_id, lease_epoch)
            }
            other => panic!("register: {other:?}"),
        }
    }

    fn lease_of(&self, kn: u16) -> u32 {
        self.leases
            .lock()
            .expect("leases")
            .get(&kn)
            .copied()
            .unwrap_or(0)
    }

    fn join(&self, kn: u16) -> MgrReply {
        self.m.handle(
            &KN,
            MgrRequest::Join {
                kn_id: kn,
                lease_epoch: self.lease_of(kn),
            },
        )
    }

    fn renew(&self, kn: u16, lease_epoch: u32) -> MgrReply {
        self.m.handle(
            &KN,
            MgrRequest::Renew {
                kn_id: kn,
                lease_epoch,
                load: None,
            },
        )
    }

    fn ack(&self, kn: u16) -> MgrReply {
        let epoch = self.m.epoch();
        self.m.handle(
            &KN,
            MgrRequest::Ack {
                kn_id: kn,
                lease_epoch: self.lease_of(kn),
                epoch,
                release_us: 500,
                entries_merged: 3,
                cells: Vec::new(),
                refused: Vec::new(),
            },
        )
    }

    /// A KN that registered, joined and acknowledged its map.
    fn kn(&self, addr: &str) -> (u16, u32) {
        let (kn, e) = self.register(addr);
        assert!(matches!(self.join(kn), MgrReply::Lease { .. }));
        assert!(matches!(self.ack(kn), MgrReply::Lease { .. }));
        (kn, e)
    }

    /// Moves time in steps shorter than a lease, renewing `alive` at each.
    fn pass(&self, d: Duration, alive: &[(u16, u32)]) {
        let step = LEASE / 4;
        let mut t = Duration::ZERO;
        while t < d {
            self.clock.advance(step);
            t += step;
            for &(kn, e) in alive {
                assert!(matches!(self.renew(kn, e), MgrReply::Lease { .. }));
            }
            self.m.tick();
        }
    }
}

#[test]
fn register_records_a_lease_with_a_new_epoch_and_refuses_when_full() {
    let store = FakeStore::with(|w| {
        w.stored.max_kns = 2;
        w.stored.leases.push((
            0,
            LeaseRecord {
                lease_epoch: 7,
                expires_ms: 0,
                lease_ms: 1000,
            },
        ));
    });
    let h = harness(store);
    let (a, ea) = h.register("127.0.0.1:7001");
    let (b, eb) = h.register("127.0.0.1:7002");
    assert_eq!((a, ea), (0, 8), "the stored epoch of id 0 is bumped");
    assert_eq!((b, eb), (1, 1));
    let ops = h.store.ops();
    assert!(
        matches!(ops.as_slice(), [Op::Lease(0, r0), Op::Lease(1, r1)]
            if r0.lease_epoch == 8 && r0.is_live() && r0.lease_ms == 1000 && r1.lease_epoch == 1),
        "{ops:?}"
    );
    assert!(matches!(
        h.m.handle(&KN, MgrRequest::Register { addr: "127.0.0.1:7003".into(), shards: 1 }),
        MgrReply::Error { message } if message.contains("all 2 KN slots")
    ));
    // A lease that cannot be recorded is not granted.
    let h = harness(FakeStore::with(|w| w.fail_lease = true));
    assert!(matches!(
        h.m.handle(&KN, MgrRequest::Register { addr: "127.0.0.1:7003".into(), shards: 1 }),
        MgrReply::Error { message } if message.contains("cannot record the lease")
    ));
    assert!(!h.m.has_kn(0));
}

#[test]
fn join_stores_the_map_before_publishing_it_and_it_settles_on_ack() {
    let h = harness(FakeStore::with(|w| w.stored.map_epoch = 41));
    let (a, _) = h.register("127.0.0.1:7001");
    assert!(matches!(h.store.ops().as_slice(), [Op::Lease(0, _)]));
    assert_eq!(h.m.map().epoch, 41, "nothing published before the join");
    match h.join(a) {
        MgrReply::Lease { epoch, settled, .. } => assert_eq!((epoch, settled), (42, false)),
        other => panic!("{other:?}"),
    }
    let ops = h.store.ops();
    assert!(
        matches!(ops.as_slice(), [Op::Map(42, owners)] if *owners == BTreeSet::from([a])),
        "{ops:?}"
    );
    let map = h.m.map();
    assert_eq!(map.ranges, vec![(0, SLOTS - 1, a)]);
    assert!(!map.settled);
    assert!(matches!(h.ack(a), MgrReply::Lease { settled: true, .. }));
    assert!(h.m.map().settled);
    let r = h.m.reconfig(42).expect("reconfig");
    assert_eq!((r.slots_moved, r.kns), (SLOTS as usize, 1));
    assert!(r.settle_ms.is_some() && r.max_release_ms > 0.0 && r.entries_merged == 3);

    // A second KN: slots move; the ones whose settled owner is still live are "moving"
    // until every KN acknowledged.
    let (b, _) = h.register("127.0.0.1:7002");
    h.join(b);
    let map = h.m.map();
    assert_eq!(map.epoch, 43);
    assert!(!map.moving.is_empty() && map.moving.iter().all(|r| r.2 == b));
    h.ack(b);
    assert!(
        !h.m.map().moving.is_empty(),
        "KN a has not installed epoch 43"
    );
    h.ack(a);
    let map = h.m.map();
    assert!(map.settled && map.moving.is_empty());
    // A forged ack of a future epoch is refused and changes nothing.
    assert!(matches!(
        h.m.handle(
            &KN,
            MgrRequest::Ack {
                kn_id: a,
                lease_epoch: h.lease_of(a),
                epoch: u64::MAX,
                release_us: 0,
                entries_merged: u64::MAX,
                cells: Vec::new(),
                refused: Vec::new(),
            }
        ),
        MgrReply::Error { .. }
    ));
    assert_eq!(h.m.reconfig(43).map(|r| r.entries_merged), Some(6));
}

#[test]
fn an_expired_lease_is_fenced_before_its_slots_move() {
    let h = harness(FakeStore::default());
    let a = h.kn("127.0.0.1:7001");
    let b = h.kn("127.0.0.1:7002");
    h.ack(a.0);
    assert!(h.m.is_settled());
    let epoch = h.m.epoch();
    h.store.ops();
    // KN b stops renewing; the DPM cannot fence it at first.
    h.store.world().fail_fence.insert(b.0);
    h.pass(LEASE * 2, &[a]);
    assert!(
        h.store.ops().is_empty(),
        "no fence went through, no map was stored"
    );
    assert_eq!(
        h.m.epoch(),
        epoch,
        "b's slots stay with b until it is fenced"
    );
    assert!(!h.m.is_settled(), "a KN is being fenced");
    assert!(
        matches!(h.renew(b.0, b.1), MgrReply::Error { .. }),
        "b's lease is gone"
    );
    // The DPM is back: fence, end the lease, then store and publish the map without b.
    h.store.world().fail_fence.clear();
    h.pass(LEASE / 4, &[a]);
    let ops = h.store.ops();
    assert!(
        matches!(ops.as_slice(),
            [Op::Fence(k), Op::Lease(k2, ended), Op::Map(e, owners)]
            if *k == b.0 && *k2 == b.0 && !ended.is_live() && *e == epoch + 1
                && *owners == BTreeSet::from([a.0])),
        "{ops:?}"
    );
    let r = h.m.reconfig(epoch + 1).expect("reconfig");
    assert!(r.reason.contains(&format!("kn {} fenced", b.0)), "{r:?}");
    assert!(!h.m.has_kn(b.0));
    // The survivor keeps its lease throughout.
    assert!(matches!(h.renew(a.0, a.1), MgrReply::Lease { .. }));
}

#[test]
fn a_leaving_kn_is_fenced_and_removed_and_a_map_that_cannot_be_stored_is_retried() {
    let h = harness(FakeStore::default());
    let a = h.kn("127.0.0.1:7001");
    let b = h.kn("127.0.0.1:7002");
    h.ack(a.0);
    let epoch = h.m.epoch();
    h.store.ops();
    h.store.world().fail_map = true;
    assert_eq!(
        h.m.handle(
            &KN,
            MgrRequest::Leave {
                kn_id: b.0,
                lease_epoch: b.1
            }
        ),
        MgrReply::Ok
    );
    let ops = h.store.ops();
    assert!(
        matches!(ops.as_slice(), [Op::Fence(k), Op::Lease(_, ended)] if *k == b.0 && !ended.is_live()),
        "{ops:?}"
    );
    assert_eq!(
        h.m.epoch(),
        epoch,
        "the map could not be stored: not published"
    );
    let map = h.m.map();
    assert_eq!(
        map.kns.len(),
        2,
        "b stays listed while the map still has it"
    );
    assert!(!map.settled, "b's slots are about to move");
    h.store.world().fail_map = false;
    h.m.tick();
    let ops = h.store.ops();
    assert!(
        matches!(ops.as_slice(), [Op::Map(e, _)] if *e == epoch + 1),
        "{ops:?}"
    );
    assert!(h
        .m
        .reconfig(epoch + 1)
        .is_some_and(|r| r.reason == format!("kn {} left", b.0)));
    assert_eq!(h.m.departure_of(b.0).map(|r| r.epoch), Some(epoch + 1));
    assert_eq!(h.m.map().kns.len(), 1);
    // A repeated or forged leave of a KN that is gone changes nothing.
    assert!(matches!(
        h.m.handle(
            &KN,
            MgrRequest::Leave {
                kn_id: b.0,
                lease_epoch: b.1
            }
        ),
        MgrReply::Error { .. }
    ));
    assert!(h.store.ops().is_empty());
}

/// What an earlier manager left: a map of epoch 9 over KNs 0 and 1 (both may still hold
/// their 2 s leases) and KN 2, whose lease ended.
fn left_by_an_earlier_manager() -> FakeStore {
    FakeStore::with(|w| {
        w.stored.max_kns = 4;
        w.stored.map_epoch = 9;
        let live = |lease_epoch| LeaseRecord {
            lease_epoch,
            expires_ms: 1,
            lease_ms: 2000,
        };
        w.stored.leases = vec![
            (0, live(3)),
            (1, live(5)),
            (
                2,
                LeaseRecord {
                    lease_epoch: 6,
                    expires_ms: 0,
                    lease_ms: 2000,
                },
            ),
        ];
    })
}

/// The map of epoch 9 as KNs 0 and 1 serve it.
fn served_map() -> MapMsg {
    MapMsg {
        epoch: 9,
        settled: true,
        kns: vec![(0, "127.0.0.1:7100".into()), (1, "127.0.0.1:7101".into())],
        ranges: vec![(0, 8191, 0), (8192, SLOTS - 1, 1)],
        moving: Vec::new(),
        replicas: Vec::new(),
    }
}

fn restarted(store: &FakeStore) -> (Manager, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::default());
    let m = Manager::new(
        ManagerConfig {
            lease: LEASE,
            vnodes: 16,
        },
        Box::new(store.clone()),
        clock.clone(),
        None,
    )
    .expect("manager");
    // The old manager granted 2 s leases: its KNs have that long to come back.
    assert_eq!(
        m.leftover_wait(),
        Duration::from_millis(2000) + LEASE_CLOCK_MARGIN
    );
    m.fence_leftovers().expect("fence");
    let ops = store.ops();
    assert!(
        matches!(ops.as_slice(), [Op::Fence(2), Op::Lease(2, r)] if !r.is_live()),
        "only the ended lease is fenced at start: {ops:?}"
    );
    (m, clock)
}

fn resume(m: &Manager, peer: &Peer, kn: u16, lease_epoch: u32, map: Option<MapMsg>) -> MgrReply {
    m.handle(
        peer,
        MgrRequest::Resume {
            kn_id: kn,
            lease_epoch,
            addr: format!("127.0.0.1:{}", 7100 + kn),
            lease_ms: 2000,
            map,
        },
    )
}

#[test]
fn a_restarted_manager_readopts_kns_that_resume_without_fencing_or_a_map_change() {
    let store = left_by_an_earlier_manager();
    let (m, clock) = restarted(&store);
    // Until a KN brings the map, nothing is published and joins wait.
    assert!(matches!(
        m.handle(&CTL, MgrRequest::Map),
        MgrReply::Retry { .. }
    ));
    let MgrReply::Registered {
        kn_id: new,
        lease_epoch: new_epoch,
        ..
    } = m.handle(
        &OTHER_KN,
        MgrRequest::Register {
            addr: "127.0.0.1:7200".into(),
            shards: 1,
        },
    )
    else {
        panic!("register");
    };
    assert_eq!(
        new, 2,
        "the ended id is reused; ids of KNs that may hold leases are not"
    );
    store.ops();
    assert!(matches!(
        m.handle(
            &OTHER_KN,
            MgrRequest::Join {
                kn_id: new,
                lease_epoch: new_epoch
            }
        ),
        MgrReply::Retry { .. }
    ));
    // A resume with a lease epoch that is not the KN's is refused.
    assert!(matches!(
        resume(&m, &KN, 0, 4, Some(served_map())),
        MgrReply::Error { .. }
    ));
    // KN 0 resumes with the stored map: it is the map again, settled, nothing moved.
    match resume(&m, &KN, 0, 3, Some(served_map())) {
        MgrReply::Lease { epoch, settled, .. } => assert_eq!((epoch, settled), (9, true)),
        other => panic!("{other:?}"),
    }
    let map = m.map();
    assert_eq!((map.epoch, &map.ranges), (9, &served_map().ranges));
    assert_eq!(map.kns, served_map().kns);
    // KN 1 resumes on its own session, later but within the old lease (the waiting KN
    // renews meanwhile, as KNs do).
    let renew_new = || {
        assert!(matches!(
            m.handle(
                &OTHER_KN,
                MgrRequest::Renew {
                    kn_id: new,
                    lease_epoch: new_epoch,
                    load: None
                }
            ),
            MgrReply::Lease { .. }
        ));
    };
    for _ in 0..6 {
        clock.advance(LEASE / 4);
        renew_new();
        m.tick();
    }
    assert!(matches!(
        resume(&m, &OTHER_KN, 1, 5, None),
        MgrReply::Lease { epoch: 9, .. }
    ));
    // Both keep renewing well past the old lease: nobody is fenced, no map is stored.
    for _ in 0..12 {
        clock.advance(LEASE / 4);
        assert!(matches!(
            m.handle(
                &KN,
                MgrRequest::Renew {
                    kn_id: 0,
                    lease_epoch: 3,
                    load: None
                }
            ),
            MgrReply::Lease { .. }
        ));
        assert!(matches!(
            m.handle(
                &OTHER_KN,
                MgrRequest::Renew {
                    kn_id: 1,
                    lease_epoch: 5,
                    load: None
                }
            ),
            MgrReply::Lease { .. }
        ));
        renew_new();
        m.tick();
    }
    let ops = store.ops();
    assert!(
        !ops.iter().any(|o| matches!(o, Op::Fence(_) | Op::Map(..))),
        "{ops:?}"
    );
    assert_eq!(m.epoch(), 9);
    assert!(m.is_settled());
    // The waiting KN joins now; the map continues above the stored epoch.
    assert!(matches!(
        m.handle(
            &OTHER_KN,
            MgrRequest::Join {
                kn_id: new,
                lease_epoch: new_epoch
            }
        ),
        MgrReply::Lease { epoch: 10, .. }
    ));
}

#[test]
fn a_kn_that_does_not_resume_within_the_old_lease_is_fenced_then_its_slots_move() {
    let store = left_by_an_earlier_manager();
    let (m, clock) = restarted(&store);
    assert!(matches!(
        resume(&m, &KN, 0, 3, Some(served_map())),
        MgrReply::Lease { .. }
    ));
    // KN 1 never comes back: it is fenced once the old lease (2 s) lapsed, not before.
    let mut fenced_at = None;
    for step in 1..=12u32 {
        clock.advance(LEASE / 4);
        assert!(matches!(
            m.handle(
                &KN,
                MgrRequest::Renew {
                    kn_id: 0,
                    lease_epoch: 3,
                    load: None
                }
            ),
            MgrReply::Lease { .. }
        ));
        m.tick();
        if store.ops().contains(&Op::Fence(1)) {
            fenced_at.get_or_insert(LEASE / 4 * step);
        }
    }
    let at = fenced_at.expect("KN 1 was fenced");
    assert!(at >= Duration::from_millis(2000), "fenced after {at:?}");
    let map = m.map();
    assert!(map.epoch > 9);
    assert!(map.ranges.iter().all(|r| r.2 == 0), "{map:?}");
    assert!(!m.has_kn(1));
}

#[test]
fn requests_for_a_kn_from_another_session_or_lease_change_nothing() {
    let h = harness(FakeStore::default());
    let a = h.kn("127.0.0.1:7001");
    let b = h.kn("127.0.0.1:7002");
    h.ack(a.0);
    assert!(h.m.is_settled());
    let (epoch, before) = (h.m.epoch(), h.m.map());
    h.store.ops();
    let forged = [
        MgrRequest::Leave {
            kn_id: a.0,
            lease_epoch: a.1,
        },
        MgrRequest::Ack {
            kn_id: a.0,
            lease_epoch: a.1,
            epoch: u64::MAX,
            release_us: u64::MAX,
            entries_merged: u64::MAX,
            cells: Vec::new(),
            refused: Vec::new(),
        },
        MgrRequest::Ack {
            kn_id: b.0,
            lease_epoch: b.1,
            epoch,
            release_us: 0,
            entries_merged: 0,
            cells: Vec::new(),
            refused: Vec::new(),
        },
        MgrRequest::Join {
            kn_id: a.0,
            lease_epoch: a.1,
        },
        MgrRequest::Renew {
            kn_id: a.0,
            lease_epoch: a.1,
            load: None,
        },
    ];
    for req in &forged {
        // Another KN's session, and an operator's session.
        for peer in [&OTHER_KN, &CTL] {
            let r = h.m.handle(peer, req.clone());
            assert!(
                matches!(r, MgrReply::Error { .. }),
                "{req:?} from {peer:?}: {r:?}"
            );
        }
    }
    // The right session with the wrong lease epoch (an earlier registration of the id).
    let r = h.m.handle(
        &KN,
        MgrRequest::Leave {
            kn_id: a.0,
            lease_epoch: a.1 + 1,
        },
    );
    assert!(matches!(r, MgrReply::Error { .. }), "{r:?}");
    // Registrations that would point clients elsewhere: not from an operator session, not
    // at an address clients cannot reach, not over a live KN's address.
    for (peer, addr) in [
        (&CTL, "127.0.0.1:7555"),
        (&OTHER_KN, "0.0.0.0:7555"),
        (&OTHER_KN, "127.0.0.1:0"),
        (&OTHER_KN, "evil"),
        (&OTHER_KN, "127.0.0.1:7001"),
    ] {
        let r = h.m.handle(
            peer,
            MgrRequest::Register {
                addr: addr.into(),
                shards: 1,
            },
        );
        // Over a live KN's address the answer is "later" (a KN restarted on its port
        // waits for its predecessor's lease to lapse); the others are errors.
        let live = addr == "127.0.0.1:7001";
        assert!(
            if live {
                matches!(r, MgrReply::Retry { .. })
            } else {
                matches!(r, MgrReply::Error { .. })
            },
            "{addr} from {peer:?}: {r:?}"
        );
    }
    // An operator session may not see status as a KN, nor a KN run operator requests.
    assert!(matches!(
        h.m.handle(&KN, MgrRequest::Status),
        MgrReply::Error { .. }
    ));
    assert!(matches!(
        h.m.handle(&CTL, MgrRequest::Status),
        MgrReply::Status(_)
    ));
    assert!(h.store.ops().is_empty(), "nothing stored or fenced");
    assert_eq!(h.m.map(), before);
    assert!(h.m.is_settled());
    assert!(matches!(
        h.renew(a.0, a.1),
        MgrReply::Lease { drain: false, .. }
    ));
    // The KN itself acknowledges and leaves.
    assert!(matches!(h.ack(a.0), MgrReply::Lease { .. }));
    assert_eq!(
        h.m.handle(
            &KN,
            MgrRequest::Leave {
                kn_id: b.0,
                lease_epoch: b.1
            }
        ),
        MgrReply::Ok
    );
    assert!(h.store.ops().contains(&Op::Fence(b.0)));
}

#[test]
fn leftover_wait_follows_the_lease_the_old_manager_granted() {
    // Records of an older manager carry no lease length: their expiry is waited for.
    let now = ManualClock::default().wall_ms();
    let old = Stored {
        max_kns: 4,
        map_epoch: 1,
        leases: vec![(
            2,
            LeaseRecord {
                lease_epoch: 1,
                expires_ms: now + 700,
                lease_ms: 0,
            },
        )],
        ..Stored::default()
    };
    assert_eq!(
        leftover_wait(&old, now, LEASE),
        Duration::from_millis(700) + LEASE_CLOCK_MARGIN
    );
    let ended = Stored {
        leases: vec![(2, LeaseRecord::default())],
        ..old
    };
    assert_eq!(leftover_wait(&ended, now, LEASE), Duration::ZERO);
}

#[test]
fn draining_rebalancing_and_what_cannot_be_done() {
    let h = harness(FakeStore::default());
    let a = h.kn("127.0.0.1:7001");
    assert!(h.m.mark_draining(a.0).is_err(), "the last KN cannot leave");
    let b = h.kn("127.0.0.1:7002");
    h.ack(a.0);
    h.m.mark_draining(b.0).expect("drain b");
    assert!(matches!(
        h.renew(b.0, b.1),
        MgrReply::Lease { drain: true, .. }
    ));
    assert!(matches!(
        h.renew(a.0, a.1),
        MgrReply::Lease { drain: false, .. }
    ));
    assert!(h.m.mark_draining(9).is_err());
    // Move a range to a.
    let before = h.m.epoch();
    let epoch =
        h.m.rebalance(Some((0, 99)), Some(a.0))
            .expect("rebalance")
            .expect("something moved");
    assert_eq!(epoch, before + 1);
    let map = h.m.map();
    assert!(map
        .ranges
        .iter()
        .any(|&(f, l, k)| f == 0 && l >= 99 && k == a.0));
    assert!(
        h.m.rebalance(Some((0, 99)), Some(a.0)).is_err(),
        "still settling"
    );
    h.ack(a.0);
    h.ack(b.0);
    assert!(h.m.settled_or_superseded(epoch));
    assert_eq!(
        h.m.rebalance(Some((0, 99)), Some(a.0))
            .expect("nothing to move"),
        None
    );
    assert!(h.m.rebalance(Some((5, 2)), Some(a.0)).is_err());
    assert!(h.m.rebalance(Some((0, 2)), None).is_err());
    assert!(h.m.rebalance(Some((0, 2)), Some(7)).is_err());
    // Without a spawner the manager says it cannot add KNs.
    assert!(!h.m.can_spawn());
    assert!(h
        .m
        .spawn_kn("127.0.0.1:7000".parse().expect("addr"))
        .is_err_and(|e| e.contains("--kn-exe")));
}

#[test]
fn a_stale_epoch_at_the_dpm_is_skipped() {
    let store = FakeStore::default();
    let h = harness(store);
    let a = h.kn("127.0.0.1:7001");
    // A map of a later epoch reached the DPM without this manager knowing (its reply was
    // lost): the next map is refused, then published above it.
    h.store.world().stored.map_epoch = 20;
    let b = h.register("127.0.0.1:7002");
    assert!(matches!(h.join(b.0), MgrReply::Error { .. }));
    h.m.tick();
    assert!(h.m.epoch() > 20, "epoch {}", h.m.epoch());
    let _ = a;
}

/// Every live KN acknowledges the current map, the owner of `key` reporting `cell` for it.
fn ack_all(h: &Harness, kns: &[u16], key: &[u8], cell: Option<u32>) {
    let epoch = h.m.epoch();
    for &kn in kns {
        let owner = h.m.replica(key).is_some_and(|r| r.owner == kn);
        let cells = match cell {
            Some(c) if owner => vec![(key_hex(key), c)],
            _ => Vec::new(),
        };
        let r = h.m.handle(
            &KN,
            MgrRequest::Ack {
                kn_id: kn,
                lease_epoch: h.lease_of(kn),
                epoch,
                release_us: 0,
                entries_merged: 0,
                cells,
                refused: Vec::new(),
            },
        );
        assert!(matches!(r, MgrReply::Lease { .. }), "{r:?}");
    }
    assert!(h.m.is_settled());
}

#[test]
fn a_key_is_replicated_and_returned_step_by_step_with_the_map() {
    let h = harness(FakeStore::default());
    let (a, ea) = h.kn("127.0.0.1:7100");
    let (b, eb) = h.kn("127.0.0.1:7101");
    let (c, ec) = h.kn("127.0.0.1:7102");
    ack_all(&h, &[a, b, c], b"k", None);
    let key = b"hot".as_slice();
    let owner = h.m.map().slot_map().owner(key_slot(key));
    let e0 = h.m.epoch();
    // Bad steps change nothing.
    assert!(h.m.replica_step(key, ReplicaStep::Serve).is_err());
    assert!(h.m.replica_step(b"", ReplicaStep::Begin).is_err());
    assert_eq!(h.m.epoch(), e0);

    // Begin: a map of its own (stored at the DPM) with the same slots, the owner alone,
    // no cell yet.
    h.store.ops();
    let e1 = h.m.replica_step(key, ReplicaStep::Begin).expect("begin");
    assert_eq!(e1, e0 + 1);
    assert!(matches!(h.store.ops().as_slice(), [Op::Map(e, _)] if *e == e1));
    assert_eq!(h.m.map().moving, Vec::new());
    let r = h.m.replica(key).expect("listed");
    assert_eq!(
        (r.owner, r.cell, r.phase),
        (owner, None, ReplicaPhase::Begin)
    );
    assert!(
        h.m.replica_step(key, ReplicaStep::Begin).is_err(),
        "settling"
    );
    // A cell reported by another KN than the owner is not taken.
    let not_owner = [a, b, c].into_iter().find(|&k| k != owner).expect("kn");
    let r = h.m.handle(
        &KN,
        MgrRequest::Ack {
            kn_id: not_owner,
            lease_epoch: h.lease_of(not_owner),
            epoch: e1,
            release_us: 0,
            entries_merged: 0,
            cells: vec![(key_hex(key), 9)],
            refused: Vec::new(),
        },
    );
    assert!(matches!(r, MgrReply::Lease { .. }));
    assert_eq!(h.m.replica(key).and_then(|r| r.cell), None);
    ack_all(&h, &[a, b, c], key, Some(4));
    assert_eq!(h.m.replica(key).and_then(|r| r.cell), Some(4));
    assert!(h.m.replica_step(key, ReplicaStep::Begin).is_err(), "twice");

    // Serving: every live KN, the owner first; status and the map list it.
    h.m.replica_step(key, ReplicaStep::Serve).expect("serve");
    let r = h.m.replica(key).expect("listed");
    assert_eq!(r.phase, ReplicaPhase::Serving);
    assert_eq!(r.kns[0], owner);
    assert_eq!(r.kns.len(), 3);
    assert_eq!(h.m.map().replicas, vec![r.clone()]);
    assert_eq!(h.m.status().replicas, vec![r.clone()]);
    ack_all(&h, &[a, b, c], key, None);

    // The owner's lease lapses: once it is fenced, the key's slot has a new owner, which
    // takes over the cell; the dead KN is no replica any more.
    let alive: Vec<(u16, u32)> = [(a, ea), (b, eb), (c, ec)]
        .into_iter()
        .filter(|(k, _)| *k != owner)
        .collect();
    h.pass(LEASE * 2, &alive);
    let new_owner = h.m.map().slot_map().owner(key_slot(key));
    assert_ne!(new_owner, owner);
    let r = h.m.replica(key).expect("still replicated");
    assert_eq!(
        (r.owner, r.cell, r.phase),
        (new_owner, Some(4), ReplicaPhase::Serving)
    );
    assert_eq!(r.kns.len(), 2);
    assert!(!r.kns.contains(&owner));
    let live: Vec<u16> = alive.iter().map(|(k, _)| *k).collect();
    ack_all(&h, &live, key, None);

    // Ending, End, Remove.
    h.m.replica_step(key, ReplicaStep::Ending).expect("ending");
    let r = h.m.replica(key).expect("listed");
    assert_eq!(
        (r.kns.clone(), r.phase),
        (vec![new_owner], ReplicaPhase::Ending)
    );
    ack_all(&h, &live, key, None);
    h.m.replica_step(key, ReplicaStep::End).expect("end");
    assert_eq!(h.m.replica(key).map(|r| r.phase), Some(ReplicaPhase::End));
    ack_all(&h, &live, key, None);
    h.m.replica_step(key, ReplicaStep::Remove).expect("remove");
    assert!(h.m.replica(key).is_none() && h.m.map().replicas.is_empty());
    assert!(h.m.replica_step(key, ReplicaStep::Ending).is_err());
}

#[test]
fn a_refused_begin_is_recorded_and_a_restarted_manager_learns_the_replicas_with_the_map() {
    let h = harness(FakeStore::default());
    let (a, _) = h.kn("127.0.0.1:7100");
    let key = b"k".as_slice();
    let e =
        h.m.replica_step(key, ReplicaStep::Begin)
            .expect_err("one KN");
    assert!(e.contains("two KNs"), "{e}");
    let (b, _) = h.kn("127.0.0.1:7101");
    ack_all(&h, &[a, b], key, None);
    h.m.replica_step(key, ReplicaStep::Begin).expect("begin");
    let a = h.m.replica(key).expect("listed").owner;
    let r = h.m.handle(
        &KN,
        MgrRequest::Ack {
            kn_id: a,
            lease_epoch: h.lease_of(a),
            epoch: h.m.epoch(),
            release_us: 0,
            entries_merged: 0,
            cells: Vec::new(),
            refused: vec![(key_hex(key), "no free cell".into())],
        },
    );
    assert!(matches!(r, MgrReply::Lease { .. }));
    assert!(h
        .m
        .replica_refused(key)
        .is_some_and(|w| w.contains("no free cell")));

    // A restarted manager takes the replicated keys from the first KN that resumes with
    // the stored map.
    let store = left_by_an_earlier_manager();
    let (m, _clock) = restarted(&store);
    let mut map = served_map();
    map.replicas = vec![ReplicaMsg {
        key: key_hex(b"hot"),
        owner: 0,
        cell: Some(2),
        kns: vec![0, 1],
        phase: ReplicaPhase::Serving,
    }];
    assert!(matches!(
        resume(&m, &KN, 0, 3, Some(map.clone())),
        MgrReply::Lease { .. }
    ));
    assert_eq!(m.replicas(), map.replicas);
    let MgrReply::Map(published) = m.handle(&CTL, MgrRequest::Map) else {
        panic!("map");
    };
    assert_eq!(published.replicas, map.replicas);
}

#[test]
fn cells_no_kn_knows_of_are_freed_before_any_kn_serves() {
    // A fresh start (no lease may be held): every active cell is freed at once.
    let store = FakeStore::with(|w| {
        w.stored.cells = 16;
        w.active = [3, 9].into();
        w.stored.active_cells = 2;
    });
    let h = harness(store.clone());
    assert!(store.world().active.is_empty());
    let _ = h;
    // Nothing active: nothing asked.
    let store = FakeStore::with(|w| w.stored.cells = 16);
    let _h = harness(store.clone());
    assert!(store.ops().is_empty());

    // A restart where no KN comes back: the cells are freed once every KN of the earlier
    // manager was fenced, before the map is known (and KNs may join).
    let store = left_by_an_earlier_manager();
    {
        let mut w = store.world();
        w.stored.cells = 8;
        w.active = [5].into();
        w.stored.active_cells = 1;
    }
    let (m, clock) = restarted(&store);
    assert_eq!(store.world().active.len(), 1, "KNs may still serve the key");
    clock.advance(Duration::from_millis(2100));
    m.tick();
    m.tick();
    let ops = store.ops();
    let fenced = ops.iter().position(|o| *o == Op::Fence(1)).expect("fenced");
    let freed = ops
        .iter()
        .position(|o| *o == Op::FreeCell(5))
        .expect("freed");
    assert!(fenced < freed, "{ops:?}");
    assert!(store.world().active.is_empty());
    assert!(matches!(m.handle(&CTL, MgrRequest::Map), MgrReply::Map(_)));

    // KNs that come back bring the replicated keys: nothing is freed.
    let store = left_by_an_earlier_manager();
    {
        let mut w = store.world();
        w.stored.cells = 8;
        w.active = [5].into();
        w.stored.active_cells = 1;
    }
    let (m, clock) = restarted(&store);
    assert!(matches!(
        resume(&m, &KN, 0, 3, Some(served_map())),
        MgrReply::Lease { .. }
    ));
    clock.advance(Duration::from_millis(2100));
    m.tick();
    m.tick();
    assert_eq!(store.world().active.len(), 1);
}
