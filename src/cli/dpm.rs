//! `dinomo dpm format | serve | inspect`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use dinomo::size::{human, parse_size};
use dinomo_hw::fabric::ServeSpec;
use dinomo_hw::region_file::RegionFile;
use dinomo_shared::geometry::{FormatParams, Geometry};

use super::fabric::ServeFabricArgs;
use super::secret::SecretArgs;
use super::{install_stop_handler, Usage, STOP};

#[derive(Subcommand, Debug)]
pub(crate) enum DpmCommand {
    /// Create and format a new region file.
    Format(FormatArgs),
    /// Serve a region: recover it, merge KN logs into the index, answer control messages.
    Serve(ServeArgs),
    /// Show a region's layout, space, logs and index without changing it.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub(crate) struct FormatArgs {
    /// Region file to create (refused if it exists, unless --force).
    #[arg(long)]
    path: PathBuf,
    /// Region size, e.g. 1G, 512M.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Log block size (power of two, 4K..1G); default 8M, smaller for small regions.
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Logs (KN shards) the region can hold at once.
    #[arg(long, default_value_t = dinomo_shared::geometry::DEFAULT_MAX_LOGS)]
    max_logs: u32,
    /// KN leases the region can hold.
    #[arg(long, default_value_t = dinomo_shared::geometry::DEFAULT_MAX_KNS)]
    max_kns: u32,
    /// Share of the region given to the index, in percent.
    #[arg(long, default_value_t = dinomo_shared::geometry::DEFAULT_INDEX_PERCENT)]
    index_percent: u32,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Region file (made with `dinomo dpm format`).
    #[arg(long)]
    path: PathBuf,
    /// Merge worker threads.
    #[arg(long, default_value_t = default_workers())]
    workers: usize,
    /// Do not pin threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// Control file KNs connect to (default: the region path with `.ctl` appended).
    #[arg(long)]
    ctl: Option<PathBuf>,
    /// Control connections accepted at once.
    #[arg(long, default_value_t = 64)]
    ctl_slots: u32,
    #[command(flatten)]
    fabric: ServeFabricArgs,
    #[command(flatten)]
    secret: SecretArgs,
}

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// Region file.
    #[arg(long)]
    path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Inspect twice this far apart (e.g. 1s, 500ms) and add the compaction rate between
    /// the two samples; without it, totals only.
    #[arg(long, value_parser = dinomo::duration::parse_interval)]
    interval: Option<std::time::Duration>,
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .clamp(1, 3)
}

pub(crate) fn run(c: DpmCommand) -> anyhow::Result<()> {
    match c {
        DpmCommand::Format(a) => format(a),
        DpmCommand::Serve(a) => serve(a),
        DpmCommand::Inspect(a) => inspect(&a),
    }
}

fn inspect(a: &InspectArgs) -> anyhow::Result<()> {
    let mut report = dinomo::inspect::inspect(&a.path)?;
    if let Some(interval) = a.interval {
        std::thread::sleep(interval);
        let later = dinomo::inspect::inspect(&a.path)?;
        report = dinomo::inspect::with_rate(&report, later, interval);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", dinomo::inspect::render(&report));
    }
    Ok(())
}

