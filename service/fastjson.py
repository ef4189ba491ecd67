"""JSON request bodies, parsed without a Python object per number.

Small bodies go through orjson. Large ones are parsed by simdjson, and every
large array of numbers (nested or flat) comes out as a ``NumericArray``: one
flat numpy buffer (float64, or int64 when every number is an integer) and
the shape, checked to be rectangular. A large array that holds the
non-finite strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` among its
numbers is read straight into a float64 buffer too (``read_numbers``); one
that holds anything else a tensor cannot (another string, null, an object,
ragged rows) comes out as an ``InvalidArray`` saying why, found without
building the rest, and the codec gives it the same 422 as the small-body path.

Nesting is walked with an explicit stack, never by recursion, and a document
nested deeper than any tensor needs (``MAX_DEPTH``) is a 422 naming the field.
A parser whose document proxies may outlive a failed conversion is never
reused: each thread keeps a parser only while every parse on it succeeds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import numpy as np
import orjson
import simdjson

from service.errors import FieldError, InvalidPayload, quote

# Below these sizes orjson's Python objects cost less than simdjson's proxies.
SIMDJSON_MIN_BODY = 64 * 1024
NUMERIC_MIN_ELEMENTS = 256
# Parsers keep their buffers; reuse one per thread for bodies up to this size,
# and give larger documents a parser of their own that is freed afterwards.
REUSED_PARSER_MAX_BODY = 4 * 1024 * 1024
# simdjson refuses integers beyond 64 bits, which orjson (and torch) read as
# doubles; bodies up to this size that hold one are parsed again by orjson
# (larger ones would cost a Python object per number, so they stay a 422).
ORJSON_RETRY_MAX_BODY = REUSED_PARSER_MAX_BODY

# The most dimensions a tensor has (service.tensors re-exports it), and the
# deepest JSON a request needs: a tensor inside the deepest envelope, a batch
# item's object form ({"items": [{"input": {"data": ...}}]}), with room to spare.
MAX_DIMS = 64
MAX_DEPTH = MAX_DIMS + 8
# No request object has more keys than this (a loss's fields and options, v2
# parameters); a larger one is refused before its keys are looked up one by one.
MAX_KEYS = 1024

NONFINITE_IN: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_CHUNK = 4096  # numbers converted per numpy call on the slow path

_local = threading.local()


@dataclass(frozen=True, eq=False)
class NumericArray:
    """A rectangular JSON array of numbers, decoded in C."""

    flat: np.ndarray[Any, Any]  # 1-D, float64 or int64
    shape: tuple[int, ...]

    def __repr__(self) -> str:
        return f"<array of shape {list(self.shape)}>"


@dataclass(frozen=True, eq=False)
class InvalidArray:
    """A large JSON array that is not a tensor: why, for the field that holds it.

    ``nested`` says whether it is more than a flat array (rows, or an array
    where a number should be), which the flat ``data`` form refuses as such.
    """

    reason: str
    nested: bool

    def __repr__(self) -> str:
        return "<an array that is not a tensor>"


class ArrayError(ValueError):
    """``read_numbers`` found something that is not a number in its place."""

    def __init__(self, reason: str, *, nested: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.nested = nested


def loads(body: bytes | bytearray | memoryview) -> Any:
    """Parse a request body; 422 when it is not JSON or nests too deep."""
    if len(body) < SIMDJSON_MIN_BODY:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return _orjson(body)  # which says why
    parser = _take_parser(len(body))
    try:
        document = parser.parse(body)
    except (ValueError, RuntimeError) as exc:
        text = str(exc)
        if not text.startswith("Tried to re-use"):  # a failed parse leaves no proxy
            _give_back(parser, len(body))
        if text.startswith(("NUMBER_ERROR", "BIGINT_ERROR")) and len(body) <= ORJSON_RETRY_MAX_BODY:
            return _orjson(body)
        raise _invalid(text) from None
    # Only a conversion that ends normally leaves no proxy of this document
    # alive (an exception's traceback holds them); only then is the parser reused.
    result = _Converter(body).convert(document)
    del document
    _give_back(parser, len(body))
    return result


def _orjson(body: bytes | bytearray | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "depth" in text or "recursion" in text:
            raise _invalid(
                f"nested deeper than orjson's limit of 1024 levels ({text}); "
                f"a tensor has at most {MAX_DIMS} dimensions"
            ) from None
        raise _invalid(text) from None


def count_byte(body: bytes | bytearray | memoryview, byte: int, step: int = 1 << 20) -> int:
    """How often ``byte`` occurs in ``body``, a megabyte at a time: numpy
    compares with SIMD (about 3x ``bytes.count``), needs no body-sized
    temporary, and each piece holds the GIL for well under a millisecond."""
    array = np.frombuffer(body, np.uint8)
    return sum(
        int(np.count_nonzero(array[i : i + step] == byte)) for i in range(0, len(array), step)
    )


def _take_parser(size: int) -> simdjson.Parser:
    """A parser for one document: the thread's own (taken out of reuse until
    the document is converted), or a fresh one for a large body."""
    parser: simdjson.Parser | None = getattr(_local, "parser", None)
    if size > REUSED_PARSER_MAX_BODY or parser is None:
        return simdjson.Parser()
    _local.parser = None
    return parser


def _give_back(parser: simdjson.Parser, size: int) -> None:
    if size <= REUSED_PARSER_MAX_BODY:
        _local.parser = parser


def _invalid(message: str, loc: tuple[str | int, ...] = ()) -> InvalidPayload:
    return InvalidPayload([FieldError(("body", *loc), f"invalid JSON: {message}")])


# --------------------------------------------------------------------------- simdjson


class _Open:
    """A container being converted: its items still to come, what they go
    into, and where it is (object keys, and the indices of arrays of objects:
    the path an error names)."""

    __slots__ = ("indexed", "items", "out", "path")

    def __init__(
        self,
        items: Iterator[tuple[Any, Any]],
        out: dict[str, Any] | list[Any],
        path: list[str | int],
        indexed: bool,
    ) -> None:
        self.items = items
        self.out = out
        self.path = path
        self.indexed = indexed


class _Converter:
    """simdjson proxies -> Python values, NumericArray and InvalidArray, walking
    the document with an explicit stack at most MAX_DEPTH deep.

    ``as_buffer`` flattens nested arrays, so an array read in C could hide one
    where a number belongs ([[1, [5]], [3, 4]] has 2 x 2 numbers in rows of 2).
    Every "[" of the body is accounted for instead: one per array walked, the
    rows a decoded array's shape implies, those inside strings. Only when the
    body holds more is each decoded array checked on its own (and read again,
    number by number, where it hides one).
    """

    def __init__(self, body: bytes | bytearray | memoryview) -> None:
        self.body = body
        self.max_numbers = len(body) // 2 + 1  # a number and its comma take 2 bytes at least
        self.accounted = 0
        # strings are counted only when some array was decoded (a body of
        # base64 strings is never scanned for "[")
        self.strings: list[str] = []
        self.decoded: list[tuple[dict[str, Any] | list[Any], Any, simdjson.Array, list[int]]] = []
        self.invalid = False

    def convert(self, document: Any) -> Any:
        holder: list[Any] = []
        stack = [_Open(iter([(0, document)]), holder, [], indexed=False)]
        while stack:
            top = stack[-1]
            for key, item in top.items:
                if isinstance(key, str):
                    self.strings.append(key)
                value, child = self.start(item, [*top.path, key] if top.indexed else top.path)
                if isinstance(top.out, dict):
                    top.out[key] = value
                else:
                    top.out.append(value)
                if isinstance(value, NumericArray):
                    self.decoded.append((top.out, key, item, list(value.shape)))
                if child is not None:
                    if len(stack) > MAX_DEPTH:
                        raise InvalidPayload(
                            [
                                FieldError(
                                    ("body", *top.path),
                                    f"JSON nested deeper than {MAX_DEPTH} levels; a tensor "
                                    f"has at most {MAX_DIMS} dimensions",
                                )
                            ]
                        )
                    stack.append(child)
                    break
            else:
                stack.pop()
        self.check_decoded()
        return holder[0]

    def start(self, value: Any, path: list[str | int]) -> tuple[Any, _Open | None]:
        """A scalar as it is, a numeric array decoded, or an empty container
        and the record that fills it."""
        if isinstance(value, str):
            self.strings.append(value)
            return value, None
        if isinstance(value, simdjson.Object):
            if len(value) > MAX_KEYS:
                raise InvalidPayload(
                    [
                        FieldError(
                            ("body", *path),
                            f"a JSON object with {len(value)} keys; no request has more "
                            f"than {MAX_KEYS}",
                        )
                    ]
                )
            out: dict[str, Any] = {}
            # items() would convert every value, recursively; each key is looked
            # up instead (a scan of the object, hence MAX_KEYS)
            pairs = ((key, value[key]) for key in value.keys())  # noqa: SIM118
            return out, _Open(pairs, out, path, indexed=True)
        if isinstance(value, simdjson.Array):
            array = _array(value, self.max_numbers)
            if isinstance(array, NumericArray):
                self.accounted += _rows(list(array.shape))
                return array, None
            if isinstance(array, InvalidArray):
                self.invalid = True
                return array, None
            self.accounted += 1
            items: list[Any] = []
            return items, _Open(enumerate(value), items, path, indexed=_holds_objects(value))
        return value, None

    def check_decoded(self) -> None:
        if self.invalid or not self.decoded:
            self.decoded.clear()
            return
        self.accounted += sum(text.count("[") for text in self.strings)
        if self.accounted == count_byte(self.body, ord("[")):
            self.decoded.clear()
            return
        # rare: a "[" unaccounted for (or a string's "\u005b"): check each array
        for out, key, source, shape in self.decoded:
            text = source.mini  # bytes, whatever the stubs say
            found = text.count(b"[") if isinstance(text, bytes) else text.count("[")
            if found != _rows(shape):
                try:
                    out[key] = NumericArray(read_numbers(source, shape, exact=True), tuple(shape))
                except ArrayError as exc:
                    out[key] = InvalidArray(exc.reason, exc.nested or len(shape) > 1)
        self.decoded.clear()


def _rows(shape: list[int]) -> int:
    """How many arrays a rectangular nested array of ``shape`` is made of."""
    return sum(math.prod(shape[:depth]) for depth in range(len(shape)))


def _holds_objects(array: simdjson.Array) -> bool:
    # the index names a place only in an array of objects (batch items, v2 inputs)
    return len(array) > 0 and isinstance(array[0], simdjson.Object)


def _array(array: simdjson.Array, max_numbers: int) -> NumericArray | InvalidArray | None:
    """A large array that starts like a tensor (its first leaf a number or a
    non-finite string) as one flat buffer, or why it is not a tensor; None for
    small arrays and for arrays of anything else. ``max_numbers`` bounds what
    the body can hold (the first row at each depth may promise far more)."""
    shape: list[int] = []
    node: Any = array
    while isinstance(node, simdjson.Array):
        if len(shape) == MAX_DIMS:
            return None  # deeper than a tensor: the walk refuses it
        shape.append(len(node))
        if not shape[-1]:
            break
        node = node[0]
    if isinstance(node, bool) or not isinstance(node, int | float | str | simdjson.Array):
        return None
    if isinstance(node, str) and node not in NONFINITE_IN:
        return None
    count = math.prod(shape)
    if count < NUMERIC_MIN_ELEMENTS:
        return None
    if count > max_numbers:
        return InvalidArray(
            f"ragged array: its first row at each depth, {shape}, promises {count} numbers, "
            "more than the body holds; every row at one depth must have the same length",
            nested=True,
        )
    buffer_types: tuple[tuple[Literal["i", "d"], type[np.generic]], ...] = (
        ("i", np.int64),
        ("d", np.float64),
    )
    for of_type, dtype in buffer_types:
        try:
            flat = np.frombuffer(array.as_buffer(of_type=of_type), dtype=dtype)
        except (TypeError, ValueError):
            continue
        if flat.size == count and _rectangular(array, shape):
            return NumericArray(flat, tuple(shape))
        break
    try:
        return NumericArray(read_numbers(array, shape), tuple(shape))
    except ArrayError as exc:
        return InvalidArray(exc.reason, exc.nested or len(shape) > 1)


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


# --------------------------------------------------------------------------- numbers


def _is_array(value: Any) -> bool:
    return isinstance(value, list | simdjson.Array)


def read_numbers(value: Any, shape: list[int], *, exact: bool = False) -> np.ndarray[Any, Any]:
    """The numbers of a nested array of ``shape`` (lists or simdjson arrays),
    row-major, into one float64 buffer: each number as ``float()`` reads it
    (booleans as 1 and 0), the strings "NaN", "Infinity" and "-Infinity" as
    those values. Raises ArrayError at the first thing that is not a number
    in its place, or a row of another length; no list of the values is built.
    A row of plain numbers is read in C, which would not see an array hidden
    where a number belongs; ``exact`` reads every row number by number.
    """
    out = np.empty(math.prod(shape), np.float64)
    if not shape:
        _read_row([value], out, 0, 0, exact)
        return out
    last = len(shape) - 1
    if not _is_array(value):
        raise _ragged(shape, 0, value)
    if len(value) != shape[0]:
        raise _ragged(shape, 0, value)
    if last == 0:
        _read_row(value, out, 0, 1, exact)
        return out
    position = 0
    stack: list[Iterator[Any]] = [iter(value)]
    while stack:
        depth = len(stack)  # the dimension of the rows the top iterator yields
        row: Any = next(stack[-1], _END)
        if row is _END:
            stack.pop()
            continue
        if not _is_array(row) or len(row) != shape[depth]:
            raise _ragged(shape, depth, row)
        if depth == last:
            position = _read_row(row, out, position, depth + 1, exact)
        else:
            stack.append(iter(row))
    return out


_END = object()


def _read_row(row: Any, out: np.ndarray[Any, Any], position: int, depth: int, exact: bool) -> int:
    """One innermost row into ``out`` from ``position``; returns where it ended."""
    if isinstance(row, simdjson.Array) and not exact:
        try:  # a row of plain numbers, in C
            numbers = np.frombuffer(row.as_buffer(of_type="d"), np.float64)
        except (TypeError, ValueError):
            numbers = None
        if numbers is not None and numbers.size == len(row):
            out[position : position + numbers.size] = numbers
            return position + numbers.size
    values = iter(row)  # (an index into a simdjson array scans it from the start)
    while items := list(islice(values, _CHUNK)):  # a chunk at a time, never the row
        if set(map(type, items)) <= _NUMBER_TYPES:
            out[position : position + len(items)] = items
        else:
            out[position : position + len(items)] = [_number(item, depth) for item in items]
        position += len(items)
    return position


_NUMBER_TYPES = {float, int}


def _number(item: Any, depth: int) -> float:
    kind = type(item)
    if kind is float or kind is int:
        return float(item)
    if kind is str:
        number = NONFINITE_IN.get(item)
        if number is None:
            raise ArrayError(
                'expected a number or "NaN", "Infinity", "-Infinity", got the string '
                f"{quote(item)}",
                nested=False,
            )
        return number
    if kind is bool:
        return 1.0 if item else 0.0
    if _is_array(item):
        raise ArrayError(
            f"ragged array: expected a number at dimension {depth}, got an array; "
            "every row at one depth must have the same length",
            nested=True,
        )
    raise ArrayError(f"expected a number, got {json_type(item)}", nested=False)


def _ragged(shape: list[int], depth: int, row: Any) -> ArrayError:
    got = f"length {len(row)}" if _is_array(row) else json_type(row)
    return ArrayError(
        f"ragged array: expected a row of length {shape[depth]} at dimension {depth} "
        f"(as the first one), got {got}; every row at one depth must have the same length",
        nested=True,
    )


def json_type(value: Any) -> str:
    """What a JSON value is, in words, for a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict | simdjson.Object):
        return "an object"
    if _is_array(value):
        return "an array"
    return "a number"
