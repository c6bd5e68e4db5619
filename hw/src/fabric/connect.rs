//! The one place a fabric is chosen and opened.
//!
//! Every role and tool names the DPM it talks to with a [`DpmSpec`] and the way a DPM
//! serves with a [`ServeSpec`]: a fabric kind plus what that kind needs (shm: the region
//! file; verbs: the DPM's `HOST:PORT`, the device and the GID index). They are parsed here
//! from the command line's words, turned back into those words for child processes
//! ([`DpmSpec::to_args`]), and opened here: [`DpmSpec::connect`] gives a KN shard its
//! [`Connection`], [`DpmSpec::control`] gives the manager a control channel that never maps
//! the region.

use core::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use dinomo_shared::msg::Frame;

use super::ctl::{default_ctl_path, ControlClient, ControlHandle};
use super::nic::{NicModel, NicProfile};
use super::shm::ShmFabric;
use super::{
    Completion, ControlChannel, Fabric, FabricCounters, FabricError, LocalBuf, WorkRequest, WrId,
};
use crate::heap::{HeapPersist, HeapRegion};
use crate::pmem::CpuPersist;
use crate::region_file::FilePersist;

/// The message for `--fabric verbs` in a build without the `rdma` feature.
pub const NO_RDMA_SUPPORT: &str = "this dinomo was built without RDMA support; rebuild with \
`cargo build --release --features rdma` (needs libibverbs-dev, librdmacm-dev, libclang-dev and \
pkg-config), or use `--fabric shm`";

/// The TCP port a DPM serving verbs listens on unless told otherwise (perftest's default).
pub const DEFAULT_VERBS_PORT: u16 = 18515;

/// Which fabric backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FabricKind {
    /// Shared memory: the region file mapped by every process on one host.
    #[default]
    Shm,
    /// RDMA verbs over RC queue pairs (a build with feature `rdma` and a device).
    Verbs,
}

impl FabricKind {
    /// The names `--fabric` takes.
    pub const NAMES: [&'static str; 2] = ["shm", "verbs"];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Shm => "shm",
            Self::Verbs => "verbs",
        }
    }
}

impl fmt::Display for FabricKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FabricKind {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "shm" => Ok(Self::Shm),
            "verbs" => Ok(Self::Verbs),
            _ => Err(SpecError(format!(
                "unknown fabric {s:?}: use one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

/// Parses `--fabric` (for argument parsers that want a `String` error).
pub fn parse_kind(s: &str) -> Result<FabricKind, String> {
    s.parse::<FabricKind>().map_err(|e| e.0)
}

/// A fabric setting that cannot work (a usage error: nothing was opened).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// The RDMA device a verbs connection or server uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerbsDevice {
    /// Device name (`None`: the first device libibverbs lists).
    pub name: Option<String>,
    /// Index in the port's GID table of the source GID; `None`: chosen when the device is
    /// opened (RoCE: the RoCE v2 entry of the interface's IPv4 address; InfiniBand: 0).
    pub gid_index: Option<u8>,
}

impl VerbsDevice {
    /// The command-line words of these settings (`--gid-index` only when one was given, so
    /// a child chooses the same way its parent did).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(i) = self.gid_index {
            a.extend(["--gid-index".into(), i.to_string()]);
        }
        if let Some(d) = &self.name {
            a.extend(["--device".into(), d.clone()]);
        }
        a
    }
}

/// A DPM reached over verbs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerbsSpec {
    /// `HOST:PORT` of the DPM's connection exchange.
    pub addr: String,
    pub device: VerbsDevice,
    /// The cluster secret the handshake proves (never sent); without one only a DPM on a
    /// loopback address is reached. Not part of [`DpmSpec::to_args`]: a child gets the
    /// secret's file through its own `--secret-file`.
    pub secret: Option<dinomo_shared::auth::ClusterSecret>,
    /// The KN the connections speak for ([`DpmSpec::for_kn`]), named in the handshake so the
    /// DPM can revoke them when it fences the KN.
    pub kn_id: Option<u32>,
}

/// A region in this process, served by a memory node in this process (in-process clusters,
/// benchmarks, the baselines).
#[derive(Clone, Debug)]
pub struct LocalDpm {
    pub region: Arc<HeapRegion>,
    pub control: ControlHandle,
    /// When completions may be polled (the fabric can stand in for a network).
    pub nic: NicProfile,
}

