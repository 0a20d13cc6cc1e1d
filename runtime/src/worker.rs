//! A worker: forked from its zygote, already sandboxed and warm. It builds
//! its own current-thread tokio runtime and epoch ticker (threads exist
//! only after the fork), then accepts on the app's listening sockets
//! itself, one fresh instance per request (http) or connection (stdio);
//! a `command` worker runs its one long-running instance.
//!
//! A `pool.concurrency` slot is an instance: an http request (an HTTP/1
//! request or an HTTP/2 stream, to the end of its response body) or a stdio
//! connection (one guest per connection). Connections are not instances: a
//! worker holds up to its connection cap (its `RLIMIT_NOFILE` less a
//! reserve), so silent or idle clients cannot starve the app (issue 15).
//! At `concurrency` instances running it stops accepting, leaving the
//! backlog to its siblings (and the zygote forks one when every worker is
//! there); at its connection cap it closes its oldest idle connection for
//! each new one. Accepts are balanced between an app's workers: one that
//! holds more than its share of the open connections leaves the next
//! accept to its siblings for up to [`ACCEPT_DEFERRAL`] (the kernel wakes
//! every worker for a new connection and the quickest took them all: 16
//! keep-alive clients on one of two workers served 17.4k requests/s
//! against 28.8k split 8/8, issue 18). A connection gets [`HEAD_DEADLINE`]
//! from its accept to a complete request head, and an idle one
//! `keep_alive_idle`. It retires
//! itself as the zygote's module doc describes, and when it stops
//! accepting it finishes what its connections have sent, answering with
//! `Connection: close` (HTTP/2: GOAWAY), before it exits.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_policy::AppSpec;
use http_body_util::BodyExt as _;
use rustix::net::SendFlags;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use wasmtime::Engine;
use wasmtime_wasi_http::io::TokioIo;

use crate::counters::AppCounters;
use crate::guest::Guest;
use crate::host::{self, ConnectionStdio, EpochTicker, GuestCaps, StdioMode};
use crate::pool::{SharedPool, Slot};

/// Byte a worker sends its zygote when it is at `pool.concurrency`.
pub(crate) const WAKE_SATURATED: u8 = b's';
/// Byte a worker sends when it retires after `pool.max-requests`.
pub(crate) const WAKE_REPLACE: u8 = b'r';

/// The longest an idle connection is kept (shorter when
/// `pool.idle-timeout` is): HTTP/1 between requests, HTTP/2 without a
/// stream (then GOAWAY).
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(15);

/// The longest from a connection's accept to its first complete request
/// head (HTTP/2: its first stream), the h2c sniff included.
const HEAD_DEADLINE: Duration = Duration::from_secs(10);

/// When the worker stops accepting, how long an idle HTTP/1 connection is
/// kept for a request its client may have sent already (it is answered
/// with `Connection: close`); closing at once lost that request (issue 15).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Descriptors a worker keeps free of connections: listening sockets, the
/// artifact, wasmtime's, the runtime's, a guest's own sockets and files.
const RESERVED_FDS: u64 = 64;
/// The connection cap never goes below this, whatever `RLIMIT_NOFILE` says.
const MIN_CONNECTIONS: u64 = 16;
/// Nor above this.
const MAX_CONNECTIONS: usize = 64 * 1024;
/// Connections asked to close to make room, at most, at any time.
const EVICTIONS_AHEAD: usize = 16;

/// How long a worker past its share of connections leaves a waiting
/// connection to its siblings before it takes it itself (they may all be
/// busy).
pub(crate) const ACCEPT_DEFERRAL: Duration = Duration::from_millis(1);

/// How often a worker looks at its idle time, `draining` and its zygote.
const TICK: Duration = Duration::from_millis(100);

/// What a worker gets: from its zygote right after the fork, or from a
/// standalone runner (`corral run --serve`, the shim's task process).
pub(crate) struct WorkerCtx<'a> {
    pub(crate) app: &'a AppSpec,
    /// The app's listening sockets, this worker's own copies: closed when
    /// it stops accepting.
    pub(crate) listeners: Vec<OwnedFd>,
    /// The read end of the zygote's stop pipe (non-blocking): end-of-file
    /// once the zygote drains or is gone. Taken by the worker's runtime;
    /// `None` for a standalone runner's worker.
    pub(crate) stop: Option<OwnedFd>,
    pub(crate) pool: SharedPool,
    pub(crate) slot: usize,
    /// The app's metrics page: requests, errors, latency.
    pub(crate) counters: &'static AppCounters,
    /// The app's TLS configuration (`tls` in its policy): its TCP
    /// connections start with a handshake. Unix-socket ones stay plain.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) parent: Parent<'a>,
}

