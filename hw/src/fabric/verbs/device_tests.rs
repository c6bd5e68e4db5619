//! Tests on a real RDMA device (a ConnectX, or soft-RoCE: see docs/RDMA.md). They are
//! ignored by default; run them with
//! `DINOMO_RDMA_DEVICE=rxe0 cargo test -p dinomo-hw --features rdma -- --ignored`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use dinomo_shared::msg::{Request, Response};

use super::{VerbsConfig, VerbsFabric, VerbsServer};
use crate::fabric::{
    execute, Completion, CompletionStatus, ControlChannel, Fabric, FabricError, Verb, WorkRequest,
};
use crate::heap::{HeapPersist, HeapRegion};
use crate::pmem::{NoPersist, Pmem};

const T: Duration = Duration::from_secs(10);

/// The device named by `DINOMO_RDMA_DEVICE`; these tests cannot run without one.
fn device() -> String {
    std::env::var("DINOMO_RDMA_DEVICE").unwrap_or_else(|_| {
        panic!(
            "set DINOMO_RDMA_DEVICE to an RDMA device (e.g. rxe0 after \
             `rdma link add rxe0 type rxe netdev eth0`) to run the ignored verbs tests"
        )
    })
}

fn cfg() -> VerbsConfig {
    VerbsConfig {
        // Unset: the automatic choice.
        gid_index: std::env::var("DINOMO_RDMA_GID_INDEX")
            .ok()
            .map(|s| s.parse().expect("DINOMO_RDMA_GID_INDEX is a number")),
        // Give up on a vanished peer quickly: 4.096 µs × 2^12 ≈ 17 ms per try.
        ack_timeout: 12,
        retry_cnt: 3,
        ..Default::default()
    }
}

type Region = Arc<Pmem<HeapPersist<NoPersist>>>;

struct Dpm {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dpm {
    /// A verbs server over `region` answering Ping on its own thread.
    fn start(region: &Region, port: u16) -> Self {
        Self::start_with(region, port, cfg())
    }

