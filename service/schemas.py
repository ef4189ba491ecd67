"""Request and response models, generated from the loss table.

Tensor fields are typed ``TensorIn``: pydantic validates the envelope (names,
options, dtypes, encodings) and passes tensor values through untouched, so no
Python object is validated per element; ``service.tensors`` decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, create_model

from service.dtypes import DTYPES
from service.errors import FieldError, InvalidPayload, did_you_mean, quote
from service.limits import remember
from service.losses import LOSSES, LossSpec
from service.tensors import FLOAT_DTYPES

_NUMBER_OR_NONFINITE: dict[str, Any] = {
    "anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]
}
TENSOR_SCHEMA: dict[str, Any] = {
    "title": "Tensor",
    "description": (
        "A number (0-dim), a rectangular nested array of numbers, "
        '{"shape", "dtype", "data": [flat row-major]} or '
        '{"shape", "dtype", "b64": "<little-endian row-major bytes>"}. '
        'Non-finite values are the strings "NaN", "Infinity", "-Infinity".'
    ),
    "anyOf": [
        _NUMBER_OR_NONFINITE,
        {"type": "array", "items": {}},
        {
            "type": "object",
            "properties": {
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "dtype": {"type": "string", "enum": list(DTYPES)},
                "data": {"type": "array", "items": _NUMBER_OR_NONFINITE},
            },
            "required": ["shape", "data"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "dtype": {"type": "string", "enum": list(DTYPES)},
                "b64": {"type": "string", "contentEncoding": "base64"},
            },
            "required": ["shape", "b64"],
            "additionalProperties": False,
        },
    ],
}
TensorIn = Annotated[Any, WithJsonSchema(TENSOR_SCHEMA)]
TensorOut = Annotated[Any, WithJsonSchema({**TENSOR_SCHEMA, "title": "Tensor"})]

FloatDType = Literal["float16", "bfloat16", "float32", "float64"]
EncodingName = Literal["nested", "flat", "b64"]
assert set(FloatDType.__args__) == set(FLOAT_DTYPES)  # type: ignore[attr-defined]

DEPRECATED_OPTIONS = ("size_average", "reduce")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class LossRequestBase(BaseModel):
    """Fields every loss request has besides its tensors and options."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(
        None,
        description='"cpu", "cuda", "cuda:N" or "auto" (cuda when present); '
        "null = the server's default (LOSS_SERVICE_DEVICE)",
    )
    dtype: FloatDType = Field(
        "float32", description="dtype of float-role arguments given as plain arrays"
    )
    grad: bool | list[str] = Field(
        False,
        description="true = gradients of the prediction arguments; or a list naming any "
        "differentiable float argument",
    )
    grad_output: TensorIn | None = Field(
        None, description="the upstream gradient, shaped like the loss output; default ones"
    )
    encoding: EncodingName = Field("nested", description="how tensors in the response are written")


def _option_type(option: Any) -> Any:
    if option.choices is not None:
        values = tuple(c for c in option.choices if c is not None)
        literal = Literal[values]  # type: ignore[valid-type]
        return literal | None if None in option.choices else literal
    return option.type


def _option_fields(spec: LossSpec) -> dict[str, Any]:
    """The pydantic fields of a loss's options and its reduction."""
    fields: dict[str, Any] = {}
    for option in spec.options:
        ge, le = option.ge, option.le
        if option.type is int and option.choices is None:  # torch takes an int64
            ge = INT64_MIN if ge is None else ge
            le = INT64_MAX if le is None else le
        fields[option.name] = (
            _option_type(option),
            Field(option.default, description=option.description, ge=ge, le=le),
        )
    fields["reduction"] = (
        Literal[spec.reductions],
        Field("mean", description="how the per-element losses are reduced"),
    )
    return fields


