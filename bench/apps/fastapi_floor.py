"""The floor of any FastAPI route: read the body, return a constant.

Run: ``uvicorn bench.apps.fastapi_floor:app --no-access-log``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

BODY = b'{"value":0.0}'

app = FastAPI()


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@app.post("/v1/losses/cross_entropy")
async def cross_entropy(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json")
