//! Serving when clients and guests misbehave (issue 15's red-team
//! findings), end to end: each test starts the real `corrald` on a policy in
//! a temporary directory with a `NOTIFY_SOCKET` bound by the test, waits for
//! `READY=1`, and talks to its apps over real loopback sockets: silent
//! connections beside real clients, a thousand keep-alive clients, reloads
//! under keep-alive load, a spinning guest beside good requests, and a guest
//! that floods its stderr.
//!
//! No timing asserts: what is checked is who gets answered, in which order,
//! and how many bytes reach corrald's log. Every wait has a deadline; the
//! [`Daemon`] guard kills corrald and its apps however a test ends.

use corral_testkit::{free_port, guests_dir as guests, wait_for};
use std::io::{BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");

/// The client preface of HTTP/2 with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// corrald's stderr as the test saw it: every byte counted, the first
/// [`Log::KEPT`] bytes kept for reading (a flooding guest must not make the
/// test hold hundreds of megabytes).
#[derive(Default)]
struct Log {
    text: Mutex<String>,
    bytes: AtomicU64,
}

impl Log {
    const KEPT: usize = 8 << 20;

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }
}

/// A running corrald, killed with its descendants on drop.
struct Daemon {
    child: Option<Child>,
    pid: i32,
    dir: tempfile::TempDir,
    notes: Arc<Mutex<Vec<String>>>,
    log: Arc<Log>,
}

