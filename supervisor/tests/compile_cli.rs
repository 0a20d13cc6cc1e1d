//! `corral compile` and `corral cache` as a user runs them: the real binary,
//! real files in a temp dir.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

/// A module big enough that compiling it takes a noticeable time, so two
/// processes started together really overlap.
fn slow_module(functions: usize) -> String {
    let mut wat = String::from("(module\n");
    for i in 0..functions {
        wat.push_str(&format!(
            "(func (export \"f{i}\") (param i64) (result i64)\n\
             local.get 0 i64.const {i} i64.mul i64.const 7 i64.add\n\
             local.get 0 i64.const 3 i64.shr_u i64.xor i64.const {i} i64.rotl)\n"
        ));
    }
    wat.push(')');
    wat
}

fn corral(args: &[&str], cwd: &Path) -> Output {
    Command::new(CORRAL)
        .args(args)
        .current_dir(cwd)
        .env_remove("CACHE_DIRECTORY")
        .output()
        .expect("run corral")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn two_processes_compiling_the_same_module_compile_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("slow.wat"), slow_module(3000)).unwrap();
    let spawn = || {
        Command::new(CORRAL)
            .args(["compile", "slow.wat", "--cache", "cache", "--json"])
            .current_dir(tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn corral")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{a:?} {b:?}");
    let results: Vec<Value> = [&a, &b]
        .iter()
        .map(|o| json(o)["results"][0].clone())
        .collect();
    let compiled = results.iter().filter(|r| r["cached"] == false).count();
    assert_eq!(compiled, 1, "exactly one process compiles: {results:?}");
    assert_eq!(results[0]["key"], results[1]["key"]);

    // No temp files were left, and the entry verifies.
    let out = corral(
        &["cache", "verify", "--cache", "cache", "--json"],
        tmp.path(),
    );
    assert!(out.status.success());
    assert_eq!(json(&out)["ok"], true);
}

#[test]
fn compile_list_gc_clear_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("a.wat"), "(module (func (export \"a\")))").unwrap();
    std::fs::write(dir.join("b.wat"), "(component)").unwrap();
    std::fs::write(dir.join("notes.txt"), "not wasm").unwrap();

    let out = corral(
        &[
            "compile",
            "a.wat",
            "b.wat",
            "--target",
            "aarch64-unknown-linux-gnu",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--cache",
            "c",
        ],
        dir,
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("compiled")).count(),
        4,
        "{stdout}"
    );

    let out = corral(&["cache", "list", "--cache", "c", "--json"], dir);
    let list = json(&out);
    assert_eq!(list["entries"].as_array().unwrap().len(), 4);

    let out = corral(
        &["cache", "gc", "--max-size", "1B", "--cache", "c", "--json"],
        dir,
    );
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["report"]["removed"].as_array().unwrap().len(), 4);
    assert_eq!(report["report"]["size-after"], 0);

    // A bad file fails that file only, with a one-line error naming it.
    let out = corral(&["compile", "a.wat", "notes.txt", "--cache", "c"], dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("notes.txt: not a WebAssembly"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("a.wat"));

    let out = corral(&["cache", "clear", "--cache", "c"], dir);
    assert!(out.status.success());
    let out = corral(&["cache", "list", "--cache", "c", "--json"], dir);
    assert_eq!(json(&out)["entries"].as_array().unwrap().len(), 0);

    // -o writes a file and leaves the cache alone.
    let out = corral(&["compile", "a.wat", "-o", "a.cwasm"], dir);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        &std::fs::read(dir.join("a.cwasm")).unwrap()[..4],
        b"\x7fELF"
    );

    // An unknown target is an error naming it.
    let out = corral(
        &[
            "compile",
            "a.wat",
            "--target",
            "bogus-arch-linux",
            "--cache",
            "c",
        ],
        dir,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus-arch-linux"));
}

