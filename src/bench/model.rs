//! The throughput model behind `modeled.throughput_ops` (documented in docs/MODEL.md).
//!
//! A deployment's throughput is the least of independent ceilings, each computed from the
//! measured per-operation costs and the parameters of a NIC profile:
//!
//! * memory-node NIC message rate / one-sided verbs per op;
//! * memory-node NIC bandwidth / bytes per op (both directions share one figure, as in
//!   [`dinomo_hw::fabric::nic::modeled_ops_per_sec`]);
//! * KN round-trip latency: each KN worker thread waits for its round trips one after the
//!   other, so `kns × threads × 1 / (RTs per op × RT latency)`;
//! * the metadata server (Clover only): its capacity in requests/s / MS requests per op.
//!   Capacity = the least of [`MS_WORKERS`] threads each spending the measured CPU time per
//!   request, and the MS NIC's message rate over two messages (request and reply);
//! * KN CPU: `kns × kn_cores × 1 s / (Σ_path fraction_path × ns_path)`, with the KN CPU
//!   time per operation by path measured on this machine ([`super::kn_cpu`]).

use dinomo_hw::fabric::nic::{modeled_ops_per_sec, NicProfile};
use serde::Serialize;

/// Worker threads of Clover's metadata server in the DINOMO paper's setup ("6 threads (4
/// workers, 1 epoch thread, 1 GC thread)").
pub const MS_WORKERS: f64 = 4.0;

/// KN CPU time per operation by path, in ns (measured by [`super::kn_cpu::calibrate`]).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct PathNs {
    /// A read served from a cached value (or from the KN's own unmerged write).
    pub value_hit: f64,
    /// A read through a cached shortcut (one READ of the entry).
    pub shortcut_hit: f64,
    /// A read that found nothing cached (index walk at the memory node).
    pub miss: f64,
    /// A write (update or insert), its share of the group commit included.
    pub write: f64,
}

/// Fractions of a run's operations by path (they add up to 1 for a run of reads and
/// writes).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct PathMix {
    pub value_hit: f64,
    pub shortcut_hit: f64,
    pub miss: f64,
    pub write: f64,
}

impl PathNs {
    /// KN CPU per operation of a run with this mix, in ns.
    pub fn per_op(&self, m: &PathMix) -> f64 {
        m.value_hit * self.value_hit
            + m.shortcut_hit * self.shortcut_hit
            + m.miss * self.miss
            + m.write * self.write
    }
}

/// KN CPU ceiling in ops/s: `kns × kn_cores` cores, each spending `ns_per_op` per operation.
pub fn kn_cpu_ceiling(kns: u16, kn_cores: u16, ns_per_op: f64) -> f64 {
    if ns_per_op > 0.0 {
        kns as f64 * kn_cores as f64 * 1e9 / ns_per_op
    } else {
        f64::INFINITY
    }
}

/// The measured costs of a run, and the deployment to model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelInput {
    pub nic: NicProfile,
    pub kns: u16,
    /// Worker threads per KN, each waiting for its round trips one after another.
    pub threads_per_kn: u16,
    /// Cores per KN for the KN CPU ceiling.
    pub kn_cores: u16,
    /// KN CPU per operation by path (`None`: no KN CPU term).
    pub kn_cpu: Option<PathNs>,
    /// The run's operations by path.
    pub mix: PathMix,
    /// One-sided verbs per op at the memory node.
    pub verbs_per_op: f64,
    /// Bytes per op at the memory node.
    pub bytes_per_op: f64,
    /// Round trips per op, metadata-server requests included.
    pub rts_per_op: f64,
    pub ms_requests_per_op: f64,
    /// Measured MS CPU time per request, in µs (`None`: no MS, or nothing measured).
    pub ms_us_per_request: Option<f64>,
}

/// Every ceiling, in ops/s (`None`: does not limit).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Bounds {
    pub dpm_msg_rate: Option<f64>,
    pub dpm_bandwidth: Option<f64>,
    pub kn_latency: Option<f64>,
    pub metadata_server: Option<f64>,
    /// The metadata server's capacity in requests/s, when there is one.
    pub ms_capacity_rps: Option<f64>,
    /// KN CPU: `kns × kn_cores × 1e9 / kn_cpu_ns_per_op`.
    pub kn_cpu: Option<f64>,
    /// KN CPU per operation at this run's mix of paths, in ns.
    pub kn_cpu_ns_per_op: Option<f64>,
}

fn finite(x: f64) -> Option<f64> {
    (x.is_finite() && x > 0.0).then_some(x)
}

