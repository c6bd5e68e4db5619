//! A NIC latency and throughput model, so the shared-memory fabric can stand in for a
//! network: completions are held back until the modelled time, and benchmarks can turn
//! measured verbs and bytes per operation into a modelled throughput.
//!
//! The model is deliberately simple and deterministic. One link per connection carries
//! verbs one after the other: each occupies it for the longer of its serialization time
//! (bytes at the link rate) and the NIC's per-message time (the inverse of its message rate).
//! A verb completes one round-trip latency after it leaves the link. Given the time a batch
//! is posted and the time the link becomes free, every completion time follows; nothing
//! depends on the wall clock except through the injected [`Clock`].

use core::fmt;
use core::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A NIC (or memory link) to model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NicProfile {
    /// No model: completions are ready when posted.
    #[default]
    None,
    /// Mellanox ConnectX-3 FDR InfiniBand, 56 Gb/s: the DINOMO paper's testbed.
    Cx3Fdr,
    /// NVIDIA/Mellanox ConnectX-6, 200 Gb/s HDR.
    Cx6,
    /// Memory attached over CXL.mem (a PCIe 5.0 x16 link): loads and stores, no NIC.
    Cxl,
}

/// The parameters of a profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NicParams {
    /// Name as parsed and printed.
    pub name: &'static str,
    /// Round trip of a small one-sided verb, in ns.
    pub round_trip_ns: u64,
    /// Link data rate in Gb/s (which is bits per ns); infinite for [`NicProfile::None`].
    pub link_gbps: f64,
    /// Verbs per second the NIC serves, in millions; infinite for [`NicProfile::None`].
    pub msg_rate_mops: f64,
}

/// No model.
const NONE: NicParams = NicParams {
    name: "none",
    round_trip_ns: 0,
    link_gbps: f64::INFINITY,
    msg_rate_mops: f64::INFINITY,
};

/// ConnectX-3 FDR.
///
/// - Round trip: small RDMA READs take about 1.6–2 µs on ConnectX-3 (Kalia et al., "Using
///   RDMA Efficiently for Key-Value Services", SIGCOMM 2014; Dragojević et al., "FaRM",
///   NSDI 2014); we take 1.8 µs.
/// - Link: FDR 4x signals 4 × 14.0625 Gb/s with 64b/66b coding: 54.3 Gb/s of data.
/// - Message rate: tens of millions of small verbs per second per NIC; about 35 Mops for
///   inbound READs (Kalia et al., "Design Guidelines for High Performance RDMA Systems",
///   USENIX ATC 2016).
const CX3_FDR: NicParams = NicParams {
    name: "cx3-fdr",
    round_trip_ns: 1_800,
    link_gbps: 54.3,
    msg_rate_mops: 35.0,
};

/// ConnectX-6.
///
/// - Round trip: about 1–1.2 µs for a small READ through one switch (the product brief
///   quotes sub-0.6 µs one way); we take 1.1 µs.
/// - Link: 200 Gb/s HDR.
/// - Message rate: the product brief quotes up to 215 million messages/s; we take 200.
const CX6: NicParams = NicParams {
    name: "cx6",
    round_trip_ns: 1_100,
    link_gbps: 200.0,
    msg_rate_mops: 200.0,
};

/// CXL.mem.
///
/// - Round trip: a load from a CXL memory expander costs roughly 2–3× local DRAM, a few
///   hundred ns (Sun et al., "Demystifying CXL Memory with Genuine CXL-Ready Systems and
///   Devices", MICRO 2023; Li et al., "Pond", ASPLOS 2023); we take 400 ns.
/// - Link: PCIe 5.0 x16, 32 GT/s × 16 lanes ≈ 64 GB/s per direction = 512 Gb/s.
/// - Message rate: no NIC; 64-byte lines at the link rate give 1000 M accesses/s.
const CXL: NicParams = NicParams {
    name: "cxl",
    round_trip_ns: 400,
    link_gbps: 512.0,
    msg_rate_mops: 1_000.0,
};

