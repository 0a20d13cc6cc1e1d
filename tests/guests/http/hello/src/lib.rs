//! A wasi:http/proxy handler that answers every request with
//! `200 Hello from corral!\n` (text/plain).

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasi::http::proxy::export!(Hello);

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain".to_vec(),
        )])
        .unwrap();
        let response = OutgoingResponse::new(headers);
        let body = response.body().unwrap();
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().unwrap();
        out.blocking_write_and_flush(b"Hello from corral!\n").unwrap();
        drop(out);
        OutgoingBody::finish(body, None).unwrap();
    }
}
