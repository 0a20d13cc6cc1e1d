//! The task's cgroup: the bundle's `linux.cgroupsPath`, with what runc
//! applies of `linux.resources` (CPU shares, CFS quota and period, memory
//! limit, pids limit), on cgroup v2 or the v1 controllers. The task's
//! process is placed in it right after it is spawned, while it still waits
//! for `start`: no guest code runs outside it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use log::warn;

use crate::plan::Spec;

/// Where the cgroup filesystems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers a task's cgroup is made in.
const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// What of `linux.resources` the shim applies.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) cpu_shares: Option<u64>,
    /// (quota, period) in µs.
    pub(crate) cpu_quota: Option<(i64, u64)>,
    pub(crate) memory: Option<i64>,
    pub(crate) pids: Option<i64>,
}

impl Limits {
    pub(crate) fn of(spec: &Spec) -> Limits {
        let Some(r) = spec.linux.as_ref().and_then(|l| l.resources.as_ref()) else {
            return Limits::default();
        };
        let cpu = r.cpu.as_ref();
        Limits {
            cpu_shares: cpu.and_then(|c| c.shares).filter(|&s| s > 0),
            cpu_quota: cpu.and_then(|c| c.quota).filter(|&q| q > 0).map(|q| {
                (
                    q,
                    cpu.and_then(|c| c.period)
                        .filter(|&p| p > 0)
                        .unwrap_or(100_000),
                )
            }),
            memory: r.memory.as_ref().and_then(|m| m.limit).filter(|&l| l > 0),
            pids: r.pids.as_ref().and_then(|p| p.limit).filter(|&l| l > 0),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// (file, value) pairs for one hierarchy, in the order runc writes them.
    fn files(&self, v2: bool) -> Vec<(&'static str, &'static str, String)> {
        let mut out = Vec::new();
        if let Some(shares) = self.cpu_shares {
            if v2 {
                // runc's conversion of shares (2..262144) to a weight (1..10000).
                let weight = 1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
                out.push(("cpu", "cpu.weight", weight.to_string()));
            } else {
                out.push(("cpu", "cpu.shares", shares.to_string()));
            }
        }
        if let Some((quota, period)) = self.cpu_quota {
            if v2 {
                out.push(("cpu", "cpu.max", format!("{quota} {period}")));
            } else {
                out.push(("cpu", "cpu.cfs_period_us", period.to_string()));
                out.push(("cpu", "cpu.cfs_quota_us", quota.to_string()));
            }
        }
        if let Some(memory) = self.memory {
            let file = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            out.push(("memory", file, memory.to_string()));
        }
        if let Some(pids) = self.pids {
            out.push(("pids", "pids.max", pids.to_string()));
        }
        out
    }
}

/// A task's cgroup, made by the shim: one directory on cgroup v2, one per
/// controller on v1.
#[derive(Debug)]
pub(crate) struct TaskCgroup {
    dirs: Vec<PathBuf>,
}

/// The task's cgroup for `spec`, made and with its limits written; `None`
/// when the spec names no cgroup. A cgroup that cannot be made, or a limit
/// that cannot be written, is an error when the spec asks for limits (the
/// task would run without them), else a warning.
pub(crate) fn create(id: &str, spec: &Spec) -> anyhow::Result<Option<TaskCgroup>> {
    let path = spec
        .linux
        .as_ref()
        .and_then(|l| l.cgroups_path.as_deref())
        .filter(|p| !p.is_empty());
    let limits = Limits::of(spec);
    let Some(path) = path else {
        if !limits.is_empty() {
            bail!("linux.resources asks for limits ({limits:?}) but linux.cgroupsPath is empty");
        }
        return Ok(None);
    };
    match make(Path::new(CGROUP_ROOT), path, &limits) {
        Ok(cgroup) => Ok(Some(cgroup)),
        Err(e) if limits.is_empty() => {
            warn!("{id}: no cgroup of its own: {e:#}");
            Ok(None)
        }
        Err(e) => Err(e.context(format!("applying linux.resources to cgroup {path}"))),
    }
}

/// The cgroup a task of `spec` was given, if its directories exist (for
/// the cleanup of a dead shim's task).
pub(crate) fn existing(spec: &Spec) -> Option<TaskCgroup> {
    let path = spec.linux.as_ref()?.cgroups_path.as_deref()?;
    let relative = relative_path(path).ok()?;
    let root = Path::new(CGROUP_ROOT);
    let dirs: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.join(&relative)]
    } else {
        V1_CONTROLLERS
            .iter()
            .map(|c| root.join(c).join(&relative))
            .collect()
    };
    let dirs: Vec<PathBuf> = dirs.into_iter().filter(|d| d.is_dir()).collect();
    (!dirs.is_empty()).then_some(TaskCgroup { dirs })
}

