//! corrald end to end: each test writes a policy into a temporary
//! directory, starts the real `corrald` on free loopback ports with a
//! `NOTIFY_SOCKET` bound by the test, waits for `READY=1`, and talks to
//! the apps over real sockets. Processes are counted in /proc (corrald's
//! descendants: zygotes and workers).
//!
//! Every wait has a deadline; the [`Daemon`] guard kills corrald and its
//! apps when a test ends, however it ends.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_testkit::{Log, Notes, descendants_of, free_port, guest, parent_of, wait_for};

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");

/// A running corrald, killed (with its process groups) on drop.
struct Daemon {
    child: Option<Child>,
    pid: i32,
    dir: tempfile::TempDir,
    notes: Notes,
    stderr: Log,
}

impl Daemon {
    /// Start corrald on a policy made of `[daemon]` defaults and `apps`
    /// (TOML for `[apps.*]`; `{guests}` stands for the fixtures' folder).
    fn start(apps: &str) -> Daemon {
        Daemon::start_with_env(apps, &[])
    }

    /// As [`Daemon::start`], with more environment variables.
    fn start_with_env(apps: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full("", apps, env)
    }

    /// As [`Daemon::start_with_env`], with more `[daemon]` keys.
    fn start_full(daemon_keys: &str, apps: &str, env: &[(&str, &str)]) -> Daemon {
        let daemon = Daemon::spawn(daemon_keys, apps, env, None);
        daemon.wait_note("READY=1", Duration::from_secs(60));
        daemon
    }

    /// Write the policy and start corrald, through `launcher` (a program
    /// and its arguments that end up exec'ing corrald in the same process,
    /// passing only the environment it is given with `-E`) if any.
    fn spawn(
        daemon_keys: &str,
        apps: &str,
        env: &[(&str, &str)],
        launcher: Option<&[String]>,
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let guests = guest("");
        let policy = format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
             drain-timeout = \"10s\"\n{daemon_keys}\n\
             [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n{}",
            apps.replace("{guests}", &guests.display().to_string())
        );
        std::fs::write(root.join("policy.toml"), policy).unwrap();
        // A command that exits 0 at once.
        std::fs::write(root.join("ok.wat"), "(module (func (export \"_start\")))").unwrap();
        let notify_path = root.join("notify.sock");
        let notes = Notes::bind(&notify_path);
        let notify_env = format!("NOTIFY_SOCKET={}", notify_path.display());
        let mut env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(notify_env);
        env.push("CORRAL_LOG=info,corral_supervisor=debug,corral_runtime=debug".into());
        let mut cmd = match launcher {
            Some(launcher) => {
                let mut cmd = Command::new(&launcher[0]);
                cmd.args(&launcher[1..]);
                for var in &env {
                    cmd.arg("-E").arg(var);
                }
                cmd.arg(CORRALD);
                cmd
            }
            None => {
                let mut cmd = Command::new(CORRALD);
                for var in &env {
                    let (k, v) = var.split_once('=').unwrap();
                    cmd.env(k, v);
                }
                cmd
            }
        };
        let mut child = cmd
            .arg("--policy")
            .arg(root.join("policy.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Log::collect(child.stderr.take().unwrap());
        let pid = child.id() as i32;
        Daemon {
            child: Some(child),
            pid,
            dir,
            notes,
            stderr,
        }
    }

    /// Wait for a notification line starting with `prefix`; returns it.
    fn wait_note(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.notes.find(prefix) {
                return line;
            }
            let exited = self.child.as_ref().map(|c| c.id());
            if exited.is_some() && std::fs::metadata(format!("/proc/{}", self.pid)).is_err() {
                panic!("corrald exited; stderr:\n{}", self.stderr());
            }
            if Instant::now() > deadline {
                panic!(
                    "no {prefix} from corrald within {timeout:?}; notes: {:?}\nstderr:\n{}",
                    self.notes.lines(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Wait until corrald's stderr (read by another thread, so it may lag
    /// behind notifications) contains `needle`.
    fn wait_log(&self, needle: &str) {
        self.stderr.wait_for(needle, Duration::from_secs(10));
    }

    /// corrald's descendants (zygotes and workers).
    fn descendants(&self) -> Vec<i32> {
        descendants_of(self.pid)
    }

    fn signal(&self, sig: i32) {
        // kill(1): the tests need no unsafe for one signal.
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for corrald to exit.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = wait_for("corrald to exit", timeout, || child.try_wait().unwrap());
        self.child = None;
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let tree = corral_testkit::all_descendants_of(self.pid);
        let _ = child.kill();
        let _ = child.wait();
        for pid in tree {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if std::thread::panicking() {
            eprintln!("corrald's stderr:\n{}", self.stderr());
        }
        let _ = &self.dir;
    }
}

/// One HTTP/1.1 GET on a fresh connection: (status, body).
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
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Connect to a stdio app, send `input`, close our side, read the reply.
fn stdio_roundtrip(port: u16, input: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(input)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn http_app(name: &str, port: u16, pool: &str) -> String {
    format!(
        "[apps.{name}]\nmodule = \"{{guests}}/http-hello.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\npool = {pool}\n\n"
    )
}

fn stdio_app(name: &str, port: u16, pool: &str) -> String {
    format!(
        "[apps.{name}]\nmodule = \"{{guests}}/stdio-echo.wasm\"\nkind = \"stdio\"\n\
         listen = [\"127.0.0.1:{port}\"]\npool = {pool}\n\n"
    )
}

#[test]
fn serves_http_and_stdio_apps_and_notifies_systemd() {
    let (web, echo) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        "{}{}",
        http_app("web", web, "{ min = 1, max = 2 }"),
        stdio_app("echo", echo, "{ min = 0, max = 2 }")
    ));
    let (status, body) = http_get(web).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello"), "{body}");
    // Several in a row, on the warm pool.
    for _ in 0..5 {
        assert_eq!(http_get(web).unwrap().0, 200);
    }
    let reply = stdio_roundtrip(echo, b"hello, stdio\n").unwrap();
    assert_eq!(reply, b"hello, stdio\n");
    // READY=1 came with a STATUS= naming every app.
    let notes = daemon.notes.lines();
    let ready = notes.iter().position(|l| l == "READY=1").unwrap();
    let status = notes[ready + 1..]
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .unwrap();
    assert!(
        status.contains("web") && status.contains("echo"),
        "{status}"
    );
}

#[test]
fn scales_from_zero_and_back_to_zero() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "{ min = 0, max = 2, idle-timeout = \"1s\" }",
    ));
    assert_eq!(
        daemon.descendants(),
        Vec::<i32>::new(),
        "min = 0: no process"
    );
    // The first connection waits in the backlog while the zygote starts.
    let started = Instant::now();
    let (status, body) = http_get(web).unwrap();
    let cold = started.elapsed();
    assert_eq!(status, 200, "{body}");
    eprintln!("cold start to full response: {cold:?}");
    assert!(!daemon.descendants().is_empty());
    wait_for(
        "the idle app to have no process",
        Duration::from_secs(15),
        || daemon.descendants().is_empty().then_some(()),
    );
    // And it wakes up again.
    assert_eq!(http_get(web).unwrap().0, 200);
}

#[test]
fn kept_zygote_forks_for_a_connection_at_zero_workers_and_stays() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "{ min = 0, max = 2, idle-timeout = \"300ms\", zygote = \"kept\" }",
    ));
    // The zygote runs from the start, with no worker.
    wait_for("the kept zygote", Duration::from_secs(10), || {
        (daemon.descendants().len() == 1).then_some(())
    });
    let zygote = descendants_of(daemon.pid)[0];
    assert_eq!(descendants_of(zygote), Vec::<i32>::new(), "no worker yet");
    // The zygote forks a worker for the waiting connection.
    let (status, body) = http_get(web).unwrap();
    assert_eq!(status, 200, "{body}");
    // The worker retires when idle; the same zygote stays and serves again.
    wait_for("the worker to retire", Duration::from_secs(15), || {
        (daemon.descendants() == vec![zygote]).then_some(())
    });
    assert_eq!(http_get(web).unwrap().0, 200);
    assert!(
        daemon.descendants().contains(&zygote),
        "the same zygote serves again"
    );
    wait_for(
        "the worker to retire again",
        Duration::from_secs(15),
        || (daemon.descendants() == vec![zygote]).then_some(()),
    );
}

