//! What one task runs, decided by the shim from the OCI bundle at `create`
//! and handed to the task's process as a JSON file in the bundle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The parts of an OCI runtime spec (`config.json`) the shim uses.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Spec {
    #[serde(default)]
    pub(crate) process: Process,
    #[serde(default)]
    pub(crate) root: Option<Root>,
    #[serde(default)]
    pub(crate) hostname: Option<String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) linux: Option<Linux>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Process {
    #[serde(default)]
    pub(crate) terminal: bool,
    #[serde(default)]
    pub(crate) args: Vec<String>,
    #[serde(default)]
    pub(crate) env: Vec<String>,
    #[serde(default)]
    pub(crate) cwd: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Root {
    pub(crate) path: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Linux {
    #[serde(default)]
    pub(crate) namespaces: Vec<Namespace>,
    #[serde(default)]
    pub(crate) resources: Option<Resources>,
    /// Where the task's cgroup goes: a cgroupfs path (`/default/ID`,
    /// `/kubepods/burstable/podUID/ID`) or systemd's `SLICE:PREFIX:NAME`.
    #[serde(default, rename = "cgroupsPath")]
    pub(crate) cgroups_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Resources {
    #[serde(default)]
    pub(crate) memory: Option<Memory>,
    #[serde(default)]
    pub(crate) cpu: Option<Cpu>,
    #[serde(default)]
    pub(crate) pids: Option<Pids>,
}

/// `linux.resources.cpu`: what runc applies of it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Cpu {
    /// Relative weight (cgroup v1 `cpu.shares`, 2..262144).
    #[serde(default)]
    pub(crate) shares: Option<u64>,
    /// CFS quota in µs per `period`; absent or ≤ 0: no ceiling.
    #[serde(default)]
    pub(crate) quota: Option<i64>,
    #[serde(default)]
    pub(crate) period: Option<u64>,
}

/// `linux.resources.pids`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Pids {
    /// Absent, 0 or negative: no limit.
    #[serde(default)]
    pub(crate) limit: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Memory {
    /// Bytes; absent, 0 or negative: no limit.
    #[serde(default)]
    pub(crate) limit: Option<i64>,
}

/// An OCI namespace entry: join `path` if given, else a new one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Namespace {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<PathBuf>,
}

impl Spec {
    pub(crate) fn read(bundle: &Path) -> anyhow::Result<Spec> {
        let path = bundle.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub(crate) fn rootfs(&self, bundle: &Path) -> PathBuf {
        match &self.root {
            Some(root) if Path::new(&root.path).is_absolute() => PathBuf::from(&root.path),
            Some(root) if !root.path.is_empty() => bundle.join(&root.path),
            _ => bundle.join("rootfs"),
        }
    }

    /// A Kubernetes pod's sandbox ("pause") container, which only holds
    /// the pod's namespaces.
    pub(crate) fn is_pod_sandbox(&self) -> bool {
        self.annotations
            .get("io.kubernetes.cri.container-type")
            .is_some_and(|t| t == "sandbox")
    }

    /// The spec's environment as pairs (entries without `=` are dropped).
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        self.process
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// Annotation naming the address a `wasi:http` component serves on.
pub(crate) const LISTEN_ANNOTATION: &str = "corral.http.listen";
/// The same as an environment variable of the container.
pub(crate) const LISTEN_ENV: &str = "CORRAL_HTTP_LISTEN";
/// The variable runwasi's wasmtime shim reads, honoured for images built
/// for it.
pub(crate) const RUNWASI_LISTEN_ENV: &str = "WASMTIME_HTTP_PROXY_SOCKET_ADDR";
/// Where a `wasi:http` component serves when nothing says otherwise.
pub(crate) const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// `ADDR:PORT` or a bare port (on all addresses).
pub(crate) fn parse_listen(text: &str) -> anyhow::Result<SocketAddr> {
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    text.parse()
        .with_context(|| format!("`{text}`: expected ADDR:PORT or a port number"))
}

/// What the task's process does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Run `module`: a preview1 command, a `wasi:cli` command or a
    /// `wasi:http` proxy component.
    Wasm,
    /// Hold the namespaces until killed (a pod's sandbox container).
    Pause,
}

/// Everything the task's process needs, decided by the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskPlan {
    pub(crate) id: String,
    pub(crate) mode: Mode,
    /// The module, copied out of the image into the bundle.
    pub(crate) module: PathBuf,
    /// The container's root filesystem, the guest's `/`.
    pub(crate) rootfs: PathBuf,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) listen: SocketAddr,
    pub(crate) cache_dir: PathBuf,
    pub(crate) namespaces: Vec<Namespace>,
    pub(crate) hostname: Option<String>,
    /// The container's memory limit, as the guest's `limits.memory`
    /// (linear memory per instance); `None`: corral's default.
    #[serde(default)]
    pub(crate) memory_limit: Option<u64>,
}

