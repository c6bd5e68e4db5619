//! DINOMO-N, the shared-nothing baseline: the same KNs (DAC, ownership, group commit) and
//! memory node, but every KN keeps its data in a key-space partition of its own. A key is
//! stored as `{tag}` + partition + key, where `tag` is a short string whose Redis slot is
//! the key's slot (so routing and ownership are unchanged) and the partition is the KN that
//! owned the slot when the key was written. No KN ever reads another's partition.
//!
//! The steady state therefore costs what DINOMO costs (keys are 6–8 bytes longer). The
//! difference is reconfiguration: moving a slot to another KN copies every live key of the
//! slot from the old owner's partition into the new owner's (read through the old owner,
//! written through the new one, then deleted from the old partition), where DINOMO moves
//! only ownership. [`DinomoN::move_slot`] does that and counts the bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dinomo_shared::block::BlockHeader;
use dinomo_shared::entry::{self, Op, MAX_KEY_LEN};
use dinomo_shared::slot::{key_slot, SLOTS};
use host_kn::{Client, KvError, SlotMap};

use super::{Cluster, ClusterConfig, ClusterError};

/// Bytes added to every key: `{`, the tag (up to 4), `}`, 2 partition bytes.
pub const MAX_KEY_OVERHEAD: usize = 8;

/// For every slot, a short tag whose slot it is.
#[derive(Debug)]
pub struct SlotTags(Vec<Vec<u8>>);

impl SlotTags {
    /// Searches base-36 strings in order until every slot has one (about 170 000 tries).
    pub fn new() -> Self {
        const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut tags: Vec<Vec<u8>> = vec![Vec::new(); SLOTS as usize];
        let mut left = SLOTS as usize;
        let mut n = 0u64;
        while left > 0 {
            let mut t = Vec::with_capacity(4);
            let mut x = n;
            loop {
                t.push(DIGITS[(x % 36) as usize]);
                x /= 36;
                if x == 0 {
                    break;
                }
            }
            let s = key_slot(&t) as usize;
            if tags[s].is_empty() {
                tags[s] = t;
                left -= 1;
            }
            n += 1;
        }
        Self(tags)
    }

    pub fn tag(&self, slot: u16) -> &[u8] {
        &self.0[slot as usize % SLOTS as usize]
    }

    /// The stored form of `key` in `partition`.
    pub fn stored_key(&self, partition: u16, key: &[u8]) -> Vec<u8> {
        let tag = self.tag(key_slot(key));
        let mut k = Vec::with_capacity(key.len() + tag.len() + 4);
        k.push(b'{');
        k.extend_from_slice(tag);
        k.push(b'}');
        k.extend_from_slice(&partition.to_be_bytes());
        k.extend_from_slice(key);
        k
    }

    /// Splits a stored key into partition and user key.
    pub fn parse(stored: &[u8]) -> Option<(u16, &[u8])> {
        let close = stored.iter().position(|&b| b == b'}')?;
        let rest = stored.get(close + 1..)?;
        if stored.first() != Some(&b'{') || rest.len() < 3 {
            return None;
        }
        Some((u16::from_be_bytes([rest[0], rest[1]]), &rest[2..]))
    }
}

impl Default for SlotTags {
    fn default() -> Self {
        Self::new()
    }
}

/// What moving one slot cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoveReport {
    pub slot: u16,
    pub from: u16,
    pub to: u16,
    pub keys: u64,
    /// Key + value bytes read from the old partition plus those written to the new one.
    pub bytes_moved: u64,
}

/// A running DINOMO-N cluster.
#[derive(Debug)]
pub struct DinomoN {
    cluster: Cluster,
    tags: Arc<SlotTags>,
}

