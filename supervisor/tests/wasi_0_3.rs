//! WASI 0.3 apps through the real corrald: a `wasi:http/service` handler, a
//! `wasi:cli/command@0.3` command and a 0.3 stdio app served from one
//! policy; every limit ends a 0.3 guest as it ends a 0.2 one (504, 503,
//! 500 with the reason, its neighbours unharmed); the worker serving 0.3 is
//! sandboxed as any worker; outbound `wasi:http/client` requests pass
//! `network.connect` or are denied; `pool.reuse` shares an instance only
//! when asked; `corral check` and `corral status` name each app's world.
//! (The serve-parity checks for 0.3 are in serve_parity.rs and the shim's.)

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use corral_testkit::serve::read_response;
use corral_testkit::{Log, Notes, descendants_of, free_port, guests_dir, spawn_logged, wait_for};

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");
const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

/// corrald on a policy of `apps` (TOML; `{guests}` is the fixtures'
/// folder), killed with its apps on drop.
struct Daemon {
    child: Child,
    log: Log,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(apps: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let policy = write_policy(dir.path(), apps);
        let notify = dir.path().join("notify.sock");
        let notes = Notes::bind(&notify);
        let (mut child, log) = spawn_logged(
            Command::new(CORRALD)
                .arg("--policy")
                .arg(&policy)
                .args(["--bus", "none"])
                .env("NOTIFY_SOCKET", &notify)
                .env("CORRAL_LOG", "info")
                .env_remove("LISTEN_FDS"),
        );
        wait_for("corrald's READY=1", Duration::from_secs(180), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("corrald exited ({status}):\n{}", log.text());
            }
            notes.find("READY=1")
        });
        Daemon { child, log, dir }
    }

    fn policy(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// `corral status [APP] --json`, parsed.
    fn status(&self, app: Option<&str>) -> serde_json::Value {
        let out = Command::new(CORRAL)
            .arg("status")
            .args(app)
            .arg("--json")
            .arg("--socket")
            .arg(self.dir.path().join("api.sock"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pids = descendants_of(self.child.id() as i32);
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if std::thread::panicking() {
            eprintln!("corrald's log:\n{}", self.log.text());
        }
    }
}

fn write_policy(dir: &Path, apps: &str) -> PathBuf {
    let policy = format!(
        "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
         drain-timeout = \"5s\"\n\n{}",
        apps.replace("{guests}", &guests_dir().display().to_string())
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    path
}

/// One request on a fresh connection: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (status, body) = read_response(&mut s);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The pids of `app`'s workers (children of its zygote).
fn workers(daemon: &Daemon, app: &str) -> Vec<i32> {
    let zygote = daemon.status(Some(app))["zygote_pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{app} has no zygote"));
    descendants_of(zygote as i32)
}

fn proc_status_field(pid: i32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
}

#[test]
fn corrald_serves_wasi_0_3_http_stdio_and_command_apps() {
    let (web, echo) = (free_port(), free_port());
    let d = Daemon::start(&format!(
        "[apps.web]\nmodule = \"{{guests}}/http3-hello.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{web}\"]\npool = {{ min = 1 }}\n\n\
         [apps.echo]\nmodule = \"{{guests}}/cli3.wasm\"\nkind = \"stdio\"\nargs = [\"echo\"]\n\
         listen = [\"127.0.0.1:{echo}\"]\n\n\
         [apps.job]\nmodule = \"{{guests}}/cli3.wasm\"\nkind = \"command\"\nargs = [\"hello\"]\n\
         restart = {{ on = \"never\" }}\n"
    ));
    // http: a wasi:http/handler@0.3.0 component, HTTP/1.1.
    assert_eq!(get(web, "/"), (200, "hello from WASI 0.3\n".to_string()));
    // stdio: the connection is the 0.3 command's stdin and stdout.
    let mut s = TcpStream::connect(("127.0.0.1", echo)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"ping over a 0.3 stdio app\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = String::new();
    s.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, "ping over a 0.3 stdio app\n");
    // command: ran once, its stdout in corrald's log, exited 0.
    d.log
        .wait_for("hello from a WASI 0.3 command", Duration::from_secs(60));
    wait_for("the command to finish", Duration::from_secs(60), || {
        (d.status(Some("job"))["state"] == "finished").then_some(())
    });

    // Each app's world, as status and check name it.
    for (app, world) in [
        ("web", "wasi:http/service@0.3"),
        ("echo", "wasi:cli/command@0.3"),
        ("job", "wasi:cli/command@0.3"),
    ] {
        assert_eq!(d.status(Some(app))["world"], world, "status of {app}");
    }
    let check = Command::new(CORRAL)
        .args(["check", "--policy"])
        .arg(d.policy())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{table}");
    assert!(table.contains("WORLD"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web ") && l.contains("wasi:http/service@0.3")),
        "{table}"
    );

    // The worker serving 0.3 is sandboxed like any other worker.
    let pids = workers(&d, "web");
    assert!(!pids.is_empty());
    for pid in pids {
        assert_eq!(proc_status_field(pid, "Seccomp").as_deref(), Some("2"));
        assert_eq!(proc_status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    }
    let sandbox = d.status(Some("web"))["sandbox"].to_string();
    assert!(sandbox.contains("seccomp=on"), "{sandbox}");
}

/// The issue's own case: a Python handler built with componentize-py
/// (tests/guests/py3/), importing wasi:cli and wasi:filesystem 0.3 besides
/// wasi:http, served by corrald from its first request.
#[test]
fn a_componentize_py_wasi_0_3_handler_is_served() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.py]\nmodule = \"{{guests}}/py3-hello.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\n"
    ));
    for _ in 0..3 {
        assert_eq!(
            get(port, "/"),
            (200, "hello from Python on WASI 0.3\n".to_string())
        );
    }
    assert_eq!(d.status(Some("py"))["world"], "wasi:http/service@0.3");
}

