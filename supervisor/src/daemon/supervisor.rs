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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::{Cache, EngineOptions, PinnedArtifact};
use corral_policy::{AppKind, AppSpec, Environment, ListenAddr, Policy, RestartOn, ZygoteMode};
use rustix::net::RecvFlags;
use sd_notify::NotifyState;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use super::listeners::{self, SystemdSockets};
use super::manager::{self, AppState, Manager, Registry, ReloadReport, Request};
use corral_runtime::protocol::{self, FromZygote, Start, ToZygote};
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

/// `corrald --policy PATH [--bus system|session|none]`.
pub fn run(policy_path: &Path, bus: crate::dbus::Bus) -> ExitCode {
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
    match rt.block_on(serve(policy_path.to_path_buf(), policy, bus)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How one app task reports itself (the registry keeps the API's view).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Report {
    Starting,
    /// No process: corrald watches its sockets.
    Idle,
    Running {
        workers: u32,
        busy: u32,
    },
    Backoff(String),
    Finished,
    Failed(String),
}

/// Record `report` for `app` and, when its state changed, tell systemd.
fn set_state(registry: &Registry, app: &str, report: Report) {
    let changed = registry.update(app, |info| match report {
        Report::Starting => info.state = AppState::Starting,
        Report::Idle => info.set_quiet(AppState::Idle),
        Report::Running { workers, busy } => {
            info.state = AppState::Running;
            info.workers = workers;
            info.busy = busy;
        }
        Report::Backoff(why) => {
            info.set_quiet(AppState::Restarting);
            info.last_error = Some(why);
        }
        Report::Finished => info.set_quiet(AppState::Finished),
        Report::Failed(why) => {
            info.set_quiet(AppState::Failed);
            info.last_error = Some(why);
        }
    });
    if changed {
        let _ = sd_notify::notify(&[NotifyState::Status(&summarize(&registry.states()))]);
    }
}

fn summarize(states: &[(String, AppState, u32, u32)]) -> String {
    let parts: Vec<String> = states
        .iter()
        .map(|(name, state, workers, busy)| match state {
            AppState::Running => format!("{name} {workers}w/{busy} busy"),
            AppState::Restarting => format!("{name} restarting"),
            AppState::Failed => format!("{name} FAILED"),
            other => format!("{name} {other}"),
        })
        .collect();
    format!("{} apps: {}", states.len(), parts.join(", "))
}

/// One app as its task holds it.
struct App {
    spec: AppSpec,
    listeners: Vec<OwnedFd>,
    artifact: PinnedArtifact,
    drain_timeout: Duration,
    registry: Arc<Registry>,
    /// `true` once this version is stopping (shutdown, or replaced or
    /// removed by a reload): it no longer reports its state.
    stopping: watch::Receiver<bool>,
}

impl App {
    fn set_state(&self, report: Report) {
        if !*self.stopping.borrow() {
            set_state(&self.registry, &self.spec.name, report);
        }
    }

    /// Change the app's record beyond its state (counters, pids), unless
    /// this version is stopping.
    fn record(&self, change: impl FnOnce(&mut manager::AppInfo)) {
        if !*self.stopping.borrow() {
            self.registry.update(&self.spec.name, change);
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
    registry: Arc<Registry>,
    manager: Manager,
    /// Apps stopped through the API: not started by a reload until a
    /// start or restart.
    stopped: BTreeSet<String>,
    /// Bound listening sockets by address, shared by the old and new
    /// version of an app across a reload.
    sockets: BTreeMap<String, OwnedFd>,
    apps: BTreeMap<String, RunningApp>,
    /// Apps replaced or removed by a reload, still draining.
    retired: Vec<tokio::task::JoinHandle<()>>,
}

async fn serve(
    policy_path: std::path::PathBuf,
    policy: Policy,
    bus: crate::dbus::Bus,
) -> anyhow::Result<()> {
    let cache = Cache::open(&policy.daemon.cache_dir).with_context(|| {
        format!(
            "opening the artifact cache {}",
            policy.daemon.cache_dir.display()
        )
    })?;
    let registry = Arc::new(Registry::new());
    let (manager, mut requests) = Manager::new(
        registry.clone(),
        manager::Static {
            policy_path: policy_path.clone(),
            api_socket: policy.daemon.api_socket.clone(),
            api_group: policy.daemon.api_group.clone(),
            cache: cache.clone(),
        },
        policy_files(&policy),
    );
    let mut daemon = Daemon {
        policy_path,
        systemd: SystemdSockets::from_env()?,
        cache,
        registry,
        manager,
        stopped: BTreeSet::new(),
        sockets: BTreeMap::new(),
        apps: BTreeMap::new(),
        retired: Vec::new(),
        policy,
    };
    let apps = daemon.policy.apps.clone();
    let mut readiness = Vec::new();
    for spec in apps.values() {
        daemon.registry.declare(spec);
    }
    // After the apps are declared (the first request already lists them)
    // and before they start: READY=1 comes only once the API serves.
    crate::api::spawn(
        daemon.manager.clone(),
        &daemon.policy.daemon,
        &daemon.systemd,
    );
    // After the apps are declared (their objects exist when the name is
    // taken) and before they start (READY=1 waits for it). No bus, or a
    // name we may not own, is logged and corrald serves on without D-Bus.
    let _dbus = crate::dbus::spawn(daemon.manager.clone(), bus).await;
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
                Some(libc::SIGHUP) => {
                    tracing::info!("SIGHUP: reloading {}", daemon.policy_path.display());
                    daemon.reload().await;
                }
                _ => break, // SIGTERM, SIGINT
            },
            Some(request) = requests.recv() => daemon.handle(request).await,
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
        summarize(&self.registry.states())
    }

    /// Every app has no process (idle, failed, stopped or finished), no
    /// stopped app is still draining, and no API client is connected.
    fn all_idle(&self) -> bool {
        self.registry
            .states()
            .iter()
            .all(|(_, state, _, _)| state.is_quiet())
            && self.retired.iter().all(|t| t.is_finished())
            && self.manager.clients() == 0
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
    async fn prepare(&mut self, spec: &AppSpec) -> anyhow::Result<(Vec<OwnedFd>, PinnedArtifact)> {
        let mut sockets = Vec::new();
        for addr in &spec.listen {
            sockets.push(self.socket(addr)?);
        }
        let artifact = prepare(spec, sockets.len(), &self.cache).await?;
        if let Some(counters) = self.registry.metrics.counters(&spec.name) {
            let counter = match artifact.cache_hit {
                true => &counters.cache_hits,
                false => &counters.cache_misses,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok((sockets, artifact))
    }

    /// Prepare and start `spec`; `None` if it failed (logged, state set).
    async fn start_app(&mut self, spec: &AppSpec) -> Option<oneshot::Receiver<()>> {
        match self.prepare(spec).await {
            Ok((listeners, artifact)) => Some(self.spawn_app(spec, listeners, artifact)),
            Err(e) => {
                tracing::error!(app = spec.name, "app failed: {e:#}");
                set_state(&self.registry, &spec.name, Report::Failed(format!("{e:#}")));
                None
            }
        }
    }

    fn spawn_app(
        &mut self,
        spec: &AppSpec,
        listeners: Vec<OwnedFd>,
        artifact: PinnedArtifact,
    ) -> oneshot::Receiver<()> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stop_rx) = watch::channel(false);
        let key = artifact.key.clone();
        set_state(&self.registry, &spec.name, Report::Starting);
        self.registry.update(&spec.name, |info| {
            info.artifact = Some(key.to_string());
        });
        let app = App {
            spec: spec.clone(),
            listeners,
            artifact,
            drain_timeout: self.policy.daemon.drain_timeout,
            registry: self.registry.clone(),
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

    /// SIGHUP or the API's Reload: read the policy again; switch changed
    /// apps over, start new ones, drain removed ones. An invalid policy
    /// changes nothing; its errors are logged and returned.
    async fn reload(&mut self) -> ReloadReport {
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            let _ = sd_notify::notify(&[NotifyState::Reloading, now]);
        }
        let report = match corral_policy::load(&self.policy_path, &Environment::from_process()) {
            Err(e) => {
                let diagnostics = e.diagnostics();
                if diagnostics.is_empty() {
                    tracing::error!("reload refused, still serving the previous policy: {e}");
                } else {
                    for d in &diagnostics {
                        tracing::error!("reload refused: {d}");
                    }
                    tracing::error!(
                        "reload refused: the policy has errors; still serving the previous policy"
                    );
                }
                let mut errors: Vec<_> = diagnostics.iter().map(Into::into).collect();
                if errors.is_empty() {
                    errors.push(manager::PolicyProblem {
                        file: self.policy_path.display().to_string(),
                        line: 0,
                        column: 0,
                        key: String::new(),
                        message: e.to_string(),
                        text: format!("{}: {e}", self.policy_path.display()),
                    });
                }
                ReloadReport {
                    applied: false,
                    errors,
                    ..ReloadReport::default()
                }
            }
            Ok(policy) => self.apply(policy).await,
        };
        self.retired.retain(|t| !t.is_finished());
        let summary = self.summary();
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
        report
    }

    async fn apply(&mut self, policy: Policy) -> ReloadReport {
        let mut report = ReloadReport {
            applied: true,
            ..ReloadReport::default()
        };
        if policy.daemon != self.policy.daemon {
            tracing::warn!("reload: changes to [daemon] take effect at the next start");
        }
        let removed: Vec<String> = self
            .policy
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
            self.stopped.remove(&name);
            self.registry.forget(&name);
            report.removed.push(name);
        }
        let mut started = Vec::new();
        for (name, spec) in &policy.apps {
            let known = self.policy.apps.contains_key(name);
            self.registry.declare(spec);
            if self.stopped.contains(name) {
                // Stays stopped; a start uses the new spec.
                match self.policy.apps.get(name) {
                    Some(old) if old == spec => report.unchanged.push(name.clone()),
                    Some(_) => report.changed.push(name.clone()),
                    None => report.added.push(name.clone()),
                }
                continue;
            }
            let prepared = match self.prepare(spec).await {
                Ok(prepared) => prepared,
                Err(e) => {
                    if self.apps.contains_key(name) {
                        tracing::error!(
                            app = name,
                            "reload: cannot prepare the new version ({e:#}); keeping the running one"
                        );
                        report.unchanged.push(name.clone());
                    } else {
                        tracing::error!(app = name, "app failed: {e:#}");
                        set_state(&self.registry, name, Report::Failed(format!("{e:#}")));
                        if known {
                            report.changed.push(name.clone());
                        } else {
                            report.added.push(name.clone());
                        }
                    }
                    continue;
                }
            };
            match self.apps.get(name) {
                Some(running) if running.spec == *spec && running.artifact == prepared.1.key => {
                    report.unchanged.push(name.clone());
                }
                Some(_) => {
                    tracing::info!(app = name, "reload: changed; switching to the new version");
                    started.push(self.spawn_app(spec, prepared.0, prepared.1));
                    report.changed.push(name.clone());
                }
                None => {
                    tracing::info!(app = name, "reload: new app");
                    started.push(self.spawn_app(spec, prepared.0, prepared.1));
                    if known {
                        report.changed.push(name.clone());
                    } else {
                        report.added.push(name.clone());
                    }
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
        self.manager.set_policy_files(policy_files(&policy));
        self.policy = policy;
        // READY=1 again once the new versions serve (bounded: a zygote that
        // never answers is the restart logic's business).
        wait_ready(started).await;
        report
    }

    /// An API request (already authorized by the Manager).
    async fn handle(&mut self, request: Request) {
        match request {
            Request::Reload(reply) => {
                let report = self.reload().await;
                let _ = reply.send(report);
            }
            Request::Start(name, reply) => {
                let pending = self.start_request(&name, false).await;
                self.answer_when_done(pending, reply);
            }
            Request::Restart(name, reply) => {
                let pending = self.start_request(&name, true).await;
                self.answer_when_done(pending, reply);
            }
            Request::Stop(name, reply) => {
                let pending = self.stop_request(&name);
                self.answer_when_done(pending, reply);
            }
            Request::Recompile(name, reply) => {
                let pending = self.recompile_request(&name).await;
                self.answer_when_done(pending, reply);
            }
        }
    }

    /// Answer a request once what it started is done, from a task of its
    /// own: the daemon's loop goes on serving signals and other requests
    /// while an app starts (up to 30 s) or drains (up to drain-timeout).
    fn answer_when_done(
        &mut self,
        pending: Result<Pending, manager::ManagerError>,
        reply: oneshot::Sender<Result<(), manager::ManagerError>>,
    ) {
        match pending {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(Pending::Done) => {
                let _ = reply.send(Ok(()));
            }
            Ok(Pending::Ready(ready)) => {
                tokio::spawn(async move {
                    wait_ready(vec![ready]).await;
                    let _ = reply.send(Ok(()));
                });
            }
            Ok(Pending::Exit(task)) => {
                // Kept with the retired apps, so that shutdown and
                // idle-exit wait for the drain as before.
                self.retired.push(tokio::spawn(async move {
                    let _ = task.await;
                    let _ = reply.send(Ok(()));
                }));
            }
        }
    }

    fn spec_of(&self, name: &str) -> Result<AppSpec, manager::ManagerError> {
        self.policy
            .apps
            .get(name)
            .cloned()
            .ok_or_else(|| manager::ManagerError::NoSuchApp(name.to_string()))
    }

    /// Start `name` (or, with `always`, restart it even when it runs), and
    /// wait until it serves.
    async fn start_request(
        &mut self,
        name: &str,
        always: bool,
    ) -> Result<Pending, manager::ManagerError> {
        let spec = self.spec_of(name)?;
        let was_stopped = self.stopped.remove(name);
        let state = self.registry.get(name).map(|i| i.state);
        let serving = self.apps.contains_key(name)
            && !matches!(state, Some(AppState::Failed | AppState::Finished));
        if serving && !was_stopped && !always {
            return Ok(Pending::Done);
        }
        tracing::info!(
            app = name,
            "{}",
            if always { "restarting" } else { "starting" }
        );
        match self.prepare(&spec).await {
            Ok((listeners, artifact)) => {
                Ok(Pending::Ready(self.spawn_app(&spec, listeners, artifact)))
            }
            Err(e) => {
                tracing::error!(app = name, "app failed: {e:#}");
                let why = format!("{e:#}");
                // A running version keeps serving; otherwise it failed.
                if !serving {
                    set_state(&self.registry, name, Report::Failed(why.clone()));
                }
                Err(manager::ManagerError::Failed(why))
            }
        }
    }

    /// Stop `name`: its processes finish their requests and exit (up to
    /// drain-timeout), and the answer waits for that, so that once it comes
    /// no process of the app accepts; its sockets stay bound, so new
    /// connections wait in the backlog until it is started again.
    fn stop_request(&mut self, name: &str) -> Result<Pending, manager::ManagerError> {
        self.spec_of(name)?;
        self.stopped.insert(name.to_string());
        let pending = match self.apps.remove(name) {
            Some(app) => {
                tracing::info!(app = name, "stopping: draining it");
                app.stop.send_replace(true);
                Pending::Exit(app.task)
            }
            None => Pending::Done,
        };
        let changed = self
            .registry
            .update(name, |info| info.set_quiet(AppState::Stopped));
        if changed {
            let _ = sd_notify::notify(&[NotifyState::Status(&self.summary())]);
        }
        Ok(pending)
    }

    /// Compile `name`'s module again, ignoring the cache, and restart onto
    /// the new artifact (a stopped app stays stopped).
    async fn recompile_request(&mut self, name: &str) -> Result<Pending, manager::ManagerError> {
        let spec = self.spec_of(name)?;
        let cache = self.cache.clone();
        let options = EngineOptions::for_app(&spec);
        let module = spec.module.clone();
        let compiled = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
            let engine = corral_compiler::build_engine(&options, None)?.engine;
            let artifact = cache
                .recompile(&engine, &module)
                .with_context(|| format!("compiling {}", module.display()))?;
            Ok(artifact.compile_time.unwrap_or_default())
        })
        .await
        .map_err(|e| anyhow::anyhow!("the compile task failed: {e}"))
        .and_then(|r| r);
        match compiled {
            Ok(took) => tracing::info!(
                app = name,
                "recompiled {} in {took:?}",
                spec.module.display()
            ),
            Err(e) => {
                tracing::error!(app = name, "recompile failed: {e:#}");
                return Err(manager::ManagerError::Failed(format!("{e:#}")));
            }
        }
        if self.stopped.contains(name) {
            return Ok(Pending::Done);
        }
        self.start_request(name, true).await
    }
}

/// What an API request waits for before it is answered.
enum Pending {
    Done,
    /// The new version serves.
    Ready(oneshot::Receiver<()>),
    /// The stopped version's task ends (its processes have exited).
    Exit(tokio::task::JoinHandle<()>),
}

/// Wait (at most 30 s) until every one of `started` serves.
async fn wait_ready(started: Vec<oneshot::Receiver<()>>) {
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for ready in started {
            let _ = ready.await;
        }
    })
    .await;
}

/// The policy's files, for `DaemonInfo`.
fn policy_files(policy: &Policy) -> Vec<String> {
    policy
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// An app's artifact (compiled on a blocking thread), checked and loaded
/// once, then kept only as an open file: corrald never runs it, and a
/// loaded copy per app kept every artifact resident (issue 9, density).
async fn prepare(spec: &AppSpec, sockets: usize, cache: &Cache) -> anyhow::Result<PinnedArtifact> {
    if spec.kind != AppKind::Command && sockets == 0 {
        anyhow::bail!("a {} app needs at least one `listen` address", spec.kind);
    }
    let cache = cache.clone();
    let module = spec.module.clone();
    let artifact = tokio::task::spawn_blocking(move || -> anyhow::Result<PinnedArtifact> {
        let engine = daemon_engine()?;
        let artifact = cache
            .load_or_compile(&engine, &module)
            .with_context(|| format!("compiling {}", module.display()))?;
        Ok(artifact.into_pinned())
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

/// The engine corrald compiles, checks and loads artifacts with: one for
/// every app. Compiled code depends only on settings every app shares
/// (`EngineOptions::for_app` differs in runtime-only limits and the pooling
/// allocator; see `corral_compiler::engine`), so it finds the same cache
/// entries as the zygotes' engines. An engine per app kept its pooling
/// reservation (terabytes of address space) for as long as the app ran:
/// about 30 apps exhausted the address space (issue 9, density).
fn daemon_engine() -> anyhow::Result<wasmtime::Engine> {
    static ENGINE: std::sync::OnceLock<wasmtime::Engine> = std::sync::OnceLock::new();
    if let Some(engine) = ENGINE.get() {
        return Ok(engine.clone());
    }
    let engine = corral_compiler::new_engine(&EngineOptions::default_for_cli())?;
    Ok(ENGINE.get_or_init(|| engine).clone())
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
        if app.spec.pool.min == 0
            && app.spec.kind != AppKind::Command
            && app.spec.pool.zygote == ZygoteMode::OnDemand
        {
            app.set_state(Report::Idle);
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
                    app.set_state(Report::Finished);
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
            app.set_state(Report::Failed(reason));
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
    app.set_state(Report::Backoff(why.clone()));
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
    app.record(|info| info.cold_starts += 1);

    let metrics_page = app.registry.metrics.fd_for_zygote(name);
    let start = Start {
        app: app.spec.clone(),
        listeners: app.spec.listen.iter().map(ToString::to_string).collect(),
        artifact: app.artifact.handoff(),
        metrics: metrics_page.is_some(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = app.listeners.iter().map(AsFd::as_fd).collect();
    fds.push(app.artifact.file().as_fd());
    fds.extend(metrics_page.as_ref().map(AsFd::as_fd));
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
                app.set_state(Report::Running {
                    workers: 0,
                    busy: 0,
                });
                app.record(|info| {
                    info.sandbox = split_layers(&layers);
                    info.zygote_pid = Some(pid);
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
                app.set_state(Report::Running {
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
                let kill = seccomp_report(name, worker, status);
                if kill.is_some()
                    && let Some(counters) = app.registry.metrics.counters(name)
                {
                    counters
                        .sandbox_kills
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let how = kill.unwrap_or(how);
                if crashed {
                    tracing::warn!(app = name, worker, "{how}; replacing it");
                    app.record(|info| {
                        info.errors += 1;
                        info.last_error = Some(format!("worker {worker}: {how}"));
                    });
                } else {
                    tracing::debug!(app = name, worker, "{how}");
                }
            }
            FromZygote::Finished { how, success } => self.finished = Some((how, success)),
            FromZygote::Idle => self.idle = true,
        }
    }
}

/// The zygote's one-line layer summary (`landlock=abi7(files,tcp)
/// seccomp=on(97 calls)`) as a list: split at spaces outside parentheses.
fn split_layers(line: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut current) = (0u32, String::new());
    for c in line.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ' ' if depth == 0 => {
                if !current.is_empty() {
                    parts.push(std::mem::take(&mut current));
                }
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

/// For a worker killed by the seccomp filter: the report naming the system
/// call, from the kernel's audit record when corrald may read it.
fn seccomp_report(app: &str, pid: i32, raw_status: i32) -> Option<String> {
    use std::os::unix::process::ExitStatusExt as _;
    let status = std::process::ExitStatus::from_raw(raw_status);
    let kill = corral_runtime::sandbox::seccomp_kill(u32::try_from(pid).ok()?, status)?;
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
    fn sandbox_layers_split_outside_parentheses() {
        assert_eq!(
            split_layers("landlock=abi7(files,tcp,scoping) seccomp=on(97 calls)"),
            ["landlock=abi7(files,tcp,scoping)", "seccomp=on(97 calls)"]
        );
        assert_eq!(
            split_layers("landlock=off seccomp=off"),
            ["landlock=off", "seccomp=off"]
        );
    }

    #[test]
    fn status_is_one_line_per_daemon() {
        let states = [
            ("a".to_string(), AppState::Idle, 0, 0),
            ("b".to_string(), AppState::Running, 2, 1),
            ("c".to_string(), AppState::Failed, 0, 0),
            ("d".to_string(), AppState::Stopped, 0, 0),
        ];
        assert_eq!(
            summarize(&states),
            "4 apps: a idle, b 2w/1 busy, c FAILED, d stopped"
        );
    }
}
