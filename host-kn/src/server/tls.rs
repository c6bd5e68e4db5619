//! TLS on the client port, with rustls: Redis's `tls-cert-file` / `tls-key-file`. Clients
//! connect with `redis-cli --tls --cacert CA.pem`. Client certificates are not asked for
//! (authentication stays `AUTH`); the private key file must be private like a password file.

use std::path::Path;
use std::sync::Arc;

use dinomo_shared::auth::{read_private_file, AuthError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-key-file: {0}")]
    Key(#[from] AuthError),
    #[error("{file} {path}: {why}")]
    Pem {
        file: &'static str,
        path: String,
        why: String,
    },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server configuration from a PEM certificate chain and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1; the key file must be mode 0600 and owned by this user).
pub fn tls_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let pem = |file: &'static str, path: &Path, why: String| TlsError::Pem {
        file,
        path: path.display().to_string(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| pem("--tls-cert-file", cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem("--tls-cert-file", cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(
            "--tls-cert-file",
            cert_file,
            "no PEM certificate in it".into(),
        ));
    }
    let key_text = read_private_file(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
        .map_err(|e| pem("--tls-key-file", key_file, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}
