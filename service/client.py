"""Python clients for loss-service: ``LossClient`` (sync) and ``AsyncLossClient``.

    from service.client import LossClient

    with LossClient("http://127.0.0.1:8000") as client:
        result = client.loss("cross_entropy", input=logits, target=labels, grad=True)
        result.value, result.grad["input"]

Needs only httpx, numpy and torch (no fastapi; of the service, only its dtype
and loss tables and ``service.transfer``).

How values travel:

- torch tensors and numpy arrays keep their dtype: they are sent as the
  contract's object forms with an explicit ``dtype``; ``{"shape", "dtype",
  "data"}`` below ``b64_threshold`` elements, ``{"shape", "dtype", "b64"}``
  from it on (little-endian bytes, bfloat16 as its raw 2-byte words).
- (nested) lists and numbers are sent as JSON as they are, whatever their
  size, so the server gives them the dtype of the argument's role (float32
  or the request's ``dtype`` for float arguments, int64 for class indices).
  When ``dtype`` is not given and a floating torch/numpy tensor is among the
  arguments, the request's ``dtype`` is that tensor's, so plain lists beside
  it match it.
- a dict is taken to be a wire form already and sent unchanged.
- the response is asked for with ``"encoding": "b64"`` unless the call names
  an ``encoding``: it is exact, carries each tensor's dtype and is the
  cheapest to parse.
- large tensors (``binary_threshold`` bytes and more) go as a /v2 request
  with the binary extension, both ways, over the client's own connections
  (``service.transfer``) when it owns its transport; see ``binary_request``
  for what stays on /v1. Results of 32 MiB and more are read into memory
  an earlier result no longer uses, when there is some (``ResultCache``,
  bounded by ``result_cache_bytes``).
- result tensors are put on the device of the first torch tensor argument
  (the CPU when there is none); the server's device is the ``device``
  option and is reported in ``LossResult.device``.

Errors are raised as ``LossServiceError`` subclasses carrying the RFC 9457
problem details. A 503 is retried up to ``max_retries`` times, waiting for
its ``Retry-After`` (else ``backoff * 2**attempt`` seconds, at most
``max_backoff``); so are connect timeouts, dropped connections and a 500
from a proxy in front (not problem+json: the computing process died). A
refused connection is raised at once as ``ServiceUnreachableError`` naming
the URL. A
timeout waiting for the answer is httpx's ``ReadTimeout``, not retried (the
server may still be computing)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import math
import mmap
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self, cast
from urllib.parse import quote

import httpx
import numpy as np
import torch

from service import transfer
from service.client_api import AsyncLossMethods, LossMethods
from service.dtypes import DTYPE_NAMES as TORCH_DTYPE_NAMES
from service.dtypes import DTYPES as TORCH_DTYPES
from service.errors import ServiceError
from service.losses import resolve

__all__ = [
    "AsyncLossClient",
    "AuthenticationError",
    "BadRequestError",
    "InvalidPayloadError",
    "LossClient",
    "LossResult",
    "LossServiceError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ResultCache",
    "ServiceUnavailableError",
    "ServiceUnreachableError",
    "UnknownLossError",
    "UnsupportedMediaTypeError",
]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_B64_THRESHOLD = 1024
DEFAULT_BINARY_THRESHOLD = 1 << 16  # tensor bytes from which a call goes as v2 binary
HEADER_LENGTH = "Inference-Header-Content-Length"
# the Open Inference Protocol's names for the service's dtypes
OIP_DATATYPES: dict[str, str] = {
    "float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64",
    "int64": "INT64", "int32": "INT32", "uint8": "UINT8", "bool": "BOOL",
}  # fmt: skip
OIP_DTYPES: dict[str, torch.dtype] = {oip: TORCH_DTYPES[n] for n, oip in OIP_DATATYPES.items()}

# bfloat16 has no numpy dtype
NUMPY_DTYPE_NAMES: dict[np.dtype[Any], str] = {
    np.dtype(name): name for name in TORCH_DTYPES if name != "bfloat16"
}
NONFINITE: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
LITTLE_ENDIAN = sys.byteorder == "little"


# --------------------------------------------------------------------------- errors


class LossServiceError(Exception):
    """The service answered with an error; ``problem`` is its RFC 9457 body."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: float | None = None):
        self.status = status
        self.problem = problem
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        self.retry_after = retry_after
        super().__init__(f"{status} {self.title}: {self.detail}")


class BadRequestError(LossServiceError):
    """400"""


class AuthenticationError(LossServiceError):
    """401: no valid API key."""


class NotFoundError(LossServiceError):
    """404"""


class UnknownLossError(NotFoundError):
    """404 for a loss name the service does not know; ``detail`` lists the known ones."""


