//! A blocking Redis Cluster client: connections by node, a slot table filled from
//! `CLUSTER SLOTS` and corrected by `MOVED`, and for every command sent to a node exactly
//! what became of it: not sent (no connection), sent without a usable reply (a write may or
//! may not have taken effect), or answered.
//!
//! Retrying is left to the callers, whose needs differ: `dinomo bench --target` resends
//! after a failed connection (its writes are idempotent), the torture must not (its checker
//! needs each write's outcome), and the process tests assert on single steps.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use dinomo_shared::resp::{
    cluster_slot_ranges, encode_command, parse_value, Limits, ProtocolError, Value,
};
use dinomo_shared::slot::{key_slot, SLOTS};

/// How long connecting and waiting for a reply may take (`None`: the system's limit, or no
/// limit for replies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub reply: Option<Duration>,
}

/// A Redis user (`None`: the default user) and its password, sent with `AUTH` on every new
/// connection.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: Option<String>,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Why a connection gave no reply.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the node closed the connection")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The stream cannot be resynchronised: the connection is useless from here on.
    #[error("bad reply: {0}")]
    Protocol(#[from] ProtocolError),
}

/// One connection to one node.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    /// Received bytes not parsed yet.
    buf: Vec<u8>,
    /// The request being sent, reused.
    out: Vec<u8>,
}

