//! The cache's filesystem primitives: private directories, files that
//! appear whole by rename, removal that tolerates a file already gone,
//! directory listings. Used by the artifact cache (`cache.rs`) and by the
//! source records (`sources.rs`).

use std::fs::{self, DirBuilder, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use crate::error::CacheError;

/// Temp files older than this are leftovers of a crash; gc removes them.
pub(crate) const STALE_TEMP: Duration = Duration::from_secs(3600);

/// A user and group that files are given to.
pub(crate) type Owner = (u32, u32);

/// Write `bytes` to `path` through a temp file in the same directory
/// (removed on any error), fsync, rename: readers see the old file or the
/// whole new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    write_file(path, bytes, None)
}

/// [`write_atomic`], the file given to `owner` before it appears.
pub(crate) fn write_file(
    path: &Path,
    bytes: &[u8],
    owner: Option<Owner>,
) -> Result<(), CacheError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let err = |source| CacheError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(tmp.as_file(), Some(uid), Some(gid)).map_err(err)?;
    }
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CacheError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Create `dir` and missing parents with mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CacheError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CacheError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })
}

pub(crate) fn give_to(path: &Path, (uid, gid): Owner) -> Result<(), CacheError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| CacheError::Write {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), CacheError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn read_dir_names(dir: &Path) -> Result<Vec<String>, CacheError> {
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CacheError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(|source| CacheError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}
