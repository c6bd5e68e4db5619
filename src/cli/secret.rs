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
    #[allow(dead_code)] // used by the roles as each surface gains authentication
    pub fn load(&self) -> anyhow::Result<Option<ClusterSecret>> {
        match &self.secret_file {
            None => Ok(None),
            Some(p) => Ok(Some(ClusterSecret::load(p)?)),
        }
    }
}
