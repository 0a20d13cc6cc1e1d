//! The Unix-socket API: HTTP/1.1 + JSON at `daemon.api-socket`, a thin
//! front end over the [`Manager`] (docs/api.md, docs/openapi.yaml).
//!
//! Each request is routed ([`route`]), its caller taken from the socket
//! (`SO_PEERCRED` + `SO_PEERGROUPS`, never from anything the client
//! says), and one Manager method called; the answer is the Manager's type
//! serialized as it is, so the D-Bus front end's JSON is the same.
//! Authorization happens inside the Manager.
//!
//! Robustness: request heads, and then bodies, must each arrive within
//! [`HEADER_TIMEOUT`] (a slow client is disconnected; a late body is a
//! 408), heads are limited to [`MAX_HEAD`] bytes (431) and bodies to
//! [`route::MAX_BODY`] (413), users other than root get at most
//! [`MAX_PER_USER`] connections each and [`MAX_CONNECTIONS`] together (more
//! are answered 503 `busy`), and a bad request gets a 4xx with a JSON
//! message.
//! Nothing a client sends reaches the daemon's state except through the
//! Manager's methods.
//!
//! Every open connection holds a [`ClientGuard`], so `daemon.idle-exit`
//! waits for API clients (an `events` follower included).
//!
//! `daemon.metrics` (when set) serves `GET /metrics` alone on TCP.

pub mod route;
mod sys;

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{Semaphore, broadcast, mpsc};
use wasmtime_wasi_http::io::TokioIo;

use crate::daemon::SystemdSockets;
use crate::manager::{Caller, ClientGuard, Manager, ManagerError};
pub use route::{ApiError, MAX_BODY, Route};

/// A client must send a whole request head within this long (also the
/// longest a keep-alive connection may sit idle between requests).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Connections of users other than root served at once; more are
/// answered 503 `busy` (root's are always served).
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one user other than root may have open at once.
pub const MAX_PER_USER: usize = 32;
/// Refused connections answered at once (each for at most a second); more
/// are closed without an answer.
const MAX_REFUSALS: usize = 64;
/// An events stream sends a comment this often, so that proxies and
/// clients see it is alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The systemd `FileDescriptorName=` of the API socket.
pub const SYSTEMD_NAME: &str = "api";

type ApiBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Serve the API on `daemon.api-socket` (or systemd's socket for it) and
/// the metrics listener on `daemon.metrics`. Called once in corrald's
/// runtime before the apps start. A socket that cannot be set up is
/// logged as an error and corrald goes on without it.
pub fn spawn(manager: Manager, daemon: &corral_policy::DaemonSpec, systemd: &SystemdSockets) {
    let path = &daemon.api_socket;
    match open_api_socket(path, systemd) {
        Ok((listener, how)) => {
            tracing::info!("API: serving on {how}");
            tokio::spawn(serve_unix(listener, manager.clone()));
        }
        Err(e) => tracing::error!(
            "API: cannot serve on {} ({e:#}); `corral` and the socket API are unavailable",
            path.display()
        ),
    }
    if let Some(addr) = daemon.metrics {
        match std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(listener) => {
                tracing::info!("metrics: serving http://{addr}/metrics");
                tokio::spawn(serve_metrics(listener, manager));
            }
            Err(e) => tracing::error!("metrics: cannot listen on {addr}: {e}"),
        }
    }
}

/// The API socket: systemd's (named [`SYSTEMD_NAME`], or bound to `path`),
/// else bound here.
fn open_api_socket(
    path: &Path,
    systemd: &SystemdSockets,
) -> anyhow::Result<(tokio::net::UnixListener, String)> {
    for (name, fd) in systemd.iter() {
        let bound_here = rustix::net::getsockname(fd)
            .ok()
            .and_then(|a| rustix::net::SocketAddrUnix::try_from(a).ok())
            .and_then(|a| a.path().map(|p| p.to_bytes().to_vec()))
            .is_some_and(|p| p == path.as_os_str().as_encoded_bytes());
        if name == SYSTEMD_NAME || bound_here {
            let fd: OwnedFd = fd.try_clone()?;
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            return Ok((
                tokio::net::UnixListener::from_std(listener)?,
                format!("the socket systemd passed as {name:?}"),
            ));
        }
    }
    Ok((
        tokio::net::UnixListener::from_std(bind(path)?)?,
        path.display().to_string(),
    ))
}

