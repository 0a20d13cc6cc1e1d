//! The Wasm host: runs guests with exactly the capabilities and limits an
//! app is granted.
//!
//! - [`p1`]: WASI preview1 command modules (`_start`).
//! - [`p2`]: components: `wasi:cli/command` run once, and the store state
//!   shared with `wasi:http` (all of WASI 0.2 is linked, so http handlers
//!   that also import `wasi:cli` or `wasi:filesystem` link; imports at any
//!   0.2.x patch version link semver-compatibly).
//! - [`http`]: serving a `wasi:http/proxy` component with hyper, a fresh
//!   instance per request.
//! - [`limits`]: memory/instance/table limits and the epoch deadline.
//!
//! One engine shape for everything: async support and epoch interruption
//! are always on, so every guest call is `*_async` and can be timed out.
//! Nothing of the host process leaks into the guest unless [`GuestCaps`]
//! says so: no inherited env, no preopens, no network by default.

pub mod http;
pub mod limits;
pub mod log;
pub mod p1;
pub mod p2;
pub mod service;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use corral_policy::{Access, AppKind, AppSpec, ConnectTarget, DirGrant, GuestListen, Limits};
use wasmtime::Engine;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

pub use limits::{EpochTicker, LimitExceeded};

/// A loaded program: a core module or a component.
pub use corral_compiler::Program;

/// What a guest may use: everything it sees of the host comes from here.
#[derive(Debug, Clone)]
pub struct GuestCaps {
    /// `argv`, including `argv[0]`.
    pub argv: Vec<String>,
    /// The whole environment the guest sees.
    pub env: Vec<(String, String)>,
    pub dirs: Vec<DirGrant>,
    /// Outbound network (sockets and `wasi:http/outgoing-handler`).
    pub connect: Vec<ConnectTarget>,
    /// Where the guest may bind, listen and accept itself (TCP and UDP
    /// through WASI sockets): only `corral run --listen`; apps never.
    pub listen: Vec<GuestListen>,
    pub limits: Limits,
    pub stdio: StdioMode,
    /// `pool.reuse`: instance reuse for a WASI 0.3 http handler (`None`: a
    /// fresh instance per request).
    pub reuse: Option<corral_policy::Reuse>,
}

/// Where the guest's stdin, stdout and stderr go.
#[derive(Debug, Clone)]
pub enum StdioMode {
    /// The host process's own (`corral run`).
    Inherit,
    /// stdin empty; stdout and stderr to the host's stderr (serving, where
    /// the host's stdout is not the guest's to write).
    LogToStderr,
    /// stdin and stdout are one accepted connection (stdio apps, inetd
    /// style); stderr logged as [`StdioMode::Log`] does when the connection
    /// has a log ([`ConnectionStdio::with_log`]), else the host's stderr.
    Connection(ConnectionStdio),
    /// stdin empty; stdout and stderr logged line by line, tagged and
    /// bounded (corrald's http and command apps), see [`log`].
    Log(log::GuestLog),
}

/// The two halves of a connection, as a guest's stdin and stdout.
#[derive(Clone)]
pub struct ConnectionStdio {
    stdin: Arc<wasmtime_wasi::cli::AsyncStdinStream>,
    stdout: Arc<wasmtime_wasi::cli::AsyncStdoutStream>,
    /// Where the guest's stderr goes (`None`: the host's stderr).
    log: Option<log::GuestLog>,
}

impl ConnectionStdio {
    /// Stdio on `stream` (read half as stdin, write half as stdout).
    /// Needs a tokio runtime: reading runs in a task of its own.
    pub fn new<S>(stream: S) -> ConnectionStdio
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        ConnectionStdio {
            stdin: Arc::new(wasmtime_wasi::cli::AsyncStdinStream::new(read)),
            stdout: Arc::new(wasmtime_wasi::cli::AsyncStdoutStream::new(64 * 1024, write)),
            log: None,
        }
    }

    /// The guest's stderr logged, bounded and rate-limited by `log`
    /// (served apps), instead of written to the host's stderr.
    pub fn with_log(mut self, log: log::GuestLog) -> ConnectionStdio {
        self.log = Some(log);
        self
    }
}

impl std::fmt::Debug for ConnectionStdio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionStdio").finish_non_exhaustive()
    }
}