/// Capacity of a metadata server in requests/s: [`MS_WORKERS`] threads at the measured CPU
/// time per request, or its NIC at two messages per request, whichever is less.
pub fn ms_capacity(nic: NicProfile, us_per_request: f64) -> f64 {
    let cpu = if us_per_request > 0.0 {
        MS_WORKERS * 1e6 / us_per_request
    } else {
        f64::INFINITY
    };
    let net = nic.params().msg_rate_mops * 1e6 / 2.0;
    cpu.min(net)
}

/// The modelled throughput, what limits it, and every ceiling.
pub fn model(i: &ModelInput) -> (f64, &'static str, Bounds) {
    let p = i.nic.params();
    let (rate, bw) = (
        modeled_ops_per_sec(i.nic, i.verbs_per_op, 0.0).0,
        modeled_ops_per_sec(i.nic, 0.0, i.bytes_per_op).0,
    );
    let lat = if i.rts_per_op > 0.0 && p.round_trip_ns > 0 {
        i.kns as f64 * i.threads_per_kn as f64 * 1e9 / (i.rts_per_op * p.round_trip_ns as f64)
    } else {
        f64::INFINITY
    };
    let cap = i.ms_us_per_request.map(|us| ms_capacity(i.nic, us));
    let ms = match cap {
        Some(c) if i.ms_requests_per_op > 0.0 => c / i.ms_requests_per_op,
        _ => f64::INFINITY,
    };
    let cpu_ns = i.kn_cpu.map(|ns| ns.per_op(&i.mix));
    let cpu = cpu_ns.map_or(f64::INFINITY, |ns| kn_cpu_ceiling(i.kns, i.kn_cores, ns));
    let bounds = Bounds {
        dpm_msg_rate: finite(rate),
        dpm_bandwidth: finite(bw),
        kn_latency: finite(lat),
        metadata_server: finite(ms),
        ms_capacity_rps: cap.and_then(finite),
        kn_cpu: finite(cpu),
        kn_cpu_ns_per_op: cpu_ns.and_then(finite),
    };
    let mut best = (f64::INFINITY, "unbounded");
    for (v, name) in [
        (rate, "NIC message rate"),
        (bw, "NIC bandwidth"),
        (lat, "KN round-trip latency"),
        (ms, "metadata server"),
        (cpu, "KN CPU"),
    ] {
        if v < best.0 {
            best = (v, name);
        }
    }
    (best.0, best.1, bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> ModelInput {
        ModelInput {
            nic: NicProfile::Cx3Fdr,
            kns: 4,
            threads_per_kn: 2,
            verbs_per_op: 1.0,
            bytes_per_op: 1000.0,
            rts_per_op: 1.0,
            ms_requests_per_op: 0.0,
            ms_us_per_request: None,
            kn_cores: 2,
            kn_cpu: None,
            mix: PathMix::default(),
        }
    }

    /// 2 us per value hit, 3 us per shortcut hit, 5 us per miss, 8 us per write.
    const NS: PathNs = PathNs {
        value_hit: 2000.0,
        shortcut_hit: 3000.0,
        miss: 5000.0,
        write: 8000.0,
    };

    #[test]
    fn bandwidth_bound_by_hand() {
        // 54.3 Gb/s = 6.7875e9 B/s over 1000 B/op = 6.7875 Mops; message rate 35 Mops;
        // latency 4 x 2 / 1.8 us = 4.444 Mops: latency limits.
        let (t, why, b) = model(&input());
        assert_eq!(why, "KN round-trip latency");
        assert!((t - 8.0 / 1.8e-6).abs() < 1.0, "{t}");
        assert!((b.dpm_bandwidth.expect("bw") - 6.7875e6).abs() < 1.0);
        assert!((b.dpm_msg_rate.expect("rate") - 35e6).abs() < 1.0);
        // 16 KNs: latency allows 17.8 Mops, bandwidth 6.79 Mops.
        let (t, why, _) = model(&ModelInput { kns: 16, ..input() });
        assert_eq!(why, "NIC bandwidth");
        assert!((t - 6.7875e6).abs() < 1.0, "{t}");
    }

    #[test]
    fn message_rate_bound_by_hand() {
        // 4 verbs and 64 B per op on ConnectX-6: 200 Mops / 4 = 50 Mops; bandwidth 25e9 /
        // 64 = 390 Mops; latency 64 x 8 / (0.1 x 1.1 us) = 4654 Mops.
        let (t, why, _) = model(&ModelInput {
            nic: NicProfile::Cx6,
            kns: 64,
            threads_per_kn: 8,
            verbs_per_op: 4.0,
            bytes_per_op: 64.0,
            rts_per_op: 0.1,
            ..input()
        });
        assert_eq!(why, "NIC message rate");
        assert!((t - 50e6).abs() < 1.0, "{t}");
    }

    #[test]
    fn metadata_server_bound_by_hand() {
        // 2 us of MS CPU per request: 4 workers serve 2 Mrps (the NIC allows 17.5 M). At 0.5
        // MS requests per op the MS allows 4 Mops, below bandwidth (6.79 M) and latency.
        let (t, why, b) = model(&ModelInput {
            kns: 16,
            threads_per_kn: 8,
            rts_per_op: 1.5,
            ms_requests_per_op: 0.5,
            ms_us_per_request: Some(2.0),
            ..input()
        });
        assert_eq!(why, "metadata server");
        assert!((t - 4e6).abs() < 1.0, "{t}");
        assert!((b.ms_capacity_rps.expect("cap") - 2e6).abs() < 1.0);
        // A fast MS is limited by its NIC: 35 M messages/s = 17.5 M requests/s.
        assert!((ms_capacity(NicProfile::Cx3Fdr, 0.01) - 17.5e6).abs() < 1.0);
    }

    #[test]
    fn kn_cpu_bound_by_hand() {
        // Read-mostly mix: 90% value hits, 4% shortcut hits, 1% misses, 5% writes:
        // 0.9 x 2000 + 0.04 x 3000 + 0.01 x 5000 + 0.05 x 8000 = 2370 ns per op.
        let mix = PathMix {
            value_hit: 0.9,
            shortcut_hit: 0.04,
            miss: 0.01,
            write: 0.05,
        };
        assert!((NS.per_op(&mix) - 2370.0).abs() < 1e-9);
        // 16 KNs x 8 cores / 2370 ns = 54.0 Mops, below bandwidth at 61 B/op (111.3 Mops)
        // and latency (16 x 8 / (0.1 x 1.8 us) = 711 Mops).
        let i = ModelInput {
            kns: 16,
            threads_per_kn: 8,
            kn_cores: 8,
            bytes_per_op: 61.0,
            verbs_per_op: 0.16,
            rts_per_op: 0.1,
            kn_cpu: Some(NS),
            mix,
            ..input()
        };
        let (t, why, b) = model(&i);
        assert_eq!(why, "KN CPU");
        assert!((t - 128e9 / 2370.0).abs() < 1.0, "{t}");
        assert!((b.kn_cpu_ns_per_op.expect("ns") - 2370.0).abs() < 1e-9);
        assert!((b.dpm_bandwidth.expect("bw") - 6.7875e9 / 61.0).abs() < 1.0);
        // Without the term the link binds, as before.
        let (t, why, b) = model(&ModelInput { kn_cpu: None, ..i });
        assert_eq!(why, "NIC bandwidth");
        assert!((t - 6.7875e9 / 61.0).abs() < 1.0, "{t}");
        assert_eq!(b.kn_cpu, None);
        // 1 KN x 1 core at 1000 B/op: CPU allows 1 / 2370 ns = 422 kops, below latency
        // (1 / (1 x 1.8 us) = 556 kops).
        let (t, why, _) = model(&ModelInput {
            kns: 1,
            threads_per_kn: 1,
            kn_cores: 1,
            rts_per_op: 1.0,
            kn_cpu: Some(NS),
            mix,
            ..input()
        });
        assert_eq!(why, "KN CPU");
        assert!((t - 1e9 / 2370.0).abs() < 1e-3, "{t}");
    }

    #[test]
    fn kn_cpu_of_an_all_write_mix_and_of_nothing() {
        // Write-only: 16 x 8 cores / 8 us = 16 Mops.
        let w = PathMix {
            write: 1.0,
            ..PathMix::default()
        };
        assert!((kn_cpu_ceiling(16, 8, NS.per_op(&w)) - 16e6).abs() < 1e-6);
        // No measured cost: no ceiling.
        assert!(kn_cpu_ceiling(16, 8, 0.0).is_infinite());
    }

    #[test]
    fn no_profile_is_unbounded() {
        let (t, why, b) = model(&ModelInput {
            nic: NicProfile::None,
            ..input()
        });
        assert!(t.is_infinite());
        assert_eq!(why, "unbounded");
        assert_eq!(b, Bounds::default());
    }
}
