//! `dinomo kn`: a KVS node process (the server lives in `host_kn::server`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use dinomo::size::parse_size;
use dinomo_shared::auth::read_private_file;
use host_kn::server::{Acl, ClientLimits};

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
    /// Shards (threads, each with its own fabric connection, log and cache, each serving
    /// the client connections placed on it).
    #[arg(long, default_value_t = 2, value_parser = at_least_one::<u16>)]
    threads: u16,
    /// Threads accepting client connections (a connection is then served, to the end, by
    /// the shard thread it is placed on).
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    io_threads: usize,
    /// Cache size of the whole KN, e.g. 64M (0: no cache, every read goes to the DPM).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    cache: u64,
    #[command(flatten)]
    clients: ClientArgs,
}

/// Who may use the Redis port and how much one client may make the KN hold. The limits
/// have Redis's names and defaults and show in `CONFIG GET`.
#[derive(Args, Debug)]
pub(crate) struct ClientArgs {
    /// File holding the default user's password on one line (mode 0600, owned by this
    /// user); clients then send `AUTH <password>` (`redis-cli -a`, or `--askpass`).
    #[arg(long, env = "DINOMO_REQUIREPASS_FILE")]
    requirepass_file: Option<PathBuf>,
    /// ACL file (mode 0600): lines `user <name> <rules>` in Redis's syntax, e.g.
    /// `user app on >pw ~* +@all` and a read-only `user ro on >pw2 ~* +@read
    /// +@connection`. Rules: on off >pw <pw #sha256 !sha256 nopass resetpass ~glob allkeys
    /// resetkeys +@cat -@cat +cmd -cmd allcommands nocommands reset (channel rules are
    /// ignored). A `default` user it does not define is off.
    #[arg(long, env = "DINOMO_ACL_FILE")]
    acl_file: Option<PathBuf>,
    /// `yes`: without any password, serve loopback clients only and refuse a non-loopback
    /// --listen; `no` if another layer guards the network.
    #[arg(long, default_value = "yes", value_parser = yes_no)]
    protected_mode: bool,
    /// Most client connections at once; one more gets an error.
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one::<usize>)]
    maxclients: usize,
    /// Seconds a client may stay idle before it is disconnected (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Most bytes of one command (with what is still unparsed) a client may make the KN
    /// hold; above it the client gets an error and is disconnected. At least 1mb.
    #[arg(long, value_parser = parse_size, default_value = "1gb")]
    client_query_buffer_limit: u64,
    /// Longest bulk string in a command (also never more than the largest value the KN
    /// can store). At least 1mb.
    #[arg(long, value_parser = parse_size, default_value = "512mb")]
    proto_max_bulk_len: u64,
    /// Largest reply to one command (an MGET over a large value many times): above it the
    /// client gets an error and is disconnected. At least 1mb.
    #[arg(long, value_parser = parse_size, default_value = "64mb")]
    client_reply_limit: u64,
    /// PEM certificate chain: with --tls-key-file the client port speaks TLS only
    /// (`redis-cli --tls --cacert CA.pem`).
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file (mode 0600, owned by this user).
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
}

fn yes_no(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(format!("'{s}' is neither yes nor no")),
    }
}

impl ClientArgs {
    /// The users, from the files named (both must be private: see `read_private_file`).
    fn acl(&self) -> anyhow::Result<Acl> {
        let requirepass = match &self.requirepass_file {
            None => None,
            Some(p) => {
                let text = read_private_file(p)?;
                let mut lines = text.lines();
                let pw = lines.next().unwrap_or_default().to_string();
                if lines.any(|l| !l.trim().is_empty()) {
                    return Err(Usage(format!(
                        "--requirepass-file {}: the file holds one line, the password",
                        p.display()
                    ))
                    .into());
                }
                if pw.is_empty() {
                    return Err(Usage(format!(
                        "--requirepass-file {}: the password is empty",
                        p.display()
                    ))
                    .into());
                }
                Some(pw)
            }
        };
        let acl_text = match &self.acl_file {
            None => None,
            Some(p) => Some(read_private_file(p)?),
        };
        Acl::new(
            acl_text.as_deref(),
            requirepass.as_deref().map(str::as_bytes),
        )
        .map_err(|e| {
            let file = self
                .acl_file
                .as_ref()
                .map(|p| format!("--acl-file {}: ", p.display()))
                .unwrap_or_default();
            Usage(format!("{file}{e}")).into()
        })
    }

    fn limits(&self) -> anyhow::Result<ClientLimits> {
        let size = |name: &str, v: u64| -> anyhow::Result<usize> {
            if v < 1 << 20 {
                return Err(Usage(format!("--{name} {v} is below the minimum of 1mb")).into());
            }
            Ok(usize::try_from(v).unwrap_or(usize::MAX))
        };
        Ok(ClientLimits {
            query_buffer: size("client-query-buffer-limit", self.client_query_buffer_limit)?,
            proto_max_bulk_len: size("proto-max-bulk-len", self.proto_max_bulk_len)?,
            maxclients: self.maxclients,
            timeout: Duration::from_secs(self.timeout),
            reply: size("client-reply-limit", self.client_reply_limit)?,
        })
    }
}

pub(crate) fn run(a: KnArgs) -> anyhow::Result<()> {
    host_kn::memory::configure();
    if a.threads == 0 || a.threads > 64 {
        return Err(Usage(format!("--threads {} is outside 1..=64", a.threads)).into());
    }
    let acl = a.clients.acl()?;
    let limits = a.clients.limits()?;
    let tls = match (&a.clients.tls_cert_file, &a.clients.tls_key_file) {
        (Some(cert), Some(key)) => Some(host_kn::server::tls_config(cert, key)?),
        _ => None,
    };
    // The client port is guarded by protected mode (checked by `host_kn::server::run`);
    // the secret guards the control traffic, so only the manager's address decides
    // whether one is needed.
    let secret = a
        .secret
        .load_for("KN", &[("--manager", a.manager.clone())])?;
    let spec = a.dpm.spec()?.with_secret(secret.clone());
    install_stop_handler()?;
    let mut cfg = host_kn::server::KnConfig::new(spec, a.listen, a.manager);
    cfg.secret = secret;
    cfg.threads = a.threads;
    cfg.io_threads = a.io_threads;
    cfg.cache_bytes = a.cache;
    cfg.acl = Arc::new(acl);
    cfg.protected_mode = a.clients.protected_mode;
    cfg.limits = limits;
    cfg.tls = tls;
    host_kn::server::run(&cfg, &STOP, |id, addr| {
        ready(&format!("kn {id} listening on {addr}"))
    })?;
    Ok(())
}
