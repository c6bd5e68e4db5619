//! Boot stub, exception vectors and the MMU.
//!
//! `_start` parks every core but the first (secondary cores are started later through
//! PSCI, if ever), drops from EL2 to EL1 when entered at EL2, enables FP/SIMD (the compiler
//! uses NEON registers for copies), sets the stack and vectors, clears BSS, and calls
//! [`crate::image::dpm_fw_main`] with the device-tree pointer the loader passed in x0 and
//! the exception level it was entered at. EL3 entry (QEMU `secure=on`) is not supported:
//! the core parks, since there is then no PSCI implementation to power off with either.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    mrs     x1, mpidr_el1
    and     x1, x1, #0xffffff
    cbz     x1, 1f
0:  wfe
    b       0b
1:  mov     x19, x0
    mrs     x20, CurrentEL
    ubfx    x20, x20, #2, #2
    cmp     x20, #3
    b.eq    0b
    cmp     x20, #2
    b.ne    2f
    // EL2: run the kernel at EL1 (AArch64), no traps of FP/SIMD, timers usable.
    mov     x1, #(1 << 31)
    msr     hcr_el2, x1
    mov     x1, #0x33ff
    msr     cptr_el2, x1
    mov     x1, #3
    msr     cnthctl_el2, x1
    msr     cntvoff_el2, xzr
    ldr     x1, =0x30d00800
    msr     sctlr_el1, x1
    mov     x1, #0x3c5
    msr     spsr_el2, x1
    adr     x1, 2f
    msr     elr_el2, x1
    eret
2:  ldr     x1, =0x30d00800
    msr     sctlr_el1, x1
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    isb
    ldr     x1, =__stack_top
    mov     sp, x1
    ldr     x1, =__vectors
    msr     vbar_el1, x1
    isb
    ldr     x1, =__bss_start
    ldr     x2, =__bss_end
3:  cmp     x1, x2
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       3b
4:  mov     x0, x19
    mov     x1, x20
    bl      dpm_fw_main
    b       0b

    .section .text.vectors, "ax"
    .balign 0x800
    .global __vectors
__vectors:
    .irp    kind, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    .balign 0x80
    mov     x0, #\kind
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    b       dpm_fw_exception
    .endr
"#
);

/// Called from the vectors: every exception is fatal in this image (no interrupts are
/// enabled), except the one a missing PSCI conduit raises while powering off.
#[no_mangle]
extern "C" fn dpm_fw_exception(kind: u64, esr: u64, elr: u64, far: u64) -> ! {
    const KINDS: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];
    const FROM: [&str; 4] = ["EL1t", "EL1h", "EL0 AArch64", "EL0 AArch32"];
    let ec = (esr >> 26) & 0x3f;
    if crate::psci::conduit_faulted(ec) {
        crate::psci::power_off();
    }
    crate::println!(
        "dpm-fw: {} exception from {}: ESR={esr:#x} (EC={ec:#x}) ELR={elr:#x} FAR={far:#x}",
        KINDS[(kind & 3) as usize],
        FROM[((kind >> 2) & 3) as usize],
    );
    crate::psci::power_off()
}

/// One level-1 translation table (512 x 1 GiB blocks, 39-bit VA with 4 KiB granule).
#[repr(C, align(4096))]
struct Table(UnsafeCell<[u64; 512]>);

// SAFETY: written once by the boot core before the MMU is on, read only by the walker.
unsafe impl Sync for Table {}

static L1: Table = Table(UnsafeCell::new([0; 512]));

const BLOCK: u64 = 1;
const ATTR_DEVICE: u64 = 0 << 2;
const ATTR_NORMAL: u64 = 1 << 2;
const INNER_SHAREABLE: u64 = 3 << 8;
const ACCESS_FLAG: u64 = 1 << 10;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;

extern "C" {
    static __dram_start: u8;
    static __dram_end: u8;
}

/// Turns the MMU and caches on with an identity map: 1 GiB blocks overlapping DRAM are
/// normal write-back memory (so atomics, unaligned accesses and `DC CVA*` behave as on a
/// real memory node), everything else is device memory and never executable.
pub fn enable_mmu() {
    #[allow(unused_unsafe)]
    // SAFETY: only the addresses of linker symbols are taken (safe from Rust 1.82 on).
    let (dram_start, dram_end) = unsafe {
        (
            core::ptr::addr_of!(__dram_start) as u64,
            core::ptr::addr_of!(__dram_end) as u64,
        )
    };
    let mmfr0: u64;
    // SAFETY: reading an ID register has no side effect.
    unsafe { asm!("mrs {}, id_aa64mmfr0_el1", out(reg) mmfr0, options(nomem, nostack)) };
    let parange = (mmfr0 & 0xf).min(5);
    let pa_bits = [32u32, 36, 40, 42, 44, 48][parange as usize];
    let table = L1.0.get();
    for i in 0..512u64 {
        let base = i << 30;
        let desc = if base >> pa_bits != 0 {
            0
        } else if base < dram_end && base + (1 << 30) > dram_start {
            base | BLOCK | ATTR_NORMAL | INNER_SHAREABLE | ACCESS_FLAG
        } else {
            base | BLOCK | ATTR_DEVICE | ACCESS_FLAG | PXN | UXN
        };
        // SAFETY: `table` points to the static table; nothing else touches it yet, and the
        // MMU (its only other reader) is still off.
        unsafe { (*table)[i as usize] = desc };
    }
    let t0sz = 64 - 39u64;
    let tcr = t0sz
        | (1 << 8)   // IRGN0: write-back, write-allocate
        | (1 << 10)  // ORGN0: write-back, write-allocate
        | (3 << 12)  // SH0: inner shareable
        | (1 << 23)  // EPD1: no TTBR1 walks
        | (parange << 32); // IPS
    let mair = 0xff << 8; // attr0: Device-nGnRnE, attr1: normal WB RA/WA
                          // SAFETY: the table is complete and maps the code, stack and data this core is using at
                          // the same addresses, so execution continues seamlessly once the MMU is on. The table
                          // lines are invalidated first so that the walker, which reads through the cache once it
                          // is on, cannot see stale lines left by an earlier boot stage.
    unsafe {
        let mut line = table as u64;
        while line < table as u64 + 4096 {
            asm!("dc ivac, {}", in(reg) line, options(nostack));
            line += 64;
        }
        asm!(
            "dsb sy",
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr}",
            "isb",
            "tlbi vmalle1",
            "dsb ish",
            "isb",
            "mrs {tmp}, sctlr_el1",
            "orr {tmp}, {tmp}, #(1 << 0)",
            "orr {tmp}, {tmp}, #(1 << 2)",
            "orr {tmp}, {tmp}, #(1 << 12)",
            "msr sctlr_el1, {tmp}",
            "isb",
            mair = in(reg) mair as u64,
            tcr = in(reg) tcr,
            ttbr = in(reg) table as u64,
            tmp = out(reg) _,
            options(nostack),
        );
    }
}

/// The generic timer: (count, frequency in Hz).
pub fn counter() -> (u64, u64) {
    let (cnt, frq): (u64, u64);
    // SAFETY: reading the virtual counter and its frequency has no side effect; both are
    // accessible at EL1 (CNTHCTL_EL2 permits it when we came from EL2).
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) cnt, options(nostack));
        asm!("mrs {}, cntfrq_el0", out(reg) frq, options(nomem, nostack));
    }
    (cnt, frq)
}
