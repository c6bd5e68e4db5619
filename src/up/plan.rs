//! `dinomo up --plan`: the commands that start a cluster whose roles run on several hosts
//! (the `[hosts]` table of the TOML file), one block per host, in the order they must be
//! started, with the files every host needs and the ports to open between them.
//!
//! `up` itself supervises processes on one host only; across hosts each role is started
//! on its own host (by hand, by a service manager, by an orchestration tool) with exactly
//! the words `up` would have used, so both ways configure the cluster the same way.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use dinomo_hw::fabric::FabricKind;

use super::{UpConfig, UpError};

/// RoCE v2 runs over this UDP port (IANA); the NICs of the DPM and of every host that
/// reaches it over verbs (KNs, the manager) exchange it.
pub const ROCE_V2_UDP_PORT: u16 = 4791;

/// The plan of `cfg`: a shell script that reads as a checklist (every line a command or a
/// comment). Without `[hosts]` every role is on `cfg.host`.
pub fn plan(cfg: &UpConfig) -> Result<String, UpError> {
    cfg.validate_settings()?;
    let exe = cfg
        .hosts
        .as_ref()
        .and_then(|h| h.exe.clone())
        .unwrap_or_else(|| "dinomo".into());
    let spec = cfg.serve_spec()?;
    let verbs = spec.kind() == FabricKind::Verbs;
    let dpm_host = cfg.hosts.as_ref().map_or(&*cfg.host, |h| &*h.dpm);
    let mgr_host = cfg.hosts.as_ref().map_or(&*cfg.host, |h| &*h.manager);
    let spread = cfg.hosts.is_some();
    let dir = cfg.dir.display();

    let mut dpm_serve = cfg.dpm_args()?;
    // A dedicated memory node pins its merge workers to cores.
    dpm_serve.retain(|w| w != "--no-pin");
    let mut manager = cfg.manager_args()?;
    if spread {
        // The manager can start KNs only on its own host; across hosts, a KN is added by
        // starting `dinomo kn` on its host (it registers and the manager gives it slots).
        for flag in ["--kn-exe", "--kn-host", "--kn-requirepass-file"] {
            drop_flag(&mut manager, flag);
        }
    } else {
        set_flag(&mut manager, "--kn-exe", &exe);
    }

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# DINOMO: a DPM, a manager and {} KNs over {} ({}).",
        cfg.kns,
        if verbs { "RDMA verbs" } else { "shm" },
        if spread {
            "each role on the host named in [hosts]"
        } else {
            "all on this host"
        }
    );
    if cfg.auth {
        let _ = writeln!(
            w,
            "#\n# Every host needs the folder {dir} (mode 0700, owned by the user that runs \
             dinomo)\n# holding the cluster secret {} (every role), and KN hosts also the \
             Redis password\n# {} (both mode 0600). They were made here; copy them, e.g.:",
            cfg.secret_path().display(),
            cfg.requirepass_path().display()
        );
        for host in distinct_hosts(cfg) {
            let _ = writeln!(
                w,
                "#   ssh {host} 'mkdir -p -m 700 {dir}' && scp -p {} {} {host}:{dir}/",
                cfg.secret_path().display(),
                cfg.requirepass_path().display()
            );
        }
    } else {
        let _ = writeln!(
            w,
            "#\n# No authentication (auth = false): every address is loopback."
        );
    }
    let _ = writeln!(w, "#\n# Ports to open (TCP unless said):");
    if verbs {
        let _ = writeln!(
            w,
            "#   {dpm_host}:{} on the DPM host, from the manager and KN hosts (verbs connection \
             exchange)",
            spec_port(cfg)?
        );
        let _ = writeln!(
            w,
            "#   UDP {ROCE_V2_UDP_PORT} (RoCE v2) between the DPM host and the manager and KN \
             hosts, on the RDMA network"
        );
    }
    let _ = writeln!(
        w,
        "#   {mgr_host}:{} on the manager host, from KN hosts and operators (`dinomo ctl`)",
        cfg.manager_port
    );
    let _ = writeln!(
        w,
        "#   {} on the KN hosts, from Redis clients",
        (0..cfg.kns)
            .map(|i| cfg.kn_addr(i))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let _ = writeln!(
        w,
        "\n## on {dpm_host} (the DPM; first). Format once: a formatted region is recovered, \
         never formatted again."
    );
    let mut format = cfg.format_args();
    drop_switch(&mut format, "--force");
    let _ = writeln!(w, "{}", command(&exe, &format));
    let _ = writeln!(w, "{}", command(&exe, &dpm_serve));
    let _ = writeln!(
        w,
        "\n## on {mgr_host} (the manager; once the DPM says it serves)"
    );
    let _ = writeln!(w, "{}", command(&exe, &manager));
    for i in 0..cfg.kns {
        let host = cfg.hosts.as_ref().map_or(&*cfg.host, |h| h.kn(i));
        let _ = writeln!(w, "\n## on {host} (KN {i})");
        let _ = writeln!(w, "{}", command(&exe, &cfg.kn_args(i)?));
    }
    let _ = writeln!(
        w,
        "\n# Check: `{exe} ctl status --manager {} --secret-file {}` lists {} KNs,\n# and \
         `redis-cli -c -h {} -p {} --askpass` (the password above) answers PING.",
        cfg.manager_addr(),
        cfg.secret_path().display(),
        cfg.kns,
        cfg.kn_addr(0)
            .rsplit_once(':')
            .map_or("127.0.0.1", |(h, _)| h),
        cfg.base_port
    );
    Ok(out)
}

