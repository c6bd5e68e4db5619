//! Helpers shared by the tests that run the `dinomo` binary: running it, and the memory
//! node and region files of the tests that run it as a separate process.
#![allow(dead_code)]

pub mod fabric;
pub mod proc_files;
pub mod procs;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Output};

use dinomo::hw::fabric::Fabric;
use dinomo::hw::region_file::RegionFile;
use dinomo::shared::entry::{self, Op};
use dinomo::shared::geometry::Geometry;
use host_kn::log::{AppendError, LogArea, ShardLog};
use host_kn::KvError;

/// The `dinomo` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_dinomo");

/// Names the command that starts [`BIN`] when the kernel cannot run it by itself, words
/// separated by spaces: the aarch64 build tested under user-mode QEMU on an x86_64 host
/// (`DINOMO_TEST_RUNNER="qemu-aarch64 -L / -cpu cortex-a72"`, see `.ci/aarch64.sh`). Cargo's
/// own `runner` setting starts only the test binary, not the processes a test spawns.
pub const RUNNER_VAR: &str = "DINOMO_TEST_RUNNER";

/// `dinomo <args>`, for a caller that adds to it or spawns it; started through
/// [`RUNNER_VAR`] where that is set.
pub fn dinomo_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let runner = std::env::var(RUNNER_VAR).unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut c = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    c.args(args);
    c
}

/// Runs `dinomo <args>` to its end, stdin closed, capturing stdout and stderr.
pub fn dinomo(args: &[&str]) -> Output {
    dinomo_cmd(args).output().expect("run dinomo")
}

/// Runs `dinomo bench --quiet <args>`.
pub fn bench(args: &[&str]) -> Output {
    dinomo(&[&["bench", "--quiet"], args].concat())
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// Sends SIGTERM and waits: a clean stop.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
        self.0.wait().expect("wait")
    }
}

/// `dinomo dpm format` of a new region file.
pub fn format_region(path: &Path, size: &str, block_size: &str) {
    let path = path.to_str().expect("utf-8");
    let o = dinomo(&[
        "dpm",
        "format",
        "--path",
        path,
        "--size",
        size,
        "--block-size",
        block_size,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The geometry of a region file (read without changing it).
pub fn geometry(path: &Path) -> Geometry {
    let file = RegionFile::open_private(path).expect("map region");
    dpm_fw::region::read_geometry(&file.pmem()).expect("geometry")
}

/// Where the log area of `geo` is, as a KN sees it.
pub fn log_area(geo: &Geometry) -> LogArea {
    LogArea {
        log_off: geo.log_off,
        block_size: geo.block_size,
        n_blocks: geo.n_blocks,
    }
}

/// Writes `items` as puts in batches of `batch` entries (one WRITE + FLUSH each), switching
/// blocks when one is full; returns the seq of the last durable entry.
pub fn put_all<F: Fabric + ?Sized>(
    f: &mut F,
    log: &mut ShardLog,
    items: &[(Vec<u8>, Vec<u8>)],
    batch: usize,
) -> Result<u64, KvError> {
    for chunk in items.chunks(batch.max(1)) {
        for (k, v) in chunk {
            loop {
                match log.append(f, Op::Put, k, v) {
                    Ok(_) => break,
                    Err(AppendError::NeedFlush) => {
                        log.flush(f)?;
                        if log.block_full_for(entry::padded_len(k.len(), v.len())) {
                            log.switch_block(f)?;
                        }
                    }
                    Err(AppendError::Kv(e)) => return Err(e),
                }
            }
        }
        log.flush(f)?;
    }
    Ok(log.durable_seq())
}
