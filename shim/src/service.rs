//! The shim v2 task service: one shim process per container (or per pod,
//! grouped by the CRI sandbox id), each container's guest in a child
//! process of its own (see [`crate::guest`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use containerd_shim as shim;
use containerd_shim::monitor::{Subject, Topic, monitor_subscribe};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult, api};
use log::{info, warn};

use crate::guest;
use crate::plan::{MODULE_FILE, Mode, PLAN_FILE, Spec, TaskPlan};

/// The task pid, for `delete` after the shim itself is gone.
const PID_FILE: &str = "corral-task.pid";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

struct Task {
    bundle: PathBuf,
    rootfs: PathBuf,
    /// Whether the shim mounted the rootfs (and unmounts it at delete).
    mounted: bool,
    pid: u32,
    status: Status,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    /// Write end of the start pipe: one byte starts the guest.
    start: Option<File>,
    /// Its cgroup (`linux.cgroupsPath`), removed at delete.
    cgroup: Option<crate::cgroup::TaskCgroup>,
    stdin: String,
    stdout: String,
    stderr: String,
}

#[derive(Default)]
struct State {
    tasks: HashMap<String, Task>,
}

#[derive(Clone)]
pub(crate) struct Service {
    namespace: String,
    /// containerd's gRPC socket (for Wasm layers in its content store).
    address: String,
    /// The id containerd started this shim for (`-id`).
    id: String,
    state: Arc<(Mutex<State>, Condvar)>,
    exit: Arc<ExitSignal>,
    publisher: Option<Arc<RemotePublisher>>,
}

