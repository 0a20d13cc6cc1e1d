//! A WASI 0.3 `wasi:http/handler` that misbehaves on request, for corral's
//! tests of limits, streaming and reuse:
//!
//! - `GET /`: `probe`
//! - `POST /echo`: the request body streamed back as it arrives, the
//!   request's trailers as the response's trailers (declared in the
//!   response's `trailer` header as the request declared them)
//! - `GET /stream?n=K`: K lines, 20 ms apart (a body still streaming after
//!   `handle` returned)
//! - `GET /count`: how many requests this instance has handled (1 unless
//!   `pool.reuse` shares instances)
//! - `GET /spin`: a busy loop; `GET /hang`: awaits a future nobody writes
//! - `GET /grow?mb=N`: allocates N MiB, then answers; `GET /trap`: traps
//! - `GET /fetch?authority=HOST:PORT`: a GET through `wasi:http/client`,
//!   answered with the status and body it got (or the error code)
//! - anything else: described as the 0.2 `http-echo` guest does (method
//!   and path, headers, then the request body read to its end)

use std::sync::atomic::{AtomicU32, Ordering};

use wasip3::http::types::{ErrorCode, Fields, Method, Request, Response, Scheme};
use wasip3::wit_bindgen::StreamResult;
use wasip3::{wit_future, wit_stream};

wasip3::http::service::export!(Probe);

struct Probe;

static HANDLED: AtomicU32 = AtomicU32::new(0);

fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    let (_, q) = path.split_once('?')?;
    q.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

fn respond(status: u16, body: Vec<u8>) -> Result<Response, ErrorCode> {
    let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
        .map_err(|_| ErrorCode::InternalError(None))?;
    let (mut tx, contents) = wit_stream::new();
    let (trailers_tx, trailers) = wit_future::new(|| Ok(None));
    let (response, _) = Response::new(headers, Some(contents), trailers);
    drop(trailers_tx);
    response
        .set_status_code(status)
        .map_err(|_| ErrorCode::InternalError(None))?;
    wasip3::spawn_local(async move {
        tx.write_all(body).await;
    });
    Ok(response)
}

impl wasip3::exports::http::handler::Guest for Probe {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let handled = HANDLED.fetch_add(1, Ordering::SeqCst) + 1;
        let path = request.get_path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or("");
        match (request.get_method(), route) {
            (Method::Get, "/") => respond(200, b"probe\n".to_vec()),
            (Method::Get, "/count") => respond(200, format!("{handled}\n").into_bytes()),
            (Method::Post, "/echo") => {
                // HTTP/1.1 sends only the trailers a response declares.
                let declared: Vec<(String, Vec<u8>)> = request
                    .get_headers()
                    .get("trailer")
                    .into_iter()
                    .map(|v| ("trailer".to_string(), v))
                    .collect();
                let headers =
                    Fields::from_list(&declared).map_err(|_| ErrorCode::InternalError(None))?;
                let (done_tx, done) = wit_future::new(|| Ok(()));
                drop(done_tx);
                let (mut body_in, trailers_in) = Request::consume_body(request, done);
                let (mut body_out, contents) = wit_stream::new();
                let (trailers_out, trailers) = wit_future::new(|| Ok(None));
                let (response, _) = Response::new(headers, Some(contents), trailers);
                wasip3::spawn_local(async move {
                    let mut buf = Vec::with_capacity(16 * 1024);
                    loop {
                        let (result, data) = body_in.read(buf).await;
                        match result {
                            StreamResult::Complete(_) => {
                                let rest = body_out.write_all(data).await;
                                assert!(rest.is_empty(), "the client went away");
                                buf = Vec::with_capacity(16 * 1024);
                            }
                            StreamResult::Dropped | StreamResult::Cancelled => break,
                        }
                    }
                    drop(body_out);
                    let trailers = trailers_in.await;
                    let _ = trailers_out.write(trailers).await;
                });
                Ok(response)
            }
            (Method::Get, "/stream") => {
                let n: u32 = query(&path, "n").and_then(|n| n.parse().ok()).unwrap_or(5);
                let (mut tx, contents) = wit_stream::new();
                let (trailers_tx, trailers) = wit_future::new(|| Ok(None));
                let (response, _) = Response::new(Fields::new(), Some(contents), trailers);
                drop(trailers_tx);
                wasip3::spawn_local(async move {
                    for i in 0..n {
                        tx.write_all(format!("line {i}\n").into_bytes()).await;
                        wasip3::clocks::monotonic_clock::wait_for(20_000_000).await;
                    }
                });
                Ok(response)
            }
            (Method::Get, "/spin") => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            (Method::Get, "/hang") => {
                let (_never_written, never) = wit_future::new::<Result<(), ErrorCode>>(|| Ok(()));
                let n = never.await;
                respond(200, format!("unreachable {n:?}\n").into_bytes())
            }
            (Method::Get, "/grow") => {
                let mb: usize = query(&path, "mb").and_then(|n| n.parse().ok()).unwrap_or(1);
                let v = vec![1u8; mb << 20];
                let sum: u64 = std::hint::black_box(&v).iter().step_by(4096).map(|&b| u64::from(b)).sum();
                respond(200, format!("grew {mb} MiB ({sum})\n").into_bytes())
            }
            (Method::Get, "/trap") => core::arch::wasm32::unreachable(),
            (Method::Get, "/fetch") => {
                let authority = query(&path, "authority").unwrap_or("127.0.0.1:1").to_string();
                let (trailers_tx, trailers) = wit_future::new(|| Ok(None));
                drop(trailers_tx);
                let (outgoing, _) = Request::new(Fields::new(), None, trailers, None);
                let _ = outgoing.set_scheme(Some(&Scheme::Http));
                let _ = outgoing.set_authority(Some(&authority));
                let _ = outgoing.set_path_with_query(Some("/"));
                match wasip3::http::client::send(outgoing).await {
                    Ok(answer) => {
                        let status = answer.get_status_code();
                        let (done_tx, done) = wit_future::new(|| Ok(()));
                        drop(done_tx);
                        let (body, _trailers) = Response::consume_body(answer, done);
                        let body = body.collect().await;
                        let mut text = format!("{status} ").into_bytes();
                        text.extend(body);
                        respond(200, text)
                    }
                    Err(code) => respond(502, format!("error: {code:?}\n").into_bytes()),
                }
            }
            (method, _) => {
                // Anything else is described, as the 0.2 http-echo guest
                // does (the serve-parity checks read it): `METHOD PATH\n`,
                // the headers, `\n`, then the whole request body (read
                // before the response starts).
                let mut text = format!("{} {path}\n", method_name(&method));
                for (name, value) in request.get_headers().copy_all() {
                    text.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(&value)));
                }
                text.push('\n');
                let mut bytes = text.into_bytes();
                let (done_tx, done) = wit_future::new(|| Ok(()));
                drop(done_tx);
                let (body, _trailers) = Request::consume_body(request, done);
                bytes.extend(body.collect().await);
                respond(200, bytes)
            }
        }
    }
}
