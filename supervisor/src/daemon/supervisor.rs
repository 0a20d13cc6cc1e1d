//! corrald's side: the policy's apps, one supervising task each, systemd
//! notifications and signals (a `sigwait` thread: tokio's signal driver
//! would need a socketpair in every worker runtime, which the sandbox
//! refuses).
//!
//! Readiness: `READY=1` once every app is served: its zygote reported
//! `Ready` (apps with `pool.min > 0` and `command` apps), or corrald is
//! watching its sockets (`pool.min = 0`), or it is being restarted or has
//! failed (logged, and in `STATUS=`).
//!
//! Invariants: a listening socket is bound once per address and kept by
//! the [`Daemon`] across reloads, so an app switched by a reload never
//! closes it (waiting connections stay in the backlog); an app version that
//! was told to stop no longer writes its state, so `STATUS=` and
//! `idle-exit` follow the live version.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::{Artifact, Cache, EngineOptions};
use corral_policy::{AppKind, AppSpec, Environment, ListenAddr, Policy, RestartOn};
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
    match rt.block_on(serve(policy_path.to_path_buf(), policy)) {
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
    /// `true` once this version is stopping (shutdown, or replaced or
    /// removed by a reload): it no longer reports its state.
    stopping: watch::Receiver<bool>,
}

impl App {
    fn set_state(&self, state: AppState) {
        if !*self.stopping.borrow() {
            set_state(&self.states, &self.spec.name, state);
        }
    }
}

/// An app being served, as the daemon holds it.
struct RunningApp {
    spec: AppSpec,
    artifact: corral_compiler::ArtifactKey,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// corrald's state between signals.
struct Daemon {
    policy_path: std::path::PathBuf,
    policy: Policy,
    systemd: SystemdSockets,
    cache: Cache,
    states: States,
    /// Bound listening sockets by address, shared by the old and new
    /// version of an app across a reload.
    sockets: BTreeMap<String, OwnedFd>,
    apps: BTreeMap<String, RunningApp>,
    /// Apps replaced or removed by a reload, still draining.
    retired: Vec<tokio::task::JoinHandle<()>>,
}

async fn serve(policy_path: std::path::PathBuf, policy: Policy) -> anyhow::Result<()> {
    let cache = Cache::open(&policy.daemon.cache_dir).with_context(|| {
        format!(
            "opening the artifact cache {}",
            policy.daemon.cache_dir.display()
        )
    })?;
    let mut daemon = Daemon {
        policy_path,
        systemd: SystemdSockets::from_env()?,
        cache,
        states: Arc::default(),
        sockets: BTreeMap::new(),
        apps: BTreeMap::new(),
        retired: Vec::new(),
        policy,
    };
    let apps = daemon.policy.apps.clone();
    let mut readiness = Vec::new();
    for spec in apps.values() {
        set_state(&daemon.states, &spec.name, AppState::Starting);
    }
    for spec in apps.values() {
        if let Some(ready) = daemon.start_app(spec).await {
            readiness.push(ready);
        }
    }
    for ready in readiness {
        let _ = ready.await;
    }
    let summary = daemon.summary();
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
    tracing::info!("ready: {summary}");
    // Not println!: a closed stdout must not take corrald down.
    let mut out = std::io::stdout().lock();
    for spec in apps.values() {
        for addr in &spec.listen {
            let _ = writeln!(out, "{}", how_to_reach(&spec.name, spec.kind, addr));
        }
    }
    let _ = out.flush();
    drop(out);

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
    let mut idle_check = tokio::time::interval(Duration::from_millis(250));
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::select! {
            sig = signals.recv() => match sig {
                Some(libc::SIGHUP) => daemon.reload().await,
                _ => break, // SIGTERM, SIGINT
            },
            _ = idle_check.tick(), if daemon.policy.daemon.idle_exit.is_some() => {
                let limit = daemon.policy.daemon.idle_exit.unwrap_or_default();
                if daemon.all_idle() {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= limit {
                        tracing::info!(
                            "idle-exit: every app has been at zero for {}; exiting",
                            humantime::format_duration(limit)
                        );
                        break;
                    }
                } else {
                    idle_since = None;
                }
            }
        }
    }
    tracing::info!("stopping: draining every app");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    let deadline = daemon.policy.daemon.drain_timeout + Duration::from_secs(2);
    let mut tasks = std::mem::take(&mut daemon.retired);
    for (_, app) in std::mem::take(&mut daemon.apps) {
        app.stop.send_replace(true);
        tasks.push(app.task);
    }
    let _ = tokio::time::timeout(deadline, async {
        for task in tasks {
            let _ = task.await;
        }
    })
    .await;
    Ok(())
}

