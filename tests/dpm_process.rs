//! The memory node as a separate process: a test process plays a KVS node over the shm
//! fabric (its log written with one-sided WRITE + FLUSH, blocks and merges by control
//! message), the DPM is killed with SIGKILL and restarted, then stopped cleanly.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{dinomo_cmd, format_region, geometry, log_area, put_all, ChildGuard};
use dinomo::hw::fabric::nic::NicProfile;
use dinomo::hw::fabric::shm::ShmFabric;
use dinomo::hw::fabric::{default_ctl_path, ControlChannel, Fabric};
use dinomo::hw::region_file::{FilePersist, RegionFile};
use dinomo::shared::msg::{Request, Response};
use dpm_fw::Dpm;
use host_kn::log::ShardLog;

const TIMEOUT: Duration = Duration::from_secs(20);

fn start(region: &Path) -> ChildGuard {
    let path = region.to_str().expect("utf-8");
    let child = dinomo_cmd(["dpm", "serve", "--path", path, "--workers", "2", "--no-pin"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dinomo dpm serve");
    ChildGuard(child)
}

/// Connects once the server has created its control file and answers a ping.
fn connect(region: &Path) -> ShmFabric<FilePersist> {
    let ctl = default_ctl_path(region);
    let t0 = Instant::now();
    loop {
        if let Ok(mut f) = ShmFabric::connect_file(region, &ctl, NicProfile::None) {
            if let Ok(Ok(Response::Pong)) = f.control().call(&Request::Ping, Duration::from_secs(2))
            {
                return f;
            }
        }
        assert!(t0.elapsed() < TIMEOUT, "the DPM did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn merge_all(f: &mut ShmFabric<FilePersist>, log: &ShardLog, upto_seq: u64) -> u64 {
    let req = Request::MergeAll {
        log_id: log.log_id,
        generation: log.generation,
        upto_seq,
    };
    match f
        .control()
        .call(&req, TIMEOUT)
        .expect("control channel")
        .expect("DPM accepted MergeAll")
    {
        Response::Merged { merged_seq } => merged_seq,
        r => panic!("unexpected reply to MergeAll: {r:?}"),
    }
}

fn kv(i: u64) -> (Vec<u8>, Vec<u8>) {
    (
        format!("user:{i:06}").into_bytes(),
        format!("profile of user {i}: {}", "*".repeat((i % 300) as usize)).into_bytes(),
    )
}

#[test]
fn kn_writes_survive_sigkill_of_the_dpm_and_a_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("r.region");
    format_region(&region, "48M", "64K");
    let geo = geometry(&region);

    let server = start(&region);
    let mut f = connect(&region);
    let mut log =
        ShardLog::open(&mut f, log_area(&geo), 1, 0, 1, 64 << 10, TIMEOUT).expect("open log");
    const N: u64 = 3000;
    let items: Vec<_> = (0..N).map(kv).collect();
    assert_eq!(
        put_all(&mut f, &mut log, &items, 16).expect("write the log"),
        N
    );
    let rts = f.counters().round_trips;
    assert!(
        rts <= N / 16 + 2 * (N / 100) + 1,
        "one round trip per batch (plus block switches): {rts}"
    );
    assert_eq!(
        merge_all(&mut f, &log, N / 2),
        N,
        "MergeAll merges to the committed tail"
    );
    drop(f);
    drop(server); // SIGKILL

    // Restart: recovery, then the KN's log is still open and fully merged.
    let server = start(&region);
    let mut f = connect(&region);
    log.reattach(&mut f).expect("buffers on the new connection");
    assert_eq!(merge_all(&mut f, &log, N), N);
    // More writes after the restart continue the same log.
    assert_eq!(
        put_all(&mut f, &mut log, &[kv(N)], 1).expect("write after restart"),
        N + 1
    );
    drop(f);

    // SIGTERM: the DPM merges everything and marks a clean shutdown.
    let status = server.terminate();
    assert!(status.success(), "clean stop exits 0: {status}");
    assert!(
        !default_ctl_path(&region).exists(),
        "the control file is removed on a clean stop"
    );

    let file = RegionFile::open_private(&region).expect("map");
    assert!(
        dpm_fw::region::state(&file.pmem()).flags & dinomo::shared::superblock::FLAG_CLEAN_SHUTDOWN
            != 0
    );
    let dpm: Dpm<FilePersist> = Dpm::open(file.pmem()).expect("open");
    for i in 0..=N {
        let (k, v) = kv(i);
        assert_eq!(dpm.get(&k), Some(v), "key {i}");
    }
    let st = dpm.stats();
    assert_eq!(st.logs[0].merged_seq, N + 1);
    assert_eq!(st.index.items, N + 1);
}
