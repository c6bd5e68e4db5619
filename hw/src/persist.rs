//! CPU persistence primitives: write back cache lines to the persistence domain and order
//! them. x86_64 uses CLWB, else CLFLUSHOPT, else CLFLUSH (chosen once by CPUID) followed by
//! SFENCE; aarch64 uses `DC CVAP` where FEAT_DPB is present (on Linux: `HWCAP_DCPOP` in the
//! auxiliary vector), else `DC CVAC`, then `DSB SY`.
//!
//! On aarch64 the write-back steps by the CPU's smallest data-cache line (`CTR_EL0.DminLine`),
//! not by a fixed 64 bytes: a CPU with 32-byte lines would otherwise leave every other line
//! of a range in the cache.
//!
//! The instructions are emitted as raw encodings so that no target feature has to be
//! enabled at compile time.

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

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
    match has_dcpop() {
        Some(true) => FlushKind::DcCvap,
        // Without FEAT_DPB, or where it cannot be asked (bare metal: the platform profile
        // says which instruction to use), clean to the point of coherency.
        Some(false) | None => FlushKind::DcCvac,
    }
}

/// `HWCAP_DCPOP` of Linux's arm64 `<asm/hwcap.h>`: the CPU implements `DC CVAP` (FEAT_DPB).
/// Spelled out here because not every C library binding names it.
#[cfg(all(target_arch = "aarch64", target_os = "linux", feature = "std"))]
const HWCAP_DCPOP: u64 = 1 << 16;

