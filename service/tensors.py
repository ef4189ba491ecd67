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
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
import pybase64
import torch

from service.dtypes import DTYPE_NAMES, DTYPES
from service.errors import PayloadTooLarge, invalid, quote
from service.fastjson import MAX_DIMS as MAX_DIMS  # re-exported: the codec's limit
from service.fastjson import NONFINITE_IN as NONFINITE_IN
from service.fastjson import (
    ArrayError,
    InvalidArray,
    NumericArray,
    json_type,
    read_numbers,
)

if TYPE_CHECKING:
    from service.config import Settings

Role = Literal["float", "index", "any"]
Encoding = Literal["nested", "flat", "b64"]

FLOAT_DTYPES: dict[str, torch.dtype] = {k: v for k, v in DTYPES.items() if v.is_floating_point}
INTEGER_DTYPES = frozenset({torch.int64, torch.int32, torch.uint8})
INTEGER_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.int64: (-(2**63), 2**63 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
    torch.uint8: (0, 255),
}

# A tensor's dimensions, zeros aside, multiply to less than this: its strides
# and its size in bytes (8 per element at most) then fit in int64, as torch
# and numpy need even when a zero dimension leaves it without elements.
MAX_EXTENT = 2**60
# The nested JSON of a tensor without elements still holds one [] per row
# before its first zero dimension; more rows than this are refused (413).
MAX_NESTED_EMPTY_ROWS = 2**26
# Every integer up to this magnitude is exact in a double (float64).
_EXACT_IN_DOUBLE = 2**53
_FORM_KEYS = frozenset({"shape", "dtype", "data", "b64"})
_FLAT = "expected a flat array of numbers, got a nested array"


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

    def take(self, field: str, count: int, extent: int | None = None) -> None:
        """``count`` elements for ``field``. ``extent``, the product of its
        dimensions with zeros left out, is what the per-tensor limit weighs
        when given: a [0, 2**40] tensor holds nothing but is no small tensor
        (its nested JSON, a reduction over its empty dimension)."""
        span = count if extent is None else max(count, extent)
        if span > self.per_tensor:
            what = f"{count} elements" if span == count else f"no elements but spans {span}"
            raise PayloadTooLarge(
                f"{field}: {what}, more than the limit of {self.per_tensor} per tensor "
                "(LOSS_SERVICE_MAX_ELEMENTS_PER_TENSOR)"
            )
        self.used += count
        if self.used > self.limit:
            raise PayloadTooLarge(
                f"{field}: the request's tensors hold more than {self.limit} elements "
                f"in all (limit LOSS_SERVICE_MAX_TENSOR_ELEMENTS)"
            )


