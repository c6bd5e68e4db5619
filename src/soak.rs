//! `dinomo soak`: an update-only load of many times the region's log capacity through the
//! real write path (an in-process cluster: the memory node's merge workers with compaction,
//! KN shards writing their logs over the shm fabric), sampling the footprint as it goes.
//! It fails on `RegionFull`, on a lost or regressed value, or when the footprint keeps
//! growing after the warm-up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dinomo_shared::entry::padded_len;
use dpm_fw::CompactConfig;
use host_kn::dac::CachePolicy;
use host_kn::KvError;
use serde::Serialize;

use crate::bench::workload::{fnv64, Rng, Zipfian};
use crate::cluster::{Cluster, ClusterConfig, ClusterError};

/// How to run a soak.
#[derive(Clone, Debug, Serialize)]
pub struct SoakConfig {
    pub region_bytes: u64,
    pub block_size: u64,
    pub keys: u64,
    /// Bytes of entries to write, as a multiple of the region's log capacity.
    pub write_factor: f64,
    /// Zipfian skew of the updates; `None`: uniform.
    pub zipf: Option<f64>,
    pub value_bytes: usize,
    /// Client threads (each owns the keys `i` with `i % threads == t`).
    pub threads: usize,
    pub kns: u16,
    pub shards_per_kn: u16,
    pub dpm_workers: usize,
    /// Victim threshold; `None`: the memory node's default.
    pub live_pct: Option<u32>,
    pub seed: u64,
}

impl Default for SoakConfig {
    fn default() -> Self {
        Self {
            region_bytes: 32 << 20,
            block_size: 64 << 10,
            keys: 20_000,
            write_factor: 20.0,
            zipf: None,
            value_bytes: 256,
            threads: 4,
            kns: 1,
            shards_per_kn: 2,
            dpm_workers: 1,
            live_pct: None,
            seed: 1,
        }
    }
}

/// One sample of the run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Sample {
    pub elapsed_secs: f64,
    pub bytes_written: u64,
    /// `bytes_written` over the log capacity.
    pub capacity_multiple: f64,
    pub blocks_used: u64,
    pub blocks_free: u64,
    /// Live bytes over the bytes of used blocks.
    pub live_fraction: f64,
    pub entries_moved: u64,
    pub bytes_moved: u64,
    pub blocks_freed: u64,
    pub cas_failures: u64,
}

/// What a soak measured.
#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub config: SoakConfig,
    pub n_blocks: u64,
    pub log_capacity: u64,
    pub low_watermark: u64,
    pub samples: Vec<Sample>,
    /// Most blocks in use at any sample before, and after, the warm-up (the first quarter
    /// of the bytes to write).
    pub peak_used_warmup: u64,
    pub peak_used_after: u64,
    /// Most blocks in use in the first and in the second half after the warm-up.
    pub peak_used_first_half: u64,
    pub peak_used_second_half: u64,
    pub puts: u64,
    /// Blocks in use after the run, once every log is merged and compaction found no
    /// victim left.
    pub settled_used: u64,
    /// What that may be at most, whatever the timing: blocks at most `live_pct` live are
    /// all compacted, so the rest hold more than `live_pct` of a payload of live bytes
    /// each, plus a writing block and a spare per log and the compaction log's own.
    pub settled_bound: u64,
    pub elapsed_secs: f64,
}

impl SoakReport {
    /// The footprint kept growing: the second half after the warm-up needed more blocks
    /// than the first half plus a margin (a log's worth of blocks per writing shard).
    pub fn still_growing(&self) -> bool {
        let margin = 2 * (self.config.kns as u64 * self.config.shards_per_kn as u64) + 2;
        self.peak_used_second_half > self.peak_used_first_half + margin
    }
}

/// Why a soak failed.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("invalid soak configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("the region filled up after {written} bytes ({multiple:.1}x its log capacity)")]
    RegionFull { written: u64, multiple: f64 },
    #[error("a write failed after {written} bytes: {source}")]
    Write { written: u64, source: KvError },
    #[error("key {key} reads {got:?}, last written version {want}")]
    Lost {
        key: u64,
        got: Option<String>,
        want: u64,
    },
}

fn key(i: u64) -> Vec<u8> {
    format!("soak-{i:09}").into_bytes()
}

fn value(i: u64, version: u64, len: usize) -> Vec<u8> {
    let mut v = format!("k{i} v{version} ").into_bytes();
    v.resize(len.max(v.len()), b'.');
    v
}

fn version_of(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    s.split(' ').nth(1)?.strip_prefix('v')?.parse().ok()
}

