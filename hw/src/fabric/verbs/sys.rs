//! The only module of the verbs backend with `unsafe`: owning handles over `rdma-sys`.
//!
//! Destruction order is enforced by reference counting, after the design of the `ibverbs`
//! crate: a protection domain holds an `Arc` of its context, a memory region and a
//! completion queue hold one of their parent, and a queue pair holds its PD, both CQs and
//! every memory region it may touch ([`QueuePair::attach`]). A handle is destroyed only
//! after everything made from it, whatever order the owner drops them in.
//!
//! A queue pair refuses to post a scatter/gather entry that does not lie inside a memory
//! region attached to it, so the NIC only ever writes to memory that outlives the QP.

use std::ffi::CStr;
use std::io;
use std::os::raw::{c_int, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdma_sys as ffi;

use super::wire::EndpointInfo;
use super::wr::{device_list_error, Opcode, RecvWr, SendWr, Sge};
use crate::fabric::FabricError;
use crate::pmem::{Persist, Pmem};

/// The names of the RDMA devices on this host, or [`FabricError::NoDevice`] if there are
/// none (or the kernel has no verbs support).
pub fn device_names() -> Result<Vec<String>, FabricError> {
    let list = DeviceList::get()?;
    Ok(list.names())
}

/// The device list, freed on drop.
struct DeviceList {
    list: NonNull<*mut ffi::ibv_device>,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<Self, FabricError> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the returned list is freed in `Drop`.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        let Some(list) = NonNull::new(list) else {
            let errno = io::Error::last_os_error().raw_os_error();
            return Err(device_list_error(errno, 0, None, &[]));
        };
        let me = Self {
            list,
            len: usize::try_from(n).unwrap_or(0),
        };
        if me.len == 0 {
            return Err(device_list_error(None, 0, None, &[]));
        }
        Ok(me)
    }

    fn device(&self, i: usize) -> *mut ffi::ibv_device {
        if i >= self.len {
            return ptr::null_mut();
        }
        // SAFETY: the list holds `len` valid device pointers (then a NULL), and `i < len`.
        unsafe { *self.list.as_ptr().add(i) }
    }

    fn names(&self) -> Vec<String> {
        (0..self.len)
            .map(|i| {
                let d = self.device(i);
                // SAFETY: `d` is a device of the live list; the name is a NUL-terminated
                // string owned by the library for the list's lifetime, copied here.
                let name = unsafe { ffi::ibv_get_device_name(d) };
                if name.is_null() {
                    String::new()
                } else {
                    // SAFETY: as above, non-null and NUL-terminated.
                    unsafe { CStr::from_ptr(name) }
                        .to_string_lossy()
                        .into_owned()
                }
            })
            .collect()
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from `ibv_get_device_list` and is freed once; opened
        // contexts stay valid after the list is freed.
        unsafe { ffi::ibv_free_device_list(self.list.as_ptr()) }
    }
}

/// What a device can do that the fabric depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCaps {
    /// `IBV_ATOMIC_NONE` (0), `IBV_ATOMIC_HCA` (1) or `IBV_ATOMIC_GLOB` (2).
    pub atomic_cap: u32,
    /// Outstanding RDMA READ / atomic requests a QP may have as responder.
    pub max_qp_rd_atom: u32,
    /// ... and as initiator.
    pub max_qp_init_rd_atom: u32,
    pub max_qp_wr: u32,
    pub max_cqe: u32,
    pub max_mr_size: u64,
    pub phys_ports: u8,
}

/// A port's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// `IBV_PORT_ACTIVE` is 4.
    pub state: u32,
    pub lid: u16,
    /// `ibv_mtu` code (1 = 256 … 5 = 4096).
    pub active_mtu: u8,
    /// 1 = InfiniBand, 2 = Ethernet (RoCE).
    pub link_layer: u8,
    pub gid_table_len: u32,
}

pub const PORT_ACTIVE: u32 = ffi::ibv_port_state::IBV_PORT_ACTIVE;

/// `PortInfo::link_layer` of an Ethernet (RoCE) port.
pub const LINK_LAYER_ETHERNET: u32 = 2;

struct CtxInner {
    ctx: NonNull<ffi::ibv_context>,
    name: String,
}

