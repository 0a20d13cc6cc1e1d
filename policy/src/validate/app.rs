//! One `[apps.NAME]` table (or `[defaults]`) and its lists: listen, env,
//! dirs, network; the sub-tables are in [`super::tables`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::checker::{Checker, join};
use super::tables::{limits_spec, pool_spec, restart_spec, sandbox_spec};
use crate::addr::{parse_connect, parse_listen};
use crate::oci::OciRef;
use crate::parse::normalize_guest_path;
use crate::source::{Loc, Node, NodeKind, Table};
use crate::spec::*;

pub(super) const APP_KEYS: &[&str] = &[
    "module",
    "kind",
    "listen",
    "args",
    "env",
    "inherit-env",
    "dirs",
    "network",
    "pool",
    "limits",
    "sandbox",
    "restart",
];
pub(super) const DIR_KEYS: &[&str] = &["host", "guest", "access"];
pub(super) const NETWORK_KEYS: &[&str] = &["connect"];
pub(super) const KINDS: &[(&str, AppKind)] = &[
    ("http", AppKind::Http),
    ("stdio", AppKind::Stdio),
    ("command", AppKind::Command),
];
pub(super) const ACCESSES: &[(&str, Access)] =
    &[("ro", Access::ReadOnly), ("rw", Access::ReadWrite)];

