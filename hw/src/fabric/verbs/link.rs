//! What both ends of a verbs connection share: the opened device, a connected RC queue pair
//! with its completion queues, and the control-frame buffers.

use dinomo_shared::msg::{Frame, MSG_SIZE};

use super::gid::{choose_gid_index, read_sysfs_gids, GidEntry, GidType, SYSFS_ROOT};
use super::sys::{
    Access, CompletionQueue, Context, DeviceCaps, MemoryRegion, PathParams, PortInfo,
    ProtectionDomain, QpCaps, QueuePair, LINK_LAYER_ETHERNET, PORT_ACTIVE,
};
use super::wire::EndpointInfo;
use super::wr::{Opcode, RecvWr, SendWr, CTL_SEND_BIT};
use super::{mtu_code, VerbsConfig};
use crate::fabric::FabricError;

/// An opened device with its protection domain and the port/GID in use.
pub(super) struct Device {
    pub ctx: Context,
    pub pd: ProtectionDomain,
    pub caps: DeviceCaps,
    pub port: PortInfo,
    pub gid: [u8; 16],
    /// The GID index in use: the configured one, or the automatic choice
    /// ([`super::gid::choose_gid_index`]).
    pub gid_index: u8,
    /// READ/atomic requests in flight per QP, each way (both ends' limits).
    pub rd_atomic: u8,
}

impl Device {
    pub fn open(name: Option<&str>, cfg: &VerbsConfig) -> Result<Self, FabricError> {
        cfg.validate()?;
        let ctx = Context::open(name)?;
        let caps = ctx.caps()?;
        let dev = ctx.name().to_owned();
        if caps.atomic_cap == rdma_sys::ibv_atomic_cap::IBV_ATOMIC_NONE {
            return Err(FabricError::Other(format!(
                "RDMA device {dev} does not support atomics (atomic_cap is IBV_ATOMIC_NONE); \
                 DINOMO needs CAS and FAA"
            )));
        }
        if cfg.port == 0 || cfg.port > caps.phys_ports.max(1) {
            return Err(FabricError::Other(format!(
                "RDMA device {dev} has {} port(s); port {} does not exist",
                caps.phys_ports, cfg.port
            )));
        }
        let port = ctx.port(cfg.port)?;
        if port.state != PORT_ACTIVE {
            return Err(FabricError::Other(format!(
                "port {} of RDMA device {dev} is not active (state {}); check `ibv_devinfo` \
                 and the link of its network interface",
                cfg.port, port.state
            )));
        }
        let gid_index = resolve_gid_index(&ctx, &port, cfg)?;
        let gid = ctx.gid(cfg.port, gid_index)?;
        if gid == [0; 16] {
            return Err(FabricError::Other(format!(
                "GID index {gid_index} of port {} of {dev} is empty; pick a populated one \
                 (`ibv_devinfo -v` lists the GID table)",
                cfg.port
            )));
        }
        let rd_atomic = caps
            .max_qp_rd_atom
            .min(caps.max_qp_init_rd_atom)
            .clamp(1, 16) as u8;
        let pd = ctx.alloc_pd()?;
        Ok(Self {
            ctx,
            pd,
            caps,
            port,
            gid,
            gid_index,
            rd_atomic,
        })
    }

    pub fn name(&self) -> &str {
        self.ctx.name()
    }

    /// The MTU code this side offers: the configured one, capped by the port's.
    pub fn mtu(&self, cfg: &VerbsConfig) -> u8 {
        let port = self.port.active_mtu.max(1);
        cfg.mtu.and_then(mtu_code).map_or(port, |m| m.min(port))
    }

    pub fn path(&self, cfg: &VerbsConfig, remote_access: bool) -> PathParams {
        PathParams {
            port: cfg.port,
            gid_index: self.gid_index,
            mtu: self.mtu(cfg),
            rd_atomic: self.rd_atomic,
            timeout: cfg.ack_timeout,
            retry_cnt: cfg.retry_cnt,
            rnr_retry: cfg.rnr_retry,
            min_rnr_timer: 12,
            remote_access,
        }
    }
}

/// The GID index `cfg` asks for, checked against the port's table, or the automatic choice
/// when it asks for none. The table comes from sysfs (with each entry's type); without
/// sysfs, from `ibv_query_gid` (types unknown).
fn resolve_gid_index(ctx: &Context, port: &PortInfo, cfg: &VerbsConfig) -> Result<u8, FabricError> {
    let dev = ctx.name();
    let table = match read_sysfs_gids(std::path::Path::new(SYSFS_ROOT), dev, cfg.port) {
        Ok(t) if !t.is_empty() => t,
        _ => (0..port.gid_table_len.min(256))
            .filter_map(|i| {
                let g = ctx.gid(cfg.port, i as u8).ok()?;
                Some(GidEntry {
                    index: i,
                    gid: g,
                    kind: GidType::Unknown,
                    netdev: None,
                })
            })
            .collect(),
    };
    let ethernet = u32::from(port.link_layer) == LINK_LAYER_ETHERNET;
    choose_gid_index(&table, ethernet, cfg.gid_index, dev, cfg.port).map_err(FabricError::Other)
}

/// A 24-bit initial packet sequence number, different per connection.
pub(super) fn random_psn() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() & 0xff_ffff) as u32
}

