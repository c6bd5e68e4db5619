//! Platform profiles: what the memory node needs to know about the machine it runs on
//! (cache-line size, the persistence instruction, core count, memory windows, console).
//!
//! A bare-metal image cannot probe most of this (feature registers aside), so it is written
//! down here once. Every profile lists in [`Platform::placeholders`] the fields that have
//! not been confirmed on the real machine; code that boots on such a platform should print
//! that list so nobody mistakes a guess for a measurement.

use crate::persist::FlushKind;

/// A physical address window `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub base: u64,
    pub len: u64,
}

impl Window {
    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.base + self.len
    }
    /// Whether `other` lies entirely inside `self`.
    pub const fn contains(&self, other: &Window) -> bool {
        other.base >= self.base && other.end() <= self.end()
    }
}

/// How to reach the PSCI implementation (firmware or hypervisor) for power management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciConduit {
    /// `hvc #0`: PSCI handled at EL2 (QEMU `virt` without EL2/EL3 emulation).
    Hvc,
    /// `smc #0`: PSCI handled at EL3 (trusted firmware).
    Smc,
}

/// One machine the memory node can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    /// Name used by `DINOMO_PLATFORM` and the linker-script folders.
    pub name: &'static str,
    /// Data cache-line size in bytes (the unit of write-back).
    pub cache_line: usize,
    /// Write-back instruction; `None` means detect at run time (CPUID / HWCAP).
    pub flush: Option<FlushKind>,
    /// Application cores available to merge workers; `None` means ask the OS.
    pub cores: Option<u32>,
    /// DRAM the image is loaded into and runs from (bare metal only).
    pub ram: Option<Window>,
    /// The window holding the DPM region (log blocks, index, metadata).
    pub region: Option<Window>,
    /// Base of a PL011-compatible UART usable as a console, where known.
    pub uart_pl011: Option<u64>,
    /// How PSCI calls (SYSTEM_OFF) are made when no device tree says otherwise.
    pub psci: Option<PsciConduit>,
    /// Names of the fields above whose values are not confirmed on the real machine.
    pub placeholders: &'static [&'static str],
}

/// QEMU `-M virt -cpu cortex-a72` with the default 128 MiB of RAM at 0x4000_0000.
///
/// Confirmed against QEMU's `virt` board: RAM base, PL011 at 0x0900_0000, PSCI over HVC when
/// the guest boots at EL1 (no `virtualization=on`, no `secure=on`). The region window is the
/// upper 64 MiB of RAM, chosen by `linker/qemu-virt/memory.x`; the image is linked at
/// 0x4020_0000 because QEMU copies its 1 MiB device tree to the start of RAM for ELF
/// kernels only if it fits below the image. QEMU models no
/// caches, so `DC CVAC` is executed but persistence is not actually exercised.
pub const QEMU_VIRT: Platform = Platform {
    name: "qemu-virt",
    cache_line: 64,
    flush: Some(FlushKind::DcCvac),
    cores: Some(1),
    ram: Some(Window {
        base: 0x4000_0000,
        len: 0x0800_0000,
    }),
    region: Some(Window {
        base: 0x4400_0000,
        len: 0x0400_0000,
    }),
    uart_pl011: Some(0x0900_0000),
    psci: Some(PsciConduit::Hvc),
    placeholders: &[],
};

/// NVIDIA BlueField-2 DPU: 8 Arm Cortex-A72 cores (Armv8.0-A, so no FEAT_DPB: `DC CVAC`).
///
/// Confirmed from public specifications: core type and count, 64-byte lines, the absence of
/// `DC CVAP`. Placeholders to be confirmed on hardware: the DRAM and region windows (the
/// region must be a carve-out the DPU's Arm OS or boot firmware leaves untouched and
/// registers with the NIC), the console (BlueField consoles are normally reached through
/// the RShim virtio console, not a UART at a known address), and the PSCI conduit (expected
/// to be SMC to the BlueField trusted firmware).
pub const BLUEFIELD_2: Platform = Platform {
    name: "bluefield-2",
    cache_line: 64,
    flush: Some(FlushKind::DcCvac),
    cores: Some(8),
    ram: Some(Window {
        base: 0x8000_0000,
        len: 0x8000_0000,
    }),
    region: Some(Window {
        base: 0xC000_0000,
        len: 0x4000_0000,
    }),
    uart_pl011: None,
    psci: Some(PsciConduit::Smc),
    placeholders: &["ram", "region", "uart_pl011", "psci"],
};

