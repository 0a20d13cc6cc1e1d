//! A wasi:http/proxy handler that describes the request it got: the body
//! is `METHOD PATH_WITH_QUERY\n`, then one `name: value\n` line per request
//! header (in the order received), then `\n` and the request body.
//! The response also carries `x-echo-method` and status 200.
//!
//! Two paths misbehave on purpose, for the host's tests: `/trap` traps
//! (a panic, which aborts: `unreachable`), `/spin` loops forever without
//! calling the host (only the epoch deadline can stop it).

use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse,
    ResponseOutparam,
};

struct Echo;

wasi::http::proxy::export!(Echo);

fn method_name(m: &Method) -> String {
    match m {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(s) => s.clone(),
    }
}

impl wasi::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        match request.path_with_query().as_deref() {
            Some("/trap") => panic!("the guest was asked to trap"),
            Some("/spin") => {
                #[allow(clippy::empty_loop, reason = "spinning is the point: only the epoch deadline stops it")]
                loop {}
            }
            _ => {}
        }
        let method = method_name(&request.method());
        let mut text = format!(
            "{} {}\n",
            method,
            request.path_with_query().unwrap_or_default()
        );
        for (name, value) in request.headers().entries() {
            text.push_str(&name);
            text.push_str(": ");
            text.push_str(&String::from_utf8_lossy(&value));
            text.push('\n');
        }
        text.push('\n');
        let mut bytes = text.into_bytes();

        let incoming = request.consume().unwrap();
        {
            let stream = incoming.stream().unwrap();
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(chunk) => bytes.extend_from_slice(&chunk),
                    Err(_) => break,
                }
            }
        }
        IncomingBody::finish(incoming);

        let headers = Fields::from_list(&[(
            "x-echo-method".to_string(),
            method.into_bytes(),
        )])
        .unwrap();
        let response = OutgoingResponse::new(headers);
        let body = response.body().unwrap();
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().unwrap();
        for chunk in bytes.chunks(4096) {
            out.blocking_write_and_flush(chunk).unwrap();
        }
        drop(out);
        OutgoingBody::finish(body, None).unwrap();
    }
}
