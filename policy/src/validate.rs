//! From the merged value tree to a [`Policy`]: every key is checked for
//! type, range and meaning, and every problem is collected as a
//! [`Diagnostic`] (we walk the tree ourselves rather than use serde's
//! `deny_unknown_fields`, which stops at the first error).
//!
//! `[defaults]` is checked once on its own (as a partial app), then merged
//! under each app; a problem in `[defaults]` is reported once, at its line,
//! not once per app.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Environment;
use crate::defaults;
use crate::error::Diagnostic;
use crate::source::{Entry, Loc, Node, NodeKind, Sources, Table};
use crate::spec::*;

/// Collects diagnostics, each at most once per (place, message).
pub(crate) struct Checker<'s> {
    sources: &'s Sources,
    found: Vec<(Loc, String, String)>,
    seen: HashSet<(Loc, String)>,
}

impl<'s> Checker<'s> {
    pub(crate) fn new(sources: &'s Sources) -> Self {
        Checker {
            sources,
            found: Vec::new(),
            seen: HashSet::new(),
        }
    }

    pub(crate) fn error(&mut self, at: Loc, key: &str, message: impl Into<String>) {
        let message = message.into();
        if self.seen.insert((at, message.clone())) {
            self.found.push((at, key.to_string(), message));
        }
    }

    fn error_count(&self) -> usize {
        self.found.len()
    }

    pub(crate) fn into_diagnostics(mut self) -> Vec<Diagnostic> {
        self.found.sort_by_key(|(at, _, _)| (at.file, at.start));
        self.found
            .into_iter()
            .map(|(at, key, message)| {
                let (line, column) = self.sources.line_col(at);
                Diagnostic {
                    file: self.sources.file(at.file).path.clone(),
                    line,
                    column,
                    key,
                    message,
                }
            })
            .collect()
    }

    /// The directory of the file a value was written in: relative paths in
    /// a policy are relative to it.
    fn base_dir(&self, at: Loc) -> PathBuf {
        let path = &self.sources.file(at.file).path;
        let dir = path.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
    }

    /// Resolve a path written in the policy against the directory of the
    /// file that wrote it, lexically cleaned (`a/../b` is `b`).
    fn resolve(&self, at: Loc, written: &str) -> PathBuf {
        clean_path(&self.base_dir(at).join(written))
    }

    /// Report keys of `table` that are not in `allowed`, with a suggestion.
    fn check_keys(&mut self, table: &Table, path: &str, allowed: &[&str]) {
        for entry in &table.entries {
            if !allowed.contains(&entry.key.as_str()) {
                let hint = match closest(&entry.key, allowed) {
                    Some(near) => format!("did you mean `{near}`? "),
                    None => String::new(),
                };
                self.error(
                    entry.key_at,
                    &join(path, &entry.key),
                    format!("unknown key; {hint}allowed here: {}", allowed.join(", ")),
                );
            }
        }
    }

    fn table<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n Table> {
        match &node.kind {
            NodeKind::Table(t) => Some(t),
            other => {
                self.error(
                    node.at,
                    path,
                    format!("expected a table, found {}", other.type_name()),
                );
                None
            }
        }
    }

    fn string<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n str> {
        match &node.kind {
            NodeKind::Str(s) => Some(s),
            other => {
                self.error(
                    node.at,
                    path,
                    format!("expected a string, found {}", other.type_name()),
                );
                None
            }
        }
    }

