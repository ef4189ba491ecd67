"""/v2: the Open Inference Protocol (KServe v2) with the binary tensor data
extension, where every loss of the table is a model.

Inputs are named after the torch arguments, options travel as request
``parameters`` and the outputs are ``loss`` and ``grad_<arg>``. A request body
is either all JSON, or (binary extension) a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian
bytes of each binary input in input order; responses are framed the same way.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.types import Scope

from service import __version__
from service.api.ops import is_ready
from service.api.routes import Reading, Work, compute_route, serve
from service.api.runtime import (
    Admit,
    PiecesResponse,
    RawResponse,
    Runtime,
    decompress,
    header,
    is_compressed,
    parse_bytes,
    runtime,
    scope_header,
)
from service.api.v1 import json_response
from service.compute import Prepared, Timings, prepare
from service.config import Settings
from service.losses import LossSpec, resolve
from service.protocols import oip_extensions
from service.protocols.oip import ACCEPTED, loss_call, model, model_metadata
from service.protocols.oip_json import (
    HEADER_LENGTH,
    Body,
    encode_response,
    parse_infer,
    split_body,
)
from service.shm import Regions
from service.tensors import ElementBudget

HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # as in ASGI headers
EXTENSIONS = ["binary_tensor_data", "parameters", *oip_extensions.EXTENSIONS]

# --------------------------------------------------------------------------- models (OpenAPI)


class MetadataTensor(BaseModel):
    name: str
    datatype: str = Field(description="OIP datatype accepted by default")
    shape: list[int] = Field(description="-1 for a variable dimension")
    parameters: dict[str, Any] | None = Field(
        None, description="the torch shape in words, whether it is required, its role"
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    name: str = Field(description="a torch argument name: input, target, weight, ...")
    shape: list[int]
    datatype: str = Field(description=", ".join(ACCEPTED))
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data_size": n} when the bytes follow the JSON header'
    )
    data: list[Any] | None = Field(None, description="row-major values, flat or nested")


class RequestOutput(BaseModel):
    name: str = Field(description="loss or grad_<argument>")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true}')


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description="the loss's options (reduction, ignore_index, ...), device, grad "
        "(true, or argument names) and binary_data_output",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description='{"device": "cpu"}: where the loss was computed'
    )
    outputs: list[ResponseOutput]


class V2Error(BaseModel):
    error: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": text}
    for status, text in {
        400: "Malformed request or binary framing",
        404: "Unknown model",
        413: "Body or tensors over the limit",
        415: "Unsupported Content-Encoding",
        422: "Inputs or parameters the loss cannot take",
        503: "Overloaded or out of device memory (Retry-After)",
    }.items()
}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined (for an OpenAPI request body)."""
    defs: dict[str, Any] = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


INFER_EXAMPLE: dict[str, Any] = {
    "id": "42",
    "parameters": {"reduction": "mean", "grad": True},
    "inputs": [
        {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [2, 1, 1, 2]},
        {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, 0]},
    ],
}


# --------------------------------------------------------------------------- compute


def prepare_infer(
    spec: LossSpec,
    body: Body,
    header_length: str | None,
    content_encoding: str,
    settings: Settings,
    timings: Timings,
    admit: Admit,
    regions: Regions | None = None,
    commas: int | None = None,
) -> Prepared[tuple[list[bytes | memoryview], int | None]]:
    """One inference request body, decoded, checked and costed; ``finish()``
    gives the response body and its JSON header's length (when binary data
    follows). ``commas``: the body's, counted as it arrived (all JSON)."""
    start = time.perf_counter()
    raw = (
        decompress(body, content_encoding, settings.max_body_bytes, admit)
        if content_encoding
        else body
    )
    header, binary = split_body(raw, header_length)
    counted = commas if raw is body and header_length is None else None
    admit(parse_bytes(header, counted), "parsing the inference request")
    request = parse_infer(spec, header, binary, ElementBudget.for_request(settings), regions)
    call = loss_call(request)
    timings.decode += time.perf_counter() - start
    return prepare(call, settings, timings, partial(encode_response, request))


# --------------------------------------------------------------------------- routes


def open_infer(scope: Scope, spec: LossSpec) -> tuple[Reading, LossSpec]:
    """An inference request's body: raw tensor bytes, when announced, start
    where the JSON header ends; an all-JSON body has its commas counted as it
    arrives, as /v1's."""
    declared = scope_header(scope, HEADER_LENGTH_KEY)
    if declared is None:
        return JSON_READING, spec
    align = (  # ASCII digits only: "²" is a digit too, and int() refuses it
        int(declared) if declared.isascii() and declared.isdigit() and len(declared) < 19 else 0
    )
    return Reading(align=align), spec


JSON_READING = Reading(count_commas=True)  # made once: most bodies are all JSON


Reply = tuple[list[bytes | memoryview], int | None]


