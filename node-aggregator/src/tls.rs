//! The metrics endpoint's TLS certificate, reloaded when its files change.
//!
//! cert-manager and Kubernetes Secrets replace certificate files in place (a
//! symlink swap under a Secret volume); the aggregator notices within
//! [`RELOAD_POLL`] and serves the new pair to new connections, without a
//! restart. A pair that fails to load is logged and the old one kept.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use rustls::ServerConfig;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// How often the files are checked: two `stat` calls, so often is cheap.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(ReloadingCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Arc::new(load_pair(cert_path, key_path)?)),
        }))
    }

    /// A TLS acceptor for HTTP/1.1 that always uses the latest certificate.
    pub fn acceptor(self: &Arc<Self>) -> anyhow::Result<TlsAcceptor> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reloads the pair whenever either file changes; runs until the process ends.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = self.stamps();
        loop {
            tokio::time::sleep(RELOAD_POLL).await;
            let now = self.stamps();
            if now == seen {
                continue;
            }
            seen = now;
            match load_pair(&self.cert_path, &self.key_path) {
                Ok(pair) => {
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
                    info!(cert = %self.cert_path.display(), "reloaded the metrics TLS certificate");
                }
                // Often a half-written pair during a rotation: the next change fixes it.
                Err(err) => warn!(
                    cert = %self.cert_path.display(),
                    "keeping the previous metrics TLS certificate: {err:#}"
                ),
            }
        }
    }

    fn stamps(&self) -> [Option<(SystemTime, u64)>; 2] {
        [&self.cert_path, &self.key_path].map(|path| {
            fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

fn load_pair(cert_path: &Path, key_path: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate chain {}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(anyhow!("no certificate in {}", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("reading the private key {}", key_path.display()))?;
    let signer = ring::sign::any_supported_type(&key)
        .with_context(|| format!("using the private key {}", key_path.display()))?;
    let pair = CertifiedKey::new(chain, signer);
    pair.keys_match().with_context(|| {
        format!(
            "{} does not belong to {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(pair)
}
