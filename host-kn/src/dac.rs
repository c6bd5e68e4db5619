//! DAC — disaggregated adaptive caching: one KN shard's DRAM cache of values and shortcuts.
//!
//! A read served from a cached **value** costs 0 network round trips (RTs); from a cached
//! **shortcut** (the [`EntryRef`] of the key's log entry in DPM) 1 RT, one READ of the entry;
//! a **miss** costs `M` RTs (index walk plus the entry READ; `M` is measured by the shard and
//! set with [`DacCache::set_miss_cost`]). One byte budget per shard is shared by both kinds:
//!
//! * a value is charged `key + value + value_overhead` bytes (`vc`);
//! * a shortcut is charged `shortcut_charge` bytes (`sc`), whatever its key: it does not
//!   store the key. Its 64-bit hash finds it, and the entry it points to names the key,
//!   which the reader checks on every fetch; a hash collision reads as a stale shortcut.
//!
//! Both kinds are kept least-used first (LFU, by decayed hit count). The charges are what
//! the structures really cost ([`SHORTCUT_BYTES`], [`VALUE_OVERHEAD`]: a node and its table
//! and heap slots; a value's bytes sit in the shard's value arena), and the hit history
//! below comes out of the budget beyond a fixed 64 KiB, so the budget bounds the cache's
//! resident memory and the
//! value/shortcut price ratio rests on real costs. (The original charged 16 B per shortcut
//! and nothing for the history; a shortcut cost several times that.)
//!
//! # Hit counts and decay
//!
//! Every cached key, value or shortcut, carries a hit count `h` (reads and writes of the key,
//! the access that cached it included) that estimates its future hits. All counts halve every
//! `decay_every` accesses so the cache follows a moving workload. Halving is free: instead of
//! touching every count, each hit adds the current weight `2^epoch`, and the epoch grows by
//! one every `decay_every` accesses; comparing stored scores is comparing decayed counts, and
//! the heaps stay ordered because all counts scale alike. Once every 64 epochs all scores
//! are rescaled by `2^-64` (exact, O(n), so amortised O(1)) to keep them, and the heaps'
//! `f32` keys, finite.
//!
//! # The economics, and the tests derived from them
//!
//! Moving key `x` between states changes the RTs of each of its future hits: value → shortcut
//! costs 1, shortcut → miss costs `M − 1`, value → miss costs `M`. Room is bought from two
//! sources, each with a price per byte:
//!
//! * evicting the LFU shortcut `e` frees `sc(e)` bytes for `(M − 1)·h(e)` RTs;
//! * demoting the least-used value `v` to a shortcut (it keeps its count) frees `vc(v) − sc(v)`
//!   bytes for `h(v)` RTs.
//!
//! **Promotion.** A shortcut `s` that was hit and fetched becomes a value if the extra
//! `Δ = vc(s) − sc(s)` bytes are free. Otherwise the missing `r` bytes must be bought, and
//! promoting saves `h(s)` RTs, so it pays iff
//!
//! ```text
//! h(s) > min( (M − 1) · Σ h(e)   over the least-used shortcuts that free r bytes,
//!                      Σ h(v)   over the least-used values whose demotion frees r bytes )
//! ```
//!
//! and the cheaper source is used. With equal-size entries the first source is the
//! `vc / sc − 1` least-used shortcuts of the original design. The original tests
//! `h(s) > M · Σ h(e)`; the factor is `M − 1` here because an evicted shortcut's hits still
//! reach the value through the miss path, which costs `M` instead of 1, not `M` instead of 0.
//! The second source is new: when the least-used value is colder than a shortcut's worth
//! of hits, swapping the two saves `h(s) − h(v)` RTs per period without touching any shortcut.
//!
//! **Insertion.** A key cached after a miss or a write goes in as a value if its charge is
//! free, else as a shortcut (always admitted, with the count its history gives: the LFU end
//! is where the cache keeps its probationary keys). Room for it is bought greedily, always from
//! the source that is cheaper per byte, so the value/shortcut split settles where one more
//! byte of values is worth as much as one more byte of shortcuts — the condition that also
//! characterises the static optimum ([`oracle`]).
//!
//! **Room bought is reserved.** Buying a shortcut's 72 B by demoting a value frees ~1 KiB;
//! the surplus is reserved for the insertions that follow, which would otherwise buy their
//! room again. "Promote if there is room" means room not so reserved: a promotion taking the
//! surplus for nothing would undo the demotion that the per-byte prices just chose, and the
//! values would never shrink below what the cold start gave them.
//!
//! **History.** A key evicted and missed again would come back with a count of one, so the
//! LFU end would be full of such keys and shortcuts would look far cheaper to evict than they
//! are (too many values, too few shortcuts). Keys that leave the cache leave their count in
//! a small count-min sketch (one byte counter per 256 budget bytes, rounded up to a power
//! of two, at least 64 KiB and at most 16 MiB; what passes 64 KiB is taken from the
//! budget), misses are counted there too, and
//! a key cached again resumes its count. The sketch halves with the hit counts.
//!
//! **Demote or drop.** A value pushed out from the least-used end is demoted to a shortcut if that
//! pays: dropping it instead saves room for exactly one shortcut, so the demotion pays iff
//! the value is hotter than the LFU shortcut it would otherwise outlive (`h(v) > h(e_min)`).
//!
//! # Policies
//!
//! [`CachePolicy::Dac`] is the above. [`CachePolicy::ShortcutOnly`] caches only shortcuts (LFU
//! over the whole budget, as Clover does) and [`CachePolicy::ValueOnly`] only values (LRU).
//!
//! # Why values are LFU, not LRU
//!
//! The static optimum caches the most *frequently* read keys as values. Ordered by
//! recency, the values at the cold end are whichever keys were read least recently: at
//! cache ratio 0.5 (read-only, Zipf 0.99, 100 000 keys, the original 16-byte shortcut
//! charge) that alone kept DAC 7% above the per-shard optimum after 20 M reads, and
//! ordered by decayed count it came within 4% (`examples/dac_sim.rs`;
//! docs/PERFORMANCE.md). Decay lets LFU follow a moving workload.
//!
//! # Cost
//!
//! Keys live once, in a slab of 48-byte nodes indexed by a `hashbrown` table of slab
//! indices hashed
//! with the never-randomised [`key_hash`]. A value's `key ‖ value` sits in the shard's
//! value arena, compacted once its garbage passes an eighth of the budget (`Arena`); a
//! shortcut node holds no bytes elsewhere. Values and shortcuts each sit in an indexed
//! binary min-heap by score. [`DacCache::get`] does no allocation: a hash, a probe, and
//! for a value hit one addition (for a shortcut hit also a sift down; a miss bumps four
//! sketch counters). A promotion test walks a heap best-first and stops as soon as the
//! cost exceeds the benefit, so a refused promotion is cheap.
//!
//! **Lazy value heap.** Scores only grow (decay raises the weight of new hits instead of
//! lowering old counts), so a heap may order its nodes by a stale key that is a lower bound
//! of the score (`f32`, rounded down). A value hit only adds to the score, in O(1), and
//! the heap catches up when asked for its least value: while the root's key lags its score
//! the key is refreshed and sifted down. A root whose key equals its score is then the
//! least score of all, since every other score is at least its key, which is at least the
//! root's. Each hit causes at most one such sift later, on the path that makes room, not
//! on the value-hit path (an eager sift made a uniform stream of value hits 6x slower).
//! A promotion test's walk past the root follows the keys, so it may price a value whose
//! score grew since its key was set: at its score, higher than its place suggests, which
//! only errs towards refusing a promotion.

use core::cmp::{Ordering, Reverse};
use core::fmt;
use core::str::FromStr;
use std::collections::BinaryHeap;

use dinomo_shared::hash::key_hash;
use dinomo_shared::slot::key_slot;
use hashbrown::HashTable;

pub use dinomo_shared::index::EntryRef;

/// Which of the two kinds of entries a cache may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePolicy {
    /// Values and shortcuts, split adaptively.
    Dac,
    /// Shortcuts only, LFU.
    ShortcutOnly,
    /// Values only, LRU (the plain value cache DAC is compared with).
    ValueOnly,
}

impl CachePolicy {
    /// Every policy, in the order of [`CachePolicy::NAMES`].
    pub const ALL: [CachePolicy; 3] = [Self::Dac, Self::ShortcutOnly, Self::ValueOnly];
    /// The names [`FromStr`] accepts and [`fmt::Display`] prints.
    pub const NAMES: [&'static str; 3] = ["dac", "shortcut-only", "value-only"];

    /// The policy's name, as accepted by [`FromStr`].
    pub const fn name(self) -> &'static str {
        match self {
            Self::Dac => "dac",
            Self::ShortcutOnly => "shortcut-only",
            Self::ValueOnly => "value-only",
        }
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown cache policy name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown cache policy `{0}` (valid: dac, shortcut-only, value-only)")]
pub struct ParsePolicyError(pub String);

impl FromStr for CachePolicy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ParsePolicyError(s.to_owned()))
    }
}

/// Configuration of one shard's cache.
#[derive(Clone, Debug)]
pub struct DacConfig {
    /// Bytes shared by values and shortcuts; never exceeded.
    pub budget_bytes: u64,
    pub policy: CachePolicy,
    /// Bytes charged per cached value on top of its key and value.
    pub value_overhead: u64,
    /// Bytes charged per shortcut, whatever its key (which a shortcut does not store).
    pub shortcut_charge: u64,
    /// RTs of a miss until the shard measures one.
    pub initial_miss_cost: f64,
    /// Accesses between halvings of all hit counts; 0 never decays.
    pub decay_every: u64,
}

impl Default for DacConfig {
    /// 1 GiB per KN over 8 shards, as in the original evaluation; a 2-RT miss path.
    fn default() -> Self {
        Self {
            budget_bytes: 128 << 20,
            policy: CachePolicy::Dac,
            value_overhead: VALUE_OVERHEAD,
            shortcut_charge: SHORTCUT_BYTES,
            initial_miss_cost: 2.0,
            decay_every: 1 << 20,
        }
    }
}