impl NicProfile {
    /// Every profile, in order of the names in error messages.
    pub const ALL: [Self; 4] = [Self::None, Self::Cx3Fdr, Self::Cx6, Self::Cxl];

    /// The profile's parameters.
    pub const fn params(self) -> &'static NicParams {
        match self {
            Self::None => &NONE,
            Self::Cx3Fdr => &CX3_FDR,
            Self::Cx6 => &CX6,
            Self::Cxl => &CXL,
        }
    }

    /// The name as parsed and printed.
    pub const fn name(self) -> &'static str {
        self.params().name
    }
}

impl fmt::Display for NicProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A NIC profile name that is not known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown NIC profile `{0}`; valid profiles: none, cx3-fdr, cx6, cxl")]
pub struct UnknownNicProfile(pub String);

impl FromStr for NicProfile {
    type Err = UnknownNicProfile;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(t))
            .ok_or_else(|| UnknownNicProfile(s.to_owned()))
    }
}

/// The throughput a profile allows for operations that each need `verbs_per_op` verbs and
/// move `bytes_per_op` bytes at the DPM NIC, and which of the two limits it.
///
/// Returns `(f64::INFINITY, "unbounded")` when neither limits (profile `none`, or nothing
/// per operation).
pub fn modeled_ops_per_sec(
    profile: NicProfile,
    verbs_per_op: f64,
    bytes_per_op: f64,
) -> (f64, &'static str) {
    let p = profile.params();
    let by_rate = if verbs_per_op > 0.0 {
        p.msg_rate_mops * 1e6 / verbs_per_op
    } else {
        f64::INFINITY
    };
    let by_bw = if bytes_per_op > 0.0 {
        p.link_gbps * 1e9 / 8.0 / bytes_per_op
    } else {
        f64::INFINITY
    };
    if by_rate.is_infinite() && by_bw.is_infinite() {
        (f64::INFINITY, "unbounded")
    } else if by_rate <= by_bw {
        (by_rate, "NIC message rate")
    } else {
        (by_bw, "NIC bandwidth")
    }
}

/// A source of time for the model, in ns from an arbitrary origin.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_ns(&self) -> u64;
}

/// The real monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    ns: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ns: u64) -> Arc<Self> {
        Arc::new(Self {
            ns: AtomicU64::new(start_ns),
        })
    }
    pub fn set(&self, ns: u64) {
        self.ns.store(ns, Ordering::Release);
    }
    pub fn advance(&self, ns: u64) {
        self.ns.fetch_add(ns, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::Acquire)
    }
}

/// Completion times for the verbs of one connection.
#[derive(Clone, Debug)]
pub struct NicModel {
    profile: NicProfile,
    clock: Arc<dyn Clock>,
    /// When the link finishes carrying the last verb scheduled.
    link_free_at: u64,
}

impl NicModel {
    /// A model on the real clock.
    pub fn new(profile: NicProfile) -> Self {
        Self::with_clock(profile, Arc::new(MonotonicClock::new()))
    }

    /// A model on a given clock.
    pub fn with_clock(profile: NicProfile, clock: Arc<dyn Clock>) -> Self {
        Self {
            profile,
            clock,
            link_free_at: 0,
        }
    }

    pub fn profile(&self) -> NicProfile {
        self.profile
    }

