//! The content-addressed artifact cache.
//!
//! Layout (see docs/cache.md):
//! ```text
//! <cache>/<target-triple>/<engine-hash>/<module-sha256>.cwasm   the artifact (mode 0600)
//!                                       <module-sha256>.json    metadata, written first
//!                                       <module-sha256>.lock    compile lock (flock)
//! ```
//! Invariants:
//! - Files appear only by rename from a temp file in the same directory, so
//!   a reader never sees a half-written one; a crash leaves only `.tmp-*`
//!   files, which gc removes once stale.
//! - An entry is created, replaced or deleted only while holding its
//!   `.lock` (gc and clear take it without waiting and skip if busy).
//! - An artifact is deserialized only after its size and digest (BLAKE3;
//!   SHA-256 for entries written before) match the metadata (see
//!   `deserialize.rs`); a mismatch discards and rebuilds it.
//! - `<cache>/sources/` remembers the SHA-256 of unchanged source files, so
//!   a hit by path need not read and hash the module (see `sources.rs`).
//! - "Last use" is the artifact's modification time, set on every load.
//! - An artifact in use holds a shared `flock` on its `.cwasm` (see
//!   `lock.rs`); gc never deletes such an entry.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wasmtime::Engine;

use crate::deserialize::{self, Expected, Verified};
use crate::engine::{CpuFeatures, engine_hash, host_triple};
use crate::error::{CacheError, CompileError, chain};
use crate::fs::{
    Owner, STALE_TEMP, create_private_dir, give_to, read_dir_names, remove_if_exists, sync_dir,
    write_file,
};
use crate::lock;
use crate::source::{ProgramKind, Source};
use crate::sources;

/// What identifies an artifact: target, engine settings, module contents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArtifactKey {
    pub target: String,
    /// Hex digest of wasmtime's `precompile_compatibility_hash()`.
    pub engine: String,
    /// Hex SHA-256 of the module's binary.
    pub module: String,
}

impl fmt::Display for ArtifactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.target, self.engine, self.module)
    }
}

/// The metadata sidecar (`<sha>.json`). Written once, with the artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct EntryMeta {
    /// The file it was compiled from (first compile).
    pub source: PathBuf,
    pub kind: ProgramKind,
    pub module_size: u64,
    /// Hex SHA-256 of the module's binary: the key's module part, checked
    /// against the key before every load and by `verify`, so an entry whose
    /// files were replaced by another module's is found out. Absent in
    /// entries written before it was recorded (their key is their name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_sha256: Option<String>,
    pub artifact_size: u64,
    /// Hex SHA-256 of the `.cwasm`; checked before loading only when there
    /// is no `artifact_blake3` (entries written by older versions).
    pub artifact_sha256: String,
    /// Hex BLAKE3 of the `.cwasm`, checked before every load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_blake3: Option<String>,
    /// Seconds since the Unix epoch.
    pub compiled_at: u64,
    pub compile_ms: u64,
    /// `baseline` when the code uses only the architecture's baseline CPU
    /// features (cross-target, or `--cpu-features baseline`): such an entry
    /// is also used by engines of other CPU settings that wasmtime finds
    /// compatible (see `Cache::load_or_compile`). Unknown when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<CpuFeatures>,
}

/// A loaded program.
pub enum Program {
    Module(wasmtime::Module),
    Component(wasmtime::component::Component),
}

impl Program {
    pub fn kind(&self) -> ProgramKind {
        match self {
            Program::Module(_) => ProgramKind::Module,
            Program::Component(_) => ProgramKind::Component,
        }
    }
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Program::{}", self.kind())
    }
}

/// A compiled program from the cache, mapped and ready to instantiate.
///
/// While it (or any duplicate of [`Artifact::file`], in any process) is
/// open, gc keeps the entry.
#[derive(Debug)]
#[non_exhaustive]
pub struct Artifact {
    pub key: ArtifactKey,
    pub path: PathBuf,
    pub program: Program,
    /// `true` if it was already in the cache (possibly compiled by another
    /// process while we waited for its lock).
    pub cache_hit: bool,
    pub meta: EntryMeta,
    /// How long the compile took, when this call compiled it.
    pub compile_time: Option<Duration>,
    file: File,
}

