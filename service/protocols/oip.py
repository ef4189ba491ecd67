"""The Open Inference Protocol's model of a loss, shared by its REST and
gRPC transports: datatypes, request parameters -> ``LossCall``, the outputs
a request selects, and model metadata.

Every loss is a model. Inputs are named after the torch arguments, options
travel as request parameters, the outputs are ``loss`` and ``grad_<arg>``
(contract sections 7 and 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from service.compute import Argument, Evaluation, LossCall
from service.errors import BadRequest, NotFound, did_you_mean, invalid, quote
from service.limits import remember
from service.losses import LossSpec, TensorArg, resolve
from service.losses.registry import canonical_name
from service.schemas import DEPRECATED_OPTIONS, parse_options, value_key
from service.shm import Reference, Regions, Target
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

# Integer datatypes that torch takes no class index or length in (it wants
# int64 there, and has few kernels for uint16/32/64): decoded as the wire
# holds them (little-endian), then widened to INT64 exactly. A value past
# int64 (UINT64 only) is a 422, never wrapped. Integer tensors only ever
# serve as indices and lengths, so nothing is lost by widening.
WIDENED: dict[str, tuple[str, int, int]] = {  # numpy dtype, range
    "INT8": ("<i1", -(2**7), 2**7 - 1),
    "INT16": ("<i2", -(2**15), 2**15 - 1),
    "UINT16": ("<u2", 0, 2**16 - 1),
    "UINT32": ("<u4", 0, 2**32 - 1),
    "UINT64": ("<u8", 0, 2**64 - 1),
}
ACCEPTED = (*DATATYPES, *WIDENED)  # every datatype an input may have
FLOAT_DATATYPES = ("FP16", "BF16", "FP32", "FP64")
INTEGER_DATATYPES = ("INT64", "INT32", "INT16", "INT8", "UINT8", "UINT16", "UINT32", "UINT64")
INT64_MAX = 2**63 - 1

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
    # written into a shared-memory region instead (the response carries no data)
    target: Target | None = None


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


# The output a request that names none gets first (never changed: a request
# that names outputs has its own OutputRequests)
LOSS_OUTPUT = OutputRequest("loss")


def model(name: str, version: str = "") -> LossSpec:
    """The loss a model name (and version, "" = the latest) names."""
    spec = resolve(name)
    if version not in ("", MODEL_VERSION):
        raise NotFound(
            f"model {spec.name} has no version {quote(version)}; "
            f"its only version is {MODEL_VERSION!r}"
        )
    return spec


def check_model_fields(spec: LossSpec, name: Any, version: Any) -> None:
    """A request body's own ``model_name`` and ``model_version`` (Triton's
    clients may send them): optional, and when given they must name the
    model of the route (an alias counts); a mismatch is a 400."""
    if name is not None and name != "":
        if not isinstance(name, str):
            raise BadRequest(f"model_name must be a string, got {quote(name)}")
        if canonical_name(name) != spec.name:
            raise BadRequest(
                f"model_name {quote(name)} does not match the model of the route, {spec.name}"
            )
    if version is not None and version != "" and version != MODEL_VERSION:
        raise BadRequest(
            f"model_version {quote(version)} does not match the model's only version, "
            f"{MODEL_VERSION!r}"
        )


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


def check_datatype(spec: LossSpec, name: str, datatype: str) -> None:
    """The datatype is one the protocol carries (else 400) and one the
    input's role takes: a float-role input (and grad_output) needs a float
    datatype (else 422, as any invalid value). BOOL and integers are refused
    there; no loss takes a BOOL anywhere (index roles refuse it later)."""
    if datatype not in ACCEPTED:
        raise BadRequest(
            f"input {quote(name)}: datatype must be one of {', '.join(ACCEPTED)}, "
            f"got {quote(datatype)}"
        )
    role = "float" if name == "grad_output" else spec.arg(name).role
    if role in ("float", "float_or_number") and datatype not in FLOAT_DATATYPES:
        raise invalid(
            name,
            f"expected a floating datatype ({', '.join(FLOAT_DATATYPES)}), got {datatype}",
        )


@cache
def checked_input(spec: LossSpec, name: str, datatype: str) -> str:
    """An input's name and datatype, checked (``input_name``,
    ``check_datatype``); what passed is remembered: the pairs a model takes
    are few, and clients send the same ones call after call."""
    name = input_name(spec, name)
    check_datatype(spec, name, datatype)
    return name


def widen(name: str, datatype: str, values: np.ndarray[Any, Any]) -> torch.Tensor:
    """An INT8/INT16/UINT16/UINT32/UINT64 input's values -> an int64 tensor,
    exactly: a value outside the datatype, or past int64, is a 422."""
    _, low, high = WIDENED[datatype]
    if values.size:
        smallest, largest = int(values.min()), int(values.max())
        if smallest < low or largest > high:
            bad = smallest if smallest < low else largest
            raise invalid(name, f"expected {datatype} integers in [{low}, {high}], got {bad}")
        if largest > INT64_MAX:
            raise invalid(
                name,
                f"{datatype} value {largest} is past int64 (torch takes class indices and "
                f"lengths as int64, up to {INT64_MAX})",
            )
    return torch.from_numpy(values.astype(np.int64))


def widen_bytes(name: str, datatype: str, data: bytes | memoryview) -> torch.Tensor:
    """Raw little-endian bytes of a widened datatype -> int64 (checked by the caller's size)."""
    return widen(name, datatype, np.frombuffer(data, dtype=WIDENED[datatype][0]))


def read_region(
    name: str, datatype: str, shape: list[int], regions: Regions, ref: Reference
) -> torch.Tensor:
    """An input in a shared-memory region (its datatype checked already)."""
    what = f"input {quote(name)}"
    if datatype in WIDENED:
        raw = regions.read(what, ref, torch.uint8, [math.prod(shape) * itemsize(datatype)])
        return widen_bytes(name, datatype, raw.numpy().data).reshape(shape)
    dtype = DATATYPES[datatype]
    return regions.read(what, ref, dtype, shape)


def itemsize(datatype: str) -> int:
    """Bytes per element on the wire (BOOL: one byte)."""
    if datatype in WIDENED:
        return np.dtype(WIDENED[datatype][0]).itemsize
    dtype = DATATYPES[datatype]
    return 1 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size()


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
    numbers, _ = parameter_names(spec)
    given = frozenset(n for n in numbers if n in request.parameters) if numbers else NONE
    missing = _missing(spec, tuple(request.tensors), given)
    if missing:
        raise BadRequest(
            f"missing input(s) {', '.join(missing)}; model {spec.name} takes "
            f"{describe_inputs(spec)}"
        )


NONE: frozenset[str] = frozenset()


@cache
def _missing(spec: LossSpec, tensors: tuple[str, ...], numbers: frozenset[str]) -> list[str]:
    """The required inputs missing from ``tensors`` (``numbers``: the
    number-or-tensor arguments given as parameters), remembered: requests
    repeat their inputs, and the model's few."""
    return [
        a.name
        for a in spec.args
        if a.required
        and a.name not in tensors
        and not (a.role == "float_or_number" and a.name in numbers)
    ]


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


@cache
def parameter_names(spec: LossSpec) -> tuple[frozenset[str], frozenset[str]]:
    """A loss's arguments that may come as a number parameter, and every
    parameter name a request may give it."""
    numbers = frozenset(a.name for a in spec.args if a.role == "float_or_number")
    return numbers, frozenset(
        {*spec.option_names, *SERVICE_PARAMETERS, *DEPRECATED_OPTIONS, *numbers}
    )


# What the parameters of requests that name no outputs came out as (options,
# gradients, device, number arguments, raw outputs), by model, encoding,
# inputs given and parameter values (each with its type): clients repeat
# theirs, and reading them cost more than a small loss (bounded).
_CALLS: dict[tuple[Any, ...], tuple[dict[str, Any], bool | list[str], str | None,
                                    dict[str, float], frozenset[str]]] = {}  # fmt: skip
CALLS_KEPT = 4096


def loss_call(request: InferRequest, encoding: str = "flat") -> LossCall:
    """An inference request -> the call: parameters become options, device
    and gradients; outputs named ``grad_<arg>`` ask for those gradients."""
    spec = request.spec
    key: tuple[Any, ...] | None = None
    if request.outputs is None:
        key = (spec, encoding, request.binary_output, tuple(request.tensors))
        if request.parameters:
            key += tuple(value_key(k, v) for k, v in request.parameters.items())
        try:
            known = _CALLS.get(key)
        except TypeError:  # a value that cannot be a key (a list of grad names)
            known, key = None, None
        if known is not None:
            options, grad, device, numbers, raw = known
            arguments: dict[str, Argument] = {}
            # a loop: before Python 3.12 a comprehension is a call of its own
            for name, tensor in request.tensors.items():
                arguments[name] = (tensor, True)
            if numbers:
                arguments.update(numbers)
            # by position, float_dtype the default as _loss_call leaves it: a
            # dataclass made with keywords costs twice as much (a dict of them)
            return LossCall(
                spec,
                arguments,
                dict(options),
                list(grad) if isinstance(grad, list) else grad,
                request.grad_output,
                device,
                torch.float32,
                encoding,
                raw,
            )
    call = _loss_call(request, encoding)
    if key is not None:
        numbers = {k: v for k, v in call.arguments.items() if isinstance(v, float)}
        grad = list(call.grad) if isinstance(call.grad, list) else call.grad
        known = (dict(call.options), grad, call.device, numbers, call.raw_outputs)
        remember(_CALLS, key, known, CALLS_KEPT)
    return call


def _loss_call(request: InferRequest, encoding: str) -> LossCall:
    spec = request.spec
    numbers, allowed = parameter_names(spec)
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
        o.name
        for o in request.outputs
        if o.target is not None or (request.binary_output if o.binary is None else o.binary)
    )


