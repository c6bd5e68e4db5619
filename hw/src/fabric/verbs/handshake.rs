//! The connection exchange ([`super::wire`]) with authentication, and the DPM's way of
//! serving it off its control thread.
//!
//! Each TCP connection is handled by a short-lived thread of its own with a deadline for the
//! whole exchange, so a peer that says nothing (or trickles bytes) holds up only itself: the
//! control thread keeps serving control frames and other KNs' handshakes. Only the steps
//! that touch the device (making the queue pair for a peer that proved it holds the cluster
//! secret) run on the control thread, through [`Handshakes::poll`]; they do not wait on the
//! network.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::auth::{self, ClusterSecret, Nonce, TAG_LEN};

use super::wire::{
    accept_fields, hello_body, read_msg, write_msg, EndpointInfo, Msg, DOMAIN_DPM, DOMAIN_KN, NO_KN,
};
use crate::fabric::FabricError;

/// Handshakes served at once; further connections are closed at once (a flood of idle
/// connections costs a thread each only up to this many).
pub const MAX_HANDSHAKES: usize = 64;

/// How long accepting pauses after a failed accept.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Why a KN without the secret, or with another one, is turned away (the text it gets).
pub const AUTH_FAILED: &str =
    "authentication failed: the peer does not hold this cluster's secret (--secret-file)";

/// What the DPM offers a peer that authenticated: its queue pair and the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    pub ep: EndpointInfo,
    pub rkey: u32,
    pub base: u64,
    pub len: u64,
}

/// The end of one handshake, as [`Handshakes::poll`] reports it.
#[derive(Debug)]
pub enum Outcome<T> {
    /// The peer authenticated and both queue pairs are ready; `local` is what `offer` made.
    Connected {
        peer: SocketAddr,
        /// The KN the peer speaks for (named in its authenticated Hello), if any.
        kn: Option<u32>,
        tcp: TcpStream,
        local: T,
    },
    /// The peer was turned away or gave up; nothing it was offered survives.
    Refused { peer: SocketAddr, why: String },
}

enum Event {
    Hello {
        id: u64,
        ep: EndpointInfo,
        kn: Option<u32>,
    },
    Ready {
        id: u64,
        tcp: TcpStream,
    },
    Failed {
        id: u64,
        why: String,
    },
}

struct Worker<T> {
    peer: SocketAddr,
    reply: Sender<Result<Offer, String>>,
    kn: Option<u32>,
    local: Option<T>,
}

/// The DPM's listener and the handshakes in progress on it.
pub struct Handshakes<T> {
    listener: TcpListener,
    secret: Option<Arc<ClusterSecret>>,
    timeout: Duration,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    workers: HashMap<u64, Worker<T>>,
    next_id: u64,
    /// After a failed accept (e.g. out of file descriptors) accepting pauses until then,
    /// instead of failing, and reporting it, on every poll.
    accept_after: Option<Instant>,
}

impl<T> std::fmt::Debug for Handshakes<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshakes")
            .field("listen", &self.listener.local_addr().ok())
            .field("authenticated", &self.secret.is_some())
            .field("in_progress", &self.workers.len())
            .finish()
    }
}

pub use crate::fabric::connect::{check_dial, check_listen};

impl<T> Handshakes<T> {
    /// Serves handshakes on `listen` (see [`check_listen`]); each one must finish within
    /// `timeout`.
    pub fn bind(
        listen: SocketAddr,
        secret: Option<ClusterSecret>,
        timeout: Duration,
    ) -> Result<Self, FabricError> {
        check_listen(listen, secret.as_ref())?;
        let listener = TcpListener::bind(listen)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|e| FabricError::Other(format!("cannot listen on {listen}: {e}")))?;
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            listener,
            secret: secret.map(Arc::new),
            timeout,
            tx,
            rx,
            workers: HashMap::new(),
            next_id: 1,
            accept_after: None,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Whether peers must prove they hold the cluster secret.
    pub fn authenticated(&self) -> bool {
        self.secret.is_some()
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.workers.len()
    }

