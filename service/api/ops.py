"""Operations routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.api.runtime import runtime
from service.api.v1 import json_response


def is_ready(app: FastAPI) -> bool:
    """Torch is loaded, the devices are probed, and the server is not draining."""
    return bool(getattr(app.state, "devices", None)) and not app.state.runtime.draining


def build_router() -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/healthz")
    async def healthz() -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    @router.get("/readyz", responses={503: {"description": "Starting or draining"}})
    async def readyz(request: Request) -> Response:
        """Readiness: torch is loaded, the devices are probed, not shutting down."""
        if not is_ready(request.app):
            status = "draining" if runtime(request).draining else "starting"
            return Response(
                b'{"status":"%s"}' % status.encode(), status_code=503,
                media_type="application/json", headers={"Retry-After": "1"},
            )  # fmt: skip
        return json_response({"status": "ready", "devices": request.app.state.devices})

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (text exposition format)."""
        # async: collected on the event loop, where the request counters change
        rt = runtime(request)
        rt.flush()  # the requests finished so far, not yet recorded
        registry = rt.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