/// Who the worker answers to.
pub(crate) enum Parent<'a> {
    /// A zygote: it retires itself when idle or after `pool.max-requests`,
    /// wakes the zygote through `wake`, and stops when the zygote (`pid`,
    /// its parent at fork) is gone.
    Zygote {
        pid: Option<rustix::process::Pid>,
        wake: BorrowedFd<'a>,
    },
    /// Nobody: the only worker of a standalone runner. It never retires
    /// and stops on SIGTERM or SIGINT.
    None,
}

/// The worker's life; returns its exit code.
pub(crate) fn main(mut ctx: WorkerCtx<'_>, guest: &Guest) -> i32 {
    let app = ctx.app;
    match run(&mut ctx, guest) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(app = app.name, "worker: {e:#}");
            70
        }
    }
}

fn run(ctx: &mut WorkerCtx<'_>, guest: &Guest) -> anyhow::Result<i32> {
    let stop = ctx.stop.take();
    let listeners = std::mem::take(&mut ctx.listeners);
    let ctx = &*ctx;
    // Threads only now, after the fork.
    let _ticker = EpochTicker::start(guest.engine()).context("starting the epoch ticker")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the worker's runtime")?;
    rt.block_on(async {
        let stop = stop
            .map(crate::sys::register_readable)
            .transpose()
            .context("watching the stop pipe")?;
        match guest {
            Guest::Command {
                engine,
                program,
                caps,
            } => {
                let run = async {
                    ctx.counters.begin();
                    let outcome = crate::guest::run_command(engine, program, caps).await?;
                    outcome.report("command");
                    if outcome.exit_code() != 0 {
                        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(i32::from(outcome.exit_code()))
                };
                tokio::select! {
                    code = run => code,
                    // corrald is gone (a command is never drained
                    // otherwise): nothing would restart or stop it.
                    () = told_to_stop(stop.as_ref()) => {
                        tracing::warn!(app = ctx.app.name, "the zygote is gone: stopping the command");
                        Ok(0)
                    }
                }
            }
            _ => serve(ctx, listeners, stop.as_ref(), guest).await.map(|()| 0),
        }
    })
}

/// Wait until the zygote's stop pipe says stop: end-of-file (the zygote
/// drains, or is gone). A byte would mean the same; none is ever written.
/// Never, for a worker with no stop pipe (a standalone runner's).
async fn told_to_stop(stop: Option<&tokio::io::unix::AsyncFd<OwnedFd>>) {
    let Some(stop) = stop else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut guard) = stop.readable().await else {
            return;
        };
        let mut byte = [0u8; 1];
        match rustix::io::read(stop.get_ref(), &mut byte) {
            Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
            // End-of-file, a byte, or an error: stop.
            _ => return,
        }
    }
}

/// A listening socket of the app (non-blocking: corrald and the
/// standalone runners make it so). Accepted from its readiness rather than
/// with tokio's listeners, so that a worker past its share of connections
/// can see one waiting and leave it to its siblings.
struct Listener {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
    unix: bool,
}

impl Listener {
    fn new(fd: OwnedFd) -> anyhow::Result<Listener> {
        let unix =
            rustix::net::getsockname(&fd)?.address_family() == rustix::net::AddressFamily::UNIX;
        Ok(Listener {
            fd: crate::sys::register_readable(fd)?,
            unix,
        })
    }

