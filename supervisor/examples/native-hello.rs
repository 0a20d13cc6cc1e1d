//! A benchmark fixture, not part of corral: a native hyper server that
//! answers every request with `200 Hello from corral!\n` (text/plain), the
//! same answer as `tests/guests/http-hello.wasm`. `tests/bench/run` measures
//! it as the ceiling of scenario 1 (what an HTTP hello costs with no Wasm at
//! all). It runs a multi-threaded tokio runtime, one thread per CPU, as
//! `wasmtime serve` does.
//!
//! ```sh
//! cargo build --release -p corral-supervisor --example native-hello
//! target/release/examples/native-hello 127.0.0.1:8080
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use wasmtime_wasi_http::io::TokioIo;

const BODY: &[u8] = b"Hello from corral!\n";

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "text/plain")
                                .body(Full::new(Bytes::from_static(BODY)))
                                .expect("a valid response"),
                        )
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
