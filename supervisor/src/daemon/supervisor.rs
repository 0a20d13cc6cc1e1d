//! corrald's side: the policy's apps, one supervising task each, systemd
//! notifications and signals.
//!
//! Readiness: `READY=1` once every app is served: its zygote reported
//! `Ready` (apps with `pool.min > 0` and `command` apps), or corrald is
//! watching its sockets (`pool.min = 0`), or it has failed (logged).

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::{Artifact, Cache, EngineOptions};
use corral_policy::{AppKind, AppSpec, Environment, ListenAddr, Policy};
use rustix::net::RecvFlags;
use sd_notify::NotifyState;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use super::listeners::{self, SystemdSockets};
use super::protocol::{self, FromZygote, Start, ToZygote};
use super::sys;

/// Variables a zygote must not see: they are corrald's.
const PRIVATE_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// `corrald --policy PATH`.
pub fn run(policy_path: &Path) -> ExitCode {
    let policy = match corral_policy::load(policy_path, &Environment::from_process()) {
        Ok(policy) => policy,
        Err(e) => {
            let d = e.diagnostics();
            if d.is_empty() {
                eprintln!("corrald: {e}");
            } else {
                for d in d {
                    eprintln!("{d}");
                }
            }
            return ExitCode::FAILURE;
        }
    };
    // Before any thread exists, so that every thread inherits the mask.
    if let Err(e) = sys::set_signals_blocked(true) {
        eprintln!("corrald: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("corrald: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(policy)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How one app is doing, for `STATUS=` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AppState {
    Starting,
    /// No process: corrald watches its sockets.
    Idle,
    Running {
        workers: u32,
        busy: u32,
    },
    Backoff,
    Finished,
    Failed(String),
}

type States = Arc<Mutex<BTreeMap<String, AppState>>>;

fn set_state(states: &States, app: &str, state: AppState) {
    let summary = {
        let mut s = states.lock().unwrap_or_else(|e| e.into_inner());
        if s.get(app) == Some(&state) {
            return;
        }
        s.insert(app.to_string(), state);
        summarize(&s)
    };
    let _ = sd_notify::notify(&[NotifyState::Status(&summary)]);
}

fn summarize(states: &BTreeMap<String, AppState>) -> String {
    let parts: Vec<String> = states
        .iter()
        .map(|(name, s)| match s {
            AppState::Starting => format!("{name} starting"),
            AppState::Idle => format!("{name} idle"),
            AppState::Running { workers, busy } => format!("{name} {workers}w/{busy} busy"),
            AppState::Backoff => format!("{name} restarting"),
            AppState::Finished => format!("{name} finished"),
            AppState::Failed(_) => format!("{name} FAILED"),
        })
        .collect();
    format!("{} apps: {}", states.len(), parts.join(", "))
}

/// One app as its task holds it.
struct App {
    spec: AppSpec,
    listeners: Vec<OwnedFd>,
    artifact: Artifact,
    drain_timeout: Duration,
    states: States,
}

async fn serve(policy: Policy) -> anyhow::Result<()> {
    let systemd = SystemdSockets::from_env()?;
    let cache = Cache::open(&policy.daemon.cache_dir).with_context(|| {
        format!(
            "opening the artifact cache {}",
            policy.daemon.cache_dir.display()
        )
    })?;
    let states: States = Arc::default();
    for name in policy.apps.keys() {
        states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), AppState::Starting);
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut readiness = Vec::new();
    let mut reach = Vec::new();
    for (name, spec) in &policy.apps {
        let prepared = prepare(spec, &systemd, &cache).await;
        let (ready_tx, ready_rx) = oneshot::channel();
        readiness.push(ready_rx);
        match prepared {
            Ok((listeners, artifact)) => {
                for addr in &spec.listen {
                    reach.push(how_to_reach(name, spec.kind, addr));
                }
                let app = App {
                    spec: spec.clone(),
                    listeners,
                    artifact,
                    drain_timeout: policy.daemon.drain_timeout,
                    states: states.clone(),
                };
                tasks.push(tokio::spawn(supervise(app, ready_tx, shutdown_rx.clone())));
            }
            Err(e) => {
                tracing::error!(app = name, "app failed: {e:#}");
                set_state(&states, name, AppState::Failed(format!("{e:#}")));
                let _ = ready_tx.send(());
            }
        }
    }
    for ready in readiness {
        let _ = ready.await;
    }
    let summary = summarize(&states.lock().unwrap_or_else(|e| e.into_inner()));
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
    tracing::info!("ready: {summary}");
    for line in reach {
        println!("{line}");
    }

    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }

    let (sig_tx, mut signals) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("corrald-signals".into())
        .spawn(move || {
            while let Ok(sig) = sys::wait_for_signal() {
                if sig_tx.send(sig).is_err() {
                    return;
                }
            }
        })?;
    while let Some(sig) = signals.recv().await {
        if sig == libc::SIGHUP {
            tracing::warn!(
                "SIGHUP: reloading the policy is not supported yet; still serving the policy loaded at start"
            );
            continue;
        }
        break; // SIGTERM, SIGINT
    }
    tracing::info!("stopping: draining every app");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    let deadline = policy.daemon.drain_timeout + Duration::from_secs(2);
    for task in tasks {
        let _ = tokio::time::timeout(deadline, task).await;
    }
    Ok(())
}

/// An app's sockets and artifact (compiled on a blocking thread).
async fn prepare(
    spec: &AppSpec,
    systemd: &SystemdSockets,
    cache: &Cache,
) -> anyhow::Result<(Vec<OwnedFd>, Artifact)> {
    let mut listeners = Vec::new();
    for addr in &spec.listen {
        listeners.push(listeners::open(addr, systemd)?);
    }
    if spec.kind != AppKind::Command && listeners.is_empty() {
        anyhow::bail!("a {} app needs at least one `listen` address", spec.kind);
    }
    let cache = cache.clone();
    let options = EngineOptions::for_app(spec);
    let module = spec.module.clone();
    let artifact = tokio::task::spawn_blocking(move || -> anyhow::Result<Artifact> {
        let engine = corral_compiler::build_engine(&options, None)?.engine;
        let artifact = cache
            .load_or_compile(&engine, &module)
            .with_context(|| format!("compiling {}", module.display()))?;
        Ok(artifact)
    })
    .await??;
    if !artifact.cache_hit {
        tracing::info!(
            app = spec.name,
            "compiled {} in {:?}",
            spec.module.display(),
            artifact.compile_time.unwrap_or_default()
        );
    }
    Ok((listeners, artifact))
}

fn how_to_reach(name: &str, kind: AppKind, addr: &ListenAddr) -> String {
    match (kind, addr) {
        (AppKind::Http, ListenAddr::Tcp(sa)) => format!("{name}: curl http://{sa}/"),
        (AppKind::Http, ListenAddr::Unix(p)) => {
            format!("{name}: curl --unix-socket {} http://{name}/", p.display())
        }
        (_, ListenAddr::Tcp(sa)) => format!("{name}: nc {} {}", sa.ip(), sa.port()),
        (_, ListenAddr::Unix(p)) => format!("{name}: nc -U {}", p.display()),
        (_, ListenAddr::Systemd(n)) => format!("{name}: on systemd socket {n}"),
    }
}

/// How a zygote's life ended.
#[derive(Debug)]
enum ZygoteEnd {
    /// Its last worker retired (scale to zero).
    Idle,
    /// A `command` app's instance ended for good.
    Finished,
    /// corrald is stopping and the zygote drained.
    Shutdown,
    Crashed(String),
}

/// One app, for as long as corrald runs.
async fn supervise(app: App, ready: oneshot::Sender<()>, mut shutdown: watch::Receiver<bool>) {
    let name = app.spec.name.clone();
    let restart = app.spec.restart;
    let mut ready = Some(ready);
    let mut backoff = restart.backoff_min;
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        if app.spec.pool.min == 0 && app.spec.kind != AppKind::Command {
            set_state(&app.states, &name, AppState::Idle);
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            tokio::select! {
                result = wait_for_connection(&app.listeners) => {
                    if let Err(e) = result {
                        tracing::error!(app = name, "watching the sockets: {e:#}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    tracing::debug!(app = name, "a connection is waiting: starting the zygote");
                }
                _ = shutdown.changed() => return,
            }
        }
        let started = Instant::now();
        let end = match run_zygote(&app, &mut ready, &mut shutdown).await {
            Ok(end) => end,
            Err(e) => ZygoteEnd::Crashed(format!("{e:#}")),
        };
        match end {
            ZygoteEnd::Idle => {
                tracing::info!(app = name, "idle: no workers left, watching the sockets");
                backoff = restart.backoff_min;
            }
            ZygoteEnd::Shutdown => return,
            ZygoteEnd::Finished => {
                set_state(&app.states, &name, AppState::Finished);
                let _ = shutdown.changed().await;
                return;
            }
            ZygoteEnd::Crashed(why) => {
                if *shutdown.borrow() {
                    return;
                }
                let now = Instant::now();
                crashes.push_back(now);
                if let Some(give_up) = restart.give_up {
                    while crashes
                        .front()
                        .is_some_and(|t| now.duration_since(*t) > give_up.window)
                    {
                        crashes.pop_front();
                    }
                    if crashes.len() as u32 >= give_up.crashes {
                        let reason = format!(
                            "{} crashes within {} (restart.give-up = \"{give_up}\"); last: {why}",
                            crashes.len(),
                            humantime::format_duration(give_up.window)
                        );
                        tracing::error!(app = name, "failed: {reason}");
                        set_state(&app.states, &name, AppState::Failed(reason));
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        let _ = shutdown.changed().await;
                        return;
                    }
                }
                if started.elapsed() > restart.backoff_max * 2 {
                    backoff = restart.backoff_min; // it had been running well
                }
                tracing::warn!(
                    app = name,
                    "zygote died ({why}); restarting in {}",
                    humantime::format_duration(backoff)
                );
                set_state(&app.states, &name, AppState::Backoff);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(restart.backoff_max);
            }
        }
    }
}

/// Wait until one of `listeners` has a connection waiting, without
/// accepting it: it stays in the backlog for a worker.
async fn wait_for_connection(listeners: &[OwnedFd]) -> anyhow::Result<()> {
    let mut watched = Vec::new();
    for fd in listeners {
        watched.push(register(fd.try_clone()?, tokio::io::Interest::READABLE)?);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut waits = Vec::new();
    for fd in watched {
        let tx = tx.clone();
        waits.push(tokio::spawn(async move {
            if let Ok(guard) = fd.readable().await {
                drop(guard);
                let _ = tx.send(()).await;
            }
        }));
    }
    rx.recv().await;
    for w in waits {
        w.abort();
    }
    Ok(())
}

/// Start a zygote, hand it the app, and follow it until it exits.
async fn run_zygote(
    app: &App,
    ready: &mut Option<oneshot::Sender<()>>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<ZygoteEnd> {
    let name = &app.spec.name;
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .context("creating the control socketpair")?;
    let stdout = std::io::stderr().as_fd().try_clone_to_owned()?;
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg("zygote")
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::from(stdout))
        .process_group(0);
    for var in PRIVATE_ENV {
        cmd.env_remove(var);
    }
    let mut child = ZygoteProcess::new(cmd.spawn().context("starting the zygote")?);
    let pid = child.child.id();
    let exited = register(
        rustix::process::pidfd_open(child.pid(), rustix::process::PidfdFlags::empty())
            .context("pidfd_open of the zygote")?,
        tokio::io::Interest::READABLE,
    )?;
    tracing::debug!(app = name, pid, "zygote started");

    let start = Start {
        app: app.spec.clone(),
        listeners: app.spec.listen.iter().map(ToString::to_string).collect(),
        artifact: app.artifact.handoff(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = app.listeners.iter().map(AsFd::as_fd).collect();
    fds.push(app.artifact.file().as_fd());
    protocol::send(&ours, &ToZygote::Start(Box::new(start)), &fds)?;
    rustix::io::ioctl_fionbio(&ours, true)?;
    let control = register(
        ours,
        tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
    )?;

    let mut idle = false;
    let mut finished = false;
    let mut draining = false;
    let mut failed: Option<String> = None;
    let mut control_open = true;
    let drain_deadline = tokio::time::sleep(Duration::from_secs(86400 * 365));
    tokio::pin!(drain_deadline);
    loop {
        tokio::select! {
            msg = recv_from(&control), if control_open => match msg {
                Ok(Some(msg)) => match msg {
                    FromZygote::Ready { layers, missing: _ } => {
                        tracing::info!(app = name, pid, "serving ({layers})");
                        set_state(&app.states, name, AppState::Running { workers: 0, busy: 0 });
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    FromZygote::Failed { error } => {
                        tracing::error!(app = name, "zygote could not start: {error}");
                        failed = Some(error);
                    }
                    FromZygote::Workers { live, busy } => {
                        set_state(&app.states, name, AppState::Running { workers: live, busy });
                    }
                    FromZygote::WorkerExited { how, crashed, .. } => {
                        if crashed {
                            tracing::warn!(app = name, "{how}; replacing it");
                        } else {
                            tracing::debug!(app = name, "{how}");
                        }
                    }
                    FromZygote::Finished { how } => {
                        tracing::info!(app = name, "{how}");
                        finished = true;
                    }
                    FromZygote::Idle => idle = true,
                },
                Ok(None) => control_open = false,
                Err(e) => {
                    tracing::warn!(app = name, "control socket: {e}");
                    control_open = false;
                }
            },
            guard = exited.readable() => {
                drop(guard);
                let status = child.wait()?;
                if draining {
                    return Ok(ZygoteEnd::Shutdown);
                }
                if finished {
                    return Ok(ZygoteEnd::Finished);
                }
                if idle && status.success() {
                    return Ok(ZygoteEnd::Idle);
                }
                let why = failed.unwrap_or_else(|| format!("exit status {status}"));
                return Ok(ZygoteEnd::Crashed(why));
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                let _ = protocol::send(control.get_ref(), &ToZygote::Drain, &[]);
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + app.drain_timeout);
            }
            () = &mut drain_deadline, if draining => {
                tracing::warn!(app = name, "drain-timeout passed: killing the app's processes");
                drop(child); // kills the process group
                return Ok(ZygoteEnd::Shutdown);
            }
        }
    }
}

/// A zygote process: dropped before it was reaped, it and its workers (its
/// process group) are killed.
struct ZygoteProcess {
    child: std::process::Child,
    reaped: bool,
}

impl ZygoteProcess {
    fn new(child: std::process::Child) -> ZygoteProcess {
        ZygoteProcess {
            child,
            reaped: false,
        }
    }

    fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_child(&self.child)
    }

    /// Reap it (it has exited: its pidfd was readable).
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.child.wait()?;
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for ZygoteProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = rustix::process::kill_process_group(self.pid(), rustix::process::Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

/// Register `fd` with the runtime's reactor.
fn register(fd: OwnedFd, interest: tokio::io::Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`, so the descriptor stays
    // open and names the same file description until the AsyncFd is dropped,
    // and an OwnedFd's `as_raw_fd` always returns that same number.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

async fn recv_from(control: &AsyncFd<OwnedFd>) -> std::io::Result<Option<FromZygote>> {
    loop {
        let mut guard = control.readable().await?;
        match guard.try_io(|fd| protocol::recv::<FromZygote>(fd.get_ref(), RecvFlags::DONTWAIT)) {
            Ok(result) => return result.map(|m| m.map(|(msg, _fds)| msg)),
            Err(_would_block) => continue,
        }
    }
}
