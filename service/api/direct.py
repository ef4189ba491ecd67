"""Small compute requests answered by the connection itself, without ASGI.

Most calls are small: a batch of logits and labels, decoded and computed on
the event loop in tens of microseconds. Served as ASGI requests, each also
paid for uvicorn's request cycle (an asyncio task, an event, the receive and
send messages), Starlette's app call and the request middleware: more than
the loss itself, and more than the whole of a FastAPI route returning a
constant. So the connection layer (``service.api.connections``) hands a
request here when its whole body came in the same read as its headers, and
this module answers it in that same call, with exactly the bytes the ASGI
path would have written: the same compute steps (``service.api.routes``),
errors (``service.api.problems``), request id, metrics and log line
(``service.api.middleware``).

A request goes the ASGI way instead when anything about it needs the rest of
the stack: any method but POST, a path that is not a compute route, a
chunked, compressed or large body, one whose body arrives in later reads,
``Expect: 100-continue``, a CORS origin, a missing API key, a connection
whose client is not reading its responses, or a computation the runtime
would run in the worker pool (``serve_now`` declines it: the ASGI path then
decodes the body again, which costs little beside such a computation).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from service.api.hotpaths import RouteLabel, match_compute
from service.api.middleware import REQUEST_ID, HttpRecords, has_key, usable_request_id
from service.api.problems import error_reply, internal_error
from service.api.routes import ComputeRoute, serve_now
from service.api.runtime import HEADERS_KEY, RUNTIME_KEY, PiecesResponse, Runtime
from service.config import Settings
from service.errors import ServiceError

Headers = dict[bytes, bytes]


class DirectServer:
    """The compute routes as the connection layer calls them (one per app)."""

    def __init__(self, runtime: Runtime, records: HttpRecords, settings: Settings) -> None:
        self.runtime = runtime
        self.records = records
        self.max_body = settings.inline_max_body_bytes
        self.keys = [k.get_secret_value().encode() for k in settings.api_keys]
        self.cors = bool(settings.cors_origins)

    def route(
        self, path: str, headers: Headers
    ) -> tuple[ComputeRoute, RouteLabel, dict[str, str]] | None:
        """The compute route of a POST with these (lower-case) headers when it
        may be answered here, else None."""
        length = headers.get(b"content-length")
        if (
            length is None
            or not length.isdigit()
            or len(length) > 12
            or int(length) > self.max_body
            or b"transfer-encoding" in headers
            or headers.get(b"content-encoding", b"identity").strip().lower() != b"identity"
            or (self.cors and b"origin" in headers)
            or (self.keys and not has_key({HEADERS_KEY: headers}, self.keys))
        ):
            return None
        return match_compute(path)

    def answer(
        self,
        found: tuple[ComputeRoute, RouteLabel, dict[str, str]],
        path: str,
        raw_headers: list[tuple[bytes, bytes]],
        headers: Headers,
        body: bytes,
        keep_alive: bool,
        default_headers: list[tuple[bytes, bytes]],
    ) -> tuple[list[bytes | memoryview], bool] | None:
        """The response's bytes (head, then body pieces) and whether the
        connection stays open after it, or None where the request must go the
        ASGI way (nothing was recorded for it then)."""
        start = time.perf_counter()
        route, label, params = found
        scope: dict[str, Any] = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": raw_headers,
            "route": label,
            "path_params": params,
            "state": {"body_read": True},
            HEADERS_KEY: headers,
            RUNTIME_KEY: self.runtime,
        }
        try:
            response = serve_now(route, scope, body, self.runtime, params)
        except ServiceError as exc:
            response = error_reply(scope, exc)
        except Exception:
            response = internal_error(scope)
        if response is None:
            return None
        self.records.stats.direct += 1
        request_id = usable_request_id(headers.get(REQUEST_ID))
        out, keep_alive = _write(response, request_id, keep_alive, default_headers)
        sent = len(out[1]) if len(out) == 2 else sum(map(len, out[1:]))
        state = {"status": response.status_code, "in": len(body), "out": sent}
        self.records.add(scope, state, request_id, time.perf_counter() - start, time.time())
        return out, keep_alive


# (status, uvicorn's default headers) -> the status line and those headers:
# uvicorn renews its list (the date) once a second
_HEADS: dict[int, tuple[list[tuple[bytes, bytes]], bytes]] = {}


def _head(status: int, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    cached = _HEADS.get(status)
    if cached is not None and cached[0] is default_headers:
        return cached[1]
    head = STATUS_LINE[status] + b"".join(b"%s: %s\r\n" % pair for pair in default_headers)
    _HEADS[status] = (default_headers, head)
    return head


def _write(
    response: Response,
    request_id: bytes,
    keep_alive: bool,
    default_headers: list[tuple[bytes, bytes]],
) -> tuple[list[bytes | memoryview], bool]:
    """The status line and headers as uvicorn writes them (its default
    headers first, the request id last, as the request middleware adds it),
    then the body's pieces; and whether the connection stays open."""
    head = [_head(response.status_code, default_headers)]
    close = False
    for name, value in response.raw_headers:
        head += (name, b": ", value, b"\r\n")
        if name == b"connection" and b"close" in value.lower():
            close = True
    head += (REQUEST_ID, b": ", request_id, b"\r\n")
    if not keep_alive and not close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    pieces: list[bytes | memoryview] = (
        list(response.pieces) if isinstance(response, PiecesResponse) else [response.body]
    )
    return [b"".join(head), *pieces], keep_alive and not close


def direct_server(app: Any) -> DirectServer | None:
    """The app's DirectServer, where the app has one (``create_app`` with the
    hot-path dispatch), through uvicorn's proxy-headers wrapper (nothing on
    the compute path reads the client's address)."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    while isinstance(app, ProxyHeadersMiddleware):
        app = app.app
    state = getattr(app, "state", None)
    server = getattr(state, "direct", None)
    return server if isinstance(server, DirectServer) else None
