//! The seam every runner of guest code goes through: corrald's zygotes,
//! `corral run` and the containerd shim's task process.
//!
//! The order is fixed by the types:
//! 1. [`Guest::prepare`]: from an engine and a loaded [`Program`], pick the
//!    guest for the app's kind (an http handler, a stdio module, a command)
//!    and pre-instantiate it. Nothing has run yet; the process may still
//!    have threads (compiling) and every file it needs is open.
//! 2. Enter the OS sandbox: [`Guest::enter`] (a zygote, which then forks
//!    workers) or [`Guest::enter_standalone`] (a process that runs the guest
//!    itself). Only a single-threaded process can enter; only an entered
//!    guest can run.
//! 3. Run: a zygote forks workers, each serving with the worker's serve
//!    loop; a [`Standalone`] guest runs once ([`Standalone::run_once`]) or
//!    serves its listeners with the very same loop ([`Standalone::serve`]):
//!    HTTP/1.1 keep-alive, HTTP/2 with prior knowledge, `pool.concurrency`,
//!    draining on SIGTERM/SIGINT.

use std::os::fd::OwnedFd;

use anyhow::{Context as _, bail};
use corral_policy::{AppKind, AppSpec};
use wasmtime::Engine;

use crate::counters::AppCounters;
use crate::host::{self, ComponentKind, EpochTicker, GuestCaps, Program, RunOutcome, StdioMode};
use crate::pool::SharedPool;
use crate::sandbox::{ActiveLayers, SandboxError, SandboxPlan};
use crate::worker::{self, Parent, WorkerCtx};

/// A pre-instantiated guest of one app kind, not yet sandboxed.
pub enum Guest {
    /// `kind = "http"`: a `wasi:http/incoming-handler@0.2` or
    /// `wasi:http/handler@0.3` component.
    Http {
        engine: Engine,
        handler: host::http::HttpHandler,
    },
    /// `kind = "stdio"`: a command (preview1 module, or 0.2 or 0.3
    /// component), one instance per connection with the connection as
    /// stdin/stdout.
    Stdio {
        engine: Engine,
        /// Boxed: linkers are large.
        program: Box<StdioProgram>,
        caps: GuestCaps,
    },
    /// `kind = "command"`: a preview1 module or a `wasi:cli/run`
    /// component, one long-running instance.
    Command {
        engine: Engine,
        program: Program,
        caps: GuestCaps,
    },
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

impl Guest {
    /// Pick the guest for `kind` from `program` and pre-instantiate it.
    /// `what` names the module in errors (its path).
    pub fn prepare(
        engine: &Engine,
        program: Program,
        kind: AppKind,
        caps: GuestCaps,
        what: &str,
    ) -> anyhow::Result<Guest> {
        let engine = engine.clone();
        Ok(match (kind, program) {
            (AppKind::Http, Program::Component(component)) => {
                match host::component_kind(&engine, &component) {
                    Some(ComponentKind::HttpProxy | ComponentKind::HttpService) => {
                        if caps.reuse.is_some()
                            && host::component_kind(&engine, &component)
                                == Some(ComponentKind::HttpProxy)
                        {
                            bail!(
                                "{what}: pool.reuse needs a WASI 0.3 handler (wasi:http/handler@0.3.x); this component is a WASI 0.2 handler"
                            );
                        }
                        Guest::Http {
                            handler: host::http::HttpHandler::new(&engine, &component, caps)
                                .context("pre-instantiating")?,
                            engine,
                        }
                    }
                    _ => bail!(
                        "{what}: kind = \"http\" needs a component exporting wasi:http/incoming-handler@0.2.x or wasi:http/handler@0.3.x"
                    ),
                }
            }
            (AppKind::Http, Program::Module(_)) => bail!(
                "{what}: kind = \"http\" needs a wasi:http/proxy component, not a core module"
            ),
            (AppKind::Stdio, Program::Module(module)) => Guest::Stdio {
                program: Box::new(StdioProgram::Module {
                    linker: host::p1::linker(&engine)?,
                    module,
                }),
                caps,
                engine,
            },
            (AppKind::Stdio, Program::Component(component)) => {
                match host::component_kind(&engine, &component) {
                    Some(ComponentKind::Command | ComponentKind::Command3) => Guest::Stdio {
                        program: Box::new(StdioProgram::Component {
                            linker: host::p2::linker(&engine)?,
                            component,
                        }),
                        caps,
                        engine,
                    },
                    _ => bail!(
                        "{what}: kind = \"stdio\" needs a WASI preview1 command module or a component exporting wasi:cli/run@0.2.x or @0.3.x"
                    ),
                }
            }
            (AppKind::Command, program) => Guest::Command {
                program,
                caps,
                engine,
            },
        })
    }

