//! The RDMA verbs backend of [`Fabric`](super::Fabric) (cargo feature `rdma`).
//!
//! A KN shard holds one [`VerbsFabric`]: an RC queue pair to the DPM over which it posts
//! one-sided READ, WRITE, CAS and FAA against the DPM's registered region, and SEND/RECV
//! of 64-byte control frames into pre-posted receive buffers. The DPM runs a
//! [`VerbsServer`], which registers its region once, accepts connections and hands every
//! control frame to a handler (the memory node's `Dpm::handle`).
//!
//! Connections are set up out of band over TCP ([`wire`]): both sides exchange QP number,
//! PSN, LID, GID and MTU, and the DPM adds the region's rkey, base address and length once
//! the KN proved it holds the cluster secret ([`handshake`]; each handshake on a thread of
//! its own, so a silent peer never holds up the DPM's control thread). When a KN is fenced
//! its queue pairs are moved to the error state ([`VerbsServer::revoke`]).
//! Queue pairs are addressed by GID (`is_global`), so InfiniBand, RoCE and soft-RoCE
//! (`rdma_rxe`) all work; the GID index and MTU are settings.
//!
//! Layers: [`sys`] (the only `unsafe`: owning handles over `rdma-sys`), [`wr`] (work
//! request translation and status names, testable without a device), [`wire`], and the
//! KN and DPM ends.
//!
//! Durability: FLUSH is carried out as a small READ on the same QP after the WRITEs
//! ([`FlushMode::Read`]). `rdma-sys` 0.3 (bindings of rdma-core 44) has no RDMA FLUSH
//! opcode, so [`FlushMode::Native`] is refused at connect until the bindings grow one.

mod client;
#[cfg(test)]
mod device_tests;
pub mod gid;
pub mod handshake;
mod link;
mod reconnect;
mod server;
pub mod sys;
pub mod wire;
pub mod wr;

use std::time::Duration;

pub use client::VerbsFabric;
pub use server::VerbsServer;
pub use sys::{device_names, DeviceCaps, PortInfo};
pub use wr::FlushMode;

use super::shm::DEFAULT_QUEUE_DEPTH;
use super::FabricError;

/// Settings of a verbs connection (both ends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerbsConfig {
    /// Device port (1 on single-port devices).
    pub port: u8,
    /// Index in the port's GID table of the source GID; `None`: chosen automatically (RoCE:
    /// the RoCE v2 entry of the interface's IPv4 address; InfiniBand: 0), see
    /// [`gid::choose_gid_index`]. An index that is empty or outside the table is an error
    /// that lists the valid ones.
    pub gid_index: Option<u8>,
    /// Path MTU in bytes (256, 512, 1024, 2048, 4096); `None`: the port's active MTU.
    pub mtu: Option<u32>,
    /// One-sided work requests outstanding at once.
    pub queue_depth: usize,
    /// Inline payload bytes asked for at queue pair creation: a WRITE (or control SEND) no
    /// larger goes inside its work request (`IBV_SEND_INLINE`), sparing the NIC a DMA read.
    /// A device that refuses it gets a queue pair without inline data.
    pub max_inline: u32,
    /// Of a run of WRITEs, every `signal_every`-th asks for a completion (as does the last
    /// WRITE of each post, and every READ and atomic); the others' completions are inferred
    /// from the next one, since a queue pair completes its sends in order. 1 signals all.
    pub signal_every: u32,
    /// Pre-posted receive buffers (and send buffers) for control frames.
    pub ctl_slots: u32,
    pub flush: FlushMode,
    /// Local ACK timeout exponent: 4.096 µs × 2^timeout per try (14 ≈ 67 ms).
    pub ack_timeout: u8,
    /// Retransmissions before a work request fails with "retry exceeded" (at most 7).
    pub retry_cnt: u8,
    /// Retries when the peer has no receive posted (7: forever).
    pub rnr_retry: u8,
    /// How long the TCP exchange may take.
    pub connect_timeout: Duration,
    /// The cluster secret the handshake is authenticated with ([`handshake`]); without one
    /// the DPM serves, and a KN reaches, loopback addresses only.
    pub secret: Option<dinomo_shared::auth::ClusterSecret>,
    /// The KN a connection speaks for, named in its handshake so that the DPM revokes the
    /// connection when it fences the KN (`None`: not a registered KN, e.g. the manager).
    pub kn_id: Option<u32>,
}