def selected_outputs(
    request: InferRequest, evaluation: Evaluation
) -> list[tuple[OutputRequest, torch.Tensor]]:
    """The outputs to send, each with its tensor on the CPU (on its device for
    one written to shared memory): those the request names, else the loss and
    every gradient computed. A 0-dim loss stays 0-dim (its bytes are those of
    shape [1]); its wire shape is [1] (``wire_shape``)."""
    selected = request.outputs
    if selected is None:
        selected = [LOSS_OUTPUT] + [OutputRequest(f"grad_{n}") for n in evaluation.grads]
    result = []
    for output in selected:
        if output.name == "loss":
            tensor = evaluation.value
            if output.target is not None and tensor.dim() == 0:
                tensor = tensor.reshape(1)  # a region takes the shape it is given
        else:
            tensor = evaluation.grads[output.name.removeprefix("grad_")]
        # an output into shared memory stays where it is: the region takes it
        result.append((output, tensor.detach() if output.target else to_host(tensor)))
    return result


def wire_shape(output: OutputRequest, tensor: torch.Tensor) -> list[int]:
    """An output's shape as OIP sends it: a 0-dim loss has shape [1] (OIP
    clients expect at least one dimension); a gradient has its input's."""
    return [1] if output.name == "loss" and tensor.dim() == 0 else list(tensor.shape)


