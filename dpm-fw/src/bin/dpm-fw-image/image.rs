//! The image proper: platform, heap, panic handler, and what runs after boot.

use core::panic::PanicInfo;

use dinomo_hw::platform::{Platform, PsciConduit};
use dinomo_hw::CpuPersist;
use dpm_fw::firmware::{fdt, heap::LockedHeap};

use crate::{boot, println, psci};

#[cfg(dinomo_platform = "qemu-virt")]
pub const PLATFORM: Platform = dinomo_hw::platform::QEMU_VIRT;
#[cfg(dinomo_platform = "bluefield-2")]
pub const PLATFORM: Platform = dinomo_hw::platform::BLUEFIELD_2;
#[cfg(dinomo_platform = "bluefield-3")]
pub const PLATFORM: Platform = dinomo_hw::platform::BLUEFIELD_3;
#[cfg(not(any(
    dinomo_platform = "qemu-virt",
    dinomo_platform = "bluefield-2",
    dinomo_platform = "bluefield-3"
)))]
compile_error!("no platform chosen: build through cargo so that build.rs sets DINOMO_PLATFORM");

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __heap_start: u8;
    static __heap_end: u8;
    static __dpm_region_start: u8;
    static __dpm_region_end: u8;
    static __dtb_fallback: u8;
}

/// Address of a linker symbol.
macro_rules! sym {
    ($s:ident) => {{
        // Taking the address of an extern static is safe from Rust 1.82 on; older
        // compilers need the block.
        #[allow(unused_unsafe)]
        // SAFETY: only the address of the linker-defined symbol is taken, never its value.
        let a = unsafe { core::ptr::addr_of!($s) as usize };
        a
    }};
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("dpm-fw: panic: {info}");
    psci::power_off()
}

/// The device tree: the one the loader passed in x0, else the platform's fallback location.
fn device_tree(x0: u64) -> Option<&'static [u8]> {
    for addr in [x0 as usize, sym!(__dtb_fallback)] {
        if addr == 0 || addr % 8 != 0 {
            continue;
        }
        // SAFETY: a non-null, aligned address the loader or memory.x names as the device
        // tree; it lies in identity-mapped DRAM, and the 8 header bytes are read first.
        let head = unsafe { core::slice::from_raw_parts(addr as *const u8, 8) };
        if let Some(size) = fdt::blob_size(head) {
            // SAFETY: as above; the blob claims `size` bytes (capped by `blob_size`) and the
            // loader placed that much there. Nothing writes it while the image runs.
            return Some(unsafe { core::slice::from_raw_parts(addr as *const u8, size) });
        }
    }
    None
}

/// Entry from the boot stub, on the boot core at EL1 with stack and BSS ready.
#[no_mangle]
extern "C" fn dpm_fw_main(x0: u64, boot_el: u64) -> ! {
    boot::enable_mmu();
    let (heap, heap_end) = (sym!(__heap_start), sym!(__heap_end));
    // SAFETY: [__heap_start, __heap_end) is reserved for the heap by link.x and used by
    // nothing else.
    unsafe { HEAP.add_region(heap as *mut u8, heap_end - heap) };

    println!(
        "dpm-fw {} on {} (entered at EL{boot_el})",
        env!("CARGO_PKG_VERSION"),
        PLATFORM.name
    );
    if !PLATFORM.is_confirmed() {
        println!(
            "dpm-fw: platform values not confirmed on hardware: {:?}",
            PLATFORM.placeholders
        );
    }
    let dt = device_tree(x0);
    let conduit = dt
        .and_then(fdt::psci_conduit)
        .or(PLATFORM.psci)
        .unwrap_or(if boot_el == 2 {
            PsciConduit::Smc
        } else {
            PsciConduit::Hvc
        });
    psci::set_conduit(conduit);
    let kind = PLATFORM.flush_kind();
    dinomo_hw::persist::set_flush_kind(kind);
    let (start, end) = (sym!(__dpm_region_start), sym!(__dpm_region_end));
    println!(
        "dpm-fw: device tree {}, PSCI via {:?}, heap {} KiB, region {:#x}..{:#x} ({} MiB), flush {}",
        if dt.is_some() { "found" } else { "absent" },
        psci::conduit(),
        HEAP.free_bytes() >> 10,
        start,
        end,
        (end - start) >> 20,
        kind.name()
    );
    run(
        start as *mut u8,
        (end - start) as u64,
        CpuPersist::with_kind(kind),
    )
}

/// Self-test: write, merge, recover, check; print the result line and power off.
#[cfg(dinomo_fw_selftest)]
fn run(base: *mut u8, len: u64, persist: CpuPersist) -> ! {
    let (t0, hz) = boot::counter();
    let mut out = crate::console::Console::new();
    // SAFETY: the DPM window is reserved by memory.x, identity-mapped as normal memory,
    // 4 KiB aligned, and used by nothing else.
    let report = unsafe { dpm_fw::firmware::selftest::run(base, len, persist, &mut out) };
    let (t1, _) = boot::counter();
    let us = (t1 - t0).saturating_mul(1_000_000) / hz.max(1);
    println!("dpm-fw: self-test ran in {}.{:03} ms", us / 1000, us % 1000);
    println!("{report}");
    psci::power_off()
}

/// Serve: mount the region and merge whatever KVS nodes write into it, forever.
#[cfg(not(dinomo_fw_selftest))]
fn run(base: *mut u8, len: u64, persist: CpuPersist) -> ! {
    use dinomo_hw::Pmem;
    use dpm_fw::dpm::DEFAULT_STEP;
    use dpm_fw::firmware::mount;
    use dpm_fw::Scratch;

    // SAFETY: as in the self-test: the window is ours alone.
    let pm = unsafe { Pmem::new(base, len, persist) };
    let params = dinomo_shared::geometry::FormatParams::for_size(len);
    // A blank window gets a region id that differs from boot to boot.
    let region_id = boot::counter().0 ^ base as u64;
    let (dpm, how) = match mount(pm, &params, region_id) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let geo = dpm.geometry();
    println!(
        "dpm-fw: region {:?}: {} blocks of {} KiB; merging",
        how,
        geo.n_blocks,
        geo.block_size >> 10
    );
    let mut scratch = Scratch::default();
    // Quarantines of fenced logs are measured from the mount.
    let (mounted, _) = boot::counter();
    loop {
        let (now, hz) = boot::counter();
        let ms = u128::from(now.wrapping_sub(mounted)) * 1000 / u128::from(hz.max(1));
        dpm.tick(u64::try_from(ms).unwrap_or(u64::MAX));
        if dpm.merge_pass(0, 1, DEFAULT_STEP, &mut scratch) == 0 {
            // Nothing to merge: back off briefly before polling the logs again.
            for _ in 0..1024 {
                core::hint::spin_loop();
            }
        }
    }
}