    /// As [`Dpm::start`] with settings `vcfg`; also answers Hello and FenceKn, revoking
    /// the fenced KN's queue pairs as the memory node does.
    fn start_with(region: &Region, port: u16, vcfg: VerbsConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (region, s) = (Arc::clone(region), Arc::clone(&stop));
        let dev = device();
        let thread = std::thread::spawn(move || {
            let listen: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut server =
                VerbsServer::bind(Some(&dev), listen, region, &vcfg).expect("verbs server");
            tx.send(server.local_addr().expect("addr"))
                .expect("send addr");
            let mut fenced = Vec::new();
            while !s.load(Ordering::Acquire) {
                server.poll(|_, f| match Request::decode(f) {
                    Ok(Request::Ping) => Some(Response::Pong.encode(f.req_id)),
                    Ok(Request::Hello { .. }) => Some(
                        Response::Hello {
                            region_id: 1,
                            region_size: 1 << 20,
                        }
                        .encode(f.req_id),
                    ),
                    Ok(Request::FenceKn { kn_id }) => {
                        fenced.push((kn_id, true));
                        Some(
                            Response::Fenced {
                                logs: 0,
                                entries: 0,
                            }
                            .encode(f.req_id),
                        )
                    }
                    Ok(Request::StoreLease { kn, .. }) => {
                        fenced.push((kn, false));
                        Some(Response::LeaseStored.encode(f.req_id))
                    }
                    _ => None,
                });
                for (kn, fence) in fenced.drain(..) {
                    if fence {
                        server.revoke(kn);
                    } else {
                        server.readmit(kn);
                    }
                }
            }
        });
        let addr = rx.recv_timeout(T).expect("server up");
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

fn region() -> Region {
    Arc::new(HeapRegion::new(1 << 20).pmem(NoPersist))
}

fn one(f: &mut VerbsFabric, wr: WorkRequest) -> Result<Completion, FabricError> {
    let mut out = [Completion {
        wr_id: 0,
        verb: Verb::Read,
        status: CompletionStatus::ConnectionLost,
        value: 0,
    }];
    execute(f, &[(7, wr)], &mut out, T)?;
    assert_eq!(out[0].wr_id, 7);
    assert_eq!(out[0].verb, wr.verb());
    Ok(out[0])
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn loopback_read_write_cas_faa_flush() {
    use CompletionStatus as S;
    let r = region();
    let dpm = Dpm::start(&r, 0);
    let mut f =
        VerbsFabric::connect(&dpm.addr.to_string(), Some(&device()), &cfg()).expect("connect");
    assert_eq!(f.region_len(), 1 << 20);
    let b = f.alloc_buf(256).expect("buf");
    for (i, x) in f.buf_mut(b).iter_mut().enumerate() {
        *x = i as u8;
    }
    let w = WorkRequest::Write {
        remote: 1000,
        local: b.slice(0, 100),
    };
    assert_eq!(one(&mut f, w).expect("write").status, S::Success);
    let fl = WorkRequest::Flush {
        remote: 1000,
        len: 100,
    };
    assert_eq!(one(&mut f, fl).expect("flush").status, S::Success);
    let mut seen = [0u8; 100];
    r.read(1000, &mut seen);
    assert_eq!(&seen[..], &f.buf(b)[..100], "the WRITE reached the region");
    let rd = WorkRequest::Read {
        remote: 1000,
        local: b.slice(128, 100),
    };
    assert_eq!(one(&mut f, rd).expect("read").status, S::Success);
    let (lo, hi) = f.buf(b).split_at(128);
    assert_eq!(&lo[..100], &hi[..100]);
    let c = one(
        &mut f,
        WorkRequest::Cas {
            remote: 2048,
            expect: 0,
            new: 5,
        },
    )
    .expect("cas");
    assert_eq!((c.status, c.value), (S::Success, 0));
    let c = one(
        &mut f,
        WorkRequest::Cas {
            remote: 2048,
            expect: 0,
            new: 9,
        },
    )
    .expect("cas");
    assert_eq!(
        (c.status, c.value),
        (S::Success, 5),
        "a failed CAS returns the old value"
    );
    let c = one(
        &mut f,
        WorkRequest::Faa {
            remote: 2048,
            add: 10,
        },
    )
    .expect("faa");
    assert_eq!((c.status, c.value), (S::Success, 5));
    assert_eq!(r.load_u64(2048), 15);
    // Bad requests fail alone, before reaching the device, and the QP stays usable.
    let c = one(
        &mut f,
        WorkRequest::Faa {
            remote: 2052,
            add: 1,
        },
    )
    .expect("misaligned");
    assert_eq!(c.status, S::Misaligned);
    let c = one(
        &mut f,
        WorkRequest::Read {
            remote: (1 << 20) - 4,
            local: b.slice(0, 8),
        },
    )
    .expect("oob");
    assert_eq!(c.status, S::RemoteAccessError);
    // A batch with one doorbell shares one round trip.
    let before = f.counters().round_trips;
    let wrs: Vec<_> = (0..8u64)
        .map(|i| {
            (
                i,
                WorkRequest::Faa {
                    remote: 4096,
                    add: 1,
                },
            )
        })
        .collect();
    let mut out = vec![
        Completion {
            wr_id: 0,
            verb: Verb::Faa,
            status: S::ConnectionLost,
            value: 0
        };
        8
    ];
    execute(&mut f, &wrs, &mut out, T).expect("batch");
    assert_eq!(
        out.iter().map(|c| c.value).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    assert_eq!(f.counters().round_trips, before + 1);
    assert_eq!(r.load_u64(4096), 8);
    drop(f);
    dpm.stop();
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn one_post_is_one_doorbell_and_unsignaled_writes_complete_in_order() {
    use CompletionStatus as S;
    let r = region();
    let dpm = Dpm::start(&r, 0);
    // A shallow queue, one control slot and a WRITE signaled in four: the send queue has
    // 9 entries, so posting thousands of requests overflows it unless entries of
    // unsignaled WRITEs are counted until a later completion retires them.
    let vcfg = VerbsConfig {
        queue_depth: 8,
        ctl_slots: 1,
        signal_every: 4,
        ..cfg()
    };
    let mut f =
        VerbsFabric::connect(&dpm.addr.to_string(), Some(&device()), &vcfg).expect("connect");
    eprintln!(
        "{}: GID index {}, {} bytes inline",
        f.device_name(),
        f.gid_index(),
        f.max_inline()
    );
    let b = f.alloc_buf(8 * 128).expect("buf");
    let blank = Completion {
        wr_id: 0,
        verb: Verb::Read,
        status: S::ConnectionLost,
        value: 0,
    };
    // Eight WRITEs in one post: one doorbell; completions in order, each its own WrId.
    let d0 = f.doorbells();
    let wrs: Vec<_> = (0..8u64)
        .map(|i| {
            (
                1000 + i,
                WorkRequest::Write {
                    remote: i * 128,
                    local: b.slice(i as u32 * 128, 128),
                },
            )
        })
        .collect();
    let mut out = vec![blank; 8];
    execute(&mut f, &wrs, &mut out, T).expect("batch");
    assert_eq!(
        f.doorbells(),
        d0 + 1,
        "one ibv_post_send for the whole post"
    );
    assert_eq!(
        out.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        (0..8).map(|i| (1000 + i, S::Success)).collect::<Vec<_>>()
    );
    // Keep the queue full of WRITEs (refilled as completions come, a few per post) with a
    // misaligned CAS now and then: it fails alone, the WRITEs around it succeed.
    let mut next = 0u64;
    let mut seen = 0u64;
    let total = 3000u64;
    let mut wrs = Vec::new();
    let mut out = vec![blank; 8];
    while seen < total {
        wrs.clear();
        while f.outstanding() + wrs.len() < 8 && next < total && wrs.len() < 3 {
            let wr = if next % 97 == 50 {
                WorkRequest::Cas {
                    remote: 4,
                    expect: 0,
                    new: 1,
                }
            } else {
                let slot = next % 8;
                let v = (next % 251) as u8;
                f.buf_mut(b)[slot as usize * 128..][..128].fill(v);
                WorkRequest::Write {
                    remote: 4096 + slot * 128,
                    local: b.slice(slot as u32 * 128, 128),
                }
            };
            wrs.push((next, wr));
            next += 1;
        }
        // A slot's buffer is rewritten only after its WRITE completed: 8 slots, 8 deep.
        f.post(&wrs).expect("post (the send queue never overflows)");
        let n = f.poll(&mut out).expect("poll");
        for c in &out[..n] {
            assert_eq!(c.wr_id, seen, "completions in posting order");
            let want = if seen % 97 == 50 {
                S::Misaligned
            } else {
                S::Success
            };
            assert_eq!(c.status, want, "request {seen}");
            seen += 1;
        }
    }
    let fl = WorkRequest::Flush {
        remote: 4096,
        len: 8 * 128,
    };
    assert_eq!(one(&mut f, fl).expect("flush").status, S::Success);
    for slot in 0..8u64 {
        let last = (0..total).rev().find(|i| i % 8 == slot && i % 97 != 50);
        let want = (last.expect("a write to each slot") % 251) as u8;
        let mut got = [0u8; 128];
        r.read(4096 + slot * 128, &mut got);
        assert!(got.iter().all(|&x| x == want), "slot {slot}: {got:?}");
    }
    assert!(f.broken().is_none());
    drop(f);
    dpm.stop();
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn the_gid_index_is_chosen_when_none_is_given_and_checked_when_one_is() {
    use super::gid::{read_sysfs_gids, GidType, SYSFS_ROOT};
    let r = region();
    let dpm = Dpm::start(&r, 0);
    let addr = dpm.addr.to_string();
    let auto = VerbsConfig {
        gid_index: None,
        ..cfg()
    };
    let f = VerbsFabric::connect(&addr, Some(&device()), &auto).expect("connect, auto GID");
    let table = read_sysfs_gids(std::path::Path::new(SYSFS_ROOT), &device(), 1)
        .expect("the port's GID table in sysfs");
    let chosen = table
        .iter()
        .find(|e| e.index == u32::from(f.gid_index()))
        .expect("the chosen index is in the table");
    eprintln!("auto: {chosen}");
    if chosen.kind != GidType::IbRoceV1 {
        // RoCE: the v2 entry of an IPv4 address (soft-RoCE on the VM's dummy0: index 1).
        assert_eq!(chosen.kind, GidType::RoceV2, "{chosen}");
        assert!(chosen.ipv4().is_some(), "{chosen}");
    }
    drop(f);
    // An empty entry is refused with the valid ones named.
    if let Some(empty) = table.iter().find(|e| e.is_empty() && e.index < 256) {
        let bad = VerbsConfig {
            gid_index: Some(empty.index as u8),
            ..cfg()
        };
        let e = VerbsFabric::connect(&addr, Some(&device()), &bad)
            .expect_err("empty GID")
            .to_string();
        assert!(e.contains("empty") && e.contains("valid indexes"), "{e}");
        assert!(e.contains(&chosen.to_string()), "{e}");
    }
    // A device that does not exist is named with the ones that do.
    let e = VerbsFabric::connect(&addr, Some("nosuchdev9"), &cfg())
        .expect_err("no such device")
        .to_string();
    assert!(e.contains("nosuchdev9") && e.contains(&device()), "{e}");
    dpm.stop();
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn control_send_and_recv() {
    let r = region();
    let dpm = Dpm::start(&r, 0);
    let mut f =
        VerbsFabric::connect(&dpm.addr.to_string(), Some(&device()), &cfg()).expect("connect");
    for _ in 0..100 {
        assert_eq!(f.call(&Request::Ping, T).expect("call"), Ok(Response::Pong));
    }
    assert_eq!((f.counters().sends, f.counters().recvs), (100, 100));
    assert_eq!(f.recv(Duration::from_millis(10)).expect("recv"), None);
    drop(f);
    dpm.stop();
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn a_vanished_dpm_is_an_error_and_reconnect_recovers() {
    let r = region();
    let dpm = Dpm::start(&r, 0);
    let port = dpm.addr.port();
    let mut f =
        VerbsFabric::connect(&dpm.addr.to_string(), Some(&device()), &cfg()).expect("connect");
    let b = f.alloc_buf(64).expect("buf");
    let rd = WorkRequest::Read {
        remote: 0,
        local: b.slice(0, 8),
    };
    one(&mut f, rd).expect("read while up");
    dpm.stop(); // destroys the DPM's queue pair
    let e = one(&mut f, rd).expect_err("the peer is gone");
    let msg = e.to_string();
    assert!(matches!(e, FabricError::Disconnected(_)), "{msg}");
    assert!(
        msg.contains("IBV_WC_"),
        "the completion status is named: {msg}"
    );
    assert!(f.broken().is_some());
    assert!(matches!(
        f.post(&[(1, rd)]),
        Err(FabricError::Disconnected(_))
    ));
    // Nothing listens: reconnect fails clearly and the fabric stays broken.
    assert!(f.reconnect().is_err());
    let dpm = Dpm::start(&r, port);
    f.reconnect().expect("reconnect");
    r.store_u64(0, 77);
    one(&mut f, rd).expect("read after reconnect");
    assert_eq!(
        &f.buf(b)[..8],
        &77u64.to_ne_bytes(),
        "buffers survive a reconnect"
    );
    drop(f);
    dpm.stop();
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn foreign_peers_get_a_clear_error() {
    use std::io::{Read, Write};
    let r = region();
    let dpm = Dpm::start(&r, 0);
    let mut s = std::net::TcpStream::connect(dpm.addr).expect("tcp");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut reply = Vec::new();
    s.set_read_timeout(Some(T)).expect("timeout");
    let _ = s.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("not a DINOMO verbs endpoint"), "{text}");
    // A KN pointed at something that is not a DPM.
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = other.local_addr().expect("addr");
    let t = std::thread::spawn(move || {
        let (mut c, _) = other.accept().expect("accept");
        let _ = c.write_all(b"SSH-2.0-OpenSSH\r\n");
    });
    let e = VerbsFabric::connect(&addr.to_string(), Some(&device()), &cfg()).expect_err("foreign");
    assert!(e.to_string().contains("not a DINOMO verbs endpoint"), "{e}");
    t.join().expect("thread");
    dpm.stop();
}

fn with_secret(b: u8) -> VerbsConfig {
    VerbsConfig {
        secret: Some(dinomo_shared::auth::ClusterSecret::from_bytes([b; 32])),
        ..cfg()
    }
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn a_kn_without_the_secret_or_with_another_gets_no_queue_pair() {
    let r = region();
    let dpm = Dpm::start_with(&r, 0, with_secret(1));
    let addr = dpm.addr.to_string();
    let e = VerbsFabric::connect(&addr, Some(&device()), &with_secret(2)).expect_err("wrong");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    let e = VerbsFabric::connect(&addr, Some(&device()), &cfg()).expect_err("no secret");
    assert!(e.to_string().contains("requires the cluster secret"), "{e}");
    // A raw peer forging a proof is refused before any queue pair or rkey exists.
    {
        use super::wire::{read_msg, write_msg, EndpointInfo, Msg};
        let mut t = std::net::TcpStream::connect(dpm.addr).expect("tcp");
        t.set_read_timeout(Some(T)).expect("timeout");
        let ep = EndpointInfo {
            qpn: 1,
            psn: 1,
            lid: 0,
            mtu: 3,
            rd_atomic: 1,
            gid: [0; 16],
        };
        let forged = Msg::Hello {
            ep,
            kn: 1,
            nonce: [0; 16],
        };
        write_msg(&mut t, &forged).expect("hello");
        assert!(matches!(read_msg(&mut t), Ok(Msg::Challenge { .. })));
        write_msg(&mut t, &Msg::Proof { tag: [0; 32] }).expect("proof");
        match read_msg(&mut t) {
            Ok(Msg::Reject(why)) => assert!(why.contains("authentication failed"), "{why}"),
            other => panic!("expected a Reject, got {other:?}"),
        }
    }
    // The cluster's own KN connects and works.
    let mut f = VerbsFabric::connect(&addr, Some(&device()), &with_secret(1)).expect("member");
    assert_eq!(f.call(&Request::Ping, T).expect("call"), Ok(Response::Pong));
    drop(f);
    dpm.stop();
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn a_silent_tcp_peer_does_not_delay_a_kn() {
    let r = region();
    // The silent peer could hold a handshake for 10 minutes; the KN is served meanwhile.
    let dpm = Dpm::start_with(
        &r,
        0,
        VerbsConfig {
            connect_timeout: Duration::from_secs(600),
            ..with_secret(1)
        },
    );
    let silent = std::net::TcpStream::connect(dpm.addr).expect("tcp");
    let mut f = VerbsFabric::connect(&dpm.addr.to_string(), Some(&device()), &with_secret(1))
        .expect("a KN connects while a silent peer holds a handshake open");
    assert_eq!(f.call(&Request::Ping, T).expect("call"), Ok(Response::Pong));
    drop(silent);
    drop(f);
    dpm.stop();
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn a_fenced_kn_can_no_longer_read_or_write_the_region() {
    let r = region();
    let dpm = Dpm::start_with(&r, 0, with_secret(1));
    let addr = dpm.addr.to_string();
    // KN 3 names itself in its handshake; KN 4 in its first control message.
    let as_kn3 = VerbsConfig {
        kn_id: Some(3),
        ..with_secret(1)
    };
    let mut kn3 = VerbsFabric::connect(&addr, Some(&device()), &as_kn3).expect("kn 3");
    let mut kn4 = VerbsFabric::connect(&addr, Some(&device()), &with_secret(1)).expect("kn 4");
    assert!(matches!(
        kn4.call(&Request::Hello { kn_id: 4 }, T).expect("hello"),
        Ok(Response::Hello { .. })
    ));
    let b3 = kn3.alloc_buf(64).expect("buf");
    let b4 = kn4.alloc_buf(64).expect("buf");
    let rd = |b: crate::fabric::LocalBuf| WorkRequest::Read {
        remote: 0,
        local: b.slice(0, 8),
    };
    assert_eq!(
        one(&mut kn3, rd(b3)).expect("read").status,
        CompletionStatus::Success
    );
    // The manager fences KN 3 (over KN 4's connection here).
    assert!(matches!(
        kn4.call(&Request::FenceKn { kn_id: 3 }, T).expect("fence"),
        Ok(Response::Fenced { .. })
    ));
    let wr = WorkRequest::Write {
        remote: 64,
        local: b3.slice(0, 8),
    };
    r.store_u64(64, 5);
    for w in [wr, rd(b3)] {
        if let Ok(c) = one(&mut kn3, w) {
            assert_ne!(
                c.status,
                CompletionStatus::Success,
                "a fenced KN's {w:?} failed"
            );
        }
    }
    assert_eq!(r.load_u64(64), 5, "the fenced KN's write did not land");
    assert_eq!(
        one(&mut kn4, rd(b4)).expect("read").status,
        CompletionStatus::Success
    );
    // Reconnecting does not give the fenced KN its access back ...
    let e = kn3.reconnect().expect_err("fenced");
    assert!(e.to_string().contains("KN 3 was fenced"), "{e}");
    // ... nor does naming it in a first message on a connection that did not name it.
    let mut sneak = VerbsFabric::connect(&addr, Some(&device()), &with_secret(1)).expect("conn");
    let b5 = sneak.alloc_buf(64).expect("buf");
    let _ = sneak.call(&Request::Hello { kn_id: 3 }, Duration::from_secs(1));
    if let Ok(c) = one(&mut sneak, rd(b5)) {
        assert_ne!(
            c.status,
            CompletionStatus::Success,
            "revoked on naming KN 3"
        );
    }
    // Registered again (a new lease stored), KN 3 connects.
    let lease = Request::StoreLease {
        kn: 3,
        lease_epoch: 2,
        expires_ms: 1,
        lease_ms: 1,
    };
    assert!(matches!(
        kn4.call(&lease, T).expect("store lease"),
        Ok(Response::LeaseStored)
    ));
    kn3.reconnect().expect("readmitted");
    assert_eq!(
        one(&mut kn3, rd(b3)).expect("read").status,
        CompletionStatus::Success
    );
    drop(sneak);
    drop((kn3, kn4));
    dpm.stop();
}
