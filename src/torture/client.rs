//! A RESP cluster client that says what happened to every command: answered, refused
//! before it ran (`MOVED` followed, `TRYAGAIN`/`CLUSTERDOWN` retried until a deadline),
//! or sent without a usable answer (the outcome of a write is then unknown).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::resp::{encode_command, parse_value, Limits, Value};
use dinomo_shared::slot::{key_slot, SLOTS};

/// How a command failed.
#[derive(Debug)]
pub enum Failure {
    /// Never executed: no node could be reached, or every node refused it until the deadline.
    NotSent,
    /// Sent, but the connection failed or timed out before the reply, or the reply was an
    /// error other than a refusal: a write may or may not have taken effect.
    Unknown(String),
}

/// Slot table, connections by node, a reused request buffer.
pub struct ClusterClient {
    nodes: Vec<String>,
    conns: HashMap<usize, (TcpStream, Vec<u8>)>,
    /// Node of every slot (`None`: ask `CLUSTER SLOTS`).
    slots: Vec<Option<usize>>,
    reply_timeout: Duration,
    req: Vec<u8>,
}

/// A connection attempt or call that failed, and whether the command may have been sent.
enum CallError {
    Connect,
    Sent(String),
}

impl ClusterClient {
    /// `seeds`: every KN address (a node that is down is skipped).
    pub fn new(seeds: &[String], reply_timeout: Duration) -> Self {
        Self {
            nodes: seeds.to_vec(),
            conns: HashMap::new(),
            slots: vec![None; SLOTS as usize],
            reply_timeout,
            req: Vec::new(),
        }
    }

    fn node(&mut self, addr: &str) -> usize {
        match self.nodes.iter().position(|a| a == addr) {
            Some(i) => i,
            None => {
                self.nodes.push(addr.to_string());
                self.nodes.len() - 1
            }
        }
    }

    /// Fills the slot table from the first node that answers `CLUSTER SLOTS`.
    fn load_slots(&mut self) -> bool {
        for node in 0..self.nodes.len() {
            let Some(ranges) = self
                .call_on(node, &[b"CLUSTER", b"SLOTS"])
                .ok()
                .and_then(|v| crate::resp::cluster_slot_ranges(&v))
            else {
                continue;
            };
            self.slots.fill(None);
            for (a, b, addr) in ranges {
                let i = self.node(&addr);
                self.slots[a as usize..=b as usize].fill(Some(i));
            }
            return true;
        }
        false
    }

    fn call_on(&mut self, node: usize, args: &[&[u8]]) -> Result<Value, CallError> {
        if !self.conns.contains_key(&node) {
            let addr: SocketAddr = self.nodes[node].parse().map_err(|_| CallError::Connect)?;
            let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .map_err(|_| CallError::Connect)?;
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(self.reply_timeout));
            self.conns.insert(node, (s, Vec::with_capacity(4096)));
        }
        self.req.clear();
        encode_command(&mut self.req, args);
        let Some((s, buf)) = self.conns.get_mut(&node) else {
            return Err(CallError::Connect);
        };
        let r = (|| -> Result<Value, String> {
            s.write_all(&self.req).map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 16384];
            loop {
                match parse_value(buf, &Limits::default()) {
                    Ok(Some((v, n))) => {
                        buf.drain(..n);
                        return Ok(v);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("bad reply: {e}")),
                }
                match s.read(&mut chunk) {
                    Ok(0) => return Err("the node closed the connection".into()),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })();
        if r.is_err() {
            self.conns.remove(&node);
        }
        r.map_err(CallError::Sent)
    }

    /// Runs a command on `key`'s node (every key of a multi-key command shares its slot).
    pub fn exec(
        &mut self,
        key: &[u8],
        args: &[&[u8]],
        deadline: Instant,
    ) -> Result<Value, Failure> {
        let slot = key_slot(key) as usize;
        while Instant::now() < deadline {
            let node = match self.slots[slot] {
                Some(n) => n,
                None => {
                    if !self.load_slots() || self.slots[slot].is_none() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    continue;
                }
            };
            match self.call_on(node, args) {
                Err(CallError::Connect) => {
                    self.slots.fill(None);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(CallError::Sent(e)) => {
                    self.slots.fill(None);
                    return Err(Failure::Unknown(e));
                }
                Ok(Value::Error(e)) if e.starts_with("MOVED ") => {
                    match e.split_whitespace().nth(2) {
                        Some(addr) => {
                            let addr = addr.to_string();
                            self.slots[slot] = Some(self.node(&addr));
                        }
                        None => return Err(Failure::Unknown(format!("bad MOVED reply {e:?}"))),
                    }
                }
                Ok(Value::Error(e))
                    if e.starts_with("TRYAGAIN") || e.starts_with("CLUSTERDOWN") =>
                {
                    if e.starts_with("CLUSTERDOWN") {
                        self.slots.fill(None);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(Value::Error(e)) => return Err(Failure::Unknown(e)),
                Ok(v) => return Ok(v),
            }
        }
        Err(Failure::NotSent)
    }
}
