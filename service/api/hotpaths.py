"""The two compute routes and liveness, dispatched without walking FastAPI's router.

``POST /v1/losses/{name}`` and ``POST /v2/models/{name}/infer`` carry almost
all traffic; FastAPI's route matching and dependency solving cost more than a
small loss evaluation, so this pure ASGI layer serves them with the very
handlers the FastAPI routes use (which still declare them in the OpenAPI
document and serve them when this layer is not installed). Every other path
goes on to FastAPI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import v1, v2
from service.api.problems import error_response
from service.errors import ServiceError
from service.losses import resolve

log = logging.getLogger("service.errors")

Handler = Callable[[Request, str], Awaitable[Response]]


@dataclass(frozen=True)
class RouteLabel:
    """What the metrics and the log line read from ``scope["route"]``."""

    path: str


async def _v1(request: Request, name: str) -> Response:
    return await v1.serve_loss(request, resolve(name))


async def _v2(request: Request, name: str) -> Response:
    return await v2.serve_infer(request, resolve(name))


HOT_PATHS: tuple[tuple[re.Pattern[str], RouteLabel, Handler], ...] = (
    (re.compile(r"/v1/losses/([^/]+)"), RouteLabel("/v1/losses/{name}"), _v1),
    (re.compile(r"/v2/models/([^/]+)/infer"), RouteLabel("/v2/models/{name}/infer"), _v2),
)


HEALTHZ = RouteLabel("/healthz")
HEALTHZ_BODY = b'{"status":"ok"}'


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
            path = scope["path"]
            for pattern, label, handler in HOT_PATHS:
                match = pattern.fullmatch(path)
                if match:
                    name = match[1]
                    scope["route"] = label
                    scope["path_params"] = {"name": name}
                    await self._serve(scope, receive, send, handler, name)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, handler: Handler, name: str
    ) -> None:
        request = Request(scope, receive)
        try:
            response = await handler(request, name)
        except ServiceError as exc:
            response = error_response(request, exc)
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            response = error_response(request, ServiceError("internal error; it has been logged"))
        await response(scope, receive, send)
