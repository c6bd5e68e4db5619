//! Clover (Tsai, Shan, Zhang, USENIX ATC 2020), the shared-everything baseline, on the same
//! region type, fabric and NIC model as DINOMO.
//!
//! * **Data area.** A region of fixed-size version slots, reached only by one-sided verbs.
//!   The memory node is passive (no merge workers): that is Clover's point.
//! * **Versions.** Every write is out of place: a KN takes a free slot from its local pool,
//!   WRITEs the new version there (header + key + value, made durable with a FLUSH in the
//!   same round trip), then links it after the key's current tail with one CAS on the tail's
//!   `next` word (+ FLUSH, again one round trip). A version's `next` word holds
//!   `TAIL | generation` while it is the tail, and the next version's offset once linked.
//!   The generation is handed out with the slot, so a CAS aimed at a slot that was
//!   reclaimed and reused (a different generation) fails instead of corrupting a chain.
//! * **Reads.** A KN caches *shortcuts only* (key → some version of it; LRU under a byte
//!   budget). A read with a shortcut READs that version; while its `next` is a pointer it
//!   follows the chain, one READ per hop, and moves the shortcut to the tail. Without a
//!   shortcut it asks the metadata server where the key lives, then READs from there.
//! * **Metadata server (MS).** A separate thread with its own CPU time (measured): it hands
//!   out free slots in batches, keeps the key → recent-version index, and collects garbage:
//!   a writer reports the version it superseded (piggybacked on its next allocation
//!   request), the MS moves the index past it and, after a quarantine of
//!   [`QUARANTINE_PER_LANE`] slots per KN lane (Clover's epoch-based reclamation reduced to
//!   a FIFO delay), hands the slot out again with a new generation.
//! * **Requests spread over KNs.** Any KN serves any key; each operation goes to the next KN
//!   in round-robin order (see [`CloverClient`]).
//!
//! Reclamation has a known window, as in any epoch-free scheme: a pointer kept from before a
//! slot's reuse (a stale shortcut, or a `next` word of a reclaimed version) can lead to the
//! slot's new version, possibly before its writer has linked it. Keys are checked on every
//! READ, so such a pointer never yields another key's data; a writer never links a version
//! after itself; and the MS moves its index past a slot before reusing it. The quarantine
//! makes the window rare (a slot is reused only after `QUARANTINE_PER_LANE` × lanes later
//! reclamations).
//!
//! Counting: fabric round trips, verbs and bytes are counted per KN lane like DINOMO's; every
//! MS request is one more round trip (a two-sided exchange with another machine) and is
//! also counted on its own. Deletes are not implemented (the benchmarks do not issue them).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use dinomo_hw::fabric::nic::NicProfile;
use dinomo_hw::fabric::{
    execute, Completion, CompletionStatus, Connection, ControlServer, DpmSpec, Fabric,
    FabricCounters, LocalBuf, LocalDpm, Verb, WorkRequest,
};
use dinomo_hw::heap::HeapRegion;
use dinomo_shared::crc::crc32c_seeded;
use dinomo_shared::entry::MAX_KEY_LEN;
use host_kn::dac::DacStats;
use host_kn::ShardStats;

/// `next` word of a tail version: this bit set, the slot's generation in the low bits.
pub const TAIL: u64 = 1 << 63;
/// Bytes of a version header: next (8), generation (8), key_len (2), pad (2), val_len (4),
/// crc (4), pad (4).
pub const VERSION_HEADER: usize = 32;
/// Slots allocated per MS request.
pub const ALLOC_BATCH: usize = 64;
/// Reclaimed slots wait behind this many others (per KN lane) before reuse.
pub const QUARANTINE_PER_LANE: usize = 1024;
/// Where the first slot starts (offset 0 stays unused, so a pointer is never 0).
const DATA_BASE: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts before a read or write gives up on a chain that keeps changing under it.
const MAX_RESTARTS: usize = 64;
/// Versions one walk may follow before it gives up.
const MAX_HOPS: u64 = 1 << 20;

/// How to build a Clover cluster.
#[derive(Clone, Debug)]
pub struct CloverConfig {
    pub kns: u16,
    /// Lanes (worker threads with their own connection) per KN; they share the KN's cache.
    pub lanes_per_kn: u16,
    /// Largest key and value the slots must hold.
    pub max_key: usize,
    pub max_value: usize,
    /// Version slots in the data area.
    pub slots: u64,
    /// Shortcut cache bytes per KN.
    pub cache_bytes_per_kn: u64,
    pub nic: NicProfile,
}

