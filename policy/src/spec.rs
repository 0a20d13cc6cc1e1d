//! The typed, validated policy that the rest of corral uses.
//!
//! Values of these types come only out of validation (see [`crate::load`]),
//! so code that holds an [`AppSpec`] may rely on its invariants: `pool.min
//! <= pool.max`, absolute guest paths without `..`, a module path that
//! existed when the policy was loaded, and so on. The structs are
//! `#[non_exhaustive]` so that other crates can read them but not build
//! unchecked ones.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::addr::{ConnectHost, ConnectTarget, GuestListen, ListenAddr};
pub use crate::oci::{OciRef, OciVersion, RegistrySpec};

/// A loaded and validated policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct Policy {
    /// Every file that went into this policy, main file first, then the
    /// drop-ins in the order they were merged.
    pub sources: Vec<PathBuf>,
    pub daemon: DaemonSpec,
    /// Apps by name (names are unique; iteration is in name order).
    pub apps: BTreeMap<String, AppSpec>,
    /// `[registries."HOST[:PORT]"]`: how to reach a registry that `oci://`
    /// modules name (a registry not listed is reached over HTTPS with the
    /// system's CAs and no credentials).
    pub registries: BTreeMap<String, RegistrySpec>,
    /// `[sockets.NAME]`: sockets systemd holds for apps that listen on
    /// `systemd:NAME`, by name.
    pub sockets: BTreeMap<String, SocketSpec>,
}

/// One `[sockets.NAME]` table: the address of a socket that systemd opens
/// and holds for the app that listens on `systemd:NAME`. `corral-generator`
/// writes it as the unit `corral-NAME.socket` (`ListenStream=` this address,
/// `FileDescriptorName=NAME`, `Service=corrald.service`), so the app starts
/// on its first connection and keeps its socket across corrald restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct SocketSpec {
    /// A TCP or unix address, never `systemd:`.
    pub listen: ListenAddr,
}

/// The `[daemon]` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct DaemonSpec {
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub api_group: String,
    /// `None` is `"off"`.
    #[serde(serialize_with = "ser_opt_duration")]
    pub idle_exit: Option<Duration>,
    /// `None` is `"off"`.
    pub metrics: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight requests.
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
    /// Start zygotes by forking them from one shared template process
    /// (`true`, the default) rather than by exec'ing corrald per wake.
    pub template: bool,
}

/// One `[apps.NAME]` table, with `[defaults]` and drop-ins merged in.
///
/// `Deserialize` (here and on the types it holds) exists only for corrald's
/// handoff of an already-validated spec to its zygote over the control
/// socket; a policy file is always read through [`crate::load`], never
/// deserialized into these types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct AppSpec {
    pub name: String,
    /// Absolute path of the module or component. For an `oci://` app
    /// ([`AppSpec::oci`]) it is empty in the policy and set by whoever
    /// fetched the reference (corrald, `corral run`, `corral compile`) to
    /// the verified module in the cache.
    pub module: PathBuf,
    /// The registry reference the module comes from, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciRef>,
    pub kind: AppKind,
    pub listen: Vec<ListenAddr>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Names of host environment variables passed through to the guest.
    pub inherit_env: Vec<String>,
    pub dirs: Vec<DirGrant>,
    pub network: NetworkSpec,
    pub pool: PoolSpec,
    pub limits: Limits,
    pub sandbox: SandboxSpec,
    pub restart: RestartSpec,
    /// `tls`: the app's TCP addresses speak TLS (`None`: plain).
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

/// `tls = { cert = "PATH", key = "PATH", client-ca = "PATH" }`: every TCP
/// address in the app's `listen` speaks TLS with this certificate chain
/// and key (PEM); with `client-ca`, clients must present a certificate
/// signed by that CA. Unix-socket addresses stay plain.
///
/// Validation checks that the files exist and that the key is neither
/// readable nor writable by others; what is in them (that they parse, the
/// key matches, the dates) is checked when corrald reads them, and the
/// errors then name the place in the policy (`*_at`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct TlsSpec {
    /// Absolute path of the PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// Absolute path of the PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Absolute path of the PEM CA certificates client certificates must
    /// chain to; `None`: no client certificates asked for.
    pub client_ca: Option<PathBuf>,
    /// Where `cert` was written, `file:line:col`.
    #[serde(default)]
    pub cert_at: String,
    /// Where `key` was written.
    #[serde(default)]
    pub key_at: String,
    /// Where `client-ca` was written.
    #[serde(default)]
    pub client_ca_at: Option<String>,
}