impl SoakConfig {
    /// Checks the settings that need no cluster to check.
    pub fn validate(&self) -> Result<(), SoakError> {
        if self.keys == 0 || self.threads == 0 || self.value_bytes == 0 {
            return Err(SoakError::Config(
                "keys, threads and value size must be positive".into(),
            ));
        }
        if !(self.write_factor > 0.0 && self.write_factor.is_finite()) {
            return Err(SoakError::Config(
                "the write factor must be positive".into(),
            ));
        }
        if let Some(z) = self.zipf {
            if !(z > 0.0 && z < 1.0) {
                return Err(SoakError::Config(format!(
                    "zipf skew {z} must lie strictly between 0 and 1"
                )));
            }
        }
        Ok(())
    }
}

/// Runs a soak; `on_sample` sees each sample as it is taken.
pub fn run(cfg: &SoakConfig, mut on_sample: impl FnMut(&Sample)) -> Result<SoakReport, SoakError> {
    cfg.validate()?;
    let cluster = Cluster::start(&ClusterConfig {
        kns: cfg.kns,
        shards_per_kn: cfg.shards_per_kn,
        region_bytes: cfg.region_bytes,
        block_size: Some(cfg.block_size),
        dpm_workers: cfg.dpm_workers,
        cache_bytes_per_kn: 1 << 20,
        policy: CachePolicy::Dac,
        max_kns: cfg.kns.max(1),
        ..ClusterConfig::default()
    })?;
    let dpm = Arc::clone(cluster.dpm());
    if let Some(p) = cfg.live_pct {
        dpm.set_compaction_config(CompactConfig {
            live_pct: p,
            ..dpm.compaction_config()
        });
    }
    let geo = *dpm.geometry();
    let capacity = geo.log_capacity();
    let target = (cfg.write_factor * capacity as f64) as u64;
    let written = Arc::new(AtomicU64::new(0));
    let puts = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failure: Arc<Mutex<Option<SoakError>>> = Arc::new(Mutex::new(None));
    let started = Instant::now();
    let mut workers = Vec::new();
    for t in 0..cfg.threads {
        let mut client = cluster.client();
        let (written, puts, stop, failure) = (
            Arc::clone(&written),
            Arc::clone(&puts),
            Arc::clone(&stop),
            Arc::clone(&failure),
        );
        let cfg = cfg.clone();
        let threads = cfg.threads as u64;
        workers.push(std::thread::spawn(move || -> Vec<(u64, u64)> {
            let mine: Vec<u64> = (0..cfg.keys).filter(|i| i % threads == t as u64).collect();
            let mut last = vec![0u64; mine.len()];
            if mine.is_empty() {
                return Vec::new();
            }
            let zipf = cfg.zipf.map(|z| Zipfian::new(mine.len() as u64, z));
            let mut rng = Rng::new(cfg.seed ^ (t as u64).wrapping_mul(0x9E37_79B9));
            // Every key once (the load), then updates until the target is written.
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let slot = if (n as usize) < mine.len() {
                    n as usize
                } else {
                    match &zipf {
                        Some(z) => (fnv64(z.next(&mut rng)) % mine.len() as u64) as usize,
                        None => rng.below(mine.len() as u64) as usize,
                    }
                };
                n += 1;
                let i = mine[slot];
                let ver = last[slot] + 1;
                let v = value(i, ver, cfg.value_bytes);
                match client.put(&key(i), &v) {
                    Ok(()) => {
                        last[slot] = ver;
                        puts.fetch_add(1, Ordering::Relaxed);
                        let len = padded_len(key(i).len(), v.len()) as u64;
                        if written.fetch_add(len, Ordering::Relaxed) + len >= target {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        let w = written.load(Ordering::Relaxed);
                        let err = match e {
                            KvError::RegionFull => SoakError::RegionFull {
                                written: w,
                                multiple: w as f64 / capacity as f64,
                            },
                            source => SoakError::Write { written: w, source },
                        };
                        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert(err);
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
            mine.into_iter().zip(last).collect()
        }));
    }
    let sample = |elapsed: Duration| {
        let st = dpm.stats();
        let w = written.load(Ordering::Relaxed);
        let used_bytes = st.blocks_used * geo.block_size;
        Sample {
            elapsed_secs: elapsed.as_secs_f64(),
            bytes_written: w,
            capacity_multiple: w as f64 / capacity as f64,
            blocks_used: geo.n_blocks - st.blocks_free,
            blocks_free: st.blocks_free,
            live_fraction: if used_bytes == 0 {
                0.0
            } else {
                st.live_bytes as f64 / used_bytes as f64
            },
            entries_moved: st.compaction.entries_moved,
            bytes_moved: st.compaction.bytes_moved,
            blocks_freed: st.compaction.blocks_freed,
            cas_failures: st.compaction.cas_failures,
        }
    };
    let mut samples = Vec::new();
    // Sample by bytes written (a 50th of the target each), never faster than every 20ms.
    let every = (target / 50).max(1);
    let mut next = every;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if written.load(Ordering::Relaxed) >= next {
            next = written.load(Ordering::Relaxed) + every;
            let s = sample(started.elapsed());
            on_sample(&s);
            samples.push(s);
        }
    }
    let mut last_versions = Vec::new();
    for w in workers {
        last_versions.extend(w.join().unwrap_or_default());
    }
    let fin = sample(started.elapsed());
    on_sample(&fin);
    samples.push(fin);
    let failed = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(e) = failed {
        let _ = cluster.stop();
        return Err(e);
    }
    // Every key reads its last acknowledged version.
    let mut client = cluster.client();
    for &(i, ver) in &last_versions {
        if ver == 0 {
            continue;
        }
        let got = client.get(&key(i)).map_err(|source| SoakError::Write {
            written: written.load(Ordering::Relaxed),
            source,
        })?;
        if got.as_deref().and_then(version_of) != Some(ver) {
            let _ = cluster.stop();
            return Err(SoakError::Lost {
                key: i,
                got: got.map(|v| String::from_utf8_lossy(&v).into_owned()),
                want: ver,
            });
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (settled_used, settled_bound) = settle(&cluster).map_err(|source| SoakError::Write {
        written: written.load(Ordering::Relaxed),
        source,
    })?;
    let _ = cluster.stop();
    let warm = target / 4;
    let mid = warm + (target - warm) / 2;
    let peak = |f: &dyn Fn(&Sample) -> bool| {
        samples
            .iter()
            .filter(|s| f(s))
            .map(|s| s.blocks_used)
            .max()
            .unwrap_or(0)
    };
    Ok(SoakReport {
        config: cfg.clone(),
        n_blocks: geo.n_blocks,
        log_capacity: capacity,
        low_watermark: dpm.compaction_config().low_watermark,
        peak_used_warmup: peak(&|s| s.bytes_written < warm),
        peak_used_after: peak(&|s| s.bytes_written >= warm),
        peak_used_first_half: peak(&|s| s.bytes_written >= warm && s.bytes_written < mid),
        peak_used_second_half: peak(&|s| s.bytes_written >= mid),
        puts: puts.load(Ordering::Relaxed),
        settled_used,
        settled_bound,
        elapsed_secs: elapsed,
        samples,
    })
}

/// Merges everything, compacts until no victim is left, and returns the blocks in use and
/// their structural bound (see [`SoakReport::settled_bound`]).
fn settle(cluster: &Cluster) -> Result<(u64, u64), KvError> {
    cluster.sync()?;
    let dpm = cluster.dpm();
    let mut scratch = dpm_fw::Scratch::default();
    // Bounded: each step frees a block or finds none; a busy answer (a merge worker holds
    // the victim's log for a moment) is retried.
    for _ in 0..dpm.geometry().n_blocks * 64 {
        match dpm.compact_step(true, &mut scratch) {
            Ok(s) if s.busy => std::thread::yield_now(),
            Ok(s) if s.victim.is_some() => {}
            _ => break,
        }
    }
    let st = dpm.stats();
    let geo = dpm.geometry();
    let payload = geo.block_size - dinomo_shared::block::BLOCK_HEADER_SIZE;
    let limit = (payload * dpm.compaction_config().live_pct as u64 / 100).max(1);
    let open_logs = st.logs.len() as u64;
    let bound = st.live_bytes.div_ceil(limit) + 3 * open_logs + 1;
    Ok((geo.n_blocks - st.blocks_free, bound))
}

/// One sample as a table row.
pub fn render_sample(s: &Sample) -> String {
    format!(
        "{:>7.1}s {:>10} {:>6.1}x  used {:>5} free {:>5}  live {:>5.1}%  moved {:>9} ({}) freed {:>6} lost {:>5}",
        s.elapsed_secs,
        crate::size::human(s.bytes_written),
        s.capacity_multiple,
        s.blocks_used,
        s.blocks_free,
        s.live_fraction * 100.0,
        s.entries_moved,
        crate::size::human(s.bytes_moved),
        s.blocks_freed,
        s.cas_failures
    )
}