impl Default for VerbsConfig {
    fn default() -> Self {
        Self {
            port: 1,
            gid_index: None,
            mtu: None,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_inline: DEFAULT_MAX_INLINE,
            signal_every: DEFAULT_SIGNAL_EVERY,
            ctl_slots: 16,
            flush: FlushMode::Read,
            ack_timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            connect_timeout: Duration::from_secs(5),
            secret: None,
            kn_id: None,
        }
    }
}

/// Inline bytes asked for by default: a cache line's worth of small values and log
/// entries, and a 64-byte control frame, with room; ConnectX and soft-RoCE grant it.
pub const DEFAULT_MAX_INLINE: u32 = 256;

/// WRITEs per signaled WRITE by default (perftest's `ib_write_bw` signals every 100th; a
/// KN's queue is shallower, and a completion frees the queue slots of all before it).
pub const DEFAULT_SIGNAL_EVERY: u32 = 16;

/// The TCP port a DPM listens on unless told otherwise (perftest's default).
pub const DEFAULT_TCP_PORT: u16 = 18515;

/// The `ibv_mtu` code of an MTU in bytes.
pub fn mtu_code(bytes: u32) -> Option<u8> {
    match bytes {
        256 => Some(1),
        512 => Some(2),
        1024 => Some(3),
        2048 => Some(4),
        4096 => Some(5),
        _ => None,
    }
}

impl VerbsConfig {
    /// Checks the settings that need no device.
    pub fn validate(&self) -> Result<(), FabricError> {
        if let Some(m) = self.mtu {
            if mtu_code(m).is_none() {
                return Err(FabricError::Other(format!(
                    "MTU {m} is not one of 256, 512, 1024, 2048, 4096"
                )));
            }
        }
        if self.queue_depth == 0 || self.queue_depth > 1 << 14 {
            return Err(FabricError::Other(format!(
                "queue depth {} is outside 1..=16384",
                self.queue_depth
            )));
        }
        if self.ctl_slots == 0 || self.ctl_slots > 1024 {
            return Err(FabricError::Other(format!(
                "{} control slots is outside 1..=1024",
                self.ctl_slots
            )));
        }
        if self.signal_every == 0 {
            return Err(FabricError::Other(
                "signal_every must be at least 1 (1: every WRITE signaled)".into(),
            ));
        }
        if self.max_inline > 4096 {
            return Err(FabricError::Other(format!(
                "max_inline {} is above 4096 bytes",
                self.max_inline
            )));
        }
        if self.retry_cnt > 7 || self.rnr_retry > 7 || self.ack_timeout > 31 {
            return Err(FabricError::Other(
                "retry_cnt and rnr_retry are 3-bit fields (0..=7), ack_timeout 5-bit".into(),
            ));
        }
        if self.flush == FlushMode::Native {
            return Err(FabricError::Other(
                "flush mode `native` needs the RDMA FLUSH opcode, which rdma-sys 0.3 does not \
                 expose; use flush mode `read`"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked_without_a_device() {
        VerbsConfig::default()
            .validate()
            .expect("defaults are valid");
        assert_eq!(mtu_code(1024), Some(3));
        assert_eq!(mtu_code(4096), Some(5));
        assert_eq!(mtu_code(1500), None);
        let bad = [
            VerbsConfig {
                mtu: Some(1500),
                ..Default::default()
            },
            VerbsConfig {
                queue_depth: 0,
                ..Default::default()
            },
            VerbsConfig {
                ctl_slots: 0,
                ..Default::default()
            },
            VerbsConfig {
                retry_cnt: 8,
                ..Default::default()
            },
            VerbsConfig {
                signal_every: 0,
                ..Default::default()
            },
            VerbsConfig {
                max_inline: 1 << 20,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        let native = VerbsConfig {
            flush: FlushMode::Native,
            ..Default::default()
        };
        let msg = native.validate().expect_err("native flush").to_string();
        assert!(msg.contains("rdma-sys") && msg.contains("`read`"), "{msg}");
    }

    #[test]
    fn no_device_here_is_a_clear_error() {
        // On a machine without RDMA devices (CI), listing them says so; with one, it names it.
        match device_names() {
            Err(FabricError::NoDevice(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(names) => assert!(!names.is_empty()),
        }
    }
}
