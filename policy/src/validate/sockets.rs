//! The `[sockets.NAME]` tables, and how they agree with the apps.

use std::collections::BTreeMap;

use super::across::listen_overlaps;
use super::app::check_app_name;
use super::checker::{Checker, join};
use crate::addr::parse_listen;
use crate::source::{Entry, NodeKind, Table};
use crate::spec::{AppSpec, ListenAddr, SocketSpec};

pub(super) const SOCKET_KEYS: &[&str] = &["listen"];

/// The `[sockets.NAME]` tables, each checked on its own.
pub(super) fn sockets_spec(cx: &mut Checker<'_>, doc: &Table) -> BTreeMap<String, SocketSpec> {
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
pub(super) fn check_sockets_against_apps(
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
