//! Rules between apps.

use std::collections::{BTreeMap, HashMap};

use super::checker::Checker;
use crate::source::{Loc, Node, NodeKind, Table};
use crate::spec::{AppSpec, ListenAddr};

/// Rules that concern several apps: no address or systemd socket twice.
pub(super) fn check_across_apps(
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

pub(super) fn listen_overlaps(a: &ListenAddr, b: &ListenAddr) -> bool {
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

    #[test]
    fn a_wildcard_overlaps_a_specific_address() {
        assert!(listen_overlaps(
            &ListenAddr::Tcp("0.0.0.0:80".parse().unwrap()),
            &ListenAddr::Tcp("127.0.0.1:80".parse().unwrap())
        ));
    }
}
