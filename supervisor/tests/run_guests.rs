//! `corral run` on the guest fixtures of tests/guests/: exit codes, stdio,
//! limits (memory, timeout, instances, tables) with their documented codes
//! and messages, preopen confinement, command components and mixed WASI
//! versions.
//! Every test runs the real binary.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use corral_testkit::guest;

/// `corral run --cache <tmp> ARGS...` with `stdin` as input.
fn corral_run(cache: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("run")
        .arg("--cache")
        .arg(cache)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn corral");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exit_code_3_is_passed_through() {
    let cache = tempfile::tempdir().unwrap();
    let file = guest("exit3.wasm");
    // First run compiles (and re-executes to enter the sandbox), the second
    // loads from the cache, the third runs without the sandbox.
    for args in [&[][..], &[], &["--no-sandbox"]] {
        let mut args = args.to_vec();
        args.push(file.to_str().unwrap());
        let out = corral_run(cache.path(), &args, b"");
        assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "exiting with 3\n");
        assert_eq!(text(&out.stderr), "");
    }
}

#[test]
fn a_trap_exits_126_with_the_guest_backtrace() {
    let cache = tempfile::tempdir().unwrap();
    let out = corral_run(cache.path(), &[guest("trap.wasm").to_str().unwrap()], b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("corral: ") && first.ends_with("trap.wasm trapped"),
        "{stderr}"
    );
    let inner = stderr.find("!inner").expect("inner in the backtrace");
    let outer = stderr.find("!outer").expect("outer in the backtrace");
    assert!(inner < outer, "innermost frame first: {stderr}");
    assert!(
        stderr.contains("wasm `unreachable` instruction executed"),
        "{stderr}"
    );
}

