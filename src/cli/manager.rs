//! `dinomo manager`: the cluster manager process (the manager lives in `dinomo_manager`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use dinomo::size::parse_size;
use dinomo_manager::policy::{Policy, PolicyConfig};
use dinomo_manager::{KnSpawner, ManagerConfig, ProcessSpawner, SpawnConfig};

use super::fabric::DpmArgs;
use super::secret::SecretArgs;
use super::{at_least_one, install_stop_handler, ready, Usage, STOP};

#[derive(Args, Debug)]
pub(crate) struct ManagerArgs {
    #[command(flatten)]
    dpm: DpmArgs,
    #[command(flatten)]
    secret: SecretArgs,
    /// Address KNs and `dinomo ctl` reach the manager at (line-delimited JSON).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: std::net::SocketAddr,
    /// Lease length in milliseconds; a KN that has not renewed it for this long is fenced.
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// Virtual nodes per KN on the hash ring.
    #[arg(long, default_value_t = dinomo_shared::ownership::DEFAULT_VNODES, value_parser = at_least_one::<u32>)]
    vnodes: u32,
    /// The `dinomo` executable to start new KNs with (`dinomo ctl add-kn`, the policy);
    /// without it the manager cannot start KNs. `dinomo up` passes it.
    #[arg(long)]
    kn_exe: Option<PathBuf>,
    /// Host KNs started by the manager listen on (any free port).
    #[arg(long, default_value = "127.0.0.1")]
    kn_host: String,
    /// Shards of KNs started by the manager.
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<u16>)]
    kn_threads: u16,
    /// Threads accepting connections in KNs started by the manager.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    kn_io_threads: usize,
    /// Cache of KNs started by the manager, e.g. 64M.
    #[arg(long, default_value = "64M")]
    kn_cache: String,
    /// Password file of the default Redis user on KNs started by the manager
    /// (`dinomo kn --requirepass-file`).
    #[arg(long)]
    kn_requirepass_file: Option<PathBuf>,
    /// ACL file of KNs started by the manager (`dinomo kn --acl-file`).
    #[arg(long)]
    kn_acl_file: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The elasticity policy in the manager (off unless --policy); unset thresholds take the
/// policy's defaults.
#[derive(Args, Debug)]
pub(crate) struct PolicyArgs {
    /// Run the elasticity policy: add a KN when p99 misses the objective and a KN is busy,
    /// remove the least occupied KN when all are idle (needs --kn-exe to add), replicate
    /// keys hotter than --hot-sigmas on every KN and return them once they cooled down.
    #[arg(long)]
    policy: bool,
    /// Decision period in milliseconds [default: 2000].
    #[arg(long, requires = "policy")]
    policy_period_ms: Option<u64>,
    /// Latency objective (p99) in milliseconds [default: 16].
    #[arg(long, requires = "policy")]
    slo_p99_ms: Option<f64>,
    /// Occupancy (0..1) above which a KN counts as busy [default: 0.20].
    #[arg(long, requires = "policy")]
    busy_add: Option<f64>,
    /// Occupancy (0..1) below which a KN counts as idle [default: 0.15].
    #[arg(long, requires = "policy")]
    idle_remove: Option<f64>,
    /// Hot-key threshold in standard deviations above the mean [default: 3].
    #[arg(long, requires = "policy")]
    hot_sigmas: Option<f64>,
    /// Cold-key threshold in standard deviations below the mean [default: 1].
    #[arg(long, requires = "policy")]
    cold_sigmas: Option<f64>,
    /// Never remove below this many KNs [default: 1].
    #[arg(long, requires = "policy")]
    min_kns: Option<usize>,
    /// Never add beyond this many KNs [default: 16].
    #[arg(long, requires = "policy")]
    max_kns: Option<usize>,
    /// Quiet time after an add or remove, in milliseconds [default: one period].
    #[arg(long, requires = "policy")]
    cooldown_ms: Option<u64>,
}