impl Daemon {
    /// Start corrald on `apps` (TOML for `[apps.*]`; `{guests}` stands for
    /// the fixtures' folder) and wait for `READY=1`.
    fn start(apps: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let policy = format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
             drain-timeout = \"10s\"\n\n\
             [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n{}",
            apps.replace("{guests}", &guests().display().to_string())
        );
        std::fs::write(root.join("policy.toml"), policy).unwrap();
        let notify = UnixDatagram::bind(root.join("notify.sock")).unwrap();
        let notes = Arc::new(Mutex::new(Vec::new()));
        {
            let notes = notes.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = notify.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    notes.lock().unwrap().extend(text.lines().map(String::from));
                }
            });
        }
        let mut child = Command::new(CORRALD)
            .env("NOTIFY_SOCKET", root.join("notify.sock"))
            .env("CORRAL_LOG", "info")
            .arg("--policy")
            .arg(root.join("policy.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Log::default());
        {
            let log = log.clone();
            let mut pipe = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.bytes.fetch_add(n as u64, Ordering::SeqCst);
                    let mut text = log.text.lock().unwrap();
                    if text.len() < Log::KEPT {
                        text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let daemon = Daemon {
            pid: child.id() as i32,
            child: Some(child),
            dir,
            notes,
            log,
        };
        daemon.wait_note("READY=1", 1);
        daemon
    }

    fn count_notes(&self, prefix: &str) -> usize {
        let notes = self.notes.lock().unwrap();
        notes.iter().filter(|l| l.starts_with(prefix)).count()
    }

    /// Wait until corrald has sent `count` notifications starting with
    /// `prefix`.
    fn wait_note(&self, prefix: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count_notes(prefix) < count {
            assert!(
                std::fs::metadata(format!("/proc/{}", self.pid)).is_ok(),
                "corrald exited; log:\n{}",
                self.log.text()
            );
            assert!(
                Instant::now() < deadline,
                "no {prefix} from corrald; log:\n{}",
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replace `from` by `to` in the policy, SIGHUP, and wait for the
    /// `READY=1` that ends the reload.
    fn reload_with(&self, from: &str, to: &str) {
        let path = self.dir.path().join("policy.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{from:?} not in the policy");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        let ready = self.count_notes("READY=1");
        let status = Command::new("kill")
            .args(["-HUP", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_note("READY=1", ready + 1);
    }

    /// `GET /metrics` on the API socket.
    fn metrics(&self) -> String {
        let s = UnixStream::connect(self.dir.path().join("api.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut conn = BufReader::new(s);
        conn.get_mut()
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n")
            .unwrap();
        let response = read_response(&mut conn).unwrap();
        assert_eq!(response.status, 200);
        String::from_utf8(response.body).unwrap()
    }

    /// The value of metric `name` with label `app="app"`.
    fn metric(&self, name: &str, app: &str) -> Option<u64> {
        let prefix = format!("{name}{{app=\"{app}\"}} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
    }

    /// corrald's descendants (zygotes and workers), from /proc.
    fn descendants(&self) -> Vec<i32> {
        corral_testkit::descendants_of(self.pid)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let tree = self.descendants();
        let _ = child.kill();
        let _ = child.wait();
        for pid in tree {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if std::thread::panicking() {
            let text = self.log.text();
            let tail = &text[text.len().saturating_sub(20_000)..];
            eprintln!("corrald's log (last 20 kB):\n{tail}");
        }
    }
}

fn http_app(name: &str, port: u16, module: &str, extra: &str) -> String {
    format!(
        "[apps.{name}]\nmodule = \"{{guests}}/{module}\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\n{extra}\n\n"
    )
}

/// One HTTP/1.1 response.
#[derive(Debug)]
struct Response {
    status: u16,
    /// The server said `Connection: close`.
    close: bool,
    body: Vec<u8>,
}

/// Read one response (Content-Length, chunked, or up to EOF).
fn read_response<R: std::io::BufRead>(r: &mut R) -> std::io::Result<Response> {
    let eof = || {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before a response",
        )
    };
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(eof());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {line:?}")))?;
    let (mut close, mut length, mut chunked) = (false, None, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(eof());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "connection" => close |= value.eq_ignore_ascii_case("close"),
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.contains("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(eof());
            }
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
        close = true;
    }
    Ok(Response {
        status,
        close,
        body,
    })
}

/// A keep-alive HTTP/1.1 client that does not pipeline: one request at a
/// time, and a new connection only when the server said `Connection:
/// close` or the last request failed.
struct Client {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    /// When the last response on `conn` ended.
    last_response: Option<Instant>,
}

impl Client {
    fn new(port: u16) -> Client {
        Client {
            port,
            conn: None,
            last_response: None,
        }
    }

    /// How long the open keep-alive connection has been idle (`None`: the
    /// next request opens a new one).
    fn idle(&self) -> Option<Duration> {
        self.conn.as_ref()?;
        Some(self.last_response?.elapsed())
    }

    fn get(&mut self, path: &str) -> std::io::Result<Response> {
        let result = self.try_get(path);
        self.last_response = Some(Instant::now());
        if !matches!(&result, Ok(r) if !r.close) {
            self.conn = None;
            self.last_response = None;
        }
        result
    }

    fn try_get(&mut self, path: &str) -> std::io::Result<Response> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().unwrap();
        write!(conn.get_mut(), "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
        read_response(conn)
    }
}

/// One GET on a fresh connection that the client closes after it.
fn get_once(port: u16, path: &str, timeout: Duration) -> std::io::Result<Response> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    let mut conn = BufReader::new(s);
    write!(
        conn.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut conn)
}

/// Raise this process's soft `RLIMIT_NOFILE` to at least `want` (up to the
/// hard limit): a test that holds a thousand sockets needs it.
fn raise_open_files(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum;
    if limit.current.is_some_and(|c| c >= want) {
        return;
    }
    let mut raised = limit;
    raised.current = Some(hard.map_or(want, |h| h.min(want)));
    setrlimit(Resource::Nofile, raised).unwrap();
    let now = getrlimit(Resource::Nofile).current;
    assert!(
        now.is_none_or(|n| n >= want),
        "this test needs {want} open files; the hard limit is {hard:?}"
    );
}

/// Issue 15, item 1: connections that never send a request must not take
/// the app's `concurrency` slots. 100 of them (nothing, one byte, an h2c
/// preface and then nothing) are held open while other clients ask; at
/// least 95% of those must be answered. The silent ones are closed by the
/// server once their deadline for a request head has passed.
#[test]
fn silent_connections_leave_other_clients_served() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "http-hello.wasm",
        "pool = { min = 1, max = 2, concurrency = 4 }",
    ));
    let mut silent = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(("127.0.0.1", web)).unwrap();
        match i % 3 {
            0 => {}
            1 => s.write_all(b"G").unwrap(),
            _ => s.write_all(H2_PREFACE).unwrap(),
        }
        silent.push(s);
    }
    // Let the workers accept what they will.
    std::thread::sleep(Duration::from_millis(500));
    let probes: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                (0..2)
                    .map(|_| get_once(web, "/", Duration::from_secs(5)))
                    .filter(
                        |r| matches!(r, Ok(r) if r.status == 200 && r.body.starts_with(b"Hello")),
                    )
                    .count()
            })
        })
        .collect();
    let answered: usize = probes.into_iter().map(|p| p.join().unwrap()).sum();
    assert!(
        answered >= 38,
        "{answered} of 40 requests answered beside 100 silent connections"
    );
    // Each kind of silent connection is closed by the worker once its
    // deadline for a request head has passed (a read ends, not times out).
    for s in &mut silent[..3] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a silent connection was left open: {e}"),
        }
    }
    drop(daemon);
}

