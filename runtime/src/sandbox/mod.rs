//! The OS sandbox under the Wasm sandbox: what a worker process gets before
//! it runs guest code, so that a guest that escaped wasmtime still can't
//! read the host's files, open sockets it wasn't granted, exec, ptrace or
//! signal other processes.
//!
//! [`SandboxPlan::for_app`] turns an [`AppSpec`] into a plan (fds to keep,
//! read-only and read-write paths, connect ports, the app kind's syscall
//! list, what each layer's enforcement is); [`SandboxPlan::enter`] applies
//! it to the calling process, in this order, and returns an [`Entered`]
//! token that says which layers are active:
//!
//! 1. refuse (before changing anything) when a `require`d layer is missing;
//! 2. close every fd not handed to the plan;
//! 3. rlimits: no core dumps, a bound on open files;
//! 4. `PR_SET_NO_NEW_PRIVS`;
//! 5. landlock (files, TCP ports, scoping), see [`landlock`](self::landlock);
//! 6. seccomp, last, closest to the work loop, see [`seccomp`].
//!
//! Invariants: `enter` runs while the process has one thread (landlock
//! binds the calling thread only on this kernel generation; seccomp is
//! installed with TSYNC anyway), and nothing after it can widen it.

mod kernel;
mod landlock;
#[doc(hidden)]
pub mod seccomp;
mod seccomp_bpf;
mod sys;
pub mod syscalls;

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;

use corral_policy::{Access, AppKind, AppSpec, Enforcement};
use serde::Serialize;

pub use kernel::{
    CgroupV2, KernelSupport, LandlockSupport, SeccompSupport, UserNamespaces, probe_kernel,
};
use kernel::{LayerSupport, probe_layers};
pub use seccomp::SeccompBuildError;
pub use syscalls::{
    Arch, SeccompKill, killed_by_seccomp, seccomp_kill, syscall_name, syscall_number,
};

/// The fds open in this process now (from `/proc/self/fd`, without the
/// one the listing itself uses): what a caller that opened files before
/// entering the sandbox (wasmtime maps component artifacts through fds of
/// its own) hands to [`SandboxPlan::keep_fd`].
pub fn open_fds() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        if target.starts_with("/proc") && target.ends_with("fd") {
            return None; // the listing's own directory
        }
        e.file_name().to_str()?.parse().ok()
    })
    .collect()
}

/// The open-file bound a worker gets unless the plan says otherwise.
pub const DEFAULT_OPEN_FILES: u64 = 1024;

/// The lowest landlock ABI that `sandbox.landlock = "require"` accepts for
/// any app: 1, file rules. An app's grants may need more, see
/// [`TCP_LANDLOCK_ABI`].
pub const REQUIRED_LANDLOCK_ABI: u32 = 1;

/// The landlock ABI with TCP bind/connect rules (Linux 6.7): what
/// `require` needs for an app with a `network.connect` grant. An app with
/// none has no socket at all (its seccomp list has no `socket`), so TCP
/// rules add nothing for it.
pub const TCP_LANDLOCK_ABI: u32 = 4;

/// What a landlock ABI below each number cannot restrict, and what holds
/// instead; reported in [`ActiveLayers::missing`], never a refusal.
const LANDLOCK_FILE_GAPS: [(u32, &str); 3] = [
    (
        2,
        "no `refer` right (needs ABI 2, Linux 5.19): a file can't be renamed or linked \
         into another directory at all, even between rw dirs",
    ),
    (
        3,
        "no truncate right (needs ABI 3, Linux 6.2): truncation follows write access, \
         and seccomp allows only ftruncate on an open fd",
    ),
    (
        5,
        "no ioctl right on devices (needs ABI 5, Linux 6.10): seccomp allows only \
         FIONBIO, FIOCLEX and TCGETS",
    ),
];

/// A sandbox layer whose presence the policy controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    Landlock,
    Seccomp,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Landlock => "landlock",
            Layer::Seccomp => "seccomp",
        })
    }
}

