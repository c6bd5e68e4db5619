//! A KVS node writing its log into a DPM served over RDMA verbs (`dinomo dpm serve
//! --fabric verbs`): one-sided WRITE + FLUSH of log batches, control messages over RDMA
//! SEND/RECV, then a clean stop and a check of the merged index.
//!
//! Needs a device: `DINOMO_RDMA_DEVICE=rxe0 cargo test --features rdma --test verbs_dpm
//! -- --ignored` (see docs/RDMA.md).
#![cfg(feature = "rdma")]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{dinomo_cmd, format_region, geometry, log_area, put_all, ChildGuard};
use dinomo::hw::fabric::verbs::{VerbsConfig, VerbsFabric};
use dinomo::hw::fabric::{ControlChannel, Fabric};
use dinomo::hw::region_file::{FilePersist, RegionFile};
use dinomo::shared::msg::{Request, Response};
use dpm_fw::Dpm;
use host_kn::log::ShardLog;

const TIMEOUT: Duration = Duration::from_secs(20);

fn device() -> String {
    std::env::var("DINOMO_RDMA_DEVICE").unwrap_or_else(|_| {
        panic!(
            "set DINOMO_RDMA_DEVICE to an RDMA device (e.g. rxe0) to run the ignored verbs tests"
        )
    })
}

/// `DINOMO_RDMA_GID_INDEX`, or `None` for the automatic choice.
fn gid_index() -> Option<String> {
    std::env::var("DINOMO_RDMA_GID_INDEX").ok()
}

/// `--gid-index N` when one is set.
fn gid_args() -> Vec<String> {
    gid_index().map_or_else(Vec::new, |g| vec!["--gid-index".into(), g])
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
    format_region(&region, "48M", "1M");
    let geo = geometry(&region);
    let port = free_port().to_string();
    let server = ChildGuard(
        dinomo_cmd(["dpm", "serve", "--path", path, "--workers", "1", "--no-pin"])
            .args(["--fabric", "verbs", "--device", &dev, "--port", &port])
            .args(gid_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dinomo dpm serve"),
    );
    let cfg = VerbsConfig {
        gid_index: gid_index().map(|g| g.parse().expect("DINOMO_RDMA_GID_INDEX is a number")),
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
    let mut log =
        ShardLog::open(&mut f, log_area(&geo), 1, 0, 1, 64 << 10, TIMEOUT).expect("open log");
    const N: u64 = 500;
    let items: Vec<_> = (0..N).map(kv).collect();
    assert_eq!(
        put_all(&mut f, &mut log, &items, 10).expect("write the log"),
        N
    );
    let Response::Merged { merged_seq } = call(
        &mut f,
        Request::MergeAll {
            log_id: log.log_id,
            generation: log.generation,
            upto_seq: N,
        },
    ) else {
        panic!("unexpected reply to MergeAll");
    };
    assert_eq!(merged_seq, N);
    drop(f);
    assert!(server.terminate().success(), "a clean stop exits 0");
    let file = RegionFile::open_private(&region).expect("map");
    let dpm: Dpm<FilePersist> = Dpm::open(file.pmem()).expect("open");
    for i in 0..N {
        let (k, v) = kv(i);
        assert_eq!(dpm.get(&k), Some(v), "key {i}");
    }
}

#[test]
#[ignore = "needs an RDMA device named by DINOMO_RDMA_DEVICE"]
fn dpm_serve_with_a_secret_file_admits_only_its_cluster() {
    use dinomo::shared::auth::ClusterSecret;
    let dev = device();
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("r.region");
    let path = region.to_str().expect("utf-8");
    format_region(&region, "8M", "64K");
    let secret_file = dir.path().join("secret");
    let secret = ClusterSecret::create(&secret_file).expect("secret");
    let port = free_port().to_string();
    let server = ChildGuard(
        dinomo_cmd(["dpm", "serve", "--path", path, "--workers", "1", "--no-pin"])
            .args(["--fabric", "verbs", "--device", &dev, "--port", &port])
            .args(gid_args())
            .arg("--secret-file")
            .arg(&secret_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dinomo dpm serve"),
    );
    let cfg = |secret: Option<ClusterSecret>| VerbsConfig {
        gid_index: gid_index().map(|g| g.parse().expect("DINOMO_RDMA_GID_INDEX is a number")),
        secret,
        ..Default::default()
    };
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut f = loop {
        match VerbsFabric::connect(&addr, Some(&dev), &cfg(Some(secret.clone()))) {
            Ok(f) => break f,
            Err(e) => {
                assert!(t0.elapsed() < TIMEOUT, "the DPM did not come up: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(call(&mut f, Request::Ping), Response::Pong);
    let other = ClusterSecret::from_bytes([9; 32]);
    let e = VerbsFabric::connect(&addr, Some(&dev), &cfg(Some(other))).expect_err("other");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    let e = VerbsFabric::connect(&addr, Some(&dev), &cfg(None)).expect_err("no secret");
    assert!(e.to_string().contains("requires the cluster secret"), "{e}");
    drop(f);
    assert!(server.terminate().success(), "a clean stop exits 0");
}
