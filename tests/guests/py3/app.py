"""A WASI 0.3 `wasi:http/handler` in Python, built with componentize-py as a
user of Spin's Python SDK 5 would build one (see build.sh): every request
gets `hello from Python on WASI 0.3`. It imports wasi:cli, wasi:filesystem
and wasi:sockets 0.3 besides wasi:http, as such handlers do."""

import componentize_py_async_support
import wit_world
from wit_world import exports
from wit_world.imports.wasi_http_types import Fields, Request, Response
from componentize_py_types import Ok


class Handler(exports.Handler):
    async def handle(self, request: Request) -> Response:
        tx, rx = wit_world.byte_stream()
        trailers_tx, trailers_rx = wit_world.result_option_wasi_http_types_fields_wasi_http_types_error_code_future(lambda: Ok(None))
        response, _ = Response.new(Fields.from_list([("content-type", b"text/plain")]), rx, trailers_rx)

        async def body():
            with tx:
                await tx.write_all(b"hello from Python on WASI 0.3\n")

        componentize_py_async_support.spawn(body())
        return response
