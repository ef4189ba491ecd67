"""The tensor codec: the wire forms of contract section 3 <-> ``torch.Tensor``.

Three JSON forms are accepted for every tensor field:

1. a number (0-dim) or a rectangular nested array of numbers;
2. ``{"shape": [...], "dtype": "float32", "data": [flat, row-major]}``;
3. ``{"shape": [...], "dtype": "float32", "b64": "<little-endian bytes>"}``.

Non-finite floats travel as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` in both directions, so every response is RFC 8259 JSON.

Roles decide the dtype a plain array becomes: ``float`` arguments take the
request's float dtype, ``index`` arguments (class indices, lengths) become
int64 and must hold integral values.
"""

from __future__ import annotations

import binascii
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
import pybase64
import torch

from service.dtypes import DTYPE_NAMES, DTYPES
from service.errors import PayloadTooLarge, invalid, quote
from service.fastjson import NumericArray

if TYPE_CHECKING:
    from service.config import Settings

Role = Literal["float", "index", "any"]
Encoding = Literal["nested", "flat", "b64"]

FLOAT_DTYPES: dict[str, torch.dtype] = {k: v for k, v in DTYPES.items() if v.is_floating_point}
INTEGER_DTYPES = frozenset({torch.int64, torch.int32, torch.uint8})

MAX_DIMS = 64
NONFINITE_IN: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FORM_KEYS = frozenset({"shape", "dtype", "data", "b64"})


class ElementBudget:
    """Counts the elements of every tensor in one request against a limit,
    before anything of that size is allocated."""

    def __init__(self, limit: int, per_tensor: int | None = None) -> None:
        self.limit = limit
        self.per_tensor = per_tensor if per_tensor is not None else limit
        self.used = 0

    @classmethod
    def for_request(cls, settings: Settings) -> ElementBudget:
        return cls(settings.max_tensor_elements, settings.max_elements_per_tensor)

    def take(self, field: str, count: int) -> None:
        if count > self.per_tensor:
            raise PayloadTooLarge(
                f"{field}: {count} elements, more than the limit of {self.per_tensor} per tensor "
                "(LOSS_SERVICE_MAX_ELEMENTS_PER_TENSOR)"
            )
        self.used += count
        if self.used > self.limit:
            raise PayloadTooLarge(
                f"{field}: the request's tensors hold more than {self.limit} elements "
                f"in all (limit LOSS_SERVICE_MAX_TENSOR_ELEMENTS)"
            )


def dtype_name(dtype: torch.dtype) -> str:
    name = DTYPE_NAMES.get(dtype)
    return name if name is not None else str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- decode


def decode_tensor(
    value: Any,
    *,
    field: str,
    role: Role,
    float_dtype: torch.dtype,
    budget: ElementBudget,
) -> torch.Tensor:
    """Turn one wire value into a CPU tensor of the dtype its role asks for."""
    tensor, explicit = decode_raw(
        value, field=field, role=role, float_dtype=float_dtype, budget=budget
    )
    return coerce_role(tensor, field=field, role=role, float_dtype=float_dtype, explicit=explicit)


def decode_raw(
    value: Any,
    *,
    field: str,
    role: Role,
    float_dtype: torch.dtype,
    budget: ElementBudget,
) -> tuple[torch.Tensor, bool]:
    """Decode without applying the role; also says whether the dtype was explicit
    (an object form with a ``dtype``)."""
    if isinstance(value, NumericArray):
        budget.take(field, value.flat.size)
        tensor, explicit = _from_numeric(value, _wire_dtype(role, float_dtype)), False
    elif isinstance(value, dict):
        tensor, explicit = (
            _decode_object(value, field, role, float_dtype, budget),
            value.get("dtype") is not None,
        )
    elif isinstance(value, list | int | float | str) and not isinstance(value, bool):
        tensor, explicit = _decode_nested(value, field, role, float_dtype, budget), False
    else:
        raise invalid(
            field,
            "expected a tensor: a number, a nested array of numbers, or an object "
            f'{{"shape", "dtype", "data" | "b64"}}, got {_json_type(value)}',
        )
    return tensor, explicit


def coerce_role(
    tensor: torch.Tensor,
    *,
    field: str,
    role: Role,
    float_dtype: torch.dtype,
    explicit: bool,
) -> torch.Tensor:
    """Give a decoded tensor the dtype of its role.

    A float-role tensor sent with an explicit dtype keeps it (it must be a
    float dtype); an index-role tensor becomes int64 and must be integral.
    """
    if role == "float":
        if tensor.is_floating_point():
            return tensor if explicit or tensor.dtype == float_dtype else tensor.to(float_dtype)
        if explicit:
            raise invalid(
                field,
                f"expected a floating dtype ({', '.join(FLOAT_DTYPES)}), "
                f"got {dtype_name(tensor.dtype)}",
            )
        return tensor.to(float_dtype)
    if role == "index":
        if tensor.dtype == torch.int64:
            return tensor
        if tensor.dtype in INTEGER_DTYPES:
            return tensor.to(torch.int64)
        if tensor.is_floating_point():
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise invalid(field, "expected integer indices, got a non-finite value")
            if tensor.numel() and not bool((tensor == tensor.round()).all()):
                bad = tensor[tensor != tensor.round()][0].item()
                raise invalid(field, f"expected integer indices, got the fractional value {bad}")
            return tensor.to(torch.int64)
        raise invalid(field, f"expected integer indices, got dtype {dtype_name(tensor.dtype)}")
    return tensor


