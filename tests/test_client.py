"""service.client against real uvicorn processes: values and gradients equal
torch in-process, the base64 switch, dtypes, the catalog, batches, typed
errors, API keys, and retries on 503 (a stand-in app under uvicorn)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import uvicorn

from service.client import (
    AsyncLossClient,
    AuthenticationError,
    InvalidPayloadError,
    LossClient,
    LossResult,
    LossServiceError,
    NotFoundError,
    ServiceUnavailableError,
    ServiceUnreachableError,
    UnknownLossError,
)
from service.losses import LOSSES
from tests.conftest import free_port, start_server, stop_server


class Recorder(httpx.BaseTransport):
    """Sends every request to the real server and keeps what was sent."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


class AsyncRecorder(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def logits_and_labels(n: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n * 100 + classes)
    return torch.randn(n, classes, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def torch_cross_entropy(
    x: torch.Tensor, t: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    value = F.cross_entropy(leaf, t, reduction=reduction)
    (grad,) = torch.autograd.grad(value, leaf, torch.ones_like(value))
    return value.detach(), grad


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.device == expected.device
    assert torch.equal(actual, expected), (actual, expected)


# --------------------------------------------------------------------------- the real service


@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
def test_loss_and_grad_equal_torch(live_server: str, reduction: str) -> None:
    x, t = logits_and_labels()
    with LossClient(live_server) as client:
        result = client.loss("cross_entropy", input=x, target=t, reduction=reduction, grad=True)
    value, grad = torch_cross_entropy(x, t, reduction)
    assert isinstance(result, LossResult) and result.loss == "cross_entropy"
    assert result.dtype == "float32" and result.device == "cpu"
    assert_same(result.value, value)
    assert set(result.grad) == {"input"}
    assert_same(result.grad["input"], grad)
    if reduction != "none":
        assert result.value.dim() == 0 and float(result) == value.item()


def test_numpy_and_list_inputs(live_server: str) -> None:
    x, t = logits_and_labels()
    with LossClient(live_server) as client:
        from_numpy = client.loss("CrossEntropyLoss", input=x.numpy(), target=t.numpy())
        from_lists = client.loss("cross_entropy", input=[[2, 1], [1, 2]], target=[1, 0])
        no_grad = client.loss("mse_loss", input=np.float32([1.5, 2.0]), target=[0.0, 1.0])
    assert_same(from_numpy.value, F.cross_entropy(x, t))
    assert from_numpy.loss == "cross_entropy" and from_numpy.grad == {}
    assert_same(
        from_lists.value,
        F.cross_entropy(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([1, 0])),
    )
    assert round(from_lists.value.item(), 4) == 1.3133
    assert_same(no_grad.value, F.mse_loss(torch.tensor([1.5, 2.0]), torch.tensor([0.0, 1.0])))


def test_large_tensors_go_as_base64_small_ones_do_not(live_server: str) -> None:
    recorder = Recorder()
    x, t = logits_and_labels(n=4, classes=4)  # 16 and 4 elements
    with LossClient(live_server, b64_threshold=16, transport=recorder) as client:
        result = client.loss("cross_entropy", input=x, target=t, grad=True)
        below = client.loss("cross_entropy", input=x[:3], target=t[:3].tolist())
    sent = recorder.body(0)
    assert set(sent["input"]) == {"shape", "dtype", "b64"}
    assert sent["input"]["shape"] == [4, 4] and sent["input"]["dtype"] == "float32"
    assert set(sent["target"]) == {"shape", "dtype", "data"}
    assert sent["target"] == {"shape": [4], "dtype": "int64", "data": t.tolist()}
    assert sent["encoding"] == "b64"
    assert (
        result.raw["grad"]["input"]["dtype"] == "float32" and "b64" in result.raw["grad"]["input"]
    )
    value, grad = torch_cross_entropy(x, t, "mean")
    assert_same(result.value, value)
    assert_same(result.grad["input"], grad)

    sent = recorder.body(1)  # 15 elements: under the threshold; a list stays a list
    assert set(sent["input"]) == {"shape", "dtype", "data"} and sent["target"] == t[:3].tolist()
    assert_same(below.value, F.cross_entropy(x[:3], t[:3]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_is_kept(live_server: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(40, 30, generator=gen).to(dtype)  # base64
    small = torch.randn(2, 3, generator=gen).to(dtype)  # flat data
    with LossClient(live_server, b64_threshold=1024) as client:
        results = [
            client.loss("mse_loss", input=a, target=b, grad=["input", "target"], reduction=red)
            for a, b, red in ((big, big.flip(0), "sum"), (small, small.T.reshape(2, 3), "none"))
        ]
    for result, (a, b, red) in zip(
        results, ((big, big.flip(0), "sum"), (small, small.T.reshape(2, 3), "none")), strict=True
    ):
        leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        value = F.mse_loss(*leaves, reduction=red)
        grads = torch.autograd.grad(value, leaves, torch.ones_like(value))
        assert result.dtype == str(dtype).removeprefix("torch.")
        assert_same(result.value, value.detach())
        assert_same(result.grad["input"], grads[0])
        assert_same(result.grad["target"], grads[1])


def test_float64_numpy_with_a_plain_list_beside_it(live_server: str) -> None:
    x = np.array([[0.25, 0.5], [1.0, -2.0]])
    with LossClient(live_server) as client:
        result = client.loss("l1_loss", input=x, target=[[0, 0], [1, 1]], grad=True)
    expected = F.l1_loss(
        torch.from_numpy(x), torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    )
    assert_same(result.value, expected)
    assert result.grad["input"].dtype == torch.float64


def test_nonfinite_values_travel_both_ways(live_server: str) -> None:
    x = torch.tensor([1.0, float("nan"), float("inf")])
    with LossClient(live_server) as client:
        result = client.loss("mse_loss", input=x, target=[0.0, 0.0, 0.0], reduction="none")
        mean = client.loss("mse_loss", input=x, target=[0.0, 0.0, 0.0])
    expected = F.mse_loss(x, torch.zeros(3), reduction="none")
    assert torch.equal(result.value.isnan(), expected.isnan())
    assert result.value[0] == 1.0 and result.value[2] == float("inf")
    assert mean.value.isnan() and mean.raw["value"] == "NaN"


@pytest.mark.parametrize("encoding", ["nested", "flat"])
def test_other_response_encodings_decode_the_same(live_server: str, encoding: str) -> None:
    x, t = logits_and_labels()
    with LossClient(live_server) as client:
        result = client.loss(
            "cross_entropy", input=x, target=t, reduction="none", grad=True, encoding=encoding
        )
    value, grad = torch_cross_entropy(x, t, "none")
    assert_same(result.value, value)
    assert_same(result.grad["input"], grad)


def test_catalog(live_server: str) -> None:
    with LossClient(live_server) as client:
        losses = client.losses()
        info = client.loss_info("CrossEntropyLoss")
    assert [entry["name"] for entry in losses] == list(LOSSES)
    assert info["name"] == "cross_entropy" and "input" in info["differentiable"]


def test_batch_with_a_failing_item(live_server: str) -> None:
    x, t = logits_and_labels()
    items: list[dict[str, Any]] = [
        {"loss": "cross_entropy", "input": x, "target": t, "grad": True},
        {"loss": "focal_loss", "input": [1.0], "target": [1.0]},
        {"loss": "MSELoss", "input": np.float64([1.0, 2.0]), "target": [0.0, 0.0, 0.0]},
        {"loss": "l1_loss", "input": [1.0, 2.0], "target": [0.0, 0.0], "reduction": "none"},
    ]
    with LossClient(live_server) as client:
        results = client.batch(items)
    assert len(results) == 4
    first = results[0]
    assert isinstance(first, LossResult)
    value, grad = torch_cross_entropy(x, t, "mean")
    assert_same(first.value, value)
    assert_same(first.grad["input"], grad)
    assert isinstance(results[1], UnknownLossError) and results[1].status == 404
    assert isinstance(results[2], InvalidPayloadError)
    assert results[2].errors[0]["loc"][:3] == ["body", "items", 2]
    last = results[3]
    assert isinstance(last, LossResult)
    assert_same(last.value, torch.tensor([1.0, 2.0]))


def test_unknown_loss_is_a_typed_404(live_server: str) -> None:
    with LossClient(live_server) as client:
        with pytest.raises(UnknownLossError) as caught:
            client.loss("focal_loss", input=[1.0], target=[1.0])
        with pytest.raises(UnknownLossError):
            client.loss_info("focal_loss")
    error = caught.value
    assert isinstance(error, NotFoundError) and isinstance(error, LossServiceError)
    assert error.status == 404 and error.problem["status"] == 404
    assert error.problem["title"] == "Unknown loss" and "cross_entropy" in error.detail
    assert str(error).startswith("404 Unknown loss: unknown loss 'focal_loss'")


def test_invalid_payload_is_a_typed_422(live_server: str) -> None:
    with LossClient(live_server) as client, pytest.raises(InvalidPayloadError) as caught:
        client.loss("cross_entropy", input=torch.zeros(2, 5), target=torch.tensor([1, 2, 3]))
    error = caught.value
    assert error.status == 422 and error.problem["type"].endswith("invalid-payload")
    assert error.errors[0]["loc"] == ["body", "target"]
    assert error.detail == "target: " + error.errors[0]["msg"]
    assert "expected shape [2]" in error.detail


def test_async_client(live_server: str) -> None:
    x, t = logits_and_labels()
    recorder = AsyncRecorder()

    async def calls() -> tuple[Any, ...]:
        async with AsyncLossClient(live_server, b64_threshold=30, transport=recorder) as client:
            result = await client.loss("cross_entropy", input=x, target=t, grad=True)
            batch = await client.batch([{"loss": "cross_entropy", "input": x, "target": t}])
            losses = await client.losses()
            info = await client.loss_info("nll_loss")
            with pytest.raises(UnknownLossError):
                await client.loss("focal_loss", input=[1.0])
            with pytest.raises(InvalidPayloadError):
                await client.loss("cross_entropy", input=x, target=t[:2])
            return result, batch, losses, info

    result, batch, losses, info = asyncio.run(calls())
    value, grad = torch_cross_entropy(x, t, "mean")
    assert_same(result.value, value)
    assert_same(result.grad["input"], grad)
    assert isinstance(batch[0], LossResult)
    assert_same(batch[0].value, value)
    assert len(losses) == len(LOSSES) and info["name"] == "nll_loss"
    sent = json.loads(recorder.requests[0].content)
    assert "b64" in sent["input"] and "data" in sent["target"]  # 30 and 6 elements


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_results_follow_the_callers_device(live_server: str) -> None:
    x, t = logits_and_labels()
    with LossClient(live_server) as client:
        result = client.loss("cross_entropy", input=x.cuda(), target=t.cuda(), grad=True)
    value, grad = torch_cross_entropy(x, t, "mean")
    assert result.value.device.type == "cuda" and result.grad["input"].device.type == "cuda"
    assert torch.equal(result.value.cpu(), value) and torch.equal(result.grad["input"].cpu(), grad)


# --------------------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_API_KEYS": "k-one,k-two"})
    try:
        yield url
    finally:
        stop_server(proc)


def test_api_key(keyed_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOSS_SERVICE_API_KEY", raising=False)
    for key in (None, "wrong"):
        with LossClient(keyed_server, api_key=key) as client:
            with pytest.raises(AuthenticationError) as caught:
                client.loss("cross_entropy", input=[[2, 1], [1, 2]], target=[1, 0])
            assert caught.value.status == 401 and caught.value.problem["status"] == 401
            with pytest.raises(AuthenticationError):
                client.losses()
    recorder = Recorder()
    with LossClient(keyed_server, api_key="k-two", transport=recorder) as client:
        result = client.loss("cross_entropy", input=[[2, 1], [1, 2]], target=[1, 0])
        assert len(client.losses()) == len(LOSSES)
    assert recorder.requests[0].headers["authorization"] == "Bearer k-two"
    assert round(result.value.item(), 4) == 1.3133

    monkeypatch.setenv("LOSS_SERVICE_API_KEY", "k-one")

    async def from_env() -> LossResult:
        async with AsyncLossClient(keyed_server) as client:
            return await client.loss("mse_loss", input=[1.0], target=[3.0])

    assert asyncio.run(from_env()).value.item() == 4.0


# --------------------------------------------------------------------------- retries and timeouts


class StandIn:
    """A stand-in for an overloaded service: answers ``failures`` 503s (with
    ``retry_after`` as Retry-After, when set), then a canned loss result;
    ``/v1/losses/slow`` takes two seconds."""

    def __init__(self) -> None:
        self.failures = 0
        self.retry_after: str | None = None
        self.attempts: list[float] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        self.attempts.append(time.monotonic())
        if scope["path"] == "/v1/losses/slow":
            await asyncio.sleep(2)
        if self.failures > 0:
            self.failures -= 1
            status = 503
            body: dict[str, Any] = {
                "type": "about:blank#errors-overloaded", "title": "Service overloaded",
                "status": 503, "detail": "all 1 computation slots stayed busy",
            }  # fmt: skip
        else:
            status = 200
            body = {
                "loss": "mse_loss",
                "value": 0.5,
                "shape": [],
                "dtype": "float32",
                "device": "cpu",
            }
        headers = [(b"content-type", b"application/json")]
        if status == 503 and self.retry_after is not None:
            headers.append((b"retry-after", self.retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    def reset(self, failures: int, retry_after: str | None) -> None:
        self.failures, self.retry_after, self.attempts = failures, retry_after, []


@pytest.fixture(scope="module")
def stand_in() -> Iterator[tuple[StandIn, str]]:
    app = StandIn()
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", ws="none", log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = server.force_exit = True  # the slow request may still sleep
        thread.join(10)


def test_503_is_retried_after_retry_after(stand_in: tuple[StandIn, str]) -> None:
    app, url = stand_in
    app.reset(failures=2, retry_after="1")
    with LossClient(url, max_retries=3) as client:
        result = client.loss("mse_loss", input=[1.0], target=[0.0])
    assert result.value.item() == 0.5
    assert len(app.attempts) == 3
    waits = [b - a for a, b in zip(app.attempts, app.attempts[1:], strict=False)]
    assert all(0.95 <= w < 1.6 for w in waits), waits


def test_503_without_retry_after_backs_off_exponentially(stand_in: tuple[StandIn, str]) -> None:
    app, url = stand_in
    app.reset(failures=3, retry_after=None)
    with LossClient(url, max_retries=3, backoff=0.1) as client:
        assert client.loss("mse_loss", input=[1.0], target=[0.0]).value.item() == 0.5
    waits = [b - a for a, b in zip(app.attempts, app.attempts[1:], strict=False)]
    assert len(waits) == 3
    for wait, expected in zip(waits, (0.1, 0.2, 0.4), strict=True):
        assert expected * 0.9 <= wait < expected + 0.5, waits


def test_503_gives_up_after_max_retries(stand_in: tuple[StandIn, str]) -> None:
    app, url = stand_in
    app.reset(failures=100, retry_after="0")
    with LossClient(url, max_retries=2) as client, pytest.raises(ServiceUnavailableError) as caught:
        client.loss("mse_loss", input=[1.0], target=[0.0])
    assert len(app.attempts) == 3
    error = caught.value
    assert error.status == 503 and error.retry_after == 0.0
    assert error.detail == "all 1 computation slots stayed busy"

    app.reset(failures=100, retry_after="0")
    with LossClient(url, max_retries=0) as client, pytest.raises(ServiceUnavailableError):
        client.losses()
    assert len(app.attempts) == 1


def test_async_client_retries_too(stand_in: tuple[StandIn, str]) -> None:
    app, url = stand_in
    app.reset(failures=1, retry_after="1")

    async def call() -> LossResult:
        async with AsyncLossClient(url, max_retries=1) as client:
            return await client.loss("mse_loss", input=[1.0], target=[0.0])

    assert asyncio.run(call()).value.item() == 0.5
    assert len(app.attempts) == 2 and 0.95 <= app.attempts[1] - app.attempts[0] < 1.6

    app.reset(failures=2, retry_after="0")

    async def give_up() -> None:
        async with AsyncLossClient(url, max_retries=1) as client:
            await client.loss("mse_loss", input=[1.0], target=[0.0])

    with pytest.raises(ServiceUnavailableError):
        asyncio.run(give_up())
    assert len(app.attempts) == 2


def test_timeout_raises_httpx_timeout_and_is_not_retried(stand_in: tuple[StandIn, str]) -> None:
    app, url = stand_in
    app.reset(failures=0, retry_after=None)
    with LossClient(url, timeout=0.3, max_retries=3) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.loss("slow", input=[1.0], target=[0.0])
    assert time.monotonic() - started < 1.5
    assert len(app.attempts) == 1


def test_a_refused_connection_is_named_at_once() -> None:
    recorder = Recorder()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    x = torch.randn(200, 100)  # 80 kB: the binary path, over the client's own connections
    started = time.monotonic()
    client = LossClient(url, max_retries=3, backoff=1.0, transport=recorder)
    with client, pytest.raises(ServiceUnreachableError) as caught:
        client.losses()
    client = LossClient(url, max_retries=3, backoff=1.0)
    with client, pytest.raises(ServiceUnreachableError) as binary:
        client.loss("mse_loss", input=x, target=x)
    assert time.monotonic() - started < 1.0  # no backoff: nothing listens
    assert len(recorder.requests) == 1
    for error in (caught.value, binary.value):
        assert isinstance(error, LossServiceError) and isinstance(error, httpx.ConnectError)
        assert url in str(error) and error.url == url and "refused" in str(error).lower()


def test_async_refused_connection_is_named_too() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def call(binary: bool) -> None:
        async with AsyncLossClient(url, backoff=1.0) as client:
            x = torch.randn(200, 100) if binary else torch.randn(2, 2)
            await client.loss("mse_loss", input=x, target=x)

    for binary in (False, True):
        with pytest.raises(ServiceUnreachableError, match=url):
            asyncio.run(call(binary))


def test_a_proxy_500_is_retried_and_the_services_own_errors_are_not() -> None:
    """A bare 500 comes from a proxy whose replica died (Ray Serve's): retried
    like a dropped connection; a problem+json answer is the service's own."""
    from service.client import _ClientConfig  # here: the import block above is busy

    config = _ClientConfig(
        None, None, 3, 0.1, 1.0, 0, retry_connect_errors=True, binary_threshold=None
    )
    proxy_500 = httpx.Response(500, text="Internal Server Error")
    assert config.retry_delay(0, proxy_500) == 0.1
    assert config.retry_delay(3, proxy_500) is None
    problem = {"type": "about:blank", "title": "Internal Server Error", "status": 500}
    own_500 = httpx.Response(
        500, content=json.dumps(problem), headers={"content-type": "application/problem+json"}
    )
    assert config.retry_delay(0, own_500) is None
    assert config.retry_delay(0, httpx.Response(502, text="Bad Gateway")) is None
    quiet = _ClientConfig(
        None, None, 3, 0.1, 1.0, 0, retry_connect_errors=False, binary_threshold=None
    )
    assert quiet.retry_delay(0, proxy_500) is None
