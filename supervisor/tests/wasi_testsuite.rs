//! Conformance: the WASI testsuite, run through the real `corral run`
//! binary, inside its sandbox.
//!
//! - preview1: every program must meet its `.json` expectations (exit
//!   code, stdout, stderr; args, env and a read-write root preopen as
//!   input).
//! - WASI 0.3 (`rust/wasm32-wasip3`): the suite's `operations` form
//!   (`run`, `write`, `read`, `wait`, `connect`, `send`, `recv`, `request`,
//!   `kill`; doc/specification.md and the suite's Python runner), with the
//!   HTTP servers a test declares (`servers`) stood up here; the test's
//!   `proposals` and `world` become `corral run` flags (see [`p3_argv`]).
//!   At least [`P3_FLOOR`] must pass; each failure is listed with why.
//!
//! The suite is read from `$WASI_TESTSUITE`, default `../shared/wasi-testsuite`
//! next to the repository. It is copied into a temporary directory first
//! (tests write into their fixtures). A missing suite fails under `CI=true`
//! and is a visible skip elsewhere.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

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

// ---------------------------------------------------------------------------
// WASI 0.3

/// How many of the 0.3 tests must pass. The wasmtime 49.0.3 CLI with the
/// suite's own adapter passes 49 of 55 on this machine (see the suite's
/// README for its six failures); corral passes 49: all of those 49 but the
/// two of [`P3_KNOWN`] that wasmtime passes, plus filesystem-read-directory
/// and http-service-uri, which wasmtime fails.
const P3_FLOOR: usize = 49;

/// The 0.3 tests corral fails, and who is wrong (printed beside the
/// failure; a test listed here that passes is said too).
const P3_KNOWN: &[(&str, &str)] = &[
    (
        "filesystem-hard-links",
        "corral's sandbox: linking the preopened root itself (`.`) gets EXDEV from landlock \
         (its refer check runs before the VFS refuses a directory link with EPERM, and the \
         root's parent is outside the ruleset), which WASI reports as cross-device; the test \
         accepts only not-permitted or access; passes with --no-sandbox",
    ),
    (
        "http-client-sent",
        "wasmtime-wasi-http 48.0.8: the transmission future of a request whose send failed \
         resolves ok (wasmtime issue 14112, fixed by PR 14148 in 49, not in the 48 line)",
    ),
    (
        "http-client-path-none",
        "wasmtime-wasi-http (48 and 49): a request without a path fails with \
         HTTP-request-URI-invalid; the test expects `/`; an expected failure upstream",
    ),
    (
        "http-request",
        "wasmtime-wasi-http (48 and 49): set-path-with-query accepts `a/b/c` (no leading `/`) \
         where the test wants an error; wasmtime 49.0.3 fails it too",
    ),
    (
        "sockets-tcp-properties",
        "the suite: the test has no .json listing the `sockets` proposal, so it gets no network \
         (access-denied); passes with --connect any --listen any",
    ),
    (
        "sockets-udp-properties",
        "the suite: the test has no .json listing the `sockets` proposal, so it gets no network \
         (access-denied); passes with --connect any --listen any",
    ),
];