    /// The next connection. While `serving` holds more than its share, a
    /// waiting connection is left for [`ACCEPT_DEFERRAL`] to the siblings
    /// (which the kernel woke too); if it is still waiting then, this
    /// worker takes it.
    async fn accept(&self, serving: &Serving) -> std::io::Result<Stream> {
        let mut deferred_since: Option<Instant> = None;
        loop {
            let mut ready = self.fd.readable().await?;
            if serving.over_share() {
                let since = *deferred_since.get_or_insert_with(Instant::now);
                let until = since + ACCEPT_DEFERRAL;
                if Instant::now() < until {
                    // Readiness stays set: looked at again after the wait.
                    drop(ready);
                    let closed = serving.changed.notified();
                    tokio::select! {
                        () = tokio::time::sleep_until(until.into()) => {}
                        () = closed => {}
                    }
                    continue;
                }
            }
            let flags = rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK;
            match rustix::net::accept_with(self.fd.get_ref(), flags) {
                Ok(fd) if self.unix => {
                    return Ok(Stream::Unix(tokio::net::UnixStream::from_std(
                        std::os::unix::net::UnixStream::from(fd),
                    )?));
                }
                Ok(fd) => {
                    let s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?;
                    // A response whose body ends after its head was
                    // written (a 0.3 body streamed from a guest task) goes
                    // out in two writes; with Nagle the second waited for
                    // the client's delayed ACK, 40 ms.
                    let _ = s.set_nodelay(true);
                    return Ok(Stream::Tcp(s));
                }
                Err(rustix::io::Errno::AGAIN) => {
                    // Taken by a sibling (or a stale wake-up).
                    ready.clear_ready();
                    deferred_since = None;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Shared by the accept loops and connections of one worker.
struct Serving {
    slot: &'static Slot,
    /// Every slot of the pool: the siblings' connections, for balancing.
    slots: &'static [Slot],
    counters: &'static AppCounters,
    live: &'static std::sync::atomic::AtomicU32,
    concurrency: u32,
    /// The zygote's wake-up socket (`None`: no zygote).
    wake: Option<OwnedFd>,
    /// `concurrency` permits, one per instance running: an http request
    /// (HTTP/1 request or HTTP/2 stream) to the end of its response body, or
    /// a stdio connection (its guest is the instance) for its whole life.
    permits: Arc<Semaphore>,
    /// Flips to `true` when the worker stops accepting.
    stop: watch::Sender<bool>,
    max_requests: Option<u64>,
    /// How long an idle connection is kept: HTTP/1 between requests
    /// (hyper's header read timeout), HTTP/2 without a stream (then GOAWAY).
    keep_alive_idle: Duration,
    /// The open connections, oldest first.
    conns: std::sync::Mutex<Connections>,
    /// At most this many open connections (see [`connection_cap`]).
    max_connections: usize,
    /// A request ended or a connection closed: an accept loop waiting at
    /// the connection cap looks again.
    changed: Notify,
}

/// The open connections of a worker, by age.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, Arc<ConnState>>,
}

/// One open connection, as its worker sees it.
#[derive(Default)]
struct ConnState {
    /// Requests in flight on it, each to the end of its response body (a
    /// stdio connection counts 1 for its whole life: it is never idle).
    busy: AtomicU32,
    /// Requests begun on it.
    requests: AtomicU64,
    /// Woken (`notify_waiters`) when a request begins or ends.
    activity: Notify,
    /// When it last became idle, in ms since the worker's `epoch`.
    idle_since_ms: AtomicU64,
    /// Asked to close: the worker is at its connection cap and this was
    /// its oldest idle connection.
    evicted: AtomicBool,
    evict: Notify,
}

impl Serving {
    fn wake(&self, byte: u8) {
        if let Some(wake) = &self.wake {
            let _ = rustix::net::send(wake, &[byte], SendFlags::DONTWAIT);
        }
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open_connections(&self) -> usize {
        self.connections().open.len()
    }

    /// Whether one more connection may be accepted: below the cap, or at
    /// it once the oldest idle connection has been asked to close (a few
    /// closings at a time: they hold descriptors until they are gone). With
    /// none idle, the backlog waits (for a sibling, or for [`Self::changed`]).
    fn make_room(&self) -> bool {
        let conns = self.connections();
        if conns.open.len() < self.max_connections {
            return true;
        }
        let closing = conns
            .open
            .values()
            .filter(|c| c.evicted.load(Ordering::SeqCst))
            .count();
        if closing >= EVICTIONS_AHEAD {
            return false;
        }
        let oldest_idle = conns
            .open
            .values()
            .find(|c| c.busy.load(Ordering::SeqCst) == 0 && !c.evicted.load(Ordering::SeqCst));
        match oldest_idle {
            Some(c) => {
                c.evicted.store(true, Ordering::SeqCst);
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }

    /// Whether this worker should leave the next connection to a sibling:
    /// with it, it would hold more than its share (rounded up) of the
    /// connections of the workers that accept (its own and those of its
    /// siblings that accept and are below `concurrency`).
    fn over_share(&self) -> bool {
        let mine = self.slot.connections.load(Ordering::SeqCst);
        if mine == 0 {
            return false;
        }
        let mut workers = 1u64;
        let mut total = u64::from(mine);
        for s in self.slots {
            if std::ptr::eq(s, self.slot)
                || s.accepting.load(Ordering::SeqCst) == 0
                || s.retiring.load(Ordering::SeqCst) != 0
                || s.in_flight.load(Ordering::SeqCst) >= self.concurrency
            {
                continue;
            }
            workers += 1;
            total += u64::from(s.connections.load(Ordering::SeqCst));
        }
        workers > 1 && u64::from(mine) >= (total + 1).div_ceil(workers)
    }

    fn register(&self, busy: u32) -> (u64, Arc<ConnState>) {
        let state = Arc::new(ConnState {
            busy: AtomicU32::new(busy),
            ..ConnState::default()
        });
        let mut conns = self.connections();
        let id = conns.next;
        conns.next += 1;
        conns.open.insert(id, state.clone());
        self.slot.connections.fetch_add(1, Ordering::SeqCst);
        (id, state)
    }

    fn unregister(&self, id: u64) {
        if self.connections().open.remove(&id).is_some() {
            self.slot.connections.fetch_sub(1, Ordering::SeqCst);
        }
        self.changed.notify_waiters();
    }
}

/// The most connections a worker holds open: its `RLIMIT_NOFILE` (the
/// sandbox sets it) less what the worker needs besides (listening sockets,
/// the artifact, wasmtime's, a guest's own sockets and files), and never
/// more than [`MAX_CONNECTIONS`].
fn connection_cap() -> usize {
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let cap = files.saturating_sub(RESERVED_FDS).max(MIN_CONNECTIONS);
    usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .min(MAX_CONNECTIONS)
}

async fn serve(
    ctx: &WorkerCtx<'_>,
    listeners: Vec<OwnedFd>,
    stop: Option<&tokio::io::unix::AsyncFd<OwnedFd>>,
    guest: &Guest,
) -> anyhow::Result<()> {
    let app = ctx.app;
    let header = ctx.pool.header();
    let slot = &ctx.pool.slots()[ctx.slot];
    let concurrency = app.pool.concurrency.max(1);
    let (stop_tx, _) = watch::channel(false);
    let serving = Arc::new(Serving {
        slot,
        slots: ctx.pool.slots(),
        counters: ctx.counters,
        live: &header.live,
        concurrency,
        wake: match &ctx.parent {
            Parent::Zygote { wake, .. } => Some(wake.try_clone_to_owned()?),
            Parent::None => None,
        },
        permits: Arc::new(Semaphore::new(concurrency as usize)),
        stop: stop_tx,
        max_requests: match ctx.parent {
            Parent::Zygote { .. } => app.pool.max_requests,
            Parent::None => None,
        },
        keep_alive_idle: app.pool.idle_timeout.min(KEEP_ALIVE_IDLE),
        conns: std::sync::Mutex::default(),
        max_connections: connection_cap(),
        changed: Notify::new(),
    });
    let guest = Arc::new(match guest {
        Guest::Http { handler, .. } => Conn::Http(handler.clone()),
        Guest::Stdio {
            engine,
            program,
            caps,
        } => Conn::Stdio {
            engine: engine.clone(),
            program: program.clone(),
            caps: Box::new(caps.clone()),
        },
        Guest::Command { .. } => anyhow::bail!("a command app does not accept connections"),
    });
    let mut accept_tasks = Vec::new();
    slot.accepting.store(1, Ordering::SeqCst);
    // Each accept loop owns its socket: aborted when the worker stops
    // accepting, it closes it.
    for fd in listeners {
        let listener = Listener::new(fd)?;
        let tls = if listener.unix { None } else { ctx.tls.clone() };
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            tls,
            serving.clone(),
            guest.clone(),
        )));
    }

    let mut idle_since = Instant::now();
    let mut stopping = false;
    let mut ticks = tokio::time::interval(TICK);
    let told_to_stop = told_to_stop(stop);
    tokio::pin!(told_to_stop);
    let mut told = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut told_to_stop, if !told => told = true,
        }
        let in_flight = slot.in_flight.load(Ordering::SeqCst);
        if stopping {
            // Every connection finished (an idle one closes within
            // `DRAIN_GRACE`, see `serve_http`).
            if in_flight == 0 && serving.open_connections() == 0 {
                break;
            }
            continue;
        }
        let (parent_gone, may_retire) = match ctx.parent {
            Parent::Zygote { pid, .. } => (told || rustix::process::getppid() != pid, true),
            Parent::None => (crate::sys::stop_requested(), false),
        };
        let retired = slot.retiring.load(Ordering::SeqCst) != 0; // max-requests
        if header.draining.load(Ordering::SeqCst) != 0 || parent_gone || retired {
            stopping = true;
        } else if in_flight > 0 {
            idle_since = Instant::now();
        } else if may_retire
            && idle_since.elapsed() >= app.pool.idle_timeout
            && take_out_of_live(&header.live, app.pool.min)
        {
            slot.retiring.store(1, Ordering::SeqCst);
            stopping = true;
        }
        if stopping {
            slot.accepting.store(0, Ordering::SeqCst);
            serving.stop.send_replace(true);
            for task in &accept_tasks {
                task.abort();
            }
        }
    }
    Ok(())
}

/// Leave `live` if that keeps it at `min` or above.
fn take_out_of_live(live: &std::sync::atomic::AtomicU32, min: u32) -> bool {
    let mut n = live.load(Ordering::SeqCst);
    while n > min {
        match live.compare_exchange(n, n - 1, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return true,
            Err(now) => n = now,
        }
    }
    false
}

/// What serves one connection.
enum Conn {
    Http(host::http::HttpHandler),
    Stdio {
        engine: Engine,
        program: Box<crate::guest::StdioProgram>,
        caps: Box<GuestCaps>,
    },
}

async fn accept_loop(
    listener: Listener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    serving: Arc<Serving>,
    conn: Arc<Conn>,
) {
    // A stdio connection is an instance (one guest per connection): it
    // holds a permit for its life. An http connection holds none; its
    // requests do.
    let per_connection = matches!(*conn, Conn::Stdio { .. });
    let mut stop = serving.stop.subscribe();
    loop {
        // At `concurrency` instances running, stop accepting: the backlog
        // is left to the other workers (and to the one the zygote forks).
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => return,
            permit = serving.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let permit = if per_connection {
            Some(permit)
        } else {
            drop(permit); // http: only waited for a free one
            None
        };
        // At the connection cap: room is made by closing the oldest idle
        // connection; with none idle, wait until one closes or goes idle.
        loop {
            let changed = serving.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if serving.make_room() {
                break;
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => return,
                () = changed => {}
            }
        }
        let accept = listener.accept(&serving);
        // Not one more connection once the worker stops accepting
        // (max-requests reached, draining, retiring).
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = accept => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let accepted_at = Instant::now();
        let slot = permit.map(|permit| InstanceSlot::take(permit, &serving));
        let (id, state) = serving.register(u32::from(per_connection));
        let serving = serving.clone();
        let conn = conn.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let serve = ConnCtx {
                serving: &serving,
                state: &state,
                accepted_at,
            };
            match (stream, tls) {
                (Stream::Tcp(s), Some(tls)) => {
                    if let Some(s) = handshake(&tls, s, &serve).await {
                        serve_connection(s, &serve, &conn).await;
                    }
                }
                (Stream::Tcp(s), None) => serve_connection(s, &serve, &conn).await,
                (Stream::Unix(s), _) => serve_connection(s, &serve, &conn).await,
            }
            drop(slot);
            serving.unregister(id);
        });
    }
}