impl PolicyArgs {
    /// The policy's configuration, or `None` when --policy is off.
    fn config(&self) -> Result<Option<PolicyConfig>, Usage> {
        if !self.policy {
            return Ok(None);
        }
        let mut c = PolicyConfig::default();
        if let Some(v) = self.policy_period_ms {
            if v == 0 {
                return Err(Usage("--policy-period-ms must be above 0".into()));
            }
            c.period = Duration::from_millis(v);
            c.cooldown = c.period;
        }
        if let Some(v) = self.slo_p99_ms {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Usage(format!("--slo-p99-ms {v} is not a duration")));
            }
            c.slo_p99 = Duration::from_secs_f64(v / 1e3);
        }
        for (name, v, dst) in [
            ("--busy-add", self.busy_add, &mut c.busy_add),
            ("--idle-remove", self.idle_remove, &mut c.idle_remove),
        ] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    return Err(Usage(format!("{name} {v} is outside 0..=1")));
                }
                *dst = v;
            }
        }
        for (name, v, dst) in [
            ("--hot-sigmas", self.hot_sigmas, &mut c.hot_sigmas),
            ("--cold-sigmas", self.cold_sigmas, &mut c.cold_sigmas),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Usage(format!("{name} {v} must be a number >= 0")));
                }
                *dst = v;
            }
        }
        if let Some(v) = self.min_kns {
            c.min_kns = v.max(1);
        }
        if let Some(v) = self.max_kns {
            c.max_kns = v;
        }
        if c.min_kns > c.max_kns {
            return Err(Usage(format!(
                "--min-kns {} is above --max-kns {}",
                c.min_kns, c.max_kns
            )));
        }
        if let Some(v) = self.cooldown_ms {
            c.cooldown = Duration::from_millis(v);
        }
        Ok(Some(c))
    }
}

pub(crate) fn run(a: ManagerArgs) -> anyhow::Result<()> {
    if a.lease_ms < 100 {
        return Err(Usage(format!("--lease-ms {} is below 100", a.lease_ms)).into());
    }
    if a.kn_threads == 0 || a.kn_threads > 64 {
        return Err(Usage(format!("--kn-threads {} is outside 1..=64", a.kn_threads)).into());
    }
    parse_size(&a.kn_cache).map_err(|e| Usage(format!("--kn-cache: {e}")))?;
    let policy = a.policy.config()?;
    let secret = a.secret.load_for(
        "manager",
        &[
            ("--listen", a.listen.to_string()),
            ("--kn-host", format!("{}:0", a.kn_host)),
        ],
    )?;
    let spec = a.dpm.spec()?.with_secret(secret.clone());
    install_stop_handler()?;
    let spawner = match a.kn_exe {
        Some(exe) => {
            let dpm_args = spec
                .to_args()
                .ok_or_else(|| Usage(format!("KNs cannot be started for the DPM {spec}")))?;
            let s: Arc<dyn KnSpawner> = Arc::new(ProcessSpawner::new(SpawnConfig {
                exe,
                dpm_args,
                host: a.kn_host,
                threads: a.kn_threads,
                io_threads: a.kn_io_threads,
                cache: a.kn_cache,
                kn_args: [
                    ("--secret-file", &a.secret.secret_file),
                    ("--requirepass-file", &a.kn_requirepass_file),
                    ("--acl-file", &a.kn_acl_file),
                ]
                .into_iter()
                .filter_map(|(flag, p)| p.as_ref().map(|p| (flag, p)))
                .flat_map(|(flag, p)| [flag.to_string(), p.display().to_string()])
                .collect(),
            }));
            Some(s)
        }
        None => None,
    };
    let cfg = ManagerConfig {
        lease: Duration::from_millis(a.lease_ms),
        vnodes: a.vnodes,
    };
    let service = dinomo_manager::start(
        &spec,
        cfg,
        a.listen,
        Duration::from_secs(30),
        spawner.clone(),
        secret,
    )?;
    if let Some(p) = policy {
        tracing::info!(config = ?p, "elasticity policy on");
        service.manager().set_policy(Box::new(Policy::new(p)));
    }
    ready(&format!("manager listening on {}", service.addr()));
    service.serve(&STOP)?;
    if let Some(s) = spawner {
        s.stop_all(Duration::from_secs(20));
    }
    Ok(())
}
