//! `corral run`: run a module or component once with the grants of the
//! command line (or of a policy app), or serve an http component locally.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use corral_compiler::EngineOptions;
use corral_policy::{
    Access, AppKind, AppSpec, ConnectTarget, DirGrant, Enforcement, Environment, GuestListen,
    ListenAddr,
};

use corral_runtime::guest::Guest;
use corral_runtime::host::{
    self, ComponentKind, GuestCaps, LimitExceeded, Program, StdioMode, exit_code,
};
use corral_runtime::sandbox::{self, SandboxPlan};

const RUN_EXIT_CODES: &str = "\
Examples:
  corral run --dir ./data::/data:ro --env LANG=C app.wasm -- --verbose
  corral run --connect 127.0.0.1:5432 --connect api.example.com:443 client.wasm
  corral run --listen 127.0.0.1:0 --connect any tcp-server.wasm
  corral run --serve 127.0.0.1:0 --connect 127.0.0.1:8081 handler.wasm
  corral run --policy /etc/corral/policy.toml --app web --serve 127.0.0.1:8080

Exit codes:
  0-123  the guest's own exit code (wasi exit / proc_exit; a command
         component whose run returns an error exits 1)
  124    the guest exceeded limits.timeout
  125    corral could not run the guest (unreadable or invalid module,
         missing import, bad --dir, unknown --app)
  126    the guest trapped (its backtrace is printed on stderr)
  127    the guest exceeded limits.memory, limits.instances or limits.tables
  2      bad command line";

/// Run a WebAssembly program once: a WASI preview1 command module, a
/// `wasi:cli/command` component, or (with --serve) a `wasi:http/proxy`
/// component. The guest gets nothing it is not granted: no host env, no
/// directories, no network.
#[derive(Debug, clap::Args)]
#[command(after_help = RUN_EXIT_CODES)]
pub struct RunCommand {
    /// Preopen host directory HOST as GUEST (an absolute guest path;
    /// default: the same path), read-write unless `:ro` is appended.
    #[arg(long = "dir", value_name = "HOST[::GUEST][:ro]")]
    pub dirs: Vec<String>,

    /// Set a guest environment variable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub envs: Vec<String>,

    /// Let the guest connect to HOST:PORT (TCP and UDP through WASI
    /// sockets, and outgoing HTTP requests), as an entry of the policy's
    /// network.connect does; `any` lets it connect anywhere (landlock then
    /// leaves TCP connects unrestricted). Repeatable.
    #[arg(long = "connect", value_name = "HOST:PORT|any", value_parser = parse_connect)]
    pub connect: Vec<ConnectTarget>,

    /// Let the guest bind and listen on IP:PORT itself (a TCP or UDP
    /// server through WASI sockets) and accept connections there; port 0
    /// means any port on that address (the one the kernel picks included),
    /// `any` every address and port. Datagrams it sends need --connect.
    /// Repeatable.
    #[arg(long = "listen", value_name = "IP:PORT|any", value_parser = parse_listen)]
    pub listen: Vec<GuestListen>,

    /// Take the grants and limits of an app from this policy (with --app).
    #[arg(long, value_name = "PATH", requires = "app")]
    pub policy: Option<PathBuf>,

    /// The app of --policy whose grants apply; FILE defaults to its module.
    #[arg(long, value_name = "NAME", requires = "policy")]
    pub app: Option<String>,

    #[command(flatten)]
    pub cache: super::CacheDirArgs,

    /// Wall-clock limit for the run (overrides limits.timeout), e.g. `5s`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,

    /// Linear memory limit (overrides limits.memory), e.g. `64MiB`.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<bytesize::ByteSize>,

    /// Serve an http component on ADDR (e.g. 127.0.0.1:8080; port 0 picks
    /// a free one) instead of running once, exactly as a corrald worker
    /// serves (HTTP/1.1 keep-alive, HTTP/2 with prior knowledge, a fresh
    /// instance per request, at most pool.concurrency at once). The first
    /// line on stderr is `Serving HTTP on http://IP:PORT/`, with the port
    /// bound; SIGTERM or Ctrl-C finishes the requests in flight and exits 0.
    #[arg(long, value_name = "ADDR")]
    pub serve: Option<SocketAddr>,