impl DacConfig {
    /// Bytes charged for caching `key` with a `value_len`-byte value.
    pub fn value_charge(&self, key_len: usize, value_len: usize) -> u64 {
        (key_len as u64)
            .saturating_add(value_len as u64)
            .saturating_add(self.value_overhead)
    }

    /// Bytes charged for a shortcut (of any key).
    pub fn shortcut_bytes(&self) -> u64 {
        self.shortcut_charge
    }
}

/// What one more entry costs in the cache's tables besides its node: its slot in the key
/// table (a `u32` and a control byte per bucket, and up to 16/7 buckets per entry just
/// after the table doubled) and its slot in a heap (a `u32`).
const SLOT_BYTES: u64 = 12 + 4;

/// The default charge of a shortcut: what one really costs in memory (a node, its table
/// and heap slots; no key).
pub const SHORTCUT_BYTES: u64 = core::mem::size_of::<Node>() as u64 + SLOT_BYTES;

/// The default charge of a value on top of its key and value bytes (which sit in the
/// shard's value arena): a node and its table and heap slots.
pub const VALUE_OVERHEAD: u64 = SHORTCUT_BYTES;

/// What the cache knows about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The value: 0 RTs.
    Value(&'a [u8]),
    /// Where the entry lives in DPM: 1 RT.
    Shortcut(EntryRef),
    /// Nothing: the miss path.
    Miss,
}

/// Contents and lifetime counters of a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DacStats {
    pub values: u64,
    pub shortcuts: u64,
    pub value_bytes: u64,
    pub shortcut_bytes: u64,
    pub budget_bytes: u64,
    /// Shortcuts turned into values.
    pub promotions: u64,
    /// Values turned into shortcuts.
    pub demotions: u64,
    /// Keys dropped for room (not counting [`DacCache::remove`] and [`DacCache::retain`]).
    pub evictions: u64,
    /// Bytes of the hit history taken from the budget (see [`DacCache::new`]).
    pub history_bytes: u64,
    /// Times the value arena was compacted.
    pub compactions: u64,
}

/// No slab index.
const NIL: u32 = u32::MAX;
/// The heap of shortcuts (least used first).
const SHORTCUTS: usize = 0;
/// The heap of values (least used first; least recently used under `ValueOnly`).
const VALUES: usize = 1;
/// Epochs between rescalings of all scores.
/// (Heap keys are `f32`: after 64 doublings of the weight a score is at most 2^64 times
/// its hits, far inside their range.)
const RESCALE_EPOCHS: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Free = 0,
    Value = 1,
    Shortcut = 2,
}

/// One cached key. A shortcut stores no key: its 64-bit hash finds it, and the entry it
/// points to names the key, which the reader checks on every fetch (a hash collision then
/// reads as a stale shortcut and takes the miss path). So a shortcut costs one node, its
/// table slot and its heap slot, and nothing more.
#[derive(Debug)]
struct Node {
    hash: u64,
    eref: EntryRef,
    /// The priority its heap orders by: the decayed hit count, scaled by the current
    /// weight (or, under [`CachePolicy::ValueOnly`], the access clock: LRU).
    score: f64,
    /// Where a value's `key ‖ value` starts in the [`Arena`].
    off: u64,
    /// Length of a value's `key ‖ value` (0 for a shortcut).
    len: u32,
    /// Position in its heap (the values' or the shortcuts').
    pos: u32,
    /// What its heap orders it by: a lower bound of `score` (see "Lazy value heap").
    key: f32,
    /// Key length of a value.
    key_len: u16,
    /// The key's slot (so that [`DacCache::retain`] works without the key) in the low 14
    /// bits, its [`State`] in the top 2.
    tag: u16,
}

/// A node's size is most of what a shortcut costs: keep it from growing unnoticed.
const _: () = assert!(core::mem::size_of::<Node>() == 48);

impl Node {
    const SLOT_BITS: u32 = 14;
    const SLOT_MASK: u16 = (1 << Self::SLOT_BITS) - 1;

    #[inline]
    fn state(&self) -> State {
        match self.tag >> Self::SLOT_BITS {
            1 => State::Value,
            2 => State::Shortcut,
            _ => State::Free,
        }
    }

    #[inline]
    fn set_state(&mut self, state: State) {
        self.tag = (self.tag & Self::SLOT_MASK) | ((state as u16) << Self::SLOT_BITS);
    }

    #[inline]
    fn slot(&self) -> u16 {
        self.tag & Self::SLOT_MASK
    }
}

// Every slot fits beside the state.
const _: () = assert!(dinomo_shared::slot::SLOTS as u32 <= 1 << Node::SLOT_BITS);

/// The largest `f32` not above `x` (scores are never negative): a heap key that stays a
/// lower bound of the score it stands for.
#[inline]
fn lower_bound(x: f64) -> f32 {
    let y = x as f32;
    if f64::from(y) > x && y > 0.0 {
        f32::from_bits(y.to_bits() - 1)
    } else {
        y
    }
}

/// The bytes of every cached value, `key ‖ value` each, appended one after another.
///
/// A value rewritten with another length, demoted or dropped leaves its bytes behind as
/// garbage; once the garbage passes [`Arena::max_garbage`] the live values are copied into
/// a new arena, in one pass. So the values' memory is their bytes plus at most that much,
/// with no allocator header per value and no fragmentation: one allocation per shard
/// instead of one per value (which, churned, left a KN's memory at 1.5x its live values).
#[derive(Debug, Default)]
struct Arena {
    bytes: Vec<u8>,
    garbage: u64,
}

impl Arena {
    /// Garbage tolerated before a compaction: an eighth of the budget, at least 64 KiB.
    /// Each compaction copies at most the budget, so at most eight bytes are copied per
    /// byte of garbage.
    fn max_garbage(budget: u64) -> u64 {
        (budget / 8).max(64 << 10)
    }
}

/// A heap position ordered by its heap key, for best-first walks of a heap.
#[derive(Clone, Copy, Debug)]
struct Walk {
    score: f64,
    pos: u32,
}

impl PartialEq for Walk {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Walk {}
impl PartialOrd for Walk {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Walk {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(self.pos.cmp(&other.pos))
    }
}

/// Where a promotion buys its room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Free,
    Shortcuts,
    Values,
}

/// One shard's cache of values and shortcuts under one byte budget. Not thread-safe by
/// design: each shard owns its cache.
pub struct DacCache {
    cfg: DacConfig,
    miss_cost: f64,
    table: HashTable<u32>,
    nodes: Vec<Node>,
    free_slots: Vec<u32>,
    /// Min-heaps of slab indices by score: [`SHORTCUTS`] and [`VALUES`].
    heaps: [Vec<u32>; 2],
    /// Accesses so far: the LRU clock of [`CachePolicy::ValueOnly`].
    clock: u64,
    stats: DacStats,
    /// Score one hit adds now: `2^epoch`, rescaled every [`RESCALE_EPOCHS`].
    weight: f64,
    epoch: u32,
    since_decay: u64,
    walk: BinaryHeap<Reverse<Walk>>,
    history: History,
    /// Free bytes that pressure bought for insertions (see `make_room`).
    reserved: u64,
    /// Bytes of the value arena's old buffers freed since [`DacCache::take_freed_bytes`]
    /// last asked.
    freed: u64,
    arena: Arena,
}