// SAFETY: libibverbs contexts are thread-safe (verbs calls on one context may be made from
// any thread); the pointer is owned here and closed once.
unsafe impl Send for CtxInner {}
// SAFETY: as above.
unsafe impl Sync for CtxInner {}

impl Drop for CtxInner {
    fn drop(&mut self) {
        // SAFETY: opened by `ibv_open_device`, closed once, after every child (they hold an
        // `Arc` of this).
        unsafe { ffi::ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// An open device.
#[derive(Clone)]
pub struct Context {
    inner: Arc<CtxInner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.inner.name)
            .finish()
    }
}

fn os_err(what: &str) -> FabricError {
    FabricError::Other(format!("{what}: {}", io::Error::last_os_error()))
}

fn ret_err(what: &str, rc: c_int) -> FabricError {
    // Verbs calls return an errno value (or -1 with errno set).
    let e = if rc > 0 {
        io::Error::from_raw_os_error(rc)
    } else {
        io::Error::last_os_error()
    };
    FabricError::Other(format!("{what}: {e}"))
}

impl Context {
    /// Opens device `name`, or the first device if `name` is `None`.
    pub fn open(name: Option<&str>) -> Result<Self, FabricError> {
        let list = DeviceList::get()?;
        let names = list.names();
        let index = match name {
            None => 0,
            Some(want) => names
                .iter()
                .position(|n| n == want)
                .ok_or_else(|| device_list_error(None, names.len(), Some(want), &names))?,
        };
        // SAFETY: `device(index)` is a live device of the list; the context stays valid
        // after the list is freed.
        let ctx = unsafe { ffi::ibv_open_device(list.device(index)) };
        let ctx = NonNull::new(ctx)
            .ok_or_else(|| os_err(&format!("cannot open RDMA device {}", names[index])))?;
        Ok(Self {
            inner: Arc::new(CtxInner {
                ctx,
                name: names[index].clone(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn caps(&self) -> Result<DeviceCaps, FabricError> {
        // SAFETY: a plain C struct of integers and arrays; all-zero is a valid value.
        let mut a: ffi::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, valid out-pointer.
        let rc = unsafe { ffi::ibv_query_device(self.inner.ctx.as_ptr(), &mut a) };
        if rc != 0 {
            return Err(ret_err("ibv_query_device", rc));
        }
        let u = |v: c_int| u32::try_from(v).unwrap_or(0);
        Ok(DeviceCaps {
            atomic_cap: a.atomic_cap,
            max_qp_rd_atom: u(a.max_qp_rd_atom),
            max_qp_init_rd_atom: u(a.max_qp_init_rd_atom),
            max_qp_wr: u(a.max_qp_wr),
            max_cqe: u(a.max_cqe),
            max_mr_size: a.max_mr_size,
            phys_ports: a.phys_port_cnt,
        })
    }

    pub fn port(&self, port: u8) -> Result<PortInfo, FabricError> {
        // SAFETY: a plain C struct of integers; all-zero is a valid value.
        let mut p: ffi::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, valid out-pointer of the size the library expects.
        let rc = unsafe { ffi::___ibv_query_port(self.inner.ctx.as_ptr(), port, &mut p) };
        if rc != 0 {
            return Err(ret_err(&format!("cannot query port {port}"), rc));
        }
        Ok(PortInfo {
            state: p.state,
            lid: p.lid,
            active_mtu: u8::try_from(p.active_mtu).unwrap_or(1),
            link_layer: p.link_layer,
            gid_table_len: u32::try_from(p.gid_tbl_len).unwrap_or(0),
        })
    }

    pub fn gid(&self, port: u8, index: u8) -> Result<[u8; 16], FabricError> {
        let mut g = ffi::ibv_gid { raw: [0; 16] };
        // SAFETY: live context, valid out-pointer.
        let rc = unsafe {
            ffi::ibv_query_gid(self.inner.ctx.as_ptr(), port, c_int::from(index), &mut g)
        };
        if rc != 0 {
            return Err(ret_err(
                &format!("cannot read GID index {index} of port {port}"),
                rc,
            ));
        }
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        Ok(unsafe { g.raw })
    }

    pub fn alloc_pd(&self) -> Result<ProtectionDomain, FabricError> {
        // SAFETY: live context.
        let pd = unsafe { ffi::ibv_alloc_pd(self.inner.ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| os_err("ibv_alloc_pd"))?;
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                _ctx: Arc::clone(&self.inner),
            }),
        })
    }

    pub fn create_cq(&self, entries: u32) -> Result<CompletionQueue, FabricError> {
        let n = c_int::try_from(entries.max(1)).unwrap_or(c_int::MAX);
        // SAFETY: live context; no completion channel, no context pointer.
        let cq = unsafe {
            ffi::ibv_create_cq(
                self.inner.ctx.as_ptr(),
                n,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| os_err("ibv_create_cq"))?;
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                cq,
                _ctx: Arc::clone(&self.inner),
            }),
        })
    }
}

struct PdInner {
    pd: NonNull<ffi::ibv_pd>,
    _ctx: Arc<CtxInner>,
}

// SAFETY: verbs objects may be used from any thread; owned and freed once.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: allocated by `ibv_alloc_pd`, freed once after every MR and QP made in it
        // (they hold an `Arc` of this).
        unsafe { ffi::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A protection domain.
pub struct ProtectionDomain {
    inner: Arc<PdInner>,
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProtectionDomain")
    }
}

/// Access rights of a memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub remote_read: bool,
    pub remote_write: bool,
    pub remote_atomic: bool,
}

