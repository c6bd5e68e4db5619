//! A KVS node writing its log into a DPM served over RDMA verbs (`dinomo dpm serve
//! --fabric verbs`): one-sided WRITE + FLUSH of log batches, control messages over RDMA
//! SEND/RECV, then a clean stop and a check of the merged index.
//!
//! Needs a device: `DINOMO_RDMA_DEVICE=rxe0 cargo test --features rdma --test verbs_dpm
//! -- --ignored` (see docs/RDMA.md).
#![cfg(feature = "rdma")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dinomo::hw::fabric::verbs::{VerbsConfig, VerbsFabric};
use dinomo::hw::fabric::{execute, Completion, CompletionStatus, Fabric, WorkRequest};
use dinomo::hw::region_file::{FilePersist, RegionFile};
use dinomo::shared::block::BLOCK_HEADER_SIZE;
use dinomo::shared::entry::{self, Op};
use dinomo::shared::msg::{Request, Response};
use dpm_fw::Dpm;

const TIMEOUT: Duration = Duration::from_secs(20);

fn device() -> String {
    std::env::var("DINOMO_RDMA_DEVICE").unwrap_or_else(|_| {
        panic!(
            "set DINOMO_RDMA_DEVICE to an RDMA device (e.g. rxe0) to run the ignored verbs tests"
        )
    })
}

fn gid_index() -> String {
    std::env::var("DINOMO_RDMA_GID_INDEX").unwrap_or_else(|_| "0".into())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn call(f: &mut VerbsFabric, req: Request) -> Response {
    f.call(&req, TIMEOUT)
        .expect("control channel")
        .expect("DPM accepted the request")
}

fn run(f: &mut VerbsFabric, wrs: &[WorkRequest]) {
    let wrs: Vec<_> = wrs
        .iter()
        .enumerate()
        .map(|(i, w)| (i as u64, *w))
        .collect();
    let mut out = vec![
        Completion {
            wr_id: 0,
            verb: wrs[0].1.verb(),
            status: CompletionStatus::ConnectionLost,
            value: 0
        };
        wrs.len()
    ];
    execute(f, &wrs, &mut out, TIMEOUT).expect("fabric");
    assert!(
        out.iter().all(|c| c.status == CompletionStatus::Success),
        "{out:?}"
    );
}

fn kv(i: u64) -> (Vec<u8>, Vec<u8>) {
    (
        format!("user:{i:06}").into_bytes(),
        format!("profile of user {i}").into_bytes(),
    )
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn kn_writes_its_log_over_verbs() {
    let dev = device();
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("r.region");
    let path = region.to_str().expect("utf-8");
    let o = Command::new(env!("CARGO_BIN_EXE_dinomo"))
        .args([
            "dpm",
            "format",
            "--path",
            path,
            "--size",
            "48M",
            "--block-size",
            "1M",
        ])
        .output()
        .expect("format");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let geo = {
        let file = RegionFile::open_private(&region).expect("map");
        dpm_fw::region::read_geometry(&file.pmem()).expect("geometry")
    };
    let port = free_port().to_string();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_dinomo"))
            .args(["dpm", "serve", "--path", path, "--workers", "1", "--no-pin"])
            .args(["--fabric", "verbs", "--device", &dev, "--port", &port])
            .args(["--gid-index", &gid_index()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dinomo dpm serve"),
    );
    let cfg = VerbsConfig {
        gid_index: gid_index().parse().expect("gid index"),
        ..Default::default()
    };
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut f = loop {
        match VerbsFabric::connect(&addr, Some(&dev), &cfg) {
            Ok(f) => break f,
            Err(e) => {
                assert!(t0.elapsed() < TIMEOUT, "the DPM did not come up: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(f.region_len(), geo.region_size);
    assert_eq!(call(&mut f, Request::Ping), Response::Pong);
    let Response::LogOpened {
        log_id,
        generation,
        block,
        salt,
    } = call(
        &mut f,
        Request::OpenLog {
            kn_id: 1,
            shard: 0,
            lease_epoch: 1,
        },
    )
    else {
        panic!("unexpected reply to OpenLog");
    };
    let buf = f.alloc_buf(64 << 10).expect("buffer");
    const N: u64 = 500;
    let mut offset = BLOCK_HEADER_SIZE;
    let mut seq = 1;
    for chunk in (0..N).collect::<Vec<_>>().chunks(10) {
        let mut at = 0;
        for &i in chunk {
            let (k, v) = kv(i);
            at += entry::encode(&mut f.buf_mut(buf)[at..], salt, Op::Put, 1, seq, &k, &v)
                .expect("encode");
            seq += 1;
        }
        let remote = geo.log_off + u64::from(block) * geo.block_size + offset;
        run(
            &mut f,
            &[
                WorkRequest::Write {
                    remote,
                    local: buf.slice(0, at as u32),
                },
                WorkRequest::Flush {
                    remote,
                    len: at as u64,
                },
            ],
        );
        offset += at as u64;
    }
    assert!(offset < geo.block_size, "the test stays within one block");
    let Response::Merged { merged_seq } = call(
        &mut f,
        Request::MergeAll {
            log_id,
            generation,
            upto_seq: N,
        },
    ) else {
        panic!("unexpected reply to MergeAll");
    };
    assert_eq!(merged_seq, N);
    drop(f);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    assert!(server.0.wait().expect("wait").success());
    let file = RegionFile::open_private(&region).expect("map");
    let dpm: Dpm<FilePersist> = Dpm::open(file.pmem()).expect("open");
    for i in 0..N {
        let (k, v) = kv(i);
        assert_eq!(dpm.get(&k), Some(v), "key {i}");
    }
}
