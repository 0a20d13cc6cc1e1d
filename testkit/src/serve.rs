//! The HTTP checks every server of an http app must pass, whoever runs
//! it (a corrald worker, `corral run --serve`, the shim's task process):
//! keep-alive, HTTP/2 with prior knowledge, the concurrency limit, and
//! drain on stop. Each takes the address of a server of the
//! `http-echo.wasm` fixture, which answers once the request body ends,
//! so a request whose chunked body stays open is a request in flight.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Read one HTTP/1.1 response (Content-Length or chunked) off `s`:
/// (status, body).
pub fn read_response(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("reading a response head");
        assert!(n == 1, "connection closed in a response head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let mut body = Vec::new();
    if let Some(len) = header("content-length") {
        body.resize(len.parse().unwrap(), 0);
        s.read_exact(&mut body).unwrap();
    } else if header("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                s.read_exact(&mut byte).unwrap();
                line.push(byte[0]);
            }
            let size_text = String::from_utf8_lossy(&line[..line.len() - 2]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            let mut chunk = vec![0u8; size + 2];
            s.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        s.read_to_end(&mut body).unwrap();
    }
    (status, body)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// A POST whose chunked body stays open: in flight until [`finish`].
pub fn open_request(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = connect(addr);
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    .unwrap();
    s
}

/// End the body of an [`open_request`] and read its response.
pub fn finish(mut s: TcpStream) -> (u16, Vec<u8>) {
    s.write_all(b"0\r\n\r\n").unwrap();
    read_response(&mut s)
}

/// Whether a response starts arriving on `s` within `wait` (nothing is
/// consumed when none does).
fn answered_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1];
    let got = s.peek(&mut buf);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    match got {
        Ok(_) => true,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => panic!("reading: {e}"),
    }
}

/// Several requests, one after the other, on one HTTP/1.1 connection.
pub fn keep_alive(addr: SocketAddr) {
    let mut s = connect(addr);
    for i in 0..3 {
        write!(s, "GET /keep/{i} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let (status, body) = read_response(&mut s);
        assert_eq!(status, 200, "request {i} on the kept connection");
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with(&format!("GET /keep/{i}\n")),
            "request {i}: {body}"
        );
    }
}

/// HTTP/2 with prior knowledge (curl's client), then HTTP/1.1 on the same
/// socket.
pub fn http2_prior_knowledge(addr: SocketAddr) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--max-time", "30"])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg(format!("http://{addr}/h2"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("GET /h2\n"), "{text}");
    assert!(text.ends_with("\n2 200"), "not HTTP/2 200: {text}");
    keep_alive(addr);
}

/// `concurrency` requests are served at once, and one more waits until a
/// slot frees.
pub fn concurrency_limit(addr: SocketAddr, concurrency: usize) {
    let mut open: Vec<TcpStream> = (0..concurrency)
        .map(|i| open_request(addr, &format!("/slow/{i}")))
        .collect();
    // Let the server take them all (a connection it has not accepted yet
    // would hold a slot it does not use, and this test would fail).
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = connect(addr);
    extra
        .write_all(b"GET /extra HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(
        !answered_within(&mut extra, Duration::from_millis(700)),
        "request {} was served while {concurrency} were in flight",
        concurrency + 1
    );
    // The last one taken is in a slot too: it is answered while the
    // others stay open.
    let (status, body) = finish(open.pop().unwrap());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Its slot goes to the waiting request.
    let (status, body) = read_response(&mut extra);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body.starts_with(b"GET /extra\n"));
    for s in open {
        let (status, _) = finish(s);
        assert_eq!(status, 200);
    }
}

/// A request in flight when `stop` is called (it sends SIGTERM) is
/// answered 200. (The caller then checks that the server is gone.)
pub fn drain_on_stop(addr: SocketAddr, stop: impl FnOnce()) {
    let s = open_request(addr, "/drain");
    std::thread::sleep(Duration::from_millis(300));
    stop();
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = finish(s);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        body.starts_with(b"POST /drain\n"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// A running server of the `http-echo.wasm` fixture, for [`parity_tests!`].
pub trait Served {
    /// Where it serves.
    fn addr(&self) -> SocketAddr;
    /// Send it SIGTERM.
    fn sigterm(&self);
    /// Wait for it to exit, and check it exited 0.
    fn exits_zero(&mut self);
}

/// Drain on stop ([`drain_on_stop`]), then the server exits 0.
pub fn drains_and_exits_zero(mut server: impl Served) {
    let addr = server.addr();
    drain_on_stop(addr, || server.sigterm());
    server.exits_zero();
}

/// The four checks as `#[test]` functions, against the server `$start`
/// (an expression giving a [`Served`]) of `$concurrency` slots.
#[macro_export]
macro_rules! parity_tests {
    ($start:expr, $concurrency:expr) => {
        #[test]
        fn keeps_connections_alive() {
            use $crate::serve::Served as _;
            $crate::serve::keep_alive($start.addr());
        }

        #[test]
        fn speaks_http2_with_prior_knowledge() {
            use $crate::serve::Served as _;
            $crate::serve::http2_prior_knowledge($start.addr());
        }

        #[test]
        fn serves_pool_concurrency_requests_at_once_and_no_more() {
            use $crate::serve::Served as _;
            $crate::serve::concurrency_limit($start.addr(), $concurrency);
        }

        #[test]
        fn drains_an_in_flight_request_on_sigterm_and_exits_zero() {
            $crate::serve::drains_and_exits_zero($start);
        }
    };
}

/// A server process under test: its child, where it serves and its
/// stderr; killed on drop (its log shown if the test failed).
#[derive(Debug)]
pub struct ServerProcess {
    child: std::process::Child,
    addr: SocketAddr,
    log: crate::Log,
    _keep: Box<dyn std::any::Any>,
}

impl ServerProcess {
    /// `child` (from [`crate::spawn_logged`]) serving on `addr`; `keep`
    /// (its temporary directory, say) lives as long as it does.
    pub fn new(
        child: std::process::Child,
        addr: SocketAddr,
        log: crate::Log,
        keep: impl std::any::Any,
    ) -> ServerProcess {
        ServerProcess {
            child,
            addr,
            log,
            _keep: Box::new(keep),
        }
    }
}

impl Served for ServerProcess {
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
        let status = crate::wait_for("the server to exit", Duration::from_secs(30), || {
            child.try_wait().unwrap()
        });
        assert!(status.success(), "{status}:\n{}", self.log.text());
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("the server's stderr:\n{}", self.log.text());
        }
    }
}

/// The address in `corral run --serve`'s first line,
/// `Serving HTTP on http://ADDR/`.
pub fn corral_run_address(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("Serving HTTP on http://")
        .and_then(|rest| rest.trim_end().strip_suffix('/'))?
        .parse()
        .ok()
}