#[test]
fn killed_worker_is_replaced_and_other_connections_complete() {
    let echo = free_port();
    let daemon = Daemon::start(&stdio_app(
        "echo",
        echo,
        "{ min = 2, max = 2, concurrency = 1 }",
    ));
    // zygote + 2 workers.
    wait_for("two workers", Duration::from_secs(10), || {
        (daemon.descendants().len() == 3).then_some(())
    });
    let zygote = descendants_of(daemon.pid)[0];
    let workers = descendants_of(zygote);
    assert_eq!(workers.len(), 2, "{workers:?}");
    // One connection in flight on each worker (concurrency = 1).
    let mut a = TcpStream::connect(("127.0.0.1", echo)).unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", echo)).unwrap();
    for s in [&mut a, &mut b] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"ping\n").unwrap();
    }
    // Both are being served before the kill.
    let mut buf = [0u8; 5];
    a.read_exact(&mut buf).unwrap();
    b.read_exact(&mut buf).unwrap();

    let victim = workers[0];
    let status = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut completed = 0;
    for mut s in [a, b] {
        let _ = s.write_all(b"more\n");
        let _ = s.shutdown(Shutdown::Write);
        let mut out = Vec::new();
        if s.read_to_end(&mut out).is_ok() && out == b"more\n" {
            completed += 1;
        }
    }
    assert_eq!(completed, 1, "the other worker's connection completes");
    wait_for("a replacement worker", Duration::from_secs(10), || {
        let now = descendants_of(zygote);
        (now.len() == 2 && !now.contains(&victim)).then_some(())
    });
    assert_eq!(stdio_roundtrip(echo, b"after\n").unwrap(), b"after\n");
    daemon.wait_log("killed by signal 9");
}

#[test]
fn crash_loop_marks_only_that_app_failed() {
    let (bad, good) = (free_port(), free_port());
    // An http component without a handler: it passes the checks before
    // start, and the zygote refuses it every time.
    let daemon = Daemon::start(&format!(
        "[apps.bad]\nmodule = \"{{guests}}/http-no-handler.wat\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{bad}\"]\npool = {{ min = 1 }}\n\
         restart = {{ backoff = \"50ms..200ms\", give-up = \"3 in 1m\" }}\n\n{}",
        http_app("good", good, "{ min = 1 }")
    ));
    wait_for("bad to be marked failed", Duration::from_secs(20), || {
        daemon
            .notes
            .lines()
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("bad FAILED"))
            .then_some(())
    });
    daemon.wait_log("restart.give-up");
    assert_eq!(http_get(good).unwrap().0, 200);
}

#[test]
fn sigterm_drains_in_flight_connections_and_exits_zero() {
    let echo = free_port();
    let mut daemon = Daemon::start(&stdio_app("echo", echo, "{ min = 1, max = 1 }"));
    let mut s = TcpStream::connect(("127.0.0.1", echo)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"first\n").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();

    daemon.signal(15);
    daemon.wait_note("STOPPING=1", Duration::from_secs(5));
    // Still served after SIGTERM: it was in flight.
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"second\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"second\n");

    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    assert!(descendants_of(daemon.pid).is_empty(), "no app process left");
}

/// Open a stdio connection and wait until it is being served (its first
/// line echoed back).
fn served_connection(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"hi\n").unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).unwrap();
    s
}

#[test]
fn busy_pool_grows_to_max_and_idle_workers_retire_to_min() {
    let echo = free_port();
    let daemon = Daemon::start(&stdio_app(
        "echo",
        echo,
        "{ min = 1, max = 3, concurrency = 1, idle-timeout = \"1s\" }",
    ));
    wait_for("the first worker", Duration::from_secs(10), || {
        (daemon.descendants().len() == 2).then_some(())
    });
    let zygote = descendants_of(daemon.pid)[0];
    // Three connections at once, one per worker: each is served, so the
    // pool grew from 1 to 3.
    let held: Vec<TcpStream> = (0..3).map(|_| served_connection(echo)).collect();
    assert_eq!(descendants_of(zygote).len(), 3);
    // A fourth waits in the backlog (max = 3), and is served once one ends.
    let mut fourth = TcpStream::connect(("127.0.0.1", echo)).unwrap();
    fourth.write_all(b"4th\n").unwrap();
    fourth.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(descendants_of(zygote).len(), 3, "never above max");
    drop(held);
    fourth
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut out = Vec::new();
    fourth.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"4th\n");
    // Idle for idle-timeout: back to min = 1 worker.
    wait_for("the pool to shrink to min", Duration::from_secs(15), || {
        (descendants_of(zygote).len() == 1).then_some(())
    });
}

#[test]
fn worker_is_replaced_after_max_requests() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "{ min = 1, max = 1, max-requests = 3 }",
    ));
    wait_for("the worker", Duration::from_secs(10), || {
        (daemon.descendants().len() == 2).then_some(())
    });
    let zygote = descendants_of(daemon.pid)[0];
    let first = descendants_of(zygote);
    for i in 0..7 {
        let (status, body) = http_get(web).unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
    }
    wait_for("the worker to be replaced", Duration::from_secs(10), || {
        let now = descendants_of(zygote);
        (now.len() == 1 && now != first).then_some(())
    });
}

