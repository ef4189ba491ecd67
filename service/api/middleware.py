"""Pure ASGI middleware (no BaseHTTPMiddleware: nothing is buffered or copied):
request ids, API keys, metrics and the per-request log line."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_body
from service.api.routes import COMPUTE_ROUTES
from service.api.runtime import RUNTIME_KEY, Runtime, scope_header
from service.errors import QUOTE_LIMIT, Unauthorized
from service.limits import remember
from service.logs import AccessLog
from service.losses.registry import LOSSES, canonical_name
from service.metrics import ModelCounters, Series, Timed

REQUEST_ID = b"x-request-id"
# How long a finished request may wait to be counted and logged (in a batch).
RECORD_DELAY = 0.01
# Methods counted under their own name; any other is "other", so a client
# cannot grow the metrics' series with made-up methods.
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/static-offline-docs",
              "/v2/health/", "/errors")  # fmt: skip


# Statuses whose log line says which path came, whatever route matched.
LOGGED_PATH_STATUSES = frozenset({301, 302, 307, 308, 404, 405})


# the path as the client sent it, where TrailingSlash (service.api.hotpaths)
# dropped its trailing slash before routing
SENT_PATH = "loss_service.sent_path"


def quote_path(scope: Scope) -> str:
    """The request's path as the log shows it, as the client sent it (before
    a trailing slash was dropped): at most QUOTE_LIMIT characters."""
    path = str(scope.get(SENT_PATH) or scope.get("path", ""))
    return path if len(path) <= QUOTE_LIMIT else f"{path[:QUOTE_LIMIT]}... ({len(path)} in all)"


class RequestIds:
    """New request ids: 32 hex digits, a random 64-bit prefix per process
    (drawn again in a forked child) and a counter, unique without a system
    call per request."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = os.urandom(8).hex().encode()
        self.count = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def next(self) -> bytes:
        return b"%s%016x" % (self.prefix, next(self.count) & 0xFFFFFFFFFFFFFFFF)


REQUEST_IDS = RequestIds()


def request_id_of(scope: Scope) -> bytes:
    """The request's X-Request-ID when it gave a usable one, else a new one."""
    return usable_request_id(scope_header(scope, REQUEST_ID))


def usable_request_id(given: bytes | None) -> bytes:
    """``given`` (an X-Request-ID header) when it is usable, else a new id."""
    if given and len(given) <= 200 and given.isascii() and given.decode().isprintable():
        return given
    return REQUEST_IDS.next()