/// The TLS handshake of a new connection, in the worker: done within
/// [`HEAD_DEADLINE`] of the accept (within [`DRAIN_GRACE`] once the worker
/// stops accepting), else the connection is closed, as is one asked to
/// make room. `None`: it failed or took too long (logged at debug: a
/// client's mistake, not the app's).
async fn handshake(
    tls: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    cx: &ConnCtx<'_>,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let mut stop = cx.serving.stop.subscribe();
    let mut deadline = cx.accepted_at + HEAD_DEADLINE;
    let accept = tls.accept(stream);
    tokio::pin!(accept);
    loop {
        tokio::select! {
            done = &mut accept => match done {
                Ok(stream) => return Some(stream),
                Err(e) => {
                    tracing::debug!("TLS handshake failed: {e}");
                    return None;
                }
            },
            () = tokio::time::sleep_until(deadline.into()) => {
                tracing::debug!("TLS handshake not done in time: closed");
                return None;
            }
            () = cx.state.evict.notified() => return None,
            _ = stop.wait_for(|stopped| *stopped), if !*stop.borrow() => {
                deadline = deadline.min(Instant::now() + DRAIN_GRACE);
            }
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// One connection being served: its worker, its state, when it came.
struct ConnCtx<'a> {
    serving: &'a Arc<Serving>,
    state: &'a Arc<ConnState>,
    accepted_at: Instant,
}

/// One of the worker's `concurrency` permits in use, counted in the
/// slot's `in_flight` (which the zygote reads to fork).
struct InstanceSlot {
    _permit: OwnedSemaphorePermit,
    serving: Arc<Serving>,
}

impl InstanceSlot {
    fn take(permit: OwnedSemaphorePermit, serving: &Arc<Serving>) -> InstanceSlot {
        let n = serving.slot.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= serving.concurrency {
            serving.wake(WAKE_SATURATED);
        }
        InstanceSlot {
            _permit: permit,
            serving: serving.clone(),
        }
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        self.serving.slot.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.serving.changed.notify_waiters();
    }
}

/// A request in flight on a connection, from the call of the service to
/// the end of its response body.
struct Busy {
    state: Arc<ConnState>,
    serving: Arc<Serving>,
    epoch: Instant,
}

impl Busy {
    fn begin(state: &Arc<ConnState>, serving: &Arc<Serving>, epoch: Instant) -> Busy {
        state.busy.fetch_add(1, Ordering::SeqCst);
        state.requests.fetch_add(1, Ordering::SeqCst);
        state.activity.notify_waiters();
        Busy {
            state: state.clone(),
            serving: serving.clone(),
            epoch,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.state.idle_since_ms.store(ms, Ordering::SeqCst);
        self.state.busy.fetch_sub(1, Ordering::SeqCst);
        self.state.activity.notify_waiters();
        self.serving.changed.notify_waiters();
    }
}

async fn serve_connection<S>(stream: S, cx: &ConnCtx<'_>, conn: &Conn)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + Unpin + 'static,
{
    match conn {
        Conn::Http(handler) => serve_http(stream, cx, handler).await,
        Conn::Stdio {
            engine,
            program,
            caps,
        } => {
            let serving = cx.serving;
            count_request(serving);
            let started = Instant::now();
            serving.counters.begin();
            let mut caps = GuestCaps::clone(caps);
            let mut stdio = ConnectionStdio::new(stream);
            // The guest's stderr goes to the log, bounded like the rest of
            // its output (issue 15: it went to corrald's stderr unbounded).
            if let StdioMode::Log(log) = &caps.stdio {
                stdio = stdio.with_log(log.clone());
            }
            caps.stdio = StdioMode::Connection(stdio);
            let failed = match program.run(engine, &caps).await {
                Ok(outcome) => {
                    outcome.report("stdio connection");
                    outcome.exit_code() != 0
                }
                Err(e) => {
                    tracing::warn!("stdio connection: {e:#}");
                    true
                }
            };
            serving.counters.observe(started.elapsed(), failed);
        }
    }
}

/// Where a connection's life stands (see [`serve_http`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// The worker stopped accepting; an idle HTTP/1 connection is kept
    /// until `until` for a request its client may have sent already.
    Draining {
        until: Instant,
    },
    /// `graceful_shutdown` was called: hyper finishes what is in flight
    /// (`Connection: close`, or GOAWAY) and ends the connection.
    ShuttingDown,
}

/// Serve one http connection (HTTP/1.1, or HTTP/2 with prior knowledge):
/// - no complete request head (HTTP/2: no stream) within [`HEAD_DEADLINE`]
///   of the accept: closed (the h2c sniff counts);
/// - idle past `keep_alive_idle`: closed (HTTP/1: hyper's header read
///   timeout; HTTP/2: GOAWAY);
/// - asked to make room (the worker is at its connection cap and this was
///   its oldest idle connection): shut down gracefully;
/// - the worker stops accepting: what the client has sent is finished
///   and answered with `Connection: close` (HTTP/2: GOAWAY, then the
///   streams in flight finish); an idle HTTP/1 connection is kept for
///   [`DRAIN_GRACE`] for a request already on its way, then closed.
async fn serve_http<S>(stream: S, cx: &ConnCtx<'_>, handler: &host::http::HttpHandler)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + Unpin + 'static,
{
    let (serving, state) = (cx.serving, cx.state);
    let mut stop = serving.stop.subscribe();
    let mut stream = stream;
    let mut head_deadline = cx.accepted_at + HEAD_DEADLINE;
    let sniffed = {
        // One sniff for the whole wait: it keeps what it has read.
        let sniff = sniff_h2c(&mut stream);
        tokio::pin!(sniff);
        loop {
            tokio::select! {
                sniffed = &mut sniff => break sniffed,
                () = tokio::time::sleep_until(head_deadline.into()) => return,
                () = state.evict.notified() => return,
                _ = stop.wait_for(|stopped| *stopped), if !*stop.borrow() => {
                    head_deadline = head_deadline.min(Instant::now() + DRAIN_GRACE);
                }
            }
        }
    };
    let (seen, h2) = match sniffed {
        Ok(sniffed) => sniffed,
        Err(e) => {
            tracing::debug!("connection ended: {e}");
            return;
        }
    };
    let handler = handler.clone();
    let serving_ = serving.clone();
    let state_ = state.clone();
    let epoch = cx.accepted_at;
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        let serving = serving_.clone();
        // Counted at once: a connection with a request begun is not idle.
        let busy = Busy::begin(&state_, &serving, epoch);
        async move {
            let slot = serving
                .permits
                .clone()
                .acquire_owned()
                .await
                .ok()
                .map(|permit| InstanceSlot::take(permit, &serving));
            count_request(&serving);
            let started = Instant::now();
            serving.counters.begin();
            let response = handler.handle(req).await;
            serving
                .counters
                .observe(started.elapsed(), response.status().is_server_error());
            // The request holds its permit until its body is sent.
            Ok::<_, Infallible>(response.map(|body| {
                body.map_frame(move |frame| {
                    let _held = (&slot, &busy);
                    frame
                })
                .boxed_unsync()
            }))
        }
    });
    let io = TokioIo::new(Prefixed::new(seen, stream));
    let keep_alive_idle = serving.keep_alive_idle;
    macro_rules! drive {
        ($connection:expr) => {{
            let connection = $connection;
            tokio::pin!(connection);
            let mut phase = if *stop.borrow() {
                Phase::Draining {
                    until: head_deadline,
                }
            } else {
                Phase::Serving
            };
            loop {
                let activity = state.activity.notified();
                tokio::pin!(activity);
                activity.as_mut().enable();
                let requests = state.requests.load(Ordering::SeqCst);
                let idle = state.busy.load(Ordering::SeqCst) == 0;
                if matches!(phase, Phase::Draining { .. }) && (h2 || !idle) {
                    // Busy: the response says `Connection: close`.
                    // HTTP/2: GOAWAY, and the streams in flight finish.
                    connection.as_mut().graceful_shutdown();
                    phase = Phase::ShuttingDown;
                }
                let idle_until = epoch
                    + Duration::from_millis(state.idle_since_ms.load(Ordering::SeqCst))
                    + keep_alive_idle;
                let wake_at = match phase {
                    Phase::Serving if requests == 0 => Some(head_deadline),
                    Phase::Serving if h2 && idle => Some(idle_until),
                    Phase::Draining { until } => Some(until),
                    _ => None,
                };
                let sleep = tokio::time::sleep_until(wake_at.unwrap_or(epoch).into());
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!("connection ended: {e}");
                        }
                        return;
                    }
                    _ = stop.wait_for(|stopped| *stopped), if phase == Phase::Serving => {
                        phase = Phase::Draining { until: Instant::now() + DRAIN_GRACE };
                    }
                    () = state.evict.notified(), if phase != Phase::ShuttingDown => {
                        connection.as_mut().graceful_shutdown();
                        phase = Phase::ShuttingDown;
                    }
                    // A request began or ended: look again.
                    () = activity, if h2 || phase != Phase::Serving => {}
                    () = sleep, if wake_at.is_some() => match phase {
                        // No request head in time, or none while draining:
                        // closed, there is nothing to finish.
                        _ if state.requests.load(Ordering::SeqCst) == 0 => return,
                        Phase::Serving if h2 => {
                            if state.busy.load(Ordering::SeqCst) == 0 && Instant::now() >= idle_until {
                                connection.as_mut().graceful_shutdown(); // HTTP/2 idle: GOAWAY
                                phase = Phase::ShuttingDown;
                            }
                        }
                        Phase::Serving => {}
                        Phase::Draining { .. } => {
                            connection.as_mut().graceful_shutdown(); // idle: closes
                            phase = Phase::ShuttingDown;
                        }
                        Phase::ShuttingDown => {}
                    },
                }
            }
        }};
    }
    if h2 {
        drive!(
            hyper::server::conn::http2::Builder::new(SpawnLocal)
                .max_concurrent_streams(serving.concurrency)
                .serve_connection(io, service)
        );
    } else {
        drive!(
            hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer)
                .header_read_timeout(keep_alive_idle)
                .serve_connection(io, service)
        );
    }
}

