//! A worker: forked from its zygote, already sandboxed and warm. It builds
//! its own current-thread tokio runtime and epoch ticker (threads exist
//! only after the fork), then accepts on the app's listening sockets
//! itself, one fresh instance per request (http) or connection (stdio);
//! a `command` worker runs its one long-running instance.
//!
//! It serves at most `pool.concurrency` requests at once: each connection
//! holds one permit (an HTTP/1 connection runs one request at a time), and
//! each HTTP/2 stream beyond its connection's first holds one more, with
//! `max_concurrent_streams` = `concurrency` per connection. At that many
//! permits it stops accepting, leaving the backlog to its siblings. It retires
//! itself as the zygote's module doc describes, and finishes its
//! connections before exiting when the pool drains or the zygote dies.

use std::convert::Infallible;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_policy::AppSpec;
use http_body_util::BodyExt as _;
use rustix::net::SendFlags;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
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

/// The longest an idle HTTP/1 keep-alive connection is kept (shorter when
/// `pool.idle-timeout` is): an idle client must not hold a `concurrency`
/// slot, nor keep an idle worker from retiring, for long.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(15);

/// How often a worker looks at its idle time, `draining` and its zygote.
const TICK: Duration = Duration::from_millis(100);

/// What a worker gets: from its zygote right after the fork, or from a
/// standalone runner (`corral run --serve`, the shim's task process).
pub(crate) struct WorkerCtx<'a> {
    pub(crate) app: &'a AppSpec,
    pub(crate) listeners: &'a [OwnedFd],
    pub(crate) pool: SharedPool,
    pub(crate) slot: usize,
    /// The app's metrics page: requests, errors, latency.
    pub(crate) counters: &'static AppCounters,
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
pub(crate) fn main(ctx: WorkerCtx<'_>, guest: &Guest) -> i32 {
    match run(&ctx, guest) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(app = ctx.app.name, "worker: {e:#}");
            70
        }
    }
}

fn run(ctx: &WorkerCtx<'_>, guest: &Guest) -> anyhow::Result<i32> {
    // Threads only now, after the fork.
    let _ticker = EpochTicker::start(guest.engine()).context("starting the epoch ticker")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the worker's runtime")?;
    rt.block_on(async {
        match guest {
            Guest::Command {
                engine,
                program,
                caps,
            } => {
                ctx.counters.begin();
                let outcome = crate::guest::run_command(engine, program, caps).await?;
                outcome.report("command");
                if outcome.exit_code() != 0 {
                    ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(i32::from(outcome.exit_code()))
            }
            _ => serve(ctx, guest).await.map(|()| 0),
        }
    })
}

/// A listening socket of the app.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    fn new(fd: &OwnedFd) -> anyhow::Result<Listener> {
        let fd = fd.try_clone()?;
        let family = rustix::net::getsockname(&fd)?.address_family();
        Ok(if family == rustix::net::AddressFamily::UNIX {
            Listener::Unix(tokio::net::UnixListener::from_std(
                std::os::unix::net::UnixListener::from(fd),
            )?)
        } else {
            Listener::Tcp(tokio::net::TcpListener::from_std(
                std::net::TcpListener::from(fd),
            )?)
        })
    }
}

/// Shared by the accept loops and connections of one worker.
struct Serving {
    slot: &'static Slot,
    counters: &'static AppCounters,
    live: &'static std::sync::atomic::AtomicU32,
    concurrency: u32,
    /// The zygote's wake-up socket (`None`: no zygote).
    wake: Option<OwnedFd>,
    permits: Arc<Semaphore>,
    /// An HTTP/2 stream waits for a permit: an accept loop holding one
    /// while it waits for a connection gives it up.
    stream_waiting: tokio::sync::Notify,
    /// Flips to `true` when the worker stops accepting.
    stop: watch::Sender<bool>,
    max_requests: Option<u64>,
    /// How long an HTTP/1 connection may wait for its next request head.
    keep_alive_idle: Duration,
}

impl Serving {
    fn wake(&self, byte: u8) {
        if let Some(wake) = &self.wake {
            let _ = rustix::net::send(wake, &[byte], SendFlags::DONTWAIT);
        }
    }
}

