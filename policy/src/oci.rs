//! `oci://HOST[:PORT]/REPOSITORY:TAG` and `oci://HOST[:PORT]/REPOSITORY@sha256:DIGEST`:
//! a module named by its place in an OCI registry, and the
//! `[registries."HOST[:PORT]"]` settings used to reach one.
//!
//! Only the syntax is checked here (the policy crate does no I/O beyond
//! reading files); fetching is corral-supervisor's `oci` module.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The scheme that marks a module reference rather than a file path.
pub const SCHEME: &str = "oci://";

/// A parsed `oci://` reference. A tag moves (it is resolved when corrald
/// starts or reloads and when `corral pull` runs); a digest never does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OciRef {
    /// `HOST[:PORT]`, as written (lower case).
    pub registry: String,
    /// `a/b/c`: lower-case path components.
    pub repository: String,
    pub version: OciVersion,
}

/// What a reference pins.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OciVersion {
    Tag(String),
    /// Lower-case hex SHA-256 of the manifest (or index).
    Digest(String),
}

impl OciRef {
    /// Whether `text` is meant as a reference (starts with `oci://`), as
    /// opposed to a file path.
    pub fn is_reference(text: &str) -> bool {
        text.starts_with(SCHEME)
    }

    /// Parse `oci://HOST[:PORT]/REPOSITORY(:TAG|@sha256:HEX)`. A reference
    /// without a tag or digest is refused rather than meaning `latest`: a
    /// policy should say which version it runs.
    pub fn parse(text: &str) -> Result<OciRef, String> {
        let rest = text.strip_prefix(SCHEME).ok_or_else(|| {
            format!("`{text}` is not an OCI reference: it must start with `{SCHEME}`")
        })?;
        let usage =
            "use oci://HOST[:PORT]/REPOSITORY:TAG or oci://HOST[:PORT]/REPOSITORY@sha256:DIGEST";
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("`{text}` names no repository: {usage}"))?;
        check_registry(registry).map_err(|why| format!("`{text}`: {why}"))?;
        let (repository, version) = if let Some((repo, digest)) = path.split_once('@') {
            let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
                format!("`{text}`: the digest must be `sha256:` and 64 hex digits")
            })?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "`{text}`: `{digest}` is not a SHA-256 digest (`sha256:` and 64 hex digits)"
                ));
            }
            (repo, OciVersion::Digest(hex.to_ascii_lowercase()))
        } else {
            // The tag follows the last `:` after the last `/`.
            let last = path.rfind('/').map_or(0, |i| i + 1);
            match path[last..].rfind(':') {
                Some(i) => {
                    let (repo, tag) = (&path[..last + i], &path[last + i + 1..]);
                    check_tag(tag).map_err(|why| format!("`{text}`: {why}"))?;
                    (repo, OciVersion::Tag(tag.to_string()))
                }
                None => {
                    return Err(format!(
                        "`{text}` has no tag or digest (corral does not assume `latest`): {usage}"
                    ));
                }
            }
        };
        check_repository(repository).map_err(|why| format!("`{text}`: {why}"))?;
        Ok(OciRef {
            registry: registry.to_ascii_lowercase(),
            repository: repository.to_string(),
            version,
        })
    }

    /// The same repository at `digest` (hex).
    pub fn at_digest(&self, digest: &str) -> OciRef {
        OciRef {
            version: OciVersion::Digest(digest.to_string()),
            ..self.clone()
        }
    }

    /// The reference as the distribution protocol writes it, without the
    /// scheme: `HOST[:PORT]/REPO:TAG` or `...@sha256:HEX`.
    pub fn without_scheme(&self) -> String {
        let s = self.to_string();
        s[SCHEME.len()..].to_string()
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.registry, self.repository)?;
        match &self.version {
            OciVersion::Tag(t) => write!(f, ":{t}"),
            OciVersion::Digest(d) => write!(f, "@sha256:{d}"),
        }
    }
}

impl TryFrom<String> for OciRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        OciRef::parse(&s)
    }
}

impl From<OciRef> for String {
    fn from(r: OciRef) -> String {
        r.to_string()
    }
}

/// `HOST[:PORT]`: a DNS name or IPv4 address (or `[v6]`), and a port.
pub fn check_registry(registry: &str) -> Result<(), String> {
    if registry.is_empty() {
        return Err("the registry host is empty".into());
    }
    let (host, port) = if let Some(v6) = registry.strip_prefix('[') {
        let (addr, rest) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{registry}`: unclosed `[`"))?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("`{addr}` is not an IPv6 address"))?;
        (None, rest.strip_prefix(':').map(str::to_string))
    } else {
        match registry.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p.to_string())),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
            });
        if !ok {
            return Err(format!("`{host}` is not a registry host name"));
        }
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!("`{port}` is not a port (1 to 65535)"));
    }
    Ok(())
}

/// Lower-case components of `[a-z0-9]` joined by `.`, `_`, `__` or `-`,
/// separated by `/` (the distribution spec's grammar).
fn check_repository(repo: &str) -> Result<(), String> {
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if repo.is_empty() {
        return Err("the repository is empty".into());
    }
    if repo.len() > 255 || !repo.split('/').all(component_ok) {
        return Err(format!(
            "`{repo}` is not a repository name (lower-case letters, digits and `._-`, components separated by `/`)"
        ));
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !tag.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{tag}` is not a tag (letters, digits, `._-`, at most 128, not starting with `.` or `-`)"
        ))
    }
}

/// One `[registries."HOST[:PORT]"]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct RegistrySpec {
    /// Extra CA certificates (PEM) trusted for this registry, besides the
    /// system's.
    pub ca_file: Option<PathBuf>,
    /// Credentials in the `auth.json` / docker `config.json` format; must
    /// not be readable by group or others.
    pub auth_file: Option<PathBuf>,
    /// Speak plain HTTP to this registry (never the default).
    pub plain_http: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_print_back() {
        for text in [
            "oci://localhost:5000/apps/hello:v1",
            "oci://registry.example.com/hello:1.0.0-rc.1",
            "oci://127.0.0.1:5000/a/b/c@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "oci://[::1]:5000/x:y",
        ] {
            let r = OciRef::parse(text).unwrap();
            assert_eq!(r.to_string(), text);
        }
        let r = OciRef::parse("oci://localhost:5000/apps/hello:v1").unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "apps/hello");
        assert_eq!(r.version, OciVersion::Tag("v1".into()));
        assert_eq!(r.without_scheme(), "localhost:5000/apps/hello:v1");
    }

    #[test]
    fn bad_references_say_why() {
        let err = |t: &str| OciRef::parse(t).unwrap_err();
        assert!(err("oci://localhost:5000/hello").contains("no tag or digest"));
        assert!(err("oci://localhost:5000").contains("names no repository"));
        assert!(err("oci://localhost:99999/a:b").contains("not a port"));
        assert!(err("oci://h/Hello:v1").contains("not a repository name"));
        assert!(err("oci://h/a@sha256:abc").contains("not a SHA-256 digest"));
        assert!(err("oci://h/a@md5:abc").contains("must be `sha256:`"));
        assert!(err("oci://h/a:-x").contains("not a tag"));
        assert!(err("oci:///a:b").contains("registry host is empty"));
        assert!(err("http://h/a:b").contains("must start with `oci://`"));
    }
}