    fn array<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.kind {
            NodeKind::Array(items) => Some(items),
            other => {
                self.error(
                    node.at,
                    path,
                    format!("expected an array, found {}", other.type_name()),
                );
                None
            }
        }
    }

    fn strings(&mut self, node: &Node, path: &str) -> Option<Vec<String>> {
        let items = self.array(node, path)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(item, &format!("{path}[{i}]")) {
                Some(s) => out.push(s.to_string()),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn integer(&mut self, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
        match &node.kind {
            NodeKind::Int(n) if (min..=max).contains(n) => Some(*n),
            NodeKind::Int(n) if *n < min => {
                self.error(
                    node.at,
                    path,
                    format!("{n} is too small: must be at least {min}"),
                );
                None
            }
            NodeKind::Int(n) => {
                self.error(
                    node.at,
                    path,
                    format!("{n} is too large: must be at most {max}"),
                );
                None
            }
            other => {
                self.error(
                    node.at,
                    path,
                    format!("expected an integer, found {}", other.type_name()),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let text = self.string(node, path)?;
        match parse_duration(text) {
            Ok(d) => Some(d),
            Err(why) => {
                self.error(node.at, path, why);
                None
            }
        }
    }

    /// A duration, or `"off"` (`None` inside the `Some`).
    fn duration_or_off(&mut self, node: &Node, path: &str) -> Option<Option<Duration>> {
        match &node.kind {
            NodeKind::Str(s) if s == "off" => Some(None),
            _ => self.duration(node, path).map(Some),
        }
    }

    /// A size: an integer number of bytes, or a string with a unit.
    fn size(&mut self, node: &Node, path: &str) -> Option<u64> {
        match &node.kind {
            NodeKind::Int(n) if *n >= 0 => Some(*n as u64),
            NodeKind::Int(n) => {
                self.error(
                    node.at,
                    path,
                    format!("{n} is negative: a size is a number of bytes"),
                );
                None
            }
            NodeKind::Str(s) => match s.trim().parse::<bytesize::ByteSize>() {
                Ok(size) => Some(size.as_u64()),
                Err(_) => {
                    self.error(
                        node.at,
                        path,
                        format!("`{s}` is not a size: use bytes or a number with a unit, e.g. \"128MiB\", \"1GiB\", \"512KiB\""),
                    );
                    None
                }
            },
            other => {
                self.error(
                    node.at,
                    path,
                    format!(
                        "expected a size (e.g. \"128MiB\"), found {}",
                        other.type_name()
                    ),
                );
                None
            }
        }
    }

    fn one_of<T: Copy>(&mut self, node: &Node, path: &str, choices: &[(&str, T)]) -> Option<T> {
        let text = self.string(node, path)?;
        match choices.iter().find(|(name, _)| *name == text) {
            Some((_, value)) => Some(*value),
            None => {
                let names: Vec<_> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.error(
                    node.at,
                    path,
                    format!("`{text}` is not allowed: use one of {}", names.join(", ")),
                );
                None
            }
        }
    }
}

/// Remove `.` and resolve `..` lexically, as systemd does for unit paths.
pub(crate) fn clean_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The allowed key nearest to a typo, if it is near enough to be a typo.
fn closest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) => Ok(d),
        Err(_) => Err(format!(
            "`{text}` is not a duration: use a number with a unit, e.g. \"100ms\", \"30s\", \"5m\", \"1h\""
        )),
    }
}

/// Check a guest path: absolute, no `..`, normalized (`//` and `.` removed).
pub(crate) fn normalize_guest_path(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!(
            "`{text}` is relative: a guest path must be absolute, e.g. \"/data\""
        ));
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "`{text}` contains `..`: a guest path may not climb out"
                ));
            }
            p if p.contains('\0') => return Err("a guest path may not contain NUL".to_string()),
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

