//! End to end through a real containerd: the test starts containerd (from
//! Debian) with its own config, root, state and socket under a temp dir,
//! builds an OCI image tarball of corral's test guests itself (no
//! network), imports it with `ctr images import` and runs it with
//! `ctr run --runtime io.containerd.corral.v1`, the shim binary being on
//! containerd's PATH.
//!
//! Needs root (containerd mounts snapshots); skipped, saying so, otherwise.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use corral_testkit::tar::{tar, tar_with_links};
use corral_testkit::{free_port, guest};
use rustix::process::{Pid, Signal, kill_process};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-corral-v1");
const RUNTIME: &str = "io.containerd.corral.v1";
const NS: &str = "corral-test";
const IMAGE: &str = "corral.test/guests:1";

fn is_root() -> bool {
    let root = rustix::process::geteuid().is_root();
    // CI runs tests/run-tests as root: a skip there would hide the shim.
    assert!(
        root || std::env::var("CI").as_deref() != Ok("true"),
        "the containerd tests need root (CI=true)"
    );
    root
}

/// containerd on its own socket, root and state; killed on drop.
struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
}

impl Containerd {
    /// `sandbox`: CORRAL_SHIM_SANDBOX for the shims (require/best-effort).
    fn start(sandbox: &str) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("corral-shim-test")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let config = format!(
            "version = 2\n\
             root = {root:?}\n\
             state = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\",\n\
               \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\",\n\
               \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.tracing.processor.v1.otlp\"]\n\
             [grpc]\n  address = {sock:?}\n\
             [ttrpc]\n  address = {ttrpc:?}\n\
             [debug]\n  level = \"info\"\n",
            root = d.join("root").display().to_string(),
            state = d.join("state").display().to_string(),
            sock = d.join("containerd.sock").display().to_string(),
            ttrpc = d.join("containerd.sock.ttrpc").display().to_string(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let shim_dir = Path::new(SHIM).parent().unwrap();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("CORRAL_SHIM_CACHE", d.join("cache"))
            .env("CORRAL_SHIM_SANDBOX", sandbox)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd (Debian package containerd; tests/run-tests installs it)");
        let c = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = c.ctr(&["version"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}\n{}",
                text(&out.stderr),
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.path().join("containerd.sock"))
            .arg("--namespace")
            .arg(NS);
        match args.split_first() {
            // ctr's fifos for the task's stdio in this test's directory
            // (a run whose task containerd deletes itself, as after a
            // dead shim, would leave them in /run/containerd/fifo).
            Some((&"run", rest)) => {
                cmd.arg("run")
                    .arg("--fifo-dir")
                    .arg(self.path().join("fifo"))
                    .args(rest);
            }
            _ => {
                cmd.args(args);
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("running ctr")
    }

    /// `ctr` that must succeed.
    fn ok(&self, args: &[&str]) -> Output {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {:?}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.log()
        );
        out
    }

    /// The first answer of the server at `addr`, polled for up to 30 s.
    fn served(&self, addr: SocketAddr) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http_get(addr) {
                Ok(r) => return r,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{addr} never answered: {e}\n{}",
                        self.log()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// The pid of task `id`, from `ctr task ls`.
    fn task_pid(&self, id: &str) -> u32 {
        let tasks = text(&self.ok(&["task", "ls"]).stdout);
        let prefix = format!("{id} ");
        tasks
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid for {id} in {tasks}"))
    }

    /// `ctr task kill id`, then wait (up to 20 s) until it is STOPPED.
    fn kill_until_stopped(&self, id: &str) {
        self.ok(&["task", "kill", id]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let row = text(&self.ok(&["task", "ls"]).stdout);
            if row
                .lines()
                .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not stopped after kill: {row}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr run --rm` of a Wasm command, as the container's process.
    fn run(&self, id: &str, args: &[&str]) -> Output {
        let mut all = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// Processes whose command line mentions this test's directory (the
    /// shims: `-address <dir>/containerd.sock`; the tasks: their bundle).
    fn leftover_processes(&self) -> Vec<String> {
        let needle = self.path().display().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == self.child.id() {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && !cmdline.starts_with("ctr ") {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
        found
    }

    fn mounts_below_state(&self) -> Vec<String> {
        let state = self.path().join("state").display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&state))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stopped = false;
        while Instant::now() < deadline && !stopped {
            stopped = matches!(self.child.try_wait(), Ok(Some(_)));
            std::thread::sleep(Duration::from_millis(50));
        }
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // After a failed assertion: no shim, task or mount of this test
        // may outlive it (a passing run has none left by then).
        for p in self.leftover_processes() {
            if let Some(pid) = p.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // The pid names a shim or task whose command line carries
                // this test's directory.
                if let Some(pid) = Pid::from_raw(pid) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        }
        for line in self.mounts_below_state() {
            if let Some(target) = line.split(' ').nth(4) {
                // umount(8) -l: umount2(MNT_DETACH) without unsafe here.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(target)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// An OCI image layout under construction: blobs and named images.
#[derive(Default)]
struct Layout {
    blobs: Vec<(String, Vec<u8>)>,
    images: Vec<serde_json::Value>,
}

impl Layout {
    /// Adds a blob; its descriptor.
    fn blob(&mut self, media_type: &str, bytes: Vec<u8>) -> serde_json::Value {
        let digest = sha256(&bytes);
        let desc = serde_json::json!({
            "mediaType": media_type,
            "digest": format!("sha256:{digest}"),
            "size": bytes.len(),
        });
        self.blobs.push((digest, bytes));
        desc
    }

    fn json(&mut self, media_type: &str, value: serde_json::Value) -> serde_json::Value {
        self.blob(media_type, value.to_string().into_bytes())
    }

    /// An image manifest of `layers` with an image config of `config`.
    fn manifest(
        &mut self,
        config: serde_json::Value,
        layers: Vec<serde_json::Value>,
    ) -> serde_json::Value {
        let config = self.json("application/vnd.oci.image.config.v1+json", config);
        self.json(
            "application/vnd.oci.image.manifest.v1+json",
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config,
                "layers": layers,
            }),
        )
    }

    fn name(&mut self, name: &str, mut target: serde_json::Value) {
        target["annotations"] = serde_json::json!({ "io.containerd.image.name": name });
        self.images.push(target);
    }

    /// The layout as a tarball for `ctr images import`.
    fn tarball(&self) -> Vec<u8> {
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": self.images })
            .to_string()
            .into_bytes();
        let names: Vec<String> = self
            .blobs
            .iter()
            .map(|(d, _)| format!("blobs/sha256/{d}"))
            .collect();
        let mut files: Vec<(&str, u32, &[u8])> = vec![
            ("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json", 0o644, &index),
        ];
        for (name, (_, bytes)) in names.iter().zip(&self.blobs) {
            files.push((name, 0o644, bytes));
        }
        tar(&files)
    }
}

fn host_arch() -> String {
    std::env::consts::ARCH
        .replace("x86_64", "amd64")
        .replace("aarch64", "arm64")
}

/// One image ([`IMAGE`]) whose single tar layer holds the guests, its
/// entrypoint a `.wasm` file: what any image builder makes `FROM scratch`.
fn guests_image(layout: &mut Layout) {
    let exit3 = std::fs::read(guest("exit3.wasm")).unwrap();
    let cli = std::fs::read(guest("cli-exit3.wasm")).unwrap();
    let hello = std::fs::read(guest("http-hello.wasm")).unwrap();
    let escape = std::fs::read(guest("escape.wasm")).unwrap();
    let grow = std::fs::read(guest("grow.wasm")).unwrap();
    let layer = tar_with_links(
        &[
            ("exit3.wasm", 0o644, &exit3),
            ("cli-exit3.wasm", 0o644, &cli),
            ("hello.wasm", 0o644, &hello),
            ("escape.wasm", 0o644, &escape),
            ("grow.wasm", 0o644, &grow),
            ("inside.txt", 0o644, b"in the image\n"),
        ],
        &[("link-out", "/etc/passwd")],
    );
    let diff_id = format!("sha256:{}", sha256(&layer));
    let layer = layout.blob("application/vnd.oci.image.layer.v1.tar", layer);
    let manifest = layout.manifest(
        serde_json::json!({
            "architecture": host_arch(),
            "os": "linux",
            "config": { "Entrypoint": ["/exit3.wasm"], "Env": ["GREETING=hi"], "WorkingDir": "/" },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        }),
        vec![layer],
    );
    layout.name(IMAGE, manifest);
}

/// Wasm OCI artifacts: the module is the layer itself. `name` targets the
/// manifest, `name-index` an index whose manifest is for wasip1/wasm.
fn wasm_artifact_images(layout: &mut Layout, name: &str, module: Vec<u8>) {
    let layer = layout.blob("application/vnd.wasm.content.layer.v1+wasm", module);
    let manifest = layout.manifest(
        serde_json::json!({
            "architecture": "wasm",
            "os": "wasip1",
            "config": { "Entrypoint": ["/module.wasm"] },
            "rootfs": { "type": "layers", "diff_ids": [] },
        }),
        vec![layer],
    );
    let mut for_wasm = manifest.clone();
    for_wasm["platform"] = serde_json::json!({ "os": "wasip1", "architecture": "wasm" });
    let index = layout.json(
        "application/vnd.oci.image.index.v1+json",
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [for_wasm],
        }),
    );
    layout.name(name, manifest);
    layout.name(&format!("{name}-index"), index);
}

/// The v1 cgroup directories `pid` is in, by controller (cpu, memory,
/// pids), or its v2 one under "cpu", "memory" and "pids" alike.
fn task_cgroups(pid: u32) -> std::collections::HashMap<String, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        for c in controllers.split(',') {
            if ["cpu", "memory", "pids"].contains(&c) {
                out.insert(c.to_string(), format!("/sys/fs/cgroup/{c}{path}"));
            }
        }
        if controllers.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            for c in ["cpu", "memory", "pids"] {
                out.insert(c.to_string(), format!("/sys/fs/cgroup{path}"));
            }
        }
    }
    out
}

fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn wasm_images_run_under_containerd() {
    if !is_root() {
        eprintln!(
            "SKIPPED wasm_images_run_under_containerd: needs root (containerd mounts snapshots)"
        );
        return;
    }
    // With landlock and seccomp on this kernel, the shim must enter both
    // (a guest it cannot sandbox does not start).
    let kernel = corral_runtime::sandbox::probe_kernel();
    let has_all = kernel.landlock.abi().is_some_and(|abi| abi >= 4) && kernel.seccomp.available;
    if !has_all {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs landlock (ABI 4+) and seccomp: {kernel:?}"
        );
        eprintln!("this kernel lacks landlock ABI 4 or seccomp: the sandbox is best-effort");
    }
    let c = Containerd::start(if has_all { "require" } else { "best-effort" });
    let tarball = c.path().join("guests.tar");
    let mut layout = Layout::default();
    guests_image(&mut layout);
    std::fs::write(&tarball, layout.tarball()).unwrap();
    c.ok(&["images", "import", tarball.to_str().unwrap()]);

    // A preview1 command: its stdout reaches ctr through containerd's
    // fifos, its exit code is the container's. The first start compiles.
    let out = c.run("exit3-a", &[]);
    assert_eq!(
        text(&out.stdout),
        "exiting with 3\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}\n{}",
        text(&out.stderr),
        c.log()
    );

    // The second container of the image starts from the node's cache.
    let out = c.run("exit3-b", &[]);
    assert_eq!(text(&out.stdout), "exiting with 3\n");
    assert_eq!(out.status.code(), Some(3));
    let log = c.log();
    let line = |id: &str, what: &str| {
        log.lines()
            .any(|l| l.contains(&format!("{id}: artifact cache {what}")))
    };
    assert!(line("exit3-a", "miss"), "first start compiles:\n{log}");
    assert!(
        line("exit3-b", "hit"),
        "second start hits the cache:\n{log}"
    );
    assert!(!line("exit3-b", "miss"), "{log}");
    for l in log.lines().filter(|l| l.contains("artifact cache")) {
        eprintln!("{l}");
    }
    let cached: Vec<_> = walk(&c.path().join("cache"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(cached.len(), 1, "one artifact in the cache: {cached:?}");

    // A wasi:cli command component, by a command line naming it (args
    // after the image replace the entrypoint, as for any image).
    let out = c.run("cli", &["/cli-exit3.wasm"]);
    assert_eq!(
        text(&out.stdout),
        "exiting with 3\n",
        "stderr: {}",
        text(&out.stderr)
    );
    // wasi:cli/exit carries only ok/err: exit(3) through the adapter is 1.
    assert_eq!(out.status.code(), Some(1));

    // The guest's `/` is the container's rootfs, and nothing else: not
    // through `..`, an absolute path or the image's symlink to /etc/passwd.
    let out = c.run("escape", &["/escape.wasm"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("inside.txt: opened"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        !stdout.contains("passwd: opened") && !stdout.contains("link-out: opened"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}");

    // An entrypoint that is missing, or not Wasm, fails the task's create
    // with the reason (and leaves no mount: checked at the end).
    let out = c.run("missing", &["/nope.wasm"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nope.wasm"),
        "{}",
        text(&out.stderr)
    );
    let out = c.run("not-wasm", &["/inside.txt"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a WebAssembly module or component"),
        "{}",
        text(&out.stderr)
    );
    let _ = c.ctr(&["container", "delete", "missing", "not-wasm"]);

    // The container's memory limit bounds the guest's linear memory.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "33554432",
        IMAGE,
        "grow",
        "/grow.wasm",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("limits.memory (32 MiB) exceeded"),
        "{stderr}"
    );

    // A wasi:http component serves on the address its env names, on the
    // host network; kill stops it. Its resources (issue 20) are applied to
    // its cgroup as runc would: CPU shares and quota, memory limit.
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = format!("CORRAL_HTTP_LISTEN={addr}");
    c.ok(&[
        "run",
        "-d",
        "--net-host",
        "--cpu-shares",
        "512",
        "--cpu-quota",
        "50000",
        "--cpu-period",
        "100000",
        "--memory-limit",
        "268435456",
        "--runtime",
        RUNTIME,
        "--env",
        &listen,
        IMAGE,
        "http",
        "/hello.wasm",
    ]);
    let response = c.served(addr);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("\r\n\r\n") && response.contains("Hello from corral!\n"),
        "{response}"
    );
    // The serving process is sandboxed: no_new_privs and a seccomp filter.
    let pid = c.task_pid("http");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let cgroups = task_cgroups(pid);
    for (file, want) in [
        ("cpu.shares", "512"),
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "50000"),
        ("memory.limit_in_bytes", "268435456"),
    ] {
        let (controller, _) = file.split_once('.').unwrap();
        let dir = cgroups
            .get(controller)
            .unwrap_or_else(|| panic!("no {controller} cgroup for {pid}: {cgroups:?}"));
        assert!(dir.ends_with("/http"), "{pid} in {dir} ({cgroups:?})");
        let got = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        assert_eq!(got.trim(), want, "{dir}/{file}");
    }
    let http_cgroups: Vec<String> = cgroups.values().cloned().collect();

    c.kill_until_stopped("http");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "{addr} still accepts after kill"
    );
    c.ok(&["task", "delete", "http"]);
    c.ok(&["container", "delete", "http"]);
    for dir in &http_cgroups {
        assert!(!Path::new(dir).exists(), "{dir} left after delete");
    }

    // The pids limit (issue 20): `ctr run` has no flag for it, so the
    // container is made from a spec file (`--config`) whose rootfs is a
    // directory holding the module; the task's pids cgroup gets
    // pids.max as runc would set it, and the task serves under it.
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(guest("http-hello.wasm"), root.path().join("hello.wasm")).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": ["/hello.wasm"],
            "env": [format!("CORRAL_HTTP_LISTEN={addr}")],
            "cwd": "/",
        },
        "root": { "path": root.path() },
        "linux": {
            "cgroupsPath": format!("/{NS}/limited"),
            "resources": { "pids": { "limit": 64 } },
        },
    });
    let spec_path = c.path().join("limited.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    c.ok(&[
        "run",
        "-d",
        "--config",
        spec_path.to_str().unwrap(),
        "--runtime",
        RUNTIME,
        "limited",
    ]);
    let response = c.served(addr);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let pid = c.task_pid("limited");
    let pids_dir = task_cgroups(pid)
        .remove("pids")
        .unwrap_or_else(|| panic!("no pids cgroup for {pid}"));
    assert!(pids_dir.ends_with("/limited"), "{pid} in {pids_dir}");
    let max = std::fs::read_to_string(format!("{pids_dir}/pids.max")).unwrap();
    assert_eq!(max.trim(), "64", "{pids_dir}/pids.max");
    c.kill_until_stopped("limited");
    c.ok(&["task", "delete", "limited"]);
    c.ok(&["container", "delete", "limited"]);
    assert!(
        !Path::new(&pids_dir).exists(),
        "{pids_dir} left after delete"
    );

    // A shim that dies (SIGKILL) takes its task with it: containerd runs
    // the shim binary's `delete`, which kills the task's process and
    // unmounts its rootfs.
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // (The listen address from the annotation this time.)
    let listen = format!("corral.http.listen={addr}");
    c.ok(&[
        "run",
        "-d",
        "--net-host",
        "--runtime",
        RUNTIME,
        "--annotation",
        &listen,
        IMAGE,
        "crash",
        "/hello.wasm",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} never answered\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shims: Vec<String> = c
        .leftover_processes()
        .into_iter()
        .filter(|p| p.contains("containerd-shim-corral-v1 -namespace") && p.contains("-id crash"))
        .collect();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let shim_pid: i32 = shims[0].split(':').next().unwrap().parse().unwrap();
    let socket = shims[0]
        .split_whitespace()
        .find_map(|a| a.strip_prefix("unix://"))
        .map(PathBuf::from)
        .expect("the shim's -socket");
    assert!(socket.exists());
    // Its task's cgroup, made from the spec's cgroupsPath (no resources
    // asked): the dead shim's cleanup removes it too.
    let crash_pid = c.task_pid("crash");
    let crash_cgroups: Vec<String> = task_cgroups(crash_pid)
        .into_values()
        .filter(|d| d.ends_with("/crash"))
        .collect();
    assert!(!crash_cgroups.is_empty(), "{:?}", task_cgroups(crash_pid));
    // The pid was just read from /proc.
    if let Some(pid) = Pid::from_raw(shim_pid) {
        let _ = kill_process(pid, Signal::KILL);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        || !c.mounts_below_state().is_empty()
        || socket.exists()
        || crash_cgroups.iter().any(|d| Path::new(d).exists())
    {
        assert!(
            Instant::now() < deadline,
            "the task, its rootfs, its cgroup or its shim's socket outlived the shim: \
             {:#?} {:#?} {crash_cgroups:?}\n{}",
            c.leftover_processes(),
            c.mounts_below_state(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.ctr(&["task", "delete", "crash"]);
    c.ok(&["container", "delete", "crash"]);

    // A pod's sandbox ("pause") container only holds the namespaces: it
    // runs until killed, whatever its image's entrypoint.
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        IMAGE,
        "pause",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let tasks = text(&c.ok(&["task", "ls"]).stdout);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("pause ") && l.contains("RUNNING")),
        "{tasks}"
    );
    c.ok(&["task", "kill", "--signal", "SIGKILL", "pause"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.ctr(&["task", "delete", "pause"]).status.success() {
        assert!(Instant::now() < deadline, "pause did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.ok(&["container", "delete", "pause"]);

    // Nothing left behind: no task or shim process, no mount.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = c.leftover_processes();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {left:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.mounts_below_state(), Vec::<String>::new());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The shim's reader of containerd's content store, against the real
/// containerd: Debian 12's containerd 1.6.20 cannot run a Wasm OCI
/// artifact (it refuses to unpack the non-tar layer: "mismatched image
/// rootfs and manifest layers"; 1.6.25+/1.7.7+ pass it through), but it
/// imports one with `--no-unpack`, and the shim reads the module from its
/// store the way it does at `create` on a newer containerd.
#[test]
fn wasm_layers_are_read_from_containerds_content_store() {
    if !is_root() {
        eprintln!(
            "SKIPPED wasm_layers_are_read_from_containerds_content_store: needs root (containerd)"
        );
        return;
    }
    use corral_shim::content::{wasm_layer_of_container, wasm_layer_of_image};
    let c = Containerd::start("best-effort");
    let module = std::fs::read(guest("http-hello.wasm")).unwrap();
    let mut plain = Layout::default();
    guests_image(&mut plain);
    let mut artifacts = Layout::default();
    wasm_artifact_images(&mut artifacts, "corral.test/artifact:1", module.clone());
    let (p, a) = (c.path().join("plain.tar"), c.path().join("artifact.tar"));
    std::fs::write(&p, plain.tarball()).unwrap();
    std::fs::write(&a, artifacts.tarball()).unwrap();
    c.ok(&["images", "import", p.to_str().unwrap()]);
    c.ok(&[
        "images",
        "import",
        "--no-unpack",
        "--all-platforms",
        a.to_str().unwrap(),
    ]);

    let sock = c.path().join("containerd.sock");
    let sock = sock.to_str().unwrap();
    let got = wasm_layer_of_image(sock, NS, "corral.test/artifact:1").unwrap();
    assert!(
        got.as_deref() == Some(module.as_slice()),
        "the manifest's Wasm layer"
    );
    let got = wasm_layer_of_image(sock, NS, "corral.test/artifact:1-index").unwrap();
    assert!(
        got.as_deref() == Some(module.as_slice()),
        "through the index"
    );
    // An image with only tar layers has none.
    assert!(wasm_layer_of_image(sock, NS, IMAGE).unwrap().is_none());
    let err = wasm_layer_of_image(sock, NS, "corral.test/absent:1").unwrap_err();
    assert!(format!("{err:#}").contains("not found"), "{err:#}");

    // From a container to its image (what the shim asks at create).
    c.ok(&["containers", "create", "--runtime", RUNTIME, IMAGE, "plain"]);
    assert!(
        wasm_layer_of_container(sock, NS, "plain")
            .unwrap()
            .is_none()
    );
    assert!(wasm_layer_of_container(sock, NS, "absent").is_err());
    c.ok(&["containers", "delete", "plain"]);
}
