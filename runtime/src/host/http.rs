//! Handling one HTTP request with a WASI 0.2 `wasi:http/proxy` component
//! (0.3 handlers: [`super::service`]) (the serve
//! loop that calls it is the worker's, `crate::worker`): the
//! component is pre-instantiated once; each request gets a fresh store and
//! instance (with the pooling allocator and copy-on-write memory images
//! this costs microseconds), its own limits and its own deadline.
//!
//! A guest that traps or hits a limit before it has sent its response
//! head gets the client a 500 (trap), 503 (memory/instance/table limit) or
//! 504 (timeout) with the reason as the body; the server stays up.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::p2::{self, ComponentState};
use super::{GuestCaps, LimitExceeded, RunOutcome};

/// A pre-instantiated http component, ready to handle requests: a WASI
/// 0.2 `wasi:http/incoming-handler` (here) or a WASI 0.3
/// `wasi:http/handler` ([`super::service`]).
#[derive(Clone, Debug)]
pub enum HttpHandler {
    Proxy(ProxyHandler),
    Service(super::service::ServiceHandler),
}

impl HttpHandler {
    /// Link and pre-instantiate `component`, a 0.2 or a 0.3 handler (told
    /// apart by its exports).
    pub fn new(engine: &Engine, component: &Component, caps: GuestCaps) -> anyhow::Result<Self> {
        Ok(match super::component_kind(engine, component) {
            Some(super::ComponentKind::HttpService) => HttpHandler::Service(
                super::service::ServiceHandler::new(engine, component, caps)?,
            ),
            _ => HttpHandler::Proxy(ProxyHandler::new(engine, component, caps)?),
        })
    }

    /// Handle one request.
    pub async fn handle(
        &self,
        req: hyper::Request<Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        match self {
            HttpHandler::Proxy(h) => h.handle(req).await,
            HttpHandler::Service(h) => h.handle(req).await,
        }
    }
}

/// A pre-instantiated WASI 0.2 http component.
#[derive(Clone)]
pub struct ProxyHandler {
    engine: Engine,
    pre: ProxyPre<ComponentState>,
    caps: Arc<GuestCaps>,
}

impl std::fmt::Debug for ProxyHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandler").finish_non_exhaustive()
    }
}

impl ProxyHandler {
    /// Link and pre-instantiate `component` (which must export
    /// `wasi:http/incoming-handler`).
    pub fn new(engine: &Engine, component: &Component, caps: GuestCaps) -> anyhow::Result<Self> {
        let linker = p2::linker(engine)?;
        let pre = ProxyPre::new(linker.instantiate_pre(component)?)?;
        Ok(ProxyHandler {
            engine: engine.clone(),
            pre,
            caps: Arc::new(caps),
        })
    }

    /// Handle one request in a fresh instance.
    pub async fn handle(
        &self,
        req: hyper::Request<Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        match self.try_handle(req).await {
            Ok(response) => response,
            Err(e) => {
                eprintln!("corral: cannot handle request: {e:#}");
                error_response(500, "corral: internal error\n".into())
            }
        }
    }

    async fn try_handle(
        &self,
        req: hyper::Request<Incoming>,
    ) -> anyhow::Result<hyper::Response<HyperOutgoingBody>> {
        let mut store = p2::new_store(&self.engine, &self.caps, false)?;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let pre = self.pre.clone();
        let limits = self.caps.limits;
        let guest = tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            };
            let result = match limits.timeout {
                // The epoch deadline stops a guest running code; this stops
                // one waiting in a host call.
                Some(limit) => tokio::time::timeout(limit + super::limits::EPOCH_TICK * 10, run)
                    .await
                    .unwrap_or_else(|_| Err(LimitExceeded::Timeout { limit }.into())),
                None => run.await,
            };
            RunOutcome::from_result(result.map(|()| 0), &limits)
        });

        match receiver.await {
            Ok(Ok(response)) => {
                // The body may still be streaming from the guest: report how
                // the guest ends without holding up the response.
                tokio::spawn(async move {
                    if let Ok(outcome) = guest.await {
                        outcome.report("http handler");
                    }
                });
                Ok(response)
            }
            Ok(Err(code)) => {
                let _ = guest.await;
                Ok(error_response(
                    500,
                    format!("corral: guest failed the request: {code:?}\n"),
                ))
            }
            Err(_) => {
                let outcome = guest.await?;
                outcome.report("http handler");
                Ok(match &outcome {
                    RunOutcome::Exited(_) => error_response(
                        500,
                        "corral: the guest returned without sending a response\n".into(),
                    ),
                    RunOutcome::Trapped(_) => error_response(500, "corral: guest trapped\n".into()),
                    RunOutcome::Limit(limit @ LimitExceeded::Timeout { .. }, _) => {
                        error_response(504, format!("{limit}\n"))
                    }
                    RunOutcome::Limit(limit, _) => error_response(503, format!("{limit}\n")),
                })
            }
        }
    }
}

pub(crate) fn error_response(status: u16, text: String) -> hyper::Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from(text))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut response = hyper::Response::new(body);
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response
}