impl GuestCaps {
    /// The grants of a policy app. `argv[0]` is the app's name; `host_env`
    /// looks up the `inherit-env` names (only those) in the host.
    pub fn for_app(app: &AppSpec, host_env: impl Fn(&str) -> Option<String>) -> GuestCaps {
        let mut env: Vec<(String, String)> = Vec::new();
        for name in &app.inherit_env {
            if let Some(value) = host_env(name) {
                env.push((name.clone(), value));
            }
        }
        for (k, v) in &app.env {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        let mut argv = vec![app.name.clone()];
        argv.extend(app.args.iter().cloned());
        GuestCaps {
            argv,
            env,
            dirs: app.dirs.clone(),
            connect: app.network.connect.clone(),
            listen: Vec::new(),
            limits: app.limits,
            stdio: match app.kind {
                AppKind::Http => StdioMode::LogToStderr,
                AppKind::Stdio | AppKind::Command => StdioMode::Inherit,
            },
            reuse: app.pool.reuse,
        }
    }

    /// Nothing granted: no args beyond `argv0`, no env, dirs or network,
    /// default limits for `kind`.
    pub fn none(argv0: &str, kind: AppKind) -> GuestCaps {
        GuestCaps {
            argv: vec![argv0.to_string()],
            env: Vec::new(),
            dirs: Vec::new(),
            connect: Vec::new(),
            listen: Vec::new(),
            limits: corral_policy::defaults::limits(kind),
            stdio: StdioMode::Inherit,
            reuse: None,
        }
    }

    /// Whether a connection to `addr` (reached by `name`, if any) is granted.
    pub fn may_connect(&self, addr: SocketAddr, name: Option<&str>) -> bool {
        self.connect.iter().any(|t| t.allows(addr, name))
    }

    /// A WASI context builder with exactly these grants.
    ///
    /// `blocking`: do filesystem I/O on the calling thread (right for a
    /// single guest per thread, as `corral run`; wrong when guests share an
    /// executor).
    pub(crate) fn wasi_builder(&self, blocking: bool) -> anyhow::Result<WasiCtxBuilder> {
        let mut b = WasiCtxBuilder::new();
        b.args(&self.argv);
        b.envs(&self.env);
        match &self.stdio {
            StdioMode::Inherit => {
                b.inherit_stdio();
            }
            StdioMode::LogToStderr => {
                b.stdout(wasmtime_wasi::cli::stderr());
                b.stderr(wasmtime_wasi::cli::stderr());
            }
            StdioMode::Connection(conn) => {
                b.stdin(conn.stdin.clone());
                b.stdout(conn.stdout.clone());
                match &conn.log {
                    Some(log) => {
                        let (_, stderr) = log.streams();
                        b.stderr(stderr);
                    }
                    None => {
                        b.stderr(wasmtime_wasi::cli::stderr());
                    }
                }
            }
            StdioMode::Log(log) => {
                let (stdout, stderr) = log.streams();
                b.stdout(stdout);
                b.stderr(stderr);
            }
        }
        // Before the preopens: each preopen records this setting.
        b.allow_blocking_current_thread(blocking);
        for d in &self.dirs {
            let perms = match d.access {
                Access::ReadOnly => FsPerms::ReadOnly,
                Access::ReadWrite => FsPerms::ReadWrite,
            };
            b.preopened_dir(&d.host, &d.guest, perms)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("preopening {} as {}", d.host.display(), d.guest))?;
        }
        let sockets = !self.connect.is_empty() || !self.listen.is_empty();
        b.allow_tcp(sockets);
        b.allow_udp(sockets);
        // Name lookup only helps reach `connect` entries given by name, and
        // the resolved address must still be granted by address.
        b.allow_ip_name_lookup(false);
        let grants = Arc::new((self.connect.clone(), self.listen.clone()));
        b.socket_addr_check(move |addr, usage| {
            let grants = grants.clone();
            Box::pin(async move { socket_allowed(&grants.0, &grants.1, addr, usage) })
        });
        Ok(b)
    }
}

/// The rule for wasi:sockets: connect/send only to granted addresses;
/// binds the implicit ephemeral bind of an outbound socket, and what a
/// listen grant (`corral run --listen`) names; listen and accept only with
/// a listen grant; datagrams received only from granted peers, or by a
/// guest granted to listen.
fn socket_allowed(
    connect: &[ConnectTarget],
    listen: &[GuestListen],
    addr: SocketAddr,
    usage: SocketAddrUse,
) -> bool {
    let connects = || connect.iter().any(|t| t.allows(addr, None));
    let listens = || listen.iter().any(|l| l.allows(addr));
    match usage {
        SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend => connects(),
        SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
            (!connect.is_empty() && addr.ip().is_unspecified() && addr.port() == 0) || listens()
        }
        SocketAddrUse::TcpListen => listens(),
        SocketAddrUse::TcpAccept => !listen.is_empty(),
        SocketAddrUse::UdpReceive => !listen.is_empty() || connects(),
    }
}

