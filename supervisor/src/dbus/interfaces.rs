//! The two D-Bus interfaces: `org.corral.Manager1` on the manager object
//! and `org.corral.App1` on each app's object.
//!
//! Both are thin: each method builds a [`Caller`] when it mutates, calls
//! one [`Manager`] method and converts the answer. The conversion is one
//! rule for every type, so that a D-Bus answer can be compared field by
//! field with the socket API's JSON:
//!
//! - a JSON field `snake_case` is the D-Bus name `CamelCase`
//!   (`state_since` is `StateSince`, `cache.entries` is `CacheEntries`);
//! - the value is the same, in the same unit (Unix milliseconds, counts);
//! - D-Bus has no null: a JSON `null` is `""` for a string and `0` for a pid.
//!
//! An app is an `a{sv}` (the same dict `Properties.GetAll` gives for the
//! app's object); `ListApps` gives systemd's kind of summary table with the
//! object paths.

// The `ManagerObjectSignals` trait that `#[interface]` generates outside the
// impl takes `&self` plus one argument per field of an event.
#![allow(
    clippy::too_many_arguments,
    reason = "AppStateChanged has one argument per field of the event"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Notify;
use zbus::fdo;
use zbus::message::{Header, Message};
use zbus::names::ErrorName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface};
use zbus::{OwnedObjectPath, Variant};

use super::path::app_path;
use crate::manager::{AppInfo, Caller, DaemonInfo, Event, Manager, ManagerError, ReloadReport};

/// The name of the app interface.
pub const APP_INTERFACE: &str = "org.corral.App1";

/// An app as D-Bus shows it: property name to value.
pub type AppDict = BTreeMap<&'static str, Variant<'static>>;

/// One row of `ListApps`: name, kind, state, workers, busy, requests,
/// errors, object path.
pub type AppRow = (String, String, String, u32, u32, u64, u64, OwnedObjectPath);

/// One problem of `Reload`: file, line, column, key, message, the whole line.
pub type ProblemRow = (String, u32, u32, String, String, String);

/// One app a reload refused: the app, why.
pub type RefusedRow = (String, String);

/// `Reload`'s answer: applied, errors, added, removed, changed, unchanged,
/// refused (written out in `reload`'s signature: `#[interface]` makes separate out
/// arguments only of a tuple it can see).
pub type ReloadRow = (
    bool,
    Vec<ProblemRow>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<RefusedRow>,
);

/// The properties of `org.corral.App1`, in the order of [`AppInfo`]'s
/// fields. `Properties.GetAll` and `GetApp` give exactly these.
pub fn app_properties(a: &AppInfo) -> AppDict {
    BTreeMap::from([
        ("Name", Variant::from(a.name.clone())),
        ("Kind", Variant::from(a.kind.clone())),
        ("State", Variant::from(a.state.as_str())),
        ("StateSince", Variant::from(a.state_since)),
        ("Workers", Variant::from(a.workers)),
        ("Busy", Variant::from(a.busy)),
        ("Requests", Variant::from(a.requests)),
        ("Errors", Variant::from(a.errors)),
        ("ColdStarts", Variant::from(a.cold_starts)),
        ("ColdStartsForked", Variant::from(a.cold_starts_forked)),
        (
            "LastError",
            Variant::from(a.last_error.clone().unwrap_or_default()),
        ),
        ("Module", Variant::from(a.module.clone())),
        (
            "Digest",
            Variant::from(a.digest.clone().unwrap_or_default()),
        ),
        (
            "Artifact",
            Variant::from(a.artifact.clone().unwrap_or_default()),
        ),
        ("World", Variant::from(a.world.clone().unwrap_or_default())),
        ("Sandbox", Variant::from(a.sandbox.clone())),
        ("Listen", Variant::from(a.listen.clone())),
        ("ZygotePid", Variant::from(a.zygote_pid.unwrap_or(0))),
        ("Tls", Variant::from(tls_dict(a))),
        ("Cgroup", Variant::from(cgroup_dict(a))),
    ])
}

