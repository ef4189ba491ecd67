"""/v2 extensions beside inference: statistics (``/v2/models[/{m}[/versions/{v}]]/stats``),
the model repository (``/v2/repository/...``) and model configuration
(``/v2/models/{m}[/versions/{v}]/config``), as Triton serves them, so that
``tritonclient.http``'s get_inference_statistics, get_model_repository_index,
load_model, unload_model and get_model_config work unmodified.

Included before the model routes of ``service.api.v2``: ``/v2/models/stats``
is not a model named "stats".
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from service.api.runtime import read_body, runtime
from service.api.v1 import json_response
from service.api.v2 import ERROR_RESPONSES
from service.errors import BadRequest, quote
from service.protocols import oip_extensions
from service.protocols.oip import model

# The bodies these POST routes take are a few bytes of JSON.
MAX_BODY_BYTES = 64 * 1024

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: ERROR_RESPONSES[404]}
BAD: dict[int | str, dict[str, Any]] = {400: ERROR_RESPONSES[400], 413: ERROR_RESPONSES[413]}
NO_OP: dict[int | str, dict[str, Any]] = {
    200: {"description": "Done (a no-op: every loss is built in and loaded)", "content": {}},
    **BAD,
    **NOT_FOUND,
}


class Duration(BaseModel):
    count: int
    ns: int


class InferStatistics(BaseModel):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics
    batch_stats: list[Any]


class StatisticsResponse(BaseModel):
    model_stats: list[ModelStatistics]


class ModelIndex(BaseModel):
    name: str
    version: str
    state: str
    reason: str


async def json_body(request: Request, *allowed: str) -> dict[str, Any]:
    """An optional JSON object body (tritonclient sends none, or ``parameters``)."""
    body = bytes(await read_body(request, MAX_BODY_BYTES))
    if not body.strip():
        return {}
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON in the request body: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = set(payload) - set(allowed)
    if unknown:
        raise BadRequest(
            f"unknown field(s) {quote(sorted(unknown))}; expected {', '.join(allowed)}"
        )
    return payload


def parameters_of(payload: dict[str, Any]) -> dict[str, Any]:
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be a JSON object")
    return parameters


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

    # async: the counters change on the event loop, and are read there
    async def statistics(request: Request, name: str | None, version: str = "") -> Response:
        rt = runtime(request)
        rt.flush()  # the requests finished so far, not yet recorded
        spec = model(name, version) if name is not None else None
        return json_response(oip_extensions.statistics(rt.metrics.models, spec))

    @router.get("/models/stats", response_model=StatisticsResponse, name="server_statistics")
    async def server_statistics(request: Request) -> Response:
        """Inference statistics of every model (statistics extension)."""
        return await statistics(request, None)

    @router.get("/models/{name}/stats", response_model=StatisticsResponse, responses=NOT_FOUND)
    async def model_statistics(request: Request, name: str) -> Response:
        """Inference statistics of one model: counts and nanoseconds, by stage."""
        return await statistics(request, name)

    @router.get("/models/{name}/versions/{version}/stats", include_in_schema=False)
    async def model_statistics_version(request: Request, name: str, version: str) -> Response:
        return await statistics(request, name, version)

    @router.post("/repository/index", response_model=list[ModelIndex], responses=BAD)
    async def repository_index(request: Request) -> Response:
        """Every model in the repository: every loss, each READY."""
        ready = (await json_body(request, "ready", "repository_name")).get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequest(f"ready must be a boolean, got {quote(ready)}")
        return json_response(oip_extensions.repository_index(ready))

    @router.post("/repository/models/{name}/load", responses=NO_OP)
    async def repository_model_load(request: Request, name: str) -> Response:
        """Load a model: every loss is built in and loaded, so this only checks the name."""
        model(name)
        oip_extensions.check_load_parameters(parameters_of(await json_body(request, "parameters")))
        return json_response({})  # Triton sends no body; an empty object is the documented JSON

    @router.post("/repository/models/{name}/unload", responses=NO_OP)
    async def repository_model_unload(request: Request, name: str) -> Response:
        """Unload a model: a no-op (built-in losses stay loaded and ready)."""
        model(name)
        parameters_of(await json_body(request, "parameters"))
        return json_response({})

    @router.get("/models/{name}/config", responses=NOT_FOUND)
    def model_config(name: str) -> Response:
        """The model's configuration, Triton's form (model configuration extension)."""
        return json_response(oip_extensions.model_config(model(name)))

    @router.get("/models/{name}/versions/{version}/config", include_in_schema=False)
    def model_config_version(name: str, version: str) -> Response:
        return json_response(oip_extensions.model_config(model(name, version)))

    return router