/// Why a DINOMO-N operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DinomoNError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("key of {0} bytes is too long for DINOMO-N (at most {max})", max = MAX_KEY_LEN - MAX_KEY_OVERHEAD)]
    Key(usize),
    #[error("slot {0} or KN {1} does not exist")]
    BadMove(u16, u16),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl DinomoN {
    pub fn start(cfg: &ClusterConfig) -> Result<Self, ClusterError> {
        Ok(Self {
            cluster: Cluster::start(cfg)?,
            tags: Arc::new(SlotTags::new()),
        })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A client (one per thread).
    pub fn client(&self) -> DinomoNClient {
        DinomoNClient::new(
            Arc::clone(&self.cluster.router),
            Arc::clone(&self.tags),
            self.cluster.max_value(),
        )
    }

    /// Largest value a client may write.
    pub fn max_value(&self) -> usize {
        self.cluster.max_value()
    }

    /// The KN that owns `slot` now.
    pub fn owner(&self, slot: u16) -> u16 {
        self.cluster.router.map().owner(slot)
    }

    /// Moves `slot` to KN `to`, copying its live keys from the old owner's partition into
    /// the new owner's. Requests for the slot must be paused meanwhile (callers do not issue
    /// any; the cluster map changes only at the end of the copy-out).
    pub fn move_slot(&mut self, slot: u16, to: u16) -> Result<MoveReport, DinomoNError> {
        let map = self.cluster.router.map();
        if slot >= SLOTS || to as usize >= self.cluster.kns.len() {
            return Err(DinomoNError::BadMove(slot, to));
        }
        let from = map.owner(slot);
        let mut rep = MoveReport {
            slot,
            from,
            to,
            ..MoveReport::default()
        };
        if from == to {
            return Ok(rep);
        }
        // The old owner flushes and the DPM merges, so its partition's index is complete.
        self.cluster.sync()?;
        let keys = self.partition_keys(slot, from);
        // Copy out through the old owner.
        let mut cl = self.cluster.client();
        let mut copied = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(v) = cl.get(&self.tags.stored_key(from, &k))? {
                rep.bytes_moved += (k.len() + v.len()) as u64;
                copied.push((k, v));
            }
        }
        // Hand the slot over, and make sure every shard has seen the new map.
        let owners: Vec<u16> = (0..SLOTS)
            .map(|s| if s == slot { to } else { map.owner(s) })
            .collect();
        let next = Arc::new(
            SlotMap::from_owners(map.epoch() + 1, owners).ok_or(DinomoNError::BadMove(slot, to))?,
        );
        self.cluster.install_map(&next)?;
        // Copy in through the new owner, then drop the old partition's copies.
        let mut cl = self.cluster.client();
        for (k, v) in &copied {
            cl.put(&self.tags.stored_key(to, k), v)?;
            rep.bytes_moved += (k.len() + v.len()) as u64;
            rep.keys += 1;
        }
        for (k, _) in &copied {
            cl.delete(&self.tags.stored_key(from, k))?;
        }
        self.cluster.sync()?;
        Ok(rep)
    }

    /// User keys of `slot` stored in `partition`, found by scanning the merged index.
    fn partition_keys(&self, slot: u16, partition: u16) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.for_each_stored(|s, p, k, _| {
            if s == slot && p == partition {
                out.push(k.to_vec());
            }
        });
        out
    }

    pub fn stats(&self) -> host_kn::ShardStats {
        self.cluster.stats()
    }

    pub fn sync(&self) -> Result<(), KvError> {
        self.cluster.sync()
    }

    pub fn stop(self) -> host_kn::ShardStats {
        self.cluster.stop()
    }
}

/// What adding or removing a DINOMO-N KN cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResizeReport {
    /// The KN added or removed.
    pub kn: u16,
    pub slots_moved: usize,
    pub keys: u64,
    /// Key + value bytes read from the old partitions plus those written to the new ones.
    pub bytes_moved: u64,
    /// How long the moved slots were refused (TRYAGAIN) while their data was copied.
    pub pause: Duration,
}

/// Elastic reconfiguration: unlike DINOMO, whose moves hand over ownership only, every
/// moved slot's data is copied into its new owner's partition while clients keep running;
/// requests for the moving slots are refused with TRYAGAIN (and retried) until the copy
/// is done.
impl DinomoN {
    /// Starts a KN and moves its consistent-hashing share of the slots, with their data, to
    /// it.
    pub fn add_kn(&mut self) -> Result<ResizeReport, DinomoNError> {
        let kn = self.cluster.start_kn()?;
        let next = SlotMap::consistent(
            self.cluster.router.map().epoch() + 1,
            &self.cluster.live_kns(),
            host_kn::ownership::DEFAULT_VNODES,
        );
        match self.move_data(Arc::new(next)) {
            Ok(r) => Ok(ResizeReport { kn, ..r }),
            Err(e) => {
                if self.cluster.router.map().slots_of(kn) == 0 {
                    let _ = self.cluster.stop_kn(kn);
                }
                Err(e)
            }
        }
    }