def check_dims(shape: list[int], loc: str | tuple[str | int, ...]) -> int:
    """A shape's extent (the product of its non-zero dimensions), or a 422 at
    ``loc`` when a dimension is outside int64 (also one that JSON parsing made
    a double) or they multiply past MAX_EXTENT."""
    extent = 1
    for index, size in enumerate(shape):
        if size >= 2**63:
            raise invalid(
                loc,
                f"dimension {index} is {int(size)}, outside int64: each dimension must be a "
                "non-negative integer below 2**63",
            )
        extent *= max(size, 1)
        if extent >= MAX_EXTENT:
            raise invalid(
                loc,
                f"the dimensions {quote(shape)} overflow: leaving out zeros, they must "
                "multiply to less than 2**60",
            )
    return extent


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
    (an object form with a ``dtype``). A tensor that arrived decoded (v2)
    passes through with its dtype explicit; it was counted when decoded."""
    if type(value) is list:  # the common case first: a nested array
        return _decode_nested(value, field, role, float_dtype, budget), False
    if isinstance(value, torch.Tensor):
        tensor, explicit = value, True
    elif isinstance(value, NumericArray):
        budget.take(field, value.flat.size)
        tensor, explicit = _from_numeric(value, (field,), _wire_dtype(role, float_dtype)), False
    elif isinstance(value, InvalidArray):
        raise invalid(field, value.reason)
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
            f'{{"shape", "dtype", "data" | "b64"}}, got {json_type(value)}',
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
    float dtype); an index-role tensor becomes int64 and must hold integers
    that int64 holds (never wrapped).
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
        if tensor.dtype == torch.bool:
            raise invalid(field, "expected integer indices, got dtype bool")
        return to_integers(tensor, field, torch.int64, "integer indices")
    return tensor


def to_integers(
    tensor: torch.Tensor, loc: str | tuple[str | int, ...], dtype: torch.dtype, what: str
) -> torch.Tensor:
    """``tensor`` as ``dtype`` (int64, int32 or uint8), or a 422 at ``loc`` for
    a value that is not an integer or lies outside the dtype's range: a JSON
    number is never truncated or wrapped into an index."""
    if tensor.dtype == dtype:
        return tensor
    if tensor.numel() and tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise invalid(loc, f"expected {what}, got a non-finite value")
        fractional = tensor != tensor.round()
        if bool(fractional.any()):
            raise invalid(
                loc, f"expected {what}, got the fractional value {tensor[fractional][0].item()}"
            )
    low, high = INTEGER_RANGES[dtype]
    if tensor.is_floating_point():
        # As floats: 2**63 is exact there, where 2**63 - 1 would round up to it.
        # Past 2**53 a double holds no exact integer: a JSON number read as one
        # (written with a fraction or exponent, or an integer past int64) may
        # not be what was sent; -2**63 - 1 reads as -2**63, a valid index.
        below = tensor < float(max(low, -_EXACT_IN_DOUBLE))
        above = tensor > _EXACT_IN_DOUBLE if high > _EXACT_IN_DOUBLE else tensor >= float(high + 1)
        outside = below | above
    elif tensor.dtype != torch.bool and (
        torch.iinfo(tensor.dtype).min < low or torch.iinfo(tensor.dtype).max > high
    ):
        outside = (tensor < low) | (tensor > high)  # narrowing: the bounds fit the source
    else:
        outside = None
    if outside is not None and tensor.numel() and bool(outside.any()):
        bad = int(tensor[outside][0].item())
        if low <= bad <= high:
            raise invalid(
                loc,
                f"expected {what}, got {bad}: past 2**53 an index must be a JSON integer "
                "within int64 (this one was read as a double, which does not hold it exactly)",
            )
        raise invalid(
            loc, f"expected {what} within {dtype_name(dtype)}'s range [{low}, {high}], got {bad}"
        )
    return tensor.to(dtype)


def has_fractions(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds a finite value that is not an integer (so it
    cannot be class indices)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return False
    finite = tensor[torch.isfinite(tensor)]
    return bool((finite != finite.round()).any())


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
    shape = tensor_shape(value.get("shape"), (field, "shape"))
    numel = math.prod(shape)
    budget.take(field, numel, check_dims(shape, (field, "shape")))

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
    loc = (field, "data")
    if isinstance(data, InvalidArray):
        raise invalid(loc, _FLAT if data.nested else data.reason)
    if isinstance(data, NumericArray):
        if len(data.shape) != 1:
            raise invalid(loc, _FLAT)
        if data.flat.size != numel:
            raise invalid(loc, f"expected {numel} elements for shape {shape}, got {data.flat.size}")
        return _from_numeric(data, loc, dtype).reshape(shape)
    if not isinstance(data, list):
        raise invalid(loc, f"expected a flat array of numbers, got {json_type(data)}")
    if len(data) != numel:
        raise invalid(loc, f"expected {numel} elements for shape {shape}, got {len(data)}")
    return _tensor_from_list(data, loc, dtype, [numel], flat=True).reshape(shape)


def tensor_shape(raw: Any, loc: str | tuple[str | int, ...]) -> list[int]:
    """A shape as sent: an array of at most MAX_DIMS non-negative integers
    (check_dims then says whether they fit in int64)."""
    if (
        not isinstance(raw, list)
        or len(raw) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw)
    ):
        if isinstance(raw, list) and len(raw) > MAX_DIMS:
            raise invalid(loc, f"expected at most {MAX_DIMS} dimensions, got {len(raw)}")
        raise invalid(loc, f"expected an array of non-negative integers, got {quote(raw)}")
    return list(raw)


def _decode_b64(
    raw: Any, field: str, shape: list[int], numel: int, dtype: torch.dtype
) -> torch.Tensor:
    if not isinstance(raw, str):
        raise invalid((field, "b64"), f"expected a base64 string, got {json_type(raw)}")
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
    count = math.prod(shape)
    # the extent leaves zero dimensions out: with none, it is the count
    budget.take(field, count, count or math.prod([size or 1 for size in shape]))
    return _tensor_from_list(
        value, (field,), float_dtype if role == "float" else None, shape, flat=False
    )


# Arrays of at most this many elements may be read before the element
# budget is charged for them (small_tensor)
SMALL_ARRAY = 256


def small_tensor(
    data: list[Any], field: str, dtype: torch.dtype, shape: list[int]
) -> torch.Tensor | None:
    """A small array (flat or nested, 1 to SMALL_ARRAY plain numbers, as many
    as ``shape`` takes) -> the tensor of ``shape`` and ``dtype`` (a float
    dtype, or int64) that the general path gives, in one step; None for
    anything else (non-finite strings, booleans, ragged rows, integers past
    int64, more elements), which the general path then reads and explains.
    The caller charges the element budget."""
    numel = math.prod(shape)
    if not 0 < numel <= SMALL_ARRAY:
        return None
    count, row = 1, data  # the elements the first row at each depth implies
    while type(row) is list and row and count <= SMALL_ARRAY:
        count *= len(row)
        row = row[0]
    if count != numel:
        return None
    try:
        array = np.array(data)
    except (TypeError, ValueError, OverflowError):
        return None
    kind = array.dtype.kind
    if (
        array.size != numel
        or array.ndim > MAX_DIMS
        or not (kind == "i" or (kind == "f" and dtype.is_floating_point))
    ):
        return None  # floats where integers go: the general path checks them
    return _from_array(array.reshape(shape), (field,), dtype)


def _wire_dtype(role: Role, float_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a plain array is built in: the float dtype for float roles;
    None (int64 for integers, else float64, checked by coerce_role) otherwise."""
    return float_dtype if role == "float" else None


