"""The evaluation core: one ``LossCall`` (tensors decoded, options checked)
-> roles, checks and cost -> F.<loss> -> autograd -> tensors.

Every front door (``service.protocols``: v1 JSON, OIP REST, OIP gRPC) builds
a ``LossCall`` from its wire format and encodes the ``Evaluation`` back into
it; nothing here reads or writes a wire format. Everything here is
synchronous and CPU- or GPU-bound: the runtime decides where it runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Generic, TypeVar

import torch

from service.config import Settings
from service.errors import (
    FieldError,
    InvalidPayload,
    Overloaded,
    PayloadTooLarge,
    invalid,
    quote,
)
from service.limits import remember
from service.losses import LossSpec
from service.losses.cost import Cost, predict, predicted_bytes
from service.losses.registry import Tensors
from service.tensors import (
    Role,
    coerce_role,
    dtype_name,
    has_fractions,
)

T = TypeVar("T")

# Errors torch raises for argument combinations it does not accept.
TORCH_ARGUMENT_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError)


@dataclass
class Timings:
    """What one request cost: durations (the Server-Timing header, the
    statistics extension) and the tensor bytes in and out (metrics); the
    request's record reads it as it is (``scope["state"]["loss_stats"]``)."""

    decode: float = 0.0
    compute: float = 0.0
    encode: float = 0.0
    tensor_bytes_in: int = 0
    tensor_bytes_out: int = 0
    device: str | None = None

    def header(self) -> bytes:
        """The Server-Timing header value."""
        d, c, e = self.decode * 1000, self.compute * 1000, self.encode * 1000
        return b"decode;dur=%.3f, compute;dur=%.3f, encode;dur=%.3f" % (d, c, e)


# --------------------------------------------------------------------------- devices


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


@cache
def device_name(device: torch.device) -> str:
    """``str(device)``, which costs microseconds per call, once per device."""
    return str(device)


@cache
def resolve_device(requested: str | None, default: str) -> torch.device:
    name = requested if requested is not None else default
    loc = "device" if requested is not None else "device (the server default)"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is not None and device.type == "cpu" and device.index in (None, 0):
        return torch.device("cpu")
    if (
        device is not None
        and device.type == "cuda"
        and torch.cuda.is_available()
        and (device.index is None or device.index < torch.cuda.device_count())
    ):
        return device
    raise invalid(
        loc,
        f"device {quote(name)} is not available on this server; it has "
        f'{", ".join(available_devices())} (or use "auto")',
    )


# --------------------------------------------------------------------------- the request


# A tensor argument as a front door decoded it: the tensor and whether its
# dtype was explicit on the wire (else its role decides it); or a plain
# number, for an argument that torch also takes as a Python float.
Argument = tuple[torch.Tensor, bool] | float


@dataclass
class LossCall:
    """One loss evaluation, as every front door (v1 JSON, OIP REST, OIP gRPC)
    hands it to the core: tensors decoded from the wire, options validated.
    Nothing here is a wire format."""

    spec: LossSpec
    arguments: dict[str, Argument]
    options: dict[str, Any]
    grad: bool | list[str] = False
    # the upstream gradient; cast to the loss output's dtype when used
    grad_output: torch.Tensor | None = None
    device: str | None = None
    # the dtype of float-role arguments whose dtype the wire left open
    float_dtype: torch.dtype = torch.float32
    # how the response will write tensors (what it is predicted to hold):
    # "nested" or "flat" JSON, "b64" text, or "raw" bytes; ``raw_outputs``
    # names outputs written raw whatever the encoding ("*": all of them)
    encoding: str = "nested"
    raw_outputs: frozenset[str] = frozenset()
    # where field errors are reported (a batch item's place in its batch)
    loc: tuple[str | int, ...] = ("body",)


@dataclass
class Evaluation:
    call: LossCall
    value: torch.Tensor
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    # what torch warns about for this call (its messages), e.g. a target
    # broadcast against input
    warnings: list[str] = field(default_factory=list)


