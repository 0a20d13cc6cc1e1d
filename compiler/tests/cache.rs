//! The cache on real files in temp dirs, with real wasmtime.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use corral_compiler::{
    Cache, CacheError, CompileError, CpuFeatures, EngineOptions, Program, ProgramKind, Source,
    build_engine, new_engine,
};

const ADD: &str = r#"(module (func (export "add") (param i32 i32) (result i32)
    local.get 0 local.get 1 i32.add))"#;
const SUB: &str = r#"(module (func (export "sub") (param i32 i32) (result i32)
    local.get 0 local.get 1 i32.sub))"#;

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap();
    path
}

fn cli_engine() -> wasmtime::Engine {
    new_engine(&EngineOptions::default_for_cli()).unwrap()
}

#[test]
fn compile_then_hit() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let module = write(tmp.path(), "add.wat", ADD);
    let engine = cli_engine();

    let first = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!first.cache_hit);
    assert!(first.compile_time.is_some());
    assert!(matches!(first.program, Program::Module(_)));
    assert_eq!(first.meta.kind, ProgramKind::Module);

    let second = cache.load_or_compile(&engine, &module).unwrap();
    assert!(second.cache_hit);
    assert_eq!(first.key, second.key);
    assert_eq!(first.path, second.path);

    // The layout and modes of ARCHITECTURE.md.
    let rel = second.path.strip_prefix(cache.root()).unwrap();
    assert_eq!(
        rel.to_str().unwrap(),
        format!(
            "{}/{}/{}.cwasm",
            second.key.target, second.key.engine, second.key.module
        )
    );
    assert_eq!(second.key.target, corral_compiler::host_triple());
    let dir_mode = fs::metadata(second.path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let file_mode = fs::metadata(&second.path).unwrap().permissions().mode();
    assert_eq!(file_mode & 0o077, 0);

    // The loaded module runs.
    let Program::Module(m) = &second.program else {
        panic!()
    };
    let mut store = wasmtime::Store::new(&engine, ());
    store.set_epoch_deadline(1);
    let instance = wasmtime::Instance::new(&mut store, m, &[]).unwrap();
    let add = instance
        .get_typed_func::<(i32, i32), i32>(&mut store, "add")
        .unwrap();
    assert_eq!(add.call(&mut store, (2, 3)).unwrap(), 5);
}

#[test]
fn text_and_binary_share_an_entry_and_components_are_recognized() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let engine = cli_engine();
    let wat = write(tmp.path(), "add.wat", ADD);
    let wasm = write(tmp.path(), "add.wasm", wat::parse_str(ADD).unwrap());
    let a = cache.load_or_compile(&engine, &wat).unwrap();
    let b = cache.load_or_compile(&engine, &wasm).unwrap();
    assert!(b.cache_hit);
    assert_eq!(a.key, b.key);

    let comp = write(
        tmp.path(),
        "c.wat",
        r#"(component (core module (func (export "f"))))"#,
    );
    let c = cache.load_or_compile(&engine, &comp).unwrap();
    assert!(matches!(c.program, Program::Component(_)));
    let c2 = cache.load_or_compile(&engine, &comp).unwrap();
    assert!(c2.cache_hit);
    assert_eq!(c2.meta.kind, ProgramKind::Component);
}

#[test]
fn changed_module_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let engine = cli_engine();
    let module = write(tmp.path(), "m.wat", ADD);
    let a = cache.load_or_compile(&engine, &module).unwrap();
    write(tmp.path(), "m.wat", SUB);
    let b = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!b.cache_hit);
    assert_ne!(a.key.module, b.key.module);
    assert_eq!(a.key.engine, b.key.engine);
}

