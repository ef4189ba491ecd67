"""Operations routes: liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.v1 import json_response
from service.compute import available_devices


def build_router() -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    @router.get("/readyz")
    def readyz(request: Request) -> Response:
        """Readiness: torch is loaded and the devices have been probed."""
        devices = getattr(request.app.state, "devices", None)
        if not devices:
            return Response(
                b'{"status":"starting"}',
                status_code=503,
                media_type="application/json",
                headers={"Retry-After": "1"},
            )
        return json_response({"status": "ready", "devices": devices})

    return router


def probe_devices() -> list[str]:
    return available_devices()