#[test]
fn compile_policy_uses_its_cache_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("a.wat"), "(module (func (export \"_start\")))").unwrap();
    let cache = dir.join("policy-cache");
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "[daemon]\ncache-dir = {:?}\n\n[apps.one]\nmodule = \"a.wat\"\nkind = \"command\"\n",
            cache.display().to_string()
        ),
    )
    .unwrap();
    let out = corral(&["compile", "--policy", "policy.toml", "--json"], dir);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["results"][0]["app"], "one");
    let listed = corral(&["cache", "list", "--policy", "policy.toml", "--json"], dir);
    assert_eq!(json(&listed)["entries"].as_array().unwrap().len(), 1);
}

#[test]
fn a_full_disk_is_a_one_line_error_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("slow.wat"), slow_module(300)).unwrap();
    let small_fs = dir.join("small-fs");
    std::fs::create_dir(&small_fs).unwrap();
    // A 64 KiB tmpfs in a private mount namespace, so nothing leaks out.
    let script = format!(
        "mount -t tmpfs -o size=64k corral-test {fs} || exit 97; \
         {corral} compile slow.wat --cache {fs}/cache; echo rc=$?; \
         find {fs}/cache -type f ! -name '*.lock'",
        fs = small_fs.display(),
        corral = CORRAL
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .current_dir(dir)
        .output()
        .expect("run unshare");
    if out.status.code() == Some(97) || !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a small tmpfs (needs root): {why}"
        );
        eprintln!("SKIPPED a_full_disk_...: cannot mount a small tmpfs (needs root): {why}");
        return;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("rc=1"), "{stdout} {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("No space left on device"), "{stderr}");
    assert!(lines[0].contains(".cwasm"), "names the file: {stderr}");
    let leftovers: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("rc=")).collect();
    assert!(leftovers.is_empty(), "left in the cache: {leftovers:?}");
}

#[test]
fn a_read_only_cache_dir_is_a_one_line_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("a.wat"), "(module)").unwrap();
    let ro = dir.join("ro-cache");
    std::fs::create_dir(&ro).unwrap();
    // Root ignores file modes, so make it read-only the way root can't
    // ignore: a read-only mount, in a private mount namespace.
    let script = format!(
        "mount -t tmpfs -o ro corral-test {ro} || exit 97; echo mounted; \
         {corral} compile a.wat --cache {ro}",
        ro = ro.display(),
        corral = CORRAL
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .current_dir(dir)
        .output()
        .expect("run unshare");
    if !String::from_utf8_lossy(&out.stdout).contains("mounted") {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a read-only tmpfs (needs root): {why}"
        );
        eprintln!("SKIPPED a_read_only_cache_dir_...: cannot mount (needs root): {why}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("ro-cache: cache directory is not writable"),
        "{stderr}"
    );
}

/// An entry whose `.cwasm` and `.json` were both replaced by another
/// module's is reported by `corral cache verify` (it used to pass: each
/// file matched the other, and only the key named the module).
#[test]
fn cache_verify_finds_an_entry_holding_another_modules_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("a.wat"), "(module (func (export \"a\")))").unwrap();
    std::fs::write(dir.join("b.wat"), "(module (func (export \"b\")))").unwrap();
    let out = corral(
        &["compile", "a.wat", "b.wat", "--cache", "c", "--json"],
        dir,
    );
    assert!(out.status.success(), "{out:?}");
    let results = json(&out)["results"].clone();
    // Relative to `dir` (the cache was given as `c`).
    let path = |i: usize| dir.join(results[i]["path"].as_str().unwrap());
    let (a, b) = (path(0), path(1));
    for ext in ["cwasm", "json"] {
        std::fs::copy(b.with_extension(ext), a.with_extension(ext)).unwrap();
    }

    let out = corral(&["cache", "verify", "--cache", "c"], dir);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 damaged"), "{stdout}");
    assert!(stdout.contains("another module"), "{stdout}");
}