async fn serve(ctx: &WorkerCtx<'_>, guest: &Guest) -> anyhow::Result<()> {
    let app = ctx.app;
    let header = ctx.pool.header();
    let slot = &ctx.pool.slots()[ctx.slot];
    let concurrency = app.pool.concurrency.max(1);
    let (stop_tx, _) = watch::channel(false);
    let serving = Arc::new(Serving {
        slot,
        counters: ctx.counters,
        live: &header.live,
        concurrency,
        wake: match &ctx.parent {
            Parent::Zygote { wake, .. } => Some(wake.try_clone_to_owned()?),
            Parent::None => None,
        },
        permits: Arc::new(Semaphore::new(concurrency as usize)),
        stream_waiting: tokio::sync::Notify::new(),
        stop: stop_tx,
        max_requests: match ctx.parent {
            Parent::Zygote { .. } => app.pool.max_requests,
            Parent::None => None,
        },
        keep_alive_idle: app.pool.idle_timeout.min(KEEP_ALIVE_IDLE),
    });
    let guest = Arc::new(match guest {
        Guest::Http { handler, .. } => Conn::Http(handler.clone()),
        Guest::Stdio {
            engine,
            linker,
            module,
            caps,
        } => Conn::Stdio {
            engine: engine.clone(),
            linker: linker.clone(),
            module: module.clone(),
            caps: Box::new(caps.clone()),
        },
        Guest::Command { .. } => anyhow::bail!("a command app does not accept connections"),
    });
    let mut accept_tasks = Vec::new();
    for fd in ctx.listeners {
        let listener = Listener::new(fd)?;
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            serving.clone(),
            guest.clone(),
        )));
    }

    let mut idle_since = Instant::now();
    let mut stopping = false;
    let mut ticks = tokio::time::interval(TICK);
    loop {
        ticks.tick().await;
        let in_flight = slot.in_flight.load(Ordering::SeqCst);
        if stopping {
            if in_flight == 0 {
                break;
            }
            continue;
        }
        let (parent_gone, may_retire) = match ctx.parent {
            Parent::Zygote { pid, .. } => (rustix::process::getppid() != pid, true),
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
        linker: wasmtime::Linker<host::p1::P1State>,
        module: wasmtime::Module,
        caps: Box<GuestCaps>,
    },
}

