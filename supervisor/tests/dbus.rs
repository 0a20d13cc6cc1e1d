//! The D-Bus front end end to end: a private `dbus-daemon` with a
//! system-bus-like configuration (deny by default, like Debian's
//! system.conf) that includes our `units/dbus/org.corral.Manager1.conf`,
//! the real corrald on it (`DBUS_SYSTEM_BUS_ADDRESS`, the default
//! `--bus system`), and the clients a user has: `busctl`, `dbus-send`,
//! as root and as uid 65534 through `setpriv`. The Unix-socket API of the
//! same corrald is the reference every D-Bus answer is compared with.
//!
//! Needs root (to switch to uid 65534, and to own the name by our policy)
//! and the Debian packages dbus-daemon, dbus-bin and systemd (busctl),
//! which tests/run-tests installs: skipped visibly otherwise, a failure
//! under CI=true.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use corral_testkit::{Log, Notes, free_port, guest, wait_for, which};

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");
const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
const NAME: &str = "org.corral.Manager1";
const MANAGER: &str = "/org/corral/Manager1";
const NOBODY: &str = "65534";

fn our_bus_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../units/dbus/org.corral.Manager1.conf")
}

/// Whether this test can run here; says why not (and fails under CI).
fn can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for tool in ["dbus-daemon", "dbus-send", "busctl", "setpriv"] {
        if which(tool).is_none() {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI needs {missing:?} (run tests/run-tests as root)"
    );
    eprintln!("SKIPPED {test}: needs {}", missing.join(", "));
    false
}

/// How much of our policy file the bus enforces.
#[derive(Clone, Copy, PartialEq)]
enum BusPolicy {
    /// Our file as shipped, on a deny-by-default system bus.
    Ours,
    /// Our file, then a mandatory rule that lets anyone call anything on
    /// org.corral.Manager1: only corrald's own check is left.
    OursOverridden,
    /// Without our file: nobody may own org.corral.Manager1.
    NotOurs,
}