    /// Do not enter the OS sandbox (landlock, seccomp, rlimits) before
    /// running the guest. Without a policy the sandbox is best-effort:
    /// layers this kernel lacks are left out and named on stderr.
    #[arg(long)]
    pub no_sandbox: bool,

    /// The module or component (.wasm or .wat).
    #[arg(value_name = "FILE", required_unless_present = "app")]
    pub file: Option<PathBuf>,

    /// Arguments for the guest (argv[1..]).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

impl RunCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        match self.run() {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("corral: {e:#}");
                Ok(ExitCode::from(exit_code::HOST_ERROR))
            }
        }
    }

    fn run(self) -> anyhow::Result<ExitCode> {
        // What this process inherited (closed by the sandbox) as opposed to
        // what it opens from here on (the artifact, wasmtime's own fds).
        let inherited = sandbox::open_fds();
        let Grants {
            file,
            mut caps,
            engine_options,
            cache_dir,
            app,
        } = self.grants()?;
        let engine = host::new_engine(&engine_options)?;
        let what = file.display().to_string();
        let artifact = match host::load_artifact(&engine, &file, &cache_dir) {
            Ok(artifact) => artifact,
            // A pooled engine refuses a module with more tables than
            // limits.tables when it loads it, before any instance exists.
            Err(err) => match LimitExceeded::from_message(&format!("{err:#}"), &caps.limits) {
                Some(limit) => {
                    eprintln!("{limit}\n{what}: {err:#}");
                    return Ok(ExitCode::from(exit_code::LIMIT));
                }
                None => return Err(err),
            },
        };

        if !self.no_sandbox && !artifact.cache_hit && std::env::var_os(REEXEC_ENV).is_none() {
            // Compiling started worker threads, and the sandbox can only be
            // entered by a single-threaded process: start over, now loading
            // from the cache.
            return Err(sandbox::reexec_self(REEXEC_ENV));
        }
        let kind = match (&artifact.program, self.serve) {
            (Program::Module(_), None) => AppKind::Command,
            (Program::Module(_), Some(_)) => bail!(
                "{what}: a core module cannot be served; --serve needs a wasi:http/proxy component"
            ),
            (Program::Component(component), serve) => {
                match (host::component_kind(&engine, component), serve) {
                    (Some(ComponentKind::Command | ComponentKind::Command3), None) => {
                        AppKind::Command
                    }
                    (Some(ComponentKind::HttpProxy | ComponentKind::HttpService), Some(_)) => {
                        AppKind::Http
                    }
                    (Some(k @ (ComponentKind::HttpProxy | ComponentKind::HttpService)), None) => {
                        let world = if k == ComponentKind::HttpProxy {
                            "wasi:http/proxy@0.2"
                        } else {
                            "wasi:http/service@0.3"
                        };
                        bail!(
                            "{what} is a {world} component: serve it with `corral run --serve 127.0.0.1:8080 {what}`"
                        )
                    }
                    (Some(ComponentKind::Command | ComponentKind::Command3), Some(_)) => bail!(
                        "{what} is a wasi:cli/command component; --serve needs a wasi:http handler (wasi:http/proxy@0.2 or wasi:http/service@0.3)"
                    ),
                    (None, _) => bail!(
                        "{what} exports neither wasi:cli/run (0.2.x or 0.3.x) nor a wasi:http handler (wasi:http/incoming-handler@0.2.x or wasi:http/handler@0.3.x)"
                    ),
                }
            }
        };
        // Bound before the sandbox, which allows no bind.
        let listener = match self.serve {
            Some(addr) => {
                Some(std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?)
            }
            None => None,
        };
        let app = match app {
            Some(app) => app,
            None => cli_app_spec(&file, self.serve)?,
        };
        let plan = if self.no_sandbox {
            None
        } else {
            let mut plan = SandboxPlan::for_app(&app);
            plan.allow_dirs(&caps.dirs);
            plan.allow_connect(&caps.connect);
            plan.allow_listen(&caps.listen);
            // Everything opened since start: the artifact (and wasmtime's
            // mapping of it), the cache lock, the listener.
            plan.keep_fds_opened_since(&inherited);
            Some(plan)
        };
        if kind == AppKind::Http {
            caps.stdio = StdioMode::LogToStderr;
        }
        let guest = Guest::prepare(&engine, artifact.program, kind, caps, &what)?;
        // Before any thread (tokio, the epoch ticker) starts.
        let guest = guest.enter_standalone(plan)?;
        if let Some(listener) = &listener {
            // The first line on stderr, before any other: test runners
            // (the WASI testsuite's among them) read the address from it.
            eprintln!("Serving HTTP on http://{}/", listener.local_addr()?);
        }
        for missing in guest
            .layers()
            .map(|l| l.missing.as_slice())
            .unwrap_or_default()
        {
            eprintln!("corral: sandbox: not enforced: {missing}");
        }
        match listener {
            None => {
                let outcome = guest.run_once()?;
                outcome.report(&what);
                Ok(ExitCode::from(outcome.exit_code()))
            }
            Some(listener) => {
                guest.serve(&app, vec![listener.into()])?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    /// The program to run, everything it is granted, and how to load it.
    fn grants(&self) -> anyhow::Result<Grants> {
        let kind = if self.serve.is_some() {
            AppKind::Http
        } else {
            AppKind::Command
        };
        let (file, mut caps, mut engine_options, cache_dir, app) = match (&self.policy, &self.app) {
            (Some(policy), Some(name)) => {
                let policy = corral_policy::load(policy, &Environment::from_process())
                    .map_err(|e| anyhow::anyhow!("{}", diagnostics(&e)))?;
                let Some(app) = policy.apps.get(name) else {
                    let names: Vec<&str> = policy.apps.keys().map(String::as_str).collect();
                    bail!(
                        "no app `{name}` in the policy (it has: {})",
                        names.join(", ")
                    );
                };
                let caps = GuestCaps::for_app(app, |n| std::env::var(n).ok());
                let cache_dir = self.cache.resolve(Some(&policy))?;
                let file = match (&self.file, &app.oci) {
                    (Some(file), _) => {
                        super::pull::file_or_fetched(file, Some(&policy), &self.cache)?
                    }
                    (None, Some(r)) => {
                        super::pull::fetch(r, Some(&policy), &cache_dir, app.limits.module_size)?
                            .path
                    }
                    (None, None) => app.module.clone(),
                };
                (
                    file,
                    caps,
                    EngineOptions::for_app(app),
                    cache_dir,
                    Some(app.clone()),
                )
            }
            _ => {
                let written = self.file.clone().context("FILE is required")?;
                // An oci:// FILE is fetched first; argv[0] is the
                // repository's last component then.
                let file = super::pull::file_or_fetched(&written, None, &self.cache)?;
                let argv0 = written
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .map(|n| n.split([':', '@']).next().unwrap_or_default().to_string())
                    .unwrap_or_else(|| file.display().to_string());
                let cache_dir = self.cache.resolve(None)?;
                let engine_options = match self.serve {
                    // Serving: the pooling allocator with copy-on-write
                    // images, as an http app's worker has.
                    Some(_) => EngineOptions::for_app(&cli_app_spec(&file, self.serve)?),
                    None => EngineOptions::default_for_cli(),
                };
                (
                    file.clone(),
                    GuestCaps::none(&argv0, kind),
                    engine_options,
                    cache_dir,
                    None,
                )
            }
        };
        caps.argv.extend(self.args.iter().cloned());
        for kv in &self.envs {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--env {kv}: expected NAME=VALUE");
            };
            caps.env.retain(|(name, _)| name != k);
            caps.env.push((k.to_string(), v.to_string()));
        }
        for spec in &self.dirs {
            caps.dirs.push(parse_dir(spec)?);
        }
        for target in &self.connect {
            if !caps.connect.contains(target) {
                caps.connect.push(target.clone());
            }
        }
        for grant in &self.listen {
            if !caps.listen.contains(grant) {
                caps.listen.push(*grant);
            }
        }
        if let Some(t) = self.timeout {
            caps.limits.timeout = Some(t);
        }
        if let Some(m) = self.memory {
            caps.limits.memory = m.as_u64();
            engine_options.memory_limit = m.as_u64();
        }
        Ok(Grants {
            file,
            caps,
            engine_options,
            cache_dir,
            app,
        })
    }
}

/// What [`RunCommand::grants`] decided.
struct Grants {
    file: PathBuf,
    caps: GuestCaps,
    engine_options: EngineOptions,
    cache_dir: PathBuf,
    /// The policy's app, when --policy/--app named one.
    app: Option<AppSpec>,
}

/// Set in the environment of `corral run` started again by itself.
const REEXEC_ENV: &str = "CORRAL_RUN_REEXEC";

/// The app spec the sandbox of a policy-less `corral run` is planned from:
/// the file, the kind, best-effort layers (what this kernel has); the
/// command line's dirs are added to the plan by the caller.
fn cli_app_spec(file: &Path, serve: Option<SocketAddr>) -> anyhow::Result<AppSpec> {
    let (kind, listen) = match serve {
        // The policy wants a named port; the sandbox plan only needs one.
        Some(addr) if addr.port() == 0 => (AppKind::Http, Some(SocketAddr::new(addr.ip(), 9))),
        Some(addr) => (AppKind::Http, Some(addr)),
        None => (AppKind::Command, None),
    };
    let mut app = AppSpec::builder("run", file, kind).sandbox(Enforcement::BestEffort);
    if let Some(addr) = listen {
        app = app.listen(ListenAddr::Tcp(addr));
    }
    Ok(app.build()?)
}

/// `--connect`: as an entry of network.connect, or `any`.
fn parse_connect(text: &str) -> Result<ConnectTarget, String> {
    if text == "any" {
        return Ok(ConnectTarget::any());
    }
    text.parse()
        .map_err(|e: String| format!("{e}, or \"any\" for every address"))
}

/// `--listen`: `IP:PORT` (port 0: any port there) or `any`.
fn parse_listen(text: &str) -> Result<GuestListen, String> {
    text.parse()
}

/// `HOST[::GUEST][:ro|:rw]`.
fn parse_dir(spec: &str) -> anyhow::Result<DirGrant> {
    let (rest, access) = if let Some(r) = spec.strip_suffix(":ro") {
        (r, Access::ReadOnly)
    } else if let Some(r) = spec.strip_suffix(":rw") {
        (r, Access::ReadWrite)
    } else {
        (spec, Access::ReadWrite)
    };
    let (host, guest) = match rest.split_once("::") {
        Some((h, g)) => (h.to_string(), g.to_string()),
        None => {
            let abs =
                std::path::absolute(Path::new(rest)).with_context(|| format!("--dir {spec}"))?;
            (rest.to_string(), abs.display().to_string())
        }
    };
    DirGrant::new(PathBuf::from(host), &guest, access)
        .map_err(|e| anyhow::anyhow!("--dir {spec}: {e}"))
}

fn diagnostics(e: &corral_policy::PolicyError) -> String {
    let d = e.diagnostics();
    if d.is_empty() {
        e.to_string()
    } else {
        d.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_specs() {
        let tmp = std::env::temp_dir();
        let t = tmp.display();
        let g = parse_dir(&format!("{t}::/data:ro")).unwrap();
        assert_eq!((g.guest.as_str(), g.access), ("/data", Access::ReadOnly));
        let g = parse_dir(&format!("{t}::/")).unwrap();
        assert_eq!((g.guest.as_str(), g.access), ("/", Access::ReadWrite));
        assert!(parse_dir(&format!("{t}::data")).is_err());
    }

    #[test]
    fn connect_and_listen_specs() {
        assert!(parse_connect("any").unwrap().is_any());
        assert_eq!(
            parse_connect("127.0.0.1:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        let err = parse_connect("127.0.0.1").unwrap_err();
        assert!(
            err.contains("not a connect target") && err.contains("any"),
            "{err}"
        );
        assert_eq!(parse_listen("any").unwrap(), GuestListen::Any);
        assert_eq!(parse_listen("[::1]:0").unwrap().to_string(), "[::1]:0");
        assert!(parse_listen("localhost:80").is_err());
    }
}