impl Conn {
    /// Connects to `addr` (`host:port`).
    pub fn connect(addr: &str, timeouts: Timeouts) -> io::Result<Self> {
        let stream = match timeouts.connect {
            None => TcpStream::connect(addr)?,
            Some(limit) => connect_within(addr, limit)?,
        };
        stream.set_nodelay(true)?;
        stream.set_read_timeout(timeouts.reply)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
            out: Vec::new(),
        })
    }

    /// Connects and, with `credentials`, authenticates (`AUTH`); a refused `AUTH` is an
    /// error of kind `PermissionDenied` with the node's reply.
    pub fn connect_as(
        addr: &str,
        timeouts: Timeouts,
        credentials: Option<&Credentials>,
    ) -> io::Result<Self> {
        let mut c = Self::connect(addr, timeouts)?;
        if let Some(cr) = credentials {
            let reply = match &cr.user {
                Some(u) => c.call(&[b"AUTH", u.as_bytes(), cr.password.as_bytes()]),
                None => c.call(&[b"AUTH", cr.password.as_bytes()]),
            };
            match reply {
                Ok(Value::Simple(s)) if s == "OK" => {}
                Ok(other) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("AUTH refused by {addr}: {other:?}"),
                    ))
                }
                Err(ReadError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        Ok(c)
    }

    /// Sends one command without waiting for its reply.
    pub fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        self.out.clear();
        encode_command(&mut self.out, args);
        self.stream.write_all(&self.out)
    }

    /// Writes `bytes` as they are (malformed input, pipelines).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next reply.
    pub fn read(&mut self) -> Result<Value, ReadError> {
        let mut chunk = [0u8; 16384];
        loop {
            if let Some((v, n)) = parse_value(&self.buf, &Limits::default())? {
                self.buf.drain(..n);
                return Ok(v);
            }
            match self.stream.read(&mut chunk)? {
                0 => return Err(ReadError::Closed),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// One command and its reply. A failed send counts as a lost reply: part of the
    /// command may have reached the node.
    pub fn call(&mut self, args: &[&[u8]]) -> Result<Value, ReadError> {
        self.send(args)?;
        self.read()
    }
}

/// `TcpStream::connect_timeout` over every address `addr` resolves to.
fn connect_within(addr: &str, limit: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, limit) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// What became of a command sent to one node, when it got no reply.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: the command was not sent.
    #[error("cannot connect to {addr}: {source}")]
    NotConnected {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// Sent, at least in part, but no usable reply came: it may or may not have run.
    #[error("no reply from {addr}: {source}")]
    NoReply {
        addr: String,
        #[source]
        source: ReadError,
    },
}

/// Why the slot table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SlotsError {
    #[error("no node to ask for the slot table")]
    NoNodes,
    /// Every known node failed; the last failure.
    #[error("no node answers CLUSTER SLOTS: {0}")]
    NoAnswer(#[source] SendError),
}

/// The slot and the `host:port` of a `MOVED <slot> <host:port>` error.
pub fn parse_moved(error: &str) -> Option<(u16, &str)> {
    let mut words = error.strip_prefix("MOVED ")?.split_whitespace();
    let slot = words.next()?.parse().ok().filter(|&s| s < SLOTS)?;
    Some((slot, words.next()?))
}

/// Refusals and redirections seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `MOVED` redirections followed.
    pub moved: u64,
    /// `TRYAGAIN` refusals (the slot is changing owner, or the node's lease is renewing).
    pub tryagain: u64,
    /// `CLUSTERDOWN` refusals (the node knows no owner of the slot).
    pub clusterdown: u64,
}

/// One attempt of a command on its key's node ([`ClusterClient::attempt`]).
#[derive(Debug)]
pub enum Attempt {
    /// The node's reply, including errors other than the refusals below.
    Reply(Value),
    /// Not run: the slot is served elsewhere, and the table now says where.
    Moved,
    /// Not run: `TRYAGAIN`, the slot should be served soon.
    TryAgain(String),
    /// Not run: `CLUSTERDOWN`, the node knows no owner of the slot.
    ClusterDown(String),
    /// Not sent: no node is known to serve the slot, even after reloading the table.
    NoRoute,
    /// No reply: see [`SendError`] for whether the command was sent.
    Failed(SendError),
}

/// Connections by node and the slot table. Nodes are learnt from the seeds, `CLUSTER
/// SLOTS` and `MOVED`, and numbered in that order.
#[derive(Debug)]
pub struct ClusterClient {
    nodes: Vec<String>,
    conns: HashMap<usize, Conn>,
    /// The node of every slot (`None`: unknown, ask `CLUSTER SLOTS`).
    slots: Vec<Option<usize>>,
    timeouts: Timeouts,
    credentials: Option<Credentials>,
    counters: Counters,
}

impl ClusterClient {
    /// `seeds`: node addresses to start from (one that is down is skipped). Nothing is
    /// connected before the first command.
    pub fn new(seeds: &[String], timeouts: Timeouts) -> Self {
        Self {
            nodes: seeds.to_vec(),
            conns: HashMap::new(),
            slots: vec![None; SLOTS as usize],
            timeouts,
            credentials: None,
            counters: Counters::default(),
        }
    }

    /// Authenticates every connection with `credentials`.
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// Every node known so far.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The number of a node, learning it if it is new.
    pub fn node(&mut self, addr: &str) -> usize {
        match self.nodes.iter().position(|a| a == addr) {
            Some(i) => i,
            None => {
                self.nodes.push(addr.to_string());
                self.nodes.len() - 1
            }
        }
    }

    /// The node the table has for `slot`.
    pub fn slot_node(&self, slot: u16) -> Option<usize> {
        self.slots.get(usize::from(slot)).copied().flatten()
    }

    /// Forgets the table: the next command reloads it.
    pub fn forget_slots(&mut self) {
        self.slots.fill(None);
    }

    /// Sends a command to node `node` and reads its reply. A connection that fails is
    /// dropped; the next command to the node connects again.
    pub fn call_node(&mut self, node: usize, args: &[&[u8]]) -> Result<Value, SendError> {
        let Some(addr) = self.nodes.get(node) else {
            return Err(SendError::NotConnected {
                addr: format!("node {node}"),
                source: io::Error::new(io::ErrorKind::NotFound, "no such node"),
            });
        };
        let conn = match self.conns.entry(node) {
            Entry::Occupied(c) => c.into_mut(),
            Entry::Vacant(v) => {
                match Conn::connect_as(addr, self.timeouts, self.credentials.as_ref()) {
                    Ok(c) => v.insert(c),
                    Err(source) => {
                        return Err(SendError::NotConnected {
                            addr: addr.clone(),
                            source,
                        })
                    }
                }
            }
        };
        conn.call(args).map_err(|source| {
            let addr = addr.clone();
            self.conns.remove(&node);
            SendError::NoReply { addr, source }
        })
    }

    /// [`call_node`](Self::call_node) by address.
    pub fn call_addr(&mut self, addr: &str, args: &[&[u8]]) -> Result<Value, SendError> {
        let node = self.node(addr);
        self.call_node(node, args)
    }

    /// Sends to `addr`, then wherever `MOVED` points, at most `sends` times in all. The last
    /// reply is returned as it is, so a `MOVED` reply means the redirections ran out.
    pub fn call_following(
        &mut self,
        addr: &str,
        args: &[&[u8]],
        sends: u32,
    ) -> Result<Value, SendError> {
        let mut node = self.node(addr);
        let mut reply = self.call_node(node, args)?;
        for _ in 1..sends {
            let Value::Error(e) = &reply else { break };
            let Some(next) = self.redirect(e) else { break };
            node = next;
            reply = self.call_node(node, args)?;
        }
        Ok(reply)
    }

    /// Follows a `MOVED` error: counts it, points the slot at its node and returns that.
    fn redirect(&mut self, error: &str) -> Option<usize> {
        let (slot, addr) = parse_moved(error)?;
        let node = self.node(addr);
        self.counters.moved += 1;
        self.slots[usize::from(slot)] = Some(node);
        Some(node)
    }

    /// Fills the table from the first node that answers `CLUSTER SLOTS` (a node may have
    /// left or died since it was learnt). A node that answers something other than slot
    /// ranges is not in cluster mode and gets every slot.
    pub fn load_slots(&mut self) -> Result<(), SlotsError> {
        let mut last = None;
        for node in 0..self.nodes.len() {
            let reply = match self.call_node(node, &[b"CLUSTER", b"SLOTS"]) {
                Ok(v) => v,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match cluster_slot_ranges(&reply) {
                Some(ranges) => {
                    self.slots.fill(None);
                    for (a, b, addr) in ranges {
                        let i = self.node(&addr);
                        self.slots[usize::from(a)..=usize::from(b)].fill(Some(i));
                    }
                }
                None => self.slots.fill(Some(node)),
            }
            return Ok(());
        }
        Err(last.map_or(SlotsError::NoNodes, SlotsError::NoAnswer))
    }

    /// Sends a command on `key` to the node of its slot (every key of a multi-key command
    /// shares it), loading the table first if the slot's node is unknown. Refusals and
    /// redirections are counted and reported, not retried.
    pub fn attempt(&mut self, key: &[u8], args: &[&[u8]]) -> Attempt {
        let slot = key_slot(key);
        let node = match self.slot_node(slot) {
            Some(n) => n,
            None => {
                // A failure here shows as the slot still being unknown.
                let _ = self.load_slots();
                match self.slot_node(slot) {
                    Some(n) => n,
                    None => return Attempt::NoRoute,
                }
            }
        };
        match self.call_node(node, args) {
            Err(e) => Attempt::Failed(e),
            Ok(Value::Error(e)) => {
                if self.redirect(&e).is_some() {
                    Attempt::Moved
                } else if e.starts_with("TRYAGAIN") {
                    self.counters.tryagain += 1;
                    Attempt::TryAgain(e)
                } else if e.starts_with("CLUSTERDOWN") {
                    self.counters.clusterdown += 1;
                    Attempt::ClusterDown(e)
                } else {
                    Attempt::Reply(Value::Error(e))
                }
            }
            Ok(v) => Attempt::Reply(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinomo_shared::resp::{parse_command, Out, Proto};
    use std::net::TcpListener;

    /// What a fake node does with a command: a reply frame, or `None` to close the
    /// connection without one.
    type Script = fn(&str, &[Vec<u8>]) -> Option<Vec<u8>>;

    /// A node on a loopback port answering by `script`, which gets the node's own address.
    fn fake_node(script: Script) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let me = l.local_addr().expect("addr").to_string();
        let addr = me.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let me = me.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match parse_command(&buf, &Limits::default()) {
                            Ok(Some((args, n))) => {
                                buf.drain(..n);
                                let Some(reply) = script(&me, &args) else {
                                    return;
                                };
                                if s.write_all(&reply).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => match s.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            },
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        addr
    }

    fn frame(f: impl FnOnce(&mut Out<'_>)) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        f(&mut Out {
            buf: &mut buf,
            proto: Proto::Resp2,
        });
        Some(buf)
    }

    /// A node that owns nothing: every key command is `MOVED` to the port in its key.
    fn redirector(_: &str, args: &[Vec<u8>]) -> Option<Vec<u8>> {
        let key = String::from_utf8_lossy(&args[1]).into_owned();
        let slot = key_slot(key.as_bytes());
        frame(|o| o.error(&format!("MOVED {slot} 127.0.0.1:{key}")))
    }

    /// A node that answers every command, and `CLUSTER SLOTS` with an error as a server
    /// that is not in cluster mode does.
    fn standalone(_: &str, args: &[Vec<u8>]) -> Option<Vec<u8>> {
        match args[0].as_slice() {
            b"CLUSTER" => frame(|o| o.error("ERR This instance has cluster support disabled")),
            b"GET" => frame(|o| o.bulk(b"v")),
            _ => frame(|o| o.simple("OK")),
        }
    }

    /// A node that reads a command and hangs up.
    fn hangs_up(_: &str, _: &[Vec<u8>]) -> Option<Vec<u8>> {
        None
    }

    /// A node that serves every slot itself and lists itself in `CLUSTER SLOTS`.
    fn owner(me: &str, args: &[Vec<u8>]) -> Option<Vec<u8>> {
        match args[0].as_slice() {
            b"CLUSTER" => {
                let (host, port) = me.rsplit_once(':')?;
                let port: i64 = port.parse().ok()?;
                frame(|o| {
                    o.array(1);
                    o.array(3);
                    o.int(0);
                    o.int(i64::from(SLOTS) - 1);
                    o.array(2);
                    o.bulk(host.as_bytes());
                    o.int(port);
                })
            }
            b"SET" => frame(|o| o.simple("OK")),
            _ => frame(|o| o.error("TRYAGAIN the slot is moving to this node")),
        }
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Some(Duration::from_secs(5)),
            reply: Some(Duration::from_secs(30)),
        }
    }

    #[test]
    fn moved_replies_parse() {
        assert_eq!(parse_moved("MOVED 12182 h:7001"), Some((12182, "h:7001")));
        assert_eq!(parse_moved("MOVED 16384 h:7001"), None);
        assert_eq!(parse_moved("MOVED 5"), None);
        assert_eq!(parse_moved("TRYAGAIN MOVED 5 h:1"), None);
    }

    #[test]
    fn moved_is_followed_counted_and_remembered() {
        let target = fake_node(owner);
        let port = target.rsplit_once(':').expect("port").1.to_string();
        let first = fake_node(redirector);
        let mut c = ClusterClient::new(std::slice::from_ref(&first), timeouts());
        let reply = c.call_following(&first, &[b"SET", port.as_bytes(), b"v"], 2);
        assert_eq!(reply.expect("a reply"), Value::Simple("OK".into()));
        assert_eq!(c.counters().moved, 1);
        // The slot now points at the owner: the next command goes there directly.
        let slot = key_slot(port.as_bytes());
        assert_eq!(
            c.slot_node(slot).map(|n| c.nodes()[n].clone()),
            Some(target)
        );
        assert!(matches!(
            c.attempt(port.as_bytes(), &[b"SET", port.as_bytes(), b"w"]),
            Attempt::Reply(Value::Simple(s)) if s == "OK"
        ));
        assert_eq!(c.counters().moved, 1);
        // Out of sends: the MOVED reply itself comes back.
        let reply = c.call_following(&first, &[b"SET", port.as_bytes(), b"v"], 1);
        assert!(matches!(reply, Ok(Value::Error(e)) if e.starts_with("MOVED ")));
    }

    #[test]
    fn the_table_comes_from_cluster_slots_and_refusals_are_reported() {
        let node = fake_node(owner);
        let mut c = ClusterClient::new(std::slice::from_ref(&node), timeouts());
        assert_eq!(c.slot_node(0), None);
        assert!(matches!(
            c.attempt(b"k", &[b"GET", b"k"]),
            Attempt::TryAgain(e) if e.starts_with("TRYAGAIN")
        ));
        assert_eq!(c.slot_node(0), Some(0));
        assert_eq!(c.slot_node(SLOTS - 1), Some(0));
        assert_eq!(
            c.counters(),
            Counters {
                tryagain: 1,
                ..Counters::default()
            }
        );
    }

    #[test]
    fn a_node_not_in_cluster_mode_serves_every_slot() {
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let node = fake_node(standalone);
        let mut c = ClusterClient::new(&[dead, node], timeouts());
        c.load_slots().expect("slots");
        assert_eq!(c.slot_node(7), Some(1));
        assert!(matches!(
            c.attempt(b"k", &[b"GET", b"k"]),
            Attempt::Reply(Value::Bulk(v)) if v == b"v"
        ));
    }

    #[test]
    fn not_connected_and_no_reply_are_told_apart() {
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let mut c = ClusterClient::new(std::slice::from_ref(&dead), timeouts());
        let e = c
            .call_addr(&dead, &[b"SET", b"k", b"v"])
            .expect_err("refused");
        assert!(matches!(e, SendError::NotConnected { .. }), "{e}");
        assert!(e.to_string().contains(&dead), "{e}");
        let e = c.load_slots().expect_err("no node");
        assert!(
            e.to_string().starts_with("no node answers CLUSTER SLOTS"),
            "{e}"
        );
        assert!(matches!(c.attempt(b"k", &[b"GET", b"k"]), Attempt::NoRoute));

        let rude = fake_node(hangs_up);
        let e = c
            .call_addr(&rude, &[b"SET", b"k", b"v"])
            .expect_err("no reply");
        assert!(
            matches!(
                e,
                SendError::NoReply {
                    source: ReadError::Closed,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            ClusterClient::new(&[], timeouts()).load_slots(),
            Err(SlotsError::NoNodes)
        ));
    }
}