/// Why a sandbox could not be entered. After an error other than
/// [`SandboxError::Required`] the process may be partly restricted and must
/// exit without running guest code.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("app {app}: sandbox.{layer} = \"require\", but {reason}; {fix}")]
    Required {
        app: String,
        layer: Layer,
        reason: String,
        /// What would make it run.
        fix: String,
    },
    #[error(
        "the sandbox must be entered while the process has one thread, but it has {threads} \
         (landlock restricts only the calling thread): enter it before starting threads"
    )]
    NotSingleThreaded { threads: usize },
    #[error("closing inherited file descriptors")]
    CloseFds(#[source] std::io::Error),
    #[error("setting rlimits")]
    Rlimit(#[source] std::io::Error),
    #[error("setting PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("{}: can't be granted to the sandbox", path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("landlock")]
    Landlock(#[source] Box<::landlock::RulesetError>),
    #[error("landlock: the kernel enforced none of the ruleset")]
    LandlockNotEnforced,
    #[error("building the seccomp filter")]
    SeccompBuild(#[from] SeccompBuildError),
    #[error("installing the seccomp filter")]
    SeccompInstall(#[source] seccompiler::Error),
}

/// The landlock part of [`ActiveLayers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LandlockLayer {
    /// The kernel's landlock ABI.
    pub abi: u32,
    /// Files: read below ro paths, read-write below rw paths, nothing else.
    pub filesystem: bool,
    /// TCP: no bind, connect only to `network.connect` ports (ABI 4+).
    pub tcp: bool,
    /// No signals and abstract unix sockets outside the sandbox (ABI 6+).
    pub scoping: bool,
}

/// The seccomp part of [`ActiveLayers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeccompLayer {
    pub arch: Arch,
    /// How many system calls the app's list allows.
    pub allowed_calls: usize,
}

/// Which layers a sandbox has (or would have), and why any is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActiveLayers {
    pub no_new_privs: bool,
    pub rlimits: bool,
    pub landlock: Option<LandlockLayer>,
    pub seccomp: Option<SeccompLayer>,
    /// One line per missing layer or part, for status and logs.
    pub missing: Vec<String>,
}

impl fmt::Display for ActiveLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.landlock {
            Some(l) => {
                let mut parts = vec!["files"];
                if l.tcp {
                    parts.push("tcp");
                }
                if l.scoping {
                    parts.push("scoping");
                }
                write!(f, "landlock=abi{}({})", l.abi, parts.join(","))?;
            }
            None => f.write_str("landlock=off")?,
        }
        match &self.seccomp {
            Some(s) => write!(f, " seccomp=on({} calls)", s.allowed_calls),
            None => f.write_str(" seccomp=off"),
        }
    }
}

/// Proof that [`SandboxPlan::enter`] succeeded, and what it enforced.
#[derive(Debug)]
pub struct Entered {
    layers: ActiveLayers,
}

impl Entered {
    pub fn layers(&self) -> &ActiveLayers {
        &self.layers
    }
}

/// Everything a worker of one app is allowed, ready to be entered.
#[derive(Debug, Clone)]
pub struct SandboxPlan {
    app: String,
    kind: AppKind,
    keep_fds: Vec<RawFd>,
    read_only: Vec<PathBuf>,
    read_write: Vec<PathBuf>,
    connect_ports: Vec<u16>,
    /// TCP connect to any port (`corral run --connect any`): landlock
    /// leaves connect unrestricted.
    connect_any: bool,
    /// Where the guest binds and listens itself (`corral run --listen`):
    /// `Some(ports)` held to those TCP ports, `None` any port; no grant is
    /// `Some(empty)`, no bind at all.
    bind_ports: Option<Vec<u16>>,
    network: bool,
    /// bind, listen and accept in the seccomp list.
    listen: bool,
    landlock: Enforcement,
    seccomp: Enforcement,
    open_files: u64,
    disabled: Vec<Layer>,
}

