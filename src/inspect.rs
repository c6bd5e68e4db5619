//! `dinomo dpm inspect`: what a region holds, as a table or JSON.

use std::path::Path;
use std::time::Duration;

use dinomo_hw::region_file::RegionFile;
use dinomo_shared::control::{COMPACTION_KN, LOG_ACTIVE, LOG_CLOSED};
use dpm_fw::{region, Dpm, DpmStats, Stall};
use serde::Serialize;

/// `--interval`'s parser, where `main` finds it.
use crate::size::human;

/// Where one area lies.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Area {
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Layout {
    pub superblock: Area,
    pub control: Area,
    pub index: Area,
    pub indirect: Area,
    pub log: Area,
    pub block_size: u64,
    pub max_logs: u32,
    pub max_kns: u32,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Blocks {
    pub total: u64,
    pub free: u64,
    pub used: u64,
    /// Fully merged blocks with no live entry, about to be reclaimed.
    pub dead: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Capacity {
    pub log_bytes: u64,
    pub used_bytes: u64,
    pub used_fraction: f64,
}

/// Live versus dead log space.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Space {
    /// Bytes of the entries the index holds.
    pub live_bytes: u64,
    /// Bytes of the blocks in log chains.
    pub used_log_bytes: u64,
    /// `live_bytes / used_log_bytes` (0 when nothing is used).
    pub live_fraction: f64,
    /// Used blocks with no live entry.
    pub dead_blocks: u64,
}

/// Compaction totals since format, and between two inspections when sampled twice.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompactionReport {
    /// The memory node's compaction log, once opened.
    pub log_id: Option<u32>,
    pub entries_moved: u64,
    pub bytes_moved: u64,
    pub blocks_freed: u64,
    /// Moves that lost to a newer version merged meanwhile.
    pub cas_failures: u64,
    /// Set by [`with_rate`]: the rate between two inspections.
    pub rate: Option<CompactionRate>,
}

/// Compaction between two inspections.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompactionRate {
    pub interval_secs: f64,
    pub blocks_per_sec: f64,
    pub entries_per_sec: f64,
    pub mib_per_sec: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LogReport {
    pub log_id: u32,
    /// `active`, `closed`, or `dpm` for the memory node's compaction log.
    pub state: &'static str,
    pub kn_id: u32,
    pub shard: u32,
    pub generation: u64,
    /// Seq of the last entry merged into the index (as persisted before this inspection).
    pub persisted_merged_seq: u64,
    /// Seq of the last committed entry in the log.
    pub tail_seq: u64,
    /// Committed entries not yet merged when the region was last written.
    pub merge_lag: u64,
    pub blocks: u64,
    pub stall: Option<String>,
    /// Seq of the last entry that may be merged (set when the log was closed or fenced).
    pub fence_seq: Option<u64>,
    /// Closed by fencing its KN: its blocks are quarantined before reuse.
    pub quarantined: bool,
}

/// An active indirect cell (a replicated key).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CellReport {
    pub cell: u32,
    /// The key, non-printable bytes escaped.
    pub key: String,
    /// The entry the cell names: region offset and length.
    pub offset: u64,
    pub len: u64,
    /// Entries of the key kept out of the index (and from reclaim) while the cell is active.
    pub pinned_entries: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct IndexReport {
    pub generation: u32,
    pub buckets: u64,
    pub overflow_buckets: u64,
    pub items: u64,
    pub load_factor: f64,
    pub area_bytes: u64,
    pub used_bytes: u64,
    /// Log blocks the index took for overflow buckets once its area was full.
    pub blocks: u64,
    /// Overflow buckets the index may still need for log space granted but not merged,
    /// and the room it has for them (free units in its blocks and spare free blocks): log
    /// blocks are granted only while `room_units` covers `reserved_units`.
    pub reserved_units: u64,
    pub room_units: u64,
}

/// Everything `inspect` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub path: String,
    pub region_id: String,
    pub layout_version: u32,
    pub region_size: u64,
    pub clean_shutdown: bool,
    pub mount_count: u64,
    pub layout: Layout,
    pub capacity: Capacity,
    pub blocks: Blocks,
    pub live_entries: u64,
    pub space: Space,
    pub compaction: CompactionReport,
    pub logs: Vec<LogReport>,
    pub cells: Vec<CellReport>,
    pub index: IndexReport,
}

