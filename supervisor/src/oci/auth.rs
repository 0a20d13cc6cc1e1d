//! Registry credentials from an `auth.json` / docker `config.json` file:
//! `{"auths": {"HOST[:PORT]": {"auth": "base64(user:password)"}}}` (or
//! `username`/`password`, or an `identitytoken`/`registrytoken`). The file
//! must be private to its owner, as ssh requires of a key; its contents are
//! never logged.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, alias = "registrytoken")]
    identitytoken: Option<String>,
}

/// The credentials `file` holds for `registry` (anonymous when it has
/// none for it).
pub fn read_auth(file: &Path, registry: &str) -> anyhow::Result<RegistryAuth> {
    let mut f =
        std::fs::File::open(file).with_context(|| format!("auth-file {}", file.display()))?;
    let mode = f.metadata()?.mode();
    if mode & 0o077 != 0 {
        bail!(
            "auth-file {} is readable or writable by others (mode {:o}): credentials must be private, e.g. chmod 600",
            file.display(),
            mode & 0o777
        );
    }
    let mut text = String::new();
    f.read_to_string(&mut text)
        .with_context(|| format!("auth-file {}", file.display()))?;
    // serde_json's message names a line and column, never the contents.
    let parsed: AuthFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "auth-file {}: not the auth.json / config.json format",
            file.display()
        )
    })?;
    let entry = parsed.auths.iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next() == Some(registry)
    });
    let Some((key, entry)) = entry else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &entry.identitytoken
        && !token.is_empty()
    {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        if let Some((u, p)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
            return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
        }
        bail!(
            "auth-file {}: the `auth` of \"{key}\" is not base64 of USER:PASSWORD",
            file.display()
        );
    }
    bail!(
        "auth-file {}: \"{key}\" has no auth, username/password or identitytoken",
        file.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn auth_files_are_read_and_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &file,
            format!(r#"{{"auths": {{"https://127.0.0.1:5000": {{"auth": "{b64}"}}}}}}"#),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        match read_auth(&file, "127.0.0.1:5000").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("alice", "s3cret")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_auth(&file, "other:1").unwrap(),
            RegistryAuth::Anonymous
        ));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_auth(&file, "127.0.0.1:5000").unwrap_err().to_string();
        assert!(e.contains("readable or writable by others"), "{e}");
        assert!(!e.contains("s3cret") && !e.contains(&b64), "{e}");
    }
}
