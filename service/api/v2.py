"""/v2: the Open Inference Protocol (KServe v2) with the binary tensor data
extension, where every loss of the table is a model.

Inputs are named after the torch arguments, options travel as request
``parameters`` and the outputs are ``loss`` and ``grad_<arg>``. A request body
is either all JSON, or (binary extension) a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian
bytes of each binary input in input order; responses are framed the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from service import __version__
from service.api.ops import is_ready
from service.api.runtime import (
    Admit,
    Body,
    RawResponse,
    decompress,
    is_compressed,
    parse_bytes,
    read_body,
    runtime,
)
from service.api.runtime import header as request_header
from service.api.v1 import json_response
from service.compute import (
    Evaluation,
    Prepared,
    Timings,
    device_name,
    prepare_request,
    run_prepared,
)
from service.config import Settings
from service.errors import BadRequest, NotFound, invalid, quote
from service.losses import LossSpec, TensorArg, resolve
from service.schemas import DEPRECATED_OPTIONS, parse_request
from service.tensors import (
    MAX_DIMS,
    ElementBudget,
    bytes_to_tensor,
    check_dims,
    decode_raw,
    encode_tensor,
    tensor_view,
    to_integers,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # as in ASGI headers
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "parameters"]

DATATYPES: dict[str, torch.dtype] = {
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}
DATATYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DATATYPES.items()}

# Request parameters that OIP clients send on their own (tritonclient sets
# binary_data_output; the others belong to Triton's scheduler) and that mean
# nothing to a stateless loss.
IGNORED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers"}
)
SERVICE_PARAMETERS = ("device", "grad")


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
    datatype: str = Field(description=", ".join(DATATYPES))
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


# --------------------------------------------------------------------------- metadata


def _rank(value: Any) -> int:
    rank = 0
    while isinstance(value, list):
        rank += 1
        value = value[0] if value else None
    return rank


def _input_datatype(arg: TensorArg) -> str:
    return "INT64" if arg.role in ("index", "class_target") else "FP32"


def _metadata_shape(spec: LossSpec, arg: TensorArg) -> list[int]:
    """Variable dimensions, at the rank of the worked example (1 for the rest)."""
    example = spec.example.get(arg.name)
    return [-1] * (_rank(example) if example is not None else 1)


def model_metadata(spec: LossSpec) -> dict[str, Any]:
    inputs = [
        {
            "name": a.name,
            "datatype": _input_datatype(a),
            "shape": _metadata_shape(spec, a),
            "parameters": {"required": a.required, "role": a.role, "torch_shape": a.shape},
        }
        for a in spec.args
    ]
    outputs: list[dict[str, Any]] = [
        {
            "name": "loss",
            "datatype": "FP32",
            "shape": [-1],
            "parameters": {"torch_shape": "[1] for reduction mean or sum; else input's shape"},
        }
    ]
    for name in spec.maybe_differentiable:
        arg = spec.arg(name)
        outputs.append(
            {
                "name": f"grad_{name}",
                "datatype": "FP32",
                "shape": _metadata_shape(spec, arg),
                "parameters": {"torch_shape": f"same as {name}"},
            }
        )
    return {
        "name": spec.name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch",
        "inputs": inputs,
        "outputs": outputs,
    }


# --------------------------------------------------------------------------- request


@dataclass
class OutputRequest:
    name: str
    binary: bool | None


@dataclass
class InferCall:
    id: str | None
    tensors: dict[str, torch.Tensor]
    parameters: dict[str, Any]
    outputs: list[OutputRequest] | None
    binary_output: bool
    grad_output: torch.Tensor | None = None


def split_body(body: Body, header_length: str | None) -> tuple[Body, memoryview]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(
            f"{HEADER_LENGTH} must be a non-negative integer (bytes of JSON header), "
            f"got {quote(header_length)}"
        )
    # A length past any body is refused before int() meets thousands of digits.
    if len(text) > len(str(len(body))) or int(text) > len(body):
        raise BadRequest(
            f"{HEADER_LENGTH} is {text[:40]}{'...' if len(text) > 40 else ''} but the body "
            f"holds only {len(body)} bytes"
        )
    length = int(text)
    return body[:length], memoryview(body)[length:]


def parse_infer(
    spec: LossSpec, header: Body, binary: memoryview, budget: ElementBudget
) -> InferCall:
    """The JSON header and the binary data -> decoded tensors, parameters and outputs."""
    try:
        payload = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON in the inference request header: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("the inference request must be a JSON object")
    unknown = set(payload) - {"id", "parameters", "inputs", "outputs"}
    if unknown:
        raise BadRequest(
            f"unknown field(s) {quote(sorted(unknown))} in the inference request; expected "
            "id, parameters, inputs, outputs"
        )
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"id must be a string, got {quote(request_id)}")

    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be a JSON object")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest(
            f"parameters.binary_data_output must be a boolean, got {quote(binary_output)}"
        )

    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(
            f"inputs must be a non-empty array; model {spec.name} takes {_describe_inputs(spec)}"
        )
    tensors: dict[str, torch.Tensor] = {}
    grad_output: torch.Tensor | None = None
    offset = 0
    for index, item in enumerate(inputs):
        name, tensor, size = _decode_input(spec, index, item, binary, offset, budget)
        offset += size
        if name in tensors or (name == "grad_output" and grad_output is not None):
            raise BadRequest(f"input {quote(name)} is given twice")
        if name == "grad_output":
            grad_output = tensor
        else:
            tensors[name] = tensor
    if offset != len(binary):
        raise BadRequest(
            f"the body holds {len(binary)} bytes of binary data after the JSON header, but the "
            f"inputs' binary_data_size add up to {offset}"
        )
    missing = [
        a.name
        for a in spec.args
        if a.required
        and a.name not in tensors
        and not (a.role == "float_or_number" and a.name in parameters)
    ]
    if missing:
        raise BadRequest(
            f"missing input(s) {', '.join(missing)}; model {spec.name} takes "
            f"{_describe_inputs(spec)}"
        )
    return InferCall(
        id=request_id,
        tensors=tensors,
        parameters=parameters,
        outputs=_parse_outputs(spec, payload.get("outputs")),
        binary_output=binary_output,
        grad_output=grad_output,
    )


def _describe_inputs(spec: LossSpec) -> str:
    return ", ".join(a.name if a.required else f"{a.name} (optional)" for a in spec.args)


def _decode_input(
    spec: LossSpec,
    index: int,
    item: Any,
    binary: memoryview,
    offset: int,
    budget: ElementBudget,
) -> tuple[str, torch.Tensor, int]:
    """One entry of ``inputs`` -> (name, tensor, bytes of binary data it took)."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise BadRequest(f"inputs[{index}] must be an object with a string name")
    name: str = item["name"]
    if name not in spec.tensor_names and name != "grad_output":
        raise BadRequest(
            f"unknown input {quote(name)}; model {spec.name} takes {_describe_inputs(spec)} "
            "(and grad_output, the upstream gradient)"
        )
    unknown = set(item) - {"name", "shape", "datatype", "parameters", "data"}
    if unknown:
        raise BadRequest(f"input {quote(name)}: unknown field(s) {quote(sorted(unknown))}")
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_dimension(d) for d in shape)
    ):
        raise BadRequest(
            f"input {quote(name)}: shape must be an array of at most {MAX_DIMS} non-negative "
            f"integers, got {quote(shape)}"
        )
    extent = check_dims(shape, (name, "shape"))  # 422: a shape torch cannot hold
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise BadRequest(
            f"input {quote(name)}: datatype must be one of {', '.join(DATATYPES)}, "
            f"got {quote(datatype)}"
        )
    dtype = DATATYPES[datatype]
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"input {quote(name)}: parameters must be a JSON object")
    unknown = set(parameters) - {"binary_data_size"}
    if unknown:
        raise BadRequest(
            f"input {quote(name)}: unsupported parameter(s) {quote(sorted(unknown))} "
            "(only binary_data_size; shared memory is not supported)"
        )
    numel = math.prod(shape)
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise BadRequest(
                f"input {quote(name)} has neither data nor parameters.binary_data_size"
            )
        return name, _decode_json_data(name, item["data"], shape, extent, dtype, budget), 0
    if "data" in item:
        raise BadRequest(f"input {quote(name)} has both data and parameters.binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(
            f"input {quote(name)}: binary_data_size must be a non-negative integer, "
            f"got {quote(size)}"
        )
    budget.take(name, numel, extent)
    itemsize = 1 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size()
    if size != numel * itemsize:
        raise BadRequest(
            f"input {quote(name)}: binary_data_size is {size} but shape {shape} of {datatype} "
            f"takes {numel * itemsize} bytes"
        )
    if offset + size > len(binary):
        raise BadRequest(
            f"input {quote(name)}: binary_data_size {size} at offset {offset} runs past the end of "
            f"the body ({len(binary)} bytes of binary data after the JSON header)"
        )
    wire_dtype = torch.uint8 if dtype == torch.bool else dtype
    tensor = bytes_to_tensor(
        binary[offset : offset + size], wire_dtype, shape, as_bool=dtype == torch.bool
    )
    return name, tensor, size


