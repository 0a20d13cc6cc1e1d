//! The zygote: one per app, a fresh single-threaded image of corrald's own
//! binary (`corrald zygote`, control socket on stdin).
//!
//! It receives the spec, listening sockets and artifact (and the TLS
//! certificate and key, as bytes) from corrald (`protocol::Start`), builds
//! the TLS configuration and the engine, loads the artifact from the
//! inherited fd (digest checked again), pre-instantiates, enters the
//! sandbox, and then only forks, reaps and counts workers.
//!
//! Pool protocol (zygote ↔ workers), with no signals (the sandbox refuses
//! `kill`) and no new sockets (it refuses `socketpair`):
//! - a `MAP_SHARED` page (`SharedPool`) holds `live` (workers that
//!   accept), `draining`, and per worker slot its instances in flight
//!   (http requests, stdio connections; not idle connections) and a
//!   `retiring` flag;
//! - a worker retires itself: idle for `pool.idle-timeout` it takes itself
//!   out of `live` only by a compare-and-swap that keeps `live >= pool.min`;
//!   after `pool.max-requests` it leaves `live` unconditionally and asks
//!   for a replacement;
//! - workers write one byte to a datagram socketpair made before the
//!   sandbox ("saturated", "replace me") to wake the zygote at once; the
//!   zygote also looks every `TICK` (100 ms);
//! - the zygote forks while `live < min`, when every live worker has
//!   `pool.concurrency` instances in flight, and to replace a crashed or
//!   max-requests worker (never above `pool.max`); at `min = 0` it exits
//!   once its last worker is gone, and corrald watches the socket again;
//! - accepts are balanced: each slot also holds the worker's open
//!   connections and whether it accepts; a worker holding more than its
//!   share of its accepting siblings' connections leaves a new connection
//!   to them, and takes it after [`worker::ACCEPT_DEFERRAL`] if none has.
//!
//! A `command` app's zygote forks one worker, which runs the instance; when
//! it ends the zygote reports `FromZygote::Finished` and exits, and
//! corrald applies `restart.on` (with backoff and give-up).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use corral_compiler::EngineOptions;
use corral_policy::{AppKind, AppSpec, ZygoteMode};
use rustix::event::{PollFd, PollFlags};
use rustix::net::RecvFlags;
use rustix::process::{WaitOptions, WaitStatus};

use crate::counters::AppCounters;
use crate::guest::{Guest, Sandboxed};
use crate::host::{self, GuestCaps, StdioMode};
use crate::pool::SharedPool;
use crate::protocol::{self, FromZygote, Start, ToZygote};
use crate::sandbox::SandboxPlan;
use crate::sys::{self, Forked};
use crate::worker::{self, Parent, WorkerCtx};

/// How often the zygote looks at its pool without being woken.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// A worker that dies sooner than this after its fork crashed "at once".
const FAST_CRASH: Duration = Duration::from_secs(1);
/// After this many crashes at once in a row the zygote gives up (exits
/// failed), and corrald's restart backoff and give-up take over.
const FAST_CRASH_LIMIT: u32 = 5;