/// A private system-like bus in a temporary directory.
struct Bus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    fn start(policy: BusPolicy) -> Bus {
        let dir = tempfile::tempdir().unwrap();
        // uid 65534 must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("system_bus_socket");
        let ours = format!(
            "<include>{}</include>",
            our_bus_policy().canonicalize().unwrap().display()
        );
        let (ours, overridden) = match policy {
            BusPolicy::Ours => (ours.as_str(), ""),
            BusPolicy::OursOverridden => (
                ours.as_str(),
                "<policy context=\"mandatory\">\n\
                 <allow send_destination=\"org.corral.Manager1\"/>\n\
                 </policy>",
            ),
            BusPolicy::NotOurs => ("", ""),
        };
        // The default context of Debian's /usr/share/dbus-1/system.conf.
        let config = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  {ours}
  {overridden}
</busconfig>
"#,
            socket = socket.display(),
        );
        let config_path = dir.path().join("system.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config_path.display()))
            .args(["--nofork", "--nopidfile", "--nosyslog"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dbus-daemon");
        wait_for("the bus socket", Duration::from_secs(10), || {
            socket.exists().then_some(())
        });
        Bus {
            child,
            address: format!("unix:path={}", socket.display()),
            _dir: dir,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// corrald with two apps: `echo` (stdio, one worker kept) and `hello-web`
/// (http, at zero until a connection).
struct Corrald {
    child: Option<Child>,
    dir: tempfile::TempDir,
    notes: Notes,
    stderr: Log,
}

fn app_toml(name: &str, kind: &str, module: &str, min: u32) -> String {
    format!(
        "[apps.{name}]\nmodule = \"{}\"\nkind = \"{kind}\"\nlisten = [\"127.0.0.1:{}\"]\n\
         pool = {{ min = {min}, max = 2 }}\n\n",
        guest(module).display(),
        free_port()
    )
}

impl Corrald {
    /// corrald on `bus`, once it owns the name.
    fn start(bus: &Bus, api_group: &str) -> Corrald {
        let corrald = Corrald::spawn(&bus.address, api_group);
        wait_for(
            "corrald to own the bus name",
            Duration::from_secs(5),
            || {
                corrald
                    .log()
                    .contains("D-Bus: serving org.corral.Manager1")
                    .then_some(())
            },
        );
        corrald
    }

    /// corrald with the system bus at `bus_address`, once it is ready.
    fn spawn(bus_address: &str, api_group: &str) -> Corrald {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let policy = format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
             api-group = \"{api_group}\"\ndrain-timeout = \"5s\"\n\n\
             [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n{}{}",
            app_toml("echo", "stdio", "stdio-echo.wasm", 1),
            app_toml("hello-web", "http", "http-hello.wasm", 0),
        );
        std::fs::write(root.join("policy.toml"), policy).unwrap();
        let notify_path = root.join("notify.sock");
        let notes = Notes::bind(&notify_path);
        let mut child = Command::new(CORRALD)
            .arg("--policy")
            .arg(root.join("policy.toml"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("CORRAL_LOG", "info")
            .env_remove("CORRAL_BUS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Log::collect(child.stderr.take().unwrap());
        let corrald = Corrald {
            child: Some(child),
            dir,
            notes,
            stderr,
        };
        wait_for("READY=1 from corrald", Duration::from_secs(60), || {
            corrald
                .notes
                .lines()
                .iter()
                .any(|n| n == "READY=1")
                .then_some(())
        });
        corrald
    }

    fn log(&self) -> String {
        self.stderr.text()
    }

    fn api_socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }
}

impl Drop for Corrald {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM: corrald drains and stops its zygotes itself.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!("corrald's stderr:\n{}", self.log());
        }
    }
}

/// Run a D-Bus client program, as root or as uid 65534 with no groups
/// but `groups`.
fn client(as_nobody: Option<&str>, program: &str, args: &[String]) -> Output {
    let mut cmd = match as_nobody {
        None => Command::new(program),
        Some(groups) => {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid", NOBODY, "--regid", NOBODY]);
            match groups {
                "" => cmd.arg("--clear-groups"),
                groups => cmd.args(["--groups", groups]),
            };
            cmd.arg(program);
            cmd
        }
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// `busctl call` (or another busctl verb) with JSON output; `Err` is its
/// error text.
fn busctl(bus: &Bus, as_nobody: Option<&str>, args: &[&str]) -> Result<Value, String> {
    let mut all = vec![
        format!("--address={}", bus.address),
        "--json=short".to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = client(as_nobody, "busctl", &all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "busctl printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A method of org.corral.Manager1 through busctl.
fn call(bus: &Bus, as_nobody: Option<&str>, method: &str, args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["call", NAME, MANAGER, NAME, method];
    all.extend(args);
    busctl(bus, as_nobody, &all)
}

/// A method through dbus-send, whose error output names the D-Bus error
/// and carries its message: `Err((name, message))`.
fn dbus_send(
    bus: &Bus,
    as_nobody: Option<&str>,
    method: &str,
    args: &[&str],
) -> Result<String, (String, String)> {
    let mut all = vec![
        format!("--bus={}", bus.address),
        "--print-reply".to_string(),
        format!("--dest={NAME}"),
        MANAGER.to_string(),
        format!("{NAME}.{method}"),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = client(as_nobody, "dbus-send", &all);
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let rest = err.trim().strip_prefix("Error ").unwrap_or(&err);
    let (name, message) = rest.split_once(": ").unwrap_or((rest, ""));
    Err((name.to_string(), message.to_string()))
}

/// One HTTP/1.1 exchange on the API socket: (status, JSON body).
fn http(socket: &Path, method: &str, path: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body:?}"));
    (status, value)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

// The mapping of docs/dbus.md, written out again here so that the test
// checks it rather than trusting the daemon's code.

/// `StateSince` -> `state_since`.
fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The `data` of each `{"type", "data"}` of a busctl `a{sv}`, keys in
/// snake_case.
fn dict(value: &Value) -> Map<String, Value> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an a{{sv}}: {value}"))
        .iter()
        .map(|(k, v)| (snake(k), v["data"].clone()))
        .collect()
}

/// An app's a{sv} as the socket API's JSON: "" and 0 stand for null.
fn app_json(value: &Value) -> Value {
    let mut app = dict(value);
    for key in ["last_error", "digest", "artifact"] {
        if app[key] == json!("") {
            app.insert(key.into(), Value::Null);
        }
    }
    if app["zygote_pid"] == json!(0) {
        app.insert("zygote_pid".into(), Value::Null);
    }
    // An empty Tls dict is no `tls`.
    match app["tls"].as_object() {
        Some(t) if t.is_empty() => {
            app.insert("tls".into(), Value::Null);
        }
        Some(_) => {
            let t = dict(&app["tls"]);
            app.insert("tls".into(), Value::Object(t));
        }
        None => {}
    }
    // An empty Cgroup dict is no cgroup (the keys of a present one are
    // CamelCase words of the JSON's fields).
    match app["cgroup"].as_object() {
        Some(cg) if cg.is_empty() => {
            app.insert("cgroup".into(), Value::Null);
        }
        Some(_) => {
            let mut cg = dict(&app["cgroup"]);
            if cg["memory_peak_bytes"] == json!(0) {
                cg.insert("memory_peak_bytes".into(), Value::Null);
            }
            let limits: Vec<Value> = cg["limits"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| json!([k, v])).collect())
                .unwrap_or_default();
            cg.insert("limits".into(), Value::Array(limits));
            app.insert("cgroup".into(), Value::Object(cg));
        }
        None => {}
    }
    Value::Object(app)
}

/// The manager's properties as `GET /v1/info`.
fn info_json(value: &Value) -> Value {
    let mut info = dict(value);
    let cache = json!({
        "dir": info.remove("cache_dir").unwrap(),
        "entries": info.remove("cache_entries").unwrap(),
        "bytes": info.remove("cache_bytes").unwrap(),
    });
    info.insert("cache".into(), cache);
    // The template's five properties are `template` (0 and "" are null).
    let null_if_none = |v: Value| if v == 0 || v == "" { Value::Null } else { v };
    let template = json!({
        "state": info.remove("template_state").unwrap(),
        "pid": null_if_none(info.remove("template_pid").unwrap()),
        "restarts": info.remove("template_restarts").unwrap(),
        "last_error": null_if_none(info.remove("template_last_error").unwrap()),
        "pss_bytes": null_if_none(info.remove("template_pss_bytes").unwrap()),
    });
    info.insert("template".into(), template);
    Value::Object(info)
}

/// An `AppStateChanged` payload as a `GET /v1/events` event.
fn event_json(data: &Value) -> Value {
    let d = data.as_array().unwrap();
    let null_if_empty = |v: &Value| match v.as_str() {
        Some("") => Value::Null,
        _ => v.clone(),
    };
    json!({
        "seq": d[0], "time": d[1], "app": d[2], "old": null_if_empty(&d[3]),
        "state": d[4], "workers": d[5], "detail": null_if_empty(&d[6]),
    })
}

/// `Reload`'s out arguments as `POST /v1/reload`'s report.
fn reload_json(data: &Value) -> Value {
    let d = data.as_array().unwrap();
    let errors: Vec<Value> = d[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            json!({"file": p[0], "line": p[1], "column": p[2], "key": p[3],
                   "message": p[4], "text": p[5]})
        })
        .collect();
    let refused: Vec<Value> = d[6]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| json!({"app": r[0], "reason": r[1]}))
        .collect();
    json!({"applied": d[0], "errors": errors, "added": d[2], "removed": d[3],
           "changed": d[4], "unchanged": d[5], "refused": refused})
}

/// systemd's bus_label_escape, written out again.
fn app_path(name: &str) -> String {
    let mut label = String::new();
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()) {
            label.push(char::from(b));
        } else {
            label.push_str(&format!("_{b:02x}"));
        }
    }
    format!("{MANAGER}/app/{label}")
}

fn get_all(bus: &Bus, as_nobody: Option<&str>, path: &str, interface: &str) -> Value {
    busctl(
        bus,
        as_nobody,
        &[
            "call",
            NAME,
            path,
            "org.freedesktop.DBus.Properties",
            "GetAll",
            "s",
            interface,
        ],
    )
    .unwrap()["data"][0]
        .clone()
}

/// Wait until both apps are where they rest (echo running with its one
/// worker, hello-web idle), so that two reads in a row see the same.
fn settle(corrald: &Corrald) {
    wait_for("the apps to settle", Duration::from_secs(30), || {
        let (_, apps) = http(&corrald.api_socket(), "GET", "/v1/apps");
        let states: Vec<(String, String, u64)> = apps
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap().to_string(),
                    a["state"].as_str().unwrap().to_string(),
                    a["workers"].as_u64().unwrap(),
                )
            })
            .collect();
        (states
            == [
                ("echo".to_string(), "running".to_string(), 1),
                ("hello-web".to_string(), "idle".to_string(), 0),
            ])
        .then_some(())
    });
}

