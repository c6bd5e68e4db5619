//! The DPM end: registers the region once, accepts KN connections over TCP (authenticated,
//! each handshake on its own thread, see [`super::handshake`]), and serves their control
//! frames.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::msg::{Frame, Request, Response};

use super::handshake::{Handshakes, Offer, Outcome};
use super::link::{CtlSlots, Device, Link};
use super::sys::{Access, MemoryRegion, WorkCompletion};
use super::wire::EndpointInfo;
use super::wr::{wc_status_name, CTL_SEND_BIT};
use super::VerbsConfig;
use crate::fabric::FabricError;
use crate::pmem::{Persist, Pmem};

/// How often connections are checked for a closed TCP stream.
const LIVENESS_EVERY: Duration = Duration::from_millis(100);

struct Endpoint {
    id: u64,
    peer: SocketAddr,
    /// The KN this connection speaks for, named in its authenticated handshake or else
    /// learnt from its first control message that names one (`Hello` or `OpenLog`), so
    /// that fencing the KN can revoke its access.
    kn_id: Option<u32>,
    // Drop order: QP first.
    link: Link,
    ctl: CtlSlots,
    tcp: TcpStream,
    /// Replies waiting for a free send slot.
    backlog: VecDeque<Frame>,
}

/// Serves KN connections over RDMA verbs.
pub struct VerbsServer {
    handshakes: Handshakes<(Link, CtlSlots)>,
    endpoints: Vec<Endpoint>,
    region: MemoryRegion,
    dev: Device,
    cfg: VerbsConfig,
    next_id: u64,
    last_liveness: Instant,
    events: Vec<String>,
    /// KNs fenced and not registered again since: a connection that speaks for one is
    /// refused at its handshake, or revoked as soon as it names one.
    fenced: HashSet<u32>,
}

impl fmt::Debug for VerbsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsServer")
            .field("device", &self.dev.name())
            .field("listen", &self.handshakes.local_addr())
            .field("authenticated", &self.handshakes.authenticated())
            .field("region", &self.region)
            .field("connections", &self.endpoints.len())
            .finish()
    }
}

