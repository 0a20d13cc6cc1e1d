//! The Unix-socket API, the `corral` commands that use it, and metrics,
//! end to end: each test starts the real corrald on a policy in a
//! temporary directory (apps from tests/guests on free loopback ports)
//! and talks HTTP/1.1 to its real API socket, with hand-written requests
//! (so that malformed ones can be sent too) or through the real `corral`
//! binary. Caller checks run `corral` as uid 65534 with setpriv(1), which
//! needs root: those parts are skipped visibly otherwise (and fail under
//! `CI=true`).

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use corral_testkit::{free_port, guests_dir as guests, wait_for};
use serde_json::Value;

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");
const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skip (visibly) a part that needs root, or fail under CI.
fn need_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} needs root (CI=true)"
    );
    eprintln!("SKIP {what}: needs root (setpriv)");
    false
}

/// A running corrald, killed on drop.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    http_port: u16,
    metrics_port: u16,
}

impl Daemon {
    /// corrald with an http app `hello` (min 0) and a stdio app `echo`,
    /// the metrics listener on, and `api-group` = `group`.
    fn start(group: &str) -> Daemon {
        Daemon::start_with_bus(group, None)
    }

    /// As [`Daemon::start`], serving D-Bus on the session bus at `bus`.
    fn start_with_bus(group: &str, bus: Option<&str>) -> Daemon {
        Daemon::start_full(group, bus, "")
    }

    /// As [`Daemon::start_with_bus`], with more `[daemon]` keys.
    fn start_full(group: &str, bus: Option<&str>, daemon_keys: &str) -> Daemon {
        Daemon::start_wrapped(group, bus, daemon_keys, &[])
    }

    /// As [`Daemon::start_full`], corrald started by `wrapper` (a command
    /// and its arguments, corrald's command line after them).
    fn start_wrapped(
        group: &str,
        bus: Option<&str>,
        daemon_keys: &str,
        wrapper: &[&str],
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // uid 65534 must reach the socket inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let (http_port, echo_port, metrics_port) = (free_port(), free_port(), free_port());
        let g = guests();
        let policy = format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"run/api.sock\"\n\
             api-group = \"{group}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\ndrain-timeout = \"5s\"\n{daemon_keys}\n\n\
             [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n\
             [apps.hello]\nmodule = \"{g}/http-hello.wasm\"\nkind = \"http\"\nlisten = [\"127.0.0.1:{http_port}\"]\n\n\
             [apps.echo]\nmodule = \"{g}/stdio-echo.wasm\"\nkind = \"stdio\"\nlisten = [\"127.0.0.1:{echo_port}\"]\n\
             pool = {{ min = {echo_min}, max = 1 }}\n",
            echo_min = u8::from(daemon_keys.is_empty()),
            g = g.display()
        );
        std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
        let mut cmd = match wrapper {
            [] => Command::new(CORRALD),
            [program, args @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(CORRALD);
                cmd
            }
        };
        match bus {
            Some(address) => cmd
                .args(["--bus", "session"])
                .env("DBUS_SESSION_BUS_ADDRESS", address),
            None => cmd.args(["--bus", "none"]),
        };
        let child = cmd
            .arg("--policy")
            .arg(dir.path().join("policy.toml"))
            .env("CORRAL_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let socket = dir.path().join("run/api.sock");
        let daemon = Daemon {
            child,
            dir,
            socket,
            http_port,
            metrics_port,
        };
        // Served once every app has left `starting`.
        wait_for("corrald's API and apps", Duration::from_secs(120), || {
            let r = daemon.try_request("GET", "/v1/apps", &[]).ok()?;
            let apps = r.json().ok()?;
            let ready = apps.as_array()?.len() == 2
                && apps.as_array()?.iter().all(|a| a["state"] != "starting");
            ready.then_some(())
        });
        daemon
    }

    fn try_request(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Reply> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        Ok(Reply::parse(&raw))
    }