/// The certificate the app serves (docs/dbus.md): `Subject` s, `Names` as,
/// `NotBefore` and `NotAfter` x (Unix time, seconds); empty without `tls`.
pub fn tls_dict(a: &AppInfo) -> BTreeMap<String, Variant<'static>> {
    let Some(c) = &a.tls else {
        return BTreeMap::new();
    };
    BTreeMap::from([
        ("Subject".to_string(), Variant::from(c.subject.clone())),
        ("Names".to_string(), Variant::from(c.names.clone())),
        ("NotBefore".to_string(), Variant::from(c.not_before)),
        ("NotAfter".to_string(), Variant::from(c.not_after)),
    ])
}

/// The app's cgroup figures (docs/dbus.md): `Path` s, `CpuUsec`,
/// `MemoryBytes`, `MemoryPeakBytes` (0: unknown), `Tasks`, `OomKills`,
/// `PidsMaxHits` t, `Limits` a{ss}; empty when it has no cgroup.
pub fn cgroup_dict(a: &AppInfo) -> BTreeMap<String, Variant<'static>> {
    let Some(u) = &a.cgroup else {
        return BTreeMap::new();
    };
    let limits: BTreeMap<String, String> = u.limits.iter().cloned().collect();
    BTreeMap::from([
        ("Path".to_string(), Variant::from(u.path.clone())),
        ("CpuUsec".to_string(), Variant::from(u.cpu_usec)),
        ("MemoryBytes".to_string(), Variant::from(u.memory_bytes)),
        (
            "MemoryPeakBytes".to_string(),
            Variant::from(u.memory_peak_bytes.unwrap_or(0)),
        ),
        ("Tasks".to_string(), Variant::from(u.tasks)),
        ("OomKills".to_string(), Variant::from(u.oom_kills)),
        ("PidsMaxHits".to_string(), Variant::from(u.pids_max_hits)),
        ("Limits".to_string(), Variant::from(limits)),
    ])
}

/// The app properties whose changes go out as `PropertiesChanged` (the
/// others are counters that change with every request: read them).
pub const APP_PROPERTIES_EMITTING: &[&str] = &[
    "Kind",
    "State",
    "StateSince",
    "Workers",
    "LastError",
    "Module",
    "Digest",
    "Artifact",
    "World",
    "Sandbox",
    "Listen",
    "ZygotePid",
];

/// The manager properties whose changes go out as `PropertiesChanged`.
pub const MANAGER_PROPERTIES_EMITTING: &[&str] = &["PolicyFiles", "Apps"];

/// The emitting manager properties of `info`.
pub fn manager_emitting(info: &DaemonInfo) -> AppDict {
    BTreeMap::from([
        ("PolicyFiles", Variant::from(info.policy_files.clone())),
        ("Apps", Variant::from(count(info.apps))),
    ])
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn app_row(a: &AppInfo) -> AppRow {
    (
        a.name.clone(),
        a.kind.clone(),
        a.state.as_str().to_string(),
        a.workers,
        a.busy,
        a.requests,
        a.errors,
        app_path(&a.name),
    )
}

fn reload_row(r: ReloadReport) -> ReloadRow {
    (
        r.applied,
        r.errors
            .into_iter()
            .map(|p| (p.file, p.line, p.column, p.key, p.message, p.text))
            .collect(),
        r.added,
        r.removed,
        r.changed,
        r.unchanged,
        r.refused.into_iter().map(|a| (a.app, a.reason)).collect(),
    )
}

/// A failed call, as D-Bus errors: `AccessDenied` is the standard
/// `org.freedesktop.DBus.Error.AccessDenied`, the rest are ours.
#[derive(Debug)]
pub enum Error {
    NoSuchApp(String),
    AccessDenied(String),
    Failed(String),
    ShuttingDown(String),
    /// The bus itself failed us (e.g. asking for the caller's credentials).
    Bus(String),
}

impl Error {
    fn message(&self) -> &str {
        match self {
            Error::NoSuchApp(m)
            | Error::AccessDenied(m)
            | Error::Failed(m)
            | Error::ShuttingDown(m)
            | Error::Bus(m) => m,
        }
    }
}

impl From<ManagerError> for Error {
    fn from(e: ManagerError) -> Error {
        let message = e.to_string();
        match e {
            ManagerError::NoSuchApp(_) => Error::NoSuchApp(message),
            ManagerError::AccessDenied(_) => Error::AccessDenied(message),
            ManagerError::Failed(_) => Error::Failed(message),
            ManagerError::ShuttingDown => Error::ShuttingDown(message),
        }
    }
}

impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Error {
        Error::Bus(e.to_string())
    }
}

