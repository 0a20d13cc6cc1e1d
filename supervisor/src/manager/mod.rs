//! The `Manager`: the one service behind both management front ends (the
//! Unix-socket HTTP API and D-Bus, which import this module; it imports
//! neither, nor the daemon that answers its requests).
//!
//! Reads (apps, info, events, metrics) come from a [`Registry`] that the
//! app tasks update as they go, so they never wait for the daemon's loop.
//! Mutations (start, stop, restart, reload, recompile) are checked against
//! the caller's credentials *here*, not in the front ends, then sent to the
//! daemon's loop as a [`Request`] and answered on a oneshot channel: the
//! loop is the only place that changes which app versions run, so a
//! mutation never races a SIGHUP reload.
//!
//! Who may mutate: uid 0, and members (primary or supplementary) of the
//! group `daemon.api-group`, looked up at each call so that a group created
//! after corrald started (package installation order) counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot};

pub(crate) mod metrics;
mod state;
mod sys;

pub use state::*;
use sys::group_id;

/// A mutation, for the daemon's loop.
#[derive(Debug)]
pub(crate) enum Request {
    Start(String, oneshot::Sender<Result<(), ManagerError>>),
    Stop(String, oneshot::Sender<Result<(), ManagerError>>),
    Restart(String, oneshot::Sender<Result<(), ManagerError>>),
    Recompile(String, oneshot::Sender<Result<(), ManagerError>>),
    Reload(oneshot::Sender<ReloadReport>),
}

/// Live state of every app, written by the app tasks and the daemon.
pub(crate) struct Registry {
    apps: Mutex<BTreeMap<String, AppInfo>>,
    /// The workers' counters per app (requests, errors, latency).
    pub(crate) metrics: metrics::Blocks,
    events: broadcast::Sender<Event>,
    seq: AtomicU64,
    /// Poked when an app's state changed: `STATUS=` is due (the daemon's
    /// `status.rs`).
    pub(crate) status_changed: tokio::sync::Notify,
    template: Mutex<TemplateInfo>,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        Registry {
            apps: Mutex::new(BTreeMap::new()),
            metrics: metrics::Blocks::default(),
            events: broadcast::channel(1024).0,
            seq: AtomicU64::new(0),
            status_changed: tokio::sync::Notify::new(),
            template: Mutex::new(TemplateInfo::default()),
        }
    }

    /// The zygote template's state, as its task last saw it.
    pub(crate) fn set_template(&self, info: TemplateInfo) {
        *self.template.lock().unwrap_or_else(|e| e.into_inner()) = info;
    }

    /// The zygote template's state, with its PSS read now.
    pub(crate) fn template(&self) -> TemplateInfo {
        let mut info = self
            .template
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        info.pss_bytes = info.pid.and_then(|pid| {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        });
        info
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AppInfo>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the app known (or refresh its policy-side fields), keeping its
    /// counters and state.
    pub(crate) fn declare(&self, spec: &corral_policy::AppSpec) {
        let mut apps = self.lock();
        let info = apps.entry(spec.name.clone()).or_insert_with(|| AppInfo {
            name: spec.name.clone(),
            kind: spec.kind.to_string(),
            state: AppState::Starting,
            state_since: unix_ms(SystemTime::now()),
            workers: 0,
            busy: 0,
            requests: 0,
            errors: 0,
            cold_starts: 0,
            cold_starts_forked: 0,
            last_error: None,
            module: String::new(),
            digest: None,
            artifact: None,
            world: None,
            sandbox: Vec::new(),
            listen: Vec::new(),
            zygote_pid: None,
            tls: None,
            cgroup: None,
        });
        info.kind = spec.kind.to_string();
        info.module = match &spec.oci {
            Some(r) => r.to_string(),
            None => spec.module.display().to_string(),
        };
        info.listen = spec.listen.iter().map(ToString::to_string).collect();
    }

    pub(crate) fn forget(&self, app: &str) {
        self.lock().remove(app);
    }

    /// Change an app's record; an event goes out when its state or worker
    /// count changed. Returns whether the state changed.
    pub(crate) fn update(&self, app: &str, change: impl FnOnce(&mut AppInfo)) -> bool {
        let event = {
            let mut apps = self.lock();
            let Some(info) = apps.get_mut(app) else {
                return false;
            };
            let (old_state, old_workers) = (info.state, info.workers);
            change(info);
            if info.state != old_state {
                info.state_since = unix_ms(SystemTime::now());
            }
            if info.state == old_state && info.workers == old_workers {
                return false;
            }
            Event {
                seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                time: unix_ms(SystemTime::now()),
                app: app.to_string(),
                old: Some(old_state),
                state: info.state,
                workers: info.workers,
                detail: match info.state {
                    AppState::Failed => info.last_error.clone(),
                    _ => None,
                },
            }
        };
        let changed = event.old != Some(event.state);
        // No receiver is fine: nobody is listening.
        let _ = self.events.send(event);
        changed
    }

    /// The app's record with the workers' counters folded in.
    pub(crate) fn get(&self, app: &str) -> Option<AppInfo> {
        let mut info = self.lock().get(app).cloned()?;
        self.metrics.fill(&mut info);
        read_cgroup(&mut info);
        Some(info)
    }

    /// Every app's record with the workers' counters folded in.
    pub(crate) fn all(&self) -> Vec<AppInfo> {
        let mut all: Vec<AppInfo> = self.lock().values().cloned().collect();
        for info in &mut all {
            self.metrics.fill(info);
            read_cgroup(info);
        }
        all
    }

    /// `(name, state, workers, busy)` of every app, for `STATUS=`.
    pub(crate) fn states(&self) -> Vec<(String, AppState, u32, u32)> {
        self.lock()
            .values()
            .map(|i| (i.name.clone(), i.state, i.workers, i.busy))
            .collect()
    }
}

