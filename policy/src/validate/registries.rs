//! The `[registries."HOST[:PORT]"]` tables: how to reach the registries
//! that `oci://` modules name.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use super::checker::{Checker, join};
use crate::oci::{RegistrySpec, check_registry};
use crate::source::{NodeKind, Table};

pub(super) const REGISTRY_KEYS: &[&str] = &["ca-file", "auth-file", "plain-http"];

pub(super) fn registries_spec(cx: &mut Checker<'_>, doc: &Table) -> BTreeMap<String, RegistrySpec> {
    let mut out = BTreeMap::new();
    let Some(entry) = doc.get("registries") else {
        return out;
    };
    let Some(table) = cx.table(&entry.value, "registries") else {
        return out;
    };
    for reg in &table.entries {
        let path = join("registries", &reg.key);
        if let Err(why) = check_registry(&reg.key) {
            cx.error(
                reg.key_at,
                &path,
                format!("{why}: the key is the registry as `oci://` references write it, e.g. [registries.\"registry.example.com:5000\"]"),
            );
            continue;
        }
        let Some(t) = cx.table(&reg.value, &path) else {
            continue;
        };
        cx.check_keys(t, &path, REGISTRY_KEYS);
        let mut spec = RegistrySpec::default();
        for key in ["ca-file", "auth-file"] {
            let Some(e) = t.get(key) else { continue };
            let p = join(&path, key);
            let Some(written) = cx.string(&e.value, &p) else {
                continue;
            };
            let resolved = cx.resolve(e.value.at, written);
            let meta = match std::fs::metadata(&resolved) {
                Ok(m) if m.is_file() => m,
                Ok(_) => {
                    cx.error(e.value.at, &p, format!("`{written}` is not a file"));
                    continue;
                }
                Err(err) => {
                    cx.error(
                        e.value.at,
                        &p,
                        format!("`{written}`: {err} (looked at {})", resolved.display()),
                    );
                    continue;
                }
            };
            if key == "auth-file" {
                if let Err(why) = check_private(meta.mode()) {
                    cx.error(e.value.at, &p, format!("`{written}` {why}"));
                    continue;
                }
                spec.auth_file = Some(resolved);
            } else {
                spec.ca_file = Some(resolved);
            }
        }
        if let Some(e) = t.get("plain-http") {
            match &e.value.kind {
                NodeKind::Bool(b) => spec.plain_http = *b,
                other => cx.error(
                    e.value.at,
                    &join(&path, "plain-http"),
                    format!("expected true or false, found {}", other.type_name()),
                ),
            }
        }
        if spec.plain_http && spec.ca_file.is_some() {
            cx.error(
                reg.key_at,
                &path,
                "plain-http = true and ca-file contradict each other: plain HTTP uses no certificates",
            );
        }
        out.insert(reg.key.to_ascii_lowercase(), spec);
    }
    out
}

/// Credentials must not be readable by anyone but their owner (as ssh
/// refuses a private key that others can read).
pub(crate) fn check_private(mode: u32) -> Result<(), String> {
    if mode & 0o077 != 0 {
        return Err(format!(
            "is readable or writable by others (mode {:o}): credentials must be private, e.g. chmod 600",
            mode & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use crate::{Environment, parse_str};

    fn errors(text: &str, dir: &std::path::Path) -> String {
        match parse_str(text, &dir.join("policy.toml"), &Environment::default()) {
            Ok(p) => panic!("accepted: {:?}", p.registries),
            Err(e) => e
                .diagnostics()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    #[test]
    fn registry_tables_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("auth.json");
        std::fs::write(&auth, "{}").unwrap();
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "").unwrap();
        let ok = parse_str(
            "[registries.\"reg.example:5000\"]\nauth-file = \"auth.json\"\nca-file = \"ca.pem\"\n\
             [registries.\"10.0.0.5:5000\"]\nplain-http = true\n",
            &dir.path().join("policy.toml"),
            &Environment::default(),
        )
        .unwrap();
        let reg = &ok.registries["reg.example:5000"];
        assert_eq!(reg.auth_file.as_deref(), Some(auth.as_path()));
        assert!(!reg.plain_http && ok.registries["10.0.0.5:5000"].plain_http);

        let text = errors(
            "[registries.\"bad host:1\"]\nplain-http = true\n\
             [registries.\"r:1\"]\nplain-http = \"yes\"\nca-fil = \"x\"\n\
             [registries.\"r:2\"]\nplain-http = true\nca-file = \"ca.pem\"\n\
             [registries.\"r:3\"]\nauth-file = \"missing.json\"\n",
            dir.path(),
        );
        for want in [
            "registries.bad host:1: `bad host` is not a registry host name",
            "registries.r:1.plain-http: expected true or false, found a string",
            "ca-fil",
            "registries.r:2: plain-http = true and ca-file contradict each other",
            "registries.r:3.auth-file: `missing.json`",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
    }
}