impl zbus::DBusError for Error {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name()).build(&(self.message(),))
    }

    fn name(&self) -> ErrorName<'_> {
        ErrorName::from_static_str_unchecked(match self {
            Error::NoSuchApp(_) => "org.corral.Manager1.Error.NoSuchApp",
            Error::AccessDenied(_) => "org.freedesktop.DBus.Error.AccessDenied",
            Error::Failed(_) => "org.corral.Manager1.Error.Failed",
            Error::ShuttingDown(_) => "org.corral.Manager1.Error.ShuttingDown",
            Error::Bus(_) => "org.freedesktop.DBus.Error.Failed",
        })
    }

    fn description(&self) -> Option<&str> {
        Some(self.message())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", zbus::DBusError::name(self), self.message())
    }
}

impl std::error::Error for Error {}

/// Who sent `call`, from the bus's `GetConnectionCredentials` (the bus
/// read them from the kernel when the caller connected; the caller cannot
/// choose them). A caller whose uid the bus does not know is nobody.
async fn caller(conn: &Connection, call: &Header<'_>) -> Result<Caller, Error> {
    let sender = call
        .sender()
        .ok_or_else(|| Error::AccessDenied("the call names no sender".into()))?;
    let reply = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "GetConnectionCredentials",
            &(sender.as_str(),),
        )
        .await?;
    let creds: fdo::ConnectionCredentials = reply.body().deserialize()?;
    let groups = creds.unix_group_ids().cloned().unwrap_or_default();
    Ok(Caller {
        uid: creds.unix_user_id().unwrap_or(u32::MAX),
        // dbus-daemon reports every group of the caller, its primary one
        // included (tested with setpriv), but not which one is primary:
        // Manager::authorize treats `gid` and `groups` alike.
        gid: groups.first().copied().unwrap_or(u32::MAX),
        groups,
        pid: creds.process_id(),
        via: "dbus",
    })
}

/// `org.corral.Manager1` on `/org/corral/Manager1`.
#[derive(Debug)]
pub struct ManagerObject {
    manager: Manager,
    /// Poked after a reload so that app objects come and go at once.
    resync: Arc<Notify>,
}

impl ManagerObject {
    pub fn new(manager: Manager, resync: Arc<Notify>) -> ManagerObject {
        ManagerObject { manager, resync }
    }
}

#[interface(name = "org.corral.Manager1")]
impl ManagerObject {
    /// Every app: name, kind, state, workers, busy workers, requests,
    /// errors, and the path of its org.corral.App1 object.
    #[zbus(out_args("apps"))]
    async fn list_apps(&self) -> Vec<AppRow> {
        self.manager.list_apps().iter().map(app_row).collect()
    }

    /// One app: the properties of its org.corral.App1 object.
    #[zbus(out_args("app"))]
    async fn get_app(&self, name: &str) -> Result<AppDict, Error> {
        Ok(app_properties(&self.manager.get_app(name)?))
    }