    /// Accepts new connections (each gets a thread) and advances the handshakes: `offer`
    /// makes the local side for a peer that authenticated, given its endpoint and the KN it
    /// speaks for (called on this thread, never for a peer that did not authenticate; an
    /// `Err` is sent to the peer as the reason it is refused). Never waits on the network.
    pub fn poll(
        &mut self,
        mut offer: impl FnMut(&EndpointInfo, Option<u32>) -> Result<(Offer, T), String>,
    ) -> Vec<Outcome<T>> {
        let mut out = Vec::new();
        self.accept_all(&mut out);
        while let Ok(ev) = self.rx.try_recv() {
            match ev {
                Event::Hello { id, ep, kn } => {
                    let Some(w) = self.workers.get_mut(&id) else {
                        continue;
                    };
                    w.kn = kn;
                    let reply = match offer(&ep, kn) {
                        Ok((o, local)) => {
                            w.local = Some(local);
                            Ok(o)
                        }
                        Err(why) => Err(why),
                    };
                    // A worker that gave up meanwhile reports Failed; nothing to do here.
                    let _ = w.reply.send(reply);
                }
                Event::Ready { id, tcp } => {
                    if let Some(w) = self.workers.remove(&id) {
                        match w.local {
                            Some(local) => out.push(Outcome::Connected {
                                peer: w.peer,
                                kn: w.kn,
                                tcp,
                                local,
                            }),
                            None => out.push(Outcome::Refused {
                                peer: w.peer,
                                why: "ready without an offer".into(),
                            }),
                        }
                    }
                }
                Event::Failed { id, why } => {
                    if let Some(w) = self.workers.remove(&id) {
                        out.push(Outcome::Refused { peer: w.peer, why });
                    }
                }
            }
        }
        out
    }

    fn accept_all(&mut self, out: &mut Vec<Outcome<T>>) {
        if self.accept_after.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.accept_after = None;
        loop {
            let (tcp, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of file descriptors: try again a little later.
                    self.accept_after = Some(Instant::now() + ACCEPT_PAUSE);
                    out.push(Outcome::Refused {
                        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                        why: format!("accept failed: {e}"),
                    });
                    return;
                }
            };
            if self.workers.len() >= MAX_HANDSHAKES {
                out.push(Outcome::Refused {
                    peer,
                    why: format!("{MAX_HANDSHAKES} handshakes already in progress"),
                });
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let (reply_tx, reply_rx) = mpsc::channel();
            let (secret, timeout, tx) = (self.secret.clone(), self.timeout, self.tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("verbs-handshake-{id}"))
                .spawn(move || {
                    let ev = match serve_one(tcp, secret.as_deref(), timeout, id, &tx, &reply_rx) {
                        Ok(tcp) => Event::Ready { id, tcp },
                        Err(why) => Event::Failed { id, why },
                    };
                    let _ = tx.send(ev);
                });
            match spawned {
                Ok(_) => {
                    self.workers.insert(
                        id,
                        Worker {
                            peer,
                            reply: reply_tx,
                            kn: None,
                            local: None,
                        },
                    );
                }
                Err(e) => out.push(Outcome::Refused {
                    peer,
                    why: format!("cannot start a handshake thread: {e}"),
                }),
            }
        }
    }
}