/// Why a Clover operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CloverError {
    #[error("invalid Clover configuration: {0}")]
    Config(String),
    #[error("key of {0} bytes is outside 1..={MAX_KEY_LEN}")]
    Key(usize),
    #[error("value of {len} bytes exceeds the slot capacity of {max}")]
    Value { len: usize, max: usize },
    #[error("fabric: {0}")]
    Fabric(#[from] dinomo_hw::fabric::FabricError),
    #[error("verb failed: {0}")]
    Verb(CompletionStatus),
    #[error("the metadata server is gone")]
    MsGone,
    #[error("the data area is full")]
    Full,
    #[error("the version chain of a key kept changing; gave up after {MAX_RESTARTS} restarts")]
    Livelock,
}

/// A version as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    next: u64,
    gen: u64,
    key: Vec<u8>,
    value: Vec<u8>,
}

fn version_crc(gen: u64, key: &[u8], value: &[u8]) -> u32 {
    let lens = [
        (key.len() as u16).to_le_bytes().as_slice(),
        &(value.len() as u32).to_le_bytes(),
    ]
    .concat();
    crc32c_seeded(0x0C10_E4E4_u32, &[&gen.to_le_bytes(), &lens, key, value])
}

/// Encodes a version into `out` (which must hold the header, key and value).
fn encode_version(out: &mut [u8], gen: u64, key: &[u8], value: &[u8]) -> usize {
    let n = VERSION_HEADER + key.len() + value.len();
    out[0..8].copy_from_slice(&(TAIL | gen).to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    out[16..18].copy_from_slice(&(key.len() as u16).to_le_bytes());
    out[18..20].fill(0);
    out[20..24].copy_from_slice(&(value.len() as u32).to_le_bytes());
    out[24..28].copy_from_slice(&version_crc(gen, key, value).to_le_bytes());
    out[28..32].fill(0);
    out[VERSION_HEADER..VERSION_HEADER + key.len()].copy_from_slice(key);
    out[VERSION_HEADER + key.len()..n].copy_from_slice(value);
    n
}

/// Decodes a slot; `None` for a torn, free or foreign slot.
fn decode_version(b: &[u8]) -> Option<Version> {
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let next = u64_at(0);
    let gen = u64_at(8);
    let key_len = u16::from_le_bytes([b[16], b[17]]) as usize;
    let val_len = u32::from_le_bytes(b[20..24].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[24..28].try_into().ok()?);
    let end = VERSION_HEADER.checked_add(key_len)?.checked_add(val_len)?;
    if gen == 0 || key_len == 0 || end > b.len() {
        return None;
    }
    let key = &b[VERSION_HEADER..VERSION_HEADER + key_len];
    let value = &b[VERSION_HEADER + key_len..end];
    (version_crc(gen, key, value) == crc).then(|| Version {
        next,
        gen,
        key: key.to_vec(),
        value: value.to_vec(),
    })
}

/// A slot handed out by the MS: its offset and the generation its next version carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotGrant {
    pub ptr: u64,
    pub gen: u64,
}

/// A superseded version, reported to the MS for reclamation.
#[derive(Clone, Debug)]
struct Retire {
    key: Vec<u8>,
    old: u64,
    new: SlotGrant,
}

enum MsRequest {
    /// `n` free slots; the retired versions ride along.
    Alloc {
        n: usize,
        retired: Vec<Retire>,
        reply: Sender<Result<Vec<SlotGrant>, CloverError>>,
    },
    /// Where `key` lives (some version at or before its tail).
    Lookup {
        key: Vec<u8>,
        reply: Sender<Option<SlotGrant>>,
    },
    /// First version of a new key; answers the version already there if another KN won.
    Insert {
        key: Vec<u8>,
        at: SlotGrant,
        reply: Sender<Option<SlotGrant>>,
    },
    Stop,
}

/// What the MS did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsStats {
    pub requests: u64,
    pub allocs: u64,
    pub lookups: u64,
    pub inserts: u64,
    pub reclaimed: u64,
    /// CPU time of the MS thread spent serving requests (measured, this machine).
    pub cpu_ns: u64,
}

#[derive(Default)]
struct MsState {
    free: VecDeque<u64>,
    /// Retired slots waiting for reuse, with the key whose version they held.
    quarantine: VecDeque<(u64, Vec<u8>)>,
    /// Quarantined slot → the version that superseded it (its chain successor).
    successor: HashMap<u64, SlotGrant>,
    index: HashMap<Vec<u8>, SlotGrant>,
    next_gen: u64,
    quarantine_len: usize,
    stats: MsStats,
}

