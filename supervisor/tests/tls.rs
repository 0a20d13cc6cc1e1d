//! HTTPS and TLS apps end to end (issue 21): the test makes a CA, server
//! and client certificates with rcgen, starts the real `corrald` on free
//! loopback ports, and talks to the workers with curl (HTTP/1.1 and
//! HTTP/2 over ALPN) and with a rustls client (a stdio echo, steady load
//! across a certificate reload). `corral check` is run on broken pairs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use corral_testkit::{Log, Notes, free_port, guest, kill_tree, spawn_logged, wait_for, which};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");
const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

/// A CA of the test's own, and what it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses), valid from a day ago
    /// for `days`: (certificate PEM, key PEM).
    fn leaf(&self, cn: &str, names: &[&str], days: i64) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let now = rcgen::date_time_ymd(1970, 1, 1)
            + Duration::from_secs(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        params.not_before = now - Duration::from_secs(86400);
        params.not_after = if days >= 0 {
            now + Duration::from_secs(days as u64 * 86400)
        } else {
            now - Duration::from_secs(days.unsigned_abs() * 86400)
        };
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Write `text` at `path` with `mode`.
fn write(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A running corrald, killed with its process tree on drop.
struct Daemon {
    child: Option<Child>,
    pid: i32,
    dir: PathBuf,
    notes: Notes,
    stderr: Log,
}

impl Daemon {
    /// corrald on `dir/policy.toml` (written from `daemon_keys` and
    /// `apps`, `{guests}` standing for the fixtures' folder).
    fn start(dir: &Path, daemon_keys: &str, apps: &str) -> Daemon {
        let policy = format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
             drain-timeout = \"10s\"\n{daemon_keys}\n\
             [defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n{}",
            apps.replace("{guests}", &guest("").display().to_string())
        );
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        let notify = dir.join("notify.sock");
        let notes = Notes::bind(&notify);
        let (child, stderr) = spawn_logged(
            Command::new(CORRALD)
                .arg("--policy")
                .arg(dir.join("policy.toml"))
                .env("NOTIFY_SOCKET", &notify)
                .env(
                    "CORRAL_LOG",
                    "info,corral_supervisor=debug,corral_runtime=debug",
                ),
        );
        let daemon = Daemon {
            pid: child.id() as i32,
            child: Some(child),
            dir: dir.to_path_buf(),
            notes,
            stderr,
        };
        daemon.wait_ready(0);
        daemon
    }

    fn count_notes(&self, prefix: &str) -> usize {
        self.notes
            .lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Wait for READY=1 number `seen + 1`.
    fn wait_ready(&self, seen: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count_notes("READY=1") <= seen {
            assert!(
                std::fs::metadata(format!("/proc/{}", self.pid)).is_ok(),
                "corrald exited; stderr:\n{}",
                self.stderr.text()
            );
            assert!(
                Instant::now() < deadline,
                "no READY=1; stderr:\n{}",
                self.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP, then wait until corrald says READY=1 again.
    fn reload(&self) {
        let before = self.count_notes("READY=1");
        let status = Command::new("kill")
            .args(["-HUP", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_ready(before);
    }

    fn corral(&self, args: &[&str]) -> String {
        let out = Command::new(CORRAL)
            .args(args)
            .arg("--socket")
            .arg(self.dir.join("api.sock"))
            .output()
            .unwrap();
        assert!(out.status.success(), "corral {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        kill_tree(&mut child);
        if std::thread::panicking() {
            eprintln!("corrald's stderr:\n{}", self.stderr.text());
        }
    }
}

/// curl, or a skip (a failure under CI, where tests/run-tests installs it).
fn curl() -> Option<PathBuf> {
    let found = which("curl");
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs curl (tests/run-tests installs it)"
        );
        eprintln!("SKIP: no curl on this machine");
    }
    found
}

/// `curl -sS ARGS -w ' %{http_version}'`: (exit code, stdout).
fn run_curl(curl: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(curl)
        .args(["-sS", "--max-time", "20", "-w", " %{http_version}"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A rustls client config that trusts `ca` (and presents `client`, a
/// certificate and key PEM, if given).
fn client_config(ca: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(config: &Arc<rustls::ClientConfig>, port: u16) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The handshake, now: its errors are the connection's.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// The common name of the certificate the server presented.
fn peer_cn(tls: &Tls) -> String {
    let der = &tls.conn.peer_certificates().unwrap()[0];
    // The CN is the last printable string of the subject; rcgen writes it
    // as UTF8String: find our "cert-N" marker.
    let text = String::from_utf8_lossy(der.as_ref()).into_owned();
    let at = text.find("cert-").expect("a cert-N common name");
    text[at..at + 6].to_string()
}

/// One GET on `tls` (keep-alive): the status, the body, and whether the
/// server said it closes the connection.
fn get(tls: &mut Tls) -> std::io::Result<(u16, String, bool)> {
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    tls.flush()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tls.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed in the head: {:?}", String::from_utf8_lossy(&head)),
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().map_err(std::io::Error::other)?;
    let close = head.contains("connection: close");
    let body = if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        tls.read_exact(&mut body)?;
        body
    } else {
        // chunked
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                tls.read_exact(&mut byte)?;
                line.push(byte[0]);
            }
            let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16)
                .map_err(std::io::Error::other)?;
            let mut chunk = vec![0u8; size + 2];
            tls.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
        body
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
}

/// A folder with the CA and a server pair for localhost and 127.0.0.1.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("corral test CA");
        write(&dir.path().join("ca.crt"), &ca.pem(), 0o644);
        let pki = Pki { dir, ca };
        pki.server("cert-1", 90);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new server pair at server.crt / server.key.
    fn server(&self, cn: &str, days: i64) {
        let (cert, key) = self.ca.leaf(cn, &["localhost", "127.0.0.1"], days);
        write(&self.path("server.crt"), &cert, 0o644);
        write(&self.path("server.key"), &key, 0o600);
    }
}

fn http_app(port: u16, extra: &str) -> String {
    format!(
        "[apps.web]\nmodule = \"{{guests}}/http-hello.wasm\"\nkind = \"http\"\n\
         listen = [\"127.0.0.1:{port}\"]\npool = {{ min = 1, max = 2 }}\n\
         tls = {{ cert = \"server.crt\", key = \"server.key\"{extra} }}\n"
    )
}

#[test]
fn https_over_http1_and_http2_with_alpn() {
    let Some(curl) = curl() else { return };
    let pki = Pki::new();
    let (port, metrics) = (free_port(), free_port());
    let daemon = Daemon::start(
        pki.dir.path(),
        &format!("metrics = \"127.0.0.1:{metrics}\"\n"),
        &http_app(port, ""),
    );
    let url = format!("https://localhost:{port}/");
    let ca = pki.path("ca.crt");
    let ca = ca.to_str().unwrap();
    let (code, out) = run_curl(&curl, &["--http1.1", "--cacert", ca, &url]);
    assert_eq!((code, out.as_str()), (0, "Hello from corral!\n 1.1"));
    // ALPN h2: curl asks for it and gets it (no prior knowledge).
    let (code, out) = run_curl(&curl, &["--http2", "--cacert", ca, &url]);
    assert_eq!((code, out.as_str()), (0, "Hello from corral!\n 2"));
    // TLS 1.2 too, and by IP address (a name in the certificate).
    let by_ip = format!("https://127.0.0.1:{port}/");
    let (code, out) = run_curl(&curl, &["--tls-max", "1.2", "--cacert", ca, &by_ip]);
    assert_eq!((code, out.as_str()), (0, "Hello from corral!\n 2"));
    // Without the CA the client refuses the server; plain HTTP gets no answer.
    let (code, _) = run_curl(&curl, &[&url]);
    assert_ne!(code, 0);
    let (code, out) = run_curl(&curl, &[&format!("http://127.0.0.1:{port}/")]);
    assert_ne!(code, 0, "{out}");
    assert!(!out.contains("Hello"), "{out}");

    // status and metrics show the certificate.
    let status = daemon.corral(&["status", "web"]);
    assert!(
        status.contains("TLS: CN=cert-1, names localhost 127.0.0.1, expires "),
        "{status}"
    );
    assert!(
        status.contains("(in 89 days)") || status.contains("(in 90 days)"),
        "{status}"
    );
    let (code, text) = run_curl(&curl, &[&format!("http://127.0.0.1:{metrics}/metrics")]);
    assert_eq!(code, 0);
    let line = text
        .lines()
        .find(|l| l.starts_with("corral_app_tls_cert_expiry_seconds{app=\"web\"} "))
        .unwrap_or_else(|| panic!("{text}"));
    let expiry: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((expiry - now - 90 * 86400).abs() < 3600, "{line}");
}

#[test]
fn stdio_app_gets_the_decrypted_stream() {
    let pki = Pki::new();
    let port = free_port();
    let _daemon = Daemon::start(
        pki.dir.path(),
        "",
        &format!(
            "[apps.echo]\nmodule = \"{{guests}}/stdio-echo.wasm\"\nkind = \"stdio\"\n\
             listen = [\"127.0.0.1:{port}\"]\npool = {{ min = 1 }}\n\
             tls = {{ cert = \"server.crt\", key = \"server.key\" }}\n"
        ),
    );
    let config = client_config(&pki.ca.pem(), None);
    let mut tls = connect(&config, port).unwrap();
    assert_eq!(tls.conn.alpn_protocol(), None, "no ALPN for a stdio app");
    tls.write_all(b"over tls\n").unwrap();
    tls.flush().unwrap();
    let mut echoed = [0u8; 9];
    tls.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"over tls\n");
    // close_notify is the guest's end of input: it exits, the stream ends.
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    let mut rest = Vec::new();
    match tls.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("{e}"),
    }
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn client_certificate_required_and_refused_when_missing() {
    let Some(curl) = curl() else { return };
    let pki = Pki::new();
    let clients = Ca::new("corral test clients CA");
    write(&pki.path("clients-ca.crt"), &clients.pem(), 0o644);
    let (cert, key) = clients.leaf("client-1", &["client.test"], 30);
    write(&pki.path("client.crt"), &cert, 0o644);
    write(&pki.path("client.key"), &key, 0o600);
    // A client certificate from another CA.
    let (cert, key) = pki.ca.leaf("client-2", &["client.test"], 30);
    write(&pki.path("stranger.crt"), &cert, 0o644);
    write(&pki.path("stranger.key"), &key, 0o600);
    let port = free_port();
    let _daemon = Daemon::start(
        pki.dir.path(),
        "",
        &http_app(port, ", client-ca = \"clients-ca.crt\""),
    );
    let url = format!("https://localhost:{port}/");
    let p = |n: &str| pki.path(n).display().to_string();
    let (code, out) = run_curl(
        &curl,
        &[
            "--cacert",
            &p("ca.crt"),
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
            &url,
        ],
    );
    assert_eq!((code, out.as_str()), (0, "Hello from corral!\n 2"));
    let (code, out) = run_curl(&curl, &["--cacert", &p("ca.crt"), &url]);
    assert_ne!(code, 0, "no client certificate: {out}");
    assert!(!out.contains("Hello"), "{out}");
    let (code, out) = run_curl(
        &curl,
        &[
            "--cacert",
            &p("ca.crt"),
            "--cert",
            &p("stranger.crt"),
            "--key",
            &p("stranger.key"),
            &url,
        ],
    );
    assert_ne!(code, 0, "a certificate of another CA: {out}");
    assert!(!out.contains("Hello"), "{out}");
}

/// `corral check` on `apps` in `dir`: (exit code, stdout, stderr).
fn check(dir: &Path, apps: &str) -> (i32, String, String) {
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        apps.replace("{guests}", &guest("").display().to_string()),
    )
    .unwrap();
    let out = Command::new(CORRAL)
        .args(["check", "--policy"])
        .arg(&policy)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_a_mismatched_key_and_an_expired_certificate_at_their_line() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let apps = http_app(free_port(), "");
    // Line 6 is `tls = { cert = "server.crt", key = "server.key" }`.
    let (code, out, err) = check(dir, &apps);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("app web: TLS certificate CN=cert-1, valid for localhost, 127.0.0.1, until "),
        "{out}"
    );
    assert!(!err.contains("warning"), "{err}");

    // The key of another pair.
    let good_key = std::fs::read_to_string(pki.path("server.key")).unwrap();
    let (_, other_key) = pki.ca.leaf("cert-x", &["localhost"], 90);
    write(&pki.path("server.key"), &other_key, 0o600);
    let (code, _, err) = check(dir, &apps);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "policy.toml:6:36: apps.web.tls.key: {}: the key does not match the certificate",
            pki.path("server.key").display()
        )),
        "{err}"
    );
    write(&pki.path("server.key"), &good_key, 0o600);

    // Expired yesterday.
    pki.server("cert-2", -1);
    let (code, _, err) = check(dir, &apps);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "policy.toml:6:16: apps.web.tls.cert: {}: the certificate expired on ",
            pki.path("server.crt").display()
        )),
        "{err}"
    );

    // Not PEM at all.
    write(&pki.path("server.crt"), "hello", 0o644);
    let (code, _, err) = check(dir, &apps);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("policy.toml:6:16: apps.web.tls.cert: ") && err.contains("CERTIFICATE"),
        "{err}"
    );

    // 10 days left: valid, with a warning.
    pki.server("cert-3", 10);
    let (code, _, err) = check(dir, &apps);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: ")
            && err.contains("policy.toml:6:16: apps.web.tls.cert: ")
            && err.contains("the certificate expires on ")
            && (err.contains(", in 9 days: renew it") || err.contains(", in 10 days: renew it")),
        "{err}"
    );
}

