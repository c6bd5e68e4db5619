//! The two systems of the scenario behind one interface: DINOMO moves ownership only,
//! DINOMO-N copies the moved slots' data. DINOMO replicates hot keys through indirect
//! cells; DINOMO-N, shared-nothing, cannot.

use std::sync::Arc;
use std::time::Duration;

use host_kn::{Router, ShardStats};

use super::replication::Replicator;
use super::{Elastic, Reconfig};
use crate::cluster::dinomo_n::{DinomoN, SlotTags};
use crate::cluster::Cluster;

/// Longer than any move of the scenario takes.
const PATIENCE: Duration = Duration::from_secs(120);

impl Replicator for Cluster {
    fn live_kns(&self) -> Vec<u16> {
        Cluster::live_kns(self)
    }
    fn hot_keys(&self, kn: u16) -> Vec<(Vec<u8>, u64)> {
        Cluster::hot_keys(self, kn)
    }
    fn replicated(&self) -> Vec<Vec<u8>> {
        Cluster::replicated(self)
    }
    fn cannot_replicate(&self) -> Option<&'static str> {
        None
    }
    fn replicate(&mut self, key: &[u8], kns: &[u16]) -> anyhow::Result<()> {
        Cluster::replicate(self, key, kns)?;
        Ok(())
    }
    fn dereplicate(&mut self, key: &[u8]) -> anyhow::Result<()> {
        Ok(Cluster::dereplicate(self, key)?)
    }
}

impl Elastic for Cluster {
    fn patient_client(&self, i: usize) -> Self::C {
        let mut c = self.client();
        c.set_retry_for(PATIENCE);
        c.set_replica_choice(i);
        c
    }
    fn router(&self) -> Arc<Router> {
        Arc::clone(Cluster::router(self))
    }
    fn kn_stats(&self, kn: u16) -> Option<ShardStats> {
        self.kns().iter().find(|k| k.kn_id == kn).map(|k| k.stats())
    }
    fn add_kn(&mut self) -> anyhow::Result<Reconfig> {
        let (kn, r) = Cluster::add_kn(self)?;
        Ok(Reconfig {
            kn,
            slots_moved: r.slots_moved,
            bytes_moved: r.bytes_moved,
        })
    }
    fn remove_kn(&mut self, kn: u16) -> anyhow::Result<Reconfig> {
        let r = Cluster::remove_kn(self, kn)?;
        Ok(Reconfig {
            kn,
            slots_moved: r.slots_moved,
            bytes_moved: r.bytes_moved,
        })
    }
}

/// Why DINOMO-N's replication decisions are skipped.
const SHARED_NOTHING: &str = "dinomo-n is shared-nothing (no indirect cells)";

impl Replicator for DinomoN {
    fn live_kns(&self) -> Vec<u16> {
        self.cluster().live_kns()
    }
    /// The user keys of the stored (partition-tagged) keys, so the policy sees what it
    /// would see on DINOMO.
    fn hot_keys(&self, kn: u16) -> Vec<(Vec<u8>, u64)> {
        self.cluster()
            .hot_keys(kn)
            .into_iter()
            .filter_map(|(k, n)| SlotTags::parse(&k).map(|(_, user)| (user.to_vec(), n)))
            .collect()
    }
    fn replicated(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }
    fn cannot_replicate(&self) -> Option<&'static str> {
        Some(SHARED_NOTHING)
    }
    fn replicate(&mut self, _: &[u8], _: &[u16]) -> anyhow::Result<()> {
        anyhow::bail!(SHARED_NOTHING)
    }
    fn dereplicate(&mut self, _: &[u8]) -> anyhow::Result<()> {
        anyhow::bail!(SHARED_NOTHING)
    }
}

impl Elastic for DinomoN {
    /// DINOMO-N has no replicas to spread over.
    fn patient_client(&self, _: usize) -> Self::C {
        let mut c = self.client();
        c.set_retry_for(PATIENCE);
        c
    }
    fn router(&self) -> Arc<Router> {
        Arc::clone(self.cluster().router())
    }
    fn kn_stats(&self, kn: u16) -> Option<ShardStats> {
        self.cluster()
            .kns()
            .iter()
            .find(|k| k.kn_id == kn)
            .map(|k| k.stats())
    }
    fn add_kn(&mut self) -> anyhow::Result<Reconfig> {
        let r = DinomoN::add_kn(self)?;
        Ok(Reconfig {
            kn: r.kn,
            slots_moved: r.slots_moved,
            bytes_moved: r.bytes_moved,
        })
    }
    fn remove_kn(&mut self, kn: u16) -> anyhow::Result<Reconfig> {
        let r = DinomoN::remove_kn(self, kn)?;
        Ok(Reconfig {
            kn,
            slots_moved: r.slots_moved,
            bytes_moved: r.bytes_moved,
        })
    }
}
