//! Selective replication of hot keys in the in-process cluster: the steps that involve
//! several KNs (the owner allocates the cell, replicas learn the table, the router
//! publishes; and the reverse).

use std::sync::mpsc;
use std::sync::Arc;

use dinomo_shared::slot::key_slot;
use host_kn::ownership::shard_of;
use host_kn::replica::{ReplicaCtl, ReplicaSet, Replicas};
use host_kn::shard::{validate_key, Msg};
use host_kn::{Kn, KvError};

use super::{Cluster, ClusterError};

fn refused(why: String) -> ClusterError {
    ClusterError::Kn(KvError::Replication(why))
}

impl Cluster {
    fn kn_by_id(&self, kn: u16) -> Option<&Kn> {
        self.kns.iter().find(|k| k.kn_id == kn)
    }

    /// Sends a control request to the shard of the key's owner that serves the key.
    fn ask_owner<T>(
        &self,
        owner: u16,
        key: &[u8],
        make: impl FnOnce(mpsc::Sender<Result<T, KvError>>) -> ReplicaCtl,
    ) -> Result<T, ClusterError> {
        let kn = self
            .kn_by_id(owner)
            .ok_or_else(|| refused(format!("KN {owner} is not running")))?;
        let shards = kn.senders();
        let shard = &shards[shard_of(key_slot(key), shards.len())];
        let (tx, rx) = mpsc::channel();
        shard
            .send(Msg::Replica(make(tx)))
            .map_err(|_| KvError::ShuttingDown)?;
        Ok(rx.recv().map_err(|_| KvError::ShuttingDown)??)
    }

    /// Installs `table` on every shard of every KN and waits until all have applied it.
    fn install_replicas(&self, table: &Arc<Replicas>) {
        for k in &self.kns {
            for tx in k.senders() {
                let _ = tx.send(Msg::SetReplicas(Arc::clone(table)));
            }
        }
        for k in &self.kns {
            // Answered after the table (one queue per shard).
            let _ = k.stats();
        }
    }

    /// Replicates `key` to the KNs `kns` (its owner is always one of them): the owner has
    /// the DPM allocate the key's indirect cell, every replica learns it, then clients send
    /// the key to any replica. Returns the cell.
    pub fn replicate(&mut self, key: &[u8], kns: &[u16]) -> Result<u32, ClusterError> {
        validate_key(key)?;
        let table = self.router.replicas();
        if table.get(key).is_some() {
            return Err(refused("the key is already replicated".into()));
        }
        let owner = self.router.map().owner(key_slot(key));
        let mut set = vec![owner];
        for &kn in kns {
            if self.kn_by_id(kn).is_none() {
                return Err(refused(format!("KN {kn} is not running")));
            }
            if !set.contains(&kn) {
                set.push(kn);
            }
        }
        let cell = self.ask_owner(owner, key, |reply| ReplicaCtl::Begin {
            key: key.to_vec(),
            reply,
        })?;
        let table = Arc::new(table.with(
            key,
            ReplicaSet {
                cell,
                owner,
                kns: set,
            },
        ));
        self.install_replicas(&table);
        self.router.set_replicas(table);
        Ok(cell)
    }

    /// Ends the replication of `key`: clients send it to its owner only, the other replicas
    /// drop it and merge their logs, then the owner has the DPM free the cell (its entry
    /// goes back into the index) and serves the key as an ordinary owned key.
    pub fn dereplicate(&mut self, key: &[u8]) -> Result<(), ClusterError> {
        self.end_replication(key)
    }

    /// Ends the replication of every key whose replica set `ends` says must change (before
    /// its owner loses its slot, or a replica KN stops).
    pub(crate) fn dereplicate_where(
        &self,
        ends: impl Fn(&[u8], &ReplicaSet) -> bool,
    ) -> Result<(), ClusterError> {
        let table = self.router.replicas();
        for (key, set) in table.iter() {
            if ends(key, set) {
                self.end_replication(key)?;
            }
        }
        Ok(())
    }

    fn end_replication(&self, key: &[u8]) -> Result<(), ClusterError> {
        let table = self.router.replicas();
        let set = table
            .get(key)
            .cloned()
            .ok_or_else(|| refused("the key is not replicated".into()))?;
        let owner_only = Arc::new(table.with(
            key,
            ReplicaSet {
                kns: vec![set.owner],
                ..set.clone()
            },
        ));
        // Requests already queued at other replicas are served there (their writes are
        // published before the replica drops the key); later ones are refused with
        // WrongOwner and the client retries at the owner.
        self.router.set_replicas(Arc::clone(&owner_only));
        self.install_replicas(&owner_only);
        for &kn in set.kns.iter().filter(|&&kn| kn != set.owner) {
            if let Some(k) = self.kn_by_id(kn) {
                k.sync()?;
            }
        }
        self.ask_owner(set.owner, key, |reply| ReplicaCtl::End {
            key: key.to_vec(),
            cell: None,
            reply,
        })?;
        let table = Arc::new(self.router.replicas().without(key));
        self.router.set_replicas(Arc::clone(&table));
        self.install_replicas(&table);
        Ok(())
    }

    /// The KN owning `key`'s slot under the current map.
    pub fn owner_of(&self, key: &[u8]) -> u16 {
        self.router.map().owner(key_slot(key))
    }

    /// The replicated keys.
    pub fn replicated(&self) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = self
            .router
            .replicas()
            .iter()
            .map(|(k, _)| k.to_vec())
            .collect();
        keys.sort();
        keys
    }

    /// The hottest keys of KN `kn` since the last call, hottest first.
    pub fn hot_keys(&self, kn: u16) -> Vec<(Vec<u8>, u64)> {
        self.kn_by_id(kn).map(Kn::hot_keys).unwrap_or_default()
    }
}
