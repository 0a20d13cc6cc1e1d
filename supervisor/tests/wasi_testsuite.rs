//! Conformance: every preview1 program of the WASI testsuite, run through
//! the real `corral run` binary, must meet its `.json` expectations (exit
//! code, stdout, stderr; args, env and a read-write root preopen as input).
//!
//! The suite is read from `$WASI_TESTSUITE`, default `../shared/wasi-testsuite`
//! next to the repository. It is copied into a temporary directory first
//! (tests write into their fixtures). A missing suite fails under `CI=true`
//! and is a visible skip elsewhere.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

/// One test's `.json`; missing keys take the suite's defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Spec {
    args: Vec<String>,
    env: BTreeMap<String, String>,
    root: Option<String>,
    dirs: Vec<String>,
    exit_code: i32,
    stdout: Option<String>,
    stderr: Option<String>,
}

fn suite_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("WASI_TESTSUITE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/wasi-testsuite"),
    };
    if dir.is_dir() {
        return Some(dir);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !ci,
        "CI=true and the WASI testsuite is missing at {} (set WASI_TESTSUITE)",
        dir.display()
    );
    eprintln!(
        "SKIPPED: WASI testsuite not found at {} (set WASI_TESTSUITE to run it)",
        dir.display()
    );
    None
}

/// Copy a tree, keeping symlinks as symlinks (the fixtures have some).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let ty = entry.file_type().unwrap();
        let dest = to.join(entry.file_name());
        if ty.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), &dest).unwrap();
        } else if ty.is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

fn remove_cleanup_files(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let ty = entry.file_type().unwrap();
        if path.extension().is_some_and(|e| e == "cleanup") {
            if ty.is_dir() {
                fs::remove_dir_all(&path).unwrap();
            } else {
                fs::remove_file(&path).unwrap();
            }
        } else if ty.is_dir() {
            remove_cleanup_files(&path);
        }
    }
}

fn tests_in(suite: &Path) -> Vec<PathBuf> {
    let mut tests = Vec::new();
    for lang in fs::read_dir(suite).unwrap() {
        let dir = lang.unwrap().path().join("wasm32-wasip1");
        if !dir.is_dir() {
            continue;
        }
        for f in fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            if path.extension().is_some_and(|e| e == "wasm") {
                tests.push(path);
            }
        }
    }
    tests.sort();
    tests
}

/// Run one test; `Err` says how it failed.
fn run_one(wasm: &Path, cache: &Path) -> Result<(), String> {
    let json = wasm.with_extension("json");
    let spec: Spec = if json.exists() {
        serde_json::from_str(&fs::read_to_string(&json).unwrap())
            .map_err(|e| format!("{}: {e}", json.display()))?
    } else {
        Spec::default()
    };
    let dir = wasm.parent().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
    cmd.arg("run")
        .arg("--cache")
        .arg(cache)
        .arg("--timeout")
        .arg("60s");
    if let Some(root) = &spec.root {
        cmd.arg("--dir")
            .arg(format!("{}::/", dir.join(root).display()));
    }
    for d in &spec.dirs {
        cmd.arg("--dir")
            .arg(format!("{}::/{d}", dir.join(d).display()));
    }
    for (k, v) in &spec.env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    cmd.arg(wasm).arg("--").args(&spec.args);
    cmd.current_dir(dir).stdin(Stdio::null());
    let out = cmd.output().map_err(|e| format!("spawning corral: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if out.status.code() != Some(spec.exit_code) {
        problems.push(format!(
            "exit status {:?}, expected {}",
            out.status.code(),
            spec.exit_code
        ));
    }
    if let Some(want) = &spec.stdout
        && *want != stdout
    {
        problems.push(format!("stdout {stdout:?}, expected {want:?}"));
    }
    if let Some(want) = &spec.stderr
        && *want != stderr
    {
        problems.push(format!("stderr {stderr:?}, expected {want:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}\n    stderr: {}",
            problems.join("; "),
            stderr.trim_end()
        ))
    }
}

#[test]
fn wasi_testsuite_preview1() {
    let Some(suite) = suite_dir() else { return };
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("suite");
    copy_tree(&suite, &copy);
    let cache = work.path().join("cache");
    let tests = tests_in(&copy);
    assert!(
        !tests.is_empty(),
        "no tests found under {}",
        suite.display()
    );

    let mut failures = Vec::new();
    for wasm in &tests {
        remove_cleanup_files(&copy);
        let name = wasm.strip_prefix(&copy).unwrap().display().to_string();
        match run_one(wasm, &cache) {
            Ok(()) => eprintln!("ok   {name}"),
            Err(why) => {
                eprintln!("FAIL {name}: {why}");
                failures.push(name);
            }
        }
    }
    let passed = tests.len() - failures.len();
    eprintln!("wasi-testsuite preview1: {passed}/{} passed", tests.len());
    assert!(failures.is_empty(), "failed: {failures:#?}");
}
