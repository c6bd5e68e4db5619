//! The bare-metal memory-node image for AArch64 (`aarch64-unknown-none`).
//!
//! Boots on one core, sets up the MMU (identity map, DRAM cacheable), a heap and a console,
//! takes the DPM region window the platform's `memory.x` defines, and then either runs the
//! self-test (`dinomo_fw_selftest`, the default on `qemu-virt`) and powers off, or mounts
//! the region (format if blank, recover otherwise) and merges logs forever. See
//! docs/FIRMWARE.md for the layout and how to build for each platform.
//!
//! On any other target this is a stub that explains itself, so that host builds with the
//! `firmware` feature still work.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod image;
#[cfg(target_os = "none")]
mod psci;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "dpm-fw-image is a bare-metal AArch64 image; build it with\n  \
         cargo build --release -p dpm-fw --no-default-features --features firmware \
         --target aarch64-unknown-none\nand boot it (docs/FIRMWARE.md)."
    );
    std::process::exit(2);
}
