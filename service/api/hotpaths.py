"""The compute routes and liveness, dispatched without walking FastAPI's router.

``POST /v1/losses/{name}`` and ``POST /v2/models/{name}[/versions/{v}]/infer``
carry almost all traffic; FastAPI's route matching and dependency solving
cost more than a small loss evaluation, so this pure ASGI layer serves them
from the route table (``service.api.routes``) that the FastAPI routes are
built from too. Every other path goes on to FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import v1, v2  # noqa: F401  (they fill the route table)
from service.api.middleware import SENT_PATH
from service.api.problems import error_response, internal_error
from service.api.routes import COMPUTE_ROUTES, ComputeRoute, serve
from service.errors import ServiceError
from service.limits import remember


@dataclass(frozen=True)
class RouteLabel:
    """What the metrics and the log line read from ``scope["route"]``."""

    path: str


# v1 and v2 enter their handlers in the table when imported
HOT_PATHS = tuple((route, RouteLabel(route.path)) for route in COMPUTE_ROUTES)


Found = tuple[ComputeRoute, RouteLabel, dict[str, str]]
# paths seen, with their route: clients repeat their paths, and three regular
# expressions cost more than a lookup (bounded: a path is the client's choice)
_MATCHED: dict[str, Found] = {}
MATCHED_MAX = 1024


def match_compute(path: str) -> Found | None:
    """The compute route of a POST to ``path`` (one trailing slash dropped), its
    label and path parameters (shared: read them, never change them)."""
    found = _MATCHED.get(path)
    if found is not None:
        return found
    stripped = path[:-1] if len(path) > 1 and path[-1] == "/" else path
    for route, label in HOT_PATHS:
        params = route.match(stripped)
        if params is not None:
            remember(_MATCHED, path, (route, label, params), MATCHED_MAX)
            return route, label, params
    return None


HEALTHZ = RouteLabel("/healthz")
HEALTHZ_BODY = b'{"status":"ok"}'


class TrailingSlash:
    """``/v1/losses/cross_entropy/`` is ``/v1/losses/cross_entropy``: one
    trailing slash is dropped before routing, where Starlette answered a 307
    with an empty body (which most clients do not follow with a POST body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if len(path) > 1 and path[-1] == "/" and scope["type"] == "http":
            scope[SENT_PATH] = path  # what the log names, as the client sent it
            scope["path"] = path[:-1]
            raw = scope.get("raw_path")
            if raw and raw.endswith(b"/"):
                scope["raw_path"] = raw[:-1]
        await self.app(scope, receive, send)


class HotPathDispatch:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/healthz":
            # liveness answers in one step of the event loop, however busy it is
            scope["route"] = HEALTHZ
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"content-length", b"15"),
            ]})  # fmt: skip
            await send({"type": "http.response.body", "body": HEALTHZ_BODY})
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            found = match_compute(scope["path"])
            if found is not None:
                route, label, params = found
                scope["route"] = label
                scope["path_params"] = params
                await self._serve(scope, receive, send, route, params)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: ComputeRoute,
        params: dict[str, str],
    ) -> None:
        request = Request(scope, receive)
        try:
            response = await serve(route, request, params)
        except ServiceError as exc:
            response = error_response(request, exc)
        except Exception:
            response = internal_error(scope)
        await response(scope, receive, send)