#[test]
fn every_method_answers_as_the_socket_api_does() {
    if !can_run("every_method_answers_as_the_socket_api_does") {
        return;
    }
    let bus = Bus::start(BusPolicy::Ours);
    let corrald = Corrald::start(&bus, "corral");
    let sock = corrald.api_socket();
    settle(&corrald);

    // ListApps: the summary of GET /v1/apps, and each object's properties
    // are the whole entry.
    let (_, apps) = http(&sock, "GET", "/v1/apps");
    let rows = call(&bus, None, "ListApps", &[]).unwrap();
    assert_eq!(rows["type"], "a(sssuutto)");
    let rows = rows["data"][0].as_array().unwrap().clone();
    let apps = apps.as_array().unwrap();
    assert_eq!(rows.len(), apps.len());
    for (row, app) in rows.iter().zip(apps) {
        for (i, key) in [
            "name", "kind", "state", "workers", "busy", "requests", "errors",
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(row[i], app[*key], "ListApps {key} of {}", app["name"]);
        }
        let name = app["name"].as_str().unwrap();
        assert_eq!(row[7], json!(app_path(name)));
        let props = get_all(&bus, None, &app_path(name), "org.corral.App1");
        assert_eq!(&app_json(&props), app, "GetAll of {name}'s object");
        // GetApp is the same dict.
        let got = call(&bus, None, "GetApp", &["s", name]).unwrap();
        assert_eq!(got["type"], "a{sv}");
        assert_eq!(&app_json(&got["data"][0]), app, "GetApp {name}");
        let (status, one) = http(&sock, "GET", &format!("/v1/apps/{name}"));
        assert_eq!((status, &one), (200, app));
    }
    assert_eq!(
        rows[1][7], "/org/corral/Manager1/app/hello_2dweb",
        "escaped like systemd"
    );
    // GetManagedObjects: every app object with the same properties.
    let managed = busctl(
        &bus,
        None,
        &[
            "call",
            NAME,
            MANAGER,
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
        ],
    )
    .unwrap();
    // (zbus lists the inner node /org/corral/Manager1/app too, with no
    // interface.)
    let managed: Map<String, Value> = managed["data"][0]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, interfaces)| interfaces != &&json!({}))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(managed.len(), apps.len(), "{managed:?}");
    for app in apps {
        let path = app_path(app["name"].as_str().unwrap());
        assert_eq!(&app_json(&managed[&path]["org.corral.App1"]), app, "{path}");
    }

    // The daemon's properties are GET /v1/info.
    let (_, mut info) = http(&sock, "GET", "/v1/info");
    let mut props = info_json(&get_all(&bus, None, MANAGER, NAME));
    // Read at each call, and moving with the zygotes' forks and exits.
    for i in [&mut info, &mut props] {
        let pss = i["template"].as_object_mut().unwrap().remove("pss_bytes");
        assert!(pss.and_then(|p| p.as_u64()).is_some_and(|p| p > 0), "{i}");
    }
    let uptimes = [
        info.as_object_mut()
            .unwrap()
            .remove("uptime_seconds")
            .unwrap(),
        props
            .as_object_mut()
            .unwrap()
            .remove("uptime_seconds")
            .unwrap(),
    ];
    assert_eq!(props, info);
    let [a, b] = uptimes.map(|u| u.as_f64().unwrap());
    assert!(a > 0.0 && (a - b).abs() < 30.0, "uptimes {a} and {b}");

    // Errors: the same message, NoSuchApp for a 404.
    let (status, body) = http(&sock, "GET", "/v1/apps/nope");
    assert_eq!((status, body["error"].as_str()), (404, Some("no_such_app")));
    let (name, message) = dbus_send(&bus, None, "GetApp", &["string:nope"]).unwrap_err();
    assert_eq!(name, "org.corral.Manager1.Error.NoSuchApp");
    assert_eq!(message, body["message"].as_str().unwrap());
    let (name, message) = dbus_send(&bus, None, "StopApp", &["string:nope"]).unwrap_err();
    assert_eq!(name, "org.corral.Manager1.Error.NoSuchApp");
    assert_eq!(message, body["message"].as_str().unwrap());

    // StopApp, then the socket's stop (a no-op now): the same app.
    let stopped = call(&bus, None, "StopApp", &["s", "echo"]).unwrap();
    let stopped = app_json(&stopped["data"][0]);
    assert_eq!(stopped["state"], "stopped");
    let (status, again) = http(&sock, "POST", "/v1/apps/echo/stop");
    assert_eq!((status, &again), (200, &stopped));
    // The socket starts it; once it runs, StartApp (a no-op) agrees with GET.
    let (status, _) = http(&sock, "POST", "/v1/apps/echo/start");
    assert_eq!(status, 200);
    settle(&corrald);
    let started = call(&bus, None, "StartApp", &["s", "echo"]).unwrap();
    let (_, now) = http(&sock, "GET", "/v1/apps/echo");
    assert_eq!(app_json(&started["data"][0]), now);

    // RestartApp and Recompile answer with the app, like the socket does.
    for (method, action, app) in [
        ("RestartApp", "restart", "echo"),
        ("Recompile", "recompile", "hello-web"),
    ] {
        let over_dbus = app_json(&call(&bus, None, method, &["s", app]).unwrap()["data"][0]);
        let (status, over_socket) = http(&sock, "POST", &format!("/v1/apps/{app}/{action}"));
        assert_eq!(status, 200, "{action}: {over_socket}");
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&over_dbus), keys(&over_socket), "{method}");
        assert_eq!(over_dbus["name"], app);
        settle(&corrald);
    }

    // Reload: the same report over both.
    let over_dbus = call(&bus, None, "Reload", &[]).unwrap();
    assert_eq!(
        over_dbus["type"], "ba(suusss)asasasasa(ss)",
        "separate out args"
    );
    let (status, over_socket) = http(&sock, "POST", "/v1/reload");
    assert_eq!(status, 200);
    assert_eq!(reload_json(&over_dbus["data"]), over_socket);
    assert_eq!(over_socket["applied"], true);
    assert_eq!(over_socket["unchanged"], json!(["echo", "hello-web"]));

    // A broken policy: not applied, the same errors as data.
    let path = corrald.policy_path();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("drain-timeout", "drain-timeuot")).unwrap();
    let over_dbus = call(&bus, None, "Reload", &[]).unwrap();
    let (_, over_socket) = http(&sock, "POST", "/v1/reload");
    std::fs::write(&path, &good).unwrap();
    assert_eq!(reload_json(&over_dbus["data"]), over_socket);
    assert_eq!(over_socket["applied"], false);
    assert!(
        over_socket["errors"][0]["text"]
            .as_str()
            .unwrap()
            .contains("drain-timeuot"),
        "{over_socket}"
    );
}

