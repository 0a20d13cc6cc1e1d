//! Reconciling: which app versions run. The daemon's loop is the only
//! place that starts, stops, restarts or replaces an app (at start, on
//! SIGHUP and on the API's mutations), so none of these can race.
//!
//! Invariants: a listening socket is bound once per address and kept by
//! the [`Daemon`] across reloads, so an app switched by a reload never
//! closes it (waiting connections stay in the backlog); an app version that
//! was told to stop no longer writes its state, so `STATUS=` and
//! `idle-exit` follow the live version.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_compiler::{Cache, EngineOptions, PinnedArtifact};
use corral_policy::{AppKind, AppSpec, Environment, ListenAddr, Policy};
use sd_notify::NotifyState;
use tokio::sync::{oneshot, watch};

use super::app::{App, Report, set_state, supervise};
use super::listeners::{self};
use super::service::{Daemon, RunningApp};
use crate::manager::{self, AppState, ReloadReport, Request};

impl Daemon {
    pub(super) fn summary(&self) -> String {
        super::status::summarize(&self.registry.states())
    }

    /// Every app has no process (idle, failed, stopped or finished), no
    /// stopped app is still draining, and no API client is connected.
    pub(super) fn all_idle(&self) -> bool {
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

    /// Sockets, artifact and certificate of `spec`; an error, before
    /// anything is bound or compiled, when the app cannot run on this
    /// machine at all (see [`crate::fitness`]) or its certificate and key
    /// are not usable: that is decided once, here, not by a zygote crashing
    /// on it (and on reload, the running version keeps serving).
    async fn prepare(&mut self, spec: &AppSpec) -> anyhow::Result<Prepared> {
        let refused = crate::fitness::refusals(spec, crate::fitness::kernel());
        if !refused.is_empty() {
            anyhow::bail!("not started: {}", refused.join("; "));
        }
        let world = crate::fitness::world(spec).map(|w| w.to_string());
        let tls = crate::tls::load(spec, std::time::SystemTime::now())?;
        if let Some(tls) = &tls {
            for warning in &tls.warnings {
                tracing::warn!(app = spec.name, "{warning}");
            }
        }
        let mut sockets = Vec::new();
        for addr in &spec.listen {
            sockets.push(self.socket(addr)?);
        }
        let artifact = prepare(spec, sockets.len(), &self.cache).await?;
        app_cgroup(spec)?;
        if let Some(counters) = self.registry.metrics.counters(&spec.name) {
            let counter = match artifact.cache_hit {
                true => &counters.cache_hits,
                false => &counters.cache_misses,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Prepared {
            sockets,
            artifact,
            tls,
            world,
        })
    }

    /// Prepare and start `spec`; `None` if it failed (logged, state set).
    pub(super) async fn start_app(
        &mut self,
        spec: &AppSpec,
        resolve: Resolve,
    ) -> Option<oneshot::Receiver<()>> {
        let prepared = match self.resolve(spec, resolve).await {
            Ok(resolved) => self.prepare(&resolved).await.map(|p| (resolved, p)),
            Err(e) => Err(e),
        };
        match prepared {
            Ok((resolved, prepared)) => Some(self.spawn_app(&resolved, prepared)),
            Err(e) => {
                self.not_started(spec, &e);
                None
            }
        }
    }

    /// `spec` with its `oci://` module fetched: the module's path set to
    /// the verified copy in the store. With [`Resolve::Fresh`] (corrald
    /// starting, a reload) a tag is resolved at the registry; when that
    /// fails and no version of the app serves, the reference's pin (what it
    /// last resolved to, `<state>/oci-pins.json`) is used if its module is
    /// still stored. [`Resolve::Pinned`] (restarts, retries, API starts)
    /// uses the pin and only fetches a reference never resolved; so does a
    /// `@sha256:` reference already fetched, whatever `how` says.
    pub(super) async fn resolve(
        &mut self,
        spec: &AppSpec,
        how: Resolve,
    ) -> anyhow::Result<AppSpec> {
        let Some(reference) = &spec.oci else {
            return Ok(spec.clone());
        };
        let key = reference.to_string();
        let cache_dir = self.policy.daemon.cache_dir.clone();
        let pinned = self.pins.get(&key).cloned().filter(|pin| {
            std::fs::metadata(crate::oci::store_path(&cache_dir, &pin.module)).is_ok()
        });
        let use_pin = |pin: &crate::oci::Pin| {
            let mut resolved = spec.clone();
            resolved.module = crate::oci::store_path(&cache_dir, &pin.module);
            resolved
        };
        // A digest never moves: once fetched, no need to ask again.
        let by_digest = matches!(reference.version, corral_policy::OciVersion::Digest(_));
        if (how == Resolve::Pinned || by_digest)
            && let Some(pin) = &pinned
        {
            return Ok(use_pin(pin));
        }
        let registries = crate::oci::Registries(self.policy.registries.clone());
        let fetched = crate::oci::fetch(
            reference,
            &registries,
            &cache_dir,
            spec.limits.module_size,
            crate::oci::Progress::Quiet,
        )
        .await;
        match fetched {
            Ok(f) => {
                tracing::info!(
                    app = spec.name,
                    "{key} resolved to sha256:{} (module sha256:{}, {} bytes{})",
                    f.manifest,
                    f.module,
                    f.size,
                    if f.cached { ", already stored" } else { "" }
                );
                let pin = crate::oci::Pin {
                    manifest: f.manifest.clone(),
                    module: f.module.clone(),
                };
                if let Err(e) = self.pins.set(&key, pin) {
                    tracing::warn!(app = spec.name, "cannot record the pin of {key}: {e:#}");
                }
                self.registry.update(&spec.name, |info| {
                    info.digest = Some(format!("sha256:{}", f.manifest));
                });
                let mut resolved = spec.clone();
                resolved.module = f.path;
                Ok(resolved)
            }
            Err(e) => match pinned {
                Some(pin) if !self.apps.contains_key(&spec.name) => {
                    tracing::warn!(
                        app = spec.name,
                        "cannot resolve {key} ({e:#}); serving what it last resolved to, sha256:{}",
                        pin.manifest
                    );
                    self.registry.update(&spec.name, |info| {
                        info.digest = Some(format!("sha256:{}", pin.manifest));
                    });
                    Ok(use_pin(&pin))
                }
                _ => Err(e.context(format!("fetching {key}"))),
            },
        }
    }

    /// `spec` could not be prepared: retried with backoff (`restart.backoff`)
    /// when the reason passes by itself ([`is_transient`]), failed
    /// otherwise.
    fn not_started(&mut self, spec: &AppSpec, e: &anyhow::Error) {
        let name = &spec.name;
        if !is_transient(e) {
            self.retries.remove(name);
            tracing::error!(app = name, "app failed: {e:#}");
            set_state(&self.registry, name, Report::Failed(format!("{e:#}")));
            self.turn_away(spec);
            return;
        }
        let backoff = spec.restart;
        let retry = self.retries.entry(name.clone()).or_insert(Retry {
            at: Instant::now(),
            next_backoff: backoff.backoff_min,
        });
        let wait = retry.next_backoff;
        retry.at = Instant::now() + wait;
        retry.next_backoff = (wait * 2).min(backoff.backoff_max);
        let wait = humantime::format_duration(wait);
        tracing::warn!(app = name, "cannot start yet: {e:#}; retrying in {wait}");
        set_state(
            &self.registry,
            name,
            Report::Backoff(format!("{e:#} (retrying in {wait})")),
        );
    }

    /// When the next retry is due, if any.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|r| r.at).min()
    }

    /// Start the apps whose retry is due (see [`Daemon::not_started`]).
    pub(super) async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .retries
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let spec = match self.policy.apps.get(&name) {
                Some(spec) if !self.stopped.contains(&name) && !self.apps.contains_key(&name) => {
                    spec.clone()
                }
                _ => {
                    self.retries.remove(&name);
                    continue;
                }
            };
            tracing::info!(app = name, "trying to start it again");
            // Its readiness is not waited for: READY=1 was sent.
            let _ = self.start_app(&spec, Resolve::Pinned).await;
        }
    }

    /// `spec` failed before it started: connections to its sockets that
    /// systemd holds (or that an earlier version bound) would wait in the
    /// backlog for a worker that never comes, so they are accepted and
    /// closed at once until a start or reload runs it. An address nothing
    /// holds yet stays unbound (clients get "connection refused").
    fn turn_away(&mut self, spec: &AppSpec) {
        let mut held = Vec::new();
        for addr in &spec.listen {
            let fd = match addr {
                ListenAddr::Systemd(_) => self.socket(addr).ok(),
                _ => self
                    .sockets
                    .get(&addr.to_string())
                    .and_then(|fd| fd.try_clone().ok()),
            };
            held.extend(fd);
        }
        if held.is_empty() {
            return;
        }
        tracing::info!(
            app = spec.name,
            "closing connections to its sockets until it is started again"
        );
        let task = tokio::spawn(close_connections(spec.name.clone(), held));
        if let Some(old) = self.turned_away.insert(spec.name.clone(), task) {
            old.abort();
        }
    }

    fn spawn_app(&mut self, spec: &AppSpec, prepared: Prepared) -> oneshot::Receiver<()> {
        let Prepared {
            sockets: listeners,
            artifact,
            tls,
            world,
        } = prepared;
        self.retries.remove(&spec.name);
        if let Some(task) = self.turned_away.remove(&spec.name) {
            task.abort();
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stop_rx) = watch::channel(false);
        let key = artifact.key.clone();
        set_state(&self.registry, &spec.name, Report::Starting);
        let cert = tls.as_ref().map(|t| t.cert.clone());
        self.registry.update(&spec.name, |info| {
            info.artifact = Some(key.to_string());
            info.world = world;
            info.tls = cert;
        });
        let tls = tls.map(|t| t.material);
        let cgroup = crate::cgroup::tree()
            .ok()
            .map(|t| t.app_dir(&spec.name))
            .filter(|d| d.is_dir());
        self.registry.update(&spec.name, |info| {
            info.cgroup = cgroup.as_ref().map(|d| crate::cgroup::Usage {
                path: d.display().to_string(),
                ..Default::default()
            });
        });
        let app = App {
            cgroup,
            spec: spec.clone(),
            listeners,
            artifact,
            tls: tls.clone(),
            cache: self.cache.clone(),
            drain_timeout: self.policy.daemon.drain_timeout,
            registry: self.registry.clone(),
            stopping: stop_rx.clone(),
            template: self.template.clone(),
        };
        let task = tokio::spawn(supervise(app, ready_tx, stop_rx));
        let old = self.apps.insert(
            spec.name.clone(),
            RunningApp {
                spec: spec.clone(),
                artifact: key,
                tls,
                stop,
                task,
            },
        );
        if let Some(old) = old {
            old.stop.send_replace(true);
            self.retired.push(old.task);
        }
        // The engines the apps now served need, built ahead by the template.
        self.template.warm(
            self.apps
                .values()
                .map(|a| corral_compiler::EngineOptions::for_app(&a.spec))
                .collect(),
        );
        ready_rx
    }

    /// SIGHUP or the API's Reload: read the policy again; switch changed
    /// apps over, start new ones, drain removed ones. An invalid policy
    /// changes nothing; its errors are logged and returned.
    pub(super) async fn reload(&mut self) -> ReloadReport {
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
            if let Some(task) = self.turned_away.remove(&name) {
                task.abort();
            }
            self.stopped.remove(&name);
            self.retries.remove(&name);
            self.registry.forget(&name);
            report.removed.push(name);
        }
        let mut started = Vec::new();
        for (name, spec) in &policy.apps {
            let known = self.policy.apps.contains_key(name);
            if self.stopped.contains(name) {
                self.registry.declare(spec);
                // Stays stopped; a start uses the new spec.
                match self.policy.apps.get(name) {
                    Some(old) if old == spec => report.unchanged.push(name.clone()),
                    Some(_) => report.changed.push(name.clone()),
                    None => report.added.push(name.clone()),
                }
                continue;
            }
            let resolved = self.resolve(spec, Resolve::Fresh).await;
            let prepared = match resolved {
                Ok(resolved) => self.prepare(&resolved).await.map(|p| (resolved, p)),
                Err(e) => Err(e),
            };
            let (resolved, prepared) = match prepared {
                Ok(both) => both,
                Err(e) => {
                    let reason = format!("{e:#}");
                    if self.apps.contains_key(name) {
                        // Its record stays that of the version that serves
                        // (listen, artifact); the next reload tries again.
                        tracing::error!(
                            app = name,
                            "reload: cannot prepare the new version ({reason}); keeping the running one"
                        );
                        self.registry.update(name, |info| {
                            info.last_error =
                                Some(format!("reload: new version refused: {reason}"));
                        });
                    } else {
                        self.registry.declare(spec);
                        self.not_started(spec, &e);
                    }
                    report.refused.push(manager::RefusedApp {
                        app: name.clone(),
                        reason,
                    });
                    continue;
                }
            };
            let spec = &resolved;
            self.registry.declare(spec);
            let state = self.registry.get(name).map(|i| i.state);
            let healthy = !matches!(state, Some(AppState::Failed | AppState::Finished));
            let same_tls = |running: &RunningApp| {
                running.tls == prepared.tls.as_ref().map(|t| t.material.clone())
            };
            match self.apps.get_mut(name) {
                Some(running)
                    if running.spec == *spec
                        && running.artifact == prepared.artifact.key
                        && same_tls(running) =>
                {
                    report.unchanged.push(name.clone());
                }
                Some(running)
                    if healthy
                        && running.artifact == prepared.artifact.key
                        && same_tls(running)
                        && same_but_cgroup_limits(&running.spec, spec) =>
                {
                    // prepare() wrote the new values into its cgroup: the
                    // running processes have them, nothing restarts.
                    tracing::info!(
                        app = name,
                        "reload: app-wide limits changed; applied to its running cgroup"
                    );
                    running.spec = spec.clone();
                    report.changed.push(name.clone());
                }
                Some(_) => {
                    tracing::info!(app = name, "reload: changed; switching to the new version");
                    started.push(self.spawn_app(spec, prepared));
                    report.changed.push(name.clone());
                }
                None => {
                    tracing::info!(app = name, "reload: new app");
                    started.push(self.spawn_app(spec, prepared));
                    if known {
                        report.changed.push(name.clone());
                    } else {
                        report.added.push(name.clone());
                    }
                }
            }
        }
        // Sockets no app listens on any more (nor a version that serves on
        // because its new one was refused).
        let used: std::collections::BTreeSet<String> = policy
            .apps
            .values()
            .chain(self.apps.values().map(|a| &a.spec))
            .flat_map(|a| a.listen.iter().map(ToString::to_string))
            .collect();
        self.sockets.retain(|addr, _| used.contains(addr));
        // Cgroups of apps no longer in the policy: removed once their
        // processes are gone (the kernel refuses while any is left; the
        // next reload tries again).
        if let Ok(tree) = crate::cgroup::tree() {
            tree.remove_stale(|name| {
                policy.apps.contains_key(name) || self.apps.contains_key(name)
            });
        }
        self.manager.set_policy_files(policy_files(&policy));
        self.policy = policy;
        // READY=1 again once the new versions serve (bounded: a zygote that
        // never answers is the restart logic's business).
        wait_ready(started).await;
        report
    }

    /// An API request (already authorized by the Manager).
    pub(super) async fn handle(&mut self, request: Request) {
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
        let prepared = match self.resolve(&spec, Resolve::Pinned).await {
            Ok(resolved) => self.prepare(&resolved).await.map(|p| (resolved, p)),
            Err(e) => Err(e),
        };
        match prepared {
            Ok((resolved, prepared)) => Ok(Pending::Ready(self.spawn_app(&resolved, prepared))),
            Err(e) => {
                let why = format!("{e:#}");
                // A running version keeps serving; otherwise it failed (or
                // is retried, for a reason that passes).
                if serving {
                    tracing::error!(app = name, "cannot start a new version: {why}");
                } else {
                    self.not_started(&spec, &e);
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
        self.retries.remove(name);
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
            self.registry.status_changed.notify_one();
        }
        Ok(pending)
    }

    /// Compile `name`'s module again, ignoring the cache, and restart onto
    /// the new artifact (a stopped app stays stopped).
    async fn recompile_request(&mut self, name: &str) -> Result<Pending, manager::ManagerError> {
        let spec = self.spec_of(name)?;
        let spec = self
            .resolve(&spec, Resolve::Pinned)
            .await
            .map_err(|e| manager::ManagerError::Failed(format!("{e:#}")))?;
        let cache = self.cache.clone();
        let module = spec.module.clone();
        let compiled = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
            // The daemon's one engine, as for every other compile: an engine
            // per call (with the app's pooling reservation) cost about 2 MiB
            // and a thousand mappings that were never given back.
            let engine = daemon_engine()?;
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

/// Whether a tag is resolved at the registry now (corrald starting, a
/// reload) or taken from what it last resolved to (everything else: a tag
/// never moves silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolve {
    Fresh,
    Pinned,
}

/// What an app version needs before its zygote starts.
pub(super) struct Prepared {
    sockets: Vec<OwnedFd>,
    artifact: PinnedArtifact,
    /// Its certificate and key, read and checked (`tls`).
    tls: Option<crate::tls::LoadedTls>,
    /// The world its module targets, for status.
    world: Option<String>,
}

/// When to try starting an app again, and the wait after that.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retry {
    at: Instant,
    next_backoff: Duration,
}

/// Whether starting an app failed for a reason that passes by itself, so
/// that it is retried with backoff instead of marking the app failed
/// until an operator acts: an address in use (the processes of a killed
/// corrald finishing their connections, another service restarting), an
/// address not (yet) configured, no descriptor or buffer left.
fn is_transient(e: &anyhow::Error) -> bool {
    const TRANSIENT: [i32; 8] = [
        libc::EADDRINUSE,
        libc::EADDRNOTAVAIL,
        libc::EMFILE,
        libc::ENFILE,
        libc::ENOBUFS,
        libc::ENOMEM,
        libc::EAGAIN,
        libc::EINTR,
    ];
    e.chain().any(|cause| {
        let code = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .or_else(|| {
                cause
                    .downcast_ref::<rustix::io::Errno>()
                    .map(|e| e.raw_os_error())
            });
        code.is_some_and(|c| TRANSIENT.contains(&c))
    })
}

/// Sleep until `at` (for ever if `None`).
pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What an API request waits for before it is answered.
pub(super) enum Pending {
    Done,
    /// The new version serves.
    Ready(oneshot::Receiver<()>),
    /// The stopped version's task ends (its processes have exited).
    Exit(tokio::task::JoinHandle<()>),
}

/// Wait (at most 30 s) until every one of `started` serves.
pub(super) async fn wait_ready(started: Vec<oneshot::Receiver<()>>) {
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for ready in started {
            let _ = ready.await;
        }
    })
    .await;
}