# --------------------------------------------------------------------------- metadata

# OIP metadata has one datatype and one shape per tensor; a loss takes
# several of each. The datatype listed is the default one (what an input
# given as plain numbers would be), the ``datatypes`` parameter lists all
# that are accepted; the shape is [-1] for every tensor, "any shape",
# because every argument but a class weight takes more than one rank
# (``torch_shape`` says which, in torch's words).
ANY_SHAPE = [-1]
OUTPUT_DATATYPE = "the float inputs' datatype: FP16, BF16, FP32 or FP64 (FP32 by default)"


def input_datatypes(arg: TensorArg) -> tuple[str, list[str]]:
    """An input's default datatype and every datatype it accepts."""
    if arg.role == "index":
        return "INT64", [*INTEGER_DATATYPES, *FLOAT_DATATYPES]  # floats when integral
    if arg.role == "class_target":  # class indices, or probabilities shaped like input
        return "INT64", [*INTEGER_DATATYPES, *FLOAT_DATATYPES]
    return "FP32", list(FLOAT_DATATYPES)


def model_metadata(spec: LossSpec) -> dict[str, Any]:
    """Inputs (the tensor arguments, then the optional grad_output) and
    outputs: ``loss`` always; ``grad_<arg>`` only when asked for, by the
    ``grad`` parameter or by naming it in ``outputs`` (a request without
    ``outputs`` gets the loss and the gradients it asked for)."""
    inputs = []
    for a in spec.args:
        datatype, accepted = input_datatypes(a)
        parameters = {"required": a.required, "role": a.role, "torch_shape": a.shape,
                      "datatypes": accepted}  # fmt: skip
        inputs.append(
            {"name": a.name, "datatype": datatype, "shape": ANY_SHAPE, "parameters": parameters}
        )
    inputs.append({
        "name": "grad_output", "datatype": "FP32", "shape": ANY_SHAPE,
        "parameters": {
            "required": False, "role": "float",
            "torch_shape": "same as the loss output: the upstream gradient (default ones)",
            "datatypes": list(FLOAT_DATATYPES),
        },
    })  # fmt: skip
    outputs: list[dict[str, Any]] = [{
        "name": "loss", "datatype": "FP32", "shape": ANY_SHAPE,
        "parameters": {
            "torch_shape": "[1] for reduction mean or sum; else the loss's output shape",
            "datatype": OUTPUT_DATATYPE, "optional": False,
        },
    }]  # fmt: skip
    for name in spec.maybe_differentiable:
        outputs.append({
            "name": f"grad_{name}", "datatype": "FP32", "shape": ANY_SHAPE,
            "parameters": {
                "torch_shape": f"same as {name}", "datatype": f"{name}'s datatype",
                "optional": True,
                "returned": f"when parameters.grad asks for {name}, or outputs names it",
            },
        })  # fmt: skip
    return {
        "name": spec.name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch",
        "inputs": inputs,
        "outputs": outputs,
    }