/// Equal when the same files are named, wherever in the policy: moving a
/// line does not change the app.
impl PartialEq for TlsSpec {
    fn eq(&self, other: &TlsSpec) -> bool {
        self.cert == other.cert && self.key == other.key && self.client_ca == other.client_ca
    }
}

/// What kind of guest an app is and how it is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppKind {
    /// A component exporting `wasi:http/incoming-handler`; a fresh instance
    /// per request.
    Http,
    /// A WASI preview1 command; a fresh instance per connection, with stdin
    /// and stdout on the connection.
    Stdio,
    /// One long-running instance, restarted per `restart.on`.
    Command,
}

impl AppKind {
    pub const ALL: [AppKind; 3] = [AppKind::Http, AppKind::Stdio, AppKind::Command];

    pub fn as_str(self) -> &'static str {
        match self {
            AppKind::Http => "http",
            AppKind::Stdio => "stdio",
            AppKind::Command => "command",
        }
    }
}

impl fmt::Display for AppKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host directory preopened for the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DirGrant {
    /// Absolute host path; it existed and was a directory at load time.
    pub host: PathBuf,
    /// Absolute guest path, normalized, without `.` or `..`.
    pub guest: String,
    pub access: Access,
}

impl DirGrant {
    /// A grant from the command line (`corral run --dir`), checked like one
    /// from a policy file.
    pub fn new(host: PathBuf, guest: &str, access: Access) -> Result<DirGrant, String> {
        let guest = crate::parse::normalize_guest_path(guest)?;
        if !host.is_dir() {
            return Err(format!("{}: not a directory", host.display()));
        }
        let host = std::path::absolute(&host).map_err(|e| format!("{}: {e}", host.display()))?;
        Ok(DirGrant {
            host,
            guest,
            access,
        })
    }
}

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    #[serde(rename = "ro")]
    ReadOnly,
    #[serde(rename = "rw")]
    ReadWrite,
}

/// Outbound network the app may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NetworkSpec {
    /// Where the guest may connect; empty means no outbound network.
    pub connect: Vec<ConnectTarget>,
}

/// Worker pool sizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct PoolSpec {
    pub min: u32,
    pub max: u32,
    #[serde(serialize_with = "ser_duration", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    pub concurrency: u32,
    /// `None` is `"unlimited"`.
    pub max_requests: Option<u64>,
    /// Whether an app at zero workers keeps its zygote.
    #[serde(default)]
    pub zygote: ZygoteMode,
    /// Instance reuse for WASI 0.3 http handlers (`None`: a fresh
    /// instance per request, the default).
    #[serde(default)]
    pub reuse: Option<Reuse>,
}

/// `pool.reuse`: how far one instance of a WASI 0.3 http handler is
/// reused. Requests served by one instance share its memory and globals:
/// what one request leaves behind, the next can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Reuse {
    /// Requests one instance serves before it is dropped (at least 1).
    pub requests: u32,
    /// Requests one instance serves at once (at least 1).
    pub concurrent: u32,
}

/// What happens to an app's zygote when its last worker retires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZygoteMode {
    /// It exits: an idle app (`pool.min = 0`) has no process at all, and the
    /// next connection starts a new zygote (an exec, engine and artifact
    /// load, sandbox entry) before a worker can be forked.
    #[default]
    OnDemand,
    /// It stays, sandboxed and with the artifact loaded, and watches the
    /// app's sockets itself: the next connection costs a fork. The price is
    /// the zygote's memory while the app is idle.
    Kept,
}

impl fmt::Display for ZygoteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ZygoteMode::OnDemand => "on-demand",
            ZygoteMode::Kept => "kept",
        })
    }
}

/// Resource limits per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct Limits {
    /// Bytes of linear memory per instance.
    pub memory: u64,
    /// Wall-clock limit per request (http), connection (stdio) or run
    /// (`corral run`); `None` is `"off"`.
    #[serde(
        serialize_with = "ser_opt_duration",
        deserialize_with = "de_opt_duration"
    )]
    pub timeout: Option<Duration>,
    /// Core instances per store (a component may create several).
    pub instances: u32,
    /// Tables per store.
    pub tables: u32,
    /// Bytes of guest stdout and stderr logged per request or run.
    pub stdout: u64,
    /// The largest module fetched from a registry for this app (every blob
    /// of its image, the module too, is refused past it).
    pub module_size: u64,
    /// The app's `cpu.weight` (1–10000): its share of CPU time against the
    /// other apps when the CPUs are busy.
    #[serde(default = "default_cpu_weight")]
    pub cpu_weight: u32,
    /// `limits.cpu`: a ceiling for all of the app's processes together, in
    /// percent of one CPU (`cpu.max`); `None` is none.
    #[serde(default)]
    pub cpu: Option<u32>,
    /// `limits.app-memory`: bytes for all of the app's processes together
    /// (`memory.max`; `memory.high` a little below); `None` is none.
    #[serde(default)]
    pub app_memory: Option<u64>,
    /// `limits.processes`: tasks (processes and their threads) of the app
    /// at once (`pids.max`); `None` is none.
    #[serde(default)]
    pub processes: Option<u32>,
}

