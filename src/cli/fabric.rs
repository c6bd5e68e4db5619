//! The fabric options every role and tool shares; they become a [`DpmSpec`] or a
//! [`ServeSpec`], which `dinomo_hw::fabric::connect` parses and opens.

use std::net::SocketAddr;

use clap::Args;
use dinomo_hw::fabric::connect::{parse_kind, DEFAULT_VERBS_PORT};
use dinomo_hw::fabric::{DpmSpec, FabricKind, ServeSpec, VerbsDevice};

use super::Usage;

/// The RDMA device settings of `--fabric verbs`.
#[derive(Args, Debug, Clone)]
pub(crate) struct DeviceArgs {
    /// RDMA device for --fabric verbs (default: the first one found).
    #[arg(long)]
    pub device: Option<String>,
    /// GID index for --fabric verbs (default: the port's RoCE v2 entry of the interface's
    /// IPv4 address, or 0 on InfiniBand; `ibv_devinfo -v` lists the table).
    #[arg(long)]
    pub gid_index: Option<u8>,
}

impl DeviceArgs {
    pub fn device(&self) -> VerbsDevice {
        VerbsDevice {
            name: self.device.clone(),
            gid_index: self.gid_index,
        }
    }
}

/// Which DPM, over which fabric: what a KN and the manager need to reach it.
#[derive(Args, Debug, Clone)]
pub(crate) struct DpmArgs {
    /// Fabric to reach the DPM through: shm (the region file on this host) or verbs (RDMA,
    /// any host; needs a build with `--features rdma`).
    #[arg(long, default_value = "shm", value_parser = parse_kind)]
    pub fabric: FabricKind,
    /// The DPM: for --fabric shm its region file (the control file is next to it); for
    /// --fabric verbs its HOST:PORT.
    #[arg(long)]
    pub dpm: String,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl DpmArgs {
    pub fn spec(&self) -> Result<DpmSpec, Usage> {
        DpmSpec::parse(self.fabric, &self.dpm, self.device.device()).map_err(|e| Usage(e.0))
    }
}

/// How `dinomo dpm serve` serves its region.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServeFabricArgs {
    /// Fabric KNs and the manager reach the region through: shm, or verbs (which also
    /// serves the shm control file).
    #[arg(long, default_value = "shm", value_parser = parse_kind)]
    pub fabric: FabricKind,
    /// Address of the verbs connection exchange (TCP). The default accepts only this host;
    /// give the address of the interface other hosts reach (which needs --secret-file: the
    /// handshake hands out remote access to the whole region).
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_VERBS_PORT)))]
    pub listen: SocketAddr,
    /// Port of the verbs connection exchange (sets the port of --listen).
    #[arg(long)]
    pub port: Option<u16>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl ServeFabricArgs {
    pub fn spec(&self) -> Result<ServeSpec, Usage> {
        let mut listen = self.listen;
        if let Some(p) = self.port {
            listen.set_port(p);
        }
        ServeSpec::parse(self.fabric, listen, self.device.device()).map_err(|e| Usage(e.0))
    }
}