@dataclass
class Prepared(Generic[T]):
    """A request decoded, checked and costed, not yet computed: the bytes its
    computation and response are predicted to hold, and the step that
    computes them."""

    memory_bytes: int
    finish: Callable[[], T]


@dataclass
class Plan:
    """A call checked on the CPU with its tensors in their roles' dtypes,
    its gradients resolved and its cost predicted."""

    call: LossCall
    tensors: Tensors
    grad_names: list[str]
    device: torch.device
    cost: Cost
    memory_bytes: int
    warnings: list[str]
    # what the tensors hold, and whether any is on a GPU already (a CUDA
    # shared-memory region): read in plan's one pass over them
    tensor_bytes: int
    on_cuda: bool


def prepare(
    call: LossCall,
    settings: Settings,
    timings: Timings,
    encode: Callable[[Evaluation], T],
) -> Prepared[T]:
    """Check and cost a call; ``finish()`` computes it and ``encode``s the
    result (each front door its own wire format)."""
    checked = plan(call, settings, timings)

    def finish() -> T:
        evaluation = compute(checked, timings)
        start = time.perf_counter()
        response = encode(evaluation)
        timings.encode += time.perf_counter() - start
        return response

    return Prepared(checked.memory_bytes, finish)


def plan(call: LossCall, settings: Settings, timings: Timings) -> Plan:
    """Check one call and predict its cost (contract section 9): over
    ``max_work_elements`` it is a 413 before torch runs."""
    start = time.perf_counter()
    spec = call.spec
    structure = _structure(call)
    try:
        planned = _PLANNED.get(structure)
    except TypeError:  # an option value that cannot be a key
        planned, hashable = None, False
    else:
        hashable = True
    if planned is not None and planned.cost.work_elements <= settings.max_work_elements:
        checked = _replan(call, settings, planned)
        timings.decode += time.perf_counter() - start
        return checked
    try:
        device = resolve_device(call.device, settings.device)
        tensors = assign_roles(spec, call.arguments, call.float_dtype)
        if spec.validate is not None:
            spec.validate(tensors, call.options)
        notes = spec.torch_warnings(tensors, call.options) if spec.torch_warnings else []
        grad_names = grad_targets(spec, call.grad, call.grad_output is not None, tensors)
    except InvalidPayload as exc:
        raise relocate(exc, call.loc) from None
    options = call.options
    # One pass over the tensors for all that is read of them here and in
    # compute. torch.Size is a tuple: shapes and dtypes key the cost as they are.
    shapes: list[tuple[str, torch.Size]] = []
    floats: list[torch.dtype] = []
    tensor_bytes, on_cuda = 0, False
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            shapes.append((name, value.shape))
            if value.is_floating_point():
                floats.append(value.dtype)
            tensor_bytes += value.nbytes
            on_cuda = on_cuda or value.is_cuda
    lengths = tensors.get("target_lengths")
    longest = (  # CTC's tables hold N x T x (2S + 1) cells: S is the longest target
        int(lengths.max()) if isinstance(lengths, torch.Tensor) and lengths.numel() else None
    )
    key = (
        tuple(shapes),
        tuple(floats),
        longest,
        tuple(grad_names),
        call.encoding,
        call.raw_outputs,
    )
    try:
        cost, memory = _costed(spec, tuple(options.items()), *key)
    except TypeError:  # an option value that cannot be a cache key
        cost, memory = _costed.__wrapped__(spec, tuple(options.items()), *key)
    if cost.work_elements > settings.max_work_elements:
        raise PayloadTooLarge(
            f"{spec.name} with these shapes ({_describe_shapes(dict(shapes))}, reduction "
            f"{options.get('reduction')!r}{', grad' if grad_names else ''}) is predicted to "
            f"take {cost.work_elements} elements of work, more than the limit of "
            f"{settings.max_work_elements} (LOSS_SERVICE_MAX_WORK_ELEMENTS)"
        )
    if hashable and longest is None and _by_structure(spec, call.arguments, tensors):
        planned = Planned(tuple(tensors), tuple(grad_names), cost, memory, tensor_bytes, on_cuda)
        remember(_PLANNED, structure, planned, PLANNED_KEPT)
    timings.decode += time.perf_counter() - start
    return Plan(call, tensors, grad_names, device, cost, memory, notes, tensor_bytes, on_cuda)