/// Issue 15, item 1: a thousand keep-alive clients, each with a request,
/// are all served by a pool of two workers (connections are not capped at
/// `concurrency`), and each can send a second request on its connection.
#[test]
fn a_thousand_keep_alive_clients_are_served_by_two_workers() {
    raise_open_files(4096);
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "http-hello.wasm",
        "pool = { min = 2, max = 2 }",
    ));
    wait_for("two workers", Duration::from_secs(20), || {
        (daemon.descendants().len() == 3).then_some(())
    });
    let mut conns: Vec<BufReader<TcpStream>> = (0..1000)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", web)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            BufReader::new(s)
        })
        .collect();
    for round in 1..=2 {
        for c in &mut conns {
            c.get_mut()
                .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                .unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let response = read_response(c)
                .unwrap_or_else(|e| panic!("round {round}: client {i} got no answer: {e}"));
            assert_eq!(response.status, 200, "round {round}: client {i}");
            assert!(!response.close, "round {round}: client {i} was closed");
        }
    }
    assert_eq!(
        daemon.descendants().len(),
        3,
        "a zygote and its two workers served them all"
    );
}

/// The server ends of established TCP connections on `port` that `pid`
/// holds (its socket descriptors matched with /proc/net/tcp by inode).
fn connections_held(pid: i32, port: u16) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let inodes: std::collections::HashSet<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9 && f[1].ends_with(&local) && f[3] == "01" && inodes.contains(f[9])
        })
        .count()
}

/// Issue 18: an app's workers share its keep-alive clients. The kernel
/// wakes every worker for a new connection and the quickest took them all
/// (16 wrk connections on one of two workers: 17.4k requests/s against
/// 28.8k split 8/8); a worker past its share now leaves the next accept to
/// its sibling. Bursts of 16 and then 48 more clients, each connected at
/// once and then asked one request, end up split evenly between the two
/// workers (within two of even).
#[test]
fn keep_alive_clients_are_spread_evenly_between_workers() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "http-hello.wasm",
        "pool = { min = 2, max = 2, concurrency = 128 }",
    ));
    wait_for("two workers", Duration::from_secs(20), || {
        (daemon.descendants().len() == 3).then_some(())
    });
    let mut conns: Vec<BufReader<TcpStream>> = Vec::new();
    for burst in [16, 48] {
        let fresh: Vec<BufReader<TcpStream>> = (0..burst)
            .map(|_| {
                let s = TcpStream::connect(("127.0.0.1", web)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                BufReader::new(s)
            })
            .collect();
        conns.extend(fresh);
        // A response on each: every connection has been accepted.
        for (i, c) in conns.iter_mut().enumerate() {
            c.get_mut()
                .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                .unwrap();
            let response = read_response(c).unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(response.status, 200, "client {i}");
        }
        let mut held: Vec<usize> = daemon
            .descendants()
            .into_iter()
            .map(|pid| connections_held(pid, web))
            .filter(|&n| n > 0)
            .collect();
        held.sort_unstable();
        let total = conns.len();
        eprintln!("{total} clients: held per worker {held:?}");
        assert_eq!(held.iter().sum::<usize>(), total, "{held:?}");
        assert_eq!(held.len(), 2, "both workers hold clients: {held:?}");
        assert!(
            held[1] - held[0] <= 4,
            "{total} clients split {held:?} between the workers (within 2 of even)"
        );
    }
}

