//! The sandbox probe (`corral-sandbox-probe`, a test binary of the runtime
//! crate, used by `tests/sandbox.rs` and the VM test; never packaged): enters exactly
//! the sandbox a worker of an app gets ([`SandboxPlan::for_app`] then
//! [`SandboxPlan::enter`]), then tries one action natively and reports the
//! outcome, so that tests can prove each rule from inside.
//!
//! Protocol: stdout gets `ok` (exit 0) or `errno N` (exit 1); failure to
//! enter the sandbox prints the error to stderr and exits 2; death by a
//! signal (SIGSYS for seccomp) is seen by the parent. `bench` prints
//! `ns-per-iter N`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};

use corral_runtime::sandbox::{DEFAULT_OPEN_FILES, Layer, SandboxPlan};

/// Enter an app's worker sandbox and try one action.
#[derive(Debug, Parser)]
#[command(name = "corral-sandbox-probe")]
struct Args {
    /// The policy that defines the app.
    #[arg(long)]
    policy: PathBuf,
    /// The app whose worker sandbox to enter.
    #[arg(long)]
    app: String,
    /// An inherited fd to keep (e.g. the listening socket).
    #[arg(long)]
    keep_fd: Vec<RawFd>,
    /// Leave this layer out, to prove the other one holds on its own.
    #[arg(long, value_parser = ["landlock", "seccomp"])]
    without: Option<String>,
    /// Don't enter the sandbox at all (benchmark baseline).
    #[arg(long)]
    no_sandbox: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Open a file and read from it, or list a directory.
    Read { path: PathBuf },
    /// Create (or truncate) a file and write to it.
    Write { path: PathBuf },
    /// execve a program.
    Exec { path: PathBuf },
    /// PTRACE_ATTACH to a process.
    Ptrace { pid: i32 },
    /// Mount a tmpfs on a directory.
    Mount { path: PathBuf },
    /// unshare(CLONE_NEWUSER).
    UnshareUser,
    /// socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE).
    SocketNetlink,
    /// Connect to 127.0.0.1:PORT and read one line.
    Connect { port: u16 },
    /// Bind a TCP socket to 127.0.0.1:PORT (0: any).
    Bind { port: u16 },
    /// kill(PID, 0); 0 means the parent.
    Kill { pid: i32 },
    /// Accept one connection on an inherited listening fd and answer `hello`.
    Accept { fd: RawFd },
    /// Instantiate and run a Wasm module (pooling allocator, async, traps) N times.
    Wasm { iterations: u32 },
    /// Whether fd N is open (`fcntl(F_GETFD)`; EBADF when closed).
    FdOpen { fd: RawFd },
    /// Check the rlimits and no_new_privs that `enter` sets.
    Limits,
    /// Raise RLIMIT_NOFILE's soft limit (setting limits is not allowed).
    SetLimit,
    /// Panic, as a buggy worker would: it must exit 101 with its message,
    /// not be killed by the filter on the way.
    Panic,
    /// Run a WASI preview1 command (wasmtime-wasi, its tokio runtime and
    /// blocking threads) that reads `data.txt` from the app's first dir,
    /// prints it, and writes it to `out.txt` in its second dir.
    Wasi,
    /// Serve N connections on an inherited listening fd as a worker does:
    /// a tokio current-thread runtime built inside the sandbox, a fresh Wasm
    /// instance per connection; each gets `ok N\n` after sending a line.
    Serve { fd: RawFd, connections: u32 },
    /// Time N instantiate+call rounds of a Wasm module.
    Bench { iterations: u32 },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corral-sandbox-probe: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let policy = corral_policy::load(&args.policy, &corral_policy::Environment::default())
        .map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.diagnostics()
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
    let app = policy
        .apps
        .get(&args.app)
        .with_context(|| format!("no app {:?} in the policy", args.app))?;
    let mut plan = SandboxPlan::for_app(app);
    for &fd in &args.keep_fd {
        // SAFETY: the fd was handed to this process by its parent for this
        // purpose and stays open for the process's lifetime.
        plan.keep_fd(unsafe { BorrowedFd::borrow_raw(fd) });
    }
    match args.without.as_deref() {
        Some("landlock") => plan.disable_layer_for_probe(Layer::Landlock),
        Some("seccomp") => plan.disable_layer_for_probe(Layer::Seccomp),
        _ => {}
    }
    // What must be ready before the sandbox: a worker loads everything first.
    let wasm = match args.action {
        Action::Wasm { .. } | Action::Bench { .. } | Action::Wasi | Action::Serve { .. } => {
            Some(WasmWork::load()?)
        }
        _ => None,
    };
    if !args.no_sandbox {
        let sandboxed = plan.enter().context("entering the sandbox")?;
        eprintln!("probe: {}", sandboxed.layers());
    }
    let outcome = match args.action {
        Action::Read { path } => read(&path),
        Action::Write { path } => std::fs::write(&path, b"probe\n"),
        Action::Exec { path } => exec(&path),
        Action::Ptrace { pid } => ptrace_attach(pid),
        Action::Mount { path } => mount_tmpfs(&path),
        Action::UnshareUser => unshare_user(),
        Action::SocketNetlink => socket_netlink(),
        Action::Connect { port } => connect(port),
        Action::Bind { port } => std::net::TcpListener::bind(("127.0.0.1", port)).map(drop),
        Action::Kill { pid } => kill(pid),
        Action::Accept { fd } => accept(fd),
        Action::FdOpen { fd } => fd_open(fd),
        Action::Limits => limits(),
        Action::SetLimit => set_limit(),
        Action::Panic => panic!("probe panics on purpose"),
        Action::Wasm { iterations } => wasm.expect("loaded").run(iterations),
        Action::Wasi => wasm.expect("loaded").run_wasi(&app.dirs),
        Action::Serve { fd, connections } => serve(wasm.expect("loaded"), fd, connections),
        Action::Bench { iterations } => {
            let work = wasm.expect("loaded");
            let start = Instant::now();
            work.bench(iterations)?;
            let ns = start.elapsed().as_nanos() / u128::from(iterations.max(1));
            println!("ns-per-iter {ns}");
            return Ok(ExitCode::SUCCESS);
        }
    };
    Ok(report(outcome))
}