# What ``plan`` found for calls whose roles, gradients and cost follow from
# their structure alone (``_structure``: the loss, each argument's shape,
# dtype and whether that dtype was explicit, the options, the gradients
# asked for, the encoding): clients repeat theirs, and finding them again
# cost more than a small loss. The checks that read values (class indices in
# range, BCE's [0, 1], ...) run on every call; a call whose cost read a value
# (CTC's longest target) is not remembered (bounded: clients choose them).
@dataclass(frozen=True)
class Planned:
    names: tuple[str, ...]  # the tensors' names, in the table's order
    grad_names: tuple[str, ...]
    cost: Cost
    memory_bytes: int
    tensor_bytes: int
    on_cuda: bool


_PLANNED: dict[tuple[Any, ...], Planned] = {}
PLANNED_KEPT = 4096


def _structure(call: LossCall) -> tuple[Any, ...]:
    """What ``_PLANNED`` knows a call by (unhashable where an option value is)."""
    grad = call.grad if type(call.grad) is bool else tuple(call.grad)
    key: tuple[Any, ...] = (
        call.spec,
        call.float_dtype,
        grad,
        call.grad_output is not None,
        call.encoding,
        call.raw_outputs,
        tuple(call.options.items()),
    )
    for name, given in call.arguments.items():
        if isinstance(given, tuple):
            tensor, explicit = given
            key += ((name, tensor.shape, tensor.dtype, explicit, tensor.is_cuda),)
        else:  # a number, or None (which assign_roles reads as not given)
            key += ((name, given is None),)
    return key


def _by_structure(spec: LossSpec, arguments: dict[str, Argument], tensors: Tensors) -> bool:
    """Whether ``assign_roles`` read nothing but the arguments' structure:
    every tensor kept as it came (no cast, whose checks read values), and
    every class target's role told by its shape (not by fractions in it)."""
    for name, value in tensors.items():
        given = arguments[name]
        if value is not (given if isinstance(given, float) else given[0]):
            return False
    for arg in spec.args:
        raw = tensors.get(arg.name)
        if arg.role == "class_target" and isinstance(raw, torch.Tensor):
            input = tensors["input"]
            assert isinstance(input, torch.Tensor)
            if role_by_shape(raw, input) is None:
                return False
    return True


def _replan(call: LossCall, settings: Settings, planned: Planned) -> Plan:
    """``plan`` for a call of a structure planned before: the same roles,
    gradients and cost; the device, and the checks that read values, anew."""
    spec, arguments, options = call.spec, call.arguments, call.options
    tensors: Tensors = {}
    for name in planned.names:
        given = arguments[name]
        tensors[name] = given if isinstance(given, float) else given[0]
    try:
        device = resolve_device(call.device, settings.device)
        if spec.validate is not None:
            spec.validate(tensors, options)
        notes = spec.torch_warnings(tensors, options) if spec.torch_warnings else []
    except InvalidPayload as exc:
        raise relocate(exc, call.loc) from None
    return Plan(
        call,
        tensors,
        list(planned.grad_names),
        device,
        planned.cost,
        planned.memory_bytes,
        notes,
        planned.tensor_bytes,
        planned.on_cuda,
    )


