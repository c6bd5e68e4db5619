//! Reading the memory node's index and entries with one-sided READs.
//!
//! Miss path: READ the home bucket (the root word is cached), scan it for the key's hash,
//! READ the candidate entries (all of them in one round trip) and compare keys; follow the
//! chain if needed. A bucket that is `MOVED` or of another generation means the index was
//! resized: re-read the root (one 8-byte READ) and start over. With the root cached, a miss
//! costs 2 round trips.
//!
//! Entries are verified (CRC seeded with their block's salt, key, length, op) before use.
//! Block salts are cached; an unknown one is fetched with a READ of the block header posted
//! together with the entry READ, so it costs no extra round trip.

use std::collections::HashMap;
use std::time::Duration;

use dinomo_hw::fabric::{
    execute, Completion, CompletionStatus, Fabric, LocalBuf, Verb, WorkRequest, WrId,
};
use dinomo_shared::block::{BlockHeader, BLOCK_MAGIC};
use dinomo_shared::entry::{self, Op};
use dinomo_shared::index::{scan_bucket, Bucket, EntryRef, RootWord, Scan, BUCKET_SIZE};
use dinomo_shared::pod::Pod;

use crate::error::KvError;
use crate::log::LogArea;

/// Root re-reads tolerated in one lookup before giving up (a resize storm or a corrupt root).
const MAX_RESTARTS: u32 = 16;
/// Chain length tolerated before the chain is taken as corrupt.
const MAX_CHAIN: u32 = 1 << 16;

/// A verified entry in the reader's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundEntry {
    pub eref: EntryRef,
    /// Where the key's value is in [`IndexReader::buf`] (after the expiry time, if any).
    pub value_at: usize,
    pub value_len: usize,
    /// When the key expires (Unix ms), if the entry says it does.
    pub expire_at: Option<u64>,
}

/// Reads the index and entries of one region over one fabric connection.
#[derive(Debug)]
pub struct IndexReader {
    root_off: u64,
    area: LogArea,
    root: Option<RootWord>,
    salts: HashMap<u32, u32>,
    small: LocalBuf,
    entries: LocalBuf,
    entries_cap: usize,
    timeout: Duration,
}

/// Bytes of the small buffer: root word + bucket + three block headers.
const SMALL: usize = 64 * 5;

impl IndexReader {
    pub fn new<F: Fabric + ?Sized>(
        f: &mut F,
        root_off: u64,
        area: LogArea,
        timeout: Duration,
    ) -> Result<Self, KvError> {
        let small = f.alloc_buf(SMALL)?;
        let entries_cap = 16 << 10;
        let entries = f.alloc_buf(entries_cap)?;
        Ok(Self {
            root_off,
            area,
            root: None,
            salts: HashMap::new(),
            small,
            entries,
            entries_cap,
            timeout,
        })
    }