#[test]
fn reload_swaps_the_certificate_under_load_without_a_failed_request() {
    let pki = Pki::new();
    let port = free_port();
    let daemon = Daemon::start(pki.dir.path(), "", &http_app(port, ""));
    let config = client_config(&pki.ca.pem(), None);
    assert_eq!(peer_cn(&connect(&config, port).unwrap()), "cert-1");

    // Steady load: two clients on fresh connections (a handshake each),
    // two on keep-alive connections (reconnecting when told to close).
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, config) = (stop.clone(), config.clone());
            std::thread::spawn(move || {
                let keep_alive = i % 2 == 1;
                let (mut ok, mut failed, mut seen) = (0u32, Vec::new(), Vec::new());
                let mut conn: Option<Tls> = None;
                while !stop.load(Ordering::SeqCst) {
                    let tls = match conn.take() {
                        Some(tls) => tls,
                        None => match connect(&config, port) {
                            Ok(tls) => {
                                let cn = peer_cn(&tls);
                                if seen.last() != Some(&cn) {
                                    seen.push(cn);
                                }
                                tls
                            }
                            Err(e) => {
                                failed.push(format!("connect: {e}"));
                                continue;
                            }
                        },
                    };
                    let mut tls = tls;
                    match get(&mut tls) {
                        Ok((200, body, close)) if body.contains("Hello") => {
                            ok += 1;
                            if keep_alive && !close {
                                conn = Some(tls);
                            }
                        }
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed, seen)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // Same paths, new files.
    pki.server("cert-2", 90);
    daemon.reload();
    wait_for(
        "new handshakes to get cert-2",
        Duration::from_secs(20),
        || (peer_cn(&connect(&config, port).ok()?) == "cert-2").then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500));

    // A broken certificate: refused, the running one keeps serving.
    write(
        &pki.path("server.crt"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
        0o644,
    );
    daemon.reload();
    daemon
        .stderr
        .wait_for("keeping the running one", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(peer_cn(&connect(&config, port).unwrap()), "cert-2");

    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for client in clients {
        let (ok, failed, seen) = client.join().unwrap();
        assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
        assert!(ok > 10, "the client kept going: {ok}");
        assert_eq!(seen.first().map(String::as_str), Some("cert-1"), "{seen:?}");
        assert_eq!(seen.last().map(String::as_str), Some("cert-2"), "{seen:?}");
        total += ok;
    }
    eprintln!("{total} requests, none failed, across two reloads");
    let log = daemon.stderr.text();
    assert!(
        log.contains("apps.web.tls.cert") && log.contains("server.crt"),
        "the refusal names the file and the policy line: {log}"
    );
    let status = daemon.corral(&["status", "web"]);
    assert!(status.contains("TLS: CN=cert-2"), "{status}");
    assert!(status.contains("reload: new version refused"), "{status}");
}