impl Artifact {
    /// The open artifact, holding the shared "in use" lock. Pass a
    /// duplicate of it to a zygote (it keeps the entry pinned there too).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// What a process handed an artifact's file descriptor (a zygote) needs to
/// check and load it with [`load_handed_over`]. Serializable, to travel with
/// the fd over the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Handoff {
    pub key: ArtifactKey,
    pub kind: ProgramKind,
    pub size: u64,
    pub sha256: String,
    /// Checked instead of `sha256` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

impl Artifact {
    /// What to send along with a duplicate of [`Artifact::file`].
    pub fn handoff(&self) -> Handoff {
        handoff(&self.key, &self.meta)
    }

    /// Drops the loaded program (its mapping of the artifact and wasmtime's
    /// metadata) and keeps the open file with its "in use" lock: for a
    /// process that only hands the artifact on (corrald to its zygotes), so
    /// that it does not keep a resident copy of every app's artifact.
    pub fn into_pinned(self) -> PinnedArtifact {
        PinnedArtifact {
            key: self.key,
            path: self.path,
            cache_hit: self.cache_hit,
            meta: self.meta,
            compile_time: self.compile_time,
            file: self.file,
        }
    }
}

fn handoff(key: &ArtifactKey, meta: &EntryMeta) -> Handoff {
    Handoff {
        key: key.clone(),
        kind: meta.kind,
        size: meta.artifact_size,
        sha256: meta.artifact_sha256.clone(),
        blake3: meta.artifact_blake3.clone(),
    }
}

/// An [`Artifact`] that was checked and loaded once, without its program:
/// the open file (pinning the entry against gc) and what a zygote needs to
/// check it again ([`PinnedArtifact::handoff`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct PinnedArtifact {
    pub key: ArtifactKey,
    pub path: PathBuf,
    pub cache_hit: bool,
    pub meta: EntryMeta,
    pub compile_time: Option<Duration>,
    file: File,
}

impl PinnedArtifact {
    /// As [`Artifact::file`].
    pub fn file(&self) -> &File {
        &self.file
    }

    /// As [`Artifact::handoff`].
    pub fn handoff(&self) -> Handoff {
        handoff(&self.key, &self.meta)
    }
}

/// Load an artifact from a file descriptor received from corrald: its size
/// and digest are checked against `handoff`, then the file is mapped.
/// `engine` must have been built from the same [`crate::EngineOptions`].
pub fn load_handed_over(
    engine: &Engine,
    file: &File,
    handoff: &Handoff,
) -> Result<Program, CompileError> {
    use std::os::fd::AsRawFd;
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let load_err = |reason: String| CompileError::Load {
        path: path.clone(),
        reason: format!("{reason} (artifact {})", handoff.key),
    };
    let expected = Expected::of(handoff.blake3.as_deref(), &handoff.sha256);
    let verified = Verified::check(file, &path, handoff.kind, handoff.size, expected)
        .map_err(|m| load_err(m.to_string()))?;
    deserialize::deserialize(engine, verified).map_err(|e| load_err(format!("{e:#}")))
}

/// An entry made sure of without loading it (cross-target compiles).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CompiledEntry {
    pub key: ArtifactKey,
    pub path: PathBuf,
    pub meta: EntryMeta,
    pub cache_hit: bool,
    pub compile_time: Option<Duration>,
}

/// One entry as found on disk (`corral cache list`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct Entry {
    pub key: ArtifactKey,
    pub path: PathBuf,
    /// Bytes on disk (artifact + metadata).
    pub size: u64,
    /// `None` if the metadata is missing or unreadable.
    pub meta: Option<EntryMeta>,
    /// Seconds since the Unix epoch.
    pub last_use: u64,
    pub in_use: bool,
}

