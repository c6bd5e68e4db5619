//! A shard's log on the memory node, written through the fabric.
//!
//! Entries are encoded straight into a registered staging buffer with the current block's
//! salt; a flush is one WRITE of the whole batch plus one FLUSH (one round trip). When the
//! next entry does not fit the block, the shard flushes, switches to the spare block it got
//! ahead of time, and the seal of the full block (its `sealed_len`) rides along with the
//! next batch, in the same round trip.
//!
//! When the memory node grants no further spare (the region is full, see the DPM's room
//! rule), the log is *full*: its current block is kept for deletes, which need no index
//! room and are how space is freed, and puts are refused (`RegionFull`, answered `-OOM`)
//! before anything is staged. A put in a full log asks for a spare again, at most every
//! [`FULL_RETRY`], and the log stops being full as soon as it gets one.

use std::time::Duration;

use dinomo_hw::fabric::{Completion, CompletionStatus, Fabric, LocalBuf, Verb, WorkRequest};
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE};
use dinomo_shared::entry::{self, Op};
use dinomo_shared::index::EntryRef;
use dinomo_shared::msg::{Request, Response};

use crate::control;
use crate::error::KvError;

/// How often a full log asks the memory node for a spare again.
pub const FULL_RETRY: Duration = Duration::from_millis(100);

/// Where a region's log area is (from its superblock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogArea {
    pub log_off: u64,
    pub block_size: u64,
    pub n_blocks: u64,
}

impl LogArea {
    pub fn block_off(&self, b: u32) -> u64 {
        self.log_off + b as u64 * self.block_size
    }
    pub fn block_of(&self, off: u64) -> Option<u32> {
        let b = off.checked_sub(self.log_off)? / self.block_size;
        (b < self.n_blocks).then_some(b as u32)
    }
    /// Largest entry a block holds.
    pub fn max_entry(&self) -> usize {
        (self.block_size - BLOCK_HEADER_SIZE) as usize
    }
}

/// One appended (staged) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub eref: EntryRef,
}

/// What [`ShardLog::append`] could not do.
#[derive(Debug, PartialEq, Eq)]
pub enum AppendError {
    /// The entry does not fit behind the staged batch: flush (and maybe switch blocks) first.
    NeedFlush,
    Kv(KvError),
}

/// What a flush wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    pub entries: u64,
    pub bytes: u64,
    /// Seq of the last entry now durable.
    pub durable_seq: u64,
}

/// A shard's log.
#[derive(Debug)]
pub struct ShardLog {
    pub log_id: u32,
    pub generation: u64,
    area: LogArea,
    lease_epoch: u32,
    block: u32,
    salt: u32,
    /// Next write position in `block`.
    offset: u64,
    spare: Option<(u32, u32)>,
    pending_seal: Option<(u32, u32)>,
    staging: LocalBuf,
    staging_cap: usize,
    staged: usize,
    staged_entries: u64,
    seal_buf: LocalBuf,
    next_seq: u64,
    durable_seq: u64,
    timeout: Duration,
    /// Set while the memory node refuses a spare: when it was last refused.
    full_since: Option<std::time::Instant>,
}

impl ShardLog {
    /// Opens a new log for (`kn_id`, `shard`) and gets a spare block.
    pub fn open<F: Fabric + ?Sized>(
        f: &mut F,
        area: LogArea,
        kn_id: u32,
        shard: u32,
        lease_epoch: u32,
        staging_cap: usize,
        timeout: Duration,
    ) -> Result<Self, KvError> {
        let req = Request::OpenLog {
            kn_id,
            shard,
            lease_epoch,
        };
        // A full region keeps room for a few new logs, and a fenced KN's logs give theirs
        // back once merged: a KN replacing a dead one waits for that (bounded) rather than
        // failing to start, so that reads are served again.
        let t0 = std::time::Instant::now();
        let opened = loop {
            match control::call(f, req, timeout) {
                Err(KvError::RegionFull) if t0.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => break r?,
            }
        };
        let (log_id, generation, block, salt) = match opened {
            Response::LogOpened {
                log_id,
                generation,
                block,
                salt,
            } => (log_id, generation, block, salt),
            r => {
                return Err(KvError::Corrupt(format!(
                    "unexpected reply {r:?} to OpenLog"
                )))
            }
        };
        let staging_cap = staging_cap.clamp(4096, area.max_entry());
        let staging = f.alloc_buf(staging_cap)?;
        let seal_buf = f.alloc_buf(8)?;
        let mut log = Self {
            log_id,
            generation,
            area,
            lease_epoch,
            block,
            salt,
            offset: BLOCK_HEADER_SIZE,
            spare: None,
            pending_seal: None,
            staging,
            staging_cap,
            staged: 0,
            staged_entries: 0,
            seal_buf,
            next_seq: 1,
            durable_seq: 0,
            timeout,
            full_since: None,
        };
        // A missing spare is not fatal here: puts ask again (the log is full meanwhile).
        if let Err(KvError::RegionFull) = log.refill_spare(f) {
            log.full_since = Some(std::time::Instant::now());
        }
        Ok(log)
    }

