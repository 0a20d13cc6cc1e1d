//! The shim's task process serves an http app exactly as a corrald worker
//! does: the checks of corral_testkit::serve (keep-alive, HTTP/2 with
//! prior knowledge, the concurrency limit, drain on stop), which
//! supervisor/tests/serve_parity.rs runs against corrald and `corral run
//! --serve`, run here against `containerd-shim-corral-v1 guest <plan>`,
//! started as the shim starts it: a task plan in a bundle, the start byte
//! on fd 3. No containerd and no namespaces are needed for this.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use corral_policy::{AppKind, AppSpec, ListenAddr};
use corral_testkit::{Log, free_port, guest, serve, wait_for};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-corral-v1");

/// The task process of an http-echo.wasm container, serving.
struct Task {
    child: Child,
    addr: SocketAddr,
    log: Log,
    _start: ChildStdin,
    _bundle: tempfile::TempDir,
}

impl Task {
    fn start() -> Task {
        let bundle = tempfile::tempdir().unwrap();
        let module = bundle.path().join("corral-module.wasm");
        std::fs::copy(guest("http-echo.wasm"), &module).unwrap();
        let rootfs = bundle.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        // The shim's plan (shim/src/plan.rs TaskPlan), as it writes one.
        let plan = serde_json::json!({
            "id": "parity",
            "mode": "wasm",
            "module": module,
            "rootfs": rootfs,
            "argv": ["/http-echo.wasm"],
            "env": [],
            "listen": format!("127.0.0.1:{}", free_port()),
            "cache_dir": bundle.path().join("cache"),
            "namespaces": [],
            "hostname": null,
        });
        let plan_path = bundle.path().join("corral-task.json");
        std::fs::write(&plan_path, serde_json::to_vec_pretty(&plan).unwrap()).unwrap();
        // fd 3 is the start pipe: here the child's stdin, duplicated by sh.
        let mut child = Command::new("sh")
            .args(["-c", "exec \"$0\" guest \"$1\" 3<&0"])
            .arg(SHIM)
            .arg(&plan_path)
            .current_dir(bundle.path())
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Log::collect(child.stderr.take().unwrap());
        let mut start = child.stdin.take().unwrap();
        start.write_all(b"s").unwrap();
        let line = log.wait_for_line(&mut child, "serving HTTP on ", Duration::from_secs(120));
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Task {
            child,
            addr,
            log,
            _start: start,
            _bundle: bundle,
        }
    }
}

impl serve::Served for Task {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn sigterm(&self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
    }

    fn exits_zero(&mut self) {
        let child = &mut self.child;
        let status = wait_for("the task process to exit", Duration::from_secs(30), || {
            child.try_wait().unwrap()
        });
        assert!(
            status.success(),
            "{status}:
{}",
            self.log.text()
        );
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("the task process's stderr:\n{}", self.log.text());
        }
    }
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
    corral_testkit::parity_tests!(super::Task::start(), super::default_concurrency());
}