#[test]
fn changed_engine_config_misses_and_pooling_does_not_change_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let module = write(tmp.path(), "m.wat", ADD);
    let native = cli_engine();
    let baseline =
        new_engine(&EngineOptions::default_for_cli().with_cpu(CpuFeatures::Baseline)).unwrap();
    let a = cache.load_or_compile(&native, &module).unwrap();
    let b = cache.load_or_compile(&baseline, &module).unwrap();
    assert!(!b.cache_hit);
    assert_ne!(a.key.engine, b.key.engine);
    assert_eq!(a.key.module, b.key.module);

    // An app's engine (pooling on) compiles the same code as the CLI's.
    let policy_dir = tempfile::tempdir().unwrap();
    let policy_path = policy_dir.path().join("policy.toml");
    let text = format!(
        "[apps.web]\nmodule = {:?}\nkind = \"stdio\"\nlisten = [\"127.0.0.1:9999\"]\n",
        module.display().to_string()
    );
    let policy =
        corral_policy::parse_str(&text, &policy_path, &corral_policy::Environment::default())
            .unwrap();
    let opts = EngineOptions::for_app(&policy.apps["web"]);
    assert!(opts.pooling.is_some());
    let pooled = build_engine(&opts, None).unwrap();
    let c = cache.load_or_compile(&pooled.engine, &module).unwrap();
    assert!(
        c.cache_hit,
        "pooling ({}) must not change the key",
        pooled.allocation
    );
    assert_eq!(a.key, c.key);
}

#[test]
fn corrupt_or_truncated_entry_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let engine = cli_engine();
    let module = write(tmp.path(), "m.wat", ADD);
    let path = {
        let a = cache.load_or_compile(&engine, &module).unwrap();
        a.path.clone()
    };

    // One flipped byte in the middle.
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let b = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!b.cache_hit, "a corrupt entry must be rebuilt, not loaded");
    drop(b);

    // Truncated.
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let c = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!c.cache_hit);
    drop(c);

    // Metadata gone.
    fs::remove_file(path.with_extension("json")).unwrap();
    let d = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!d.cache_hit);
    let e = cache.load_or_compile(&engine, &module).unwrap();
    assert!(e.cache_hit);

    // verify finds and removes damage.
    drop((d, e));
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(10)
        .unwrap();
    let report = cache.verify(true).unwrap();
    assert_eq!(report.len(), 1);
    assert!(report[0].problem.is_some() && report[0].removed);
    assert!(!path.exists());
}

#[test]
fn cross_target_gives_an_aarch64_elf() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let target = "aarch64-unknown-linux-gnu";
    let built = build_engine(&EngineOptions::default_for_cli(), Some(target)).unwrap();
    let source = Source::read(&write(tmp.path(), "m.wat", ADD)).unwrap();
    let entry = cache
        .compile_for_target(&built.engine, target, CpuFeatures::Baseline, &source)
        .unwrap();
    assert!(!entry.cache_hit);
    assert!(entry.path.starts_with(tmp.path().join(target)));
    let elf = fs::read(&entry.path).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELFCLASS64");
    const EM_AARCH64: u16 = 183;
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), EM_AARCH64);

    let again = cache
        .compile_for_target(&built.engine, target, CpuFeatures::Baseline, &source)
        .unwrap();
    assert!(again.cache_hit);
    // It is listed under its target.
    let listed = cache.entries().unwrap();
    assert!(listed.iter().any(|e| e.key.target == target));
}

#[test]
fn gc_stays_within_the_limit_and_keeps_entries_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(&tmp.path().join("c")).unwrap();
    let engine = cli_engine();
    let mut artifacts = Vec::new();
    for i in 0..4 {
        let m = write(
            tmp.path(),
            &format!("m{i}.wat"),
            format!("(module (func (export \"f{i}\") (result i32) i32.const {i}))"),
        );
        let a = cache.load_or_compile(&engine, &m).unwrap();
        // Distinct last-use times, oldest first.
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i * 10);
        fs::File::options()
            .write(true)
            .open(&a.path)
            .unwrap()
            .set_modified(t)
            .unwrap();
        artifacts.push(a);
    }
    let held = artifacts.remove(0); // the oldest stays in use
    let keys: Vec<_> = artifacts.iter().map(|a| a.key.clone()).collect();
    drop(artifacts);

    let entries = cache.entries().unwrap();
    let total: u64 = entries.iter().map(|e| e.size).sum();
    assert!(entries[0].in_use && entries[0].key == held.key);
    let each = entries[1].size;
    let limit = total - each - 1; // forces out two entries

    let report = cache.gc(limit).unwrap();
    assert!(report.size_after <= limit, "{report:?}");
    assert_eq!(report.kept_in_use, vec![held.key.clone()]);
    assert_eq!(
        report.removed,
        keys[..2].to_vec(),
        "least recently used go first"
    );
    let left: Vec<_> = cache
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(left, vec![held.key.clone(), keys[2].clone()]);

    drop(held);
    let report = cache.clear().unwrap();
    assert_eq!(report.removed.len(), 2);
    assert!(cache.entries().unwrap().is_empty());
}

