//! Reading a module from disk: binary or text, core module or component.
//!
//! The cache key is the SHA-256 of the *binary* that gets compiled, so a
//! `.wat` file and the `.wasm` it assembles to share one entry.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::CompileError;

/// A core WebAssembly module or a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProgramKind {
    Module,
    Component,
}

impl fmt::Display for ProgramKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProgramKind::Module => "module",
            ProgramKind::Component => "component",
        })
    }
}

/// A module read from disk, ready to compile.
#[derive(Debug, Clone)]
pub struct Source {
    /// Where it was read from.
    pub path: PathBuf,
    /// The binary encoding (assembled if the file was text).
    pub wasm: Vec<u8>,
    pub kind: ProgramKind,
    /// Hex SHA-256 of `wasm`.
    pub digest: String,
}

impl Source {
    /// Read `path`: binary WebAssembly, or text (any file that does not
    /// start with `\0asm` is tried as WAT).
    pub fn read(path: &Path) -> Result<Source, CompileError> {
        let bytes = std::fs::read(path).map_err(|source| CompileError::ReadSource {
            path: path.to_path_buf(),
            source,
        })?;
        Source::from_bytes(path, bytes)
    }

    /// As [`Source::read`], for bytes already in memory; `path` is used in
    /// errors and metadata.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Source, CompileError> {
        let wasm = if bytes.starts_with(b"\0asm") {
            bytes
        } else {
            assemble_text(path, &bytes)?
        };
        let kind = if wasmparser::Parser::is_component(&wasm) {
            ProgramKind::Component
        } else if wasmparser::Parser::is_core_wasm(&wasm) {
            ProgramKind::Module
        } else {
            // `\0asm` with an unknown version or layer.
            return Err(CompileError::Invalid {
                path: path.to_path_buf(),
                reason: "unknown binary version or layer in the header".into(),
                offset: Some(4),
            });
        };
        let digest = hex::encode(Sha256::digest(&wasm));
        Ok(Source {
            path: path.to_path_buf(),
            wasm,
            kind,
            digest,
        })
    }
}

impl Source {
    /// Compile with `engine` into a serialized artifact (`.cwasm` bytes).
    pub fn precompile(&self, engine: &wasmtime::Engine) -> Result<Vec<u8>, CompileError> {
        match self.kind {
            ProgramKind::Module => engine.precompile_module(&self.wasm),
            ProgramKind::Component => engine.precompile_component(&self.wasm),
        }
        .map_err(|e| compile_error(self, &e))
    }
}

fn assemble_text(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, CompileError> {
    let not_wasm = || CompileError::NotWasm {
        path: path.to_path_buf(),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| not_wasm())?;
    // Text that does not even start like an s-expression is not WAT: say
    // "not Wasm" rather than a confusing parse error.
    let first = text
        .lines()
        .map(str::trim_start)
        .find(|l| !l.is_empty() && !l.starts_with(";;"));
    if !first.is_some_and(|l| l.starts_with('(')) {
        return Err(not_wasm());
    }
    let mut wat_err = match wat::parse_str(text) {
        Ok(wasm) => return Ok(wasm),
        Err(e) => e,
    };
    wat_err.set_path(path);
    Err(CompileError::InvalidText {
        path: path.to_path_buf(),
        message: wat_err.to_string().replace('\n', " "),
    })
}

/// Turn wasmtime's compile error into ours: a validation failure carries
/// wasmparser's reason and offset (`... (at offset 0x1d)`).
fn compile_error(source: &Source, err: &wasmtime::Error) -> CompileError {
    let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
    let mut reason = chain.last().cloned().unwrap_or_default().replace('\n', " ");
    let mut offset = None;
    // wasmtime: "Invalid input WebAssembly code at offset 28: type mismatch ..."
    const TRANSLATION: &str = "Invalid input WebAssembly code at offset ";
    if let Some(rest) = reason.strip_prefix(TRANSLATION)
        && let Some((n, msg)) = rest.split_once(": ")
        && let Ok(n) = n.parse::<usize>()
    {
        offset = Some(n);
        reason = msg.to_string();
    }
    // wasmparser: "unexpected end-of-file (at offset 0x1d)"
    if let Some(i) = reason.rfind(" (at offset 0x") {
        offset = offset.or_else(|| parse_offset(&reason));
        reason.truncate(i);
    }
    let path = source.path.clone();
    if reason.contains("unexpected end") || reason.contains("section size mismatch") {
        CompileError::Truncated {
            path,
            size: source.wasm.len(),
            reason,
        }
    } else {
        CompileError::Invalid {
            path,
            reason,
            offset,
        }
    }
}

fn parse_offset(message: &str) -> Option<usize> {
    let start = message.rfind("(at offset 0x")? + "(at offset 0x".len();
    let hex_digits: String = message[start..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    usize::from_str_radix(&hex_digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_parsed_from_wasmparser_messages() {
        assert_eq!(
            parse_offset("type mismatch: expected i32 (at offset 0x1d)"),
            Some(0x1d)
        );
        assert_eq!(parse_offset("no offset here"), None);
    }

    #[test]
    fn text_and_kind_are_recognized() {
        let p = Path::new("x.wat");
        let m = Source::from_bytes(p, b"(module)".to_vec()).unwrap();
        assert_eq!(m.kind, ProgramKind::Module);
        let c = Source::from_bytes(p, b";; hi\n(component)".to_vec()).unwrap();
        assert_eq!(c.kind, ProgramKind::Component);
        assert!(matches!(
            Source::from_bytes(p, b"\x7fELF....".to_vec()),
            Err(CompileError::NotWasm { .. })
        ));
        assert!(matches!(
            Source::from_bytes(p, b"(module (func (result i32)))x".to_vec()),
            Err(CompileError::InvalidText { .. })
        ));
    }
}