/// How long one `wait`, `read`, `connect`, `recv` or `request` may take
/// (the first run of a test compiles it, and re-executes `corral run`).
const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// The two forms of a test's `.json`: the `operations` form (a legacy spec
/// becomes `run`, `read`s, `wait`, as the suite's runner does).
#[derive(Debug)]
struct P3Spec {
    proposals: Vec<String>,
    world: String,
    servers: Vec<ServerSpec>,
    operations: Vec<Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct ServerSpec {
    name: String,
    #[serde(default = "listening")]
    kind: String,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
}

fn listening() -> String {
    "listening".into()
}

#[derive(Debug, Clone, Deserialize)]
struct EndpointSpec {
    #[serde(default = "get")]
    method: String,
    #[serde(default = "slash")]
    path: String,
    #[serde(default = "static_mode")]
    mode: String,
    #[serde(default)]
    response: Option<Value>,
}

fn get() -> String {
    "GET".into()
}

fn slash() -> String {
    "/".into()
}

fn static_mode() -> String {
    "static".into()
}

fn read_p3_spec(wasm: &Path) -> Result<P3Spec, String> {
    let json = wasm.with_extension("json");
    let default_ops = || {
        vec![
            serde_json::json!({"type": "run"}),
            serde_json::json!({"type": "wait"}),
        ]
    };
    if !json.exists() {
        return Ok(P3Spec {
            proposals: Vec::new(),
            world: "wasi:cli/command".into(),
            servers: Vec::new(),
            operations: default_ops(),
        });
    }
    let text = fs::read_to_string(&json).map_err(|e| format!("{}: {e}", json.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    let new_form = ["operations", "proposals", "servers"]
        .iter()
        .any(|k| v.get(k).is_some_and(|x| !x.is_null()));
    if !new_form {
        // The legacy keys, as `run` + `read`s + `wait`.
        let mut run = serde_json::json!({"type": "run"});
        for key in ["args", "env", "root"] {
            if let Some(x) = v.get(key) {
                run[key] = x.clone();
            }
        }
        let mut ops = vec![run];
        for id in ["stdout", "stderr"] {
            if let Some(payload) = v.get(id) {
                ops.push(serde_json::json!({"type": "read", "id": id, "payload": payload}));
            }
        }
        let code = v.get("exit_code").cloned().unwrap_or(Value::from(0));
        ops.push(serde_json::json!({"type": "wait", "exit_code": code}));
        return Ok(P3Spec {
            proposals: Vec::new(),
            world: "wasi:cli/command".into(),
            servers: Vec::new(),
            operations: ops,
        });
    }
    let strings = |key: &str| -> Vec<String> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let servers = match v.get("servers") {
        Some(s) => serde_json::from_value(s.clone())
            .map_err(|e| format!("{}: servers: {e}", json.display()))?,
        None => Vec::new(),
    };
    Ok(P3Spec {
        proposals: strings("proposals"),
        world: v
            .get("world")
            .and_then(Value::as_str)
            .unwrap_or("wasi:cli/command")
            .to_string(),
        servers,
        operations: v
            .get("operations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_else(default_ops),
    })
}

/// The `corral run` command line for a 0.3 test: the world picks running
/// once or `--serve 127.0.0.1:0`; the `http` proposal grants connecting to
/// the test's own servers (`HTTP_SERVER_<NAME>`, closed ones too, so that a
/// refused connection is the network's answer, not corral's); `sockets`
/// grants what a runtime that inherits the network gives (`wasmtime
/// -Sinherit-network`): `--connect any --listen any`.
fn p3_argv(
    spec: &P3Spec,
    run: &Value,
    dir: &Path,
    wasm: &Path,
    cache: &Path,
    servers: &BTreeMap<String, SocketAddr>,
) -> Vec<String> {
    let mut argv = vec![
        "run".to_string(),
        "--cache".into(),
        cache.display().to_string(),
    ];
    let serve = spec.world == "wasi:http/service";
    if serve {
        argv.extend(["--serve".into(), "127.0.0.1:0".into()]);
    } else {
        argv.extend(["--timeout".into(), "60s".into()]);
    }
    if spec.proposals.iter().any(|p| p == "http") {
        for addr in servers.values() {
            argv.extend(["--connect".into(), addr.to_string()]);
        }
    }
    if spec.proposals.iter().any(|p| p == "sockets") {
        argv.extend([
            "--connect".into(),
            "any".into(),
            "--listen".into(),
            "any".into(),
        ]);
    }
    if let Some(root) = run.get("root").and_then(Value::as_str) {
        argv.extend(["--dir".into(), format!("{}::/", dir.join(root).display())]);
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    if let Some(e) = run.get("env").and_then(Value::as_object) {
        for (k, v) in e {
            env.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
        }
    }
    for (name, addr) in servers {
        env.insert(
            format!("HTTP_SERVER_{}", name.to_uppercase()),
            addr.to_string(),
        );
    }
    for (k, v) in env {
        argv.extend(["--env".into(), format!("{k}={v}")]);
    }
    argv.push(wasm.display().to_string());
    let args: Vec<String> = run
        .get("args")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if !args.is_empty() {
        argv.push("--".into());
        argv.extend(args);
    }
    argv
}

/// Bytes read from a child's pipe by a thread of its own, and whether the
/// pipe has ended.
#[derive(Clone, Default)]
struct Pipe(Arc<Mutex<(Vec<u8>, bool)>>);

impl Pipe {
    fn collect(mut from: impl Read + Send + 'static) -> Pipe {
        let pipe = Pipe::default();
        let buf = pipe.0.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                match from.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.lock().unwrap().0.extend_from_slice(&chunk[..n]),
                }
            }
            buf.lock().unwrap().1 = true;
        });
        pipe
    }

    /// `n` bytes from `at`, waiting for them up to [`OP_TIMEOUT`]; fewer if
    /// the pipe ends first.
    fn take(&self, at: &mut usize, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            {
                let g = self.0.lock().unwrap();
                if g.0.len() >= *at + n || g.1 || Instant::now() > deadline {
                    let end = (*at + n).min(g.0.len());
                    let got = g.0[*at..end].to_vec();
                    *at = end;
                    return got;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The next line from `at` (without its newline), or `None` if the
    /// pipe ends or [`OP_TIMEOUT`] passes first.
    fn line(&self, at: &mut usize) -> Option<String> {
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            {
                let g = self.0.lock().unwrap();
                if let Some(i) = g.0[*at..].iter().position(|&b| b == b'\n') {
                    let line = String::from_utf8_lossy(&g.0[*at..*at + i]).into_owned();
                    *at += i + 1;
                    return Some(line.trim_end_matches('\r').to_string());
                }
                if g.1 || Instant::now() > deadline {
                    return None;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap().0).into_owned()
    }
}

/// A test's HTTP server (`servers` of its spec): answers each request on
/// a connection of its own, as its endpoints say, like the suite's runner.
fn start_endpoint_server(spec: &ServerSpec) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoints = Arc::new(spec.endpoints.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let endpoints = endpoints.clone();
            std::thread::spawn(move || {
                let _ = serve_one(conn, &endpoints);
            });
        }
    });
    addr
}

/// A loopback address nothing listens on (a `closed` server).
fn closed_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn read_line(s: &mut impl Read) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

/// Header or trailer fields, in order, names lower-cased.
type Fields = Vec<(String, String)>;

/// Headers (in order, names lower-cased) up to the blank line.
fn read_fields(s: &mut impl Read) -> std::io::Result<Fields> {
    let mut fields = Vec::new();
    loop {
        let line = read_line(s)?;
        if line.is_empty() {
            return Ok(fields);
        }
        if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A message body after `fields`: by Content-Length, chunked (with its
/// trailers), or, for a response without either, to the end.
fn read_body(
    s: &mut impl Read,
    fields: &[(String, String)],
    to_end: bool,
) -> std::io::Result<(Vec<u8>, Fields)> {
    if field(fields, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line = read_line(s)?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0u8; size];
            s.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            read_line(s)?;
        }
        let trailers = read_fields(s)?;
        Ok((body, trailers))
    } else if let Some(len) = field(fields, "content-length") {
        let mut body = vec![0u8; len.parse().unwrap_or(0)];
        s.read_exact(&mut body)?;
        Ok((body, Vec::new()))
    } else if to_end {
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        Ok((body, Vec::new()))
    } else {
        Ok((Vec::new(), Vec::new()))
    }
}

fn serve_one(mut conn: TcpStream, endpoints: &[EndpointSpec]) -> std::io::Result<()> {
    conn.set_read_timeout(Some(OP_TIMEOUT))?;
    let request_line = read_line(&mut conn)?;
    let mut parts = request_line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let headers = read_fields(&mut conn)?;
    let (body, trailers) = read_body(&mut conn, &headers, false)?;
    let endpoint = endpoints
        .iter()
        .find(|e| e.method.eq_ignore_ascii_case(&method) && e.path == target);
    let head = method == "HEAD";
    let reply = |conn: &mut TcpStream, status: u16, fields: &[(String, String)], body: &[u8]| {
        let mut out = format!("HTTP/1.1 {status} X\r\n");
        for (k, v) in fields {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        conn.write_all(out.as_bytes())?;
        if !head {
            conn.write_all(body)?;
        }
        Ok::<(), std::io::Error>(())
    };
    match endpoint {
        None => reply(&mut conn, 404, &[], b"")?,
        Some(e) if e.mode == "echo-body" => reply(&mut conn, 200, &[], &body)?,
        Some(e) if e.mode == "echo-headers" => {
            let mut echoed = vec![
                ("x-request-method".to_string(), method.clone()),
                ("x-request-path".to_string(), target.clone()),
            ];
            let mut names: Vec<&str> = Vec::new();
            for (k, _) in &headers {
                if !names.contains(&k.as_str()) {
                    names.push(k);
                }
            }
            for name in names {
                for (k, v) in &headers {
                    if k == name {
                        echoed.push((format!("x-echo-{name}"), v.clone()));
                    }
                }
            }
            for (k, v) in &trailers {
                echoed.push((format!("x-trailer-{k}"), v.clone()));
            }
            reply(&mut conn, 200, &echoed, b"")?;
        }
        Some(e) => {
            let response = e.response.clone().unwrap_or(Value::String(String::new()));
            let (status, fields, text, chunks, trailers) = match &response {
                Value::String(body) => (200, Vec::new(), body.clone(), None, Vec::new()),
                r => {
                    let map = |key: &str| -> Vec<(String, String)> {
                        r.get(key)
                            .and_then(Value::as_object)
                            .map(|o| {
                                o.iter()
                                    .map(|(k, v)| {
                                        (k.clone(), v.as_str().unwrap_or_default().to_string())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    (
                        r.get("status").and_then(Value::as_u64).unwrap_or(200) as u16,
                        map("headers"),
                        r.get("body")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        r.get("chunks").and_then(Value::as_array).map(|c| {
                            c.iter()
                                .map(|x| x.as_str().unwrap_or_default().to_string())
                                .collect::<Vec<_>>()
                        }),
                        map("trailers"),
                    )
                }
            };
            match chunks {
                None => reply(&mut conn, status, &fields, text.as_bytes())?,
                Some(chunks) => {
                    let mut out = format!("HTTP/1.1 {status} X\r\n");
                    for (k, v) in &fields {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("Transfer-Encoding: chunked\r\n");
                    if !trailers.is_empty() {
                        let names: Vec<&str> = trailers.iter().map(|(k, _)| k.as_str()).collect();
                        out.push_str(&format!("Trailer: {}\r\n", names.join(", ")));
                    }
                    out.push_str("Connection: close\r\n\r\n");
                    if !head {
                        for chunk in &chunks {
                            out.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
                        }
                        out.push_str("0\r\n");
                        for (k, v) in &trailers {
                            out.push_str(&format!("{k}: {v}\r\n"));
                        }
                        out.push_str("\r\n");
                    }
                    conn.write_all(out.as_bytes())?;
                }
            }
        }
    }
    conn.flush()?;
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
}

/// One `request` against the served address: `Ok` when status, the
/// expected headers and the body match.
fn http_request(base: &str, op: &Value) -> Result<(), String> {
    let addr: SocketAddr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .map_err(|_| format!("bad served address {base:?}"))?;
    let method = op.get("method").and_then(Value::as_str).unwrap_or("GET");
    let path = op.get("path").and_then(Value::as_str).unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let body = op.get("body").and_then(Value::as_str).unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(h) = op.get("headers").and_then(Value::as_object) {
        for (k, v) in h {
            req.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap_or_default()));
        }
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut s = TcpStream::connect(addr)
        .map_err(|e| format!("{method} {path}: connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(OP_TIMEOUT)).unwrap();
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{method} {path}: sending: {e}"))?;
    let status_line = read_line(&mut s).map_err(|e| format!("{method} {path}: reading: {e}"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| format!("{method} {path}: no response (got {status_line:?})"))?;
    let fields = read_fields(&mut s).map_err(|e| format!("{method} {path}: reading: {e}"))?;
    let (got_body, _) = if method == "HEAD" {
        (Vec::new(), Vec::new())
    } else {
        read_body(&mut s, &fields, true)
            .map_err(|e| format!("{method} {path}: reading the body: {e}"))?
    };
    let want = op.get("response").cloned().unwrap_or(Value::Null);
    let want_status = want.get("status").and_then(Value::as_u64).unwrap_or(200) as u16;
    let got_text = String::from_utf8_lossy(&got_body);
    if status != want_status {
        return Err(format!(
            "{method} {path}: status {status}, expected {want_status} (body {got_text:?})"
        ));
    }
    if let Some(h) = want.get("headers").and_then(Value::as_object) {
        for (k, v) in h {
            let v = v.as_str().unwrap_or_default();
            match field(&fields, &k.to_ascii_lowercase()) {
                None => return Err(format!("{method} {path}: no {k} header, expected {v:?}")),
                Some(got) if got != v => {
                    return Err(format!("{method} {path}: {k}: {got:?}, expected {v:?}"));
                }
                _ => {}
            }
        }
    }
    let want_body = want.get("body").and_then(Value::as_str).unwrap_or("");
    if got_text != want_body {
        return Err(format!(
            "{method} {path}: body {got_text:?}, expected {want_body:?}"
        ));
    }
    Ok(())
}

/// The running `corral run` of a 0.3 test.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Pipe,
    stderr: Pipe,
    at_stdout: usize,
    at_stderr: usize,
    served: Option<String>,
    sockets: BTreeMap<String, TcpStream>,
}

impl Running {
    /// What stderr says about a failure: the guest's panic message and
    /// corral's own lines (not the backtrace), else its last lines.
    fn stderr_tail(&self) -> String {
        let text = self.stderr.text();
        let lines: Vec<&str> = text.lines().collect();
        let mut said = Vec::new();
        let mut in_panic = false;
        for line in &lines {
            if line.contains("panicked at") {
                in_panic = true;
            } else if line.starts_with("note: ") || line.trim().is_empty() {
                in_panic = false;
            }
            if in_panic || line.starts_with("corral: ") || line.contains("wasm trap:") {
                said.push(line.trim());
            }
        }
        if said.is_empty() {
            said = lines[lines.len().saturating_sub(12)..].to_vec();
        }
        let tail = said.join("\n      ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\n    stderr:\n      {tail}")
        }
    }

    /// The served address, from the first line on stderr.
    fn served(&mut self) -> Result<String, String> {
        if let Some(s) = &self.served {
            return Ok(s.clone());
        }
        let line = self
            .stderr
            .line(&mut self.at_stderr)
            .ok_or("no first line on stderr (the server exited or said nothing)")?;
        let start = line
            .find("http://")
            .ok_or_else(|| format!("expected http:// in the first line on stderr, got {line:?}"))?;
        let url = line[start..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        self.served = Some(url.clone());
        Ok(url)
    }

    fn wait(&mut self) -> Result<i32, String> {
        self.stdin = None; // as the suite's runner does: EOF on stdin
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return status
                    .code()
                    .ok_or_else(|| format!("killed by a signal ({status})"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("still running after {OP_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run one 0.3 test; `Err` says how it failed.
fn run_p3(wasm: &Path, cache: &Path) -> Result<(), String> {
    let spec = read_p3_spec(wasm)?;
    let dir = wasm.parent().unwrap();
    let mut servers = BTreeMap::new();
    for s in &spec.servers {
        let addr = if s.kind == "closed" {
            closed_addr()
        } else {
            start_endpoint_server(s)
        };
        servers.insert(s.name.clone(), addr);
    }
    let mut running: Option<Running> = None;
    for (i, op) in spec.operations.iter().enumerate() {
        let ty = op.get("type").and_then(Value::as_str).unwrap_or("");
        let fail = |running: &Option<Running>, why: String| {
            let tail = running
                .as_ref()
                .map(Running::stderr_tail)
                .unwrap_or_default();
            Err(format!("op {i} ({ty}): {why}{tail}"))
        };
        match ty {
            "run" => {
                let argv = p3_argv(&spec, op, dir, wasm, cache, &servers);
                let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
                    .args(&argv)
                    .current_dir(dir)
                    .env_remove("CORRAL_RUN_REEXEC")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("spawning corral: {e}"))?;
                running = Some(Running {
                    stdin: child.stdin.take(),
                    stdout: Pipe::collect(child.stdout.take().unwrap()),
                    stderr: Pipe::collect(child.stderr.take().unwrap()),
                    child,
                    at_stdout: 0,
                    at_stderr: 0,
                    served: None,
                    sockets: BTreeMap::new(),
                });
            }
            _ if running.is_none() => return Err(format!("op {i} ({ty}) before run")),
            "write" => {
                let r = running.as_mut().unwrap();
                let payload = op.get("payload").and_then(Value::as_str).unwrap_or("");
                if let Some(stdin) = r.stdin.as_mut()
                    && let Err(e) = stdin
                        .write_all(payload.as_bytes())
                        .and_then(|()| stdin.flush())
                {
                    return fail(&running, format!("writing stdin: {e}"));
                }
            }
            "read" => {
                let r = running.as_mut().unwrap();
                let id = op.get("id").and_then(Value::as_str).unwrap_or("stdout");
                let want = op.get("payload").and_then(Value::as_str).unwrap_or("");
                let got = match id {
                    "stderr" => r.stderr.take(&mut r.at_stderr, want.len()),
                    _ => r.stdout.take(&mut r.at_stdout, want.len()),
                };
                if got != want.as_bytes() {
                    let got = String::from_utf8_lossy(&got).into_owned();
                    return fail(&running, format!("{id} {got:?}, expected {want:?}"));
                }
            }
            "wait" => {
                let want = op.get("exit_code").and_then(Value::as_i64).unwrap_or(0);
                let got = running.as_mut().unwrap().wait();
                match got {
                    Ok(code) if i64::from(code) == want => {}
                    Ok(code) => {
                        return fail(&running, format!("exit code {code}, expected {want}"));
                    }
                    Err(e) => return fail(&running, e),
                }
                running = None;
            }
            "kill" => {
                let r = running.as_mut().unwrap();
                let signal = op
                    .get("signal")
                    .and_then(Value::as_str)
                    .unwrap_or("SIGTERM");
                let status = Command::new("kill")
                    .arg(format!("-{}", signal.trim_start_matches("SIG")))
                    .arg(r.child.id().to_string())
                    .status()
                    .map_err(|e| format!("kill: {e}"))?;
                if !status.success() {
                    return fail(&running, format!("kill -{signal} failed"));
                }
            }
            "request" => {
                let r = running.as_mut().unwrap();
                let base = match r.served() {
                    Ok(b) => b,
                    Err(e) => return fail(&running, e),
                };
                if let Err(e) = http_request(&base, op) {
                    return fail(&running, e);
                }
            }
            "connect" => {
                let r = running.as_mut().unwrap();
                let id = op
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("server")
                    .to_string();
                let Some(line) = r.stdout.line(&mut r.at_stdout) else {
                    return fail(&running, "no address line on stdout".into());
                };
                let addr: Result<SocketAddr, _> = line.trim().parse();
                match addr.map_err(|e| e.to_string()).and_then(|a| {
                    TcpStream::connect(a).map_err(|e| format!("connecting to {a}: {e}"))
                }) {
                    Ok(s) => {
                        s.set_read_timeout(Some(OP_TIMEOUT)).unwrap();
                        r.sockets.insert(id, s);
                    }
                    Err(e) => return fail(&running, format!("{line:?}: {e}")),
                }
            }
            "send" | "recv" => {
                let r = running.as_mut().unwrap();
                let id = op.get("id").and_then(Value::as_str).unwrap_or("");
                let payload = op.get("payload").and_then(Value::as_str).unwrap_or("");
                let Some(s) = r.sockets.get_mut(id) else {
                    return fail(&running, format!("no connection {id:?}"));
                };
                let result = if ty == "send" {
                    s.write_all(payload.as_bytes()).map_err(|e| e.to_string())
                } else {
                    let mut got = vec![0u8; payload.len()];
                    match s.read_exact(&mut got) {
                        Ok(()) if got == payload.as_bytes() => Ok(()),
                        Ok(()) => Err(format!(
                            "received {:?}, expected {payload:?}",
                            String::from_utf8_lossy(&got)
                        )),
                        Err(e) => Err(e.to_string()),
                    }
                };
                if let Err(e) = result {
                    return fail(&running, e);
                }
            }
            other => return fail(&running, format!("unknown operation {other:?}")),
        }
    }
    if let Some(r) = &running {
        return Err(format!(
            "still running after the last operation{}",
            r.stderr_tail()
        ));
    }
    Ok(())
}

#[test]
fn wasi_testsuite_p3() {
    let Some(suite) = suite_dir() else { return };
    let from = suite.join("rust/wasm32-wasip3");
    if !from.is_dir() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "CI=true and {} is missing", from.display());
        eprintln!("SKIPPED: no WASI 0.3 tests at {}", from.display());
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("wasm32-wasip3");
    copy_tree(&from, &copy);
    let cache = work.path().join("cache");
    let mut tests: Vec<PathBuf> = fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    tests.sort();
    assert!(!tests.is_empty(), "no tests in {}", from.display());

    let mut failures = Vec::new();
    for wasm in &tests {
        remove_cleanup_files(&copy);
        let name = wasm.file_stem().unwrap().to_string_lossy().into_owned();
        let known = P3_KNOWN.iter().find(|(n, _)| *n == name).map(|(_, w)| *w);
        match (run_p3(wasm, &cache), known) {
            (Ok(()), None) => eprintln!("ok   {name}"),
            (Ok(()), Some(_)) => eprintln!("ok   {name} (listed in P3_KNOWN: take it out)"),
            (Err(why), known) => {
                eprintln!("FAIL {name}: {why}");
                if let Some(known) = known {
                    eprintln!("    known: {known}");
                }
                failures.push(name);
            }
        }
    }
    let passed = tests.len() - failures.len();
    eprintln!(
        "wasi-testsuite wasm32-wasip3: {passed}/{} passed; failed: {}",
        tests.len(),
        failures.join(", ")
    );
    assert!(
        passed >= P3_FLOOR,
        "{passed} of {} passed, fewer than {P3_FLOOR}; failed: {failures:#?}",
        tests.len()
    );
}