def _from_numeric(
    array: NumericArray, loc: tuple[str, ...], dtype: torch.dtype | None
) -> torch.Tensor:
    """A simdjson-decoded array -> tensor: the same values ``torch.tensor`` gives
    for the same JSON numbers."""
    return _from_array(array.flat, loc, dtype).reshape(array.shape)


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


# A number past float32's range becomes infinite in a float32 tensor, as in
# torch; numpy's cast warns then, and that warning is ignored for the casts
# of this module (and no other code's). Where warnings are errors (the tests)
# the cast raises instead and is made again with numpy's overflow check off:
# that errstate costs as much as the cast of a small tensor (~1 us), so only
# a cast that overflowed pays it.
warnings.filterwarnings(
    "ignore", "overflow encountered in cast", RuntimeWarning, module=r"service\.tensors$"
)


def _narrow(array: np.ndarray[Any, Any], dtype: type[np.generic]) -> np.ndarray[Any, Any]:
    """``array`` cast to ``dtype``, overflow quietly infinite."""
    try:
        return array.astype(dtype, copy=False)
    except RuntimeWarning:
        return _narrow_quietly(array, dtype)


@np.errstate(over="ignore")  # as a decorator, made once: it only sets a context variable
def _narrow_quietly(array: np.ndarray[Any, Any], dtype: type[np.generic]) -> np.ndarray[Any, Any]:
    return array.astype(dtype, copy=False)


def _exact_in_double(array: np.ndarray[Any, Any]) -> bool:
    return not array.size or (array.max() <= _EXACT_IN_DOUBLE and array.min() >= -_EXACT_IN_DOUBLE)


