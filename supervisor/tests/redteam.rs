//! The red team's findings against corrald (issue 15), each as the attack
//! that broke it: the real `corrald` and `corral` binaries, a real
//! `NOTIFY_SOCKET` bound by the test, real sockets on loopback, real
//! signals (SIGKILL, SIGTERM), real resource limits (prlimit(1)).
//!
//! Every wait has a deadline; the [`Corrald`] guard kills corrald and its
//! process tree when a test ends, however it ends.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_testkit::{descendants_of, free_port, guests_dir as guests, wait_for};
use serde_json::Value;

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");
const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

/// systemd ignores a notify datagram of this many bytes or more
/// ("Received notify message exceeded maximum size. Ignoring.").
const SYSTEMD_NOTIFY_MAX: usize = 4096;

/// The `[daemon]` and `[defaults]` every policy here starts with; paths
/// are relative to the policy's directory.
fn policy_head(extra_daemon_keys: &str) -> String {
    format!(
        "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
         drain-timeout = \"5s\"\n{extra_daemon_keys}\n\n\
         [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n"
    )
}

/// A running corrald in `dir` (its policy is `dir/policy.toml`), killed
/// with its process tree on drop.
struct Corrald {
    child: Option<Child>,
    pid: i32,
    dir: PathBuf,
    /// Every datagram corrald sent to its `NOTIFY_SOCKET`, whole.
    datagrams: Arc<Mutex<Vec<Vec<u8>>>>,
    stderr: Arc<Mutex<String>>,
}

impl Corrald {
    /// Start corrald on `dir/policy.toml`, through `launcher` (a program
    /// and its arguments, corrald's command line after them) if any.
    fn spawn(dir: &Path, launcher: &[&str]) -> Corrald {
        // One notify socket per corrald (a restart in the same directory
        // gets a new one).
        let notify_path = (0..)
            .map(|i| dir.join(format!("notify{i}.sock")))
            .find(|p| !p.exists())
            .unwrap();
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let datagrams = Arc::new(Mutex::new(Vec::new()));
        {
            let datagrams = datagrams.clone();
            std::thread::spawn(move || {
                // Bigger than any datagram: the test sees each one whole.
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = notify.recv(&mut buf) {
                    datagrams.lock().unwrap().push(buf[..n].to_vec());
                }
            });
        }
        let mut cmd = match launcher {
            [] => Command::new(CORRALD),
            [program, args @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(CORRALD);
                cmd
            }
        };
        let mut child = cmd
            .args(["--bus", "none", "--policy"])
            .arg(dir.join("policy.toml"))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("CORRAL_LOG", "info")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = stderr.clone();
            let mut pipe = BufReader::new(child.stderr.take().unwrap());
            std::thread::spawn(move || {
                let mut line = String::new();
                while pipe.read_line(&mut line).is_ok_and(|n| n > 0) {
                    stderr.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
        }
        Corrald {
            pid: child.id() as i32,
            child: Some(child),
            dir: dir.to_path_buf(),
            datagrams,
            stderr,
        }
    }

    /// The notify datagrams as text lines.
    fn notes(&self) -> Vec<String> {
        self.datagrams
            .lock()
            .unwrap()
            .iter()
            .flat_map(|d| {
                String::from_utf8_lossy(d)
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().unwrap().is_some(),
            None => true,
        }
    }

    /// Wait for `READY=1`.
    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.notes().iter().any(|l| l == "READY=1") {
            assert!(
                !self.exited(),
                "corrald exited before READY=1; stderr:\n{}",
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "no READY=1 within {timeout:?}; {} datagrams of sizes {:?}; stderr:\n{}",
                self.datagrams.lock().unwrap().len(),
                self.datagrams
                    .lock()
                    .unwrap()
                    .iter()
                    .map(Vec::len)
                    .collect::<Vec<_>>(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_raw(self.pid).unwrap(), signal)
            .unwrap();
    }

    /// Wait (at most `timeout`) for corrald to exit.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = wait_for("corrald to exit", timeout, || child.try_wait().unwrap());
        self.child = None;
        status
    }

    /// One request to the API socket: (status, JSON body or Null).
    fn api(&self, method: &str, path: &str) -> (u16, Value) {
        let mut s = UnixStream::connect(self.dir.join("api.sock"))
            .unwrap_or_else(|e| panic!("connecting to the API: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {text:?}"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn app(&self, name: &str) -> Value {
        let (status, app) = self.api("GET", &format!("/v1/apps/{name}"));
        assert_eq!(status, 200, "GET /v1/apps/{name}: {app}");
        app
    }

    /// Run the real `corral` against this corrald's socket.
    fn corral(&self, args: &[&str]) -> Output {
        Command::new(CORRAL)
            .args(args)
            .arg("--socket")
            .arg(self.dir.join("api.sock"))
            .output()
            .unwrap()
    }

    /// Resident memory (kB) and mapping count of corrald.
    fn memory(&self) -> (u64, usize) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
            .unwrap()
            .lines()
            .count();
        (rss, maps)
    }
}

impl Drop for Corrald {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let tree = descendants_of(self.pid);
            let _ = child.kill();
            let _ = child.wait();
            kill_all(&tree);
        }
        if std::thread::panicking() {
            eprintln!("corrald's stderr:\n{}", self.stderr());
        }
    }
}

fn kill_all(pids: &[i32]) {
    for &pid in pids {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

fn dechunk(mut data: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = data.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        data = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rfind(')').is_some_and(|i| !s[i + 2..].starts_with('Z')))
}

fn http_get(port: u16) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    Ok((status, response))
}

/// A stdio echo connection, checked to be served by a worker.
fn echo_connection(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"first\n").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"first\n");
    s
}

fn stdio_roundtrip(port: u16) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"ping\n")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn stdio_app(name: &str, port: u16, pool: &str) -> String {
    format!(
        "[apps.{name}]\nmodule = \"{}/stdio-echo.wasm\"\nkind = \"stdio\"\n\
         listen = [\"127.0.0.1:{port}\"]\npool = {pool}\n\n",
        guests().display()
    )
}