#[test]
fn unwritable_cache_dir_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "plain-file", "x");
    let err = Cache::open(&file.join("cache")).unwrap_err();
    assert!(matches!(err, CacheError::CreateDir { .. }), "{err}");
    assert!(err.to_string().contains("plain-file/cache"), "{err}");

    // A read-only directory (root ignores modes, so only as a user).
    if !rustix::process::geteuid().is_root() {
        let ro = tmp.path().join("ro");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o500)).unwrap();
        let err = Cache::open(&ro).unwrap_err();
        assert!(matches!(err, CacheError::NotWritable { .. }), "{err}");
    }
}

#[test]
fn bad_modules_give_one_line_errors_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let cache = Cache::open(&cache_dir).unwrap();
    let engine = cli_engine();

    let not_wasm = write(tmp.path(), "notes.txt", "hello, world\n");
    let err = cache.load_or_compile(&engine, &not_wasm).unwrap_err();
    assert!(matches!(err, CompileError::NotWasm { .. }), "{err}");

    let full = wat::parse_str(ADD).unwrap();
    let truncated = write(tmp.path(), "trunc.wasm", &full[..full.len() - 5]);
    let err = cache.load_or_compile(&engine, &truncated).unwrap_err();
    assert!(matches!(err, CompileError::Truncated { .. }), "{err}");

    // Validation failure: i32.add on an i64 operand.
    let invalid = write(
        tmp.path(),
        "invalid.wasm",
        wat::parse_str("(module (func (result i32) i64.const 1 i32.const 2 i32.add))").unwrap(),
    );
    let err = cache.load_or_compile(&engine, &invalid).unwrap_err();
    match &err {
        CompileError::Invalid { reason, offset, .. } => {
            assert!(reason.contains("type mismatch"), "{err}");
            assert!(offset.is_some(), "{err}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }

    let bad_text = write(
        tmp.path(),
        "bad.wat",
        "(module (func (result i32) i32.konst 1))",
    );
    let err = cache.load_or_compile(&engine, &bad_text).unwrap_err();
    assert!(matches!(err, CompileError::InvalidText { .. }), "{err}");

    let missing = tmp.path().join("missing.wasm");
    let err = cache.load_or_compile(&engine, &missing).unwrap_err();
    assert!(matches!(err, CompileError::ReadSource { .. }), "{err}");

    for (err, name) in [
        (
            cache.load_or_compile(&engine, &not_wasm).unwrap_err(),
            "notes.txt",
        ),
        (
            cache.load_or_compile(&engine, &truncated).unwrap_err(),
            "trunc.wasm",
        ),
        (
            cache.load_or_compile(&engine, &invalid).unwrap_err(),
            "invalid.wasm",
        ),
        (
            cache.load_or_compile(&engine, &bad_text).unwrap_err(),
            "bad.wat",
        ),
    ] {
        let line = err.to_string();
        assert!(line.contains(name), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }

    // No artifacts, metadata or temp files were left in the cache.
    let leftovers: Vec<_> = walk(&cache_dir)
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn unknown_target_is_an_error_naming_it() {
    for target in ["sparc-sun-solaris", "not-a-triple-at-all"] {
        let err = build_engine(&EngineOptions::default_for_cli(), Some(target)).unwrap_err();
        assert!(matches!(err, CompileError::Target { .. }), "{err}");
        assert!(err.to_string().contains(target), "{err}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_handed_over_fd_is_verified_then_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let engine = cli_engine();
    let module = write(tmp.path(), "m.wat", ADD);
    let artifact = cache.load_or_compile(&engine, &module).unwrap();
    let handoff = artifact.handoff();
    let fd = artifact.file().try_clone().unwrap();
    let program = corral_compiler::load_handed_over(&engine, &fd, &handoff).unwrap();
    assert!(matches!(program, Program::Module(_)));

    // A file that does not match the handoff is refused before mapping.
    let mut bytes = fs::read(&artifact.path).unwrap();
    bytes[100] ^= 1;
    let copy = write(tmp.path(), "copy.cwasm", &bytes);
    let err = corral_compiler::load_handed_over(&engine, &fs::File::open(&copy).unwrap(), &handoff)
        .unwrap_err();
    assert!(matches!(err, CompileError::Load { .. }), "{err}");
    assert!(err.to_string().contains("digest differs"), "{err}");
}

#[test]
fn root_writing_into_a_users_cache_gives_the_files_to_that_user() {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED root_writing_into_a_users_cache_...: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cache");
    fs::create_dir(&root).unwrap();
    let (uid, gid) = (65534, 65534);
    std::os::unix::fs::chown(&root, Some(uid), Some(gid)).unwrap();
    let cache = Cache::open(&root).unwrap();
    let a = cache
        .load_or_compile(&cli_engine(), &write(tmp.path(), "m.wat", ADD))
        .unwrap();
    let dir = a.path.parent().unwrap();
    for p in [
        dir.parent().unwrap(),
        dir,
        &a.path,
        &a.path.with_extension("json"),
        &a.path.with_extension("lock"),
    ] {
        let m = fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{}", p.display());
    }
}

#[test]
fn a_baseline_entry_serves_a_native_engine_on_a_miss() {
    // A pre-warmed fleet cache holds baseline-CPU entries; the daemon's
    // native engine uses them instead of compiling.
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let source = Source::read(&write(tmp.path(), "m.wat", ADD)).unwrap();
    let host = corral_compiler::host_triple();
    let baseline_opts = EngineOptions::default_for_cli().with_cpu(CpuFeatures::Baseline);
    let baseline = new_engine(&baseline_opts).unwrap();
    let warmed = cache
        .compile_for_target(&baseline, &host, CpuFeatures::Baseline, &source)
        .unwrap();
    assert_eq!(warmed.meta.cpu_features, Some(CpuFeatures::Baseline));

    let native = cli_engine();
    let a = cache.load_or_compile_source(&native, &source).unwrap();
    assert!(a.cache_hit);
    assert_eq!(a.key, warmed.key);

    // The other way round is a miss: a native entry is not portable.
    let other = Source::read(&write(tmp.path(), "n.wat", SUB)).unwrap();
    let n = cache.load_or_compile_source(&native, &other).unwrap();
    let b = cache.load_or_compile_source(&baseline, &other).unwrap();
    assert!(!b.cache_hit);
    assert_ne!(n.key, b.key);
}

#[test]
fn a_remembered_source_digest_never_hides_a_change_or_a_corrupt_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let engine = cli_engine();
    // Sources under 64 KiB are not remembered: pad with a comment.
    let big = |text: &str| format!("{text}\n;; {}\n", "x".repeat(70_000));
    let module = write(tmp.path(), "m.wat", big(ADD));
    let other = write(tmp.path(), "k.wat", big(SUB));
    // Files changed in the last 2 s are not remembered (see sources.rs).
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let a = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!a.cache_hit);
    let records = || fs::read_dir(cache.root().join("sources")).unwrap().count();
    assert_eq!(records(), 1, "the source's digest is remembered");
    let b = cache.load_or_compile(&engine, &module).unwrap();
    assert!(b.cache_hit);
    assert_eq!(a.key, b.key);

    // Other contents of the same size, mtime put back (utimensat): only
    // the ctime differs, and that is enough.
    let mul = big(&ADD.replace("add", "mul"));
    assert_eq!(big(ADD).len(), mul.len());
    let mtime = fs::metadata(&module).unwrap().modified().unwrap();
    fs::write(&module, &mul).unwrap();
    fs::File::options()
        .write(true)
        .open(&module)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(fs::metadata(&module).unwrap().modified().unwrap(), mtime);
    let c = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!c.cache_hit, "changed contents must not hit the old entry");
    assert_eq!(c.key.module, Source::read(&module).unwrap().digest);
    assert_ne!(c.key.module, a.key.module);
    drop((a, b, c));

    // A corrupt artifact (one byte flipped in the middle, same size) is
    // discarded and rebuilt, also when the source's digest is remembered.
    let d = cache.load_or_compile(&engine, &other).unwrap();
    assert!(!d.cache_hit);
    assert_eq!(records(), 2);
    let artifact = d.path.clone();
    drop(d);
    let mut bytes = fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&artifact, &bytes).unwrap();
    let e = cache.load_or_compile(&engine, &other).unwrap();
    assert!(!e.cache_hit, "a corrupt entry must be rebuilt, not loaded");
    assert_ne!(fs::read(&artifact).unwrap(), bytes);
    let f = cache.load_or_compile(&engine, &other).unwrap();
    assert!(f.cache_hit);
}

#[test]
fn an_entry_without_a_blake3_digest_is_checked_against_its_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let engine = cli_engine();
    let module = write(tmp.path(), "m.wat", ADD);
    let a = cache.load_or_compile(&engine, &module).unwrap();
    assert!(a.meta.artifact_blake3.is_some());
    let json = a.path.with_extension("json");
    let mut meta: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    meta.as_object_mut()
        .unwrap()
        .remove("artifact-blake3")
        .unwrap();
    fs::write(&json, serde_json::to_vec(&meta).unwrap()).unwrap();
    let b = cache.load_or_compile(&engine, &module).unwrap();
    assert!(b.cache_hit, "an older entry still loads");
    assert_eq!(b.meta.artifact_blake3, None);

    let mut bytes = fs::read(&a.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&a.path, &bytes).unwrap();
    drop((a, b));
    let c = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!c.cache_hit, "and is still rebuilt when corrupt");
}