impl Service {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Some(p) = &self.publisher
            && let Err(e) = p.publish(
                ttrpc::context::Context::default(),
                topic,
                &self.namespace,
                event,
            )
        {
            warn!("publishing {topic}: {e}");
        }
    }

    /// Records exits of task processes (reaped by the framework's SIGCHLD
    /// handler) and publishes them.
    fn watch_exits(&self) {
        let sub = match monitor_subscribe(Topic::Pid) {
            Ok(sub) => sub,
            Err(e) => {
                warn!("subscribing to exits: {e}");
                return;
            }
        };
        let this = self.clone();
        std::thread::spawn(move || {
            for event in sub.rx.iter() {
                let Subject::Pid(pid) = event.subject else {
                    continue;
                };
                let mut state = this.lock();
                let Some((id, task)) = state
                    .tasks
                    .iter_mut()
                    .find(|(_, t)| t.pid as i32 == pid && t.status != Status::Stopped)
                else {
                    continue;
                };
                let exited_at = now();
                task.status = Status::Stopped;
                task.exit_status = event.exit_code as u32;
                task.exited_at = Some(exited_at.clone());
                task.start = None;
                info!("{id}: task process {pid} exited with {}", event.exit_code);
                let exit = TaskExit {
                    container_id: id.clone(),
                    id: id.clone(),
                    pid: pid as u32,
                    exit_status: event.exit_code as u32,
                    exited_at: MessageField::some(exited_at),
                    ..Default::default()
                };
                drop(state);
                this.state.1.notify_all();
                this.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(exit));
            }
        });
    }

    fn create_task(&self, req: &api::CreateTaskRequest) -> anyhow::Result<u32> {
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::read(&bundle)?;
        let rootfs = spec.rootfs(&bundle);
        let mut mounted = false;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)?;
            for (done, m) in req.rootfs.iter().enumerate() {
                let result =
                    shim::mount::mount_rootfs(Some(&m.type_), Some(&m.source), &m.options, &rootfs);
                if let Err(e) = result {
                    // Those mounted already would stay: a task that was
                    // not created is never deleted.
                    for _ in 0..done {
                        unmount(&rootfs);
                    }
                    anyhow::bail!("mounting the rootfs ({}): {e}", m.type_);
                }
                mounted = true;
            }
        }
        // The cgroup and its limits first: a task whose limits cannot be
        // applied is not created (runc refuses it too).
        let cgroup = match crate::cgroup::create(&req.id, &spec) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                if mounted {
                    unmount(&rootfs);
                }
                return Err(e);
            }
        };
        let prepared = self.prepare(&req.id, &bundle, &spec, req);
        let (mut cmd, start_r, start_w, mode) = match prepared {
            Ok(ok) => ok,
            Err(e) => {
                if let Some(cgroup) = &cgroup {
                    cgroup.remove();
                }
                if mounted {
                    unmount(&rootfs);
                }
                return Err(e);
            }
        };
        // Spawned and recorded under one hold of the state lock: the exit
        // watcher cannot see this pid's exit before its task exists.
        let mut state = self.lock();
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                drop(state);
                if let Some(cgroup) = &cgroup {
                    cgroup.remove();
                }
                if mounted {
                    unmount(&rootfs);
                }
                return Err(anyhow::Error::new(e).context("starting the task's process"));
            }
        };
        let pid = child.id();
        // Into its cgroup while it waits for start: no guest code has run.
        if let Some(cgroup) = &cgroup {
            if let Err(e) = cgroup.add(pid) {
                let _ = child.kill();
                drop(state);
                if mounted {
                    unmount(&rootfs);
                }
                return Err(e.context("placing the task's process in its cgroup"));
            }
            info!("{}: cgroup {}", req.id, cgroup.dirs()[0].display());
        }
        drop(child); // never waited for here: the framework's reaper does
        drop(start_r);
        state.tasks.insert(
            req.id.clone(),
            Task {
                bundle: bundle.clone(),
                rootfs,
                mounted,
                pid,
                status: Status::Created,
                exit_status: 0,
                exited_at: None,
                start: Some(File::from(start_w)),
                cgroup,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
            },
        );
        drop(state);
        if let Err(e) = std::fs::write(bundle.join(PID_FILE), pid.to_string()) {
            warn!("{}: writing {PID_FILE}: {e}", req.id);
        }
        info!("{}: task process {pid} created ({mode:?})", req.id);
        Ok(pid)
    }

    /// The plan, the artifact in the cache, and the command of the task's
    /// process (which waits for start on the pipe's read end).
    fn prepare(
        &self,
        id: &str,
        bundle: &Path,
        spec: &Spec,
        req: &api::CreateTaskRequest,
    ) -> anyhow::Result<(Command, OwnedFd, OwnedFd, Mode)> {
        let cache_dir = crate::cache_dir();
        let wasm_layer =
            || corral_shim::content::wasm_layer_of_container(&self.address, &self.namespace, id);
        let plan = TaskPlan::from_spec(id, bundle, spec, &cache_dir, &wasm_layer)?;
        if plan.mode == Mode::Wasm {
            precompile(id, &plan)?;
        }
        let plan_path = plan.write(bundle)?;

        let (start_r, start_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg(crate::GUEST_ARG)
            .arg(&plan_path)
            .current_dir(bundle)
            .env_clear()
            .env(crate::SANDBOX_ENV, guest::sandbox_enforcement())
            .stdin(open_stdio(&req.stdin, false)?)
            .stdout(open_stdio(&req.stdout, true)?)
            .stderr(open_stdio(&req.stderr, true)?);
        let start_fd = start_r.as_raw_fd();
        crate::sys::hand_over_fd(&mut cmd, start_fd, guest::START_FD);
        Ok((cmd, start_r, start_w, plan.mode))
    }
}

/// Compile the module into corral's artifact cache on this node, once per
/// module, engine and CPU: the second container of an image loads it.
fn precompile(id: &str, plan: &TaskPlan) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let engine = corral_runtime::host::new_engine(&guest::engine_options())?;
    let artifact = corral_runtime::host::load_artifact(&engine, &plan.module, &plan.cache_dir)?;
    let module = &artifact.key.module;
    if artifact.cache_hit {
        info!(
            "{id}: artifact cache hit for sha256:{module} ({} in {:?})",
            plan.cache_dir.display(),
            t0.elapsed()
        );
    } else {
        info!(
            "{id}: artifact cache miss for sha256:{module}: compiled into {} in {:?}",
            plan.cache_dir.display(),
            artifact.compile_time.unwrap_or_else(|| t0.elapsed())
        );
    }
    Ok(())
}