def _tensor_from_list(
    data: Any, loc: tuple[str, ...], dtype: torch.dtype | None, shape: list[int], *, flat: bool
) -> torch.Tensor:
    """Nested lists of ``shape`` (the first element's at each depth) -> tensor.

    numpy builds the array in C when every element is a number or a boolean
    (int64 when every number is an integer, else float64); anything else
    (the non-finite strings, ragged rows, something that is not a number)
    is read one element at a time into a float64 buffer, which stops at the
    first element that is not a number in its place.
    """
    try:
        array = np.array(data)
    except (TypeError, ValueError, OverflowError):
        array = None  # ragged, or deeper than numpy goes: read_numbers says where
    if array is not None and array.dtype.kind in "iufb" and (not flat or array.ndim == 1):
        return _from_array(array, loc, dtype)
    try:
        numbers = read_numbers(data, shape)
    except ArrayError as exc:
        raise invalid(loc, _FLAT if flat and exc.nested else exc.reason) from None
    return _from_array(numbers.reshape(shape), loc, dtype)


def _from_array(
    array: np.ndarray[Any, Any], loc: tuple[str, ...], dtype: torch.dtype | None
) -> torch.Tensor:
    """A numpy array of JSON numbers -> the tensor ``torch.tensor(numbers,
    dtype=dtype)`` builds: every number goes through a double, as torch reads
    a Python number, and is rounded once from it (an int64 straight to float32
    would round differently beyond 2**53). With no dtype, integers stay int64
    and anything else is float64."""
    kind = array.dtype.kind
    if kind == "f" and dtype in _NUMPY_CASTS:  # the common case first, in one step
        return torch.from_numpy(_narrow(array, _NUMPY_CASTS[dtype]))
    if dtype is torch.int64 and array.dtype == np.int64:  # integers asked as they came (OIP INT64)
        return torch.from_numpy(array)
    float_dtype = dtype is not None and dtype.is_floating_point
    if kind in "ub" or (float_dtype and kind == "i" and not _exact_in_double(array)):
        array = array.astype(np.float64)  # past int64, booleans, or integers past 2**53
    if dtype is None:
        return torch.from_numpy(array)
    if dtype.is_floating_point:
        if dtype in _NUMPY_CASTS:  # numpy rounds double -> float32 once, as torch does
            return torch.from_numpy(_narrow(array, _NUMPY_CASTS[dtype]))
        # float16/bfloat16 through torch: it rounds via float32, and so must we
        return torch.from_numpy(array).to(dtype)
    tensor = torch.from_numpy(array)
    if dtype == torch.bool:
        return tensor.to(torch.bool)
    return to_integers(tensor, loc, dtype, f"integers (dtype {dtype_name(dtype)})")


# --------------------------------------------------------------------------- encode


# Results from a GPU at least this large come back through pinned memory.
PINNED_RESULT_MIN_BYTES = 1024 * 1024


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A result on the CPU, to be encoded. A large one on a GPU is copied into
    page-locked memory (torch's host allocator keeps such blocks for reuse):
    the DMA engine then writes it at full speed, where a copy into pageable
    memory goes through the driver's staging buffer at a fraction of it."""
    if tensor.device.type == "cpu":
        return tensor.detach() if tensor.requires_grad else tensor
    tensor = tensor.detach()
    if tensor.nbytes < PINNED_RESULT_MIN_BYTES:
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)  # synchronous: the bytes are there when it returns
    return host


def encode_tensor(tensor: torch.Tensor, encoding: Encoding) -> Any:
    """A tensor -> its wire form in the requested encoding. Never fails for a
    tensor torch made: no numpy array is built for one without elements, and
    a 0-dim tensor is a bare number in the nested form."""
    tensor = to_host(tensor)
    if encoding == "b64":
        return {
            "shape": list(tensor.shape),
            "dtype": dtype_name(tensor.dtype),
            # a fragment: the base64 text goes into the response as it is,
            # without a str copy that orjson would then copy again
            "b64": orjson.Fragment(b'"' + pybase64.b64encode(tensor_view(tensor)) + b'"'),
        }
    if encoding == "flat":
        return {
            "shape": list(tensor.shape),
            "dtype": dtype_name(tensor.dtype),
            "data": encode_flat(tensor),
        }
    if tensor.dim() == 0:
        return encode_scalar(tensor)
    return _jsonable(tensor)


def encode_flat(tensor: torch.Tensor) -> Any:
    """A CPU tensor's elements as one flat JSON array (row-major)."""
    return _jsonable(tensor if tensor.dim() == 1 else tensor.reshape(-1))


