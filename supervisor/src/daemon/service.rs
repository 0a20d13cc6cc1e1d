//! corrald's service loop: the policy's apps started, the API and D-Bus
//! front ends started by the caller ([`super::FrontEnds`]), systemd told
//! (`READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`), and signals and API
//! requests served until SIGTERM (signals on a `sigwait` thread: tokio's
//! signal driver would need a socketpair in every worker runtime, which the
//! sandbox refuses).
//!
//! Readiness: `READY=1` once every app is served: its zygote reported
//! `Ready` (apps with `pool.min > 0` and `command` apps), or corrald is
//! watching its sockets (`pool.min = 0`), or it is being restarted or has
//! failed (logged, and in `STATUS=`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::Cache;
use corral_policy::{AppKind, AppSpec, Environment, ListenAddr, Policy};
use sd_notify::NotifyState;
use tokio::sync::watch;

use super::listeners::SystemdSockets;
use super::reconcile::{Resolve, policy_files};
use super::sys;
use crate::manager::{self, Manager, Registry};

/// `corrald --policy PATH`: serve the policy's apps until SIGTERM, with
/// `front_ends` over the manager.
pub fn run(policy_path: &Path, front_ends: impl super::FrontEnds) -> ExitCode {
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
    // Thousands of apps need more than the usual soft limit of 1,024 (see
    // open_files.rs); before any thread, so that every thread counts on it.
    match super::open_files::raise_soft_limit() {
        Ok(limit) => {
            if let Some(warning) = super::open_files::shortfall(&policy, limit) {
                tracing::warn!("{warning}");
            }
        }
        Err(e) => tracing::warn!("raising the open files limit: {e}"),
    }
    // Before any thread and any app: corrald moves itself into a leaf of
    // its delegated cgroup and makes the apps' parent (docs/daemon.md).
    match crate::cgroup::init(&crate::fitness::kernel().cgroup_v2) {
        Ok(tree) => tracing::info!(
            "cgroups: each app gets its own under {} (cpu, memory, pids)",
            tree.apps.display()
        ),
        Err(why) => {
            let limited: Vec<&str> = policy
                .apps
                .values()
                .filter(|a| a.limits.wants_cgroup_limits())
                .map(|a| a.name.as_str())
                .collect();
            if limited.is_empty() {
                tracing::info!("cgroups: apps run without their own: {why}");
            } else {
                tracing::warn!(
                    "cgroups: apps run without their own, so the app-wide limits of {} are NOT enforced: {why}; to have them, {}",
                    limited.join(", "),
                    crate::cgroup::HOW_TO_FIX
                );
            }
        }
    }
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
    let served = rt.block_on(serve(policy_path.to_path_buf(), policy, front_ends));
    // A compile still running on a blocking thread (a start-up cut short by
    // SIGTERM) is not waited for.
    rt.shutdown_timeout(Duration::from_millis(100));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// An app being served, as the daemon holds it.
pub(super) struct RunningApp {
    pub(super) spec: AppSpec,
    pub(super) artifact: corral_compiler::ArtifactKey,
    /// The certificate and key it was handed (`tls`): a reload that reads
    /// other bytes switches it over like any other change.
    pub(super) tls: Option<corral_runtime::tls::TlsMaterial>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

/// corrald's state between signals.
pub(super) struct Daemon {
    pub(super) policy_path: std::path::PathBuf,
    pub(super) policy: Policy,
    pub(super) systemd: SystemdSockets,
    pub(super) cache: Cache,
    pub(super) registry: Arc<Registry>,
    pub(super) manager: Manager,
    /// Apps stopped through the API: not started by a reload until a
    /// start or restart.
    pub(super) stopped: BTreeSet<String>,
    /// Bound listening sockets by address, shared by the old and new
    /// version of an app across a reload.
    pub(super) sockets: BTreeMap<String, OwnedFd>,
    pub(super) apps: BTreeMap<String, RunningApp>,
    /// Apps replaced or removed by a reload, still draining.
    pub(super) retired: Vec<tokio::task::JoinHandle<()>>,
    /// Apps that could not be started for a reason that passes (a port
    /// still held by the processes of a killed corrald, no descriptor
    /// left): started again when their time comes (`reconcile.rs`).
    pub(super) retries: BTreeMap<String, super::reconcile::Retry>,
    /// Apps that failed before they started, whose held sockets close
    /// each connection at once (see `Daemon::turn_away`).
    pub(super) turned_away: BTreeMap<String, tokio::task::JoinHandle<()>>,
    /// What each `oci://` reference resolved to (`<state>/oci-pins.json`).
    pub(super) pins: crate::oci::Pins,
    /// The zygote template app zygotes are forked from.
    pub(super) template: super::template::Template,
}

async fn serve(
    policy_path: std::path::PathBuf,
    policy: Policy,
    front_ends: impl super::FrontEnds,
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
    // Started before the apps, which ask it for their zygotes (exec'd
    // until it answers: its own start is an exec like a zygote's).
    let template = super::template::Template::start(policy.daemon.template, registry.clone());
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
        retries: BTreeMap::new(),
        turned_away: BTreeMap::new(),
        pins: crate::oci::Pins::load(&policy.daemon.state_dir),
        template,
        policy,
    };
    let apps = daemon.policy.apps.clone();
    for spec in apps.values() {
        daemon.registry.declare(spec);
    }
    // After the apps are declared (the first request already lists them,
    // their D-Bus objects exist when the name is taken) and before they
    // start: READY=1 comes only once the API serves.
    let _front_ends = front_ends
        .start(
            daemon.manager.clone(),
            &daemon.policy.daemon,
            &daemon.systemd,
        )
        .await;
    tokio::spawn(super::status::follow(daemon.registry.clone()));
    // Before the apps start: a SIGTERM during a long start-up (thousands of
    // apps, cold caches) stops it, rather than waiting for every app.
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
    let mut reload_pending = false;
    let mut stop_signal = None;
    {
        let start_all = async {
            let mut readiness = Vec::new();
            for spec in apps.values() {
                if let Some(ready) = daemon.start_app(spec, Resolve::Fresh).await {
                    readiness.push(ready);
                }
            }
            for ready in readiness {
                let _ = ready.await;
            }
        };
        tokio::pin!(start_all);
        loop {
            tokio::select! {
                () = &mut start_all => break,
                sig = signals.recv() => match sig {
                    Some(libc::SIGHUP) => reload_pending = true,
                    sig => {
                        stop_signal = Some(sig.unwrap_or(libc::SIGTERM));
                        break;
                    }
                },
            }
        }
    }
    if let Some(sig) = stop_signal {
        tracing::info!("signal {sig} during start-up: not starting the remaining apps");
        daemon.shutdown().await;
        return Ok(());
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

    if reload_pending {
        tracing::info!(
            "SIGHUP during start-up: reloading {}",
            daemon.policy_path.display()
        );
        daemon.reload().await;
    }
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
            () = super::reconcile::sleep_until(daemon.next_retry()), if daemon.next_retry().is_some() => {
                daemon.retry_due().await;
            }
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
    daemon.shutdown().await;
    Ok(())
}

impl Daemon {
    /// SIGTERM, SIGINT or idle-exit: every app drains (up to
    /// drain-timeout).
    async fn shutdown(&mut self) {
        tracing::info!("stopping: draining every app");
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
        let deadline = self.policy.daemon.drain_timeout + Duration::from_secs(2);
        let mut tasks = std::mem::take(&mut self.retired);
        for (_, app) in std::mem::take(&mut self.apps) {
            app.stop.send_replace(true);
            tasks.push(app.task);
        }
        let _ = tokio::time::timeout(deadline, async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
    }
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
}
