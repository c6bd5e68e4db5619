//! A shard's part in replicating hot keys: allocating and freeing a key's cell at the DPM
//! as its owner, and publishing replicated writes through their cells after a flush.

use std::sync::Arc;

use dinomo_hw::fabric::Fabric;
use dinomo_shared::index::EntryRef;

use crate::error::KvError;
use crate::replica::Replicas;

use super::Shard;

impl<F: Fabric> Shard<F> {
    /// Swaps the cells of the batch's replicated writes (now durable) to their entries.
    pub(super) fn publish_replicated(&mut self) -> Result<(), KvError> {
        if !self.pending.iter().any(|p| p.replicated) {
            return Ok(());
        }
        for p in &self.pending {
            if p.replicated {
                self.replicas
                    .stage_flushed(&p.key, p.eref, p.value.as_deref());
            }
        }
        let t0 = self.rts();
        let timeout = self.cfg.timeout;
        let r = match self.replicas.publish(&mut self.f, &self.geo, timeout) {
            // A CAS whose completion was lost with the connection may have executed: the
            // cells say which did (see `ShardReplicas::resume_publish`).
            Err(KvError::Disconnected(why)) => match self.reconnect(&why) {
                // The wait may have outlasted the lease: no cell is swapped after that.
                Ok(()) if self.cfg.lease.as_ref().is_some_and(|l| !l.wait_valid()) => {
                    self.replicas.abandon_publish();
                    Err(KvError::LeaseLapsed)
                }
                Ok(()) => self
                    .replicas
                    .resume_publish(&mut self.f, &self.geo, timeout),
                Err(e) => {
                    self.replicas.abandon_publish();
                    Err(e)
                }
            },
            r => r,
        };
        self.stats.write_rts += self.rts() - t0;
        r?;
        // As for the batch itself: acknowledged only if the lease still holds after the
        // CAS, i.e. no fence came before it. A CAS that a paused shard lands after its KN
        // was fenced names an entry that was durable before the fence (the flush checked
        // the lease after its WRITE), so nothing is lost, but its writers are not answered
        // OK (over verbs the fence moved the queue pairs to error and the CAS fails).
        if self.cfg.lease.as_ref().is_some_and(|l| !l.wait_valid()) {
            return Err(KvError::LeaseLapsed);
        }
        Ok(())
    }

    /// See [`ReplicaCtl::Begin`](crate::replica::ReplicaCtl::Begin): the key's newest
    /// version gets a reference the DPM can put in a cell (its own unmerged entry, its index
    /// entry, or a new delete entry).
    pub(super) fn begin_replication(&mut self, key: &[u8]) -> Result<u32, KvError> {
        self.check_owner(key)?;
        if let Some(cell) = self.replicas.cell_of(key) {
            // Asked again (the manager's map repeats the step until it is acknowledged).
            return Ok(cell);
        }
        self.flush();
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let t0 = self.rts();
        let allocated = self.alloc_cell(key);
        self.stats.maintenance_rts += self.rts() - t0;
        let (cell, eref) = allocated?;
        self.cache.remove(key);
        self.unmerged.remove(key);
        self.replicas.adopt(key, cell, eref);
        Ok(cell)
    }

    /// Names the newest version of `key` by an entry in this shard's log (the DPM takes a
    /// cell only for an entry of the asking log) and asks the DPM for the key's cell.
    fn alloc_cell(&mut self, key: &[u8]) -> Result<(u32, u64), KvError> {
        if let Some(u) = self.unmerged.get(key) {
            let eref = match u.eref {
                Some(r) => r,
                None => self.append_now(key, None)?,
            };
            return self.request_cell(eref);
        }
        let Some(found) = self.reader.lookup(&mut self.f, key)? else {
            let eref = self.append_now(key, None)?;
            return self.request_cell(eref);
        };
        let value = self.value_of(found.value_at, found.value_len);
        match self.request_cell(found.eref) {
            // The index entry is in another log (an earlier owner's, or an earlier
            // generation of this one): write the same value again into this log.
            Err(KvError::Dpm(dinomo_shared::ErrorCode::InvalidArgument)) => {
                let eref = self.append_now(key, Some(&value))?;
                self.request_cell(eref)
            }
            r => r,
        }
    }

    /// Appends an entry of `key` and makes it durable at once.
    fn append_now(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<EntryRef, KvError> {
        let (_, eref) = self.stage(key, value, None)?;
        self.flush();
        match &self.broken {
            Some(e) => Err(e.clone()),
            None => Ok(eref),
        }
    }

    fn request_cell(&mut self, eref: EntryRef) -> Result<(u32, u64), KvError> {
        let req = dinomo_shared::msg::Request::AllocCell {
            log_id: self.log.log_id,
            generation: self.log.generation,
            eref: eref.0,
        };
        match crate::control::call(&mut self.f, req, self.cfg.timeout)? {
            dinomo_shared::msg::Response::CellAllocated { cell, eref } => Ok((cell, eref)),
            r => Err(KvError::Corrupt(format!(
                "unexpected reply {r:?} to AllocCell"
            ))),
        }
    }

    /// See [`ReplicaCtl::End`](crate::replica::ReplicaCtl::End).
    pub(super) fn end_replication(
        &mut self,
        key: &[u8],
        named: Option<u32>,
    ) -> Result<(), KvError> {
        let served = self.replicas.cell_of(key);
        let Some(cell) = served.or(named) else {
            return Err(KvError::Replication("the key is not replicated".into()));
        };
        self.sync()?;
        let req = dinomo_shared::msg::Request::FreeCell { cell };
        match crate::control::call(&mut self.f, req, self.cfg.timeout) {
            Ok(dinomo_shared::msg::Response::CellFreed { .. }) => {}
            // Freed already (by the earlier owner, before it died): nothing allocates a
            // cell while a key's replication is ending, so it is not another key's.
            Err(KvError::Dpm(dinomo_shared::ErrorCode::NoSuchCell)) if served.is_none() => {}
            Err(e) => return Err(e),
            Ok(r) => {
                return Err(KvError::Corrupt(format!(
                    "unexpected reply {r:?} to FreeCell"
                )))
            }
        }
        self.replicas.forget(key);
        self.cache.remove(key);
        Ok(())
    }

    /// Installs the replicated keys (flushing first if this shard stops serving one).
    pub fn set_replicas(&mut self, table: Arc<Replicas>) {
        if self.replicas.drops_any(&table, self.cfg.kn_id) {
            self.flush();
        }
        let (kn, shard, shards) = (self.cfg.kn_id, self.cfg.shard, self.cfg.shards);
        self.replicas.install(table, kn, shard, shards);
    }
}