/// An entry whose bytes are fine but that an engine's runtime limits refuse
/// (here: the pooling allocator sized for one table, a module with two) is
/// an error each time, but never discarded and rebuilt: recompiling gives
/// the same bytes, and an engine with other limits still loads it.
#[test]
fn an_artifact_the_pool_refuses_is_an_error_not_corruption() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let module = write(
        tmp.path(),
        "two-tables.wat",
        "(module (table 1 funcref) (table 1 funcref))",
    );
    let policy_path = tmp.path().join("policy.toml");
    let text = format!(
        "[apps.t]\nmodule = {:?}\nkind = \"stdio\"\nlisten = [\"127.0.0.1:9999\"]\nlimits = {{ tables = 1 }}\n",
        module.display().to_string()
    );
    let policy =
        corral_policy::parse_str(&text, &policy_path, &corral_policy::Environment::default())
            .unwrap();
    let pooled = build_engine(&EngineOptions::for_app(&policy.apps["t"]), None).unwrap();
    if !matches!(pooled.allocation, corral_compiler::Allocation::Pooling) {
        eprintln!(
            "SKIP: the pooling allocator is unavailable here ({})",
            pooled.allocation
        );
        return;
    }

    let first = cache.load_or_compile(&pooled.engine, &module).unwrap_err();
    let CompileError::Load { path, reason } = &first else {
        panic!("expected a load error, got {first}")
    };
    assert!(reason.contains("table"), "the refusal says why: {reason}");
    let inode = fs::metadata(path).expect("the entry is kept").ino();

    let again = cache.load_or_compile(&pooled.engine, &module).unwrap_err();
    assert!(matches!(again, CompileError::Load { .. }), "{again}");
    assert_eq!(
        fs::metadata(path).unwrap().ino(),
        inode,
        "not discarded and rebuilt"
    );

    let on_demand = cache.load_or_compile(&cli_engine(), &module).unwrap();
    assert!(
        on_demand.cache_hit,
        "another engine with the same code settings loads the kept entry"
    );
}

