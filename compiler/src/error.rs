//! Errors, one enum per operation. Each renders as one line that names the
//! file (or target) and what failed; an underlying cause (an I/O error) is
//! not repeated in that line but is its `source()`, so `{:#}` through
//! anyhow (or [`chain`]) prints each cause once: `x.wasm: cannot read: No
//! such file or directory (os error 2)`.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Compiling a module or loading it from the cache failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CompileError {
    #[error("{}: cannot read", path.display())]
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
    #[error("{}: cannot create cache directory", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: cache directory is not writable (pass --cache DIR or fix its owner and mode)",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot write", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot lock", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot remove", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An error and its causes on one line, `a: b: c`, as anyhow's `{:#}`
/// prints them: for places that log or store an error as text.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each cause once, with anyhow's `{:#}` as with [`chain`].
    #[test]
    fn the_cause_is_said_once() {
        let io = || io::Error::new(io::ErrorKind::NotFound, "gone");
        let e = CompileError::from(CacheError::Read {
            path: "/c/x.cwasm".into(),
            source: io(),
        });
        assert_eq!(chain(&e), "/c/x.cwasm: cannot read: gone");
        let e = anyhow::Error::new(CompileError::ReadSource {
            path: "x.wasm".into(),
            source: io(),
        });
        assert_eq!(format!("{e:#}"), "x.wasm: cannot read: gone");
        let e = anyhow::Error::new(CacheError::NotWritable {
            path: "/c".into(),
            source: io(),
        });
        assert_eq!(
            format!("{e:#}"),
            "/c: cache directory is not writable (pass --cache DIR or fix its owner and mode): gone"
        );
    }
}