/// The file name of the plan in the bundle.
pub(crate) const PLAN_FILE: &str = "corral-task.json";
/// The file name of the module copy in the bundle.
pub(crate) const MODULE_FILE: &str = "corral-module.wasm";

impl TaskPlan {
    /// The plan for the container of `spec` in `bundle`, reading the
    /// module out of its (mounted) root filesystem.
    pub(crate) fn from_spec(
        id: &str,
        bundle: &Path,
        spec: &Spec,
        cache_dir: &Path,
        wasm_layer: &dyn Fn() -> anyhow::Result<Option<Vec<u8>>>,
    ) -> anyhow::Result<TaskPlan> {
        if spec.process.terminal {
            bail!("a terminal (ctr -t, kubectl -t) is not supported: Wasm guests get pipes");
        }
        let rootfs = spec.rootfs(bundle);
        let env = spec.env();
        let namespaces = spec
            .linux
            .as_ref()
            .map(|l| l.namespaces.clone())
            .unwrap_or_default();
        if let Some(ns) = namespaces.iter().find(|n| n.kind == "user") {
            bail!("user namespaces ({ns:?}) are not supported by this runtime");
        }
        let listen_text = spec
            .annotations
            .get(LISTEN_ANNOTATION)
            .cloned()
            .or_else(|| lookup(&env, LISTEN_ENV))
            .or_else(|| lookup(&env, RUNWASI_LISTEN_ENV))
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = parse_listen(&listen_text).context("the http listen address")?;
        let module = bundle.join(MODULE_FILE);
        let entry = spec.process.args.first().cloned().unwrap_or_default();
        let mode = if spec.is_pod_sandbox() {
            Mode::Pause
        } else {
            let bytes = module_bytes(&rootfs, &spec.process.cwd, &entry, wasm_layer)?;
            write_private(&module, &bytes)?;
            Mode::Wasm
        };
        Ok(TaskPlan {
            id: id.to_string(),
            mode,
            module,
            rootfs,
            argv: spec.process.args.clone(),
            env,
            listen,
            cache_dir: cache_dir.to_path_buf(),
            namespaces,
            hostname: spec.hostname.clone(),
            memory_limit: spec
                .linux
                .as_ref()
                .and_then(|l| l.resources.as_ref())
                .and_then(|r| r.memory.as_ref())
                .and_then(|m| m.limit)
                .filter(|&l| l > 0)
                .map(|l| l as u64),
        })
    }