impl SandboxPlan {
    /// The sandbox of a worker of `app`: its dirs (ro or rw), its
    /// `network.connect` ports, its kind's syscall list and the policy's
    /// `sandbox.*` enforcement. Fds to keep are added with [`keep_fd`](Self::keep_fd).
    pub fn for_app(app: &AppSpec) -> Self {
        let mut plan = SandboxPlan {
            app: app.name.clone(),
            kind: app.kind,
            keep_fds: Vec::new(),
            read_only: Vec::new(),
            read_write: Vec::new(),
            connect_ports: Vec::new(),
            connect_any: false,
            bind_ports: Some(Vec::new()),
            network: false,
            listen: false,
            landlock: app.sandbox.landlock,
            seccomp: app.sandbox.seccomp,
            open_files: DEFAULT_OPEN_FILES,
            disabled: Vec::new(),
        };
        for dir in &app.dirs {
            match dir.access {
                Access::ReadOnly => plan.allow_read(dir.host.clone()),
                Access::ReadWrite => plan.allow_write(dir.host.clone()),
            }
        }
        plan.allow_connect(&app.network.connect);
        plan
    }

    /// Grants outbound TCP to the ports of `targets` (the guest's
    /// `network.connect`, or `corral run --connect`); an `any` target
    /// leaves TCP connect unrestricted by landlock.
    pub fn allow_connect(&mut self, targets: &[corral_policy::ConnectTarget]) {
        for target in targets {
            self.network = true;
            if target.is_any() {
                self.connect_any = true;
            } else if !self.connect_ports.contains(&target.port) {
                self.connect_ports.push(target.port);
            }
        }
    }

    /// Lets the guest bind, listen and accept on its own sockets
    /// (`corral run --listen`): the seccomp list gets `bind`, `listen`
    /// and `accept4`, and landlock holds TCP binds to the grants' ports
    /// (any port when a grant is `any` or has port 0).
    pub fn allow_listen(&mut self, grants: &[corral_policy::GuestListen]) {
        for grant in grants {
            self.network = true;
            self.listen = true;
            match (grant.port(), &mut self.bind_ports) {
                (Some(port), Some(ports)) if !ports.contains(&port) => ports.push(port),
                (Some(_), _) => {}
                (None, _) => self.bind_ports = None,
            }
        }
    }

    /// Keeps `fd` open across [`enter`](Self::enter) (the listening socket,
    /// the control socket, the artifact, a runtime's epoll fd). 0, 1 and 2
    /// are always kept. The caller keeps owning it.
    pub fn keep_fd(&mut self, fd: impl AsFd) {
        self.keep_fds.push(fd.as_fd().as_raw_fd());
    }

    /// Grants each of `dirs` as its access says (the guest's preopens).
    pub fn allow_dirs(&mut self, dirs: &[corral_policy::DirGrant]) {
        for dir in dirs {
            match dir.access {
                Access::ReadOnly => self.allow_read(dir.host.clone()),
                Access::ReadWrite => self.allow_write(dir.host.clone()),
            }
        }
    }

    /// Keeps every descriptor open now that was not in `inherited` (an
    /// earlier [`open_fds`]), standard streams aside: what a process opened
    /// for its guest since it started (artifact, cache lock, listener).
    pub fn keep_fds_opened_since(&mut self, inherited: &[RawFd]) {
        for fd in open_fds() {
            if fd > 2 && !inherited.contains(&fd) {
                self.keep_fds.push(fd);
            }
        }
    }

    /// Grants read access below `path` (a directory) or to it (a file),
    /// e.g. the module that `corral run` reads.
    pub fn allow_read(&mut self, path: impl Into<PathBuf>) {
        self.read_only.push(path.into());
    }

    /// Grants read-write access below `path`.
    pub fn allow_write(&mut self, path: impl Into<PathBuf>) {
        self.read_write.push(path.into());
    }

    /// The bound on open files (`RLIMIT_NOFILE`), [`DEFAULT_OPEN_FILES`]
    /// unless set.
    pub fn set_open_files(&mut self, limit: u64) {
        self.open_files = limit;
    }