class PayloadTooLargeError(LossServiceError):
    """413: body or tensors over the server's limits."""


class UnsupportedMediaTypeError(LossServiceError):
    """415"""


class InvalidPayloadError(LossServiceError):
    """422: the payload parsed but a field holds what the loss cannot take."""


class ServiceUnavailableError(LossServiceError):
    """503: overloaded or out of device memory, still so after the retries."""


class ServiceUnreachableError(LossServiceError, httpx.ConnectError):
    """No connection to the service (refused, unknown host, still failing after
    the retries); the message names the URL. Also an ``httpx.ConnectError``."""

    def __init__(self, url: str, cause: Exception) -> None:
        self.url = url
        self.reason = str(cause) or type(cause).__name__
        message = f"cannot reach loss-service at {url}: {self.reason}"
        problem = {"title": "Service unreachable", "status": 0, "detail": message}
        LossServiceError.__init__(self, 0, problem)
        self.args = (message,)
        self._request = getattr(cause, "_request", None)  # httpx's, when it made one

    def __str__(self) -> str:
        return str(self.args[0])


_ERRORS: dict[int, type[LossServiceError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidPayloadError,
    503: ServiceUnavailableError,
}


def error_from_problem(
    problem: dict[str, Any], retry_after: float | None = None
) -> LossServiceError:
    """The exception for a problem-details body (also a batch item's ``error``)."""
    status = int(problem.get("status") or 0)
    cls = _ERRORS.get(status, LossServiceError)
    if status == 404 and str(problem.get("type", "")).endswith("unknown-loss"):
        cls = UnknownLossError
    return cls(status, problem, retry_after)


def error_from_response(response: httpx.Response) -> LossServiceError:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if isinstance(problem, dict) and isinstance(problem.get("error"), str) and len(problem) == 1:
        # the /v2 form of an error (Open Inference Protocol)
        problem = {"title": response.reason_phrase, "detail": problem["error"]}
    elif not isinstance(problem, dict) or "status" not in problem:
        # not problem details (a proxy in between, say): keep what it said
        problem = {
            "title": response.reason_phrase,
            "status": response.status_code,
            "detail": response.text[:1000],
        }
    problem["status"] = response.status_code
    return error_from_problem(problem, retry_after_seconds(response.headers.get("retry-after")))


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) -> seconds from now."""
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


# --------------------------------------------------------------------------- encode


def encode_fields(fields: Mapping[str, Any], b64_threshold: int) -> dict[str, Any]:
    """Loss arguments and options -> a request body (contract section 4)."""
    body = {name: encode_value(value, b64_threshold) for name, value in fields.items()}
    if "dtype" not in body:
        float_dtype = _first_float_dtype(fields.values())
        if float_dtype is not None:
            body["dtype"] = float_dtype
    body.setdefault("encoding", "b64")
    return body


def encode_value(value: Any, b64_threshold: int = DEFAULT_B64_THRESHOLD) -> Any:
    """One argument -> its wire form: tensors and arrays as object forms with
    their dtype, lists and numbers as plain JSON, dicts unchanged."""
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value, b64_threshold)
    if isinstance(value, np.ndarray):
        return _encode_array(value, b64_threshold)
    if isinstance(value, Mapping):
        return dict(value)
    return _plain(value)


def _encode_tensor(tensor: torch.Tensor, b64_threshold: int) -> dict[str, Any]:
    name = TORCH_DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise TypeError(
            f"dtype {tensor.dtype} cannot be sent; use one of {', '.join(TORCH_DTYPES)}"
        )
    tensor = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous()
    if tensor.dtype != torch.bfloat16:
        return _encode_array(tensor.numpy(), b64_threshold)
    shape = list(tensor.shape)
    if tensor.numel() >= b64_threshold:
        words = tensor.view(torch.int16).numpy()  # bfloat16's raw bytes
        return {"shape": shape, "dtype": name, "b64": _b64(words)}
    return {"shape": shape, "dtype": name, "data": _flat_values(tensor.float().numpy())}


def _encode_array(array: np.ndarray[Any, Any], b64_threshold: int) -> dict[str, Any]:
    name = NUMPY_DTYPE_NAMES.get(array.dtype.newbyteorder("="))
    if name is None:
        raise TypeError(
            f"numpy dtype {array.dtype} cannot be sent; use one of "
            f"{', '.join(str(d) for d in NUMPY_DTYPE_NAMES)}"
        )
    shape = list(array.shape)
    if array.size >= b64_threshold:
        return {"shape": shape, "dtype": name, "b64": _b64(array)}
    return {"shape": shape, "dtype": name, "data": _flat_values(array)}


def _b64(array: np.ndarray[Any, Any]) -> str:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return base64.b64encode(little.tobytes()).decode("ascii")


def _flat_values(array: np.ndarray[Any, Any]) -> list[Any]:
    values: list[Any] = array.reshape(-1).tolist()
    if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
        values = [_plain(v) for v in values]
    return values


def _plain(value: Any) -> Any:
    """Lists, tuples and numbers as JSON, non-finite floats as the contract's strings."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _first_float_dtype(values: Iterable[Any]) -> str | None:
    for value in values:
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            return TORCH_DTYPE_NAMES.get(value.dtype)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return NUMPY_DTYPE_NAMES.get(value.dtype.newbyteorder("="))
    return None