impl VerbsServer {
    /// Opens `device` (`None`: the first), registers `region` for remote READ, WRITE and
    /// atomics, and listens for KNs on `listen`. Without `cfg.secret` only a loopback
    /// `listen` is accepted ([`super::handshake::check_listen`]), checked before the device
    /// is opened. The device is opened before the listener, so a host without RDMA fails
    /// before anything else is set up.
    pub fn bind<P: Persist + 'static>(
        device: Option<&str>,
        listen: SocketAddr,
        region: Arc<Pmem<P>>,
        cfg: &VerbsConfig,
    ) -> Result<Self, FabricError> {
        super::handshake::check_listen(listen, cfg.secret.as_ref())?;
        let dev = Device::open(device, cfg)?;
        let region = dev.pd.register_pmem(region, Access::REMOTE_ALL)?;
        let handshakes = Handshakes::bind(listen, cfg.secret.clone(), cfg.connect_timeout)?;
        Ok(Self {
            handshakes,
            endpoints: Vec::new(),
            region,
            dev,
            cfg: cfg.clone(),
            next_id: 1,
            last_liveness: Instant::now(),
            events: Vec::new(),
            fenced: HashSet::new(),
        })
    }

    /// The address KNs connect to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.handshakes.local_addr()
    }

    /// Handshakes in progress (each on its own thread).
    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes.in_progress()
    }

    pub fn device_name(&self) -> &str {
        self.dev.name()
    }

    /// Connected KNs.
    pub fn connections(&self) -> usize {
        self.endpoints.len()
    }

    /// Connections made and lost, refused peers: for the caller's log.
    pub fn drain_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
    }

    /// Accepts new connections, then hands every received control frame to `handler`
    /// (with the connection's id) and sends its reply. Returns the frames handled.
    pub fn poll(&mut self, mut handler: impl FnMut(u64, &Frame) -> Option<Frame>) -> usize {
        self.accept_all();
        let mut handled = 0;
        let mut dead = Vec::new();
        let mut wcs = [WorkCompletion::default(); 32];
        let mut fences = Vec::new();
        for (i, ep) in self.endpoints.iter_mut().enumerate() {
            match serve_endpoint(ep, &mut handler, &mut wcs, &self.fenced, &mut fences) {
                Ok(n) => handled += n,
                Err(why) => {
                    // Moved to error before it is dropped: access ends now, not at teardown.
                    let _ = ep.link.qp.to_error();
                    dead.push((i, why));
                }
            }
        }
        if self.last_liveness.elapsed() >= LIVENESS_EVERY {
            self.last_liveness = Instant::now();
            for (i, ep) in self.endpoints.iter_mut().enumerate() {
                if !dead.iter().any(|(d, _)| *d == i) {
                    if let Some(why) = tcp_closed(&mut ep.tcp) {
                        dead.push((i, why));
                    }
                }
            }
        }
        dead.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, why) in dead {
            let ep = self.endpoints.swap_remove(i);
            self.events.push(format!(
                "KN connection {} from {} closed: {why}",
                ep.id, ep.peer
            ));
        }
        // Fences that arrived here are carried out before their replies leave (they wait
        // in their connection's backlog until the next poll), so whoever fenced a KN knows
        // that its queue pairs are already in error.
        for kn in fences {
            self.revoke(kn);
        }
        handled
    }

    /// Revokes the access of every connection of KN `kn_id`: their queue pairs go to the
    /// error state, so the KN's one-sided READs, WRITEs and atomics on the region fail from
    /// now on (a KN that was only paused cannot land a write after it was fenced), and the
    /// connections are dropped. Returns how many were revoked.
    ///
    /// Until [`VerbsServer::readmit`] (the KN registered again), a handshake that names the
    /// KN is refused and a connection that names it later is revoked at once, so a fenced
    /// KN that reconnects gets no access either.
    pub fn revoke(&mut self, kn_id: u32) -> usize {
        self.fenced.insert(kn_id);
        let mut revoked = 0;
        let mut i = 0;
        while i < self.endpoints.len() {
            if self.endpoints[i].kn_id != Some(kn_id) {
                i += 1;
                continue;
            }
            let ep = self.endpoints.swap_remove(i);
            let how = match ep.link.qp.to_error() {
                Ok(()) => "queue pair moved to error".to_string(),
                // Dropping the endpoint destroys the QP, which revokes access as well.
                Err(e) => format!("queue pair destroyed ({e})"),
            };
            self.events.push(format!(
                "KN {kn_id} fenced: connection {} from {} revoked, {how}",
                ep.id, ep.peer
            ));
            revoked += 1;
        }
        revoked
    }

    /// Lets KN `kn_id` connect again after it was fenced: the manager gave it a new lease
    /// (the memory node calls this when it stores one).
    pub fn readmit(&mut self, kn_id: u32) {
        self.fenced.remove(&kn_id);
    }

    /// Advances the handshakes (never waiting on the network) and adds the connections
    /// that completed.
    fn accept_all(&mut self) {
        let (dev, region, cfg, fenced) = (&self.dev, &self.region, &self.cfg, &self.fenced);
        let outcomes = self.handshakes.poll(|kn_ep, kn| {
            if let Some(k) = kn.filter(|k| fenced.contains(k)) {
                return Err(format!(
                    "KN {k} was fenced; it must register with the manager again"
                ));
            }
            let (link, ctl) = endpoint_for(dev, region, cfg, kn_ep).map_err(|e| e.to_string())?;
            let offer = Offer {
                ep: link.local,
                rkey: region.rkey(),
                base: region.addr(),
                len: region.registered_len(),
            };
            Ok((offer, (link, ctl)))
        });
        for o in outcomes {
            match o {
                Outcome::Connected {
                    peer,
                    kn,
                    tcp,
                    local: (link, ctl),
                } => {
                    if let Err(e) = tcp.set_nonblocking(true) {
                        self.events
                            .push(format!("dropped a connection from {peer}: TCP: {e}"));
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    self.events.push(format!(
                        "KN connection {id} from {peer} ({}): QP {}",
                        kn.map_or_else(|| "no KN named".to_string(), |k| format!("KN {k}")),
                        link.local.qpn
                    ));
                    self.endpoints.push(Endpoint {
                        id,
                        peer,
                        kn_id: kn,
                        link,
                        ctl,
                        tcp,
                        backlog: VecDeque::new(),
                    });
                }
                Outcome::Refused { peer, why } => self
                    .events
                    .push(format!("refused a connection from {peer}: {why}")),
            }
        }
    }
}