    /// Leaves a layer out, whatever the policy says. Only for the probe
    /// that proves each layer holds on its own; no worker calls this.
    #[doc(hidden)]
    pub fn disable_layer_for_probe(&mut self, layer: Layer) {
        self.disabled.push(layer);
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    pub fn kind(&self) -> AppKind {
        self.kind
    }

    /// The layers [`enter`](Self::enter) would give on `kernel`, or the
    /// refusal of a `require`d layer the kernel lacks.
    pub fn predict(&self, kernel: &KernelSupport) -> Result<ActiveLayers, SandboxError> {
        Ok(self.predict_with(&kernel.layers(), true)?.0)
    }

    /// The layers this plan would get on `kernel` if every layer were
    /// `best-effort` (what `corral check` shows).
    pub fn predict_best_effort(&self, kernel: &KernelSupport) -> ActiveLayers {
        match self.predict_with(&kernel.layers(), false) {
            Ok((layers, _)) => layers,
            Err(e) => unreachable!("best-effort prediction refused: {e}"),
        }
    }

    /// The layers, and the seccomp programs when that layer is on (compiled
    /// by build.rs: nothing to parse or generate here).
    fn predict_with(
        &self,
        kernel: &LayerSupport,
        honour_require: bool,
    ) -> Result<(ActiveLayers, Option<&'static seccomp_bpf::Precompiled>), SandboxError> {
        let mut missing = Vec::new();
        let refuse = |layer: Layer,
                      enforcement,
                      reason: String,
                      fix: Option<String>,
                      missing: &mut Vec<String>| {
            if honour_require && enforcement == Enforcement::Require {
                Err(SandboxError::Required {
                    app: self.app.clone(),
                    layer,
                    reason,
                    fix: fix.unwrap_or_else(|| {
                        format!(
                            "set sandbox.{layer} = \"best-effort\" to run it without that layer"
                        )
                    }),
                })
            } else {
                missing.push(format!("{layer}: {reason}"));
                Ok(())
            }
        };
        let landlock = if self.disabled.contains(&Layer::Landlock) {
            missing.push("landlock: left out by the probe".into());
            None
        } else if self.landlock == Enforcement::Off {
            missing.push("landlock: off by policy (sandbox.landlock = \"off\")".into());
            None
        } else {
            match kernel.landlock {
                LandlockSupport::Available { abi } => {
                    let tcp = abi >= TCP_LANDLOCK_ABI;
                    if self.network && !tcp {
                        let ports: Vec<String> =
                            self.connect_ports.iter().map(u16::to_string).collect();
                        refuse(
                            Layer::Landlock,
                            self.landlock,
                            format!(
                                "its grant network.connect (ports {}) needs landlock TCP rules \
                                 to hold it to those ports, and this kernel's landlock ABI {abi} \
                                 has none (needs ABI {TCP_LANDLOCK_ABI}, Linux 6.7+): without \
                                 them it could connect to any TCP port",
                                ports.join(", ")
                            ),
                            Some(format!(
                                "run it on Linux 6.7 or later, or set sandbox.landlock = \
                                 \"best-effort\" for app {} to let it connect to any TCP port \
                                 on this kernel (its files stay restricted)",
                                self.app
                            )),
                            &mut missing,
                        )?;
                    }
                    for (needs, gap) in LANDLOCK_FILE_GAPS {
                        if abi < needs {
                            missing.push(format!("landlock: ABI {abi} has {gap}"));
                        }
                    }
                    // No TCP rules for an app without network.connect is
                    // not a gap: it has no socket to use them on.
                    if abi < 6 {
                        missing.push(format!(
                            "landlock: ABI {abi} has no scoping of signals and abstract sockets (needs 6)"
                        ));
                    }
                    Some(LandlockLayer {
                        abi,
                        filesystem: true,
                        tcp,
                        scoping: abi >= 6,
                    })
                }
                LandlockSupport::NotEnabled => {
                    refuse(
                        Layer::Landlock,
                        self.landlock,
                        "landlock is built in but not enabled at boot (add it to lsm=)".into(),
                        None,
                        &mut missing,
                    )?;
                    None
                }
                LandlockSupport::NotImplemented => {
                    refuse(
                        Layer::Landlock,
                        self.landlock,
                        "this kernel has no landlock (file rules need Linux 5.13+)".into(),
                        None,
                        &mut missing,
                    )?;
                    None
                }
            }
        };
        let filter = if self.disabled.contains(&Layer::Seccomp) {
            missing.push("seccomp: left out by the probe".into());
            None
        } else if self.seccomp == Enforcement::Off {
            missing.push("seccomp: off by policy (sandbox.seccomp = \"off\")".into());
            None
        } else {
            match (kernel.arch, kernel.seccomp.available) {
                (Some(arch), true) => Some(
                    seccomp_bpf::find(arch, self.kind, self.network, self.listen).ok_or(
                        SeccompBuildError::NotPrecompiled {
                            arch,
                            kind: self.kind,
                            network: self.network,
                            listen: self.listen,
                        },
                    )?,
                ),
                (None, _) => {
                    refuse(
                        Layer::Seccomp,
                        self.seccomp,
                        format!("corral has no syscall list for {}", std::env::consts::ARCH),
                        None,
                        &mut missing,
                    )?;
                    None
                }
                (Some(_), false) => {
                    let why = kernel.seccomp.reason.clone().unwrap_or_default();
                    refuse(
                        Layer::Seccomp,
                        self.seccomp,
                        format!("this kernel has no seccomp filters ({why})"),
                        None,
                        &mut missing,
                    )?;
                    None
                }
            }
        };
        let seccomp = filter.map(|f| SeccompLayer {
            arch: f.arch,
            allowed_calls: f.allowed_calls,
        });
        let layers = ActiveLayers {
            no_new_privs: true,
            rlimits: true,
            landlock,
            seccomp,
            missing,
        };
        Ok((layers, filter))
    }

    /// Restricts the calling process to this plan, for good.
    pub fn enter(self) -> Result<Entered, SandboxError> {
        let kernel = probe_layers(); // not probe_kernel: no /proc reads here
        let (mut layers, filter) = self.predict_with(&kernel, true)?; // refuse before changing anything
        self.check_single_threaded()?;
        self.close_inherited_fds()?; // keep only the fds we were handed
        self.set_rlimits()?;
        set_no_new_privs()?; // required for unprivileged seccomp and landlock
        if let Some(expected) = layers.landlock {
            layers.landlock = Some(self.restrict_fs(expected.abi)?);
        }
        if let Some(filter) = filter {
            install_seccomp(filter.programs)?; // last, closest to the work loop
        }
        Ok(Entered { layers })
    }

    fn check_single_threaded(&self) -> Result<(), SandboxError> {
        match sys::thread_count() {
            Some(threads) if threads > 1 => Err(SandboxError::NotSingleThreaded { threads }),
            _ => Ok(()),
        }
    }

    fn close_inherited_fds(&self) -> Result<(), SandboxError> {
        sys::close_fds_except(&self.keep_fds).map_err(SandboxError::CloseFds)
    }

    fn set_rlimits(&self) -> Result<(), SandboxError> {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let err = |e: rustix::io::Errno| SandboxError::Rlimit(e.into());
        let none = Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        setrlimit(Resource::Core, none).map_err(err)?;
        let highest_kept = self.keep_fds.iter().copied().max().unwrap_or(2).max(2) as u64;
        let mut files = self.open_files.max(highest_kept + 1);
        if let Some(hard) = getrlimit(Resource::Nofile).maximum {
            files = files.min(hard);
        }
        let nofile = Rlimit {
            current: Some(files),
            maximum: Some(files),
        };
        setrlimit(Resource::Nofile, nofile).map_err(err)
    }

    fn restrict_fs(&self, kernel_abi: u32) -> Result<LandlockLayer, SandboxError> {
        landlock::restrict(
            &landlock::FsNetRules {
                read_only: &self.read_only,
                read_write: &self.read_write,
                connect_ports: (!self.connect_any).then_some(self.connect_ports.as_slice()),
                bind_ports: self.bind_ports.as_deref(),
            },
            kernel_abi,
        )
    }
}

fn set_no_new_privs() -> Result<(), SandboxError> {
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::NoNewPrivs(e.into()))
}