#[test]
fn nobody_reads_but_the_bus_policy_refuses_its_mutations() {
    if !can_run("nobody_reads_but_the_bus_policy_refuses_its_mutations") {
        return;
    }
    let bus = Bus::start(BusPolicy::Ours);
    let corrald = Corrald::start(&bus, "corral");
    settle(&corrald);
    let nobody = Some("");

    // Reads: the same answers as root's.
    for (method, args) in [("ListApps", vec![]), ("GetApp", vec!["s", "echo"])] {
        let as_nobody = call(&bus, nobody, method, &args).unwrap();
        let as_root = call(&bus, None, method, &args).unwrap();
        assert_eq!(as_nobody, as_root, "{method}");
    }
    let version = busctl(
        &bus,
        nobody,
        &["get-property", NAME, MANAGER, NAME, "Version"],
    )
    .unwrap();
    assert_eq!(version["data"], env!("CARGO_PKG_VERSION"));
    get_all(&bus, nobody, &app_path("echo"), "org.corral.App1");
    busctl(
        &bus,
        nobody,
        &[
            "call",
            NAME,
            MANAGER,
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
        ],
    )
    .unwrap();
    let introspect = client(
        nobody,
        "busctl",
        &[
            format!("--address={}", bus.address),
            "introspect".into(),
            "--no-pager".into(),
            NAME.into(),
            MANAGER.into(),
        ],
    );
    assert!(introspect.status.success(), "{introspect:?}");
    assert!(String::from_utf8_lossy(&introspect.stdout).contains(".ListApps"));

    // Mutations: the bus refuses them before corrald sees them.
    for (method, args) in [
        ("StopApp", vec!["string:echo"]),
        ("StartApp", vec!["string:echo"]),
        ("RestartApp", vec!["string:echo"]),
        ("Recompile", vec!["string:echo"]),
        ("Reload", vec![]),
    ] {
        let (name, message) = dbus_send(&bus, nobody, method, &args).unwrap_err();
        assert_eq!(name, "org.freedesktop.DBus.Error.AccessDenied", "{method}");
        assert!(
            message.starts_with("Rejected send message") && message.contains(method),
            "{method}: not the bus's refusal: {message}"
        );
    }
    // Setting a property is refused too (there are none to set anyway).
    assert!(
        busctl(
            &bus,
            nobody,
            &["set-property", NAME, MANAGER, NAME, "Version", "s", "9"]
        )
        .is_err()
    );
    assert!(
        !corrald.log().contains("access denied"),
        "the bus, not corrald, refused:\n{}",
        corrald.log()
    );
    let (_, echo) = http(&corrald.api_socket(), "GET", "/v1/apps/echo");
    assert_eq!(echo["state"], "running", "nothing was stopped");
}