fn format(a: FormatArgs) -> anyhow::Result<()> {
    let mut p = FormatParams::for_size(a.size);
    if let Some(b) = a.block_size {
        p.block_size = b;
    }
    p.max_logs = a.max_logs;
    p.max_kns = a.max_kns;
    p.index_percent = a.index_percent;
    // Validate everything before touching the file system.
    let geo = Geometry::compute(&p).map_err(|e| Usage(e.to_string()))?;
    if a.size % 8 != 0 {
        return Err(Usage(format!("--size {} is not a multiple of 8 bytes", a.size)).into());
    }
    if a.force {
        // A region that cannot fit is refused before the old one is removed.
        let dir = dinomo_hw::region_file::parent_dir(&a.path);
        dinomo_hw::region_file::check_private_dir(dir)?;
        let free = dinomo_hw::region_file::space_for(dir, Some(&a.path))?;
        if a.size > free {
            return Err(dinomo_hw::region_file::RegionFileError::NoSpace {
                path: a.path.clone(),
                need: a.size,
                free,
            }
            .into());
        }
        dinomo_hw::region_file::remove_unserved(&a.path)?;
    }
    let file = RegionFile::create(&a.path, a.size)?;
    let region_id = random_id();
    let formatted = dpm_fw::region::format(&file.pmem(), &p, region_id);
    if let Err(e) = formatted {
        drop(file);
        let _ = std::fs::remove_file(&a.path);
        anyhow::bail!("cannot format {}: {e}", a.path.display());
    }
    file.sync()
        .with_context(|| format!("cannot sync {}", a.path.display()))?;
    println!(
        "formatted {}: {} region, {} log blocks of {}, index {}, {} logs, id {region_id:016x}",
        a.path.display(),
        human(geo.region_size),
        geo.n_blocks,
        human(geo.block_size),
        human(geo.index_len),
        geo.max_logs
    );
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.workers == 0 || a.workers > 256 {
        return Err(Usage(format!("--workers {} is outside 1..=256", a.workers)).into());
    }
    if a.ctl_slots == 0 {
        return Err(Usage("--ctl-slots must be at least 1".into()).into());
    }
    let spec = a.fabric.spec()?;
    let secret = a.secret.load()?;
    if let ServeSpec::Verbs { listen, .. } = &spec {
        dinomo_hw::fabric::connect::check_listen(*listen, secret.as_ref())
            .map_err(|e| Usage(e.to_string()))?;
    }
    install_stop_handler()?;
    let cfg = dpm_fw::runner::ServeConfig {
        workers: a.workers,
        pin: !a.no_pin,
        ctl_slots: a.ctl_slots,
        ctl_path: a.ctl,
        ..Default::default()
    };
    let report = match spec {
        ServeSpec::Shm => dpm_fw::runner::serve(&a.path, &cfg, &STOP)?,
        ServeSpec::Verbs { listen, device } => serve_verbs(&cfg, &a.path, listen, device, secret)?,
    };
    eprintln!(
        "dpm stopped cleanly: recovered in {:.1} ms, merged {} entries, {} control messages, up {:.1} s",
        report.recovery_time.as_secs_f64() * 1e3,
        report.entries_merged,
        report.control_messages,
        report.uptime.as_secs_f64()
    );
    Ok(())
}

/// `dpm serve --fabric verbs`.
#[cfg(feature = "rdma")]
fn serve_verbs(
    cfg: &dpm_fw::runner::ServeConfig,
    path: &std::path::Path,
    listen: std::net::SocketAddr,
    device: dinomo_hw::fabric::VerbsDevice,
    secret: Option<dinomo_shared::auth::ClusterSecret>,
) -> anyhow::Result<dpm_fw::runner::ServeReport> {
    let vcfg = dpm_fw::runner::VerbsServeConfig {
        device: device.name,
        listen,
        verbs: dinomo_hw::fabric::verbs::VerbsConfig {
            gid_index: device.gid_index,
            secret,
            ..Default::default()
        },
    };
    Ok(dpm_fw::runner::serve_verbs(path, cfg, &vcfg, &STOP)?)
}

#[cfg(not(feature = "rdma"))]
fn serve_verbs(
    _: &dpm_fw::runner::ServeConfig,
    _: &std::path::Path,
    _: std::net::SocketAddr,
    _: dinomo_hw::fabric::VerbsDevice,
    _: Option<dinomo_shared::auth::ClusterSecret>,
) -> anyhow::Result<dpm_fw::runner::ServeReport> {
    anyhow::bail!("{}", dinomo_hw::fabric::connect::NO_RDMA_SUPPORT)
}

/// A region id unlikely to repeat: time, pid and a stack address, hashed.
fn random_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let marker = 0u8;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&t.to_le_bytes());
    bytes.extend_from_slice(&std::process::id().to_le_bytes());
    bytes.extend_from_slice(&(&marker as *const u8 as usize).to_le_bytes());
    dinomo_shared::hash::key_hash(&bytes)
}
