//! An app's certificate and key as corrald and `corral check` see them:
//! read from the files its `tls` names, checked the way its zygote will
//! use them (they parse, the key matches the certificate: the rustls
//! configuration is built once here), and the leaf certificate inspected
//! (subject, names, dates) with x509-parser. Every error names the place
//! in the policy that named the file.

use std::time::{Duration, SystemTime};

use corral_policy::AppSpec;
use corral_runtime::tls::{TlsError, TlsFile, TlsMaterial};
use serde::Serialize;

/// A certificate this close to its expiry gets a warning (check, reload,
/// start).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// An app's certificate and key, read and checked.
#[derive(Debug, Clone)]
pub struct LoadedTls {
    /// What the zygote is handed.
    pub material: TlsMaterial,
    pub cert: CertInfo,
    /// Worth saying, not refusing: close to its expiry, not valid yet, no
    /// subjectAltName.
    pub warnings: Vec<String>,
}

/// The leaf certificate, as status and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// The subject, as `CN=web.example, O=...`.
    pub subject: String,
    /// The DNS names and IP addresses of its subjectAltName.
    pub names: Vec<String>,
    /// Seconds since the epoch.
    pub not_before: i64,
    /// Seconds since the epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// `not_after` as an RFC 3339 time (UTC).
    pub fn expires(&self) -> String {
        rfc3339(self.not_after)
    }
}

fn rfc3339(secs: i64) -> String {
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Read and check `app`'s certificate and key (`None`: no `tls`), at
/// `now`. An error is one line, `file:line:col: apps.NAME.tls.KEY: ...`.
pub fn load(app: &AppSpec, now: SystemTime) -> anyhow::Result<Option<LoadedTls>> {
    let Some(spec) = &app.tls else {
        return Ok(None);
    };
    let key = |k: &str| format!("apps.{}.tls.{k}", app.name);
    let material = TlsMaterial::read(spec).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let cert_err = |why: String| {
        anyhow::anyhow!(
            "{}: {}: {}: {why}",
            spec.cert_at,
            key("cert"),
            spec.cert.display()
        )
    };
    // What the zygote will do with them: the same errors, found here.
    let refused = |e: TlsError| {
        let (at, k, path) = match e.file {
            TlsFile::Cert => (spec.cert_at.as_str(), "cert", &spec.cert),
            TlsFile::Key => (spec.key_at.as_str(), "key", &spec.key),
            TlsFile::ClientCa => (
                spec.client_ca_at.as_deref().unwrap_or(&spec.cert_at),
                "client-ca",
                spec.client_ca.as_ref().unwrap_or(&spec.cert),
            ),
        };
        anyhow::anyhow!("{at}: {}: {}: {e}", key(k), path.display())
    };
    let chain = material.chain().map_err(refused)?;
    corral_runtime::tls::server_config(&material, app.kind).map_err(refused)?;
    let cert = inspect(&chain[0]).map_err(cert_err)?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if cert.not_after < now {
        return Err(cert_err(format!(
            "the certificate expired on {} (subject {})",
            cert.expires(),
            cert.subject
        )));
    }
    let mut warnings = Vec::new();
    let place = format!("{}: {}: {}", spec.cert_at, key("cert"), spec.cert.display());
    if cert.not_before > now {
        warnings.push(format!(
            "{place}: the certificate is not valid before {}: clients refuse it until then",
            rfc3339(cert.not_before)
        ));
    }
    if cert.not_after - now < EXPIRY_WARNING.as_secs() as i64 {
        warnings.push(format!(
            "{place}: the certificate expires on {}, in {} days: renew it",
            cert.expires(),
            (cert.not_after - now) / 86400
        ));
    }
    if cert.names.is_empty() {
        warnings.push(format!(
            "{place}: the certificate has no subjectAltName: clients check names there only, and refuse it"
        ));
    }
    Ok(Some(LoadedTls {
        material,
        cert,
        warnings,
    }))
}

/// Subject, names and dates of a DER certificate.
fn inspect(der: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push((*dns).to_string()),
                GeneralName::IPAddress(ip) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                        names.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                        names.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}