#[test]
fn corrald_checks_the_caller_itself_when_the_bus_lets_everything_through() {
    if !can_run("corrald_checks_the_caller_itself_when_the_bus_lets_everything_through") {
        return;
    }
    let bus = Bus::start(BusPolicy::OursOverridden);
    // "daemon" (gid 1) exists on every Debian system.
    let corrald = Corrald::start(&bus, "daemon");
    settle(&corrald);

    // Not in the group: corrald refuses, with its own message and a log line.
    for (method, args, action) in [
        ("StopApp", vec!["string:echo"], "stop echo"),
        ("StartApp", vec!["string:echo"], "start echo"),
        ("RestartApp", vec!["string:echo"], "restart echo"),
        ("Recompile", vec!["string:hello-web"], "recompile hello-web"),
        ("Reload", vec![], "reload"),
    ] {
        let (name, message) = dbus_send(&bus, Some(""), method, &args).unwrap_err();
        assert_eq!(name, "org.freedesktop.DBus.Error.AccessDenied", "{method}");
        assert!(
            message.contains(&format!(
                "{action} is allowed to root and members of the group \"daemon\" only"
            )) && message.contains("uid 65534"),
            "{method}: {message}"
        );
    }
    wait_for("corrald's log line", Duration::from_secs(5), || {
        let log = corrald.log();
        (log.matches("access denied").count() >= 5 && log.contains("via=\"dbus\"")).then_some(())
    });
    let (_, echo) = http(&corrald.api_socket(), "GET", "/v1/apps/echo");
    assert_eq!(echo["state"], "running", "nothing was stopped");

    // A member of the group (supplementary) may.
    let stopped = call(&bus, Some("1"), "StopApp", &["s", "echo"]).unwrap();
    assert_eq!(app_json(&stopped["data"][0])["state"], "stopped");
    call(&bus, Some("1"), "StartApp", &["s", "echo"]).unwrap();
    settle(&corrald);
}

/// `busctl monitor` of the bus's signals, collected as JSON messages.
struct Monitor {
    child: Child,
    messages: Arc<Mutex<Vec<Value>>>,
}

impl Monitor {
    /// Watch the signals on `bus`; returns once the monitor sees them (a
    /// probe signal of the test's own came through).
    fn start(bus: &Bus) -> Monitor {
        let mut child = Command::new("busctl")
            .arg(format!("--address={}", bus.address))
            .args(["monitor", "--json=short", "--match=type='signal'"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        {
            let messages = messages.clone();
            let out = BufReader::new(child.stdout.take().unwrap());
            std::thread::spawn(move || {
                for line in out.lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        messages.lock().unwrap().push(v);
                    }
                }
            });
        }
        let monitor = Monitor { child, messages };
        wait_for("busctl monitor to listen", Duration::from_secs(20), || {
            let probe = Command::new("busctl")
                .arg(format!("--address={}", bus.address))
                .args(["emit", "/probe", "org.corral.TestProbe", "Ready"])
                .status()
                .unwrap();
            assert!(probe.success());
            std::thread::sleep(Duration::from_millis(50));
            monitor
                .messages
                .lock()
                .unwrap()
                .iter()
                .any(|m| m["member"] == "Ready")
                .then_some(())
        });
        monitor
    }

