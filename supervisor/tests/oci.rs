//! Modules from OCI registries, end to end: real registries on loopback
//! (Debian's `docker-registry`, the CNCF distribution registry), one with
//! TLS (a CA and certificate made here with openssl) and an htpasswd user,
//! one with plain HTTP; modules pushed with `corral push` and, independently,
//! with `skopeo copy` from an OCI layout this test writes (a runwasi image
//! and an index); the real corrald serving them; the real `corral pull`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corral_testkit::{Log, Notes, free_port, guest, kill_tree, spawn_logged, wait_for, which};
use sha2::{Digest as _, Sha256};

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
const CORRALD: &str = env!("CARGO_BIN_EXE_corrald");
const USER: &str = "alice";
const PASSWORD: &str = "s3cret-Pa55";

/// The tools this test needs, or `None` (the test is skipped, loudly,
/// unless CI=true; tests/run-tests installs them).
fn tools() -> Option<()> {
    for tool in ["docker-registry", "skopeo", "htpasswd", "openssl"] {
        if which(tool).is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{tool} is missing (tests/run-tests installs it)"
            );
            eprintln!(
                "skipped: {tool} is not installed (apt-get install docker-registry skopeo apache2-utils openssl)"
            );
            return None;
        }
    }
    Some(())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost.
fn make_tls(dir: &Path) {
    let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=corral test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
}

/// How a [`Registry`] lets clients in.
enum Auth {
    /// Plain HTTP, anyone.
    None,
    /// TLS, and basic auth against an htpasswd user.
    Htpasswd,
    /// TLS, and bearer tokens from the token server at `realm` (the flow
    /// Docker Hub, GHCR and Harbor use): a client that is refused asks the
    /// realm for a token with its credentials, then retries with it.
    Token { realm: String },
}

const TOKEN_SERVICE: &str = "corral-test-registry";
const TOKEN_ISSUER: &str = "corral-test-issuer";

/// A token server on 127.0.0.1 (plain HTTP, as the realm of [`Auth::Token`]):
/// for `GET /token?service=S&scope=repository:NAME:ACTIONS` with the basic
/// credentials of [`USER`], a JWT signed (RS256, with openssl and
/// `dir/token.key`, its certificate in the `x5c` header) granting those
/// actions on NAME; 401 for other credentials. Returns the realm's URL and
/// the count of tokens it issued.
fn token_server(dir: &Path) -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "token.key",
        ])
        .args([
            "-out",
            "token.pem",
            "-days",
            "2",
            "-subj",
            "/CN=corral test token signer",
        ])
        .current_dir(dir));
    let der = run(Command::new("openssl")
        .args([
            "x509",
            "-in",
            "token.pem",
            "-outform",
            "DER",
            "-out",
            "token.der",
        ])
        .current_dir(dir));
    drop(der);
    let cert = b64.encode(std::fs::read(dir.join("token.der")).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let issued = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (dir, count) = (dir.to_path_buf(), issued.clone());
    let good = format!("Basic {}", b64.encode(format!("{USER}:{PASSWORD}")));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let target = head.split(' ').nth(1).unwrap_or("").to_string();
            let authorized = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("authorization") && v.trim() == good
                })
            });
            if !authorized {
                let _ = conn.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                continue;
            }
            let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
            let mut access = Vec::new();
            for kv in query.split('&') {
                if let Some(scope) = kv.strip_prefix("scope=") {
                    let scope = scope
                        .replace("%3A", ":")
                        .replace("%2C", ",")
                        .replace("%2F", "/");
                    let parts: Vec<&str> = scope.splitn(3, ':').collect();
                    if let [kind, name, actions] = parts[..] {
                        access.push(serde_json::json!({
                            "type": kind, "name": name,
                            "actions": actions.split(',').collect::<Vec<_>>(),
                        }));
                    }
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [cert]});
            let claims = serde_json::json!({
                "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE,
                "exp": now + 300, "nbf": now - 10, "iat": now,
                "jti": format!("t{}", count.load(std::sync::atomic::Ordering::SeqCst)),
                "access": access,
            });
            let signing_input = format!(
                "{}.{}",
                b64url.encode(header.to_string()),
                b64url.encode(claims.to_string())
            );
            let mut sign = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign", "token.key"])
                .current_dir(&dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            sign.stdin
                .take()
                .unwrap()
                .write_all(signing_input.as_bytes())
                .unwrap();
            let signature = sign.wait_with_output().unwrap().stdout;
            let token = format!("{signing_input}.{}", b64url.encode(signature));
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body =
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                    .to_string();
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    (realm, issued)
}