/// Bind the API socket at `path`: its directory made (0755) if missing, a
/// stale socket file replaced (a live one, answered by another corrald,
/// is an error), mode 0666. Anyone who can reach the socket may read;
/// mutations are checked from the caller's credentials (uid 0 or
/// `daemon.api-group`), as for D-Bus, where any local user may call and the
/// service decides.
fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket; not replacing it",
            path.display()
        );
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "{} is in use (another corrald?)",
            path.display()
        );
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod 0666 {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn serve_unix(listener: tokio::net::UnixListener, manager: Manager) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_user = Arc::new(std::sync::Mutex::new(HashMap::<u32, usize>::new()));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("API: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let caller = match sys::peer(&stream) {
            Ok(caller) => caller,
            Err(e) => {
                tracing::warn!("API: cannot tell who connected ({e}); closing");
                continue;
            }
        };
        // Root is always served. Anyone else shares MAX_CONNECTIONS, at
        // most MAX_PER_USER each: one user holding event streams must not
        // lock root, or the other users, out.
        let slot = if caller.uid == 0 {
            None
        } else {
            let user = UserSlot::take(&per_user, caller.uid);
            match (user, slots.clone().try_acquire_owned()) {
                (Some(user), Ok(slot)) => Some((user, slot)),
                (user, _) => {
                    let why = if user.is_none() {
                        format!("uid {} has {MAX_PER_USER} API connections open", caller.uid)
                    } else {
                        format!("{MAX_CONNECTIONS} API connections are open")
                    };
                    tracing::warn!("API: {why}; refusing another");
                    if let Ok(permit) = refusals.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            refuse_busy(stream, &why).await;
                            drop(permit);
                        });
                    }
                    continue;
                }
            }
        };
        let guard = manager.client_guard();
        let manager = manager.clone();
        tokio::spawn(async move {
            serve_connection(stream, Ctx::new(manager, Some(caller), guard)).await;
            drop(slot);
        });
    }
}

/// One of a user's [`MAX_PER_USER`] connections, given back on drop.
struct UserSlot {
    counts: Arc<std::sync::Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl UserSlot {
    fn take(counts: &Arc<std::sync::Mutex<HashMap<u32, usize>>>, uid: u32) -> Option<UserSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(uid).or_default();
        if *n >= MAX_PER_USER {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            counts: counts.clone(),
            uid,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// Answer a connection that gets no slot with a 503 `busy` once its
/// request head has arrived (an answer before the request confuses
/// clients), then close it; a second at most.
async fn refuse_busy(mut stream: tokio::net::UnixStream, why: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = format!(
        "{}\n",
        serde_json::json!({"error": "busy", "message": format!("{why}; try again later")})
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_metrics(listener: tokio::net::TcpListener, manager: Manager) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let manager = manager.clone();
        tokio::spawn(async move {
            // No client guard: a scraper's keep-alive connection must not
            // keep corrald from its idle exit.
            serve_connection(stream, Ctx::new(manager, None, None)).await;
            drop(slot);
        });
    }
}

/// One connection's view: the Manager, and the caller (`None` on the
/// metrics listener, which serves `/metrics` only).
#[derive(Clone)]
struct Ctx {
    manager: Manager,
    caller: Option<Arc<Caller>>,
    _guard: Option<Arc<ClientGuard>>,
}

impl Ctx {
    fn new(manager: Manager, caller: Option<Caller>, guard: impl Into<Option<ClientGuard>>) -> Ctx {
        Ctx {
            manager,
            caller: caller.map(Arc::new),
            _guard: guard.into().map(Arc::new),
        }
    }
}

async fn serve_connection<S>(stream: S, ctx: Ctx)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, &ctx).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(corral_runtime::TokioTimer)
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = connection.await {
        tracing::debug!("API: connection ended: {e}");
    }
}

/// Answer one request.
async fn handle(req: Request<Incoming>, ctx: &Ctx) -> Response<ApiBody> {
    match try_handle(req, ctx).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

async fn try_handle(req: Request<Incoming>, ctx: &Ctx) -> Result<Response<ApiBody>, ApiError> {
    let route = route::route(req.method().as_str(), req.uri().path())?;
    let Some(caller) = &ctx.caller else {
        // The metrics listener.
        return match route {
            Route::Metrics => Ok(metrics(&ctx.manager)),
            _ => Err(ApiError::new(
                404,
                "not_found",
                "this listener (daemon.metrics) serves GET /metrics only",
            )),
        };
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::too_large());
    }
    // The head's timeout does not cover the body: a client that declares
    // a body and never sends it would hold its connection (and a slot, and
    // corrald's idle exit) for ever.
    let body = tokio::time::timeout(
        HEADER_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| ApiError::timeout())?
    .map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            ApiError::too_large()
        } else {
            ApiError::bad_request(format!("reading the body: {e}"))
        }
    })?
    .to_bytes();
    route::check_body(&body)?;
    let m = &ctx.manager;
    Ok(match route {
        Route::ListApps => json(StatusCode::OK, &m.list_apps()),
        Route::GetApp(name) => json(StatusCode::OK, &m.get_app(&name).map_err(from_manager)?),
        Route::Info => json(StatusCode::OK, &m.info()),
        Route::Metrics => metrics(m),
        Route::Events => events(m),
        Route::Start(name) => json(
            StatusCode::OK,
            &m.start_app(caller, &name).await.map_err(from_manager)?,
        ),
        Route::Stop(name) => json(
            StatusCode::OK,
            &m.stop_app(caller, &name).await.map_err(from_manager)?,
        ),
        Route::Restart(name) => json(
            StatusCode::OK,
            &m.restart_app(caller, &name).await.map_err(from_manager)?,
        ),
        Route::Recompile(name) => json(
            StatusCode::OK,
            &m.recompile(caller, &name).await.map_err(from_manager)?,
        ),
        Route::Reload => json(
            StatusCode::OK,
            &m.reload(caller).await.map_err(from_manager)?,
        ),
    })
}