#[test]
fn every_limit_ends_a_wasi_0_3_guest_and_spares_its_neighbours() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[apps.probe]\nmodule = \"{{guests}}/http3-probe.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\npool = {{ min = 1, max = 1 }}\n\
         limits = {{ timeout = \"1s\", memory = \"64MiB\" }}\n"
    ));
    // A busy loop: the epoch deadline.
    let (status, body) = get(port, "/spin");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("limits.timeout (1s) exceeded"), "{body}");
    // A future nobody resolves: the timer.
    let (status, body) = get(port, "/hang");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("limits.timeout (1s) exceeded"), "{body}");
    // Memory above limits.memory.
    let (status, body) = get(port, "/grow?mb=100");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("limits.memory (64 MiB) exceeded"), "{body}");
    // Below it, fine.
    assert_eq!(get(port, "/grow?mb=8").0, 200);
    // A trap.
    let (status, body) = get(port, "/trap");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("guest trapped"), "{body}");
    // The same worker still serves, each request in a fresh instance.
    assert_eq!(get(port, "/"), (200, "probe\n".to_string()));
    assert_eq!(get(port, "/count"), (200, "1\n".to_string()));
    assert_eq!(get(port, "/count"), (200, "1\n".to_string()));
    // A body still streaming after `handle` returned arrives whole.
    let (status, body) = get(port, "/stream?n=4");
    assert_eq!(status, 200);
    assert_eq!(body, "line 0\nline 1\nline 2\nline 3\n");
    // Each failure was reported in the log with its reason.
    let log = d.log.text();
    assert!(log.contains("limits.timeout (1s) exceeded"), "{log}");
    assert!(log.contains("limits.memory (64 MiB) exceeded"), "{log}");
    let info = d.status(Some("probe"));
    assert!(info["errors"].as_u64().unwrap() >= 4, "{info}");
}

#[test]
fn request_and_response_bodies_stream_with_trailers() {
    let port = free_port();
    let _d = Daemon::start(&format!(
        "[apps.probe]\nmodule = \"{{guests}}/http3-probe.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\n"
    ));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // The request body is sent in two chunks with a pause: the first comes
    // back before the second is sent (the guest streams, it does not
    // buffer).
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\
          Trailer: x-checksum\r\nConnection: close\r\n\r\n6\r\nfirst \r\n",
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("first ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"6\r\nsecond\r\n0\r\nx-checksum: abc123\r\n\r\n")
        .unwrap();
    s.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("second"), "{text}");
    // The request's trailer came back as the response's.
    assert!(text.ends_with("0\r\nx-checksum: abc123\r\n\r\n"), "{text}");
}

#[test]
fn outbound_wasi_http_client_requests_pass_network_connect_only() {
    // An upstream on loopback that answers every connection.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr: SocketAddr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nupstream",
            );
        }
    });
    let other = free_port();
    let port = free_port();
    let _d = Daemon::start(&format!(
        "[apps.probe]\nmodule = \"{{guests}}/http3-probe.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\nnetwork = {{ connect = [\"{upstream_addr}\"] }}\n"
    ));
    let (status, body) = get(port, &format!("/fetch?authority={upstream_addr}"));
    assert_eq!((status, body.as_str()), (200, "200 upstream"));
    let (status, body) = get(port, &format!("/fetch?authority=127.0.0.1:{other}"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
}

#[test]
fn pool_reuse_shares_an_instance_only_when_asked_and_only_for_0_3() {
    let (fresh, reused) = (free_port(), free_port());
    let d = Daemon::start(&format!(
        "[apps.fresh]\nmodule = \"{{guests}}/http3-probe.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{fresh}\"]\npool = {{ min = 1, max = 1 }}\n\n\
         [apps.reused]\nmodule = \"{{guests}}/http3-probe.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{reused}\"]\n\
         pool = {{ min = 1, max = 1, reuse = {{ requests = 3, concurrent = 1 }} }}\n"
    ));
    let counts = |port| -> Vec<String> { (0..4).map(|_| get(port, "/count").1).collect() };
    // A fresh instance per request: nothing of one request reaches the next.
    assert_eq!(counts(fresh), ["1\n", "1\n", "1\n", "1\n"]);
    // Reuse: one instance for three requests, then a new one.
    assert_eq!(counts(reused), ["1\n", "2\n", "3\n", "1\n"]);
    drop(d);

    // On a 0.2 handler, `corral check` refuses it and names the app.
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            "[apps.old]\nmodule = \"{{guests}}/http-hello.wasm\"\nkind = \"http\"\n\
             listen = [\"127.0.0.1:{}\"]\npool = {{ reuse = {{ requests = 8, concurrent = 2 }} }}\n",
            free_port()
        ),
    );
    let out = Command::new(CORRAL)
        .args(["check", "--policy"])
        .arg(&policy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("app `old`") && stderr.contains("pool.reuse needs a WASI 0.3 handler"),
        "{stderr}"
    );
    // On a stdio app, the policy itself is refused, with file and line.
    let policy = write_policy(
        dir.path(),
        &format!(
            "[apps.cat]\nmodule = \"{{guests}}/cli3.wasm\"\nkind = \"stdio\"\n\
             listen = [\"127.0.0.1:{}\"]\npool = {{ reuse = {{ requests = 8, concurrent = 2 }} }}\n",
            free_port()
        ),
    );
    let out = Command::new(CORRAL)
        .args(["check", "--policy"])
        .arg(&policy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("policy.toml:11:") && stderr.contains("apps.cat.pool.reuse"),
        "{stderr}"
    );
}
