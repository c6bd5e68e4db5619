//! Powering off through PSCI SYSTEM_OFF.
//!
//! The conduit comes from the device tree (`/psci` `method`), else the platform profile,
//! else the exception level we were entered at (EL1: a hypervisor or QEMU listens on HVC;
//! EL2: firmware on SMC). Should the chosen instruction be undefined (nobody listens), the
//! exception handler tries the other conduit once, then the core parks.

use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

use dinomo_hw::platform::PsciConduit;

/// PSCI 0.2+ SYSTEM_OFF (SMC32 fast call).
pub const SYSTEM_OFF: u32 = 0x8400_0008;

const NONE: u8 = 0;
const HVC: u8 = 1;
const SMC: u8 = 2;

static CONDUIT: AtomicU8 = AtomicU8::new(NONE);
/// Conduits tried so far during power-off (bit per conduit).
static TRIED: AtomicU8 = AtomicU8::new(0);

/// Records the conduit to use.
pub fn set_conduit(c: PsciConduit) {
    CONDUIT.store(
        match c {
            PsciConduit::Hvc => HVC,
            PsciConduit::Smc => SMC,
        },
        Ordering::Relaxed,
    );
}

/// The conduit in use, if known.
pub fn conduit() -> Option<PsciConduit> {
    match CONDUIT.load(Ordering::Relaxed) {
        HVC => Some(PsciConduit::Hvc),
        SMC => Some(PsciConduit::Smc),
        _ => None,
    }
}

/// Whether an exception with class `ec` is the chosen conduit being undefined during
/// power-off; if so, switches to the other conduit (once) and returns true.
pub fn conduit_faulted(ec: u64) -> bool {
    // EC 0: unknown reason, which is what an HVC/SMC nobody implements raises.
    if ec != 0 || TRIED.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let other = match CONDUIT.load(Ordering::Relaxed) {
        HVC => SMC,
        _ => HVC,
    };
    if TRIED.load(Ordering::Relaxed) & (1 << other) != 0 {
        return false;
    }
    CONDUIT.store(other, Ordering::Relaxed);
    true
}

/// Powers the machine off; parks the core if that is impossible.
pub fn power_off() -> ! {
    let c = CONDUIT.load(Ordering::Relaxed);
    if c != NONE && TRIED.fetch_or(1 << c, Ordering::Relaxed) & (1 << c) == 0 {
        // SAFETY: an SMCCC fast call: x0 carries the function id; the callee may clobber
        // the caller-saved registers (declared), and SYSTEM_OFF does not return on success.
        unsafe {
            match c {
                HVC => {
                    asm!("hvc #0", inout("x0") u64::from(SYSTEM_OFF) => _, clobber_abi("C"), options(nostack))
                }
                _ => {
                    asm!("smc #0", inout("x0") u64::from(SYSTEM_OFF) => _, clobber_abi("C"), options(nostack))
                }
            }
        }
    }
    crate::println!("dpm-fw: could not power off through PSCI; parking this core");
    loop {
        // SAFETY: WFE only waits for an event.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}
