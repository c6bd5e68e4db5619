//! `dinomo soak`: the bounded-space soak (see `dinomo::soak`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use dinomo::size::{human, parse_size};

use super::Usage;

#[derive(Args, Debug)]
pub(crate) struct SoakArgs {
    /// Region size, e.g. 32M.
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    region_size: u64,
    /// Log block size, e.g. 64K.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    block_size: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 20_000)]
    keys: u64,
    /// Bytes of entries to write, as a multiple of the region's log capacity.
    #[arg(long, default_value_t = 20.0)]
    write_factor: f64,
    /// Zipfian skew of the updates (0 < s < 1, e.g. 0.99); uniform without it.
    #[arg(long)]
    zipf: Option<f64>,
    /// Value size in bytes.
    #[arg(long, value_parser = parse_size, default_value = "256")]
    value_size: u64,
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Compaction victim threshold: live share of a block, in percent.
    #[arg(long)]
    live_pct: Option<u32>,
    /// Also write the samples and summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) fn run(a: &SoakArgs) -> anyhow::Result<()> {
    use dinomo::soak::{self, SoakConfig};
    use std::io::IsTerminal;
    let cfg = SoakConfig {
        region_bytes: a.region_size,
        block_size: a.block_size,
        keys: a.keys,
        write_factor: a.write_factor,
        zipf: a.zipf,
        value_bytes: usize::try_from(a.value_size).context("value size")?,
        threads: a.threads,
        live_pct: a.live_pct,
        ..SoakConfig::default()
    };
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template("soak [{bar:40}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    cfg.validate().map_err(|e| Usage(e.to_string()))?;
    let mut header = false;
    let report = soak::run(&cfg, |s| {
        if !std::mem::replace(&mut header, true) {
            bar.suspend(|| {
                println!(
                    "{:>8} {:>10} {:>7}  blocks / live share / compaction (entries, bytes, blocks freed, compare failures)",
                    "time", "written", "x cap"
                )
            });
        }
        bar.set_position((s.capacity_multiple / cfg.write_factor * 1000.0).min(1000.0) as u64);
        bar.set_message(format!(
            "{:.1}x  used {}",
            s.capacity_multiple, s.blocks_used
        ));
        bar.suspend(|| println!("{}", soak::render_sample(s)));
    });
    bar.finish_and_clear();
    let report = report?;
    println!(
        "{} blocks ({} log capacity), low watermark {}; peak used: warm-up {}, then {} (first half {}, second half {}); {} puts in {:.1}s",
        report.n_blocks,
        human(report.log_capacity),
        report.low_watermark,
        report.peak_used_warmup,
        report.peak_used_after,
        report.peak_used_first_half,
        report.peak_used_second_half,
        report.puts,
        report.elapsed_secs
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "settled (merged, compacted): {} blocks used, bound {}",
        report.settled_used, report.settled_bound
    );
    if report.settled_used > report.settled_bound {
        anyhow::bail!(
            "{} blocks still used after compacting everything, more than the bound {}",
            report.settled_used,
            report.settled_bound
        );
    }
    if report.still_growing() {
        anyhow::bail!(
            "the footprint kept growing: {} blocks in the first half after the warm-up, {} in the second",
            report.peak_used_first_half,
            report.peak_used_second_half
        );
    }
    Ok(())
}
