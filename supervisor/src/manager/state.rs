//! What the manager tells about apps and the daemon: the records and
//! answers both front ends serialize (the API's JSON field names and words).

use std::time::SystemTime;

use serde::Serialize;

/// How an app is doing. The words are the API's (`"running"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    /// Its artifact is being prepared or its zygote is starting.
    Starting,
    /// Its zygote serves (workers may be 0 for a moment).
    Running,
    /// No process: corrald watches its sockets (`pool.min = 0`).
    Idle,
    /// It crashed and waits out its restart backoff.
    Restarting,
    /// It gave up (`restart.give-up`) or could not be prepared.
    Failed,
    /// Stopped through the API; its sockets stay bound.
    Stopped,
    /// A `command` app whose instance ended and is not restarted.
    Finished,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Starting => "starting",
            AppState::Running => "running",
            AppState::Idle => "idle",
            AppState::Restarting => "restarting",
            AppState::Failed => "failed",
            AppState::Stopped => "stopped",
            AppState::Finished => "finished",
        }
    }

    /// No process of the app runs.
    pub fn is_quiet(self) -> bool {
        matches!(
            self,
            AppState::Idle | AppState::Failed | AppState::Stopped | AppState::Finished
        )
    }
}

impl std::fmt::Display for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One app, as the APIs show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppInfo {
    pub name: String,
    /// `http`, `stdio` or `command`.
    pub kind: String,
    pub state: AppState,
    /// When `state` last changed, Unix time in milliseconds.
    pub state_since: u64,
    /// Live workers.
    pub workers: u32,
    /// Workers serving at least one connection.
    pub busy: u32,
    /// Served since corrald started: http requests, stdio connections,
    /// command runs.
    pub requests: u64,
    /// Failed requests and crashed instances.
    pub errors: u64,
    /// Zygote starts (from zero, and restarts).
    pub cold_starts: u64,
    /// Of those, zygotes forked from the zygote template (the others were
    /// exec'd: the template was off, down or refused).
    pub cold_starts_forked: u64,
    pub last_error: Option<String>,
    /// The module's path, or its `oci://` reference.
    pub module: String,
    /// For an `oci://` module: `sha256:...` of the manifest its reference
    /// resolved to (what `@sha256:` would pin).
    pub digest: Option<String>,
    /// `<triple>/<engine-hash>/<module-sha256>` of the artifact served.
    pub artifact: Option<String>,
    /// The world the module targets (`wasi:http/service@0.3`,
    /// `wasi:cli/command@0.2`, `wasi preview1 command`, ...), read from
    /// its exports when the app was last started.
    pub world: Option<String>,
    /// Sandbox layers in force, as the zygote reported them
    /// (`landlock=abi7(files,tcp,scoping)`, `seccomp=on(130 calls)`).
    pub sandbox: Vec<String>,
    /// Listen addresses as the policy writes them.
    pub listen: Vec<String>,
    pub zygote_pid: Option<u32>,
    /// The certificate its TCP addresses serve (`tls` in its policy);
    /// `None` without `tls`.
    pub tls: Option<crate::tls::CertInfo>,
    /// The app's cgroup and what it says (CPU time, memory, tasks, OOM
    /// kills, the limits in force); `None` when it has none (no delegated
    /// cgroup v2 subtree: `DaemonInfo::cgroups` says why).
    pub cgroup: Option<crate::cgroup::Usage>,
}

impl AppInfo {
    /// Enter a state in which no process of the app runs.
    pub(crate) fn set_quiet(&mut self, state: AppState) {
        self.state = state;
        self.workers = 0;
        self.busy = 0;
        self.zygote_pid = None;
    }
}

/// The artifact cache, in numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheStats {
    pub dir: String,
    pub entries: u64,
    pub bytes: u64,
}

