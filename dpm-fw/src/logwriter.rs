//! The KVS-node side of a log, reduced to what the memory node's own tests and self-test
//! need: encode entries with the block's salt, write each batch with one copy and one
//! persist (as a KN's WRITE + FLUSH would), seal full blocks and ask for new ones. `no_std`
//! so that the bare-metal image can run the same code as the std tests; re-exported by
//! `testkit`. The real KN lives in `host-kn`.

use alloc::vec::Vec;

use dinomo_hw::Persist;
use dinomo_shared::block::{BlockHeader, BLOCK_HEADER_SIZE};
use dinomo_shared::entry::{self, Op};
use dinomo_shared::msg::{Request, Response};
use dinomo_shared::ErrorCode;

use crate::dpm::{Dpm, Scratch};

/// One staged operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    pub op: Op,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Writes one log. A clone continues the same log (e.g. on a copy of the region).
#[derive(Clone, Debug)]
pub struct LogWriter {
    pub log_id: u32,
    pub generation: u64,
    pub block: u32,
    pub salt: u32,
    pub offset: u64,
    /// Seq the next appended entry gets.
    pub next_seq: u64,
    /// Highest seq made durable.
    pub durable_seq: u64,
    staged: Vec<Staged>,
    buf: Vec<u8>,
}

impl LogWriter {
    /// Opens a new log on `dpm`.
    pub fn open<P: Persist>(dpm: &Dpm<P>, kn_id: u32, shard: u32) -> Result<Self, ErrorCode> {
        let req = Request::OpenLog {
            kn_id,
            shard,
            lease_epoch: 1,
        };
        match dpm.execute(req, &mut Scratch::default())? {
            Response::LogOpened {
                log_id,
                generation,
                block,
                salt,
            } => Ok(Self {
                log_id,
                generation,
                block,
                salt,
                offset: BLOCK_HEADER_SIZE,
                next_seq: 1,
                durable_seq: 0,
                staged: Vec::new(),
                buf: Vec::new(),
            }),
            _ => Err(ErrorCode::UnknownMessage),
        }
    }

    /// Stages a put.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.staged.push(Staged {
            op: Op::Put,
            key: key.to_vec(),
            value: value.to_vec(),
        });
    }
    /// Stages a delete.
    pub fn delete(&mut self, key: &[u8]) {
        self.staged.push(Staged {
            op: Op::Delete,
            key: key.to_vec(),
            value: Vec::new(),
        });
    }
    /// Entries staged and not yet flushed.
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Writes the staged entries as one batch per block and makes them durable; returns the
    /// seq of the last one. `tear`, if set, keeps only that many bytes of the final write
    /// (simulating a batch cut short by a crash) and does not count it durable.
    pub fn flush_with<P: Persist>(
        &mut self,
        dpm: &Dpm<P>,
        tear: Option<usize>,
    ) -> Result<u64, ErrorCode> {
        let staged = core::mem::take(&mut self.staged);
        let bsize = dpm.geometry().block_size;
        let mut i = 0;
        while i < staged.len() {
            self.buf.clear();
            while i < staged.len() {
                let s = &staged[i];
                let len = entry::padded_len(s.key.len(), s.value.len()) as u64;
                if len > bsize - BLOCK_HEADER_SIZE {
                    return Err(ErrorCode::InvalidArgument);
                }
                if self.offset + self.buf.len() as u64 + len > bsize {
                    break;
                }
                let at = self.buf.len();
                self.buf.resize(at + len as usize, 0);
                entry::encode(
                    &mut self.buf[at..],
                    self.salt,
                    s.op,
                    1,
                    self.next_seq,
                    &s.key,
                    &s.value,
                )
                .map_err(|_| ErrorCode::InvalidArgument)?;
                self.next_seq += 1;
                i += 1;
            }
            let last = i == staged.len();
            let pm = dpm.pmem();
            let off = dpm.geometry().block_off(self.block) + self.offset;
            let n = match (last, tear) {
                (true, Some(t)) => t.min(self.buf.len()),
                _ => self.buf.len(),
            };
            pm.write(off, &self.buf[..n]);
            pm.persist(off, n.max(1) as u64);
            if last && tear.is_some() {
                return Ok(self.durable_seq);
            }
            self.offset += self.buf.len() as u64;
            self.durable_seq = self.next_seq - 1;
            if !last {
                self.next_block(dpm)?;
            }
        }
        Ok(self.durable_seq)
    }

    /// [`LogWriter::flush_with`] without tearing.
    pub fn flush<P: Persist>(&mut self, dpm: &Dpm<P>) -> Result<u64, ErrorCode> {
        self.flush_with(dpm, None)
    }

    /// Gets the next block, then seals the current one at its end.
    pub fn next_block<P: Persist>(&mut self, dpm: &Dpm<P>) -> Result<(), ErrorCode> {
        let req = Request::AllocBlock {
            log_id: self.log_id,
            generation: self.generation,
            next_seq: self.next_seq,
            last_block: self.block,
        };
        let (block, salt) = match dpm.execute(req, &mut Scratch::default())? {
            Response::BlockGranted { block, salt } => (block, salt),
            _ => return Err(ErrorCode::UnknownMessage),
        };
        let pm = dpm.pmem();
        let seal = dpm.geometry().block_off(self.block) + BlockHeader::SEALED_LEN_OFFSET;
        pm.store_u32(seal, self.offset as u32);
        pm.persist(seal, 4);
        self.block = block;
        self.salt = salt;
        self.offset = BLOCK_HEADER_SIZE;
        Ok(())
    }
}
