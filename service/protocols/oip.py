"""The Open Inference Protocol's model of a loss, shared by its REST and
gRPC transports: datatypes, request parameters -> ``LossCall``, the outputs
a request selects, and model metadata.

Every loss is a model. Inputs are named after the torch arguments, options
travel as request parameters, the outputs are ``loss`` and ``grad_<arg>``
(contract sections 7 and 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from service.compute import Argument, Evaluation, LossCall
from service.errors import BadRequest, NotFound, did_you_mean, invalid, quote
from service.losses import LossSpec, TensorArg, resolve
from service.schemas import DEPRECATED_OPTIONS, parse_options
from service.tensors import to_host

MODEL_VERSION = "1"
SERVER_NAME = "loss-service"

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


@dataclass
class OutputRequest:
    name: str
    # raw bytes (REST: binary_data; gRPC: always raw), None = the request's default
    binary: bool | None = None


@dataclass
class InferRequest:
    """One inference request as both transports decode it: tensors decoded,
    parameters as plain values."""

    spec: LossSpec
    id: str | None
    tensors: dict[str, torch.Tensor]
    parameters: dict[str, Any]
    outputs: list[OutputRequest] | None
    binary_output: bool = False
    grad_output: torch.Tensor | None = None


def model(name: str, version: str = "") -> LossSpec:
    """The loss a model name (and version, "" = the latest) names."""
    spec = resolve(name)
    if version not in ("", MODEL_VERSION):
        raise NotFound(
            f"model {spec.name} has no version {quote(version)}; "
            f"its only version is {MODEL_VERSION!r}"
        )
    return spec


def describe_inputs(spec: LossSpec) -> str:
    return ", ".join(a.name if a.required else f"{a.name} (optional)" for a in spec.args)


def input_name(spec: LossSpec, name: str) -> str:
    """An input's name, checked: a tensor argument or grad_output."""
    if name not in spec.tensor_names and name != "grad_output":
        raise BadRequest(
            f"unknown input {quote(name)}; model {spec.name} takes {describe_inputs(spec)} "
            "(and grad_output, the upstream gradient)"
        )
    return name


def add_input(request: InferRequest, name: str, tensor: torch.Tensor) -> None:
    if name in request.tensors or (name == "grad_output" and request.grad_output is not None):
        raise BadRequest(f"input {quote(name)} is given twice")
    if name == "grad_output":
        request.grad_output = tensor
    else:
        request.tensors[name] = tensor


def check_inputs(request: InferRequest) -> None:
    """Every required input is given (a number-or-tensor one may come as a parameter)."""
    spec = request.spec
    missing = [
        a.name
        for a in spec.args
        if a.required
        and a.name not in request.tensors
        and not (a.role == "float_or_number" and a.name in request.parameters)
    ]
    if missing:
        raise BadRequest(
            f"missing input(s) {', '.join(missing)}; model {spec.name} takes "
            f"{describe_inputs(spec)}"
        )


def output_names(spec: LossSpec) -> list[str]:
    return ["loss", *(f"grad_{n}" for n in spec.tensor_names)]


def output_request(spec: LossSpec, outputs: list[OutputRequest], name: str) -> OutputRequest:
    """A requested output's name, checked against the model's and the others'."""
    known = output_names(spec)
    if name not in known:
        raise BadRequest(
            f"unknown output {quote(name)}; model {spec.name} has outputs {', '.join(known)}"
        )
    if any(o.name == name for o in outputs):
        raise BadRequest(f"output {quote(name)} is requested twice")
    return OutputRequest(name)


def grad_parameter(value: Any) -> bool | list[str]:
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


def loss_call(request: InferRequest, encoding: str = "flat") -> LossCall:
    """An inference request -> the call: parameters become options, device
    and gradients; outputs named ``grad_<arg>`` ask for those gradients."""
    spec = request.spec
    numbers = {a.name for a in spec.args if a.role == "float_or_number"}
    allowed = {*spec.option_names, *SERVICE_PARAMETERS, *DEPRECATED_OPTIONS, *numbers}
    options: dict[str, Any] = {}
    arguments: dict[str, Argument] = {n: (t, True) for n, t in request.tensors.items()}
    device: str | None = None
    grad: bool | list[str] = False
    for key, value in request.parameters.items():
        if key in IGNORED_PARAMETERS or key == "binary_data_output":
            continue
        if key not in allowed:
            known = sorted(allowed - set(DEPRECATED_OPTIONS))
            raise BadRequest(
                f"unknown parameter {quote(key)}{did_you_mean(key, known)} for model "
                f"{spec.name}; expected {', '.join(known)} or binary_data_output"
            )
        if key in request.tensors:
            raise BadRequest(f"{quote(key)} is given both as an input and as a parameter")
        if key == "device":
            if not isinstance(value, str):
                raise invalid(("parameters", "device"), f"expected a string, got {quote(value)}")
            device = value
        elif key == "grad":
            grad = grad_parameter(value)
        elif key in numbers:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise invalid(
                    ("parameters", key), f"expected a number or an input, got {quote(value)}"
                )
            arguments[key] = float(value)
        else:
            options[key] = value
    wanted = [
        o.name.removeprefix("grad_") for o in request.outputs or () if o.name.startswith("grad_")
    ]
    extra = [n for n in wanted if grad is not True or n not in spec.prediction_args]
    if extra:
        base = (
            [n for n in spec.prediction_args if n in request.tensors]
            if grad is True
            else []
            if grad is False
            else grad
        )
        grad = base + [n for n in extra if n not in base]
    return LossCall(
        spec,
        arguments,
        options=parse_options(spec, options, ("parameters",)),
        grad=grad,
        grad_output=request.grad_output,
        device=device,
        encoding=encoding,
        raw_outputs=raw_outputs(request),
    )


def raw_outputs(request: InferRequest) -> frozenset[str]:
    """The outputs that will be sent as raw bytes (the rest go as JSON)."""
    if request.outputs is None:
        return frozenset({"*"}) if request.binary_output else frozenset()
    return frozenset(
        o.name for o in request.outputs if (request.binary_output if o.binary is None else o.binary)
    )


def selected_outputs(
    request: InferRequest, evaluation: Evaluation
) -> list[tuple[OutputRequest, torch.Tensor]]:
    """The outputs to send, each with its tensor on the CPU: those the request
    names, else the loss and every gradient computed. A 0-dim loss has shape
    [1] (OIP clients expect at least one dimension)."""
    selected = request.outputs
    if selected is None:
        selected = [OutputRequest("loss")] + [OutputRequest(f"grad_{n}") for n in evaluation.grads]
    result = []
    for output in selected:
        if output.name == "loss":
            value = evaluation.value
            tensor = value.reshape(1) if value.dim() == 0 else value
        else:
            tensor = evaluation.grads[output.name.removeprefix("grad_")]
        result.append((output, to_host(tensor)))
    return result


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