impl Access {
    /// Local use only (the target of READs and atomics posted here, the source of WRITEs).
    pub const LOCAL: Self = Self {
        remote_read: false,
        remote_write: false,
        remote_atomic: false,
    };
    /// The DPM region: READ, WRITE and atomics from KNs.
    pub const REMOTE_ALL: Self = Self {
        remote_read: true,
        remote_write: true,
        remote_atomic: true,
    };

    fn bits(self) -> c_int {
        let mut b = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if self.remote_read {
            b |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        if self.remote_write {
            b |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        if self.remote_atomic {
            b |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0;
        }
        c_int::try_from(b).unwrap_or(0)
    }
}

/// Alignment of owned buffers: a page, so that a buffer of up to a page never straddles
/// two (the NIC, or soft-RoCE's copy, then touches one page per small transfer), as
/// perftest's `memalign`ed buffers.
const BUF_ALIGN: usize = 4096;

/// Memory a region may be registered over: owned here or kept alive by a [`Pmem`].
enum Memory {
    /// `len` zeroed bytes from the global allocator, aligned to [`BUF_ALIGN`], freed on
    /// drop (held raw: the device and [`MemoryRegion`] use the pointer).
    Owned {
        ptr: *mut u8,
        len: usize,
    },
    Region {
        _keep: Box<dyn RegionKeeper>,
    },
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Self::Owned { ptr, len } = *self {
            if let Ok(layout) = std::alloc::Layout::from_size_align(len, BUF_ALIGN) {
                // SAFETY: `ptr` came from `alloc_zeroed` with this very layout (checked at
                // allocation) and is freed once, after the MR over it was deregistered
                // (`MrInner` drops this after `ibv_dereg_mr`).
                unsafe { std::alloc::dealloc(ptr, layout) };
            }
        }
    }
}

/// Keeps a [`Pmem`]'s memory mapped.
trait RegionKeeper: Send + Sync {}
impl<P: Persist + 'static> RegionKeeper for Arc<Pmem<P>> {}

struct MrInner {
    mr: NonNull<ffi::ibv_mr>,
    addr: u64,
    len: u64,
    lkey: u32,
    rkey: u32,
    _mem: Memory,
    _pd: Arc<PdInner>,
}

// SAFETY: the MR handle is used only to deregister it; the memory it covers is owned (or
// kept alive) by this value and accessed by Rust code only through `MemoryRegion`.
unsafe impl Send for MrInner {}
// SAFETY: as above; `MrInner` exposes no access to the bytes.
unsafe impl Sync for MrInner {}

impl Drop for MrInner {
    fn drop(&mut self) {
        // SAFETY: registered by `ibv_reg_mr`, deregistered once, after every QP that could
        // use it (attached QPs hold an `Arc` of this); the memory is freed after this.
        unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A registered memory region.
pub struct MemoryRegion {
    inner: Arc<MrInner>,
    /// Bytes the owner asked for (an owned region registers at least one byte).
    len: usize,
    owned_ptr: *mut u8,
}

// SAFETY: the byte pointer is into memory owned by `inner`; `&mut` access goes through
// `&mut self`, so one thread at a time.
unsafe impl Send for MemoryRegion {}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.inner.addr))
            .field("len", &self.inner.len)
            .field("lkey", &self.inner.lkey)
            .field("rkey", &self.inner.rkey)
            .finish()
    }
}

