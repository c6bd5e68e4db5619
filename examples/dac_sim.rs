//! A model of `dinomo bench --workload read-only --dist zipf --zipf 0.99 --keys 100000`:
//! the bench's own key stream (same generator, seed and key → KN → shard mapping over 2 KNs
//! × 2 shards) replayed against one `DacCache` per shard with the bench's charges, a read
//! costing 0 RTs from a value, 1 through a shortcut and 2 on a miss. It runs in seconds, so
//! a policy change can be measured at every cache ratio before the real bench confirms it
//! (the two agree to the third decimal; docs/PERFORMANCE.md).
//!
//! Beside each policy it prints the per-shard oracle (the static optimum for the exact key
//! popularity) and, with `--hindsight`, the learnable bound: the best static split chosen
//! from the run's *own* key counts (every draw, warm-up included) and scored against the
//! exact popularity. No policy that learns from counts can be expected below it, so it
//! tells how much of a gap to the oracle is the run's length and how much the policy's.
//!
//! ```text
//! cargo run --release --example dac_sim -- [RATIO...] [--all] [--hindsight]
//!     [--warmup OPS] [--ops OPS] [--decay ACCESSES]
//! ```

use dinomo::bench::per_shard_oracle;
use dinomo::bench::workload::{key_into, value_into, Distribution, KeyChooser, Rng};
use host_kn::dac::{oracle, CachePolicy, DacCache, DacConfig, EntryRef, Lookup};
use host_kn::ownership::{shard_of, SlotMap, DEFAULT_VNODES};

const KEYS: u64 = 100_000;
const KEY_SIZE: usize = 8;
const VALUE_SIZE: usize = 1024;
const KNS: u16 = 2;
const SHARDS: u16 = 2;
const MISS_RTS: f64 = 2.0;

fn main() -> Result<(), String> {
    let mut ratios = Vec::new();
    let mut policies = vec![CachePolicy::Dac];
    let (mut warm, mut ops, mut hindsight) = (200_000u64, 1_000_000u64, false);
    // Accesses of a shard's cache between halvings of its counts (0: never).
    let mut decay = DacConfig::default().decay_every;
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.and_then(|v| v.parse().ok())
            .ok_or(format!("{what} takes a number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--all" => policies = CachePolicy::ALL.to_vec(),
            "--hindsight" => hindsight = true,
            "--warmup" => warm = num(args.next(), "--warmup")?,
            "--ops" => ops = num(args.next(), "--ops")?,
            "--decay" => decay = num(args.next(), "--decay")?,
            r => ratios.push(r.parse::<f64>().map_err(|_| format!("not a ratio: {r}"))?),
        }
    }
    if ratios.is_empty() {
        ratios = vec![0.01, 0.05, 0.2, 0.5];
    }
    let chooser = KeyChooser::new(Distribution::Zipf(0.99), KEYS);
    let key_p = chooser.key_probabilities();
    let kn_ids: Vec<u16> = (0..KNS).collect();
    let map = SlotMap::consistent(1, &kn_ids, DEFAULT_VNODES);
    let mut key = vec![0u8; KEY_SIZE];
    let shard_of_key: Vec<usize> = (0..KEYS)
        .map(|id| {
            key_into(id, &mut key);
            let slot = dinomo_shared::slot::key_slot(&key);
            map.owner(slot) as usize * SHARDS as usize + shard_of(slot, SHARDS as usize)
        })
        .collect();
    let d = DacConfig::default();
    let (vc, sc) = (d.value_charge(KEY_SIZE, VALUE_SIZE), d.shortcut_bytes());
    println!(
        "charges: value {vc} B, shortcut {sc} B; warm-up {warm} ops, measured {ops} ops, \
         counts halved every {decay} accesses of a shard"
    );
    for &ratio in &ratios {
        let data = KEYS * (KEY_SIZE + VALUE_SIZE) as u64;
        let budget = (data as f64 * ratio / f64::from(KNS)) as u64 / u64::from(SHARDS);
        let o = per_shard_oracle(
            &key_p,
            KEY_SIZE,
            &map,
            KNS,
            SHARDS,
            (vc, sc, budget),
            MISS_RTS,
        );
        if hindsight {
            let h = learnable_bound(
                &chooser,
                &key_p,
                &shard_of_key,
                warm + ops,
                (vc, sc, budget),
            );
            println!(
                "ratio {ratio:<5} {:<13} {h:.4} RTs/read  oracle {:.4}  x{:.3}",
                "learnable",
                o.rts_per_read,
                h / o.rts_per_read
            );
        }
        for &policy in &policies {
            let (got, caches) = replay(policy, budget, &chooser, &shard_of_key, warm, ops, decay);
            let (mut v, mut s, mut pr, mut de, mut ev) = (0, 0, 0, 0, 0);
            let mut used = 0;
            for c in &caches {
                let st = c.stats();
                used += st.value_bytes + st.shortcut_bytes + st.history_bytes;
                (v, s) = (v + st.values, s + st.shortcuts);
                (pr, de, ev) = (pr + st.promotions, de + st.demotions, ev + st.evictions);
            }
            println!(
                "ratio {ratio:<5} {policy:<13} {got:.4} RTs/read  oracle {:.4} ({}v+{}s)  x{:.3}  \
                 cached {v}v+{s}s ({:.1}% of the budget)  promotions {pr} demotions {de} \
                 evictions {ev}",
                o.rts_per_read,
                o.values,
                o.shortcuts,
                got / o.rts_per_read,
                100.0 * used as f64 / (budget * u64::from(KNS * SHARDS)) as f64
            );
        }
    }
    Ok(())
}