#[test]
fn killed_zygote_is_restarted() {
    let web = free_port();
    let daemon = Daemon::start(&format!(
        "{}\nrestart = {{ backoff = \"100ms..1s\" }}\n",
        http_app("web", web, "{ min = 1 }").trim_end()
    ));
    wait_for("the worker", Duration::from_secs(10), || {
        (daemon.descendants().len() == 2).then_some(())
    });
    let zygote = descendants_of(daemon.pid)[0];
    let status = Command::new("kill")
        .args(["-9", &zygote.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("a new zygote and worker", Duration::from_secs(10), || {
        let zygotes: Vec<i32> = children_of(daemon.pid);
        (zygotes.len() == 1 && zygotes[0] != zygote && descendants_of(zygotes[0]).len() == 1)
            .then_some(())
    });
    assert_eq!(http_get(web).unwrap().0, 200);
    daemon.wait_log("restarting in");
}

#[test]
fn watchdog_pings_when_asked() {
    let web = free_port();
    let daemon = Daemon::start_with_env(
        &http_app("web", web, "{ min = 0 }"),
        &[("WATCHDOG_USEC", "200000")],
    );
    daemon.wait_note("WATCHDOG=1", Duration::from_secs(5));
}

/// Direct children of `pid` (not reaped zombies excluded).
fn children_of(pid: i32) -> Vec<i32> {
    let all = descendants_of(pid);
    all.iter()
        .copied()
        .filter(|&c| parent_of(c) == Some(pid))
        .collect()
}

impl Daemon {
    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// Replace `from` by `to` in the policy file.
    fn edit_policy(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.policy_path()).unwrap();
        assert!(text.contains(from), "{from:?} not in the policy");
        std::fs::write(self.policy_path(), text.replace(from, to)).unwrap();
    }

    fn count_notes(&self, prefix: &str) -> usize {
        self.notes
            .lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// SIGHUP, then wait until corrald says READY=1 again.
    fn reload(&self) {
        let before = self.count_notes("READY=1");
        self.signal(1);
        wait_for("READY=1 after the reload", Duration::from_secs(30), || {
            (self.count_notes("READY=1") > before).then_some(())
        });
        assert!(self.count_notes("RELOADING=1") > 0);
    }
}

#[test]
fn reload_with_a_broken_policy_changes_nothing() {
    let web = free_port();
    let daemon = Daemon::start(&http_app("web", web, "{ min = 1 }"));
    wait_for("the worker", Duration::from_secs(10), || {
        (daemon.descendants().len() == 2).then_some(())
    });
    let before = daemon.descendants();
    daemon.edit_policy("kind = \"http\"", "kind = \"htp\"\nbogus = 1");
    daemon.reload();
    assert_eq!(daemon.descendants(), before, "the same zygote and worker");
    let (status, body) = http_get(web).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("Hello"), "{body}");
    daemon.wait_log("reload refused");
    let log = daemon.stderr();
    assert!(log.contains("bogus"), "every error is logged: {log}");
}

#[test]
fn reload_switches_a_changed_app_without_failing_a_request() {
    let (web, echo) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        "{}{}",
        http_app("web", web, "{ min = 1, max = 2 }"),
        stdio_app("echo", echo, "{ min = 1 }")
    ));
    // Two zygotes and a worker each; echo's two must survive the reload.
    let before: HashSet<i32> = wait_for("both pools", Duration::from_secs(10), || {
        let tree = daemon.descendants();
        (tree.len() == 4).then(|| tree.into_iter().collect())
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                results.push(http_get(web).map_err(|e| e.to_string()));
            }
            results
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    daemon.edit_policy("http-hello.wasm", "http-echo.wasm");
    daemon.reload();
    wait_for("the new version to answer", Duration::from_secs(20), || {
        let (_, body) = http_get(web).ok()?;
        body.contains("GET /").then_some(()) // (chunked)
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let results = client.join().unwrap();
    let failed: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r, Ok((200, _))))
        .collect();
    assert!(
        results.len() > 10,
        "the client kept going: {}",
        results.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
    // Old workers drained: web's new zygote and echo's old one left.
    wait_for("the old zygote to exit", Duration::from_secs(15), || {
        (children_of(daemon.pid).len() == 2).then_some(())
    });
    let after: HashSet<i32> = daemon.descendants().into_iter().collect();
    let kept = before.intersection(&after).count();
    assert_eq!(kept, 2, "the untouched app keeps its zygote and worker");
    assert_eq!(stdio_roundtrip(echo, b"still\n").unwrap(), b"still\n");
}

#[test]
fn idle_exit_exits_zero_when_every_app_is_at_zero() {
    let web = free_port();
    let mut daemon = Daemon::start_full(
        "idle-exit = \"1s\"\n",
        &http_app("web", web, "{ min = 0, idle-timeout = \"1s\" }"),
        &[],
    );
    // Served once; the worker retires after 1s, corrald exits 1s later.
    assert_eq!(http_get(web).unwrap().0, 200);
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    daemon.wait_note("STOPPING=1", Duration::from_secs(1));
    daemon.wait_log("idle-exit");
}

#[test]
fn socket_activated_by_systemd_with_named_sockets() {
    let Ok(launcher) = which("systemd-socket-activate") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs systemd-socket-activate (package systemd)"
        );
        eprintln!("SKIP: no systemd-socket-activate on this machine");
        return;
    };
    let (web, echo) = (free_port(), free_port());
    let launcher = vec![
        launcher,
        format!("--listen=127.0.0.1:{web}"),
        format!("--listen=127.0.0.1:{echo}"),
        "--fdname=web-http:echo-stdio".to_string(),
    ];
    let daemon = Daemon::spawn(
        "",
        "[apps.web]\nmodule = \"{guests}/http-hello.wasm\"\nkind = \"http\"\n\
         listen = [\"systemd:web-http\"]\npool = { min = 0 }\n\n\
         [apps.echo]\nmodule = \"{guests}/stdio-echo.wasm\"\nkind = \"stdio\"\n\
         listen = [\"systemd:echo-stdio\"]\npool = { min = 1 }\n",
        &[],
        Some(&launcher),
    );
    // systemd-socket-activate starts corrald on the first connection, which
    // waits in the backlog until a worker takes it.
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = http_get(web).unwrap();
    assert_eq!(status, 200, "{body}");
    daemon.wait_note("READY=1", Duration::from_secs(30));
    assert_eq!(
        stdio_roundtrip(echo, b"activated\n").unwrap(),
        b"activated\n"
    );
}

fn which(program: &str) -> Result<String, ()> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or(())
}

/// A command app's TOML; `module` is a fixture name or a path.
fn command_app(name: &str, module: &str, extra: &str) -> String {
    format!("[apps.{name}]\nmodule = \"{module}\"\nkind = \"command\"\n{extra}\n\n")
}

