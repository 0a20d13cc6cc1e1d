//! From the merged value tree to a [`Policy`]: every key is checked for
//! type, range and meaning, and every problem is collected as a
//! [`Diagnostic`] (we walk the tree ourselves rather than use serde's
//! `deny_unknown_fields`, which stops at the first error).
//!
//! `[defaults]` is checked once on its own (as a partial app), then merged
//! under each app; a problem in `[defaults]` is reported once, at its line,
//! not once per app.
//!
//! One file per section: `daemon`, `sockets`, `app` (an app table and its
//! lists: listen, env, dirs, network), `tables` (its sub-tables: pool,
//! limits, sandbox, restart) and `across` (rules between apps); `checker`
//! collects the diagnostics. Single values are read by the parsers of
//! `crate::parse` and `crate::addr`, which the typed spec uses too.

mod across;
pub(crate) mod app;
mod checker;
mod daemon;
mod registries;
mod sockets;
pub(crate) mod tables;

use std::collections::BTreeMap;
use std::path::Path;

use crate::Environment;
use crate::error::Diagnostic;
use crate::source::{Sources, Table};
use crate::spec::*;

use across::check_across_apps;
use app::{Partial, app_spec, check_app_name};
pub(crate) use checker::Checker;
use checker::join;
use daemon::daemon_spec;
use sockets::{check_sockets_against_apps, sockets_spec};

const TOP_KEYS: &[&str] = &["daemon", "defaults", "apps", "sockets", "registries"];

/// Validate a merged document. `Err` carries every problem found.
pub(crate) fn validate(
    sources: &Sources,
    doc: &Table,
    env: &Environment,
) -> Result<Policy, Vec<Diagnostic>> {
    let mut cx = Checker::new(sources);
    cx.check_keys(doc, "", TOP_KEYS);

    let empty = Table::default();
    let daemon_table = doc
        .get("daemon")
        .and_then(|e| cx.table(&e.value, "daemon"))
        .unwrap_or(&empty);
    let daemon = daemon_spec(&mut cx, daemon_table, env);

    let defaults_entry = doc.get("defaults");
    let defaults_table = defaults_entry
        .and_then(|e| cx.table(&e.value, "defaults"))
        .cloned()
        .unwrap_or_default();
    // Check `[defaults]` on its own once, so its mistakes are reported at
    // their own line under their own name.
    if let Some(entry) = defaults_entry {
        let _ = app_spec(
            &mut cx,
            "defaults",
            "defaults",
            entry.key_at,
            &defaults_table,
            Partial::Yes,
        );
    }

    let mut apps = BTreeMap::new();
    let mut app_names_at = Vec::new();
    if let Some(entry) = doc.get("apps")
        && let Some(table) = cx.table(&entry.value, "apps")
    {
        for app in &table.entries {
            let path = join("apps", &app.key);
            if let Err(why) = check_app_name(&app.key) {
                cx.error(app.key_at, &path, why);
                continue;
            }
            let Some(own) = cx.table(&app.value, &path) else {
                continue;
            };
            let mut merged = defaults_table.clone();
            merged.merge(own.clone());
            if let Some(spec) = app_spec(&mut cx, &app.key, &path, app.key_at, &merged, Partial::No)
            {
                app_names_at.push((app.key.clone(), merged));
                apps.insert(app.key.clone(), spec);
            }
        }
    }

    check_across_apps(&mut cx, &apps, &app_names_at);
    let sockets = sockets_spec(&mut cx, doc);
    check_sockets_against_apps(&mut cx, doc, &sockets, &apps);
    let registries = registries::registries_spec(&mut cx, doc);

    if cx.error_count() > 0 {
        return Err(cx.into_diagnostics());
    }
    let daemon = daemon.expect("daemon spec exists when there are no errors");
    Ok(Policy {
        sources: sources.paths().map(Path::to_path_buf).collect(),
        daemon,
        apps,
        sockets,
        registries,
    })
}

/// Validate only the `[sockets]` table of a merged document (for
/// `corral-generator`, which must not depend on the apps' module files being
/// readable at early boot). `Err` carries every problem found there.
pub(crate) fn validate_sockets(
    sources: &Sources,
    doc: &Table,
) -> Result<BTreeMap<String, SocketSpec>, Vec<Diagnostic>> {
    let mut cx = Checker::new(sources);
    let sockets = sockets_spec(&mut cx, doc);
    if cx.error_count() > 0 {
        return Err(cx.into_diagnostics());
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::{APP_KEYS, DIR_KEYS, NETWORK_KEYS};
    use daemon::DAEMON_KEYS;
    use sockets::SOCKET_KEYS;
    use tables::{LIMIT_KEYS, POOL_KEYS, RESTART_KEYS, SANDBOX_KEYS};

    /// docs/policy.md names every key the validator accepts, so a key
    /// added here cannot go undocumented.
    #[test]
    fn every_key_is_in_the_reference() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.md"))
                .expect("docs/policy.md");
        let nested: [(&str, &[&str]); 6] = [
            ("network.", NETWORK_KEYS),
            ("pool.", POOL_KEYS),
            ("limits.", LIMIT_KEYS),
            ("sandbox.", SANDBOX_KEYS),
            ("restart.", RESTART_KEYS),
            ("dirs[].", DIR_KEYS),
        ];
        // A table key is documented through its sub-keys (`pool.max`).
        let is_table = |k: &&str| {
            nested
                .iter()
                .any(|(prefix, _)| prefix.trim_end_matches('.') == *k)
        };
        let mut keys: Vec<String> = DAEMON_KEYS
            .iter()
            .chain(APP_KEYS.iter().filter(|k| !is_table(k)))
            .map(|k| k.to_string())
            .collect();
        for (prefix, list) in nested {
            keys.extend(list.iter().map(|k| format!("{prefix}{k}")));
        }
        keys.extend(SOCKET_KEYS.iter().map(|k| format!("sockets.NAME.{k}")));
        keys.extend(
            registries::REGISTRY_KEYS
                .iter()
                .map(|k| format!("registries.HOST.{k}")),
        );
        for key in keys {
            assert!(
                doc.contains(&format!("`{key}`")),
                "docs/policy.md does not document `{key}`"
            );
        }
    }
}