fn spec_port(cfg: &UpConfig) -> Result<u16, UpError> {
    match cfg.serve_spec()? {
        dinomo_hw::fabric::ServeSpec::Verbs { listen, .. } => Ok(listen.port()),
        _ => Ok(0),
    }
}

/// The hosts of the plan, each once, in the order the roles start.
fn distinct_hosts(cfg: &UpConfig) -> Vec<String> {
    let mut seen = BTreeMap::new();
    let mut order = Vec::new();
    let hosts: Vec<String> = match &cfg.hosts {
        Some(h) => [h.dpm.clone(), h.manager.clone()]
            .into_iter()
            .chain(h.kns.iter().cloned())
            .collect(),
        None => vec![cfg.host.clone()],
    };
    for h in hosts {
        if seen.insert(h.clone(), ()).is_none() {
            order.push(h);
        }
    }
    order
}

/// Removes `flag` and the word after it.
fn drop_flag(args: &mut Vec<String>, flag: &str) {
    if let Some(at) = args.iter().position(|w| w == flag) {
        args.drain(at..(at + 2).min(args.len()));
    }
}

/// Removes a flag that takes no value.
fn drop_switch(args: &mut Vec<String>, flag: &str) {
    args.retain(|w| w != flag);
}

/// Sets the value after `flag`.
fn set_flag(args: &mut [String], flag: &str, value: &str) {
    if let Some(at) = args.iter().position(|w| w == flag) {
        if let Some(v) = args.get_mut(at + 1) {
            *v = value.to_owned();
        }
    }
}

