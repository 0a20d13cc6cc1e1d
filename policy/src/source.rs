//! Policy sources: reading the main file and its drop-ins, turning each into
//! a span-carrying value tree, and merging the trees in order.
//!
//! Every value remembers the file and byte range it came from ([`Loc`]), so
//! an error found after merging still points at the line that set the value.
//! Merge rule (as systemd drop-ins): tables merge key by key, recursively;
//! any other value (string, number, array) set by a later file replaces the
//! earlier one whole.

use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// Index of a file in [`Sources`].
pub(crate) type FileId = usize;

/// Where a value was written: a file and a byte range in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Loc {
    pub(crate) file: FileId,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// The text of every file that went into a policy, for line:col lookup.
#[derive(Debug, Default, Clone)]
pub(crate) struct Sources {
    files: Vec<SourceFile>,
}

#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    /// The path as the user named it (or as found in `policy.d/`).
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl Sources {
    pub(crate) fn add(&mut self, path: PathBuf, text: String) -> FileId {
        self.files.push(SourceFile { path, text });
        self.files.len() - 1
    }

    pub(crate) fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id]
    }

    pub(crate) fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(crate) fn line_col(&self, loc: Loc) -> (usize, usize) {
        let text = &self.files[loc.file].text;
        let offset = floor_char_boundary(text, loc.start.min(text.len()));
        let before = &text[..offset];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = text[line_start..offset].chars().count() + 1;
        (line, col)
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A TOML value with its location.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: NodeKind,
    pub(crate) at: Loc,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Table),
}

impl NodeKind {
    /// The TOML type name, for "expected X, found Y" messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            NodeKind::Str(_) => "a string",
            NodeKind::Int(_) => "an integer",
            NodeKind::Float => "a float",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Datetime => "a date-time",
            NodeKind::Array(_) => "an array",
            NodeKind::Table(_) => "a table",
        }
    }
}

/// A table's entries in source order, each with the location of its key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    pub(crate) entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_at: Loc,
    pub(crate) value: Node,
}

impl Table {
    pub(crate) fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Merge `overlay` into `self`: tables merge key by key, anything else
    /// replaces.
    pub(crate) fn merge(&mut self, overlay: Table) {
        for entry in overlay.entries {
            match self.entries.iter_mut().find(|e| e.key == entry.key) {
                Some(existing) => match (&mut existing.value.kind, entry.value.kind) {
                    (NodeKind::Table(base), NodeKind::Table(over)) => base.merge(over),
                    (_, kind) => {
                        existing.value = Node {
                            kind,
                            at: entry.value.at,
                        };
                        existing.key_at = entry.key_at;
                    }
                },
                None => self.entries.push(entry),
            }
        }
    }
}

/// A syntax error found while parsing one file.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub(crate) at: Loc,
    pub(crate) message: String,
}

/// Parse one file's text into a table, collecting every syntax error.
pub(crate) fn parse_file(file: FileId, text: &str) -> Result<Table, Vec<SyntaxError>> {
    let (doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(|e| {
                let span = e.span().unwrap_or(0..0);
                SyntaxError {
                    at: Loc {
                        file,
                        start: span.start,
                        end: span.end,
                    },
                    message: e.message().trim().to_string(),
                }
            })
            .collect());
    }
    let mut bad = Vec::new();
    let table = convert_table(file, doc.into_inner(), &mut bad);
    if bad.is_empty() { Ok(table) } else { Err(bad) }
}

fn convert_table(file: FileId, table: DeTable<'_>, bad: &mut Vec<SyntaxError>) -> Table {
    let mut entries: Vec<Entry> = table
        .into_iter()
        .map(|(key, value)| {
            let key_span = key.span();
            let key_at = Loc {
                file,
                start: key_span.start,
                end: key_span.end,
            };
            Entry {
                key: key.into_inner().into_owned(),
                key_at,
                value: convert_value(file, value, bad),
            }
        })
        .collect();
    // The parser's map is ordered by key; errors read better in file order.
    entries.sort_by_key(|e| e.key_at.start);
    Table { entries }
}

fn convert_value(
    file: FileId,
    value: toml::Spanned<DeValue<'_>>,
    bad: &mut Vec<SyntaxError>,
) -> Node {
    let span = value.span();
    let at = Loc {
        file,
        start: span.start,
        end: span.end,
    };
    let kind = match value.into_inner() {
        DeValue::String(s) => NodeKind::Str(s.into_owned()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => NodeKind::Int(n),
            Err(_) => {
                bad.push(SyntaxError {
                    at,
                    message: "integer does not fit in 64 bits".into(),
                });
                NodeKind::Int(0)
            }
        },
        DeValue::Float(_) => NodeKind::Float,
        DeValue::Boolean(b) => NodeKind::Bool(b),
        DeValue::Datetime(_) => NodeKind::Datetime,
        DeValue::Array(items) => NodeKind::Array(
            items
                .iter()
                .cloned()
                .map(|v| convert_value(file, v, bad))
                .collect(),
        ),
        DeValue::Table(t) => NodeKind::Table(convert_table(file, t, bad)),
    };
    Node { kind, at }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Table {
        parse_file(0, text).expect("valid toml")
    }

    #[test]
    fn merge_tables_key_by_key_and_replace_arrays() {
        let mut base = parse("[a]\nx = 1\nlist = [1, 2]\n[a.inner]\np = 1\nq = 2\n");
        base.merge(parse("[a]\nlist = [3]\n[a.inner]\nq = 5\n[b]\ny = 1\n"));
        let a = match &base.get("a").unwrap().value.kind {
            NodeKind::Table(t) => t.clone(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(a.get("x").unwrap().value.kind, NodeKind::Int(1)));
        match &a.get("list").unwrap().value.kind {
            NodeKind::Array(items) => assert_eq!(items.len(), 1),
            other => panic!("{other:?}"),
        }
        let inner = match &a.get("inner").unwrap().value.kind {
            NodeKind::Table(t) => t.clone(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            inner.get("p").unwrap().value.kind,
            NodeKind::Int(1)
        ));
        assert!(matches!(
            inner.get("q").unwrap().value.kind,
            NodeKind::Int(5)
        ));
        assert!(base.get("b").is_some());
    }

    #[test]
    fn line_col_counts_characters() {
        let mut sources = Sources::default();
        let id = sources.add("p.toml".into(), "a = 1\n  é = \"x\"\n".into());
        let text = &sources.file(id).text;
        let start = text.find('=').unwrap();
        assert_eq!(
            sources.line_col(Loc {
                file: id,
                start,
                end: start
            }),
            (1, 3)
        );
        let start = text.rfind('=').unwrap();
        assert_eq!(
            sources.line_col(Loc {
                file: id,
                start,
                end: start
            }),
            (2, 5)
        );
    }

    #[test]
    fn every_syntax_error_is_reported() {
        let errors = parse_file(0, "a = \nb = [1,\n[c\n").unwrap_err();
        assert!(errors.len() >= 2, "{errors:?}");
    }
}