/// The HTTP status of each Manager error.
pub fn status_of(e: &ManagerError) -> u16 {
    match e {
        ManagerError::NoSuchApp(_) => 404,
        ManagerError::AccessDenied(_) => 403,
        ManagerError::Failed(_) => 500,
        ManagerError::ShuttingDown => 503,
    }
}

fn from_manager(e: ManagerError) -> ApiError {
    ApiError::new(status_of(&e), e.code(), e.to_string())
}

fn full(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into()).boxed_unsync()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    let mut text = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!("{{\"error\":\"failed\",\"message\":\"serializing: {e}\"}}").into_bytes()
    });
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(text))
        .unwrap_or_else(|_| Response::new(full("")))
}

fn error_response(e: &ApiError) -> Response<ApiBody> {
    let mut body = e.body();
    body.push('\n');
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(allow) = e.allow {
        builder = builder.header(hyper::header::ALLOW, allow);
    }
    if e.status == 413 || e.status == 408 {
        // The unread body makes the connection unusable.
        builder = builder.header(hyper::header::CONNECTION, "close");
    }
    builder
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

fn metrics(m: &Manager) -> Response<ApiBody> {
    Response::builder()
        .header(
            hyper::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .body(full(m.metrics_text()))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// `GET /v1/events`: server-sent events, one `state` event per Manager
/// event (`id:` its `seq`, `data:` its JSON), a comment every
/// [`KEEP_ALIVE`], and a `missed` comment when this reader fell behind.
fn events(m: &Manager) -> Response<ApiBody> {
    let mut events = m.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        // Sent at once: the client knows it is subscribed from here on.
        if tx
            .send(Bytes::from_static(b": corral events\n\n"))
            .await
            .is_err()
        {
            return;
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        loop {
            let chunk = tokio::select! {
                () = tx.closed() => return,
                _ = keep_alive.tick() => Bytes::from_static(b": keep-alive\n\n"),
                event = events.recv() => match event {
                    Ok(event) => {
                        let data = serde_json::to_string(&event).unwrap_or_default();
                        Bytes::from(format!("id: {}\nevent: state\ndata: {data}\n\n", event.seq))
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        Bytes::from(format!(": missed {n} events\n\n"))
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-cache")
        .body(EventBody(rx).boxed_unsync())
        .unwrap_or_else(|_| Response::new(full("")))
}

/// The body of an events stream: whatever the event task sends.
struct EventBody(mpsc::Receiver<Bytes>);

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