/// Result of checking one entry (`corral cache verify`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Verification {
    pub key: ArtifactKey,
    pub path: PathBuf,
    /// `None` if the entry is sound; otherwise why not.
    pub problem: Option<String>,
    pub removed: bool,
}

/// What gc or clear did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    pub removed: Vec<ArtifactKey>,
    pub freed: u64,
    /// Entries over the limit that were kept because they are in use.
    pub kept_in_use: Vec<ArtifactKey>,
    /// Bytes in the cache afterwards.
    pub size_after: u64,
    pub stale_temp_files: u64,
}

/// Paths of one entry.
#[derive(Debug, Clone)]
struct EntryPaths {
    /// The key's module digest, which the metadata must name.
    module: String,
    dir: PathBuf,
    cwasm: PathBuf,
    meta: PathBuf,
    lock: PathBuf,
}

impl EntryPaths {
    fn new(root: &Path, key: &ArtifactKey) -> Self {
        let dir = root.join(&key.target).join(&key.engine);
        EntryPaths {
            module: key.module.clone(),
            cwasm: dir.join(format!("{}.cwasm", key.module)),
            meta: dir.join(format!("{}.json", key.module)),
            lock: dir.join(format!("{}.lock", key.module)),
            dir,
        }
    }
}

/// What looking at an entry found.
enum Probe<T> {
    Hit(T),
    Missing,
    Corrupt(String),
    /// The bytes passed their digest check but wasmtime would not load
    /// them with this engine (e.g. the pooling allocator's limits refuse the
    /// module). Rebuilding gives the same bytes, so the entry is kept and
    /// the refusal reported.
    Refused(String),
}

/// The artifact cache rooted at one directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    /// Engine hashes already computed (engines are few and long-lived;
    /// hashing one costs more than a small cache hit).
    engine_hashes: Arc<Mutex<Vec<(Engine, String)>>>,
    /// When root writes into a cache owned by another user (the daemon's),
    /// new files and directories are given to that user, so the daemon can
    /// use what `sudo corral compile --policy` put there.
    owner: Option<Owner>,
}

impl Cache {
    /// Open the cache at `dir` for reading and writing, creating it (mode
    /// 0700) if needed and checking that it is writable.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        create_private_dir(dir)?;
        tempfile::tempfile_in(dir).map_err(|source| CacheError::NotWritable {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Cache::open_existing(dir))
    }

