//! YCSB-style workloads: key choice (uniform or scrambled Zipfian, as in YCSB's
//! `ScrambledZipfianGenerator`), operation mix, and deterministic keys and values.

use std::fmt;
use std::str::FromStr;

/// The operation mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// 100% reads.
    ReadOnly,
    /// 95% reads, 5% updates.
    ReadMostly,
    /// 50% reads, 50% updates.
    WriteHeavy,
    /// 50% reads of existing keys, 50% inserts of new keys.
    InsertHeavy,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Self::ReadOnly,
        Self::ReadMostly,
        Self::WriteHeavy,
        Self::InsertHeavy,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::ReadOnly => "read-only",
            Self::ReadMostly => "read-mostly",
            Self::WriteHeavy => "write-heavy",
            Self::InsertHeavy => "insert-heavy",
        }
    }

    /// Fraction of operations that are reads.
    pub const fn read_fraction(self) -> f64 {
        match self {
            Self::ReadOnly => 1.0,
            Self::ReadMostly => 0.95,
            Self::WriteHeavy | Self::InsertHeavy => 0.5,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|w| w.name()).collect();
                format!(
                    "unknown workload {s:?}; expected one of: {}",
                    names.join(", ")
                )
            })
    }
}

/// Key popularity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    Uniform,
    /// YCSB scrambled Zipfian with this skew (0 < theta < 1; YCSB's default is 0.99).
    Zipf(f64),
}

/// SplitMix64: small, fast, and good enough to drive a benchmark.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// YCSB's Zipfian generator over ranks `0..n` (rank 0 the most popular), after Gray et
/// al., "Quickly generating billion-record synthetic databases" (SIGMOD 1994).
#[derive(Clone, Debug)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    half_pow_theta: f64,
}

/// ζ(n, θ) = Σ_{i=1..n} 1 / i^θ.
pub fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipfian {
    pub fn new(n: u64, theta: f64) -> Self {
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Self {
            n,
            theta,
            alpha,
            zetan,
            eta,
            half_pow_theta: 1.0 + 0.5f64.powf(theta),
        }
    }

    /// A rank in `0..n`.
    pub fn next(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < self.half_pow_theta {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }

    /// Probability of each rank, most popular first (for the oracle).
    pub fn popularity(&self) -> Vec<f64> {
        (1..=self.n)
            .map(|i| 1.0 / (i as f64).powf(self.theta) / self.zetan)
            .collect()
    }
}

/// FNV-1a 64 of a u64, as YCSB uses to scramble Zipfian ranks over the key space.
pub fn fnv64(v: u64) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in v.to_le_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Picks key ids in `0..n`.
#[derive(Clone, Debug)]
pub enum KeyChooser {
    Uniform(u64),
    Zipf { n: u64, z: Zipfian },
}

impl KeyChooser {
    pub fn new(dist: Distribution, n: u64) -> Self {
        match dist {
            Distribution::Uniform => Self::Uniform(n),
            Distribution::Zipf(theta) => Self::Zipf {
                n,
                z: Zipfian::new(n, theta),
            },
        }
    }
    pub fn next(&self, rng: &mut Rng) -> u64 {
        match self {
            Self::Uniform(n) => rng.below(*n),
            Self::Zipf { n, z } => fnv64(z.next(rng)) % n,
        }
    }
    /// Access probability of each key, most popular first.
    pub fn popularity(&self) -> Vec<f64> {
        match self {
            Self::Uniform(n) => vec![1.0 / *n as f64; *n as usize],
            Self::Zipf { z, .. } => z.popularity(),
        }
    }
}

/// Writes key `id` into `out` (exactly `out.len()` bytes): lowercase hex, zero-padded on
/// the left. `false` if `id` needs more digits than there are bytes.
pub fn key_into(id: u64, out: &mut [u8]) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = id;
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 15) as usize];
        v >>= 4;
    }
    v == 0
}

/// Hex digits needed for ids below `n`.
pub fn key_digits(n: u64) -> usize {
    (64 - n.saturating_sub(1).leading_zeros() as usize)
        .div_ceil(4)
        .max(1)
}

/// Fills `out` with the value of `id` at `version`: cheap, deterministic, and different for
/// every (id, version), so a reader can tell versions apart.
pub fn value_into(id: u64, version: u64, out: &mut [u8]) {
    let mut x =
        id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        let e = "scan-heavy".parse::<Workload>().expect_err("unknown");
        assert!(e.contains("read-only"), "{e}");
    }

    #[test]
    fn zipfian_matches_its_distribution() {
        let z = Zipfian::new(1000, 0.99);
        let p = z.popularity();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let mut rng = Rng::new(42);
        let mut counts = vec![0u64; 1000];
        let n = 400_000;
        for _ in 0..n {
            counts[z.next(&mut rng) as usize] += 1;
        }
        // The head of the distribution: empirical frequencies close to the analytical ones.
        for (r, &c) in counts.iter().enumerate().take(10) {
            let f = c as f64 / n as f64;
            assert!(
                (f - p[r]).abs() < 0.15 * p[r] + 0.002,
                "rank {r}: {f} vs {}",
                p[r]
            );
        }
        // Ranks are monotonically less popular in aggregate.
        let head: u64 = counts[..10].iter().sum();
        let tail: u64 = counts[990..].iter().sum();
        assert!(head > 20 * tail.max(1));
    }

    #[test]
    fn scrambling_spreads_hot_keys_and_uniform_is_flat() {
        let k = KeyChooser::new(Distribution::Zipf(0.99), 10_000);
        let mut rng = Rng::new(7);
        let mut hot = std::collections::HashMap::new();
        for _ in 0..50_000 {
            *hot.entry(k.next(&mut rng)).or_insert(0u32) += 1;
        }
        let mut top: Vec<_> = hot.into_iter().collect();
        top.sort_by_key(|t| std::cmp::Reverse(t.1));
        assert!(
            top[0].0 != 0 || top[1].0 != 1,
            "hot keys are scrambled, not the lowest ids"
        );
        let u = KeyChooser::new(Distribution::Uniform, 10);
        let mut c = [0u32; 10];
        for _ in 0..100_000 {
            c[u.next(&mut rng) as usize] += 1;
        }
        assert!(c.iter().all(|&x| (9_000..11_000).contains(&x)), "{c:?}");
    }

    #[test]
    fn keys_and_values_are_deterministic() {
        let mut k = [0u8; 8];
        assert!(key_into(0xBEEF, &mut k));
        assert_eq!(&k, b"0000beef");
        assert!(!key_into(1 << 32, &mut k));
        assert_eq!(key_digits(1), 1);
        assert_eq!(key_digits(16), 1);
        assert_eq!(key_digits(17), 2);
        assert_eq!(key_digits(1 << 32), 8);
        let (mut a, mut b) = ([0u8; 100], [0u8; 100]);
        value_into(3, 1, &mut a);
        value_into(3, 1, &mut b);
        assert_eq!(a, b);
        value_into(3, 2, &mut b);
        assert_ne!(a, b);
    }
}