    pub fn kind(&self) -> AppKind {
        match self {
            Guest::Http { .. } => AppKind::Http,
            Guest::Stdio { .. } => AppKind::Stdio,
            Guest::Command { .. } => AppKind::Command,
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        match self {
            Guest::Http { engine, .. }
            | Guest::Stdio { engine, .. }
            | Guest::Command { engine, .. } => engine,
        }
    }

    /// Enter the sandbox `plan` describes, for a zygote: the entered guest
    /// is what every worker it forks runs.
    pub fn enter(self, plan: SandboxPlan) -> Result<Sandboxed, SandboxError> {
        let layers = plan.enter()?.layers().clone();
        Ok(Sandboxed {
            guest: self,
            layers,
        })
    }

    /// Enter the sandbox `plan` describes (`None`: run without one, as
    /// `corral run --no-sandbox` asks) for a process that runs the guest
    /// itself. For a served guest (http, stdio), SIGTERM and SIGINT then
    /// make [`Standalone::serve`] drain; a command guest keeps their
    /// default action (they end it, as they end any program).
    pub fn enter_standalone(self, plan: Option<SandboxPlan>) -> anyhow::Result<Standalone> {
        // tokio's signal driver (compiled in when any crate of the build
        // enables tokio's `process` or `signal` feature) makes a
        // process-wide socketpair the first time a runtime starts; the
        // sandbox refuses socketpair. Make it now (a runtime without
        // threads) and keep it.
        drop(current_thread_runtime()?);
        if self.kind() != AppKind::Command {
            // Only the serve loop looks at the flag: installed for a
            // command, it would swallow SIGTERM and Ctrl-C.
            crate::sys::on_stop_signals_drain().context("installing the SIGTERM handler")?;
        }
        let layers = match plan {
            Some(plan) => Some(
                plan.enter()
                    .context("entering the sandbox")?
                    .layers()
                    .clone(),
            ),
            None => None,
        };
        Ok(Standalone {
            guest: self,
            layers,
        })
    }
}

/// What a stdio app runs per connection, linked once.
#[derive(Clone)]
#[allow(
    missing_debug_implementations,
    reason = "wasmtime's linkers are not Debug"
)]
pub enum StdioProgram {
    Module {
        linker: wasmtime::Linker<host::p1::P1State>,
        module: wasmtime::Module,
    },
    Component {
        linker: wasmtime::component::Linker<host::p2::ComponentState>,
        component: wasmtime::component::Component,
    },
}

impl StdioProgram {
    /// Run it once with `caps` (stdio: the connection).
    pub(crate) async fn run(
        &self,
        engine: &Engine,
        caps: &GuestCaps,
    ) -> anyhow::Result<RunOutcome> {
        match self {
            StdioProgram::Module { linker, module } => {
                host::p1::run(engine, linker, module, caps, false).await
            }
            StdioProgram::Component { linker, component } => {
                host::p2::run_command(engine, linker, component, caps, false).await
            }
        }
    }
}

/// A guest inside its zygote's sandbox, ready to be forked into workers.
#[derive(Debug)]
pub struct Sandboxed {
    pub(crate) guest: Guest,
    layers: ActiveLayers,
}

impl Sandboxed {
    /// The layers the kernel gave (and, under `best-effort`, the missing).
    pub fn layers(&self) -> &ActiveLayers {
        &self.layers
    }
}

/// A guest in a process that runs it itself: `corral run` and the shim's
/// task process.
#[derive(Debug)]
pub struct Standalone {
    guest: Guest,
    /// `None`: not sandboxed (`--no-sandbox`).
    layers: Option<ActiveLayers>,
}

impl Standalone {
    pub fn layers(&self) -> Option<&ActiveLayers> {
        self.layers.as_ref()
    }

    /// Run a command guest to its end with this process's stdio.
    pub fn run_once(self) -> anyhow::Result<RunOutcome> {
        let Guest::Command {
            engine,
            program,
            caps,
        } = &self.guest
        else {
            bail!(
                "a {} guest is served, not run once",
                self.guest.kind().as_str()
            );
        };
        // The ticker thread drives timeouts; started after loading so that
        // compiling is not counted against the guest.
        let _ticker = EpochTicker::start(engine).context("starting the epoch ticker")?;
        let rt = current_thread_runtime()?;
        rt.block_on(run_command(engine, program, caps))
    }

    /// Serve `listeners` (already bound, listening sockets) as one worker
    /// of `app` would, until SIGTERM or SIGINT: then finish the requests
    /// in flight and return.
    pub fn serve(self, app: &AppSpec, listeners: Vec<OwnedFd>) -> anyhow::Result<()> {
        if self.guest.kind() == AppKind::Command {
            bail!("a command guest runs once; it does not serve");
        }
        for fd in &listeners {
            // The serve loop's reactor needs them non-blocking (in corrald
            // they are made so when bound).
            rustix::io::ioctl_fionbio(fd, true).context("making a listener non-blocking")?;
        }
        let pool = SharedPool::new(1).context("mapping the pool's state")?;
        pool.header()
            .live
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let ctx = WorkerCtx {
            app,
            listeners,
            stop: None,
            pool,
            slot: 0,
            counters: AppCounters::private(),
            tls: None,
            parent: Parent::None,
        };
        match worker::main(ctx, &self.guest) {
            0 => Ok(()),
            code => bail!("serving ended with code {code} (see the log above)"),
        }
    }
}

/// Run a command guest once: what a command app's worker and
/// [`Standalone::run_once`] both do.
pub(crate) async fn run_command(
    engine: &Engine,
    program: &Program,
    caps: &GuestCaps,
) -> anyhow::Result<RunOutcome> {
    // The host process's own stdio is read and written with blocking calls.
    let blocking = matches!(caps.stdio, StdioMode::Inherit);
    match program {
        Program::Module(module) => {
            let linker = host::p1::linker(engine)?;
            host::p1::run(engine, &linker, module, caps, blocking).await
        }
        Program::Component(component) => {
            let linker = host::p2::linker(engine)?;
            host::p2::run_command(engine, &linker, component, caps, blocking).await
        }
    }
}

pub(crate) fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")
}
