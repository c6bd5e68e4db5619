//! The out-of-band connection exchange over TCP: each side tells the other its queue pair
//! number, packet sequence number, LID, GID and MTU; the DPM adds the region's rkey, base
//! address and length — but only to a peer that proved it holds the cluster secret.
//!
//! A message is a 12-byte header — magic `DNVB`, version (u16), kind (u16), body length
//! (u32) — and a body of at most [`MAX_BODY`] bytes, all little-endian. The magic tells a
//! foreign peer (an HTTP client, a port scanner) from a KN; the version refuses a peer of
//! another build instead of misreading it.
//!
//! ```text
//! KN  → DPM   Hello     { endpoint, kn, nonce_kn }
//! DPM → KN    Challenge { nonce_dpm }                    (a DPM with a cluster secret)
//! KN  → DPM   Proof     { tag_kn }
//! DPM → KN    Accept    { endpoint, rkey, base, len, tag_dpm }   or   Reject { reason }
//! KN  → DPM   Ready                                      (both QPs are in RTS)
//! ```
//!
//! `kn` is the KN id the connection speaks for ([`NO_KN`] for a process that is not a
//! registered KN, such as a KN's probe before it registered or the manager); the DPM
//! revokes the connection when it fences that KN and refuses it while the KN stays fenced.
//! `tag_kn` is the HMAC ([`dinomo_shared::auth`]) of both nonces and the Hello's body, so it
//! proves the secret without revealing it and cannot be replayed for another challenge,
//! endpoint or KN; the DPM creates no queue pair and reveals no rkey before it verified it.
//! `tag_dpm` covers both nonces and the Accept's fields, so the KN knows the region it
//! writes to is served by a member of its cluster. A DPM without a secret (loopback only)
//! skips Challenge and Proof and sends a zero `tag_dpm`.

use std::io::{self, Read, Write};

use dinomo_shared::auth::{Nonce, Tag, NONCE_LEN, TAG_LEN};

/// Identifies a verbs connection exchange.
pub const MAGIC: [u8; 4] = *b"DNVB";
/// Version of this exchange; bumped when a body changes (2: authenticated).
pub const VERSION: u16 = 2;
/// Header bytes.
pub const HEADER_LEN: usize = 12;
/// Largest body accepted (a reject reason is cut to fit).
pub const MAX_BODY: usize = 512;

const K_HELLO: u16 = 1;
const K_ACCEPT: u16 = 2;
const K_REJECT: u16 = 3;
const K_READY: u16 = 4;
const K_CHALLENGE: u16 = 5;
const K_PROOF: u16 = 6;

const ENDPOINT_LEN: usize = 4 + 4 + 2 + 1 + 1 + 16;
const HELLO_LEN: usize = ENDPOINT_LEN + 4 + NONCE_LEN;

/// The `kn` of a Hello from a process that does not speak for a registered KN.
pub const NO_KN: u32 = u32::MAX;
const ACCEPT_FIELDS_LEN: usize = ENDPOINT_LEN + 4 + 8 + 8;
const ACCEPT_LEN: usize = ACCEPT_FIELDS_LEN + TAG_LEN;

/// HMAC domain of the KN's proof.
pub const DOMAIN_KN: &[u8] = b"dinomo/verbs-handshake/kn/v2";
/// HMAC domain of the DPM's proof.
pub const DOMAIN_DPM: &[u8] = b"dinomo/verbs-handshake/dpm/v2";

/// One side of an RC connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
    pub lid: u16,
    /// `ibv_mtu` code the side can use (1 = 256 … 5 = 4096).
    pub mtu: u8,
    /// READ/atomic requests the side allows in flight.
    pub rd_atomic: u8,
    pub gid: [u8; 16],
}