    fn request(&self, method: &str, path: &str) -> Reply {
        self.try_request(method, path, &[])
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn get_json(&self, path: &str) -> Value {
        let r = self.request("GET", path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body_text());
        r.json().unwrap()
    }

    /// Run the real `corral` with `args` and `--socket`, optionally through
    /// setpriv(1) with `setpriv_args`.
    fn corral(&self, setpriv_args: Option<&[&str]>, args: &[&str]) -> Output {
        let mut cmd = match setpriv_args {
            Some(p) => {
                let mut cmd = Command::new("setpriv");
                cmd.args(p).arg(CORRAL);
                cmd
            }
            None => Command::new(CORRAL),
        };
        cmd.args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    fn hello(&self) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn metrics(&self, over_tcp: bool) -> String {
        if over_tcp {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).unwrap();
            let r = Reply::parse(&raw);
            assert_eq!(r.status, 200);
            r.body_text()
        } else {
            let r = self.request("GET", "/metrics");
            assert_eq!(r.status, 200);
            assert!(r.header("content-type").unwrap().starts_with("text/plain"));
            r.body_text()
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn parse(raw: &[u8]) -> Reply {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[end + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Result<Value> {
        serde_json::from_slice(&self.body)
    }

    /// A 4xx with the API's error JSON.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body_text());
        let v = self.json().expect("error bodies are JSON");
        assert_eq!(v["error"], code, "{v}");
        assert!(
            !v["message"].as_str().unwrap_or("").is_empty(),
            "an error says why: {v}"
        );
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
}

// ---- a small checker of the OpenAPI file's JSON Schemas -------------------

fn openapi() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => {
            let target = r
                .strip_prefix("#")
                .and_then(|p| doc.pointer(p))
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
            resolve(doc, target)
        }
        None => v,
    }
}

/// Check `value` against `schema` (the subset the file uses: type (also
/// as a list), required, properties, additionalProperties = false, items,
/// enum, oneOf, minimum, $ref); returns the problems found.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut problems = Vec::new();
    if let Some(options) = schema["oneOf"].as_array() {
        let matching = options
            .iter()
            .filter(|o| check(doc, o, value, at).is_empty())
            .count();
        if matching != 1 {
            problems.push(format!("{at}: matches {matching} of oneOf, not 1: {value}"));
        }
        return problems;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let type_ok = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        other => panic!("schema type {other} unknown to the checker"),
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(t)) {
        problems.push(format!("{at}: {value} is not {types:?}"));
        return problems;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} not in {allowed:?}"));
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), value.as_f64())
        && n < min
    {
        problems.push(format!("{at}: {n} < {min}"));
    }
    if let Some(object) = value.as_object() {
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap();
            if !object.contains_key(key) {
                problems.push(format!("{at}: missing required {key}"));
            }
        }
        let properties = schema["properties"].as_object();
        for (key, v) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(s) => problems.extend(check(doc, s, v, &format!("{at}.{key}"))),
                None if schema["properties"].is_object() => {
                    problems.push(format!("{at}: {key} is not documented"))
                }
                None => {}
            }
        }
        if schema["additionalProperties"] == Value::Bool(false)
            && properties.is_none()
            && !object.is_empty()
        {
            problems.push(format!("{at}: no properties allowed"));
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            problems.extend(check(doc, schema, item, &format!("{at}[{i}]")));
        }
    }
    problems
}

/// Check a reply against the documented responses of `method path`.
fn check_reply(doc: &Value, template: &str, method: &str, reply: &Reply) {
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    let responses = op["responses"].as_object().unwrap();
    let documented = resolve(
        doc,
        responses.get(&reply.status.to_string()).unwrap_or_else(|| {
            panic!(
                "{method} {template}: status {} is not documented",
                reply.status
            )
        }),
    );
    let content = documented["content"].as_object().unwrap();
    let media = reply.header("content-type").unwrap_or("");
    let (kind, spec) = content
        .iter()
        .find(|(k, _)| media.starts_with(k.as_str()))
        .unwrap_or_else(|| panic!("{method} {template}: content type {media} not documented"));
    if kind == "application/json" {
        let value = reply.json().unwrap();
        let problems = check(
            doc,
            &spec["schema"],
            &value,
            &format!("{method} {template}"),
        );
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

// ---- the tests -----------------------------------------------------------

#[test]
fn the_openapi_file_documents_exactly_what_the_server_serves() {
    let doc = openapi();
    let daemon = Daemon::start("root");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (m.to_ascii_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let served: BTreeSet<(String, String)> = corral_supervisor::api::route::ENDPOINTS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "docs/openapi.json vs the router");

    for (method, template) in &served {
        let path = template.replace("{name}", "hello");
        if template == "/v1/events" {
            let mut s = UnixStream::connect(&daemon.socket).unwrap();
            s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: corral\r\n\r\n")
                .unwrap();
            let mut r = BufReader::new(s);
            let mut status = String::new();
            r.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                head.push(line.to_ascii_lowercase());
            }
            assert!(
                head.iter()
                    .any(|h| h.starts_with("content-type: text/event-stream")),
                "{head:?}"
            );
            continue;
        }
        let reply = daemon.request(method, &path);
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.body_text());
        check_reply(&doc, template, method, &reply);
        // The documented error of a missing app, where there is one.
        if template.contains("{name}") {
            let reply = daemon.request(method, &template.replace("{name}", "nope"));
            reply.assert_error(404, "no_such_app");
            check_reply(&doc, template, method, &reply);
        }
        // And the wrong method.
        let other = if method == "GET" { "POST" } else { "GET" };
        let reply = daemon.request(other, &path);
        reply.assert_error(405, "method_not_allowed");
        assert_eq!(reply.header("allow"), Some(method.as_str()));
    }
    // A refused reload is documented data, not an error.
    let policy = daemon.dir.path().join("policy.toml");
    let good = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, format!("{good}\n[apps.bad]\nkind = \"nope\"\n")).unwrap();
    let reply = daemon.request("POST", "/v1/reload");
    assert_eq!(reply.status, 200);
    check_reply(&doc, "/v1/reload", "POST", &reply);
    let report = reply.json().unwrap();
    assert_eq!(report["applied"], false);
    assert!(!report["errors"].as_array().unwrap().is_empty(), "{report}");
    std::fs::write(&policy, good).unwrap();
}