impl MsState {
    fn grant(&mut self) -> Option<SlotGrant> {
        let ptr = match self.free.pop_front() {
            Some(p) => p,
            None => self.take_quarantined()?,
        };
        self.next_gen += 1;
        Some(SlotGrant {
            ptr,
            gen: self.next_gen,
        })
    }

    fn take_quarantined(&mut self) -> Option<u64> {
        let (p, key) = self.quarantine.pop_front()?;
        // The index must never name a slot that is about to be reused.
        self.advance_index(&key);
        self.successor.remove(&p);
        self.stats.reclaimed += 1;
        Some(p)
    }

    /// Moves `key`'s index entry past every quarantined version.
    fn advance_index(&mut self, key: &[u8]) {
        if let Some(at) = self.index.get_mut(key) {
            let mut hops = 0;
            while let Some(s) = self.successor.get(&at.ptr) {
                *at = *s;
                hops += 1;
                if hops > self.successor.len() {
                    break;
                }
            }
        }
    }

    fn retire(&mut self, r: Retire) {
        self.successor.insert(r.old, r.new);
        self.advance_index(&r.key);
        self.quarantine.push_back((r.old, r.key));
        while self.quarantine.len() > self.quarantine_len {
            if let Some(p) = self.take_quarantined() {
                self.free.push_back(p);
            }
        }
    }

    /// Serves one request; returns its reply, to be delivered after the MS's CPU time is
    /// taken (delivery stands in for posting a SEND on the MS's NIC, which is not the MS's
    /// work to model), or `None` to stop.
    fn serve(&mut self, req: MsRequest) -> Option<MsReply> {
        self.stats.requests += 1;
        Some(match req {
            MsRequest::Alloc { n, retired, reply } => {
                self.stats.allocs += 1;
                for r in retired {
                    self.retire(r);
                }
                let grants: Option<Vec<SlotGrant>> = (0..n).map(|_| self.grant()).collect();
                MsReply::Alloc(reply, grants.ok_or(CloverError::Full))
            }
            MsRequest::Lookup { key, reply } => {
                self.stats.lookups += 1;
                MsReply::Where(reply, self.index.get(&key).copied())
            }
            MsRequest::Insert { key, at, reply } => {
                self.stats.inserts += 1;
                let prev = match self.index.get(&key) {
                    Some(p) => Some(*p),
                    None => {
                        self.index.insert(key, at);
                        None
                    }
                };
                MsReply::Where(reply, prev)
            }
            MsRequest::Stop => return None,
        })
    }
}

/// A reply of the MS and where it goes.
enum MsReply {
    Alloc(
        Sender<Result<Vec<SlotGrant>, CloverError>>,
        Result<Vec<SlotGrant>, CloverError>,
    ),
    Where(Sender<Option<SlotGrant>>, Option<SlotGrant>),
}

impl MsReply {
    fn deliver(self) {
        match self {
            Self::Alloc(tx, r) => {
                let _ = tx.send(r);
            }
            Self::Where(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The shortcut cache of a KN: key → version, LRU under a byte budget (lazy deletion queue).
#[derive(Debug)]
struct Shortcuts {
    map: HashMap<Vec<u8>, (SlotGrant, u64)>,
    order: VecDeque<(Vec<u8>, u64)>,
    tick: u64,
    capacity: usize,
    charge: u64,
    evictions: u64,
}

impl Shortcuts {
    fn new(budget: u64, charge: u64) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            tick: 0,
            capacity: (budget / charge.max(1)) as usize,
            charge,
            evictions: 0,
        }
    }

    fn get(&mut self, key: &[u8]) -> Option<SlotGrant> {
        self.tick += 1;
        let t = self.tick;
        let (g, last) = self.map.get_mut(key)?;
        *last = t;
        let g = *g;
        self.order.push_back((key.to_vec(), t));
        self.compact();
        Some(g)
    }

    fn put(&mut self, key: &[u8], g: SlotGrant) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        let t = self.tick;
        self.map.insert(key.to_vec(), (g, t));
        self.order.push_back((key.to_vec(), t));
        while self.map.len() > self.capacity {
            let Some((k, t)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|(_, last)| *last == t) {
                self.map.remove(&k);
                self.evictions += 1;
            }
        }
        self.compact();
    }

    fn remove(&mut self, key: &[u8]) {
        self.map.remove(key);
    }

    /// Drops queue records that no longer match their key's last use.
    fn compact(&mut self) {
        if self.order.len() > 4 * self.map.len() + 1024 {
            let map = &self.map;
            self.order
                .retain(|(k, t)| map.get(k).is_some_and(|(_, last)| last == t));
        }
    }
}

/// Counters of one KN lane.
#[derive(Clone, Copy, Debug, Default)]
struct LaneStats {
    gets: u64,
    puts: u64,
    hit_shortcut: u64,
    miss: u64,
    absent: u64,
    stale: u64,
    read_rts: u64,
    write_rts: u64,
    miss_rts: u64,
    ms_requests: u64,
    chain_hops: u64,
    cas_failures: u64,
}

/// One worker of a KN: a connection, a slot pool, and a buffer.
struct Lane {
    f: Connection,
    buf: LocalBuf,
    pool: Vec<SlotGrant>,
    retired: Vec<Retire>,
    ms: Sender<MsRequest>,
    slot_size: usize,
    stats: LaneStats,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("pool", &self.pool.len())
            .finish()
    }
}

