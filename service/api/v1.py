"""/v1: one POST route per loss (generated from the table), the alias route,
the catalog and batches."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache, partial
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response
from starlette.types import Scope

from service.api.problems import problem_body
from service.api.routes import ComputeRoute, Reading, Work, compute_route, serve
from service.api.runtime import (
    Admit,
    Body,
    RawResponse,
    Runtime,
    decompress,
    header,
    is_compressed,
    parse_bytes,
    parse_json,
    require_json,
)
from service.compute import Prepared, Timings
from service.config import Settings
from service.errors import FieldError, InvalidPayload, ServiceError
from service.losses import LOSSES, LossSpec, resolve
from service.losses.info import example_response, loss_info
from service.protocols.v1 import prepare_body, prepare_loss
from service.schemas import (
    BatchRequest,
    BatchResponse,
    LossInfo,
    LossList,
    LossResponse,
    Problem,
    request_model,
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": text, "content": {"application/problem+json": {}}}
    for status, text in {
        404: "Unknown loss",
        413: "Body or tensors over the limit",
        415: "Not JSON",
        422: "Invalid payload",
        503: "Overloaded or out of device memory (Retry-After)",
    }.items()
}


def json_response(content: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), media_type="application/json", headers=headers)


def _json_work(
    scope: Scope,
    body: Body,
    rt: Runtime,
    make: Callable[[Any, Settings, Timings], Prepared[bytes]],
) -> Work[bytes]:
    """A JSON compute body (its commas counted as it arrived, when it was
    large): parsed, then ``make`` the costed work; the answer carries its
    Server-Timing."""
    encoding = header(scope, b"content-encoding") or ""
    commas = scope["state"].get("body_commas")
    settings = rt.settings
    timings = Timings()

    def prepare(admit: Admit) -> Prepared[bytes]:
        payload = _parse_body(body, encoding, settings, timings, admit, commas)
        return make(payload, settings, timings)

    def respond(content: bytes) -> Response:
        scope["state"]["loss_stats"] = timings
        return RawResponse(content, b"application/json", [(b"server-timing", timings.header())])

    # by position: a class called with a keyword builds a dict of it
    return Work(prepare, respond, is_compressed(encoding))


@cache  # one per loss, not one per request
def loss_maker(spec: LossSpec) -> Callable[[Any, Settings, Timings], Prepared[bytes]]:
    """How a /v1 loss body becomes the costed work whose result is the response body."""
    return partial(prepare_body, spec)


def open_loss(scope: Scope, name: str) -> tuple[Reading, LossSpec]:
    """An unknown loss is a 404 and a body that is not JSON a 415, before the body is read."""
    spec = resolve(name)
    require_json(scope)
    return JSON_READING, spec


def loss_work(scope: Scope, body: Body, rt: Runtime, spec: LossSpec) -> Work[bytes]:
    return _json_work(scope, body, rt, loss_maker(spec))


JSON_READING = Reading(count_commas=True)
BY_NAME = compute_route("/v1/losses/{name}", open_loss, loss_work)


async def post_by_name(request: Request, name: str) -> Response:
    """Evaluate a loss named by its function or torch.nn class name (any case)."""
    return await serve(BY_NAME, request, {"name": name})


def open_batch(scope: Scope) -> tuple[Reading, None]:
    require_json(scope)
    return JSON_READING, None


def batch_work(scope: Scope, body: Body, rt: Runtime, _: None) -> Work[bytes]:
    return _json_work(scope, body, rt, _prepare_batch)


# The batch is served as a compute route is, but by FastAPI's router: it is
# not in the table, so neither the hot-path dispatch nor the connection layer
# takes it.
BATCH = ComputeRoute("/v1/batch", open_batch, batch_work)


def _parse_body(
    body: Body,
    encoding: str,
    settings: Settings,
    timings: Timings,
    admit: Admit,
    commas: int | None = None,
) -> Any:
    """The JSON of a request body, decompressed first when it says so; what
    decompressing and parsing hold is reserved in the memory budget first."""
    start = time.perf_counter()
    raw = decompress(body, encoding, settings.max_body_bytes, admit) if encoding else body
    admit(parse_bytes(raw, commas if raw is body else None), "parsing the request body")
    payload = parse_json(raw)
    timings.decode += time.perf_counter() - start
    return payload


def _loss_endpoint(spec: LossSpec) -> Any:
    async def endpoint(request: Request) -> Response:
        return await serve(BY_NAME, request, {"name": spec.name})

    endpoint.__name__ = f"post_{spec.name}"
    endpoint.__doc__ = f"Evaluate torch.nn.functional.{spec.name} (alias {spec.alias})."
    return endpoint


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["v1"])

    @router.get("/losses", response_model=LossList)
    def list_losses() -> Response:
        """List every loss with its arguments, options and a worked example."""
        return json_response({"losses": [loss_info(s) for s in LOSSES.values()]})

    @router.get("/losses/{name}", response_model=LossInfo, responses={404: ERROR_RESPONSES[404]})
    def describe_loss(name: str) -> Response:
        """Describe one loss (canonical name or torch.nn class name)."""
        return json_response(loss_info(resolve(name)))

    for spec in LOSSES.values():
        router.add_api_route(
            f"/losses/{spec.name}",
            _loss_endpoint(spec),
            methods=["POST"],
            response_model=LossResponse,
            responses=ERROR_RESPONSES,
            summary=f"{spec.name} ({spec.alias})",
            description=f"{spec.description}\n\nPer-element loss: `{spec.formula}`",
            operation_id=spec.name,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "$ref": f"#/components/schemas/{request_model(spec).__name__}"
                            },
                            "example": spec.example,
                        }
                    },
                }
            },
        )

    router.add_api_route(
        BY_NAME.path.removeprefix("/v1"), post_by_name, methods=["POST"], include_in_schema=False
    )

    @router.post(
        "/batch",
        response_model=BatchResponse,
        responses={k: v for k, v in ERROR_RESPONSES.items() if k != 404},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/BatchRequest"},
                        "example": BatchRequest.model_json_schema()["examples"][0],
                    }
                },
            }
        },
    )
    async def batch(request: Request) -> Response:
        """Evaluate many losses in one request; each item fails alone."""
        return await serve(BATCH, request, {})

    return router


def _prepare_batch(payload: Any, settings: Settings, timings: Timings) -> Prepared[bytes]:
    """Every item decoded, checked and costed (a bad item fails alone); the
    batch holds what all its items are predicted to hold."""
    items = payload.get("items") if isinstance(payload, dict) else None
    if not isinstance(items, list) or set(payload) != {"items"}:
        raise InvalidPayload(
            [FieldError(("body", "items"), 'expected {"items": [{"loss": "<name>", ...}, ...]}')]
        )
    prepared: list[Prepared[dict[str, Any]] | dict[str, Any]] = []
    for index, item in enumerate(items):
        loc: tuple[str | int, ...] = ("body", "items", index)
        try:
            if not isinstance(item, dict) or not isinstance(item.get("loss"), str):
                raise InvalidPayload(
                    [FieldError((*loc, "loss"), 'expected an object with a "loss" name')]
                )
            fields = {k: v for k, v in item.items() if k != "loss"}
            prepared.append(prepare_loss(resolve(item["loss"]), fields, settings, timings, loc))
        except ServiceError as exc:
            prepared.append({"error": problem_body(exc)})

    def finish() -> bytes:
        results: list[dict[str, Any]] = []
        for entry in prepared:
            if isinstance(entry, dict):
                results.append(entry)
                continue
            try:
                results.append(entry.finish())
            except ServiceError as exc:
                results.append({"error": problem_body(exc)})
        start = time.perf_counter()
        content = orjson.dumps({"results": results})
        timings.encode += time.perf_counter() - start
        return content

    memory = sum(p.memory_bytes for p in prepared if not isinstance(p, dict))
    return Prepared(memory, finish)


def register_models(app: FastAPI) -> None:
    """Put the per-loss request models into the OpenAPI components."""
    from pydantic.json_schema import models_json_schema

    from service.api.openapi import finish_document

    models = [request_model(s) for s in LOSSES.values()] + [BatchRequest]
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        _, defs = models_json_schema(
            [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for spec in LOSSES.values():
            op = schema["paths"][f"/v1/losses/{spec.name}"]["post"]
            op["responses"]["200"]["content"]["application/json"]["example"] = example_response(
                spec
            )
        schema = finish_document(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