impl fmt::Debug for DacCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DacCache")
            .field("policy", &self.cfg.policy)
            .field("miss_cost", &self.miss_cost)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl DacCache {
    /// A cache of `cfg.budget_bytes`. The hit history (one byte per 256 budget bytes,
    /// rounded up to a power of two, at least [`History::FIXED`]) comes out of the budget
    /// beyond its first [`History::FIXED`] bytes, which are fixed overhead.
    pub fn new(cfg: DacConfig) -> Self {
        let miss_cost = sane_miss_cost(cfg.initial_miss_cost).unwrap_or(2.0);
        let history = History::for_budget(cfg.budget_bytes);
        let history_bytes = history.cells.len() as u64;
        let stats = DacStats {
            budget_bytes: cfg.budget_bytes,
            history_bytes: history_bytes.saturating_sub(History::FIXED as u64),
            ..DacStats::default()
        };
        Self {
            cfg,
            miss_cost,
            table: HashTable::new(),
            nodes: Vec::new(),
            free_slots: Vec::new(),
            heaps: [Vec::new(), Vec::new()],
            clock: 0,
            stats,
            weight: 1.0,
            epoch: 0,
            since_decay: 0,
            walk: BinaryHeap::new(),
            history,
            reserved: 0,
            freed: 0,
            arena: Arena::default(),
        }
    }

    pub fn config(&self) -> &DacConfig {
        &self.cfg
    }

    /// The mean RTs of a miss currently assumed.
    pub fn miss_cost(&self) -> f64 {
        self.miss_cost
    }

    /// Looks a key up and counts the hit.
    /// No allocation.
    #[inline]
    pub fn get(&mut self, key: &[u8]) -> Lookup<'_> {
        self.tick();
        let hash = key_hash(key);
        let Some(i) = self.find_hashed(hash, key) else {
            self.history.record(hash);
            return Lookup::Miss;
        };
        self.bump(i);
        let n = &self.nodes[i as usize];
        match n.state() {
            // O(1): the value heap catches up when it is asked for its least value.
            State::Value => Lookup::Value(self.value_of(i)),
            State::Shortcut => {
                let eref = n.eref;
                self.resift_shortcut(i);
                Lookup::Shortcut(eref)
            }
            State::Free => Lookup::Miss,
        }
    }

    /// What [`DacCache::get`] would return, without counting a hit.
    pub fn peek(&self, key: &[u8]) -> Lookup<'_> {
        match self.find(key).map(|i| &self.nodes[i as usize]) {
            Some(n) if n.state() == State::Value => {
                let (off, len, k) = (n.off as usize, n.len as usize, n.key_len as usize);
                Lookup::Value(&self.arena.bytes[off + k..off + len])
            }
            Some(n) if n.state() == State::Shortcut => Lookup::Shortcut(n.eref),
            _ => Lookup::Miss,
        }
    }

    /// Whether the key is cached in either form.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.find(key).is_some()
    }

    /// The key's decayed hit count, if it is cached.
    pub fn hits(&self, key: &[u8]) -> Option<f64> {
        self.find(key)
            .map(|i| self.nodes[i as usize].score / self.weight)
    }

    /// The KN wrote key=value durably at `eref` (the entry is the value's home): cache it at
    /// once — as a value if the policy and budget allow, else as a shortcut (demoting or
    /// evicting per the policy). Replaces any older cached state of the key and counts an
    /// access.
    pub fn on_write(&mut self, key: &[u8], value: &[u8], eref: EntryRef) {
        self.tick();
        let hash = key_hash(key);
        match self.find_hashed(hash, key) {
            Some(i) => {
                self.bump(i);
                self.refresh(i, key, value, eref);
            }
            None => {
                self.history.record(hash);
                self.insert_new(key, value, eref, None);
            }
        }
    }

    /// The KN fetched key's value from DPM at `eref`, after a miss (`was_shortcut == false`)
    /// or a shortcut hit (`true`); [`DacCache::get`] already counted the access. A new key is
    /// inserted (as a value if it fits, else as a shortcut); a shortcut is refreshed and
    /// promoted if there is room or promoting pays (see the module doc).
    pub fn on_fetch(&mut self, key: &[u8], value: &[u8], eref: EntryRef, was_shortcut: bool) {
        // The cache's own state decides; `was_shortcut` only says what the caller saw.
        let _ = was_shortcut;
        match self.find(key) {
            Some(i) => self.refresh(i, key, value, eref),
            None => {
                self.insert_new(key, value, eref, None);
            }
        }
    }

    /// The key was deleted, or its shortcut turned out stale: forget it entirely.
    pub fn remove(&mut self, key: &[u8]) {
        if let Some(i) = self.find(key) {
            // A stale shortcut's key comes back through the miss path: keep its count.
            self.remember(i);
            self.forget(i);
        }
    }

    /// Drops every key whose slot `keep` refuses (ownership of a slot moved away).
    pub fn retain(&mut self, mut keep: impl FnMut(u16) -> bool) {
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if n.state() != State::Free && !keep(n.slot()) {
                self.forget(i as u32);
            }
        }
    }

    /// Updates the measured mean RTs of a miss; values below 1 (a miss always reads the
    /// entry) are raised to 1, and NaN or infinite ones ignored.
    pub fn set_miss_cost(&mut self, rts: f64) {
        if let Some(m) = sane_miss_cost(rts) {
            self.miss_cost = m;
        }
    }

    pub fn stats(&self) -> DacStats {
        self.stats
    }

    /// Bytes of the value arena's old buffers freed since the last call: the shard gives
    /// them back to the system once they add up ([`crate::memory::trim`]).
    pub fn take_freed_bytes(&mut self) -> u64 {
        core::mem::take(&mut self.freed)
    }

    /// Bytes charged now.
    pub fn used_bytes(&self) -> u64 {
        self.stats.value_bytes + self.stats.shortcut_bytes
    }

    // ---- policy ------------------------------------------------------------------------

    fn free_bytes(&self) -> u64 {
        self.cfg
            .budget_bytes
            .saturating_sub(self.used_bytes() + self.stats.history_bytes)
    }

    /// Free bytes not reserved for insertions, which a promotion may take for nothing.
    fn unreserved_bytes(&self) -> u64 {
        self.free_bytes() - self.reserved.min(self.free_bytes())
    }

    /// Keeps the reservation within the free bytes after the cache grew.
    fn clip_reserved(&mut self) {
        self.reserved = self.reserved.min(self.free_bytes());
    }

    /// The charge of value node `i`.
    fn vcharge(&self, i: u32) -> u64 {
        let n = &self.nodes[i as usize];
        let k = n.key_len as usize;
        self.cfg.value_charge(k, (n.len as usize).saturating_sub(k))
    }

    /// The charge of a shortcut: the same for every key, which it does not store.
    fn scharge(&self, _i: u32) -> u64 {
        self.cfg.shortcut_bytes()
    }

    /// Counts an access to node `i`: one decayed hit, or under `ValueOnly` the access time.
    #[inline]
    fn bump(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        match self.cfg.policy {
            CachePolicy::ValueOnly => n.score = self.clock as f64,
            CachePolicy::Dac | CachePolicy::ShortcutOnly => n.score += self.weight,
        }
    }

    /// The score a key cached afresh starts from: the hits its history remembers (the
    /// access that caches it included), or under `ValueOnly` the access time.
    fn initial_score(&self, hash: u64) -> f64 {
        match self.cfg.policy {
            CachePolicy::ValueOnly => self.clock as f64,
            CachePolicy::Dac | CachePolicy::ShortcutOnly => {
                self.weight * f64::from(self.history.estimate(hash).max(1))
            }
        }
    }

    /// Caches a key not cached yet, with the given score or else the one its history
    /// gives; its slot, if it was cached.
    fn insert_new(
        &mut self,
        key: &[u8],
        value: &[u8],
        eref: EntryRef,
        score: Option<f64>,
    ) -> Option<u32> {
        let Ok(key_len) = u16::try_from(key.len()) else {
            return None;
        };
        let hash = key_hash(key);
        let score = score.unwrap_or_else(|| self.initial_score(hash));
        let vc = self.cfg.value_charge(key.len(), value.len());
        let sc = self.cfg.shortcut_bytes();
        let budget = self.cfg.budget_bytes;
        let as_value = match self.cfg.policy {
            CachePolicy::ValueOnly => {
                if vc > budget || !self.make_room(vc) {
                    return None;
                }
                true
            }
            CachePolicy::ShortcutOnly => {
                if sc > budget || !self.make_room(sc) {
                    return None;
                }
                false
            }
            CachePolicy::Dac => {
                if vc <= budget
                    && (self.unreserved_bytes() >= vc || (vc <= sc && self.make_room(vc)))
                {
                    true
                } else if sc <= budget && self.make_room(sc) {
                    false
                } else {
                    return None;
                }
            }
        };
        let i = self.alloc(Node {
            hash,
            eref,
            score,
            off: 0,
            len: 0,
            pos: NIL,
            key: 0.0,
            key_len: 0,
            tag: key_slot(key) & Node::SLOT_MASK,
        });
        if as_value {
            self.store(i, key_len, key, value);
            self.attach_value(i);
        } else {
            self.attach_shortcut(i);
        }
        Some(i)
    }

    /// Gives a cached key its newest value and entry.
    fn refresh(&mut self, i: u32, key: &[u8], value: &[u8], eref: EntryRef) {
        self.nodes[i as usize].eref = eref;
        match self.nodes[i as usize].state() {
            State::Value => {
                let old = self.vcharge(i);
                let new = self.cfg.value_charge(key.len(), value.len());
                if new <= self.free_bytes() + old {
                    let n = &self.nodes[i as usize];
                    let (off, len, k) = (n.off as usize, n.len as usize, n.key_len);
                    if len - k as usize == value.len() {
                        self.arena.bytes[off + k as usize..off + len].copy_from_slice(value);
                    } else {
                        self.release(i);
                        self.store(i, k, key, value);
                    }
                    self.stats.value_bytes = self.stats.value_bytes - old + new;
                    self.clip_reserved();
                    return;
                }
                // The new value does not fit where the old one was: cache the key afresh,
                // keeping its count, and let the promotion test decide.
                let score = self.nodes[i as usize].score;
                self.forget(i);
                if let Some(j) = self.insert_new(key, value, eref, Some(score)) {
                    if self.nodes[j as usize].state() == State::Shortcut
                        && self.cfg.policy == CachePolicy::Dac
                    {
                        self.try_promote(j, key, value);
                    }
                }
            }
            State::Shortcut => {
                self.resift_shortcut(i);
                if self.cfg.policy == CachePolicy::Dac {
                    self.try_promote(i, key, value);
                }
            }
            State::Free => {}
        }
    }

    /// The promotion test of the module doc, for shortcut `i` of `key` whose value is
    /// `value`.
    fn try_promote(&mut self, i: u32, key: &[u8], value: &[u8]) {
        let Ok(key_len) = u16::try_from(key.len()) else {
            return;
        };
        let vc = self.cfg.value_charge(key.len(), value.len());
        if vc > self.cfg.budget_bytes {
            return;
        }
        let sc = self.scharge(i);
        let delta = vc.saturating_sub(sc);
        let free = self.unreserved_bytes();
        let source = if free >= delta {
            Source::Free
        } else {
            let need = delta - free;
            let h = self.nodes[i as usize].score;
            let by_shortcuts = self.shortcut_cost(need, h, i);
            let by_values = self.value_cost(need, h);
            match (by_shortcuts, by_values) {
                (Some(s), Some(v)) if v < s => Source::Values,
                (Some(_), _) => Source::Shortcuts,
                (None, Some(_)) => Source::Values,
                (None, None) => return,
            }
        };
        self.heap_remove(SHORTCUTS, self.nodes[i as usize].pos as usize);
        self.stats.shortcuts -= 1;
        self.stats.shortcut_bytes -= sc;
        match source {
            Source::Free => {}
            Source::Shortcuts => {
                while self.unreserved_bytes() < vc {
                    let Some(&e) = self.heaps[SHORTCUTS].first() else {
                        break;
                    };
                    self.evict(e);
                }
            }
            Source::Values => {
                while self.unreserved_bytes() < vc && self.least_value() != NIL {
                    self.push_out(self.least(VALUES));
                }
            }
        }
        // Ties in the heap can make the plan free a little less than priced; top it up.
        if !self.make_room(vc) {
            self.attach_shortcut(i);
            return;
        }
        self.store(i, key_len, key, value);
        self.nodes[i as usize].set_state(State::Free);
        self.attach_value(i);
        self.stats.promotions += 1;
    }

    /// RTs lost by evicting the least-used shortcuts (other than `skip`) that free `need`
    /// bytes, or `None` if they cannot or the loss reaches `limit`.
    fn shortcut_cost(&mut self, need: u64, limit: f64, skip: u32) -> Option<f64> {
        let m1 = (self.miss_cost - 1.0).max(0.0);
        self.cheapest(SHORTCUTS, need, limit, skip, m1)
    }

    /// RTs lost by demoting the least-used values until `need` bytes are free, or `None` if
    /// they cannot or the loss reaches `limit`.
    fn value_cost(&mut self, need: u64, limit: f64) -> Option<f64> {
        self.cheapest(VALUES, need, limit, NIL, 1.0)
    }

    /// Walks heap `k` best-first (skipping `skip`) until its nodes free `need` bytes, and
    /// returns `rts_per_hit` times their hits; `None` if they cannot or that reaches
    /// `limit`. The walk stops as soon as the cost passes the limit, so a refused
    /// promotion costs a handful of steps.
    fn cheapest(
        &mut self,
        k: usize,
        need: u64,
        limit: f64,
        skip: u32,
        rts_per_hit: f64,
    ) -> Option<f64> {
        self.settle(k);
        let mut walk = core::mem::take(&mut self.walk);
        walk.clear();
        if let Some(&top) = self.heaps[k].first() {
            walk.push(Reverse(Walk {
                score: f64::from(self.nodes[top as usize].key),
                pos: 0,
            }));
        }
        let (mut sum, mut freed, mut result) = (0.0, 0u64, None);
        while let Some(Reverse(Walk { pos, .. })) = walk.pop() {
            for c in [2 * pos as usize + 1, 2 * pos as usize + 2] {
                if let Some(&j) = self.heaps[k].get(c) {
                    walk.push(Reverse(Walk {
                        score: f64::from(self.nodes[j as usize].key),
                        pos: c as u32,
                    }));
                }
            }
            let j = self.heaps[k][pos as usize];
            if j == skip {
                continue;
            }
            sum += self.nodes[j as usize].score;
            freed += if k == SHORTCUTS {
                self.scharge(j)
            } else {
                self.vcharge(j).saturating_sub(self.scharge(j))
            };
            if rts_per_hit * sum >= limit {
                break;
            }
            if freed >= need {
                result = Some(rts_per_hit * sum);
                break;
            }
        }
        self.walk = walk;
        result
    }

    /// Frees cache bytes until `need` are free, buying room where it is cheapest per byte.
    fn make_room(&mut self, need: u64) -> bool {
        if self.free_bytes() >= need {
            return true;
        }
        while self.free_bytes() < need {
            let v = self.least_value();
            let e = self.least(SHORTCUTS);
            if v == NIL && e == NIL {
                return false;
            }
            if v == NIL {
                self.evict(e);
                continue;
            }
            let gain = self.vcharge(v).saturating_sub(self.scharge(v));
            if e == NIL {
                if gain > 0 && self.cfg.policy == CachePolicy::Dac {
                    self.demote(v);
                } else {
                    self.evict(v);
                }
                continue;
            }
            // Per byte: h(v) / gain against (M - 1) h(e) / sc(e), cross-multiplied.
            let hv = self.nodes[v as usize].score;
            let he = self.nodes[e as usize].score;
            let m1 = (self.miss_cost - 1.0).max(0.0);
            let value_cheaper = gain > 0 && hv * self.scharge(e) as f64 <= m1 * he * gain as f64;
            if value_cheaper {
                if hv > he {
                    self.demote(v);
                } else {
                    self.evict(v);
                }
            } else {
                self.evict(e);
            }
        }
        // Room bought for insertions stays theirs: what is left over is reserved.
        self.reserved = self.free_bytes() - need;
        true
    }

    // ---- node moves ---------------------------------------------------------------------

    /// Moves the value `i` out of the values: demoted if that frees room, else dropped.
    fn push_out(&mut self, i: u32) {
        if self.vcharge(i) > self.scharge(i) {
            self.demote(i);
        } else {
            self.evict(i);
        }
    }

    fn demote(&mut self, i: u32) {
        let vc = self.vcharge(i);
        self.heap_remove(VALUES, self.nodes[i as usize].pos as usize);
        self.stats.values -= 1;
        self.stats.value_bytes -= vc;
        self.release(i);
        self.nodes[i as usize].set_state(State::Free);
        self.attach_shortcut(i);
        self.stats.demotions += 1;
    }

    /// Drops a key for room.
    fn evict(&mut self, i: u32) {
        self.remember(i);
        self.forget(i);
        self.stats.evictions += 1;
    }

    /// Keeps a key's hit count in the history before it leaves the cache.
    fn remember(&mut self, i: u32) {
        let n = &self.nodes[i as usize];
        let hits = (n.score / self.weight).round().min(255.0) as u8;
        self.history.deposit(n.hash, hits);
    }

    /// Drops a key from every structure and frees its slot.
    fn forget(&mut self, i: u32) {
        self.detach(i);
        let hash = self.nodes[i as usize].hash;
        if let Ok(entry) = self.table.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        self.release(i);
        self.free_slots.push(i);
    }

    // ---- the value arena ------------------------------------------------------------------

    /// The value bytes of value node `i`.
    #[inline]
    fn value_of(&self, i: u32) -> &[u8] {
        let n = &self.nodes[i as usize];
        let (off, len, k) = (n.off as usize, n.len as usize, n.key_len as usize);
        &self.arena.bytes[off + k..off + len]
    }

    /// Puts `key ‖ value` at the end of the arena for node `i` (which holds none).
    fn store(&mut self, i: u32, key_len: u16, key: &[u8], value: &[u8]) {
        let bytes = &mut self.arena.bytes;
        let (off, cap) = (bytes.len(), bytes.capacity());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(value);
        if bytes.capacity() != cap {
            // The old allocation went back to the allocator.
            self.freed += cap as u64;
        }
        let n = &mut self.nodes[i as usize];
        n.off = off as u64;
        n.len = (key.len() + value.len()) as u32;
        n.key_len = key_len;
    }

    /// Leaves node `i`'s value bytes, if any, as garbage; compacts the arena once the
    /// garbage passes its bound.
    fn release(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        let (off, len) = (n.off as usize, n.len as usize);
        (n.len, n.key_len) = (0, 0);
        if off + len == self.arena.bytes.len() {
            // The newest value: its room is reused at once.
            self.arena.bytes.truncate(off);
        } else {
            self.arena.garbage += len as u64;
            if self.arena.garbage > Arena::max_garbage(self.cfg.budget_bytes) {
                self.compact();
            }
        }
    }

    /// Copies the live values into a new arena of their size and frees the old one.
    #[cold]
    fn compact(&mut self) {
        let live = self.arena.bytes.len() - self.arena.garbage as usize;
        let mut bytes = Vec::with_capacity(live + live / 8);
        for n in &mut self.nodes {
            if n.state() == State::Value {
                let (off, len) = (n.off as usize, n.len as usize);
                n.off = bytes.len() as u64;
                bytes.extend_from_slice(&self.arena.bytes[off..off + len]);
            }
        }
        self.freed += self.arena.bytes.capacity() as u64;
        self.arena = Arena { bytes, garbage: 0 };
        self.stats.compactions += 1;
    }

    /// Unlinks a node from its heap and uncharges it; the slot stays allocated.
    fn detach(&mut self, i: u32) {
        match self.nodes[i as usize].state() {
            State::Value => {
                let vc = self.vcharge(i);
                self.heap_remove(VALUES, self.nodes[i as usize].pos as usize);
                self.stats.values -= 1;
                self.stats.value_bytes -= vc;
            }
            State::Shortcut => {
                let sc = self.scharge(i);
                self.heap_remove(SHORTCUTS, self.nodes[i as usize].pos as usize);
                self.stats.shortcuts -= 1;
                self.stats.shortcut_bytes -= sc;
            }
            State::Free => {}
        }
        self.nodes[i as usize].set_state(State::Free);
    }

    fn attach_value(&mut self, i: u32) {
        let vc = self.vcharge(i);
        self.nodes[i as usize].set_state(State::Value);
        self.heap_push(VALUES, i);
        self.stats.values += 1;
        self.stats.value_bytes += vc;
        self.clip_reserved();
    }

    fn attach_shortcut(&mut self, i: u32) {
        let sc = self.scharge(i);
        self.nodes[i as usize].set_state(State::Shortcut);
        self.heap_push(SHORTCUTS, i);
        self.stats.shortcuts += 1;
        self.stats.shortcut_bytes += sc;
        self.clip_reserved();
    }

    /// Puts a node (not yet in the table) into a slot and the table.
    fn alloc(&mut self, node: Node) -> u32 {
        let hash = node.hash;
        let i = match self.free_slots.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        let nodes = &self.nodes;
        self.table
            .insert_unique(hash, i, |&j| nodes[j as usize].hash);
        i
    }

    #[inline]
    fn find(&self, key: &[u8]) -> Option<u32> {
        self.find_hashed(key_hash(key), key)
    }

    #[inline]
    fn find_hashed(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let (nodes, arena) = (&self.nodes, &self.arena.bytes);
        self.table
            .find(hash, |&j| {
                let n = &nodes[j as usize];
                // A shortcut has no key to compare: its hash names it (module doc).
                n.hash == hash
                    && (n.state() == State::Shortcut || {
                        let off = n.off as usize;
                        arena[off..off + n.key_len as usize] == *key
                    })
            })
            .copied()
    }

    /// Counts an access and advances the decay clock.
    #[inline]
    fn tick(&mut self) {
        self.clock += 1;
        if self.cfg.decay_every == 0 {
            return;
        }
        self.since_decay += 1;
        if self.since_decay >= self.cfg.decay_every {
            self.since_decay = 0;
            self.weight *= 2.0;
            self.epoch += 1;
            self.history.halve();
            if self.epoch >= RESCALE_EPOCHS {
                self.rescale();
            }
        }
    }

    /// Scales every score and the weight by `2^-RESCALE_EPOCHS`; order is preserved.
    #[cold]
    fn rescale(&mut self) {
        let f = 2f64.powi(-(RESCALE_EPOCHS as i32));
        for n in &mut self.nodes {
            n.score *= f;
            n.key *= f as f32;
        }
        self.weight *= f;
        self.epoch = 0;
    }

    // ---- heaps ------------------------------------------------------------------------

    /// The least-scored node of heap `k`, or [`NIL`].
    #[inline]
    fn least(&self, k: usize) -> u32 {
        self.heaps[k].first().copied().unwrap_or(NIL)
    }

    #[inline]
    fn key_at(&self, k: usize, pos: usize) -> f32 {
        self.nodes[self.heaps[k][pos] as usize].key
    }

    /// Brings the root of heap `k` up to date until it is the least score: the root's key
    /// is refreshed and sifted down while it lags its score. Every key is a lower bound of
    /// its score, so a root whose key is its score is the least score of the heap.
    fn settle(&mut self, k: usize) {
        while let Some(&i) = self.heaps[k].first() {
            let fresh = lower_bound(self.nodes[i as usize].score);
            if self.nodes[i as usize].key >= fresh {
                return;
            }
            self.nodes[i as usize].key = fresh;
            self.sift_down(k, 0);
        }
    }

    /// The least-scored value, or [`NIL`].
    fn least_value(&mut self) -> u32 {
        self.settle(VALUES);
        self.least(VALUES)
    }

    /// Refreshes shortcut `i`'s heap key after its score grew (shortcuts keep their heap
    /// exact: a shortcut hit costs a round trip anyway).
    #[inline]
    fn resift_shortcut(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        n.key = lower_bound(n.score);
        let pos = n.pos as usize;
        self.sift_down(SHORTCUTS, pos);
    }

    #[inline]
    fn heap_set(&mut self, k: usize, pos: usize, i: u32) {
        self.heaps[k][pos] = i;
        self.nodes[i as usize].pos = pos as u32;
    }

    fn heap_push(&mut self, k: usize, i: u32) {
        self.nodes[i as usize].key = lower_bound(self.nodes[i as usize].score);
        self.heaps[k].push(i);
        let pos = self.heaps[k].len() - 1;
        self.nodes[i as usize].pos = pos as u32;
        self.sift_up(k, pos);
    }

    fn heap_remove(&mut self, k: usize, pos: usize) {
        let last = self.heaps[k].len() - 1;
        let i = self.heaps[k][pos];
        self.nodes[i as usize].pos = NIL;
        if pos == last {
            self.heaps[k].pop();
            return;
        }
        let moved = self.heaps[k][last];
        self.heaps[k].pop();
        self.heap_set(k, pos, moved);
        self.sift_down(k, pos);
        self.sift_up(k, self.nodes[moved as usize].pos as usize);
    }

    fn sift_up(&mut self, k: usize, mut pos: usize) {
        let i = self.heaps[k][pos];
        let s = self.nodes[i as usize].key;
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if self.key_at(k, parent) <= s {
                break;
            }
            let p = self.heaps[k][parent];
            self.heap_set(k, pos, p);
            pos = parent;
        }
        self.heap_set(k, pos, i);
    }

    /// Restores heap order below `pos` after its key grew.
    #[inline]
    fn sift_down(&mut self, k: usize, mut pos: usize) {
        let len = self.heaps[k].len();
        let i = self.heaps[k][pos];
        let s = self.nodes[i as usize].key;
        loop {
            let l = 2 * pos + 1;
            if l >= len {
                break;
            }
            let r = l + 1;
            let c = if r < len && self.key_at(k, r) < self.key_at(k, l) {
                r
            } else {
                l
            };
            if self.key_at(k, c) >= s {
                break;
            }
            let ci = self.heaps[k][c];
            self.heap_set(k, pos, ci);
            pos = c;
        }
        self.heap_set(k, pos, i);
    }
}