#[test]
fn command_app_failing_is_restarted_until_give_up() {
    let daemon = Daemon::start(&command_app(
        "job",
        "{guests}/exit3.wasm",
        "restart = { on = \"failure\", backoff = \"50ms..100ms\", give-up = \"3 in 1m\" }",
    ));
    wait_for("job to be marked failed", Duration::from_secs(20), || {
        daemon
            .notes
            .lines()
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("job FAILED"))
            .then_some(())
    });
    // stderr is read by another thread: it may lag behind the notification.
    wait_for("three exits in the log", Duration::from_secs(5), || {
        (daemon.stderr().matches("exited with 3").count() >= 3).then_some(())
    });
    let log = daemon.stderr();
    assert!(
        log.contains("exiting with 3"),
        "guest output is logged: {log}"
    );
}

#[test]
fn command_app_restart_on_always_and_never() {
    let daemon = Daemon::start(
        &format!(
            "{}{}",
            command_app(
                "again",
                "{guests}/ok.wat",
                "restart = { on = \"always\", backoff = \"50ms..100ms\" }"
            ),
            command_app("once", "{guests}/ok.wat", "restart = { on = \"never\" }"),
        )
        .replace("{guests}/ok.wat", "ok.wat"),
    );
    wait_for(
        "`again` to run three times",
        Duration::from_secs(20),
        || (daemon.stderr().matches("app again: worker").count() >= 3).then_some(()),
    );
    wait_for("`once` to be finished", Duration::from_secs(10), || {
        daemon
            .notes
            .lines()
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("once finished"))
            .then_some(())
    });
    assert_eq!(daemon.stderr().matches("app once: worker").count(), 1);
}

#[test]
fn long_running_command_is_stopped_by_sigterm() {
    let mut daemon = Daemon::start(&command_app(
        "spin",
        "{guests}/loop.wasm",
        "limits = { timeout = \"off\" }",
    ));
    wait_for("the instance to run", Duration::from_secs(10), || {
        (daemon.descendants().len() == 2).then_some(())
    });
    daemon.signal(15);
    let status = daemon.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(descendants_of(daemon.pid).is_empty());
}

#[test]
fn apps_stop_when_corrald_is_killed() {
    let (web, echo) = (free_port(), free_port());
    let mut daemon = Daemon::start(&format!(
        "{}{}",
        http_app("web", web, "{ min = 2, max = 2 }"),
        stdio_app("echo", echo, "{ min = 1 }")
    ));
    wait_for("the pools", Duration::from_secs(10), || {
        (daemon.descendants().len() == 5).then_some(())
    });
    let tree = daemon.descendants();
    daemon.signal(9);
    daemon.wait_exit(Duration::from_secs(5));
    // The zygotes see their control socket close, drain and exit; their
    // workers see the zygote gone.
    wait_for(
        "no process of the apps left",
        Duration::from_secs(10),
        || {
            tree.iter()
                .all(|pid| parent_of(*pid).is_none())
                .then_some(())
        },
    );
}

#[test]
fn guest_output_is_logged_by_line_tagged_and_bounded() {
    let daemon = Daemon::start(&format!(
        "{}{}",
        command_app(
            "whole",
            "{guests}/exit3.wasm",
            "restart = { on = \"never\" }"
        ),
        command_app(
            "cut",
            "{guests}/exit3.wasm",
            "restart = { on = \"never\" }\nlimits = { stdout = 8 }"
        ),
    ));
    wait_for("both to finish", Duration::from_secs(10), || {
        let log = daemon.stderr();
        (log.contains("app whole: worker") && log.contains("app cut: worker")).then_some(())
    });
    let log = daemon.stderr();
    let whole = log
        .lines()
        .find(|l| l.contains("exiting with 3") && l.contains("app=whole"))
        .unwrap_or_else(|| panic!("no tagged line in:\n{log}"));
    assert!(
        whole.contains("worker=") && whole.contains("request=1"),
        "{whole}"
    );
    assert!(whole.contains("stream=\"stdout\""), "{whole}");
    let cut: Vec<&str> = log.lines().filter(|l| l.contains("app=cut")).collect();
    assert!(
        cut.iter()
            .any(|l| l.contains("exiting ") && !l.contains("with 3")),
        "{cut:#?}"
    );
    assert!(
        cut.iter().any(|l| l.contains("limits.stdout reached")),
        "{cut:#?}"
    );
}

#[test]
fn http2_with_prior_knowledge_and_http1_on_one_socket() {
    if which("curl").is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI needs curl");
        eprintln!("SKIP: no curl");
        return;
    }
    let web = free_port();
    let _daemon = Daemon::start(&http_app("web", web, "{ min = 1 }"));
    let url = format!("http://127.0.0.1:{web}/");
    let run = |args: &[&str]| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "-",
                "-w",
                "\n%{http_version}",
            ])
            .args(args)
            .arg(&url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let h2 = run(&["--http2-prior-knowledge"]);
    assert!(h2.contains("Hello") && h2.ends_with("\n2"), "{h2}");
    let h1 = run(&["--http1.1"]);
    assert!(h1.contains("Hello") && h1.ends_with("\n1.1"), "{h1}");
}

#[test]
fn an_idle_keep_alive_client_does_not_keep_the_app_up() {
    let web = free_port();
    let daemon = Daemon::start(&http_app("web", web, "{ min = 0, idle-timeout = \"1s\" }"));
    let mut s = TcpStream::connect(("127.0.0.1", web)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // The client keeps the connection open and silent: after the
    // keep-alive limit the worker closes it, then retires.
    wait_for("the app to go to zero", Duration::from_secs(15), || {
        daemon.descendants().is_empty().then_some(())
    });
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[test]
fn an_app_that_never_starts_does_not_hold_back_ready() {
    let (bad, good) = (free_port(), free_port());
    // No give-up: restarted forever; READY=1 must still come.
    let daemon = Daemon::start(&format!(
        "[apps.bad]\nmodule = \"{{guests}}/http-no-handler.wat\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{bad}\"]\npool = {{ min = 1 }}\n\
         restart = {{ backoff = \"1s..2s\" }}\n\n{}",
        http_app("good", good, "{ min = 1 }")
    ));
    assert_eq!(http_get(good).unwrap().0, 200);
    daemon.wait_log("restarting in");
}

#[test]
fn serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let _daemon = Daemon::start(&format!(
        "[apps.echo]\nmodule = \"{{guests}}/stdio-echo.wasm\"\nkind = \"stdio\"\n\
         listen = [\"unix:{}\"]\npool = {{ min = 0 }}\n",
        path.display()
    ));
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"over unix\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"over unix\n");
}

#[test]
fn workers_crashing_at_once_are_paced_then_the_zygote_gives_up() {
    let echo = free_port();
    let daemon = Daemon::start(&format!(
        "{}\nrestart = {{ backoff = \"50ms..100ms\" }}\n",
        stdio_app("echo", echo, "{ min = 1, max = 1 }").trim_end()
    ));
    let first_zygote = wait_for("the worker", Duration::from_secs(10), || {
        let zygotes = children_of(daemon.pid);
        (zygotes.len() == 1 && descendants_of(zygotes[0]).len() == 1).then(|| zygotes[0])
    });
    // Kill each new worker as soon as it appears: five crashes "at once".
    let mut killed = HashSet::new();
    while killed.len() < 5 {
        let worker = wait_for("a worker to kill", Duration::from_secs(10), || {
            descendants_of(first_zygote)
                .into_iter()
                .find(|pid| !killed.contains(pid))
        });
        let _ = Command::new("kill")
            .args(["-9", &worker.to_string()])
            .status();
        killed.insert(worker);
    }
    daemon.wait_log("crashed right after they started");
    // corrald restarts the app with a new zygote, which serves.
    wait_for("a new zygote", Duration::from_secs(10), || {
        let zygotes = children_of(daemon.pid);
        (zygotes.len() == 1 && zygotes[0] != first_zygote).then_some(())
    });
    assert_eq!(stdio_roundtrip(echo, b"back\n").unwrap(), b"back\n");
}

#[test]
fn workers_run_under_a_required_sandbox() {
    let kernel = corral_runtime::sandbox::probe_kernel();
    let has_all = kernel.landlock.abi().is_some_and(|abi| abi >= 4) && kernel.seccomp.available;
    if !has_all {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs landlock (ABI 4+) and seccomp: {kernel:?}"
        );
        eprintln!("SKIP: this kernel lacks landlock ABI 4 or seccomp");
        return;
    }
    let web = free_port();
    let daemon = Daemon::start(&format!(
        "{}\nsandbox = {{ landlock = \"require\", seccomp = \"require\" }}\n",
        http_app("web", web, "{ min = 1 }").trim_end()
    ));
    assert_eq!(http_get(web).unwrap().0, 200);
    daemon.wait_log("serving (landlock=abi");
    let log = daemon.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("serving (landlock="))
        .unwrap();
    assert!(line.contains("seccomp=on"), "{line}");
}