def _dimension(value: Any) -> bool:
    """A non-negative integer; or one past int64 that JSON parsing made a double
    (check_dims refuses it as outside int64, with a 422)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value >= 0
    return isinstance(value, float) and value >= 2**63


def _decode_json_data(
    name: str,
    data: Any,
    shape: list[int],
    extent: int,
    dtype: torch.dtype,
    budget: ElementBudget,
) -> torch.Tensor:
    """JSON ``data`` (flat or nested, row-major) -> a tensor of ``shape`` and ``dtype``."""
    if dtype.is_floating_point:
        tensor, _ = decode_raw(data, field=name, role="float", float_dtype=dtype, budget=budget)
    else:
        raw, _ = decode_raw(data, field=name, role="any", float_dtype=torch.float64, budget=budget)
        if dtype == torch.bool:
            if raw.numel() and not bool(((raw == 0) | (raw == 1)).all()):
                raise invalid(name, "expected booleans (true/false or 1/0)")
            tensor = raw != 0
        else:
            tensor = to_integers(raw, name, dtype, f"{DATATYPE_NAMES[dtype]} integers")
    if tensor.numel() != math.prod(shape):
        raise BadRequest(
            f"input {quote(name)}: shape {shape} takes {math.prod(shape)} elements, "
            f"data holds {tensor.numel()}"
        )
    budget.take(name, 0, extent)  # the data's elements are counted; the shape's span too
    return tensor.reshape(shape)


def _parse_outputs(spec: LossSpec, raw: Any) -> list[OutputRequest] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("outputs must be an array")
    known = _output_names(spec)
    outputs: list[OutputRequest] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a string name")
        name: str = item["name"]
        if name not in known:
            raise BadRequest(
                f"unknown output {quote(name)}; model {spec.name} has outputs {', '.join(known)}"
            )
        if any(o.name == name for o in outputs):
            raise BadRequest(f"output {quote(name)} is requested twice")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest(f"output {quote(name)}: parameters must be a JSON object")
        unknown = set(parameters) - {"binary_data"}
        if unknown:
            raise BadRequest(
                f"output {quote(name)}: unsupported parameter(s) {quote(sorted(unknown))} "
                "(only binary_data; classification and shared memory are not supported)"
            )
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(
                f"output {quote(name)}: binary_data must be a boolean, got {quote(binary)}"
            )
        outputs.append(OutputRequest(name, binary))
    return outputs


def _output_names(spec: LossSpec) -> list[str]:
    return ["loss", *(f"grad_{n}" for n in spec.tensor_names)]


def _grad_parameter(value: Any) -> bool | list[str]:
    """``grad`` as a boolean, a list of names, or a string (OIP parameters are
    scalars): "true", "false" or comma-separated names."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return [n.strip() for n in text.split(",") if n.strip()]
    if isinstance(value, bool) or (
        isinstance(value, list) and all(isinstance(n, str) for n in value)
    ):
        return value
    raise invalid(
        ("parameters", "grad"),
        f"expected true, false, a list of argument names or a comma-separated string, "
        f"got {quote(value)}",
    )


