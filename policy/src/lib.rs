//! corral's policy file.
//!
//! One TOML file (default [`defaults::POLICY_PATH`]) plus drop-ins
//! (`policy.d/*.toml` next to it, merged in file-name order: tables merge key
//! by key, other values replace) describe the daemon and every app. [`load`]
//! reads them, reports every mistake with file:line:col and key path, and
//! returns the typed [`Policy`] that the compiler and supervisor use.
//!
//! This crate does no I/O beyond reading the policy files and checking that
//! the paths they name exist.

#![forbid(unsafe_code)]

mod addr;
mod builder;
pub mod defaults;
mod error;
pub mod oci;
mod parse;
mod source;
mod spec;
mod validate;

use std::path::{Path, PathBuf};

pub use builder::{AppSpecBuilder, AppSpecError, FieldError};
pub use error::{Diagnostic, PolicyError};
pub use spec::*;

use source::{Sources, SyntaxError, Table};

/// What the process environment contributes to defaults: systemd's
/// `CACHE_DIRECTORY`, `STATE_DIRECTORY` and `RUNTIME_DIRECTORY`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    pub cache_directory: Option<PathBuf>,
    pub state_directory: Option<PathBuf>,
    pub runtime_directory: Option<PathBuf>,
}

impl Environment {
    /// Read the variables systemd sets for `CacheDirectory=` and friends.
    /// systemd separates several directories with `:`; the first is ours.
    pub fn from_process() -> Environment {
        let first = |var: &str| {
            std::env::var_os(var)
                .and_then(|v| {
                    v.to_str()
                        .and_then(|s| s.split(':').next())
                        .map(PathBuf::from)
                })
                .filter(|p| !p.as_os_str().is_empty())
        };
        Environment {
            cache_directory: first("CACHE_DIRECTORY"),
            state_directory: first("STATE_DIRECTORY"),
            runtime_directory: first("RUNTIME_DIRECTORY"),
        }
    }
}

/// The drop-in files that belong to a main policy file, in merge order.
pub fn drop_in_files(main: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let dir = main
        .parent()
        .unwrap_or(Path::new("."))
        .join(defaults::DROP_IN_DIR);
    let read = match std::fs::read_dir(&dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PolicyError::ReadDir { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in read {
        let entry = entry.map_err(|source| PolicyError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let path = entry.path();
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if is_toml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    // Name order, byte-wise, as systemd orders drop-ins.
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Load the policy at `main` and its drop-ins.
pub fn load(main: &Path, env: &Environment) -> Result<Policy, PolicyError> {
    let (sources, merged) = read_and_merge(main)?;
    validate::validate(&sources, &merged, env).map_err(PolicyError::Invalid)
}

/// Validate one policy given as text, as if read from `path` (relative
/// paths inside resolve against `path`'s directory). No drop-ins.
pub fn parse_str(text: &str, path: &Path, env: &Environment) -> Result<Policy, PolicyError> {
    load_texts(vec![(path.to_path_buf(), text.to_string())], env)
}

/// Load only the `[sockets]` tables of the policy at `main` and its
/// drop-ins: what `corral-generator` needs at early boot, when the apps'
/// modules and directories may not be mounted yet. Syntax errors anywhere
/// and mistakes in `[sockets]` are errors; the rest is not checked.
pub fn load_sockets(
    main: &Path,
) -> Result<std::collections::BTreeMap<String, SocketSpec>, PolicyError> {
    let (sources, merged) = read_and_merge(main)?;
    validate::validate_sockets(&sources, &merged).map_err(PolicyError::Invalid)
}

fn read_and_merge(main: &Path) -> Result<(Sources, Table), PolicyError> {
    let mut files = vec![main.to_path_buf()];
    files.extend(drop_in_files(main)?);
    let mut texts = Vec::with_capacity(files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
            path: path.clone(),
            source,
        })?;
        texts.push((path, text));
    }
    parse_and_merge(texts)
}

fn load_texts(texts: Vec<(PathBuf, String)>, env: &Environment) -> Result<Policy, PolicyError> {
    let (sources, merged) = parse_and_merge(texts)?;
    validate::validate(&sources, &merged, env).map_err(PolicyError::Invalid)
}

/// Parse every file (all syntax errors at once) and merge them in order.
fn parse_and_merge(texts: Vec<(PathBuf, String)>) -> Result<(Sources, Table), PolicyError> {
    let mut sources = Sources::default();
    let mut tables = Vec::new();
    let mut syntax: Vec<SyntaxError> = Vec::new();
    for (path, text) in texts {
        let id = sources.add(path, text);
        match source::parse_file(id, &sources.file(id).text.clone()) {
            Ok(table) => tables.push(table),
            Err(errors) => syntax.extend(errors),
        }
    }
    if !syntax.is_empty() {
        let mut cx = validate::Checker::new(&sources);
        for e in syntax {
            cx.error(e.at, "", e.message);
        }
        return Err(PolicyError::Invalid(cx.into_diagnostics()));
    }
    let mut merged = Table::default();
    for table in tables {
        merged.merge(table);
    }
    Ok((sources, merged))
}
