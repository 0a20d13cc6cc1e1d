//! The shim's task process serves an http app exactly as a corrald worker
//! does: the checks of corral_testkit::serve (keep-alive, HTTP/2 with
//! prior knowledge, the concurrency limit, drain on stop), which
//! supervisor/tests/serve_parity.rs runs against corrald and `corral run
//! --serve`, run here against `containerd-shim-corral-v1 guest <plan>`,
//! started as the shim starts it: a task plan in a bundle, the start byte
//! on fd 3 (here from a file rather than the shim's pipe). No containerd and no namespaces are needed for this.

use std::process::Command;
use std::time::Duration;

use corral_policy::{AppKind, AppSpec, ListenAddr};
use corral_testkit::serve::ServerProcess;
use corral_testkit::{free_port, guest, spawn_logged};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-corral-v1");

/// The task process of a container of the guest `wasm` (http-echo.wasm,
/// or the WASI 0.3 http3-probe.wasm that describes requests the same
/// way), serving.
fn start_task(wasm: &str) -> ServerProcess {
    let bundle = tempfile::tempdir().unwrap();
    let module = bundle.path().join("corral-module.wasm");
    std::fs::copy(guest(wasm), &module).unwrap();
    let rootfs = bundle.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    // The shim's plan (shim/src/plan.rs TaskPlan), as it writes one.
    let plan = serde_json::json!({
        "id": "parity",
        "mode": "wasm",
        "module": module,
        "rootfs": rootfs,
        "argv": [format!("/{wasm}")],
        "env": [],
        "listen": format!("127.0.0.1:{}", free_port()),
        "cache_dir": bundle.path().join("cache"),
        "namespaces": [],
        "hostname": null,
    });
    let plan_path = bundle.path().join("corral-task.json");
    std::fs::write(&plan_path, serde_json::to_vec_pretty(&plan).unwrap()).unwrap();
    // fd 3 is the start pipe; a file holding the start byte reads the
    // same (a byte: start).
    let start = bundle.path().join("start");
    std::fs::write(&start, b"s").unwrap();
    let (mut child, log) = spawn_logged(
        Command::new("sh")
            .args(["-c", "exec \"$0\" guest \"$1\" 3<\"$2\""])
            .arg(SHIM)
            .arg(&plan_path)
            .arg(&start)
            .current_dir(bundle.path())
            .env_clear(),
    );
    let line = log.wait_for_line(&mut child, "serving HTTP on ", Duration::from_secs(120));
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    ServerProcess::new(child, addr, log, bundle)
}

/// The shim gives the task no pool section: corral's default concurrency.
fn default_concurrency() -> usize {
    let app = AppSpec::builder("task", guest("http-echo.wasm"), AppKind::Http)
        .listen(ListenAddr::Tcp("127.0.0.1:1".parse().unwrap()))
        .build()
        .unwrap();
    app.pool.concurrency as usize
}

mod shim_task {
    corral_testkit::parity_tests!(
        super::start_task("http-echo.wasm"),
        super::default_concurrency()
    );
}

mod shim_task_wasi_0_3 {
    corral_testkit::parity_tests!(
        super::start_task("http3-probe.wasm"),
        super::default_concurrency()
    );
}
