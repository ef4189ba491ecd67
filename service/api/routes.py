"""The compute routes: one table, read by the fast dispatch
(``service.api.hotpaths``, which serves them in production) and by the
FastAPI routers (which declare them in the OpenAPI document, and serve them
where the dispatch is not installed: ``create_app(fast_dispatch=False)``)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.responses import Response

# A compute route's handler: the request and its path parameters by name.
Handler = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class ComputeRoute:
    path: str  # a path template, as FastAPI writes it: /v2/models/{name}/infer
    serve: Handler
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(regex))

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.fullmatch(path)
        return found.groupdict() if found else None


COMPUTE_ROUTES: list[ComputeRoute] = []


def compute_route(path: str) -> Callable[[Handler], Handler]:
    """Enter a handler in the table (``POST path``)."""

    def register(serve: Handler) -> Handler:
        COMPUTE_ROUTES.append(ComputeRoute(path, serve))
        return serve

    return register


def route(path: str) -> ComputeRoute:
    return next(r for r in COMPUTE_ROUTES if r.path == path)