fn http_app(name: &str, module: &str, port: u16) -> String {
    format!(
        "[apps.{name}]\nmodule = \"{module}\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\npool = {{ min = 1, max = 1 }}\n\n"
    )
}

fn write_policy(dir: &Path, extra_daemon_keys: &str, apps: &str) {
    std::fs::write(
        dir.join("policy.toml"),
        format!("{}{apps}", policy_head(extra_daemon_keys)),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// Item 2: READY=1 reaches systemd with hundreds of apps.

/// Every notify datagram stays under systemd's limit and READY=1 is in
/// one of them, with 600 apps whose names alone make 20 KB.
#[test]
fn every_notify_datagram_fits_systemds_limit_with_600_apps() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("s")).unwrap();
    let mut apps = String::new();
    for i in 0..600 {
        apps.push_str(&format!(
            "[apps.a-rather-long-app-name-for-the-status-line-{i:04}]\n\
             module = \"{}/stdio-echo.wasm\"\nkind = \"stdio\"\n\
             listen = [\"unix:{}/s/{i}.sock\"]\npool = {{ min = 0, max = 1 }}\n\n",
            guests().display(),
            dir.path().display()
        ));
    }
    write_policy(dir.path(), "", &apps);
    let mut corrald = Corrald::spawn(dir.path(), &[]);
    corrald.wait_ready(Duration::from_secs(120));
    let sizes: Vec<usize> = corrald
        .datagrams
        .lock()
        .unwrap()
        .iter()
        .map(Vec::len)
        .collect();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    eprintln!(
        "{} notify datagrams, the largest {largest} bytes",
        sizes.len()
    );
    assert!(
        largest < SYSTEMD_NOTIFY_MAX,
        "a notify datagram of {largest} bytes: systemd drops it (sizes: {sizes:?})"
    );
    let ready = corrald
        .datagrams
        .lock()
        .unwrap()
        .iter()
        .find(|d| String::from_utf8_lossy(d).lines().any(|l| l == "READY=1"))
        .cloned()
        .unwrap();
    assert!(ready.len() < SYSTEMD_NOTIFY_MAX);
    // The summary still says how many apps there are.
    let status = corrald
        .notes()
        .into_iter()
        .rfind(|l| l.starts_with("STATUS="))
        .unwrap();
    assert!(status.contains("600 apps"), "{status}");
}

// ---------------------------------------------------------------------------
// Item 3: a SIGKILLed corrald's processes let go of the ports; a restart
// right after it serves; a port in use is retried, not failed for good.

