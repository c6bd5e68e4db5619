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

    /// The exact probability of each rank `0..n` as [`Self::next`] draws them (its inverse
    /// CDF, with `u` uniform in [0, 1)), not the ideal Zipf law `1/i^θ/ζ(n,θ)` it
    /// approximates: rank 0 gets `u·ζn < 1`, rank 1 `1 ≤ u·ζn < 1 + 0.5^θ`, and every `u`
    /// above that the rank `floor(n·(η·u − η + 1)^α)` clamped to `n − 1`, which is rank 0 or
    /// 1 just above the threshold (a base below 0 would give NaN, which casts to rank 0) and
    /// rank `n − 1` at the top. The ranks are in generator order, not sorted.
    pub fn rank_probabilities(&self) -> Vec<f64> {
        let n = self.n as usize;
        if n <= 1 {
            return vec![1.0; n];
        }
        let mut p = vec![0.0; n];
        // The first two branches.
        let first = 1.0 / self.zetan;
        let second = self.half_pow_theta / self.zetan;
        p[0] = first.min(1.0);
        p[1] = (second.min(1.0) - p[0]).max(0.0);
        // The formula branch covers u in [second, 1).
        let lo = second.min(1.0);
        if lo >= 1.0 {
            return p;
        }
        if !(self.eta > 0.0 && self.eta.is_finite()) {
            // The base is 1 for every u: n·1 = n, clamped to n − 1.
            p[n - 1] += 1.0 - lo;
            return p;
        }
        // Rank r of the formula is u in [b(r), b(r + 1)), where n·base^α = r solves to
        // u = 1 − (1 − (r/n)^(1−θ)) / η; below b(1) (down to −∞, via NaN) it is rank 0, and
        // from b(n − 1) up (u = 1 and beyond, via the clamp) it is rank n − 1.
        let one_minus_theta = 1.0 - self.theta;
        let bound = |r: usize| -> f64 {
            if r == 0 {
                f64::NEG_INFINITY
            } else if r >= n {
                f64::INFINITY
            } else {
                1.0 - (1.0 - (r as f64 / n as f64).powf(one_minus_theta)) / self.eta
            }
        };
        let mut start = bound(0);
        for (r, pr) in p.iter_mut().enumerate() {
            let end = bound(r + 1);
            let (a, b) = (start.max(lo), end.min(1.0));
            if b > a {
                *pr += b - a;
            }
            start = end;
        }
        p
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
    /// The probability that [`Self::next`] draws each key, indexed by key id: uniform, or
    /// the generator's exact rank probabilities ([`Zipfian::rank_probabilities`]) summed
    /// over the ranks that scrambling (`fnv64(rank) % n`) maps onto each key. Scrambling
    /// folds several ranks onto some keys and none onto others, so some keys are never drawn.
    pub fn key_probabilities(&self) -> Vec<f64> {
        match self {
            Self::Uniform(n) => vec![1.0 / *n as f64; *n as usize],
            Self::Zipf { n, z } => {
                let mut p = vec![0.0; *n as usize];
                for (rank, pr) in z.rank_probabilities().into_iter().enumerate() {
                    p[(fnv64(rank as u64) % n) as usize] += pr;
                }
                p
            }
        }
    }

    /// Access probability of each key, most popular first (for the oracle).
    pub fn popularity(&self) -> Vec<f64> {
        let mut p = self.key_probabilities();
        p.sort_unstable_by(|a, b| b.total_cmp(a));
        p
    }
}

/// How the hot set of a moving workload (`dinomo bench --shift OPS`) moves from one phase
/// to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShiftKind {
    /// A hotspot that jumps: in phase `p` the chooser's key id `k` is read as
    /// `(k + p·stride) mod n`, the same popularity on other keys. The default stride puts
    /// the keys drawing half of all accesses on keys that were not among them in any
    /// earlier phase ([`jump_stride`]).
    Jump,
    /// YCSB's "latest": popularity by recency, the newest key the hottest (Zipfian ranks,
    /// unscrambled, counted back from the newest key id), and the newest point advancing by
    /// a number of keys every phase, so the hot set slides and partly overlaps the last.
    Latest,
}