    /// Wait for a message that `matches`.
    fn wait(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, Duration::from_secs(20), || {
            self.messages
                .lock()
                .unwrap()
                .iter()
                .find(|m| matches(m))
                .cloned()
        })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /v1/events`, collected.
fn subscribe(socket: &Path) -> Arc<Mutex<Vec<Value>>> {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(s, "GET /v1/events HTTP/1.1\r\nHost: corral\r\n\r\n").unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let events = events.clone();
        std::thread::spawn(move || {
            let mut subscribed = Some(tx);
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                if line.starts_with(": corral events") {
                    subscribed.take().map(|tx| tx.send(()));
                }
                if let Some(data) = line.strip_prefix("data: ") {
                    events
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(data).unwrap());
                }
            }
        });
    }
    rx.recv_timeout(Duration::from_secs(10))
        .expect("GET /v1/events answers");
    events
}

#[test]
fn state_changes_signal_like_the_event_stream() {
    if !can_run("state_changes_signal_like_the_event_stream") {
        return;
    }
    let bus = Bus::start(BusPolicy::Ours);
    let corrald = Corrald::start(&bus, "corral");
    settle(&corrald);
    let monitor = Monitor::start(&bus);
    let events = subscribe(&corrald.api_socket());

    let is = |member: &'static str, path: String| {
        move |m: &Value| m["member"] == member && m["path"] == json!(path)
    };
    for (method, state) in [("StopApp", "stopped"), ("StartApp", "running")] {
        call(&bus, None, method, &["s", "echo"]).unwrap();
        // The manager's signal, with the same fields as the socket's event.
        let signal = monitor.wait(&format!("AppStateChanged to {state}"), |m| {
            is("AppStateChanged", MANAGER.into())(m)
                && m["payload"]["data"][2] == "echo"
                && m["payload"]["data"][4] == state
        });
        let event = event_json(&signal["payload"]["data"]);
        let seq = event["seq"].clone();
        let from_socket = wait_for(
            "the same event on the socket",
            Duration::from_secs(10),
            || {
                events
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|e| e["seq"] == seq)
                    .cloned()
            },
        );
        assert_eq!(event, from_socket);
        // The app object's PropertiesChanged.
        let changed = monitor.wait(&format!("PropertiesChanged State={state}"), |m| {
            is("PropertiesChanged", app_path("echo"))(m)
                && m["payload"]["data"][0] == "org.corral.App1"
                && m["payload"]["data"][1]["State"]["data"] == state
        });
        assert!(
            changed["payload"]["data"][1]
                .as_object()
                .unwrap()
                .contains_key("StateSince"),
            "{changed}"
        );
    }
    // Workers come back with the start: PropertiesChanged Workers=1.
    monitor.wait("PropertiesChanged Workers=1", |m| {
        is("PropertiesChanged", app_path("echo"))(m)
            && m["payload"]["data"][1]["Workers"]["data"] == 1
    });

    // A reload that adds an app adds its object, and one that removes it
    // removes it (ObjectManager's InterfacesAdded/Removed).
    let path = corrald.policy_path();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{good}{}",
            app_toml("extra-1", "stdio", "stdio-echo.wasm", 0)
        ),
    )
    .unwrap();
    let report = reload_json(&call(&bus, None, "Reload", &[]).unwrap()["data"]);
    assert_eq!(report["added"], json!(["extra-1"]));
    let added = monitor.wait("InterfacesAdded", |m| m["member"] == "InterfacesAdded");
    assert_eq!(added["path"], MANAGER);
    assert_eq!(added["payload"]["data"][0], app_path("extra-1"));
    assert_eq!(
        added["payload"]["data"][1]["org.corral.App1"]["Name"]["data"],
        "extra-1"
    );
    std::fs::write(&path, &good).unwrap();
    let report = reload_json(&call(&bus, None, "Reload", &[]).unwrap()["data"]);
    assert_eq!(report["removed"], json!(["extra-1"]));
    let removed = monitor.wait("InterfacesRemoved", |m| m["member"] == "InterfacesRemoved");
    assert_eq!(removed["payload"]["data"][0], app_path("extra-1"));
    // And the manager's Apps property followed.
    monitor.wait("PropertiesChanged Apps=3", |m| {
        is("PropertiesChanged", MANAGER.into())(m) && m["payload"]["data"][1]["Apps"]["data"] == 3
    });
}

#[test]
fn introspection_shows_every_method_property_and_signal() {
    if !can_run("introspection_shows_every_method_property_and_signal") {
        return;
    }
    let bus = Bus::start(BusPolicy::Ours);
    let corrald = Corrald::start(&bus, "corral");
    settle(&corrald);
    let members = |path: &str, interface: &str| -> BTreeMap<String, (String, String)> {
        let mut cmd = Command::new("busctl");
        cmd.arg(format!("--address={}", bus.address)).args([
            "introspect",
            "--no-pager",
            NAME,
            path,
        ]);
        if !interface.is_empty() {
            cmd.arg(interface);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let name = cols.next()?.strip_prefix('.')?;
                let kind = cols.next()?;
                let signature = cols.next()?;
                Some((name.to_string(), (kind.to_string(), signature.to_string())))
            })
            .collect()
    };
    let manager = members(MANAGER, NAME);
    let expect = |m: &BTreeMap<String, (String, String)>, name: &str, kind: &str, sig: &str| {
        assert_eq!(
            m.get(name),
            Some(&(kind.to_string(), sig.to_string())),
            "{name} in {m:?}"
        );
    };
    expect(&manager, "ListApps", "method", "-");
    for method in ["GetApp", "StartApp", "StopApp", "RestartApp", "Recompile"] {
        expect(&manager, method, "method", "s");
    }
    expect(&manager, "Reload", "method", "-");
    expect(&manager, "AppStateChanged", "signal", "ttsssus");
    for (property, sig) in [
        ("Version", "s"),
        ("WasmtimeVersion", "s"),
        ("Target", "s"),
        ("Pid", "u"),
        ("Started", "t"),
        ("UptimeSeconds", "d"),
        ("PolicyPath", "s"),
        ("PolicyFiles", "as"),
        ("ApiSocket", "s"),
        ("ApiGroup", "s"),
        ("Apps", "u"),
        ("CacheDir", "s"),
        ("CacheEntries", "t"),
        ("CacheBytes", "t"),
        ("Cgroups", "s"),
        ("TemplateState", "s"),
        ("TemplatePid", "u"),
        ("TemplateRestarts", "t"),
        ("TemplateLastError", "s"),
        ("TemplatePssBytes", "t"),
    ] {
        expect(&manager, property, "property", sig);
    }
    assert_eq!(manager.len(), 7 + 1 + 20, "nothing else: {manager:?}");
    let (_, info) = http(&corrald.api_socket(), "GET", "/v1/info");
    // cache: 3 properties, template: 5
    let info_fields = info.as_object().unwrap().len() - 2 + 3 + 5;
    assert_eq!(info_fields, 20, "a property per field of GET /v1/info");

    let app = members(&app_path("echo"), "org.corral.App1");
    let (_, echo) = http(&corrald.api_socket(), "GET", "/v1/apps/echo");
    let fields: Vec<String> = echo.as_object().unwrap().keys().cloned().collect();
    let properties: Vec<String> = {
        let mut p: Vec<String> = app.keys().map(|k| snake(k)).collect();
        p.sort();
        p
    };
    let mut fields_sorted = fields.clone();
    fields_sorted.sort();
    assert_eq!(properties, fields_sorted, "a property per field of the app");
    assert!(app.values().all(|(kind, _)| kind == "property"));

    // The standard interfaces are there too.
    let all = members(MANAGER, "");
    for member in [
        "Introspect",
        "GetAll",
        "PropertiesChanged",
        "GetManagedObjects",
    ] {
        assert!(all.contains_key(member), "{member} in {all:?}");
    }
}

#[test]
fn corrald_serves_on_without_the_bus() {
    if !can_run("corrald_serves_on_without_the_bus") {
        return;
    }
    let not_serving = "D-Bus: not serving org.corral.Manager1 on the system bus";
    let serves = |corrald: &Corrald| {
        let (status, apps) = http(&corrald.api_socket(), "GET", "/v1/apps");
        assert_eq!(status, 200);
        assert_eq!(apps.as_array().unwrap().len(), 2);
    };

    // No bus at that address.
    let nowhere = tempfile::tempdir().unwrap();
    let address = format!("unix:path={}", nowhere.path().join("nobody-here").display());
    let corrald = Corrald::spawn(&address, "corral");
    wait_for("the error line", Duration::from_secs(5), || {
        corrald.log().contains(not_serving).then_some(())
    });
    serves(&corrald);
    drop(corrald);

    // A bus whose policy does not let corrald own the name.
    let bus = Bus::start(BusPolicy::NotOurs);
    let corrald = Corrald::spawn(&bus.address, "corral");
    wait_for("the error line", Duration::from_secs(5), || {
        let log = corrald.log();
        (log.contains(not_serving) && log.contains("owning org.corral.Manager1")).then_some(())
    });
    serves(&corrald);
    // Nobody owns the name: `corral --bus` says corrald is not reachable.
    let out = Command::new(CORRAL)
        .args(["apps", "--bus", "system"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    drop(corrald);

    // The name taken by another corrald: the first keeps it.
    let bus = Bus::start(BusPolicy::Ours);
    let first = Corrald::start(&bus, "corral");
    let second = Corrald::spawn(&bus.address, "corral");
    wait_for("the error line", Duration::from_secs(5), || {
        second
            .log()
            .contains("another connection owns org.corral.Manager1")
            .then_some(())
    });
    serves(&second);
    let pid = busctl(&bus, None, &["get-property", NAME, MANAGER, NAME, "Pid"]).unwrap();
    assert_eq!(pid["data"], first.child.as_ref().unwrap().id());
}

/// `corral ARGS... --json` through the socket or the bus: (exit code,
/// the JSON values it printed).
fn corral(corrald: &Corrald, bus: Option<&Bus>, args: &[&str]) -> (i32, Vec<Value>) {
    let mut cmd = Command::new(CORRAL);
    cmd.args(args).arg("--json");
    match bus {
        Some(bus) => cmd
            .args(["--bus", "system"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address),
        None => cmd.arg("--socket").arg(corrald.api_socket()),
    };
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    // One JSON value, or one per line (events); pretty or not.
    let text = String::from_utf8(out.stdout).unwrap();
    let lines = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("corral {args:?}: {e}: {text}")))
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

#[test]
fn the_corral_command_prints_the_same_over_dbus_and_the_socket() {
    if !can_run("the_corral_command_prints_the_same_over_dbus_and_the_socket") {
        return;
    }
    let bus = Bus::start(BusPolicy::Ours);
    // Following the events of nobody: exit code 5, as over a missing socket.
    let mut orphan = Command::new(CORRAL)
        .args(["events", "--bus", "system"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .spawn()
        .unwrap();
    assert_eq!(exit_within(&mut orphan, Duration::from_secs(30)), Some(5));
    let corrald = Corrald::start(&bus, "corral");
    settle(&corrald);

    for args in [
        &["apps"][..],
        &["status", "echo"],
        &["status", "hello-web"],
        &["reload"],
    ] {
        let over_socket = corral(&corrald, None, args);
        let over_dbus = corral(&corrald, Some(&bus), args);
        assert_eq!(over_dbus, over_socket, "corral {args:?}");
        assert_eq!(over_socket.0, 0, "corral {args:?}");
    }
    // corrald's own info: equal but for the uptime and the template's PSS
    // (both read at each call).
    fn forget_uptime(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for moving in ["uptime_seconds", "pss_bytes"] {
                    if let Some(u) = map.get_mut(moving) {
                        *u = Value::Null;
                    }
                }
                map.values_mut().for_each(forget_uptime);
            }
            Value::Array(items) => items.iter_mut().for_each(forget_uptime),
            _ => {}
        }
    }
    let without_uptime = |(code, mut lines): (i32, Vec<Value>)| {
        lines.iter_mut().for_each(forget_uptime);
        (code, lines)
    };
    assert_eq!(
        without_uptime(corral(&corrald, Some(&bus), &["status"])),
        without_uptime(corral(&corrald, None, &["status"]))
    );
    // The same exit code and message for an unknown app.
    let over_socket = Command::new(CORRAL)
        .args(["status", "nope", "--socket"])
        .arg(corrald.api_socket())
        .output()
        .unwrap();
    let over_dbus = Command::new(CORRAL)
        .args(["status", "nope", "--bus", "system"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .output()
        .unwrap();
    assert_eq!(over_socket.status.code(), Some(3));
    assert_eq!(over_dbus.status.code(), over_socket.status.code());
    assert_eq!(over_dbus.stderr, over_socket.stderr);

    // A stop through the bus, then through the socket (a no-op): the same
    // app; uid 65534 is refused both ways with exit code 4.
    let stopped = corral(&corrald, Some(&bus), &["stop", "echo"]);
    assert_eq!(stopped.0, 0);
    assert_eq!(stopped.1[0]["state"], "stopped");
    assert_eq!(corral(&corrald, None, &["stop", "echo"]), stopped);
    let as_nobody = |via_bus: bool| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            CORRAL,
        ]);
        cmd.args(["start", "echo"]);
        if via_bus {
            cmd.args(["--bus", "system"])
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
        } else {
            cmd.arg("--socket").arg(corrald.api_socket());
        }
        cmd.output().unwrap().status.code()
    };
    assert_eq!((as_nobody(true), as_nobody(false)), (Some(4), Some(4)));

    // Events: the same stream both ways. A follower is subscribed once it
    // has printed an event (a fixed sleep lost the first events on a
    // loaded machine, and then `--count` waited for ever); from then on
    // both see every event, so those after the last one either had seen,
    // up to a stop made then, are the same.
    let follow = |via_bus: bool| {
        let mut cmd = Command::new(CORRAL);
        cmd.args(["events", "--json"]);
        if via_bus {
            cmd.args(["--bus", "system"])
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
        } else {
            cmd.arg("--socket").arg(corrald.api_socket());
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(Vec::<Value>::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("corral events printed {line:?}: {e}"));
                sink.lock().unwrap().push(event);
            }
        });
        (child, seen)
    };
    let mut followers = [follow(true), follow(false)];
    let seqs = |seen: &Arc<Mutex<Vec<Value>>>| -> Vec<u64> {
        let seen = seen.lock().unwrap();
        seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
    };
    wait_for(
        "both followers to see an event",
        Duration::from_secs(60),
        || {
            assert_eq!(corral(&corrald, None, &["start", "echo"]).0, 0);
            assert_eq!(corral(&corrald, None, &["stop", "echo"]).0, 0);
            followers
                .iter()
                .all(|(_, seen)| !seen.lock().unwrap().is_empty())
                .then_some(())
        },
    );
    let mark = followers
        .iter()
        .flat_map(|(_, seen)| seqs(seen))
        .max()
        .unwrap();
    // The same signal from another connection is not corrald's: the D-Bus
    // follower must not print it (the streams would differ).
    let spoof = Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(["emit", MANAGER, "org.corral.Manager1", "AppStateChanged"])
        .args(["ttsssus", &(mark + 1).to_string(), "1", "spoofed"])
        .args(["running", "running", "1", ""])
        .status()
        .unwrap();
    assert!(spoof.success());
    let started = corral(&corrald, None, &["start", "echo"]);
    assert_eq!(started.0, 0);
    assert_ne!(started.1[0]["state"], "stopped");
    let (code, stopped) = corral(&corrald, None, &["stop", "echo"]);
    assert_eq!(code, 0);
    let stopped_at = stopped[0]["state_since"].as_u64().unwrap();
    // Up to the event of that stop, on both.
    let until = wait_for("the stop on both streams", Duration::from_secs(60), || {
        let ends: Vec<u64> = followers
            .iter()
            .map(|(_, seen)| {
                let seen = seen.lock().unwrap();
                seen.iter().find_map(|e| {
                    (e["app"] == "echo"
                        && e["state"] == "stopped"
                        && e["seq"].as_u64().unwrap() > mark
                        && e["time"].as_u64().unwrap() >= stopped_at)
                        .then(|| e["seq"].as_u64().unwrap())
                })
            })
            .collect::<Option<_>>()?;
        assert_eq!(ends[0], ends[1], "the same stop event");
        Some(ends[0])
    });
    let window = |seen: &Arc<Mutex<Vec<Value>>>| -> Vec<Value> {
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|e| (mark + 1..=until).contains(&e["seq"].as_u64().unwrap()))
            .cloned()
            .collect()
    };
    let over_dbus = window(&followers[0].1);
    let over_socket = window(&followers[1].1);
    assert_eq!(over_dbus, over_socket);
    let states: Vec<&str> = over_socket
        .iter()
        .filter(|e| e["app"] == "echo")
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert!(
        states.contains(&"running") && states.last() == Some(&"stopped"),
        "{states:?}"
    );
    // corrald going away ends both streams with exit code 5.
    drop(corrald);
    for (child, _) in &mut followers {
        assert_eq!(exit_within(child, Duration::from_secs(30)), Some(5));
    }
}

/// `child`'s exit code once it exits, or `None` (and it is killed) if it
/// runs on after `timeout`.
fn exit_within(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