/// After corrald is SIGKILLed, its zygote and workers stop accepting at
/// once and close the listening sockets, even while a connection they
/// accepted is still open (and they still finish it).
#[test]
fn the_processes_of_a_killed_corrald_let_go_of_its_ports() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write_policy(
        dir.path(),
        "",
        &stdio_app("echo", port, "{ min = 1, max = 2 }"),
    );
    let mut corrald = Corrald::spawn(dir.path(), &[]);
    corrald.wait_ready(Duration::from_secs(60));
    // A connection a worker serves and that stays open.
    let mut held = echo_connection(port);
    let orphans = descendants_of(corrald.pid);
    assert!(!orphans.is_empty());
    corrald.signal(rustix::process::Signal::KILL);
    corrald.wait_exit(Duration::from_secs(10));
    // Nobody listens on the port any more: it can be bound again.
    wait_for(
        "the port to be free after corrald was killed",
        Duration::from_secs(10),
        || TcpListener::bind(("127.0.0.1", port)).ok(),
    );
    // The connection accepted before is still served to its end.
    held.write_all(b"second\n").unwrap();
    let mut buf = [0u8; 7];
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"second\n");
    drop(held);
    wait_for("the orphans to exit", Duration::from_secs(15), || {
        orphans.iter().all(|&p| !alive(p)).then_some(())
    });
}

/// systemd restarts a SIGKILLed corrald 100 ms later (`RestartSec=`'s
/// default) while the old processes still finish a connection: the new
/// corrald serves every app.
#[test]
fn a_corrald_restarted_100ms_after_sigkill_serves_its_apps() {
    let dir = tempfile::tempdir().unwrap();
    let (echo, web) = (free_port(), free_port());
    let module = guests().join("http-hello.wasm");
    write_policy(
        dir.path(),
        "",
        &format!(
            "{}{}",
            stdio_app("echo", echo, "{ min = 1, max = 2 }"),
            http_app("web", &module.display().to_string(), web)
        ),
    );
    let mut first = Corrald::spawn(dir.path(), &[]);
    first.wait_ready(Duration::from_secs(60));
    let mut held = echo_connection(echo);
    let orphans = descendants_of(first.pid);
    first.signal(rustix::process::Signal::KILL);
    first.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));
    let mut second = Corrald::spawn(dir.path(), &[]);
    second.wait_ready(Duration::from_secs(60));
    for app in ["echo", "web"] {
        wait_for(
            &format!("{app} to be served by the new corrald"),
            Duration::from_secs(30),
            || {
                let info = second.app(app);
                let zygote = info["zygote_pid"].as_i64()? as i32;
                (info["state"] == "running" && descendants_of(second.pid).contains(&zygote))
                    .then_some(())
            },
        );
    }
    assert_eq!(stdio_roundtrip(echo).unwrap(), b"ping\n");
    assert_eq!(http_get(web).unwrap().0, 200);
    // The old connection was finished by the old worker, not cut.
    held.write_all(b"second\n").unwrap();
    let mut buf = [0u8; 7];
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"second\n");
    drop(held);
    wait_for("the orphans to exit", Duration::from_secs(15), || {
        orphans.iter().all(|&p| !alive(p)).then_some(())
    });
    kill_all(&orphans);
}

/// A port in use when corrald starts is a transient failure: the app is
/// `restarting` with the reason, and serves once the port is free.
#[test]
fn a_port_in_use_is_retried_until_it_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let squatter = TcpListener::bind(("127.0.0.1", port)).unwrap();
    write_policy(
        dir.path(),
        "",
        &stdio_app("echo", port, "{ min = 1, max = 1 }"),
    );
    let mut corrald = Corrald::spawn(dir.path(), &[]);
    corrald.wait_ready(Duration::from_secs(60));
    let info = corrald.app("echo");
    assert_eq!(info["state"], "restarting", "{info}");
    let why = info["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("Address already in use"), "{info}");
    drop(squatter);
    wait_for(
        "echo to serve once its port is free",
        Duration::from_secs(30),
        || (corrald.app("echo")["state"] == "running").then_some(()),
    );
    assert_eq!(stdio_roundtrip(port).unwrap(), b"ping\n");
}

// ---------------------------------------------------------------------------
// Item 5: a reload says what it did not apply.

