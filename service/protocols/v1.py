"""The v1 JSON wire format: a parsed request body -> ``LossCall``;
``Evaluation`` -> the response body (contract sections 3 and 4)."""

from __future__ import annotations

import time
from typing import Any, cast

import orjson
import torch

from service.compute import (
    Argument,
    Evaluation,
    LossCall,
    Prepared,
    Timings,
    check_grad_output,
    device_name,
    prepare,
    relocate,
    wire_role,
)
from service.config import Settings
from service.errors import InvalidPayload
from service.losses import LossSpec
from service.schemas import parse_request
from service.tensors import (
    FLOAT_DTYPES,
    ElementBudget,
    Encoding,
    decode_raw,
    dtype_name,
    encode_scalar,
    encode_tensor,
)


def loss_call(
    spec: LossSpec, body: Any, settings: Settings, loc: tuple[str | int, ...] = ("body",)
) -> LossCall:
    """One v1 request body (parsed JSON) -> the call, its tensors decoded
    against one element budget."""
    fields = parse_request(spec, body, loc)  # the validated values, by name
    float_dtype = FLOAT_DTYPES[fields["dtype"]]
    budget = ElementBudget.for_request(settings)
    arguments: dict[str, Argument] = {}
    grad_output: torch.Tensor | None = None
    given_grad_output = fields["grad_output"]
    try:
        for arg in spec.args:
            value = fields[arg.name]
            if value is None:
                continue  # the core says whether it was required
            if (
                arg.role == "float_or_number"
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                arguments[arg.name] = float(value)
                continue
            arguments[arg.name] = decode_raw(
                value,
                field=arg.name,
                role=wire_role(arg.role),
                float_dtype=float_dtype,
                budget=budget,
            )
        check_grad_output(fields["grad"], given_grad_output is not None)
        if given_grad_output is not None:
            # Plain JSON numbers are decoded exactly (as doubles) and rounded
            # once to the loss output's dtype when used; a tensor object
            # without a dtype is read in the request's float dtype, as the
            # arguments are.
            grad_output, _ = decode_raw(
                given_grad_output,
                field="grad_output",
                role="float",
                float_dtype=float_dtype if isinstance(given_grad_output, dict) else torch.float64,
                budget=budget,
            )
    except InvalidPayload as exc:
        raise relocate(exc, loc) from None
    return LossCall(
        spec,
        arguments,
        {name: fields[name] for name in spec.option_names},
        fields["grad"],
        grad_output,
        fields["device"],
        float_dtype,
        fields["encoding"],
        NO_RAW_OUTPUTS,
        loc,  # by position: a class called with a keyword builds a dict of it
    )


NO_RAW_OUTPUTS: frozenset[str] = frozenset()


def prepare_loss(
    spec: LossSpec,
    body: Any,
    settings: Settings,
    timings: Timings,
    loc: tuple[str | int, ...] = ("body",),
) -> Prepared[dict[str, Any]]:
    """Decode, check and cost one v1 request body; ``finish()`` gives the
    response body (a batch's item)."""
    return prepare(_call(spec, body, settings, timings, loc), settings, timings, encode_response)


def prepare_body(
    spec: LossSpec, body: Any, settings: Settings, timings: Timings
) -> Prepared[bytes]:
    """``prepare_loss`` for a request of its own: ``finish()`` gives the
    response body's JSON bytes (``encode_body``)."""
    return prepare(_call(spec, body, settings, timings, ("body",)), settings, timings, encode_body)


def _call(
    spec: LossSpec, body: Any, settings: Settings, timings: Timings, loc: tuple[str | int, ...]
) -> LossCall:
    start = time.perf_counter()
    call = loss_call(spec, body, settings, loc)
    timings.decode += time.perf_counter() - start
    return call


def encode_response(evaluation: Evaluation) -> dict[str, Any]:
    """The response body of contract section 4."""
    call, value = evaluation.call, evaluation.value
    encoding = cast(Encoding, call.encoding)  # one of v1's, as loss_call set it
    response: dict[str, Any] = {
        "loss": call.spec.name,
        "value": encode_scalar(value) if value.dim() == 0 else encode_tensor(value, encoding),
        "shape": list(value.shape),
        "dtype": dtype_name(value.dtype),
        "device": device_name(value.device),
    }
    if call.grad is not False:
        response["grad"] = {n: encode_tensor(g, encoding) for n, g in evaluation.grads.items()}
    if evaluation.warnings:
        response["warnings"] = evaluation.warnings
    return response


def encode_body(evaluation: Evaluation) -> bytes:
    """``encode_response`` as JSON bytes. The common small answer, a 0-dim
    loss without gradients or warnings, is written from its fixed parts (by
    loss, dtype and device: few), the same bytes in about a third of the
    time; anything else is the general response, dumped."""
    value = evaluation.value
    if value.dim() or evaluation.call.grad is not False or evaluation.warnings:
        return orjson.dumps(encode_response(evaluation))
    key = (evaluation.call.spec.name, value.dtype, value.device)
    parts = _SCALAR_PARTS.get(key)
    if parts is None:
        name, dtype, device = key
        parts = _SCALAR_PARTS[key] = (
            b'{"loss":' + orjson.dumps(name) + b',"value":',
            b',"shape":[],"dtype":'
            + orjson.dumps(dtype_name(dtype))
            + b',"device":'
            + orjson.dumps(device_name(device))
            + b"}",
        )
    return parts[0] + orjson.dumps(encode_scalar(value)) + parts[1]


# a 0-dim answer's JSON before and after its value, by (loss, dtype, device)
_SCALAR_PARTS: dict[tuple[str, torch.dtype, torch.device], tuple[bytes, bytes]] = {}


def evaluate(spec: LossSpec, body: Any, settings: Settings) -> dict[str, Any]:
    """One v1 request body -> its response body, here and now (the catalog's
    worked examples, the command line)."""
    return prepare_loss(spec, body, settings, Timings()).finish()
