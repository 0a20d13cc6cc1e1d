//! Errors, one enum per operation. Each renders as one line that names the
//! file (or target) and the reason, so the CLI can print it as is.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Compiling a module or loading it from the cache failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CompileError {
    #[error("{}: cannot read: {source}", path.display())]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: not a WebAssembly module or component (no `\\0asm` header, and not WebAssembly text)",
        path.display()
    )]
    NotWasm { path: PathBuf },
    #[error("{}: invalid WebAssembly text: {message}", path.display())]
    InvalidText { path: PathBuf, message: String },
    #[error("{}: truncated: the file ends at byte {size} inside a section ({reason})", path.display())]
    Truncated {
        path: PathBuf,
        size: usize,
        reason: String,
    },
    #[error("{}: invalid WebAssembly at offset {}: {reason}", path.display(), fmt_offset(*offset))]
    Invalid {
        path: PathBuf,
        reason: String,
        offset: Option<usize>,
    },
    #[error("target `{target}`: wasmtime cannot compile for it: {reason}")]
    Target { target: String, reason: String },
    #[error("engine configuration rejected: {reason}")]
    Engine { reason: String },
    #[error("{}: artifact is for target `{target}`, which cannot run on this host", path.display())]
    ForeignTarget { path: PathBuf, target: String },
    #[error("{}: wasmtime could not load the compiled artifact: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

fn fmt_offset(offset: Option<usize>) -> String {
    match offset {
        Some(o) => format!("{o:#x}"),
        None => "unknown".into(),
    }
}

/// Reading or writing the cache directory failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("{}: cannot create cache directory: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: cache directory is not writable ({source}); pass --cache DIR or fix its owner and mode",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot lock: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot remove: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