impl ProtectionDomain {
    fn register(
        &self,
        addr: *mut u8,
        len: usize,
        mem: Memory,
        access: Access,
    ) -> Result<Arc<MrInner>, FabricError> {
        // SAFETY: `addr..addr + len` is memory owned by (or kept alive by) `mem`, which the
        // returned `MrInner` holds until after it deregisters the region.
        let mr = unsafe {
            ffi::ibv_reg_mr(
                self.inner.pd.as_ptr(),
                addr.cast::<c_void>(),
                len,
                access.bits(),
            )
        };
        let mr = NonNull::new(mr).ok_or(FabricError::BufferAlloc {
            len,
            why: "ibv_reg_mr failed (raise the locked-memory limit: ulimit -l unlimited)",
        })?;
        // SAFETY: `mr` is a live MR returned just now; the keys are plain integers.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(Arc::new(MrInner {
            mr,
            addr: addr as u64,
            len: len as u64,
            lkey,
            rkey,
            _mem: mem,
            _pd: Arc::clone(&self.inner),
        }))
    }

    /// Registers `len` zeroed bytes owned by the region.
    pub fn alloc(&self, len: usize, access: Access) -> Result<MemoryRegion, FabricError> {
        let n = len.max(1);
        let layout = std::alloc::Layout::from_size_align(n, BUF_ALIGN).map_err(|_| {
            FabricError::BufferAlloc {
                len,
                why: "larger than the address space",
            }
        })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(FabricError::BufferAlloc {
                len,
                why: "out of memory",
            });
        }
        let inner = self.register(ptr, n, Memory::Owned { ptr, len: n }, access)?;
        Ok(MemoryRegion {
            inner,
            len,
            owned_ptr: ptr,
        })
    }

    /// Registers the whole of `pmem` (the DPM region), which stays mapped as long as the
    /// registration lives. Its bytes are reached through the `Pmem`, not through the MR.
    pub fn register_pmem<P: Persist + 'static>(
        &self,
        pmem: Arc<Pmem<P>>,
        access: Access,
    ) -> Result<MemoryRegion, FabricError> {
        let len = usize::try_from(pmem.len()).map_err(|_| FabricError::BufferAlloc {
            len: usize::MAX,
            why: "region larger than the address space",
        })?;
        let ptr = pmem.base_ptr();
        let inner = self.register(
            ptr,
            len,
            Memory::Region {
                _keep: Box::new(pmem),
            },
            access,
        )?;
        Ok(MemoryRegion {
            inner,
            len: 0,
            owned_ptr: ptr::null_mut(),
        })
    }
}

impl MemoryRegion {
    pub fn lkey(&self) -> u32 {
        self.inner.lkey
    }
    pub fn rkey(&self) -> u32 {
        self.inner.rkey
    }
    /// Virtual address of the first byte (what a remote peer adds offsets to).
    pub fn addr(&self) -> u64 {
        self.inner.addr
    }
    /// Registered length.
    pub fn registered_len(&self) -> u64 {
        self.inner.len
    }
    /// The scatter/gather entry for `[offset, offset + len)`, if inside.
    pub fn sge(&self, offset: u64, len: u32) -> Option<Sge> {
        let end = offset.checked_add(u64::from(len))?;
        (end <= self.inner.len).then(|| Sge {
            addr: self.inner.addr + offset,
            len,
            lkey: self.inner.lkey,
        })
    }

    /// The bytes of an owned region (empty for a registered `Pmem`).
    pub fn bytes(&self) -> &[u8] {
        if self.owned_ptr.is_null() {
            return &[];
        }
        // SAFETY: `owned_ptr` points to at least `len` bytes owned by `inner`; Rust code
        // reaches them only through this handle. The NIC may write them while a READ or
        // atomic into them is outstanding (the fabric's documented contract).
        unsafe { std::slice::from_raw_parts(self.owned_ptr, self.len) }
    }