/// A queue pair in INIT with its completion queues.
pub(super) struct Link {
    pub qp: QueuePair,
    pub send_cq: CompletionQueue,
    pub recv_cq: CompletionQueue,
    pub local: EndpointInfo,
    pub path: PathParams,
}

impl Link {
    /// A new QP (in INIT) with room for `send_wrs` outstanding sends and `recv_wrs`
    /// receives.
    pub fn new(
        dev: &Device,
        cfg: &VerbsConfig,
        send_wrs: u32,
        recv_wrs: u32,
        remote_access: bool,
    ) -> Result<Self, FabricError> {
        let send_cq = dev.ctx.create_cq(send_wrs)?;
        let recv_cq = dev.ctx.create_cq(recv_wrs)?;
        let qp = QueuePair::create_rc(
            &dev.pd,
            &send_cq,
            &recv_cq,
            QpCaps {
                max_send_wr: send_wrs,
                max_recv_wr: recv_wrs,
                max_inline_data: cfg.max_inline,
            },
        )?;
        let path = dev.path(cfg, remote_access);
        qp.to_init(&path)?;
        let local = EndpointInfo {
            qpn: qp.qpn(),
            psn: random_psn(),
            lid: dev.port.lid,
            mtu: path.mtu,
            rd_atomic: dev.rd_atomic,
            gid: dev.gid,
        };
        Ok(Self {
            qp,
            send_cq,
            recv_cq,
            local,
            path,
        })
    }

    /// INIT → RTR → RTS towards `remote`.
    pub fn connect(&mut self, remote: &EndpointInfo) -> Result<(), FabricError> {
        let mut path = self.path;
        path.rd_atomic = path.rd_atomic.min(remote.rd_atomic.max(1));
        self.qp.to_rtr(&path, remote)?;
        self.qp.to_rts(&path, self.local.psn)
    }
}

/// Registered buffers for control frames: `n` receive slots (kept posted) and `n` send
/// slots.
pub(super) struct CtlSlots {
    recv: MemoryRegion,
    send: MemoryRegion,
    free_send: Vec<u32>,
    n: u32,
}

impl CtlSlots {
    pub fn new(dev: &Device, n: u32) -> Result<Self, FabricError> {
        let bytes = n as usize * MSG_SIZE;
        Ok(Self {
            recv: dev.pd.alloc(bytes, Access::LOCAL)?,
            send: dev.pd.alloc(bytes, Access::LOCAL)?,
            free_send: (0..n).rev().collect(),
            n,
        })
    }

    /// Attaches the buffers to `qp` and posts every receive slot.
    pub fn arm(&mut self, qp: &mut QueuePair) -> Result<(), FabricError> {
        qp.attach(&self.recv);
        qp.attach(&self.send);
        self.free_send = (0..self.n).rev().collect();
        let wrs: Vec<RecvWr> = (0..self.n).filter_map(|i| self.recv_wr(i)).collect();
        qp.post_recv(&wrs)
    }

    fn recv_wr(&self, slot: u32) -> Option<RecvWr> {
        let sge = self
            .recv
            .sge(u64::from(slot) * MSG_SIZE as u64, MSG_SIZE as u32)?;
        Some(RecvWr {
            wr_id: u64::from(slot),
            sge,
        })
    }

    /// The frame in receive slot `slot`; the slot is posted again.
    pub fn take_frame(&self, qp: &mut QueuePair, slot: u64) -> Result<Frame, FabricError> {
        let slot = u32::try_from(slot)
            .ok()
            .filter(|&s| s < self.n)
            .ok_or_else(|| {
                FabricError::Other(format!("receive completion for unknown slot {slot}"))
            })?;
        let at = slot as usize * MSG_SIZE;
        let mut b = [0u8; MSG_SIZE];
        b.copy_from_slice(&self.recv.bytes()[at..at + MSG_SIZE]);
        if let Some(wr) = self.recv_wr(slot) {
            qp.post_recv(&[wr])?;
        }
        Ok(Frame::from_bytes(&b))
    }

    /// Posts `frame` as a SEND from a free slot; `Ok(false)` if none is free.
    pub fn send(&mut self, qp: &mut QueuePair, frame: &Frame) -> Result<bool, FabricError> {
        let Some(slot) = self.free_send.pop() else {
            return Ok(false);
        };
        let at = slot as usize * MSG_SIZE;
        self.send.bytes_mut()[at..at + MSG_SIZE].copy_from_slice(&frame.to_bytes());
        let Some(sge) = self.send.sge(at as u64, MSG_SIZE as u32) else {
            self.free_send.push(slot);
            return Err(FabricError::Other(
                "control send slot outside its buffer".into(),
            ));
        };
        let wr = SendWr {
            wr_id: CTL_SEND_BIT | u64::from(slot),
            opcode: Opcode::Send,
            sge: Some(sge),
            remote_addr: 0,
            rkey: 0,
            compare_add: 0,
            swap: 0,
            signaled: true,
        };
        if let Err(e) = qp.post_send(&[wr]) {
            self.free_send.push(slot);
            return Err(e);
        }
        Ok(true)
    }

    /// A SEND from `wr_id`'s slot completed.
    pub fn send_done(&mut self, wr_id: u64) {
        let slot = (wr_id & !CTL_SEND_BIT) as u32;
        if slot < self.n && !self.free_send.contains(&slot) {
            self.free_send.push(slot);
        }
    }
}