/// A message of the exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello {
        ep: EndpointInfo,
        /// The KN this connection speaks for, or [`NO_KN`].
        kn: u32,
        nonce: Nonce,
    },
    Challenge {
        nonce: Nonce,
    },
    Proof {
        tag: Tag,
    },
    Accept {
        ep: EndpointInfo,
        rkey: u32,
        base: u64,
        len: u64,
        /// The DPM's proof (zero from a DPM without a secret).
        tag: Tag,
    },
    Reject(String),
    Ready,
}

/// Why bytes are not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the peer is not a DINOMO verbs endpoint (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("the peer speaks connection-exchange version {got}, this build speaks {want}")]
    Version { got: u16, want: u16 },
    #[error("truncated message: {got} of {need} bytes")]
    Truncated { got: usize, need: usize },
    #[error("oversized message: body of {0} bytes (at most {MAX_BODY})")]
    Oversized(usize),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("message kind {kind} has a body of {got} bytes, expected {want}")]
    BadLength { kind: u16, got: usize, want: usize },
    #[error("reject reason is not UTF-8")]
    BadText,
}

fn put_ep(b: &mut Vec<u8>, e: &EndpointInfo) {
    b.extend_from_slice(&e.qpn.to_le_bytes());
    b.extend_from_slice(&e.psn.to_le_bytes());
    b.extend_from_slice(&e.lid.to_le_bytes());
    b.push(e.mtu);
    b.push(e.rd_atomic);
    b.extend_from_slice(&e.gid);
}

/// Little-endian reads from a body whose length was checked.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let (head, rest) = self.0.split_at(N.min(self.0.len()));
        a[..head.len()].copy_from_slice(head);
        self.0 = rest;
        a
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn ep(&mut self) -> EndpointInfo {
        EndpointInfo {
            qpn: self.u32(),
            psn: self.u32(),
            lid: self.u16(),
            mtu: self.u8(),
            rd_atomic: self.u8(),
            gid: self.take(),
        }
    }
}

impl Msg {
    fn kind(&self) -> u16 {
        match self {
            Self::Hello { .. } => K_HELLO,
            Self::Challenge { .. } => K_CHALLENGE,
            Self::Proof { .. } => K_PROOF,
            Self::Accept { .. } => K_ACCEPT,
            Self::Reject(_) => K_REJECT,
            Self::Ready => K_READY,
        }
    }

    /// The message's bytes, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(ACCEPT_LEN);
        match self {
            Self::Hello { ep, kn, nonce } => body.extend_from_slice(&hello_body(ep, *kn, nonce)),
            Self::Challenge { nonce } => body.extend_from_slice(nonce),
            Self::Proof { tag } => body.extend_from_slice(tag),
            Self::Accept {
                ep,
                rkey,
                base,
                len,
                tag,
            } => {
                body.extend_from_slice(&accept_fields(ep, *rkey, *base, *len));
                body.extend_from_slice(tag);
            }
            Self::Reject(why) => {
                let mut end = why.len().min(MAX_BODY);
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                body.extend_from_slice(&why.as_bytes()[..end]);
            }
            Self::Ready => {}
        }
        let mut b = Vec::with_capacity(HEADER_LEN + body.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.kind().to_le_bytes());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(&body);
        b
    }

    /// Checks a header; returns the message kind and body length.
    pub fn decode_header(h: &[u8]) -> Result<(u16, usize), WireError> {
        if h.len() < HEADER_LEN {
            return Err(WireError::Truncated {
                got: h.len(),
                need: HEADER_LEN,
            });
        }
        let mut c = Cursor(h);
        let magic = c.take::<4>();
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = c.u16();
        if version != VERSION {
            return Err(WireError::Version {
                got: version,
                want: VERSION,
            });
        }
        let kind = c.u16();
        let len = c.u32() as usize;
        if len > MAX_BODY {
            return Err(WireError::Oversized(len));
        }
        Ok((kind, len))
    }

    /// Decodes a body of message kind `kind`.
    pub fn decode_body(kind: u16, body: &[u8]) -> Result<Self, WireError> {
        let want = match kind {
            K_HELLO => HELLO_LEN,
            K_CHALLENGE => NONCE_LEN,
            K_PROOF => TAG_LEN,
            K_ACCEPT => ACCEPT_LEN,
            K_READY => 0,
            K_REJECT => body.len(),
            k => return Err(WireError::UnknownKind(k)),
        };
        if body.len() != want {
            return Err(WireError::BadLength {
                kind,
                got: body.len(),
                want,
            });
        }
        let mut c = Cursor(body);
        Ok(match kind {
            K_HELLO => Self::Hello {
                ep: c.ep(),
                kn: c.u32(),
                nonce: c.take(),
            },
            K_CHALLENGE => Self::Challenge { nonce: c.take() },
            K_PROOF => Self::Proof { tag: c.take() },
            K_ACCEPT => Self::Accept {
                ep: c.ep(),
                rkey: c.u32(),
                base: c.u64(),
                len: c.u64(),
                tag: c.take(),
            },
            K_READY => Self::Ready,
            _ => Self::Reject(String::from_utf8(body.to_vec()).map_err(|_| WireError::BadText)?),
        })
    }

    /// Decodes one whole message from the start of `b`; returns it and the bytes used.
    pub fn decode(b: &[u8]) -> Result<(Self, usize), WireError> {
        let (kind, len) = Self::decode_header(b)?;
        let need = HEADER_LEN + len;
        if b.len() < need {
            return Err(WireError::Truncated { got: b.len(), need });
        }
        Ok((Self::decode_body(kind, &b[HEADER_LEN..need])?, need))
    }
}

