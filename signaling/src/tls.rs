//! HTTPS and WSS served by the hub itself (rustls), from a PEM certificate chain and
//! key. The files are read at start, where a bad pair stops the hub with the reason, and
//! again whenever either changes on disk (checked every second): a renewed certificate
//! is served to the next handshake, with no restart and no connection dropped. A pair
//! that fails to load later (half-written, mismatched) is logged and the previous one
//! kept, so a renewal in progress never takes the hub off the air.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// How often the files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

pub use crate::config::TlsFiles;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file holds no certificate, or no key, in PEM.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The key does not fit the certificate, or is of a kind rustls cannot use.
    #[error("{} and {}: {reason}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the pair.
fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: files.cert.clone(),
            what: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: files.cert.clone(),
            what: "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        what: format!("no private key in it: {e}"),
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}

/// What identifies a version of the files on disk.
fn stamp(files: &TlsFiles) -> Option<[(SystemTime, u64); 2]> {
    let of = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([of(&files.cert)?, of(&files.key)?])
}

/// The certificate served now, swapped when the files change.
#[derive(Debug)]
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    loaded: RwLock<Option<[(SystemTime, u64); 2]>>,
}

impl Certificates {
    /// Loads the files; an error says which file and what is wrong.
    pub fn open(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let loaded = stamp(&files);
        let key = load(&files)?;
        Ok(Arc::new(Certificates {
            files,
            current: RwLock::new(Arc::new(key)),
            loaded: RwLock::new(loaded),
        }))
    }

    /// The acceptor the accept loop hands each new connection to.
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair {
                cert: self.files.cert.clone(),
                key: self.files.key.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// Reloads the pair if either file changed since it was last loaded; returns
    /// whether a new one is served now.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.files);
        let last = *self.loaded.read().unwrap_or_else(|e| e.into_inner());
        if now.is_none() || now == last {
            return false;
        }
        match load(&self.files) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = now;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Tried again on the next change, which a renewal still writing makes.
                *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = now;
                tracing::warn!(
                    "TLS certificate not reloaded, the previous one is still served: {e}"
                );
                false
            }
        }
    }

    /// Checks the files every [`RELOAD_CHECK`] until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            let this = self.clone();
            // File reads and signature-key parsing are blocking work.
            let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}