/// A queue pair (connected to `kn`, with the region attached) and its control buffers.
fn endpoint_for(
    dev: &Device,
    region: &MemoryRegion,
    cfg: &VerbsConfig,
    kn: &EndpointInfo,
) -> Result<(Link, CtlSlots), FabricError> {
    let n = cfg.ctl_slots;
    let mut link = Link::new(dev, cfg, n, n, true)?;
    link.qp.attach(region);
    let mut ctl = CtlSlots::new(dev, n)?;
    ctl.arm(&mut link.qp)?;
    link.connect(kn)?;
    Ok((link, ctl))
}

/// Serves one connection's received frames; an error means the connection is gone.
/// A connection that names a KN in `fenced` is refused (an error); a successful FenceKn
/// adds its KN to `fences` and holds its reply back for the caller to revoke first.
fn serve_endpoint(
    ep: &mut Endpoint,
    handler: &mut impl FnMut(u64, &Frame) -> Option<Frame>,
    wcs: &mut [WorkCompletion; 32],
    fenced: &HashSet<u32>,
    fences: &mut Vec<u32>,
) -> Result<usize, String> {
    let fabric = |e: FabricError| e.to_string();
    // Finished SENDs free their slots.
    loop {
        let n = ep.link.send_cq.poll(wcs).map_err(fabric)?;
        for wc in &wcs[..n] {
            if wc.wr_id & CTL_SEND_BIT != 0 {
                ep.ctl.send_done(wc.wr_id);
            }
            if wc.status != 0 {
                return Err(format!(
                    "a reply completed with {}",
                    wc_status_name(wc.status)
                ));
            }
        }
        if n < wcs.len() {
            break;
        }
    }
    while let Some(f) = ep.backlog.front() {
        if !ep.ctl.send(&mut ep.link.qp, f).map_err(fabric)? {
            break;
        }
        ep.backlog.pop_front();
    }
    let mut handled = 0;
    let n = ep.link.recv_cq.poll(wcs).map_err(fabric)?;
    for wc in &wcs[..n] {
        if wc.status != 0 {
            return Err(format!(
                "a control receive completed with {}",
                wc_status_name(wc.status)
            ));
        }
        let frame = ep
            .ctl
            .take_frame(&mut ep.link.qp, wc.wr_id)
            .map_err(fabric)?;
        handled += 1;
        if ep.kn_id.is_none() {
            ep.kn_id = kn_of(&frame);
            // A connection that names a fenced KN loses its access before it is answered.
            if let Some(kn) = ep.kn_id.filter(|k| fenced.contains(k)) {
                return Err(format!("it speaks for KN {kn}, which is fenced"));
            }
        }
        if let Some(reply) = handler(ep.id, &frame) {
            if let Some(kn) = fence_of(&frame, &reply) {
                fences.push(kn);
                ep.backlog.push_back(reply);
                continue;
            }
            if !ep.backlog.is_empty() || !ep.ctl.send(&mut ep.link.qp, &reply).map_err(fabric)? {
                ep.backlog.push_back(reply);
            }
        }
    }
    Ok(handled)
}

/// The KN a control frame names, if it is one that does.
fn kn_of(frame: &Frame) -> Option<u32> {
    match Request::decode(frame).ok()? {
        Request::Hello { kn_id } | Request::OpenLog { kn_id, .. } => Some(kn_id),
        _ => None,
    }
}

/// The KN a request fenced, if it is a FenceKn that succeeded.
fn fence_of(frame: &Frame, reply: &Frame) -> Option<u32> {
    match Request::decode(frame).ok()? {
        Request::FenceKn { kn_id } if matches!(Response::decode(reply), Ok(Ok(_))) => Some(kn_id),
        _ => None,
    }
}

/// Why a KN's TCP stream is closed, if it is (the KN process exited or closed the fabric).
fn tcp_closed(tcp: &mut TcpStream) -> Option<String> {
    let mut b = [0u8; 16];
    match tcp.read(&mut b) {
        Ok(0) => Some("the KN closed the connection".into()),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
        Err(e) => Some(format!("TCP: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_learns_its_kn_from_hello_or_open_log_only() {
        assert_eq!(kn_of(&Request::Hello { kn_id: 7 }.encode(1)), Some(7));
        let open = Request::OpenLog {
            kn_id: 3,
            shard: 1,
            lease_epoch: 9,
        };
        assert_eq!(kn_of(&open.encode(2)), Some(3));
        assert_eq!(kn_of(&Request::Ping.encode(3)), None);
        assert_eq!(kn_of(&Request::FenceKn { kn_id: 3 }.encode(4)), None);
        assert_eq!(kn_of(&Frame::default()), None);
    }
}