/// Count one request; at `pool.max-requests` the worker retires (it
/// leaves `live` now and asks the zygote for its replacement).
fn count_request(serving: &Serving) {
    let served = serving.slot.served.fetch_add(1, Ordering::SeqCst) + 1;
    if serving.max_requests == Some(served) && serving.slot.retiring.swap(1, Ordering::SeqCst) == 0
    {
        serving.live.fetch_sub(1, Ordering::SeqCst);
        serving.stop.send_replace(true);
        serving.wake(WAKE_REPLACE);
    }
}

/// The client preface of HTTP/2 with prior knowledge (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Read as much of the connection's start as tells HTTP/2 (the client
/// asks for it with the preface, h2c) from HTTP/1.1: returns the bytes read
/// and whether it is HTTP/2. An HTTP/1 request differs at its first byte,
/// so this never waits on one.
async fn sniff_h2c<S>(stream: &mut S) -> std::io::Result<(Vec<u8>, bool)>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut seen = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; 24];
    while seen.len() < H2_PREFACE.len() {
        let n = stream
            .read(&mut buf[..H2_PREFACE.len() - seen.len()])
            .await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if !H2_PREFACE.starts_with(&seen) {
            return Ok((seen, false));
        }
    }
    let h2 = seen == H2_PREFACE;
    Ok((seen, h2))
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// hyper's timer (header-read timeouts) on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioTimer;