fn report(outcome: std::io::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => match e.raw_os_error() {
            Some(errno) => {
                println!("errno {errno}");
                ExitCode::from(1)
            }
            None => {
                println!("error {e}");
                ExitCode::from(3)
            }
        },
    }
}

fn read(path: &std::path::Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::read_dir(path)?.next().transpose()?;
        return Ok(());
    }
    let mut buf = [0u8; 16];
    std::fs::File::open(path)?.read(&mut buf).map(drop)
}

fn exec(path: &std::path::Path) -> std::io::Result<()> {
    let prog = CString::new(path.as_os_str().as_bytes())?;
    let argv = [prog.as_ptr(), std::ptr::null()];
    // SAFETY: prog and argv are NUL-terminated and outlive the call; on
    // success execv doesn't return.
    unsafe { libc::execv(prog.as_ptr(), argv.as_ptr()) };
    Err(std::io::Error::last_os_error())
}

fn ptrace_attach(pid: i32) -> std::io::Result<()> {
    // SAFETY: PTRACE_ATTACH takes no pointers; on success the target is
    // stopped, which the test (the target's owner) handles.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mount_tmpfs(path: &std::path::Path) -> std::io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: all pointers are NUL-terminated strings alive for the call;
    // data is null.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn socket_netlink() -> std::io::Result<()> {
    use rustix::net::{AddressFamily, SocketType, socket};
    socket(AddressFamily::NETLINK, SocketType::RAW, None)
        .map(drop)
        .map_err(Into::into)
}

fn unshare_user() -> std::io::Result<()> {
    // SAFETY: the probe is single-threaded and exits right after; nothing
    // relies on the namespace it would leave.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER) }
        .map_err(Into::into)
}

fn connect(port: u16) -> std::io::Result<()> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let mut line = String::new();
    stream.read_to_string(&mut line)?;
    Ok(())
}

fn kill(pid: i32) -> std::io::Result<()> {
    let pid = if pid == 0 {
        rustix::process::getppid().expect("a parent")
    } else {
        rustix::process::Pid::from_raw(pid).expect("pid > 0")
    };
    rustix::process::test_kill_process(pid).map_err(Into::into)
}