def request_body(spec: LossSpec, call: InferCall) -> dict[str, Any]:
    """The v1-style body for ``parse_request``: options from the parameters, and a
    placeholder for each tensor that arrives already decoded."""
    allowed = {
        *spec.option_names,
        *SERVICE_PARAMETERS,
        *DEPRECATED_OPTIONS,
        *(a.name for a in spec.args if a.role == "float_or_number"),
    }
    body: dict[str, Any] = {}
    for key, value in call.parameters.items():
        if key in IGNORED_PARAMETERS or key == "binary_data_output":
            continue
        if key not in allowed:
            raise BadRequest(
                f"unknown parameter {quote(key)} for model {spec.name}; expected "
                f"{', '.join(sorted(allowed - set(DEPRECATED_OPTIONS)))} or binary_data_output"
            )
        if key in call.tensors:
            raise BadRequest(f"{quote(key)} is given both as an input and as a parameter")
        body[key] = value
    grad = _grad_parameter(body.get("grad", False))
    wanted = [
        o.name.removeprefix("grad_") for o in call.outputs or () if o.name.startswith("grad_")
    ]
    extra = [n for n in wanted if grad is not True or n not in spec.prediction_args]
    if extra:
        base = (
            [n for n in spec.prediction_args if n in call.tensors]
            if grad is True
            else []
            if grad is False
            else grad
        )
        grad = base + [n for n in extra if n not in base]
    if grad is not False:
        body["grad"] = grad
    for name in call.tensors:
        body[name] = 0
    if call.grad_output is not None:
        body["grad_output"] = call.grad_output  # decoded already: passed through as is
    return body


