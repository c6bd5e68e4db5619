//! `--secret-file`: the cluster secret every role proves it holds (see
//! `dinomo_shared::auth`). One option, one meaning, for every role.

use std::path::PathBuf;

use clap::Args;
use dinomo_shared::auth::ClusterSecret;

/// Where a role finds the cluster secret.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct SecretArgs {
    /// File holding the cluster secret (64 hex digits, mode 0600; `dinomo up` writes one
    /// beside the region). Without it the cluster runs unauthenticated, which is allowed only
    /// when every address involved is loopback.
    #[arg(long, env = "DINOMO_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The secret, if a file was named; a file that cannot be used is an error, never a
    /// silent fall-back to no authentication.
    pub fn load(&self) -> anyhow::Result<Option<ClusterSecret>> {
        match &self.secret_file {
            None => Ok(None),
            Some(p) => Ok(Some(ClusterSecret::load(p)?)),
        }
    }
}

impl SecretArgs {
    /// The secret of a `role` that binds or reaches `addrs` (`(option, address)`): without
    /// one, every address must be loopback, since anyone who reaches an unauthenticated
    /// surface controls the cluster.
    pub fn load_for(
        &self,
        role: &str,
        addrs: &[(&str, String)],
    ) -> anyhow::Result<Option<ClusterSecret>> {
        let secret = self.load()?;
        if secret.is_none() {
            if let Some((opt, addr)) = addrs
                .iter()
                .find(|(_, a)| !dinomo_shared::auth::is_loopback(a))
            {
                return Err(super::Usage(format!(
                    "{opt} {addr} is not a loopback address, and the {role} has no cluster \
                     secret: anyone who reaches it could take over the cluster. Pass \
                     --secret-file FILE (or DINOMO_SECRET_FILE; the same file for every \
                     role, mode 0600, 64 hex digits), or use 127.0.0.1"
                ))
                .into());
            }
        }
        Ok(secret)
    }
}
