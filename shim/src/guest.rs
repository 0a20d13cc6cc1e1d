//! The task's process: `containerd-shim-corral-v1 guest <plan>`, started
//! by the shim at `create`, one per container. It joins the container's
//! namespaces, loads the module's artifact from corral's cache, waits for
//! `start`, enters corral's sandbox (landlock, seccomp, rlimits) and runs
//! the guest with corral's host. Its exit status is the container's.

use std::io::Read as _;
use std::net::TcpListener;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use corral_compiler::EngineOptions;
use corral_policy::{Access, AppKind, AppSpec, DirGrant, Enforcement, ListenAddr};
use corral_runtime::guest::Guest;
use corral_runtime::host::{self, ComponentKind, GuestCaps, Program, StdioMode, exit_code};
use corral_runtime::sandbox::{self, SandboxPlan};

use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::plan::{Mode, Namespace, TaskPlan};

/// The fd on which the shim says "start" (one byte) or gives up (EOF).
pub(crate) const START_FD: i32 = 3;
/// Set when the task's process started itself again after compiling.
const REEXEC_ENV: &str = "CORRAL_SHIM_GUEST_REEXEC";

/// The engine every shim task uses: the same as `corral run`'s, so the
/// same artifacts serve both (pooling would not change compiled code).
pub(crate) fn engine_options() -> EngineOptions {
    EngineOptions::default_for_cli()
}

pub(crate) fn main(plan: &Path) -> ExitCode {
    match run(plan) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corral-shim: {e:#}");
            ExitCode::from(exit_code::HOST_ERROR)
        }
    }
}