impl ShiftKind {
    pub const ALL: [Self; 2] = [Self::Jump, Self::Latest];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Jump => "jump",
            Self::Latest => "latest",
        }
    }
}

impl fmt::Display for ShiftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ShiftKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| format!("unknown shift kind {s:?}; expected one of: jump, latest"))
    }
}

/// `(a·b) mod n` without overflow.
fn mul_mod(a: u64, b: u64, n: u64) -> u64 {
    ((a as u128 * b as u128) % n as u128) as u64
}

/// A key chooser whose hot set moves: phase `p` draws keys with the popularity of phase 0
/// moved as [`ShiftKind`] says. The phase is the caller's (a global count of operations).
#[derive(Clone, Debug)]
pub enum ShiftedChooser {
    Jump {
        base: KeyChooser,
        n: u64,
        stride: u64,
    },
    Latest {
        z: Zipfian,
        n: u64,
        advance: u64,
    },
}

impl ShiftedChooser {
    /// `step` is the jump's stride or the latest point's advance per phase (default: see
    /// [`jump_stride`]; for latest, 1% of the keys). `phases` is how many phases the run
    /// has, which the default stride keeps apart. "latest" needs a Zipfian popularity.
    pub fn new(
        dist: Distribution,
        n: u64,
        kind: ShiftKind,
        step: Option<u64>,
        phases: u64,
    ) -> Result<Self, String> {
        if n == 0 {
            return Err("a moving workload needs at least one key".into());
        }
        Ok(match kind {
            ShiftKind::Jump => {
                let base = KeyChooser::new(dist, n);
                let stride = match step {
                    Some(s) => s % n,
                    None => jump_stride(&base.key_probabilities(), phases),
                };
                Self::Jump { base, n, stride }
            }
            ShiftKind::Latest => {
                let Distribution::Zipf(theta) = dist else {
                    return Err("--shift-kind latest needs --dist zipf".into());
                };
                Self::Latest {
                    z: Zipfian::new(n, theta),
                    n,
                    advance: step.unwrap_or(n / 100).max(1) % n,
                }
            }
        })
    }

    pub fn kind(&self) -> ShiftKind {
        match self {
            Self::Jump { .. } => ShiftKind::Jump,
            Self::Latest { .. } => ShiftKind::Latest,
        }
    }

    /// The stride (jump) or advance (latest) per phase, in keys.
    pub fn step(&self) -> u64 {
        match self {
            Self::Jump { stride, .. } => *stride,
            Self::Latest { advance, .. } => *advance,
        }
    }

    /// The key id the latest point of phase `phase` is (latest), or the offset of the
    /// phase (jump).
    fn origin(&self, phase: u64) -> u64 {
        match self {
            Self::Jump { n, stride, .. } => mul_mod(phase, *stride, *n),
            Self::Latest { n, advance, .. } => (n - 1 + mul_mod(phase, *advance, *n)) % n,
        }
    }

    /// A key id in `0..n` drawn with the popularity of phase `phase`.
    pub fn next(&self, rng: &mut Rng, phase: u64) -> u64 {
        let o = self.origin(phase);
        match self {
            Self::Jump { base, n, .. } => (base.next(rng) % n + o) % n,
            Self::Latest { z, n, .. } => (o + n - z.next(rng) % n) % n,
        }
    }

    /// The probability that [`Self::next`] draws each key in phase `phase`, by key id:
    /// phase 0's ([`KeyChooser::key_probabilities`] for jump, the exact rank probabilities
    /// counted back from the newest key for latest) moved to that phase's keys.
    pub fn key_probabilities(&self, phase: u64) -> Vec<f64> {
        let o = self.origin(phase);
        match self {
            Self::Jump { base, n, .. } => {
                let p = base.key_probabilities();
                let mut out = vec![0.0; *n as usize];
                for (k, q) in p.into_iter().enumerate() {
                    out[((k as u64 + o) % n) as usize] = q;
                }
                out
            }
            Self::Latest { z, n, .. } => {
                let mut out = vec![0.0; *n as usize];
                for (r, q) in z.rank_probabilities().into_iter().enumerate() {
                    out[((o + n - r as u64) % n) as usize] += q;
                }
                out
            }
        }
    }
}