fn check(c: &Completion) -> Result<(), CloverError> {
    match c.status {
        CompletionStatus::Success => Ok(()),
        s => Err(CloverError::Verb(s)),
    }
}

fn empty_completion() -> Completion {
    Completion {
        wr_id: 0,
        verb: Verb::Read,
        status: CompletionStatus::Success,
        value: 0,
    }
}

impl Lane {
    fn ms_call<T>(&mut self, make: impl FnOnce(Sender<T>) -> MsRequest) -> Result<T, CloverError> {
        let (tx, rx) = mpsc::channel();
        self.ms.send(make(tx)).map_err(|_| CloverError::MsGone)?;
        self.stats.ms_requests += 1;
        rx.recv_timeout(TIMEOUT).map_err(|_| CloverError::MsGone)
    }

    fn rts(&self) -> u64 {
        self.f.counters().round_trips + self.stats.ms_requests
    }

    /// READs the version at `ptr` (one round trip).
    fn read_version(&mut self, ptr: u64) -> Result<Option<Version>, CloverError> {
        let len = self.slot_size as u32;
        let mut c = [empty_completion()];
        execute(
            &mut self.f,
            &[(
                1,
                WorkRequest::Read {
                    remote: ptr,
                    local: self.buf.slice(0, len),
                },
            )],
            &mut c,
            TIMEOUT,
        )?;
        check(&c[0])?;
        Ok(decode_version(self.f.buf(self.buf)))
    }

    fn grant(&mut self) -> Result<SlotGrant, CloverError> {
        if self.pool.is_empty() {
            let retired = std::mem::take(&mut self.retired);
            let grants = self.ms_call(|reply| MsRequest::Alloc {
                n: ALLOC_BATCH,
                retired,
                reply,
            })??;
            self.pool = grants;
            self.pool.reverse();
        }
        self.pool.pop().ok_or(CloverError::Full)
    }

    /// Follows the chain from `at` to the tail version of `key`. `None` when `at` no longer
    /// holds `key` (reclaimed): the caller asks the MS again.
    fn walk(
        &mut self,
        key: &[u8],
        mut at: SlotGrant,
    ) -> Result<Option<(SlotGrant, Version)>, CloverError> {
        for _ in 0..MAX_HOPS {
            let Some(v) = self.read_version(at.ptr)? else {
                return Ok(None);
            };
            if v.key != key {
                return Ok(None);
            }
            at.gen = v.gen;
            if v.next & TAIL != 0 || v.next == 0 {
                return Ok(Some((at, v)));
            }
            self.stats.chain_hops += 1;
            at = SlotGrant {
                ptr: v.next,
                gen: 0,
            };
        }
        Err(CloverError::Livelock)
    }