/// Decayed access counts of keys that are not cached (a count-min sketch of saturating
/// byte counters, four probes per key). Without it a key evicted and missed again would
/// come back with a count of one, the LFU end would be full of such keys, and shortcuts
/// would look far cheaper to evict than they are.
#[derive(Debug)]
struct History {
    cells: Vec<u8>,
    mask: usize,
}

impl History {
    const PROBES: u64 = 4;

    /// Counters every history has, whatever its budget: 64 KiB, a fixed overhead per
    /// shard. A small cache needs a history much larger than the keys it holds, since
    /// it remembers the keys competing for it: charged to a budget of 256 KiB, a 4 KiB
    /// history kept DAC 16% above the optimum at cache ratio 0.01 (2% with this floor;
    /// `examples/dac_sim.rs`).
    const FIXED: usize = 1 << 16;

    /// Budget bytes per counter above the floor. A large cache needs fewer counters per
    /// byte than it has shortcuts: at cache ratio 0.5 one counter per 64-byte shortcut
    /// took 1.5% of the budget and kept DAC 8% above the optimum after 20 M reads, one
    /// per 256 bytes 3.6%.
    const BUDGET_PER_COUNTER: u64 = 256;

    /// One counter per [`History::BUDGET_PER_COUNTER`] budget bytes, rounded up to a power
    /// of two, at least [`History::FIXED`] and at most 16 MiB.
    fn for_budget(budget: u64) -> Self {
        let n = (budget / Self::BUDGET_PER_COUNTER).clamp(Self::FIXED as u64, 1 << 24);
        let n = (n as usize).next_power_of_two();
        Self {
            cells: vec![0; n],
            mask: n - 1,
        }
    }