#[test]
fn stdio_echo_copies_stdin_to_stdout() {
    let cache = tempfile::tempdir().unwrap();
    let input = b"hello corral\nsecond line\n";
    let out = corral_run(
        cache.path(),
        &[guest("stdio-echo.wasm").to_str().unwrap()],
        input,
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(out.stdout, input);
}

#[test]
fn endless_loop_is_stopped_by_the_timeout() {
    let cache = tempfile::tempdir().unwrap();
    let out = corral_run(
        cache.path(),
        &["--timeout", "200ms", guest("loop.wasm").to_str().unwrap()],
        b"",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stderr: {stderr}");
    assert!(
        stderr.starts_with("corral: limits.timeout (200ms) exceeded\n"),
        "{stderr}"
    );
    // The guest backtrace, with the function name from the name section.
    assert!(stderr.contains("!spin"), "{stderr}");
}

#[test]
fn unbounded_memory_growth_traps_naming_the_limit() {
    let cache = tempfile::tempdir().unwrap();
    let out = corral_run(
        cache.path(),
        &["--memory", "4MiB", guest("grow.wasm").to_str().unwrap()],
        b"",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "stderr: {stderr}");
    assert!(
        stderr
            .starts_with("corral: limits.memory (4 MiB) exceeded: the guest asked for 4160 KiB\n"),
        "{stderr}"
    );
    assert!(stderr.contains("!grow_forever"), "{stderr}");
}

#[test]
fn policy_app_limits_apply_with_and_without_the_pooling_allocator() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let module = guest("grow.wasm").display().to_string();
    // `command` apps allocate on demand; `stdio` (and `http`) apps use the
    // pooling allocator, whose slot size is the same limit.
    std::fs::write(
        &policy,
        format!(
            "[defaults]\nlimits = {{ memory = \"2MiB\" }}\n\
             sandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\
             [apps.grow]\nmodule = {module:?}\nkind = \"command\"\n\
             [apps.pooled]\nmodule = {module:?}\nkind = \"stdio\"\nlisten = [\"127.0.0.1:9\"]\n"
        ),
    )
    .unwrap();
    for app in ["grow", "pooled"] {
        let out = corral_run(
            &dir.path().join("cache"),
            &["--policy", policy.to_str().unwrap(), "--app", app],
            b"",
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(127), "{app}: stderr: {stderr}");
        assert!(
            stderr.starts_with("corral: limits.memory (2 MiB) exceeded"),
            "{app}: {stderr}"
        );
    }
}

#[test]
fn guest_cannot_leave_its_preopen() {
    let cache = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let inner = root.path().join("a/b");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::write(inner.join("inside.txt"), "inside\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", inner.join("link-out")).unwrap();
    let expected = "inside.txt: opened\n\
                    ../../etc/passwd: denied\n\
                    /etc/passwd: denied\n\
                    link-out: denied\n";
    for access in ["", ":ro"] {
        let dir = format!("{}::/data{access}", inner.display());
        let out = corral_run(
            cache.path(),
            &["--dir", &dir, guest("escape.wasm").to_str().unwrap()],
            b"",
        );
        assert_eq!(text(&out.stdout), expected, "--dir {dir}");
        assert_eq!(
            out.status.code(),
            Some(0),
            "--dir {dir}: stderr {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn command_component_runs_and_exits_nonzero() {
    let cache = tempfile::tempdir().unwrap();
    let out = corral_run(
        cache.path(),
        &[guest("cli-exit3.wasm").to_str().unwrap()],
        b"",
    );
    assert_eq!(text(&out.stdout), "exiting with 3\n");
    // wasi:cli/exit@0.2 carries only ok/err, so proc_exit(3) through the
    // preview1 adapter is an error exit: 1.
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
}

#[test]
fn mixed_wasi_patch_versions_link() {
    let cache = tempfile::tempdir().unwrap();
    let out = corral_run(
        cache.path(),
        &[guest("mixed-versions.wasm").to_str().unwrap()],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn only_granted_env_and_args_reach_the_guest() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["run", "--cache"])
        .arg(cache.path())
        .args(["--env", "GRANTED=1"])
        .arg(guest("env-count.wasm"))
        .args(["--", "one", "two"])
        .env("HOST_SECRET", "must-not-leak")
        .output()
        .unwrap();
    // 1 variable (GRANTED; nothing of the host's), 3 args (argv[0], one, two).
    assert_eq!(out.status.code(), Some(13), "stderr: {}", text(&out.stderr));
}

#[test]
fn http_component_without_serve_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    let out = corral_run(
        cache.path(),
        &[guest("http-hello.wasm").to_str().unwrap()],
        b"",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(
        stderr.contains("is a wasi:http/proxy@0.2 component"),
        "{stderr}"
    );
}

/// `corral run --policy P --app A` where P has one app of each allocation
/// strategy for `module` (`command`: on demand, `stdio`: the pooling
/// allocator) and `limits` as its defaults.
fn run_policy_apps(module: &str, limits: &str) -> Vec<(&'static str, Output)> {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let module = guest(module).display().to_string();
    std::fs::write(
        &policy,
        format!(
            "[defaults]\nlimits = {{ {limits} }}\n\
             sandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\
             [apps.on-demand]\nmodule = {module:?}\nkind = \"command\"\n\
             [apps.pooled]\nmodule = {module:?}\nkind = \"stdio\"\nlisten = [\"127.0.0.1:9\"]\n"
        ),
    )
    .unwrap();
    ["on-demand", "pooled"]
        .into_iter()
        .map(|app| {
            let out = corral_run(
                &dir.path().join("cache"),
                &["--policy", policy.to_str().unwrap(), "--app", app],
                b"",
            );
            (app, out)
        })
        .collect()
}

#[test]
fn more_tables_than_limits_tables_exits_127_naming_the_limit() {
    // tables.wasm defines four tables.
    for (app, out) in run_policy_apps("tables.wasm", "tables = 3") {
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(127), "{app}: stderr: {stderr}");
        assert!(
            stderr.starts_with("corral: limits.tables (3) exceeded\n"),
            "{app}: {stderr}"
        );
    }
    // At the limit it runs, pooled too (wasmtime's pool allows one table
    // per module unless told otherwise).
    for (app, out) in run_policy_apps("tables.wasm", "tables = 4") {
        assert_eq!(out.status.code(), Some(0), "{app}: {}", text(&out.stderr));
    }
}

#[test]
fn more_core_instances_than_limits_instances_exits_127_naming_the_limit() {
    // instances.wasm is a command component with four core instances.
    for (app, out) in run_policy_apps("instances.wasm", "instances = 3") {
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(127), "{app}: stderr: {stderr}");
        assert!(
            stderr.starts_with("corral: limits.instances (3) exceeded\n"),
            "{app}: {stderr}"
        );
    }
    for (app, out) in run_policy_apps("instances.wasm", "instances = 4") {
        assert_eq!(out.status.code(), Some(0), "{app}: {}", text(&out.stderr));
    }
}

/// SIGTERM and SIGINT end a command guest as they end any program (only
/// `--serve` turns them into a drain): a guest blocked reading stdin is
/// not left running.
#[test]
fn sigterm_and_sigint_end_a_running_command() {
    use std::io::Read as _;
    use std::os::unix::process::ExitStatusExt as _;
    let cache = tempfile::tempdir().unwrap();
    for signal in [rustix::process::Signal::TERM, rustix::process::Signal::INT] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
            .arg("run")
            .arg("--cache")
            .arg(cache.path())
            .arg(guest("stdio-echo.wasm"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Echoed: the guest runs (past the sandbox and the signal setup).
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"ping\n").unwrap();
        let mut echoed = [0u8; 5];
        child
            .stdout
            .take()
            .unwrap()
            .read_exact(&mut echoed)
            .unwrap();
        assert_eq!(&echoed, b"ping\n");
        rustix::process::kill_process(rustix::process::Pid::from_child(&child), signal).unwrap();
        let status = corral_testkit::wait_for(
            "corral run to end on the signal",
            std::time::Duration::from_secs(20),
            || child.try_wait().unwrap(),
        );
        assert_eq!(
            status.signal(),
            Some(signal.as_raw()),
            "{signal:?}: {status:?}"
        );
        drop(stdin);
    }
}