    /// Start a stopped or failed app (root or daemon.api-group only).
    #[zbus(out_args("app"))]
    async fn start_app(
        &self,
        name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] call: Header<'_>,
    ) -> Result<AppDict, Error> {
        let caller = caller(conn, &call).await?;
        Ok(app_properties(
            &self.manager.start_app(&caller, name).await?,
        ))
    }

    /// Stop accepting and drain; the sockets stay bound (root or
    /// daemon.api-group only).
    #[zbus(out_args("app"))]
    async fn stop_app(
        &self,
        name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] call: Header<'_>,
    ) -> Result<AppDict, Error> {
        let caller = caller(conn, &call).await?;
        Ok(app_properties(&self.manager.stop_app(&caller, name).await?))
    }

    /// A new zygote on the same sockets; the old workers drain (root or
    /// daemon.api-group only).
    #[zbus(out_args("app"))]
    async fn restart_app(
        &self,
        name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] call: Header<'_>,
    ) -> Result<AppDict, Error> {
        let caller = caller(conn, &call).await?;
        Ok(app_properties(
            &self.manager.restart_app(&caller, name).await?,
        ))
    }

    /// Read the policy again, as SIGHUP does. A policy with errors is not
    /// applied: applied is false and errors lists them; refused lists the
    /// apps whose new version was not applied, and why (root or
    /// daemon.api-group only).
    #[zbus(out_args(
        "applied",
        "errors",
        "added",
        "removed",
        "changed",
        "unchanged",
        "refused"
    ))]
    async fn reload(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] call: Header<'_>,
    ) -> Result<
        (
            bool,
            Vec<ProblemRow>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<RefusedRow>,
        ),
        Error,
    > {
        let caller = caller(conn, &call).await?;
        let report = self.manager.reload(&caller).await?;
        self.resync.notify_one();
        Ok(reload_row(report))
    }

    /// Compile the app's module again, ignoring the cache, and restart the
    /// app onto it (root or daemon.api-group only).
    #[zbus(out_args("app"))]
    async fn recompile(
        &self,
        name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] call: Header<'_>,
    ) -> Result<AppDict, Error> {
        let caller = caller(conn, &call).await?;
        Ok(app_properties(
            &self.manager.recompile(&caller, name).await?,
        ))
    }

    /// An app's state or worker count changed: one signal per event of the
    /// socket API's GET /v1/events, with the same fields (old is "" for an
    /// app that just appeared, detail "" when there is none).
    #[zbus(signal)]
    pub async fn app_state_changed(
        emitter: &SignalEmitter<'_>,
        seq: u64,
        time: u64,
        app: &str,
        old: &str,
        state: &str,
        workers: u32,
        detail: &str,
    ) -> zbus::Result<()>;

    /// corral's version.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> String {
        self.manager.info().version
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn wasmtime_version(&self) -> String {
        self.manager.info().wasmtime_version
    }

    /// The host's target triple (the cache's first directory level).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn target(&self) -> String {
        self.manager.info().target
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn pid(&self) -> u32 {
        self.manager.info().pid
    }

    /// When corrald started, Unix time in milliseconds.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn started(&self) -> u64 {
        self.manager.info().started
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn uptime_seconds(&self) -> f64 {
        self.manager.info().uptime_seconds
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn policy_path(&self) -> String {
        self.manager.info().policy_path
    }

    /// The policy file and its drop-ins in force, in merge order.
    #[zbus(property)]
    async fn policy_files(&self) -> Vec<String> {
        self.manager.info().policy_files
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn api_socket(&self) -> String {
        self.manager.info().api_socket
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn api_group(&self) -> String {
        self.manager.info().api_group
    }

    /// How many apps the policy in force has.
    #[zbus(property)]
    async fn apps(&self) -> u32 {
        count(self.manager.info().apps)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn cache_dir(&self) -> String {
        self.manager.info().cache.dir
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn cache_entries(&self) -> u64 {
        self.manager.info().cache.entries
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn cache_bytes(&self) -> u64 {
        self.manager.info().cache.bytes
    }

    /// The parent of the apps' cgroups, or "none: " and why they have none.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn cgroups(&self) -> String {
        self.manager.info().cgroups
    }

    /// The zygote template: `running`, `down` or `off`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn template_state(&self) -> String {
        self.manager.info().template.state
    }

    /// Its pid; 0 when it is not running.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn template_pid(&self) -> u32 {
        self.manager.info().template.pid.unwrap_or(0)
    }

    /// Times it exited and was started again.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn template_restarts(&self) -> u64 {
        self.manager.info().template.restarts
    }

    /// Why it is (or last went) down; "" when it never did.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn template_last_error(&self) -> String {
        self.manager.info().template.last_error.unwrap_or_default()
    }

    /// Its PSS in bytes, read now; 0 when it is not running.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn template_pss_bytes(&self) -> u64 {
        self.manager.info().template.pss_bytes.unwrap_or(0)
    }
}