def _decode_object(
    value: dict[str, Any],
    field: str,
    role: Role,
    float_dtype: torch.dtype,
    budget: ElementBudget,
) -> torch.Tensor:
    unknown = set(value) - _FORM_KEYS
    if unknown:
        raise invalid(
            field,
            f"unknown key(s) {quote(sorted(unknown))} in a tensor object; expected "
            '"shape", "dtype" and one of "data" or "b64"',
        )
    if ("data" in value) == ("b64" in value):
        raise invalid(field, 'a tensor object needs exactly one of "data" or "b64"')
    shape = _shape(value.get("shape"), field)
    numel = math.prod(shape)
    budget.take(field, numel)

    dtype_field = value.get("dtype")
    if dtype_field is None:
        dtype = float_dtype if role != "index" else torch.int64
    elif isinstance(dtype_field, str) and dtype_field in DTYPES:
        dtype = DTYPES[dtype_field]
    else:
        raise invalid(
            (field, "dtype"), f"expected one of {', '.join(DTYPES)}, got {quote(dtype_field)}"
        )

    if "b64" in value:
        return _decode_b64(value["b64"], field, shape, numel, dtype)

    data = value["data"]
    if isinstance(data, NumericArray):
        if len(data.shape) != 1:
            raise invalid((field, "data"), "expected a flat array of numbers, got a nested array")
        if data.flat.size != numel:
            raise invalid(
                (field, "data"),
                f"expected {numel} elements for shape {shape}, got {data.flat.size}",
            )
        return _from_numeric(data, dtype).reshape(shape)
    if not isinstance(data, list):
        raise invalid((field, "data"), f"expected a flat array of numbers, got {_json_type(data)}")
    if len(data) != numel:
        raise invalid(
            (field, "data"),
            f"expected {numel} elements for shape {shape}, got {len(data)}",
        )
    flat = _tensor_from_list(data, (field, "data"), dtype, flat=True)
    if flat.dim() != 1:
        raise invalid((field, "data"), "expected a flat array of numbers, got a nested array")
    return flat.reshape(shape)


def _shape(raw: Any, field: str) -> list[int]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise invalid(
            (field, "shape"), f"expected an array of non-negative integers, got {quote(raw)}"
        )
    if len(raw) > MAX_DIMS:
        raise invalid((field, "shape"), f"expected at most {MAX_DIMS} dimensions, got {len(raw)}")
    return list(raw)


def _decode_b64(
    raw: Any, field: str, shape: list[int], numel: int, dtype: torch.dtype
) -> torch.Tensor:
    if not isinstance(raw, str):
        raise invalid((field, "b64"), f"expected a base64 string, got {_json_type(raw)}")
    try:
        data = pybase64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid((field, "b64"), f"invalid base64: {exc}") from None
    wire_dtype = torch.uint8 if dtype == torch.bool else dtype
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    if len(data) != numel * itemsize:
        raise invalid(
            (field, "b64"),
            f"expected {numel * itemsize} bytes ({numel} x {dtype_name(dtype)}) for shape "
            f"{shape}, got {len(data)}",
        )
    return bytes_to_tensor(data, wire_dtype, shape, as_bool=dtype == torch.bool)


def bytes_to_tensor(
    data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: list[int], *, as_bool: bool
) -> torch.Tensor:
    """Little-endian row-major bytes -> a tensor.

    A writable, aligned buffer (a slice of the request body the server read
    into a bytearray) is used in place; anything else is copied once.
    """
    if math.prod(shape, start=1) != 0:
        itemsize = torch.empty((), dtype=dtype).element_size()
        in_place = (
            not isinstance(data, bytes)
            and not memoryview(data).readonly
            and np.frombuffer(data, np.uint8).ctypes.data % itemsize == 0
        )
        buffer = data if in_place else bytearray(data)
        tensor = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    else:
        tensor = torch.empty(shape, dtype=dtype)
    return tensor != 0 if as_bool else tensor


def _decode_nested(
    value: list[Any] | int | float | str,
    field: str,
    role: Role,
    float_dtype: torch.dtype,
    budget: ElementBudget,
) -> torch.Tensor:
    shape = _nested_shape(value, field)
    budget.take(field, math.prod(shape))
    return _tensor_from_list(value, (field,), _wire_dtype(role, float_dtype), flat=False)