/// How to reach a DPM.
#[derive(Clone, Debug)]
pub enum DpmSpec {
    /// A DPM on this host: its region file (mapped by KNs) and its control file.
    Shm {
        region: PathBuf,
        ctl: PathBuf,
        nic: NicProfile,
    },
    /// A DPM on any host, over RDMA verbs.
    Verbs(VerbsSpec),
    /// A DPM in this process.
    Local(LocalDpm),
}

impl DpmSpec {
    /// A DPM as the command line names it: `dpm` is the region file for shm (its control
    /// file is the path with `.ctl` appended) and `HOST:PORT` for verbs.
    pub fn parse(kind: FabricKind, dpm: &str, device: VerbsDevice) -> Result<Self, SpecError> {
        if dpm.trim().is_empty() {
            return Err(SpecError("--dpm is empty".into()));
        }
        match kind {
            FabricKind::Shm => {
                let region = PathBuf::from(dpm);
                Ok(Self::Shm {
                    ctl: default_ctl_path(&region),
                    region,
                    nic: NicProfile::None,
                })
            }
            FabricKind::Verbs => {
                check_host_port(dpm)?;
                Ok(Self::Verbs(VerbsSpec {
                    addr: dpm.to_owned(),
                    device,
                    secret: None,
                    kn_id: None,
                }))
            }
        }
    }

    /// The same DPM, reached with the cluster secret (only the verbs handshake uses it;
    /// shm and in-process DPMs are reached through files and memory of this user).
    pub fn with_secret(mut self, secret: Option<dinomo_shared::auth::ClusterSecret>) -> Self {
        if let Self::Verbs(v) = &mut self {
            v.secret = secret;
        }
        self
    }

    /// The same DPM, reached by KN `kn_id`: its verbs connections name it in their
    /// authenticated handshake, so fencing the KN revokes them (on shm the KN maps the
    /// region itself; there is nothing to revoke).
    pub fn for_kn(mut self, kn_id: u32) -> Self {
        if let Self::Verbs(v) = &mut self {
            v.kn_id = Some(kn_id);
        }
        self
    }

    /// The shm DPM of the region file at `region`.
    pub fn shm(region: impl Into<PathBuf>) -> Self {
        let region = region.into();
        Self::Shm {
            ctl: default_ctl_path(&region),
            region,
            nic: NicProfile::None,
        }
    }

    pub fn kind(&self) -> FabricKind {
        match self {
            Self::Shm { .. } | Self::Local(_) => FabricKind::Shm,
            Self::Verbs(_) => FabricKind::Verbs,
        }
    }

    /// The command-line words that name this DPM (`--fabric K --dpm X`, and the device
    /// settings for verbs), for a child process. A DPM in this process has none.
    pub fn to_args(&self) -> Option<Vec<String>> {
        match self {
            Self::Shm { region, ctl, .. } if *ctl == default_ctl_path(region) => Some(vec![
                "--fabric".into(),
                "shm".into(),
                "--dpm".into(),
                region.to_string_lossy().into_owned(),
            ]),
            Self::Shm { .. } | Self::Local(_) => None,
            Self::Verbs(v) => {
                let mut a = vec![
                    "--fabric".into(),
                    "verbs".into(),
                    "--dpm".into(),
                    v.addr.clone(),
                ];
                a.extend(v.device.to_args());
                Some(a)
            }
        }
    }

    /// A KN shard's connection: one-sided verbs on the region and control frames.
    pub fn connect(&self) -> Result<Connection, FabricError> {
        self.connect_with_queue_depth(super::shm::DEFAULT_QUEUE_DEPTH)
    }

    /// [`DpmSpec::connect`] with room for `depth` outstanding work requests.
    pub fn connect_with_queue_depth(&self, depth: usize) -> Result<Connection, FabricError> {
        let depth = depth.max(1);
        match self {
            Self::Shm { region, ctl, nic } => Ok(Connection::Shm(
                ShmFabric::connect_file(region, ctl, *nic)?.with_queue_depth(depth),
            )),
            Self::Local(l) => {
                let pm = Arc::new(l.region.pmem(CpuPersist::detect()));
                Ok(Connection::Local(
                    ShmFabric::new(pm, l.control.client()?, NicModel::new(l.nic))
                        .with_queue_depth(depth),
                ))
            }
            Self::Verbs(v) => connect_verbs(v, depth).map(Connection::Verbs),
        }
    }