/// An entry whose `.cwasm` and `.json` were both replaced by another
/// module's passes every size and digest check of the artifact itself;
/// the module digest in the metadata tells that it is not the key's.
#[test]
fn an_entry_holding_another_modules_files_is_rebuilt_and_fails_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let engine = cli_engine();
    let add = write(tmp.path(), "add.wat", ADD);
    let sub = write(tmp.path(), "sub.wat", SUB);
    let a = cache.load_or_compile(&engine, &add).unwrap();
    let s = cache.load_or_compile(&engine, &sub).unwrap();
    let (a_path, s_path) = (a.path.clone(), s.path.clone());
    assert_eq!(a.meta.module_sha256.as_deref(), Some(a.key.module.as_str()));
    drop((a, s));
    for ext in ["cwasm", "json"] {
        fs::copy(s_path.with_extension(ext), a_path.with_extension(ext)).unwrap();
    }

    let report = cache.verify(false).unwrap();
    let bad: Vec<_> = report.iter().filter(|v| v.problem.is_some()).collect();
    assert_eq!(bad.len(), 1, "{report:#?}");
    assert_eq!(bad[0].path, a_path);
    assert!(
        bad[0].problem.as_ref().unwrap().contains("another module"),
        "{report:#?}"
    );

    let again = cache.load_or_compile(&engine, &add).unwrap();
    assert!(!again.cache_hit, "another module's artifact was served");
    let Program::Module(m) = &again.program else {
        panic!()
    };
    assert!(m.get_export("add").is_some() && m.get_export("sub").is_none());
    assert!(
        cache
            .verify(false)
            .unwrap()
            .iter()
            .all(|v| v.problem.is_none())
    );
}

