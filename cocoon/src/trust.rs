//! Whom a client trusts when it reaches a hub over TLS (`https://`, `wss://`): the public
//! roots every browser trusts, plus a private CA given with `--ca-cert FILE`
//! (`ADI_CA_CERT`), for hubs that serve a certificate of their own CA. The agent and the
//! CLI use the same [`Trust`], so both accept and refuse the same hubs, and a
//! certificate that does not verify is explained in the same words: which name was
//! asked for and which CAs were tried.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Why a CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file could not be read.
    #[error("--ca-cert {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds no usable certificate.
    #[error("--ca-cert {}: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
}

/// The roots a client verifies a hub's certificate against.
#[derive(Clone, Debug)]
pub struct Trust {
    config: Arc<rustls::ClientConfig>,
    ca_file: Option<PathBuf>,
}

impl Trust {
    /// The public roots, plus every certificate in `ca_file` when one is given.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, TrustError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|source| TrustError::Read {
                path: path.to_owned(),
                source,
            })?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TrustError::Invalid {
                    path: path.to_owned(),
                    what: format!("not PEM certificates: {e}"),
                })?;
            if certs.is_empty() {
                return Err(TrustError::Invalid {
                    path: path.to_owned(),
                    what: "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| TrustError::Invalid {
                    path: path.to_owned(),
                    what: format!("not a CA certificate rustls can use: {e}"),
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Invalid {
                path: ca_file.map(Path::to_owned).unwrap_or_default(),
                what: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Trust {
            config: Arc::new(config),
            ca_file: ca_file.map(Path::to_owned),
        })
    }

    /// The rustls configuration, for WebSockets and HTTP clients alike.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// An HTTP client builder that trusts exactly these roots.
    pub fn http(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder().use_preconfigured_tls((*self.config).clone())
    }

    /// The CAs tried, in words.
    fn tried(&self) -> String {
        match &self.ca_file {
            Some(f) => format!("the public roots and {}", f.display()),
            None => "the public roots only (pass --ca-cert FILE or set ADI_CA_CERT for a \
                     private CA)"
                .to_owned(),
        }
    }

    /// A certificate failure reaching `url`, said with the name asked for and the CAs
    /// tried; `None` when `error` (its whole chain, as text) is not one.
    pub fn explain(&self, url: &str, error: &str) -> Option<String> {
        let host = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', '?']).next())
            .unwrap_or(url);
        let name = host
            .rsplit_once(':')
            .filter(|(h, port)| !h.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        let why = if error.contains("UnknownIssuer") || error.contains("unknown issuer") {
            format!(
                "was not issued by a CA this side trusts (tried {})",
                self.tried()
            )
        } else if error.contains("NotValidForName") || error.contains("not valid for name") {
            "is not valid for that name".to_owned()
        } else if error.contains("Expired") || error.contains("expired") {
            "has expired".to_owned()
        } else if error.contains("InvalidCertificate") || error.contains("invalid peer certificate")
        {
            format!("does not verify (tried {})", self.tried())
        } else {
            return None;
        };
        Some(format!(
            "the certificate the hub presented for {name} {why}"
        ))
    }
}

/// The text of an error and every error under it.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.pem");
        let e = Trust::new(Some(&missing)).expect_err("missing");
        assert!(e.to_string().contains("none.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = Trust::new(Some(&empty)).expect_err("empty");
        assert!(e.to_string().contains("no certificate"), "{e}");
        assert!(Trust::new(None).is_ok(), "the public roots alone");
    }

    #[test]
    fn certificate_failures_name_the_host_and_the_cas_tried() {
        let trust = Trust::new(None).expect("roots");
        let said = trust
            .explain(
                "wss://hub.example:8443/ws/cocoon",
                "invalid peer certificate: UnknownIssuer",
            )
            .expect("a certificate failure");
        assert!(said.contains("for hub.example "), "{said}");
        assert!(said.contains("the public roots only"), "{said}");
        let said = trust
            .explain(
                "https://127.0.0.1:9/x",
                "invalid peer certificate: NotValidForName",
            )
            .expect("a certificate failure");
        assert!(
            said.contains("127.0.0.1 is not valid for that name"),
            "{said}"
        );
        assert_eq!(trust.explain("https://h/", "connection refused"), None);
    }
}