/// A stream whose reads and writes all end by one deadline.
struct Deadline<'a> {
    tcp: &'a mut TcpStream,
    end: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_write_timeout(Some(left))?;
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// One handshake, on its own thread: returns the stream once the peer is Ready.
fn serve_one(
    mut tcp: TcpStream,
    secret: Option<&ClusterSecret>,
    timeout: Duration,
    id: u64,
    tx: &Sender<Event>,
    reply: &Receiver<Result<Offer, String>>,
) -> Result<TcpStream, String> {
    let end = Instant::now() + timeout;
    tcp.set_nonblocking(false)
        .and_then(|_| tcp.set_nodelay(true))
        .map_err(|e| format!("TCP: {e}"))?;
    let mut s = Deadline { tcp: &mut tcp, end };
    let refuse = |s: &mut Deadline<'_>, why: String| {
        let _ = write_msg(s, &Msg::Reject(why.clone()));
        why
    };
    let (ep, kn, nonce_kn) = match read_msg(&mut s) {
        Ok(Msg::Hello { ep, kn, nonce }) => (ep, kn, nonce),
        Ok(m) => {
            return Err(refuse(
                &mut s,
                format!("expected a Hello, got {}", name(&m)),
            ))
        }
        Err(e) => return Err(refuse(&mut s, e.to_string())),
    };
    let mut nonce_dpm: Nonce = [0; auth::NONCE_LEN];
    if let Some(secret) = secret {
        nonce_dpm = auth::nonce().map_err(|e| refuse(&mut s, e.to_string()))?;
        write_msg(&mut s, &Msg::Challenge { nonce: nonce_dpm }).map_err(|e| e.to_string())?;
        let tag = match read_msg(&mut s) {
            Ok(Msg::Proof { tag }) => tag,
            Ok(m) => {
                return Err(refuse(
                    &mut s,
                    format!("expected a Proof, got {}", name(&m)),
                ))
            }
            Err(e) => return Err(refuse(&mut s, e.to_string())),
        };
        let hello = hello_body(&ep, kn, &nonce_kn);
        if !secret.verify(DOMAIN_KN, &[&nonce_dpm, &nonce_kn, &hello], &tag) {
            return Err(refuse(&mut s, AUTH_FAILED.into()));
        }
    }
    // Authenticated (or loopback without a secret): the control thread makes the QP.
    let kn = (kn != NO_KN).then_some(kn);
    tx.send(Event::Hello { id, ep, kn })
        .map_err(|_| "the DPM is stopping".to_string())?;
    let left = end.saturating_duration_since(Instant::now());
    let offer = match reply.recv_timeout(left) {
        Ok(Ok(o)) => o,
        Ok(Err(why)) => return Err(refuse(&mut s, why)),
        Err(RecvTimeoutError::Timeout) => {
            return Err(refuse(&mut s, "the DPM is too busy to connect".into()))
        }
        Err(RecvTimeoutError::Disconnected) => return Err("the DPM is stopping".into()),
    };
    let fields = accept_fields(&offer.ep, offer.rkey, offer.base, offer.len);
    let tag = secret.map_or([0; TAG_LEN], |k| {
        k.tag(DOMAIN_DPM, &[&nonce_kn, &nonce_dpm, &fields])
    });
    let accept = Msg::Accept {
        ep: offer.ep,
        rkey: offer.rkey,
        base: offer.base,
        len: offer.len,
        tag,
    };
    write_msg(&mut s, &accept).map_err(|e| e.to_string())?;
    match read_msg(&mut s) {
        Ok(Msg::Ready) => {}
        Ok(m) => return Err(format!("expected Ready, got {}", name(&m))),
        Err(e) => return Err(e.to_string()),
    }
    Ok(tcp)
}

/// A message's name for an error (never its contents: a Proof's tag stays out of logs).
fn name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::Challenge { .. } => "Challenge",
        Msg::Proof { .. } => "Proof",
        Msg::Accept { .. } => "Accept",
        Msg::Reject(_) => "Reject",
        Msg::Ready => "Ready",
    }
}