fn inode(file: &fs::File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().unwrap().ino()
}

fn run_add(engine: &wasmtime::Engine, program: &Program) -> i32 {
    let Program::Module(m) = program else {
        panic!("not a module")
    };
    let mut store = wasmtime::Store::new(engine, ());
    store.set_epoch_deadline(1);
    let instance = wasmtime::Instance::new(&mut store, m, &[]).unwrap();
    let add = instance
        .get_typed_func::<(i32, i32), i32>(&mut store, "add")
        .unwrap();
    add.call(&mut store, (2, 3)).unwrap()
}

/// An entry is only ever replaced by rename: a recompile while the old
/// artifact is mapped leaves that mapping intact. And when a zygote finds
/// its handed-over artifact damaged (here: truncated in place),
/// loading it again through the cache (what corrald does then) discards
/// the entry and builds a new file, once.
#[test]
fn a_damaged_handed_over_entry_is_rebuilt_as_a_new_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let engine = cli_engine();
    let module = write(tmp.path(), "m.wat", ADD);

    let mapped = cache.load_or_compile(&engine, &module).unwrap();
    let recompiled = cache.recompile(&engine, &module).unwrap();
    assert_ne!(inode(mapped.file()), inode(recompiled.file()));
    assert_eq!(run_add(&engine, &mapped.program), 5, "the old mapping");
    drop((mapped, recompiled));

    // corrald pins the artifact and hands it to a zygote.
    let pinned = cache
        .load_or_compile(&engine, &module)
        .unwrap()
        .into_pinned();
    let handoff = pinned.handoff();
    let damaged_inode = inode(pinned.file());
    let len = pinned.file().metadata().unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pinned.path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = corral_compiler::load_handed_over(&engine, pinned.file(), &handoff).unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");

    let rebuilt = cache.load_or_compile(&engine, &module).unwrap();
    assert!(!rebuilt.cache_hit);
    assert_eq!(rebuilt.path, pinned.path);
    assert_ne!(inode(rebuilt.file()), damaged_inode, "rewritten in place");
    assert_eq!(run_add(&engine, &rebuilt.program), 5);
    let fd = rebuilt.file().try_clone().unwrap();
    let program = corral_compiler::load_handed_over(&engine, &fd, &rebuilt.handoff()).unwrap();
    assert_eq!(run_add(&engine, &program), 5);

    // A second report of the same damage (another zygote of the app) finds
    // the new entry sound and loads it.
    let again = cache.load_or_compile(&engine, &module).unwrap();
    assert!(again.cache_hit);
    assert_eq!(inode(again.file()), inode(rebuilt.file()));
}