/// NVIDIA BlueField-3 DPU: 16 Arm Cortex-A78AE cores (Armv8.2-A, where FEAT_DPB and hence
/// `DC CVAP` are mandatory).
///
/// Confirmed from public specifications: core type and count, 64-byte lines, `DC CVAP`.
/// Placeholders as for [`BLUEFIELD_2`]: DRAM and region windows, console, PSCI conduit.
pub const BLUEFIELD_3: Platform = Platform {
    name: "bluefield-3",
    cache_line: 64,
    flush: Some(FlushKind::DcCvap),
    cores: Some(16),
    ram: Some(Window {
        base: 0x8000_0000,
        len: 0x8000_0000,
    }),
    region: Some(Window {
        base: 0xC000_0000,
        len: 0x4000_0000,
    }),
    uart_pl011: None,
    psci: Some(PsciConduit::Smc),
    placeholders: &["ram", "region", "uart_pl011", "psci"],
};

/// A host process (the std runner): the region is a mapped file, the instruction is
/// detected by CPUID / HWCAP, cores come from the OS. Nothing here is a guess.
pub const HOST: Platform = Platform {
    name: "host",
    cache_line: dinomo_shared::CACHE_LINE,
    flush: None,
    cores: None,
    ram: None,
    region: None,
    uart_pl011: None,
    psci: None,
    placeholders: &[],
};

impl Platform {
    /// Every known profile.
    pub const ALL: [&'static Platform; 4] = [&QEMU_VIRT, &BLUEFIELD_2, &BLUEFIELD_3, &HOST];

    /// The profile called `name` (as in `DINOMO_PLATFORM`).
    pub fn by_name(name: &str) -> Option<&'static Platform> {
        Self::ALL.iter().copied().find(|p| p.name == name)
    }

    /// The write-back instruction to use: the profile's, else the detected one.
    pub fn flush_kind(&self) -> FlushKind {
        match self.flush {
            Some(k) => k,
            None => crate::persist::flush_kind(),
        }
    }

    /// Whether every value of the profile is confirmed.
    pub const fn is_confirmed(&self) -> bool {
        self.placeholders.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for p in Platform::ALL {
            assert_eq!(Platform::by_name(p.name), Some(p));
            assert_eq!(Platform::ALL.iter().filter(|q| q.name == p.name).count(), 1);
        }
        assert_eq!(Platform::by_name("nope"), None);
    }

    #[test]
    fn windows_are_consistent() {
        for p in Platform::ALL {
            assert!(p.cache_line.is_power_of_two());
            assert_eq!(p.cache_line, dinomo_shared::CACHE_LINE, "{}", p.name);
            if let (Some(ram), Some(region)) = (p.ram, p.region) {
                // The region may lie inside RAM (QEMU) or next to it, never overlap partly.
                let overlaps = region.base < ram.end() && ram.base < region.end();
                assert!(!overlaps || ram.contains(&region), "{}", p.name);
                assert_eq!(region.base % 4096, 0, "{}", p.name);
            }
            for f in p.placeholders {
                assert!(
                    ["ram", "region", "uart_pl011", "psci", "cores", "flush"].contains(f),
                    "{}: unknown field {f}",
                    p.name
                );
            }
        }
        assert!(QEMU_VIRT.is_confirmed());
        assert!(!BLUEFIELD_2.is_confirmed());
    }

    #[test]
    fn host_flush_kind_is_detected() {
        assert_eq!(HOST.flush_kind(), crate::persist::flush_kind());
        assert_eq!(BLUEFIELD_3.flush_kind(), FlushKind::DcCvap);
    }
}