    /// The buffer [`FoundEntry`] positions refer to.
    pub fn buf<'f, F: Fabric + ?Sized>(&self, f: &'f F) -> &'f [u8] {
        f.buf(self.entries)
    }

    /// The log area entry refs point into.
    pub(crate) fn area(&self) -> LogArea {
        self.area
    }

    /// Region offset of the index root word.
    pub(crate) fn root_off(&self) -> u64 {
        self.root_off
    }

    /// The fabric timeout of this reader's requests.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The root word last read, if it is still trusted.
    pub(crate) fn cached_root(&self) -> Option<RootWord> {
        self.root
    }

    /// Replaces the cached root word (`None`: read it again next time).
    pub(crate) fn set_root(&mut self, root: Option<RootWord>) {
        self.root = root;
    }

    /// Reads the root word again (one round trip) and caches it.
    pub(crate) fn refresh_root<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
    ) -> Result<RootWord, KvError> {
        self.read_root(f)
    }

    /// The cached salt of `block`, if known.
    pub(crate) fn salt(&self, block: u32) -> Option<u32> {
        self.salts.get(&block).copied()
    }

    /// Forgets the cached salt of `block` (its block may have been reused).
    pub(crate) fn forget_salt(&mut self, block: u32) {
        self.salts.remove(&block);
    }

    /// Remembers the salt of a block this shard writes itself.
    pub fn learn_salt(&mut self, block: u32, salt: u32) {
        self.salts.insert(block, salt);
    }

    fn ensure_entries<F: Fabric + ?Sized>(&mut self, f: &mut F, len: usize) -> Result<(), KvError> {
        if len > self.entries_cap {
            let cap = len.next_power_of_two();
            self.entries = f.alloc_buf(cap)?;
            self.entries_cap = cap;
        }
        Ok(())
    }

    fn run<F: Fabric + ?Sized>(
        &self,
        f: &mut F,
        wrs: &[(WrId, WorkRequest)],
    ) -> Result<(), KvError> {
        let mut out = [Completion {
            wr_id: 0,
            verb: Verb::Read,
            status: CompletionStatus::Success,
            value: 0,
        }; 8];
        execute(f, wrs, &mut out[..wrs.len()], self.timeout)?;
        match out[..wrs.len()]
            .iter()
            .find(|c| c.status != CompletionStatus::Success)
        {
            None => Ok(()),
            Some(c) => Err(KvError::Corrupt(format!(
                "READ failed: {} (stale or corrupt offset)",
                c.status
            ))),
        }
    }

    /// READs the entries `erefs` (and the headers of blocks whose salt is unknown) in one
    /// round trip and returns the one holding a put of `key`, if any. A candidate whose
    /// checksum fails under a cached salt is retried once with a fresh header (the block may
    /// have been reused); a shortcut that is simply stale yields `None`.
    pub fn fetch<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        key: &[u8],
        erefs: &[EntryRef],
    ) -> Result<Option<FoundEntry>, KvError> {
        Ok(self.fetch_op(f, key, erefs, false)?.map(|(e, _)| e))
    }

    /// [`IndexReader::fetch`] that also accepts a delete of `key` when `deletes` is set
    /// (an indirect cell may name one); returns the entry's op with it.
    pub fn fetch_op<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        key: &[u8],
        erefs: &[EntryRef],
        deletes: bool,
    ) -> Result<Option<(FoundEntry, Op)>, KvError> {
        let erefs = &erefs[..erefs.len().min(3)];
        for attempt in 0..2 {
            let total: usize = erefs.iter().map(|r| r.len() as usize).sum();
            self.ensure_entries(f, total)?;
            let mut wrs: Vec<(WrId, WorkRequest)> = Vec::with_capacity(6);
            let mut at = 0u32;
            let mut hdr_slot = 0u32;
            let mut blocks = [(0u32, u32::MAX); 3];
            for (i, r) in erefs.iter().enumerate() {
                let block = self.area.block_of(r.offset()).ok_or_else(|| {
                    KvError::Corrupt(format!(
                        "entry ref {:#x} is outside the log area",
                        r.offset()
                    ))
                })?;
                wrs.push((
                    i as u64,
                    WorkRequest::Read {
                        remote: r.offset(),
                        local: self.entries.slice(at, r.len() as u32),
                    },
                ));
                at += r.len() as u32;
                let known = self.salts.contains_key(&block) && attempt == 0;
                if !known {
                    let slot = 64 + 64 * hdr_slot;
                    wrs.push((
                        10 + i as u64,
                        WorkRequest::Read {
                            remote: self.area.block_off(block),
                            local: self.small.slice(slot, 64),
                        },
                    ));
                    blocks[i] = (block, slot);
                    hdr_slot += 1;
                } else {
                    blocks[i] = (block, u32::MAX);
                }
            }
            self.run(f, &wrs)?;
            for &(block, slot) in blocks.iter().take(erefs.len()) {
                if slot != u32::MAX {
                    let h = BlockHeader::read_from(&f.buf(self.small)[slot as usize..])
                        .ok_or_else(|| KvError::Corrupt("short header".into()))?;
                    if h.magic == BLOCK_MAGIC {
                        self.salts.insert(block, h.salt);
                    } else {
                        self.salts.remove(&block);
                    }
                }
            }
            let mut at = 0usize;
            let mut salt_miss = false;
            for (i, r) in erefs.iter().enumerate() {
                let len = r.len() as usize;
                let Some(&salt) = self.salts.get(&blocks[i].0) else {
                    at += len;
                    continue;
                };
                let bytes = &f.buf(self.entries)[at..at + len];
                match entry::decode(bytes, salt) {
                    Ok(e)
                        if e.len == len
                            && e.key == key
                            && (e.op == Op::Put || (deletes && e.op == Op::Delete)) =>
                    {
                        let skip = entry::expiry_prefix(e.flags);
                        let value_at = at + entry::ENTRY_HEADER_SIZE + key.len() + skip;
                        let found = FoundEntry {
                            eref: *r,
                            value_at,
                            value_len: e.value.len() - skip,
                            expire_at: e.expire_at(),
                        };
                        return Ok(Some((found, e.op)));
                    }
                    Ok(_) => {}
                    Err(entry::EntryError::BadChecksum) if blocks[i].1 == u32::MAX => {
                        salt_miss = true
                    }
                    Err(_) => {}
                }
                at += len;
            }
            if !salt_miss {
                break;
            }
        }
        Ok(None)
    }

    fn read_root<F: Fabric + ?Sized>(&mut self, f: &mut F) -> Result<RootWord, KvError> {
        self.run(
            f,
            &[(
                0,
                WorkRequest::Read {
                    remote: self.root_off,
                    local: self.small.slice(0, 8),
                },
            )],
        )?;
        let mut w = [0u8; 8];
        w.copy_from_slice(&f.buf(self.small)[..8]);
        let root = RootWord(u64::from_le_bytes(w));
        if root.is_unset() {
            return Err(KvError::Corrupt("the index root is not set".into()));
        }
        self.root = Some(root);
        Ok(root)
    }

    /// Looks `key` up in the index: `Ok(None)` if it is absent.
    pub fn lookup<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        key: &[u8],
    ) -> Result<Option<FoundEntry>, KvError> {
        let hash = dinomo_shared::hash::key_hash(key);
        'restart: for _ in 0..MAX_RESTARTS {
            let root = match self.root {
                Some(r) => r,
                None => self.read_root(f)?,
            };
            let mut bucket_off = root.bucket_of(hash);
            for _ in 0..MAX_CHAIN {
                if bucket_off % BUCKET_SIZE != 0 {
                    return Err(KvError::Corrupt(format!(
                        "bucket offset {bucket_off:#x} is misaligned"
                    )));
                }
                if let Err(e) = self.run(
                    f,
                    &[(
                        0,
                        WorkRequest::Read {
                            remote: bucket_off,
                            local: self.small.slice(64, 64),
                        },
                    )],
                ) {
                    // A stale root can point past a shrunk area; re-read it once.
                    self.root = None;
                    if bucket_off >= f.region_len() {
                        return Err(e);
                    }
                    continue 'restart;
                }
                let bucket = Bucket::read_from(&f.buf(self.small)[64..128])
                    .ok_or_else(|| KvError::Corrupt("short bucket".into()))?;
                match scan_bucket(&bucket, root.generation(), hash) {
                    Scan::Moved => {
                        self.root = None;
                        continue 'restart;
                    }
                    Scan::Slots { candidates, next } => {
                        if !candidates.is_empty() {
                            if let Some(found) = self.fetch(f, key, candidates.as_slice())? {
                                return Ok(Some(found));
                            }
                        }
                        if next == 0 {
                            return Ok(None);
                        }
                        bucket_off = next;
                    }
                }
            }
            return Err(KvError::Corrupt("index chain does not end".into()));
        }
        Err(KvError::Corrupt(format!(
            "the index root changed {MAX_RESTARTS} times during one lookup"
        )))
    }

    /// Reads 64 bytes at `off` (e.g. a progress slot) into a scratch line and returns them.
    pub fn read_line<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        off: u64,
    ) -> Result<[u8; 64], KvError> {
        self.run(
            f,
            &[(
                0,
                WorkRequest::Read {
                    remote: off,
                    local: self.small.slice(64, 64),
                },
            )],
        )?;
        let mut out = [0u8; 64];
        out.copy_from_slice(&f.buf(self.small)[64..128]);
        Ok(out)
    }
}