/// Fill the app's cgroup figures from its cgroup's files.
fn read_cgroup(info: &mut AppInfo) {
    if let Some(usage) = &mut info.cgroup
        && let Some(now) = crate::cgroup::usage(std::path::Path::new(&usage.path))
    {
        *usage = now;
    }
}

/// What the daemon tells the Manager once, at start.
pub(crate) struct Static {
    pub(crate) policy_path: std::path::PathBuf,
    pub(crate) api_socket: std::path::PathBuf,
    pub(crate) api_group: String,
    pub(crate) cache: corral_compiler::Cache,
}

struct Shared {
    registry: Arc<Registry>,
    requests: mpsc::Sender<Request>,
    fixed: Static,
    /// Files of the policy in force (changes with reloads).
    policy_files: Mutex<Vec<String>>,
    started: SystemTime,
    started_at: Instant,
    clients: AtomicUsize,
    /// The cache's `(entries, bytes)` and when they were counted.
    cache_stats: Mutex<Option<(Instant, u64, u64)>>,
    /// A walk of the cache is under way (one at a time).
    cache_walking: AtomicBool,
}

/// How long counted cache statistics are given out before the cache is
/// walked again.
const CACHE_STATS_FRESH: Duration = Duration::from_secs(2);

/// The management service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Manager {
    shared: Arc<Shared>,
}

/// Held while an API connection is open: corrald's `idle-exit` waits for
/// every guard to drop.
#[derive(Debug)]
pub struct ClientGuard {
    shared: std::sync::Weak<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.clients.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Manager {
    pub(crate) fn new(
        registry: Arc<Registry>,
        fixed: Static,
        policy_files: Vec<String>,
    ) -> (Manager, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(64);
        let manager = Manager {
            shared: Arc::new(Shared {
                registry,
                requests: tx,
                fixed,
                policy_files: Mutex::new(policy_files),
                started: SystemTime::now(),
                started_at: Instant::now(),
                clients: AtomicUsize::new(0),
                cache_stats: Mutex::new(None),
                cache_walking: AtomicBool::new(false),
            }),
        };
        (manager, rx)
    }

    pub(crate) fn set_policy_files(&self, files: Vec<String>) {
        *self
            .shared
            .policy_files
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = files;
    }

    /// Open API connections.
    pub(crate) fn clients(&self) -> usize {
        self.shared.clients.load(Ordering::Relaxed)
    }

    pub fn list_apps(&self) -> Vec<AppInfo> {
        self.shared.registry.all()
    }

    pub fn get_app(&self, name: &str) -> Result<AppInfo, ManagerError> {
        self.shared
            .registry
            .get(name)
            .ok_or_else(|| ManagerError::NoSuchApp(name.to_string()))
    }

    pub fn info(&self) -> DaemonInfo {
        let fixed = &self.shared.fixed;
        let (entries, bytes) = self.cache_stats();
        DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            wasmtime_version: corral_compiler::WASMTIME_VERSION.to_string(),
            target: corral_compiler::host_triple(),
            pid: std::process::id(),
            started: unix_ms(self.shared.started),
            uptime_seconds: self.shared.started_at.elapsed().as_secs_f64(),
            policy_path: fixed.policy_path.display().to_string(),
            policy_files: self
                .shared
                .policy_files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            api_socket: fixed.api_socket.display().to_string(),
            api_group: fixed.api_group.clone(),
            apps: self.shared.registry.lock().len(),
            cache: CacheStats {
                dir: fixed.cache.root().display().to_string(),
                entries,
                bytes,
            },
            cgroups: match crate::cgroup::tree() {
                Ok(tree) => tree.apps.display().to_string(),
                Err(why) => format!("none: {why}"),
            },
            template: self.shared.registry.template(),
        }
    }

