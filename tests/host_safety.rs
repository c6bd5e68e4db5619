//! The host side of a running process: files it creates, a region too big for its file
//! system, and a thread that panics.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{dinomo, dinomo_cmd, format_region, stderr, ChildGuard};

/// Waits for `child` to exit, at most `limit` (a bound on a hang, not a timing claim).
fn wait_exit(child: &mut ChildGuard, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_panicking_dpm_thread_ends_the_process_with_its_name() {
    for thread in ["dpm-merge-0", "dpm-control"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let region = dir.path().join("r.region");
        format_region(&region, "8M", "64K");
        let mut child = ChildGuard(
            dinomo_cmd(["dpm", "serve", "--no-pin", "--workers", "1", "--path"])
                .arg(&region)
                .env("DINOMO_FAULT_PANIC", thread)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn dpm serve"),
        );
        let status = wait_exit(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the DPM kept running after its {thread} thread panicked"));
        let mut err = String::new();
        child
            .0
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read stderr");
        assert_eq!(status.code(), Some(101), "{thread}: {err}");
        assert!(
            err.contains(&format!("thread '{thread}' panicked"))
                && err.contains("exiting with status 101"),
            "{err}"
        );
        // The region lock went with the process: another DPM may serve the region.
        let file = dinomo::hw::region_file::RegionFile::open(&region).expect("open region");
        file.lock_exclusive()
            .expect("the panicked DPM's lock is gone");
    }
}

#[test]
fn format_refuses_a_region_larger_than_the_free_space_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("r.region");
    let free = dinomo::hw::region_file::space_for(dir.path(), None).expect("free space");
    let size = ((free + (4 << 30)) >> 20).to_string() + "M";
    let path = region.to_str().expect("utf-8");
    let o = dinomo(&["dpm", "format", "--path", path, "--size", &size]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("not enough space") && err.contains("bytes free"),
        "{err}"
    );
    assert!(!region.exists(), "nothing is left behind");
    // --force on an existing region checks the space before removing the old one.
    format_region(&region, "8M", "64K");
    let before = std::fs::read(&region).expect("read region");
    let o = dinomo(&["dpm", "format", "--force", "--path", path, "--size", &size]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not enough space"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&region).expect("read region"), before);
}

#[test]
fn format_and_serve_make_private_files_and_refuse_a_shared_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("r.region");
    format_region(&region, "8M", "64K");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&region), 0o600);
    let mut child = ChildGuard(
        dinomo_cmd(["dpm", "serve", "--no-pin", "--workers", "1", "--path"])
            .arg(&region)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dpm serve"),
    );
    let ctl = dinomo::hw::fabric::default_ctl_path(&region);
    let t0 = Instant::now();
    while !ctl.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mode(&ctl), 0o600);
    assert!(child.0.try_wait().expect("try_wait").is_none());
    drop(child);

    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let p = shared.join("r.region");
    let o = dinomo(&[
        "dpm",
        "format",
        "--path",
        p.to_str().expect("utf-8"),
        "--size",
        "8M",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("mode 1777"), "{}", stderr(&o));
    assert!(!p.exists());
}

#[test]
fn the_verbs_handshake_is_not_served_or_dialled_off_loopback_without_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("r.region");
    format_region(&region, "8M", "64K");
    let path = region.to_str().expect("utf-8");
    let o = dinomo(&[
        "dpm",
        "serve",
        "--path",
        path,
        "--fabric",
        "verbs",
        "--listen",
        "0.0.0.0:18515",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("without a cluster secret") && err.contains("--secret-file"),
        "{err}"
    );
    // A KN told to reach a DPM on another host without a secret refuses before dialling.
    let o = dinomo(&[
        "kn",
        "--fabric",
        "verbs",
        "--dpm",
        "192.0.2.1:18515",
        "--listen",
        "127.0.0.1:0",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("without a cluster secret"), "{err}");
}