/// The KN's side up to the DPM's Accept: sends Hello, answers a challenge with `secret`,
/// and checks the DPM's proof. The caller connects its queue pair to the returned offer and
/// then sends Ready. A KN with a secret refuses a DPM that does not prove it has it too.
pub fn client_exchange(
    tcp: &mut TcpStream,
    peer: &str,
    local: EndpointInfo,
    kn: Option<u32>,
    secret: Option<&ClusterSecret>,
) -> Result<Offer, FabricError> {
    let kn = kn.unwrap_or(NO_KN);
    let lost = |e: super::wire::ExchangeError| {
        FabricError::Disconnected(format!("connection exchange with {peer} failed: {e}"))
    };
    let refused = |why: String| {
        FabricError::Other(format!("the DPM at {peer} refused the connection: {why}"))
    };
    let nonce_kn = auth::nonce().map_err(|e| FabricError::Other(e.to_string()))?;
    write_msg(
        tcp,
        &Msg::Hello {
            ep: local,
            kn,
            nonce: nonce_kn,
        },
    )
    .map_err(lost)?;
    let mut nonce_dpm = None;
    let mut msg = read_msg(tcp).map_err(lost)?;
    if let Msg::Challenge { nonce } = msg {
        let Some(secret) = secret else {
            return Err(FabricError::Other(format!(
                "the DPM at {peer} requires the cluster secret: give --secret-file (or \
                 DINOMO_SECRET_FILE) naming the cluster's secret file"
            )));
        };
        let hello = hello_body(&local, kn, &nonce_kn);
        let tag = secret.tag(DOMAIN_KN, &[&nonce, &nonce_kn, &hello]);
        write_msg(tcp, &Msg::Proof { tag }).map_err(lost)?;
        nonce_dpm = Some(nonce);
        msg = read_msg(tcp).map_err(lost)?;
    }
    match msg {
        Msg::Accept {
            ep,
            rkey,
            base,
            len,
            tag,
        } => {
            if let Some(secret) = secret {
                let Some(nonce_dpm) = nonce_dpm else {
                    return Err(FabricError::Other(format!(
                        "the DPM at {peer} did not authenticate itself (it runs without a \
                         cluster secret) while this process has one; give the DPM the same \
                         --secret-file"
                    )));
                };
                let fields = accept_fields(&ep, rkey, base, len);
                if !secret.verify(DOMAIN_DPM, &[&nonce_kn, &nonce_dpm, &fields], &tag) {
                    return Err(FabricError::Other(format!(
                        "the DPM at {peer} failed to prove it holds the cluster secret"
                    )));
                }
            }
            Ok(Offer {
                ep,
                rkey,
                base,
                len,
            })
        }
        Msg::Reject(why) => Err(refused(why)),
        m => Err(FabricError::Other(format!(
            "the DPM at {peer} answered the connection request with {}",
            name(&m)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(n: u32) -> EndpointInfo {
        EndpointInfo {
            qpn: n,
            psn: 1,
            lid: 0,
            mtu: 3,
            rd_atomic: 1,
            gid: [n as u8; 16],
        }
    }

    const RKEY: u32 = 0x005e_c7e7;

    fn secret(b: u8) -> ClusterSecret {
        ClusterSecret::from_bytes([b; 32])
    }

    /// A handshake server on its own thread (standing in for the DPM's control thread);
    /// returns its address and the outcomes, with the number of offers made.
    type Served = std::thread::JoinHandle<(Vec<Outcome<u32>>, usize)>;

    fn serve(
        secret: Option<ClusterSecret>,
        timeout: Duration,
        until: usize,
    ) -> (SocketAddr, Served) {
        let mut hs =
            Handshakes::<u32>::bind(SocketAddr::from(([127, 0, 0, 1], 0)), secret, timeout)
                .expect("bind");
        let addr = hs.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let mut outs = Vec::new();
            let mut offers = 0;
            while outs.len() < until {
                outs.extend(hs.poll(|kn, named| {
                    if named == Some(66) {
                        return Err("KN 66 was fenced".into());
                    }
                    offers += 1;
                    Ok((
                        Offer {
                            ep: ep(1000 + kn.qpn),
                            rkey: RKEY,
                            base: 0x1000,
                            len: 1 << 20,
                        },
                        kn.qpn,
                    ))
                }));
                std::thread::sleep(Duration::from_millis(2));
            }
            (outs, offers)
        });
        (addr, t)
    }

    fn dial(addr: SocketAddr) -> TcpStream {
        let t = TcpStream::connect(addr).expect("connect");
        t.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        t
    }

    /// Every byte a peer gets back, until the DPM closes the stream.
    fn read_all(t: &mut TcpStream) -> Vec<u8> {
        let mut b = Vec::new();
        let _ = t.read_to_end(&mut b);
        b
    }

    #[test]
    fn the_right_secret_connects_and_both_sides_are_proven() {
        let (addr, server) = serve(Some(secret(1)), Duration::from_secs(30), 1);
        let mut t = dial(addr);
        let offer =
            client_exchange(&mut t, "dpm", ep(7), None, Some(&secret(1))).expect("accepted");
        assert_eq!((offer.rkey, offer.ep.qpn), (RKEY, 1007));
        write_msg(&mut t, &Msg::Ready).expect("ready");
        let (outs, offers) = server.join().expect("server");
        assert_eq!(offers, 1);
        assert!(
            matches!(outs[..], [Outcome::Connected { local: 7, .. }]),
            "{outs:?}"
        );
    }

    #[test]
    fn no_secret_or_a_wrong_one_is_refused_and_never_sees_the_rkey() {
        let (addr, server) = serve(Some(secret(1)), Duration::from_secs(30), 3);
        // A KN with another cluster's secret.
        let mut t = dial(addr);
        let e = client_exchange(&mut t, "dpm", ep(1), None, Some(&secret(2))).expect_err("wrong");
        assert!(e.to_string().contains("authentication failed"), "{e}");
        drop(t);
        // A KN without a secret.
        let mut t = dial(addr);
        let e = client_exchange(&mut t, "dpm", ep(2), None, None).expect_err("none");
        assert!(e.to_string().contains("requires the cluster secret"), "{e}");
        drop(t);
        // A raw peer that forges a proof: it gets a Reject, and no byte of the rkey.
        let mut t = dial(addr);
        write_msg(
            &mut t,
            &Msg::Hello {
                ep: ep(3),
                kn: 1,
                nonce: [0; 16],
            },
        )
        .expect("hello");
        assert!(matches!(read_msg(&mut t), Ok(Msg::Challenge { .. })));
        write_msg(&mut t, &Msg::Proof { tag: [0; TAG_LEN] }).expect("proof");
        let rest = read_all(&mut t);
        let (m, _) = Msg::decode(&rest).expect("a message");
        assert_eq!(m, Msg::Reject(AUTH_FAILED.into()));
        assert!(!rest.windows(4).any(|w| w == RKEY.to_le_bytes()));
        let (outs, offers) = server.join().expect("server");
        assert_eq!(
            offers, 0,
            "no queue pair is made for a peer that did not authenticate"
        );
        assert!(
            outs.iter().all(|o| matches!(o, Outcome::Refused { .. })),
            "{outs:?}"
        );
    }

    #[test]
    fn the_kn_named_in_the_handshake_reaches_the_dpm_which_may_refuse_it() {
        let (addr, server) = serve(Some(secret(1)), Duration::from_secs(30), 2);
        let mut t = dial(addr);
        let e = client_exchange(&mut t, "dpm", ep(1), Some(66), Some(&secret(1)))
            .expect_err("refused KN");
        assert!(e.to_string().contains("KN 66 was fenced"), "{e}");
        drop(t);
        let mut t = dial(addr);
        client_exchange(&mut t, "dpm", ep(2), Some(5), Some(&secret(1))).expect("accepted");
        write_msg(&mut t, &Msg::Ready).expect("ready");
        let (outs, offers) = server.join().expect("server");
        assert_eq!(offers, 1);
        assert!(
            outs.iter()
                .any(|o| matches!(o, Outcome::Connected { kn: Some(5), .. })),
            "{outs:?}"
        );
    }

    #[test]
    fn a_silent_peer_does_not_delay_another_handshake() {
        // The silent peer is given the whole (long) deadline; the KN after it connects
        // while it still holds its connection open.
        let (addr, server) = serve(Some(secret(1)), Duration::from_secs(600), 1);
        let silent = dial(addr);
        let mut t = dial(addr);
        let offer =
            client_exchange(&mut t, "dpm", ep(9), None, Some(&secret(1))).expect("accepted");
        assert_eq!(offer.rkey, RKEY);
        write_msg(&mut t, &Msg::Ready).expect("ready");
        let (outs, _) = server.join().expect("server");
        assert!(
            matches!(outs[..], [Outcome::Connected { local: 9, .. }]),
            "{outs:?}"
        );
        drop(silent);
    }

    #[test]
    fn a_peer_that_stays_silent_is_dropped_at_its_deadline() {
        let (addr, server) = serve(Some(secret(1)), Duration::from_millis(200), 1);
        let mut silent = dial(addr);
        let (outs, _) = server.join().expect("server");
        assert!(matches!(&outs[..], [Outcome::Refused { .. }]), "{outs:?}");
        // Its stream was closed (after a Reject naming the reason).
        let rest = read_all(&mut silent);
        if !rest.is_empty() {
            assert!(matches!(Msg::decode(&rest), Ok((Msg::Reject(_), _))));
        }
    }

    #[test]
    fn without_a_secret_only_loopback_is_served_or_dialled() {
        let any = SocketAddr::from(([0, 0, 0, 0], 18515));
        let e = check_listen(any, None).expect_err("open listen");
        assert!(e.to_string().contains("without a cluster secret"), "{e}");
        check_listen(any, Some(&secret(1))).expect("with a secret");
        check_listen(SocketAddr::from(([127, 0, 0, 1], 1)), None).expect("loopback");
        let far = [SocketAddr::from(([10, 0, 0, 5], 18515))];
        assert!(check_dial(&far, "10.0.0.5:18515", None).is_err());
        check_dial(&far, "10.0.0.5:18515", Some(&secret(1))).expect("with a secret");
        // A KN with a secret refuses a DPM that does not prove it holds it.
        let (addr, server) = serve(None, Duration::from_secs(30), 1);
        let mut t = dial(addr);
        let e =
            client_exchange(&mut t, "dpm", ep(4), None, Some(&secret(1))).expect_err("no proof");
        assert!(e.to_string().contains("did not authenticate itself"), "{e}");
        drop(t);
        let _ = server.join();
    }
}