impl Daemon {
    fn summary(&self) -> String {
        summarize(&self.states.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every app has no process (idle, failed or finished).
    fn all_idle(&self) -> bool {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .all(|s| matches!(s, AppState::Idle | AppState::Failed(_) | AppState::Finished))
    }

    /// The listening socket for `addr`: the one already bound (kept across
    /// reloads), or a new one.
    fn socket(&mut self, addr: &ListenAddr) -> anyhow::Result<OwnedFd> {
        let key = addr.to_string();
        if let Some(fd) = self.sockets.get(&key) {
            return Ok(fd.try_clone()?);
        }
        let fd = listeners::open(addr, &self.systemd)?;
        let copy = fd.try_clone()?;
        self.sockets.insert(key, fd);
        Ok(copy)
    }

    /// Sockets and artifact of `spec`.
    async fn prepare(&mut self, spec: &AppSpec) -> anyhow::Result<(Vec<OwnedFd>, Artifact)> {
        let mut sockets = Vec::new();
        for addr in &spec.listen {
            sockets.push(self.socket(addr)?);
        }
        let artifact = prepare(spec, sockets.len(), &self.cache).await?;
        Ok((sockets, artifact))
    }

    /// Prepare and start `spec`; `None` if it failed (logged, state set).
    async fn start_app(&mut self, spec: &AppSpec) -> Option<oneshot::Receiver<()>> {
        match self.prepare(spec).await {
            Ok((listeners, artifact)) => Some(self.spawn_app(spec, listeners, artifact)),
            Err(e) => {
                tracing::error!(app = spec.name, "app failed: {e:#}");
                set_state(&self.states, &spec.name, AppState::Failed(format!("{e:#}")));
                None
            }
        }
    }

    fn spawn_app(
        &mut self,
        spec: &AppSpec,
        listeners: Vec<OwnedFd>,
        artifact: Artifact,
    ) -> oneshot::Receiver<()> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stop_rx) = watch::channel(false);
        let key = artifact.key.clone();
        let app = App {
            spec: spec.clone(),
            listeners,
            artifact,
            drain_timeout: self.policy.daemon.drain_timeout,
            states: self.states.clone(),
            stopping: stop_rx.clone(),
        };
        let task = tokio::spawn(supervise(app, ready_tx, stop_rx));
        let old = self.apps.insert(
            spec.name.clone(),
            RunningApp {
                spec: spec.clone(),
                artifact: key,
                stop,
                task,
            },
        );
        if let Some(old) = old {
            old.stop.send_replace(true);
            self.retired.push(old.task);
        }
        ready_rx
    }

    /// SIGHUP: read the policy again; switch changed apps over, start new
    /// ones, drain removed ones. An invalid policy changes nothing.
    async fn reload(&mut self) {
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            let _ = sd_notify::notify(&[NotifyState::Reloading, now]);
        }
        tracing::info!("SIGHUP: reloading {}", self.policy_path.display());
        match corral_policy::load(&self.policy_path, &Environment::from_process()) {
            Err(e) => {
                let diagnostics = e.diagnostics();
                if diagnostics.is_empty() {
                    tracing::error!("reload refused, still serving the previous policy: {e}");
                } else {
                    for d in diagnostics {
                        tracing::error!("reload refused: {d}");
                    }
                    tracing::error!(
                        "reload refused: the policy has errors; still serving the previous policy"
                    );
                }
            }
            Ok(policy) => self.apply(policy).await,
        }
        self.retired.retain(|t| !t.is_finished());
        let summary = self.summary();
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
    }

    async fn apply(&mut self, policy: Policy) {
        if policy.daemon != self.policy.daemon {
            tracing::warn!("reload: changes to [daemon] take effect at the next start");
        }
        let removed: Vec<String> = self
            .apps
            .keys()
            .filter(|name| !policy.apps.contains_key(*name))
            .cloned()
            .collect();
        for name in removed {
            if let Some(app) = self.apps.remove(&name) {
                tracing::info!(app = name, "reload: removed; draining it");
                app.stop.send_replace(true);
                self.retired.push(app.task);
            }
            self.states
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
        }
        let mut started = Vec::new();
        for (name, spec) in &policy.apps {
            let prepared = match self.prepare(spec).await {
                Ok(prepared) => prepared,
                Err(e) => {
                    if self.apps.contains_key(name) {
                        tracing::error!(
                            app = name,
                            "reload: cannot prepare the new version ({e:#}); keeping the running one"
                        );
                    } else {
                        tracing::error!(app = name, "app failed: {e:#}");
                        set_state(&self.states, name, AppState::Failed(format!("{e:#}")));
                    }
                    continue;
                }
            };
            match self.apps.get(name) {
                Some(running) if running.spec == *spec && running.artifact == prepared.1.key => {}
                Some(_) => {
                    tracing::info!(app = name, "reload: changed; switching to the new version");
                    started.push(self.spawn_app(spec, prepared.0, prepared.1));
                }
                None => {
                    tracing::info!(app = name, "reload: new app");
                    set_state(&self.states, name, AppState::Starting);
                    started.push(self.spawn_app(spec, prepared.0, prepared.1));
                }
            }
        }
        // Sockets no app listens on any more.
        let used: std::collections::BTreeSet<String> = policy
            .apps
            .values()
            .flat_map(|a| a.listen.iter().map(ToString::to_string))
            .collect();
        self.sockets.retain(|addr, _| used.contains(addr));
        self.policy = policy;
        // READY=1 again once the new versions serve (bounded: a zygote that
        // never answers is the restart logic's business).
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            for ready in started {
                let _ = ready.await;
            }
        })
        .await;
    }
}