fn accept(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: the parent handed this fd over for the probe to own.
    let listener = std::net::TcpListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let (mut conn, _) = listener.accept()?;
    conn.write_all(b"hello\n")
}

fn fd_open(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFD only reads the descriptor's flags; fd may be closed,
    // which is what this checks (EBADF).
    let rc = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if rc >= 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `ok` when core dumps are off, open files bounded and no_new_privs set;
/// otherwise says which is wrong.
fn limits() -> std::io::Result<()> {
    use rustix::process::{Resource, getrlimit};
    let core = getrlimit(Resource::Core);
    let nofile = getrlimit(Resource::Nofile);
    let nnp = rustix::thread::no_new_privs()?;
    let ok = core.current == Some(0)
        && core.maximum == Some(0)
        && nofile.maximum.is_some_and(|n| n <= DEFAULT_OPEN_FILES)
        && nnp;
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "core {core:?}, nofile {nofile:?}, no_new_privs {nnp}"
        )))
    }
}

fn set_limit() -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let nofile = getrlimit(Resource::Nofile);
    let lower = Rlimit {
        current: nofile.current.map(|n| n / 2),
        maximum: nofile.maximum,
    };
    setrlimit(Resource::Nofile, lower).map_err(Into::into)
}

fn serve(work: WasmWork, fd: RawFd, connections: u32) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    // SAFETY: the parent handed this fd over for the probe to own.
    let listener = std::net::TcpListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
    listener.set_nonblocking(true)?;
    // Built after `enter`: its epoll and eventfd are created inside.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let work = std::rc::Rc::new(work);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let mut tasks = Vec::new();
                for _ in 0..connections {
                    let (conn, _) = listener.accept().await?;
                    let work = work.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        let (read, mut write) = conn.into_split();
                        let mut line = String::new();
                        BufReader::new(read).read_line(&mut line).await?;
                        let out = work.round(100).map_err(std::io::Error::other)?;
                        write.write_all(format!("ok {out}\n").as_bytes()).await?;
                        write.shutdown().await
                    }));
                }
                for task in tasks {
                    task.await.map_err(std::io::Error::other)??;
                }
                Ok(())
            })
            .await
    })
}

/// A Wasm workload as a worker runs it: an engine with the pooling
/// allocator and async support, a module compiled before the sandbox, and
/// per round a fresh instance whose guest calls an import, grows memory and
/// traps.
struct WasmWork {
    engine: wasmtime::Engine,
    module: wasmtime::Module,
    wasi_module: wasmtime::Module,
}

/// A preview1 command: copy `data.txt` of the first preopen (fd 3) to
/// stdout and to a new `out.txt` in the second preopen (fd 4); exits with
/// 10 + errno on the first failing call.
const WASI_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "data.txt")
  (data (i32.const 120) "out.txt")
  (func $check (param i32)
    (if (local.get 0) (then (call $proc_exit (i32.add (i32.const 10) (local.get 0))))))
  (func (export "_start")
    ;; open data.txt below fd 3 for reading (rights: fd_read)
    (call $check (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 8)
      (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.const 64))
    (call $check (call $fd_read (i32.load (i32.const 0)) (i32.const 16) (i32.const 1) (i32.const 24)))
    (i32.store (i32.const 32) (i32.const 1024))
    (i32.store (i32.const 36) (i32.load (i32.const 24)))
    (call $check (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40)))
    ;; create out.txt below fd 4 (oflags: creat; rights: fd_write)
    (call $check (call $path_open (i32.const 4) (i32.const 0) (i32.const 120) (i32.const 7)
      (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 8)))
    (call $check (call $fd_write (i32.load (i32.const 8)) (i32.const 32) (i32.const 1) (i32.const 40)))))
"#;

const PROBE_WAT: &str = r#"
(module
  (import "host" "tick" (func $tick (param i32)))
  (memory 1)
  (func (export "run") (param $n i32) (result i32)
    (local $i i32)
    (drop (memory.grow (i32.const 1)))
    (loop $l
      (call $tick (local.get $i))
      (i32.store (i32.mul (local.get $i) (i32.const 4)) (local.get $i))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n))))
    (i32.load (i32.const 4)))
  (func (export "trap") unreachable)
  (func (export "oob") (result i32) (i32.load (i32.const 0x7ffffff0))))