#[test]
fn a_worker_dead_of_sigsys_is_reported_as_a_seccomp_kill() {
    let echo = free_port();
    let daemon = Daemon::start(&stdio_app("echo", echo, "{ min = 1, max = 1 }"));
    let worker = wait_for("the worker", Duration::from_secs(10), || {
        let zygotes = children_of(daemon.pid);
        zygotes
            .first()
            .and_then(|z| descendants_of(*z).first().copied())
    });
    // SIGSYS is how the filter kills; sent by hand it carries no audit
    // record, so the call is "unknown", but the app and worker are named.
    let status = Command::new("kill")
        .args(["-SYS", &worker.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    daemon.wait_log(&format!(
        "app echo: worker {worker} killed by the seccomp sandbox (SIGSYS)"
    ));
    assert_eq!(stdio_roundtrip(echo, b"replaced\n").unwrap(), b"replaced\n");
}

/// One journald native-protocol datagram as fields: `KEY=value` lines, or
/// `KEY`, a little-endian u64 length, the value and `\n` (values with
/// newlines).
fn journal_fields(mut datagram: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    while let Some(nl) = datagram.iter().position(|&b| b == b'\n') {
        let line = &datagram[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            datagram = &datagram[nl + 1..];
        } else {
            let rest = &datagram[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&rest[8..8 + len]).into_owned(),
            );
            assert_eq!(rest[8 + len], b'\n', "length-encoded field not ended");
            datagram = &rest[8 + len + 1..];
        }
    }
    assert!(datagram.is_empty(), "trailing bytes: {datagram:?}");
    fields
}

/// Start corrald in a private mount namespace (unshare(1)) whose
/// /run/systemd/journal/socket is a bind mount of a datagram socket the
/// test bound; `JOURNAL_STREAM` names corrald's stderr if `matching`, else
/// another file (/dev/null). `None` (after a visible skip) without root or
/// unshare.
fn start_with_fake_journal(apps: &str, matching: bool) -> Option<(Daemon, FakeJournal)> {
    let unshare = which("unshare");
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if unshare.is_err() || !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs root and unshare (util-linux) for the journald test"
        );
        eprintln!("SKIP: the journald test needs root and unshare(1)");
        return None;
    }
    let journal_dir = tempfile::tempdir().unwrap();
    let socket_path = journal_dir.path().join("journal.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let datagrams = Arc::new(Mutex::new(Vec::new()));
    {
        let datagrams = datagrams.clone();
        std::thread::spawn(move || {
            // Small entries only here: no memfd (SCM_RIGHTS) payloads.
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                // tracing-journald probes the socket with an empty datagram.
                if n > 0 {
                    datagrams.lock().unwrap().push(buf[..n].to_vec());
                }
            }
        });
    }
    // /run is a fresh tmpfs in the namespace only; the host's is untouched.
    // `$(stat /proc/self/fd/2)` is our stderr: the pipe corrald inherits.
    let stream = if matching {
        "/proc/self/fd/2"
    } else {
        "/dev/null"
    };
    let script = format!(
        "set -e\n\
         mount -t tmpfs tmpfs /run\n\
         mkdir -p /run/systemd/journal\n\
         touch /run/systemd/journal/socket\n\
         mount --bind '{}' /run/systemd/journal/socket\n\
         export JOURNAL_STREAM=$(stat -L -c %d:%i {stream})\n\
         while [ \"$1\" = -E ]; do export \"$2\"; shift 2; done\n\
         exec \"$@\"",
        socket_path.display()
    );
    let launcher: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]
    .map(String::from)
    .to_vec();
    let daemon = Daemon::spawn("", apps, &[], Some(&launcher));
    daemon.wait_note("READY=1", Duration::from_secs(60));
    Some((
        daemon,
        FakeJournal {
            datagrams,
            _dir: journal_dir,
        },
    ))
}

/// The datagrams sent to the journal socket of [`start_with_fake_journal`].
struct FakeJournal {
    datagrams: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Holds the socket's path.
    _dir: tempfile::TempDir,
}

impl FakeJournal {
    fn entries(&self) -> Vec<HashMap<String, String>> {
        let datagrams = self.datagrams.lock().unwrap();
        datagrams.iter().map(|d| journal_fields(d)).collect()
    }
}