    /// Moves KN `kn`'s slots and their data to the others (consistent hashing over the
    /// rest), then stops it.
    pub fn remove_kn(&mut self, kn: u16) -> Result<ResizeReport, DinomoNError> {
        let live = self.cluster.live_kns();
        let rest: Vec<u16> = live.iter().copied().filter(|&k| k != kn).collect();
        if rest.len() == live.len() || rest.is_empty() {
            return Err(DinomoNError::Cluster(ClusterError::Reconfig(format!(
                "cannot remove KN {kn}: running KNs are {live:?}"
            ))));
        }
        let next = SlotMap::consistent(
            self.cluster.router.map().epoch() + 1,
            &rest,
            host_kn::ownership::DEFAULT_VNODES,
        );
        let r = self.move_data(Arc::new(next))?;
        self.cluster.stop_kn(kn)?;
        Ok(ResizeReport { kn, ..r })
    }

    /// Moves to `next`: marks the slots that change owner moving, has their old owners
    /// release them (flush, merge to the tail, refuse them from now on), copies every live
    /// key of theirs from the old owner's partition into the new owner's, deletes the old
    /// copies, then publishes `next`. On an error before the deletes the old map stays.
    fn move_data(&self, next: Arc<SlotMap>) -> Result<ResizeReport, DinomoNError> {
        let _one_at_a_time = self
            .cluster
            .moving
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let router = &self.cluster.router;
        let cur = router.map();
        let moving: Vec<u16> = (0..SLOTS)
            .filter(|&s| cur.owner(s) != next.owner(s))
            .collect();
        let mut rep = ResizeReport {
            slots_moved: moving.len(),
            ..ResizeReport::default()
        };
        let t0 = Instant::now();
        router.set_moving(&moving);
        let revert = |e: DinomoNError| {
            for k in &self.cluster.kns {
                k.set_map(&cur);
            }
            router.clear_moving();
            e
        };
        for k in &self.cluster.kns {
            k.release(&cur, &next).map_err(|e| revert(e.into()))?;
        }
        // The index now holds every acknowledged write of the moving slots.
        let mut is_moving = vec![false; SLOTS as usize];
        for &s in &moving {
            is_moving[s as usize] = true;
        }
        let entries = self.partition_entries(|slot, partition| {
            is_moving[slot as usize] && partition == cur.owner(slot)
        });
        // Copy through a router that already routes by `next`; clients still see the old
        // map and TRYAGAIN for these slots.
        let copy_router = Arc::new(host_kn::Router::new(Arc::clone(&next)));
        for k in &self.cluster.kns {
            copy_router.add_kn(k.kn_id, k.senders().to_vec());
        }
        let mut cl = Client::new(copy_router, self.cluster.max_value());
        for (slot, k, v) in &entries {
            cl.put(&self.tags.stored_key(next.owner(*slot), k), v)
                .map_err(|e| revert(e.into()))?;
            rep.bytes_moved += 2 * (k.len() + v.len()) as u64;
            rep.keys += 1;
        }
        let mut failed = None;
        for (slot, k, _) in &entries {
            if let Err(e) = cl.delete(&self.tags.stored_key(cur.owner(*slot), k)) {
                failed.get_or_insert(e);
            }
        }
        router.set_map(next);
        router.clear_moving();
        rep.pause = t0.elapsed();
        match failed {
            // The new copies are in place; old ones left behind are never read.
            Some(e) => Err(e.into()),
            None => Ok(rep),
        }
    }

    /// (slot, user key, value) of every live key whose slot and partition `wanted` accepts,
    /// read from the merged index.
    fn partition_entries(&self, wanted: impl Fn(u16, u16) -> bool) -> Vec<(u16, Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        self.for_each_stored(|slot, p, k, v| {
            if wanted(slot, p) {
                out.push((slot, k.to_vec(), v.to_vec()));
            }
        });
        out
    }

