"""JSON request bodies, parsed without a Python object per number.

Small bodies go through orjson. Large ones are parsed by simdjson, and every
large array of numbers (nested or flat) comes out as a ``NumericArray``: one
flat numpy buffer (float64, or int64 when every number is an integer) and
the shape, checked to be rectangular. Arrays that hold anything else (the
non-finite strings, booleans, ragged rows, numbers out of range) come out as
plain Python lists, so the codec's slower path gives the same answers and the
same errors as before.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
import simdjson

from service.errors import FieldError, InvalidPayload

# Below these sizes orjson's Python objects cost less than simdjson's proxies.
SIMDJSON_MIN_BODY = 64 * 1024
NUMERIC_MIN_ELEMENTS = 256
# Parsers keep their buffers; reuse one per thread for bodies up to this size,
# and give larger documents a parser of their own that is freed afterwards.
REUSED_PARSER_MAX_BODY = 4 * 1024 * 1024

_local = threading.local()


@dataclass(frozen=True, eq=False)
class NumericArray:
    """A rectangular JSON array of numbers, decoded in C."""

    flat: np.ndarray[Any, Any]  # 1-D, float64 or int64
    shape: tuple[int, ...]

    def __repr__(self) -> str:
        return f"<array of shape {list(self.shape)}>"


def loads(body: bytes | bytearray | memoryview) -> Any:
    """Parse a request body; 422 when it is not JSON."""
    if len(body) < SIMDJSON_MIN_BODY:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _invalid(str(exc)) from None
    parser = _parser(len(body))
    try:
        document = parser.parse(body)
    except (ValueError, RuntimeError) as exc:
        raise _invalid(str(exc)) from None
    try:
        return _convert(document)
    finally:
        del document


def _parser(size: int) -> simdjson.Parser:
    if size > REUSED_PARSER_MAX_BODY:
        return simdjson.Parser()
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _invalid(message: str) -> InvalidPayload:
    return InvalidPayload([FieldError(("body",), f"invalid JSON: {message}")])


def _convert(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return {key: _convert(value[key]) for key in value.keys()}  # noqa: SIM118
    if isinstance(value, simdjson.Array):
        numeric = _numeric(value)
        if numeric is not None:
            return numeric
        return [_convert(item) for item in value]
    return value


def _numeric(array: simdjson.Array) -> NumericArray | None:
    """The array as one flat buffer, or None when it is small, ragged or not
    all numbers."""
    shape: list[int] = []
    node: Any = array
    while isinstance(node, simdjson.Array):
        shape.append(len(node))
        if not shape[-1]:
            break
        node = node[0]
    if isinstance(node, bool) or not isinstance(node, int | float | simdjson.Array):
        return None
    count = math.prod(shape)
    if count < NUMERIC_MIN_ELEMENTS:
        return None
    flat: np.ndarray[Any, Any] | None = None
    buffer_types: tuple[tuple[Literal["i", "d"], type[np.generic]], ...] = (
        ("i", np.int64),
        ("d", np.float64),
    )
    for of_type, dtype in buffer_types:
        try:
            flat = np.frombuffer(array.as_buffer(of_type=of_type), dtype=dtype)
            break
        except (TypeError, ValueError):
            continue
    if flat is None or flat.size != count or not _rectangular(array, shape):
        return None
    return NumericArray(flat, tuple(shape))


def _rectangular(array: simdjson.Array, shape: list[int]) -> bool:
    """Every sub-array at depth d has length shape[d] (the flat count alone
    cannot tell [[1, 2], [3], [4, 5, 6]] from a 3 x 2 array)."""
    if len(shape) < 2:
        return True
    rows = [array]
    for length in shape[1:]:
        next_rows = []
        for row in rows:
            for item in row:
                if not isinstance(item, simdjson.Array) or len(item) != length:
                    return False
                next_rows.append(item)
        rows = next_rows
    return True
