//! A wasi:http/proxy handler that makes one outbound request: it fetches
//! `http://` + the value of the request's `x-fetch` header (an authority
//! and path, e.g. `127.0.0.1:9000/x`) and answers
//! `200 fetched STATUS: BODY` on success, or `502 denied: ERROR-CODE` when
//! the host refused or failed the outgoing request.

use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};

struct Fetch;

wasi::http::proxy::export!(Fetch);

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(status).unwrap();
    let body = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().unwrap();
    stream.blocking_write_and_flush(text.as_bytes()).unwrap();
    drop(stream);
    OutgoingBody::finish(body, None).unwrap();
}

fn fetch(target: &str) -> Result<(u16, Vec<u8>), String> {
    let (authority, path) = match target.find('/') {
        Some(i) => (&target[..i], &target[i..]),
        None => (target, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&Scheme::Http)).unwrap();
    request.set_authority(Some(authority)).unwrap();
    request.set_path_with_query(Some(path)).unwrap();
    let body = request.body().unwrap();
    OutgoingBody::finish(body, None).unwrap();
    let future = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    future.subscribe().block();
    let response = future
        .get()
        .expect("ready after block")
        .expect("first get")
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let incoming = response.consume().unwrap();
    let mut bytes = Vec::new();
    {
        let stream = incoming.stream().unwrap();
        while let Ok(chunk) = stream.blocking_read(64 * 1024) {
            bytes.extend_from_slice(&chunk);
        }
    }
    Ok((status, bytes))
}

impl wasi::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let target = request
            .headers()
            .get(&"x-fetch".to_string())
            .first()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        drop(request);
        match fetch(&target) {
            Ok((status, body)) => respond(
                response_out,
                200,
                &format!("fetched {status}: {}", String::from_utf8_lossy(&body)),
            ),
            Err(e) => respond(response_out, 502, &format!("denied: {e}")),
        }
    }
}