def encode_scalar(tensor: torch.Tensor) -> float | int | bool | str:
    """A 0-dim tensor -> a JSON number (or a non-finite string)."""
    value = tensor.item()  # reads the value: no detach needed, even with grad
    if isinstance(value, float) and not math.isfinite(value):
        return _nonfinite_text(value)
    return value


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """Little-endian row-major bytes of a CPU tensor, without a copy when it is
    contiguous (the view keeps the tensor's memory alive). Any layout: empty,
    strided, expanded, or a size-1 dimension with any stride."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.stride(0) != 1:  # a strided view, or one element at any stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).numpy().data


def _jsonable(tensor: torch.Tensor) -> Any:
    """Nested JSON for a tensor, written by orjson from the numpy buffer (no
    Python object per element). Floats are written as the exact float64 value
    of each element, as ``tensor.tolist()`` would give them, and the
    non-finite ones as the strings of contract section 3."""
    if tensor.numel() == 0:
        return orjson.Fragment(_empty_nested(list(tensor.shape)))
    if tensor.numel() <= SMALL_JSON:
        # tolist() gives each element's exact float64 value too, and orjson
        # writes a Python float as it writes a numpy float64; for a few
        # elements that costs a fraction of the cast, the array and its
        # finiteness check. A non-finite one comes out as null: then the
        # general path below writes its string.
        text = orjson.dumps(tensor.tolist())
        if b"null" not in text:
            return orjson.Fragment(text)
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    return orjson.Fragment(_dump(np.ascontiguousarray(tensor.numpy())))


# Results of at most this many elements are written from Python numbers.
SMALL_JSON = 256
# Elements written per orjson call: each call holds the GIL for about a
# millisecond, so a large response never keeps the event loop waiting long.
JSON_CHUNK = 1 << 16
NONFINITE_TOKENS = (b'"NaN"', b'"Infinity"', b'"-Infinity"')


def _dump(array: np.ndarray[Any, Any]) -> bytes:
    """The JSON of a non-empty array, in pieces of at most ``JSON_CHUNK``
    elements along its first dimension (or per row, for rows larger)."""
    if array.ndim == 0 or array.size <= JSON_CHUNK:
        return _dump_piece(array)
    row = array[0].size
    if row > JSON_CHUNK:
        return b"[" + b",".join(_dump(r) for r in array) + b"]"
    step = JSON_CHUNK // row
    pieces = (_dump_piece(array[i : i + step])[1:-1] for i in range(0, len(array), step))
    return b"[" + b",".join(pieces) + b"]"


def _dump_piece(array: np.ndarray[Any, Any]) -> bytes:
    text = orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)
    if array.dtype.kind != "f":
        return text
    bad = ~np.isfinite(array)
    if not bad.any():
        return text
    # orjson writes a non-finite float as null: put the strings in their
    # place, in row-major order (no number is ever written as null)
    values = array[bad]
    codes = np.where(np.isnan(values), 0, np.where(values > 0, 1, 2))
    if (codes == codes[0]).all():
        return text.replace(b"null", NONFINITE_TOKENS[int(codes[0])])
    parts = text.split(b"null")
    out = [parts[0]]
    for code, part in zip(codes.tolist(), parts[1:], strict=True):
        out += (NONFINITE_TOKENS[code], part)
    return b"".join(out)


def _empty_nested(shape: list[int]) -> bytes:
    """The nested JSON of a tensor without elements: one [] per row before its
    first zero dimension (what comes after a zero dimension writes nothing)."""
    first_zero = shape.index(0)
    rows = math.prod(shape[:first_zero])
    if rows > MAX_NESTED_EMPTY_ROWS:
        raise PayloadTooLarge(
            f"a result of shape {shape} has no elements, but its nested JSON would hold {rows} "
            f'empty arrays (more than {MAX_NESTED_EMPTY_ROWS}); ask for encoding "flat" or "b64"'
        )
    empty = np.empty(shape[: first_zero + 1], np.float64)
    return orjson.dumps(empty, option=orjson.OPT_SERIALIZE_NUMPY)


def _nonfinite_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