/// containerd's stdio for the task: a fifo path (which the client already
/// opened), `file://` path, or nothing.
fn open_stdio(path: &str, write: bool) -> anyhow::Result<Stdio> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if path.is_empty() {
        return Ok(Stdio::null());
    }
    if let Some(file) = path.strip_prefix("file://") {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(file)?;
        return Ok(Stdio::from(f));
    }
    if path.contains("://") {
        anyhow::bail!("{path}: only fifo and file:// stdio are supported");
    }
    let f = if write {
        // Read-write: opening never blocks, and the reader still sees EOF
        // once the task (the only holder) exits.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?
    } else {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        rustix::fs::fcntl_setfl(&f, rustix::fs::OFlags::empty())?;
        f
    };
    Ok(Stdio::from(f))
}

/// `start`: the address of the shim for this container's group (its pod
/// under the CRI). When that shim runs already (every container of a pod
/// after the sandbox), its address, without starting a process; else a
/// new shim, spawned by the framework.
fn start_or_join(opts: shim::StartOpts) -> Result<String, shim::Error> {
    let grouping = grouping(Path::new("."), &opts.id);
    let address = shim::socket_address(&opts.address, &opts.namespace, &grouping);
    let socket = address.strip_prefix("unix://").unwrap_or(&address);
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        shim::util::write_address(&address)?;
        return Ok(address);
    }
    // Not running (or going away): a new shim. If another `start` of the
    // same pod won the race to the socket, the new process sees it in
    // use, writes that address and exits.
    let (_pid, address) = shim::spawn(opts, &grouping, Vec::new())?;
    shim::util::write_address(&address)?;
    Ok(address)
}

/// Blocks SIGCHLD, SIGPIPE, SIGTERM and SIGINT for the rest of `start`.
///
/// The framework registers signal-hook handlers for them before `start`
/// and, when `start` returns, drops signal-hook's socket pair before it
/// unregisters them. A signal landing in that window (the SIGCHLD of the
/// spawned process that found the pod's shim running and exited) runs a
/// handler whose wake-up `send` fails with EPIPE and raises SIGPIPE, whose
/// handler does the same, for ever: `start` spun at 100% CPU and containerd
/// waited for it until its caller's deadline (issue 22). Blocked, they stay
/// pending until the process exits. `start` runs no threads, so the
/// calling thread's mask is the process's.
fn block_exit_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGPIPE,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        set.add(signal);
    }
    if let Err(e) = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        // Cannot fail for a valid set; were it to, start still works.
        eprintln!("containerd-shim-corral-v1 start: blocking signals: {e}");
    }
}

/// One shim per pod (the CRI sandbox id), else per container: what its
/// socket is named after.
fn grouping(bundle: &Path, id: &str) -> String {
    Spec::read(bundle)
        .ok()
        .and_then(|s| s.annotations.get("io.kubernetes.cri.sandbox-id").cloned())
        .unwrap_or_else(|| id.to_string())
}

fn unmount(rootfs: &Path) {
    if let Err(e) = try_unmount(rootfs) {
        warn!("unmounting {}: {e}", rootfs.display());
    }
}

/// Whether `pid` is the guest process of `bundle`: started as
/// `<shim> guest <bundle>/corral-task.json` (the same file, however the
/// path is spelled).
fn is_task_process(pid: i32, bundle: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::MetadataExt as _;
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let (Some(_), Some(arg), Some(plan)) = (args.next(), args.next(), args.next()) else {
        return false;
    };
    if arg != crate::GUEST_ARG.as_bytes() {
        return false;
    }
    let plan = Path::new(std::ffi::OsStr::from_bytes(plan));
    // Relative to the guest's working directory, which is the bundle.
    let plan = std::fs::metadata(bundle.join(plan));
    let ours = std::fs::metadata(bundle.join(PLAN_FILE));
    matches!((plan, ours), (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()))
}

/// Lazily unmount `rootfs` (EINVAL: it was not mounted).
fn try_unmount(rootfs: &Path) -> std::io::Result<()> {
    match crate::sys::unmount_detach(rootfs) {
        Err(e) if e.raw_os_error() != Some(libc::EINVAL) => Err(e),
        _ => Ok(()),
    }
}

fn cleanup_bundle(bundle: &Path) {
    for name in [PLAN_FILE, MODULE_FILE, PID_FILE] {
        let _ = std::fs::remove_file(bundle.join(name));
    }
}

fn now() -> Timestamp {
    shim::util::timestamp().unwrap_or_default()
}