/// Accept and close every connection to `listeners` (non-blocking
/// listening sockets) until aborted: what an app that cannot start answers.
async fn close_connections(app: String, listeners: Vec<OwnedFd>) {
    let mut waiting = tokio::task::JoinSet::new();
    for fd in listeners {
        let app = app.clone();
        waiting.spawn(async move {
            let fd = match super::sys::register(fd, tokio::io::Interest::READABLE) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(app = %app, "watching a socket of a failed app: {e}");
                    return;
                }
            };
            loop {
                let Ok(mut ready) = fd.readable().await else {
                    return;
                };
                loop {
                    match rustix::net::accept(fd.get_ref()) {
                        Ok(conn) => drop(conn),
                        Err(rustix::io::Errno::AGAIN) => {
                            ready.clear_ready();
                            break;
                        }
                        Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => {}
                        Err(e) => {
                            tracing::warn!(app = %app, "closing connections to a failed app: {e}");
                            return;
                        }
                    }
                }
            }
        });
    }
    while waiting.join_next().await.is_some() {}
}

/// The policy's files, for `DaemonInfo`.
pub(super) fn policy_files(policy: &Policy) -> Vec<String> {
    policy
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// `a` and `b` differ at most in the limits a cgroup enforces (which a
/// reload applies to the running app's cgroup without restarting it).
fn same_but_cgroup_limits(a: &AppSpec, b: &AppSpec) -> bool {
    let mut b = b.clone();
    b.limits.cpu_weight = a.limits.cpu_weight;
    b.limits.cpu = a.limits.cpu;
    b.limits.app_memory = a.limits.app_memory;
    b.limits.processes = a.limits.processes;
    *a == b
}

/// Make `spec`'s cgroup and set its limits (on a reload too: the running
/// app's cgroup takes the new values at once). Without corrald's cgroup
/// tree, `sandbox.cgroups = "require"` refuses the app, saying why and how
/// to fix it; `best-effort` runs it and says which limits are not enforced.
pub(super) fn app_cgroup(spec: &AppSpec) -> anyhow::Result<Option<std::path::PathBuf>> {
    let name = &spec.name;
    let require = spec.sandbox.cgroups == corral_policy::Enforcement::Require;
    let why = match crate::cgroup::tree() {
        Ok(tree) => match tree.prepare_app(name, &spec.limits) {
            Ok(dir) => return Ok(Some(dir)),
            Err(why) => why,
        },
        Err(why) => why.to_string(),
    };
    if require {
        anyhow::bail!(
            "not started: sandbox.cgroups = \"require\" and it cannot have a cgroup of its own: {why}; to fix it, {}",
            crate::cgroup::HOW_TO_FIX
        );
    }
    if spec.limits.wants_cgroup_limits() {
        tracing::warn!(
            app = name,
            "limits.cpu-weight, limits.cpu, limits.app-memory and limits.processes are NOT enforced: no cgroup of its own ({why})"
        );
    }
    Ok(None)
}

/// An app's artifact (compiled on a blocking thread), checked and loaded
/// once, then kept only as an open file: corrald never runs it, and a
/// loaded copy per app kept every artifact resident (issue 9, density).
pub(super) async fn prepare(
    spec: &AppSpec,
    sockets: usize,
    cache: &Cache,
) -> anyhow::Result<PinnedArtifact> {
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
pub(super) fn daemon_engine() -> anyhow::Result<wasmtime::Engine> {
    static ENGINE: std::sync::OnceLock<wasmtime::Engine> = std::sync::OnceLock::new();
    if let Some(engine) = ENGINE.get() {
        return Ok(engine.clone());
    }
    let engine = corral_compiler::new_engine(&EngineOptions::default_for_cli())?;
    Ok(ENGINE.get_or_init(|| engine).clone())
}