@cache
def request_model(spec: LossSpec) -> type[LossRequestBase]:
    """The typed request body of one loss (its OpenAPI schema)."""
    fields: dict[str, Any] = {}
    for arg in spec.args:
        text = f"{arg.role} role, shape {arg.shape}" + (
            f"; {arg.description}" if arg.description else ""
        )
        default = ... if arg.required else None
        annotation = TensorIn if arg.required else TensorIn | None
        fields[arg.name] = (annotation, Field(default, description=text))
    fields.update(_option_fields(spec))
    name = spec.alias.replace("Loss", "") + "LossRequest"
    model = create_model(name, __base__=LossRequestBase, **fields)
    model.__doc__ = f"Arguments of torch.nn.functional.{spec.name}, plus the service's own."
    model.model_config["json_schema_extra"] = {"examples": [spec.example]}
    return model


class OptionsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


@cache
def options_model(spec: LossSpec) -> type[OptionsBase]:
    """A loss's options alone (the Open Inference Protocol's request parameters)."""
    name = spec.alias.replace("Loss", "") + "LossOptions"
    return create_model(name, __base__=OptionsBase, **_option_fields(spec))


def refuse_deprecated(spec: LossSpec, keys: Any, loc: tuple[str | int, ...]) -> None:
    """torch's deprecated size_average and reduce are a 422 with a hint."""
    deprecated = [k for k in DEPRECATED_OPTIONS if k in keys]
    if deprecated:
        raise InvalidPayload(
            [
                FieldError(
                    (*loc, k),
                    f"{k} is deprecated in torch; use reduction "
                    f"({', '.join(repr(r) for r in spec.reductions)}) instead",
                )
                for k in deprecated
            ]
        )


# Option sets (and v1 envelopes) already validated, and what they came out
# as: clients repeat theirs (most send none), and validating them cost more
# than a small loss.
_PARSED_OPTIONS: dict[tuple[Any, ...], dict[str, Any]] = {}
_PARSED_ENVELOPES: dict[tuple[Any, ...], dict[str, Any]] = {}
PARSED_OPTIONS_KEPT = 4096


def value_key(name: str, value: Any) -> tuple[Any, ...]:
    """One given value as part of a cache key: its type too (1, 1.0 and True
    are equal but not the same option), and a float's sign (-0.0 == 0.0, but
    torch keeps a zero's sign: margin_ranking_loss with margin -0.0 gives
    -0.0 where 0.0 gives 0.0)."""
    if type(value) is float:
        return (name, float, value, math.copysign(1.0, value))
    return (name, type(value), value)


def parse_options(
    spec: LossSpec, values: dict[str, Any], loc: tuple[str | int, ...]
) -> dict[str, Any]:
    """Options given by name -> every option of the loss, checked, defaults filled in."""
    key: tuple[Any, ...] | None = (spec, *(value_key(k, v) for k, v in values.items()))
    try:
        parsed = _PARSED_OPTIONS.get(key)  # type: ignore[arg-type]
    except TypeError:  # a value that cannot be a key (a list)
        parsed, key = None, None
    if parsed is not None:
        return dict(parsed)
    refuse_deprecated(spec, values, loc)
    try:
        parsed = options_model(spec).model_validate(values).model_dump()
    except ValidationError as exc:
        raise validation_error(exc, loc, spec.option_names) from None
    if key is not None:
        remember(_PARSED_OPTIONS, key, parsed, PARSED_OPTIONS_KEPT)
    return dict(parsed)


@dataclass(frozen=True)
class _Envelope:
    """What a v1 request body may hold, for ``parse_request``'s cache."""

    fields: frozenset[str]  # every field of the request model
    required: frozenset[str]
    # the tensor fields: pydantic passes their values through as they came
    # (TensorIn is Any), so the cache leaves them out of its key
    tensors: frozenset[str]


@cache
def _envelope(spec: LossSpec) -> _Envelope:
    model = request_model(spec)
    return _Envelope(
        frozenset(model.model_fields),
        frozenset(n for n, f in model.model_fields.items() if f.is_required()),
        frozenset((*spec.tensor_names, "grad_output")),
    )


