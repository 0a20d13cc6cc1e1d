//! `corral run --serve` with the wasi:http fixtures of tests/guests/: a
//! hello handler, an echo of method/path/headers/body, and a handler whose
//! outbound request is allowed or denied by `network.connect`. Each test
//! starts the real binary on a free port and talks HTTP/1.1 to it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral_testkit::{guest, serve, spawn_logged};

/// A `corral run --serve` process, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    _cache: tempfile::TempDir,
    _policy_dir: Option<tempfile::TempDir>,
}

impl Server {
    fn start(extra: &[&str], file: Option<&Path>) -> Server {
        let cache = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
        cmd.arg("run")
            .arg("--cache")
            .arg(cache.path())
            .args(["--serve", "127.0.0.1:0"])
            .args(extra);
        if let Some(file) = file {
            cmd.arg(file);
        }
        let (child, log) = spawn_logged(&mut cmd);
        // The first line says where it serves.
        log.wait_for("\n", Duration::from_secs(120));
        let line = log.text().lines().next().unwrap_or_default().to_string();
        let addr = serve::corral_run_address(&line)
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        Server {
            child,
            addr,
            _cache: cache,
            _policy_dir: None,
        }
    }

    /// Serve `module` as the only app of a policy (`app`, kind http, sandbox
    /// best-effort) whose extra TOML lines are `extra`.
    fn with_policy(app: &str, module: &str, extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[apps.{app}]\nmodule = {:?}\nkind = \"http\"\nlisten = [\"127.0.0.1:9\"]\n{extra}\n\
                 sandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n",
                guest(module).display().to_string()
            ),
        )
        .unwrap();
        let mut server = Server::start(&["--policy", policy.to_str().unwrap(), "--app", app], None);
        server._policy_dir = Some(dir);
        server
    }

    /// One request on a fresh connection; returns (status, headers, body).
    fn request(&self, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "{head}\r\nhost: test\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        // The server may answer (and stop reading) before the whole body is
        // sent, e.g. when the guest traps on it.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = headers[9..12].parse().unwrap();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (status, headers, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        data = &data[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[test]
fn hello_answers_every_request() {
    let server = Server::start(&[], Some(&guest("http-hello.wasm")));
    for path in ["/", "/anything?x=1"] {
        let (status, headers, body) = server.request(&format!("GET {path} HTTP/1.1"), b"");
        assert_eq!(status, 200);
        assert!(headers.contains("content-type: text/plain"), "{headers}");
        assert_eq!(body, b"Hello from corral!\n");
    }
}

#[test]
fn echo_sees_method_path_headers_and_body() {
    let server = Server::start(&[], Some(&guest("http-echo.wasm")));
    let (status, headers, body) =
        server.request("PUT /some/path?q=1&r=2 HTTP/1.1\r\nx-test: yes", b"ping\n");
    assert_eq!(status, 200);
    assert!(headers.contains("x-echo-method: PUT"), "{headers}");
    let body = String::from_utf8(body).unwrap();
    let (head, payload) = body.split_once("\n\n").unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("PUT /some/path?q=1&r=2"));
    let mut header_lines: Vec<&str> = lines.collect();
    header_lines.sort();
    assert_eq!(header_lines, ["content-length: 5", "x-test: yes"]);
    assert_eq!(payload, "ping\n");
}

#[test]
fn a_guest_over_its_memory_limit_gets_503_and_the_server_stays_up() {
    // The echo guest buffers the body: 3 MiB cannot fit in 2 MiB.
    let server = Server::start(&["--memory", "2MiB"], Some(&guest("http-echo.wasm")));
    let big = vec![b'x'; 3 * 1024 * 1024];
    let (status, _, body) = server.request("POST / HTTP/1.1", &big);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("corral: limits.memory (2 MiB) exceeded"),
        "{body}"
    );
    let (status, _, body) = server.request("POST /small HTTP/1.1", b"ok");
    assert_eq!(status, 200);
    assert!(body.ends_with(b"\n\nok"));
}

#[test]
fn a_component_whose_initial_memory_exceeds_the_limit_is_refused_at_start() {
    // With the pooling allocator (serving), the limit is the slot size:
    // checked when the component is loaded, not per request.
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("run")
        .arg("--cache")
        .arg(cache.path())
        .args(["--memory", "1MiB", "--serve", "127.0.0.1:0"])
        .arg(guest("http-hello.wasm"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("exceeds the limit of 0x100000 bytes"),
        "{stderr}"
    );
}

/// A one-shot upstream that answers `upstream says hi` and counts
/// connections.
fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\nconnection: close\r\n\r\nupstream says hi\n",
            );
        }
    });
    (addr, hits)
}

#[test]
fn outbound_request_only_to_network_connect() {
    let (allowed, allowed_hits) = upstream();
    let (denied, denied_hits) = upstream();
    let server = Server::with_policy(
        "fetch",
        "http-fetch.wasm",
        &format!("network = {{ connect = [\"{allowed}\"] }}"),
    );

    let (status, _, body) = server.request(&format!("GET / HTTP/1.1\r\nx-fetch: {allowed}/x"), b"");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (200, "fetched 200: upstream says hi\n")
    );
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1);

    let (status, _, body) = server.request(&format!("GET / HTTP/1.1\r\nx-fetch: {denied}/x"), b"");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (502, "denied: ErrorCode::HttpRequestDenied")
    );
    assert_eq!(
        denied_hits.load(Ordering::SeqCst),
        0,
        "no connection was made"
    );
}

#[test]
fn a_request_stuck_in_a_host_call_times_out_with_504() {
    // An upstream that accepts and never answers: the guest waits inside
    // the outgoing-handler host call, where only the backstop can stop it.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let server = Server::with_policy(
        "fetch",
        "http-fetch.wasm",
        &format!(
            "network = {{ connect = [\"{silent_addr}\"] }}\nlimits = {{ timeout = \"300ms\" }}"
        ),
    );
    for _ in 0..2 {
        let (status, _, body) =
            server.request(&format!("GET / HTTP/1.1\r\nx-fetch: {silent_addr}/"), b"");
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (504, "corral: limits.timeout (300ms) exceeded\n")
        );
    }
}

/// A trap answers 500 and a guest spinning in its own code (no host call:
/// only the epoch deadline can stop it) answers 504; neither disturbs a
/// request served at the same time on another connection, nor the next one.
#[test]
fn a_trap_answers_500_a_spinning_guest_504_and_neither_disturbs_other_requests() {
    let server = Arc::new(Server::with_policy(
        "echo",
        "http-echo.wasm",
        "limits = { timeout = \"500ms\" }",
    ));

    let spinning = {
        let server = Arc::clone(&server);
        std::thread::spawn(move || server.request("GET /spin HTTP/1.1", b""))
    };
    // While one instance spins, others are served.
    for _ in 0..5 {
        let (status, _, body) = server.request("POST /ok HTTP/1.1", b"fine");
        assert_eq!(status, 200);
        assert!(
            body.ends_with(b"\n\nfine"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, _, body) = spinning.join().unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (504, "corral: limits.timeout (500ms) exceeded\n")
    );

    let (status, _, body) = server.request("GET /trap HTTP/1.1", b"");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (500, "corral: guest trapped\n")
    );
    let (status, _, _) = server.request("GET /after HTTP/1.1", b"");
    assert_eq!(
        status, 200,
        "the server keeps serving after a trap and a timeout"
    );
}