fn make(root: &Path, path: &str, limits: &Limits) -> anyhow::Result<TaskCgroup> {
    let relative = relative_path(path)?;
    let v2 = root.join("cgroup.controllers").exists();
    let mut cgroup = TaskCgroup { dirs: Vec::new() };
    if v2 {
        let dir = root.join(&relative);
        enable_controllers(root, &relative)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        cgroup.dirs.push(dir);
    } else {
        for controller in V1_CONTROLLERS {
            let dir = root.join(controller).join(&relative);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            cgroup.dirs.push(dir);
        }
    }
    for (controller, file, value) in limits.files(v2) {
        let dir = if v2 {
            &cgroup.dirs[0]
        } else {
            let i = V1_CONTROLLERS
                .iter()
                .position(|c| *c == controller)
                .unwrap_or(0);
            &cgroup.dirs[i]
        };
        let at = dir.join(file);
        if let Err(e) = std::fs::write(&at, &value) {
            cgroup.remove();
            bail!("writing {value} to {}: {e}", at.display());
        }
    }
    Ok(cgroup)
}

/// On cgroup v2, a child gets the cpu, memory and pids controllers only if
/// every ancestor delegates them (`cgroup.subtree_control`).
fn enable_controllers(root: &Path, relative: &Path) -> anyhow::Result<()> {
    let mut dir = root.to_path_buf();
    let parts: Vec<_> = relative.components().collect();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<String> = V1_CONTROLLERS
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).unwrap_or_default();
        let wanted: Vec<String> = wanted
            .into_iter()
            .filter(|w| !enabled.split_whitespace().any(|e| e == &w[1..]))
            .collect();
        if !wanted.is_empty() {
            std::fs::write(&control, wanted.join(" ")).with_context(|| {
                format!("writing {} to {}", wanted.join(" "), control.display())
            })?;
        }
        dir.push(part);
    }
    Ok(())
}

/// `cgroupsPath` as a path below the cgroup root: a cgroupfs path as it is
/// (absolute or not), systemd's `SLICE:PREFIX:NAME` as the directory
/// systemd gives that unit (`a-b.slice` is `a.slice/a-b.slice`; the unit
/// is `PREFIX-NAME.scope`).
fn relative_path(path: &str) -> anyhow::Result<PathBuf> {
    let mut out = PathBuf::new();
    let parts: Vec<&str> = path.split(':').collect();
    match parts.as_slice() {
        [plain] => {
            for part in plain.split('/').filter(|p| !p.is_empty()) {
                if part == "." || part == ".." {
                    bail!("cgroupsPath {path:?}: `.` and `..` are not allowed");
                }
                out.push(part);
            }
        }
        [slice, prefix, name] => {
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let Some(stem) = slice.strip_suffix(".slice") else {
                bail!("cgroupsPath {path:?}: {slice:?} is not a systemd slice");
            };
            if stem != "-" {
                let mut so_far = String::new();
                for word in stem.split('-') {
                    if word.is_empty() || word.contains('/') {
                        bail!("cgroupsPath {path:?}: {slice:?} is not a valid slice name");
                    }
                    if !so_far.is_empty() {
                        so_far.push('-');
                    }
                    so_far.push_str(word);
                    out.push(format!("{so_far}.slice"));
                }
            }
            if name.is_empty() || name.contains('/') || prefix.contains('/') {
                bail!("cgroupsPath {path:?}: not SLICE:PREFIX:NAME");
            }
            out.push(if name.ends_with(".slice") {
                name.to_string()
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            });
        }
        _ => bail!("cgroupsPath {path:?}: neither a path nor SLICE:PREFIX:NAME"),
    }
    if out.as_os_str().is_empty() {
        bail!("cgroupsPath {path:?} names the root cgroup");
    }
    Ok(out)
}