    /// A control channel to the DPM and nothing else: it never maps the region (shm: the
    /// control file only), so a process that holds only this cannot touch the data.
    pub fn control(&self) -> Result<Box<dyn ControlChannel>, FabricError> {
        match self {
            Self::Shm { ctl, .. } => Ok(Box::new(ControlClient::connect(ctl)?)),
            Self::Local(l) => Ok(Box::new(l.control.client()?)),
            Self::Verbs(v) => connect_verbs(v, super::shm::DEFAULT_QUEUE_DEPTH)
                .map(|c| Box::new(Connection::Verbs(c)) as _),
        }
    }
}

impl fmt::Display for DpmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shm { region, .. } => write!(f, "shm:{}", region.display()),
            Self::Verbs(v) => write!(f, "verbs:{}", v.addr),
            Self::Local(_) => f.write_str("local"),
        }
    }
}

/// Calls `attempt` until it succeeds, fails in a way waiting cannot cure, or `timeout`
/// passes: a DPM that is not up yet (or restarting) is waited for; a fabric that cannot
/// work here (no device, no support in this build, a foreign file) is not.
pub fn wait_for_dpm<T>(
    timeout: Duration,
    mut attempt: impl FnMut() -> Result<T, FabricError>,
) -> Result<T, FabricError> {
    let t0 = std::time::Instant::now();
    loop {
        match attempt() {
            Err(e) if e.is_transient() && t0.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// How a DPM serves its region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeSpec {
    /// Through the control file beside the region (KNs on this host map the region).
    Shm,
    /// Over RDMA verbs: the connection exchange listens on `listen` (the shm control file
    /// is served too, for tools on this host).
    Verbs {
        listen: SocketAddr,
        device: VerbsDevice,
    },
}

impl ServeSpec {
    /// A serving fabric as the command line names it (`listen` only matters for verbs).
    pub fn parse(
        kind: FabricKind,
        listen: SocketAddr,
        device: VerbsDevice,
    ) -> Result<Self, SpecError> {
        Ok(match kind {
            FabricKind::Shm => Self::Shm,
            FabricKind::Verbs => Self::Verbs { listen, device },
        })
    }

    pub fn kind(&self) -> FabricKind {
        match self {
            Self::Shm => FabricKind::Shm,
            Self::Verbs { .. } => FabricKind::Verbs,
        }
    }

    /// The command-line words of `dinomo dpm serve` for this fabric.
    pub fn to_args(&self) -> Vec<String> {
        match self {
            Self::Shm => vec!["--fabric".into(), "shm".into()],
            Self::Verbs { listen, device } => {
                let mut a = vec![
                    "--fabric".into(),
                    "verbs".into(),
                    "--listen".into(),
                    listen.to_string(),
                ];
                a.extend(device.to_args());
                a
            }
        }
    }

    /// How a client on this host names a DPM serving this way from `region`.
    pub fn local_client(&self, region: impl Into<PathBuf>) -> DpmSpec {
        match self {
            Self::Shm => DpmSpec::shm(region),
            Self::Verbs { listen, device } => {
                let mut addr = *listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
                    });
                }
                DpmSpec::Verbs(VerbsSpec {
                    addr: addr.to_string(),
                    device: device.clone(),
                    secret: None,
                    kn_id: None,
                })
            }
        }
    }
}

/// Refuses to serve the verbs handshake on `listen` without a cluster secret unless it is
/// a loopback address: the handshake hands out remote read, write and atomics on the whole
/// region.
pub fn check_listen(
    listen: SocketAddr,
    secret: Option<&dinomo_shared::auth::ClusterSecret>,
) -> Result<(), FabricError> {
    if secret.is_none() && !listen.ip().is_loopback() {
        return Err(FabricError::Other(format!(
            "refusing to serve the verbs handshake on {listen} without a cluster secret: \
             anyone who reaches it would get remote read, write and atomics on the whole \
             region; give --secret-file (the same file as the KNs and the manager), or \
             listen on 127.0.0.1"
        )));
    }
    Ok(())
}