    /// The cache at `dir` for listing and checking; nothing is created.
    pub fn open_existing(dir: &Path) -> Cache {
        use std::os::unix::fs::MetadataExt;
        let owner = match fs::metadata(dir) {
            Ok(m) if rustix::process::geteuid().is_root() && m.uid() != 0 => {
                Some((m.uid(), m.gid()))
            }
            _ => None,
        };
        Cache {
            root: dir.to_path_buf(),
            engine_hashes: Arc::default(),
            owner,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The artifact of `source` for `engine` (a host engine, from
    /// [`crate::new_engine`]): loaded from the cache, or compiled, stored
    /// and loaded. Blocks for as long as a compile takes; the daemon calls
    /// it from a blocking thread.
    ///
    /// An unchanged source file is not read again: its SHA-256 is taken
    /// from `<cache>/sources/` when the file's identity and timestamps are
    /// the ones recorded (see `sources.rs`).
    pub fn load_or_compile(&self, engine: &Engine, path: &Path) -> Result<Artifact, CompileError> {
        let opened = sources::open(path)?;
        if let Some(digest) = opened.known_digest(&self.root) {
            let key = ArtifactKey {
                target: host_triple(),
                engine: self.engine_hash(engine),
                module: digest,
            };
            let paths = EntryPaths::new(&self.root, &key);
            if let Probe::Hit((file, meta, program)) = open_entry(&paths, Some(engine))? {
                return Ok(artifact(key, paths, file, meta, program, true, None));
            }
            // Missing or corrupt: the whole way, which reads the source.
        }
        let (source, id) = opened.read()?;
        let artifact = self.load_or_compile_source(engine, &source)?;
        if let Some(id) = id {
            sources::remember(&self.root, path, &id, &source.digest, self.owner);
        }
        Ok(artifact)
    }

    /// As [`Cache::load_or_compile`], for a source already read.
    pub fn load_or_compile_source(
        &self,
        engine: &Engine,
        source: &Source,
    ) -> Result<Artifact, CompileError> {
        let key = self.key(engine, &host_triple(), source);
        let paths = EntryPaths::new(&self.root, &key);
        let load = |paths: &EntryPaths| open_entry(paths, Some(engine));

        match load(&paths)? {
            Probe::Hit((file, meta, program)) => {
                return Ok(artifact(key, paths, file, meta, program, true, None));
            }
            Probe::Missing => {
                if let Some(found) = self.portable_sibling(engine, &key) {
                    return Ok(found);
                }
            }
            Probe::Corrupt(_) => {}
            Probe::Refused(reason) => {
                return Err(CompileError::Load {
                    path: paths.cwasm,
                    reason,
                });
            }
        }
        self.create_entry_dir(&paths)?;
        let _lock = lock_entry(&paths, self.owner)?;
        match load(&paths)? {
            Probe::Hit((file, meta, program)) => {
                return Ok(artifact(key, paths, file, meta, program, true, None));
            }
            Probe::Missing => {}
            Probe::Corrupt(reason) => discard(&paths, &reason)?,
            Probe::Refused(reason) => {
                return Err(CompileError::Load {
                    path: paths.cwasm,
                    reason,
                });
            }
        }
        let (meta, took) = compile_and_store(engine, source, &paths, self.owner, None)?;
        match load(&paths)? {
            Probe::Hit((file, _, program)) => {
                Ok(artifact(key, paths, file, meta, program, false, Some(took)))
            }
            Probe::Missing => Err(CompileError::Load {
                path: paths.cwasm,
                reason: "vanished right after it was written".into(),
            }),
            Probe::Corrupt(reason) => {
                // Not rebuilt again: the engine and the artifact disagree.
                discard(&paths, &reason)?;
                Err(CompileError::Load {
                    path: paths.cwasm,
                    reason,
                })
            }
            // Kept: the next engine with other runtime limits may load it.
            Probe::Refused(reason) => Err(CompileError::Load {
                path: paths.cwasm,
                reason,
            }),
        }
    }

    /// Compile `path` again even when the cache holds it, replace the entry
    /// (atomically: an app still running the old artifact keeps its mapped
    /// file), and load the new one. For `corral recompile` and the API's
    /// Recompile: an operator who suspects an entry, or wants a fresh one
    /// after a compiler change that kept the engine hash.
    pub fn recompile(&self, engine: &Engine, path: &Path) -> Result<Artifact, CompileError> {
        let (source, id) = sources::open(path)?.read()?;
        let key = self.key(engine, &host_triple(), &source);
        let paths = EntryPaths::new(&self.root, &key);
        self.create_entry_dir(&paths)?;
        let _lock = lock_entry(&paths, self.owner)?;
        let (meta, took) = compile_and_store(engine, &source, &paths, self.owner, None)?;
        if let Some(id) = id {
            sources::remember(&self.root, path, &id, &source.digest, self.owner);
        }
        match open_entry(&paths, Some(engine))? {
            Probe::Hit((file, _, program)) => {
                Ok(artifact(key, paths, file, meta, program, false, Some(took)))
            }
            Probe::Missing => Err(CompileError::Load {
                path: paths.cwasm,
                reason: "vanished right after it was written".into(),
            }),
            Probe::Corrupt(reason) | Probe::Refused(reason) => Err(CompileError::Load {
                path: paths.cwasm,
                reason,
            }),
        }
    }

    /// Make sure the cache holds `source` compiled by `engine` for
    /// `target` (a triple; the engine must have been configured for it with
    /// `cpu`), without loading it: the way to fill another machine's
    /// directory. Code for another target is always `Baseline`.
    pub fn compile_for_target(
        &self,
        engine: &Engine,
        target: &str,
        cpu: CpuFeatures,
        source: &Source,
    ) -> Result<CompiledEntry, CompileError> {
        let cpu = if target == host_triple() {
            cpu
        } else {
            CpuFeatures::Baseline
        };
        let key = self.key(engine, target, source);
        let paths = EntryPaths::new(&self.root, &key);
        let done = |meta, hit, took| CompiledEntry {
            key: key.clone(),
            path: paths.cwasm.clone(),
            meta,
            cache_hit: hit,
            compile_time: took,
        };
        if let Probe::Hit((_, meta, _)) = open_entry(&paths, None)? {
            return Ok(done(meta, true, None));
        }
        self.create_entry_dir(&paths)?;
        let _lock = lock_entry(&paths, self.owner)?;
        match open_entry(&paths, None)? {
            Probe::Hit((_, meta, _)) => return Ok(done(meta, true, None)),
            // Without an engine nothing is loaded, so nothing is refused.
            Probe::Missing | Probe::Refused(_) => {}
            Probe::Corrupt(reason) => discard(&paths, &reason)?,
        }
        let (meta, took) = compile_and_store(engine, source, &paths, self.owner, Some(cpu))?;
        Ok(done(meta, false, Some(took)))
    }

    /// The key `source` has under `engine` for `target`.
    pub fn key(&self, engine: &Engine, target: &str, source: &Source) -> ArtifactKey {
        ArtifactKey {
            target: target.to_string(),
            engine: self.engine_hash(engine),
            module: source.digest.clone(),
        }
    }

    /// On a miss: an entry of the same module and target compiled for the
    /// baseline CPU under other engine settings (a pre-warmed fleet cache:
    /// `corral compile --target T --cpu-features baseline`), if wasmtime
    /// accepts it for `engine`. wasmtime checks that every setting that
    /// matters (version, flags, tunables, wasm features) agrees and that
    /// this CPU has every feature the code uses; a refusal just skips it.
    fn portable_sibling(&self, engine: &Engine, key: &ArtifactKey) -> Option<Artifact> {
        for engine_dir in read_dir_names(&self.root.join(&key.target)).ok()? {
            if engine_dir == key.engine {
                continue;
            }
            let sibling = ArtifactKey {
                target: key.target.clone(),
                engine: engine_dir,
                module: key.module.clone(),
            };
            let paths = EntryPaths::new(&self.root, &sibling);
            let portable =
                read_meta(&paths.meta).is_ok_and(|m| m.cpu_features == Some(CpuFeatures::Baseline));
            if !portable {
                continue;
            }
            match open_entry(&paths, Some(engine)) {
                Ok(Probe::Hit((file, meta, program))) => {
                    tracing::debug!(key = %sibling, "using a baseline-CPU entry");
                    return Some(artifact(sibling, paths, file, meta, program, true, None));
                }
                Ok(Probe::Missing) => {}
                Ok(Probe::Corrupt(reason) | Probe::Refused(reason)) => {
                    tracing::debug!(key = %sibling, %reason, "baseline-CPU entry not usable here");
                }
                Err(e) => tracing::debug!(key = %sibling, error = %chain(&e), "baseline-CPU entry"),
            }
        }
        None
    }

    /// `<root>/<target>/<engine>/`, mode 0700, owned like the root.
    fn create_entry_dir(&self, paths: &EntryPaths) -> Result<(), CacheError> {
        create_private_dir(&paths.dir)?;
        if let Some(owner) = self.owner {
            let target_dir = paths.dir.parent().unwrap_or(&paths.dir);
            for dir in [target_dir, paths.dir.as_path()] {
                give_to(dir, owner)?;
            }
        }
        Ok(())
    }

    fn engine_hash(&self, engine: &Engine) -> String {
        let mut known = self.engine_hashes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, hash)) = known.iter().find(|(e, _)| Engine::same(e, engine)) {
            return hash.clone();
        }
        let hash = engine_hash(engine);
        known.push((engine.clone(), hash.clone()));
        hash
    }

    /// Every entry, least recently used first.
    pub fn entries(&self) -> Result<Vec<Entry>, CacheError> {
        let mut entries = Vec::new();
        for (key, paths) in self.walk()? {
            let Ok(file) = File::open(&paths.cwasm) else {
                continue;
            };
            let stat = file.metadata().map_err(|source| CacheError::Read {
                path: paths.cwasm.clone(),
                source,
            })?;
            let meta_size = fs::metadata(&paths.meta).map(|m| m.len()).unwrap_or(0);
            let in_use = !lock::try_lock(&file, true).map_err(|source| CacheError::Lock {
                path: paths.cwasm.clone(),
                source,
            })?;
            entries.push(Entry {
                key,
                size: stat.len() + meta_size,
                meta: read_meta(&paths.meta).ok(),
                last_use: unix_secs(stat.modified().unwrap_or(UNIX_EPOCH)),
                in_use,
                path: paths.cwasm,
            });
        }
        entries.sort_by(|a, b| (a.last_use, &a.key.module).cmp(&(b.last_use, &b.key.module)));
        Ok(entries)
    }

    /// Check every entry's size and digest; with `remove`, delete the bad
    /// ones (they are rebuilt on next use anyway).
    pub fn verify(&self, remove: bool) -> Result<Vec<Verification>, CacheError> {
        let mut out = Vec::new();
        for (key, paths) in self.walk()? {
            let problem = match open_entry(&paths, None) {
                Ok(Probe::Hit(_)) => None,
                Ok(Probe::Missing) => Some("artifact disappeared while checking".to_string()),
                Ok(Probe::Corrupt(reason) | Probe::Refused(reason)) => Some(reason),
                Err(e) => Some(chain(&e)),
            };
            let mut removed = false;
            if let (Some(reason), true) = (&problem, remove)
                && let Some(_lock) = try_lock_entry(&paths, self.owner)?
            {
                discard(&paths, reason)?;
                removed = true;
            }
            out.push(Verification {
                key,
                path: paths.cwasm,
                problem,
                removed,
            });
        }
        Ok(out)
    }

    /// Delete least recently used entries until the cache holds at most
    /// `max_size` bytes. Entries in use or being compiled are kept (and
    /// reported); stale temp files are removed.
    pub fn gc(&self, max_size: u64) -> Result<GcReport, CacheError> {
        let mut report = GcReport {
            stale_temp_files: self.remove_stale_temp_files()?,
            ..GcReport::default()
        };
        sources::prune(&self.root, max_size == 0)?;
        let entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        for entry in entries {
            if total <= max_size {
                break;
            }
            if self.remove_entry(&entry.key)? {
                total -= entry.size;
                report.freed += entry.size;
                report.removed.push(entry.key);
            } else {
                report.kept_in_use.push(entry.key);
            }
        }
        report.size_after = total;
        Ok(report)
    }

    /// Delete every entry not in use, and stale temp files.
    pub fn clear(&self) -> Result<GcReport, CacheError> {
        self.gc(0)
    }

    /// Delete one entry unless it is in use or being compiled; `Ok(false)`
    /// if it was kept.
    pub fn remove_entry(&self, key: &ArtifactKey) -> Result<bool, CacheError> {
        let paths = EntryPaths::new(&self.root, key);
        let Some(_lock) = try_lock_entry(&paths, self.owner)? else {
            return Ok(false);
        };
        match File::open(&paths.cwasm) {
            Ok(file) => {
                let free = lock::try_lock(&file, true).map_err(|source| CacheError::Lock {
                    path: paths.cwasm.clone(),
                    source,
                })?;
                if !free {
                    return Ok(false);
                }
                remove_if_exists(&paths.cwasm)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CacheError::Read {
                    path: paths.cwasm,
                    source,
                });
            }
        }
        remove_if_exists(&paths.meta)?;
        // Last, while still holding it: a waiter re-checks the path.
        remove_if_exists(&paths.lock)?;
        Ok(true)
    }