    /// Calls `f(slot, partition, user key, value)` for every intact put in the merged index
    /// whose stored key carries a partition tag; one scan, one reused read buffer.
    fn for_each_stored(&self, mut f: impl FnMut(u16, u16, &[u8], &[u8])) {
        let dpm = self.cluster.dpm();
        let (pm, geo) = (dpm.pmem(), dpm.geometry());
        let mut buf = Vec::new();
        dpm.index().for_each(pm, |_, r| {
            let (off, len) = (r.offset(), r.len());
            let Some(block) = geo.block_of(off) else {
                return;
            };
            if pm.check(off, len).is_err() {
                return;
            }
            let h: BlockHeader = pm.read_pod(geo.block_off(block));
            buf.resize(len as usize, 0);
            pm.read(off, &mut buf);
            let Ok(e) = entry::decode(&buf, h.salt) else {
                return;
            };
            if e.op != Op::Put {
                return;
            }
            if let Some((p, k)) = SlotTags::parse(e.key) {
                f(key_slot(e.key), p, k, e.value);
            }
        });
    }
}

/// A DINOMO-N client: stores every key in its owner's partition.
///
/// The partition is part of the stored key, so a request refused because its slot is
/// moving (TRYAGAIN) or changed owner is retried here, with the key rebuilt for the owner
/// of the map then in force, rather than inside the inner client with the old key.
#[derive(Debug)]
pub struct DinomoNClient {
    inner: Client,
    router: Arc<host_kn::Router>,
    tags: Arc<SlotTags>,
    retry_for: Duration,
}

/// Pauses between retries of a refused request.
const RETRY_PAUSE_MIN: Duration = Duration::from_micros(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(2);

impl DinomoNClient {
    fn new(router: Arc<host_kn::Router>, tags: Arc<SlotTags>, max_value: usize) -> Self {
        let mut inner = Client::new(Arc::clone(&router), max_value);
        inner.set_retry_for(Duration::ZERO);
        Self {
            inner,
            router,
            tags,
            retry_for: host_kn::client::DEFAULT_RETRY_FOR,
        }
    }

    /// How long refused requests are retried before the refusal is returned.
    pub fn set_retry_for(&mut self, d: Duration) {
        self.retry_for = d;
    }

    fn call<T>(
        &mut self,
        key: &[u8],
        op: impl Fn(&mut Client, &[u8]) -> Result<T, KvError>,
    ) -> Result<T, DinomoNError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN - MAX_KEY_OVERHEAD {
            return Err(DinomoNError::Key(key.len()));
        }
        let mut retrying: Option<(Instant, Duration)> = None;
        loop {
            let owner = self.router.map().owner(key_slot(key));
            match op(&mut self.inner, &self.tags.stored_key(owner, key)) {
                Err(e) if e.is_retryable() => {
                    let (since, pause) = retrying.get_or_insert((Instant::now(), RETRY_PAUSE_MIN));
                    if since.elapsed() >= self.retry_for {
                        return Err(e.into());
                    }
                    std::thread::sleep(*pause);
                    *pause = (*pause * 2).min(RETRY_PAUSE_MAX);
                    // A fresh inner client routes by the map now in force.
                    let max = self.inner.max_value();
                    self.inner = Client::new(Arc::clone(&self.router), max);
                    self.inner.set_retry_for(Duration::ZERO);
                }
                r => return Ok(r?),
            }
        }
    }

    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, DinomoNError> {
        self.call(key, |c, k| c.get(k))
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), DinomoNError> {
        self.call(key, |c, k| c.put(k, value))
    }

    pub fn delete(&mut self, key: &[u8]) -> Result<(), DinomoNError> {
        self.call(key, |c, k| c.delete(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_cover_every_slot_and_keep_the_key_slot() {
        let t = SlotTags::new();
        for s in 0..SLOTS {
            assert_eq!(key_slot(t.tag(s)), s);
            assert!(t.tag(s).len() <= 4 && !t.tag(s).contains(&b'}'));
        }
        let k = t.stored_key(513, b"user:{x}1");
        assert_eq!(key_slot(&k), key_slot(b"user:{x}1"));
        assert_eq!(SlotTags::parse(&k), Some((513, &b"user:{x}1"[..])));
    }
}