    fn get(
        &mut self,
        cache: &Mutex<Shortcuts>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, CloverError> {
        self.stats.gets += 1;
        let t0 = self.rts();
        let r = self.get_inner(cache, key);
        self.stats.read_rts += self.rts() - t0;
        r
    }

    fn get_inner(
        &mut self,
        cache: &Mutex<Shortcuts>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, CloverError> {
        let cached = lock(cache).get(key);
        let mut at = match cached {
            Some(g) => {
                self.stats.hit_shortcut += 1;
                g
            }
            None => {
                self.stats.miss += 1;
                let t0 = self.rts();
                let g = self.ms_call(|reply| MsRequest::Lookup {
                    key: key.to_vec(),
                    reply,
                })?;
                self.stats.miss_rts += self.rts() - t0;
                match g {
                    Some(g) => g,
                    None => {
                        self.stats.absent += 1;
                        return Ok(None);
                    }
                }
            }
        };
        for _ in 0..MAX_RESTARTS {
            if let Some((tail, v)) = self.walk(key, at)? {
                lock(cache).put(key, tail);
                return Ok(Some(v.value));
            }
            self.stats.stale += 1;
            lock(cache).remove(key);
            match self.ms_call(|reply| MsRequest::Lookup {
                key: key.to_vec(),
                reply,
            })? {
                Some(g) => at = g,
                None => return Ok(None),
            }
        }
        Err(CloverError::Livelock)
    }

    fn put(
        &mut self,
        cache: &Mutex<Shortcuts>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), CloverError> {
        self.stats.puts += 1;
        let t0 = self.rts();
        let r = self.put_inner(cache, key, value);
        self.stats.write_rts += self.rts() - t0;
        r
    }

    fn put_inner(
        &mut self,
        cache: &Mutex<Shortcuts>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), CloverError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(CloverError::Key(key.len()));
        }
        let max = self.slot_size - VERSION_HEADER - key.len();
        if value.len() > max {
            return Err(CloverError::Value {
                len: value.len(),
                max,
            });
        }
        let new = self.grant()?;
        // 1 RT: WRITE the version and make it durable.
        let n = encode_version(self.f.buf_mut(self.buf), new.gen, key, value);
        let mut c = [empty_completion(), empty_completion()];
        execute(
            &mut self.f,
            &[
                (
                    1,
                    WorkRequest::Write {
                        remote: new.ptr,
                        local: self.buf.slice(0, n as u32),
                    },
                ),
                (
                    2,
                    WorkRequest::Flush {
                        remote: new.ptr,
                        len: n as u64,
                    },
                ),
            ],
            &mut c,
            TIMEOUT,
        )?;
        c.iter().try_for_each(check)?;
        let cached = lock(cache).get(key);
        let mut tail = match cached {
            Some(g) => g,
            None => {
                let t0 = self.rts();
                let r = self.ms_call(|reply| MsRequest::Insert {
                    key: key.to_vec(),
                    at: new,
                    reply,
                })?;
                self.stats.miss_rts += self.rts() - t0;
                match r {
                    // A new key: the MS index now points at our version.
                    None => {
                        lock(cache).put(key, new);
                        return Ok(());
                    }
                    Some(g) => g,
                }
            }
        };
        // Link after the tail: CAS its `next` from TAIL|gen to our slot.
        for _ in 0..MAX_RESTARTS {
            if tail.gen == 0 {
                match self.walk(key, tail)? {
                    // A stale pointer led to our own, not yet linked, version: the real
                    // tail is elsewhere.
                    Some((t, _)) if t.ptr == new.ptr => {
                        tail = self.relookup(cache, key)?;
                        continue;
                    }
                    Some((t, _)) => tail = t,
                    None => {
                        tail = self.relookup(cache, key)?;
                        continue;
                    }
                }
            }
            if tail.ptr == new.ptr {
                // Never link a version after itself.
                tail = self.relookup(cache, key)?;
                continue;
            }
            let mut c = [empty_completion(), empty_completion()];
            execute(
                &mut self.f,
                &[
                    (
                        1,
                        WorkRequest::Cas {
                            remote: tail.ptr,
                            expect: TAIL | tail.gen,
                            new: new.ptr,
                        },
                    ),
                    (
                        2,
                        WorkRequest::Flush {
                            remote: tail.ptr,
                            len: 8,
                        },
                    ),
                ],
                &mut c,
                TIMEOUT,
            )?;
            c.iter().try_for_each(check)?;
            let old = c[0].value;
            if old == TAIL | tail.gen {
                lock(cache).put(key, new);
                self.retired.push(Retire {
                    key: key.to_vec(),
                    old: tail.ptr,
                    new,
                });
                return Ok(());
            }
            self.stats.cas_failures += 1;
            if old & TAIL == 0 && old != 0 {
                // Someone linked first: walk on from their version.
                self.stats.chain_hops += 1;
                tail = SlotGrant { ptr: old, gen: 0 };
            } else {
                // The slot was reclaimed (another generation): ask where the key is now.
                tail = self.relookup(cache, key)?;
            }
        }
        Err(CloverError::Livelock)
    }