    /// The bytes of an owned region, mutable (empty for a registered `Pmem`).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        if self.owned_ptr.is_null() {
            return &mut [];
        }
        // SAFETY: as in `bytes`, and `&mut self` makes this the only Rust access.
        unsafe { std::slice::from_raw_parts_mut(self.owned_ptr, self.len) }
    }
}

struct CqInner {
    cq: NonNull<ffi::ibv_cq>,
    _ctx: Arc<CtxInner>,
}

// SAFETY: verbs objects may be used from any thread; owned and destroyed once.
unsafe impl Send for CqInner {}
// SAFETY: as above (each CQ is polled by its owner only, through `&self` on one thread).
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_cq`, destroyed once after the QPs using it.
        unsafe { ffi::ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// A completion queue.
pub struct CompletionQueue {
    inner: Arc<CqInner>,
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompletionQueue")
    }
}

/// One work completion, as the device reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkCompletion {
    pub wr_id: u64,
    /// `ibv_wc_status` code.
    pub status: u32,
    /// `ibv_wc_opcode` code (valid only on success).
    pub opcode: u32,
    pub byte_len: u32,
    pub vendor_err: u32,
}

impl CompletionQueue {
    /// Takes up to `out.len()` (at most [`CQ_BATCH`]) completions without blocking.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize, FabricError> {
        let mut wcs = std::mem::MaybeUninit::<[ffi::ibv_wc; CQ_BATCH]>::uninit();
        let first = wcs.as_mut_ptr().cast::<ffi::ibv_wc>();
        let n = out.len().min(CQ_BATCH);
        // SAFETY: live CQ; `wcs` has room for `n` entries, of which the library writes the
        // first `rc` (uninitialised memory is fine for an out-array).
        let rc = unsafe { ffi::ibv_poll_cq(self.inner.cq.as_ptr(), n as c_int, first) };
        if rc < 0 {
            return Err(FabricError::Other(format!(
                "ibv_poll_cq failed ({rc}): the completion queue is broken"
            )));
        }
        let got = usize::try_from(rc).unwrap_or(0).min(n);
        for (k, o) in out.iter_mut().enumerate().take(got) {
            // SAFETY: `ibv_poll_cq` initialised the first `got` entries; `k < got <= n`.
            let w = unsafe { &*first.add(k) };
            *o = WorkCompletion {
                wr_id: w.wr_id,
                status: w.status,
                opcode: w.opcode,
                byte_len: w.byte_len,
                vendor_err: w.vendor_err,
            };
        }
        Ok(got)
    }
}

/// Completions taken per `ibv_poll_cq` call: enough that one call drains what a full queue
/// of signaled requests produces in one pass, few enough to stay on the stack.
pub const CQ_BATCH: usize = 32;

/// Sizes of a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    /// Bytes of payload a WRITE or SEND may carry in its work request
    /// (`IBV_SEND_INLINE`); asked at creation, 0 for none. A device that cannot give it gets
    /// a queue pair without inline data instead.
    pub max_inline_data: u32,
}

/// How to reach the peer and how hard to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathParams {
    pub port: u8,
    pub gid_index: u8,
    /// `ibv_mtu` code.
    pub mtu: u8,
    /// Outstanding READ/atomic requests, each way.
    pub rd_atomic: u8,
    /// Local ACK timeout: 4.096 µs × 2^timeout.
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub min_rnr_timer: u8,
    /// Accept remote READ/WRITE/atomics on this QP (the DPM side).
    pub remote_access: bool,
}

/// An RC queue pair.
pub struct QueuePair {
    qp: NonNull<ffi::ibv_qp>,
    mrs: Vec<Arc<MrInner>>,
    _pd: Arc<PdInner>,
    _send_cq: Arc<CqInner>,
    _recv_cq: Arc<CqInner>,
    /// Inline payload bytes the device granted (0: none).
    max_inline: u32,
    /// `ibv_post_send` calls made: one doorbell each.
    doorbells: u64,
    // Reused lists, so posting allocates nothing once they have grown.
    wr_buf: Vec<ffi::ibv_send_wr>,
    sge_buf: Vec<ffi::ibv_sge>,
    recv_buf: Vec<ffi::ibv_recv_wr>,
    recv_sge_buf: Vec<ffi::ibv_sge>,
}

// SAFETY: verbs objects may be used from any thread; the scratch vectors hold raw pointers
// only for the duration of one `post_send`/`post_recv` call.
unsafe impl Send for QueuePair {}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qpn", &self.qpn())
            .finish()
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by `ibv_create_qp`, destroyed once; the device stops accessing
        // the attached memory regions before they are released (after this, with `mrs`).
        unsafe { ffi::ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

impl QueuePair {
    /// Creates an RC QP in `pd` with its completion queues. If the device refuses the
    /// inline size asked for, the QP is created without inline data (a WRITE then always
    /// goes by DMA from its registered buffer, which every device does).
    pub fn create_rc(
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        caps: QpCaps,
    ) -> Result<Self, FabricError> {
        let create = |inline: u32| {
            // SAFETY: a plain C struct of pointers and integers; all-zero is valid (NULL
            // SRQ).
            let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
            init.send_cq = send_cq.inner.cq.as_ptr();
            init.recv_cq = recv_cq.inner.cq.as_ptr();
            init.cap.max_send_wr = caps.max_send_wr.max(1);
            init.cap.max_recv_wr = caps.max_recv_wr.max(1);
            init.cap.max_send_sge = 1;
            init.cap.max_recv_sge = 1;
            init.cap.max_inline_data = inline;
            init.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
            // Only work requests flagged IBV_SEND_SIGNALED make completions; the client
            // infers the others' from a later one (send queue completions are in order).
            init.sq_sig_all = 0;
            // SAFETY: live PD and CQs (kept alive by the `Arc`s stored below), valid
            // attrs; on success the library writes the granted caps back into `init`.
            let qp = unsafe { ffi::ibv_create_qp(pd.inner.pd.as_ptr(), &mut init) };
            // The provider may grant more than asked; it never grants less.
            NonNull::new(qp).map(|qp| (qp, init.cap.max_inline_data))
        };
        let (qp, max_inline) = match create(caps.max_inline_data) {
            Some(q) => q,
            None if caps.max_inline_data > 0 => create(0).ok_or_else(|| os_err("ibv_create_qp"))?,
            None => return Err(os_err("ibv_create_qp")),
        };
        Ok(Self {
            qp,
            mrs: Vec::new(),
            _pd: Arc::clone(&pd.inner),
            _send_cq: Arc::clone(&send_cq.inner),
            _recv_cq: Arc::clone(&recv_cq.inner),
            max_inline,
            doorbells: 0,
            wr_buf: Vec::new(),
            sge_buf: Vec::new(),
            recv_buf: Vec::new(),
            recv_sge_buf: Vec::new(),
        })
    }

    /// Inline payload bytes a WRITE or SEND may carry (0: the device gave none).
    pub fn max_inline(&self) -> u32 {
        self.max_inline
    }

    /// Doorbells rung so far (`ibv_post_send` calls; a linked list of requests is one).
    pub fn doorbells(&self) -> u64 {
        self.doorbells
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: live QP; `qp_num` is an integer set at creation.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    /// Lets work requests on this QP use `mr`, which then lives at least as long as the QP.
    pub fn attach(&mut self, mr: &MemoryRegion) {
        if !self.mrs.iter().any(|m| Arc::ptr_eq(m, &mr.inner)) {
            self.mrs.push(Arc::clone(&mr.inner));
        }
    }

    fn check_sge(&self, s: &Sge) -> Result<(), FabricError> {
        let end = s.addr.checked_add(u64::from(s.len));
        let ok = self.mrs.iter().any(|m| {
            m.lkey == s.lkey && s.addr >= m.addr && end.is_some_and(|e| e <= m.addr + m.len)
        });
        if ok {
            Ok(())
        } else {
            Err(FabricError::Other(format!(
                "scatter/gather entry {s:?} is not inside a memory region of this queue pair"
            )))
        }
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: u32,
        what: &str,
    ) -> Result<(), FabricError> {
        // SAFETY: live QP, `attr` valid for the fields named by `mask`.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp.as_ptr(), attr, mask as c_int) };
        if rc != 0 {
            return Err(ret_err(
                &format!("cannot move the queue pair to {what}"),
                rc,
            ));
        }
        Ok(())
    }

    /// RESET → INIT.
    pub fn to_init(&self, p: &PathParams) -> Result<(), FabricError> {
        use ffi::ibv_qp_attr_mask as M;
        // SAFETY: a plain C struct; all-zero is valid.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = p.port;
        a.qp_access_flags = if p.remote_access {
            Access::REMOTE_ALL.bits() as u32
        } else {
            Access::LOCAL.bits() as u32
        };
        let mask = M::IBV_QP_STATE.0
            | M::IBV_QP_PKEY_INDEX.0
            | M::IBV_QP_PORT.0
            | M::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut a, mask, "INIT")
    }

    /// INIT → RTR, addressed by GID (`is_global`) so RoCE and soft-RoCE work.
    pub fn to_rtr(&self, p: &PathParams, remote: &EndpointInfo) -> Result<(), FabricError> {
        use ffi::ibv_qp_attr_mask as M;
        // SAFETY: a plain C struct; all-zero is valid.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = u32::from(p.mtu.min(remote.mtu).max(1));
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = p.rd_atomic;
        a.min_rnr_timer = p.min_rnr_timer;
        a.ah_attr.is_global = 1;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = p.port;
        a.ah_attr.grh.dgid = ffi::ibv_gid { raw: remote.gid };
        a.ah_attr.grh.sgid_index = p.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.grh.flow_label = 0;
        a.ah_attr.grh.traffic_class = 0;
        let mask = M::IBV_QP_STATE.0
            | M::IBV_QP_AV.0
            | M::IBV_QP_PATH_MTU.0
            | M::IBV_QP_DEST_QPN.0
            | M::IBV_QP_RQ_PSN.0
            | M::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | M::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut a, mask, "RTR")
    }

    /// RTR → RTS.
    pub fn to_rts(&self, p: &PathParams, local_psn: u32) -> Result<(), FabricError> {
        use ffi::ibv_qp_attr_mask as M;
        // SAFETY: a plain C struct; all-zero is valid.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        a.timeout = p.timeout;
        a.retry_cnt = p.retry_cnt;
        a.rnr_retry = p.rnr_retry;
        a.sq_psn = local_psn;
        a.max_rd_atomic = p.rd_atomic;
        let mask = M::IBV_QP_STATE.0
            | M::IBV_QP_TIMEOUT.0
            | M::IBV_QP_RETRY_CNT.0
            | M::IBV_QP_RNR_RETRY.0
            | M::IBV_QP_SQ_PSN.0
            | M::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut a, mask, "RTS")
    }

    /// Moves the QP to ERROR: outstanding work requests complete with a flush error.
    pub fn to_error(&self) -> Result<(), FabricError> {
        // SAFETY: a plain C struct; all-zero is valid.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, ffi::ibv_qp_attr_mask::IBV_QP_STATE.0, "ERROR")
    }

    /// Posts `wrs` as one linked list: one doorbell. Every scatter/gather entry must lie in
    /// a region attached to this QP; nothing is posted otherwise. A WRITE or SEND whose
    /// payload fits [`QueuePair::max_inline`] goes inline: the CPU copies it into the work
    /// request at post time, which saves the NIC a DMA read of the buffer on the critical
    /// path.
    pub fn post_send(&mut self, wrs: &[SendWr]) -> Result<(), FabricError> {
        if wrs.is_empty() {
            return Ok(());
        }
        for w in wrs {
            if let Some(s) = &w.sge {
                self.check_sge(s)?;
            }
        }
        self.sge_buf.clear();
        self.wr_buf.clear();
        for w in wrs {
            let s = w.sge.unwrap_or_default();
            self.sge_buf.push(ffi::ibv_sge {
                addr: s.addr,
                length: s.len,
                lkey: s.lkey,
            });
        }
        for (i, w) in wrs.iter().enumerate() {
            // SAFETY: `ibv_send_wr` is a C struct of integers, pointers and unions of
            // those; all-zero is valid (NULL `next`, no SGEs).
            let mut x: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
            x.wr_id = w.wr_id;
            x.opcode = w.opcode.ibv();
            x.send_flags = send_flags(w, self.max_inline);
            x.num_sge = c_int::from(w.sge.is_some());
            x.sg_list = self.sge_buf.as_mut_ptr().wrapping_add(i);
            match w.opcode {
                Opcode::CompareSwap | Opcode::FetchAdd => {
                    x.wr.atomic = ffi::atomic_t {
                        remote_addr: w.remote_addr,
                        compare_add: w.compare_add,
                        swap: w.swap,
                        rkey: w.rkey,
                    };
                }
                Opcode::Read | Opcode::Write => {
                    x.wr.rdma = ffi::rdma_t {
                        remote_addr: w.remote_addr,
                        rkey: w.rkey,
                    };
                }
                Opcode::Send => {}
            }
            self.wr_buf.push(x);
        }
        // Link the list only now that the vector no longer moves.
        let first = self.wr_buf.as_mut_ptr();
        let n = self.wr_buf.len();
        for (i, x) in self.wr_buf.iter_mut().enumerate().take(n - 1) {
            x.next = first.wrapping_add(i + 1);
        }
        let base = self.wr_buf.as_mut_ptr();
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP; the list and its SGEs live in `wr_buf`/`sge_buf`, unchanged for
        // the call; every SGE was checked to lie in an attached region, which outlives the
        // QP, so the device's later DMA stays in live memory (inline payloads are copied
        // during the call).
        let rc = unsafe { ffi::ibv_post_send(self.qp.as_ptr(), base, &mut bad) };
        self.doorbells += 1;
        if rc != 0 {
            return Err(ret_err("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Posts receive buffers (one doorbell).
    pub fn post_recv(&mut self, wrs: &[RecvWr]) -> Result<(), FabricError> {
        if wrs.is_empty() {
            return Ok(());
        }
        for w in wrs {
            self.check_sge(&w.sge)?;
        }
        self.recv_sge_buf.clear();
        self.recv_buf.clear();
        self.recv_sge_buf.extend(wrs.iter().map(|w| ffi::ibv_sge {
            addr: w.sge.addr,
            length: w.sge.len,
            lkey: w.sge.lkey,
        }));
        let sp = self.recv_sge_buf.as_mut_ptr();
        self.recv_buf
            .extend(wrs.iter().enumerate().map(|(i, w)| ffi::ibv_recv_wr {
                wr_id: w.wr_id,
                next: ptr::null_mut(),
                sg_list: sp.wrapping_add(i),
                num_sge: 1,
            }));
        let first = self.recv_buf.as_mut_ptr();
        let n = self.recv_buf.len();
        for (i, x) in self.recv_buf.iter_mut().enumerate().take(n - 1) {
            x.next = first.wrapping_add(i + 1);
        }
        let base = self.recv_buf.as_mut_ptr();
        let mut bad: *mut ffi::ibv_recv_wr = ptr::null_mut();
        // SAFETY: live QP; the list and its SGEs live in `recv_buf`/`recv_sge_buf`,
        // unchanged for the call; every SGE lies in an attached region, which outlives the
        // QP.
        let rc = unsafe { ffi::ibv_post_recv(self.qp.as_ptr(), base, &mut bad) };
        if rc != 0 {
            return Err(ret_err("ibv_post_recv", rc));
        }
        Ok(())
    }
}

/// The `send_flags` of `w` on a queue pair with `max_inline` bytes of inline data.
fn send_flags(w: &SendWr, max_inline: u32) -> u32 {
    let mut f = 0;
    if w.signaled {
        f |= ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
    }
    if inline_fits(w, max_inline) {
        f |= ffi::ibv_send_flags::IBV_SEND_INLINE.0;
    }
    f
}

/// Whether `w` carries its payload inline: a WRITE or SEND of 1..=`max_inline` bytes (READs
/// and atomics have nothing to send; an empty one needs no copy).
pub fn inline_fits(w: &SendWr, max_inline: u32) -> bool {
    matches!(w.opcode, Opcode::Write | Opcode::Send)
        && w.sge.is_some_and(|s| s.len > 0 && s.len <= max_inline)
}

/// `ibv_wc_status_str` of the installed library, for messages.
pub fn library_status_str(status: u32) -> String {
    // SAFETY: returns a pointer to a static string (or "unknown") for any value.
    let p = unsafe { ffi::ibv_wc_status_str(status) };
    if p.is_null() {
        return String::from("unknown");
    }
    // SAFETY: non-null, static and NUL-terminated.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
