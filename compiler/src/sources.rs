//! Remembering the SHA-256 of source files, so that a cache hit by path
//! ([`crate::Cache::load_or_compile`]) need not read and hash the module.
//!
//! The cache key's module part is the SHA-256 of the module's binary, and
//! hashing an 8.7 MB module costs more than everything else corral does on a
//! hit. So after a source has been read and hashed, its digest is recorded in
//! `<cache>/sources/<dev>-<inode>.json` together with what `stat` says about
//! the file: device, inode, size, modification time and status-change time
//! (ctime), to the nanosecond. On the next load the file is only opened and
//! `fstat`ed; if all five are unchanged (and the record was written by this
//! version of corral), the recorded digest is used; if anything differs, the
//! file is read and hashed as before and the record replaced. Sources under
//! 64 KiB are not recorded: reading and hashing them is cheaper.
//!
//! Why an unchanged tuple means unchanged contents:
//! - Any write to the file, truncate, `chmod`, rename or link count change
//!   sets its ctime to the current time, and ctime cannot be set by a user:
//!   `utimensat`/`touch -d` set mtime (and atime) and themselves bump ctime
//!   to *now*. Restoring the size and mtime after an edit (what `cp -p`,
//!   `rsync -t` or an editor may do) therefore still changes the tuple.
//! - A file replaced by another (rename over it, delete and recreate) is a
//!   new inode; if the kernel reuses the inode number, the new file's ctime
//!   is the time it was created, not the old one's.
//! - Timestamps are taken from a coarse clock (one tick, a few ms; a second
//!   or more on some filesystems), so two edits within one tick can leave
//!   the same ctime. As in git's "racily clean" rule, a file whose ctime is
//!   less than [`RACY`] before the moment it was read is not recorded: any
//!   later edit gets a ctime past the recorded one. The record is only
//!   written if `fstat` gave the same tuple before and after reading, so the
//!   digest is of the contents that tuple describes.
//! - It rests on the system clock not being set back by more than [`RACY`]
//!   and on the filesystem reporting real ctimes (local Linux filesystems
//!   do; a FUSE or network filesystem that invents them would defeat it).
//!
//! The record only names which cache entry to try: the artifact itself is
//! still checked against its digest before it is loaded. Records live in
//! the cache directory (0700, the daemon's), so only whoever can already
//! replace artifacts can write them. Writing one is best effort (a read-only
//! cache still works, it just hashes every time). `cache gc` drops records
//! whose file no longer has the recorded tuple; `cache clear` drops all.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{CacheError, CompileError};
use crate::fs::{
    Owner, STALE_TEMP, create_private_dir, give_to, read_dir_names, remove_if_exists, write_file,
};
use crate::source::Source;

/// Files changed this recently are not recorded (see the module comment).
pub(crate) const RACY: Duration = Duration::from_secs(2);

/// Smaller sources are not recorded: reading and hashing them costs less
/// than reading and parsing a record.
const WORTH_RECORDING: u64 = 64 << 10;

/// Directory of the records, under the cache root. Not a target triple
/// (those all contain a `-`), so listing and gc skip it.
const DIR: &str = "sources";

/// What identifies one version of a file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    fn of(m: &fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// Changed less than [`RACY`] before `now`: a later edit could still
    /// get the same ctime.
    fn is_racy(&self, now: SystemTime) -> bool {
        let now_ns = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.ctime_ns > now_ns - RACY.as_nanos() as i128
    }
}

/// `<cache>/sources/<dev>-<ino>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Record {
    /// corral-compiler's version: a new one (perhaps assembling text
    /// differently) starts afresh.
    version: String,
    /// Where it was last read from (for gc).
    path: PathBuf,
    id: FileId,
    /// Hex SHA-256 of the module's binary, as in [`Source::digest`].
    sha256: String,
}

fn record_path(root: &Path, id: &FileId) -> PathBuf {
    root.join(DIR).join(format!("{}-{}.json", id.dev, id.ino))
}

fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// A source file opened and `fstat`ed, not read yet.
#[derive(Debug)]
pub(crate) struct OpenSource<'p> {
    path: &'p Path,
    file: File,
    id: FileId,
    opened_at: SystemTime,
}

fn read_error(path: &Path) -> impl Fn(std::io::Error) -> CompileError + '_ {
    move |source| CompileError::ReadSource {
        path: path.to_path_buf(),
        source,
    }
}

/// Open `path` (errors as [`Source::read`]'s).
pub(crate) fn open(path: &Path) -> Result<OpenSource<'_>, CompileError> {
    let file = File::open(path).map_err(read_error(path))?;
    let opened_at = SystemTime::now();
    let id = FileId::of(&file.metadata().map_err(read_error(path))?);
    Ok(OpenSource {
        path,
        file,
        id,
        opened_at,
    })
}

