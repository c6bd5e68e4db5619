//! The state machine driven request by request, with a manual clock, a store that records
//! every call (and fails when told to) and a spawner that starts nothing.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dinomo_shared::manager_proto::{MgrReply, MgrRequest};
use dinomo_shared::ownership::SlotMap;
use dinomo_shared::ErrorCode;

use super::*;
use crate::clock::ManualClock;
use crate::store::{Fenced, LeaseRecord, StoreError, Stored};

const LEASE: Duration = Duration::from_millis(1000);

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Lease(u16, LeaseRecord),
    /// A stored map: its epoch and the KNs that own slots in it.
    Map(u64, BTreeSet<u16>),
    Fence(u16),
}

#[derive(Debug, Default)]
struct World {
    ops: Vec<Op>,
    stored: Stored,
    fail_fence: BTreeSet<u16>,
    fail_map: bool,
    fail_lease: bool,
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
    Harness { m, clock, store }
}

impl Harness {
    fn register(&self, addr: &str) -> (u16, u32) {
        match self.m.handle(MgrRequest::Register {
            addr: addr.into(),
            shards: 2,
        }) {
            MgrReply::Registered {
                kn_id, lease_epoch, ..
            } => (kn_id, lease_epoch),
            other => panic!("register: {other:?}"),
        }
    }

    fn join(&self, kn: u16) -> MgrReply {
        self.m.handle(MgrRequest::Join { kn_id: kn })
    }

    fn renew(&self, kn: u16, lease_epoch: u32) -> MgrReply {
        self.m.handle(MgrRequest::Renew {
            kn_id: kn,
            lease_epoch,
            load: None,
        })
    }

    fn ack(&self, kn: u16) -> MgrReply {
        let epoch = self.m.epoch();
        self.m.handle(MgrRequest::Ack {
            kn_id: kn,
            epoch,
            release_us: 500,
            entries_merged: 3,
        })
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
        h.m.handle(MgrRequest::Register { addr: "x:1".into(), shards: 1 }),
        MgrReply::Error { message } if message.contains("all 2 KN slots")
    ));
    // A lease that cannot be recorded is not granted.
    let h = harness(FakeStore::with(|w| w.fail_lease = true));
    assert!(matches!(
        h.m.handle(MgrRequest::Register { addr: "x:1".into(), shards: 1 }),
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
        h.m.handle(MgrRequest::Ack {
            kn_id: a,
            epoch: u64::MAX,
            release_us: 0,
            entries_merged: u64::MAX
        }),
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
    assert_eq!(h.m.handle(MgrRequest::Leave { kn_id: b.0 }), MgrReply::Ok);
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
        h.m.handle(MgrRequest::Leave { kn_id: b.0 }),
        MgrReply::Error { .. }
    ));
    assert!(h.store.ops().is_empty());
}

#[test]
fn a_restarted_manager_waits_a_lease_then_fences_what_the_old_one_left() {
    let store = FakeStore::with(|w| {
        w.stored.max_kns = 4;
        w.stored.map_epoch = 9;
        w.stored.leases = vec![
            (
                0,
                LeaseRecord {
                    lease_epoch: 3,
                    expires_ms: 1,
                    lease_ms: 2000,
                },
            ),
            (
                1,
                LeaseRecord {
                    lease_epoch: 5,
                    expires_ms: 0,
                    lease_ms: 2000,
                },
            ),
        ];
    });
    let clock = Arc::new(ManualClock::default());
    let m = Manager::new(
        ManagerConfig {
            lease: LEASE,
            vnodes: 16,
        },
        Box::new(store.clone()),
        clock,
        None,
    )
    .expect("manager");
    // The old manager granted 2 s leases: wait that long, whatever the record's expiry.
    assert_eq!(
        m.leftover_wait(),
        Duration::from_millis(2000) + LEASE_CLOCK_MARGIN
    );
    m.fence_leftovers().expect("fence");
    let ops = store.ops();
    assert!(
        matches!(ops.as_slice(),
            [Op::Fence(0), Op::Lease(0, r0), Op::Fence(1), Op::Lease(1, r1)]
            if !r0.is_live() && r0.lease_epoch == 3 && !r1.is_live()),
        "{ops:?}"
    );
    // Ids keep counting their epochs; maps continue above the stored epoch.
    let MgrReply::Registered {
        kn_id, lease_epoch, ..
    } = m.handle(MgrRequest::Register {
        addr: "a:1".into(),
        shards: 1,
    })
    else {
        panic!("register");
    };
    assert_eq!((kn_id, lease_epoch), (0, 4));
    m.handle(MgrRequest::Join { kn_id });
    assert_eq!(m.epoch(), 10);

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
