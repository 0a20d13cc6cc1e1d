//! A WASI 0.3 `wasi:http/handler`: every request gets `hello from WASI
//! 0.3` as text. corral's smallest 0.3 http guest (tests, benchmark).

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_future, wit_stream};

wasip3::http::service::export!(Hello);

struct Hello;

impl wasip3::exports::http::handler::Guest for Hello {
    async fn handle(_request: Request) -> Result<Response, ErrorCode> {
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
            .map_err(|_| ErrorCode::InternalError(None))?;
        let (mut body, contents) = wit_stream::new();
        let (trailers_tx, trailers) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(headers, Some(contents), trailers);
        drop(trailers_tx);
        wasip3::spawn_local(async move {
            body.write_all(b"hello from WASI 0.3\n".to_vec()).await;
        });
        Ok(response)
    }
}
