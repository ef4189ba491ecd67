"""Operations routes: liveness, readiness, version and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.responses import HTMLResponse, RedirectResponse, Response

from service import version_info
from service.api.problems import problems_page
from service.api.runtime import runtime
from service.api.v1 import json_response
from service.compute import available_devices

PROBLEMS_PAGE_HTML = problems_page()


class VersionInfo(BaseModel):
    """The service's name and version, and what it runs on (contract §12)."""

    name: str = Field(examples=["loss-service"])
    version: str = Field(examples=["0.1.0"])
    torch: str = Field(description="torch.__version__", examples=["2.13.0+cpu"])
    cuda: str | None = Field(
        description="torch.version.cuda: the CUDA torch was built with; null for a CPU build",
        examples=["12.8"],
    )
    devices: list[str] = Field(
        description="The devices this server computes on", examples=[["cpu", "cuda:0"]]
    )


def is_ready(app: FastAPI) -> bool:
    """Torch is loaded, the devices are probed, and the server is not draining."""
    return bool(getattr(app.state, "devices", None)) and not app.state.runtime.draining


def build_router() -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/", include_in_schema=False)
    async def root() -> Response:
        """The interactive documentation."""
        return RedirectResponse("/docs", status_code=302)

    @router.get("/errors", response_class=HTMLResponse)
    async def errors() -> Response:
        """The problem types of error responses, one anchor each (/errors#invalid-payload)."""
        return HTMLResponse(PROBLEMS_PAGE_HTML)

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

    @router.get("/version", response_model=VersionInfo)
    async def version(request: Request) -> Response:
        """The service, torch and CUDA versions, and the devices."""
        devices = request.app.state.devices or available_devices()  # probed at start-up
        return json_response(version_info(devices))

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (text exposition format)."""
        # async: collected on the event loop, where the request counters change
        rt = runtime(request)
        rt.flush()  # the requests finished so far, not yet recorded
        registry = rt.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