# --------------------------------------------------------------------------- response


def _output_tensor(name: str, evaluation: Evaluation) -> torch.Tensor:
    if name == "loss":
        value = evaluation.value
        # OIP clients expect at least one dimension for a scalar result.
        return value.reshape(1) if value.dim() == 0 else value
    return evaluation.grads[name.removeprefix("grad_")]


def encode_outputs(
    spec: LossSpec, call: InferCall, evaluation: Evaluation
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows.
    Binary outputs are copied once, from the tensors into the body."""
    if call.outputs is None:
        selected = [OutputRequest("loss", None)] + [
            OutputRequest(f"grad_{n}", None) for n in evaluation.grads
        ]
    else:
        selected = call.outputs
    outputs: list[dict[str, Any]] = []
    chunks: list[memoryview] = []
    for requested in selected:
        tensor = _output_tensor(requested.name, evaluation).detach().cpu()
        output: dict[str, Any] = {
            "name": requested.name,
            "shape": list(tensor.shape),
            "datatype": DATATYPE_NAMES[tensor.dtype],
        }
        binary = call.binary_output if requested.binary is None else requested.binary
        if binary:
            raw = tensor_view(tensor)
            output["parameters"] = {"binary_data_size": raw.nbytes}
            chunks.append(raw)
        else:
            output["data"] = encode_tensor(tensor, "flat")["data"]
        outputs.append(output)
    response: dict[str, Any] = {"model_name": spec.name, "model_version": MODEL_VERSION}
    if call.id is not None:
        response["id"] = call.id
    # where it ran, as /v1's "device" says (service.client reports it)
    response["parameters"] = {"device": device_name(evaluation.value.device)}
    response["outputs"] = outputs
    header = orjson.dumps(response)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def prepare_infer(
    spec: LossSpec,
    body: Body,
    header_length: str | None,
    content_encoding: str,
    settings: Settings,
    timings: Timings,
    admit: Admit,
) -> Prepared[tuple[bytes, int | None]]:
    """One inference request body, decoded, checked and costed; ``finish()``
    gives the response body and its JSON header's length (when binary data
    follows)."""
    start = time.perf_counter()
    body = decompress(body, content_encoding, settings.max_body_bytes, admit)
    header, binary = split_body(body, header_length)
    admit(parse_bytes(header), "parsing the inference request")
    budget = ElementBudget.for_request(settings)
    call = parse_infer(spec, header, binary, budget)
    request = parse_request(spec, request_body(spec, call), ("parameters",))
    decoded = {name: (tensor, True) for name, tensor in call.tensors.items()}
    timings.decode += time.perf_counter() - start
    loss_call = prepare_request(
        spec, request, settings, timings, decoded=decoded, binary_outputs=_binary_outputs(call)
    )

    def finish() -> tuple[bytes, int | None]:
        evaluation = run_prepared(loss_call, timings)
        start = time.perf_counter()
        content, length = encode_outputs(spec, call, evaluation)
        timings.encode += time.perf_counter() - start
        return content, length

    return Prepared(loss_call.memory_bytes, finish)


def _binary_outputs(call: InferCall) -> frozenset[str]:
    """The outputs that will be sent as raw bytes (the rest go as JSON)."""
    if call.outputs is None:
        return frozenset({"*"}) if call.binary_output else frozenset()
    return frozenset(
        o.name for o in call.outputs if (call.binary_output if o.binary is None else o.binary)
    )


# --------------------------------------------------------------------------- routes


def _model(name: str, version: str) -> LossSpec:
    spec = resolve(name)
    if version != MODEL_VERSION:
        raise NotFound(
            f"model {spec.name} has no version {quote(version)}; "
            f"its only version is {MODEL_VERSION!r}"
        )
    return spec


async def serve_infer(request: Request, spec: LossSpec) -> Response:
    rt = runtime(request)
    declared = request_header(request, HEADER_LENGTH_KEY)
    align = (  # ASCII digits only: "²" is a digit too, and int() refuses it
        int(declared)
        if declared and declared.isascii() and declared.isdigit() and len(declared) < 19
        else 0
    )
    body = await read_body(request, rt.settings.max_body_bytes, align=align)
    encoding = request_header(request, b"content-encoding") or ""
    timings = Timings()

    def prepare(admit: Admit) -> Prepared[tuple[bytes, int | None]]:
        return prepare_infer(spec, body, declared, encoding, rt.settings, timings, admit)

    content, length = await rt.evaluate(
        request, prepare, wire_bytes=len(body), compressed=is_compressed(encoding)
    )
    request.scope["state"]["loss_stats"] = timings.stats()
    headers = [(b"server-timing", timings.header())]
    if length is None:
        return RawResponse(content, b"application/json", headers)
    headers.append((HEADER_LENGTH_KEY, b"%d" % length))
    return RawResponse(content, b"application/octet-stream", headers)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

    @router.get("", response_model=ServerMetadata)
    def server_metadata() -> Response:
        """Server metadata: name, version and protocol extensions."""
        return json_response(
            {"name": "loss-service", "version": __version__, "extensions": EXTENSIONS}
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

    @router.get("/models/{name}/ready", response_model=ModelReady, responses=not_found)
    def model_ready(name: str) -> Response:
        """Model readiness (every loss is always ready)."""
        return json_response({"name": resolve(name).name, "ready": True})

    @router.post(
        "/models/{name}/infer",
        response_model=InferenceResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=infer_openapi,
    )
    async def model_infer(request: Request, name: str) -> Response:
        """Evaluate the loss: JSON or binary tensor data in, the same out."""
        return await serve_infer(request, resolve(name))

    # The versioned forms, for clients that name a version (the only one is "1").
    @router.get("/models/{name}/versions/{version}", include_in_schema=False)
    def model_metadata_version(name: str, version: str) -> Response:
        return json_response(model_metadata(_model(name, version)))

    @router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
    def model_ready_version(name: str, version: str) -> Response:
        return json_response({"name": _model(name, version).name, "ready": True})

    @router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def model_infer_version(request: Request, name: str, version: str) -> Response:
        return await serve_infer(request, _model(name, version))

    return router
