"""Python clients for loss-service: ``LossClient`` (sync) and ``AsyncLossClient``.

    from service.client import LossClient

    with LossClient("http://127.0.0.1:8000") as client:
        result = client.loss("cross_entropy", input=logits, target=labels, grad=True)
        result.value, result.grad["input"]

Needs only httpx, numpy and torch (no fastapi, nothing else of the service).

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
- result tensors are put on the device of the first torch tensor argument
  (the CPU when there is none); the server's device is the ``device``
  option and is reported in ``LossResult.device``.

Errors are raised as ``LossServiceError`` subclasses carrying the RFC 9457
problem details. A 503 is retried up to ``max_retries`` times, waiting for
its ``Retry-After`` (else ``backoff * 2**attempt`` seconds, at most
``max_backoff``); so are failures to connect, dropped connections and a
500 from a proxy in front (not problem+json: the computing process died). A
timeout waiting for the answer is httpx's ``ReadTimeout``, not retried (the
server may still be computing)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import quote

import httpx
import numpy as np
import torch

from service.dtypes import DTYPE_NAMES as TORCH_DTYPE_NAMES
from service.dtypes import DTYPES as TORCH_DTYPES

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
    "ServiceUnavailableError",
    "UnknownLossError",
    "UnsupportedMediaTypeError",
]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_B64_THRESHOLD = 1024

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
    if not isinstance(problem, dict) or "status" not in problem:
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
    """The response body as the server sent it."""

    def __float__(self) -> float:
        return float(self.value.item())


def decode_result(body: dict[str, Any], device: torch.device) -> LossResult:
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
    )


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
    ) -> None:
        self.base_url = (base_url or os.environ.get("LOSS_SERVICE_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LOSS_SERVICE_API_KEY")
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.b64_threshold = b64_threshold
        self.retry_connect_errors = retry_connect_errors

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
        return min(self.backoff * 2.0**attempt, self.max_backoff)


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


class LossClient:
    """A synchronous client for loss-service (one httpx.Client; use it as a
    context manager or call ``close()``)."""

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
        retry_connect_errors: bool = True,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = _ClientConfig(
            base_url, api_key, max_retries, backoff, max_backoff, b64_threshold,
            retry_connect_errors,
        )  # fmt: skip
        self._http = httpx.Client(
            base_url=self._settings.base_url,
            headers=self._settings.headers(headers),
            timeout=timeout,
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    def loss(self, name: str, /, **fields: Any) -> LossResult:
        """Evaluate ``torch.nn.functional.<name>``: tensor arguments and options
        under their torch names, plus ``grad``, ``grad_output``, ``device``,
        ``dtype``, ``encoding``."""
        path, body, device = _loss_request(self._settings, name, fields)
        return decode_result(_json(self._send("POST", path, body)), device)

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
                    raise outcome
                return outcome
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLossClient:
    """The asyncio twin of LossClient (one httpx.AsyncClient; ``async with``
    or ``await aclose()``)."""

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
        retry_connect_errors: bool = True,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = _ClientConfig(
            base_url, api_key, max_retries, backoff, max_backoff, b64_threshold,
            retry_connect_errors,
        )  # fmt: skip
        self._http = httpx.AsyncClient(
            base_url=self._settings.base_url,
            headers=self._settings.headers(headers),
            timeout=timeout,
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    async def loss(self, name: str, /, **fields: Any) -> LossResult:
        """See LossClient.loss."""
        path, body, device = _loss_request(self._settings, name, fields)
        return decode_result(_json(await self._send("POST", path, body)), device)

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
                    raise outcome
                return outcome
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