@lru_cache(maxsize=4096)
def _costed(
    spec: LossSpec,
    options: tuple[tuple[str, Any], ...],
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    floats: tuple[torch.dtype, ...],
    longest: int | None,
    grad: tuple[str, ...],
    encoding: str,
    raw_outputs: frozenset[str],
) -> tuple[Cost, int]:
    """The cost of a call and the bytes its computation and response are
    predicted to hold, remembered: clients repeat their shapes, and a
    prediction costs more than the small loss call it guards. Everything it
    reads is in the key: the shapes, the float arguments' dtypes (the first
    one's name is the cost model's ``dtype``), and CTC's longest target (with
    concatenated targets the shapes alone bound it only by their total)."""
    hints = dict(options)
    if floats:
        hints["dtype"] = dtype_name(floats[0])
    if longest is not None:
        hints["max_target_length"] = longest
    cost = predict(spec, dict(shapes), hints, grad)
    return cost, _memory_bytes(cost, dict(shapes), floats, grad, encoding, raw_outputs)


# What encoding one output element costs in memory on its way out, by
# encoding: nested and flat JSON hold a float64 copy and up to ~25 bytes of
# text twice (the tensor's fragment, then the response body); b64 holds the
# raw bytes, the base64 text twice and the response body.
JSON_BYTES_PER_ELEMENT = 64
B64_BYTES_PER_BYTE = 6


def _memory_bytes(
    cost: Cost,
    shapes: dict[str, tuple[int, ...]],
    floats: tuple[torch.dtype, ...],
    grad_names: tuple[str, ...],
    encoding: str,
    binary_outputs: frozenset[str],
) -> int:
    """What the computation and the response are predicted to hold, in bytes
    (``binary_outputs``: the outputs sent as raw bytes, by v2 output name, or
    ``*`` for all)."""
    itemsize = max((dtype.itemsize for dtype in floats), default=4)
    outputs = {"loss": cost.value_elements}
    for name in grad_names:
        shape = shapes.get(name)
        outputs[f"grad_{name}"] = math.prod(shape) if shape is not None else 1
    out = 0
    for name, elements in outputs.items():
        if name in binary_outputs or "*" in binary_outputs:
            out += elements * itemsize
        elif encoding == "b64":
            out += elements * itemsize * B64_BYTES_PER_BYTE
        else:
            out += elements * JSON_BYTES_PER_ELEMENT
    return predicted_bytes(cost, itemsize) + out


def _describe_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())


def compute(checked: Plan, timings: Timings) -> Evaluation:
    """Compute a checked call on its device."""
    start = time.perf_counter()
    tensors, device = checked.tensors, checked.device
    # decoded on the CPU (or over a CUDA shared-memory region), checked there,
    # then moved once (a CPU call on CPU tensors moves nothing)
    if device.type != "cpu" or checked.on_cuda:
        tensors = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()
        }
    moved_at = time.perf_counter()
    timings.decode += moved_at - start
    timings.device = device_name(device)
    timings.tensor_bytes_in += checked.tensor_bytes  # as many on any device
    evaluation = run_loss(checked.call, tensors, checked.grad_names)
    evaluation.warnings = checked.warnings
    timings.compute += time.perf_counter() - moved_at
    timings.tensor_bytes_out += evaluation.value.nbytes
    for g in evaluation.grads.values():
        timings.tensor_bytes_out += g.nbytes
    return evaluation


def wire_role(role: str) -> Role:
    """The role a front door decodes an argument in (a class target's role
    waits for the input's shape: ``assign_roles``)."""
    return "index" if role == "index" else "any" if role == "class_target" else "float"


def role_by_shape(target: torch.Tensor, input: torch.Tensor) -> bool | None:
    """Whether a class target is probabilities, as its shape tells: yes when
    shaped like input, no (class indices) at another rank; None at input's
    rank with another shape, where fractions in it decide (``assign_roles``)."""
    if target.shape == input.shape:
        return True
    return False if target.dim() != input.dim() else None