pub(crate) fn check_app_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.len() > 64 || !ok_chars || !ok_start {
        return Err(format!(
            "`{name}` is not a valid app name: use 1 to 64 letters, digits, `-` or `_`, starting with a letter or digit"
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Partial {
    /// `[defaults]`: keys may be missing; kind-specific rules wait for the app.
    Yes,
    No,
}

/// Check one app table (or `[defaults]`); `Some` only if it had no problem.
pub(super) fn app_spec(
    cx: &mut Checker<'_>,
    name: &str,
    path: &str,
    header: Loc,
    t: &Table,
    partial: Partial,
) -> Option<AppSpec> {
    cx.check_keys(t, path, APP_KEYS);
    let before = cx.error_count();
    let key = |k: &str| join(path, k);
    let missing = |cx: &mut Checker<'_>, k: &str, what: &str| {
        if partial == Partial::No {
            cx.error(header, &join(path, k), format!("missing: {what}"));
        }
    };

    let module = match t.get("module") {
        Some(e) => cx.string(&e.value, &key("module")).and_then(|m| {
            // `oci://...`: no file yet (corrald resolves and fetches it).
            let checked = if OciRef::is_reference(m) {
                OciRef::parse(m).map(|r| (PathBuf::new(), Some(r)))
            } else {
                check_module(m, cx.resolve(e.value.at, m)).map(|p| (p, None))
            };
            match checked {
                Ok(module) => Some(module),
                Err(why) => {
                    cx.error(e.value.at, &key("module"), why);
                    None
                }
            }
        }),
        None => {
            missing(
                cx,
                "module",
                "the path of the .wasm or .wat file (relative to this policy file), or an oci:// reference",
            );
            None
        }
    };

    let kind = match t.get("kind") {
        Some(e) => cx.one_of(&e.value, &key("kind"), KINDS),
        None => {
            missing(cx, "kind", "one of \"http\", \"stdio\", \"command\"");
            None
        }
    };

    let listen = match t.get("listen") {
        Some(e) => listen_addrs(cx, &e.value, &key("listen")),
        None => Some(Vec::new()),
    };
    if partial == Partial::No
        && let (Some(kind), Some(list)) = (kind, &listen)
        && let Err(why) = check_listen_for_kind(kind, list)
    {
        let at = t
            .get("listen")
            .map(|e| e.value.at)
            .or_else(|| t.get("kind").map(|e| e.value.at));
        cx.error(at.unwrap_or(header), &key("listen"), why);
    }

    let args = t
        .get("args")
        .map_or(Some(Vec::new()), |e| cx.strings(&e.value, &key("args")));
    let env = t.get("env").map_or(Some(BTreeMap::new()), |e| {
        env_table(cx, &e.value, &key("env"))
    });
    let inherit_env = t.get("inherit-env").map_or(Some(Vec::new()), |e| {
        let names = cx.strings(&e.value, &key("inherit-env"))?;
        match check_inherit_env(&names) {
            Ok(()) => Some(names),
            Err(why) => {
                cx.error(e.value.at, &key("inherit-env"), why);
                None
            }
        }
    });
    let dirs = t
        .get("dirs")
        .map_or(Some(Vec::new()), |e| dir_grants(cx, &e.value, &key("dirs")));
    let network = t.get("network").map_or(Some(NetworkSpec::default()), |e| {
        network_spec(cx, &e.value, &key("network"))
    });
    let pool = pool_spec(cx, t.get("pool").map(|e| &e.value), &key("pool"), kind);
    let limits = limits_spec(cx, t.get("limits").map(|e| &e.value), &key("limits"), kind);
    let sandbox = sandbox_spec(cx, t.get("sandbox").map(|e| &e.value), &key("sandbox"));
    let restart = restart_spec(cx, t.get("restart").map(|e| &e.value), &key("restart"));

    if cx.error_count() != before || partial == Partial::Yes {
        return None;
    }
    let (module, oci) = module?;
    Some(AppSpec {
        name: name.to_string(),
        module,
        oci,
        kind: kind?,
        listen: listen?,
        args: args?,
        env: env?,
        inherit_env: inherit_env?,
        dirs: dirs?,
        network: network?,
        pool: pool?,
        limits: limits?,
        sandbox: sandbox?,
        restart: restart?,
    })
}

fn listen_addrs(cx: &mut Checker<'_>, node: &Node, path: &str) -> Option<Vec<ListenAddr>> {
    let items = cx.array(node, path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(text) = cx.string(item, &item_path) else {
            ok = false;
            continue;
        };
        match parse_listen(text) {
            Ok(addr) if out.contains(&addr) => {
                cx.error(item.at, &item_path, listed_twice(text));
                ok = false;
            }
            Ok(addr) => out.push(addr),
            Err(why) => {
                cx.error(item.at, &item_path, why);
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

/// A module path as written (`written`) and resolved: not empty, a file.
pub(crate) fn check_module(written: &str, resolved: PathBuf) -> Result<PathBuf, String> {
    if written.is_empty() {
        return Err("must not be empty".to_string());
    }
    if !resolved.is_file() {
        let why = if resolved.exists() {
            "is not a file"
        } else {
            "does not exist"
        };
        return Err(format!(
            "`{written}` {why} (looked at {})",
            resolved.display()
        ));
    }
    Ok(resolved)
}

/// An http or stdio app is reached through its listen addresses, so it
/// needs at least one.
pub(crate) fn check_listen_for_kind(kind: AppKind, listen: &[ListenAddr]) -> Result<(), String> {
    match kind {
        AppKind::Http | AppKind::Stdio if listen.is_empty() => Err(format!(
            "an {kind} app needs at least one listen address, e.g. listen = [\"127.0.0.1:8080\"]"
        )),
        _ => Ok(()),
    }
}

/// The message for an address given twice in one app's `listen`.
pub(crate) fn listed_twice(written: &str) -> String {
    format!("`{written}` is listed twice")
}

/// The name of an `env` entry.
pub(crate) fn check_env_name(name: &str) -> Result<(), String> {
    if is_env_name(name) {
        Ok(())
    } else {
        Err("not a valid environment variable name (empty, or contains `=`)".to_string())
    }
}

/// The value of an `env` entry.
pub(crate) fn check_env_value(value: &str) -> Result<(), String> {
    if value.contains('\0') {
        Err("an environment value may not contain NUL".to_string())
    } else {
        Ok(())
    }
}

/// `inherit-env`: names of host variables.
pub(crate) fn check_inherit_env(names: &[String]) -> Result<(), String> {
    let bad: Vec<_> = names.iter().filter(|n| !is_env_name(n)).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("{bad:?}: not valid environment variable names"))
    }
}

/// The message for a guest path granted twice in one app's `dirs`.
pub(crate) fn granted_twice(guest: &str) -> String {
    format!("`{guest}` is granted twice")
}

fn env_table(cx: &mut Checker<'_>, node: &Node, path: &str) -> Option<BTreeMap<String, String>> {
    let t = cx.table(node, path)?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in &t.entries {
        let p = join(path, &e.key);
        if let Err(why) = check_env_name(&e.key) {
            cx.error(e.key_at, &p, why);
            ok = false;
            continue;
        }
        match &e.value.kind {
            NodeKind::Str(s) => match check_env_value(s) {
                Ok(()) => {
                    out.insert(e.key.clone(), s.clone());
                }
                Err(why) => {
                    cx.error(e.value.at, &p, why);
                    ok = false;
                }
            },
            other => {
                cx.error(
                    e.value.at,
                    &p,
                    format!(
                        "expected a string, found {}: quote it, e.g. {} = \"...\"",
                        other.type_name(),
                        e.key
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn dir_grants(cx: &mut Checker<'_>, node: &Node, path: &str) -> Option<Vec<DirGrant>> {
    let items = cx.array(node, path)?;
    let mut out: Vec<DirGrant> = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Some(t) = cx.table(item, &p) else {
            ok = false;
            continue;
        };
        cx.check_keys(t, &p, DIR_KEYS);
        let before = cx.error_count();
        let host = match t.get("host") {
            Some(e) => cx.string(&e.value, &join(&p, "host")).and_then(|h| {
                let resolved = cx.resolve(e.value.at, h);
                if resolved.is_dir() {
                    Some(resolved)
                } else {
                    let why = if resolved.exists() {
                        "is not a directory"
                    } else {
                        "does not exist"
                    };
                    cx.error(
                        e.value.at,
                        &join(&p, "host"),
                        format!("`{h}` {why} (looked at {})", resolved.display()),
                    );
                    None
                }
            }),
            None => {
                cx.error(
                    item.at,
                    &join(&p, "host"),
                    "missing: the host directory to grant",
                );
                None
            }
        };
        let guest = match t.get("guest") {
            Some(e) => cx.string(&e.value, &join(&p, "guest")).and_then(|g| {
                match normalize_guest_path(g) {
                    Ok(g) => Some((g, e.value.at)),
                    Err(why) => {
                        cx.error(e.value.at, &join(&p, "guest"), why);
                        None
                    }
                }
            }),
            None => {
                cx.error(
                    item.at,
                    &join(&p, "guest"),
                    "missing: the absolute path the guest sees, e.g. \"/data\"",
                );
                None
            }
        };
        let access = t.get("access").map_or(Some(Access::ReadOnly), |e| {
            cx.one_of(&e.value, &join(&p, "access"), ACCESSES)
        });
        if let Some((g, at)) = &guest
            && out.iter().any(|d| &d.guest == g)
        {
            cx.error(*at, &join(&p, "guest"), granted_twice(g));
        }
        match (host, guest, access) {
            (Some(host), Some((guest, _)), Some(access)) if cx.error_count() == before => {
                out.push(DirGrant {
                    host,
                    guest,
                    access,
                });
            }
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

fn network_spec(cx: &mut Checker<'_>, node: &Node, path: &str) -> Option<NetworkSpec> {
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, NETWORK_KEYS);
    let Some(e) = t.get("connect") else {
        return Some(NetworkSpec::default());
    };
    let p = join(path, "connect");
    let items = cx.array(&e.value, &p)?;
    let mut connect = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let ip = format!("{p}[{i}]");
        let Some(text) = cx.string(item, &ip) else {
            ok = false;
            continue;
        };
        match parse_connect(text) {
            Ok(target) => connect.push(target),
            Err(why) => {
                cx.error(item.at, &ip, why);
                ok = false;
            }
        }
    }
    ok.then_some(NetworkSpec { connect })
}