    fn refill_spare<F: Fabric + ?Sized>(&mut self, f: &mut F) -> Result<(), KvError> {
        if self.spare.is_some() {
            return Ok(());
        }
        let req = Request::AllocBlock {
            log_id: self.log_id,
            generation: self.generation,
            next_seq: self.next_seq,
            last_block: self.block,
        };
        match control::call(f, req, self.timeout)? {
            Response::BlockGranted { block, salt } => {
                self.spare = Some((block, salt));
                self.full_since = None;
                Ok(())
            }
            r => Err(KvError::Corrupt(format!(
                "unexpected reply {r:?} to AllocBlock"
            ))),
        }
    }

    pub fn staged_bytes(&self) -> usize {
        self.staged
    }
    pub fn staged_entries(&self) -> u64 {
        self.staged_entries
    }
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }
    /// The block being written and its salt.
    pub fn current_block(&self) -> (u32, u32) {
        (self.block, self.salt)
    }
    pub fn lease_epoch(&self) -> u32 {
        self.lease_epoch
    }

    /// Re-registers the log's buffers on a new connection (after the DPM restarted or the
    /// connection was re-established). Nothing may be staged.
    pub fn reattach<F: Fabric + ?Sized>(&mut self, f: &mut F) -> Result<(), KvError> {
        if self.staged > 0 {
            return Err(KvError::Fabric(
                "cannot move a log with a staged batch to a new connection".into(),
            ));
        }
        self.staging = f.alloc_buf(self.staging_cap)?;
        self.seal_buf = f.alloc_buf(8)?;
        Ok(())
    }

    /// Stages one entry. The returned ref is where the entry will live once flushed.
    pub fn append<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        op: Op,
        key: &[u8],
        value: &[u8],
    ) -> Result<Appended, AppendError> {
        self.append_flagged(f, op, 0, key, value)
    }

    /// [`ShardLog::append`] with entry flags: with [`entry::FLAG_EXPIRES`], `value` is the
    /// stored value, the expiry time first.
    pub fn append_flagged<F: Fabric + ?Sized>(
        &mut self,
        f: &mut F,
        op: Op,
        flags: u8,
        key: &[u8],
        value: &[u8],
    ) -> Result<Appended, AppendError> {
        let len = entry::padded_len(key.len(), value.len());
        if op == Op::Put && self.still_full(f)? {
            return Err(AppendError::Kv(KvError::RegionFull));
        }
        if len > self.area.max_entry() || len > self.staging_cap {
            return Err(AppendError::Kv(KvError::ValueTooLarge {
                len: value.len(),
                max: self.max_value(key.len()),
            }));
        }
        if self.offset + (self.staged + len) as u64 > self.area.block_size
            || self.staged + len > self.staging_cap
        {
            return Err(AppendError::NeedFlush);
        }
        let at = self.staged;
        let buf = &mut f.buf_mut(self.staging)[at..at + len];
        entry::encode_flagged(
            buf,
            self.salt,
            op,
            flags,
            self.lease_epoch,
            self.next_seq,
            key,
            value,
        )
        .map_err(|e| AppendError::Kv(KvError::Corrupt(e.to_string())))?;
        let off = self.area.block_off(self.block) + self.offset + at as u64;
        let eref = EntryRef::new(off, len as u64).ok_or(AppendError::Kv(KvError::Corrupt(
            "entry ref overflow".into(),
        )))?;
        self.staged += len;
        self.staged_entries += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(Appended { seq, eref })
    }

    /// Whether the log is full (puts refused, see the module docs), asking the memory node
    /// for a spare again if the last refusal is older than [`FULL_RETRY`].
    fn still_full<F: Fabric + ?Sized>(&mut self, f: &mut F) -> Result<bool, AppendError> {
        let Some(since) = self.full_since else {
            return Ok(false);
        };
        if since.elapsed() < FULL_RETRY {
            return Ok(true);
        }
        match self.refill_spare(f) {
            Ok(()) => {
                self.full_since = None;
                Ok(false)
            }
            Err(KvError::RegionFull) => {
                self.full_since = Some(std::time::Instant::now());
                Ok(true)
            }
            Err(e) => Err(AppendError::Kv(e)),
        }
    }

    /// Whether puts are refused for want of room (see the module docs).
    pub fn is_full(&self) -> bool {
        self.full_since.is_some()
    }

    /// The largest value that fits with a key of `key_len` bytes.
    pub fn max_value(&self, key_len: usize) -> usize {
        self.area
            .max_entry()
            .min(self.staging_cap)
            .saturating_sub(entry::ENTRY_HEADER_SIZE + key_len)
            & !7
    }

    /// Whether the staged batch must be flushed and the block switched before an entry of
    /// `len` bytes fits.
    pub fn block_full_for(&self, len: usize) -> bool {
        self.offset + len as u64 > self.area.block_size
    }

    /// Makes the staged batch (and a pending seal) durable: one round trip.
    pub fn flush<F: Fabric + ?Sized>(&mut self, f: &mut F) -> Result<Flushed, KvError> {
        if self.staged == 0 && self.pending_seal.is_none() {
            return Ok(Flushed {
                durable_seq: self.durable_seq,
                ..Flushed::default()
            });
        }
        let mut wrs: [(u64, WorkRequest); 4] = [(0, WorkRequest::Flush { remote: 0, len: 0 }); 4];
        let mut n = 0;
        let remote = self.area.block_off(self.block) + self.offset;
        if self.staged > 0 {
            wrs[0] = (
                0,
                WorkRequest::Write {
                    remote,
                    local: self.staging.slice(0, self.staged as u32),
                },
            );
            wrs[1] = (
                1,
                WorkRequest::Flush {
                    remote,
                    len: self.staged as u64,
                },
            );
            n = 2;
        }
        if let Some((block, len)) = self.pending_seal {
            let at = self.area.block_off(block) + BlockHeader::SEALED_LEN_OFFSET;
            f.buf_mut(self.seal_buf)[..4].copy_from_slice(&len.to_le_bytes());
            wrs[n] = (
                n as u64,
                WorkRequest::Write {
                    remote: at,
                    local: self.seal_buf.slice(0, 4),
                },
            );
            wrs[n + 1] = (n as u64 + 1, WorkRequest::Flush { remote: at, len: 4 });
            n += 2;
        }
        let mut out = [Completion {
            wr_id: 0,
            verb: Verb::Flush,
            status: CompletionStatus::Success,
            value: 0,
        }; 4];
        dinomo_hw::fabric::execute(f, &wrs[..n], &mut out[..n], self.timeout)?;
        if let Some(bad) = out[..n]
            .iter()
            .find(|c| c.status != CompletionStatus::Success)
        {
            return Err(KvError::Fabric(format!("log write failed: {}", bad.status)));
        }
        let done = Flushed {
            entries: self.staged_entries,
            bytes: self.staged as u64,
            durable_seq: self.next_seq - 1,
        };
        self.offset += self.staged as u64;
        self.staged = 0;
        self.staged_entries = 0;
        self.pending_seal = None;
        self.durable_seq = done.durable_seq;
        Ok(done)
    }

    /// Moves to the next block (the staged batch must have been flushed). The full block is
    /// sealed with the next flush; a new spare is requested now.
    pub fn switch_block<F: Fabric + ?Sized>(&mut self, f: &mut F) -> Result<(), KvError> {
        debug_assert_eq!(self.staged, 0, "flush before switching blocks");
        if self.spare.is_none() {
            self.refill_spare(f)?;
        }
        let Some((block, salt)) = self.spare.take() else {
            return Err(KvError::RegionFull);
        };
        self.pending_seal = Some((self.block, self.offset as u32));
        self.block = block;
        self.salt = salt;
        self.offset = BLOCK_HEADER_SIZE;
        // No spare behind the new block: it is kept for deletes (the log is full).
        match self.refill_spare(f) {
            Ok(()) => Ok(()),
            Err(KvError::RegionFull) => {
                self.full_since = Some(std::time::Instant::now());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
