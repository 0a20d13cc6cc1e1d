//! `corral run --serve` serves HTTP exactly as a corrald worker does: the
//! same checks (corral_testkit::serve: keep-alive, HTTP/2 with prior
//! knowledge, the concurrency limit, drain on stop) run against corrald
//! serving an http app of a policy and against `corral run --serve` on
//! the same policy and app, with a WASI 0.2 and a WASI 0.3 handler. (The shim's task process runs them in
//! shim/tests/serve_parity.rs.)

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use corral_testkit::serve::ServerProcess;
use corral_testkit::{Notes, free_port, guests_dir, spawn_logged, wait_for};

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");
const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
/// The app's `pool.concurrency`.
const CONCURRENCY: usize = 2;

/// Write a policy with one http app `web` (`module`, one worker of
/// [`CONCURRENCY`] slots) listening on `port`.
fn write_policy(dir: &Path, port: u16, module: &str) -> std::path::PathBuf {
    let policy = format!(
        "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
         drain-timeout = \"20s\"\n\n\
         [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n\
         [apps.web]\nmodule = \"{}/{module}\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\npool = {{ min = 1, max = 1, concurrency = {CONCURRENCY} }}\n",
        guests_dir().display()
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    path
}

/// corrald serving the policy, once it said READY=1.
fn corrald(module: &str) -> ServerProcess {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy = write_policy(dir.path(), port, module);
    let notify_path = dir.path().join("notify.sock");
    let notes = Notes::bind(&notify_path);
    let (mut child, log) = spawn_logged(
        Command::new(CORRALD)
            .arg("--policy")
            .arg(&policy)
            .args(["--bus", "none"])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("CORRAL_LOG", "info")
            .env_remove("LISTEN_FDS"),
    );
    wait_for("corrald's READY=1", Duration::from_secs(120), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("corrald exited ({status}):\n{}", log.text());
        }
        notes.find("READY=1")
    });
    ServerProcess::new(child, SocketAddr::from(([127, 0, 0, 1], port)), log, dir)
}

/// `corral run --serve 127.0.0.1:0 --policy P --app web`, once it printed
/// where it serves.
fn corral_run(module: &str) -> ServerProcess {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), free_port(), module);
    let (mut child, log) = spawn_logged(
        Command::new(CORRAL)
            .args(["run", "--serve", "127.0.0.1:0", "--policy"])
            .arg(&policy)
            .args(["--app", "web"])
            .env("CORRAL_LOG", "info"),
    );
    let line = log.wait_for_line(
        &mut child,
        "Serving HTTP on http://",
        Duration::from_secs(120),
    );
    let addr = corral_testkit::serve::corral_run_address(&line)
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    ServerProcess::new(child, addr, log, dir)
}

mod corrald {
    corral_testkit::parity_tests!(super::corrald("http-echo.wasm"), super::CONCURRENCY);
}

mod corral_run {
    corral_testkit::parity_tests!(super::corral_run("http-echo.wasm"), super::CONCURRENCY);
}

/// The same checks with a WASI 0.3 handler (http3-probe.wasm describes
/// requests as http-echo.wasm does).
mod corrald_wasi_0_3 {
    corral_testkit::parity_tests!(super::corrald("http3-probe.wasm"), super::CONCURRENCY);
}

mod corral_run_wasi_0_3 {
    corral_testkit::parity_tests!(super::corral_run("http3-probe.wasm"), super::CONCURRENCY);
}