    pub(crate) fn write(&self, bundle: &Path) -> anyhow::Result<PathBuf> {
        let path = bundle.join(PLAN_FILE);
        write_private(&path, &serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }

    pub(crate) fn read(path: &Path) -> anyhow::Result<TaskPlan> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The module: the entrypoint file of the rootfs (an image whose layer
/// holds the `.wasm`), else the image's Wasm layer (a Wasm OCI artifact,
/// whose rootfs is empty).
fn module_bytes(
    rootfs: &Path,
    cwd: &str,
    entry: &str,
    wasm_layer: &dyn Fn() -> anyhow::Result<Option<Vec<u8>>>,
) -> anyhow::Result<Vec<u8>> {
    let in_root = if entry.is_empty() {
        Err(anyhow::anyhow!(
            "the container has no entrypoint: set the image's Entrypoint to its .wasm file"
        ))
    } else {
        read_in_root(rootfs, cwd, entry)
    };
    let bytes = match in_root {
        Ok(bytes) => bytes,
        Err(not_in_root) => match wasm_layer() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(not_in_root),
            Err(e) => {
                return Err(
                    not_in_root.context(format!("and reading the image's Wasm layer: {e:#}"))
                );
            }
        },
    };
    if !bytes.starts_with(b"\0asm") {
        bail!("{entry}: not a WebAssembly module or component");
    }
    Ok(bytes)
}

fn lookup(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Read `path` (relative to `cwd` unless absolute) inside `root`, as if
/// `root` were `/`: symlinks and `..` cannot leave it (openat2
/// RESOLVE_IN_ROOT). The shim runs as root on the host, and an image's
/// symlink must not make it read a host file.
pub(crate) fn read_in_root(root: &Path, cwd: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    use rustix::fs::{Mode as FsMode, OFlags, ResolveFlags, openat2};
    let inside = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", if cwd.is_empty() { "/" } else { cwd })
    };
    let dir: OwnedFd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .with_context(|| format!("opening the root filesystem {}", root.display()))?;
    let relative = inside.trim_start_matches('/');
    let fd = openat2(
        dir.as_fd(),
        relative,
        OFlags::RDONLY | OFlags::CLOEXEC,
        FsMode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .with_context(|| format!("opening {inside} in the image"))?;
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .with_context(|| format!("reading {inside} in the image"))?;
    Ok(bytes)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen("8081").unwrap().to_string(), "0.0.0.0:8081");
        assert_eq!(
            parse_listen("127.0.0.1:9").unwrap().to_string(),
            "127.0.0.1:9"
        );
        assert!(parse_listen("nope").is_err());
    }

    #[test]
    fn symlinks_stay_in_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host").unwrap();
        std::fs::write(root.path().join("app.wasm"), b"\0asm").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        assert_eq!(
            read_in_root(root.path(), "/", "/app.wasm").unwrap(),
            b"\0asm"
        );
        assert_eq!(
            read_in_root(root.path(), "/", "app.wasm").unwrap(),
            b"\0asm"
        );
        // The absolute symlink resolves inside the root, where there is no
        // such file.
        assert!(read_in_root(root.path(), "/", "/link").is_err());
        assert!(read_in_root(root.path(), "/", "../../../../etc/hostname").is_err());
    }

    #[test]
    fn spec_fields() {
        let spec: Spec = serde_json::from_str(
            r#"{"process":{"args":["/a.wasm","x"],"env":["A=1","B"],"cwd":"/"},
                "root":{"path":"rootfs"},"annotations":{"io.kubernetes.cri.container-type":"sandbox"},
                "linux":{"namespaces":[{"type":"network","path":"/proc/1/ns/net"},{"type":"mount"}],
                         "resources":{"memory":{"limit":33554432}}}}"#,
        )
        .unwrap();
        assert!(spec.is_pod_sandbox());
        assert_eq!(spec.env(), [("A".to_string(), "1".to_string())]);
        assert_eq!(spec.rootfs(Path::new("/b")), Path::new("/b/rootfs"));
        let linux = spec.linux.unwrap();
        let memory = linux.resources.unwrap().memory.unwrap();
        assert_eq!(memory.limit, Some(32 << 20));
        let ns = &linux.namespaces;
        assert_eq!(ns[0].path.as_deref(), Some(Path::new("/proc/1/ns/net")));
    }
}
