//! The only place corral turns bytes from disk into executable code.
//!
//! [`Verified`] can be built only by [`Verified::check`], which compares the
//! open file's size and SHA-256 with the digest recorded when corral wrote
//! it; [`deserialize`] takes a `Verified` and maps *that same open file*
//! (not the path again), so what was checked is what runs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::Program;
use crate::source::ProgramKind;

/// An open artifact whose contents matched the recorded digest.
#[derive(Debug)]
pub(crate) struct Verified<'a> {
    file: &'a File,
    path: &'a Path,
    kind: ProgramKind,
}

/// Why an artifact failed its check.
#[derive(Debug)]
pub(crate) enum Mismatch {
    Size { expected: u64, found: u64 },
    Digest,
    Io(io::Error),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Size { expected, found } => {
                write!(
                    f,
                    "size is {found} bytes, {expected} were written (truncated?)"
                )
            }
            Mismatch::Digest => f.write_str("SHA-256 differs from the one recorded when written"),
            Mismatch::Io(e) => write!(f, "cannot read: {e}"),
        }
    }
}

impl<'a> Verified<'a> {
    /// Check `file` against its recorded size and hex SHA-256.
    pub(crate) fn check(
        file: &'a File,
        path: &'a Path,
        kind: ProgramKind,
        size: u64,
        sha256: &str,
    ) -> Result<Verified<'a>, Mismatch> {
        let found = file.metadata().map_err(Mismatch::Io)?.len();
        if found != size {
            return Err(Mismatch::Size {
                expected: size,
                found,
            });
        }
        if file_sha256(file).map_err(Mismatch::Io)? != sha256 {
            return Err(Mismatch::Digest);
        }
        Ok(Verified { file, path, kind })
    }
}

/// Hex SHA-256 of a whole file, read with `pread` (the file position is
/// left alone) through a fixed buffer.
pub(crate) fn file_sha256(file: &File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; usize::try_from(len.clamp(1, 1 << 20)).unwrap_or(1 << 20)];
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Map a verified artifact into `engine`. wasmtime still checks that the
/// artifact's engine settings match `engine` and refuses it otherwise.
pub(crate) fn deserialize(engine: &Engine, verified: Verified<'_>) -> wasmtime::Result<Program> {
    let file = verified.file.try_clone()?;
    // SAFETY: wasmtime requires that the file be a precompiled artifact that
    // wasmtime itself produced and that it not change while mapped. Both
    // hold: `Verified` exists only if this open file's size and SHA-256
    // equal the ones corral recorded right after `Engine::precompile_*`
    // produced the bytes; the file sits in the daemon-owned cache (dirs
    // created 0700, files 0600), entries are only ever replaced by rename
    // or unlinked, never written in place, so the mapped inode keeps its
    // verified contents. We map the very file we hashed (its fd, or
    // /proc/self/fd for components), not the path again.
    let program = unsafe {
        match verified.kind {
            ProgramKind::Module => {
                Program::Module(wasmtime::Module::deserialize_open_file(engine, file)?)
            }
            ProgramKind::Component => {
                let by_fd: PathBuf = format!("/proc/self/fd/{}", file.as_raw_fd()).into();
                let component = Component::deserialize_file(engine, &by_fd);
                drop(file);
                Program::Component(
                    component
                        .map_err(|e| e.context(format!("loading {}", verified.path.display())))?,
                )
            }
        }
    };
    Ok(program)
}