/// The bytes of a Hello's body (what the KN's proof covers).
pub fn hello_body(ep: &EndpointInfo, kn: u32, nonce: &Nonce) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    put_ep(&mut b, ep);
    b.extend_from_slice(&kn.to_le_bytes());
    b.extend_from_slice(nonce);
    b
}

/// The bytes of an Accept's fields before its tag (what the DPM's proof covers).
pub fn accept_fields(ep: &EndpointInfo, rkey: u32, base: u64, len: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(ACCEPT_FIELDS_LEN);
    put_ep(&mut b, ep);
    b.extend_from_slice(&rkey.to_le_bytes());
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b
}

/// Why an exchange over a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes one message.
pub fn write_msg(w: &mut impl Write, m: &Msg) -> Result<(), ExchangeError> {
    w.write_all(&m.encode())?;
    w.flush()?;
    Ok(())
}

/// Reads one message (the stream's read timeout bounds the wait).
pub fn read_msg(r: &mut impl Read) -> Result<Msg, ExchangeError> {
    let mut h = [0u8; HEADER_LEN];
    read_full(r, &mut h)?;
    let (kind, len) = Msg::decode_header(&h)?;
    let mut body = vec![0u8; len];
    read_full(r, &mut body).map_err(|e| match e {
        ExchangeError::Wire(WireError::Truncated { got, .. }) => {
            ExchangeError::Wire(WireError::Truncated {
                got: HEADER_LEN + got,
                need: HEADER_LEN + len,
            })
        }
        e => e,
    })?;
    Ok(Msg::decode_body(kind, &body)?)
}