/// How a run ended, and the exit code `corral run` gives it.
#[derive(Debug)]
pub enum RunOutcome {
    /// The guest returned or called exit.
    Exited(i32),
    /// The guest trapped (or a host call failed fatally).
    Trapped(wasmtime::Error),
    /// The guest went over a limit.
    Limit(LimitExceeded, wasmtime::Error),
}

/// Exit codes of `corral run` besides the guest's own (documented in
/// `corral run --help` and docs/run.md).
pub mod exit_code {
    /// limits.timeout exceeded (as timeout(1)).
    pub const TIMEOUT: u8 = 124;
    /// corral could not run the guest (load, compile, link, bad grant).
    pub const HOST_ERROR: u8 = 125;
    /// The guest trapped.
    pub const TRAP: u8 = 126;
    /// limits.memory, limits.instances or limits.tables exceeded.
    pub const LIMIT: u8 = 127;
}

impl RunOutcome {
    /// Classify the result of running guest code.
    pub fn from_result(result: wasmtime::Result<i32>, limits: &Limits) -> RunOutcome {
        match result {
            Ok(code) => RunOutcome::Exited(code),
            Err(err) => {
                if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    return RunOutcome::Exited(exit.0);
                }
                match LimitExceeded::find(&err, limits) {
                    Some(limit) => RunOutcome::Limit(limit, err),
                    None => RunOutcome::Trapped(err),
                }
            }
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            RunOutcome::Exited(code) => (*code).clamp(0, 255) as u8,
            RunOutcome::Trapped(_) => exit_code::TRAP,
            RunOutcome::Limit(LimitExceeded::Timeout { .. }, _) => exit_code::TIMEOUT,
            RunOutcome::Limit(..) => exit_code::LIMIT,
        }
    }

    /// Say on stderr why the guest stopped, if it did not simply exit:
    /// the limit by name, or the trap with the guest's backtrace.
    pub fn report(&self, what: &str) {
        match self {
            RunOutcome::Exited(_) => {}
            RunOutcome::Limit(limit, err) => eprintln!("{limit}\n{}", describe(what, err)),
            RunOutcome::Trapped(err) => {
                eprintln!("corral: {what} trapped\n{}", describe(what, err))
            }
        }
    }
}