#[test]
fn a_stopped_app_accepts_nothing_until_it_is_started() {
    if !need_root("corrald binds its API socket and enters the sandbox") {
        return;
    }
    let daemon = Daemon::start("root");
    // Workers running, then stop: once the answer comes, no process of
    // the app may accept.
    assert!(daemon.hello().contains("200 OK"));
    let out = daemon.corral(None, &["stop", "hello"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", daemon.http_port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut byte = [0u8; 1];
    let waited = s.read(&mut byte);
    assert!(
        matches!(&waited, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a stopped app answered: {waited:?}"
    );
    // Started again, the connection that waited in the backlog is served.
    let out = daemon.corral(None, &["start", "hello"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
}

#[test]
fn events_arrive_when_an_app_stops_and_starts() {
    let doc = openapi();
    let daemon = Daemon::start("root");
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: corral\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    // Up to the first comment: subscribed from there on.
    let mut line = String::new();
    while !line.starts_with(": corral events") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
    }
    assert_eq!(daemon.request("POST", "/v1/apps/hello/stop").status, 200);
    assert_eq!(daemon.request("POST", "/v1/apps/hello/start").status, 200);
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
        if let Some(data) = line.strip_prefix("data: ") {
            let event: Value = serde_json::from_str(data.trim_end()).unwrap();
            let problems = check(
                &doc,
                &doc["components"]["schemas"]["Event"],
                &event,
                "event",
            );
            assert!(problems.is_empty(), "{problems:#?}");
            if event["app"] == "hello" {
                events.push(event);
            }
            let states: Vec<&str> = events.iter().filter_map(|e| e["state"].as_str()).collect();
            if states.contains(&"stopped")
                && states.last() != Some(&"stopped")
                && states.last() != Some(&"starting")
            {
                break;
            }
        }
    }
    let states: Vec<&str> = events.iter().filter_map(|e| e["state"].as_str()).collect();
    let stopped = states
        .iter()
        .position(|s| *s == "stopped")
        .expect("a stopped event");
    assert!(
        states[stopped + 1..]
            .iter()
            .any(|s| *s == "idle" || *s == "running"),
        "started again after the stop: {states:?}"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[test]
fn reads_are_open_and_mutations_need_root_or_the_api_group() {
    if !need_root("caller checks") {
        return;
    }
    // api-group "daemon" (gid 1 on Debian): a member may mutate.
    let daemon = Daemon::start("daemon");
    let nobody: &[&str] = &["--reuid", "65534", "--regid", "65534", "--clear-groups"];
    let member: &[&str] = &["--reuid", "65534", "--regid", "65534", "--groups", "1"];

    let out = daemon.corral(Some(nobody), &["apps", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let apps: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(apps.as_array().unwrap().len(), 2);
    let out = daemon.corral(Some(nobody), &["status", "hello"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("● hello (http app)"),
        "{out:?}"
    );

    for args in [
        &["stop", "hello"][..],
        &["restart", "hello"],
        &["recompile", "hello"],
        &["reload"],
    ] {
        let out = daemon.corral(Some(nobody), args);
        assert_eq!(out.status.code(), Some(4), "{args:?} as nobody: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("daemon"), "the message names the group: {err}");
    }
    assert_ne!(
        daemon.get_json("/v1/apps/hello")["state"],
        "stopped",
        "nothing changed"
    );

    let out = daemon.corral(Some(member), &["stop", "hello"]);
    assert!(
        out.status.success(),
        "as a member of the api-group: {out:?}"
    );
    assert_eq!(daemon.get_json("/v1/apps/hello")["state"], "stopped");
    let out = daemon.corral(None, &["start", "hello", "--json"]);
    assert!(out.status.success(), "as root: {out:?}");
    let app: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(app["state"], "stopped");
    let out = daemon.corral(None, &["reload"]);
    assert!(out.status.success(), "{out:?}");
    let out = daemon.corral(None, &["start", "nope"]);
    assert_eq!(out.status.code(), Some(3), "no such app: {out:?}");
}

#[test]
fn callers_outside_corralds_pid_namespace_are_served() {
    if !need_root("a pid namespace (unshare)") {
        return;
    }
    // corrald as pid 1 of a new pid namespace (as in a container): the
    // kernel gives its callers' pid as 0, and they were refused.
    let daemon = Daemon::start_wrapped(
        "root",
        None,
        "",
        &[
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
        ],
    );
    assert_eq!(daemon.get_json("/v1/apps").as_array().unwrap().len(), 2);
    let out = daemon.corral(None, &["stop", "hello", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(daemon.get_json("/v1/apps/hello")["state"], "stopped");
    // unshare does not pass SIGTERM on: stop corrald itself, and the
    // namespace (and unshare) end with it.
    for pid in children_of(daemon.child.id()) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
    }
}

#[test]
fn one_user_cannot_take_every_api_connection() {
    if !need_root("holding connections as uid 65534 (setpriv)") {
        return;
    }
    let daemon = Daemon::start("root");
    let as_nobody = ["--reuid", "65534", "--regid", "65534", "--clear-groups"];
    // uid 65534 holds as many event streams as a user may (32); it held
    // all 256 before, and every other caller, root too, waited.
    let mut holder = Command::new("setpriv")
        .args(as_nobody)
        .arg(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "hold_api_connections",
            "--nocapture",
        ])
        .env("CORRAL_TEST_HOLD", &daemon.socket)
        .env("CORRAL_TEST_HOLD_N", "32")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding 32") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the holder ended");
    }
    // One more of that user: a 503 `busy`, exit code 5, saying why.
    let refused = daemon.corral(Some(&as_nobody), &["apps"]);
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("32 API connections"),
        "{refused:?}"
    );
    // Root and other users are served.
    assert!(daemon.corral(None, &["apps"]).status.success());
    let other = ["--reuid", "65533", "--regid", "65533", "--clear-groups"];
    let out = daemon.corral(Some(&other), &["apps"]);
    assert!(out.status.success(), "{out:?}");
    // Once the holder lets go, the user is served again.
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    wait_for("uid 65534 served again", Duration::from_secs(30), || {
        daemon
            .corral(Some(&as_nobody), &["apps"])
            .status
            .success()
            .then_some(())
    });
}

/// Not a test of its own: `one_user_cannot_take_every_api_connection` runs
/// this (as uid 65534) to hold `CORRAL_TEST_HOLD_N` event streams on the
/// socket `CORRAL_TEST_HOLD` until its stdin closes.
#[test]
#[ignore = "a helper process of one_user_cannot_take_every_api_connection"]
fn hold_api_connections() {
    let Some(socket) = std::env::var_os("CORRAL_TEST_HOLD") else {
        return;
    };
    let n: usize = std::env::var("CORRAL_TEST_HOLD_N")
        .unwrap()
        .parse()
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: corral\r\n\r\n")
            .unwrap();
        // Served (not waiting in the backlog) once its first bytes come.
        let mut first = [0u8; 1];
        s.read_exact(&mut first).unwrap();
        held.push(s);
    }
    println!("holding {n}");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

#[test]
fn cli_exit_codes_and_refused_reloads() {
    let daemon = Daemon::start("root");
    let out = Command::new(CORRAL)
        .args(["status", "--socket"])
        .arg(daemon.dir.path().join("no.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "unreachable: {out:?}");
    // Without --socket: the policy's daemon.api-socket, even from a policy
    // that does not validate (here: for a missing module; for a user, one
    // they may not read)...
    let client_policy = daemon.dir.path().join("client.toml");
    std::fs::write(
        &client_policy,
        "[daemon]\napi-socket = \"run/api.sock\"\n\n[apps.x]\nmodule = \"missing.wasm\"\n",
    )
    .unwrap();
    let out = Command::new(CORRAL)
        .args(["apps", "--json", "--policy"])
        .arg(&client_policy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // ...and a policy that cannot be read is named with the default socket.
    let out = Command::new(CORRAL)
        .args(["apps", "--policy"])
        .arg(daemon.dir.path())
        // (A default that no corrald on this machine can be serving.)
        .env("RUNTIME_DIRECTORY", daemon.dir.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not be read") && err.contains(&daemon.dir.path().display().to_string()),
        "{err}"
    );
    let out = daemon.corral(None, &["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("● corrald") && text.contains("hello  http"),
        "{text}"
    );

    let policy = daemon.dir.path().join("policy.toml");
    let good = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, format!("{good}\n[apps.bad]\nkind = \"nope\"\n")).unwrap();
    let out = daemon.corral(None, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "refused: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.toml:") && err.contains("apps.bad"),
        "{err}"
    );
    assert!(err.contains("reload refused"), "{err}");
    std::fs::write(&policy, good).unwrap();
}

#[test]
fn metrics_count_the_workers_requests() {
    let daemon = Daemon::start("root");
    let value = |text: &str, line_start: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let before = daemon.metrics(false);
    let requests = value(&before, "corral_app_requests_total{app=\"hello\"}");
    for _ in 0..5 {
        assert!(daemon.hello().contains("200 OK"));
    }
    let after = daemon.metrics(true);
    assert_eq!(
        value(&after, "corral_app_requests_total{app=\"hello\"}"),
        requests + 5
    );
    assert_eq!(
        value(
            &after,
            "corral_app_request_duration_seconds_count{app=\"hello\"}"
        ),
        requests + 5
    );
    assert_eq!(
        value(
            &after,
            "corral_app_request_duration_seconds_bucket{app=\"hello\",le=\"+Inf\"}"
        ),
        requests + 5
    );
    assert!(value(&after, "corral_app_cold_starts_total{app=\"hello\"}") >= 1);
    assert_eq!(
        value(&after, "corral_app_cache_hits_total{app=\"hello\"}")
            + value(&after, "corral_app_cache_misses_total{app=\"hello\"}"),
        1
    );
    assert_eq!(daemon.get_json("/v1/apps/hello")["requests"], requests + 5);
    // Every metric has its HELP and TYPE, and docs/api.md lists it.
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md"))
            .unwrap();
    for line in after.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(
            docs.contains(&format!("`{name}`")),
            "docs/api.md lacks {name}"
        );
    }
    // The counters survive the app's restart (corrald owns the page).
    assert_eq!(daemon.request("POST", "/v1/apps/hello/restart").status, 200);
    assert!(daemon.hello().contains("200 OK"));
    assert_eq!(
        value(
            &daemon.metrics(false),
            "corral_app_requests_total{app=\"hello\"}"
        ),
        requests + 6
    );
    // The TCP listener serves /metrics only.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", daemon.metrics_port)).unwrap();
    s.write_all(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    Reply::parse(&raw).assert_error(404, "not_found");
}

#[test]
fn malformed_requests_get_4xx_and_the_daemon_serves_on() {
    let daemon = Daemon::start("root");
    daemon
        .try_request("POST", "/v1/reload", b"{not json")
        .unwrap()
        .assert_error(400, "bad_request");
    daemon
        .try_request("POST", "/v1/apps/hello/stop", b"{\"force\": true}")
        .unwrap()
        .assert_error(400, "bad_request");
    daemon
        .request("GET", "/v1/apps/nope")
        .assert_error(404, "no_such_app");
    daemon
        .request("GET", "/v1/apps/..%2f..")
        .assert_error(404, "no_such_app");
    daemon
        .request("GET", "/v2/everything")
        .assert_error(404, "not_found");
    daemon
        .request("DELETE", "/v1/apps")
        .assert_error(405, "method_not_allowed");

    // 1 MB body: refused from its Content-Length, the rest unread.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"POST /v1/reload HTTP/1.1\r\nHost: corral\r\nContent-Length: 1048576\r\n\r\n")
        .unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'{'; 64 * 1024];
            for _ in 0..16 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    Reply::parse(&raw).assert_error(413, "payload_too_large");
    let _ = s.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    // Chunked, no length: cut off at the limit.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"POST /v1/reload HTTP/1.1\r\nHost: corral\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 32 * 1024, " ".repeat(32 * 1024));
    for _ in 0..3 {
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    Reply::parse(&raw).assert_error(413, "payload_too_large");
    // A huge head.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "GET /v1/apps HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = s.write_all(head.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(
        raw.is_empty() || String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&raw[..raw.len().min(200)])
    );

    // Slow clients: a head that never ends, and a connection that says
    // nothing, are closed after the header timeout (5 s; the bound here
    // only says "not forever").
    let started = Instant::now();
    let mut slow = UnixStream::connect(&daemon.socket).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    slow.write_all(b"GET /v1/apps HTTP/1.1\r\nHost: cor")
        .unwrap();
    let mut silent = UnixStream::connect(&daemon.socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // Meanwhile others are served.
    assert_eq!(daemon.request("GET", "/v1/info").status, 200);
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let _ = silent.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "slow clients are cut off (took {:?})",
        started.elapsed()
    );
    // A body that is declared and never sent: a 408, then the connection
    // is closed (it held its slot and corrald's idle exit for ever).
    let started = Instant::now();
    let mut late = UnixStream::connect(&daemon.socket).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    late.write_all(b"POST /v1/reload HTTP/1.1\r\nHost: corral\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let mut raw = Vec::new();
    late.read_to_end(&mut raw)
        .expect("closed by corrald, not by the read timeout");
    let reply = Reply::parse(&raw);
    reply.assert_error(408, "request_timeout");
    check_reply(&openapi(), "/v1/reload", "POST", &reply);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a late body is cut off (took {:?})",
        started.elapsed()
    );

    // The daemon is unaffected.
    let apps = daemon.get_json("/v1/apps");
    assert_eq!(apps.as_array().unwrap().len(), 2);
    assert!(daemon.hello().contains("Hello"));
}

/// A private session bus (dbus-daemon), killed on drop.
struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start() -> Option<Bus> {
        let spawned = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "dbus-daemon: {e} (CI=true)"
                );
                eprintln!("SKIP corral --bus: no dbus-daemon ({e})");
                return None;
            }
        };
        let mut address = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        Some(Bus {
            child,
            address: address.trim().to_string(),
        })
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn corral_over_dbus_prints_what_the_socket_gives() {
    let Some(bus) = Bus::start() else { return };
    let daemon = Daemon::start_with_bus("root", Some(&bus.address));
    let corral = |args: &[&str]| -> Output {
        Command::new(CORRAL)
            .args(args)
            .args(["--bus", "session"])
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .output()
            .unwrap()
    };
    let json = |out: &Output| -> Value {
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // corrald owns its name on the bus shortly after it serves.
    wait_for(
        "org.corral.Manager1 on the bus",
        Duration::from_secs(30),
        || corral(&["apps", "--json"]).status.success().then_some(()),
    );
    assert_eq!(
        json(&corral(&["apps", "--json"])),
        daemon.get_json("/v1/apps")
    );
    assert_eq!(
        json(&corral(&["status", "echo", "--json"])),
        daemon.get_json("/v1/apps/echo")
    );
    let mut over_bus = json(&corral(&["status", "--json"]))["daemon"].clone();
    let mut over_socket = daemon.get_json("/v1/info");
    for info in [&mut over_bus, &mut over_socket] {
        info.as_object_mut().unwrap().remove("uptime_seconds");
        // Read at each request, and it moves with the zygotes' forks and
        // exits (shared pages); it is there and positive on both sides.
        let pss = info["template"]
            .as_object_mut()
            .unwrap()
            .remove("pss_bytes");
        assert!(
            pss.and_then(|p| p.as_u64()).is_some_and(|p| p > 0),
            "{info}"
        );
    }
    assert_eq!(over_bus, over_socket);
    assert_eq!(corral(&["status", "nope"]).status.code(), Some(3));

    let stopped = json(&corral(&["stop", "hello", "--json"]));
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped, daemon.get_json("/v1/apps/hello"));
    json(&corral(&["start", "hello", "--json"]));

    // Events over the bus: start and stop the app until the follower
    // (subscribed at some point after it starts) has seen one.
    let mut events = Command::new(CORRAL)
        .args(["events", "--json", "--count", "1", "--bus", "session"])
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("an event over D-Bus", Duration::from_secs(60), || {
        json(&corral(&["stop", "hello", "--json"]));
        json(&corral(&["start", "hello", "--json"]));
        events.try_wait().unwrap().map(|_| ())
    });
    let out = events.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let event: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(event["app"], "hello", "{event}");
    let problems = check(
        &openapi(),
        &openapi()["components"]["schemas"]["Event"],
        &event,
        "event",
    );
    assert!(problems.is_empty(), "{problems:#?}");
    let report = json(&corral(&["reload", "--json"]));
    assert_eq!(report["applied"], true, "{report}");
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so from the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[test]
fn a_seccomp_kill_counts_as_a_sandbox_kill_and_an_error() {
    let daemon = Daemon::start("root");
    // echo keeps one worker (min = 1): corrald -> zygote -> worker.
    let worker = wait_for("echo's worker", Duration::from_secs(30), || {
        let echo = daemon.get_json("/v1/apps/echo");
        let zygote = echo["zygote_pid"].as_u64()? as u32;
        children_of(zygote).first().copied()
    });
    let value = |text: &str, start: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(start))
            .unwrap_or_else(|| panic!("no {start} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let before = daemon.metrics(false);
    assert_eq!(
        value(&before, "corral_app_sandbox_kills_total{app=\"echo\"}"),
        0
    );
    let errors = value(&before, "corral_app_errors_total{app=\"echo\"}");
    // SIGSYS is how the filter kills (by hand, without an audit record).
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(worker as i32).unwrap(),
        rustix::process::Signal::SYS,
    )
    .unwrap();
    wait_for("the kill in /metrics", Duration::from_secs(30), || {
        let text = daemon.metrics(true);
        (value(&text, "corral_app_sandbox_kills_total{app=\"echo\"}") == 1).then_some(())
    });
    let after = daemon.metrics(false);
    assert_eq!(
        value(&after, "corral_app_errors_total{app=\"echo\"}"),
        errors + 1
    );
    let echo = daemon.get_json("/v1/apps/echo");
    assert!(
        echo["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("seccomp"),
        "{echo}"
    );
}

#[test]
fn an_open_api_connection_keeps_corrald_from_its_idle_exit() {
    // Both apps at min = 0, idle-exit after 1 s.
    let mut daemon = Daemon::start_full("root", None, "idle-exit = \"1s\"");
    let mut follower = UnixStream::connect(&daemon.socket).unwrap();
    follower
        .write_all(b"GET /v1/events HTTP/1.1\r\nHost: corral\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "corrald stays while a client follows the events"
    );
    drop(follower);
    let status = wait_for("corrald's idle exit", Duration::from_secs(30), || {
        daemon.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_api_socket_can_come_from_systemd() {
    let Some(launcher) = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .find_map(|d| {
            let p = Path::new(d).join("systemd-socket-activate");
            p.is_file().then_some(p)
        })
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs systemd-socket-activate (package systemd)"
        );
        eprintln!("SKIP: no systemd-socket-activate on this machine");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let policy = format!(
        "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"run/api.sock\"\n\n\
         [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n\
         [apps.hello]\nmodule = \"{}/http-hello.wasm\"\nkind = \"http\"\nlisten = [\"127.0.0.1:{http_port}\"]\n",
        guests().display()
    );
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    // The unit's socket is elsewhere than the policy says and named `api`
    // (FileDescriptorName=api): corrald takes it and binds nothing itself.
    let activated = dir.path().join("activated.sock");
    let mut child = Command::new(launcher)
        .arg(format!("--listen={}", activated.display()))
        .arg("--fdname=api")
        .args([
            "-E",
            "CORRAL_LOG=info",
            CORRALD,
            "--bus",
            "none",
            "--policy",
        ])
        .arg(dir.path().join("policy.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Kill(&mut child);
    wait_for("the activation socket", Duration::from_secs(10), || {
        activated.exists().then_some(())
    });
    // The first connection starts corrald; it waits in the backlog.
    let mut s = UnixStream::connect(&activated).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /v1/apps HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let reply = Reply::parse(&raw);
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert_eq!(reply.json().unwrap()[0]["name"], "hello");
    assert!(
        !dir.path().join("run/api.sock").exists(),
        "corrald bound daemon.api-socket although systemd passed the API socket"
    );
    drop(guard);
}
