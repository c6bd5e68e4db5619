//! `dinomo kn`: a KVS node process (the server lives in `host_kn::server`).

use clap::Args;
use dinomo::size::parse_size;

use super::fabric::DpmArgs;
use super::secret::SecretArgs;
use super::{at_least_one, install_stop_handler, ready, Usage, STOP};

#[derive(Args, Debug)]
pub(crate) struct KnArgs {
    #[command(flatten)]
    dpm: DpmArgs,
    #[command(flatten)]
    secret: SecretArgs,
    /// Client address (Redis protocol); port 0 picks a free port.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Manager address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    manager: String,
    /// Shards (threads, each with its own fabric connection, log and cache).
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<u16>)]
    threads: u16,
    /// Threads serving client connections.
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<usize>)]
    io_threads: usize,
    /// Cache size of the whole KN, e.g. 64M (0: no cache, every read goes to the DPM).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    cache: u64,
}

pub(crate) fn run(a: KnArgs) -> anyhow::Result<()> {
    if a.threads == 0 || a.threads > 64 {
        return Err(Usage(format!("--threads {} is outside 1..=64", a.threads)).into());
    }
    let spec = a.dpm.spec_with(&a.secret)?;
    let secret = a.secret.load_for(
        "KN",
        &[
            ("--listen", a.listen.to_string()),
            ("--manager", a.manager.clone()),
        ],
    )?;
    install_stop_handler()?;
    let mut cfg = host_kn::server::KnConfig::new(spec, a.listen, a.manager);
    cfg.secret = secret;
    cfg.threads = a.threads;
    cfg.io_threads = a.io_threads;
    cfg.cache_bytes = a.cache;
    host_kn::server::run(&cfg, &STOP, |id, addr| {
        ready(&format!("kn {id} listening on {addr}"))
    })?;
    Ok(())
}