const TOP_KEYS: &[&str] = &["daemon", "defaults", "apps", "sockets"];
const SOCKET_KEYS: &[&str] = &["listen"];
const DAEMON_KEYS: &[&str] = &[
    "cache-dir",
    "state-dir",
    "api-socket",
    "api-group",
    "idle-exit",
    "metrics",
    "drain-timeout",
];
const APP_KEYS: &[&str] = &[
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
const DIR_KEYS: &[&str] = &["host", "guest", "access"];
const NETWORK_KEYS: &[&str] = &["connect"];
const POOL_KEYS: &[&str] = &[
    "min",
    "max",
    "idle-timeout",
    "concurrency",
    "max-requests",
    "zygote",
];
const ZYGOTE_MODES: &[(&str, ZygoteMode)] = &[
    ("on-demand", ZygoteMode::OnDemand),
    ("kept", ZygoteMode::Kept),
];
const LIMIT_KEYS: &[&str] = &["memory", "timeout", "instances", "tables", "stdout"];
const SANDBOX_KEYS: &[&str] = &["landlock", "seccomp"];
const RESTART_KEYS: &[&str] = &["on", "backoff", "give-up"];

const KINDS: &[(&str, AppKind)] = &[
    ("http", AppKind::Http),
    ("stdio", AppKind::Stdio),
    ("command", AppKind::Command),
];
const ENFORCEMENTS: &[(&str, Enforcement)] = &[
    ("require", Enforcement::Require),
    ("best-effort", Enforcement::BestEffort),
    ("off", Enforcement::Off),
];
const ACCESSES: &[(&str, Access)] = &[("ro", Access::ReadOnly), ("rw", Access::ReadWrite)];
const RESTART_ONS: &[(&str, RestartOn)] = &[
    ("always", RestartOn::Always),
    ("failure", RestartOn::Failure),
    ("never", RestartOn::Never),
];

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

    if cx.error_count() > 0 {
        return Err(cx.into_diagnostics());
    }
    let daemon = daemon.expect("daemon spec exists when there are no errors");
    Ok(Policy {
        sources: sources.paths().map(Path::to_path_buf).collect(),
        daemon,
        apps,
        sockets,
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

/// The `[sockets.NAME]` tables, each checked on its own.
fn sockets_spec(cx: &mut Checker<'_>, doc: &Table) -> BTreeMap<String, SocketSpec> {
    let mut sockets = BTreeMap::new();
    let Some(entry) = doc.get("sockets") else {
        return sockets;
    };
    let Some(table) = cx.table(&entry.value, "sockets") else {
        return sockets;
    };
    for socket in &table.entries {
        let path = join("sockets", &socket.key);
        // The name becomes part of a unit name (`corral-NAME.socket`), so it
        // follows the app-name rules rather than FileDescriptorName='s looser ones.
        if check_app_name(&socket.key).is_err() {
            cx.error(
                socket.key_at,
                &path,
                format!(
                    "`{}` is not a valid socket name: use 1 to 64 letters, digits, `-` or `_`, starting with a letter or digit (it names the unit corral-NAME.socket)",
                    socket.key
                ),
            );
            continue;
        }
        let Some(t) = cx.table(&socket.value, &path) else {
            continue;
        };
        cx.check_keys(t, &path, SOCKET_KEYS);
        let listen_path = join(&path, "listen");
        let Some(listen) = t.get("listen") else {
            cx.error(
                socket.key_at,
                &listen_path,
                "missing: the address systemd listens on, e.g. listen = \"127.0.0.1:8080\" or \"unix:/run/web.sock\"",
            );
            continue;
        };
        let Some(text) = cx.string(&listen.value, &listen_path) else {
            continue;
        };
        match parse_listen(text) {
            Ok(ListenAddr::Systemd(_)) => cx.error(
                listen.value.at,
                &listen_path,
                format!("`{text}`: a socket's address is \"IP:PORT\", \"[IPv6]:PORT\" or \"unix:/path\"; `systemd:NAME` belongs in an app's listen"),
            ),
            Ok(addr) => {
                sockets.insert(socket.key.clone(), SocketSpec { listen: addr });
            }
            Err(why) => cx.error(listen.value.at, &listen_path, why),
        }
    }
    sockets
}

/// Each `[sockets.NAME]` is used by an app (`listen = ["systemd:NAME"]`),
/// and its address is not one an app binds itself.
fn check_sockets_against_apps(
    cx: &mut Checker<'_>,
    doc: &Table,
    sockets: &BTreeMap<String, SocketSpec>,
    apps: &BTreeMap<String, AppSpec>,
) {
    let Some(NodeKind::Table(table)) = doc.get("sockets").map(|e| &e.value.kind) else {
        return;
    };
    let mut claimed: Vec<(&str, &ListenAddr)> = Vec::new();
    for (name, socket) in sockets {
        let Some(entry) = table.get(name) else {
            continue;
        };
        let path = join("sockets", name);
        let wanted = ListenAddr::Systemd(name.clone());
        // Also the raw tables: an app with another mistake is not in `apps`,
        // and one error about it is enough.
        let written = format!("systemd:{name}");
        let in_raw = |app: &Entry| match &app.value.kind {
            NodeKind::Table(t) => match t.get("listen").map(|l| &l.value.kind) {
                Some(NodeKind::Array(items)) => items
                    .iter()
                    .any(|i| matches!(&i.kind, NodeKind::Str(s) if *s == written)),
                _ => false,
            },
            _ => false,
        };
        let raw_apps: &[Entry] = match doc.get("apps").map(|e| &e.value.kind) {
            Some(NodeKind::Table(t)) => &t.entries,
            _ => &[],
        };
        if !apps.values().any(|app| app.listen.contains(&wanted)) && !raw_apps.iter().any(in_raw) {
            cx.error(
                entry.key_at,
                &path,
                format!("no app listens on \"systemd:{name}\": add it to an app's listen, or remove this socket"),
            );
        }
        let at = match &entry.value.kind {
            NodeKind::Table(t) => t.get("listen").map_or(entry.key_at, |l| l.value.at),
            _ => entry.key_at,
        };
        let listen_path = join(&path, "listen");
        for (app_name, app) in apps {
            if let Some(other) = app
                .listen
                .iter()
                .find(|a| listen_overlaps(&socket.listen, a))
            {
                cx.error(
                    at,
                    &listen_path,
                    format!("`{}` overlaps `{other}` of app `{app_name}`", socket.listen),
                );
            }
        }
        if let Some((other_name, other)) = claimed
            .iter()
            .find(|(_, other)| listen_overlaps(&socket.listen, other))
        {
            cx.error(
                at,
                &listen_path,
                format!(
                    "`{}` overlaps `{other}` of socket `{other_name}`",
                    socket.listen
                ),
            );
        }
        claimed.push((name, &socket.listen));
    }
}

fn check_app_name(name: &str) -> Result<(), String> {
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

fn daemon_spec(cx: &mut Checker<'_>, t: &Table, env: &Environment) -> Option<DaemonSpec> {
    cx.check_keys(t, "daemon", DAEMON_KEYS);
    let before = cx.error_count();
    let path_of = |cx: &mut Checker<'_>, key: &str, default: PathBuf| -> PathBuf {
        match t.get(key) {
            Some(e) => match cx.string(&e.value, &join("daemon", key)) {
                Some("") => {
                    cx.error(e.value.at, &join("daemon", key), "must not be empty");
                    default
                }
                Some(s) => cx.resolve(e.value.at, s),
                None => default,
            },
            None => default,
        }
    };
    let cache_dir = path_of(
        cx,
        "cache-dir",
        env.cache_directory
            .clone()
            .unwrap_or_else(|| defaults::CACHE_DIR.into()),
    );
    let state_dir = path_of(
        cx,
        "state-dir",
        env.state_directory
            .clone()
            .unwrap_or_else(|| defaults::STATE_DIR.into()),
    );
    let api_socket = path_of(
        cx,
        "api-socket",
        env.runtime_directory
            .as_ref()
            .map(|d| d.join("api.sock"))
            .unwrap_or_else(|| defaults::API_SOCKET.into()),
    );
    let api_group = match t.get("api-group") {
        Some(e) => match cx.string(&e.value, "daemon.api-group") {
            Some(g) if is_valid_group_name(g) => g.to_string(),
            Some(g) => {
                cx.error(
                    e.value.at,
                    "daemon.api-group",
                    format!("`{g}` is not a valid group name"),
                );
                String::new()
            }
            None => String::new(),
        },
        None => defaults::API_GROUP.to_string(),
    };
    let idle_exit = match t.get("idle-exit") {
        Some(e) => cx.duration_or_off(&e.value, "daemon.idle-exit").flatten(),
        None => None,
    };
    let metrics = match t.get("metrics") {
        Some(e) => match cx.string(&e.value, "daemon.metrics") {
            Some("off") => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    cx.error(e.value.at, "daemon.metrics", format!("`{s}` is not an address: use \"IP:PORT\" (e.g. \"127.0.0.1:9464\") or \"off\""));
                    None
                }
            },
            None => None,
        },
        None => None,
    };
    let drain_timeout = match t.get("drain-timeout") {
        Some(e) => cx
            .duration(&e.value, "daemon.drain-timeout")
            .unwrap_or(defaults::DRAIN_TIMEOUT),
        None => defaults::DRAIN_TIMEOUT,
    };
    (cx.error_count() == before).then_some(DaemonSpec {
        cache_dir,
        state_dir,
        api_socket,
        api_group,
        idle_exit,
        metrics,
        drain_timeout,
    })
}

fn is_valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Partial {
    /// `[defaults]`: keys may be missing; kind-specific rules wait for the app.
    Yes,
    No,
}

/// Check one app table (or `[defaults]`); `Some` only if it had no problem.
fn app_spec(
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
            let resolved = cx.resolve(e.value.at, m);
            if m.is_empty() {
                cx.error(e.value.at, &key("module"), "must not be empty");
                None
            } else if !resolved.is_file() {
                let why = if resolved.exists() {
                    "is not a file"
                } else {
                    "does not exist"
                };
                cx.error(
                    e.value.at,
                    &key("module"),
                    format!("`{m}` {why} (looked at {})", resolved.display()),
                );
                None
            } else {
                Some(resolved)
            }
        }),
        None => {
            missing(
                cx,
                "module",
                "the path of the .wasm or .wat file (relative to this policy file)",
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
        && let (Some(kind @ (AppKind::Http | AppKind::Stdio)), Some(list)) = (kind, &listen)
        && list.is_empty()
    {
        let at = t
            .get("listen")
            .map(|e| e.value.at)
            .or_else(|| t.get("kind").map(|e| e.value.at));
        cx.error(
            at.unwrap_or(header),
            &key("listen"),
            format!("an {kind} app needs at least one listen address, e.g. listen = [\"127.0.0.1:8080\"]"),
        );
    }

    let args = t
        .get("args")
        .map_or(Some(Vec::new()), |e| cx.strings(&e.value, &key("args")));
    let env = t.get("env").map_or(Some(BTreeMap::new()), |e| {
        env_table(cx, &e.value, &key("env"))
    });
    let inherit_env = t.get("inherit-env").map_or(Some(Vec::new()), |e| {
        let names = cx.strings(&e.value, &key("inherit-env"))?;
        let bad: Vec<_> = names.iter().filter(|n| !is_env_name(n)).collect();
        if bad.is_empty() {
            Some(names)
        } else {
            cx.error(
                e.value.at,
                &key("inherit-env"),
                format!("{bad:?}: not valid environment variable names"),
            );
            None
        }
    });
    let dirs = t
        .get("dirs")
        .map_or(Some(Vec::new()), |e| dir_grants(cx, &e.value, &key("dirs")));
    let network = t.get("network").map_or(Some(NetworkSpec::default()), |e| {
        network_spec(cx, &e.value, &key("network"))
    });
    let pool = pool_spec(cx, t.get("pool").map(|e| &e.value), &key("pool"));
    let limits = limits_spec(cx, t.get("limits").map(|e| &e.value), &key("limits"), kind);
    let sandbox = sandbox_spec(cx, t.get("sandbox").map(|e| &e.value), &key("sandbox"));
    let restart = restart_spec(cx, t.get("restart").map(|e| &e.value), &key("restart"));

    if cx.error_count() != before || partial == Partial::Yes {
        return None;
    }
    Some(AppSpec {
        name: name.to_string(),
        module: module?,
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
                cx.error(item.at, &item_path, format!("`{text}` is listed twice"));
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

pub(crate) fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!(
                "`{text}`: a unix socket path must be absolute, e.g. \"unix:/run/app.sock\""
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Some(name) = text.strip_prefix("systemd:") {
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.chars().all(|c| c.is_ascii_graphic() && c != ':');
        if !ok {
            return Err(format!(
                "`{text}`: a systemd socket name is 1 to 255 printable characters without `:` (the unit's FileDescriptorName=)"
            ));
        }
        return Ok(ListenAddr::Systemd(name.to_string()));
    }
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => Err(format!(
            "`{text}`: port 0 is not allowed: name the port to listen on"
        )),
        Ok(addr) => Ok(ListenAddr::Tcp(addr)),
        Err(_) => Err(format!(
            "`{text}` is not a listen address: use \"IP:PORT\", \"[IPv6]:PORT\", \"unix:/path\" or \"systemd:NAME\""
        )),
    }
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

fn env_table(cx: &mut Checker<'_>, node: &Node, path: &str) -> Option<BTreeMap<String, String>> {
    let t = cx.table(node, path)?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for e in &t.entries {
        let p = join(path, &e.key);
        if !is_env_name(&e.key) {
            cx.error(
                e.key_at,
                &p,
                "not a valid environment variable name (empty, or contains `=`)",
            );
            ok = false;
            continue;
        }
        match &e.value.kind {
            NodeKind::Str(s) if s.contains('\0') => {
                cx.error(e.value.at, &p, "an environment value may not contain NUL");
                ok = false;
            }
            NodeKind::Str(s) => {
                out.insert(e.key.clone(), s.clone());
            }
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
            cx.error(*at, &join(&p, "guest"), format!("`{g}` is granted twice"));
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

pub(crate) fn parse_connect(text: &str) -> Result<ConnectTarget, String> {
    let bad = || {
        format!(
            "`{text}` is not a connect target: use \"IP:PORT\", \"[IPv6]:PORT\" or \"HOSTNAME:PORT\""
        )
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("`{text}`: port 0 is not a port one can connect to"));
        }
        return Ok(ConnectTarget {
            host: ConnectHost::Ip(addr.ip()),
            port: addr.port(),
        });
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("`{text}`: port 0 is not a port one can connect to"));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(bad());
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_name {
        return Err(bad());
    }
    Ok(ConnectTarget {
        host: ConnectHost::Name(host.to_ascii_lowercase()),
        port,
    })
}

fn pool_spec(cx: &mut Checker<'_>, node: Option<&Node>, path: &str) -> Option<PoolSpec> {
    let mut pool = defaults::POOL;
    let Some(node) = node else { return Some(pool) };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, POOL_KEYS);
    let before = cx.error_count();
    let max_ok;
    if let Some(e) = t.get("max") {
        match cx.integer(&e.value, &join(path, "max"), 1, defaults::POOL_MAX_LIMIT) {
            Some(n) => {
                pool.max = n as u32;
                max_ok = true;
            }
            None => max_ok = false,
        }
    } else {
        max_ok = true;
    }
    let min_ok = match t.get("min") {
        Some(e) => match cx.integer(&e.value, &join(path, "min"), 0, defaults::POOL_MAX_LIMIT) {
            Some(n) => {
                pool.min = n as u32;
                true
            }
            None => false,
        },
        None => true,
    };
    if max_ok && min_ok && pool.max < pool.min {
        // Point at whichever of the two this table set (max if both).
        let (at, key, msg) = match (t.get("max"), t.get("min")) {
            (Some(e), _) => (
                e.value.at,
                "max",
                format!("{} is below pool.min ({})", pool.max, pool.min),
            ),
            (None, Some(e)) => (
                e.value.at,
                "min",
                format!(
                    "{} is above pool.max ({}, the default): raise pool.max too",
                    pool.min, pool.max
                ),
            ),
            (None, None) => unreachable!("defaults have min <= max"),
        };
        cx.error(at, &join(path, key), msg);
    }
    if let Some(e) = t.get("idle-timeout")
        && let Some(d) = cx.duration(&e.value, &join(path, "idle-timeout"))
    {
        pool.idle_timeout = d;
    }
    if let Some(e) = t.get("concurrency")
        && let Some(n) = cx.integer(&e.value, &join(path, "concurrency"), 1, 1 << 20)
    {
        pool.concurrency = n as u32;
    }
    if let Some(e) = t.get("max-requests") {
        let p = join(path, "max-requests");
        match &e.value.kind {
            NodeKind::Str(s) if s == "unlimited" => pool.max_requests = None,
            NodeKind::Str(s) => cx.error(
                e.value.at,
                &p,
                format!("`{s}`: use a number of requests (at least 1) or \"unlimited\""),
            ),
            _ => {
                if let Some(n) = cx.integer(&e.value, &p, 1, i64::MAX) {
                    pool.max_requests = Some(n as u64);
                }
            }
        }
    }
    if let Some(e) = t.get("zygote")
        && let Some(v) = cx.one_of(&e.value, &join(path, "zygote"), ZYGOTE_MODES)
    {
        pool.zygote = v;
    }
    (cx.error_count() == before).then_some(pool)
}

fn limits_spec(
    cx: &mut Checker<'_>,
    node: Option<&Node>,
    path: &str,
    kind: Option<AppKind>,
) -> Option<Limits> {
    let mut limits = defaults::limits(kind.unwrap_or(AppKind::Http));
    let Some(node) = node else {
        return Some(limits);
    };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, LIMIT_KEYS);
    let before = cx.error_count();
    if let Some(e) = t.get("memory") {
        let p = join(path, "memory");
        if let Some(n) = cx.size(&e.value, &p) {
            if n < defaults::WASM_PAGE {
                cx.error(
                    e.value.at,
                    &p,
                    format!("{n} bytes is less than one Wasm page (64KiB)"),
                );
            } else {
                limits.memory = n;
            }
        }
    }
    if let Some(e) = t.get("timeout")
        && let Some(d) = cx.duration_or_off(&e.value, &join(path, "timeout"))
    {
        if d == Some(Duration::ZERO) {
            cx.error(
                e.value.at,
                &join(path, "timeout"),
                "0s would stop every request at once: use a positive duration or \"off\"",
            );
        }
        limits.timeout = d;
    }
    if let Some(e) = t.get("instances")
        && let Some(n) = cx.integer(&e.value, &join(path, "instances"), 1, 1_000_000)
    {
        limits.instances = n as u32;
    }
    if let Some(e) = t.get("tables")
        && let Some(n) = cx.integer(&e.value, &join(path, "tables"), 1, 1_000_000)
    {
        limits.tables = n as u32;
    }
    if let Some(e) = t.get("stdout")
        && let Some(n) = cx.size(&e.value, &join(path, "stdout"))
    {
        limits.stdout = n;
    }
    (cx.error_count() == before).then_some(limits)
}

fn sandbox_spec(cx: &mut Checker<'_>, node: Option<&Node>, path: &str) -> Option<SandboxSpec> {
    let mut sandbox = defaults::SANDBOX;
    let Some(node) = node else {
        return Some(sandbox);
    };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, SANDBOX_KEYS);
    let before = cx.error_count();
    if let Some(e) = t.get("landlock")
        && let Some(v) = cx.one_of(&e.value, &join(path, "landlock"), ENFORCEMENTS)
    {
        sandbox.landlock = v;
    }
    if let Some(e) = t.get("seccomp")
        && let Some(v) = cx.one_of(&e.value, &join(path, "seccomp"), ENFORCEMENTS)
    {
        sandbox.seccomp = v;
    }
    (cx.error_count() == before).then_some(sandbox)
}

fn restart_spec(cx: &mut Checker<'_>, node: Option<&Node>, path: &str) -> Option<RestartSpec> {
    let mut restart = defaults::RESTART;
    let Some(node) = node else {
        return Some(restart);
    };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, RESTART_KEYS);
    let before = cx.error_count();
    if let Some(e) = t.get("on")
        && let Some(v) = cx.one_of(&e.value, &join(path, "on"), RESTART_ONS)
    {
        restart.on = v;
    }
    if let Some(e) = t.get("backoff") {
        let p = join(path, "backoff");
        if let Some(text) = cx.string(&e.value, &p) {
            match parse_backoff(text) {
                Ok((lo, hi)) => {
                    restart.backoff_min = lo;
                    restart.backoff_max = hi;
                }
                Err(why) => cx.error(e.value.at, &p, why),
            }
        }
    }
    if let Some(e) = t.get("give-up") {
        let p = join(path, "give-up");
        if let Some(text) = cx.string(&e.value, &p) {
            match parse_give_up(text) {
                Ok(g) => restart.give_up = g,
                Err(why) => cx.error(e.value.at, &p, why),
            }
        }
    }
    (cx.error_count() == before).then_some(restart)
}

pub(crate) fn parse_backoff(text: &str) -> Result<(Duration, Duration), String> {
    let form = "use \"MIN..MAX\", e.g. \"100ms..30s\"";
    let (lo, hi) = text
        .split_once("..")
        .ok_or_else(|| format!("`{text}`: {form}"))?;
    let lo = parse_duration(lo).map_err(|why| format!("{why} ({form})"))?;
    let hi = parse_duration(hi).map_err(|why| format!("{why} ({form})"))?;
    if lo.is_zero() {
        return Err(format!("`{text}`: the first delay must be above zero"));
    }
    if hi < lo {
        return Err(format!("`{text}`: the maximum is below the minimum"));
    }
    Ok((lo, hi))
}

pub(crate) fn parse_give_up(text: &str) -> Result<Option<GiveUp>, String> {
    if text == "off" {
        return Ok(None);
    }
    let form = "use \"N in DURATION\" (e.g. \"5 in 10s\") or \"off\"";
    let (n, window) = text
        .split_once(" in ")
        .ok_or_else(|| format!("`{text}`: {form}"))?;
    let crashes: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{text}`: `{n}` is not a count; {form}"))?;
    if crashes == 0 {
        return Err(format!("`{text}`: the count must be at least 1; {form}"));
    }
    let window = parse_duration(window).map_err(|why| format!("{why} ({form})"))?;
    if window.is_zero() {
        return Err(format!("`{text}`: the window must be above zero"));
    }
    Ok(Some(GiveUp { crashes, window }))
}

/// Rules that concern several apps: no address or systemd socket twice.
fn check_across_apps(
    cx: &mut Checker<'_>,
    apps: &BTreeMap<String, AppSpec>,
    tables: &[(String, Table)],
) {
    let mut claimed: HashMap<ListenAddr, &str> = HashMap::new();
    for (name, table) in tables {
        let Some(spec) = apps.get(name) else { continue };
        let listen_nodes: &[Node] = match table.get("listen").map(|e| &e.value.kind) {
            Some(NodeKind::Array(items)) => items,
            _ => &[],
        };
        for (i, addr) in spec.listen.iter().enumerate() {
            let at = listen_nodes.get(i).map(|n| n.at).unwrap_or(Loc {
                file: 0,
                start: 0,
                end: 0,
            });
            let path = format!("apps.{name}.listen[{i}]");
            let clash = claimed
                .iter()
                .find(|(other, owner)| **owner != name.as_str() && listen_overlaps(addr, other));
            if let Some((other, owner)) = clash {
                let msg = match addr {
                    ListenAddr::Systemd(n) => format!(
                        "systemd socket `{n}` is already used by app `{owner}`: each app needs its own"
                    ),
                    _ if other == addr => format!("`{addr}` is already used by app `{owner}`"),
                    _ => format!("`{addr}` overlaps `{other}` of app `{owner}`"),
                };
                cx.error(at, &path, msg);
            }
            claimed.entry(addr.clone()).or_insert(name);
        }
    }
}

fn listen_overlaps(a: &ListenAddr, b: &ListenAddr) -> bool {
    match (a, b) {
        (ListenAddr::Tcp(x), ListenAddr::Tcp(y)) => {
            x.port() == y.port()
                && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for key in keys {
            assert!(
                doc.contains(&format!("`{key}`")),
                "docs/policy.md does not document `{key}`"
            );
        }
    }

    #[test]
    fn guest_paths() {
        assert_eq!(normalize_guest_path("/data//x/./y/").unwrap(), "/data/x/y");
        assert_eq!(normalize_guest_path("/").unwrap(), "/");
        assert!(
            normalize_guest_path("data")
                .unwrap_err()
                .contains("relative")
        );
        assert!(
            normalize_guest_path("/data/../etc")
                .unwrap_err()
                .contains("..")
        );
    }

    #[test]
    fn typo_suggestions() {
        assert_eq!(closest("idle-timout", POOL_KEYS), Some("idle-timeout"));
        assert_eq!(closest("modul", APP_KEYS), Some("module"));
        assert_eq!(closest("zzzzzz", APP_KEYS), None);
    }

    #[test]
    fn backoff_and_give_up() {
        assert_eq!(
            parse_backoff("100ms..30s").unwrap(),
            (Duration::from_millis(100), Duration::from_secs(30))
        );
        assert!(parse_backoff("30s..1s").is_err());
        assert!(parse_backoff("0s..1s").is_err());
        assert!(parse_backoff("1s").is_err());
        let g = parse_give_up("10 in 60s").unwrap().unwrap();
        assert_eq!((g.crashes, g.window), (10, Duration::from_secs(60)));
        assert_eq!(parse_give_up("off").unwrap(), None);
        assert!(parse_give_up("0 in 1s").is_err());
        assert!(parse_give_up("ten in 1s").is_err());
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            parse_listen("127.0.0.1:8080").unwrap(),
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[::1]:80").unwrap(),
            ListenAddr::Tcp("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_listen("unix:/run/a.sock").unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse_listen("systemd:web").unwrap(),
            ListenAddr::Systemd("web".into())
        );
        for bad in [
            "localhost:80",
            "unix:rel.sock",
            "systemd:",
            "1.2.3.4:0",
            "1.2.3.4",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        assert!(listen_overlaps(
            &ListenAddr::Tcp("0.0.0.0:80".parse().unwrap()),
            &ListenAddr::Tcp("127.0.0.1:80".parse().unwrap())
        ));
    }

    #[test]
    fn connect_forms() {
        let t = parse_connect("127.0.0.1:5432").unwrap();
        assert!(t.allows("127.0.0.1:5432".parse().unwrap(), None));
        assert!(!t.allows("127.0.0.1:5433".parse().unwrap(), None));
        let t = parse_connect("DB.internal:443").unwrap();
        assert_eq!(t.to_string(), "db.internal:443");
        assert!(t.allows("10.0.0.1:443".parse().unwrap(), Some("db.internal")));
        assert!(!t.allows("10.0.0.1:443".parse().unwrap(), None));
        for bad in ["db", "db:x", ":80", "-a.b:1", "1.2.3.4:0"] {
            assert!(parse_connect(bad).is_err(), "{bad}");
        }
    }
}