def _labels(scope: Scope) -> tuple[str, str]:
    """The route template and the canonical loss name (bounded label values)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return "unmatched", ""
    name = scope.get("path_params", {}).get("name")
    if name is not None:
        return path, canonical_name(str(name)) or "unknown"
    last = path.rsplit("/", 1)[-1]
    return path, last if last in LOSSES else ""


class Records:
    """What finished requests (HTTP or gRPC) leave for the metrics and the log,
    recorded in batches at most ``RECORD_DELAY`` seconds after each finished
    (sooner when ``/metrics`` is scraped or the app shuts down): done per
    request, cold, that bookkeeping cost about as much as a small loss
    evaluation itself, and it came before the response went out; in a batch
    it runs warm, and the log lines go out in one ``write``. ``record`` takes
    the access log (None when off) and one item, and gives its log line."""

    def __init__(self, runtime: Runtime, record: Callable[..., bytes | None]) -> None:
        self.runtime = runtime
        self.record = record
        self.pending: list[tuple[Any, ...]] = []
        self.flush_on: asyncio.AbstractEventLoop | None = None  # where a flush is due
        runtime.flushers.append(self.flush)

    def add(self, *item: Any) -> None:
        self.pending.append(item)
        due = self.flush_on
        # requests finish on the loop that runs (Python 3.11's
        # get_running_loop makes a getpid system call: not per request)
        if due is None or not due.is_running():  # none due, or due on a loop that stopped
            loop = asyncio.get_running_loop()
            loop.call_later(RECORD_DELAY, self.flush)
            self.flush_on = loop

    def flush(self) -> None:
        """Record every finished request not yet recorded."""
        batch, self.pending, self.flush_on = self.pending, [], None
        access_log = self.runtime.access_log
        lines = [self.record(access_log, *item) for item in batch]
        if access_log is not None and lines:
            access_log.write(b"".join(line for line in lines if line is not None))


class HttpRecords(Records):
    """What finished HTTP requests leave for the metrics and the log: one item
    per request, from the request middleware or from the connection layer
    (``service.api.direct``), recorded in batches."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime, self._record)
        self.stats = runtime.metrics.requests
        self.models = runtime.metrics.models
        # the routes whose requests are inferences (the statistics extension)
        self.inference_routes = frozenset(r.path for r in COMPUTE_ROUTES)
        self.entries: dict[tuple[str | None, str | None, str, int], Entry] = {}

    def _record(
        self,
        access_log: AccessLog | None,
        scope: Scope,
        state: dict[str, Any],
        request_id: bytes,
        duration: float,
        now: float,
    ) -> bytes | None:
        method, status = scope["method"], state["status"]
        name = scope.get("path_params", _NONE).get("name")
        key = (getattr(scope.get("route"), "path", None), name, method, status)
        entry = self.entries.get(key) or self._entry(scope, key)
        series, counters, route, loss = entry
        series.observe(duration)
        stats = self.stats
        stats.body_in += state["in"]
        stats.body_out += state["out"]
        timings: Timed | None = scope["state"].get("loss_stats")
        if counters is not None:
            counters.record(status, duration, timings, now)
        if timings is not None:
            stats.tensor_in += timings.tensor_bytes_in
            stats.tensor_out += timings.tensor_bytes_out
        if access_log is None:
            return None
        device = timings.device if timings is not None else None
        # where the route template says nothing, the path: bounded (a client
        # chooses it) and quoted by the log format
        named = route == "unmatched" or status in LOGGED_PATH_STATUSES
        labels = (method, route, loss or None, status, device)
        return access_log.request(
            request_id, labels, duration, state["in"], state["out"], now,
            quote_path(scope) if named else None,
        )  # fmt: skip

    def _entry(self, scope: Scope, key: tuple[str | None, str | None, str, int]) -> Entry:
        """What a request of this route, path parameter, method and status
        is recorded under: its latency series, its loss's inference counters
        (an inference route), the route template and the canonical loss name;
        remembered when its name is a known loss's or absent (a client
        chooses the name)."""
        route, loss = _labels(scope)
        _, name, method, status = key
        series = self.stats.series_for(
            method if method in METHOD_LABELS else "other", route, loss, status
        )
        model = route in self.inference_routes and loss in LOSSES
        entry = (series, self.models.counters_for(loss) if model else None, route, loss)
        if name is None or loss in LOSSES:
            remember(self.entries, key, entry, ENTRIES_KEPT)
        return entry


# a request's series, inference counters (or None), route template and loss
Entry = tuple[Series, ModelCounters | None, str, str]
_NONE: dict[str, str] = {}
ENTRIES_KEPT = 1024


class ObservabilityMiddleware:
    """X-Request-ID, metrics by route/loss/status, and one log line per request
    (recorded in batches: ``HttpRecords``)."""

    def __init__(self, app: ASGIApp, records: HttpRecords) -> None:
        self.app = app
        self.records = records
        self.runtime = records.runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[RUNTIME_KEY] = self.runtime
        request_id = request_id_of(scope)
        state: dict[str, Any] = {"status": 500, "in": 0, "out": 0}
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        stats = self.records.stats
        stats.in_flight += 1
        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            stats.in_flight -= 1
            self.runtime.request_ended(scope)
            self.records.add(scope, state, request_id, time.perf_counter() - start, time.time())


def has_key(scope: Scope, keys: list[bytes]) -> bool:
    """Whether the request carries one of ``keys``: ``X-API-Key: <key>`` or
    ``Authorization: Bearer <key>``."""
    candidate = scope_header(scope, b"x-api-key")
    if candidate is None:
        auth = scope_header(scope, b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        candidate = token.strip() if scheme.lower() == b"bearer" else b""
    # compare with every key, in constant time per key
    matches = [hmac.compare_digest(candidate, key) for key in keys]
    return any(matches)


class APIKeyMiddleware:
    """With keys configured, every route but health, readiness and docs needs
    ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""

    def __init__(self, app: ASGIApp, keys: list[str], metrics_open: bool) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open = OPEN_PATHS + (("/metrics",) if metrics_open else ())

    def authorized(self, scope: Scope) -> bool:
        return has_key(scope, self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or path.startswith(self.open)
            or (path == "/" and scope["method"] in ("GET", "HEAD"))  # to the docs
            or self.authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        error = Unauthorized(
            "a valid API key is required: Authorization: Bearer <key> or X-API-Key"
        )
        if path.startswith("/v2"):
            body, media = orjson.dumps({"error": error.detail}), b"application/json"
        else:
            body, media = orjson.dumps(problem_body(error)), b"application/problem+json"
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", media), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="loss-service"'),
        ]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
