//! TLS for an app's TCP addresses (`tls` in its policy): rustls, with
//! its safe defaults (TLS 1.3 and 1.2), on the ring provider that
//! wasmtime-wasi-http's rustls already builds.
//!
//! corrald reads the certificate chain and key ([`TlsMaterial::read`]) and
//! hands their bytes to the zygote in `protocol::Start`; the zygote builds
//! the [`ServerConfig`] ([`server_config`]) before it enters the sandbox,
//! and its workers inherit it with the fork and do the handshakes. No
//! process of the app ever opens the key file (landlock does not grant
//! it), but every worker of the app holds the app's key in memory, and
//! nothing of another app's.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use corral_policy::{AppKind, TlsSpec};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// ALPN of an http app: HTTP/2 first, then HTTP/1.1.
pub const HTTP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// An app's certificate chain and key, as read from its files, with where
/// the policy named them. Its `Debug` leaves the key out.
/// Equal when every file has the same bytes: a reload that changed none
/// leaves the app alone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMaterial {
    /// The PEM certificate chain, leaf first.
    pub cert_pem: String,
    /// The PEM private key.
    pub key_pem: String,
    /// The PEM CA certificates client certificates must chain to.
    pub client_ca_pem: Option<String>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("(hidden)"))
            .field(
                "client_ca_pem",
                &self.client_ca_pem.as_ref().map(String::len),
            )
            .finish()
    }
}

impl TlsMaterial {
    /// Read the files `spec` names (corrald does, never a zygote or a
    /// worker). Errors name the file and where the policy named it.
    pub fn read(spec: &TlsSpec) -> anyhow::Result<TlsMaterial> {
        let read = |path: &Path, at: &str, what: &str| {
            std::fs::read_to_string(path)
                .with_context(|| format!("{at}: cannot read the {what} {}", path.display()))
        };
        Ok(TlsMaterial {
            cert_pem: read(&spec.cert, &spec.cert_at, "certificate")?,
            key_pem: read(&spec.key, &spec.key_at, "key")?,
            client_ca_pem: match (&spec.client_ca, &spec.client_ca_at) {
                (Some(path), at) => Some(read(path, at.as_deref().unwrap_or(""), "client CA")?),
                (None, _) => None,
            },
        })
    }

    /// The certificate chain, leaf first (DER).
    pub fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        certificates(&self.cert_pem, TlsFile::Cert)
    }
}

/// Which of an app's TLS files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

/// What is wrong with an app's certificate, key or client CA.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub file: TlsFile,
    pub message: String,
}

fn error(file: TlsFile, message: impl Into<String>) -> TlsError {
    TlsError {
        file,
        message: message.into(),
    }
}

fn certificates(pem: &str, file: TlsFile) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(file, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(error(file, "no CERTIFICATE section in it"));
    }
    Ok(certs)
}

/// The rustls server configuration of an app: its chain and key (which
/// must match), TLS 1.3 and 1.2, ALPN `h2` and `http/1.1` for an http app
/// (none for a stdio app: the stream is the guest's), and with a client
/// CA, client certificates required.
pub fn server_config(material: &TlsMaterial, kind: AppKind) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = material.chain()?;
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes()).map_err(|e| {
        error(
            TlsFile::Key,
            format!("no usable private key in it (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(TlsFile::Cert, format!("TLS versions: {e}")))?;
    let builder = match &material.client_ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(pem, TlsFile::ClientCa)? {
                roots.add(cert).map_err(|e| {
                    error(
                        TlsFile::ClientCa,
                        format!("not a usable CA certificate: {e}"),
                    )
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| error(TlsFile::ClientCa, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => error(
            TlsFile::Key,
            "the key does not match the certificate (the first one in the cert file)",
        ),
        e => error(TlsFile::Key, format!("the key is not usable: {e}")),
    })?;
    if kind == AppKind::Http {
        config.alpn_protocols = HTTP_ALPN.iter().map(|p| p.to_vec()).collect();
    }
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Start` message (or anything holding the material) may be logged
    /// with `{:?}`: the key never shows.
    #[test]
    fn debug_leaves_the_key_out() {
        let material = TlsMaterial {
            cert_pem: "CERT".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nSECRET\n".into(),
            client_ca_pem: None,
        };
        let shown = format!("{material:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("(hidden)"), "{shown}");
    }

    #[test]
    fn errors_name_the_file_they_are_about() {
        let material = TlsMaterial {
            cert_pem: "not pem".into(),
            key_pem: String::new(),
            client_ca_pem: None,
        };
        let e = server_config(&material, AppKind::Http).unwrap_err();
        assert_eq!(e.file, TlsFile::Cert, "{e}");
    }
}
