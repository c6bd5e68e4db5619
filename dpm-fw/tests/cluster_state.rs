//! The cluster manager's durable state through control messages: KN leases, and cluster
//! maps staged in ranges and committed with a CRC, across restarts and power failures.

use dinomo_hw::shadow::catch_power_failure;
use dinomo_shared::cluster_map::{map_ranges, owners_crc, range_frames, SlotRange};
use dinomo_shared::control::{KnLease, NO_KN};
use dinomo_shared::msg::{Frame, Request, Response};
use dinomo_shared::slot::SLOTS;
use dinomo_shared::ErrorCode;
use dpm_fw::testkit::{fresh, open_image, reopen, TestDpm};
use dpm_fw::Scratch;
use proptest::prelude::*;

const REGION_ID: u64 = 21;
/// `max_kns` of the test region.
const MAX_KNS: u16 = 4;

/// Sends `req` as an encoded frame through [`Dpm::handle`] and decodes the reply.
fn call(dpm: &TestDpm, req: Request) -> Result<Response, ErrorCode> {
    let frame = Frame::from_bytes(&req.encode(17).to_bytes());
    let reply = dpm.handle(&frame, &mut Scratch::default());
    assert_eq!((reply.kind, reply.req_id), (frame.kind, 17));
    Response::decode(&reply).expect("a well-formed reply")
}

fn exec(dpm: &TestDpm, req: Request) -> Result<Response, ErrorCode> {
    dpm.execute(req, &mut Scratch::default())
}

/// Stages `owners` under `epoch` range by range (frames as the manager builds them).
fn stage(dpm: &TestDpm, epoch: u64, owners: &[u16]) {
    assert_eq!(
        call(dpm, Request::MapBegin { epoch }),
        Ok(Response::MapBegun)
    );
    for ranges in range_frames(map_ranges(owners.iter().copied())) {
        assert_eq!(
            call(dpm, Request::MapRanges { epoch, ranges }),
            Ok(Response::MapRangesStored)
        );
    }
}

/// Stores `owners` as the map of `epoch`: begin, ranges, commit with the table's CRC.
fn send_map(dpm: &TestDpm, epoch: u64, owners: &[u16]) -> Result<Response, ErrorCode> {
    stage(dpm, epoch, owners);
    commit(dpm, epoch, owners)
}

/// Commits the map of `epoch` with the CRC of `owners`.
fn commit(dpm: &TestDpm, epoch: u64, owners: &[u16]) -> Result<Response, ErrorCode> {
    let crc = owners_crc(owners.iter().copied());
    call(dpm, Request::MapCommit { epoch, crc })
}

fn epoch_of(dpm: &TestDpm) -> u64 {
    match call(dpm, Request::ClusterInfo) {
        Ok(Response::ClusterInfo {
            max_kns, map_epoch, ..
        }) => {
            assert_eq!(max_kns, MAX_KNS as u32);
            map_epoch
        }
        other => panic!("ClusterInfo: {other:?}"),
    }
}

/// Four equal runs, one per KN.
fn map_a() -> Vec<u16> {
    (0..SLOTS).map(|s| s / (SLOTS / MAX_KNS)).collect()
}

/// Stripes of KNs 1 and 3 with unowned gaps.
fn map_b() -> Vec<u16> {
    (0..SLOTS)
        .map(|s| match (s / 1000) % 3 {
            0 => 1,
            1 => NO_KN,
            _ => 3,
        })
        .collect()
}

fn no_owner() -> Vec<u16> {
    vec![NO_KN; SLOTS as usize]
}

