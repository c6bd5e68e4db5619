//! `dinomo torture`: the crash torture of a process cluster (see `dinomo::torture`).

use std::path::PathBuf;

use clap::Args;

use super::{install_stop_handler, JsonOut, Usage, STOP};

#[derive(Args, Debug)]
pub(crate) struct TortureArgs {
    /// Rounds (one kill each).
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Seed of the kill schedule and the load.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// KVS nodes.
    #[arg(long, default_value_t = 2)]
    kns: u16,
    /// Keys of the load.
    #[arg(long, default_value_t = 256)]
    keys: u64,
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Load time of a round in milliseconds (the kill falls inside it).
    #[arg(long, default_value_t = 1500)]
    round_ms: u64,
    /// No round starts after this long, e.g. 9m, 90s, 1h.
    #[arg(long, default_value = "9m", value_parser = dinomo::duration::parse_duration)]
    time_limit: std::time::Duration,
    /// Lease length in milliseconds.
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// How long the cluster may take to serve every slot again (at the start and after each
    /// kill) before the run fails, e.g. 3m; a slow host needs more.
    #[arg(long, default_value = "3m", value_parser = dinomo::duration::parse_duration)]
    recovery_limit: std::time::Duration,
    /// Working folder (default: a new one in /dev/shm or the temp dir, removed after a
    /// passing run).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Roles to kill, e.g. dpm,manager,kn.
    #[arg(long, default_value = "dpm,manager,kn", value_parser = dinomo::torture::Role::parse_list)]
    roles: RoleList,
    /// Do not fill the region to its limit in the last round (by default the last round
    /// writes new keys until they are refused with -OOM and kills its process while the
    /// region is full; every acknowledged fill write must read back, every refused one
    /// must be absent).
    #[arg(long)]
    no_fill: bool,
    /// Region size, e.g. 512M (1 MiB log blocks).
    #[arg(long, default_value = "512M", value_parser = dinomo::size::parse_size)]
    region_size: u64,
    /// Fabric the KNs and the manager reach the DPM through: shm, or verbs (RDMA; needs a
    /// build with `--features rdma`; the DPM listens on a free loopback port).
    #[arg(long, default_value = "shm", value_parser = ["shm", "verbs"])]
    fabric: String,
    #[command(flatten)]
    device: super::fabric::DeviceArgs,
}

type RoleList = Vec<dinomo::torture::Role>;

pub(crate) fn run(a: TortureArgs) -> anyhow::Result<()> {
    use dinomo::torture::{TortureConfig, TortureError};
    use std::io::IsTerminal;
    let cfg = TortureConfig {
        rounds: a.rounds,
        seed: a.seed,
        kns: a.kns,
        keys: a.keys,
        clients: a.clients,
        round: std::time::Duration::from_millis(a.round_ms),
        time_limit: a.time_limit,
        lease_ms: a.lease_ms,
        dir: a.dir,
        roles: a.roles,
        fill: !a.no_fill,
        region_size: a.region_size.to_string(),
        fabric: a.fabric,
        device: a.device.device,
        gid_index: a.device.gid_index,
        recovery_limit: a.recovery_limit,
    };
    let json = JsonOut::check(a.json.as_deref())?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(u64::from(cfg.rounds));
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rounds {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    install_stop_handler()?;
    let r = dinomo::torture::run(&cfg, &STOP, |done, line| match &bar {
        Some(b) => {
            b.set_position(u64::from(done));
            b.set_message(line.to_string());
        }
        None => eprintln!("{line}"),
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let r = match r {
        Err(TortureError::Invalid(m)) => return json.on_error(Err(Usage(m).into())),
        r => json.on_error(r.map_err(anyhow::Error::from))?,
    };
    print!("{}", dinomo::torture::render(&r));
    json.write(&r)?;
    if r.violations > 0 {
        anyhow::bail!("{} violations", r.violations);
    }
    Ok(())
}
