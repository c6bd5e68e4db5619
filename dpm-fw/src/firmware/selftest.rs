//! The image's self-test: play a few KVS nodes writing logs into the region, merge them,
//! look every key up, then recover the region from scratch and look again.
//!
//! It drives the same paths a deployment does — `OpenLog`/`AllocBlock` control requests,
//! entries encoded with each block's salt, one write + persist per batch, sealing full
//! blocks, the merger, recovery — with the flush instruction of the platform it runs on.

use alloc::format;
use alloc::vec::Vec;
use core::fmt;

use dinomo_hw::{Persist, Pmem};
use dinomo_shared::geometry::FormatParams;

use crate::dpm::{Dpm, Scratch};
use crate::logwriter::LogWriter;

/// Logs written (one per simulated KVS node).
pub const LOGS: u32 = 3;
/// Distinct keys per log.
pub const KEYS_PER_LOG: u32 = 400;
/// Operations per batch (one write + persist each).
pub const BATCH: u32 = 32;
/// Log-block size: small, so that every log fills and seals several blocks.
pub const BLOCK_SIZE: u64 = 64 << 10;

/// Checks one run makes: every key of every log plus each log's merged seq, once after
/// merging and once after recovery.
pub const fn expected_checks() -> u64 {
    2 * LOGS as u64 * (KEYS_PER_LOG as u64 + 1)
}

/// Pass/fail counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub passed: u64,
    pub failed: u64,
}

impl Report {
    /// Counts one check.
    pub fn check(&mut self, ok: bool) -> bool {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        ok
    }
    /// Every check ran and passed.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.passed == expected_checks()
    }
}

/// The line the image prints and the QEMU test looks for.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dpm-fw selftest: {} passed, {} failed",
            self.passed, self.failed
        )
    }
}

fn key(log: u32, i: u32) -> Vec<u8> {
    format!("fw-{log}-{i:05}").into_bytes()
}

/// Value of version `ver` of key `i` of `log`: lengths 1..=500 so batches straddle blocks.
fn value(log: u32, i: u32, ver: u32) -> Vec<u8> {
    let len = 1 + (i as usize * 37 + ver as usize * 11) % 500;
    (0..len)
        .map(|j| (log as usize * 31 + i as usize * 7 + ver as usize * 3 + j) as u8)
        .collect()
}

/// What the index must hold for key `i` after the workload: deleted every 7th key, second
/// version of every 3rd, first version otherwise.
fn expected(log: u32, i: u32) -> Option<Vec<u8>> {
    if i % 7 == 3 {
        None
    } else if i % 3 == 0 {
        Some(value(log, i, 2))
    } else {
        Some(value(log, i, 1))
    }
}

/// The format parameters the self-test uses for a region of `len` bytes.
pub fn params(len: u64) -> FormatParams {
    FormatParams {
        block_size: BLOCK_SIZE,
        max_logs: 16,
        max_kns: 8,
        ..FormatParams::for_size(len)
    }
}

/// Writes every log's workload; returns each log's (id, durable seq).
fn write_logs<P: Persist>(dpm: &Dpm<P>, out: &mut dyn fmt::Write) -> Option<Vec<(u32, u64)>> {
    let mut logs = Vec::new();
    for l in 0..LOGS {
        let mut w = match LogWriter::open(dpm, 100 + l, l) {
            Ok(w) => w,
            Err(e) => {
                let _ = writeln!(out, "selftest: OpenLog for log {l} failed: {e:?}");
                return None;
            }
        };
        let mut ops = 0;
        let mut flush = |w: &mut LogWriter, ops: &mut u32, force: bool| -> bool {
            *ops += 1;
            if *ops % BATCH != 0 && !force {
                return true;
            }
            match w.flush(dpm) {
                Ok(_) => true,
                Err(e) => {
                    let _ = writeln!(out, "selftest: flushing log {l} failed: {e:?}");
                    false
                }
            }
        };
        for i in 0..KEYS_PER_LOG {
            w.put(&key(l, i), &value(l, i, 1));
            if !flush(&mut w, &mut ops, false) {
                return None;
            }
        }
        for i in 0..KEYS_PER_LOG {
            if i % 3 == 0 {
                w.put(&key(l, i), &value(l, i, 2));
            }
            if i % 7 == 3 {
                w.delete(&key(l, i));
            }
            if !flush(&mut w, &mut ops, i + 1 == KEYS_PER_LOG) {
                return None;
            }
        }
        let _ = writeln!(
            out,
            "selftest: log {} written: seqs 1..={}",
            w.log_id, w.durable_seq
        );
        logs.push((w.log_id, w.durable_seq));
    }
    Some(logs)
}

/// Looks every key up and checks each log's merged seq.
fn verify<P: Persist>(
    dpm: &Dpm<P>,
    logs: &[(u32, u64)],
    merged: &[u64],
    report: &mut Report,
    phase: &str,
    out: &mut dyn fmt::Write,
) {
    for (l, &(log_id, durable)) in (0..LOGS).zip(logs) {
        let seq = merged.get(l as usize).copied().unwrap_or(0);
        if !report.check(seq == durable) {
            let _ = writeln!(
                out,
                "selftest: {phase}: log {log_id} merged to seq {seq}, wrote {durable}"
            );
        }
        for i in 0..KEYS_PER_LOG {
            let got = dpm.get(&key(l, i));
            if !report.check(got == expected(l, i)) {
                let _ = writeln!(
                    out,
                    "selftest: {phase}: key fw-{l}-{i:05}: got {:?} bytes, want {:?}",
                    got.map(|v| v.len()),
                    expected(l, i).map(|v| v.len())
                );
            }
        }
    }
}

