//! What the running kernel offers the sandbox: landlock's ABI, seccomp
//! filters, user namespaces and cgroup v2 delegation. Read-only probes; used
//! by `SandboxPlan::enter`, `corral doctor` and `corral check`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::sys;
use super::syscalls::Arch;

/// The kernel facts the sandbox depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KernelSupport {
    /// The kernel release (`uname -r`).
    pub release: String,
    /// `None` when corral has no seccomp table for this architecture.
    pub arch: Option<Arch>,
    pub landlock: LandlockSupport,
    pub seccomp: SeccompSupport,
    pub user_namespaces: UserNamespaces,
    pub cgroup_v2: CgroupV2,
}

/// Landlock as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum LandlockSupport {
    Available {
        abi: u32,
    },
    /// Built in, but not in the boot-time LSM list (`lsm=`).
    NotEnabled,
    /// Not built into this kernel.
    NotImplemented,
}

impl LandlockSupport {
    pub fn abi(self) -> Option<u32> {
        match self {
            LandlockSupport::Available { abi } => Some(abi),
            _ => None,
        }
    }
}

/// Seccomp filters with `SECCOMP_RET_KILL_PROCESS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeccompSupport {
    pub available: bool,
    /// Why not, when not.
    pub reason: Option<String>,
}

/// Whether processes can create user namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UserNamespaces {
    /// `/proc/sys/user/max_user_namespaces`.
    pub max: Option<u64>,
    /// Debian's `kernel.unprivileged_userns_clone`, where it exists.
    pub unprivileged_clone: Option<bool>,
    /// Ubuntu's `kernel.apparmor_restrict_unprivileged_userns`, where it exists.
    pub apparmor_restricted: Option<bool>,
}

/// The cgroup v2 hierarchy and whether this process may manage its subtree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupV2 {
    /// Where cgroup2 is mounted, if anywhere.
    pub mount: Option<PathBuf>,
    /// cgroup v1 controllers are mounted too (a "hybrid" host).
    pub hybrid: bool,
    /// This process's cgroup, relative to the mount.
    pub own_cgroup: Option<String>,
    /// Controllers available to children of that cgroup.
    pub controllers: Vec<String>,
    /// Its `cgroup.subtree_control` and `cgroup.procs` are writable by us,
    /// as systemd's `Delegate=yes` arranges.
    pub delegated: bool,
}

/// The part of [`KernelSupport`] that entering a sandbox depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerSupport {
    pub arch: Option<Arch>,
    pub landlock: LandlockSupport,
    pub seccomp: SeccompSupport,
}

impl KernelSupport {
    pub(crate) fn layers(&self) -> LayerSupport {
        LayerSupport {
            arch: self.arch,
            landlock: self.landlock,
            seccomp: self.seccomp.clone(),
        }
    }
}

/// Probes the running kernel.
pub fn probe_kernel() -> KernelSupport {
    let LayerSupport {
        arch,
        landlock,
        seccomp,
    } = probe_layers();
    KernelSupport {
        release: rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned(),
        arch,
        landlock,
        seccomp,
        user_namespaces: UserNamespaces {
            max: read_number("/proc/sys/user/max_user_namespaces"),
            unprivileged_clone: read_number("/proc/sys/kernel/unprivileged_userns_clone")
                .map(|n| n != 0),
            apparmor_restricted: read_number(
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            )
            .map(|n| n != 0),
        },
        cgroup_v2: probe_cgroup_v2(),
    }
}

/// Probes only what the sandbox's layers depend on: two system calls, no
/// /proc or cgroup files (those are for `corral doctor`). On the path of
/// every `corral run` and zygote.
pub(crate) fn probe_layers() -> LayerSupport {
    let landlock = match sys::landlock_abi() {
        Ok(abi) => LandlockSupport::Available { abi },
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => LandlockSupport::NotEnabled,
        Err(_) => LandlockSupport::NotImplemented,
    };
    let seccomp = match sys::seccomp_kill_process_available() {
        Ok(()) => SeccompSupport {
            available: true,
            reason: None,
        },
        Err(e) => SeccompSupport {
            available: false,
            reason: Some(format!(
                "seccomp(SECCOMP_GET_ACTION_AVAIL, KILL_PROCESS): {e}"
            )),
        },
    };
    LayerSupport {
        arch: Arch::current(),
        landlock,
        seccomp,
    }
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn probe_cgroup_v2() -> CgroupV2 {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut mount = None;
    let mut hybrid = false;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [_, dir, fstype, ..] = fields[..] {
            match fstype {
                "cgroup2" if mount.is_none() => mount = Some(PathBuf::from(dir)),
                "cgroup" => hybrid = true,
                _ => {}
            }
        }
    }
    // In /proc/self/cgroup the v2 line is `0::/path`.
    let own_cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        });
    let dir = match (&mount, &own_cgroup) {
        (Some(m), Some(c)) => Some(m.join(c.trim_start_matches('/'))),
        _ => None,
    };
    let controllers = dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("cgroup.controllers")).ok())
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let delegated = dir.as_deref().is_some_and(|d| {
        writable(&d.join("cgroup.subtree_control")) && writable(&d.join("cgroup.procs"))
    });
    CgroupV2 {
        mount,
        hybrid,
        own_cgroup,
        controllers,
        delegated,
    }
}

fn writable(path: &Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::WRITE_OK).is_ok()
}