#[test]
fn logs_are_journal_entries_when_journal_stream_names_stderr() {
    let web = free_port();
    // max-requests = 1: the worker exits after our request, which corrald
    // logs with the worker's pid (at debug, which the tests enable).
    let Some((daemon, journal)) = start_with_fake_journal(
        &http_app("web", web, "{ min = 1, max = 1, max-requests = 1 }"),
        true,
    ) else {
        return;
    };
    let (status, body) = http_get(web).unwrap();
    assert_eq!(status, 200, "{body}");
    let entries = wait_for(
        "a journal entry with CORRAL_WORKER",
        Duration::from_secs(10),
        || {
            let entries = journal.entries();
            entries
                .iter()
                .any(|e| e.contains_key("CORRAL_WORKER"))
                .then_some(entries)
        },
    );
    let serving = entries
        .iter()
        .find(|e| e.get("MESSAGE").is_some_and(|m| m.starts_with("serving")))
        .unwrap_or_else(|| panic!("no `serving` entry in {entries:#?}"));
    assert_eq!(serving.get("CORRAL_APP").map(String::as_str), Some("web"));
    assert_eq!(serving.get("PRIORITY").map(String::as_str), Some("6"));
    assert_eq!(
        serving.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("corrald")
    );
    let exited = entries
        .iter()
        .find(|e| e.contains_key("CORRAL_WORKER"))
        .unwrap();
    assert_eq!(exited.get("CORRAL_APP").map(String::as_str), Some("web"));
    assert!(
        exited["CORRAL_WORKER"].parse::<i32>().is_ok_and(|p| p > 0),
        "{exited:#?}"
    );
    assert_eq!(exited.get("PRIORITY").map(String::as_str), Some("7"));
    assert!(
        entries
            .iter()
            .any(|e| e.get("MESSAGE").is_some_and(|m| m.starts_with("ready:"))),
        "{entries:#?}"
    );
    // corrald's own events went to the journal, not to stderr as text.
    assert!(!daemon.stderr().contains("ready:"), "{}", daemon.stderr());
}

#[test]
fn logs_are_plain_text_when_journal_stream_names_another_file() {
    let web = free_port();
    let Some((daemon, journal)) = start_with_fake_journal(
        &http_app("web", web, "{ min = 1, max = 1, max-requests = 1 }"),
        false,
    ) else {
        return;
    };
    let (status, body) = http_get(web).unwrap();
    assert_eq!(status, 200, "{body}");
    daemon.wait_log("ready:");
    wait_for("the worker's exit logged", Duration::from_secs(10), || {
        let log = daemon.stderr();
        log.lines()
            .any(|l| l.contains("app=\"web\"") && l.contains("worker="))
            .then_some(())
    });
    let log = daemon.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("INFO") && l.contains("serving") && l.contains("app=\"web\"")),
        "{log}"
    );
    assert!(
        journal.entries().is_empty(),
        "journal entries although JOURNAL_STREAM names /dev/null: {:#?}",
        journal.entries()
    );
}

/// One HTTP/2 frame: 9-byte header (length, type, flags, stream) + payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// Read one HTTP/2 frame: (type, flags, payload).
fn read_h2_frame(s: &mut TcpStream) -> (u8, u8, Vec<u8>) {
    let mut header = [0u8; 9];
    s.read_exact(&mut header).unwrap();
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (header[3], header[4], payload)
}

#[test]
fn http2_streams_count_against_pool_concurrency() {
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const DATA: u8 = 0x0;
    let web = free_port();
    // One worker serving two requests at once.
    let _daemon = Daemon::start(&format!(
        "[apps.web]\nmodule = \"{{guests}}/http-echo.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{web}\"]\npool = {{ min = 1, max = 1, concurrency = 2 }}\n\n"
    ));
    let mut h2 = TcpStream::connect(("127.0.0.1", web)).unwrap();
    h2.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    h2.write_all(&h2_frame(SETTINGS, 0, 0, &[])).unwrap();
    // The server's SETTINGS say how many streams one connection may run.
    let settings = loop {
        let (kind, flags, payload) = read_h2_frame(&mut h2);
        if kind == SETTINGS && flags & 1 == 0 {
            break payload;
        }
    };
    let max_streams = settings
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes(s[2..].try_into().unwrap()));
    assert_eq!(max_streams, Some(2), "SETTINGS {settings:?}");
    h2.write_all(&h2_frame(SETTINGS, 1, 0, &[])).unwrap();
    // Two POSTs whose bodies stay open: two requests in flight on one
    // connection. HPACK: :method POST, :scheme http, :path /, and
    // :authority "test" as a literal.
    let head = [0x83, 0x86, 0x84, 0x01, 0x04, b't', b'e', b's', b't'];
    for stream in [1, 3] {
        h2.write_all(&h2_frame(HEADERS, 0x4, stream, &head))
            .unwrap();
    }
    // Let the worker start both (if another connection came first, the
    // second stream would wait for it instead, and this test would fail).
    std::thread::sleep(Duration::from_millis(300));
    // The worker is at `concurrency`: a third request, on a connection of
    // its own, waits in the backlog.
    let mut h1 = TcpStream::connect(("127.0.0.1", web)).unwrap();
    h1.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    h1.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut first = [0u8; 1];
    let waited = h1.read(&mut first);
    assert!(
        waited.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "a third request was served while two HTTP/2 streams were in flight: {waited:?}"
    );
    // Once the streams end, it is served.
    for stream in [1, 3] {
        h2.write_all(&h2_frame(DATA, 0x1, stream, &[])).unwrap();
    }
    h1.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut response = String::new();
    h1.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

impl Daemon {
    /// `GET path` on corrald's API socket; the JSON body.
    fn api_get(&self, path: &str) -> serde_json::Value {
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.path().join("api.sock"))
            .expect("connecting to the API socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            let mut out = String::new();
            let mut rest = body;
            while let Some((len, tail)) = rest.split_once("\r\n") {
                let n = usize::from_str_radix(len.trim(), 16).unwrap();
                if n == 0 {
                    break;
                }
                out.push_str(&tail[..n]);
                rest = &tail[n + 2..];
            }
            return serde_json::from_str(&out).unwrap();
        }
        serde_json::from_str(body).unwrap()
    }
}

/// An app that is failed, with its reason, by reconcile: no zygote ever
/// started, no restart logged.
fn assert_failed_before_start(daemon: &Daemon, app: &str, reason: &[&str]) {
    let info = wait_for(
        &format!("{app} to be failed"),
        Duration::from_secs(20),
        || {
            let info = daemon.api_get(&format!("/v1/apps/{app}"));
            (info["state"] == "failed").then_some(info)
        },
    );
    let why = info["last_error"].as_str().unwrap_or_default();
    for part in reason {
        assert!(why.contains(part), "{app}: {part:?} not in {why:?}");
    }
    assert!(why.contains(&format!("`{app}`")), "names the app: {why}");
    assert_eq!(info["cold_starts"], 0, "{app}: no zygote started: {info}");
    assert_eq!(info["errors"], 0, "{app}: nothing crashed: {info}");
    assert_eq!(info["zygote_pid"], serde_json::Value::Null, "{info}");
}