/// The daemon, as the APIs show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DaemonInfo {
    pub version: String,
    pub wasmtime_version: String,
    /// The host's target triple (the cache's first directory level).
    pub target: String,
    pub pid: u32,
    /// Unix time in milliseconds.
    pub started: u64,
    pub uptime_seconds: f64,
    pub policy_path: String,
    /// The main file and its drop-ins, in merge order.
    pub policy_files: Vec<String>,
    pub api_socket: String,
    pub api_group: String,
    pub apps: usize,
    pub cache: CacheStats,
    /// Where the apps' cgroups are (`apps/` of corrald's delegated
    /// subtree), or why they have none: `"none: ..."`.
    pub cgroups: String,
    /// The zygote template app zygotes are forked from.
    pub template: TemplateInfo,
}

/// The zygote template (`corrald template`, docs/daemon.md "Cold starts").
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TemplateInfo {
    /// `running`, `down` (exited or could not start; zygotes are exec'd
    /// until it is back) or `off` (`daemon.template = false`).
    pub state: String,
    pub pid: Option<u32>,
    /// Times it exited and was started again.
    pub restarts: u64,
    /// Why it is down, or why it last went down.
    pub last_error: Option<String>,
    /// Its proportional set size (`/proc/PID/smaps_rollup`), read when
    /// asked: what the template costs while every app is at zero.
    pub pss_bytes: Option<u64>,
}

impl TemplateInfo {
    pub(crate) fn off() -> TemplateInfo {
        TemplateInfo {
            state: "off".into(),
            ..TemplateInfo::default()
        }
    }

    pub(crate) fn running(pid: u32, restarts: u64) -> TemplateInfo {
        TemplateInfo {
            state: "running".into(),
            pid: Some(pid),
            restarts,
            ..TemplateInfo::default()
        }
    }

    pub(crate) fn down(why: String, restarts: u64) -> TemplateInfo {
        TemplateInfo {
            state: "down".into(),
            restarts,
            last_error: Some(why),
            ..TemplateInfo::default()
        }
    }
}

/// One problem of a refused reload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyProblem {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub key: String,
    pub message: String,
    /// The whole line as `corral check` prints it: `file:line:col: key: message`.
    pub text: String,
}

impl From<&corral_policy::Diagnostic> for PolicyProblem {
    fn from(d: &corral_policy::Diagnostic) -> PolicyProblem {
        PolicyProblem {
            file: d.file.display().to_string(),
            line: u32::try_from(d.line).unwrap_or(u32::MAX),
            column: u32::try_from(d.column).unwrap_or(u32::MAX),
            key: d.key.clone(),
            message: d.message.clone(),
            text: d.to_string(),
        }
    }
}

/// What a reload did. A policy with errors is a report with
/// `applied: false`, not an error: the errors are the answer. A valid
/// policy is applied app by app: an app whose new version could not be
/// prepared is in `refused` (and in no other list), and serves its
/// previous version if it had one.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReloadReport {
    pub applied: bool,
    pub errors: Vec<PolicyProblem>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    pub refused: Vec<RefusedApp>,
}

/// An app whose new version a reload did not apply, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusedApp {
    pub app: String,
    pub reason: String,
}

/// A change of an app's state or worker count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Increases by one per event; a gap means a slow reader missed some.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time: u64,
    pub app: String,
    /// `None` for an app that just appeared.
    pub old: Option<AppState>,
    pub state: AppState,
    pub workers: u32,
    pub detail: Option<String>,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManagerError {
    #[error("no app named {0:?} in the policy")]
    NoSuchApp(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    Failed(String),
    #[error("corrald is shutting down")]
    ShuttingDown,
}

impl ManagerError {
    /// A stable word for machines (the socket API's `error` field).
    pub fn code(&self) -> &'static str {
        match self {
            ManagerError::NoSuchApp(_) => "no_such_app",
            ManagerError::AccessDenied(_) => "access_denied",
            ManagerError::Failed(_) => "failed",
            ManagerError::ShuttingDown => "shutting_down",
        }
    }
}

/// Who is calling, from SO_PEERCRED/SO_PEERGROUPS or the D-Bus daemon's
/// `GetConnectionCredentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub pid: Option<u32>,
    /// `"socket"` or `"dbus"`, for the log line of a denial.
    pub via: &'static str,
}

/// A Prometheus label value: backslash, quote and newline escaped.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