/// Inspects the region file at `path` without changing it: the file is mapped
/// copy-on-write and recovered in private memory, so the figures are those a restart
/// would see.
pub fn inspect(path: &Path) -> anyhow::Result<Report> {
    let file = RegionFile::open_private(path)?;
    let pm = file.pmem();
    let geo = region::read_geometry(&pm).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let sb = region::superblock(&pm);
    let state = region::state(&pm);
    // Merge positions as persisted, before recovery replays anything in private memory.
    let persisted: Vec<(u32, u64)> = (0..geo.max_logs)
        .filter_map(|l| {
            let slot: dinomo_shared::control::LogSlot = pm.read_pod(geo.log_slot_off(l));
            let prog: dinomo_shared::control::ProgressSlot = pm.read_pod(geo.progress_off(l));
            prog.current(slot.generation)
                .map(|(_, r)| (l, r.merged_seq))
        })
        .collect();
    let dpm = Dpm::open(pm).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let st: DpmStats = dpm.stats();
    let room = dpm.room();
    let used_bytes = st.blocks_used * geo.block_size;
    let logs = st
        .logs
        .iter()
        .map(|l| {
            let before = persisted
                .iter()
                .find(|(id, _)| *id == l.log_id)
                .map_or(0, |p| p.1);
            LogReport {
                log_id: l.log_id,
                state: match l.state {
                    // The memory node's own log of moved entries.
                    _ if l.kn_id == COMPACTION_KN => "dpm",
                    LOG_ACTIVE => "active",
                    LOG_CLOSED => "closed",
                    _ => "free",
                },
                kn_id: l.kn_id,
                shard: l.shard,
                generation: l.generation,
                persisted_merged_seq: before,
                tail_seq: l.tail_seq,
                merge_lag: l.tail_seq.saturating_sub(before),
                blocks: l.blocks,
                stall: l.stall.map(describe_stall),
                fence_seq: l.fence_seq,
                quarantined: l.quarantined,
            }
        })
        .collect();
    let cells = st
        .cells
        .iter()
        .map(|c| CellReport {
            cell: c.cell,
            key: c.key.escape_ascii().to_string(),
            offset: c.eref.offset(),
            len: c.eref.len(),
            pinned_entries: c.pinned_entries,
        })
        .collect();
    Ok(Report {
        path: path.display().to_string(),
        region_id: format!("{:016x}", sb.region_id),
        layout_version: sb.layout_version,
        region_size: geo.region_size,
        clean_shutdown: state.flags & dinomo_shared::superblock::FLAG_CLEAN_SHUTDOWN != 0,
        mount_count: state.mount_count,
        layout: Layout {
            superblock: Area {
                offset: 0,
                bytes: dinomo_shared::superblock::SUPERBLOCK_AREA,
            },
            control: Area {
                offset: geo.control_off,
                bytes: geo.control_len,
            },
            index: Area {
                offset: geo.index_off,
                bytes: geo.index_len,
            },
            indirect: Area {
                offset: geo.indirect_off,
                bytes: geo.indirect_len,
            },
            log: Area {
                offset: geo.log_off,
                bytes: geo.log_capacity(),
            },
            block_size: geo.block_size,
            max_logs: geo.max_logs,
            max_kns: geo.max_kns,
        },
        capacity: Capacity {
            log_bytes: geo.log_capacity(),
            used_bytes,
            used_fraction: used_bytes as f64 / geo.log_capacity().max(1) as f64,
        },
        blocks: Blocks {
            total: geo.n_blocks,
            free: st.blocks_free,
            used: st.blocks_used,
            dead: st.blocks_dead,
        },
        live_entries: st.live_entries,
        space: Space {
            live_bytes: st.live_bytes,
            used_log_bytes: used_bytes,
            live_fraction: if used_bytes == 0 {
                0.0
            } else {
                st.live_bytes as f64 / used_bytes as f64
            },
            dead_blocks: st.blocks_dead,
        },
        compaction: CompactionReport {
            log_id: dpm.compaction_log(),
            entries_moved: st.compaction.entries_moved,
            bytes_moved: st.compaction.bytes_moved,
            blocks_freed: st.compaction.blocks_freed,
            cas_failures: st.compaction.cas_failures,
            rate: None,
        },
        logs,
        cells,
        index: IndexReport {
            generation: st.index.generation,
            buckets: st.index.buckets,
            overflow_buckets: st.index.overflow_buckets,
            items: st.index.items,
            load_factor: st.index.load_factor,
            area_bytes: st.index.area_bytes,
            used_bytes: st.index.used_bytes,
            blocks: st.index.blocks,
            reserved_units: room.reserved_units,
            room_units: room.available_units,
        },
    })
}

/// `later` with the compaction rate since `earlier`, inspected `interval` before it.
pub fn with_rate(earlier: &Report, mut later: Report, interval: Duration) -> Report {
    let secs = interval.as_secs_f64().max(f64::MIN_POSITIVE);
    let (a, b) = (&earlier.compaction, &later.compaction);
    let per_sec = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
    later.compaction.rate = Some(CompactionRate {
        interval_secs: secs,
        blocks_per_sec: per_sec(a.blocks_freed, b.blocks_freed),
        entries_per_sec: per_sec(a.entries_moved, b.entries_moved),
        mib_per_sec: per_sec(a.bytes_moved, b.bytes_moved) / (1u64 << 20) as f64,
    });
    later
}