/// `exe args...` as one shell line, each word quoted when it needs to be.
fn command(exe: &str, args: &[String]) -> String {
    std::iter::once(exe)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+%".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::Hosts;

    fn spread() -> UpConfig {
        UpConfig {
            kns: 3,
            dir: "/srv/dinomo".into(),
            fabric: "verbs".into(),
            device: Some("mlx5_0".into()),
            hosts: Some(Hosts {
                dpm: "10.0.0.5".into(),
                manager: "10.0.0.7".into(),
                kns: vec!["10.0.0.6".into(), "10.0.0.8".into()],
                exe: Some("/usr/local/bin/dinomo".into()),
            }),
            ..UpConfig::default()
        }
    }

    /// The command line of the block headed `## on HOST (ROLE...`.
    fn block<'a>(plan: &'a str, head: &str) -> Vec<&'a str> {
        let start = plan.find(head).unwrap_or_else(|| panic!("{head}:\n{plan}"));
        plan[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect()
    }

    #[test]
    fn each_role_binds_and_dials_the_addresses_of_its_hosts() {
        let cfg = spread();
        let p = plan(&cfg).expect("plan");
        let dpm = block(&p, "## on 10.0.0.5 (the DPM");
        assert!(dpm[0].starts_with("/usr/local/bin/dinomo dpm format --path /srv/dinomo/region"));
        assert!(
            !dpm[0].contains("--force"),
            "a plan never reformats: {}",
            dpm[0]
        );
        assert!(dpm[1].contains("dpm serve"), "{}", dpm[1]);
        assert!(dpm[1].contains("--listen 10.0.0.5:18515"), "{}", dpm[1]);
        assert!(dpm[1].contains("--secret-file /srv/dinomo/secret"));
        assert!(!dpm[1].contains("--no-pin"));
        let mgr = block(&p, "## on 10.0.0.7 (the manager")[0];
        assert!(mgr.contains("--dpm 10.0.0.5:18515"), "{mgr}");
        assert!(mgr.contains("--listen 10.0.0.7:7000"), "{mgr}");
        assert!(
            !mgr.contains("--kn-exe"),
            "it cannot start KNs on other hosts: {mgr}"
        );
        // KN i on kns[i % 2], port base + i.
        for (i, host) in [(0, "10.0.0.6"), (1, "10.0.0.8"), (2, "10.0.0.6")] {
            let kn = block(&p, &format!("## on {host} (KN {i})"))[0];
            assert!(
                kn.contains(&format!("--listen {host}:{}", 7001 + i)),
                "{kn}"
            );
            assert!(kn.contains("--manager 10.0.0.7:7000"), "{kn}");
            assert!(kn.contains("--fabric verbs --dpm 10.0.0.5:18515"), "{kn}");
            assert!(kn.contains("--device mlx5_0"), "{kn}");
            assert!(
                kn.contains("--requirepass-file /srv/dinomo/requirepass"),
                "{kn}"
            );
        }
        assert!(p.contains("UDP 4791"));
        for host in ["10.0.0.5", "10.0.0.7", "10.0.0.6", "10.0.0.8"] {
            assert_eq!(
                p.matches(&format!("ssh {host} ")).count(),
                1,
                "the files are copied to each host once:\n{p}"
            );
        }
    }

    #[test]
    fn hosts_that_cannot_work_are_refused_before_anything_is_made() {
        let mut cfg = spread();
        cfg.fabric = "shm".into();
        let e = plan(&cfg).expect_err("shm across hosts").to_string();
        assert!(e.contains("fabric = \"verbs\""), "{e}");

        let mut cfg = spread();
        if let Some(h) = cfg.hosts.as_mut() {
            h.dpm = "dpm.example".into();
        }
        let e = plan(&cfg).expect_err("a name").to_string();
        assert!(e.contains("not an IP address"), "{e}");

        let mut cfg = spread();
        if let Some(h) = cfg.hosts.as_mut() {
            h.kns.clear();
        }
        assert!(plan(&cfg)
            .expect_err("no KN host")
            .to_string()
            .contains("kns is empty"));

        let mut cfg = spread();
        cfg.auth = false;
        let e = plan(&cfg).expect_err("no auth across hosts").to_string();
        assert!(e.contains("10.0.0.5"), "{e}");
    }

    #[test]
    fn the_hosts_table_reads_from_toml_and_up_refuses_to_start_it_here() {
        let cfg: UpConfig = toml::from_str(
            "fabric = \"verbs\"\n[hosts]\ndpm = \"10.0.0.5\"\nmanager = \"10.0.0.7\"\n\
             kns = [\"10.0.0.6\"]\n",
        )
        .expect("toml");
        assert_eq!(cfg.hosts.as_ref().map(|h| h.kn(4)), Some("10.0.0.6"));
        let stop = std::sync::atomic::AtomicBool::new(true);
        let e = crate::up::run(&cfg, &stop).expect_err("spread").to_string();
        assert!(e.contains("--plan"), "{e}");
        assert!(toml::from_str::<UpConfig>("[hosts]\ndpm = \"x\"\nbogus = 1\n").is_err());
    }

    #[test]
    fn words_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(quote("/srv/dinomo/region"), "/srv/dinomo/region");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
