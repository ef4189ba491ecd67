"""The compute routes: one table, and the two ways a compute request is served.

A compute route is two steps, written once per protocol (``service.api.v1``,
``service.api.v2``):

- ``open(scope, **path_params)``: what can be refused from the request line
  and headers alone (an unknown loss, a body that is not JSON), before any
  body byte is read; it says how to read the body (``Reading``) and what the
  next step needs;
- ``work(scope, body, runtime, opened)``: the body read, the ``Work``: how to
  decode, check and cost it (``prepare``), and how its result becomes the
  response (``respond``).

``serve`` runs them for an ASGI request: the body read as it arrives, the
computation on the event loop or in the worker pool as the runtime decides.
``serve_now`` runs them for a request whose small body is already in memory,
without an event-loop step: the connection layer
(``service.api.connections``) answers most compute requests that way, straight
from the bytes it parsed. The table is read by the hot-path dispatch
(``service.api.hotpaths``), by that connection layer, and by the FastAPI
routers, which declare the routes in the OpenAPI document (and serve them
where the dispatch is not installed: ``create_app(fast_dispatch=False)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from service.api.runtime import Admit, Body, Runtime, read_body, runtime
from service.compute import Prepared

T = TypeVar("T")


@dataclass(frozen=True)
class Reading:
    """How a compute route's body is read (``service.api.runtime.read_body``)."""

    align: int = 0  # where raw tensor bytes start (the v2 binary extension's JSON header)
    count_commas: bool = False  # a JSON body: its commas counted as it arrives


@dataclass(slots=True)  # one per request: a frozen dataclass costs more to make
class Work(Generic[T]):
    """A compute request with its body: decode, check and cost it, then answer."""

    prepare: Callable[[Admit], Prepared[T]]
    respond: Callable[[T], Response]
    compressed: bool = False  # the body has a Content-Encoding to undo


# (scope, **path params) -> how to read the body, and what ``work`` needs
Opener = Callable[..., tuple[Reading, Any]]
Worker = Callable[[Scope, Body, Runtime, Any], Work[Any]]


@dataclass(frozen=True)
class ComputeRoute:
    path: str  # a path template, as FastAPI writes it: /v2/models/{name}/infer
    open: Opener
    work: Worker
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(regex))

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.fullmatch(path)
        return found.groupdict() if found else None


async def serve(route: ComputeRoute, request: Request, params: dict[str, str]) -> Response:
    """An ASGI request on a compute route."""
    scope = request.scope
    reading, opened = route.open(scope, **params)
    rt = runtime(request)
    body = await read_body(
        request,
        rt.settings.max_body_bytes,
        align=reading.align,
        count_commas=reading.count_commas,
    )
    work = route.work(scope, body, rt, opened)
    result = await rt.evaluate(
        scope, work.prepare, wire_bytes=len(body), compressed=work.compressed
    )
    return work.respond(result)


def serve_now(
    route: ComputeRoute, scope: Scope, body: Body, rt: Runtime, params: dict[str, str]
) -> Response | None:
    """A request whose whole body is in memory, answered without an event-loop
    step, or None where the runtime would not run it on the event loop
    (a compressed or large body, or a computation predicted to hold more than
    the inline bound): the caller then serves it as an ASGI request. Errors
    raise, as in ``serve``."""
    if not rt.decodes_inline(len(body), compressed=False):
        return None
    _, opened = route.open(scope, **params)  # its checks; the body is read already
    work = route.work(scope, body, rt, opened)
    if work.compressed:
        return None
    prepared = work.prepare(rt.admit_inline)
    if not rt.computes_inline(prepared):
        return None  # decoded again on the ASGI path: rare, and its work dwarfs that
    return work.respond(prepared.finish())


COMPUTE_ROUTES: list[ComputeRoute] = []


def compute_route(path: str, open: Opener, work: Worker) -> ComputeRoute:
    """Enter a compute route in the table (``POST path``)."""
    entry = ComputeRoute(path, open, work)
    COMPUTE_ROUTES.append(entry)
    return entry