fn describe_stall(s: Stall) -> String {
    match s {
        Stall::CorruptEntry {
            block,
            offset,
            error,
        } => {
            format!("corrupt entry in sealed block {block} at offset {offset}: {error}")
        }
        Stall::BadLink { block } => format!("block {block} links to a block of another log"),
        Stall::Index(e) => format!("index: {e}"),
    }
}

/// The report as a human-readable table.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let a = |x: &Area| format!("{:>14} {:>12}", x.offset, human(x.bytes));
    let _ = writeln!(
        s,
        "region      {}  (id {}, layout v{})",
        r.path, r.region_id, r.layout_version
    );
    let _ = writeln!(
        s,
        "size        {}  clean shutdown: {}  mounts: {}",
        human(r.region_size),
        r.clean_shutdown,
        r.mount_count
    );
    let _ = writeln!(s, "\narea               offset         size");
    let _ = writeln!(s, "superblock {}", a(&r.layout.superblock));
    let _ = writeln!(s, "control    {}", a(&r.layout.control));
    let _ = writeln!(s, "index      {}", a(&r.layout.index));
    let _ = writeln!(s, "indirect   {}", a(&r.layout.indirect));
    let _ = writeln!(
        s,
        "log        {}  ({} blocks of {})",
        a(&r.layout.log),
        r.blocks.total,
        human(r.layout.block_size)
    );
    let _ = writeln!(
        s,
        "\nblocks      free {}  used {}  dead {}  ({} of log space used, {:.1}%)",
        r.blocks.free,
        r.blocks.used,
        r.blocks.dead,
        human(r.capacity.used_bytes),
        r.capacity.used_fraction * 100.0
    );
    let _ = writeln!(
        s,
        "live        {} entries  {} of {} in log chains ({:.1}% live)  dead blocks {}",
        r.live_entries,
        human(r.space.live_bytes),
        human(r.space.used_log_bytes),
        r.space.live_fraction * 100.0,
        r.space.dead_blocks
    );
    let c = &r.compaction;
    let _ = writeln!(
        s,
        "compaction  {} blocks freed  {} entries / {} moved  {} lost to newer versions{}",
        c.blocks_freed,
        c.entries_moved,
        human(c.bytes_moved),
        c.cas_failures,
        c.log_id.map(|l| format!("  (log {l})")).unwrap_or_default()
    );
    if let Some(rate) = &c.rate {
        let _ = writeln!(
            s,
            "            over {:.1}s: {:.1} blocks/s  {:.1} entries/s  {:.2} MiB/s",
            rate.interval_secs, rate.blocks_per_sec, rate.entries_per_sec, rate.mib_per_sec
        );
    }
    let _ = writeln!(
        s,
        "index       gen {}  {} buckets + {} overflow  {} items  load {:.2}  {} of {} used",
        r.index.generation,
        r.index.buckets,
        r.index.overflow_buckets,
        r.index.items,
        r.index.load_factor,
        human(r.index.used_bytes),
        human(r.index.area_bytes)
    );
    let _ = writeln!(
        s,
        "            {} log blocks  room {} buckets for {} reserved by unmerged log space",
        r.index.blocks, r.index.room_units, r.index.reserved_units
    );
    if r.logs.is_empty() {
        let _ = writeln!(s, "\nlogs        none open");
    } else {
        let _ = writeln!(
            s,
            "\n log  state   kn shard   gen   merged     tail    lag  blocks    fence"
        );
        for l in &r.logs {
            // A quarantined log's fence is marked `q`; the compaction log has no KN.
            let kn = if l.state == "dpm" {
                "-".to_string()
            } else {
                l.kn_id.to_string()
            };
            let fence = l.fence_seq.map_or_else(
                || "-".to_string(),
                |f| format!("{f}{}", if l.quarantined { " q" } else { "" }),
            );
            let _ = writeln!(
                s,
                "{:>4}  {:<6} {:>3} {:>5} {:>5} {:>8} {:>8} {:>6} {:>7} {:>8}{}",
                l.log_id,
                l.state,
                kn,
                l.shard,
                l.generation,
                l.persisted_merged_seq,
                l.tail_seq,
                l.merge_lag,
                l.blocks,
                fence,
                l.stall
                    .as_deref()
                    .map(|x| format!("  STALLED: {x}"))
                    .unwrap_or_default()
            );
        }
    }
    if r.cells.is_empty() {
        let _ = writeln!(s, "\ncells       none active");
    } else {
        let _ = writeln!(
            s,
            "\n{:>4} {:>20} {:>7} {:>7}  key",
            "cell", "entry offset", "len", "pinned"
        );
        for c in &r.cells {
            let _ = writeln!(
                s,
                "{:>4} {:>20} {:>7} {:>7}  {}",
                c.cell, c.offset, c.len, c.pinned_entries, c.key
            );
        }
    }
    s
}