/// Whether this CPU has `DC CVAP` (FEAT_DPB), as the operating system reports it; `None`
/// where nobody can be asked (bare metal).
///
/// On Linux the kernel reads `ID_AA64ISAR1_EL1.DPB` on every core and reports the feature in
/// the auxiliary vector (`AT_HWCAP`) only if all of them have it, so one `getauxval` is the
/// whole answer. (QEMU's user-mode emulator up to at least 7.2 reports it while not
/// implementing `DC CVAP` at EL0, so the instruction traps there; run it with a CPU model
/// without FEAT_DPB such as `-cpu cortex-a72`, the BlueField-2's core.)
#[cfg(target_arch = "aarch64")]
pub fn has_dcpop() -> Option<bool> {
    #[cfg(all(target_os = "linux", feature = "std"))]
    {
        // SAFETY: `getauxval` has no preconditions; it reads the auxiliary vector the kernel
        // passed at exec and returns 0 for an entry it does not have.
        let hwcap = unsafe { libc::getauxval(libc::AT_HWCAP) };
        Some(hwcap & HWCAP_DCPOP != 0)
    }
    #[cfg(all(not(target_os = "linux"), feature = "std"))]
    {
        Some(std::arch::is_aarch64_feature_detected!("dpb"))
    }
    #[cfg(not(feature = "std"))]
    {
        None
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> FlushKind {
    FlushKind::None
}

static STRIDE: AtomicUsize = AtomicUsize::new(0);

/// The step of [`flush_range`]: the CPU's smallest data-cache line, at most
/// [`CACHE_LINE`] (detected on first call, then cached).
///
/// Stepping by more than the real line would skip lines; stepping by less only repeats
/// work, so the smaller of the two is always safe.
pub fn flush_stride() -> usize {
    match STRIDE.load(Ordering::Relaxed) {
        0 => {
            let s = detect_stride();
            STRIDE.store(s, Ordering::Relaxed);
            s
        }
        s => s,
    }
}

#[cfg(target_arch = "aarch64")]
fn detect_stride() -> usize {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects. EL1 (the bare-metal image) may always read
    // it; Linux lets EL0 read it (SCTLR_EL1.UCT) or traps and emulates the read with the
    // smallest line of all cores when they differ.
    unsafe {
        core::arch::asm!("mrs {0}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags))
    };
    dcache_line_from_ctr(ctr).min(CACHE_LINE)
}

#[cfg(not(target_arch = "aarch64"))]
fn detect_stride() -> usize {
    // x86_64 writes back 64-byte lines on every CPU that has CLFLUSH/CLWB.
    CACHE_LINE
}

/// The smallest data-cache line in bytes that a `CTR_EL0` value describes: `DminLine`
/// (bits 19:16) is the log2 of the number of 4-byte words.
pub const fn dcache_line_from_ctr(ctr: u64) -> usize {
    4 << ((ctr >> 16) & 0xf)
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
    // SAFETY: as above; `dc` maintenance on a mapped address has no other effect. EL0 may
    // issue it because Linux sets SCTLR_EL1.UCI; `DC CVAP` is only chosen where the CPU
    // has FEAT_DPB (`has_dcpop`) or a platform profile says so.
    unsafe {
        match kind {
            // dc cvap, Xt (SYS #3, C7, C12, #1, Xt): spelled as SYS so that no `dpb` target
            // feature is needed at compile time
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

/// Orders all earlier flushes and stores before anything after it, and (on aarch64) waits
/// until the flushes are complete.
#[inline]
pub fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE has no operands and no effect beyond ordering.
    unsafe {
        core::arch::asm!("sfence", options(nostack, preserves_flags))
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: DSB SY has no effect beyond ordering and waiting. Full system, not inner
    // shareable: the observers of a cleaned line are the memory controller and the NIC,
    // which lie outside the inner-shareable domain; Linux completes its own `DC CVAP` /
    // `DC CVAC` loops for persistent memory and DMA the same way.
    unsafe {
        core::arch::asm!("dsb sy", options(nostack, preserves_flags))
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
    for line in lines(addr as usize, len, flush_stride()) {
        flush_line(line as *const u8, kind);
    }
}

/// The start of every `stride`-byte line (a power of two) overlapping `[addr, addr + len)`.
fn lines(addr: usize, len: usize, stride: usize) -> impl Iterator<Item = usize> {
    let start = addr & !(stride - 1);
    let end = addr.saturating_add(len);
    (start..end).step_by(stride)
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
    fn ranges_cover_every_line_they_touch_at_any_stride() {
        let at = |addr, len, stride| lines(addr, len, stride).collect::<Vec<_>>();
        assert_eq!(at(0x1003, 200, 64), [0x1000, 0x1040, 0x1080, 0x10c0]);
        // 32-byte lines (QEMU's `max` CPU, some Cortex-A53 parts): twice as many.
        assert_eq!(
            at(0x1003, 200, 32),
            [0x1000, 0x1020, 0x1040, 0x1060, 0x1080, 0x10a0, 0x10c0]
        );
        assert_eq!(at(0x103f, 2, 64), [0x1000, 0x1040]);
        assert_eq!(at(0x1040, 1, 64), [0x1040]);
        assert!(at(0x1040, 0, 64).is_empty());
    }

    #[test]
    fn the_stride_is_a_power_of_two_no_larger_than_a_cache_line() {
        let s = flush_stride();
        assert!(s.is_power_of_two() && (4..=CACHE_LINE).contains(&s), "{s}");
        assert_eq!(dcache_line_from_ctr(0x8444_c004), 64); // Cortex-A72
        assert_eq!(dcache_line_from_ctr(0x8003_8003), 32);
        assert_eq!(dcache_line_from_ctr(0x8666_8006), 256); // A64FX
    }

    /// The DPM on a DPU's Arm cores: `DC CVAP` exactly where the kernel reports FEAT_DPB,
    /// and the chosen instruction and `DSB SY` execute at EL0.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn aarch64_uses_dc_cvap_exactly_where_the_cpu_has_it() {
        let has = has_dcpop();
        #[cfg(feature = "std")]
        assert_eq!(has, Some(std::arch::is_aarch64_feature_detected!("dpb")));
        let want = if has == Some(true) {
            FlushKind::DcCvap
        } else {
            FlushKind::DcCvac
        };
        assert_eq!(detect(), want);
        let buf = [5u8; 256];
        flush_line(buf.as_ptr(), FlushKind::DcCvac);
        flush_range(buf.as_ptr().wrapping_add(1), 254, want);
        fence();
        assert_eq!(buf[255], 5);
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