async fn accept_loop(listener: Listener, serving: Arc<Serving>, conn: Arc<Conn>) {
    loop {
        // At `concurrency` connections, stop accepting: the backlog is
        // left to the other workers (and to the one the zygote forks).
        let Ok(permit) = serving.permits.clone().acquire_owned().await else {
            return;
        };
        let mut stop = serving.stop.subscribe();
        let accept = async {
            match &listener {
                Listener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
                Listener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            }
        };
        // Not one more connection once the worker stops accepting
        // (max-requests reached, draining, retiring).
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => return,
            // The permit goes to the stream, queued on the (fair)
            // semaphore before this loop asks again.
            () = serving.stream_waiting.notified() => continue,
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
        let n = serving.slot.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= serving.concurrency {
            serving.wake(WAKE_SATURATED);
        }
        let serving = serving.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            match stream {
                Stream::Tcp(s) => serve_connection(s, &serving, &conn).await,
                Stream::Unix(s) => serve_connection(s, &serving, &conn).await,
            }
            serving.slot.in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
        });
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn serve_connection<S>(stream: S, serving: &Arc<Serving>, conn: &Conn)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + Unpin + 'static,
{
    match conn {
        Conn::Http(handler) => {
            let mut stream = stream;
            let (seen, h2) = match sniff_h2c(&mut stream).await {
                Ok(sniffed) => sniffed,
                Err(e) => {
                    tracing::debug!("connection ended: {e}");
                    return;
                }
            };
            let handler = handler.clone();
            let serving_ = serving.clone();
            // HTTP/2: the streams of this connection in flight.
            let streams = h2.then(|| Arc::new(AtomicU32::new(0)));
            // Holds a permit once the connection's first request began.
            let begun = Arc::new(tokio::sync::Notify::new());
            let begun_ = begun.clone();
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let serving = serving_.clone();
                let streams = streams.clone();
                begun_.notify_one();
                async move {
                    let hold = match streams {
                        Some(streams) => Some(hold_stream(&serving, streams).await),
                        None => None,
                    };
                    count_request(&serving);
                    let started = Instant::now();
                    serving.counters.begin();
                    let response = handler.handle(req).await;
                    serving
                        .counters
                        .observe(started.elapsed(), response.status().is_server_error());
                    // The stream holds its permit until its body is sent.
                    Ok::<_, Infallible>(response.map(|body| {
                        body.map_frame(move |frame| {
                            let _held = &hold;
                            frame
                        })
                        .boxed_unsync()
                    }))
                }
            });
            let io = TokioIo::new(Prefixed::new(seen, stream));
            let mut stop = serving.stop.subscribe();
            // Serve until the connection ends; when the worker stops
            // accepting, finish the requests in flight and close.
            macro_rules! drive {
                ($connection:expr) => {{
                    let connection = $connection;
                    tokio::pin!(connection);
                    tokio::select! {
                        result = connection.as_mut() => {
                            if let Err(e) = result {
                                tracing::debug!("connection ended: {e}");
                            }
                            return;
                        }
                        _ = stop.wait_for(|stopped| *stopped) => {}
                    }
                    // Accepted before the stop, so its first request is
                    // served: shut down before hyper has parsed it and the
                    // client would get a closed connection and no answer
                    // (seen in the reload test). A client that never sends
                    // one meets the header read timeout.
                    tokio::select! {
                        result = connection.as_mut() => {
                            if let Err(e) = result {
                                tracing::debug!("connection ended: {e}");
                            }
                            return;
                        }
                        () = begun.notified() => {}
                    }
                    connection.as_mut().graceful_shutdown();
                    if let Err(e) = connection.await {
                        tracing::debug!("connection ended: {e}");
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
                        .header_read_timeout(serving.keep_alive_idle)
                        .serve_connection(io, service)
                );
            }
        }
        Conn::Stdio {
            engine,
            linker,
            module,
            caps,
        } => {
            count_request(serving);
            let started = Instant::now();
            serving.counters.begin();
            let mut caps = GuestCaps::clone(caps);
            caps.stdio = StdioMode::Connection(ConnectionStdio::new(stream));
            let failed = match host::p1::run(engine, linker, module, &caps, false).await {
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

/// One HTTP/2 stream in flight: it counts in its connection's streams, and
/// unless it is the only one, it holds a `concurrency` permit of its own
/// (counted in the slot's `in_flight`, which the zygote reads to fork).
struct StreamHold {
    _active: ActiveStream,
    _extra: Option<ExtraPermit>,
}

struct ActiveStream(Arc<AtomicU32>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct ExtraPermit {
    _permit: OwnedSemaphorePermit,
    serving: Arc<Serving>,
}

impl Drop for ExtraPermit {
    fn drop(&mut self) {
        self.serving.slot.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wait until this worker may run one more request on an HTTP/2
/// connection. The connection's own permit covers one stream at a time; a
/// stream that starts while another is in flight takes one more (at most
/// one stream without its own permit is in flight at any time, so requests
/// never outnumber permits).
async fn hold_stream(serving: &Arc<Serving>, streams: Arc<AtomicU32>) -> StreamHold {
    let others = streams.fetch_add(1, Ordering::SeqCst);
    let active = ActiveStream(streams);
    let extra = if others == 0 {
        None
    } else {
        // The semaphore is never closed. On this current-thread runtime the
        // acquire below queues before the notified accept loop runs and
        // releases the permit it holds while waiting for a connection.
        serving.stream_waiting.notify_one();
        let permit = serving.permits.clone().acquire_owned().await.ok();
        permit.map(|permit| {
            let n = serving.slot.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= serving.concurrency {
                serving.wake(WAKE_SATURATED);
            }
            ExtraPermit {
                _permit: permit,
                serving: serving.clone(),
            }
        })
    };
    StreamHold {
        _active: active,
        _extra: extra,
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