/// A tokio sleep as hyper's [`hyper::rt::Sleep`].
struct TokioSleep(Pin<Box<tokio::time::Sleep>>);

impl std::future::Future for TokioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for TokioSleep {}

impl hyper::rt::Timer for TokioTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(TokioSleep(Box::pin(tokio::time::sleep(duration))))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(TokioSleep(Box::pin(tokio::time::sleep_until(
            deadline.into(),
        ))))
    }
}

/// hyper's HTTP/2 executor: its tasks run on the worker's runtime.
#[derive(Debug, Clone, Copy)]
struct SpawnLocal;

impl<F> hyper::rt::Executor<F> for SpawnLocal
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retiring_never_takes_live_below_min() {
        let live = std::sync::atomic::AtomicU32::new(3);
        assert!(take_out_of_live(&live, 1));
        assert!(take_out_of_live(&live, 1));
        assert!(!take_out_of_live(&live, 1), "the last one stays");
        assert_eq!(live.load(Ordering::SeqCst), 1);
        assert!(take_out_of_live(&live, 0), "min = 0: it may go");
        assert!(!take_out_of_live(&live, 0));
    }

    #[test]
    fn sniffs_h2c_and_gives_the_bytes_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let request: &[u8] = b"GET / HTTP/1.0\r\n\r\n";
            let mut h1 = request;
            let (seen, h2) = sniff_h2c(&mut h1).await.unwrap();
            assert!(!h2);
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut Prefixed::new(seen, h1), &mut all)
                .await
                .unwrap();
            assert_eq!(all, request);
            let mut both = Vec::from(H2_PREFACE);
            both.extend_from_slice(b"frames");
            let mut stream: &[u8] = &both;
            let (seen, h2) = sniff_h2c(&mut stream).await.unwrap();
            assert!(h2);
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut Prefixed::new(seen, stream), &mut all)
                .await
                .unwrap();
            assert_eq!(all, both);
        });
    }
}