#[test]
fn leases_round_trip_and_survive_a_restart() {
    let (r, dpm) = fresh(REGION_ID);
    assert_eq!(
        call(&dpm, Request::ReadLease { kn: 2 }),
        Ok(Response::Lease {
            kn: 2,
            in_use: false,
            lease_epoch: 0,
            expires_ms: 0,
            lease_ms: 0,
        })
    );
    let store = Request::StoreLease {
        kn: 2,
        lease_epoch: 7,
        expires_ms: 1_700_000_000_123,
        lease_ms: 2500,
    };
    assert_eq!(call(&dpm, store), Ok(Response::LeaseStored));
    let stored = Ok(Response::Lease {
        kn: 2,
        in_use: true,
        lease_epoch: 7,
        expires_ms: 1_700_000_000_123,
        lease_ms: 2500,
    });
    assert_eq!(call(&dpm, Request::ReadLease { kn: 2 }), stored);
    assert_eq!(
        dpm.lease(2),
        Some(KnLease {
            kn_id: 3,
            lease_epoch: 7,
            expires_ms: 1_700_000_000_123,
            lease_ms: 2500,
            reserved: [0; 5],
        })
    );
    // Other rows are untouched; rows past max_kns do not exist.
    assert_eq!(dpm.lease(1).map(|l| l.kn_id), Some(0));
    assert_eq!(dpm.lease(MAX_KNS as u32), None);
    for req in [
        Request::ReadLease { kn: MAX_KNS as u32 },
        Request::StoreLease {
            kn: MAX_KNS as u32,
            lease_epoch: 1,
            expires_ms: 1,
            lease_ms: 1,
        },
        Request::StoreLease {
            kn: u32::MAX,
            lease_epoch: 1,
            expires_ms: 1,
            lease_ms: 1,
        },
    ] {
        assert_eq!(call(&dpm, req), Err(ErrorCode::InvalidArgument), "{req:?}");
    }
    // Persisted before the reply: the durable image has it.
    drop(dpm);
    let (_r2, dpm) = reopen(&r);
    assert_eq!(call(&dpm, Request::ReadLease { kn: 2 }), stored);
    // A later store replaces the row (a renewal, or expiry set to 0 after a fence).
    let renew = Request::StoreLease {
        kn: 2,
        lease_epoch: 8,
        expires_ms: 0,
        lease_ms: 2500,
    };
    assert_eq!(exec(&dpm, renew), Ok(Response::LeaseStored));
    assert_eq!(
        dpm.lease(2).map(|l| (l.lease_epoch, l.expires_ms)),
        Some((8, 0))
    );
}

#[test]
fn a_map_sent_in_ranges_is_stored_and_reported() {
    let (r, dpm) = fresh(REGION_ID);
    assert_eq!(dpm.stored_map(), (0, no_owner()));
    assert_eq!(epoch_of(&dpm), 0);
    assert_eq!(
        send_map(&dpm, 1, &map_a()),
        Ok(Response::MapStored { epoch: 1 })
    );
    assert_eq!(dpm.stored_map(), (1, map_a()));
    assert_eq!(epoch_of(&dpm), 1);
    // The next map goes to the other copy; epochs may skip.
    assert_eq!(
        send_map(&dpm, 5, &map_b()),
        Ok(Response::MapStored { epoch: 5 })
    );
    assert_eq!(dpm.stored_map(), (5, map_b()));
    assert_eq!(epoch_of(&dpm), 5);
    // A map with no owner at all needs no ranges.
    assert_eq!(
        send_map(&dpm, 6, &no_owner()),
        Ok(Response::MapStored { epoch: 6 })
    );
    assert_eq!(dpm.stored_map(), (6, no_owner()));
    assert_eq!(
        send_map(&dpm, 7, &map_a()),
        Ok(Response::MapStored { epoch: 7 })
    );
    drop(dpm);
    let (_r2, dpm) = reopen(&r);
    assert_eq!(dpm.stored_map(), (7, map_a()));
    assert_eq!(epoch_of(&dpm), 7);
}

#[test]
fn a_map_whose_epoch_is_not_newer_is_refused_and_changes_nothing() {
    let (_r, dpm) = fresh(REGION_ID);
    assert_eq!(
        send_map(&dpm, 5, &map_a()),
        Ok(Response::MapStored { epoch: 5 })
    );
    let crc_a = owners_crc(map_a());
    let crc_b = owners_crc(map_b());
    // The same commit again, and commits of older epochs.
    for epoch in [5, 4, 0] {
        for crc in [crc_a, crc_b] {
            assert_eq!(
                call(&dpm, Request::MapCommit { epoch, crc }),
                Err(ErrorCode::StaleEpoch),
                "commit of epoch {epoch}"
            );
        }
        assert_eq!(
            call(&dpm, Request::MapBegin { epoch }),
            Err(ErrorCode::StaleEpoch),
            "begin of epoch {epoch}"
        );
    }
    // Nor does a stale commit touch a map being staged meanwhile.
    stage(&dpm, 6, &map_b());
    assert_eq!(
        call(
            &dpm,
            Request::MapCommit {
                epoch: 5,
                crc: crc_b
            }
        ),
        Err(ErrorCode::StaleEpoch)
    );
    assert_eq!(dpm.stored_map(), (5, map_a()));
    assert_eq!(epoch_of(&dpm), 5);
    assert_eq!(
        call(
            &dpm,
            Request::MapCommit {
                epoch: 6,
                crc: crc_b
            }
        ),
        Ok(Response::MapStored { epoch: 6 })
    );
    assert_eq!(dpm.stored_map(), (6, map_b()));
    // A commit clears the staging: committing it again is stale.
    assert_eq!(
        call(
            &dpm,
            Request::MapCommit {
                epoch: 6,
                crc: crc_b
            }
        ),
        Err(ErrorCode::StaleEpoch)
    );
}

