//! The two systems of the scenario behind one interface: DINOMO moves ownership only,
//! DINOMO-N copies the moved slots' data.

use std::sync::Arc;
use std::time::Duration;

use host_kn::{Router, ShardStats};

use super::{Elastic, Reconfig};
use crate::cluster::dinomo_n::DinomoN;
use crate::cluster::Cluster;

/// Longer than any move of the scenario takes.
const PATIENCE: Duration = Duration::from_secs(120);

impl Elastic for Cluster {
    fn patient_client(&self) -> Self::C {
        let mut c = self.client();
        c.set_retry_for(PATIENCE);
        c
    }
    fn router(&self) -> Arc<Router> {
        Arc::clone(Cluster::router(self))
    }
    fn live_kns(&self) -> Vec<u16> {
        Cluster::live_kns(self)
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

impl Elastic for DinomoN {
    fn patient_client(&self) -> Self::C {
        let mut c = self.client();
        c.set_retry_for(PATIENCE);
        c
    }
    fn router(&self) -> Arc<Router> {
        Arc::clone(self.cluster().router())
    }
    fn live_kns(&self) -> Vec<u16> {
        self.cluster().live_kns()
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
