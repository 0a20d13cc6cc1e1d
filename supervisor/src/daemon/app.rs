//! One app's task, for as long as corrald runs it: watch its sockets at
//! zero, start its zygote (`corrald zygote`, `corral_runtime::zygote`),
//! hand it the app, follow it, restart it with backoff or mark the app
//! failed, and report the app's state.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::PinnedArtifact;
use corral_policy::{AppKind, AppSpec, RestartOn, ZygoteMode};
use rustix::net::RecvFlags;
use rustix::process::WaitOptions;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use crate::manager::{self, AppState, Registry};
use corral_runtime::protocol::{self, FromZygote, Start, ToZygote};

/// Variables a zygote must not see: they are corrald's.
const PRIVATE_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// How one app task reports itself (the registry keeps the API's view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Report {
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
pub(super) fn set_state(registry: &Registry, app: &str, report: Report) {
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
        registry.status_changed.notify_one();
    }
}

/// One app as its task holds it.
pub(super) struct App {
    pub(super) spec: AppSpec,
    /// Its cgroup (`apps/NAME` of corrald's subtree), if it has one: each
    /// zygote goes there before it gets the app.
    pub(super) cgroup: Option<std::path::PathBuf>,
    pub(super) listeners: Vec<OwnedFd>,
    pub(super) artifact: PinnedArtifact,
    /// Its certificate and key, read by corrald (`tls`), for each zygote.
    pub(super) tls: Option<corral_runtime::tls::TlsMaterial>,
    /// To rebuild a damaged artifact.
    pub(super) cache: corral_compiler::Cache,
    pub(super) drain_timeout: Duration,
    pub(super) registry: Arc<Registry>,
    /// `true` once this version is stopping (shutdown, or replaced or
    /// removed by a reload): it no longer reports its state.
    pub(super) stopping: watch::Receiver<bool>,
    /// Where its zygotes are forked from (exec'd when it cannot).
    pub(super) template: super::template::Template,
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

/// How a zygote's life ended.
#[derive(Debug)]
pub(super) enum ZygoteEnd {
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
    /// The artifact failed its check in the zygote.
    ArtifactDamaged(String),
}

/// One app, for as long as corrald runs.
pub(super) async fn supervise(
    mut app: App,
    ready: oneshot::Sender<()>,
    mut shutdown: watch::Receiver<bool>,
) {
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
        let pids_before = app
            .cgroup
            .as_deref()
            .map_or(0, crate::cgroup::pids_max_hits);
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
            ZygoteEnd::ArtifactDamaged(why) => {
                // Rebuilt from the module (the damaged entry is discarded)
                // and started again at once; a rebuild that fails counts
                // as a crash, with backoff and give-up.
                tracing::warn!(app = name, "{why}: rebuilding the artifact");
                let rebuilt =
                    super::reconcile::prepare(&app.spec, app.listeners.len(), &app.cache).await;
                match rebuilt {
                    Ok(artifact) => {
                        tracing::info!(app = name, "artifact rebuilt: starting again");
                        app.artifact = artifact;
                        continue;
                    }
                    Err(e) => {
                        if let Some(end) = crashed(
                            &app,
                            &mut crashes,
                            &mut backoff,
                            started,
                            &mut ready,
                            &mut shutdown,
                            format!("{why}; rebuilding it failed: {e:#}"),
                        )
                        .await
                        {
                            return end;
                        }
                    }
                }
            }
            ZygoteEnd::Crashed(why) => {
                if let Some(reason) = too_few_processes(&app, pids_before, &why) {
                    // Restarting would hit the same pids.max: report it
                    // once, until a reload or restart changes it.
                    tracing::error!(app = name, "failed: {reason}");
                    app.set_state(Report::Failed(reason));
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    let _ = shutdown.changed().await;
                    return;
                }
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

/// The zygote died because its cgroup's `pids.max` (`limits.processes`)
/// refused a fork: the reason, naming the key and the fix.
fn too_few_processes(app: &App, pids_before: u64, why: &str) -> Option<String> {
    let dir = app.cgroup.as_deref()?;
    let hits = crate::cgroup::pids_max_hits(dir);
    if hits <= pids_before {
        return None;
    }
    let limit = app.spec.limits.processes.map_or_else(
        || "pids.max".to_string(),
        |n| format!("limits.processes = {n}"),
    );
    Some(format!(
        "{limit} is too low for this app: its cgroup refused {} fork(s) (pids.events max), and pids.max counts every thread; raise limits.processes (or lower pool.max) and reload; the zygote said: {why}",
        hits - pids_before
    ))
}

/// A crash (zygote, or a failed `command` instance): count it for
/// `restart.give-up`, then wait out the backoff. `Some` when the app is
/// done (failed, or corrald is stopping).
pub(super) async fn crashed(
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

/// A control socketpair (corrald's end, the child's end): one packet per
/// message (`corral_runtime::protocol`).
pub(super) fn control_socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// `corrald SUBCOMMAND` (`zygote`, `template`) with `control` as its
/// stdin and corrald's stderr as its stdout, in a process group of its own
/// (corrald kills an app's processes by group), without corrald's systemd
/// variables.
pub(super) fn corrald_child(
    subcommand: &str,
    control: OwnedFd,
) -> std::io::Result<std::process::Command> {
    let stdout = std::io::stderr().as_fd().try_clone_to_owned()?;
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("corrald")
        .arg(subcommand)
        .stdin(Stdio::from(control))
        .stdout(Stdio::from(stdout))
        .process_group(0);
    for var in PRIVATE_ENV {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

/// Wait until one of `listeners` has a connection waiting, without
/// accepting it: it stays in the backlog for a worker.
pub(super) async fn wait_for_connection(listeners: &[OwnedFd]) -> anyhow::Result<()> {
    let mut watched = Vec::new();
    for fd in listeners {
        watched.push(super::sys::register(
            fd.try_clone()?,
            tokio::io::Interest::READABLE,
        )?);
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
pub(super) async fn run_zygote(
    app: &App,
    ready: &mut Option<oneshot::Sender<()>>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<ZygoteEnd> {
    let name = &app.spec.name;
    let (ours, theirs) = control_socketpair().context("creating the control socketpair")?;
    // Forked from the template (a fork, with the engine built), or exec'd
    // when the template is off, down or refuses.
    let options = corral_compiler::EngineOptions::for_app(&app.spec);
    let t_spawn = Instant::now();
    let mut child = match app.template.fork(options, theirs.try_clone()?).await {
        Ok(pid) => {
            drop(theirs);
            ZygoteProcess::forked(pid)
        }
        Err(why) => {
            tracing::debug!(app = name, "starting the zygote by exec: {why}");
            let child = corrald_child("zygote", theirs)?.spawn();
            ZygoteProcess::spawned(child.context("starting the zygote")?)
        }
    };
    let forked = child.is_forked();
    let pid = child.pid().as_raw_nonzero().get() as u32;
    // Into the app's cgroup before it is sent the app: until then it only
    // waits on its control socket, so no guest code (and no worker, which
    // inherits the cgroup) runs outside it.
    if let Some(dir) = &app.cgroup
        && let Err(why) = crate::cgroup::place(dir, pid)
    {
        if app.spec.sandbox.cgroups == corral_policy::Enforcement::Require {
            anyhow::bail!("placing the zygote in the app's cgroup: {why}");
        }
        tracing::warn!(
            app = name,
            "placing the zygote in the app's cgroup: {why}; it runs without its limits"
        );
    }
    let oom_before = app.cgroup.as_deref().map_or(0, crate::cgroup::oom_kills);
    let exited = super::sys::register(
        rustix::process::pidfd_open(child.pid(), rustix::process::PidfdFlags::empty())
            .context("pidfd_open of the zygote")?,
        tokio::io::Interest::READABLE,
    )?;
    tracing::debug!(
        app = name,
        pid,
        "zygote started ({}) in {:?}",
        if forked {
            "forked from the template"
        } else {
            "exec"
        },
        t_spawn.elapsed()
    );
    app.record(|info| {
        info.cold_starts += 1;
        info.cold_starts_forked += u64::from(forked);
    });

    let metrics_page = app.registry.metrics.fd_for_zygote(name);
    let start = Start {
        app: app.spec.clone(),
        listeners: app.spec.listen.iter().map(ToString::to_string).collect(),
        artifact: app.artifact.handoff(),
        metrics: metrics_page.is_some(),
        tls: app.tls.clone(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = app.listeners.iter().map(AsFd::as_fd).collect();
    fds.push(app.artifact.file().as_fd());
    fds.extend(metrics_page.as_ref().map(AsFd::as_fd));
    protocol::send(&ours, &ToZygote::Start(Box::new(start)), &fds)?;
    rustix::io::ioctl_fionbio(&ours, true)?;
    let control = super::sys::register(
        ours,
        tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
    )?;

    let mut seen = Reported {
        oom_kills: oom_before,
        ..Reported::default()
    };
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
                if let Some(why) = seen.artifact_damaged {
                    return Ok(ZygoteEnd::ArtifactDamaged(why));
                }
                if seen.idle && status.success() {
                    return Ok(ZygoteEnd::Idle);
                }
                let mut why = seen.failed.take().unwrap_or_else(|| format!("exit status {status}"));
                let sigkill = std::os::unix::process::ExitStatusExt::signal(&status) == Some(9);
                if let Some(oom) = seen.new_oom_kills(app, sigkill) {
                    why = format!("{why}; {oom}");
                }
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
pub(super) struct Reported {
    idle: bool,
    finished: Option<(String, bool)>,
    failed: Option<String>,
    artifact_damaged: Option<String>,
    /// The app cgroup's `memory.events` `oom_kill` last seen.
    oom_kills: u64,
}

impl Reported {
    /// When the app's cgroup counts OOM kills not seen yet: what to say of
    /// the process that died (the kernel killed it at `limits.app-memory`).
    ///
    /// `sigkill`: the process died of SIGKILL. The kernel counts an OOM
    /// kill in `memory.events` only after it sent the signal, so the
    /// victim can be reaped (and reported here) before the count moves:
    /// for a SIGKILL the count is read again for up to 200 ms.
    fn new_oom_kills(&mut self, app: &App, sigkill: bool) -> Option<String> {
        let dir = app.cgroup.as_deref()?;
        let mut now = crate::cgroup::oom_kills(dir);
        let mut tries = if sigkill { 20 } else { 0 };
        while now <= self.oom_kills && tries > 0 {
            std::thread::sleep(Duration::from_millis(10));
            now = crate::cgroup::oom_kills(dir);
            tries -= 1;
        }
        if now <= self.oom_kills {
            return None;
        }
        // One kill per process that died: two workers killed at once are
        // both reported (the count may have moved by two before the first
        // one's report).
        self.oom_kills += 1;
        let limit = app.spec.limits.app_memory.map_or_else(
            || "memory.max".to_string(),
            |b| format!("limits.app-memory = {b} bytes"),
        );
        Some(format!(
            "killed by the kernel's OOM killer: the app's processes together reached {limit} (memory.events oom_kill = {now})"
        ))
    }

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
            FromZygote::ArtifactDamaged { error } => self.artifact_damaged = Some(error),
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
                let mut how = kill.unwrap_or(how);
                // WIFSIGNALED with SIGKILL (the OOM killer's signal).
                let sigkill = status & 0x7f == 9;
                if crashed && let Some(oom) = self.new_oom_kills(app, sigkill) {
                    how = format!("{how}: {oom}");
                }
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
pub(super) fn split_layers(line: &str) -> Vec<String> {
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
pub(super) fn seccomp_report(app: &str, pid: i32, raw_status: i32) -> Option<String> {
    use std::os::unix::process::ExitStatusExt as _;
    let status = std::process::ExitStatus::from_raw(raw_status);
    let kill = corral_runtime::sandbox::seccomp_kill(u32::try_from(pid).ok()?, status)?;
    Some(kill.describe(app))
}

/// A zygote process: dropped before it was reaped, it and its workers (its
/// process group) are killed.
pub(super) struct ZygoteProcess {
    how: Started,
    reaped: bool,
}

enum Started {
    /// Exec'd by corrald.
    Spawned(std::process::Child),
    /// Forked from the template, as corrald's child (`CLONE_PARENT`).
    Forked(rustix::process::Pid),
}

impl ZygoteProcess {
    fn spawned(child: std::process::Child) -> ZygoteProcess {
        ZygoteProcess {
            how: Started::Spawned(child),
            reaped: false,
        }
    }

    fn forked(pid: i32) -> ZygoteProcess {
        ZygoteProcess {
            how: Started::Forked(
                rustix::process::Pid::from_raw(pid).expect("the template sends a positive pid"),
            ),
            reaped: false,
        }
    }

    fn is_forked(&self) -> bool {
        matches!(self.how, Started::Forked(_))
    }

    fn pid(&self) -> rustix::process::Pid {
        match &self.how {
            Started::Spawned(child) => rustix::process::Pid::from_child(child),
            Started::Forked(pid) => *pid,
        }
    }

    /// Reap it (it has exited: its pidfd was readable).
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = match &mut self.how {
            Started::Spawned(child) => child.wait()?,
            Started::Forked(pid) => {
                use std::os::unix::process::ExitStatusExt as _;
                let (_, status) = rustix::process::waitpid(Some(*pid), WaitOptions::empty())?
                    .ok_or_else(|| std::io::Error::other("waitpid returned no status"))?;
                std::process::ExitStatus::from_raw(status.as_raw())
            }
        };
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for ZygoteProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let pid = self.pid();
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            // A forked zygote makes its process group itself, first thing:
            // until then the group does not exist.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = self.wait();
        }
    }
}

/// The next message on a control socket (a zygote's, or the template's);
/// `None` once the peer closed it.
pub(super) async fn recv_from<T: serde::de::DeserializeOwned>(
    control: &AsyncFd<OwnedFd>,
) -> std::io::Result<Option<T>> {
    loop {
        let mut guard = control.readable().await?;
        match guard.try_io(|fd| protocol::recv::<T>(fd.get_ref(), RecvFlags::DONTWAIT)) {
            Ok(result) => return result.map(|m| m.map(|(msg, _fds)| msg)),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