/// A changed module that does not compile, then a new listen address in
/// use: the old version serves on, and every front end says the new one
/// was refused, and why.
#[test]
fn a_reload_reports_what_it_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (old_port, new_port) = (free_port(), free_port());
    let module = dir.path().join("hello.wasm");
    std::fs::copy(guests().join("http-hello.wasm"), &module).unwrap();
    write_policy(
        dir.path(),
        "",
        &http_app("hello", &module.display().to_string(), old_port),
    );
    let mut corrald = Corrald::spawn(dir.path(), &[]);
    corrald.wait_ready(Duration::from_secs(60));
    assert_eq!(http_get(old_port).unwrap().0, 200);

    // 1. The module changes into something that does not compile.
    std::fs::write(&module, b"\0asm\x01\0\0\0 this is not a module").unwrap();
    let (status, report) = corrald.api("POST", "/v1/reload");
    assert_eq!(status, 200, "{report}");
    let refused = report["refused"].as_array().cloned().unwrap_or_default();
    assert_eq!(refused.len(), 1, "the broken module is refused: {report}");
    assert_eq!(refused[0]["app"], "hello", "{report}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("hello.wasm")),
        "{report}"
    );
    let unchanged: Vec<&str> = report["unchanged"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(!unchanged.contains(&"hello"), "{report}");
    let info = corrald.app("hello");
    assert!(
        info["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("hello.wasm")),
        "{info}"
    );
    assert_eq!(http_get(old_port).unwrap().0, 200, "the old version serves");
    // `corral reload` says so and fails.
    let out = corrald.corral(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("hello"), "{stderr}");

    // 2. The module is fine again, but the new address is taken.
    std::fs::copy(guests().join("http-hello.wasm"), &module).unwrap();
    let _squatter = TcpListener::bind(("127.0.0.1", new_port)).unwrap();
    write_policy(
        dir.path(),
        "",
        &http_app("hello", &module.display().to_string(), new_port),
    );
    let (_, report) = corrald.api("POST", "/v1/reload");
    let refused = report["refused"].as_array().cloned().unwrap_or_default();
    assert_eq!(refused.len(), 1, "{report}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Address already in use")),
        "{report}"
    );
    // Status shows what serves: the old address.
    let info = corrald.app("hello");
    assert_eq!(
        info["listen"],
        serde_json::json!([format!("127.0.0.1:{old_port}")]),
        "{info}"
    );
    assert_eq!(http_get(old_port).unwrap().0, 200);
    let out = corrald.corral(&["reload"]);
    assert_ne!(out.status.code(), Some(0));
}

// ---------------------------------------------------------------------------
// Item 6: recompiling costs nothing once done.

#[test]
fn recompiling_an_app_again_and_again_keeps_corralds_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("echo.wasm"),
        std::fs::read(guests().join("stdio-echo.wasm")).unwrap(),
    )
    .unwrap();
    write_policy(
        dir.path(),
        "",
        &format!(
            "[apps.echo]\nmodule = \"echo.wasm\"\nkind = \"stdio\"\n\
             listen = [\"127.0.0.1:{port}\"]\npool = {{ min = 0, max = 1 }}\n"
        ),
    );
    let mut corrald = Corrald::spawn(dir.path(), &[]);
    corrald.wait_ready(Duration::from_secs(60));
    let recompile = |n: usize| {
        for _ in 0..n {
            let (status, body) = corrald.api("POST", "/v1/apps/echo/recompile");
            assert_eq!(status, 200, "{body}");
        }
    };
    recompile(10);
    let (rss_10, maps_10) = corrald.memory();
    recompile(90);
    let (rss_100, maps_100) = corrald.memory();
    eprintln!(
        "after 10 recompiles: {rss_10} kB resident, {maps_10} mappings; \
         after 100: {rss_100} kB, {maps_100} mappings"
    );
    assert!(
        rss_100 <= rss_10 + 16 * 1024,
        "90 more recompiles grew corrald from {rss_10} to {rss_100} kB"
    );
    assert!(
        maps_100 <= maps_10 + 64,
        "90 more recompiles grew corrald's mappings from {maps_10} to {maps_100}"
    );
    assert_eq!(stdio_roundtrip(port).unwrap(), b"ping\n");
}

// ---------------------------------------------------------------------------
// Item 11: file descriptors for thousands of apps; SIGTERM during start-up.

fn open_files_limit(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    (fields[0].to_string(), fields[1].to_string())
}

#[test]
fn corrald_raises_its_open_files_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "",
        &stdio_app("echo", free_port(), "{ min = 0, max = 1 }"),
    );
    let mut corrald = Corrald::spawn(dir.path(), &["prlimit", "--nofile=256:8192", "--"]);
    corrald.wait_ready(Duration::from_secs(60));
    assert_eq!(
        open_files_limit(corrald.pid),
        ("8192".to_string(), "8192".to_string())
    );
}

#[test]
fn the_unit_sets_a_file_limit_for_thousands_of_apps() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../units/corrald.service"),
    )
    .unwrap();
    let limit = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("LimitNOFILE="))
        .expect("units/corrald.service sets LimitNOFILE=");
    let hard: u64 = limit.rsplit(':').next().unwrap().parse().unwrap();
    assert!(hard >= 65536, "LimitNOFILE={limit}");
}