/// `org.corral.App1` on `/org/corral/Manager1/app/<label>`. Its
/// properties are read live from the Manager at each `Get`/`GetAll`.
#[derive(Debug)]
pub struct AppObject {
    manager: Manager,
    name: String,
}

impl AppObject {
    pub fn new(manager: Manager, name: String) -> AppObject {
        AppObject { manager, name }
    }

    fn app(&self) -> fdo::Result<AppInfo> {
        self.manager
            .get_app(&self.name)
            .map_err(|e| fdo::Error::UnknownObject(e.to_string()))
    }
}

#[interface(name = "org.corral.App1")]
impl AppObject {
    #[zbus(property(emits_changed_signal = "const"))]
    async fn name(&self) -> fdo::Result<String> {
        Ok(self.app()?.name)
    }

    /// http, stdio or command.
    #[zbus(property)]
    async fn kind(&self) -> fdo::Result<String> {
        Ok(self.app()?.kind)
    }

    /// starting, running, idle, restarting, failed, stopped or finished.
    #[zbus(property)]
    async fn state(&self) -> fdo::Result<String> {
        Ok(self.app()?.state.as_str().to_string())
    }

    /// When State last changed, Unix time in milliseconds.
    #[zbus(property)]
    async fn state_since(&self) -> fdo::Result<u64> {
        Ok(self.app()?.state_since)
    }

    /// Live workers.
    #[zbus(property)]
    async fn workers(&self) -> fdo::Result<u32> {
        Ok(self.app()?.workers)
    }

    /// Workers serving at least one connection.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn busy(&self) -> fdo::Result<u32> {
        Ok(self.app()?.busy)
    }

    /// Served since corrald started: http requests, stdio connections,
    /// command runs.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn requests(&self) -> fdo::Result<u64> {
        Ok(self.app()?.requests)
    }

    /// Failed requests and crashed instances.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn errors(&self) -> fdo::Result<u64> {
        Ok(self.app()?.errors)
    }

    /// Zygote starts (from zero, and restarts).
    #[zbus(property(emits_changed_signal = "false"))]
    async fn cold_starts(&self) -> fdo::Result<u64> {
        Ok(self.app()?.cold_starts)
    }

    /// Of those, zygotes forked from the zygote template.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn cold_starts_forked(&self) -> fdo::Result<u64> {
        Ok(self.app()?.cold_starts_forked)
    }

    /// "" when there was none.
    #[zbus(property)]
    async fn last_error(&self) -> fdo::Result<String> {
        Ok(self.app()?.last_error.unwrap_or_default())
    }

    /// The module's path, or its `oci://` reference.
    #[zbus(property)]
    async fn module(&self) -> fdo::Result<String> {
        Ok(self.app()?.module)
    }

    /// For an `oci://` module, `sha256:...` of the manifest its reference
    /// resolved to; "" otherwise.
    #[zbus(property)]
    async fn digest(&self) -> fdo::Result<String> {
        Ok(self.app()?.digest.unwrap_or_default())
    }

    /// triple/engine-hash/module-sha256 of the artifact served, "" when none.
    #[zbus(property)]
    async fn artifact(&self) -> fdo::Result<String> {
        Ok(self.app()?.artifact.unwrap_or_default())
    }

    /// The world the module targets (`wasi:http/service@0.3`, ...), "" when
    /// not known.
    #[zbus(property)]
    async fn world(&self) -> fdo::Result<String> {
        Ok(self.app()?.world.unwrap_or_default())
    }

    /// Sandbox layers in force, as the zygote reported them.
    #[zbus(property)]
    async fn sandbox(&self) -> fdo::Result<Vec<String>> {
        Ok(self.app()?.sandbox)
    }

    /// Listen addresses as the policy writes them.
    #[zbus(property)]
    async fn listen(&self) -> fdo::Result<Vec<String>> {
        Ok(self.app()?.listen)
    }

    /// 0 when no zygote runs.
    #[zbus(property)]
    async fn zygote_pid(&self) -> fdo::Result<u32> {
        Ok(self.app()?.zygote_pid.unwrap_or(0))
    }

    /// The certificate the app's TCP addresses serve; empty without `tls`.
    #[zbus(property)]
    async fn tls(&self) -> fdo::Result<BTreeMap<String, Variant<'static>>> {
        Ok(tls_dict(&self.app()?))
    }

    /// The app's cgroup: CPU time, memory, tasks, OOM kills, limits in
    /// force; empty when it has none.
    #[zbus(property)]
    async fn cgroup(&self) -> fdo::Result<BTreeMap<String, Variant<'static>>> {
        Ok(cgroup_dict(&self.app()?))
    }
}