#[test]
fn a_wrong_crc_is_refused_and_the_old_map_stays() {
    let (_r, dpm) = fresh(REGION_ID);
    assert_eq!(
        send_map(&dpm, 1, &map_a()),
        Ok(Response::MapStored { epoch: 1 })
    );
    stage(&dpm, 2, &map_b());
    for crc in [owners_crc(map_b()) ^ 1, owners_crc(map_a()), 0] {
        assert_eq!(
            call(&dpm, Request::MapCommit { epoch: 2, crc }),
            Err(ErrorCode::InvalidArgument)
        );
        assert_eq!(dpm.stored_map(), (1, map_a()));
        assert_eq!(epoch_of(&dpm), 1);
    }
    // A commit of a newer epoch than the one staged is no commit either.
    assert_eq!(commit(&dpm, 3, &map_b()), Err(ErrorCode::InvalidArgument));
    // The staged map is still there: the right CRC commits it.
    assert_eq!(
        commit(&dpm, 2, &map_b()),
        Ok(Response::MapStored { epoch: 2 })
    );
    assert_eq!(dpm.stored_map(), (2, map_b()));
}

#[test]
fn bad_ranges_are_refused_and_write_nothing() {
    let (_r, dpm) = fresh(REGION_ID);
    let range = |first, last, kn| SlotRange { first, last, kn }.pack();
    let one = |word| [word, 0, 0, 0, 0, 0];
    // Nothing is being staged yet.
    let good = one(range(0, 9, 1));
    assert_eq!(
        call(
            &dpm,
            Request::MapRanges {
                epoch: 1,
                ranges: good
            }
        ),
        Err(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        call(&dpm, Request::MapBegin { epoch: 3 }),
        Ok(Response::MapBegun)
    );
    for (epoch, ranges, what) in [
        (4, good, "an epoch not being staged"),
        (2, good, "an older epoch"),
        (3, one(range(10, 9, 1)), "first > last"),
        (3, one(range(0, SLOTS, 1)), "last >= SLOTS"),
        (3, one(range(SLOTS, u16::MAX, 1)), "past the last slot"),
        (3, one(range(0, 9, MAX_KNS)), "kn >= max_kns"),
        // One bad range refuses the whole frame, good ranges before it included.
        (
            3,
            [good[0], range(20, 29, 2), range(30, 39, MAX_KNS), 0, 0, 0],
            "a bad range after good ones",
        ),
    ] {
        assert_eq!(
            call(&dpm, Request::MapRanges { epoch, ranges }),
            Err(ErrorCode::InvalidArgument),
            "{what}"
        );
    }
    // A word that is not a packed range never decodes; sent past the decoder it is refused.
    let garbage = one(5);
    assert_eq!(
        exec(
            &dpm,
            Request::MapRanges {
                epoch: 3,
                ranges: garbage
            }
        ),
        Err(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        call(
            &dpm,
            Request::MapRanges {
                epoch: 3,
                ranges: garbage
            }
        ),
        Err(ErrorCode::UnknownMessage)
    );
    // None of the refused frames wrote anything: the staged table is still empty.
    assert_eq!(
        commit(&dpm, 3, &no_owner()),
        Ok(Response::MapStored { epoch: 3 })
    );
    assert_eq!(dpm.stored_map(), (3, no_owner()));
    // NO_KN is a valid owner in a range (it clears slots), and zero words are skipped.
    let mut owners = no_owner();
    owners[100..=200].fill(0);
    owners[150..=160].fill(NO_KN);
    assert_eq!(
        call(&dpm, Request::MapBegin { epoch: 4 }),
        Ok(Response::MapBegun)
    );
    let ranges = [0, range(100, 200, 0), 0, range(150, 160, NO_KN), 0, 0];
    assert_eq!(
        call(&dpm, Request::MapRanges { epoch: 4, ranges }),
        Ok(Response::MapRangesStored)
    );
    let crc = owners_crc(owners.iter().copied());
    assert_eq!(
        call(&dpm, Request::MapCommit { epoch: 4, crc }),
        Ok(Response::MapStored { epoch: 4 })
    );
    assert_eq!(dpm.stored_map(), (4, owners));
}

#[test]
fn a_later_begin_replaces_the_map_being_staged() {
    let (_r, dpm) = fresh(REGION_ID);
    stage(&dpm, 2, &map_a());
    stage(&dpm, 3, &map_b());
    assert_eq!(
        call(
            &dpm,
            Request::MapRanges {
                epoch: 2,
                ranges: [
                    SlotRange {
                        first: 0,
                        last: 0,
                        kn: 0
                    }
                    .pack(),
                    0,
                    0,
                    0,
                    0,
                    0
                ]
            }
        ),
        Err(ErrorCode::InvalidArgument)
    );
    assert_eq!(commit(&dpm, 2, &map_a()), Err(ErrorCode::InvalidArgument));
    // The new begin started from an empty table, not from the first staging.
    assert_eq!(
        commit(&dpm, 3, &map_b()),
        Ok(Response::MapStored { epoch: 3 })
    );
    assert_eq!(dpm.stored_map(), (3, map_b()));
}

#[test]
fn cluster_state_is_served_during_shutdown() {
    let (_r, dpm) = fresh(REGION_ID);
    dpm.begin_shutdown();
    assert_eq!(
        call(
            &dpm,
            Request::OpenLog {
                kn_id: 1,
                shard: 0,
                lease_epoch: 1
            }
        ),
        Err(ErrorCode::ShuttingDown)
    );
    let store = Request::StoreLease {
        kn: 0,
        lease_epoch: 2,
        expires_ms: 0,
        lease_ms: 0,
    };
    assert_eq!(call(&dpm, store), Ok(Response::LeaseStored));
    assert_eq!(
        send_map(&dpm, 1, &map_a()),
        Ok(Response::MapStored { epoch: 1 })
    );
    assert_eq!(epoch_of(&dpm), 1);
}

#[test]
fn a_map_staged_but_not_committed_is_lost_in_a_crash() {
    let (r, dpm) = fresh(REGION_ID);
    assert_eq!(
        send_map(&dpm, 1, &map_a()),
        Ok(Response::MapStored { epoch: 1 })
    );
    stage(&dpm, 2, &map_b());
    drop(dpm);
    // Whatever of the staged copy the caches wrote back on their own, the header still
    // names the old copy.
    for (what, image) in [
        ("durable", r.durable_image()),
        ("every dirty line written back", r.crash_image(3, 100)),
        ("some dirty lines written back", r.crash_image(4, 50)),
    ] {
        let (_r2, dpm) = open_image(&image);
        assert_eq!(dpm.stored_map(), (1, map_a()), "{what}");
        assert_eq!(epoch_of(&dpm), 1, "{what}");
        // Staging is volatile: the restarted DPM stages nothing.
        assert_eq!(
            commit(&dpm, 2, &map_b()),
            Err(ErrorCode::InvalidArgument),
            "{what}"
        );
        // The manager starts over, and that works.
        assert_eq!(
            send_map(&dpm, 2, &map_b()),
            Ok(Response::MapStored { epoch: 2 })
        );
        assert_eq!(dpm.stored_map(), (2, map_b()), "{what}");
    }
}

#[test]
fn power_cut_after_commit_keeps_the_new_map_and_before_the_header_store_the_old() {
    let (r, dpm) = fresh(REGION_ID);
    assert_eq!(
        send_map(&dpm, 1, &map_a()),
        Ok(Response::MapStored { epoch: 1 })
    );
    drop(dpm);
    let base = r.durable_image();
    // Persist points of a whole map store: the table, then the header word.
    let points = {
        let (r, dpm) = open_image(&base);
        let before = r.fences();
        assert_eq!(
            send_map(&dpm, 2, &map_b()),
            Ok(Response::MapStored { epoch: 2 })
        );
        r.fences() - before
    };
    assert_eq!(points, 2);
    for k in 0..=points {
        let (r, dpm) = open_image(&base);
        r.set_crash_after(Some(k));
        let res = catch_power_failure(|| send_map(&dpm, 2, &map_b()));
        drop(dpm);
        let completed = match res {
            Ok(reply) => {
                assert_eq!(reply, Ok(Response::MapStored { epoch: 2 }), "cut after {k}");
                true
            }
            Err(_) => false,
        };
        assert_eq!(completed, k == points);
        // Before the header word was stored (the table's persist point), no image has the
        // new map; the durable image has it exactly when the commit completed.
        let header_stored = k + 1 >= points;
        for (what, image) in [
            ("durable", r.durable_image()),
            ("every dirty line written back", r.crash_image(k + 1, 100)),
            ("some dirty lines written back", r.crash_image(k + 7, 50)),
        ] {
            let (_r2, rec) = open_image(&image);
            let (epoch, owners) = rec.stored_map();
            match epoch {
                1 => assert_eq!(owners, map_a(), "cut after {k}, {what}"),
                2 => assert_eq!(owners, map_b(), "cut after {k}, {what}"),
                e => panic!("cut after {k}, {what}: epoch {e}"),
            }
            if what == "durable" {
                assert_eq!(epoch == 2, completed, "cut after {k}, {what}");
            }
            if !header_stored {
                assert_eq!(epoch, 1, "cut after {k}, {what}");
            }
            assert_eq!(epoch_of(&rec), epoch);
        }
    }
}

/// An owner table built from runs of (length, owner), cut or padded to `SLOTS`.
fn table(runs: &[(usize, u16)]) -> Vec<u16> {
    let mut owners: Vec<u16> = runs
        .iter()
        .flat_map(|&(n, kn)| std::iter::repeat(kn).take(n))
        .take(SLOTS as usize)
        .collect();
    owners.resize(SLOTS as usize, NO_KN);
    owners
}

fn expand(ranges: impl IntoIterator<Item = SlotRange>) -> Vec<u16> {
    let mut owners = no_owner();
    for r in ranges {
        owners[r.first as usize..=r.last as usize].fill(r.kn);
    }
    owners
}

/// A table whose every slot has an owner of its own drawing (runs are short).
fn scattered(seed: u64) -> Vec<u16> {
    let mut x = seed | 1;
    (0..SLOTS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % (MAX_KNS as u64 + 1) {
                0 => NO_KN,
                k => k as u16 - 1,
            }
        })
        .collect()
}

fn owner() -> impl Strategy<Value = u16> {
    prop_oneof![Just(NO_KN), 0..MAX_KNS]
}

proptest! {
    #[test]
    fn packed_slot_ranges_round_trip(first: u16, last: u16, kn: u16) {
        let r = SlotRange { first, last, kn };
        prop_assert_ne!(r.pack(), 0);
        prop_assert_eq!(SlotRange::unpack(r.pack()), Some(r));
    }

    #[test]
    fn map_ranges_re_expand_to_the_owner_table(
        runs in prop::collection::vec((1..3000usize, owner()), 0..30),
        seed: u64,
    ) {
        for owners in [table(&runs), scattered(seed)] {
            let ranges: Vec<SlotRange> = map_ranges(owners.iter().copied()).collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].last < w[1].first);
            }
            prop_assert!(ranges.iter().all(|r| r.kn != NO_KN && r.fits(MAX_KNS as u32)));
            prop_assert_eq!(expand(ranges), owners);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn any_owner_table_sent_in_frames_is_stored_exactly(
        runs in prop::collection::vec((1..3000usize, owner()), 0..30),
    ) {
        let owners = table(&runs);
        let (_r, dpm) = fresh(REGION_ID);
        prop_assert_eq!(send_map(&dpm, 1, &owners), Ok(Response::MapStored { epoch: 1 }));
        prop_assert_eq!(dpm.stored_map(), (1, owners));
    }
}
