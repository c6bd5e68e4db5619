//! The fabric the process tests run their cluster over, chosen by one switch: with
//! `DINOMO_RDMA_DEVICE` set (and `DINOMO_RDMA_GID_INDEX`, default 0) the DPM serves verbs on
//! that device and the KNs and the manager reach it over verbs; otherwise everything goes
//! through the region file (shm), as on any machine without RDMA. The binary must be built
//! with `--features rdma` for the verbs case.
//!
//! Over verbs the tests are meant to run on soft-RoCE inside a small VM, where CPU work is
//! several times slower than on the host: [`scaled`] stretches timeouts and [`lease_ms`]
//! leases there, so that a KN is not fenced merely because the emulated machine was slow.

use std::net::TcpListener;
use std::time::Duration;

/// The RDMA device and GID index of the verbs switch.
#[derive(Clone, Debug)]
pub struct Verbs {
    pub device: String,
    pub gid_index: String,
}

/// The verbs switch: `Some` when `DINOMO_RDMA_DEVICE` names a device.
pub fn verbs() -> Option<Verbs> {
    let device = std::env::var("DINOMO_RDMA_DEVICE")
        .ok()
        .filter(|d| !d.is_empty())?;
    let gid_index = std::env::var("DINOMO_RDMA_GID_INDEX").unwrap_or_else(|_| "0".into());
    Some(Verbs { device, gid_index })
}

/// How much slower than the host the verbs runs are allowed to be (leases, reply timeouts).
pub const VERBS_SLOWDOWN: u32 = 10;

/// `d` as it applies to this run: as given over shm, [`VERBS_SLOWDOWN`] times longer over
/// verbs.
pub fn scaled(d: Duration) -> Duration {
    if verbs().is_some() {
        d * VERBS_SLOWDOWN
    } else {
        d
    }
}

/// How much longer leases are over verbs. More than [`VERBS_SLOWDOWN`]: in the VM a map
/// change of a few KNs takes the manager tens of seconds of control round trips, and a KN
/// whose lease lapses meanwhile is fenced although nothing failed.
pub const VERBS_LEASE_FACTOR: u64 = 50;

/// A lease of `ms` milliseconds as it applies to this run (see [`VERBS_LEASE_FACTOR`]), as
/// a flag value.
pub fn lease_ms(ms: u64) -> String {
    if verbs().is_some() {
        (ms * VERBS_LEASE_FACTOR).to_string()
    } else {
        ms.to_string()
    }
}

/// How the processes of one cluster reach its DPM: its region file, and over verbs the
/// loopback port its connection exchange listens on (the same across a restart of the DPM).
#[derive(Clone, Debug)]
pub struct Dpm {
    pub region: String,
    verbs: Option<(Verbs, u16)>,
}

impl Dpm {
    /// The DPM of `region` over the fabric the switch names (a free port for verbs).
    pub fn new(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            verbs: verbs().map(|v| (v, free_port())),
        }
    }

    /// The DPM of `region` over shm, whatever the switch says.
    pub fn shm(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            verbs: None,
        }
    }

    pub fn is_verbs(&self) -> bool {
        self.verbs.is_some()
    }

    /// The words `dinomo dpm serve --path REGION` needs besides: none over shm;
    /// `--fabric verbs --device D --gid-index G --listen 127.0.0.1:PORT` over verbs.
    pub fn serve_args(&self) -> Vec<String> {
        match &self.verbs {
            None => Vec::new(),
            Some((v, port)) => [
                "--fabric",
                "verbs",
                "--device",
                &v.device,
                "--gid-index",
                &v.gid_index,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// The words that name the DPM to a KN or the manager: `--dpm REGION` over shm;
    /// `--fabric verbs --dpm 127.0.0.1:PORT --device D --gid-index G` over verbs.
    pub fn args(&self) -> Vec<String> {
        match &self.verbs {
            None => vec!["--dpm".into(), self.region.clone()],
            Some((v, port)) => [
                "--fabric",
                "verbs",
                "--dpm",
                &format!("127.0.0.1:{port}"),
                "--device",
                &v.device,
                "--gid-index",
                &v.gid_index,
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// `dinomo dpm serve` of this DPM with one merge worker, unpinned, plus `extra`.
    pub fn serve_cmd(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["dpm", "serve", "--path", &self.region]
            .map(String::from)
            .to_vec();
        a.extend(self.serve_args());
        a.extend(["--workers", "1", "--no-pin"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `&[String]` as `&[&str]` for the spawn helpers.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