/// Emit `AppStateChanged` for `event` from the manager object.
pub async fn emit_event(emitter: &SignalEmitter<'_>, event: &Event) -> zbus::Result<()> {
    ManagerObject::app_state_changed(
        emitter,
        event.seq,
        event.time,
        &event.app,
        event.old.map(|s| s.as_str()).unwrap_or(""),
        event.state.as_str(),
        event.workers,
        event.detail.as_deref().unwrap_or(""),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::AppState;

    /// An idle http app with no TLS and no cgroup.
    fn web_app() -> AppInfo {
        AppInfo {
            name: "web".into(),
            kind: "http".into(),
            state: AppState::Idle,
            state_since: 1_700_000_000_000,
            workers: 0,
            busy: 0,
            requests: 7,
            errors: 1,
            cold_starts: 2,
            cold_starts_forked: 1,
            last_error: None,
            module: "/srv/web.wasm".into(),
            digest: None,
            artifact: None,
            world: None,
            sandbox: vec!["seccomp=on".into()],
            listen: vec!["127.0.0.1:8080".into()],
            zygote_pid: None,
            tls: None,
            cgroup: None,
        }
    }

    #[test]
    fn every_app_field_is_a_property_and_none_is_empty() {
        let info = web_app();
        let props = app_properties(&info);
        // One property per field of the JSON object, named in CamelCase.
        let json = serde_json::to_value(&info).unwrap();
        let mut json_keys: Vec<String> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| camel_case(k))
            .collect();
        json_keys.sort();
        let mut keys: Vec<String> = props.keys().map(|k| k.to_string()).collect();
        keys.sort();
        assert_eq!(keys, json_keys);
        assert_eq!(props["LastError"], Variant::from(""));
        assert_eq!(props["ZygotePid"], Variant::from(0u32));
        assert_eq!(props["State"], Variant::from("idle"));
        for name in APP_PROPERTIES_EMITTING {
            assert!(props.contains_key(name), "{name}");
        }
    }

    fn camel_case(snake: &str) -> String {
        snake
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn an_app_with_tls_shows_its_certificate() {
        let mut info = web_app();
        assert!(tls_dict(&info).is_empty());
        info.tls = Some(crate::tls::CertInfo {
            subject: "CN=web.example".into(),
            names: vec!["web.example".into(), "127.0.0.1".into()],
            not_before: 1_790_000_000,
            not_after: 1_797_776_000,
        });
        let d = tls_dict(&info);
        assert_eq!(d["Subject"], Variant::from("CN=web.example"));
        assert_eq!(
            d["Names"],
            Variant::from(vec!["web.example".to_string(), "127.0.0.1".to_string()])
        );
        assert_eq!(d["NotAfter"], Variant::from(1_797_776_000i64));
        assert_eq!(app_properties(&info)["Tls"], Variant::from(d));
    }

    #[test]
    fn manager_errors_keep_their_dbus_names() {
        use zbus::DBusError;
        let denied = Error::from(ManagerError::AccessDenied("no".into()));
        assert_eq!(
            denied.name().as_str(),
            "org.freedesktop.DBus.Error.AccessDenied"
        );
        assert_eq!(denied.description(), Some("no"));
        assert_eq!(
            Error::from(ManagerError::NoSuchApp("x".into()))
                .name()
                .as_str(),
            "org.corral.Manager1.Error.NoSuchApp"
        );
        assert_eq!(
            Error::from(ManagerError::ShuttingDown).name().as_str(),
            "org.corral.Manager1.Error.ShuttingDown"
        );
    }
}