impl TaskCgroup {
    /// Move `pid` (all its threads) into the cgroup.
    pub(crate) fn add(&self, pid: u32) -> anyhow::Result<()> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .with_context(|| format!("writing {pid} to {}", procs.display()))?;
        }
        Ok(())
    }

    /// The directories (for logs and tests).
    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Wait up to `within` for the cgroup to have no process left (a
    /// killed process leaves it when it is reaped), then remove it.
    pub(crate) fn remove_when_empty(&self, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline
            && self.dirs.iter().any(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .is_ok_and(|procs| !procs.trim().is_empty())
            })
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.remove();
    }

    /// Remove the cgroup once its processes are gone (logged, not fatal:
    /// a process that lingers keeps it).
    pub(crate) fn remove(&self) {
        for dir in &self.dirs {
            if let Err(e) = std::fs::remove_dir(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("removing cgroup {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths() {
        assert_eq!(
            relative_path("/default/web").unwrap(),
            PathBuf::from("default/web")
        );
        assert_eq!(
            relative_path("kubepods/burstable/pod1/c1").unwrap(),
            PathBuf::from("kubepods/burstable/pod1/c1")
        );
        assert_eq!(
            relative_path("kubepods-burstable-pod1.slice:cri-containerd:c1").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-c1.scope"
            )
        );
        assert_eq!(
            relative_path(":corral:web").unwrap(),
            PathBuf::from("system.slice/corral-web.scope")
        );
        assert!(relative_path("/a/../etc").is_err());
        assert!(relative_path("/").is_err());
        assert!(relative_path("nope:x:y").is_err());
    }

    #[test]
    fn limits_as_runc_writes_them() {
        let spec: Spec = serde_json::from_str(
            r#"{"linux":{"cgroupsPath":"/default/web","resources":{
                "cpu":{"shares":512,"quota":50000,"period":100000},
                "memory":{"limit":268435456},"pids":{"limit":64}}}}"#,
        )
        .unwrap();
        let limits = Limits::of(&spec);
        let v1: Vec<(&str, String)> = limits
            .files(false)
            .into_iter()
            .map(|(_, f, v)| (f, v))
            .collect();
        assert_eq!(
            v1,
            [
                ("cpu.shares", "512".to_string()),
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "50000".to_string()),
                ("memory.limit_in_bytes", "268435456".to_string()),
                ("pids.max", "64".to_string()),
            ]
        );
        let v2: Vec<(&str, String)> = limits
            .files(true)
            .into_iter()
            .map(|(_, f, v)| (f, v))
            .collect();
        assert_eq!(
            v2,
            [
                ("cpu.weight", "20".to_string()),
                ("cpu.max", "50000 100000".to_string()),
                ("memory.max", "268435456".to_string()),
                ("pids.max", "64".to_string()),
            ]
        );
        // No limits asked: nothing written; shares 1024 is weight 39 as runc has it.
        assert!(Limits::default().files(true).is_empty());
        let one = Limits {
            cpu_shares: Some(1024),
            ..Limits::default()
        };
        assert_eq!(one.files(true)[0].2, "39");
    }
}
