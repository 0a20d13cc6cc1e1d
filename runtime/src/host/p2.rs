//! Components: the store state shared by `wasi:cli/command` and
//! `wasi:http/proxy` guests, the linker (all of WASI 0.2 plus `wasi:http`),
//! the outbound-HTTP gate, and running a command component once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use corral_policy::ConnectTarget;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::limits::{Limiter, arm_deadline};
use super::{GuestCaps, RunOutcome};

/// The store data of a component guest.
pub struct ComponentState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundGate,
    limiter: Limiter,
}

impl std::fmt::Debug for ComponentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentState").finish_non_exhaustive()
    }
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// A store for one component run or request, limits and deadline armed.
pub fn new_store(
    engine: &Engine,
    caps: &GuestCaps,
    blocking: bool,
) -> anyhow::Result<Store<ComponentState>> {
    let state = ComponentState {
        wasi: caps.wasi_builder(blocking)?.build(),
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        hooks: OutboundGate {
            connect: Arc::new(caps.connect.clone()),
        },
        limiter: Limiter::new(&caps.limits),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    arm_deadline(&mut store, caps.limits.timeout);
    Ok(store)
}

/// A linker with every WASI 0.2 and 0.3 interface and `wasi:http` of
/// both. Component imports match semver-compatibly, so 0.2.0 and 0.2.9
/// imports in one component both link, and a component may import 0.2 and
/// 0.3 interfaces side by side (Rust's std on wasm32-wasip2 does its stdio
/// through 0.2 in a 0.3 program).
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<ComponentState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    wasmtime_wasi::p3::add_to_linker(&mut linker)?;
    wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
    Ok(linker)
}

/// Run a `wasi:cli/command` component (WASI 0.2 or 0.3) once: exit code 0
/// when `run` returns ok, 1 when it returns an error, else what it passed
/// to exit.
pub async fn run_command(
    engine: &Engine,
    linker: &Linker<ComponentState>,
    component: &Component,
    caps: &GuestCaps,
    blocking: bool,
) -> anyhow::Result<RunOutcome> {
    let mut store = new_store(engine, caps, blocking)?;
    let code = if super::component_kind(engine, component) == Some(super::ComponentKind::Command3) {
        let command = match wasmtime_wasi::p3::bindings::Command::instantiate_async(
            &mut store, component, linker,
        )
        .await
        {
            Ok(command) => command,
            Err(err) => return super::p1::instantiate_failure(err, caps),
        };
        // A 0.3 guest is async: its tasks run in the store's event loop,
        // and `run` may finish while tasks it spawned (writing stdout)
        // still run; they end with the store.
        let call = store
            .run_concurrent(async move |accessor| command.wasi_cli_run().call_run(accessor).await);
        super::limits::with_backstop(caps.limits.timeout, async {
            call.await?.map(|r| if r.is_ok() { 0 } else { 1 })
        })
        .await
    } else {
        let command = match wasmtime_wasi::p2::bindings::Command::instantiate_async(
            &mut store, component, linker,
        )
        .await
        {
            Ok(command) => command,
            Err(err) => return super::p1::instantiate_failure(err, caps),
        };
        let call = command.wasi_cli_run().call_run(&mut store);
        super::limits::with_backstop(caps.limits.timeout, call)
            .await
            .map(|r| if r.is_ok() { 0 } else { 1 })
    };
    Ok(RunOutcome::from_result(code, &caps.limits))
}

/// The `wasi:http/outgoing-handler` gate: a request goes out only when its
/// authority is granted by `network.connect`; others fail with
/// `HTTP-request-denied` before any connection is made.
#[derive(Debug, Clone)]
pub struct OutboundGate {
    connect: Arc<Vec<ConnectTarget>>,
}

impl OutboundGate {
    /// Whether a request to `uri` may be sent.
    pub fn allows(&self, uri: &hyper::Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        let port = authority.port_u16().unwrap_or_else(|| {
            if uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            }
        });
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match host.parse::<IpAddr>() {
            Ok(ip) => self
                .connect
                .iter()
                .any(|t| t.allows(SocketAddr::new(ip, port), None)),
            // By name: only entries given by that name match (the address
            // is a placeholder that no address entry can equal).
            Err(_) => self.connect.iter().any(|t| {
                t.allows(
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                    Some(host),
                )
            }),
        }
    }
}

impl WasiHttpHooks for OutboundGate {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        hyper::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        if !self.allows(request.uri()) {
            let uri = request.uri().to_string();
            return Box::new(async move {
                tracing::info!(%uri, "outgoing HTTP request denied: not in network.connect");
                Err(wasmtime_wasi_http::Error::HttpRequestDenied)
            });
        }
        let _ = fut;
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_http_only_to_granted_authorities() {
        let app = crate::host::tests::app(
            "network = { connect = [\"127.0.0.1:8080\", \"api.example.com:443\", \"[::1]:9000\"] }\n",
        );
        let gate = OutboundGate {
            connect: Arc::new(app.network.connect.clone()),
        };
        let allows = |uri: &str| gate.allows(&uri.parse().unwrap());
        assert!(allows("http://127.0.0.1:8080/x"));
        assert!(!allows("http://127.0.0.1:8081/x"));
        assert!(!allows("http://127.0.0.1/x"), "port 80 is not granted");
        assert!(
            allows("https://api.example.com/v1"),
            "https defaults to 443"
        );
        assert!(allows("https://API.Example.com:443/"));
        assert!(!allows("http://api.example.com/"), "port 80 is not granted");
        assert!(!allows("https://evil.example.com/"));
        assert!(allows("http://[::1]:9000/"));
        assert!(!allows("/no-authority"));
    }
}