    fn relookup(&mut self, cache: &Mutex<Shortcuts>, key: &[u8]) -> Result<SlotGrant, CloverError> {
        self.stats.stale += 1;
        lock(cache).remove(key);
        let g = self.ms_call(|reply| MsRequest::Lookup {
            key: key.to_vec(),
            reply,
        })?;
        Ok(SlotGrant {
            ptr: g.ok_or(CloverError::Livelock)?.ptr,
            gen: 0,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One KN: lanes sharing a shortcut cache.
#[derive(Debug)]
struct CloverKn {
    lanes: Vec<Mutex<Lane>>,
    cache: Mutex<Shortcuts>,
}

/// Counters of a Clover cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CloverStats {
    /// KN-side counters in DINOMO's shape (`read_rts`/`write_rts` include MS round trips;
    /// `fabric` counts only verbs to the memory node).
    pub kn: ShardStats,
    /// MS requests issued by KNs (each one round trip).
    pub ms_requests: u64,
    pub chain_hops: u64,
    pub cas_failures: u64,
    pub ms: MsStats,
}

/// A running Clover cluster: the data area, the metadata server and K KNs.
#[derive(Debug)]
pub struct CloverCluster {
    kns: Vec<CloverKn>,
    ms_tx: Mutex<Sender<MsRequest>>,
    ms_thread: Option<JoinHandle<MsStats>>,
    ms_stats: Arc<Mutex<MsStats>>,
    next: AtomicUsize,
    max_value: usize,
    shortcut_charge: u64,
    /// Keeps the (unused) control switchboard of the lanes' connections alive.
    _control: Mutex<ControlServer>,
}

impl std::fmt::Debug for MsRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Alloc { .. } => "Alloc",
            Self::Lookup { .. } => "Lookup",
            Self::Insert { .. } => "Insert",
            Self::Stop => "Stop",
        })
    }
}

impl CloverCluster {
    /// Bytes per version slot for the given key and value limits.
    pub fn slot_size(max_key: usize, max_value: usize) -> usize {
        (VERSION_HEADER + max_key + max_value).next_multiple_of(8)
    }

    pub fn start(cfg: &CloverConfig) -> Result<Self, CloverError> {
        if cfg.kns == 0 || cfg.lanes_per_kn == 0 {
            return Err(CloverError::Config("at least one KN with one lane".into()));
        }
        if cfg.max_key == 0 || cfg.max_key > MAX_KEY_LEN {
            return Err(CloverError::Key(cfg.max_key));
        }
        let slot = Self::slot_size(cfg.max_key, cfg.max_value) as u64;
        let lanes = cfg.kns as usize * cfg.lanes_per_kn as usize;
        let quarantine = QUARANTINE_PER_LANE * lanes;
        // Room for the live versions, the quarantine and every lane's pool.
        let slots = cfg
            .slots
            .max((quarantine + 2 * lanes * ALLOC_BATCH + 1024) as u64);
        let bytes = (DATA_BASE + slots * slot).next_multiple_of(1 << 20);
        let region = HeapRegion::new(bytes);
        let control = ControlServer::in_memory(lanes as u32 + 8);
        let handle = control.handle();
        let mut ms = MsState {
            quarantine_len: quarantine,
            ..MsState::default()
        };
        ms.free = (0..slots).map(|i| DATA_BASE + i * slot).collect();
        let (ms_tx, ms_rx): (Sender<MsRequest>, Receiver<MsRequest>) = mpsc::channel();
        let ms_stats = Arc::new(Mutex::new(MsStats::default()));
        let shared = Arc::clone(&ms_stats);
        let ms_thread = std::thread::Builder::new()
            .name("clover-ms".into())
            .spawn(move || {
                while let Ok(req) = ms_rx.recv() {
                    let t0 = thread_cpu_ns();
                    let reply = ms.serve(req);
                    ms.stats.cpu_ns += thread_cpu_ns().saturating_sub(t0);
                    *lock(&shared) = ms.stats;
                    match reply {
                        Some(r) => r.deliver(),
                        None => break,
                    }
                }
                ms.stats
            })
            .map_err(|e| CloverError::Config(format!("cannot start the metadata server: {e}")))?;
        let dpm = DpmSpec::Local(LocalDpm {
            region,
            control: handle,
            nic: cfg.nic,
        });
        // Clover's cache keeps each key with its 8-byte pointer.
        let charge = cfg.max_key as u64 + 8;
        let mut kns = Vec::new();
        for _ in 0..cfg.kns {
            let mut ls = Vec::new();
            for _ in 0..cfg.lanes_per_kn {
                let mut f = dpm.connect()?;
                let buf = f.alloc_buf(slot as usize)?;
                ls.push(Mutex::new(Lane {
                    f,
                    buf,
                    pool: Vec::new(),
                    retired: Vec::new(),
                    ms: ms_tx.clone(),
                    slot_size: slot as usize,
                    stats: LaneStats::default(),
                }));
            }
            kns.push(CloverKn {
                lanes: ls,
                cache: Mutex::new(Shortcuts::new(cfg.cache_bytes_per_kn, charge)),
            });
        }
        Ok(Self {
            kns,
            ms_tx: Mutex::new(ms_tx),
            ms_thread: Some(ms_thread),
            ms_stats,
            next: AtomicUsize::new(0),
            max_value: slot as usize - VERSION_HEADER - cfg.max_key,
            shortcut_charge: charge,
            _control: Mutex::new(control),
        })
    }

