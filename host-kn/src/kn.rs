//! A KVS node: a set of shards, one thread and one fabric connection each. In the KN process
//! ([`Kn::start_serving`]) each shard thread is also the event loop of the client
//! connections placed on it.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use dinomo_hw::fabric::Fabric;

use crate::error::KvError;
use crate::ownership::SlotMap;
use crate::shard::{
    run_blocking, run_thread, Msg, ReleaseReport, Shard, ShardConfig, ShardStats, ShardTx,
};

/// A running KN.
#[derive(Debug)]
pub struct Kn {
    pub kn_id: u16,
    senders: Vec<ShardTx>,
    threads: Vec<JoinHandle<ShardStats>>,
}

impl Kn {
    /// Starts one shard per configuration, for clients in this process ([`crate::Client`]);
    /// `connect(shard)` makes that shard's fabric connection inside its thread (verbs
    /// resources stay with the thread that uses them).
    pub fn start<F, C>(
        configs: Vec<ShardConfig>,
        map: Arc<SlotMap>,
        connect: C,
    ) -> Result<Self, KvError>
    where
        F: Fabric + 'static,
        C: Fn(u16) -> Result<F, KvError> + Send + Sync + 'static,
    {
        Self::start_with(configs, map, connect, false)
    }

    /// [`Kn::start`] with an event loop on every shard thread, on which client connections
    /// are placed by sending [`Msg::Task`]: the KN process.
    pub fn start_serving<F, C>(
        configs: Vec<ShardConfig>,
        map: Arc<SlotMap>,
        connect: C,
    ) -> Result<Self, KvError>
    where
        F: Fabric + 'static,
        C: Fn(u16) -> Result<F, KvError> + Send + Sync + 'static,
    {
        Self::start_with(configs, map, connect, true)
    }

    fn start_with<F, C>(
        configs: Vec<ShardConfig>,
        map: Arc<SlotMap>,
        connect: C,
        serving: bool,
    ) -> Result<Self, KvError>
    where
        F: Fabric + 'static,
        C: Fn(u16) -> Result<F, KvError> + Send + Sync + 'static,
    {
        let kn_id = configs.first().map_or(0, |c| c.kn_id);
        let connect = Arc::new(connect);
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        let mut ready = Vec::new();
        for cfg in configs {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (rtx, rrx) = mpsc::channel::<Result<(), KvError>>();
            let (connect, map) = (Arc::clone(&connect), Arc::clone(&map));
            let name = format!("kn{}-shard{}", cfg.kn_id, cfg.shard);
            let h = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let rt = if serving {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map(Some)
                            .map_err(|e| {
                                KvError::Fabric(format!("cannot start an event loop: {e}"))
                            })
                    } else {
                        Ok(None)
                    };
                    let shard = rt.and_then(|rt| {
                        let s = connect(cfg.shard).and_then(|f| Shard::open(cfg, f, map))?;
                        Ok((rt, s))
                    });
                    match shard {
                        Ok((rt, s)) => {
                            let _ = rtx.send(Ok(()));
                            match rt {
                                Some(rt) => run_thread(&rt, s, rx),
                                None => run_blocking(s, rx),
                            }
                        }
                        Err(e) => {
                            let _ = rtx.send(Err(e));
                            ShardStats::default()
                        }
                    }
                })
                .map_err(|e| KvError::Fabric(format!("cannot start a shard thread: {e}")))?;
            senders.push(tx);
            threads.push(h);
            ready.push(rrx);
        }
        let kn = Self {
            kn_id,
            senders,
            threads,
        };
        for r in ready {
            match r.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    kn.stop();
                    return Err(e);
                }
                Err(_) => {
                    kn.stop();
                    return Err(KvError::Fabric("a shard thread died while starting".into()));
                }
            }
        }
        Ok(kn)
    }

    /// The request queues of the shards, by shard index.
    pub fn senders(&self) -> &[ShardTx] {
        &self.senders
    }

    /// Current counters of every shard, added up.
    pub fn stats(&self) -> ShardStats {
        let mut total = ShardStats::default();
        for tx in &self.senders {
            let (stx, srx) = mpsc::channel();
            if tx.send(Msg::Stats(stx)).is_ok() {
                if let Ok(s) = srx.recv() {
                    total.add(&s);
                }
            }
        }
        total
    }

    /// Flushes every shard and waits until the DPM has merged all of its logs.
    pub fn sync(&self) -> Result<(), KvError> {
        let mut waits = Vec::new();
        for tx in &self.senders {
            let (stx, srx) = mpsc::channel();
            tx.send(Msg::Sync(stx)).map_err(|_| KvError::ShuttingDown)?;
            waits.push(srx);
        }
        for w in waits {
            w.recv().map_err(|_| KvError::ShuttingDown)??;
        }
        Ok(())
    }

    /// The KN's hottest keys since the last call (each shard's sampled top-k, merged),
    /// hottest first.
    pub fn hot_keys(&self) -> Vec<(Vec<u8>, u64)> {
        let mut all = Vec::new();
        for tx in &self.senders {
            let (htx, hrx) = mpsc::channel();
            if tx.send(Msg::HotKeys(htx)).is_ok() {
                if let Ok(h) = hrx.recv() {
                    all.extend(h);
                }
            }
        }
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(crate::replica::HOT_KEYS);
        all
    }

    /// Installs a new cluster map on every shard.
    pub fn set_map(&self, map: &Arc<SlotMap>) {
        for tx in &self.senders {
            let _ = tx.send(Msg::SetMap(Arc::clone(map)));
        }
    }

    /// Hands over the slots this KN loses going from map `from` to `map`: the shards that
    /// lose any get [`Msg::Release`] (all at once), the others just install `map`. The report
    /// adds up the entries merged; `merge` is the slowest shard's.
    pub fn release(&self, from: &SlotMap, map: &Arc<SlotMap>) -> Result<ReleaseReport, KvError> {
        let n = self.senders.len();
        let mut losing = vec![false; n];
        for slot in 0..dinomo_shared::slot::SLOTS {
            if from.owner(slot) == self.kn_id && map.owner(slot) != self.kn_id {
                losing[crate::ownership::shard_of(slot, n)] = true;
            }
        }
        let mut waits = Vec::new();
        for (tx, _) in self.senders.iter().zip(&losing).filter(|(_, &l)| l) {
            let (rtx, rrx) = mpsc::channel();
            tx.send(Msg::Release {
                map: Arc::clone(map),
                reply: rtx,
            })
            .map_err(|_| KvError::ShuttingDown)?;
            waits.push(rrx);
        }
        for (tx, _) in self.senders.iter().zip(&losing).filter(|(_, &l)| !l) {
            let _ = tx.send(Msg::SetMap(Arc::clone(map)));
        }
        let mut total = ReleaseReport::default();
        let mut first_err = None;
        for w in waits {
            match w.recv().map_err(|_| KvError::ShuttingDown).and_then(|r| r) {
                Ok(r) => {
                    total.entries_merged += r.entries_merged;
                    total.merge = total.merge.max(r.merge);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Flushes and closes every shard's log, then joins the threads.
    pub fn stop(self) -> ShardStats {
        for tx in &self.senders {
            let _ = tx.send(Msg::Stop);
        }
        let mut total = ShardStats::default();
        for t in self.threads {
            if let Ok(s) = t.join() {
                total.add(&s);
            }
        }
        total
    }
}