/// `corral check` warns when the policy needs more descriptors than the
/// limit corrald would get, and not when it fits.
#[test]
fn check_warns_when_the_policy_needs_more_descriptors_than_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut apps = String::new();
    for i in 0..300 {
        apps.push_str(&stdio_app(
            &format!("a{i}"),
            20000 + i,
            "{ min = 0, max = 1 }",
        ));
    }
    write_policy(dir.path(), "", &apps);
    let check = |limit: &str| {
        let out = Command::new("prlimit")
            .arg(format!("--nofile={limit}"))
            .arg("--")
            .arg(CORRAL)
            .arg("check")
            .arg("--policy")
            .arg(dir.path().join("policy.toml"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let tight = check("256:256");
    assert!(
        tight.contains("open files") && tight.contains("LimitNOFILE"),
        "no warning at a limit of 256 for 300 apps: {tight:?}"
    );
    let roomy = check("8192:8192");
    assert!(!roomy.contains("LimitNOFILE"), "{roomy}");
}

/// SIGTERM while corrald is still starting its apps: it stops starting
/// them and exits, rather than starting every app first.
#[test]
fn sigterm_during_a_long_start_up_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("m")).unwrap();
    std::fs::create_dir(dir.path().join("s")).unwrap();
    const APPS: usize = 150;
    let mut apps = String::new();
    for i in 0..APPS {
        // A module of its own per app: each is a compile (a cache miss).
        let funcs: String = (0..200)
            .map(|f| {
                format!("(func (export \"f{f}\") (result i32) i32.const {i} i32.const {f} i32.add)")
            })
            .collect();
        let wasm = wat::parse_str(format!(
            "(module (memory (export \"memory\") 1) (func (export \"_start\")) {funcs})"
        ))
        .unwrap();
        std::fs::write(dir.path().join(format!("m/{i}.wasm")), wasm).unwrap();
        apps.push_str(&format!(
            "[apps.a{i}]\nmodule = \"m/{i}.wasm\"\nkind = \"stdio\"\n\
             listen = [\"unix:{}/s/{i}.sock\"]\npool = {{ min = 0, max = 1 }}\n\n",
            dir.path().display()
        ));
    }
    write_policy(dir.path(), "", &apps);
    let mut corrald = Corrald::spawn(dir.path(), &[]);
    wait_for("the first compile", Duration::from_secs(60), || {
        corrald.stderr().contains("compiled ").then_some(())
    });
    corrald.signal(rustix::process::Signal::TERM);
    let status = corrald.wait_exit(Duration::from_secs(120));
    let compiled = corrald.stderr().matches("compiled ").count();
    eprintln!("{compiled} of {APPS} apps compiled before corrald exited ({status})");
    assert!(
        !corrald.notes().iter().any(|l| l == "READY=1"),
        "corrald finished its start-up before it honoured SIGTERM"
    );
    assert!(compiled < APPS, "every app was started after SIGTERM");
}

// ---------------------------------------------------------------------------
// Item 4: an artifact damaged under a running app is rebuilt.

/// The app's `.cwasm` is truncated in place while it serves, and its
/// zygote dies: the next zygote finds the artifact damaged, corrald
/// rebuilds the cache entry and the app serves again, with no operator.
#[test]
fn an_artifact_damaged_under_a_running_app_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write_policy(
        dir.path(),
        "",
        &stdio_app("echo", port, "{ min = 1, max = 1 }"),
    );
    let mut corrald = Corrald::spawn(dir.path(), &[]);
    corrald.wait_ready(Duration::from_secs(60));
    assert_eq!(stdio_roundtrip(port).unwrap(), b"ping\n");
    let artifacts: Vec<PathBuf> = walk(&dir.path().join("cache"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    // Truncated in place: corrald's open file is the same inode.
    std::fs::File::create(&artifacts[0]).unwrap();
    let zygote = corrald.app("echo")["zygote_pid"].as_i64().unwrap() as i32;
    kill_all(&[zygote]);
    wait_for(
        "echo to serve again on a rebuilt artifact",
        Duration::from_secs(60),
        || {
            let info = corrald.app("echo");
            let new_zygote = info["zygote_pid"].as_i64()? as i32;
            (info["state"] == "running" && new_zygote != zygote).then_some(())
        },
    );
    assert_eq!(stdio_roundtrip(port).unwrap(), b"ping\n");
    let size = std::fs::metadata(&artifacts[0]).unwrap().len();
    assert!(size > 0, "the entry was rebuilt");
    assert!(
        corrald.stderr().contains("rebuilding the artifact"),
        "{}",
        corrald.stderr()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