    /// Every `<target>/<engine-hash>` directory under the root, as
    /// (target, engine hash, directory).
    fn engine_dirs(&self) -> Result<Vec<(String, String, PathBuf)>, CacheError> {
        let mut out = Vec::new();
        for target in read_dir_names(&self.root)? {
            let tdir = self.root.join(&target);
            if !tdir.is_dir() {
                continue;
            }
            for engine in read_dir_names(&tdir)? {
                let edir = tdir.join(&engine);
                if edir.is_dir() {
                    out.push((target.clone(), engine, edir));
                }
            }
        }
        Ok(out)
    }

    /// (key, paths) of every `.cwasm` under the root.
    fn walk(&self) -> Result<Vec<(ArtifactKey, EntryPaths)>, CacheError> {
        let mut out = Vec::new();
        for (target, engine, edir) in self.engine_dirs()? {
            for name in read_dir_names(&edir)? {
                if let Some(module) = name.strip_suffix(".cwasm")
                    && !module.starts_with('.')
                {
                    let key = ArtifactKey {
                        target: target.clone(),
                        engine: engine.clone(),
                        module: module.to_string(),
                    };
                    let paths = EntryPaths::new(&self.root, &key);
                    out.push((key, paths));
                }
            }
        }
        Ok(out)
    }

