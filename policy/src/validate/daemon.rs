//! The `[daemon]` table.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::checker::{Checker, join};
use crate::Environment;
use crate::defaults;
use crate::source::{NodeKind, Table};
use crate::spec::DaemonSpec;

pub(super) const DAEMON_KEYS: &[&str] = &[
    "cache-dir",
    "state-dir",
    "api-socket",
    "api-group",
    "idle-exit",
    "metrics",
    "drain-timeout",
    "template",
];

pub(super) fn daemon_spec(
    cx: &mut Checker<'_>,
    t: &Table,
    env: &Environment,
) -> Option<DaemonSpec> {
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
    let template = match t.get("template") {
        Some(e) => match &e.value.kind {
            NodeKind::Bool(b) => *b,
            other => {
                cx.error(
                    e.value.at,
                    "daemon.template",
                    format!("expected true or false, found {}", other.type_name()),
                );
                true
            }
        },
        None => true,
    };
    (cx.error_count() == before).then_some(DaemonSpec {
        cache_dir,
        state_dir,
        api_socket,
        api_group,
        idle_exit,
        metrics,
        drain_timeout,
        template,
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