"#;

impl WasmWork {
    fn load() -> anyhow::Result<WasmWork> {
        let mut config = wasmtime::Config::new();
        // Compiling on rayon threads would leave threads behind, and the
        // sandbox is entered single-threaded.
        config.parallel_compilation(false);
        config.allocation_strategy(wasmtime::PoolingAllocationConfig::default());
        let engine = wasmtime::Engine::new(&config)?;
        let module = wasmtime::Module::new(&engine, PROBE_WAT)?;
        let wasi_module = wasmtime::Module::new(&engine, WASI_WAT)?;
        Ok(WasmWork {
            engine,
            module,
            wasi_module,
        })
    }

    fn instance(&self) -> anyhow::Result<(wasmtime::Store<u32>, wasmtime::Instance)> {
        let mut store = wasmtime::Store::new(&self.engine, 0u32);
        let mut linker = wasmtime::Linker::new(&self.engine);
        linker.func_wrap(
            "host",
            "tick",
            |mut caller: wasmtime::Caller<'_, u32>, _i: i32| {
                *caller.data_mut() += 1;
            },
        )?;
        let instance = block_on(linker.instantiate_async(&mut store, &self.module))?;
        Ok((store, instance))
    }

    fn round(&self, n: i32) -> anyhow::Result<i32> {
        let (mut store, instance) = self.instance()?;
        let run = instance.get_typed_func::<i32, i32>(&mut store, "run")?;
        let out = block_on(run.call_async(&mut store, n))?;
        anyhow::ensure!(*store.data() == n as u32, "tick was not called {n} times");
        Ok(out)
    }

    fn run(self, iterations: u32) -> std::io::Result<()> {
        let work = || -> anyhow::Result<()> {
            for _ in 0..iterations {
                anyhow::ensure!(self.round(1000)? == 1, "wrong result");
                // Traps go through wasmtime's signal handlers.
                let (mut store, instance) = self.instance()?;
                let trap = instance.get_typed_func::<(), ()>(&mut store, "trap")?;
                anyhow::ensure!(block_on(trap.call_async(&mut store, ())).is_err());
                let oob = instance.get_typed_func::<(), i32>(&mut store, "oob")?;
                anyhow::ensure!(block_on(oob.call_async(&mut store, ())).is_err());
            }
            Ok(())
        };
        work().map_err(std::io::Error::other)
    }

    /// As a stdio or command worker does per connection: a fresh WASI
    /// context (preopens opened inside the sandbox) and instance.
    fn run_wasi(self, dirs: &[corral_policy::DirGrant]) -> std::io::Result<()> {
        let work = || -> anyhow::Result<()> {
            let mut builder = wasmtime_wasi::WasiCtxBuilder::new();
            builder.inherit_stdout();
            for dir in dirs {
                let perms = match dir.access {
                    corral_policy::Access::ReadOnly => wasmtime_wasi::FsPerms::ReadOnly,
                    corral_policy::Access::ReadWrite => wasmtime_wasi::FsPerms::ReadWrite,
                };
                builder.preopened_dir(&dir.host, &dir.guest, perms)?;
            }
            let mut store = wasmtime::Store::new(&self.engine, builder.build_p1());
            let mut linker = wasmtime::Linker::new(&self.engine);
            wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |ctx| ctx)?;
            let instance = linker.instantiate(&mut store, &self.wasi_module)?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            if let Err(e) = start.call(&mut store, ()) {
                match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    Some(exit) => anyhow::bail!("the guest exited with {}", exit.0),
                    None => return Err(anyhow::anyhow!("{e:#}")),
                }
            }
            Ok(())
        };
        work().map_err(std::io::Error::other)
    }

    fn bench(&self, iterations: u32) -> anyhow::Result<()> {
        for _ in 0..iterations {
            self.round(100)?;
        }
        Ok(())
    }
}

/// Drives a future that never waits on I/O (wasmtime's async calls here
/// only switch fibers) to completion without a runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}