/// Issue 15, item 1: a worker at its connection cap (its open-files limit,
/// 1,024 in the sandbox, less a reserve) closes its oldest idle connection
/// for each new client instead of leaving the new one in the backlog: a
/// single worker serves 1,100 clients that each keep their connection
/// open, and the first of them finds its connection closed.
#[test]
fn a_worker_at_its_connection_cap_closes_its_oldest_idle_connection() {
    raise_open_files(4096);
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "http-hello.wasm",
        "pool = { min = 1, max = 1 }",
    ));
    let mut conns: Vec<BufReader<TcpStream>> = Vec::new();
    for i in 0..1100 {
        let s = TcpStream::connect(("127.0.0.1", web)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = BufReader::new(s);
        c.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let response =
            read_response(&mut c).unwrap_or_else(|e| panic!("client {i} got no answer: {e}"));
        assert_eq!(response.status, 200, "client {i}");
        conns.push(c);
    }
    // The oldest was closed to make room (EOF or reset, not a timeout).
    let mut buf = [0u8; 64];
    match conns[0].get_mut().read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the oldest idle connection is still open: {other:?}"),
    }
    // The newest is served on.
    let last = conns.last_mut().unwrap();
    last.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(last).unwrap().status, 200);
    assert_eq!(daemon.descendants().len(), 2, "one zygote, one worker");
}

/// Issue 15, item 8: reloads under keep-alive load. 16 clients that do not
/// pipeline loop on their connections while the app is reloaded three
/// times (a changed module: new workers, old ones drain); not one request
/// fails. The old workers finish what a connection has sent, answer it
/// with `Connection: close`, and close only connections idle for
/// `DRAIN_GRACE` (1 s).
///
/// A client that itself left its connection idle that long (a thread not
/// scheduled for a second, on a loaded machine running the suite in
/// parallel: seen twice in CI-like runs, 1 of ~560 requests) may write its
/// next request into a connection the server has just closed, and reads no
/// byte of a response: HTTP clients retry such a request on a new
/// connection (RFC 9112, 9.3.1), and so does this one, counting it. A
/// connection closed before a response after less than 0.9 s idle is the
/// server's fault and fails the test.
#[test]
fn reloads_fail_no_request_of_keep_alive_clients() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "http-hello.wasm",
        "pool = { min = 1, max = 2 }",
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut client = Client::new(web);
                let (mut ok, mut failed, mut retried) = (0u32, Vec::new(), Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let idle = client.idle();
                    match client.get("/") {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("status {}", r.status)),
                        Err(e)
                            if e.kind() == std::io::ErrorKind::UnexpectedEof
                                && idle.is_some_and(|d| d >= Duration::from_millis(900)) =>
                        {
                            // Retried by the next turn, on a new connection.
                            retried.push(idle);
                        }
                        Err(e) => failed.push(format!("{e} (connection idle {idle:?})")),
                    }
                }
                (ok, failed, retried)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let versions = [
        ("http-hello.wasm", "http-echo.wasm"),
        ("http-echo.wasm", "http-hello.wasm"),
        ("http-hello.wasm", "http-echo.wasm"),
    ];
    for (from, to) in versions {
        daemon.reload_with(from, to);
        let marker: &[u8] = if to == "http-echo.wasm" {
            b"GET /"
        } else {
            b"Hello"
        };
        wait_for("the new version", Duration::from_secs(20), || {
            let r = get_once(web, "/", Duration::from_secs(5)).ok()?;
            r.body.starts_with(marker).then_some(())
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    let mut failures = Vec::new();
    let mut retries = Vec::new();
    for client in clients {
        let (ok, failed, retried) = client.join().unwrap();
        assert!(ok > 5, "every client kept going: {ok}");
        total += ok as usize + failed.len();
        failures.extend(failed);
        retries.extend(retried);
    }
    eprintln!(
        "{total} requests; {} retried after the client itself idled past the grace: {retries:?}",
        retries.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed across 3 reloads: {failures:?}",
        failures.len()
    );
}

/// Issue 15, item 9: a guest that spins until `limits.timeout` yields to
/// its worker's other requests. With a single worker busy spinning, ten
/// good requests in a row on fresh connections are answered while the
/// spinner still runs: all of them before the spinner's 504 (before the
/// fix each waited about half a second, and the spinner's 2 s ran out
/// after four).
#[test]
fn a_spinning_guest_does_not_hold_up_its_neighbours() {
    let web = free_port();
    let daemon = Daemon::start(&http_app(
        "web",
        web,
        "http-echo.wasm",
        "pool = { min = 1, max = 1 }\nlimits = { timeout = \"2s\" }",
    ));
    assert_eq!(
        get_once(web, "/warm", Duration::from_secs(20))
            .unwrap()
            .status,
        200
    );
    let (done, order) = mpsc::channel();
    let spinner = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = get_once(web, "/spin", Duration::from_secs(30));
            done.send(("spin", r.map(|r| r.status).ok())).unwrap();
        })
    };
    // The spinner's request has begun once the worker counted it.
    wait_for("the spinner to start", Duration::from_secs(10), || {
        (daemon.metric("corral_app_requests_total", "web")? >= 2).then_some(())
    });
    for _ in 0..10 {
        let r = get_once(web, "/good", Duration::from_secs(30));
        done.send(("good", r.map(|r| r.status).ok())).unwrap();
    }
    spinner.join().unwrap();
    drop(done);
    let order: Vec<_> = order.iter().collect();
    let mut expected = vec![("good", Some(200)); 10];
    expected.push(("spin", Some(504)));
    assert_eq!(order, expected, "the order in which answers came");
}