    #[inline]
    fn cell(&self, hash: u64, probe: u64) -> usize {
        let x =
            (hash ^ probe.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (x >> 32) as usize & self.mask
    }

    fn estimate(&self, hash: u64) -> u8 {
        (0..Self::PROBES)
            .map(|p| self.cells[self.cell(hash, p)])
            .min()
            .unwrap_or(0)
    }

    /// Counts one access (conservative update: only the smallest counters grow).
    fn record(&mut self, hash: u64) {
        let min = self.estimate(hash);
        if min == u8::MAX {
            return;
        }
        for p in 0..Self::PROBES {
            let c = self.cell(hash, p);
            if self.cells[c] == min {
                self.cells[c] = min + 1;
            }
        }
    }

    /// Raises the key's count to at least `hits`.
    fn deposit(&mut self, hash: u64, hits: u8) {
        for p in 0..Self::PROBES {
            let c = self.cell(hash, p);
            self.cells[c] = self.cells[c].max(hits);
        }
    }

    fn halve(&mut self) {
        for c in &mut self.cells {
            *c >>= 1;
        }
    }
}

fn sane_miss_cost(rts: f64) -> Option<f64> {
    rts.is_finite().then(|| rts.max(1.0))
}

/// The static-optimal split of a budget for a known popularity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Oracle {
    /// The hottest `values` keys are cached as values…
    pub values: u64,
    /// …the next `shortcuts` as shortcuts, the rest miss.
    pub shortcuts: u64,
    /// Expected RTs per read of that split.
    pub rts_per_read: f64,
}

/// Static-optimal split of `budget` between values and shortcuts for a known popularity:
/// the hottest keys as values, the next as shortcuts, the rest misses, chosen to minimise
/// expected RTs per read (a value hit costs 0, a shortcut hit 1, a miss `miss_cost`).
///
/// `popularity_desc` holds access probabilities sorted in descending order. For a given
/// number of values, filling the rest of the budget with shortcuts is best whenever a miss
/// costs at least a shortcut hit, so the search is over the number of values: O(n).
pub fn oracle(
    popularity_desc: &[f64],
    value_charge: u64,
    shortcut_charge: u64,
    budget: u64,
    miss_cost: f64,
) -> Oracle {
    let n = popularity_desc.len() as u64;
    debug_assert!(
        popularity_desc.windows(2).all(|w| w[0] >= w[1]),
        "popularity must be sorted in descending order"
    );
    let mut prefix = Vec::with_capacity(popularity_desc.len() + 1);
    prefix.push(0.0);
    let mut acc = 0.0;
    for &p in popularity_desc {
        acc += p;
        prefix.push(acc);
    }
    let total = acc;
    let use_shortcuts = miss_cost > 1.0;
    let max_values = budget.checked_div(value_charge).map_or(n, |v| v.min(n));
    let mut best = Oracle {
        values: 0,
        shortcuts: 0,
        rts_per_read: f64::INFINITY,
    };
    for a in 0..=max_values {
        let left = budget - a * value_charge;
        let b = if use_shortcuts {
            left.checked_div(shortcut_charge)
                .map_or(n - a, |b| b.min(n - a))
        } else {
            0
        };
        let (ca, cab) = (prefix[a as usize], prefix[(a + b) as usize]);
        let rts = (cab - ca) + (total - cab) * miss_cost;
        if rts < best.rts_per_read {
            best = Oracle {
                values: a,
                shortcuts: b,
                rts_per_read: rts,
            };
        }
    }
    best
}

