//! The bare-metal image under QEMU, and the linker scripts against the platform profiles.
//!
//! The QEMU test needs an image built for `aarch64-unknown-none` (docs/FIRMWARE.md); it
//! runs only when `DINOMO_FIRMWARE_IMAGE` names one, and otherwise prints why it skipped.
//! `DINOMO_QEMU` overrides the emulator binary, `DINOMO_QEMU_TIMEOUT_SECS` the time after
//! which a hung emulator is killed and the test fails (default 120).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dinomo_hw::platform::{Platform, Window};
use dpm_fw::firmware::selftest;

fn linker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../linker")
}

/// Parses `1234`, `0x4000_0000`, `64K`, `64M`, `1G` as in a linker script.
fn number(s: &str) -> u64 {
    let s = s.trim().trim_end_matches(';').trim();
    let (digits, mul) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v = match digits.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse(),
    };
    v.unwrap_or_else(|e| panic!("not a number: {s:?}: {e}")) * mul
}

/// A memory region `NAME : ORIGIN = .., LENGTH = ..` of a memory.x.
fn region(script: &str, name: &str) -> Window {
    let line = script
        .lines()
        .find(|l| l.trim_start().starts_with(name) && l.contains("ORIGIN"))
        .unwrap_or_else(|| panic!("no {name} region"));
    let field = |f: &str| {
        let rest = &line[line.find(f).expect("field") + f.len()..];
        let rest = rest.trim_start().trim_start_matches('=');
        number(rest.split(',').next().expect("value"))
    };
    Window {
        base: field("ORIGIN"),
        len: field("LENGTH"),
    }
}

/// A symbol assignment `name = value;` of a memory.x.
fn symbol(script: &str, name: &str) -> u64 {
    let line = script
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{name} =")))
        .unwrap_or_else(|| panic!("no symbol {name}"));
    number(line.split('=').nth(1).expect("value"))
}

#[test]
fn memory_x_matches_the_platform_profiles() {
    for name in ["qemu-virt", "bluefield-2", "bluefield-3"] {
        let p = Platform::by_name(name).expect("profile");
        let script = std::fs::read_to_string(linker_dir().join(name).join("memory.x"))
            .expect("memory.x for every firmware platform");
        let dpm = region(&script, "DPM");
        assert_eq!(Some(dpm), p.region, "{name}: DPM window");
        let dram = Window {
            base: symbol(&script, "__dram_start"),
            len: symbol(&script, "__dram_end") - symbol(&script, "__dram_start"),
        };
        assert_eq!(Some(dram), p.ram, "{name}: DRAM window");
        let image = region(&script, "IMAGE");
        assert!(dram.contains(&image) && dram.contains(&dpm), "{name}");
        assert!(image.end() <= dpm.base || dpm.end() <= image.base, "{name}");
        // The region must hold what the self-test and a deployment format into it.
        assert!(dpm.len >= 16 << 20, "{name}: DPM window too small");
    }
}

/// Runs `qemu` on `image`, returning (exit success, output), or panics on timeout.
fn run_qemu(qemu: &str, machine: &str, image: &Path, timeout: Duration) -> (bool, String) {
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-M",
            machine,
            "-cpu",
            "cortex-a72",
            "-m",
            "128M",
            "-nographic",
        ])
        .arg("-kernel")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {qemu}: {e} (install qemu-system-arm)"));
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Read on a thread that reports over a channel: a killed emulator's children could keep
    // the pipes open, and the test must not wait for them.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        let mut e = Vec::new();
        let _ = stderr.read_to_end(&mut e);
        s.extend_from_slice(&e);
        let _ = tx.send(String::from_utf8_lossy(&s).replace('\r', ""));
    });
    let output = || {
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| "(output not available)".into())
    };
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for qemu") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let out = output();
            panic!("{qemu} -M {machine} did not exit within {timeout:?}; output:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = output();
    println!(
        "{qemu} -M {machine}: exited with {status} after {:?} (wall clock)",
        start.elapsed()
    );
    (status.success(), out)
}

#[test]
fn firmware_selftest_under_qemu() {
    let Some(image) = std::env::var_os("DINOMO_FIRMWARE_IMAGE").map(PathBuf::from) else {
        println!(
            "skipped: DINOMO_FIRMWARE_IMAGE is not set. Build the image with `cargo build \
             --release -p dpm-fw --no-default-features --features firmware --target \
             aarch64-unknown-none` and point DINOMO_FIRMWARE_IMAGE at \
             target/aarch64-unknown-none/release/dpm-fw-image to run it under QEMU."
        );
        return;
    };
    let qemu = std::env::var("DINOMO_QEMU").unwrap_or_else(|_| "qemu-system-aarch64".into());
    let timeout = Duration::from_secs(
        std::env::var("DINOMO_QEMU_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );

    // The entry point must be where memory.x puts the image (QEMU enters ELF images there).
    let elf =
        std::fs::read(&image).unwrap_or_else(|e| panic!("cannot read {}: {e}", image.display()));
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183, "not AArch64");
    let entry = u64::from_le_bytes(elf[24..32].try_into().expect("8 bytes"));
    let script = std::fs::read_to_string(linker_dir().join("qemu-virt/memory.x"))
        .expect("qemu-virt memory.x");
    assert_eq!(
        entry,
        region(&script, "IMAGE").base,
        "entry is not the qemu-virt load address"
    );

    let want = format!(
        "dpm-fw selftest: {} passed, 0 failed",
        selftest::expected_checks()
    );
    // Default machine: entered at EL1, PSCI over HVC. With virtualization=on: entered at
    // EL2, the image drops to EL1 and powers off over SMC.
    for (machine, conduit) in [("virt", "Hvc"), ("virt,virtualization=on", "Smc")] {
        let (ok, out) = run_qemu(&qemu, machine, &image, timeout);
        print!("{out}");
        assert!(ok, "-M {machine}: QEMU exited with failure:\n{out}");
        assert!(
            out.lines().any(|l| l.trim() == want),
            "-M {machine}: no line {want:?} in:\n{out}"
        );
        assert!(out.contains("device tree found"), "-M {machine}:\n{out}");
        assert!(
            out.contains(&format!("PSCI via Some({conduit})")),
            "-M {machine}:\n{out}"
        );
    }
}