def infer_work(scope: Scope, body: Body, rt: Runtime, spec: LossSpec) -> Work[Reply]:
    declared = header(scope, HEADER_LENGTH_KEY)
    encoding = header(scope, b"content-encoding") or ""
    commas = scope["state"].get("body_commas")
    timings = Timings()

    def prepare(admit: Admit) -> Prepared[Reply]:
        return prepare_infer(
            spec, body, declared, encoding, rt.settings, timings, admit, rt.regions, commas
        )

    def respond(reply: Reply) -> Response:
        pieces, length = reply
        scope["state"]["loss_stats"] = timings
        headers = [(b"server-timing", timings.header())]
        if length is None:
            return RawResponse(pieces[0], b"application/json", headers)
        headers.append((HEADER_LENGTH_KEY, b"%d" % length))
        return PiecesResponse(pieces, b"application/octet-stream", headers)

    # by position: a dataclass made with a keyword costs more (a dict of it)
    return Work(prepare, respond, is_compressed(encoding))


def open_model(scope: Scope, name: str) -> tuple[Reading, LossSpec]:
    return open_infer(scope, resolve(name))


def open_model_version(scope: Scope, name: str, version: str) -> tuple[Reading, LossSpec]:
    return open_infer(scope, model(name, version))


INFER = compute_route("/v2/models/{name}/infer", open_model, infer_work)
INFER_VERSION = compute_route(
    "/v2/models/{name}/versions/{version}/infer", open_model_version, infer_work
)


async def model_infer(request: Request, name: str) -> Response:
    """Evaluate the loss: JSON or binary tensor data in, the same out."""
    return await serve(INFER, request, {"name": name})


async def model_infer_version(request: Request, name: str, version: str) -> Response:
    return await serve(INFER_VERSION, request, {"name": name, "version": version})


def model_readiness(request: Request, spec: LossSpec) -> Response:
    """A model is ready when the server is: 503 while starting or draining."""
    if not is_ready(request.app):
        return Response(
            orjson.dumps({"name": spec.name, "ready": False}),
            status_code=503,
            media_type="application/json",
            headers={"Retry-After": "1"},
        )
    return json_response({"name": spec.name, "ready": True})


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

    @router.get("", response_model=ServerMetadata)
    def server_metadata(request: Request) -> Response:
        """Server metadata: name, version and protocol extensions."""
        extensions = [*EXTENSIONS, *runtime(request).regions.extensions()]
        return json_response(
            {"name": "loss-service", "version": __version__, "extensions": extensions}
        )

    @router.get("/health/live", response_model=Live)
    def server_live() -> Response:
        """Server liveness."""
        return json_response({"live": True})

    @router.get("/health/ready", response_model=Ready, responses={503: ERROR_RESPONSES[503]})
    def server_ready(request: Request) -> Response:
        """Server readiness: torch is loaded and the devices have been probed."""
        if not is_ready(request.app):
            return Response(
                orjson.dumps({"ready": False}),
                status_code=503,
                media_type="application/json",
                headers={"Retry-After": "1"},
            )
        return json_response({"ready": True})

    infer_openapi = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _inline_refs(InferenceRequest.model_json_schema()),
                    "example": INFER_EXAMPLE,
                },
                "application/octet-stream": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": f"binary tensor data extension: a JSON header of "
                        f"{HEADER_LENGTH} bytes, then each binary input's bytes in order",
                    }
                },
            },
        }
    }
    not_found: dict[int | str, dict[str, Any]] = {404: ERROR_RESPONSES[404]}

    @router.get(
        "/models/{name}", response_model=ModelMetadata, responses=not_found, name="model_metadata"
    )
    def model_metadata_route(name: str) -> Response:
        """Model metadata: the loss's inputs and outputs (-1 = variable dimension)."""
        return json_response(model_metadata(resolve(name)))

    @router.get(
        "/models/{name}/ready",
        response_model=ModelReady,
        responses={**not_found, 503: ERROR_RESPONSES[503]},
    )
    def model_ready(request: Request, name: str) -> Response:
        """Model readiness: every loss is ready whenever the server is (503 while it drains)."""
        return model_readiness(request, model(name))

    # The versioned forms, for clients that name a version (the only one is "1").
    @router.get("/models/{name}/versions/{version}", include_in_schema=False)
    def model_metadata_version(name: str, version: str) -> Response:
        return json_response(model_metadata(model(name, version)))

    @router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
    def model_ready_version(request: Request, name: str, version: str) -> Response:
        return model_readiness(request, model(name, version))

    # POST infer, and its versioned form (for clients that name a version)
    for infer, endpoint, documented in (
        (INFER, model_infer, True),
        (INFER_VERSION, model_infer_version, False),
    ):
        router.add_api_route(
            infer.path.removeprefix("/v2"),
            endpoint,
            methods=["POST"],
            response_model=InferenceResponse if documented else None,
            responses=ERROR_RESPONSES if documented else None,
            openapi_extra=infer_openapi if documented else None,
            include_in_schema=documented,
        )
    return router