/// A `docker-registry` on 127.0.0.1, killed on drop.
struct Registry {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
    log: Log,
}

impl Registry {
    /// With `tls`, the certificate of [`make_tls`] in `dir` and the
    /// htpasswd user; else plain HTTP and no auth.
    fn start(dir: &Path, name: &str, tls: bool) -> Registry {
        Registry::start_with(dir, name, if tls { Auth::Htpasswd } else { Auth::None })
    }

    fn start_with(dir: &Path, name: &str, auth: Auth) -> Registry {
        let tls = !matches!(auth, Auth::None);
        let port = free_port();
        let root = dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            root.join("data").display()
        );
        if let Auth::Token { realm } = &auth {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display(),
                dir.join("token.pem").display(),
            ));
        } else if tls {
            let htpasswd = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
            std::fs::write(root.join("htpasswd"), htpasswd).unwrap();
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: corral-test\n    path: {}\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display(),
                root.join("htpasswd").display()
            ));
        }
        std::fs::write(root.join("config.yml"), config).unwrap();
        let (child, log) = spawn_logged(
            Command::new("docker-registry")
                .arg("serve")
                .arg(root.join("config.yml")),
        );
        wait_for("the registry to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Registry {
            child: Some(child),
            port,
            root,
            log,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps blob `hex`.
    fn blob(&self, hex: &str) -> PathBuf {
        self.root
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("registry log:\n{}", self.log.text());
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An OCI image layout in `dir` with the given (ref name, media type,
/// document) entries, whose blobs are `blobs`.
struct Layout {
    dir: PathBuf,
    entries: Vec<serde_json::Value>,
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir,
            entries: Vec::new(),
        }
    }

    /// Store a blob; its descriptor.
    fn blob(&self, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let hex = sha256(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    }

    /// An image manifest with `config` and `layers`; its descriptor.
    fn image(&self, config: (&str, &[u8]), layers: &[(&str, &[u8])]) -> serde_json::Value {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": self.blob(config.0, config.1),
            "layers": layers.iter().map(|(t, b)| self.blob(t, b)).collect::<Vec<_>>(),
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        )
    }

    fn tag(&mut self, name: &str, mut descriptor: serde_json::Value) {
        descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
        self.entries.push(descriptor);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.entries});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

/// A runwasi-style image of `wasm`: an OCI image config, the module as an
/// `application/vnd.wasm.content.layer.v1+wasm` layer.
fn runwasi_image(layout: &Layout, wasm: &[u8]) -> serde_json::Value {
    let config = serde_json::json!({
        "architecture": "wasm", "os": "wasip1",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256(wasm))]},
        "config": {"Entrypoint": ["/app.wasm"]},
    });
    layout.image(
        (
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        ),
        &[("application/vnd.wasm.content.layer.v1+wasm", wasm)],
    )
}

fn skopeo_copy(layout: &Layout, name: &str, to: &str, all: bool) {
    let mut cmd = Command::new("skopeo");
    cmd.arg("copy").arg("--dest-tls-verify=false");
    if all {
        cmd.arg("--all");
    }
    run(cmd
        .arg(format!("oci:{}:{name}", layout.dir.display()))
        .arg(format!("docker://{to}")));
}

