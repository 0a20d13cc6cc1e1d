//! [`Checker`]: collects diagnostics and reads typed values out of the
//! tree, each with its key path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Diagnostic;
use crate::parse::{clean_path, parse_duration, parse_size};
use crate::source::{Loc, Node, NodeKind, Sources, Table};

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

    pub(super) fn error_count(&self) -> usize {
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

    /// Where `at` is, as `file:line:col`, for problems found later (when
    /// corrald reads the files a value names).
    pub(super) fn place(&self, at: Loc) -> String {
        let (line, column) = self.sources.line_col(at);
        format!(
            "{}:{line}:{column}",
            self.sources.file(at.file).path.display()
        )
    }

    /// The directory of the file a value was written in: relative paths in
    /// a policy are relative to it.
    pub(super) fn base_dir(&self, at: Loc) -> PathBuf {
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
    pub(super) fn resolve(&self, at: Loc, written: &str) -> PathBuf {
        clean_path(&self.base_dir(at).join(written))
    }

    /// Report keys of `table` that are not in `allowed`, with a suggestion.
    pub(super) fn check_keys(&mut self, table: &Table, path: &str, allowed: &[&str]) {
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

    pub(super) fn table<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n Table> {
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

    pub(super) fn string<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n str> {
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

    pub(super) fn array<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
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

    pub(super) fn strings(&mut self, node: &Node, path: &str) -> Option<Vec<String>> {
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

    pub(super) fn integer(&mut self, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
        match &node.kind {
            NodeKind::Int(n) => match check_range(*n, min, max) {
                Ok(n) => Some(n),
                Err(why) => {
                    self.error(node.at, path, why);
                    None
                }
            },
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

    pub(super) fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
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
    pub(super) fn duration_or_off(&mut self, node: &Node, path: &str) -> Option<Option<Duration>> {
        match &node.kind {
            NodeKind::Str(s) if s == "off" => Some(None),
            _ => self.duration(node, path).map(Some),
        }
    }

    /// A size: an integer number of bytes, or a string with a unit.
    pub(super) fn size(&mut self, node: &Node, path: &str) -> Option<u64> {
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
            NodeKind::Str(s) => match parse_size(s) {
                Ok(size) => Some(size),
                Err(why) => {
                    self.error(node.at, path, why);
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

    pub(super) fn one_of<T: Copy>(
        &mut self,
        node: &Node,
        path: &str,
        choices: &[(&str, T)],
    ) -> Option<T> {
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

/// An integer within `min..=max`.
pub(crate) fn check_range(n: i64, min: i64, max: i64) -> Result<i64, String> {
    if n < min {
        Err(format!("{n} is too small: must be at least {min}"))
    } else if n > max {
        Err(format!("{n} is too large: must be at most {max}"))
    } else {
        Ok(n)
    }
}

pub(super) fn join(path: &str, key: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::app::APP_KEYS;
    use crate::validate::tables::POOL_KEYS;

    #[test]
    fn typo_suggestions() {
        assert_eq!(closest("idle-timout", POOL_KEYS), Some("idle-timeout"));
        assert_eq!(closest("modul", APP_KEYS), Some("module"));
        assert_eq!(closest("zzzzzz", APP_KEYS), None);
    }
}
