//! Reconfiguration steps of a shard: installing a new cluster map, handing over the slots
//! it loses, and having the DPM merge its log to the tail.

use std::sync::Arc;
use std::time::Instant;

use dinomo_hw::fabric::Fabric;
use dinomo_shared::slot::key_slot;

use crate::error::KvError;
use crate::ownership::{shard_of, SlotMap};

use super::{ReleaseReport, Shard};

impl<F: Fabric> Shard<F> {
    /// See [`Msg::Sync`](super::Msg::Sync).
    pub fn sync(&mut self) -> Result<(), KvError> {
        self.flush();
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let req = dinomo_shared::msg::Request::MergeAll {
            log_id: self.log.log_id,
            generation: self.log.generation,
            upto_seq: self.log.durable_seq(),
        };
        crate::control::call(&mut self.f, req, self.cfg.timeout)?;
        self.trim_unmerged();
        Ok(())
    }

    /// Installs a new cluster map; cached entries of slots no longer served are dropped.
    pub fn set_map(&mut self, map: Arc<SlotMap>) {
        self.flush();
        let (kn, shard, shards) = (
            self.cfg.kn_id,
            self.cfg.shard as usize,
            self.cfg.shards as usize,
        );
        let keep = |s: u16| map.owner(s) == kn && shard_of(s, shards) == shard;
        self.cache.retain(keep);
        self.expiries.retain(|k| keep(key_slot(k)));
        // A watched key of a slot that moved away and back may have been written elsewhere.
        self.watches.wrote_all();
        self.map_generation += 1;
        self.map = map;
    }

    /// See [`Msg::Release`](super::Msg::Release). On an error the lost slots stay refused
    /// but their unmerged own writes are kept, so re-installing a map that gives them back
    /// is safe.
    pub fn release(&mut self, map: Arc<SlotMap>) -> Result<ReleaseReport, KvError> {
        self.set_map(map);
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let before = self.read_merged_seq();
        let req = dinomo_shared::msg::Request::MergeAll {
            log_id: self.log.log_id,
            generation: self.log.generation,
            upto_seq: self.log.durable_seq(),
        };
        let t0 = Instant::now();
        let resp = crate::control::call(&mut self.f, req, self.cfg.timeout)?;
        let merge = t0.elapsed();
        let merged_seq = match resp {
            dinomo_shared::msg::Response::Merged { merged_seq } => merged_seq,
            r => {
                return Err(KvError::Corrupt(format!(
                    "unexpected reply {r:?} to MergeAll"
                )))
            }
        };
        if merged_seq < self.log.durable_seq() {
            return Err(KvError::Corrupt(format!(
                "the memory node merged log {} only to seq {merged_seq} of {}",
                self.log.log_id,
                self.log.durable_seq()
            )));
        }
        self.forget_merged(merged_seq);
        let (kn, shard, shards) = (
            self.cfg.kn_id,
            self.cfg.shard as usize,
            self.cfg.shards as usize,
        );
        let map = Arc::clone(&self.map);
        self.unmerged.retain(|k| {
            let s = key_slot(k);
            map.owner(s) == kn && shard_of(s, shards) == shard
        });
        Ok(ReleaseReport {
            entries_merged: merged_seq.saturating_sub(before.unwrap_or(merged_seq)),
            merge,
        })
    }
}