/// `corrald zygote`: never returns normally; the exit code says how it went.
pub fn main() -> std::process::ExitCode {
    // corrald blocks the signals it waits for; the mask survives exec.
    if let Err(e) = sys::unblock_all_signals() {
        eprintln!("corrald zygote: unblocking signals: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // What exec left open, as opposed to what this process opens from here
    // on (received fds, wasmtime's mapping of the artifact).
    let inherited = crate::sandbox::open_fds();
    let control = match take_stdin() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("corrald zygote: the control socket on stdin: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    std::process::ExitCode::from(serve(control, &inherited, Origin::Exec))
}

/// Take the control socket corrald left on stdin: stdin becomes
/// /dev/null and the socket lives on only as the returned fd (which
/// workers close right after their fork: a worker must not be able to
/// talk to corrald as its zygote). Also the zygote template's start.
pub(crate) fn take_stdin() -> std::io::Result<OwnedFd> {
    let control = std::io::stdin().as_fd().try_clone_to_owned()?;
    let null = std::fs::File::open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    Ok(control)
}

/// An engine the zygote template built before the fork, and the options
/// it was built with (used only if they are the app's).
pub(crate) struct Prebuilt {
    pub(crate) options: EngineOptions,
    pub(crate) engine: corral_compiler::BuiltEngine,
}

/// How this zygote came to be.
pub(crate) enum Origin {
    /// `corrald zygote`, exec'd by corrald.
    Exec,
    /// Forked from the zygote template, with the engine it held for this
    /// app (none if it held none: over its cap, or its build failed).
    Template(Option<Prebuilt>),
}

/// A zygote's life from its start message on `control` to its exit code.
/// `inherited`: the fds open before this zygote's own work began.
pub(crate) fn serve(control: OwnedFd, inherited: &[RawFd], origin: Origin) -> u8 {
    let (start, fds) = match protocol::recv::<ToZygote>(&control, RecvFlags::empty()) {
        Ok(Some((ToZygote::Start(start), fds))) => (start, fds),
        Ok(_) => {
            eprintln!("corrald zygote: expected a start message");
            return 1;
        }
        Err(e) => {
            eprintln!("corrald zygote: reading the control socket: {e}");
            return 1;
        }
    };
    let app = start.app.name.clone();
    match Zygote::prepare(*start, fds, &control, inherited, origin) {
        Ok(mut zygote) => {
            drop(control); // the zygote holds its own copy
            match zygote.run() {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(app, "zygote: {e:#}");
                    zygote.report_failure(format!("{e:#}"));
                    1
                }
            }
        }
        Err(e) => {
            let error = format!("{e:#}");
            tracing::error!(app, "cannot start: {error}");
            let _ = protocol::send(&control, &FromZygote::Failed { error }, &[]);
            3
        }
    }
}

/// Why a worker's slot was freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Retired by itself (idle or max-requests); nothing to replace.
    Retired,
    /// Died without retiring: replace it.
    Crashed,
}

struct Zygote {
    /// `None` only in a freshly forked worker, which closes it.
    control: Option<OwnedFd>,
    app: AppSpec,
    /// Pre-instantiated and inside the app's sandbox: what workers run.
    guest: Sandboxed,
    listeners: Vec<OwnedFd>,
    pool: SharedPool,
    /// The app's metrics page (corrald's), mapped before the sandbox.
    counters: &'static AppCounters,
    /// Workers write to `wake_tx`; the zygote reads `wake_rx` (`None` in a
    /// freshly forked worker, which closes it).
    wake_rx: Option<OwnedFd>,
    wake_tx: OwnedFd,
    /// pid → slot.
    workers: HashMap<i32, usize>,
    /// pid → when it was forked.
    started: HashMap<i32, Instant>,
    /// Workers in a row that crashed at once; replacements wait
    /// `restart.backoff` (doubling) meanwhile.
    fast_crashes: u32,
    hold_forks_until: Option<Instant>,
    /// Replacements owed (crashed or max-requests workers).
    replacements: u32,
    draining: bool,
    /// The write end of the "stop accepting" pipe: closed when the zygote
    /// drains or dies, which its workers see at once as end-of-file on
    /// `stop_rx` (`None` once closed, and in a freshly forked worker).
    stop_tx: Option<OwnedFd>,
    /// The read end, which each worker takes.
    stop_rx: Option<OwnedFd>,
    /// Kept open: wasmtime maps it, and it pins the cache entry.
    _artifact: File,
    /// The app's TLS configuration (`tls` in its policy), for its workers.
    tls: Option<tokio_rustls::TlsAcceptor>,
    last_report: (u32, u32),
    /// A `command` app's instance ended and stays ended.
    finished: bool,
}

impl Zygote {
    /// Everything before the first fork: engine, artifact, pre-instantiate,
    /// sandbox.
    fn prepare(
        start: Start,
        mut fds: Vec<OwnedFd>,
        control: &OwnedFd,
        inherited: &[RawFd],
        origin: Origin,
    ) -> anyhow::Result<Zygote> {
        // Where a cold start's time goes (logged at debug; docs/bench.md).
        let t0 = Instant::now();
        let app = start.app;
        // Mapped now, before the sandbox; the fd is closed right away (the
        // workers inherit the mapping, not the file).
        let counters = match start.metrics.then(|| fds.pop()).flatten() {
            Some(fd) => crate::counters::map_page(&fd).unwrap_or_else(|e| {
                tracing::warn!(app = app.name, "metrics page: {e}; counting privately");
                AppCounters::private()
            }),
            None => AppCounters::private(),
        };
        let Some(artifact) = fds.pop() else {
            bail!("no artifact fd in the start message");
        };
        let listeners = fds;
        if listeners.len() != start.listeners.len() {
            bail!(
                "expected {} listening sockets, got {}",
                start.listeners.len(),
                listeners.len()
            );
        }
        let artifact = File::from(artifact);
        // The rustls configuration, built before the sandbox from the bytes
        // corrald read: workers inherit it (and the key in it) with the
        // fork; the key file is never opened here.
        let tls = match &start.tls {
            Some(material) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(material, app.kind)
                    .context("the app's TLS certificate and key")?,
            )),
            None => None,
        };
        drop(start.tls);
        let options = EngineOptions::for_app(&app);
        let (how, prebuilt) = match origin {
            Origin::Exec => ("exec'd", None),
            Origin::Template(prebuilt) => ("forked from the template", prebuilt),
        };
        let built = match prebuilt {
            Some(p) if p.options == options => p.engine,
            // corrald named this app's engine; a mismatch is a bug, not
            // a reason to fail the start.
            Some(p) => {
                tracing::warn!(
                    app = app.name,
                    "the template's engine is for {:?}; building the app's",
                    p.options
                );
                drop(p);
                corral_compiler::build_engine(&options, None)?
            }
            None => corral_compiler::build_engine(&options, None)?,
        };
        if let corral_compiler::Allocation::OnDemandFallback { reason } = &built.allocation {
            tracing::warn!(app = app.name, "pooling allocator unavailable ({reason})");
        }
        let engine = built.engine;
        let t_engine = t0.elapsed();
        let program = match corral_compiler::load_handed_over(&engine, &artifact, &start.artifact) {
            Ok(program) => program,
            Err(e) => {
                // Not this zygote's to repair: corrald rebuilds the entry.
                let error = format!("loading the artifact: {e}");
                let _ = protocol::send(
                    control,
                    &FromZygote::ArtifactDamaged {
                        error: error.clone(),
                    },
                    &[],
                );
                bail!(error);
            }
        };
        let t_artifact = t0.elapsed();
        let mut caps = GuestCaps::for_app(&app, |n| std::env::var(n).ok());
        // stdio apps get their connection per connection, in the worker.
        caps.stdio = StdioMode::Log(host::log::GuestLog::new(
            &app.name,
            app.limits.stdout,
            counters,
        ));
        let guest = Guest::prepare(
            &engine,
            program,
            app.kind,
            caps,
            &app.module.display().to_string(),
        )?;
        let t_pre = t0.elapsed();
        let slots = app.pool.max.max(1) as usize;
        let pool = SharedPool::new(slots).context("mapping the pool's shared page")?;
        let (wake_rx, wake_tx) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .context("creating the wake-up socketpair")?;
        // Before the sandbox (which refuses pipe2).
        let (stop_rx, stop_tx) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )
        .context("creating the stop pipe")?;

        let mut plan = SandboxPlan::for_app(&app);
        for fd in &listeners {
            plan.keep_fd(fd);
        }
        plan.keep_fd(&artifact);
        plan.keep_fd(control);
        plan.keep_fd(&wake_rx);
        plan.keep_fd(&wake_tx);
        plan.keep_fd(&stop_rx);
        plan.keep_fd(&stop_tx);
        // wasmtime keeps the component's artifact open by a path of its own
        // (/proc/self/fd/N) for its copy-on-write memory images.
        plan.keep_fds_opened_since(inherited);
        // Before the first fork: every worker inherits it.
        let guest = guest.enter(plan).context("entering the sandbox")?;
        tracing::debug!(
            app = app.name,
            "zygote prepared in {:?} ({}): engine {:?}, artifact {:?}, pre-instantiate {:?}, \
             pool and sandbox {:?}",
            t0.elapsed(),
            how,
            t_engine,
            t_artifact - t_engine,
            t_pre - t_artifact,
            t0.elapsed() - t_pre,
        );
        let layers = guest.layers();
        for missing in &layers.missing {
            tracing::warn!(app = app.name, "sandbox: not enforced: {missing}");
        }
        protocol::send(
            control,
            &FromZygote::Ready {
                layers: layers.to_string(),
                missing: layers.missing.clone(),
            },
            &[],
        )?;
        Ok(Zygote {
            control: Some(control.try_clone()?),
            app,
            guest,
            listeners,
            pool,
            counters,
            wake_rx: Some(wake_rx),
            wake_tx,
            workers: HashMap::new(),
            started: HashMap::new(),
            fast_crashes: 0,
            hold_forks_until: None,
            replacements: 0,
            draining: false,
            stop_tx: Some(stop_tx),
            stop_rx: Some(stop_rx),
            _artifact: artifact,
            tls,
            last_report: (u32::MAX, u32::MAX),
            finished: false,
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let pool = &self.app.pool;
        // A zygote of a min = 0 app was started for a waiting connection,
        // unless it is kept (started with corrald, it waits for one).
        let first = match self.app.kind {
            AppKind::Command => 1,
            _ if self.kept() => pool.min,
            _ => pool.min.max(1),
        };
        for _ in 0..first.min(pool.max.max(1)) {
            self.fork_worker()?;
        }
        loop {
            self.reap()?;
            if self.draining || self.finished {
                if self.workers.is_empty() {
                    return Ok(());
                }
            } else {
                self.scale()?;
                if self.workers.is_empty() && self.replacements == 0 && !self.kept() {
                    protocol::send(self.control(), &FromZygote::Idle, &[])?;
                    return Ok(());
                }
            }
            self.report()?;
            self.wait_for_events()?;
        }
    }

    /// `pool.zygote = "kept"`: at zero workers this zygote stays and
    /// watches the app's sockets itself (see `wait_for_events`).
    fn kept(&self) -> bool {
        self.app.pool.zygote == ZygoteMode::Kept && self.app.kind != AppKind::Command
    }

    fn control(&self) -> &OwnedFd {
        // Only a forked worker takes it, and a worker never comes back here.
        self.control
            .as_ref()
            .expect("the zygote's control socket is open in the zygote")
    }

    fn wake_rx(&self) -> &OwnedFd {
        // As `control`: only a forked worker takes it.
        self.wake_rx
            .as_ref()
            .expect("the wake-up socket is open in the zygote")
    }

    /// Fork to reach the pool's target; see the module doc.
    fn scale(&mut self) -> anyhow::Result<()> {
        if let Some(until) = self.hold_forks_until {
            if Instant::now() < until {
                return Ok(()); // after crashes at once: backoff
            }
            self.hold_forks_until = None;
        }
        let header = self.pool.header();
        let max = self.app.pool.max.max(1);
        let concurrency = self.app.pool.concurrency.max(1);
        loop {
            let live = header.live.load(Ordering::SeqCst);
            let forked = self.workers.len() as u32;
            if forked >= max {
                return Ok(());
            }
            let want = if live < self.app.pool.min && self.app.kind != AppKind::Command {
                true
            } else if self.replacements > 0 {
                self.replacements -= 1;
                true
            } else {
                self.app.kind != AppKind::Command && live > 0 && self.all_saturated(concurrency)
            };
            if !want {
                return Ok(());
            }
            self.fork_worker()?;
        }
    }

    fn all_saturated(&self, concurrency: u32) -> bool {
        let slots = self.pool.slots();
        let mut any = false;
        for &slot in self.workers.values() {
            let s = &slots[slot];
            if s.retiring.load(Ordering::SeqCst) != 0 {
                continue;
            }
            any = true;
            if s.in_flight.load(Ordering::SeqCst) < concurrency {
                return false;
            }
        }
        any
    }

    fn fork_worker(&mut self) -> anyhow::Result<()> {
        let used: Vec<usize> = self.workers.values().copied().collect();
        let Some(slot) = (0..self.pool.slots().len()).find(|s| !used.contains(s)) else {
            return Ok(());
        };
        let s = &self.pool.slots()[slot];
        s.in_flight.store(0, Ordering::SeqCst);
        s.retiring.store(0, Ordering::SeqCst);
        s.served.store(0, Ordering::SeqCst);
        s.connections.store(0, Ordering::SeqCst);
        s.accepting.store(0, Ordering::SeqCst);
        self.pool.header().live.fetch_add(1, Ordering::SeqCst);
        match sys::fork().context("forking a worker")? {
            Forked::Child => {
                // What only the zygote may use: corrald's socket, and the
                // read end of the wake-ups.
                drop(self.control.take());
                drop(self.wake_rx.take());
                // Only the zygote holds the write end: its exit (or its
                // drain) is end-of-file for every worker.
                drop(self.stop_tx.take());
                let Some(stop) = self.stop_rx.take() else {
                    std::process::exit(70);
                };
                let ctx = WorkerCtx {
                    app: &self.app,
                    // Owned by the worker, which closes them as soon as it
                    // stops accepting: a port is free once every process
                    // has stopped accepting, not once the last connection
                    // is done.
                    listeners: std::mem::take(&mut self.listeners),
                    stop: Some(stop),
                    pool: self.pool,
                    slot,
                    counters: self.counters,
                    tls: self.tls.clone(),
                    parent: Parent::Zygote {
                        pid: rustix::process::getppid(),
                        wake: self.wake_tx.as_fd(),
                    },
                };
                let code = worker::main(ctx, &self.guest.guest);
                std::process::exit(code);
            }
            Forked::Parent(pid) => {
                tracing::debug!(app = self.app.name, pid, slot, "worker started");
                self.workers.insert(pid, slot);
                self.started.insert(pid, Instant::now());
                Ok(())
            }
        }
    }

    /// Collect every worker that has exited.
    fn reap(&mut self) -> anyhow::Result<()> {
        loop {
            let (pid, status) = match rustix::process::waitpid(None, WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => (pid.as_raw_nonzero().get(), status),
                Ok(None) => return Ok(()),
                Err(rustix::io::Errno::CHILD) => return Ok(()),
                Err(e) => return Err(e).context("waitpid"),
            };
            let Some(slot) = self.workers.remove(&pid) else {
                continue;
            };
            let lived = self
                .started
                .remove(&pid)
                .map(|t| t.elapsed())
                .unwrap_or_default();
            let s = &self.pool.slots()[slot];
            // A crashed worker's figures must not count in its siblings'
            // accept balancing.
            s.accepting.store(0, Ordering::SeqCst);
            s.connections.store(0, Ordering::SeqCst);
            let ending = if s.retiring.load(Ordering::SeqCst) != 0 {
                Ending::Retired
            } else {
                // It was still counted as live.
                self.pool.header().live.fetch_sub(1, Ordering::SeqCst);
                Ending::Crashed
            };
            let how = describe_exit(&self.app.name, pid, status);
            let success = status.exit_status() == Some(0);
            if self.app.kind == AppKind::Command {
                // corrald decides about a restart (restart.on, backoff,
                // give-up); this zygote's work is done.
                self.finished = true;
                protocol::send(self.control(), &FromZygote::Finished { how, success }, &[])?;
                continue;
            }
            let crashed = ending == Ending::Crashed && !(success && self.draining);
            if crashed {
                tracing::warn!(app = self.app.name, "{how}");
                if !self.draining {
                    self.replacements += 1;
                }
                self.note_crash(lived, &how)?;
            } else {
                tracing::debug!(app = self.app.name, "{how}");
            }
            protocol::send(
                self.control(),
                &FromZygote::WorkerExited {
                    pid,
                    how,
                    crashed,
                    status: status.as_raw(),
                },
                &[],
            )?;
        }
    }

    /// Pace replacements of workers that crash right after they start, and
    /// give up on a run of them (a fork loop helps nobody).
    fn note_crash(&mut self, lived: Duration, how: &str) -> anyhow::Result<()> {
        if lived >= FAST_CRASH {
            self.fast_crashes = 0;
            return Ok(());
        }
        self.fast_crashes += 1;
        if self.fast_crashes >= FAST_CRASH_LIMIT {
            bail!(
                "{} workers in a row crashed right after they started; last: {how}",
                self.fast_crashes
            );
        }
        let restart = self.app.restart;
        let delay = restart
            .backoff_min
            .saturating_mul(1 << (self.fast_crashes - 1).min(16))
            .min(restart.backoff_max);
        self.hold_forks_until = Some(Instant::now() + delay);
        Ok(())
    }

    /// Tell corrald why this zygote is about to exit failed.
    fn report_failure(&self, error: String) {
        if let Some(control) = &self.control {
            let _ = protocol::send(control, &FromZygote::Failed { error }, &[]);
        }
    }

    fn report(&mut self) -> anyhow::Result<()> {
        let live = self.workers.len() as u32;
        let busy = self
            .workers
            .values()
            .filter(|&&slot| self.pool.slots()[slot].in_flight.load(Ordering::SeqCst) > 0)
            .count() as u32;
        if (live, busy) != self.last_report {
            self.last_report = (live, busy);
            protocol::send(self.control(), &FromZygote::Workers { live, busy }, &[])?;
        }
        Ok(())
    }

    /// Sleep until a worker wakes us, corrald writes, or [`TICK`] passes.
    /// A kept zygote with no workers (and none owed) also wakes for a
    /// connection waiting on the app's sockets, forks a worker for it (which
    /// accepts it), and otherwise sleeps without a timeout: an idle app
    /// costs no wake-ups.
    fn wait_for_events(&mut self) -> anyhow::Result<()> {
        let watch_sockets = self.kept()
            && self.workers.is_empty()
            && self.replacements == 0
            && !self.draining
            && self.hold_forks_until.is_none();
        let mut fds = vec![
            PollFd::new(self.control(), PollFlags::IN),
            PollFd::new(self.wake_rx(), PollFlags::IN),
        ];
        if watch_sockets {
            fds.extend(self.listeners.iter().map(|l| PollFd::new(l, PollFlags::IN)));
        }
        let tick = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: TICK.as_nanos() as i64,
        };
        match rustix::event::poll(&mut fds, (!watch_sockets).then_some(&tick)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        let control_events = fds[0].revents();
        let connection_waiting = fds[2..].iter().any(|fd| !fd.revents().is_empty());
        drop(fds);
        if connection_waiting {
            self.fork_worker()?;
        }
        // Empty the wake-up socket: `s` (saturated) only means "look",
        // `r` (retired after max-requests) asks for a replacement.
        let mut buf = [0u8; 16];
        while let Ok((n, _)) = rustix::net::recv(self.wake_rx(), &mut buf, RecvFlags::DONTWAIT) {
            if buf[..n].contains(&worker::WAKE_REPLACE) && !self.draining {
                self.replacements += 1;
            }
        }
        if control_events.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            match protocol::recv::<ToZygote>(self.control(), RecvFlags::DONTWAIT) {
                Ok(Some((ToZygote::Drain, _))) => self.start_draining(),
                Ok(Some((ToZygote::Start(_), _))) => {
                    tracing::warn!(app = self.app.name, "ignoring a second start message");
                }
                // corrald is gone: finish what is in flight and go.
                Ok(None) => self.start_draining(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::error!(app = self.app.name, "control socket: {e}");
                    self.start_draining();
                }
            }
        }
        Ok(())
    }

    /// Stop accepting, everywhere at once: the workers see the stop pipe
    /// close, and the zygote closes its own copies of the listening
    /// sockets (it forks no worker from here on). Connections in flight
    /// are finished.
    fn start_draining(&mut self) {
        if !self.draining {
            tracing::debug!(app = self.app.name, "draining");
            self.draining = true;
            self.replacements = 0;
            self.pool.header().draining.store(1, Ordering::SeqCst);
            drop(self.stop_tx.take());
            self.listeners.clear();
        }
    }
}

/// "worker 123 exited with 0", "... killed by signal 9", or the seccomp
/// report naming the system call.
fn describe_exit(app: &str, pid: i32, status: WaitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let std_status = std::process::ExitStatus::from_raw(status.as_raw());
    if let Some(kill) = crate::sandbox::seccomp_kill(pid as u32, std_status) {
        return kill.describe(app);
    }
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => format!("app {app}: worker {pid} exited with {code}"),
        (_, Some(sig)) => format!("app {app}: worker {pid} killed by signal {sig}"),
        _ => format!("app {app}: worker {pid} ended ({std_status})"),
    }
}
