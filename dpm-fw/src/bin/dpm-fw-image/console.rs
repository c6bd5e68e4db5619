//! Console: a PL011 UART where the platform has one at a known address, else nothing.
//!
//! Output is polled (no interrupts) and stateless, so the panic and exception handlers can
//! print whatever state the rest of the image is in.

use core::fmt;

/// PL011 data register.
const DR: usize = 0x00;
/// PL011 flag register; bit 5 = transmit FIFO full.
const FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;

/// Writes to the platform's console.
#[derive(Debug, Clone, Copy)]
pub struct Console {
    base: Option<usize>,
}

impl Console {
    pub const fn new() -> Self {
        Self {
            base: match crate::image::PLATFORM.uart_pl011 {
                Some(b) => Some(b as usize),
                None => None,
            },
        }
    }

    fn put(&self, byte: u8) {
        let Some(base) = self.base else { return };
        // SAFETY: `base` is the PL011 of this platform (from its profile), identity-mapped
        // as device memory; polling FR and writing DR are the documented way to transmit.
        unsafe {
            while core::ptr::read_volatile((base + FR) as *const u32) & FR_TXFF != 0 {
                core::hint::spin_loop();
            }
            core::ptr::write_volatile((base + DR) as *mut u32, u32::from(byte));
        }
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console::new(), $($arg)*);
    }};
}