/// An app's artifact (compiled on a blocking thread).
async fn prepare(spec: &AppSpec, sockets: usize, cache: &Cache) -> anyhow::Result<Artifact> {
    if spec.kind != AppKind::Command && sockets == 0 {
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
    Ok(artifact)
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
    /// A `command` app's instance ended (`success`: exit code 0).
    Finished {
        how: String,
        success: bool,
    },
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
            app.set_state(AppState::Idle);
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
            ZygoteEnd::Finished { how, success } => {
                let again = match restart.on {
                    RestartOn::Always => true,
                    RestartOn::Failure => !success,
                    RestartOn::Never => false,
                };
                if !again {
                    tracing::info!(
                        app = name,
                        "{how}; not restarted (restart.on = {:?})",
                        restart.on
                    );
                    app.set_state(AppState::Finished);
                    let _ = shutdown.changed().await;
                    return;
                }
                if success {
                    // A clean exit restarted by `always`: no crash, but
                    // still paced by the backoff.
                    tracing::info!(app = name, "{how}; restarting it");
                    tokio::select! {
                        () = tokio::time::sleep(restart.backoff_min) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
                if let Some(end) = crashed(
                    &app,
                    &mut crashes,
                    &mut backoff,
                    started,
                    &mut ready,
                    &mut shutdown,
                    how,
                )
                .await
                {
                    return end;
                }
            }
            ZygoteEnd::Crashed(why) => {
                if let Some(end) = crashed(
                    &app,
                    &mut crashes,
                    &mut backoff,
                    started,
                    &mut ready,
                    &mut shutdown,
                    format!("zygote died ({why})"),
                )
                .await
                {
                    return end;
                }
            }
        }
    }
}

/// A crash (zygote, or a failed `command` instance): count it for
/// `restart.give-up`, then wait out the backoff. `Some` when the app is
/// done (failed, or corrald is stopping).
async fn crashed(
    app: &App,
    crashes: &mut VecDeque<Instant>,
    backoff: &mut Duration,
    started: Instant,
    ready: &mut Option<oneshot::Sender<()>>,
    shutdown: &mut watch::Receiver<bool>,
    why: String,
) -> Option<()> {
    let name = &app.spec.name;
    let restart = app.spec.restart;
    if *shutdown.borrow() {
        return Some(());
    }
    // One broken app must not hold back READY=1 for the others: it counts
    // as handled once it is being restarted (STATUS says so).
    if let Some(r) = ready.take() {
        let _ = r.send(());
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
            app.set_state(AppState::Failed(reason));
            let _ = shutdown.changed().await;
            return Some(());
        }
    }
    if started.elapsed() > restart.backoff_max * 2 {
        *backoff = restart.backoff_min; // it had been running well
    }
    tracing::warn!(
        app = name,
        "{why}; restarting in {}",
        humantime::format_duration(*backoff)
    );
    app.set_state(AppState::Backoff);
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        _ = shutdown.changed() => return Some(()),
    }
    *backoff = (*backoff * 2).min(restart.backoff_max);
    None
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

    let mut seen = Reported::default();
    let mut draining = false;
    let mut control_open = true;
    let drain_deadline = tokio::time::sleep(Duration::from_secs(86400 * 365));
    tokio::pin!(drain_deadline);
    loop {
        tokio::select! {
            msg = recv_from(&control), if control_open => match msg {
                Ok(Some(msg)) => seen.handle(msg, app, ready, pid),
                Ok(None) => control_open = false,
                Err(e) => {
                    tracing::warn!(app = name, "control socket: {e}");
                    control_open = false;
                }
            },
            guard = exited.readable() => {
                drop(guard);
                let status = child.wait()?;
                // Everything it said before exiting is queued on the socket,
                // whatever the reactor has noticed yet: read it first.
                while let Ok(Some((msg, _))) =
                    protocol::recv::<FromZygote>(control.get_ref(), RecvFlags::DONTWAIT)
                {
                    seen.handle(msg, app, ready, pid);
                }
                if draining {
                    return Ok(ZygoteEnd::Shutdown);
                }
                if let Some((how, success)) = seen.finished {
                    return Ok(ZygoteEnd::Finished { how, success });
                }
                if seen.idle && status.success() {
                    return Ok(ZygoteEnd::Idle);
                }
                let why = seen.failed.unwrap_or_else(|| format!("exit status {status}"));
                return Ok(ZygoteEnd::Crashed(why));
            }
            _ = shutdown.changed(), if !draining => {
                if app.spec.kind == AppKind::Command {
                    // One long-running instance, no requests to finish; a
                    // guest cannot take a signal, so it is stopped.
                    tracing::info!(app = name, "stopping the command");
                    drop(child); // kills the process group
                    return Ok(ZygoteEnd::Shutdown);
                }
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

/// What a zygote said that decides how its exit is read.
#[derive(Debug, Default)]
struct Reported {
    idle: bool,
    finished: Option<(String, bool)>,
    failed: Option<String>,
}

impl Reported {
    fn handle(
        &mut self,
        msg: FromZygote,
        app: &App,
        ready: &mut Option<oneshot::Sender<()>>,
        pid: u32,
    ) {
        let name = &app.spec.name;
        match msg {
            FromZygote::Ready { layers, missing: _ } => {
                tracing::info!(app = name, pid, "serving ({layers})");
                app.set_state(AppState::Running {
                    workers: 0,
                    busy: 0,
                });
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            FromZygote::Failed { error } => {
                tracing::error!(app = name, "zygote failed: {error}");
                self.failed = Some(error);
            }
            FromZygote::Workers { live, busy } => {
                app.set_state(AppState::Running {
                    workers: live,
                    busy,
                });
            }
            FromZygote::WorkerExited {
                pid: worker,
                how,
                crashed,
                status,
            } => {
                let how = seccomp_report(name, worker, status).unwrap_or(how);
                if crashed {
                    tracing::warn!(app = name, worker, "{how}; replacing it");
                } else {
                    tracing::debug!(app = name, worker, "{how}");
                }
            }
            FromZygote::Finished { how, success } => self.finished = Some((how, success)),
            FromZygote::Idle => self.idle = true,
        }
    }
}

/// For a worker killed by the seccomp filter: the report naming the system
/// call, from the kernel's audit record when corrald may read it.
fn seccomp_report(app: &str, pid: i32, raw_status: i32) -> Option<String> {
    use std::os::unix::process::ExitStatusExt as _;
    let status = std::process::ExitStatus::from_raw(raw_status);
    let kill = crate::sandbox::seccomp_kill(u32::try_from(pid).ok()?, status)?;
    Some(kill.describe(app))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_how_to_reach_each_kind() {
        let tcp = ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            how_to_reach("hello", AppKind::Http, &tcp),
            "hello: curl http://127.0.0.1:8080/"
        );
        let tcp = ListenAddr::Tcp("127.0.0.1:8081".parse().unwrap());
        assert_eq!(
            how_to_reach("echo", AppKind::Stdio, &tcp),
            "echo: nc 127.0.0.1 8081"
        );
    }

    #[test]
    fn status_is_one_line_per_daemon() {
        let mut states = BTreeMap::new();
        states.insert("a".to_string(), AppState::Idle);
        states.insert(
            "b".to_string(),
            AppState::Running {
                workers: 2,
                busy: 1,
            },
        );
        states.insert("c".to_string(), AppState::Failed("x".into()));
        assert_eq!(summarize(&states), "3 apps: a idle, b 2w/1 busy, c FAILED");
    }
}