/// Issue 15 item 10: what the module and the policy decide is found by
/// reconcile, once: a module whose memory minimum (4 GiB) is above
/// `limits.memory` and a stdio app pointing at an http component are
/// failed at once with the reason, no zygote and no restart, while their
/// neighbour serves.
#[test]
fn an_app_whose_module_cannot_run_is_failed_at_once_without_a_zygote() {
    let (huge, wrong, good) = (free_port(), free_port(), free_port());
    let daemon = Daemon::start(&format!(
        "[apps.huge]\nmodule = \"{{guests}}/huge-memory.wat\"\nkind = \"stdio\"\n\
         listen = [\"127.0.0.1:{huge}\"]\npool = {{ min = 1 }}\nlimits = {{ memory = \"64MiB\" }}\n\
         restart = {{ backoff = \"50ms..100ms\" }}\n\n\
         [apps.wrong-world]\nmodule = \"{{guests}}/http-hello.wasm\"\nkind = \"stdio\"\n\
         listen = [\"127.0.0.1:{wrong}\"]\npool = {{ min = 1 }}\n\
         restart = {{ backoff = \"50ms..100ms\" }}\n\n{}",
        http_app("good", good, "{ min = 1 }")
    ));
    assert_failed_before_start(&daemon, "huge", &["4294967296", "limits.memory"]);
    assert_failed_before_start(&daemon, "wrong-world", &["kind = \"stdio\"", "component"]);
    assert_eq!(http_get(good).unwrap().0, 200);
    // Their addresses are not bound: a client is refused, not left waiting.
    for port in [huge, wrong] {
        let err = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    std::thread::sleep(Duration::from_millis(500)); // what a restart loop would log meanwhile
    let log = daemon.stderr();
    assert!(!log.contains("restarting in"), "{log}");
    assert_eq!(
        daemon.descendants().len(),
        2,
        "only good's zygote and worker"
    );
    let status = daemon
        .notes
        .lines()
        .iter()
        .rev()
        .find(|l| l.starts_with("STATUS="))
        .cloned()
        .unwrap();
    assert!(
        status.contains("huge FAILED") && status.contains("wrong-world FAILED"),
        "{status}"
    );
}

/// A reload that makes a running app unfit keeps the running version
/// serving and logs why; an app added unfit by a reload is failed at once.
#[test]
fn a_reload_that_makes_an_app_unfit_keeps_the_running_version() {
    let (echo, web) = (free_port(), free_port());
    let daemon = Daemon::start(&format!(
        "{}{}",
        stdio_app("echo", echo, "{ min = 1 }"),
        http_app("web", web, "{ min = 1 }")
    ));
    assert_eq!(stdio_roundtrip(echo, b"before\n").unwrap(), b"before\n");
    wait_for(
        "two zygotes and their workers",
        Duration::from_secs(10),
        || (daemon.descendants().len() == 4).then_some(()),
    );
    let before = daemon.descendants();
    daemon.edit_policy(
        "stdio-echo.wasm\"\nkind = \"stdio\"",
        "huge-memory.wat\"\nkind = \"stdio\"\nlimits = { memory = \"64MiB\" }",
    );
    let added = free_port();
    let text = std::fs::read_to_string(daemon.policy_path()).unwrap();
    let guests = guest("").display().to_string();
    std::fs::write(
        daemon.policy_path(),
        format!(
            "{text}\n[apps.added]\nmodule = \"{guests}/http-hello.wasm\"\nkind = \"stdio\"\n\
             listen = [\"127.0.0.1:{added}\"]\npool = {{ min = 1 }}\n"
        ),
    )
    .unwrap();
    daemon.reload();
    daemon.wait_log("keeping the running one");
    let log = daemon.stderr();
    assert!(log.contains("limits.memory"), "{log}");
    assert_eq!(stdio_roundtrip(echo, b"after\n").unwrap(), b"after\n");
    assert_eq!(http_get(web).unwrap().0, 200);
    assert_eq!(daemon.descendants(), before, "the same zygotes and workers");
    assert_failed_before_start(&daemon, "added", &["kind = \"stdio\""]);
}

/// A failed app's socket that systemd holds (and passed to corrald) does
/// not leave clients waiting in its backlog: corrald accepts and closes
/// each connection.
#[test]
fn a_systemd_socket_of_an_app_that_cannot_run_closes_connections() {
    let Ok(launcher) = which("systemd-socket-activate") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs systemd-socket-activate (package systemd)"
        );
        eprintln!("SKIP: no systemd-socket-activate on this machine");
        return;
    };
    let (web, huge) = (free_port(), free_port());
    let launcher = vec![
        launcher,
        format!("--listen=127.0.0.1:{web}"),
        format!("--listen=127.0.0.1:{huge}"),
        "--fdname=web-http:huge-stdio".to_string(),
    ];
    let daemon = Daemon::spawn(
        "",
        "[apps.web]\nmodule = \"{guests}/http-hello.wasm\"\nkind = \"http\"\n\
         listen = [\"systemd:web-http\"]\npool = { min = 1 }\n\n\
         [apps.huge]\nmodule = \"{guests}/huge-memory.wat\"\nkind = \"stdio\"\n\
         listen = [\"systemd:huge-stdio\"]\npool = { min = 1 }\nlimits = { memory = \"64MiB\" }\n",
        &[],
        Some(&launcher),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http_get(web).unwrap().0, 200); // starts corrald
    daemon.wait_note("READY=1", Duration::from_secs(30));
    assert_failed_before_start(&daemon, "huge", &["limits.memory"]);
    let mut s = TcpStream::connect(("127.0.0.1", huge)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection to a failed app was not closed: {other:?}"),
    }
}

// ------------------------------------------------ the zygote template (issue 18)

/// The zygote template below `daemon` (it starts with corrald).
fn template_pid(daemon: &Daemon) -> i32 {
    wait_for("the zygote template", Duration::from_secs(10), || {
        corral_testkit::template_of(daemon.pid)
    })
}

/// An app's zygote starts: (all, forked from the template).
fn cold_starts(daemon: &Daemon, app: &str) -> (u64, u64) {
    let a = daemon.api_get(&format!("/v1/apps/{app}"));
    (
        a["cold_starts"].as_u64().unwrap(),
        a["cold_starts_forked"].as_u64().unwrap(),
    )
}

/// The words of `/proc/PID/cmdline`.
fn command_line(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect()
}