impl OpenSource<'_> {
    /// The recorded SHA-256 of the module, if the file is unchanged since
    /// it was recorded (one small read).
    pub(crate) fn known_digest(&self, root: &Path) -> Option<String> {
        if self.id.size < WORTH_RECORDING {
            return None;
        }
        let record = read_record(&record_path(root, &self.id))?;
        (record.id == self.id && record.version == env!("CARGO_PKG_VERSION"))
            .then_some(record.sha256)
    }

    /// Read it as [`Source::read`] does; with the file's identity if it is
    /// worth recording, held still while read and is not racy.
    pub(crate) fn read(mut self) -> Result<(Source, Option<FileId>), CompileError> {
        let err = read_error(self.path);
        let mut bytes = Vec::with_capacity(usize::try_from(self.id.size).unwrap_or(0));
        self.file.read_to_end(&mut bytes).map_err(&err)?;
        let id = if self.id.size >= WORTH_RECORDING && !self.id.is_racy(self.opened_at) {
            let after = FileId::of(&self.file.metadata().map_err(&err)?);
            (after == self.id).then_some(self.id)
        } else {
            None
        };
        Ok((Source::from_bytes(self.path, bytes)?, id))
    }
}

/// Record that the file `id` at `path` has module digest `sha256`. Best
/// effort: failing only costs a hash next time.
pub(crate) fn remember(root: &Path, path: &Path, id: &FileId, sha256: &str, owner: Option<Owner>) {
    let record = Record {
        version: env!("CARGO_PKG_VERSION").to_string(),
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        id: id.clone(),
        sha256: sha256.to_string(),
    };
    let file = record_path(root, id);
    if read_record(&file).as_ref() == Some(&record) {
        return;
    }
    let json = serde_json::to_vec_pretty(&record).expect("record serializes");
    let dir = root.join(DIR);
    let written = create_private_dir(&dir)
        .and_then(|()| owner.map_or(Ok(()), |o| give_to(&dir, o)))
        .and_then(|()| write_file(&file, &json, owner));
    if let Err(e) = written {
        tracing::debug!(error = %crate::error::chain(&e), "cannot record the source's digest");
    }
}

/// Delete the records of files that changed or are gone (all of them with
/// `all`), and stale temp files.
pub(crate) fn prune(root: &Path, all: bool) -> Result<(), CacheError> {
    let dir = root.join(DIR);
    let now = SystemTime::now();
    for name in read_dir_names(&dir)? {
        let path = dir.join(&name);
        let stale = if name.starts_with(".tmp-") {
            fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_TEMP)
        } else {
            all || read_record(&path)
                .is_none_or(|r| fs::metadata(&r.path).map_or(true, |m| FileId::of(&m) != r.id))
        };
        if stale {
            remove_if_exists(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module big enough to be recorded.
    fn big(text: &str) -> String {
        format!("{text}\n;; {}\n", "x".repeat(WORTH_RECORDING as usize))
    }

    #[test]
    fn a_record_is_used_only_while_the_file_is_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let file = tmp.path().join("m.wat");
        fs::write(&file, big("(module (func $aaa))")).unwrap();
        let id = FileId::of(&fs::metadata(&file).unwrap());
        remember(&root, &file, &id, "d1", None);
        assert_eq!(
            open(&file).unwrap().known_digest(&root).as_deref(),
            Some("d1")
        );

        // Same size, mtime put back: ctime still tells.
        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&file, big("(module (func $bbb))")).unwrap();
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let now = FileId::of(&fs::metadata(&file).unwrap());
        assert_eq!((now.size, now.mtime_ns), (id.size, id.mtime_ns));
        assert_ne!(now.ctime_ns, id.ctime_ns);
        assert_eq!(open(&file).unwrap().known_digest(&root), None);

        // gc drops the stale record.
        prune(&root, false).unwrap();
        assert!(!record_path(&root, &id).exists());
    }

    #[test]
    fn a_file_just_written_is_not_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("m.wat");
        fs::write(&file, big("(module)")).unwrap();
        let (source, id) = open(&file).unwrap().read().unwrap();
        assert_eq!(id, None, "changed less than RACY ago");
        let small = tmp.path().join("small.wat");
        fs::write(&small, "(module)").unwrap();
        let id = FileId::of(&fs::metadata(&small).unwrap());
        remember(&tmp.path().join("cache"), &small, &id, "d", None);
        let opened = open(&small).unwrap();
        assert_eq!(opened.known_digest(&tmp.path().join("cache")), None);
        assert_eq!(source.wasm, wat::parse_str("(module)").unwrap());
    }
}