/// `corral ARGS` in `dir`: (success, stdout, stderr).
fn corral(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(CORRAL)
        .args(args)
        .current_dir(dir)
        .env_remove("CACHE_DIRECTORY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A corrald on `dir/policy.toml`, killed (with its descendants) on drop.
struct Corrald {
    child: Child,
    pid: i32,
    stderr: Log,
    _notes: Notes,
}

impl Corrald {
    fn start(dir: &Path, n: u32) -> Corrald {
        let notify = dir.join(format!("notify-{n}.sock"));
        let notes = Notes::bind(&notify);
        let mut child = Command::new(CORRALD)
            .arg("--policy")
            .arg(dir.join("policy.toml"))
            .arg("--bus")
            .arg("none")
            .env("NOTIFY_SOCKET", &notify)
            .env("CORRAL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Log::collect(child.stderr.take().unwrap());
        let pid = child.id() as i32;
        let d = Corrald {
            child,
            pid,
            stderr,
            _notes: notes,
        };
        wait_for("READY=1", Duration::from_secs(120), || {
            d._notes.find("READY=1")
        });
        d
    }

    fn ready_count(&self) -> usize {
        self._notes
            .lines()
            .iter()
            .filter(|l| l.starts_with("READY=1"))
            .count()
    }

    fn reload(&self) {
        let before = self.ready_count();
        run(Command::new("kill").args(["-HUP", &self.pid.to_string()]));
        wait_for("READY=1 after the reload", Duration::from_secs(60), || {
            (self.ready_count() > before).then_some(())
        });
    }

    /// Wait until one line of the log has every one of `needles`.
    fn wait_log_line(&self, needles: &[&str]) -> String {
        wait_for(
            &format!("a log line with {needles:?}"),
            Duration::from_secs(20),
            || {
                self.stderr
                    .text()
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .map(str::to_string)
            },
        )
    }

    fn api_get(&self, dir: &Path, path: &str) -> serde_json::Value {
        let mut s = std::os::unix::net::UnixStream::connect(dir.join("api.sock")).unwrap();
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
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

impl Drop for Corrald {
    fn drop(&mut self) {
        kill_tree(&mut self.child);
        if std::thread::panicking() {
            eprintln!("corrald's stderr:\n{}", self.stderr.text());
        }
    }
}

/// One GET on a fresh connection: the body, or `None` when the app does not
/// answer 200.
fn http_get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    if !response.starts_with("HTTP/1.1 200") {
        return None;
    }
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn serves(port: u16, needle: &str) {
    let body = wait_for(
        &format!("port {port} to answer {needle:?}"),
        Duration::from_secs(30),
        || http_get(port),
    );
    assert!(
        body.contains(needle),
        "port {port} answered {body:?}, not {needle:?}"
    );
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn auth_json(registry: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#)
}

#[test]
fn apps_from_registries_are_pinned_verified_and_served_from_the_cache() {
    if tools().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_tls(dir);
    let mut secure = Registry::start(dir, "secure", true);
    let mut plain = Registry::start(dir, "plain", false);
    let (s, p) = (secure.host(), plain.host());
    let localhost = format!("localhost:{}", secure.port);
    private_file(
        &dir.join("good.json"),
        &auth_json(&format!("https://{s}"), USER, PASSWORD),
    );
    private_file(&dir.join("bad.json"), &auth_json(&localhost, USER, "wrong"));

    let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
    let registries = format!(
        "[registries.\"{s}\"]\nca-file = \"ca.pem\"\nauth-file = \"good.json\"\n\n\
         [registries.\"{localhost}\"]\nca-file = \"ca.pem\"\nauth-file = \"bad.json\"\n\n\
         [registries.\"{p}\"]\nplain-http = true\n"
    );
    std::fs::write(
        dir.join("push.toml"),
        format!("[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\n\n{registries}"),
    )
    .unwrap();

    // corral push: the CNCF artifact, to the TLS registry with credentials.
    let hello_ref = format!("oci://{s}/apps/hello:v1");
    let hello = guest("http-hello.wasm");
    let (ok, out, err) = corral(
        dir,
        &[
            "push",
            "--policy",
            "push.toml",
            hello.to_str().unwrap(),
            &hello_ref,
        ],
    );
    assert!(ok, "{err}");
    let pinned_ref = out.trim().to_string();
    assert!(
        pinned_ref.starts_with(&format!("oci://{s}/apps/hello@sha256:")),
        "{out}"
    );
    let hello_digest = pinned_ref.rsplit_once("sha256:").unwrap().1.to_string();

    // Without the CA, or without credentials, the same push fails clearly.
    std::fs::write(
        dir.join("nothing.toml"),
        "[daemon]\ncache-dir = \"cache\"\n",
    )
    .unwrap();
    let (ok, _, err) = corral(
        dir,
        &[
            "push",
            "--policy",
            "nothing.toml",
            hello.to_str().unwrap(),
            &hello_ref,
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("certificate is not trusted") || err.contains("UnknownIssuer"),
        "{err}"
    );

    // skopeo: a runwasi image, an index with a wasip1 entry, and an image
    // with no Wasm layer, from an OCI layout, to the plain-HTTP registry.
    let echo = std::fs::read(guest("http-echo.wasm")).unwrap();
    let mut layout = Layout::new(dir.join("layout"));
    let runwasi = runwasi_image(&layout, &echo);
    layout.tag("runwasi", runwasi.clone());
    let linux = layout.image(
        (
            "application/vnd.oci.image.config.v1+json",
            br#"{"architecture":"amd64","os":"linux"}"#,
        ),
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            b"not really a tarball",
        )],
    );
    let mut linux_entry = linux.clone();
    linux_entry["platform"] = serde_json::json!({"os": "linux", "architecture": "s390x"});
    let mut wasm_entry = runwasi.clone();
    wasm_entry["platform"] = serde_json::json!({"os": "wasip1", "architecture": "wasm"});
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [linux_entry, wasm_entry],
    });
    let index = layout.blob(
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    layout.tag("index", index);
    layout.tag("plain", linux);
    skopeo_copy(&layout, "runwasi", &format!("{p}/runwasi/echo:v1"), false);
    skopeo_copy(&layout, "index", &format!("{p}/index/echo:v1"), true);
    skopeo_copy(&layout, "plain", &format!("{p}/plain/tar:v1"), false);

    // A module whose blob the registry then corrupts (same size).
    let victim = std::fs::read(guest("loop.wasm")).unwrap();
    std::fs::write(dir.join("victim.wasm"), &victim).unwrap();
    let (ok, _, err) = corral(
        dir,
        &[
            "push",
            "--policy",
            "push.toml",
            "victim.wasm",
            &format!("oci://{p}/corrupt/m:v1"),
        ],
    );
    assert!(ok, "{err}");
    let blob = plain.blob(&sha256(&victim));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();

    let app = |name: &str, module: &str, port: u16| {
        format!(
            "[apps.{name}]\nmodule = \"{module}\"\nkind = \"http\"\nlisten = [\"127.0.0.1:{port}\"]\n\n"
        )
    };
    let apps = [
        app("hello", &hello_ref, ports[0]),
        app("pinned", &pinned_ref, ports[1]),
        app("runwasi", &format!("oci://{p}/runwasi/echo:v1"), ports[2]),
        app("index", &format!("oci://{p}/index/echo:v1"), ports[3]),
        app(
            "wrongpass",
            &format!("oci://{localhost}/apps/hello:v1"),
            ports[4],
        ),
        app("unknown", &format!("oci://{s}/apps/hello:nope"), ports[5]),
        app("corrupt", &format!("oci://{p}/corrupt/m:v1"), ports[6]),
        app("nowasm", &format!("oci://{p}/plain/tar:v1"), ports[7]),
    ]
    .concat();
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\
             drain-timeout = \"5s\"\n\n[defaults]\nsandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n\n\
             {registries}\n{apps}"
        ),
    )
    .unwrap();

    let daemon = Corrald::start(dir, 1);
    serves(ports[0], "Hello from corral!");
    serves(ports[1], "Hello from corral!");
    serves(ports[2], "GET /");
    serves(ports[3], "GET /");
    for (app, reference, cause) in [
        (
            "wrongpass",
            format!("oci://{localhost}/apps/hello:v1"),
            "refused access",
        ),
        (
            "unknown",
            format!("oci://{s}/apps/hello:nope"),
            "no such tag",
        ),
        (
            "corrupt",
            format!("oci://{p}/corrupt/m:v1"),
            "does not match its digest",
        ),
        (
            "nowasm",
            format!("oci://{p}/plain/tar:v1"),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
    ] {
        let line = daemon.wait_log_line(&[app, &reference, cause]);
        assert!(line.contains("app failed"), "{line}");
        assert!(!line.contains(PASSWORD), "{line}");
        assert!(http_get(ports[4]).is_none());
    }
    let log = daemon.stderr.text();
    for secret in [
        PASSWORD.to_string(),
        auth_json("x", USER, PASSWORD),
        auth_json("x", USER, "wrong"),
    ] {
        let secret = secret
            .split("\"auth\": \"")
            .nth(1)
            .map_or(secret.clone(), |s| s[..12].to_string());
        assert!(!log.contains(&secret), "credentials in the log: {secret}");
    }
    daemon.wait_log_line(&["hello", &format!("resolved to sha256:{hello_digest}")]);
    let info = daemon.api_get(dir, "/v1/apps/hello");
    assert_eq!(info["digest"], format!("sha256:{hello_digest}"), "{info}");
    assert_eq!(info["module"], hello_ref.as_str(), "{info}");
    let (ok, out, err) = corral(dir, &["status", "hello", "--socket", "api.sock"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("Digest: sha256:{hello_digest}")),
        "{out}"
    );
    let pins = std::fs::read_to_string(dir.join("state/oci-pins.json")).unwrap();
    assert!(pins.contains(&hello_digest), "{pins}");

    // The tag moves in the registry: nothing changes until a reload.
    let (ok, out, err) = corral(
        dir,
        &[
            "push",
            "--policy",
            "push.toml",
            guest("http-echo.wasm").to_str().unwrap(),
            &hello_ref,
        ],
    );
    assert!(ok, "{err}");
    let moved_digest = out.trim().rsplit_once("sha256:").unwrap().1.to_string();
    assert_ne!(moved_digest, hello_digest);
    std::thread::sleep(Duration::from_millis(500));
    serves(ports[0], "Hello from corral!");
    daemon.reload();
    serves(ports[0], "GET /");
    serves(ports[1], "Hello from corral!");
    assert_eq!(
        daemon.api_get(dir, "/v1/apps/hello")["digest"],
        format!("sha256:{moved_digest}")
    );

    // corral pull resolves now and pre-warms; an unknown tag fails clearly.
    let (ok, out, err) = corral(dir, &["pull", "--policy", "push.toml", &hello_ref]);
    assert!(ok, "{err}");
    assert!(out.contains(&moved_digest), "{out}");
    let (ok, _, err) = corral(
        dir,
        &[
            "pull",
            "--policy",
            "push.toml",
            &format!("oci://{s}/apps/hello:nope"),
        ],
    );
    assert!(!ok && err.contains("no such tag"), "{err}");

    // Restarted with both registries down: the pinned versions serve.
    drop(daemon);
    secure.stop();
    plain.stop();
    let daemon = Corrald::start(dir, 2);
    serves(ports[0], "GET /");
    serves(ports[1], "Hello from corral!");
    serves(ports[2], "GET /");
    daemon.wait_log_line(&["hello", "serving what it last resolved to", &moved_digest]);

    // A reload that cannot resolve keeps the running versions.
    daemon.reload();
    daemon.wait_log_line(&["hello", "keeping the running one"]);
    serves(ports[0], "GET /");
    serves(ports[2], "GET /");
}

/// The bearer-token flow: the registry refuses, names its token realm;
/// corral asks the realm with the auth file's credentials and retries with
/// the token, for push, pull and corrald's fetch. Wrong credentials get a
/// clear error and no token.
#[test]
fn a_registry_with_bearer_token_auth_is_pushed_to_and_served_from() {
    if tools().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_tls(dir);
    let (realm, issued) = token_server(dir);
    let registry = Registry::start_with(dir, "tokens", Auth::Token { realm });
    let r = registry.host();
    private_file(&dir.join("good.json"), &auth_json(&r, USER, PASSWORD));
    private_file(&dir.join("bad.json"), &auth_json(&r, USER, "wrong"));
    let port = free_port();
    let policy = |auth: &str| {
        format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\napi-socket = \"api.sock\"\n\n\
             [registries.\"{r}\"]\nca-file = \"ca.pem\"\nauth-file = \"{auth}\"\n\n\
             [apps.hello]\nmodule = \"oci://{r}/team/hello:v1\"\nkind = \"http\"\n\
             listen = [\"127.0.0.1:{port}\"]\n\
             sandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n"
        )
    };
    std::fs::write(dir.join("bad.toml"), policy("bad.json")).unwrap();
    std::fs::write(dir.join("policy.toml"), policy("good.json")).unwrap();
    let hello = guest("http-hello.wasm");
    let reference = format!("oci://{r}/team/hello:v1");

    // Wrong password: the realm refuses, corral says so, nothing is pushed.
    let (ok, _, err) = corral(
        dir,
        &[
            "push",
            "--policy",
            "bad.toml",
            hello.to_str().unwrap(),
            &reference,
        ],
    );
    assert!(!ok);
    assert!(
        err.contains(&reference) && (err.contains("401") || err.to_lowercase().contains("auth")),
        "{err}"
    );
    assert_eq!(issued.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The right one: tokens are issued, the push lands.
    let (ok, out, err) = corral(
        dir,
        &[
            "push",
            "--policy",
            "policy.toml",
            hello.to_str().unwrap(),
            &reference,
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.trim()
            .starts_with(&format!("oci://{r}/team/hello@sha256:")),
        "{out}"
    );
    let after_push = issued.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after_push >= 1, "no token was asked for");

    // corral pull and corrald fetch through the same flow.
    let (ok, _, err) = corral(dir, &["pull", "--policy", "policy.toml", &reference]);
    assert!(ok, "{err}");
    let d = Corrald::start(dir, 0);
    serves(port, "Hello");
    assert!(issued.load(std::sync::atomic::Ordering::SeqCst) > after_push);
    // The credentials are in no log.
    let log = d.stderr.text();
    assert!(!log.contains(PASSWORD), "{log}");
}

#[test]
fn the_cli_runs_compiles_and_refuses_with_clear_errors() {
    if tools().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let plain = Registry::start(dir, "plain", false);
    let p = plain.host();
    std::fs::write(
        dir.join("push.toml"),
        format!("[daemon]\ncache-dir = \"cache\"\n\n[registries.\"{p}\"]\nplain-http = true\n"),
    )
    .unwrap();
    let exit3 = format!("oci://{p}/tools/exit3:v1");
    let (ok, _, err) = corral(
        dir,
        &[
            "push",
            "--policy",
            "push.toml",
            guest("exit3.wasm").to_str().unwrap(),
            &exit3,
        ],
    );
    assert!(ok, "{err}");

    let policy = |extra: &str| {
        format!(
            "[daemon]\ncache-dir = \"cache\"\nstate-dir = \"state\"\n\n\
             [registries.\"{p}\"]\nplain-http = true\n{extra}\n\
             [apps.cmd]\nmodule = \"{exit3}\"\nkind = \"command\"\n\
             sandbox = {{ landlock = \"best-effort\", seccomp = \"best-effort\" }}\n"
        )
    };
    std::fs::write(dir.join("policy.toml"), policy("")).unwrap();
    // corral check does not go to the registry, and finds nothing wrong.
    let (ok, out, err) = corral(dir, &["check", "--policy", "policy.toml"]);
    assert!(ok, "{out}{err}");
    // corral run --app fetches the app's module and runs it: it exits 3.
    let out = Command::new(CORRAL)
        .args(["run", "--policy", "policy.toml", "--app", "cmd"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // corral compile --policy fetches and compiles it.
    let (ok, out, err) = corral(dir, &["compile", "--policy", "policy.toml"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("cmd"), "{out}");

    // A plain-HTTP registry not named as one: HTTPS fails, and says why.
    let (ok, _, err) = corral(dir, &["pull", "--policy", "/dev/null", &exit3]);
    assert!(!ok);
    assert!(err.contains("plain-http = true"), "{err}");

    // Over limits.module-size: refused before the download.
    std::fs::write(
        dir.join("small.toml"),
        policy("").replace(
            "kind = \"command\"\n",
            "kind = \"command\"\nlimits = { module-size = \"16B\" }\n",
        ),
    )
    .unwrap();
    let (ok, _, err) = corral(dir, &["pull", "--policy", "small.toml", "cmd"]);
    assert!(!ok);
    assert!(err.contains("limits.module-size"), "{err}");

    // Policy mistakes name the file, line and key.
    std::fs::write(dir.join("auth.json"), "{}").unwrap();
    std::fs::set_permissions(
        dir.join("auth.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let bad = format!(
        "[registries.\"{p}\"]\nauth-file = \"auth.json\"\n\n\
         [apps.a]\nmodule = \"oci://{p}/tools/exit3\"\nkind = \"command\"\n"
    );
    std::fs::write(dir.join("bad.toml"), bad).unwrap();
    let (ok, out, err) = corral(dir, &["check", "--policy", "bad.toml"]);
    assert!(!ok);
    let text = format!("{out}{err}");
    assert!(
        text.contains(&format!("registries.{p}.auth-file")) || text.contains("auth-file"),
        "{text}"
    );
    assert!(text.contains("readable or writable by others"), "{text}");
    assert!(
        text.contains("apps.a.module") && text.contains("no tag or digest"),
        "{text}"
    );
}