fn install_seccomp(filters: &[&[seccompiler::sock_filter]]) -> Result<(), SandboxError> {
    seccomp::install(filters).map_err(SandboxError::SeccompInstall)
}

/// Replace this process with the same program on the same arguments and
/// `marker` set in its environment, for a process that must enter the
/// sandbox but has started threads (a compile did): only a single-threaded
/// process can. The new image finds `marker` set and does not do it again.
/// Returns only on failure.
pub fn reexec_self(marker: &str) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return anyhow::Error::new(e).context("finding our own executable"),
    };
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(marker, "1")
        .exec();
    anyhow::Error::new(err).context(format!("re-executing {}", exe.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sandbox: &str) -> SandboxPlan {
        plan_with(
            sandbox,
            "network = { connect = [\"127.0.0.1:5432\", \"[::1]:5432\"] }",
        )
    }

    fn plan_with(sandbox: &str, grants: &str) -> SandboxPlan {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.wat"), "(module)").unwrap();
        let text = format!(
            "[apps.web]\nmodule = \"m.wat\"\nkind = \"command\"\nsandbox = {sandbox}\n{grants}\n"
        );
        let policy = corral_policy::parse_str(
            &text,
            &dir.path().join("policy.toml"),
            &corral_policy::Environment::default(),
        )
        .unwrap();
        SandboxPlan::for_app(&policy.apps["web"])
    }

    fn kernel(landlock: LandlockSupport, seccomp: bool) -> KernelSupport {
        KernelSupport {
            release: "test".into(),
            arch: Some(Arch::x86_64),
            landlock,
            seccomp: SeccompSupport {
                available: seccomp,
                reason: (!seccomp).then(|| "ENOSYS".into()),
            },
            user_namespaces: UserNamespaces {
                max: None,
                unprivileged_clone: None,
                apparmor_restricted: None,
            },
            cgroup_v2: CgroupV2 {
                mount: None,
                hybrid: false,
                own_cgroup: None,
                controllers: Vec::new(),
                delegated: false,
            },
        }
    }

    #[test]
    fn require_refuses_a_kernel_without_the_layer() {
        let p = plan(r#"{ landlock = "require", seccomp = "require" }"#);
        let err = p
            .predict(&kernel(LandlockSupport::NotImplemented, true))
            .unwrap_err();
        assert!(
            matches!(
                err,
                SandboxError::Required {
                    layer: Layer::Landlock,
                    ..
                }
            ),
            "{err}"
        );
        let err = p
            .predict(&kernel(LandlockSupport::Available { abi: 3 }, true))
            .unwrap_err();
        assert!(err.to_string().contains("landlock ABI 3 has none"), "{err}");
        let err = p
            .predict(&kernel(LandlockSupport::Available { abi: 7 }, false))
            .unwrap_err();
        assert!(
            matches!(
                err,
                SandboxError::Required {
                    layer: Layer::Seccomp,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn best_effort_runs_without_the_layer_and_says_so() {
        let p = plan(r#"{ landlock = "best-effort", seccomp = "best-effort" }"#);
        let layers = p
            .predict(&kernel(LandlockSupport::NotEnabled, false))
            .unwrap();
        assert_eq!(layers.landlock, None);
        assert_eq!(layers.seccomp, None);
        assert_eq!(layers.missing.len(), 2, "{:?}", layers.missing);
        assert_eq!(layers.to_string(), "landlock=off seccomp=off");
        let layers = p
            .predict(&kernel(LandlockSupport::Available { abi: 5 }, true))
            .unwrap();
        assert!(
            layers
                .to_string()
                .starts_with("landlock=abi5(files,tcp) seccomp=on(")
        );
    }

    #[test]
    fn off_leaves_a_layer_out_on_a_kernel_that_has_it() {
        let p = plan(r#"{ landlock = "off", seccomp = "off" }"#);
        let layers = p
            .predict(&kernel(LandlockSupport::Available { abi: 7 }, true))
            .unwrap();
        assert_eq!((layers.landlock, layers.seccomp), (None, None));
        assert_eq!(layers.to_string(), "landlock=off seccomp=off");
        assert!(
            layers.missing.iter().all(|m| m.contains("off by policy")),
            "{:?}",
            layers.missing
        );
        let only_seccomp = plan(r#"{ landlock = "off", seccomp = "require" }"#)
            .predict(&kernel(LandlockSupport::Available { abi: 7 }, true))
            .unwrap();
        assert!(only_seccomp.landlock.is_none() && only_seccomp.seccomp.is_some());
    }

    /// The default enforcement (both `require`) on each landlock ABI, for an
    /// app with no network grant and one with `network.connect`.
    #[test]
    fn require_asks_for_what_the_grants_need_on_each_abi() {
        let files_only = plan_with(r#"{ landlock = "require" }"#, "");
        let networked = plan(r#"{ landlock = "require" }"#);
        for abi in [1, 2, 3, 4, 6] {
            let k = kernel(LandlockSupport::Available { abi }, true);
            // File rules: every app, any ABI.
            let layers = files_only
                .predict(&k)
                .unwrap_or_else(|e| panic!("ABI {abi}: {e}"));
            let l = layers.landlock.unwrap();
            assert!(l.filesystem && l.abi == abi);
            assert_eq!(l.tcp, abi >= 4, "ABI {abi}");
            assert_eq!(l.scoping, abi >= 6, "ABI {abi}");
            let said = |what: &str| layers.missing.iter().any(|m| m.contains(what));
            assert_eq!(
                said("no `refer` right"),
                abi < 2,
                "ABI {abi}: {:?}",
                layers.missing
            );
            assert_eq!(
                said("no truncate right"),
                abi < 3,
                "ABI {abi}: {:?}",
                layers.missing
            );
            assert_eq!(
                said("no ioctl right on devices"),
                abi < 5,
                "ABI {abi}: {:?}",
                layers.missing
            );
            assert_eq!(
                said("no scoping"),
                abi < 6,
                "ABI {abi}: {:?}",
                layers.missing
            );
            // An app without network.connect lacks nothing without TCP rules.
            assert!(!said("TCP"), "ABI {abi}: {:?}", layers.missing);
            // TCP rules: only the app with network.connect needs them.
            match networked.predict(&k) {
                Ok(layers) => {
                    assert!(abi >= 4, "ABI {abi} accepted a network grant");
                    assert!(layers.landlock.unwrap().tcp);
                }
                Err(e) => {
                    assert!(abi < 4, "ABI {abi} refused: {e}");
                    let msg = e.to_string();
                    for part in [
                        "app web",
                        "network.connect (ports 5432)",
                        &format!("landlock ABI {abi} has none"),
                        "Linux 6.7",
                        "best-effort",
                    ] {
                        assert!(msg.contains(part), "ABI {abi}: {part:?} not in {msg}");
                    }
                    // best-effort runs it, and says connects are open.
                    let layers = plan(r#"{ landlock = "best-effort" }"#).predict(&k).unwrap();
                    assert!(
                        layers
                            .missing
                            .iter()
                            .any(|m| m.contains("network.connect") && m.contains("any TCP port")),
                        "{:?}",
                        layers.missing
                    );
                }
            }
        }
    }

    #[test]
    fn plan_takes_ports_once() {
        assert_eq!(plan(r#"{ landlock = "require" }"#).connect_ports, [5432]);
    }
}