    pub fn params(&self) -> &'static NicParams {
        self.profile.params()
    }

    /// Whether completions are ready as soon as posted (no clock reads needed).
    pub fn is_instant(&self) -> bool {
        self.profile == NicProfile::None
    }

    /// The model's current time.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// How long a verb moving `bytes` occupies the link, in ns.
    pub fn occupancy_ns(&self, bytes: u64) -> u64 {
        let p = self.params();
        let serialize = bytes as f64 * 8.0 / p.link_gbps;
        let per_message = 1e3 / p.msg_rate_mops;
        serialize.max(per_message).ceil() as u64
    }

    /// Schedules a verb moving `bytes`, posted at `now`: it starts when the link is free,
    /// occupies it, and completes one round trip after leaving it. Returns the ready time.
    pub fn schedule(&mut self, now: u64, bytes: u64) -> u64 {
        if self.is_instant() {
            return now;
        }
        let start = now.max(self.link_free_at);
        self.link_free_at = start.saturating_add(self.occupancy_ns(bytes));
        self.link_free_at
            .saturating_add(self.params().round_trip_ns)
    }

    /// Schedules a batch posted now: `ready[i]` is the ready time of a verb moving
    /// `bytes[i]`. Ready times never decrease along the batch (or across batches).
    pub fn schedule_batch(&mut self, bytes: &[u64], ready: &mut [u64]) {
        let now = if self.is_instant() { 0 } else { self.now_ns() };
        for (b, r) in bytes.iter().zip(ready.iter_mut()) {
            *r = self.schedule(now, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_valid_names() {
        for p in NicProfile::ALL {
            assert_eq!(p.to_string().parse::<NicProfile>(), Ok(p));
        }
        assert_eq!("CX3-FDR".parse::<NicProfile>(), Ok(NicProfile::Cx3Fdr));
        let e = "cx5".parse::<NicProfile>().expect_err("unknown");
        let msg = e.to_string();
        for name in ["none", "cx3-fdr", "cx6", "cxl", "cx5"] {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn schedule_is_latency_plus_serialization() {
        let clock = ManualClock::new(1_000);
        let mut m = NicModel::with_clock(NicProfile::Cx3Fdr, clock.clone());
        let mut ready = [0u64; 2];
        // Two 1 MiB WRITEs posted together: the second waits for the first on the link.
        let mib = 1u64 << 20;
        m.schedule_batch(&[mib, mib], &mut ready);
        let ser = m.occupancy_ns(mib);
        assert_eq!(ser, (mib as f64 * 8.0 / 54.3).ceil() as u64);
        assert!(ser > 150_000, "1 MiB at 54.3 Gb/s takes over 150 µs: {ser}");
        assert_eq!(ready[0], 1_000 + ser + 1_800);
        assert_eq!(ready[1], 1_000 + 2 * ser + 1_800);
        // A small verb posted later, once the link is idle, sees only its own costs.
        clock.set(ready[1] + 10_000);
        let now = clock.now_ns();
        m.schedule_batch(&[8], &mut ready[..1]);
        assert_eq!(ready[0], now + m.occupancy_ns(8) + 1_800);
        // Small verbs are limited by the message rate: 1000 / 35 ns each.
        assert_eq!(m.occupancy_ns(8), 29);
    }

    #[test]
    fn none_is_instant() {
        let mut m = NicModel::with_clock(NicProfile::None, ManualClock::new(5));
        let mut ready = [9u64; 3];
        m.schedule_batch(&[1 << 30, 8, 0], &mut ready);
        assert_eq!(ready, [0, 0, 0]);
        assert_eq!(m.occupancy_ns(1 << 30), 0);
    }

    #[test]
    fn modeled_throughput_names_the_bottleneck() {
        let (ops, why) = modeled_ops_per_sec(NicProfile::Cx3Fdr, 2.0, 64.0);
        assert_eq!(why, "NIC message rate");
        assert!((ops - 17.5e6).abs() < 1.0);
        let (ops, why) = modeled_ops_per_sec(NicProfile::Cx3Fdr, 1.0, 4096.0);
        assert_eq!(why, "NIC bandwidth");
        assert!((ops - 54.3e9 / 8.0 / 4096.0).abs() < 1.0);
        assert_eq!(
            modeled_ops_per_sec(NicProfile::None, 3.0, 100.0),
            (f64::INFINITY, "unbounded")
        );
        assert_eq!(
            modeled_ops_per_sec(NicProfile::Cx6, 0.0, 0.0).1,
            "unbounded"
        );
    }
}