    /// Largest value accepted with the configured largest key.
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// A client; `id` picks its lane within each KN.
    pub fn client(self: &Arc<Self>, id: usize) -> CloverClient {
        CloverClient {
            c: Arc::clone(self),
            lane: id,
        }
    }

    /// Runs `op` on KN `kn` (lane chosen by the client).
    fn on<T>(
        &self,
        kn: usize,
        lane: usize,
        op: impl FnOnce(&mut Lane, &Mutex<Shortcuts>) -> T,
    ) -> T {
        let k = &self.kns[kn % self.kns.len()];
        let mut l = lock(&k.lanes[lane % k.lanes.len()]);
        op(&mut l, &k.cache)
    }

    /// Reads `key` through KN `kn`.
    pub fn get_on(
        &self,
        kn: usize,
        lane: usize,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, CloverError> {
        self.on(kn, lane, |l, c| l.get(c, key))
    }

    /// Writes `key` through KN `kn`.
    pub fn put_on(
        &self,
        kn: usize,
        lane: usize,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), CloverError> {
        self.on(kn, lane, |l, c| l.put(c, key, value))
    }

    pub fn kns(&self) -> usize {
        self.kns.len()
    }

    /// Counters of every KN and of the MS.
    pub fn stats(&self) -> CloverStats {
        let mut s = CloverStats::default();
        let mut fabric = FabricCounters::default();
        for k in &self.kns {
            for l in &k.lanes {
                let l = lock(l);
                let st = &l.stats;
                s.kn.gets += st.gets;
                s.kn.puts += st.puts;
                s.kn.hit_shortcut += st.hit_shortcut;
                s.kn.miss += st.miss;
                s.kn.absent += st.absent;
                s.kn.stale_shortcuts += st.stale;
                s.kn.read_rts += st.read_rts;
                s.kn.write_rts += st.write_rts;
                s.kn.miss_rts += st.miss_rts;
                s.ms_requests += st.ms_requests;
                s.chain_hops += st.chain_hops;
                s.cas_failures += st.cas_failures;
                fabric.add(l.f.counters());
            }
            let c = lock(&k.cache);
            s.kn.cache = DacStats {
                shortcuts: s.kn.cache.shortcuts + c.map.len() as u64,
                shortcut_bytes: s.kn.cache.shortcut_bytes + c.map.len() as u64 * c.charge,
                budget_bytes: s.kn.cache.budget_bytes + c.capacity as u64 * c.charge,
                evictions: s.kn.cache.evictions + c.evictions,
                ..s.kn.cache
            };
        }
        s.kn.fabric = fabric;
        s.ms = *lock(&self.ms_stats);
        s
    }

    /// Bytes one shortcut is charged.
    pub fn shortcut_charge(&self) -> u64 {
        self.shortcut_charge
    }

    /// Stops the metadata server; returns the final counters.
    pub fn stop(mut self) -> CloverStats {
        let _ = lock(&self.ms_tx).send(MsRequest::Stop);
        if let Some(t) = self.ms_thread.take() {
            let _ = t.join();
        }
        self.stats()
    }
}

impl Drop for CloverCluster {
    fn drop(&mut self) {
        if let Some(t) = self.ms_thread.take() {
            let _ = lock(&self.ms_tx).send(MsRequest::Stop);
            let _ = t.join();
        }
    }
}

/// A client: each operation goes to the next KN in round-robin order (shared-everything:
/// any KN serves any key), so consecutive operations on one key land on different KNs.
#[derive(Debug)]
pub struct CloverClient {
    c: Arc<CloverCluster>,
    lane: usize,
}

impl CloverClient {
    fn pick(&self) -> usize {
        self.c.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, CloverError> {
        let kn = self.pick();
        self.c.get_on(kn, self.lane, key)
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), CloverError> {
        let kn = self.pick();
        self.c.put_on(kn, self.lane, key, value)
    }
}

/// Generations start at 1; keep the type small in the counters above.
const _: () = assert!(TAIL > (1u64 << 62));

#[cfg(test)]
mod tests {
    use super::*;