fn default_cpu_weight() -> u32 {
    crate::defaults::CPU_WEIGHT
}

impl Limits {
    /// Whether any of the app-wide limits that need a cgroup is set
    /// (`cpu-weight` counts when it is not the default).
    pub fn wants_cgroup_limits(&self) -> bool {
        self.cpu_weight != crate::defaults::CPU_WEIGHT
            || self.cpu.is_some()
            || self.app_memory.is_some()
            || self.processes.is_some()
    }
}

/// Whether each OS sandbox layer must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SandboxSpec {
    pub landlock: Enforcement,
    pub seccomp: Enforcement,
    /// Whether the app must run in a cgroup of its own (`require`), or
    /// runs without one where corrald has no delegated cgroup v2 subtree
    /// (`best-effort`, and its app-wide limits are not enforced).
    #[serde(default = "default_cgroups")]
    pub cgroups: Enforcement,
}

fn default_cgroups() -> Enforcement {
    Enforcement::BestEffort
}

/// What to do where the kernel lacks a sandbox layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// Refuse to start the app.
    Require,
    /// Start it, and say in status and logs which layers are missing.
    BestEffort,
    /// Leave the layer out even where the kernel has it (to measure what it
    /// costs, or to debug); status and logs say it is missing. Never the
    /// default.
    Off,
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Enforcement::Require => "require",
            Enforcement::BestEffort => "best-effort",
            Enforcement::Off => "off",
        })
    }
}

/// Restarts of zygotes (all kinds) and of `command` instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct RestartSpec {
    pub on: RestartOn,
    #[serde(serialize_with = "ser_duration", deserialize_with = "de_duration")]
    pub backoff_min: Duration,
    #[serde(serialize_with = "ser_duration", deserialize_with = "de_duration")]
    pub backoff_max: Duration,
    /// `None` is `"off"`: never give up.
    pub give_up: Option<GiveUp>,
}

/// When a `command` app's instance is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartOn {
    Always,
    Failure,
    Never,
}

/// `N in DURATION`: that many crashes within the window mark the app failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GiveUp {
    pub crashes: u32,
    #[serde(serialize_with = "ser_duration", deserialize_with = "de_duration")]
    pub window: Duration,
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in {}",
            self.crashes,
            humantime::format_duration(self.window)
        )
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_str("off"),
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    crate::parse::parse_duration(&text).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text == "off" {
        return Ok(None);
    }
    crate::parse::parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What corrald sends its zygote is what the zygote gets back.
    #[test]
    fn app_spec_round_trips_through_json() {
        let dir = std::env::temp_dir();
        let module = dir.join("corral-spec-round-trip.wat");
        std::fs::write(&module, "(module)").unwrap();
        let text = format!(
            r#"
[apps.web]
module = {module:?}
kind = "http"
listen = ["127.0.0.1:8080", "[::1]:8081", "unix:/run/web.sock", "systemd:web"]
args = ["-v"]
env = {{ A = "1" }}
dirs = [{{ host = {dir:?}, guest = "/data", access = "ro" }}]
network = {{ connect = ["127.0.0.1:5432", "db.example:5432"] }}
pool = {{ min = 1, max = 3, idle-timeout = "90s", concurrency = 8, max-requests = 1000 }}
limits = {{ timeout = "off" }}
restart = {{ backoff = "250ms..10s", give-up = "5 in 1m" }}

[apps.job]
module = {module:?}
kind = "command"
limits = {{ timeout = "1h 30m" }}
"#,
            module = module.display().to_string(),
            dir = dir.display().to_string(),
        );
        let policy = crate::parse_str(
            &text,
            &dir.join("policy.toml"),
            &crate::Environment::default(),
        )
        .unwrap_or_else(|e| panic!("{:?}", e.diagnostics()));
        for app in policy.apps.values() {
            let json = serde_json::to_string(app).unwrap();
            let back: AppSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, app, "{json}");
        }
    }
}