def placement(values: Iterable[Any]) -> torch.device:
    """Where results go: the device of the first torch tensor argument, else the CPU."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class LossResult:
    """One evaluation: ``value`` (0-dim for a reduction, else the per-element
    losses) and ``grad`` (argument name -> gradient; empty unless asked),
    both on the device of the first torch tensor argument."""

    loss: str
    value: torch.Tensor
    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: str = "float32"
    device: str = "cpu"
    """The device the server computed on."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    """The response body as the server sent it (for a binary /v2 answer, its JSON header)."""
    request_id: str | None = None
    """The response's X-Request-ID: the one the call sent, else the server's."""
    server_timing: dict[str, float] = field(default_factory=dict)
    """The Server-Timing durations in milliseconds: decode, compute, encode."""

    def __float__(self) -> float:
        return float(self.value.item())


def decode_result(
    body: dict[str, Any], device: torch.device, headers: httpx.Headers | None = None
) -> LossResult:
    """A section-4 response body -> a LossResult with tensors on ``device``."""
    dtype = TORCH_DTYPES.get(body["dtype"], torch.float32)
    value = decode_tensor(body["value"], dtype).reshape(body["shape"])
    grad = {name: decode_tensor(g, dtype).to(device) for name, g in body.get("grad", {}).items()}
    return LossResult(
        loss=body["loss"],
        value=value.to(device),
        grad=grad,
        dtype=body["dtype"],
        device=body["device"],
        raw=body,
        **_response_facts(headers),
    )


def _response_facts(headers: httpx.Headers | None) -> dict[str, Any]:
    if headers is None:
        return {}
    return {
        "request_id": headers.get("x-request-id"),
        "server_timing": server_timing(headers.get("server-timing")),
    }


def server_timing(value: str | None) -> dict[str, float]:
    """``decode;dur=1.2, compute;dur=3.4`` -> {"decode": 1.2, "compute": 3.4}."""
    timings: dict[str, float] = {}
    for metric in (value or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if name and key.strip() == "dur":
                with contextlib.suppress(ValueError):
                    timings[name] = float(number.strip().strip('"'))
    return timings


def decode_tensor(wire: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A wire form -> a CPU tensor. ``dtype`` is for the plain forms (numbers,
    nested lists), which do not carry one."""
    if isinstance(wire, Mapping):
        wire_dtype = TORCH_DTYPES[wire["dtype"]]
        shape = [int(d) for d in wire["shape"]]
        if "b64" in wire:
            return _from_bytes(base64.b64decode(wire["b64"]), wire_dtype, shape)
        return _from_values(wire["data"], wire_dtype).reshape(shape)
    return _from_values(wire, dtype)


def _from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    as_bool = dtype == torch.bool
    wire_dtype = torch.uint8 if as_bool else dtype
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    if not LITTLE_ENDIAN:
        itemsize = torch.empty((), dtype=wire_dtype).element_size()
        data = np.frombuffer(data, np.uint8).reshape(-1, itemsize)[:, ::-1].tobytes()
    tensor = torch.frombuffer(bytearray(data), dtype=wire_dtype).reshape(shape)
    return tensor != 0 if as_bool else tensor


def _from_values(data: Any, dtype: torch.dtype) -> torch.Tensor:
    try:
        return torch.tensor(data, dtype=dtype)
    except (TypeError, ValueError):
        return torch.tensor(_finite(data), dtype=dtype)  # "NaN", "Infinity", "-Infinity"


def _finite(data: Any) -> Any:
    if isinstance(data, list):
        return [_finite(x) for x in data]
    if isinstance(data, str):
        return NONFINITE[data]
    return data


# --------------------------------------------------------------------------- binary (/v2)


@dataclass(frozen=True)
class BinaryRequest:
    """A call as an Open Inference Protocol request with the binary extension:
    a JSON header, then each tensor's raw bytes, sent from the tensors' own memory."""

    path: str
    parts: list[memoryview]
    header_length: int
    device: torch.device

    @property
    def length(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": "application/octet-stream",
            HEADER_LENGTH: str(self.header_length),
        }