def _wire_dtype(role: Role, float_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a plain array is built in: the float dtype for float roles;
    None (int64 for integers, else float64, checked by coerce_role) otherwise."""
    return float_dtype if role == "float" else None


def _from_numeric(array: NumericArray, dtype: torch.dtype | None) -> torch.Tensor:
    """A simdjson-decoded array -> tensor: the same values ``torch.tensor`` gives
    for the same JSON numbers (one rounding from the parsed double)."""
    flat = torch.from_numpy(array.flat)
    if dtype is not None and flat.dtype != dtype:
        flat = flat.to(dtype)
    return flat.reshape(array.shape)


def _nested_shape(value: Any, field: str) -> list[int]:
    """The shape implied by the first element at each depth (ragged arrays are
    caught when the tensor is built)."""
    shape: list[int] = []
    while isinstance(value, list):
        if len(shape) == MAX_DIMS:
            raise invalid(field, f"nesting deeper than {MAX_DIMS} dimensions")
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


_NUMPY_CASTS: dict[torch.dtype | None, type[np.generic]] = {
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def _tensor_from_list(
    data: Any, loc: tuple[str, ...], dtype: torch.dtype | None, *, flat: bool
) -> torch.Tensor:
    """Nested lists -> tensor. numpy builds the array in C (int64 when every
    number is an integer, else float64) and the cast rounds once from that
    double, which is what ``torch.tensor(data, dtype=dtype)`` gives; anything
    numpy does not read as plain numbers takes torch's path and its errors."""
    try:
        array = np.array(data)
    except (TypeError, ValueError, OverflowError):
        array = None  # ragged: torch's path below says where
    if array is not None and array.dtype.kind in "if":
        if dtype in _NUMPY_CASTS:  # numpy rounds double -> float32 once, as torch does
            with np.errstate(over="ignore"):  # 1e308 -> inf in float32, as in torch
                array = array.astype(_NUMPY_CASTS[dtype], copy=False)
            return torch.from_numpy(array)
        tensor = torch.from_numpy(array)
        # float16/bfloat16 through torch: it rounds via float32, and so must we
        return tensor.to(dtype) if dtype is not None else tensor
    # Only booleans, strings, ragged rows and out-of-range integers get here.
    wire_dtype = dtype if dtype is not None else torch.float64  # coerce_role checks indices
    try:
        return torch.tensor(data, dtype=wire_dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        first_error = exc
    # Slow path: non-finite strings, or something that is not a number array.
    cleaned = _replace_nonfinite(data, loc, flat=flat)
    try:
        return torch.tensor(cleaned, dtype=wire_dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise invalid(loc, _describe_bad_array(first_error)) from None


def _describe_bad_array(exc: Exception) -> str:
    text = str(exc)
    if "expected sequence of length" in text:
        return f"ragged array: {text}; every row at one depth must have the same length"
    return f"expected a rectangular array of numbers: {text}"


def _replace_nonfinite(data: Any, loc: tuple[str, ...], *, flat: bool) -> Any:
    if isinstance(data, str):
        if data in NONFINITE_IN:
            return NONFINITE_IN[data]
        raise invalid(
            loc,
            f'expected a number or "NaN", "Infinity", "-Infinity", got the string {quote(data)}',
        )
    if isinstance(data, list):
        if flat and any(isinstance(x, list) for x in data):
            raise invalid(loc, "expected a flat array of numbers, got a nested array")
        return [_replace_nonfinite(x, loc, flat=flat) for x in data]
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise invalid(loc, f"expected a number, got {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a number"


# --------------------------------------------------------------------------- encode


def encode_tensor(tensor: torch.Tensor, encoding: Encoding) -> Any:
    """A tensor -> its wire form in the requested encoding."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if encoding == "b64":
        return {
            "shape": list(tensor.shape),
            "dtype": dtype_name(tensor.dtype),
            "b64": pybase64.b64encode(tensor_view(tensor)).decode("ascii"),
        }
    if encoding == "flat":
        return {
            "shape": list(tensor.shape),
            "dtype": dtype_name(tensor.dtype),
            "data": _jsonable(tensor.reshape(-1)),
        }
    return _jsonable(tensor)


def encode_scalar(tensor: torch.Tensor) -> float | int | bool | str:
    """A 0-dim tensor -> a JSON number (or a non-finite string)."""
    value = tensor.detach().item()
    if isinstance(value, float) and not math.isfinite(value):
        return _nonfinite_text(value)
    return value


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """Little-endian row-major bytes of a CPU tensor, without a copy when it is
    contiguous (the view keeps the tensor's memory alive)."""
    flat = tensor.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().data


def _jsonable(tensor: torch.Tensor) -> Any:
    """Nested JSON for a tensor, written by orjson from the numpy buffer (no
    Python object per element). Floats are written as the exact float64 value
    of each element, as ``tensor.tolist()`` would give them."""
    if tensor.is_floating_point():
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return _strings_for_nonfinite(tensor.tolist())
        tensor = tensor.to(torch.float64)
    array = np.ascontiguousarray(tensor.numpy())
    return orjson.Fragment(orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY))


def _strings_for_nonfinite(data: Any) -> Any:
    if isinstance(data, list):
        return [_strings_for_nonfinite(x) for x in data]
    if isinstance(data, float) and not math.isfinite(data):
        return _nonfinite_text(data)
    return data


def _nonfinite_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