/// Issue 15, item 7: a stdio guest that writes to stderr in a loop. Each
/// instance's output reaches corrald's log only up to `limits.stdout`, and
/// an app's guests together only at the per-app rate; what is dropped is
/// counted in the metrics and said once.
#[test]
fn a_guest_flooding_stderr_is_bounded_and_rate_limited() {
    let (bounded, firehose) = (free_port(), free_port());
    let stdio = |name: &str, port: u16, limits: &str| {
        format!(
            "[apps.{name}]\nmodule = \"{{guests}}/stderr-flood.wasm\"\nkind = \"stdio\"\n\
             listen = [\"127.0.0.1:{port}\"]\npool = {{ min = 1, max = 1 }}\nlimits = {limits}\n\n"
        )
    };
    let daemon = Daemon::start(&format!(
        "{}{}",
        stdio(
            "bounded",
            bounded,
            "{ timeout = \"2s\", stdout = \"64KiB\" }"
        ),
        stdio(
            "firehose",
            firehose,
            "{ timeout = \"3s\", stdout = \"1GiB\" }"
        ),
    ));
    // Each instance ends at its timeout and closes its connection.
    let run = |port: u16, instances: usize| {
        let conns: Vec<_> = (0..instances)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        for mut c in conns {
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out);
        }
        // Let the pipe drain.
        std::thread::sleep(Duration::from_millis(500));
    };

    // Per instance: four instances, 64 KiB of output each.
    let before = daemon.log.bytes();
    run(bounded, 4);
    let grown = daemon.log.bytes() - before;
    assert!(
        grown < 1 << 20,
        "4 instances of 64 KiB each added {grown} bytes to corrald's log"
    );
    let dropped = daemon
        .metric("corral_app_guest_log_dropped_bytes_total", "bounded")
        .expect("the dropped-bytes counter of app bounded");
    assert!(dropped > 0, "what was dropped is counted: {dropped}");

    // Per app: one instance allowed 1 GiB writes for 3 s; the app's rate
    // lets about a MiB a second through.
    let before = daemon.log.bytes();
    run(firehose, 1);
    let grown = daemon.log.bytes() - before;
    assert!(
        grown < 8 << 20,
        "3 s of a stderr flood added {grown} bytes to corrald's log"
    );
    let dropped = daemon
        .metric("corral_app_guest_log_dropped_bytes_total", "firehose")
        .expect("the dropped-bytes counter of app firehose");
    assert!(dropped > 0, "what was dropped is counted: {dropped}");
    let text = daemon.log.text();
    let said = text
        .lines()
        .filter(|l| l.contains("app=firehose") && l.contains("guest output over"))
        .count();
    assert_eq!(said, 1, "the rate limit is said once:\n{text}");
}