fn run(plan_path: &Path) -> anyhow::Result<ExitCode> {
    let plan = TaskPlan::read(plan_path)?;
    let reexec = std::env::var_os(REEXEC_ENV).is_some();
    if !reexec {
        // Single-threaded here: setns(CLONE_NEWNS) and friends need that.
        enter_namespaces(&plan.namespaces, plan.hostname.as_deref())?;
    }
    if plan.mode == Mode::Pause {
        if !wait_for_start()? {
            return Ok(ExitCode::SUCCESS);
        }
        loop {
            // No signal is handled, so SIGTERM/SIGKILL end the process;
            // nothing unparks this thread (and a spurious wake loops).
            std::thread::park();
        }
    }

    // Inherited: 0-2 and the start fd. Everything opened from here on is
    // the guest's (artifact, cache lock, listener, preopens) and is kept.
    let mut inherited = sandbox::open_fds();
    let engine = host::new_engine(&engine_options())?;
    let artifact = host::load_artifact(&engine, &plan.module, &plan.cache_dir)?;
    if !artifact.cache_hit && !reexec {
        // The shim compiles at create, so this is rare (a cache wiped in
        // between). Compiling started threads, and the sandbox needs a
        // single-threaded process: start over, loading from the cache.
        return Err(sandbox::reexec_self(REEXEC_ENV));
    }

    let kind = match &artifact.program {
        Program::Module(_) => None,
        Program::Component(c) => Some(host::component_kind(&engine, c).with_context(
            || "the component exports neither wasi:cli/run (0.2.x or 0.3.x) nor a wasi:http handler (wasi:http/incoming-handler@0.2.x or wasi:http/handler@0.3.x)",
        )?),
    };
    let http = matches!(
        kind,
        Some(ComponentKind::HttpProxy | ComponentKind::HttpService)
    );
    let app = app_spec(&plan, http)?;

    let mut caps = GuestCaps::none(
        plan.argv.first().map(String::as_str).unwrap_or("main.wasm"),
        app.kind,
    );
    caps.argv = plan.argv.clone();
    if caps.argv.is_empty() {
        caps.argv.push("main.wasm".to_string());
    }
    caps.env = plan.env.clone();
    if let Some(limit) = plan.memory_limit {
        caps.limits.memory = limit;
    }
    caps.stdio = StdioMode::Inherit;
    if plan.rootfs.is_dir() {
        let root = DirGrant::new(plan.rootfs.clone(), "/", Access::ReadWrite)
            .map_err(|e| anyhow::anyhow!("the root filesystem: {e}"))?;
        caps.dirs.push(root);
    }

    if !wait_for_start()? {
        return Ok(ExitCode::SUCCESS);
    }
    // The start fd is closed now; a new fd may reuse its number.
    inherited.retain(|&fd| fd != START_FD);
    // Bound before the sandbox, which allows no bind.
    let listener = if http {
        Some(TcpListener::bind(plan.listen).with_context(|| format!("binding {}", plan.listen))?)
    } else {
        None
    };

    let mut sandbox = SandboxPlan::for_app(&app);
    sandbox.allow_dirs(&caps.dirs);
    // Everything opened since start: the artifact (and wasmtime's
    // mapping of it), the cache lock, the listener.
    sandbox.keep_fds_opened_since(&inherited);
    let what = plan.argv.first().cloned().unwrap_or_default();
    let guest = Guest::prepare(&engine, artifact.program, app.kind, caps, &what)?;
    // Before any thread (tokio, the epoch ticker) starts.
    let guest = guest.enter_standalone(Some(sandbox))?;
    for missing in guest
        .layers()
        .map(|l| l.missing.as_slice())
        .unwrap_or_default()
    {
        eprintln!("corral-shim: sandbox (best-effort): {missing}");
    }
    match listener {
        None => {
            let outcome = guest.run_once()?;
            outcome.report(&what);
            Ok(ExitCode::from(outcome.exit_code()))
        }
        Some(listener) => {
            // Served exactly as a corrald worker serves (HTTP/1.1, HTTP/2,
            // pool.concurrency); SIGTERM drains.
            eprintln!("corral-shim: serving HTTP on {}", listener.local_addr()?);
            guest.serve(&app, vec![listener.into()])?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Blocks until the shim says start (`true`) or closes the pipe (`false`).
fn wait_for_start() -> anyhow::Result<bool> {
    // The shim hands the read end of its start pipe over as START_FD.
    let fd = crate::sys::take_inherited_fd(START_FD).context("the start pipe (fd 3)")?;
    let mut pipe = std::fs::File::from(fd);
    let mut byte = [0u8; 1];
    loop {
        match pipe.read(&mut byte) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("waiting for start"),
        }
    }
}

/// The sandbox's view of the task: a policy app like `corral run`'s,
/// `command` or `http` (listening on the plan's address).
fn app_spec(plan: &TaskPlan, http: bool) -> anyhow::Result<AppSpec> {
    let kind = if http {
        AppKind::Http
    } else {
        AppKind::Command
    };
    let enforcement = match sandbox_enforcement() {
        "require" => Enforcement::Require,
        _ => Enforcement::BestEffort,
    };
    let mut app = AppSpec::builder("task", &plan.module, kind).sandbox(enforcement);
    if http {
        app = app.listen(ListenAddr::Tcp(plan.listen));
    }
    app.build()
        .map_err(|e| anyhow::anyhow!("the task's sandbox policy: {e}"))
}

/// `require` or `best-effort` (the default): from CORRAL_SHIM_SANDBOX in
/// the task's environment, which the shim passes on from containerd's.
pub(crate) fn sandbox_enforcement() -> &'static str {
    match std::env::var(crate::SANDBOX_ENV).as_deref() {
        Ok("require") => "require",
        _ => "best-effort",
    }
}

/// Join (path given) or create (no path) the spec's namespaces. A new pid
/// namespace is not made: the guest runs as one process and needs no
/// init; the user namespace is refused when the plan is made.
fn enter_namespaces(namespaces: &[Namespace], hostname: Option<&str>) -> anyhow::Result<()> {
    let mut new_uts = false;
    for ns in namespaces {
        let (kind, flag) = match ns.kind.as_str() {
            "network" => (LinkNameSpaceType::Network, UnshareFlags::NEWNET),
            "ipc" => (
                LinkNameSpaceType::InterProcessCommunication,
                UnshareFlags::NEWIPC,
            ),
            "uts" => (
                LinkNameSpaceType::HostNameAndNISDomainName,
                UnshareFlags::NEWUTS,
            ),
            "mount" => (LinkNameSpaceType::Mount, UnshareFlags::NEWNS),
            "cgroup" => (LinkNameSpaceType::ControlGroup, UnshareFlags::NEWCGROUP),
            "pid" => continue,
            other => bail!("namespace type `{other}` is not supported"),
        };
        match &ns.path {
            Some(path) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("opening namespace {}", path.display()))?;
                rustix::thread::move_into_link_name_space(file.as_fd(), Some(kind))
                    .with_context(|| format!("joining {} namespace {}", ns.kind, path.display()))?;
            }
            None => {
                // This process is single-threaded (freshly executed, no
                // threads yet): run() calls this first.
                crate::sys::unshare_single_threaded(flag)
                    .with_context(|| format!("creating a {} namespace", ns.kind))?;
                if flag == UnshareFlags::NEWNS {
                    // Nothing mounted here may reach the host.
                    crate::sys::make_mounts_private()
                        .context("making the new mount namespace private")?;
                }
                if flag == UnshareFlags::NEWNET {
                    bring_loopback_up()?;
                }
                new_uts |= flag == UnshareFlags::NEWUTS;
            }
        }
    }
    if let (true, Some(name)) = (new_uts, hostname) {
        rustix::system::sethostname(name.as_bytes()).context("setting the hostname")?;
    }
    Ok(())
}

/// A new network namespace starts with `lo` down.
fn bring_loopback_up() -> anyhow::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .context("a socket to configure lo")?;
    crate::sys::set_interface_up(&sock, "lo").context("bringing lo up")
}
