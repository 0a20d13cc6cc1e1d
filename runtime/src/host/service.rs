//! Serving a WASI 0.3 `wasi:http/handler` component (the
//! `wasi:http/service` world). The serve loop that calls it is the
//! worker's (`crate::worker`), as for 0.2 handlers.
//!
//! A 0.3 guest is async: its `handle` returns a response whose body the
//! guest may still be writing from a task of its own, so an instance lives
//! until its last task ends, not until `handle` returns. wasmtime-wasi-http's
//! `ProxyHandler` runs that event loop; this module decides what it may
//! do:
//! - by default an instance serves one request (a fresh instance per
//!   request, as for 0.2): nothing of one request is visible to the next;
//! - `pool.reuse = { requests = N, concurrent = M }` lets one instance
//!   serve up to N requests, M at a time, sharing its memory;
//! - `limits.timeout` bounds each request from its start (the epoch
//!   deadline ends a busy guest, a timer ends a guest waiting on a future
//!   that never resolves), and an instance's work after its last response
//!   (a body still streaming, a task left running) from that response;
//! - a trap or a limit ends the instance, and each request it had not
//!   answered gets 500 (trap), 503 (limit) or 504 (timeout) with the
//!   reason, as for 0.2.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use wasmtime::component::{Component, GuestTaskId};
use wasmtime::{Engine, Store, StoreContextMut};
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::handler::{
    ExpirationError, HandlerState, Instance, InstantiationError, Proxy, ProxyHandler, ShouldAccept,
    TrapOrPanicError, WorkerExpiration, WorkerState, WorkerStatus,
};
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::{WasiBody, WasiHttpCtxView};

use super::limits::{EPOCH_TICK, LimitExceeded, MovableDeadline, arm_movable_deadline};
use super::p2::{self, ComponentState};
use super::{GuestCaps, RunOutcome};

/// How long an instance kept for reuse waits, idle, for its next request
/// before it is dropped (wasmtime serve's default too).
pub const REUSE_IDLE: Duration = Duration::from_secs(1);

/// A pre-instantiated 0.3 handler, ready to handle requests.
#[derive(Clone)]
pub struct ServiceHandler {
    handler: ProxyHandler<Service>,
}

impl std::fmt::Debug for ServiceHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandler").finish_non_exhaustive()
    }
}

/// Why a request got no response from its guest, as the client is told.
#[derive(Debug, Clone)]
struct Failure {
    status: u16,
    text: String,
}

impl Failure {
    fn of(outcome: &RunOutcome) -> Failure {
        match outcome {
            RunOutcome::Exited(_) => Failure {
                status: 500,
                text: "corral: the guest returned without sending a response\n".into(),
            },
            RunOutcome::Trapped(_) => Failure {
                status: 500,
                text: "corral: guest trapped\n".into(),
            },
            RunOutcome::Limit(limit @ LimitExceeded::Timeout { .. }, _) => Failure {
                status: 504,
                text: format!("{limit}\n"),
            },
            RunOutcome::Limit(limit, _) => Failure {
                status: 503,
                text: format!("{limit}\n"),
            },
        }
    }
}

impl ServiceHandler {
    /// Link and pre-instantiate `component` (which must export
    /// `wasi:http/handler@0.3.x`).
    pub fn new(engine: &Engine, component: &Component, caps: GuestCaps) -> anyhow::Result<Self> {
        let linker = p2::linker(engine)?;
        let pre = ServicePre::new(linker.instantiate_pre(component)?)?;
        Ok(ServiceHandler {
            handler: ProxyHandler::new(Service {
                engine: engine.clone(),
                pre,
                caps: Arc::new(caps),
            }),
        })
    }

    /// Handle one request (in a fresh instance unless `pool.reuse` says
    /// otherwise).
    pub async fn handle(&self, req: hyper::Request<Incoming>) -> hyper::Response<WasiBody> {
        let (tx, rx) = oneshot::channel();
        let req = with_scheme_and_authority(req);
        let req = req.map(|body| body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
        let err = match self.handler.handle(tx, req).await {
            Ok(response) => return response,
            Err(err) => err,
        };
        let limits = &self.handler.state().caps.limits;
        if err.is::<ExpirationError>() {
            let limit = limits.timeout.unwrap_or_default();
            return super::http::error_response(
                504,
                format!("{}\n", LimitExceeded::Timeout { limit }),
            );
        }
        if let Some(failed) = err.downcast_ref::<InstantiationError<oneshot::Sender<Failure>>>() {
            if let Some(limit) = LimitExceeded::find(&failed.error, limits) {
                let failure = Failure::of(&RunOutcome::Limit(
                    limit,
                    wasmtime::format_err!("{}", failed.error),
                ));
                eprintln!("{}", failure.text.trim_end());
                return super::http::error_response(failure.status, failure.text);
            }
            eprintln!(
                "corral: cannot instantiate the http handler: {:#}",
                failed.error
            );
            return super::http::error_response(500, "corral: internal error\n".into());
        }
        if err.is::<TrapOrPanicError>() {
            // The instance ended; why is told by `InstanceState::drop`.
            return match rx.await {
                Ok(failure) => super::http::error_response(failure.status, failure.text),
                Err(_) => super::http::error_response(500, "corral: guest trapped\n".into()),
            };
        }
        // `handle` returned an error code, or trapped in a way that ended
        // only this request.
        super::http::error_response(500, format!("corral: guest failed the request: {err}\n"))
    }
}

/// An HTTP/1 request's URI is its path: give it the scheme and the `Host`
/// header's authority, as a 0.2 handler's incoming request has them (an
/// HTTP/2 request has both already). Like the 0.2 host, the scheme is
/// `http` (also behind TLS, which the handler does not see).
fn with_scheme_and_authority<B>(req: hyper::Request<B>) -> hyper::Request<B> {
    if req.uri().authority().is_some() {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok());
    if let Some(authority) = authority {
        let mut uri = parts.uri.clone().into_parts();
        uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(full) = hyper::Uri::from_parts(uri) {
            parts.uri = full;
        }
    }
    hyper::Request::from_parts(parts, body)
}

/// What every instance of one app shares.
struct Service {
    engine: Engine,
    pre: ServicePre<ComponentState>,
    caps: Arc<GuestCaps>,
}

fn http_view(state: &mut ComponentState) -> WasiHttpCtxView<'_> {
    state.http()
}