#[cfg(test)]
impl DacCache {
    /// Walks every structure and checks it against the counters and the budget.
    fn assert_invariants(&self) {
        let (mut value_bytes, mut shortcut_bytes) = (0u64, 0u64);
        for (k, state) in [(VALUES, State::Value), (SHORTCUTS, State::Shortcut)] {
            for (pos, &i) in self.heaps[k].iter().enumerate() {
                let n = &self.nodes[i as usize];
                assert_eq!(n.state(), state, "a node in the wrong heap");
                assert_eq!(n.pos as usize, pos, "heap position");
                if pos > 0 {
                    assert!(self.key_at(k, (pos - 1) / 2) <= n.key, "heap order");
                }
                assert!(f64::from(n.key) <= n.score, "a heap key above its score");
                match state {
                    State::Value => value_bytes += self.vcharge(i),
                    _ => {
                        assert_eq!(n.len, 0, "a shortcut holding bytes");
                        shortcut_bytes += self.scharge(i);
                    }
                }
            }
        }
        let values = self.heaps[VALUES].len() as u64;
        let heap = &self.heaps[SHORTCUTS];
        let live: u64 = self.heaps[VALUES]
            .iter()
            .map(|&i| u64::from(self.nodes[i as usize].len))
            .sum();
        assert_eq!(
            self.arena.bytes.len() as u64,
            live + self.arena.garbage,
            "arena bytes are live values plus garbage"
        );
        assert!(
            self.arena.garbage <= Arena::max_garbage(self.cfg.budget_bytes) + (2 << 20),
            "arena garbage past its bound"
        );
        let live = self
            .nodes
            .iter()
            .filter(|n| n.state() != State::Free)
            .count();
        assert_eq!(
            live as u64,
            values + heap.len() as u64,
            "a node in no structure"
        );
        assert_eq!(self.table.len(), live, "table size");
        for (i, n) in self.nodes.iter().enumerate() {
            if n.state() != State::Free {
                let off = n.off as usize;
                let key = match n.state() {
                    State::Value => &self.arena.bytes[off..off + n.key_len as usize],
                    _ => &[],
                };
                let found = self.find_hashed(n.hash, key);
                assert_eq!(found, Some(i as u32), "table entry");
            }
        }
        let s = self.stats;
        assert_eq!(s.values, values);
        assert_eq!(s.value_bytes, value_bytes);
        assert_eq!(s.shortcuts, heap.len() as u64);
        assert_eq!(s.shortcut_bytes, shortcut_bytes);
        assert!(
            s.value_bytes + s.shortcut_bytes + s.history_bytes <= self.cfg.budget_bytes,
            "budget exceeded: {s:?}"
        );
        match self.cfg.policy {
            CachePolicy::ShortcutOnly => assert_eq!(s.values, 0),
            CachePolicy::ValueOnly => assert_eq!(s.shortcuts, 0),
            CachePolicy::Dac => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of 1 B: a value of 89 B costs 90 B, a shortcut 10 B (Δ = 80 B, 8 shortcuts).
    fn cfg(budget: u64, policy: CachePolicy) -> DacConfig {
        DacConfig {
            budget_bytes: budget,
            policy,
            value_overhead: 0,
            shortcut_charge: 10,
            initial_miss_cost: 2.0,
            decay_every: 0,
        }
    }
    fn k(n: u8) -> [u8; 1] {
        [n]
    }
    fn val(n: u8) -> Vec<u8> {
        vec![n; 89]
    }
    /// A value too large to be cached as a value in the small budgets below.
    fn big(n: u8) -> Vec<u8> {
        vec![n; 500]
    }
    fn e(n: u64) -> EntryRef {
        EntryRef(n)
    }
    fn is_value(c: &DacCache, n: u8) -> bool {
        matches!(c.peek(&k(n)), Lookup::Value(_))
    }
    fn is_shortcut(c: &DacCache, n: u8) -> bool {
        matches!(c.peek(&k(n)), Lookup::Shortcut(_))
    }
    /// A read as the shard does it: get, then fetch on a shortcut hit or a miss.
    fn read(c: &mut DacCache, n: u8, value: &[u8]) -> Lookup<'static> {
        let r = match c.get(&k(n)) {
            Lookup::Value(_) => Lookup::Value(&[]),
            other => other.clone_static(),
        };
        match r {
            Lookup::Shortcut(_) => c.on_fetch(&k(n), value, e(n.into()), true),
            Lookup::Miss => c.on_fetch(&k(n), value, e(n.into()), false),
            Lookup::Value(_) => {}
        }
        c.assert_invariants();
        r
    }

    impl Lookup<'_> {
        fn clone_static(&self) -> Lookup<'static> {
            match *self {
                Lookup::Value(_) => Lookup::Value(&[]),
                Lookup::Shortcut(r) => Lookup::Shortcut(r),
                Lookup::Miss => Lookup::Miss,
            }
        }
    }

    #[test]
    fn policy_names_round_trip_and_unknown_lists_valid() {
        for p in CachePolicy::ALL {
            assert_eq!(p.to_string().parse::<CachePolicy>(), Ok(p));
        }
        assert_eq!("shortcut-only".parse(), Ok(CachePolicy::ShortcutOnly));
        let err = "lru".parse::<CachePolicy>().expect_err("unknown name");
        let msg = err.to_string();
        for name in CachePolicy::NAMES {
            assert!(msg.contains(name), "{msg}");
        }
        assert!(msg.contains("lru"));
    }

    #[test]
    fn new_key_goes_in_as_value_when_it_fits() {
        let mut c = DacCache::new(cfg(200, CachePolicy::Dac));
        c.on_write(&k(1), &val(1), e(1));
        c.assert_invariants();
        assert_eq!(c.get(&k(1)), Lookup::Value(&val(1)));
        let s = c.stats();
        assert_eq!((s.values, s.value_bytes, s.shortcuts), (1, 90, 0));
        assert_eq!(c.get(&k(2)), Lookup::Miss);
    }

    #[test]
    fn new_key_as_shortcut_demotes_the_least_used_value() {
        let mut c = DacCache::new(cfg(185, CachePolicy::Dac));
        c.on_write(&k(1), &val(1), e(1));
        c.on_write(&k(2), &val(2), e(2));
        c.get(&k(1));
        c.get(&k(2));
        c.get(&k(2)); // k1 is the least used, with 2 hits
        c.on_write(&k(3), &val(3), e(3)); // 5 B free: needs a shortcut's 10
        c.assert_invariants();
        assert!(is_shortcut(&c, 1) && is_value(&c, 2) && is_shortcut(&c, 3));
        assert_eq!(c.peek(&k(1)), Lookup::Shortcut(e(1)));
        assert_eq!(c.hits(&k(1)), Some(2.0), "a demoted value keeps its count");
        let s = c.stats();
        assert_eq!((s.demotions, s.evictions), (1, 0));
        assert_eq!(s.value_bytes + s.shortcut_bytes, 110);
    }

    #[test]
    fn lfu_shortcut_is_evicted_when_no_values_are_left() {
        for policy in [CachePolicy::Dac, CachePolicy::ShortcutOnly] {
            let mut c = DacCache::new(cfg(30, policy)); // three shortcuts, no value fits
            for n in 1..=3 {
                c.on_write(&k(n), &val(n), e(n.into()));
            }
            for _ in 0..3 {
                c.get(&k(1));
                c.get(&k(3));
            }
            c.get(&k(2));
            c.on_write(&k(4), &val(4), e(4)); // k2 has the fewest hits
            c.assert_invariants();
            assert!(!c.contains(&k(2)), "{policy}");
            assert!(is_shortcut(&c, 1) && is_shortcut(&c, 3) && is_shortcut(&c, 4));
            assert_eq!(c.stats().evictions, 1);
            c.on_write(&k(5), &val(5), e(5)); // the newcomer k4 is now the LFU one
            assert!(!c.contains(&k(4)) && c.contains(&k(5)));
        }
    }

    #[test]
    fn shortcut_hit_is_promoted_when_there_is_room() {
        let mut c = DacCache::new(cfg(185, CachePolicy::Dac));
        c.on_write(&k(1), &val(1), e(1));
        c.on_write(&k(2), &val(2), e(2));
        c.on_write(&k(3), &val(3), e(3)); // demotes k1
        assert!(is_shortcut(&c, 1));
        c.remove(&k(2));
        assert_eq!(read(&mut c, 1, &val(1)), Lookup::Shortcut(e(1)));
        assert!(is_value(&c, 1));
        let s = c.stats();
        assert_eq!((s.promotions, s.values, s.shortcuts), (1, 1, 1));
        assert_eq!(c.get(&k(1)), Lookup::Value(&val(1)));
    }

    /// Nine cold shortcuts and `k0` as a shortcut in a 100 B budget: promoting `k0` needs
    /// 80 B, i.e. evicting 8 shortcuts of 1 hit each.
    fn full_of_shortcuts(miss_cost: f64) -> DacCache {
        let mut c = DacCache::new(DacConfig {
            initial_miss_cost: miss_cost,
            ..cfg(100, CachePolicy::Dac)
        });
        for n in 1..=9 {
            c.on_write(&k(n), &big(n), e(n.into()));
        }
        c.get(&k(5)); // k5 is the one survivor
        c.on_write(&k(0), &val(0), e(0));
        c.assert_invariants();
        assert_eq!(c.stats().shortcuts, 10);
        c
    }

    #[test]
    fn promotion_pays_only_above_the_evicted_shortcuts_hits() {
        // M = 2: promote iff h(k0) > (2 - 1) * 8.
        let mut c = full_of_shortcuts(2.0);
        for h in 2..=8 {
            assert_eq!(read(&mut c, 0, &val(0)), Lookup::Shortcut(e(0)));
            assert_eq!(c.hits(&k(0)), Some(h as f64));
            assert!(is_shortcut(&c, 0), "promoted at {h} hits, not > 8");
        }
        assert_eq!(c.stats().promotions, 0);
        read(&mut c, 0, &val(0)); // 9 > 8
        assert!(is_value(&c, 0));
        let s = c.stats();
        assert_eq!((s.promotions, s.evictions, s.shortcuts), (1, 8, 1));
        assert!(is_shortcut(&c, 5), "the most used shortcut survives");
    }

    #[test]
    fn promotion_price_scales_with_the_miss_cost() {
        // M = 3: promote iff h(k0) > (3 - 1) * 8.
        let mut c = full_of_shortcuts(3.0);
        for _ in 2..=16 {
            read(&mut c, 0, &val(0));
        }
        assert!(is_shortcut(&c, 0));
        read(&mut c, 0, &val(0));
        assert!(is_value(&c, 0));
        // Dearer misses later: a refresh of the measurement changes the price.
        let mut c = full_of_shortcuts(2.0);
        c.set_miss_cost(5.0);
        for _ in 2..=20 {
            read(&mut c, 0, &val(0));
        }
        assert!(is_shortcut(&c, 0), "h = 20 is not > 4 * 8");
    }

    #[test]
    fn promotion_demotes_a_cold_value_when_that_is_cheaper() {
        let mut c = DacCache::new(cfg(200, CachePolicy::Dac));
        c.on_write(&k(1), &val(1), e(1)); // value, 1 hit
        for n in 2..=9 {
            c.on_write(&k(n), &big(n), e(n.into()));
            for _ in 0..5 {
                c.get(&k(n)); // hot shortcuts: 6 hits each
            }
        }
        c.on_write(&k(0), &val(0), e(0)); // 20 B free: a shortcut
        assert!(is_shortcut(&c, 0));
        // Needs 60 B more: 6 shortcuts (36 RTs) or demoting k1 (1 RT). h(k0) = 2 > 1.
        read(&mut c, 0, &val(0));
        c.assert_invariants();
        assert!(is_value(&c, 0) && is_shortcut(&c, 1));
        let s = c.stats();
        assert_eq!((s.promotions, s.demotions, s.evictions), (1, 1, 0));
        assert_eq!(s.shortcuts, 9);
    }

    #[test]
    fn value_larger_than_the_budget_is_never_a_value() {
        let mut c = DacCache::new(cfg(100, CachePolicy::Dac));
        c.on_write(&k(1), &big(1), e(1));
        assert!(is_shortcut(&c, 1));
        for _ in 0..50 {
            read(&mut c, 1, &big(1));
        }
        assert!(is_shortcut(&c, 1));
        let mut c = DacCache::new(cfg(100, CachePolicy::ValueOnly));
        c.on_write(&k(1), &big(1), e(1));
        assert_eq!(read(&mut c, 1, &big(1)), Lookup::Miss);
        assert!(!c.contains(&k(1)));
        // A cached value that grows past the budget is uncached, not kept stale.
        c.on_write(&k(2), &val(2), e(2));
        c.on_write(&k(2), &big(2), e(3));
        c.assert_invariants();
        assert!(!c.contains(&k(2)));
    }

    #[test]
    fn entry_larger_than_the_budget_is_not_cached() {
        let mut c = DacCache::new(cfg(5, CachePolicy::Dac));
        c.on_write(&k(1), &val(1), e(1));
        c.assert_invariants();
        assert!(!c.contains(&k(1)));
    }

    #[test]
    fn value_only_is_lru() {
        let mut c = DacCache::new(cfg(200, CachePolicy::ValueOnly));
        c.on_write(&k(1), &val(1), e(1));
        c.on_write(&k(2), &val(2), e(2));
        for _ in 0..10 {
            c.get(&k(2));
        }
        c.get(&k(1)); // k2 is LRU however often it was read
        c.on_write(&k(3), &val(3), e(3));
        c.assert_invariants();
        assert!(is_value(&c, 1) && !c.contains(&k(2)) && is_value(&c, 3));
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(read(&mut c, 2, &val(2)), Lookup::Miss);
        assert!(is_value(&c, 2) && !c.contains(&k(1)));
    }

    #[test]
    fn shortcut_only_never_caches_values() {
        let mut c = DacCache::new(cfg(10_000, CachePolicy::ShortcutOnly));
        for n in 0..20 {
            c.on_write(&k(n), &val(n), e(n.into()));
            read(&mut c, n, &val(n));
            read(&mut c, n, &val(n));
        }
        let s = c.stats();
        assert_eq!((s.values, s.shortcuts, s.promotions), (0, 20, 0));
    }

    #[test]
    fn write_replaces_older_state() {
        let mut c = DacCache::new(cfg(1000, CachePolicy::Dac));
        c.on_write(&k(1), &val(1), e(1));
        c.on_write(&k(1), &val(7), e(7)); // same length: in place
        assert_eq!(c.get(&k(1)), Lookup::Value(&val(7)));
        c.on_write(&k(1), b"short", e(8)); // other length
        assert_eq!(c.get(&k(1)), Lookup::Value(b"short"));
        assert_eq!(c.stats().value_bytes, 6);
        // A value that no longer fits where it was becomes a shortcut to the new entry.
        c.on_write(&k(1), &vec![3; 2000], e(9));
        c.assert_invariants();
        assert_eq!(c.get(&k(1)), Lookup::Shortcut(e(9)));
        c.on_write(&k(1), &val(4), e(10)); // a shortcut written with room: a value again
        assert_eq!(c.get(&k(1)), Lookup::Value(&val(4)));
        assert_eq!(c.stats().values, 1);
        assert_eq!(c.stats().shortcuts, 0);
        // A fetched shortcut's entry replaces the old one even when it stays a shortcut.
        let mut c = DacCache::new(cfg(100, CachePolicy::ShortcutOnly));
        c.on_write(&k(1), &val(1), e(1));
        c.on_fetch(&k(1), &val(1), e(2), true);
        assert_eq!(c.peek(&k(1)), Lookup::Shortcut(e(2)));
    }

    #[test]
    fn remove_and_retain_forget_keys() {
        let mut c = DacCache::new(cfg(300, CachePolicy::Dac));
        for n in 0..10 {
            c.on_write(&k(n), &val(n), e(n.into()));
        }
        let before = c.stats();
        assert!(before.values > 0 && before.shortcuts > 0);
        c.remove(&k(0));
        c.remove(&k(0));
        c.remove(&k(200));
        assert!(!c.contains(&k(0)));
        let odd: Vec<u16> = (0..10)
            .filter(|n| n % 2 == 1)
            .map(|n| key_slot(&k(n)))
            .collect();
        let even = (0..10).filter(|n| n % 2 == 0).map(|n| key_slot(&k(n)));
        assert!(even.clone().all(|s| !odd.contains(&s)), "keys share a slot");
        c.retain(|slot| odd.contains(&slot));
        c.assert_invariants();
        for n in 0..10 {
            assert_eq!(c.contains(&k(n)), n % 2 == 1, "key {n}");
        }
        assert_eq!(c.stats().evictions, before.evictions, "not evictions");
        c.retain(|_| false);
        c.assert_invariants();
        assert_eq!(c.used_bytes(), 0);
        // Freed slots are reused.
        for n in 0..10 {
            c.on_write(&k(n), &val(n), e(n.into()));
        }
        c.assert_invariants();
    }

    #[test]
    fn the_value_arena_is_compacted_and_values_survive_it() {
        // 1 MiB of values churned many times over: rewrites with other lengths, demotions
        // and evictions leave garbage, which compaction must bound without losing a value.
        let mut c = DacCache::new(DacConfig {
            budget_bytes: 1 << 20,
            ..cfg(0, CachePolicy::Dac)
        });
        let mut newest = std::collections::HashMap::new();
        for round in 0..40u32 {
            for n in 0..=255u8 {
                let len = 500 + ((u32::from(n) * 7 + round * 13) % 1500) as usize;
                let v = vec![n ^ round as u8; len];
                c.on_write(&k(n), &v, e(u64::from(n)));
                newest.insert(n, v);
            }
            c.assert_invariants();
        }
        assert!(c.stats().compactions > 0, "{:?}", c.stats());
        let max = Arena::max_garbage(1 << 20);
        assert!(c.arena.garbage <= max, "{} > {max}", c.arena.garbage);
        for n in 0..=255u8 {
            if let Lookup::Value(v) = c.peek(&k(n)) {
                assert_eq!(v, &newest[&n][..], "key {n}");
            }
        }
    }

    #[test]
    fn hit_counts_halve_every_decay_period() {
        let mut c = DacCache::new(DacConfig {
            decay_every: 4,
            ..cfg(1000, CachePolicy::Dac)
        });
        c.on_write(&k(1), &val(1), e(1)); // access 1
        c.get(&k(1));
        c.get(&k(1));
        assert_eq!(c.hits(&k(1)), Some(3.0));
        c.get(&k(1)); // access 4: the three earlier hits halve, then this one counts
        assert_eq!(c.hits(&k(1)), Some(2.5));
        for _ in 0..4 {
            c.get(&k(9));
        }
        assert_eq!(c.hits(&k(1)), Some(1.25));
    }

    #[test]
    fn decay_lets_the_cache_follow_a_moving_workload() {
        let run = |decay_every| {
            let mut c = DacCache::new(DacConfig {
                decay_every,
                ..cfg(20, CachePolicy::ShortcutOnly)
            });
            for _ in 0..200 {
                read(&mut c, 1, &val(1));
            }
            for _ in 0..50 {
                read(&mut c, 2, &val(2));
                read(&mut c, 3, &val(3));
            }
            (c.contains(&k(1)), c.contains(&k(2)), c.contains(&k(3)))
        };
        assert_eq!(
            run(0),
            (true, false, true),
            "plain LFU keeps the old hot key"
        );
        assert_eq!(run(16), (false, true, true));
    }

    #[test]
    fn scores_stay_finite_over_many_decay_periods() {
        let mut c = DacCache::new(DacConfig {
            decay_every: 1,
            ..cfg(50, CachePolicy::ShortcutOnly)
        });
        for i in 0..3000u32 {
            read(&mut c, (i % 7) as u8, &val(0));
        }
        for n in 0..7 {
            if let Some(h) = c.hits(&k(n)) {
                assert!(h.is_finite() && h > 0.0 && h < 3.0, "{h}");
            }
        }
        assert_eq!(c.stats().shortcuts, 5);
    }

    #[test]
    fn miss_cost_is_sanitised() {
        let mut c = DacCache::new(cfg(10, CachePolicy::Dac));
        assert_eq!(c.miss_cost(), 2.0);
        c.set_miss_cost(f64::NAN);
        assert_eq!(c.miss_cost(), 2.0);
        c.set_miss_cost(0.5);
        assert_eq!(c.miss_cost(), 1.0);
        c.set_miss_cost(4.25);
        assert_eq!(c.miss_cost(), 4.25);
    }

    // ---- oracle ------------------------------------------------------------------------

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn oracle_uniform() {
        // 4 keys at 1/4; vc 10, sc 1, 13 B: no values → 4 shortcuts, 1.0 RT;
        // one value → 3 B for 3 shortcuts, 0.75 RT; two values do not fit.
        let o = oracle(&[0.25; 4], 10, 1, 13, 2.0);
        assert_eq!((o.values, o.shortcuts), (1, 3));
        assert!(close(o.rts_per_read, 0.75), "{o:?}");
    }

    #[test]
    fn oracle_all_fits_and_nothing_fits() {
        let p = [0.5, 0.25, 0.125, 0.125];
        let o = oracle(&p, 10, 2, 40, 2.0);
        assert_eq!((o.values, o.shortcuts), (4, 0));
        assert!(close(o.rts_per_read, 0.0));
        let o = oracle(&p, 10, 2, 1, 3.0);
        assert_eq!((o.values, o.shortcuts), (0, 0));
        assert!(close(o.rts_per_read, 3.0));
        // Only shortcuts fit.
        let o = oracle(&p, 10, 2, 9, 3.0);
        assert_eq!((o.values, o.shortcuts), (0, 4));
        assert!(close(o.rts_per_read, 1.0));
    }

    #[test]
    fn oracle_three_keys_by_hand() {
        // p = .4 .35 .25, vc 10, sc 4, 12 B. Either three shortcuts (1.0 RT) or the hottest
        // as a value and no room left (0.6 × M RT): shortcuts win at M = 2 (1.0 < 1.2),
        // the value at M = 1.5 (0.9 < 1.0).
        let p = [0.4, 0.35, 0.25];
        let o = oracle(&p, 10, 4, 12, 2.0);
        assert_eq!((o.values, o.shortcuts), (0, 3));
        assert!(close(o.rts_per_read, 1.0));
        let o = oracle(&p, 10, 4, 12, 1.5);
        assert_eq!((o.values, o.shortcuts), (1, 0));
        assert!(close(o.rts_per_read, 0.9));
        // 14 B: value + one shortcut, .35 + .25 × 2 = 0.85.
        let o = oracle(&p, 10, 4, 14, 2.0);
        assert_eq!((o.values, o.shortcuts), (1, 1));
        assert!(close(o.rts_per_read, 0.85));
    }

    // ---- random operation sequences against a model ------------------------------------

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Clone, Debug)]
        enum Op {
            Read(u8),
            Write(u8, usize),
            Delete(u8),
            Retain(u16),
            MissCost(f64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..16u8).prop_map(Op::Read),
                3 => (0..16u8, 0..150usize).prop_map(|(k, l)| Op::Write(k, l)),
                1 => (0..16u8).prop_map(Op::Delete),
                1 => any::<u16>().prop_map(Op::Retain),
                1 => (0.5..8.0f64).prop_map(Op::MissCost),
            ]
        }

        fn policy() -> impl Strategy<Value = CachePolicy> {
            prop_oneof![
                Just(CachePolicy::Dac),
                Just(CachePolicy::ShortcutOnly),
                Just(CachePolicy::ValueOnly)
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn random_ops_keep_invariants_and_answers(
                policy in policy(),
                budget in 0..1500u64,
                value_overhead in 0..40u64,
                shortcut_charge in 0..30u64,
                decay_every in 0..20u64,
                ops in proptest::collection::vec(op(), 1..300),
            ) {
                let mut c = DacCache::new(DacConfig {
                    budget_bytes: budget,
                    policy,
                    value_overhead,
                    shortcut_charge,
                    initial_miss_cost: 2.0,
                    decay_every,
                });
                // DPM: the last value and entry written per key.
                let mut dpm: HashMap<u8, (Vec<u8>, EntryRef)> = HashMap::new();
                let mut seq = 0u64;
                for op in ops {
                    match op {
                        Op::Read(n) => {
                            let key = [n, 0xAB];
                            let fetch = c.get(&key).check_against(dpm.get(&n));
                            if let (Some(was_shortcut), Some((v, r))) = (fetch, dpm.get(&n)) {
                                c.on_fetch(&key, v, *r, was_shortcut);
                            }
                        }
                        Op::Write(n, len) => {
                            seq += 1;
                            let v: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
                            let r = EntryRef(seq);
                            c.on_write(&[n, 0xAB], &v, r);
                            dpm.insert(n, (v, r));
                        }
                        Op::Delete(n) => {
                            c.remove(&[n, 0xAB]);
                            dpm.remove(&n);
                        }
                        Op::Retain(mask) => {
                            let kept: Vec<u16> = (0..16u8)
                                .filter(|n| mask & (1 << n) != 0)
                                .map(|n| key_slot(&[n, 0xAB]))
                                .collect();
                            c.retain(|slot| kept.contains(&slot));
                            for n in 0..16u8 {
                                if !kept.contains(&key_slot(&[n, 0xAB])) {
                                    prop_assert!(!c.contains(&[n, 0xAB]));
                                }
                            }
                        }
                        Op::MissCost(m) => c.set_miss_cost(m),
                    }
                    c.assert_invariants();
                    for n in 0..16u8 {
                        let key = [n, 0xAB];
                        match (c.peek(&key), dpm.get(&n)) {
                            (Lookup::Miss, _) => {}
                            (Lookup::Value(v), Some((want, _))) => prop_assert_eq!(v, &want[..]),
                            (Lookup::Shortcut(r), Some((_, want))) => prop_assert_eq!(r, *want),
                            (other, None) => prop_assert!(false, "deleted key {n} cached: {other:?}"),
                        }
                    }
                }
            }
        }

        impl Lookup<'_> {
            /// Checks a hit against DPM; `Some(was_shortcut)` if the read must fetch.
            fn check_against(&self, dpm: Option<&(Vec<u8>, EntryRef)>) -> Option<bool> {
                match (*self, dpm) {
                    (Lookup::Value(v), Some((want, _))) => {
                        assert_eq!(v, &want[..], "stale value");
                        None
                    }
                    (Lookup::Shortcut(r), Some((_, want))) => {
                        assert_eq!(r, *want, "stale shortcut");
                        Some(true)
                    }
                    (Lookup::Miss, _) => Some(false),
                    (hit, None) => panic!("hit on a deleted key: {hit:?}"),
                }
            }
        }
    }

    // ---- simulation against the oracle -------------------------------------------------

    mod simulation {
        use super::*;

        const N: usize = 10_000;
        const KEY: usize = 8;
        const VALUE: usize = 1024;

        fn splitmix64(state: &mut u64) -> u64 {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Zipf(s) over ranks 0..n by inverse CDF.
        struct Zipf {
            probs: Vec<f64>,
            cdf: Vec<f64>,
            rng: u64,
        }

        impl Zipf {
            fn new(n: usize, s: f64, seed: u64) -> Self {
                let raw: Vec<f64> = (1..=n).map(|i| (i as f64).powf(-s)).collect();
                let total: f64 = raw.iter().sum();
                let probs: Vec<f64> = raw.iter().map(|p| p / total).collect();
                let mut acc = 0.0;
                let cdf = probs
                    .iter()
                    .map(|p| {
                        acc += p;
                        acc
                    })
                    .collect();
                Self {
                    probs,
                    cdf,
                    rng: seed,
                }
            }
            fn sample(&mut self) -> usize {
                let u = (splitmix64(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
                self.cdf
                    .partition_point(|&c| c <= u)
                    .min(self.cdf.len() - 1)
            }
        }

        /// Mean RTs per read of `policy` after a warm-up.
        fn run(policy: CachePolicy, budget: u64, miss_cost: f64, decay_every: u64) -> f64 {
            let cfg = DacConfig {
                budget_bytes: budget,
                policy,
                initial_miss_cost: miss_cost,
                decay_every,
                ..DacConfig::default()
            };
            let mut c = DacCache::new(cfg);
            let mut zipf = Zipf::new(N, 0.99, 42);
            let value = vec![0x5A; VALUE];
            let (warm, measured) = (200_000, 400_000);
            let mut rts = 0.0;
            for i in 0..warm + measured {
                let rank = zipf.sample();
                let key = (rank as u64).to_be_bytes();
                let r = EntryRef((rank * 2048) as u64);
                let cost = match c.get(&key) {
                    Lookup::Value(_) => 0.0,
                    Lookup::Shortcut(_) => {
                        c.on_fetch(&key, &value, r, true);
                        1.0
                    }
                    Lookup::Miss => {
                        c.on_fetch(&key, &value, r, false);
                        miss_cost
                    }
                };
                if i >= warm {
                    rts += cost;
                }
            }
            c.assert_invariants();
            if std::env::var_os("DAC_SIM_VERBOSE").is_some() {
                println!("{policy} {budget}: {:?}", c.stats());
            }
            rts / measured as f64
        }

        #[test]
        fn dac_tracks_the_static_optimum_on_zipf() {
            let d = DacConfig::default();
            let (vc, sc) = (d.value_charge(KEY, VALUE), d.shortcut_bytes());
            let probs = Zipf::new(N, 0.99, 0).probs;
            let data = (N * (KEY + VALUE)) as u64;
            let miss_cost = 2.0;
            let mut table = String::from(
                "ratio  oracle (values+shortcuts)  dac  dac(decay 50k)  shortcut-only  value-only\n",
            );
            let never = 0;
            let mut failures = Vec::new();
            for pct in [1u64, 5, 20] {
                let budget = data * pct / 100;
                let o = oracle(&probs, vc, sc, budget, miss_cost);
                let dac = run(CachePolicy::Dac, budget, miss_cost, never);
                let decayed = run(CachePolicy::Dac, budget, miss_cost, 50_000);
                let so = run(CachePolicy::ShortcutOnly, budget, miss_cost, never);
                let vo = run(CachePolicy::ValueOnly, budget, miss_cost, never);
                table += &format!(
                    "{pct:>4}%  {:.4} ({}+{})  {dac:.4}  {decayed:.4}  {so:.4}  {vo:.4}\n",
                    o.rts_per_read, o.values, o.shortcuts
                );
                for (name, got) in [("dac", dac), ("dac with decay", decayed)] {
                    if got > o.rts_per_read * 1.10 {
                        failures.push(format!(
                            "{pct}%: {name} {got:.4} > 1.1 × oracle {:.4}",
                            o.rts_per_read
                        ));
                    }
                }
                if dac > so.min(vo) + 0.01 {
                    failures.push(format!("{pct}%: dac {dac:.4} worse than a fixed policy"));
                }
            }
            println!("{table}");
            assert!(failures.is_empty(), "{failures:?}\n{table}");
        }
    }
}