/// The default stride of a jumping hotspot over `key_p.len()` keys and `phases` phases:
/// near the golden section of the key space (so that the phases' offsets spread evenly),
/// the first of 256 candidates under which the hot set (the most popular keys that draw
/// half of all accesses, at most 4096) meets none of its own images in later phases, or,
/// if none does, the one meeting the fewest.
pub fn jump_stride(key_p: &[f64], phases: u64) -> u64 {
    let n = key_p.len() as u64;
    if n <= 1 {
        return 0;
    }
    let mut order: Vec<usize> = (0..key_p.len()).collect();
    order.sort_unstable_by(|&a, &b| key_p[b].total_cmp(&key_p[a]));
    let mut hot = vec![false; key_p.len()];
    let mut hot_ids = Vec::new();
    let mut mass = 0.0;
    for &k in order.iter().take(4096) {
        if mass >= 0.5 {
            break;
        }
        hot[k] = true;
        hot_ids.push(k as u64);
        mass += key_p[k];
    }
    let first = ((n as f64 * 0.381_966_011_250_105) as u64).max(1);
    let mut best = (usize::MAX, first);
    for j in 0..256u64 {
        let s = (first + j) % n;
        if s == 0 {
            continue;
        }
        let mut meets = 0;
        for d in 1..phases.max(1) {
            let off = mul_mod(d, s, n);
            meets += hot_ids
                .iter()
                .filter(|&&k| hot[((k + off) % n) as usize])
                .count();
        }
        if meets < best.0 {
            best = (meets, s);
        }
        if meets == 0 {
            break;
        }
    }
    best.1
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
        let p = z.rank_probabilities();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let mut rng = Rng::new(42);
        let mut counts = vec![0u64; 1000];
        let n = 400_000;
        for _ in 0..n {
            counts[z.next(&mut rng) as usize] += 1;
        }
        // Every rank: the empirical frequency within 5 standard errors of the exact one.
        for (r, &c) in counts.iter().enumerate() {
            let f = c as f64 / n as f64;
            let se = (p[r] * (1.0 - p[r]) / n as f64).sqrt();
            assert!(
                (f - p[r]).abs() <= 5.0 * se + 1.0 / n as f64,
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
    fn exact_probabilities_sum_to_one() {
        for (n, theta) in [
            (1, 0.99),
            (2, 0.99),
            (3, 0.5),
            (10, 0.2),
            (1000, 0.99),
            (100_000, 0.99),
            (100_000, 0.5),
        ] {
            let z = Zipfian::new(n, theta);
            let r = z.rank_probabilities();
            assert_eq!(r.len(), n as usize);
            assert!(r.iter().all(|&x| x >= 0.0), "n {n} θ {theta}");
            let sum: f64 = r.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "ranks, n {n} θ {theta}: {sum}");
            // The first two branches are the ideal law's first two ranks; the formula
            // branch adds to them only where it yields ranks 0 and 1 itself.
            assert!(r[0] >= 1.0 / z.zetan - 1e-15, "n {n} θ {theta}");
            for dist in [Distribution::Zipf(theta), Distribution::Uniform] {
                let k = KeyChooser::new(dist, n);
                let p = k.key_probabilities();
                assert_eq!(p.len(), n as usize);
                let sum: f64 = p.iter().sum();
                assert!((sum - 1.0).abs() < 1e-9, "{dist:?}, n {n}: {sum}");
                let sorted = k.popularity();
                assert!(sorted.windows(2).all(|w| w[0] >= w[1]));
                assert!((sorted.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            }
        }
    }

    /// The per-key popularity the oracle uses against 5 M draws of the bench's own chooser.
    #[test]
    fn scrambled_popularity_matches_the_generator() {
        let n = 10_000u64;
        let k = KeyChooser::new(Distribution::Zipf(0.99), n);
        let p = k.key_probabilities();
        let draws = 5_000_000u64;
        let mut counts = vec![0u64; n as usize];
        let mut rng = Rng::new(0x5EED);
        for _ in 0..draws {
            counts[k.next(&mut rng) as usize] += 1;
        }
        let nf = draws as f64;
        // The 100 most popular keys, each within 5 standard errors of its binomial count.
        let mut by_p: Vec<usize> = (0..n as usize).collect();
        by_p.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]));
        for &i in &by_p[..100] {
            let f = counts[i] as f64 / nf;
            let se = (p[i] * (1.0 - p[i]) / nf).sqrt();
            assert!(
                (f - p[i]).abs() <= 5.0 * se,
                "key {i}: {f} vs {} (se {se})",
                p[i]
            );
        }
        // Total variation distance. E|X/N − p| ≤ sqrt(p(1−p)/N) for a binomial X, so the
        // expected distance is at most half the sum of those (about 0.8 of it for large Np);
        // its spread over 10 000 nearly independent terms is some 1% of it.
        let tv: f64 = counts
            .iter()
            .zip(&p)
            .map(|(&c, &q)| (c as f64 / nf - q).abs())
            .sum::<f64>()
            / 2.0;
        let bound: f64 = p.iter().map(|&q| (q * (1.0 - q) / nf).sqrt()).sum::<f64>() / 2.0;
        assert!(tv <= bound, "total variation {tv} > {bound}");
        eprintln!("total variation {tv}, bound {bound}");
        // The ideal law put on the same keys fails that check (about 0.019 against a bound
        // of 0.013, where the exact law lands near 0.010).
        let z = Zipfian::new(n, 0.99);
        let mut ideal = vec![0.0; n as usize];
        for r in 0..n {
            ideal[(fnv64(r) % n) as usize] += 1.0 / ((r + 1) as f64).powf(0.99) / z.zetan;
        }
        let tv_ideal: f64 = counts
            .iter()
            .zip(&ideal)
            .map(|(&c, &q)| (c as f64 / nf - q).abs())
            .sum::<f64>()
            / 2.0;
        assert!(
            tv_ideal > bound,
            "ideal law: {tv_ideal} vs {bound}, exact {tv}"
        );
        // A key of probability 0 is never drawn; the others are missed as often as
        // (1 − p)^N says (the count of missed keys is a sum of nearly independent
        // indicators: its variance is at most Σ q(1 − q)).
        for (i, (&c, &q)) in counts.iter().zip(&p).enumerate() {
            assert!(q > 0.0 || c == 0, "key {i} has probability 0 but was drawn");
        }
        let zero = p.iter().filter(|&&q| q == 0.0).count() as f64;
        let miss: Vec<f64> = p
            .iter()
            .filter(|&&q| q > 0.0)
            .map(|&q| (1.0 - q).powf(nf))
            .collect();
        let expect = zero + miss.iter().sum::<f64>();
        let sd = miss.iter().map(|q| q * (1.0 - q)).sum::<f64>().sqrt();
        let never = counts.iter().filter(|&&c| c == 0).count() as f64;
        assert!(
            (never - expect).abs() <= 5.0 * sd + 1.0,
            "never drawn {never}, expected {expect} (sd {sd})"
        );
        assert!(
            zero > 0.2 * n as f64,
            "scrambling leaves keys without a rank: {zero}"
        );
    }

    /// Every phase of a moving chooser has phase 0's popularity on other keys: exactly
    /// (jump: key k's probability at k + p·stride; latest: rank r's at newest − r), and as
    /// the chooser draws them in that phase (200 000 draws a phase, the 50 hottest keys each
    /// within 5 standard errors, total variation within its bound; phase 0's popularity is
    /// far outside it).
    #[test]
    fn shifted_popularity_is_the_moved_one_and_the_draws_follow_it() {
        let n = 2_000u64;
        let dist = Distribution::Zipf(0.99);
        let base = KeyChooser::new(dist, n).key_probabilities();
        let ranks = Zipfian::new(n, 0.99).rank_probabilities();
        for kind in ShiftKind::ALL {
            let ch = ShiftedChooser::new(dist, n, kind, None, 3).expect("chooser");
            assert_eq!(ch.kind(), kind);
            let step = ch.step();
            assert!(step > 0 && step < n, "{kind}: {step}");
            let p0 = ch.key_probabilities(0);
            for phase in 0..3u64 {
                let p = ch.key_probabilities(phase);
                assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
                match kind {
                    ShiftKind::Jump => {
                        for k in 0..n {
                            assert_eq!(p[((k + phase * step) % n) as usize], base[k as usize]);
                        }
                    }
                    ShiftKind::Latest => {
                        let newest = (n - 1 + phase * step) % n;
                        for r in 0..n {
                            assert_eq!(p[((newest + n - r) % n) as usize], ranks[r as usize]);
                        }
                    }
                }
                if phase == 0 {
                    continue;
                }
                let draws = 200_000u64;
                let mut counts = vec![0u64; n as usize];
                let mut rng = Rng::new(0x5EED ^ phase);
                for _ in 0..draws {
                    counts[ch.next(&mut rng, phase) as usize] += 1;
                }
                let nf = draws as f64;
                let mut by_p: Vec<usize> = (0..n as usize).collect();
                by_p.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]));
                for &i in &by_p[..50] {
                    let f = counts[i] as f64 / nf;
                    let se = (p[i] * (1.0 - p[i]) / nf).sqrt();
                    assert!(
                        (f - p[i]).abs() <= 5.0 * se,
                        "{kind} phase {phase} key {i}: {f} vs {}",
                        p[i]
                    );
                }
                let tv = |q: &[f64]| -> f64 {
                    counts
                        .iter()
                        .zip(q)
                        .map(|(&c, &x)| (c as f64 / nf - x).abs())
                        .sum::<f64>()
                        / 2.0
                };
                let bound: f64 = p.iter().map(|&q| (q * (1.0 - q) / nf).sqrt()).sum::<f64>() / 2.0;
                assert!(
                    tv(&p) <= bound,
                    "{kind} phase {phase}: {} > {bound}",
                    tv(&p)
                );
                assert!(
                    tv(&p0) > 0.3,
                    "{kind} phase {phase} did not move: {}",
                    tv(&p0)
                );
            }
        }
        // The hottest key of latest is the newest; of jump, phase 0's hottest moved.
        let l = ShiftedChooser::new(dist, n, ShiftKind::Latest, Some(7), 3).expect("chooser");
        let top = |p: Vec<f64>| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b]));
        assert_eq!(top(l.key_probabilities(0)), Some(n as usize - 1));
        assert_eq!(top(l.key_probabilities(2)), Some(13));
        let u = ShiftedChooser::new(Distribution::Uniform, n, ShiftKind::Latest, None, 2);
        assert!(u.is_err(), "latest needs a Zipfian popularity");
        assert_eq!("latest".parse::<ShiftKind>(), Ok(ShiftKind::Latest));
        assert!("sideways".parse::<ShiftKind>().is_err());
    }

    /// The default stride moves the keys that draw half of the accesses onto keys outside
    /// that set in every other phase of the run.
    #[test]
    fn the_default_jump_stride_lands_the_hot_keys_on_other_keys() {
        for (n, phases) in [(10_000u64, 4u64), (100_000, 5)] {
            let ch =
                ShiftedChooser::new(Distribution::Zipf(0.99), n, ShiftKind::Jump, None, phases)
                    .expect("chooser");
            let hot_of = |phase: u64| -> std::collections::HashSet<usize> {
                let p = ch.key_probabilities(phase);
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]));
                let mut mass = 0.0;
                order
                    .into_iter()
                    .take_while(|&k| {
                        let before = mass;
                        mass += p[k];
                        before < 0.5
                    })
                    .collect()
            };
            let hot: Vec<_> = (0..phases).map(hot_of).collect();
            assert!(hot[0].len() > 10, "{}", hot[0].len());
            for a in 0..phases as usize {
                for b in a + 1..phases as usize {
                    assert_eq!(
                        hot[a].intersection(&hot[b]).count(),
                        0,
                        "n {n}: phases {a} and {b} share hot keys (stride {})",
                        ch.step()
                    );
                }
            }
        }
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
