//! `dinomo up`: a whole local cluster (see `dinomo::up`).

use std::path::PathBuf;

use clap::Args;
use dinomo::up::{UpConfig, UpError};

use super::{install_stop_handler, Usage, STOP};

#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    /// KVS nodes to start.
    #[arg(long)]
    kns: Option<u16>,
    /// TOML file with any of the settings below (flags win over it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder for the region file.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Region size, e.g. 1G.
    #[arg(long)]
    region_size: Option<String>,
    /// Format a new region even if one exists.
    #[arg(long)]
    fresh: bool,
    /// Manager port.
    #[arg(long)]
    manager_port: Option<u16>,
    /// KN i listens on base-port + i.
    #[arg(long)]
    base_port: Option<u16>,
    /// Shards per KN.
    #[arg(long)]
    threads: Option<u16>,
    /// Lease length in milliseconds.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Run the elasticity policy in the manager (adds and removes KNs by load).
    #[arg(long)]
    policy: bool,
    /// Fabric the KNs and the manager reach the DPM through: shm or verbs.
    #[arg(long)]
    fabric: Option<String>,
    /// RDMA device for --fabric verbs (default: the first one found).
    #[arg(long)]
    device: Option<String>,
    /// GID index for --fabric verbs (default: the port's RoCE v2 entry of the interface's
    /// IPv4 address; index 0 on InfiniBand).
    #[arg(long)]
    gid_index: Option<u8>,
    /// Password of the default Redis user (default: generated at the first start and kept
    /// in DIR/requirepass, mode 0600). A password on a command line is visible to other
    /// local users in the process list: prefer `requirepass` in the TOML file.
    #[arg(long, conflicts_with = "no_auth")]
    requirepass: Option<String>,
    /// No authentication anywhere (no cluster secret, no Redis password); refused unless
    /// every address is loopback. For local experiments.
    #[arg(long)]
    no_auth: bool,
    /// Start nothing: make the cluster secret and password (with authentication) and print
    /// the command for each host, the files to copy and the ports to open. With a `[hosts]`
    /// table in --config (a cluster spread over hosts) this is how `up` is used.
    #[arg(long)]
    plan: bool,
}

/// The plan of `cfg`, after making its folder and credentials (the plan names them).
fn plan(cfg: &UpConfig) -> Result<String, UpError> {
    let text = dinomo::up::plan(cfg)?;
    if cfg.auth {
        dinomo_hw::region_file::ensure_private_dir(&cfg.dir)
            .map_err(|e| UpError::Failed(format!("cluster folder: {e}")))?;
        cfg.prepare_auth()?;
    }
    Ok(text)
}

pub(crate) fn run(a: UpArgs) -> anyhow::Result<()> {
    let mut cfg = match &a.config {
        Some(p) => UpConfig::load(p).map_err(|e| Usage(e.to_string()))?,
        None => UpConfig::default(),
    };
    if let Some(v) = a.kns {
        cfg.kns = v;
    }
    if let Some(v) = a.dir {
        cfg.dir = v;
    }
    if let Some(v) = a.region_size {
        cfg.region_size = v;
    }
    cfg.fresh |= a.fresh;
    cfg.policy |= a.policy;
    if let Some(v) = a.manager_port {
        cfg.manager_port = v;
    }
    if let Some(v) = a.base_port {
        cfg.base_port = v;
    }
    if let Some(v) = a.threads {
        cfg.threads = v;
    }
    if let Some(v) = a.lease_ms {
        cfg.lease_ms = v;
    }
    if let Some(v) = a.fabric {
        cfg.fabric = v;
    }
    if a.device.is_some() {
        cfg.device = a.device;
    }
    if a.gid_index.is_some() {
        cfg.gid_index = a.gid_index;
    }
    if a.requirepass.is_some() {
        cfg.requirepass = a.requirepass;
    }
    if a.no_auth {
        cfg.auth = false;
    }
    if a.plan {
        return match plan(&cfg) {
            Err(UpError::Invalid(m)) => Err(Usage(m).into()),
            r => {
                print!("{}", r?);
                Ok(())
            }
        };
    }
    install_stop_handler()?;
    match dinomo::up::run(&cfg, &STOP) {
        Err(UpError::Invalid(m)) => Err(Usage(m).into()),
        r => Ok(r?),
    }
}
