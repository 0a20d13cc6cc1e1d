//! Arbitrary bytes as a client's side of an API connection: hyper's HTTP/1
//! server (configured as the API configures it) parses them and every
//! request goes through the API's router and body check (the same file as
//! corrald's, `supervisor/src/api/route.rs`). Nothing may panic, every
//! answer must be an HTTP/1.1 response, and a refusal must be a 4xx with
//! the API's JSON error. The same bytes also go to `route` and
//! `check_body` directly (method, NUL, path, NUL, body).
#![no_main]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[path = "../../supervisor/src/api/route.rs"]
#[allow(
    dead_code,
    unreachable_pub,
    reason = "the fuzz target uses part of the module"
)]
mod route;

/// The API's limit on a request head (`api::MAX_HEAD`).
const MAX_HEAD: usize = 16 * 1024;

fn check_error(e: &route::ApiError) {
    assert!((400..500).contains(&e.status), "{e:?}");
    let body: serde_json::Value = serde_json::from_str(&e.body()).expect("error JSON");
    assert_eq!(body["error"], e.code);
}

async fn answer(req: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let outcome = match route::route(req.method().as_str(), req.uri().path()) {
        Err(e) => Err(e),
        Ok(routed) => {
            let (method, template) = routed.endpoint();
            assert!(method == req.method().as_str() || req.method() == "HEAD");
            assert!(template.starts_with('/'));
            match Limited::new(req.into_body(), route::MAX_BODY)
                .collect()
                .await
            {
                Ok(body) => route::check_body(&body.to_bytes()),
                Err(_) => Err(route::ApiError::too_large()),
            }
        }
    };
    let response = match outcome {
        Ok(()) => hyper::Response::new(Full::new(Bytes::new())),
        Err(e) => {
            check_error(&e);
            let mut r = hyper::Response::new(Full::new(Bytes::from(e.body())));
            *r.status_mut() = hyper::StatusCode::from_u16(e.status).expect("a valid status");
            r
        }
    };
    Ok(response)
}

fn connection(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let serve = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .serve_connection(
                hyper_util::rt::TokioIo::new(server),
                hyper::service::service_fn(answer),
            );
        let talk = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(serve, talk);
        if !out.is_empty() {
            assert!(
                out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
                "{:?}",
                String::from_utf8_lossy(&out)
            );
        }
    });
}

fn direct(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let method = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();
    match route::route(&method, &path) {
        Ok(routed) => {
            let (m, _) = routed.endpoint();
            assert!(m == method || method == "HEAD");
        }
        Err(e) => check_error(&e),
    }
    if let Err(e) = route::check_body(body) {
        check_error(&e);
    }
}

fuzz_target!(|data: &[u8]| {
    direct(data);
    connection(data);
});
