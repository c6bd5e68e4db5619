//! The memory node as a separate process: a test process plays a KVS node over the shm
//! fabric (one-sided WRITE + FLUSH into its log blocks, control messages for blocks and
//! merges), the DPM is killed with SIGKILL and restarted, then stopped cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dinomo::hw::fabric::nic::NicProfile;
use dinomo::hw::fabric::shm::ShmFabric;
use dinomo::hw::fabric::{
    default_ctl_path, execute, Completion, CompletionStatus, Fabric, LocalBuf, WorkRequest,
};
use dinomo::hw::region_file::{FilePersist, RegionFile};
use dinomo::shared::block::{BlockHeader, BLOCK_HEADER_SIZE};
use dinomo::shared::entry::{self, Op};
use dinomo::shared::msg::{Request, Response};
use dpm_fw::Dpm;

const TIMEOUT: Duration = Duration::from_secs(20);

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(region: &Path) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_dinomo"))
        .args([
            "dpm",
            "serve",
            "--path",
            region.to_str().expect("utf-8"),
            "--workers",
            "2",
            "--no-pin",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dinomo dpm serve");
    Server(child)
}

/// Connects once the server has created its control file and answers a ping.
fn connect(region: &Path) -> ShmFabric<FilePersist> {
    let ctl: PathBuf = default_ctl_path(region);
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

fn call(f: &mut ShmFabric<FilePersist>, req: Request) -> Response {
    f.control()
        .call(&req, TIMEOUT)
        .expect("control channel")
        .expect("DPM accepted the request")
}

/// A KN shard's log, written through the fabric.
struct Log {
    log_id: u32,
    generation: u64,
    block: u32,
    salt: u32,
    offset: u64,
    next_seq: u64,
    block_size: u64,
    log_off: u64,
    buf: LocalBuf,
}

impl Log {
    fn open(f: &mut ShmFabric<FilePersist>, block_size: u64, log_off: u64) -> Self {
        let Response::LogOpened {
            log_id,
            generation,
            block,
            salt,
        } = call(
            f,
            Request::OpenLog {
                kn_id: 1,
                shard: 0,
                lease_epoch: 1,
            },
        )
        else {
            panic!("unexpected reply to OpenLog");
        };
        let buf = f.alloc_buf(64 << 10).expect("register buffer");
        Self {
            log_id,
            generation,
            block,
            salt,
            offset: BLOCK_HEADER_SIZE,
            next_seq: 1,
            block_size,
            log_off,
            buf,
        }
    }

    fn block_off(&self, b: u32) -> u64 {
        self.log_off + b as u64 * self.block_size
    }

    /// Writes `batch` as one WRITE + FLUSH (one round trip), moving to a new block first if
    /// it does not fit.
    fn write_batch(&mut self, f: &mut ShmFabric<FilePersist>, batch: &[(Vec<u8>, Vec<u8>)]) {
        let len: usize = batch
            .iter()
            .map(|(k, v)| entry::padded_len(k.len(), v.len()))
            .sum();
        if self.offset + len as u64 > self.block_size {
            let Response::BlockGranted { block, salt } = call(
                f,
                Request::AllocBlock {
                    log_id: self.log_id,
                    generation: self.generation,
                    next_seq: self.next_seq,
                },
            ) else {
                panic!("unexpected reply to AllocBlock");
            };
            // Seal the full block: one 4-byte WRITE + FLUSH.
            let seal = self.block_off(self.block) + BlockHeader::SEALED_LEN_OFFSET;
            f.buf_mut(self.buf)[..4].copy_from_slice(&(self.offset as u32).to_le_bytes());
            self.run(
                f,
                &[
                    WorkRequest::Write {
                        remote: seal,
                        local: self.buf.slice(0, 4),
                    },
                    WorkRequest::Flush {
                        remote: seal,
                        len: 4,
                    },
                ],
            );
            (self.block, self.salt, self.offset) = (block, salt, BLOCK_HEADER_SIZE);
        }
        let mut at = 0;
        for (k, v) in batch {
            let n = entry::encode(
                &mut f.buf_mut(self.buf)[at..],
                self.salt,
                Op::Put,
                1,
                self.next_seq,
                k,
                v,
            )
            .expect("encode");
            at += n;
            self.next_seq += 1;
        }
        let remote = self.block_off(self.block) + self.offset;
        self.run(
            f,
            &[
                WorkRequest::Write {
                    remote,
                    local: self.buf.slice(0, at as u32),
                },
                WorkRequest::Flush {
                    remote,
                    len: at as u64,
                },
            ],
        );
        self.offset += at as u64;
    }

    fn run(&self, f: &mut ShmFabric<FilePersist>, wrs: &[WorkRequest]) {
        let wrs: Vec<_> = wrs
            .iter()
            .enumerate()
            .map(|(i, w)| (i as u64, *w))
            .collect();
        let mut out = vec![
            Completion {
                wr_id: 0,
                verb: wrs[0].1.verb(),
                status: CompletionStatus::Success,
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
    let o = Command::new(env!("CARGO_BIN_EXE_dinomo"))
        .args([
            "dpm",
            "format",
            "--path",
            region.to_str().expect("utf-8"),
            "--size",
            "48M",
            "--block-size",
            "64K",
        ])
        .output()
        .expect("format");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let geo = {
        let file = RegionFile::open_private(&region).expect("map");
        dpm_fw::region::read_geometry(&file.pmem()).expect("geometry")
    };

    let server = start(&region);
    let mut f = connect(&region);
    let mut log = Log::open(&mut f, geo.block_size, geo.log_off);
    const N: u64 = 3000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(16) {
        let batch: Vec<_> = chunk.iter().map(|&i| kv(i)).collect();
        log.write_batch(&mut f, &batch);
    }
    let rts = f.counters().round_trips;
    assert!(
        rts <= N / 16 + 2 * (N / 100) + 1,
        "one round trip per batch (plus seals): {rts}"
    );
    // Ask for half a merge's worth of time, then kill the DPM without warning.
    let Response::Merged { merged_seq } = call(
        &mut f,
        Request::MergeAll {
            log_id: log.log_id,
            generation: log.generation,
            upto_seq: N / 2,
        },
    ) else {
        panic!("unexpected reply to MergeAll");
    };
    assert_eq!(merged_seq, N, "MergeAll merges to the committed tail");
    drop(f);
    drop(server); // SIGKILL

    // Restart: recovery, then the KN's log is still open and fully merged.
    let server = start(&region);
    let mut f = connect(&region);
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
    // More writes after the restart continue the same log (buffers are per connection).
    log.buf = f.alloc_buf(64 << 10).expect("register buffer");
    log.write_batch(&mut f, &[kv(N)]);
    drop(f);

    // SIGTERM: the DPM merges everything and marks a clean shutdown.
    let mut server = server;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let status = server.0.wait().expect("wait");
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