    fn small(kns: u16) -> Arc<CloverCluster> {
        Arc::new(
            CloverCluster::start(&CloverConfig {
                kns,
                lanes_per_kn: 1,
                max_key: 16,
                max_value: 64,
                slots: 4096,
                cache_bytes_per_kn: 1 << 20,
                nic: NicProfile::None,
            })
            .expect("clover"),
        )
    }

    #[test]
    fn version_round_trip_and_torn_versions_fail() {
        let mut b = vec![0u8; 128];
        let n = encode_version(&mut b, 7, b"key", b"value");
        let v = decode_version(&b[..n]).expect("decodes");
        assert_eq!(
            (v.next, v.gen, &v.key[..], &v.value[..]),
            (TAIL | 7, 7, &b"key"[..], &b"value"[..])
        );
        b[VERSION_HEADER + 4] ^= 1;
        assert_eq!(decode_version(&b[..n]), None);
        assert_eq!(decode_version(&[0u8; 64]), None);
    }

    #[test]
    fn a_read_on_another_kn_follows_the_chain_to_the_new_value() {
        let c = small(2);
        c.put_on(0, 0, b"k", b"v1").expect("put");
        assert_eq!(c.get_on(1, 0, b"k").expect("get"), Some(b"v1".to_vec()));
        // KN 1 now holds a shortcut to v1; KN 0 writes v2 and v3 after it.
        c.put_on(0, 0, b"k", b"v2").expect("put");
        c.put_on(0, 0, b"k", b"v3").expect("put");
        let before = c.stats();
        assert_eq!(c.get_on(1, 0, b"k").expect("get"), Some(b"v3".to_vec()));
        let after = c.stats();
        assert_eq!(after.chain_hops - before.chain_hops, 2, "v1 -> v2 -> v3");
        assert_eq!(
            after.kn.read_rts - before.kn.read_rts,
            3,
            "one READ per version"
        );
        // The shortcut moved to the tail: the next read is one READ.
        assert_eq!(c.get_on(1, 0, b"k").expect("get"), Some(b"v3".to_vec()));
        assert_eq!(c.stats().kn.read_rts - after.kn.read_rts, 1);
        assert_eq!(c.get_on(1, 0, b"missing").expect("get"), None);
    }

    #[test]
    fn a_write_on_a_stale_shortcut_links_after_the_real_tail() {
        let c = small(2);
        c.put_on(0, 0, b"k", b"a").expect("put");
        c.put_on(1, 0, b"k", b"b").expect("put"); // KN 1 learns the key from the MS
        c.put_on(0, 0, b"k", b"c").expect("put"); // KN 0's shortcut is stale: CAS fails, walk
        let s = c.stats();
        assert!(s.cas_failures >= 1, "{s:?}");
        for kn in 0..2 {
            assert_eq!(c.get_on(kn, 0, b"k").expect("get"), Some(b"c".to_vec()));
        }
    }

    #[test]
    fn concurrent_writers_on_many_kns_lose_no_update_and_slots_are_reused() {
        let c = small(4);
        let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("key{i}").into_bytes()).collect();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let (c, keys) = (&c, &keys);
                s.spawn(move || {
                    for round in 0..1500usize {
                        let k = &keys[(round + t) % keys.len()];
                        let v = format!("{t}:{round}");
                        c.put_on(round + t, t, k, v.as_bytes()).expect("put");
                        let got = c
                            .get_on(round + t + 1, t, k)
                            .expect("get")
                            .expect("present");
                        assert!(std::str::from_utf8(&got).is_ok());
                    }
                });
            }
        });
        // Every KN reads the same, last-linked value of every key.
        for k in &keys {
            let first = c.get_on(0, 0, k).expect("get");
            for kn in 1..4 {
                assert_eq!(c.get_on(kn, 0, k).expect("get"), first);
            }
        }
        let s = Arc::into_inner(c).expect("sole owner").stop();
        assert_eq!(s.kn.puts, 6000);
        assert!(
            s.ms.reclaimed > 0,
            "6000 writes into 4096+ slots reuse some: {s:?}"
        );
        assert!(s.ms.cpu_ns > 0);
    }
}