/// Fills `buf`; a stream that ends early is a truncated message.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ExchangeError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(WireError::Truncated {
                    got,
                    need: buf.len(),
                }
                .into())
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(n: u32) -> EndpointInfo {
        EndpointInfo {
            qpn: 0x12_3456 + n,
            psn: 0xab_cdef,
            lid: 7,
            mtu: 3,
            rd_atomic: 16,
            gid: [
                0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x42, 0xac, 0xff, 0xfe, 0x11, 0, n as u8,
            ],
        }
    }

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello {
                ep: ep(1),
                kn: 3,
                nonce: [7; NONCE_LEN],
            },
            Msg::Challenge {
                nonce: [9; NONCE_LEN],
            },
            Msg::Proof { tag: [3; TAG_LEN] },
            Msg::Accept {
                ep: ep(2),
                rkey: 0xdead_beef,
                base: 0x7f12_3456_7000,
                len: 48 << 20,
                tag: [5; TAG_LEN],
            },
            Msg::Reject("no free queue pairs".into()),
            Msg::Reject(String::new()),
            Msg::Ready,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let b = m.encode();
            let (back, used) = Msg::decode(&b).expect("decode");
            assert_eq!(back, m);
            assert_eq!(used, b.len());
            // Through a stream too, two messages back to back.
            let mut two = b.clone();
            two.extend_from_slice(&Msg::Ready.encode());
            let mut r = &two[..];
            assert_eq!(read_msg(&mut r).expect("first"), m);
            assert_eq!(read_msg(&mut r).expect("second"), Msg::Ready);
            assert!(r.is_empty());
        }
        let hello = Msg::Hello {
            ep: ep(0),
            kn: NO_KN,
            nonce: [1; NONCE_LEN],
        };
        assert_eq!(hello.encode().len(), HEADER_LEN + HELLO_LEN);
    }

    #[test]
    fn version_mismatch_and_foreign_peers_are_refused() {
        let mut b = Msg::Ready.encode();
        b[4..6].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(Msg::decode(&b), Err(WireError::Version { got: 1, want: 2 }));
        let msg = Msg::decode(&b).expect_err("version").to_string();
        assert!(
            msg.contains("version 1") && msg.contains("speaks 2"),
            "{msg}"
        );
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let e = Msg::decode(http).expect_err("http");
        assert!(matches!(e, WireError::BadMagic(_)));
        assert!(e.to_string().contains("not a DINOMO verbs endpoint"));
        let mut b = Msg::Ready.encode();
        b[6..8].copy_from_slice(&99u16.to_le_bytes());
        assert_eq!(Msg::decode(&b), Err(WireError::UnknownKind(99)));
    }

    #[test]
    fn truncated_and_oversized_messages_are_refused() {
        let b = Msg::Accept {
            ep: ep(3),
            rkey: 1,
            base: 2,
            len: 3,
            tag: [0; TAG_LEN],
        }
        .encode();
        for cut in [0, 5, HEADER_LEN - 1, HEADER_LEN, b.len() - 1] {
            let e = Msg::decode(&b[..cut]).expect_err("truncated");
            assert!(matches!(e, WireError::Truncated { .. }), "{cut}: {e}");
            let mut r = &b[..cut];
            let e = read_msg(&mut r).expect_err("truncated stream");
            assert!(
                matches!(e, ExchangeError::Wire(WireError::Truncated { .. })),
                "{cut}: {e}"
            );
        }
        // A header announcing a huge body is refused before anything is allocated.
        let mut h = Msg::Ready.encode();
        h[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert_eq!(Msg::decode(&h), Err(WireError::Oversized(1 << 30)));
        // A body of the wrong size for its kind.
        let mut b = Msg::Hello {
            ep: ep(1),
            kn: 1,
            nonce: [0; NONCE_LEN],
        }
        .encode();
        b.push(0);
        b[8..12].copy_from_slice(&((HELLO_LEN + 1) as u32).to_le_bytes());
        assert!(matches!(
            Msg::decode(&b),
            Err(WireError::BadLength { kind: 1, .. })
        ));
        // A long reject reason is cut to fit, on a character boundary.
        let long = "é".repeat(MAX_BODY);
        let (m, _) = Msg::decode(&Msg::Reject(long).encode()).expect("long reject");
        let Msg::Reject(r) = m else {
            panic!("not a reject")
        };
        assert!(r.len() <= MAX_BODY && r.chars().all(|c| c == 'é'));
        let mut bad = Msg::Reject("ab".into()).encode();
        bad[HEADER_LEN] = 0xff;
        assert_eq!(Msg::decode(&bad), Err(WireError::BadText));
    }
}
