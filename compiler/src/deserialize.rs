//! The only place corral turns bytes from disk into executable code.
//!
//! [`Verified`] can be built only by [`Verified::check`], which compares the
//! open file's size and digest with the one recorded when corral wrote it;
//! [`deserialize`] takes a `Verified` and maps *that same open file* (not the
//! path again), so what was checked is what runs.
//!
//! The digest is BLAKE3 (entries written before it was recorded carry only a
//! SHA-256, which is checked instead). Both are 256-bit cryptographic hashes,
//! so the check is as strong as before; BLAKE3 is about 2.5 times faster
//! here (AVX-512: ~4.5 ms for a 20 MB artifact against ~11.5 ms). The file is
//! hashed through a read-only mapping of the open file, not copied into a
//! buffer first: on a hit of a 20 MB artifact this check is most of what
//! corral itself costs (see docs/cache.md).
//!
//! One thread on purpose: the zygote verifies its artifact here and must stay
//! single-threaded until it forks, and in corrald rayon's global pool is
//! wasmtime's compile pool, so a hit hashing there could wait behind a
//! minute-long compile. Measured on the 2 shared cores, rayon saved nothing
//! reliable anyway (2.7 to 5.6 ms against 4.5 ms).

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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

/// The digest an artifact must have (hex).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expected<'a> {
    Blake3(&'a str),
    /// Entries written before BLAKE3 was recorded.
    Sha256(&'a str),
}

impl Expected<'_> {
    /// The recorded BLAKE3 if there is one, else the SHA-256.
    pub(crate) fn of<'a>(blake3: Option<&'a str>, sha256: &'a str) -> Expected<'a> {
        match blake3 {
            Some(b) => Expected::Blake3(b),
            None => Expected::Sha256(sha256),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Expected::Blake3(_) => "BLAKE3",
            Expected::Sha256(_) => "SHA-256",
        }
    }
}

/// Why an artifact failed its check.
#[derive(Debug)]
pub(crate) enum Mismatch {
    Size { expected: u64, found: u64 },
    Digest(&'static str),
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
            Mismatch::Digest(name) => {
                write!(
                    f,
                    "{name} digest differs from the one recorded when written"
                )
            }
            Mismatch::Io(e) => write!(f, "cannot read: {e}"),
        }
    }
}

impl<'a> Verified<'a> {
    /// Check `file` against its recorded size and digest.
    pub(crate) fn check(
        file: &'a File,
        path: &'a Path,
        kind: ProgramKind,
        size: u64,
        expected: Expected<'_>,
    ) -> Result<Verified<'a>, Mismatch> {
        let found = file.metadata().map_err(Mismatch::Io)?.len();
        if found != size {
            return Err(Mismatch::Size {
                expected: size,
                found,
            });
        }
        let matches = match expected {
            Expected::Blake3(hex) => file_blake3(file, size).map_err(Mismatch::Io)? == hex,
            Expected::Sha256(hex) => file_sha256(file, size).map_err(Mismatch::Io)? == hex,
        };
        if !matches {
            return Err(Mismatch::Digest(expected.name()));
        }
        Ok(Verified { file, path, kind })
    }
}

/// Hex BLAKE3 of `bytes`.
pub(crate) fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Hex BLAKE3 of the first `len` bytes of `file` (its whole size, checked
/// by the caller), hashed in place through a read-only mapping.
fn file_blake3(file: &File, len: u64) -> io::Result<String> {
    let map = ReadOnlyMap::new(file, len)?;
    Ok(blake3_hex(map.bytes()))
}

/// Hex SHA-256 of the first `len` bytes of `file`.
fn file_sha256(file: &File, len: u64) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let map = ReadOnlyMap::new(file, len)?;
    Ok(hex::encode(Sha256::digest(map.bytes())))
}

/// A read-only shared mapping of the start of a file, unmapped on drop.
struct ReadOnlyMap {
    ptr: *mut c_void,
    len: usize,
}

impl ReadOnlyMap {
    fn new(file: &File, len: u64) -> io::Result<ReadOnlyMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        if len == 0 {
            return Ok(ReadOnlyMap {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        use rustix::mm::{MapFlags, ProtFlags, mmap};
        // SAFETY: a fresh mapping chosen by the kernel (null hint), so no
        // existing memory is replaced; it is read-only and unmapped only in
        // `drop`, with the same pointer and length.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                file,
                0,
            )
        }?;
        Ok(ReadOnlyMap { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live readable mapping of `len` bytes (see
        // `new`), unmapped only when `self` is dropped, which the borrow
        // prevents while the slice lives. The bytes do not change under us:
        // the files mapped here are cache artifacts (daemon-owned 0700
        // directory, files 0600) that are only ever replaced by rename or
        // unlinked, never written in place or truncated, as `deserialize`
        // also relies on; and the caller checked the file is `len` long.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for ReadOnlyMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: exactly the mapping made in `new`; no slice of it
            // outlives `self`.
            let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
        }
    }
}

/// Map a verified artifact into `engine`. wasmtime still checks that the
/// artifact's engine settings match `engine` and refuses it otherwise.
pub(crate) fn deserialize(engine: &Engine, verified: Verified<'_>) -> wasmtime::Result<Program> {
    let file = verified.file.try_clone()?;
    // SAFETY: wasmtime requires that the file be a precompiled artifact that
    // wasmtime itself produced and that it not change while mapped. Both
    // hold: `Verified` exists only if this open file's size and digest
    // (BLAKE3; SHA-256 for older entries) equal the ones corral recorded
    // right after `Engine::precompile_*` produced the bytes; the file sits in the daemon-owned cache (dirs
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mapped_digests_equal_in_memory_ones() {
        for len in [0usize, 1, 4096, 3 << 20] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&bytes).unwrap();
            assert_eq!(
                file_blake3(&file, len as u64).unwrap(),
                blake3::hash(&bytes).to_hex().as_str()
            );
            assert_eq!(
                file_sha256(&file, len as u64).unwrap(),
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
            );
        }
    }
}