def binary_request(
    name: str, fields: Mapping[str, Any], threshold: int | None
) -> BinaryRequest | None:
    """The call as /v2 binary, when its tensors hold ``threshold`` bytes or more
    and /v2 says all the call says; else None (it goes as /v1 JSON).

    /v1 stays for: plain lists or numbers as tensor arguments (/v1 gives them
    their role's dtype), ``dtype`` and ``encoding`` (v1 fields), fields the
    loss does not have (so that the error is /v1's 422 naming them), and
    ``reduction="none"`` (/v2 returns a 0-dim loss with shape [1], so the
    client could not tell torch's shape [] from [1]); for a big-endian host;
    and for a loss this client's table does not know (the server explains)."""
    if threshold is None or not LITTLE_ENDIAN:
        return None
    if "dtype" in fields or "encoding" in fields or fields.get("reduction") == "none":
        return None
    try:
        spec = resolve(name)
    except ServiceError:
        return None
    tensor_names = {*spec.tensor_names, "grad_output"}
    numbers = {a.name for a in spec.args if a.role == "float_or_number"}
    # anything else (a misspelt option, size_average) goes as /v1 for its 422
    known = {*spec.option_names, "grad", "device", *numbers}
    inputs: list[dict[str, Any]] = []
    data: list[memoryview] = []
    parameters: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, torch.Tensor | np.ndarray):
            if key not in tensor_names:
                return None
            datatype, shape, raw = _raw_tensor(value)
            size = raw.nbytes
            item = {"name": key, "shape": shape, "datatype": datatype}
            inputs.append({**item, "parameters": {"binary_data_size": size}})
            data.append(raw)
        elif key in tensor_names and not (key in numbers and _is_number(value)):
            return None
        elif key == "grad" and isinstance(value, list | tuple):
            if not all(isinstance(n, str) for n in value):
                return None
            parameters[key] = list(value)
        elif key in known and (
            value is None or isinstance(value, bool | int | float | str | np.generic)
        ):
            parameters[key] = _plain(value)
        else:
            return None
    if sum(part.nbytes for part in data) < threshold:
        return None
    parameters["binary_data_output"] = True
    header = _dumps({"inputs": inputs, "parameters": parameters})
    return BinaryRequest(
        f"/v2/models/{quote(spec.name, safe='')}/infer",
        [memoryview(header), *data],
        len(header),
        placement(fields.values()),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _raw_tensor(value: torch.Tensor | np.ndarray[Any, Any]) -> tuple[str, list[int], memoryview]:
    """OIP datatype, shape and little-endian row-major bytes (the tensor's own
    memory when it is a contiguous CPU tensor; else one contiguous copy)."""
    if isinstance(value, torch.Tensor):
        name = TORCH_DTYPE_NAMES.get(value.dtype)
        if name is None:
            raise TypeError(
                f"dtype {value.dtype} cannot be sent; use one of {', '.join(TORCH_DTYPES)}"
            )
        tensor = value.detach().resolve_conj().resolve_neg().cpu().contiguous()
        shape = list(tensor.shape)
        # bfloat16 has no numpy dtype: its raw 2-byte words
        array = (tensor.view(torch.int16) if name == "bfloat16" else tensor).numpy()
    else:
        name = NUMPY_DTYPE_NAMES.get(value.dtype.newbyteorder("="), "")
        if not name:
            raise TypeError(
                f"numpy dtype {value.dtype} cannot be sent; use one of "
                f"{', '.join(str(d) for d in NUMPY_DTYPE_NAMES)}"
            )
        shape = list(value.shape)
        array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    if array.size == 0:
        return OIP_DATATYPES[name], shape, memoryview(b"")
    return OIP_DATATYPES[name], shape, array.reshape(-1).data.cast("B")


class _BodyReader:
    """A whole response body already in memory, read as transfer.Reply is."""

    def __init__(self, content: bytes) -> None:
        self._view = memoryview(content)
        self._position = 0

    def read_into(self, buffer: memoryview) -> None:
        end = self._position + buffer.nbytes
        if end > len(self._view):
            raise httpx.RemoteProtocolError("the response body is shorter than its header says")
        buffer.cast("B")[:] = self._view[self._position : end]
        self._position = end


HUGE_PAGES = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux
# Below glibc's largest mmap threshold (32 MiB on 64-bit), torch.empty reuses
# the heap pages an earlier result freed, already faulted in: 16 MB took 1.5
# ms so, against 3.7 ms for a fresh huge-page mapping (65 MB: 44 ms, against
# 18 ms; glibc maps every block that large afresh). From it on, results come
# from a ResultCache: the pages of a result the caller dropped, else a fresh
# huge-page mapping.
HUGE_PAGE_FROM = 32 << 20  # bytes
HUGE_PAGE = 2 << 20  # a cached block is whole transparent huge pages (x86-64's size)
DEFAULT_RESULT_CACHE_BYTES = 256 << 20


def huge_page_block(size: int) -> mmap.mmap:
    """Fresh anonymous memory with transparent huge pages asked for: its first
    touch (the receive) then faults in 2 MiB pages, not 4 KiB ones; measured
    here, 64 MB went from 58 ms to 20 ms."""
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if HUGE_PAGES is not None:
        with contextlib.suppress(OSError):  # a kernel without THP: 4 KiB pages as usual
            mapping.madvise(HUGE_PAGES)
    return mapping


class ResultCache:
    """The memory of large results (``HUGE_PAGE_FROM`` bytes and more), kept
    for the next one: a block whose result the caller has dropped is handed
    out again, its pages already faulted in, instead of mapping fresh memory
    (which a 65 MB download paid for with page faults and huge-page zeroing:
    13 ms against 9 ms here, and far more on a loaded machine).

    A block is free when nothing but the cache references it: a tensor made
    over it with ``torch.frombuffer`` holds one reference through its storage,
    and so does every view of that tensor, its ``.numpy()`` and what was
    built on those, until the last of them dies. A block something still
    references is never handed out, so results never share memory.

    Blocks are sized in whole 2 MiB huge pages (the result's bytes rounded
    up), and a result takes a free block of exactly its rounded size, the one
    used longest ago: a loop whose results keep their shapes finds its blocks
    again, shapes within 2 MiB of each other share them, and a small result
    never holds a large block. The cache holds at most ``limit`` bytes of
    blocks, in use or free; making room, it lets go of the free blocks used
    longest ago, and a result it has no room for gets fresh memory the cache
    does not keep. ``limit`` 0 keeps nothing. Thread-safe."""

    def __init__(self, limit: int = DEFAULT_RESULT_CACHE_BYTES) -> None:
        if limit < 0:
            raise ValueError(f"result_cache_bytes must be 0 or more, not {limit}")
        self.limit = limit
        self._blocks: list[mmap.mmap] = []  # used longest ago first
        # an object only the cache references, held as a block is: what a free
        # block's reference count reads, whatever the interpreter's counting
        self._alone: list[object] = [object()]
        self._lock = threading.Lock()

    def block(self, nbytes: int) -> mmap.mmap:
        """Memory for a result of ``nbytes`` bytes (at least that long)."""
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        with self._lock:
            for index in range(len(self._blocks)):
                if len(self._blocks[index]) == size and self._free(index):
                    block = self._blocks.pop(index)
                    self._blocks.append(block)
                    return block
            if not self._make_room(size):
                return huge_page_block(nbytes)
            block = huge_page_block(size)
            self._blocks.append(block)
            return block

    @property
    def held_bytes(self) -> int:
        """The bytes of the blocks the cache holds, in use or free."""
        with self._lock:
            return sum(len(block) for block in self._blocks)

    def clear(self) -> None:
        """Let go of every block; one still in use lives on with its tensors.
        (Never ``close()`` a block: torch does not lock the mapping, and a
        tensor over a closed one would read unmapped memory.)"""
        with self._lock:
            self._blocks.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)

    def _free(self, index: int) -> bool:
        # the same expression for the block and for the object only the cache holds
        return sys.getrefcount(self._blocks[index]) <= sys.getrefcount(self._alone[0])

    def _make_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit under the limit, after letting go of
        free blocks, longest unused first, as far as that takes."""
        if size > self.limit:
            return False  # never: keep what is cached
        held = sum(len(block) for block in self._blocks)
        index = 0
        while held + size > self.limit and index < len(self._blocks):
            if self._free(index):
                held -= len(self._blocks.pop(index))
            else:
                index += 1
        return held + size <= self.limit


def receive_buffer(
    shape: list[int], dtype: torch.dtype, cache: ResultCache | None = None
) -> torch.Tensor:
    """A new tensor for received bytes: under ``HUGE_PAGE_FROM`` bytes from
    torch.empty; from it on over a block of ``cache`` (else fresh huge-page
    memory), which the tensor keeps alive."""
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if HUGE_PAGES is None or nbytes < HUGE_PAGE_FROM:
        return torch.empty(shape, dtype=dtype)
    block = cache.block(nbytes) if cache is not None else huge_page_block(nbytes)
    return torch.frombuffer(block, dtype=dtype, count=numel).reshape(shape)


def decode_binary_result(
    reader: transfer.Reply | _BodyReader,
    headers: httpx.Headers,
    device: torch.device,
    cache: ResultCache | None = None,
) -> LossResult:
    """A /v2 binary response -> a LossResult: each output's bytes are read
    straight into a new tensor of its dtype (a large one over a block of
    ``cache``: see receive_buffer), then moved to ``device``."""
    length = int(headers.get(HEADER_LENGTH.lower(), "-1"))
    if length < 0:
        raise httpx.RemoteProtocolError(f"a /v2 answer without {HEADER_LENGTH}")
    head = bytearray(length)
    reader.read_into(memoryview(head))
    header: dict[str, Any] = json.loads(head)
    outputs: dict[str, torch.Tensor] = {}
    for output in header["outputs"]:
        dtype = OIP_DTYPES[output["datatype"]]
        shape = [int(d) for d in output["shape"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            tensor = _from_values(output["data"], dtype).reshape(shape)
        else:
            tensor = receive_buffer(shape, torch.uint8 if dtype == torch.bool else dtype, cache)
            if size != tensor.nbytes:
                raise httpx.RemoteProtocolError(
                    f"output {output['name']}: {size} bytes for shape {shape} {dtype}"
                )
            if size:
                reader.read_into(tensor.reshape(-1).view(torch.uint8).numpy().data)
            if dtype == torch.bool:
                tensor = tensor != 0
        outputs[output["name"]] = tensor
    # reduction="none" goes as /v1 (binary_request): here the loss is torch's 0-dim value
    value = outputs.pop("loss").reshape(())
    grad = {
        name.removeprefix("grad_"): tensor.to(device)
        for name, tensor in outputs.items()
        if name.startswith("grad_")
    }
    return LossResult(
        loss=header["model_name"],
        value=value.to(device),
        grad=grad,
        dtype=TORCH_DTYPE_NAMES[value.dtype],
        device=str((header.get("parameters") or {}).get("device", "")),
        raw=header,
        **_response_facts(headers),
    )


# --------------------------------------------------------------------------- transports


class _ClientConfig:
    """What both clients share: where, who, how long, how often."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        b64_threshold: int,
        retry_connect_errors: bool,
        binary_threshold: int | None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("LOSS_SERVICE_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LOSS_SERVICE_API_KEY")
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.b64_threshold = b64_threshold
        self.retry_connect_errors = retry_connect_errors
        self.binary_threshold = binary_threshold

    def headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {"Accept": "application/json, application/problem+json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers

    def retry_delay(self, attempt: int, outcome: httpx.Response | Exception) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None to stop."""
        if attempt >= self.max_retries:
            return None
        if isinstance(outcome, httpx.Response):
            if outcome.status_code != 503 and not (
                self.retry_connect_errors and is_proxy_500(outcome)
            ):
                return None
            after = retry_after_seconds(outcome.headers.get("retry-after"))
            if after is not None:
                return min(after, self.max_backoff)
        elif not (self.retry_connect_errors and isinstance(outcome, RETRIED_ERRORS)):
            return None
        elif refused(outcome):
            return None  # nothing listens there: say so now, not after the backoffs
        return min(self.backoff * 2.0**attempt, self.max_backoff)


def refused(exc: BaseException) -> bool:
    """Whether the connection was refused (or the host unknown): a wrong URL or
    a service that is down, not a passing failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError | socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unreachable(base_url: str, exc: Exception) -> Exception:
    """What a transport failure is raised as: a failed connection as
    ServiceUnreachableError naming the URL, anything else as it is."""
    if isinstance(exc, httpx.ConnectError) and not isinstance(exc, ServiceUnreachableError):
        return ServiceUnreachableError(base_url, exc)
    return exc


# Failures where the request never reached a computation (connecting), or the
# connection dropped; losses are stateless, so sending again is safe.
RETRIED_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def is_proxy_500(response: httpx.Response) -> bool:
    """A 500 that is not the service's: the service never answers 500, and its
    errors are problem+json. A proxy in front answers one when the process
    computing the request died (Ray Serve's, for a replica killed before it
    answered): as with a dropped connection, sending again is safe."""
    content_type = response.headers.get("content-type", "")
    return response.status_code == 500 and not content_type.startswith("application/problem+json")


def _loss_request(
    settings: _ClientConfig, name: str, fields: Mapping[str, Any]
) -> tuple[str, bytes, torch.device]:
    body = encode_fields(fields, settings.b64_threshold)
    return f"/v1/losses/{quote(name, safe='')}", _dumps(body), placement(fields.values())


def _batch_request(
    settings: _ClientConfig, items: Iterable[Mapping[str, Any]]
) -> tuple[bytes, list[torch.device]]:
    encoded, devices = [], []
    for item in items:
        fields = {k: v for k, v in item.items() if k != "loss"}
        encoded.append({"loss": item["loss"], **encode_fields(fields, settings.b64_threshold)})
        devices.append(placement(fields.values()))
    return _dumps({"items": encoded}), devices


def _batch_results(
    body: dict[str, Any], devices: list[torch.device]
) -> list[LossResult | LossServiceError]:
    return [
        error_from_problem(item["error"]) if "error" in item else decode_result(item, device)
        for item, device in zip(body["results"], devices, strict=True)
    ]


def _dumps(body: Any) -> bytes:
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise error_from_response(response)
    return response.json()


def _decoded(response: httpx.Response, device: torch.device) -> LossResult:
    return decode_result(_json(response), device, response.headers)


def _pool(base_url: str, transport: object, timeout: float | httpx.Timeout | None) -> (
    transfer.ConnectionPool | None
):  # fmt: skip
    """The connections for binary calls, when the client owns its transport and
    reaches the service directly (else binary calls go through httpx too)."""
    if transport is not None or not transfer.usable(base_url):
        return None
    return transfer.ConnectionPool(base_url, httpx.Timeout(timeout))


def _pool_exchange(
    pool: transfer.ConnectionPool,
    headers: Mapping[str, str],
    request: BinaryRequest,
    cache: ResultCache,
) -> LossResult | httpx.Response:
    """One binary call over the pool: the result, or the error answer."""
    sent = {**headers, **request.headers()}
    with pool.request("POST", request.path, request.parts, request.length, sent) as reply:
        if reply.status != 200:
            content = reply.read_all(transfer.MAX_ERROR_BODY)
            return httpx.Response(reply.status, headers=reply.headers, content=content)
        return decode_binary_result(reply, reply.headers, request.device, cache)


def _http_binary_headers(request: BinaryRequest) -> dict[str, str]:
    return {**request.headers(), "Content-Length": str(request.length)}


async def _async_pieces(parts: list[memoryview]) -> Any:
    for piece in transfer.pieces(parts):
        yield piece


class LossClient(LossMethods):
    """A synchronous client for loss-service (one httpx.Client; use it as a
    context manager or call ``close()``). Besides ``loss(name, ...)``, each
    loss is a typed method: ``client.cross_entropy(input, target, ...)``.

    ``result_cache_bytes`` (256 MiB; 0 turns it off) bounds the client's
    ``result_cache``: the memory of binary results of 32 MiB and more, reused
    for the next large result once every tensor over it (the result, its
    views, its ``.numpy()``) is gone, so that a loop over large gradients
    does not fault in fresh pages each call. The cache never holds more than
    that many bytes, in use or free; ``close()`` lets go of them. Results
    never share memory; a lock guards the cache against concurrent calls."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        b64_threshold: int = DEFAULT_B64_THRESHOLD,
        binary_threshold: int | None = DEFAULT_BINARY_THRESHOLD,
        retry_connect_errors: bool = True,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        result_cache_bytes: int = DEFAULT_RESULT_CACHE_BYTES,
    ) -> None:
        self._settings = _ClientConfig(
            base_url, api_key, max_retries, backoff, max_backoff, b64_threshold,
            retry_connect_errors, binary_threshold,
        )  # fmt: skip
        self._headers = self._settings.headers(headers)
        self._http = httpx.Client(
            base_url=self._settings.base_url,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
        )
        self._pool = _pool(self._settings.base_url, transport, timeout)
        self._results = ResultCache(result_cache_bytes)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    @property
    def result_cache(self) -> ResultCache:
        """The blocks large binary results are read into (``result_cache_bytes``)."""
        return self._results

    def loss(self, name: str, /, **fields: Any) -> LossResult:
        """Evaluate ``torch.nn.functional.<name>``: tensor arguments and options
        under their torch names, plus ``grad``, ``grad_output``, ``device``,
        ``dtype``, ``encoding``."""
        binary = binary_request(name, fields, self._settings.binary_threshold)
        if binary is not None:
            return self._loss_binary(binary)
        path, body, device = _loss_request(self._settings, name, fields)
        return _decoded(self._send("POST", path, body), device)

    def batch(self, items: Iterable[Mapping[str, Any]]) -> list[LossResult | LossServiceError]:
        """Evaluate many losses in one request (``{"loss": name, ...fields}`` each);
        a failed item is its LossServiceError in the list, not raised."""
        body, devices = _batch_request(self._settings, items)
        return _batch_results(_json(self._send("POST", "/v1/batch", body)), devices)

    def losses(self) -> list[dict[str, Any]]:
        """The catalog: every loss with its arguments, options and example."""
        return list(_json(self._send("GET", "/v1/losses"))["losses"])

    def loss_info(self, name: str) -> dict[str, Any]:
        """One loss of the catalog (canonical or torch.nn class name)."""
        return dict(_json(self._send("GET", f"/v1/losses/{quote(name, safe='')}")))

    def _send(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if body is not None else None
        attempt = 0
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = self._http.request(method, path, content=body, headers=headers)
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._settings.retry_delay(attempt, outcome)
            if delay is None:
                if isinstance(outcome, Exception):
                    raise unreachable(self.base_url, outcome)
                return outcome
            time.sleep(delay)
            attempt += 1

    def _loss_binary(self, request: BinaryRequest) -> LossResult:
        attempt = 0
        while True:
            outcome: LossResult | httpx.Response | Exception
            try:
                if self._pool is not None:
                    outcome = _pool_exchange(self._pool, self._headers, request, self._results)
                else:
                    response = self._http.post(
                        request.path,
                        # memoryviews, which httpx sends as they are
                        content=cast(Iterable[bytes], transfer.pieces(request.parts)),
                        headers=_http_binary_headers(request),
                    )
                    outcome = response
                    if response.status_code == 200:
                        reader = _BodyReader(response.content)
                        outcome = decode_binary_result(
                            reader, response.headers, request.device, self._results
                        )
            except httpx.TransportError as exc:
                outcome = exc
            if isinstance(outcome, LossResult):
                return outcome
            delay = self._settings.retry_delay(attempt, outcome)
            if delay is None:
                if isinstance(outcome, Exception):
                    raise unreachable(self.base_url, outcome)
                raise error_from_response(outcome)
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()
        if self._pool is not None:
            self._pool.close()
        self._results.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLossClient(AsyncLossMethods):
    """The asyncio twin of LossClient (one httpx.AsyncClient; ``async with``
    or ``await aclose()``). Binary calls over its own connections run in a
    worker thread (``asyncio.to_thread``), so the event loop stays free.
    ``result_cache_bytes``: as on LossClient."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        b64_threshold: int = DEFAULT_B64_THRESHOLD,
        binary_threshold: int | None = DEFAULT_BINARY_THRESHOLD,
        retry_connect_errors: bool = True,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        result_cache_bytes: int = DEFAULT_RESULT_CACHE_BYTES,
    ) -> None:
        self._settings = _ClientConfig(
            base_url, api_key, max_retries, backoff, max_backoff, b64_threshold,
            retry_connect_errors, binary_threshold,
        )  # fmt: skip
        self._headers = self._settings.headers(headers)
        self._http = httpx.AsyncClient(
            base_url=self._settings.base_url,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
        )
        self._pool = _pool(self._settings.base_url, transport, timeout)
        self._results = ResultCache(result_cache_bytes)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    @property
    def result_cache(self) -> ResultCache:
        """The blocks large binary results are read into (``result_cache_bytes``)."""
        return self._results

    async def loss(self, name: str, /, **fields: Any) -> LossResult:
        """See LossClient.loss."""
        binary = binary_request(name, fields, self._settings.binary_threshold)
        if binary is not None:
            return await self._loss_binary(binary)
        path, body, device = _loss_request(self._settings, name, fields)
        return _decoded(await self._send("POST", path, body), device)

    async def batch(
        self, items: Iterable[Mapping[str, Any]]
    ) -> list[LossResult | LossServiceError]:
        """See LossClient.batch."""
        body, devices = _batch_request(self._settings, items)
        return _batch_results(_json(await self._send("POST", "/v1/batch", body)), devices)

    async def losses(self) -> list[dict[str, Any]]:
        """See LossClient.losses."""
        return list(_json(await self._send("GET", "/v1/losses"))["losses"])

    async def loss_info(self, name: str) -> dict[str, Any]:
        """See LossClient.loss_info."""
        return dict(_json(await self._send("GET", f"/v1/losses/{quote(name, safe='')}")))

    async def _send(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if body is not None else None
        attempt = 0
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = await self._http.request(method, path, content=body, headers=headers)
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._settings.retry_delay(attempt, outcome)
            if delay is None:
                if isinstance(outcome, Exception):
                    raise unreachable(self.base_url, outcome)
                return outcome
            await asyncio.sleep(delay)
            attempt += 1

    async def _loss_binary(self, request: BinaryRequest) -> LossResult:
        attempt = 0
        while True:
            outcome: LossResult | httpx.Response | Exception
            try:
                if self._pool is not None:
                    outcome = await asyncio.to_thread(
                        _pool_exchange, self._pool, self._headers, request, self._results
                    )
                else:
                    response = await self._http.post(
                        request.path,
                        content=_async_pieces(request.parts),
                        headers=_http_binary_headers(request),
                    )
                    outcome = response
                    if response.status_code == 200:
                        reader = _BodyReader(response.content)
                        outcome = decode_binary_result(
                            reader, response.headers, request.device, self._results
                        )
            except httpx.TransportError as exc:
                outcome = exc
            if isinstance(outcome, LossResult):
                return outcome
            delay = self._settings.retry_delay(attempt, outcome)
            if delay is None:
                if isinstance(outcome, Exception):
                    raise unreachable(self.base_url, outcome)
                raise error_from_response(outcome)
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._pool is not None:
            self._pool.close()
        self._results.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