def parse_request(
    spec: LossSpec, body: Any, loc: tuple[str | int, ...] = ("body",)
) -> dict[str, Any]:
    """Validate a v1 request body's envelope -> every field's value by name,
    defaults filled in; tensor values are left as they came.

    The rest of the envelope (options, dtype, grad, ...) is validated once
    per distinct set of values and remembered, as ``parse_options`` does
    (pydantic cost more than a small loss): a body of known fields, its
    required ones among them, whose other values were validated before takes
    what they came out as; anything else goes through pydantic, which also
    words every error."""
    if not isinstance(body, dict):
        raise InvalidPayload(
            [FieldError(loc, f"expected a JSON object, got {type(body).__name__}")]
        )
    envelope = _envelope(spec)
    tensors, given = envelope.tensors, body.keys()
    key: tuple[Any, ...] | None = None
    if envelope.required <= given <= envelope.fields:
        # the common body holds tensors alone: every other field its default
        plain = given <= tensors
        key = (
            (spec,)
            if plain
            else (spec, *(value_key(k, v) for k, v in body.items() if k not in tensors))
        )
        try:
            parsed = _PARSED_ENVELOPES.get(key)
        except TypeError:  # a value that cannot be a key (a list of grad names)
            parsed, key = None, None
        if parsed is not None:
            fields = dict(parsed)  # the tensor fields None: then the values given
            fields.update(body if plain else {k: body[k] for k in given & tensors})
            return fields
    refuse_deprecated(spec, body, loc)
    model = request_model(spec)
    try:
        fields = model.model_validate(body).__dict__
    except ValidationError as exc:
        raise validation_error(exc, loc, list(model.model_fields)) from None
    if key is not None:
        kept = {k: None if k in tensors else v for k, v in fields.items()}
        remember(_PARSED_ENVELOPES, key, kept, PARSED_OPTIONS_KEPT)
    return fields


def validation_error(
    exc: ValidationError, loc: tuple[str | int, ...], fields: Sequence[str]
) -> InvalidPayload:
    """pydantic's errors as field errors; an unknown field names the closest
    allowed one (a misspelt option) and lists them all."""
    errors = []
    for e in exc.errors(include_url=False):
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            unknown = str(e["loc"][-1])
            msg = (
                f"unknown field for this loss{did_you_mean(unknown, fields)}; "
                f"allowed fields: {', '.join(fields)}"
            )
        elif e["type"] != "missing" and "input" in e:
            msg = f"{msg}, got {quote(e['input'], 60)}"
        errors.append(FieldError((*loc, *e["loc"]), msg))
    return InvalidPayload(errors)


# --------------------------------------------------------------------------- responses


class LossResponse(BaseModel):
    loss: str = Field(description="canonical torch.nn.functional name")
    value: float | str | TensorOut = Field(
        description='a number for a 0-dim loss ("NaN"/"Infinity"/"-Infinity" if not '
        "finite), else a tensor in the requested encoding"
    )
    shape: list[int]
    dtype: str
    device: str
    grad: dict[str, TensorOut] | None = Field(
        None, description="d loss / d argument, present only when asked for"
    )
    warnings: list[str] | None = Field(
        None,
        description="what torch warns about for this call, in its words (a target "
        "broadcast against input, kl_div's reduction 'mean'); present only when it warns",
    )


class ProblemError(BaseModel):
    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemError] | None = None


class ArgumentInfo(BaseModel):
    name: str
    role: str
    shape: str
    required: bool
    differentiable: bool
    prediction: bool
    description: str


class OptionInfo(BaseModel):
    name: str
    type: str
    default: Any
    allowed: list[Any] | None = None
    description: str


class ExampleInfo(BaseModel):
    request: dict[str, Any]
    response: dict[str, Any]


class LossInfo(BaseModel):
    name: str
    aliases: list[str]
    description: str
    formula: str
    arguments: list[ArgumentInfo]
    options: list[OptionInfo]
    differentiable: list[str]
    example: ExampleInfo


class LossList(BaseModel):
    losses: list[LossInfo]


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    loss: str = Field(description="loss name or torch.nn class name")


class BatchRequest(BaseModel):
    items: list[BatchItem] = Field(description="each item: a loss name plus a §4 request body")
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"loss": "cross_entropy", **LOSSES["cross_entropy"].example},
                        {"loss": "MSELoss", **LOSSES["mse_loss"].example},
                    ]
                }
            ]
        }
    )


class BatchError(BaseModel):
    error: Problem


class BatchResponse(BaseModel):
    results: list[LossResponse | BatchError]