/// Loads every key (as the bench does), then replays `warm + ops` reads; mean RTs per
/// measured read, and the caches.
fn replay(
    policy: CachePolicy,
    budget: u64,
    chooser: &KeyChooser,
    shard_of_key: &[usize],
    warm: u64,
    ops: u64,
    decay_every: u64,
) -> (f64, Vec<DacCache>) {
    let mut caches: Vec<DacCache> = (0..KNS * SHARDS)
        .map(|_| {
            DacCache::new(DacConfig {
                budget_bytes: budget,
                policy,
                decay_every,
                ..DacConfig::default()
            })
        })
        .collect();
    let (mut key, mut val) = (vec![0u8; KEY_SIZE], vec![0u8; VALUE_SIZE]);
    for id in 0..KEYS {
        key_into(id, &mut key);
        value_into(id, 0, &mut val);
        caches[shard_of_key[id as usize]].on_write(&key, &val, EntryRef(id * 2048));
    }
    let mut rng = Rng::new(1);
    let mut rts = 0.0;
    for i in 0..warm + ops {
        let id = chooser.next(&mut rng);
        key_into(id, &mut key);
        let c = &mut caches[shard_of_key[id as usize]];
        let (cost, shortcut) = match c.get(&key) {
            Lookup::Value(_) => (0.0, None),
            Lookup::Shortcut(_) => (1.0, Some(true)),
            Lookup::Miss => (MISS_RTS, Some(false)),
        };
        if let Some(was_shortcut) = shortcut {
            value_into(id, 0, &mut val);
            c.on_fetch(&key, &val, EntryRef(id * 2048), was_shortcut);
        }
        if i >= warm {
            rts += cost;
        }
    }
    (rts / ops as f64, caches)
}

/// The best static split per shard chosen from the counts of `draws` draws of the
/// chooser (ties broken by key id), scored against the exact popularity `key_p`.
fn learnable_bound(
    chooser: &KeyChooser,
    key_p: &[f64],
    shard_of_key: &[usize],
    draws: u64,
    (vc, sc, budget): (u64, u64, u64),
) -> f64 {
    let mut counts = vec![0u64; key_p.len()];
    let mut rng = Rng::new(1);
    for _ in 0..draws {
        counts[chooser.next(&mut rng) as usize] += 1;
    }
    let mut total = 0.0;
    for shard in 0..(KNS * SHARDS) as usize {
        let mut ids: Vec<usize> = (0..key_p.len())
            .filter(|&i| shard_of_key[i] == shard)
            .collect();
        ids.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
        let seen: Vec<f64> = ids
            .iter()
            .map(|&i| counts[i] as f64 / draws as f64)
            .collect();
        let o = oracle(&seen, vc, sc, budget, MISS_RTS);
        for (rank, &i) in ids.iter().enumerate() {
            let rank = rank as u64;
            let rts = if rank < o.values {
                0.0
            } else if rank < o.values + o.shortcuts {
                1.0
            } else {
                MISS_RTS
            };
            total += rts * key_p[i];
        }
    }
    total
}