/// An error's chain, one cause per paragraph: for a trap that is the
/// guest's backtrace (function names from the name section) and the
/// reason. Never the host's Rust backtrace.
fn describe(what: &str, err: &wasmtime::Error) -> String {
    let mut out = format!("{what}:");
    for cause in err.chain() {
        out.push('\n');
        for line in cause.to_string().lines() {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.trim_end().to_string()
}

/// What kind of guest a component is, from its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    /// Exports `wasi:cli/run@0.2.x`.
    Command,
    /// Exports `wasi:cli/run@0.3.x`.
    Command3,
    /// Exports `wasi:http/incoming-handler@0.2.x`.
    HttpProxy,
    /// Exports `wasi:http/handler@0.3.x` (the `wasi:http/service` world).
    HttpService,
}

/// Classify a component by its exports. An http export wins over a
/// `wasi:cli/run` one (toolchains export both from a service), and 0.3
/// over 0.2.
pub fn component_kind(
    engine: &Engine,
    component: &wasmtime::component::Component,
) -> Option<ComponentKind> {
    let ty = component.component_type();
    let names: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if has(corral_compiler::preflight::HTTP_SERVICE) {
        Some(ComponentKind::HttpService)
    } else if has(corral_compiler::preflight::HTTP_HANDLER) {
        Some(ComponentKind::HttpProxy)
    } else if has(corral_compiler::preflight::CLI_RUN_03) {
        Some(ComponentKind::Command3)
    } else if has(corral_compiler::preflight::CLI_RUN) {
        Some(ComponentKind::Command)
    } else {
        None
    }
}

/// The engine for `opts` (the compiler's configuration: epoch
/// interruption, component model, pooling allocator with copy-on-write
/// memory images when `opts` asks for it). When the pool's address-space
/// reservation fails, the engine allocates on demand; that is said on
/// stderr.
pub fn new_engine(opts: &corral_compiler::EngineOptions) -> anyhow::Result<Engine> {
    let built = corral_compiler::build_engine(opts, None)?;
    if let corral_compiler::Allocation::OnDemandFallback { reason } = &built.allocation {
        eprintln!(
            "corral: pooling allocator unavailable ({reason}); allocating instances on demand"
        );
    }
    Ok(built.engine)
}

/// Load `source` for `engine` through the artifact cache in `cache`
/// (compiled once per module, engine and target). The artifact's file
/// stays open while it is held (the cache keeps in-use entries).
pub fn load_artifact(
    engine: &Engine,
    source: &Path,
    cache: &Path,
) -> anyhow::Result<corral_compiler::Artifact> {
    let cache = corral_compiler::Cache::open(cache)
        .with_context(|| format!("opening the artifact cache {}", cache.display()))?;
    Ok(cache.load_or_compile(engine, source)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An app from a policy text (its module is one of the test guests).
    pub(crate) fn app(extra: &str) -> AppSpec {
        let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/exit3.wasm");
        let text = format!(
            "[apps.t]\nmodule = {:?}\nkind = \"command\"\n{extra}",
            module.display().to_string()
        );
        let policy = corral_policy::parse_str(
            &text,
            Path::new("/tmp/test-policy.toml"),
            &corral_policy::Environment::default(),
        )
        .unwrap_or_else(|e| panic!("{:?}", e.diagnostics()));
        policy.apps["t"].clone()
    }

    #[test]
    fn env_is_only_what_the_app_grants() {
        let app = app("args = [\"a\"]\nenv = { A = \"1\", SHADOWED = \"app\" }\n\
             inherit-env = [\"HOST_X\", \"SHADOWED\", \"UNSET\"]\n");
        let host = |name: &str| match name {
            "HOST_X" => Some("x".to_string()),
            "SHADOWED" => Some("host".to_string()),
            "HOST_SECRET" => Some("secret".to_string()),
            _ => None,
        };
        let caps = GuestCaps::for_app(&app, host);
        let mut env = caps.env.clone();
        env.sort();
        let expected = [("A", "1"), ("HOST_X", "x"), ("SHADOWED", "app")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(env, expected);
        assert_eq!(caps.argv, ["t", "a"]);
    }

    #[test]
    fn sockets_connect_only_to_network_connect() {
        let app = app("network = { connect = [\"127.0.0.1:5432\"] }\n");
        let connect = &app.network.connect;
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(socket_allowed(
            connect,
            &[],
            at("127.0.0.1:5432"),
            SocketAddrUse::TcpConnect
        ));
        assert!(!socket_allowed(
            connect,
            &[],
            at("127.0.0.1:5433"),
            SocketAddrUse::TcpConnect
        ));
        assert!(!socket_allowed(
            connect,
            &[],
            at("10.0.0.1:5432"),
            SocketAddrUse::UdpSend
        ));
        // The implicit ephemeral bind of a client socket, nothing else.
        assert!(socket_allowed(
            connect,
            &[],
            at("0.0.0.0:0"),
            SocketAddrUse::TcpBind
        ));
        assert!(!socket_allowed(
            connect,
            &[],
            at("0.0.0.0:8080"),
            SocketAddrUse::TcpBind
        ));
        assert!(!socket_allowed(
            connect,
            &[],
            at("0.0.0.0:0"),
            SocketAddrUse::TcpListen
        ));
        // No grants: not even the bind.
        assert!(!socket_allowed(
            &[],
            &[],
            at("0.0.0.0:0"),
            SocketAddrUse::TcpBind
        ));
    }

    #[test]
    fn sockets_bind_listen_and_accept_only_with_a_listen_grant() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let listen: Vec<GuestListen> = vec!["127.0.0.1:0".parse().unwrap()];
        let allowed = |addr: &str, usage| socket_allowed(&[], &listen, at(addr), usage);
        assert!(allowed("127.0.0.1:0", SocketAddrUse::TcpBind));
        assert!(allowed("127.0.0.1:40000", SocketAddrUse::TcpListen));
        assert!(allowed("127.0.0.1:40000", SocketAddrUse::UdpBind));
        assert!(allowed("10.0.0.7:5555", SocketAddrUse::TcpAccept));
        assert!(!allowed("0.0.0.0:0", SocketAddrUse::TcpBind));
        assert!(!allowed("0.0.0.0:0", SocketAddrUse::TcpListen));
        assert!(!allowed("[::1]:0", SocketAddrUse::TcpBind));
        // A listen grant connects nowhere.
        assert!(!allowed("127.0.0.1:40000", SocketAddrUse::TcpConnect));
        // Without one: no listen, no accept, no unsolicited datagrams.
        for usage in [SocketAddrUse::TcpListen, SocketAddrUse::TcpAccept] {
            assert!(!socket_allowed(&[], &[], at("127.0.0.1:1"), usage));
        }
        let connect = vec![ConnectTarget::any()];
        assert!(socket_allowed(
            &connect,
            &[],
            at("192.0.2.1:53"),
            SocketAddrUse::UdpSend
        ));
        assert!(socket_allowed(
            &connect,
            &[],
            at("192.0.2.1:53"),
            SocketAddrUse::UdpReceive
        ));
        assert!(!socket_allowed(
            &connect,
            &[],
            at("127.0.0.1:0"),
            SocketAddrUse::TcpListen
        ));
    }
}
