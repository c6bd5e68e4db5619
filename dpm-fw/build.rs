//! Hands the platform's linker script to the linker when the bare-metal image is built
//! (`--features firmware --target aarch64-unknown-none`); does nothing for host builds.
//!
//! `DINOMO_PLATFORM` picks the platform (`qemu-virt`, the default, `bluefield-2`,
//! `bluefield-3`); `DINOMO_FW_MODE` picks what the image does (`selftest`, the default on
//! `qemu-virt`, or `serve`, the default elsewhere).

use std::env;
use std::path::PathBuf;

const PLATFORMS: [&str; 3] = ["qemu-virt", "bluefield-2", "bluefield-3"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=DINOMO_PLATFORM");
    println!("cargo::rerun-if-env-changed=DINOMO_FW_MODE");
    println!(
        "cargo::rustc-check-cfg=cfg(dinomo_platform, values(\"qemu-virt\", \"bluefield-2\", \"bluefield-3\"))"
    );
    println!("cargo::rustc-check-cfg=cfg(dinomo_fw_selftest)");

    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let firmware = env::var_os("CARGO_FEATURE_FIRMWARE").is_some();
    if !(firmware && os == "none" && arch == "aarch64") {
        return;
    }

    let platform = env::var("DINOMO_PLATFORM").unwrap_or_else(|_| "qemu-virt".to_owned());
    if !PLATFORMS.contains(&platform.as_str()) {
        panic!("DINOMO_PLATFORM={platform:?} is not one of {PLATFORMS:?}");
    }
    let mode = env::var("DINOMO_FW_MODE").unwrap_or_else(|_| {
        if platform == "qemu-virt" {
            "selftest".to_owned()
        } else {
            "serve".to_owned()
        }
    });
    match mode.as_str() {
        "selftest" => println!("cargo::rustc-cfg=dinomo_fw_selftest"),
        "serve" => {}
        other => panic!("DINOMO_FW_MODE={other:?} is neither \"selftest\" nor \"serve\""),
    }

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let linker = manifest.join("..").join("linker");
    let memory = linker.join(&platform);
    for f in [linker.join("link.x"), memory.join("memory.x")] {
        assert!(f.is_file(), "missing linker script {}", f.display());
        println!("cargo::rerun-if-changed={}", f.display());
    }
    println!("cargo::rustc-link-search={}", linker.display());
    println!("cargo::rustc-link-search={}", memory.display());
    println!("cargo::rustc-link-arg-bins=-Tlink.x");
    println!("cargo::rustc-cfg=dinomo_platform=\"{platform}\"");
}