def assign_roles(
    spec: LossSpec, arguments: dict[str, Argument], float_dtype: torch.dtype
) -> Tensors:
    """The decoded arguments in their roles' dtypes, in the table's order;
    a missing required argument is a 422."""
    tensors: Tensors = {}
    for arg in spec.args:
        given = arguments.get(arg.name)
        if given is None:
            if arg.required:
                raise invalid(arg.name, f"expected a tensor ({arg.shape}), got null")
            continue
        if isinstance(given, float):
            tensors[arg.name] = given
            continue
        raw, explicit = given
        role: Role = "index" if arg.role == "index" else "float"
        if arg.role == "class_target":
            input = tensors["input"]
            assert isinstance(input, torch.Tensor)
            by_shape = role_by_shape(raw, input)
            probabilities = by_shape if by_shape is not None else has_fractions(raw)
            role = "float" if probabilities else "index"
        try:
            tensors[arg.name] = coerce_role(
                raw, field=arg.name, role=role, float_dtype=float_dtype, explicit=explicit
            )
        except InvalidPayload as exc:
            if arg.role != "class_target" or not has_fractions(raw):
                raise
            # fractions in a target that is not shaped like input: neither
            # indices nor probabilities; say what probabilities must be
            input = tensors["input"]
            assert isinstance(input, torch.Tensor)
            raise invalid(
                arg.name,
                f"{exc.errors[0].msg}; probability targets must have the input's shape "
                f"{list(input.shape)}, got {list(raw.shape)}",
            ) from None
    return tensors


def check_grad_output(grad: bool | list[str], has_grad_output: bool) -> None:
    """A grad_output is a 422 unless gradients are asked for."""
    if has_grad_output and not grad:  # false, or []
        raise invalid(
            "grad_output",
            "grad_output is only used with grad (the upstream gradient of the gradients "
            "asked for); ask for gradients or leave it out",
        )


def grad_targets(
    spec: LossSpec, grad: bool | list[str], has_grad_output: bool, tensors: Tensors
) -> list[str]:
    """The argument names whose gradients the call asks for, checked."""
    check_grad_output(grad, has_grad_output)
    if grad is False:
        return []
    if grad is True:
        return [n for n in spec.prediction_args if isinstance(tensors.get(n), torch.Tensor)]
    differentiable = spec.differentiable_args(tensors)
    names: list[str] = []
    for name in grad:
        if name not in differentiable:
            why = (
                "was not given"
                if name in spec.tensor_names and name not in tensors
                else "is not differentiable here"
                if name in spec.tensor_names
                else "is not an argument of this loss"
            )
            raise invalid(
                "grad",
                f"cannot differentiate {spec.name} with respect to {quote(name)}: it {why}; "
                f"differentiable arguments: {', '.join(differentiable) or 'none'}",
            )
        if name not in names:
            names.append(name)
    return names


def run_loss(call: LossCall, tensors: Tensors, grad_names: list[str]) -> Evaluation:
    spec, options = call.spec, call.options
    kwargs = spec.torch_options(options) if spec.torch_options else options
    try:
        if not grad_names:
            # no argument requires grad (each request decodes its own), so
            # autograd records nothing: no grad-mode switch needed (inference
            # mode cost more than a small loss itself)
            return Evaluation(call, spec.fn(**tensors, **kwargs))
        leaves: list[torch.Tensor] = []
        for name in grad_names:
            tensor = tensors[name]
            assert isinstance(tensor, torch.Tensor)
            leaves.append(tensor.requires_grad_(True))
        value = spec.fn(**tensors, **kwargs)
        grad_output = upstream_gradient(call, value)
        grads = torch.autograd.grad(value, leaves, grad_outputs=grad_output, allow_unused=True)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise Overloaded(
            "the device ran out of memory; retry later or send less", retry_after=2
        ) from None
    except MemoryError:
        raise out_of_host_memory() from None
    except TORCH_ARGUMENT_ERRORS as exc:
        if is_allocation_failure(exc):
            raise out_of_host_memory() from None
        raise _torch_error(spec, exc, tensors, call.loc) from None
    return Evaluation(
        call,
        value.detach(),
        {
            n: g if g is not None else torch.zeros_like(leaf)
            for n, g, leaf in zip(grad_names, grads, leaves, strict=True)
        },
    )