/// Runs the self-test on the `len` bytes at `base`, formatting them first. Progress and any
/// failure go to `out`; the returned report counts every check (a setup step that fails
/// counts as one failure, and the checks it prevented are not counted as passed).
///
/// # Safety
/// As [`Pmem::new`], for the whole run: `base` is 64-byte aligned, valid for `len` bytes,
/// and nothing else uses that memory meanwhile.
pub unsafe fn run<P: Persist + Clone>(
    base: *mut u8,
    len: u64,
    persist: P,
    out: &mut dyn fmt::Write,
) -> Report {
    let mut report = Report::default();
    // Start from blank memory whatever was there, so the run is reproducible.
    // SAFETY: forwarded from the caller.
    let pm = unsafe { Pmem::new(base, len, persist.clone()) };
    pm.fill(0, 4096u64.min(len), 0);
    let dpm = match Dpm::format(pm, &params(len), 0xF1F0) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(out, "selftest: format failed: {e}");
            report.check(false);
            return report;
        }
    };
    let geo = *dpm.geometry();
    let _ = writeln!(
        out,
        "selftest: formatted {} KiB: {} blocks of {} KiB, index {} KiB",
        len >> 10,
        geo.n_blocks,
        geo.block_size >> 10,
        geo.index_len >> 10,
    );
    let Some(logs) = write_logs(&dpm, out) else {
        report.check(false);
        return report;
    };
    let mut scratch = Scratch::default();
    let merged: Vec<u64> = logs
        .iter()
        .map(|&(id, _)| dpm.merge_all(id, &mut scratch).unwrap_or(0))
        .collect();
    verify(&dpm, &logs, &merged, &mut report, "merged", out);
    drop(dpm);

    // Recovery: open the region as after a power cycle; it replays nothing new but must
    // rebuild everything volatile and find the same index.
    // SAFETY: forwarded from the caller; the previous `Pmem` was dropped with `dpm`.
    let pm = unsafe { Pmem::new(base, len, persist) };
    let dpm = match Dpm::open(pm) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(out, "selftest: recovery failed: {e}");
            report.check(false);
            return report;
        }
    };
    let stats = dpm.stats();
    let merged: Vec<u64> = logs
        .iter()
        .map(|&(id, _)| {
            stats
                .logs
                .iter()
                .find(|s| s.log_id == id)
                .map_or(0, |s| s.merged_seq)
        })
        .collect();
    let blocks: u64 = stats.logs.iter().map(|s| s.blocks).sum();
    let _ = writeln!(
        out,
        "selftest: recovered: {} logs, {blocks} blocks in chains, {} live entries",
        stats.logs.len(),
        stats.live_entries
    );
    verify(&dpm, &logs, &merged, &mut report, "recovered", out);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinomo_hw::NoPersist;

    #[repr(C, align(64))]
    struct Line([u8; 64]);

    #[test]
    fn selftest_passes_on_the_host_with_the_expected_count() {
        let len = 4u64 << 20;
        let mut mem: Vec<Line> = (0..len / 64).map(|_| Line([0xA5; 64])).collect();
        let mut log = String::new();
        // SAFETY: `mem` is 64-aligned, `len` bytes, and used by nothing else during the run.
        let report = unsafe { run(mem.as_mut_ptr().cast(), len, NoPersist, &mut log) };
        assert!(report.ok(), "{report}\n{log}");
        assert_eq!(report.passed, expected_checks());
        assert_eq!(
            report.to_string(),
            format!("dpm-fw selftest: {} passed, 0 failed", expected_checks())
        );
        assert!(log.contains("log 0 written"), "{log}");
    }

    #[test]
    fn a_region_too_small_is_reported_as_a_failure() {
        let len = 64u64 << 10;
        let mut mem: Vec<Line> = (0..len / 64).map(|_| Line([0; 64])).collect();
        let mut log = String::new();
        // SAFETY: as above.
        let report = unsafe { run(mem.as_mut_ptr().cast(), len, NoPersist, &mut log) };
        assert_eq!(
            report,
            Report {
                passed: 0,
                failed: 1
            }
        );
        assert!(!report.ok());
        assert!(log.contains("format failed"), "{log}");
    }

    #[test]
    fn workload_expectations_cover_puts_overwrites_and_deletes() {
        let all: Vec<_> = (0..KEYS_PER_LOG).map(|i| expected(0, i)).collect();
        assert!(all.iter().any(Option::is_none));
        assert!((0..KEYS_PER_LOG).any(|i| expected(0, i) == Some(value(0, i, 2))));
        assert!((0..KEYS_PER_LOG).any(|i| expected(0, i) == Some(value(0, i, 1))));
        // Deleted keys whose second version was written before the delete stay deleted.
        assert!((0..KEYS_PER_LOG).any(|i| i % 3 == 0 && i % 7 == 3));
    }
}