fn err(code: Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

fn not_found(id: &str) -> ttrpc::Error {
    err(Code::NOT_FOUND, format!("task {id} not found"))
}

impl shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            id: args.id.clone(),
            state: Arc::default(),
            exit: Arc::new(ExitSignal::default()),
            publisher: None,
        }
    }

    fn start_shim(&mut self, opts: shim::StartOpts) -> Result<String, shim::Error> {
        let started = start_or_join(opts);
        // Whatever happened, this process only exits from here on, and
        // must not take a signal while it does (see block_exit_signals).
        block_exit_signals();
        started
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, shim::Error> {
        // The shim is gone (crashed or killed): containerd runs this in the
        // bundle. Kill a task process left behind, unmount, clean up.
        let bundle = std::env::current_dir().map_err(|e| shim::Error::Other(e.to_string()))?;
        let mut pid = 0;
        if let Ok(text) = std::fs::read_to_string(bundle.join(PID_FILE))
            && let Ok(p) = text.trim().parse::<i32>()
            && p > 0
        {
            pid = p as u32;
            // The task may have ended long ago (containerd runs this action
            // for a dead shim's bundles at its own restart too) and its pid
            // be another process's now: kill only this bundle's guest.
            if is_task_process(p, &bundle)
                && let Some(p) = rustix::process::Pid::from_raw(p)
            {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        if let Ok(spec) = Spec::read(&bundle) {
            let rootfs = spec.rootfs(&bundle);
            let _ = try_unmount(&rootfs);
            if let Some(cgroup) = crate::cgroup::existing(&spec) {
                cgroup.remove_when_empty(std::time::Duration::from_secs(2));
            }
        }
        cleanup_bundle(&bundle);
        // The dead shim's socket, unless a live shim (of the same pod)
        // still answers on it.
        let address =
            shim::socket_address(&self.address, &self.namespace, &grouping(&bundle, &self.id));
        let socket = address.strip_prefix("unix://").unwrap_or(&address);
        if std::os::unix::net::UnixStream::connect(socket).is_err() {
            let _ = std::fs::remove_file(socket);
        }
        Ok(DeleteResponse {
            pid,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let service = Service {
            publisher: Some(Arc::new(publisher)),
            ..self.clone()
        };
        service.watch_exits();
        service
    }
}

impl shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!("{}: create (bundle {})", req.id, req.bundle);
        if req.terminal {
            return Err(err(
                Code::INVALID_ARGUMENT,
                "a terminal is not supported: Wasm guests get pipes",
            ));
        }
        if self.lock().tasks.contains_key(&req.id) {
            // Never replace a task: its process would be orphaned.
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("a task {:?} exists already in this shim", req.id),
            ));
        }
        let pid = self
            .create_task(&req)
            .map_err(|e| err(Code::FAILED_PRECONDITION, format!("{e:#}")))?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if !req.exec_id.is_empty() {
            return Err(err(Code::UNIMPLEMENTED, "exec is not supported"));
        }
        let mut state = self.lock();
        let task = state
            .tasks
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        match task.status {
            Status::Created => {}
            Status::Running => return Err(err(Code::FAILED_PRECONDITION, "already started")),
            Status::Stopped => {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "the task exited with {} before start (its stderr says why)",
                        task.exit_status
                    ),
                ));
            }
        }
        let mut start = task
            .start
            .take()
            .ok_or_else(|| err(Code::INTERNAL, "no start pipe"))?;
        std::io::Write::write_all(&mut start, b"s")
            .map_err(|e| err(Code::INTERNAL, format!("starting the task: {e}")))?;
        task.status = Status::Running;
        let pid = task.pid;
        drop(state);
        info!("{}: started task process {pid}", req.id);
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.lock();
        let task = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let status = match task.status {
            Status::Created => api::Status::CREATED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: task.bundle.display().to_string(),
            pid: task.pid,
            status: status.into(),
            stdin: task.stdin.clone(),
            stdout: task.stdout.clone(),
            stderr: task.stderr.clone(),
            exit_status: task.exit_status,
            exited_at: MessageField::from_option(task.exited_at.clone()),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut state = self.lock();
        loop {
            let task = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if task.status == Status::Stopped {
                return Ok(api::WaitResponse {
                    exit_status: task.exit_status,
                    exited_at: MessageField::from_option(task.exited_at.clone()),
                    ..Default::default()
                });
            }
            state = self.state.1.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let state = self.lock();
        let task = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        if task.status == Status::Stopped {
            return Err(err(Code::NOT_FOUND, "process already finished"));
        }
        info!("{}: kill {} with signal {}", req.id, task.pid, req.signal);
        // The pid is our own child, not yet reaped (it is not Stopped),
        // so it names no other process.
        let pid = rustix::process::Pid::from_raw(task.pid as i32)
            .ok_or_else(|| err(Code::INTERNAL, format!("kill: no pid {}", task.pid)))?;
        let signal =
            rustix::process::Signal::from_named_raw(req.signal as i32).ok_or_else(|| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("kill: unknown signal {}", req.signal),
                )
            })?;
        if let Err(e) = rustix::process::kill_process(pid, signal) {
            return Err(err(Code::INTERNAL, format!("kill: {e}")));
        }
        Ok(api::Empty::default())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            return Err(err(Code::UNIMPLEMENTED, "exec is not supported"));
        }
        let mut state = self.lock();
        let status = state
            .tasks
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id))?
            .status;
        match status {
            Status::Running => {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    "the task is running: kill it first",
                ));
            }
            Status::Created => {
                // Never started: closing the start pipe ends the process.
                if let Some(task) = state.tasks.get_mut(&req.id) {
                    task.start = None;
                }
                while state
                    .tasks
                    .get(&req.id)
                    .is_some_and(|t| t.status != Status::Stopped)
                {
                    state = self.state.1.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            }
            Status::Stopped => {}
        }
        let task = state
            .tasks
            .remove(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        drop(state);
        if task.mounted {
            unmount(&task.rootfs);
        }
        if let Some(cgroup) = &task.cgroup {
            cgroup.remove();
        }
        cleanup_bundle(&task.bundle);
        info!("{}: deleted", req.id);
        let exited_at = task.exited_at.unwrap_or_else(now);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid: task.pid,
                exit_status: task.exit_status,
                exited_at: MessageField::some(exited_at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: task.pid,
            exit_status: task.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let state = self.lock();
        let task = state.tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let mut info = containerd_shim::protos::types::task::ProcessInfo::new();
        info.pid = task.pid;
        Ok(api::PidsResponse {
            processes: vec![info],
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let state = self.lock();
        let task_pid = state.tasks.get(&req.id).map(|t| t.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.lock().tasks.is_empty() {
            info!("shutting down");
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh guest PLAN` in the bundle: a process whose command line is a
    /// guest's (`guest` is a script there that sleeps).
    fn fake_guest(bundle: &Path, plan_arg: &Path) -> std::process::Child {
        // Not `sleep` last: the shell would exec it and the process's
        // command line would no longer be the guest's.
        std::fs::write(bundle.join(crate::GUEST_ARG), "sleep 60\n:\n").unwrap();
        Command::new("/bin/sh")
            .arg(crate::GUEST_ARG)
            .arg(plan_arg)
            .current_dir(bundle)
            .spawn()
            .unwrap()
    }

    #[test]
    fn only_the_bundles_own_guest_is_its_task_process() {
        let bundle = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        for dir in [bundle.path(), other.path()] {
            std::fs::write(dir.join(PLAN_FILE), "{}").unwrap();
        }
        let mut absolute = fake_guest(bundle.path(), &bundle.path().join(PLAN_FILE));
        let mut relative = fake_guest(bundle.path(), Path::new(PLAN_FILE));
        let mut elsewhere = fake_guest(other.path(), &other.path().join(PLAN_FILE));
        let pid = |c: &std::process::Child| c.id() as i32;
        // Each is its bundle's guest once the shell runs (polled: the
        // suite runs on a loaded 2-core machine, where it once failed
        // without this).
        let eventually = |pid: i32, dir: &Path| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !is_task_process(pid, dir) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "pid {pid} never looked like the guest of {}",
                    dir.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        eventually(pid(&absolute), bundle.path());
        eventually(pid(&relative), bundle.path());
        eventually(pid(&elsewhere), other.path());
        assert!(!is_task_process(pid(&elsewhere), bundle.path()));
        // A pid reused by something else, and one that is gone.
        assert!(!is_task_process(std::process::id() as i32, bundle.path()));
        for child in [&mut absolute, &mut relative, &mut elsewhere] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert!(!is_task_process(pid(&absolute), bundle.path()));
    }
}
