//! Advisory file locks (`flock(2)` through rustix).
//!
//! Two kinds of lock protect a cache entry `<sha>`:
//! - `<sha>.lock`, exclusive, while compiling or replacing the entry, so two
//!   processes compiling the same key do the work once;
//! - `<sha>.cwasm`, shared, for as long as an [`crate::Artifact`] (or any
//!   process holding a duplicate of its file descriptor, such as a zygote)
//!   uses it. Garbage collection deletes an entry only after taking this lock
//!   exclusively without waiting, so entries in use are never collected.
//!
//! `flock` locks belong to the open file, so a crashed holder releases them;
//! no stale pin files. A lock file may be deleted (by gc or clear) while
//! someone waits on it, so [`lock_file`] re-checks after locking that the
//! path still names the file it locked.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{FlockOperation, flock};

/// A held lock; released on drop (by closing the file).
#[derive(Debug)]
pub(crate) struct FileLock {
    #[expect(dead_code, reason = "held only for its lock")]
    file: File,
}

/// Open (creating, mode 0600) and lock `path` exclusively, waiting.
pub(crate) fn lock_file(path: &Path) -> io::Result<FileLock> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        flock(&file, FlockOperation::LockExclusive).map_err(io::Error::from)?;
        if same_file(&file, path)? {
            return Ok(FileLock { file });
        }
        // Removed or replaced while we waited: lock the new one.
    }
}

/// Take `op` on an open file without waiting; `Ok(false)` if another
/// process holds a conflicting lock.
pub(crate) fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        FlockOperation::NonBlockingLockExclusive
    } else {
        FlockOperation::NonBlockingLockShared
    };
    match flock(file, op) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Take a shared lock on an open file, waiting.
pub(crate) fn lock_shared(file: &File) -> io::Result<()> {
    flock(file, FlockOperation::LockShared).map_err(io::Error::from)
}

/// Whether `path` still names the open `file` (same device and inode).
pub(crate) fn same_file(file: &File, path: &Path) -> io::Result<bool> {
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == open.dev() && now.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
