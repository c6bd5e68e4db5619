//! The KN-side DAC cache: `get` on a value hit, a shortcut hit and a miss; a shortcut hit
//! whose promotion test refuses; inserts of fresh keys under eviction pressure; and the two
//! promotions (into free room, and paid for by evicting least-used shortcuts). 8-byte keys,
//! 1 KiB values, default charges (a value 1096 B, a shortcut 64 B).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use host_kn::dac::{CachePolicy, DacCache, DacConfig, EntryRef, Lookup};

const KEYS: u64 = 10_000;
const VALUE: [u8; 1024] = [0x5A; 1024];

fn key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn eref(i: u64) -> EntryRef {
    EntryRef(i * 2048)
}

fn cache(policy: CachePolicy, budget_bytes: u64) -> DacCache {
    DacCache::new(DacConfig {
        budget_bytes,
        policy,
        ..DacConfig::default()
    })
}

/// A cache holding keys `0..KEYS`, all as values or all as shortcuts.
fn filled(policy: CachePolicy) -> DacCache {
    let mut c = cache(policy, 64 << 20);
    for i in 0..KEYS {
        c.on_write(&key(i), &VALUE, eref(i));
    }
    c
}

fn gets(c: &mut Criterion) {
    let mut values = filled(CachePolicy::ValueOnly);
    let mut i = 0;
    c.bench_function("dac/get/value_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            matches!(values.get(black_box(&key(i))), Lookup::Value(_))
        })
    });
    let mut shortcuts = filled(CachePolicy::ShortcutOnly);
    c.bench_function("dac/get/shortcut_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            matches!(shortcuts.get(black_box(&key(i))), Lookup::Shortcut(_))
        })
    });
    c.bench_function("dac/get/miss", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            matches!(shortcuts.get(black_box(&key(KEYS + i))), Lookup::Miss)
        })
    });
    // DAC with every key a shortcut and no room: each hit runs a refused promotion test.
    let mut dac = cache(CachePolicy::Dac, KEYS * 16);
    for k in 0..KEYS {
        dac.on_write(&key(k), &VALUE, eref(k));
    }
    c.bench_function("dac/shortcut_hit_refused_promotion", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            let k = key(i);
            if let Lookup::Shortcut(r) = dac.get(black_box(&k)) {
                dac.on_fetch(&k, &VALUE, r, true);
            }
        })
    });
}

fn writes(c: &mut Criterion) {
    // 1% of 10k keys' data: every insert of a fresh key evicts or demotes.
    let budget = KEYS * (8 + 1024) / 100;
    for policy in CachePolicy::ALL {
        let mut cache = cache(policy, budget);
        let mut next = 0u64;
        for _ in 0..KEYS {
            next += 1;
            cache.on_write(&key(next), &VALUE, eref(next));
        }
        c.bench_function(&format!("dac/on_write_insert_full/{policy}"), |b| {
            b.iter(|| {
                next += 1;
                cache.on_write(black_box(&key(next)), &VALUE, eref(next));
            })
        });
    }
}

/// One shortcut (cached from a value too large for the budget) and room for its new value.
fn shortcut_with_room() -> DacCache {
    let mut c = cache(CachePolicy::Dac, 4096);
    c.on_write(&key(1), &[0u8; 5000], eref(1));
    c
}

/// Shortcuts a 1 KiB value's promotion evicts when cold shortcuts fill the budget.
fn evicted_per_promotion() -> u64 {
    let d = DacConfig::default();
    (d.value_charge(8, VALUE.len()) - d.shortcut_bytes()).div_ceil(d.shortcut_bytes())
}

/// 1000 cold shortcuts fill the budget; key 0 is hot enough to pay for evicting the
/// [`evicted_per_promotion`] it takes to become a value.
fn shortcuts_full() -> DacCache {
    let mut c = cache(
        CachePolicy::Dac,
        1000 * DacConfig::default().shortcut_bytes(),
    );
    for k in 0..1000 {
        // Too large to be a value in this budget: every key is a shortcut.
        c.on_write(&key(k), &[0u8; 100_000], eref(k));
    }
    for _ in 0..200 {
        c.get(&key(0));
    }
    c
}

fn promotions(c: &mut Criterion) {
    // The benchmarks below must measure promotions, not refusals.
    let mut once = shortcut_with_room();
    once.on_fetch(&key(1), &VALUE, eref(1), true);
    assert_eq!(once.stats().promotions, 1);
    let mut once = shortcuts_full();
    once.on_fetch(&key(0), &VALUE, eref(0), true);
    let evicted = evicted_per_promotion();
    assert_eq!(
        (once.stats().promotions, once.stats().evictions),
        (1, evicted)
    );

    c.bench_function("dac/promote/into_room", |b| {
        b.iter_batched_ref(
            shortcut_with_room,
            |c| c.on_fetch(black_box(&key(1)), &VALUE, eref(1), true),
            BatchSize::SmallInput,
        )
    });
    c.bench_function(&format!("dac/promote/evicting_{evicted}_shortcuts"), |b| {
        b.iter_batched_ref(
            shortcuts_full,
            |c| c.on_fetch(black_box(&key(0)), &VALUE, eref(0), true),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, gets, writes, promotions);
criterion_main!(benches);