/// Refuses to reach the DPM at `peer` (resolved to `addrs`) without a cluster secret unless
/// every address is loopback (the rule every role follows).
pub fn check_dial(
    addrs: &[SocketAddr],
    peer: &str,
    secret: Option<&dinomo_shared::auth::ClusterSecret>,
) -> Result<(), FabricError> {
    if secret.is_none() && addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(FabricError::Other(format!(
            "refusing to reach the DPM at {peer} without a cluster secret: only loopback \
             addresses may be used unauthenticated; give --secret-file"
        )));
    }
    Ok(())
}

fn check_host_port(s: &str) -> Result<(), SpecError> {
    let bad = || {
        SpecError(format!(
            "--dpm {s:?} is not HOST:PORT (e.g. 10.0.0.5:{DEFAULT_VERBS_PORT})"
        ))
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(feature = "rdma")]
type VerbsConn = Box<super::verbs::VerbsFabric>;
/// Without the `rdma` feature there are no verbs connections; the type is uninhabited.
#[cfg(not(feature = "rdma"))]
type VerbsConn = core::convert::Infallible;

/// The unauthenticated-loopback rule, before anything else is tried.
fn check_verbs_dial(v: &VerbsSpec) -> Result<(), FabricError> {
    use std::net::ToSocketAddrs;
    if v.secret.is_some() {
        return Ok(());
    }
    let addrs: Vec<SocketAddr> = v
        .addr
        .to_socket_addrs()
        .map_err(|e| FabricError::Other(format!("cannot resolve {}: {e}", v.addr)))?
        .collect();
    check_dial(&addrs, &v.addr, None)
}

#[cfg(feature = "rdma")]
fn connect_verbs(v: &VerbsSpec, queue_depth: usize) -> Result<VerbsConn, FabricError> {
    check_verbs_dial(v)?;
    let cfg = super::verbs::VerbsConfig {
        gid_index: v.device.gid_index,
        queue_depth,
        secret: v.secret.clone(),
        kn_id: v.kn_id,
        ..Default::default()
    };
    cfg.validate()?;
    super::verbs::VerbsFabric::connect(&v.addr, v.device.name.as_deref(), &cfg).map(Box::new)
}

#[cfg(not(feature = "rdma"))]
fn connect_verbs(v: &VerbsSpec, _: usize) -> Result<VerbsConn, FabricError> {
    check_verbs_dial(v)?;
    Err(FabricError::Other(NO_RDMA_SUPPORT.into()))
}

/// A connection to the DPM over whichever fabric a [`DpmSpec`] names.
#[derive(Debug)]
pub enum Connection {
    /// The region file of a DPM on this host, mapped.
    Shm(ShmFabric<FilePersist>),
    /// A region in this process.
    Local(ShmFabric<HeapPersist<CpuPersist>>),
    /// A queue pair to a DPM over verbs.
    Verbs(VerbsConn),
}

/// Calls `$body` with `$f` bound to the backend of `$self`.
macro_rules! each {
    ($self:expr, $f:ident => $body:expr) => {
        match $self {
            Connection::Shm($f) => $body,
            Connection::Local($f) => $body,
            #[cfg(feature = "rdma")]
            Connection::Verbs($f) => $body,
            #[cfg(not(feature = "rdma"))]
            Connection::Verbs(never) => match *never {},
        }
    };
}

impl ControlChannel for Connection {
    fn send(&mut self, frame: &Frame) -> Result<(), FabricError> {
        each!(self, f => f.send(frame))
    }
    fn recv(&mut self, timeout: Duration) -> Result<Option<Frame>, FabricError> {
        each!(self, f => f.recv(timeout))
    }
    fn next_request_id(&mut self) -> u32 {
        each!(self, f => f.next_request_id())
    }
    fn reconnect(&mut self, timeout: Duration) -> Result<(), FabricError> {
        each!(self, f => f.reconnect(timeout))
    }
}

impl Fabric for Connection {
    #[inline]
    fn region_len(&self) -> u64 {
        each!(self, f => f.region_len())
    }
    fn alloc_buf(&mut self, len: usize) -> Result<LocalBuf, FabricError> {
        each!(self, f => f.alloc_buf(len))
    }
    #[inline]
    fn buf(&self, buf: LocalBuf) -> &[u8] {
        each!(self, f => f.buf(buf))
    }
    #[inline]
    fn buf_mut(&mut self, buf: LocalBuf) -> &mut [u8] {
        each!(self, f => f.buf_mut(buf))
    }
    #[inline]
    fn post(&mut self, wrs: &[(WrId, WorkRequest)]) -> Result<(), FabricError> {
        each!(self, f => f.post(wrs))
    }
    #[inline]
    fn poll(&mut self, out: &mut [Completion]) -> Result<usize, FabricError> {
        each!(self, f => f.poll(out))
    }
    #[inline]
    fn outstanding(&self) -> usize {
        each!(self, f => f.outstanding())
    }
    #[inline]
    fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<(), FabricError> {
        each!(self, f => f.wait(out, timeout))
    }
    #[inline]
    fn counters(&self) -> &FabricCounters {
        each!(self, f => f.counters())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::ControlServer;
    use dinomo_shared::msg::{Request, Response};

    #[test]
    fn kinds_and_specs_parse_and_print_back() {
        assert_eq!("shm".parse::<FabricKind>(), Ok(FabricKind::Shm));
        assert_eq!("Verbs".parse::<FabricKind>(), Ok(FabricKind::Verbs));
        assert!("tcp".parse::<FabricKind>().is_err());
        let shm = DpmSpec::parse(FabricKind::Shm, "/dev/shm/r", VerbsDevice::default())
            .expect("shm spec");
        assert_eq!(
            shm.to_args().expect("args"),
            ["--fabric", "shm", "--dpm", "/dev/shm/r"]
        );
        let dev = VerbsDevice {
            name: Some("rxe0".into()),
            gid_index: Some(1),
        };
        let v = DpmSpec::parse(FabricKind::Verbs, "10.0.0.5:18515", dev).expect("verbs spec");
        assert_eq!(v.kind(), FabricKind::Verbs);
        assert_eq!(
            v.to_args().expect("args"),
            [
                "--fabric",
                "verbs",
                "--dpm",
                "10.0.0.5:18515",
                "--gid-index",
                "1",
                "--device",
                "rxe0"
            ]
        );
        // Without an index the child chooses it itself.
        let auto = DpmSpec::parse(FabricKind::Verbs, "10.0.0.5:18515", VerbsDevice::default())
            .expect("verbs spec");
        assert_eq!(
            auto.to_args().expect("args"),
            ["--fabric", "verbs", "--dpm", "10.0.0.5:18515"]
        );
        for bad in ["/dev/shm/r", "host", "host:0", ":18515", "host:99999", ""] {
            assert!(
                DpmSpec::parse(FabricKind::Verbs, bad, VerbsDevice::default()).is_err(),
                "{bad}"
            );
        }
        let serve = ServeSpec::parse(
            FabricKind::Verbs,
            "0.0.0.0:18515".parse().expect("addr"),
            VerbsDevice::default(),
        )
        .expect("serve");
        match serve.local_client("/x") {
            DpmSpec::Verbs(v) => assert_eq!(v.addr, "127.0.0.1:18515"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_control_channel_of_a_local_dpm_calls_and_skips_stale_replies() {
        let mut server = ControlServer::in_memory(2);
        let spec = DpmSpec::Local(LocalDpm {
            region: HeapRegion::new(1 << 16),
            control: server.handle(),
            nic: NicProfile::None,
        });
        let mut c = spec.control().expect("control");
        // A reply to an earlier request that timed out is skipped by the next call.
        let stale = c.next_request_id();
        c.send(&Request::Ping.encode(stale)).expect("send");
        let t = std::thread::spawn(move || {
            let mut answered = 0;
            while answered < 2 {
                answered += server.poll(|_, f| Some(Response::Pong.encode(f.req_id)));
            }
            server
        });
        assert_eq!(
            c.call(&Request::Ping, Duration::from_secs(10))
                .expect("call"),
            Ok(Response::Pong)
        );
        let _server = t.join().expect("server thread");
        let conn = spec.connect().expect("connect");
        assert_eq!(conn.region_len(), 1 << 16);
    }

    #[cfg(not(feature = "rdma"))]
    #[test]
    fn verbs_without_the_feature_is_a_clear_error() {
        let v =
            DpmSpec::parse(FabricKind::Verbs, "127.0.0.1:1", VerbsDevice::default()).expect("spec");
        let e = v.connect().expect_err("no rdma").to_string();
        assert!(e.contains("without RDMA support"), "{e}");
        assert!(v.control().is_err());
    }
}