def is_allocation_failure(exc: BaseException) -> bool:
    """torch's CPU allocator reports a failed allocation as a RuntimeError."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def out_of_host_memory() -> Overloaded:
    return Overloaded("the server ran out of memory; retry later or send less", retry_after=2)


def upstream_gradient(call: LossCall, value: torch.Tensor) -> torch.Tensor:
    """The call's grad_output (ones by default), checked against the loss
    output's shape and cast to its dtype and device."""
    grad_output = call.grad_output
    if grad_output is None:
        return torch.ones_like(value)
    if list(grad_output.shape) != list(value.shape):
        raise relocate(
            invalid(
                "grad_output",
                f"expected shape {list(value.shape)} (the loss output's, reduction="
                f"{call.options.get('reduction', 'mean')!r}), got {list(grad_output.shape)}",
            ),
            call.loc,
        )
    return grad_output.to(device=value.device, dtype=value.dtype)


def _torch_error(
    spec: LossSpec,
    exc: Exception,
    tensors: Tensors,
    loc: tuple[str | int, ...],
) -> InvalidPayload:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "not implemented for" in message:
        first = next((v for v in tensors.values() if isinstance(v, torch.Tensor)), None)
        where = f" on {first.device.type}" if first is not None else ""
        dtypes = sorted(
            {
                dtype_name(v.dtype)
                for v in tensors.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            }
        )
        return InvalidPayload(
            [
                FieldError(
                    (*loc, "dtype"),
                    f"torch does not support {spec.name} for dtype {', '.join(dtypes)}{where}: "
                    f"{message}",
                )
            ]
        )
    weight, input = tensors.get("weight"), tensors.get("input")
    if (
        message.startswith("Weights and input must have the same size")
        and isinstance(weight, torch.Tensor)
        and isinstance(input, torch.Tensor)
    ):  # l1_loss, mse_loss, huber_loss: an elementwise weight is not broadcast
        return InvalidPayload(
            [
                FieldError(
                    (*loc, "weight"),
                    f"expected shape {list(input.shape)} (same as input: torch does not "
                    f"broadcast this weight), got {list(weight.shape)}",
                )
            ]
        )
    if "must match the size of tensor" in message:
        mismatch = _broadcast_mismatch(spec, tensors, loc)
        if mismatch is not None:
            return InvalidPayload([mismatch])
    return InvalidPayload(
        [FieldError(loc, f"torch.nn.functional.{spec.name} rejected the arguments: {message}")]
    )


def _broadcast_mismatch(
    spec: LossSpec, tensors: Tensors, loc: tuple[str | int, ...]
) -> FieldError | None:
    """torch's "size of tensor a (2) must match ... tensor b (3)" names no
    argument: the first pair of arguments (in the loss's order) whose shapes
    do not broadcast, named with both shapes."""
    present = [(n, t) for n in spec.tensor_names if isinstance(t := tensors.get(n), torch.Tensor)]
    for i, (name, tensor) in enumerate(present):
        for ref_name, ref in present[:i]:
            try:
                torch.broadcast_shapes(ref.shape, tensor.shape)  # type: ignore[no-untyped-call]
            except RuntimeError:
                return FieldError(
                    (*loc, name),
                    f"shape {list(tensor.shape)} does not broadcast with {ref_name} "
                    f"{list(ref.shape)}: expected {ref_name}'s shape {list(ref.shape)} "
                    "(or one that broadcasts to it)",
                )
    return None


def relocate(exc: InvalidPayload, loc: tuple[str | int, ...]) -> InvalidPayload:
    """Field errors are raised with ("body", field); re-root them under ``loc``."""
    if loc == ("body",):
        return exc
    return InvalidPayload([FieldError((*loc, *e.loc[1:]), e.msg) for e in exc.errors])
