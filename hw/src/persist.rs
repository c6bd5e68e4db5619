//! CPU persistence primitives: write back cache lines to the persistence domain and order
//! them. x86_64 uses CLWB, else CLFLUSHOPT, else CLFLUSH (chosen once by CPUID) followed by
//! SFENCE; aarch64 uses `DC CVAP` where FEAT_DPB is present, else `DC CVAC`, then `DSB`.
//!
//! The instructions are emitted as raw encodings so that no target feature has to be
//! enabled at compile time.

use core::sync::atomic::{AtomicU8, Ordering};

use dinomo_shared::CACHE_LINE;

/// How a cache line is written back.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushKind {
    /// x86_64 CLWB: write back, keep the line cached.
    Clwb = 1,
    /// x86_64 CLFLUSHOPT: write back and invalidate, weakly ordered.
    ClflushOpt = 2,
    /// x86_64 CLFLUSH: write back and invalidate, strongly ordered.
    Clflush = 3,
    /// aarch64 `DC CVAP`: clean to the point of persistence (FEAT_DPB).
    DcCvap = 4,
    /// aarch64 `DC CVAC`: clean to the point of coherency.
    DcCvac = 5,
    /// No instruction: the platform has no volatile caches in front of its persistent
    /// memory, or persistence is not wanted (tests).
    None = 6,
}

impl FlushKind {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Clwb => "clwb",
            Self::ClflushOpt => "clflushopt",
            Self::Clflush => "clflush",
            Self::DcCvap => "dc cvap",
            Self::DcCvac => "dc cvac",
            Self::None => "none",
        }
    }
    const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Clwb,
            2 => Self::ClflushOpt,
            3 => Self::Clflush,
            4 => Self::DcCvap,
            5 => Self::DcCvac,
            6 => Self::None,
            _ => return None,
        })
    }
}

static CHOSEN: AtomicU8 = AtomicU8::new(0);

/// The flush instruction this CPU will use (detected on first call, then cached).
pub fn flush_kind() -> FlushKind {
    if let Some(k) = FlushKind::from_u8(CHOSEN.load(Ordering::Relaxed)) {
        return k;
    }
    let k = detect();
    CHOSEN.store(k as u8, Ordering::Relaxed);
    k
}

/// Overrides detection, e.g. from a platform profile on a bare-metal target where the
/// feature registers are not readable, or to compare instructions in a benchmark.
pub fn set_flush_kind(kind: FlushKind) {
    CHOSEN.store(kind as u8, Ordering::Relaxed);
}

#[cfg(target_arch = "x86_64")]
fn detect() -> FlushKind {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 7 {
        let ebx = __cpuid_count(7, 0).ebx;
        if ebx & (1 << 24) != 0 {
            return FlushKind::Clwb;
        }
        if ebx & (1 << 23) != 0 {
            return FlushKind::ClflushOpt;
        }
    }
    FlushKind::Clflush
}

#[cfg(target_arch = "aarch64")]
fn detect() -> FlushKind {
    #[cfg(feature = "std")]
    {
        if std::arch::is_aarch64_feature_detected!("dpb") {
            return FlushKind::DcCvap;
        }
    }
    FlushKind::DcCvac
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> FlushKind {
    FlushKind::None
}

/// Writes back the cache line holding `addr` (not ordered: call [`fence`] after).
#[inline]
pub fn flush_line(addr: *const u8, kind: FlushKind) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the flush instructions take any address that is mapped; callers pass addresses
    // inside memory they can access, and the instructions neither read nor write data.
    unsafe {
        match kind {
            // clwb (%rdi): 66 0F AE 37
            FlushKind::Clwb => {
                core::arch::asm!(".byte 0x66, 0x0f, 0xae, 0x37", in("rdi") addr, options(nostack, preserves_flags))
            }
            // clflushopt (%rdi): 66 0F AE 3F
            FlushKind::ClflushOpt => {
                core::arch::asm!(".byte 0x66, 0x0f, 0xae, 0x3f", in("rdi") addr, options(nostack, preserves_flags))
            }
            // clflush (%rdi): 0F AE 3F
            FlushKind::Clflush => {
                core::arch::asm!(".byte 0x0f, 0xae, 0x3f", in("rdi") addr, options(nostack, preserves_flags))
            }
            _ => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; `dc` maintenance on a mapped address has no other effect.
    unsafe {
        match kind {
            // dc cvap, x0 (SYS #3, C7, C12, #1)
            FlushKind::DcCvap => {
                core::arch::asm!("sys #3, c7, c12, #1, {0}", in(reg) addr, options(nostack, preserves_flags))
            }
            FlushKind::DcCvac => {
                core::arch::asm!("dc cvac, {0}", in(reg) addr, options(nostack, preserves_flags))
            }
            _ => {}
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = (addr, kind);
}

/// Orders all earlier flushes and stores before anything after it.
#[inline]
pub fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE has no operands and no effect beyond ordering.
    unsafe {
        core::arch::asm!("sfence", options(nostack, preserves_flags))
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: DSB ISH has no effect beyond ordering.
    unsafe {
        core::arch::asm!("dsb ish", options(nostack, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    core::sync::atomic::fence(Ordering::SeqCst);
}

/// Writes back every cache line overlapping `[addr, addr + len)` (not ordered).
#[inline]
pub fn flush_range(addr: *const u8, len: usize, kind: FlushKind) {
    if len == 0 || kind == FlushKind::None {
        return;
    }
    let start = addr as usize & !(CACHE_LINE - 1);
    let end = addr as usize + len;
    let mut line = start;
    while line < end {
        flush_line(line as *const u8, kind);
        line += CACHE_LINE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_instruction_runs() {
        let k = flush_kind();
        #[cfg(target_arch = "x86_64")]
        assert!(matches!(
            k,
            FlushKind::Clwb | FlushKind::ClflushOpt | FlushKind::Clflush
        ));
        let buf = [7u8; 256];
        flush_range(buf.as_ptr().wrapping_add(3), 200, k);
        fence();
        assert_eq!(buf[100], 7);
    }

    #[test]
    fn every_x86_instruction_executes_where_supported() {
        let buf = [1u8; 64];
        // CLFLUSH is baseline x86_64; the others only where CPUID says so.
        #[cfg(target_arch = "x86_64")]
        {
            flush_line(buf.as_ptr(), FlushKind::Clflush);
            if matches!(flush_kind(), FlushKind::Clwb) {
                flush_line(buf.as_ptr(), FlushKind::Clwb);
            }
            fence();
        }
        assert_eq!(buf[0], 1);
    }
}