impl HandlerState for Service {
    type StoreData = ComponentState;
    type WorkerExpiration = Expiry;
    type WorkerState = InstanceState;

    fn instantiate(
        &self,
    ) -> impl Future<Output = wasmtime::Result<Instance<ComponentState, Expiry, InstanceState>>> + Send
    {
        let engine = self.engine.clone();
        let pre = self.pre.clone();
        let caps = self.caps.clone();
        async move {
            let mut store =
                p2::new_store(&engine, &caps, false).map_err(wasmtime::Error::from_anyhow)?;
            let timeout = caps.limits.timeout;
            let deadline = MovableDeadline::new(timeout);
            arm_movable_deadline(&mut store, timeout, &deadline);
            let service =
                super::limits::with_backstop(timeout, pre.instantiate_async(&mut store)).await?;
            Ok(Instance {
                store,
                proxy: Proxy::P3(service),
                view: http_view,
                expiration: Expiry {
                    timeout,
                    sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                },
                state: InstanceState {
                    caps,
                    deadline,
                    waiting: Mutex::new(Vec::new()),
                },
            })
        }
    }
}

/// When an instance is dropped: `limits.timeout` (and a little) after its
/// newest request started or its last response went out, or
/// [`REUSE_IDLE`] after it went idle.
struct Expiry {
    timeout: Option<Duration>,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl WorkerExpiration for Expiry {
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        status: WorkerStatus,
        start: Instant,
    ) -> Poll<()> {
        let this = self.get_mut();
        let limit = match status {
            WorkerStatus::Idle => Some(REUSE_IDLE),
            WorkerStatus::Requests | WorkerStatus::PostReturn => {
                this.timeout.map(|t| t + EPOCH_TICK * 10)
            }
        };
        let Some(limit) = limit else {
            return Poll::Pending;
        };
        let at = start + limit;
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        this.sleep
            .as_mut()
            .reset(tokio::time::Instant::from_std(at));
        this.sleep.as_mut().poll(cx)
    }
}

/// One instance: which requests it may take, and who to tell why it
/// ended.
struct InstanceState {
    caps: Arc<GuestCaps>,
    deadline: MovableDeadline,
    /// The requests it took, to be told the failure if it traps.
    waiting: Mutex<Vec<oneshot::Sender<Failure>>>,
}

impl WorkerState for InstanceState {
    type StoreData = ComponentState;
    type RequestData = oneshot::Sender<Failure>;

    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept {
        match self.caps.reuse {
            None if total == 0 => ShouldAccept::Yes,
            None => ShouldAccept::Never,
            Some(reuse) if total >= reuse.requests as usize => ShouldAccept::Never,
            Some(reuse) if concurrent >= reuse.concurrent as usize => ShouldAccept::No,
            Some(_) => ShouldAccept::Yes,
        }
    }

    fn on_request_start(
        &self,
        _store: StoreContextMut<'_, ComponentState>,
        waiting: oneshot::Sender<Failure>,
        _task: GuestTaskId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
        let timeout = self.caps.limits.timeout;
        // The epoch deadline counts from this request's start.
        self.deadline.restart(timeout);
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(waiting);
        match timeout {
            // A guest waiting on a future that never resolves: the epoch
            // deadline cannot fire, this does.
            Some(limit) => Box::pin(tokio::time::sleep(limit + EPOCH_TICK * 10)),
            None => Box::pin(std::future::pending()),
        }
    }

    fn drop(&self, store: Store<ComponentState>, result: wasmtime::Result<()>) {
        drop(store);
        let Err(err) = result else { return };
        let outcome = RunOutcome::from_result(Err(err), &self.caps.limits);
        outcome.report("http handler");
        let failure = Failure::of(&outcome);
        for waiting in self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = waiting.send(failure.clone());
        }
    }
}