    /// The cache's entries and bytes, at most [`CACHE_STATS_FRESH`] old.
    /// Counting opens, locks and reads every entry: done at every call, a
    /// D-Bus `GetAll` (one call per property) walked the cache 14 times,
    /// and any reader could keep the runtime's threads walking it. Now one
    /// caller walks (on a multi-thread runtime, with `block_in_place` so
    /// the thread's other tasks move on) while the others get the last
    /// figures.
    fn cache_stats(&self) -> (u64, u64) {
        let shared = &self.shared;
        let memo = *shared.cache_stats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, entries, bytes)) = memo
            && at.elapsed() < CACHE_STATS_FRESH
        {
            return (entries, bytes);
        }
        let walker = !shared.cache_walking.swap(true, Ordering::AcqRel);
        if !walker && let Some((_, entries, bytes)) = memo {
            return (entries, bytes);
        }
        let walk = || match shared.fixed.cache.entries() {
            Ok(list) => (list.len() as u64, list.iter().map(|e| e.size).sum()),
            Err(_) => (0, 0),
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let (entries, bytes) = if multi_thread {
            tokio::task::block_in_place(walk)
        } else {
            walk()
        };
        *shared.cache_stats.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), entries, bytes));
        if walker {
            shared.cache_walking.store(false, Ordering::Release);
        }
        (entries, bytes)
    }

    /// App state changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.registry.events.subscribe()
    }

    /// The Prometheus text exposition of the current counters.
    pub fn metrics_text(&self) -> String {
        let apps = self.list_apps();
        self.shared.registry.metrics.render(&apps)
    }

    pub fn client_guard(&self) -> ClientGuard {
        self.shared.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// `Ok` when `caller` may mutate: uid 0, or a member of `api-group`.
    /// A denial is logged with the caller and the action.
    pub fn authorize(&self, caller: &Caller, action: &str) -> Result<(), ManagerError> {
        if caller.uid == 0 {
            return Ok(());
        }
        let group = &self.shared.fixed.api_group;
        let gid = group_id(group);
        if let Some(gid) = gid
            && (caller.gid == gid || caller.groups.contains(&gid))
        {
            return Ok(());
        }
        let pid = caller.pid.map(|p| p.to_string()).unwrap_or("?".into());
        tracing::warn!(
            uid = caller.uid,
            pid,
            via = caller.via,
            "access denied: {action} needs uid 0 or group {group}"
        );
        Err(ManagerError::AccessDenied(match gid {
            Some(_) => format!(
                "{action} is allowed to root and members of the group {group:?} only (caller uid {})",
                caller.uid
            ),
            None => format!(
                "{action} is allowed to root only: the group {group:?} (daemon.api-group) does not exist (caller uid {})",
                caller.uid
            ),
        }))
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, ManagerError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .requests
            .send(make(tx))
            .await
            .map_err(|_| ManagerError::ShuttingDown)?;
        rx.await.map_err(|_| ManagerError::ShuttingDown)
    }

    async fn app_request(
        &self,
        caller: &Caller,
        name: &str,
        action: &str,
        make: fn(String, oneshot::Sender<Result<(), ManagerError>>) -> Request,
    ) -> Result<AppInfo, ManagerError> {
        self.get_app(name)?;
        self.authorize(caller, &format!("{action} {name}"))?;
        tracing::info!(
            app = name,
            uid = caller.uid,
            via = caller.via,
            "{action} requested"
        );
        self.ask(|tx| make(name.to_string(), tx)).await??;
        self.get_app(name)
    }

    /// Start a stopped or failed app (a running one is left as it is).
    pub async fn start_app(&self, caller: &Caller, name: &str) -> Result<AppInfo, ManagerError> {
        self.app_request(caller, name, "start", Request::Start)
            .await
    }

    /// Stop accepting and drain; the sockets stay bound.
    pub async fn stop_app(&self, caller: &Caller, name: &str) -> Result<AppInfo, ManagerError> {
        self.app_request(caller, name, "stop", Request::Stop).await
    }

    /// A new zygote on the same sockets; the old workers drain.
    pub async fn restart_app(&self, caller: &Caller, name: &str) -> Result<AppInfo, ManagerError> {
        self.app_request(caller, name, "restart", Request::Restart)
            .await
    }

    /// Compile the module again (ignoring the cache) and restart onto it.
    pub async fn recompile(&self, caller: &Caller, name: &str) -> Result<AppInfo, ManagerError> {
        self.app_request(caller, name, "recompile", Request::Recompile)
            .await
    }

    /// Read the policy again, as SIGHUP does.
    pub async fn reload(&self, caller: &Caller) -> Result<ReloadReport, ManagerError> {
        self.authorize(caller, "reload")?;
        tracing::info!(uid = caller.uid, via = caller.via, "reload requested");
        self.ask(Request::Reload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_root_group_and_not_a_missing_one() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("corral-no-such-group-xyz"), None);
        assert_eq!(group_id("a\0b"), None);
    }

    #[test]
    fn events_go_out_on_state_and_worker_changes_only() {
        let registry = Registry::new();
        let mut rx = registry.events.subscribe();
        registry.lock().insert(
            "a".into(),
            AppInfo {
                name: "a".into(),
                kind: "http".into(),
                state: AppState::Starting,
                state_since: 0,
                workers: 0,
                busy: 0,
                requests: 0,
                errors: 0,
                cold_starts: 0,
                cold_starts_forked: 0,
                last_error: None,
                module: "/m.wasm".into(),
                digest: None,
                artifact: None,
                world: None,
                sandbox: vec![],
                listen: vec![],
                zygote_pid: None,
                tls: None,
                cgroup: None,
            },
        );
        assert!(registry.update("a", |i| i.state = AppState::Running));
        assert!(!registry.update("a", |i| i.busy = 3));
        assert!(!registry.update("a", |i| i.workers = 2));
        assert!(!registry.update("missing", |i| i.workers = 2));
        let first = rx.try_recv().unwrap();
        assert_eq!(
            (first.seq, first.old, first.state),
            (1, Some(AppState::Starting), AppState::Running)
        );
        let second = rx.try_recv().unwrap();
        assert_eq!((second.seq, second.workers), (2, 2));
        assert!(rx.try_recv().is_err(), "busy alone is not an event");
    }

    #[test]
    fn info_counts_the_cache_on_either_kind_of_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let cache = corral_compiler::Cache::open(dir.path()).unwrap();
        let module = dir.path().join("m.wat");
        std::fs::write(&module, "(module)").unwrap();
        let engine =
            corral_compiler::new_engine(&corral_compiler::EngineOptions::default_for_cli())
                .unwrap();
        cache.load_or_compile(&engine, &module).unwrap();
        let (manager, _requests) = Manager::new(
            Arc::new(Registry::new()),
            Static {
                policy_path: "/p.toml".into(),
                api_socket: "/a.sock".into(),
                api_group: "corral".into(),
                cache,
            },
            vec![],
        );
        // corrald's runtime, where the walk leaves the worker thread...
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let m = manager.clone();
        let first = multi
            .block_on(multi.spawn(async move { m.info().cache }))
            .unwrap();
        assert_eq!(first.entries, 1, "{first:?}");
        assert!(first.bytes > 0, "{first:?}");
        // ...and a current-thread one (block_in_place would panic there).
        *manager.shared.cache_stats.lock().unwrap() = None;
        let single = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(single.block_on(async { manager.info().cache }), first);
        assert_eq!(manager.info().cache, first, "outside any runtime");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