#[test]
fn a_cold_start_is_a_fork_of_the_template() {
    let web = free_port();
    let echo = free_port();
    let daemon = Daemon::start(&format!(
        "{}{}",
        http_app("web", web, "{ min = 0, max = 2, idle-timeout = \"300ms\" }"),
        stdio_app(
            "echo",
            echo,
            "{ min = 0, max = 2, idle-timeout = \"300ms\" }"
        )
    ));
    let template = template_pid(&daemon);
    assert_eq!(command_line(template), ["corrald", "template"]);
    let info = daemon.api_get("/v1/info");
    assert_eq!(info["template"]["state"], "running", "{info}");
    assert_eq!(info["template"]["pid"], template, "{info}");
    assert!(
        info["template"]["pss_bytes"].as_u64().unwrap() > 0,
        "{info}"
    );
    // Idle, the apps cost no process: the template is the daemon's one.
    assert_eq!(daemon.descendants(), Vec::<i32>::new());

    // The first connection of each is served by a zygote forked from the
    // template, which is corrald's child (CLONE_PARENT), not the
    // template's, and says what it is.
    let (status, body) = http_get(web).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(cold_starts(&daemon, "web"), (1, 1));
    let zygotes: Vec<i32> = children_of(daemon.pid)
        .into_iter()
        .filter(|&p| p != template)
        .collect();
    assert_eq!(zygotes.len(), 1, "one zygote: {zygotes:?}");
    assert_eq!(parent_of(zygotes[0]), Some(daemon.pid));
    assert_eq!(command_line(zygotes[0]), ["corrald", "zygote"]);
    assert_eq!(
        children_of(template),
        Vec::<i32>::new(),
        "the template keeps no children"
    );
    assert_eq!(stdio_roundtrip(echo, b"ping\n").unwrap(), b"ping\n");
    assert_eq!(cold_starts(&daemon, "echo"), (1, 1));

    // Back to zero and woken again: forked again, by the same template.
    wait_for("both apps at zero", Duration::from_secs(15), || {
        daemon.descendants().is_empty().then_some(())
    });
    assert_eq!(http_get(web).unwrap().0, 200);
    assert_eq!(cold_starts(&daemon, "web"), (2, 2));
    assert_eq!(corral_testkit::template_of(daemon.pid), Some(template));
}

#[test]
fn a_dead_or_hung_template_is_replaced_and_wakes_meanwhile_are_served() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "{ min = 0, max = 2, idle-timeout = \"200ms\" }",
    ));
    let at_zero = || {
        wait_for("the app at zero", Duration::from_secs(15), || {
            daemon.descendants().is_empty().then_some(())
        })
    };
    let first = template_pid(&daemon);

    // Killed: the next wake is served all the same (by an exec'd zygote,
    // or by the new template if it is back already), and the template is
    // started again.
    let status = Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(http_get(web).unwrap().0, 200);
    daemon.wait_log("the zygote template exited");
    let second = wait_for("a new template", Duration::from_secs(10), || {
        corral_testkit::template_of(daemon.pid).filter(|&p| p != first)
    });
    let info = daemon.api_get("/v1/info");
    assert_eq!(info["template"]["state"], "running", "{info}");
    assert_eq!(info["template"]["restarts"], 1, "{info}");
    at_zero();
    let before = cold_starts(&daemon, "web");
    assert_eq!(http_get(web).unwrap().0, 200);
    let after = cold_starts(&daemon, "web");
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "the new template forks"
    );

    // Hung (stopped): a wake waits for its answer at most 5 s, then the
    // zygote is exec'd and the template replaced.
    at_zero();
    let status = Command::new("kill")
        .args(["-STOP", &second.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let before = cold_starts(&daemon, "web");
    let started = Instant::now();
    assert_eq!(http_get(web).unwrap().0, 200);
    eprintln!("a wake with the template stopped: {:?}", started.elapsed());
    let after = cold_starts(&daemon, "web");
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 0),
        "exec'd while the template hangs"
    );
    daemon.wait_log("did not answer within 5s; killing it");
    wait_for("a third template", Duration::from_secs(10), || {
        corral_testkit::template_of(daemon.pid).filter(|&p| p != first && p != second)
    });
    let info = daemon.api_get("/v1/info");
    assert_eq!(info["template"]["restarts"], 2, "{info}");
}

#[test]
fn template_off_execs_every_zygote() {
    let web = free_port();
    let daemon = Daemon::start_full(
        "template = false",
        &http_app("web", web, "{ min = 0 }"),
        &[],
    );
    assert_eq!(http_get(web).unwrap().0, 200);
    assert_eq!(cold_starts(&daemon, "web"), (1, 0));
    assert_eq!(corral_testkit::template_of(daemon.pid), None);
    assert_eq!(daemon.api_get("/v1/info")["template"]["state"], "off");
}

/// Whether any memory of `pid` that can be read holds `needle`: every
/// readable mapping up to 256 MiB (the pooling allocator's reservations
/// are larger and not readable) but corrald's own image, which cannot
/// hold it (checked by the caller), read through /proc/PID/mem.
fn memory_holds(pid: i32, needle: &[u8]) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut words = line.split_whitespace();
        let (Some(range), Some(perms)) = (words.next(), words.next()) else {
            continue;
        };
        let path = words.nth(3).unwrap_or("");
        if !perms.starts_with('r') || path == "[vvar]" || Path::new(path) == exe {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        if end - start > 256 << 20 {
            continue;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        use std::os::unix::fs::FileExt as _;
        if mem.read_exact_at(&mut buf, start).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[test]
fn a_zygote_forked_from_the_template_holds_nothing_of_another_app() {
    // The web app's module holds a string the echo app's does not, nor
    // corrald's binary.
    let marker = b"Hello from corral!";
    let has = |path: &Path| {
        std::fs::read(path)
            .unwrap()
            .windows(marker.len())
            .any(|w| w == marker)
    };
    assert!(has(&guest("http-hello.wasm")));
    assert!(!has(&guest("stdio-echo.wasm")));
    assert!(!has(Path::new(CORRALD)));
    let web = free_port();
    let echo = free_port();
    let daemon = Daemon::start(&format!(
        "{}{}",
        http_app("web", web, "{ min = 0, max = 1, idle-timeout = \"60s\" }"),
        stdio_app("echo", echo, "{ min = 0, max = 1, idle-timeout = \"60s\" }")
    ));
    let template = template_pid(&daemon);
    // web wakes first, then echo: both forked from the same template.
    assert_eq!(http_get(web).unwrap().0, 200);
    let web_zygote = children_of(daemon.pid)
        .into_iter()
        .find(|&p| p != template)
        .unwrap();
    assert_eq!(stdio_roundtrip(echo, b"ping\n").unwrap(), b"ping\n");
    assert_eq!(cold_starts(&daemon, "web"), (1, 1));
    assert_eq!(cold_starts(&daemon, "echo"), (1, 1));
    let echo_zygote = children_of(daemon.pid)
        .into_iter()
        .find(|&p| p != template && p != web_zygote)
        .unwrap();
    let echo_workers = children_of(echo_zygote);
    assert_eq!(echo_workers.len(), 1);
    let web_artifact = daemon.api_get("/v1/apps/web")["artifact"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();

    // The scan finds the marker where it must be: in web's zygote, which
    // maps web's artifact.
    assert!(memory_holds(web_zygote, marker));
    // Not in echo's zygote or worker, nor in the template; and none of
    // them maps web's artifact.
    for (what, pid) in [
        ("echo's zygote", echo_zygote),
        ("echo's worker", echo_workers[0]),
        ("the template", template),
    ] {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(
            !maps.contains(&web_artifact),
            "{what} maps web's artifact:\n{maps}"
        );
        assert!(!memory_holds(pid, marker), "{what} holds web's data");
    }
}