    fn remove_stale_temp_files(&self) -> Result<u64, CacheError> {
        let mut n = 0;
        let now = SystemTime::now();
        for (_, _, edir) in self.engine_dirs()? {
            for name in read_dir_names(&edir)? {
                let path = edir.join(&name);
                let old = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_TEMP);
                // A crash between writing the metadata and the artifact
                // leaves metadata alone.
                let orphan = name
                    .strip_suffix(".json")
                    .is_some_and(|m| !edir.join(format!("{m}.cwasm")).exists());
                if (name.starts_with(".tmp-") || orphan) && old {
                    remove_if_exists(&path)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

fn artifact(
    key: ArtifactKey,
    paths: EntryPaths,
    file: File,
    meta: EntryMeta,
    program: Option<crate::Program>,
    cache_hit: bool,
    compile_time: Option<Duration>,
) -> Artifact {
    Artifact {
        key,
        path: paths.cwasm,
        program: program.expect("open_entry loads when given an engine"),
        cache_hit,
        meta,
        compile_time,
        file,
    }
}

/// Open, pin (shared lock), verify and, given an engine, load an entry.
fn open_entry(
    paths: &EntryPaths,
    engine: Option<&Engine>,
) -> Result<Probe<(File, EntryMeta, Option<Program>)>, CacheError> {
    let file = match File::open(&paths.cwasm) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Probe::Missing),
        Err(source) => {
            return Err(CacheError::Read {
                path: paths.cwasm.clone(),
                source,
            });
        }
    };
    let lock_err = |source| CacheError::Lock {
        path: paths.cwasm.clone(),
        source,
    };
    lock::lock_shared(&file).map_err(lock_err)?;
    // gc may have deleted it between our open and lock.
    if !lock::same_file(&file, &paths.cwasm).map_err(lock_err)? {
        return Ok(Probe::Missing);
    }
    let meta = match read_meta(&paths.meta) {
        Ok(meta) => meta,
        Err(reason) => return Ok(Probe::Corrupt(reason)),
    };
    if let Some(module) = &meta.module_sha256
        && *module != paths.module
    {
        return Ok(Probe::Corrupt(format!(
            "metadata {} is of module {module}, not {}: the entry holds another module's files",
            paths.meta.display(),
            paths.module
        )));
    }
    let verified = match Verified::check(
        &file,
        &paths.cwasm,
        meta.kind,
        meta.artifact_size,
        Expected::of(meta.artifact_blake3.as_deref(), &meta.artifact_sha256),
    ) {
        Ok(v) => v,
        Err(mismatch) => return Ok(Probe::Corrupt(mismatch.to_string())),
    };
    let program = match engine {
        None => None,
        Some(engine) => match deserialize::deserialize(engine, verified) {
            Ok(p) => Some(p),
            Err(e) => return Ok(Probe::Refused(format!("{e:#}"))),
        },
    };
    // Last use, for gc. Best effort: a read-only cache still loads.
    if engine.is_some()
        && let Err(e) = file.set_modified(SystemTime::now())
    {
        tracing::debug!(path = %paths.cwasm.display(), error = %e, "cannot record last use");
    }
    Ok(Probe::Hit((file, meta, program)))
}

fn read_meta(path: &Path) -> Result<EntryMeta, String> {
    let bytes = fs::read(path).map_err(|e| format!("metadata {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("metadata {}: {e}", path.display()))
}

/// Remove a corrupt entry (caller holds its lock) and say so.
fn discard(paths: &EntryPaths, reason: &str) -> Result<(), CacheError> {
    tracing::warn!(
        path = %paths.cwasm.display(),
        %reason,
        "discarding corrupt cache entry; it will be rebuilt"
    );
    remove_if_exists(&paths.cwasm)?;
    remove_if_exists(&paths.meta)
}

fn lock_entry(paths: &EntryPaths, owner: Option<Owner>) -> Result<lock::FileLock, CacheError> {
    let lock = lock::lock_file(&paths.lock).map_err(|source| CacheError::Lock {
        path: paths.lock.clone(),
        source,
    })?;
    if let Some(owner) = owner {
        give_to(&paths.lock, owner)?;
    }
    Ok(lock)
}

/// The entry's lock if nobody holds it (gc and clear never wait).
fn try_lock_entry(paths: &EntryPaths, owner: Option<Owner>) -> Result<Option<File>, CacheError> {
    let err = |source| CacheError::Lock {
        path: paths.lock.clone(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&paths.lock)
        .map_err(err)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(err)?;
    }
    let locked = lock::try_lock(&file, true).map_err(err)?;
    if locked && lock::same_file(&file, &paths.lock).map_err(err)? {
        Ok(Some(file))
    } else {
        Ok(None)
    }
}

/// Compile `source` with `engine` and store it as `paths` (caller holds
/// the entry lock). Metadata first, then the artifact, each by rename.
fn compile_and_store(
    engine: &Engine,
    source: &Source,
    paths: &EntryPaths,
    owner: Option<Owner>,
    cpu_features: Option<CpuFeatures>,
) -> Result<(EntryMeta, Duration), CompileError> {
    let start = Instant::now();
    tracing::info!(
        source = %source.path.display(),
        size = source.wasm.len(),
        kind = %source.kind,
        "compiling"
    );
    let compiled = source.precompile(engine)?;
    let took = start.elapsed();
    let meta = EntryMeta {
        source: std::path::absolute(&source.path).unwrap_or_else(|_| source.path.clone()),
        kind: source.kind,
        module_size: source.wasm.len() as u64,
        module_sha256: Some(source.digest.clone()),
        artifact_size: compiled.len() as u64,
        artifact_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&compiled)),
        artifact_blake3: Some(deserialize::blake3_hex(&compiled)),
        compiled_at: unix_secs(SystemTime::now()),
        compile_ms: took.as_millis() as u64,
        cpu_features,
    };
    let json = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
    write_file(&paths.meta, &json, owner)?;
    if let Err(e) = write_file(&paths.cwasm, &compiled, owner).and_then(|()| sync_dir(&paths.dir)) {
        // No metadata without its artifact (e.g. the disk filled up).
        remove_if_exists(&paths.cwasm)?;
        remove_if_exists(&paths.meta)?;
        return Err(e.into());
    }
    Ok((meta, took))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}
