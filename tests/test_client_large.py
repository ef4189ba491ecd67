"""service.client with large tensors, through a real uvicorn process: the
/v2 binary path both ways (the client's own connections, and httpx when a
transport is given), every dtype, non-contiguous and CUDA tensors, all equal
to torch in-process; errors, retries and the /v1 fallbacks of that path."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service import client as client_module
from service.client import (
    HUGE_PAGE,
    HUGE_PAGES,
    AsyncLossClient,
    InvalidPayloadError,
    LossClient,
    LossResult,
    PayloadTooLargeError,
    ResultCache,
    receive_buffer,
)
from tests.conftest import start_server, stop_server
from tests.device import DEVICE


class Recorder(httpx.BaseTransport):
    """Sends every request to the real server and keeps the requests."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def expected(
    loss: str, tensors: dict[str, torch.Tensor], grad: list[str], **options: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and the gradients of ``grad`` (sum of grad_output ones), in-process."""
    leaves = {k: v.detach().clone().requires_grad_(k in grad) for k, v in tensors.items()}
    value = getattr(F, loss)(**leaves, **options)
    grads = torch.autograd.grad(value, [leaves[n] for n in grad], torch.ones_like(value))
    return value.detach(), dict(zip(grad, grads, strict=True))


def assert_same(actual: torch.Tensor, wanted: torch.Tensor) -> None:
    assert actual.dtype == wanted.dtype and actual.shape == wanted.shape
    assert actual.device == wanted.device
    assert torch.equal(actual, wanted)  # bit for bit


def went_binary(result: LossResult) -> bool:
    """A /v2 answer's header (model_name, outputs) rather than a /v1 body."""
    return "model_name" in result.raw and "outputs" in result.raw


def logits(rows: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=gen), torch.randint(
        0, classes, (rows,), generator=gen
    )


def test_large_loss_and_gradient_both_ways(live_server: str) -> None:
    x, t = logits(2048, 1000)  # 8 MB up, 8 MB back
    with LossClient(live_server) as client:
        first = client.loss("cross_entropy", input=x, target=t, grad=True)
        again = client.loss("CrossEntropyLoss", input=x, target=t, grad=True, label_smoothing=0.1)
    value, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"])
    assert went_binary(first) and first.loss == "cross_entropy" and first.device == "cpu"
    assert first.dtype == "float32" and first.value.dim() == 0
    assert_same(first.value, value)
    assert_same(first.grad["input"], grads["input"])
    value, grads = expected(
        "cross_entropy", {"input": x, "target": t}, ["input"], label_smoothing=0.1
    )
    assert_same(again.value, value)
    assert_same(again.grad["input"], grads["input"])
    for result in (first, again):
        assert result.request_id and len(result.request_id) >= 16
        assert set(result.server_timing) == {"decode", "compute", "encode"}
        assert all(ms >= 0 for ms in result.server_timing.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
def test_every_float_dtype_exact(live_server: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 200, generator=gen).to(dtype)
    b = torch.randn(300, 200, generator=gen).to(dtype)
    w = torch.rand(300, 200, generator=gen).to(dtype)
    with LossClient(live_server) as client:
        result = client.loss(
            "mse_loss", input=a, target=b, weight=w, grad=["input", "target"], reduction="sum"
        )
        numpy_side = (
            client.loss("l1_loss", input=a.numpy(), target=b.numpy(), grad=True)
            if dtype != torch.bfloat16
            else None
        )
    assert went_binary(result)
    value, grads = expected(
        "mse_loss", {"input": a, "target": b, "weight": w}, ["input", "target"], reduction="sum"
    )
    assert result.dtype == str(dtype).removeprefix("torch.")
    assert_same(result.value, value)
    assert_same(result.grad["input"], grads["input"])
    assert_same(result.grad["target"], grads["target"])
    if numpy_side is not None:
        assert went_binary(numpy_side)
        value, grads = expected("l1_loss", {"input": a, "target": b}, ["input"])
        assert_same(numpy_side.value, value)
        assert_same(numpy_side.grad["input"], grads["input"])


def test_non_contiguous_and_big_endian_inputs(live_server: str) -> None:
    """A non-contiguous tensor travels as its row-major values. Elementwise
    results and gradients equal torch's on the original bit for bit; a mean
    over operands that are both strided may differ from torch's on them in the
    last bit, because torch sums in an order that follows the memory layout
    (it differs between x.T and x.T.contiguous() in-process too): that value
    equals torch's on the contiguous tensors, which hold the same values."""
    x, t = logits(1000, 600, seed=5)
    transposed = x.T  # [600, 1000], column-major in memory
    strided = x[::2, ::3]  # a view with steps
    other = torch.randn(1000, 600, generator=torch.Generator().manual_seed(6)).T
    big_endian = np.asarray(x.numpy(), dtype=">f4")
    with LossClient(live_server) as client:
        from_transposed = client.loss("cross_entropy", input=transposed, target=t[:600], grad=True)
        from_strided = client.loss("mse_loss", input=strided, target=strided.flip(0), grad=True)
        pair = client.loss(
            "smooth_l1_loss", input=transposed, target=other, grad=True, reduction="sum"
        )
        from_numpy = client.loss("cross_entropy", input=big_endian, target=t.numpy(), grad=True)
    assert not transposed.is_contiguous() and not strided.is_contiguous()
    for result, (loss, tensors) in (
        (from_transposed, ("cross_entropy", {"input": transposed, "target": t[:600]})),
        (from_strided, ("mse_loss", {"input": strided, "target": strided.flip(0)})),
        (from_numpy, ("cross_entropy", {"input": x, "target": t})),
    ):
        value, grads = expected(loss, tensors, ["input"])
        assert went_binary(result)
        assert_same(result.value, value)
        assert_same(result.grad["input"], grads["input"])
    as_sent = {"input": transposed.contiguous(), "target": other.contiguous()}
    value, grads = expected("smooth_l1_loss", as_sent, ["input"], reduction="sum")
    assert_same(pair.value, value)
    assert_same(pair.grad["input"], grads["input"])
    value, grads = expected(
        "smooth_l1_loss", {"input": transposed, "target": other}, ["input"], reduction="sum"
    )
    assert_same(pair.grad["input"], grads["input"])  # elementwise: exact on the original
    assert torch.allclose(pair.value, value, rtol=1e-6, atol=0)


def test_grad_output_options_and_a_number_argument(live_server: str) -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(400, 300, generator=gen, dtype=torch.float64)
    y = torch.randn(400, 300, generator=gen, dtype=torch.float64)
    with LossClient(live_server) as client:
        huber = client.loss(
            "huber_loss", input=x, target=y, delta=0.5, grad=True, grad_output=torch.tensor(3.0)
        )
        gaussian = client.loss(
            "gaussian_nll_loss", input=x, target=y, var=0.25, full=True, grad=True
        )
    leaf = x.clone().requires_grad_()
    value = F.huber_loss(leaf, y, delta=0.5)
    (grad,) = torch.autograd.grad(value, leaf, torch.tensor(3.0, dtype=torch.float64))
    assert went_binary(huber)
    assert_same(huber.value, value.detach())
    assert_same(huber.grad["input"], grad)
    leaf = x.clone().requires_grad_()
    value = F.gaussian_nll_loss(leaf, y, 0.25, full=True)
    (grad,) = torch.autograd.grad(value, leaf)
    assert went_binary(gaussian)
    assert_same(gaussian.value, value.detach())
    assert_same(gaussian.grad["input"], grad)


def test_what_binary_cannot_say_goes_as_v1(live_server: str) -> None:
    x, t = logits(500, 200, seed=11)
    with LossClient(live_server) as client:
        per_row = client.loss("cross_entropy", input=x, target=t, reduction="none", grad=True)
        plain_target = client.loss("cross_entropy", input=x, target=t.tolist())
        small = client.loss("cross_entropy", input=x[:4], target=t[:4])
        forced = LossClient(live_server, binary_threshold=None)
        with forced:
            json_call = forced.loss("cross_entropy", input=x, target=t, grad=True)
    value, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"], reduction="none")
    assert not went_binary(per_row) and per_row.raw["shape"] == [500]
    assert_same(per_row.value, value)
    assert_same(per_row.grad["input"], grads["input"])
    assert not went_binary(plain_target) and not went_binary(small)
    assert_same(plain_target.value, F.cross_entropy(x, t))
    assert_same(small.value, F.cross_entropy(x[:4], t[:4]))
    assert not went_binary(json_call)
    assert_same(json_call.value, F.cross_entropy(x, t))


def test_every_call_binary_with_threshold_zero(live_server: str) -> None:
    """Tiny, 0-dim, integer and empty-batch tensors over the binary path."""
    with LossClient(live_server, binary_threshold=0) as client:
        scalar = client.loss("mse_loss", input=torch.tensor(2.5), target=torch.tensor(1.0))
        ints = client.loss(
            "multilabel_margin_loss",
            input=torch.tensor([[0.1, 0.2, 0.4, 0.8]]),
            target=torch.tensor([[3, 0, -1, 1]], dtype=torch.int64),
            grad=True,
        )
        ranking = client.loss(
            "margin_ranking_loss",
            input1=torch.tensor([1.0, 2.0]),
            input2=torch.tensor([2.0, 1.0]),
            target=torch.tensor([1.0, -1.0]),
            margin=0.5,
            grad=["input1", "input2"],
        )
    assert all(went_binary(r) for r in (scalar, ints, ranking))
    assert_same(scalar.value, F.mse_loss(torch.tensor(2.5), torch.tensor(1.0)))
    value, grads = expected(
        "multilabel_margin_loss",
        {"input": torch.tensor([[0.1, 0.2, 0.4, 0.8]]), "target": torch.tensor([[3, 0, -1, 1]])},
        ["input"],
    )
    assert_same(ints.value, value)
    assert_same(ints.grad["input"], grads["input"])
    value, grads = expected(
        "margin_ranking_loss",
        {
            "input1": torch.tensor([1.0, 2.0]),
            "input2": torch.tensor([2.0, 1.0]),
            "target": torch.tensor([1.0, -1.0]),
        },
        ["input1", "input2"],
        margin=0.5,
    )
    assert_same(ranking.value, value)
    assert_same(ranking.grad["input1"], grads["input1"])
    assert_same(ranking.grad["input2"], grads["input2"])


def test_through_a_given_httpx_transport(live_server: str) -> None:
    """With a transport of the caller's, binary calls go through httpx: the body
    in pieces with its Content-Length."""
    recorder = Recorder()
    x, t = logits(1024, 500, seed=2)
    with LossClient(live_server, transport=recorder) as client:
        result = client.loss("cross_entropy", input=x, target=t, grad=True)
    (request,) = recorder.requests
    assert request.url.path == "/v2/models/cross_entropy/infer"
    assert request.headers["content-type"] == "application/octet-stream"
    header_length = int(request.headers["inference-header-content-length"])
    assert int(request.headers["content-length"]) == header_length + x.nbytes + t.nbytes
    value, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"])
    assert_same(result.value, value)
    assert_same(result.grad["input"], grads["input"])


def test_async_client_large(live_server: str) -> None:
    x, t = logits(2048, 500, seed=4)
    y = x.to(torch.bfloat16)

    async def calls() -> list[LossResult]:
        async with AsyncLossClient(live_server) as client:
            return list(
                await asyncio.gather(
                    client.loss("cross_entropy", input=x, target=t, grad=True),
                    client.loss("cross_entropy", input=y.T.contiguous().T, target=t, grad=True),
                )
            )

    float32, bfloat16 = asyncio.run(calls())
    for result, source in ((float32, x), (bfloat16, y)):
        value, grads = expected("cross_entropy", {"input": source, "target": t}, ["input"])
        assert went_binary(result)
        assert_same(result.value, value)
        assert_same(result.grad["input"], grads["input"])


def test_binary_errors_are_typed(live_server: str) -> None:
    x, t = logits(500, 200)
    with LossClient(live_server) as client, pytest.raises(InvalidPayloadError) as caught:
        client.loss("cross_entropy", input=x, target=t[:3])
    error = caught.value
    assert error.status == 422 and "target" in error.detail and "[500]" in error.detail
    # the connection still serves the next call
    with LossClient(live_server) as client:
        for _ in range(3):
            assert_same(
                client.loss("cross_entropy", input=x, target=t).value, F.cross_entropy(x, t)
            )


@pytest.fixture(scope="module")
def small_limit_server() -> Iterator[str]:
    proc, url = start_server(
        {"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_MAX_BODY_BYTES": "1000000"}
    )
    try:
        yield url
    finally:
        stop_server(proc)


def test_a_body_over_the_limit_is_a_413_not_a_dropped_connection(
    small_limit_server: str,
) -> None:
    x = torch.randn(2000, 1000)  # 16 MB against a 1 MB limit: refused while going up
    with LossClient(small_limit_server, max_retries=1) as client:
        for _ in range(2):
            with pytest.raises(PayloadTooLargeError) as caught:
                client.loss("mse_loss", input=x, target=x)
            assert "LOSS_SERVICE_MAX_BODY_BYTES" in caught.value.detail
        fits = client.loss("mse_loss", input=x[:50], target=x[:50].flip(0))
    assert went_binary(fits)
    assert_same(fits.value, F.mse_loss(x[:50], x[:50].flip(0)))


def test_request_id_sent_is_echoed(live_server: str) -> None:
    x = torch.randn(300, 300)
    with LossClient(live_server, headers={"X-Request-ID": "trace-42"}) as client:
        binary = client.loss("mse_loss", input=x, target=x.flip(1))
        json_call = client.loss("mse_loss", input=[1.0], target=[0.0])
    assert went_binary(binary) and not went_binary(json_call)
    assert binary.request_id == json_call.request_id == "trace-42"
    assert set(json_call.server_timing) == {"decode", "compute", "encode"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_cuda_tensors_come_back_on_their_device(live_server: str) -> None:
    x, t = logits(2048, 1000, seed=8)
    device = DEVICE if DEVICE.startswith("cuda") else "cuda"
    with LossClient(live_server) as client:
        result = client.loss(
            "cross_entropy", input=x.to(device), target=t.to(device), grad=True, device="cpu"
        )
        half = client.loss(
            "cross_entropy",
            input=x.to(device, torch.bfloat16).T.contiguous().T,
            target=t.to(device),
            grad=True,
            device="cpu",
        )
    assert went_binary(result) and result.device == "cpu"
    assert result.value.device.type == "cuda" and result.grad["input"].device.type == "cuda"
    value, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"])
    assert torch.equal(result.value.cpu(), value)
    assert torch.equal(result.grad["input"].cpu(), grads["input"])
    value, grads = expected(
        "cross_entropy", {"input": x.to(torch.bfloat16), "target": t}, ["input"]
    )
    assert half.grad["input"].device.type == "cuda"
    assert torch.equal(half.value.cpu(), value)
    assert torch.equal(half.grad["input"].cpu(), grads["input"])


def test_a_connection_the_server_closed_is_not_reused(live_server: str) -> None:
    """uvicorn closes an idle connection after 5 s: the next call opens a new
    one instead of failing (no retries allowed here)."""
    x = torch.randn(300, 300)
    with LossClient(live_server, max_retries=0) as client:
        first = client.loss("mse_loss", input=x, target=x.flip(0))
        time.sleep(5.5)
        second = client.loss("mse_loss", input=x, target=x.flip(0))
    assert went_binary(first) and went_binary(second)
    assert_same(second.value, F.mse_loss(x, x.flip(0)))


def test_async_client_through_a_given_httpx_transport(live_server: str) -> None:
    x, t = logits(1024, 300, seed=6)

    async def call() -> LossResult:
        transport = httpx.AsyncHTTPTransport()
        async with AsyncLossClient(live_server, transport=transport) as client:
            return await client.loss("cross_entropy", input=x, target=t, grad=True)

    result = asyncio.run(call())
    value, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"])
    assert went_binary(result)
    assert_same(result.value, value)
    assert_same(result.grad["input"], grads["input"])


def test_a_misspelt_option_is_the_same_422_as_on_v1(live_server: str) -> None:
    x, t = logits(500, 200)
    with LossClient(live_server) as client:
        for tensors in ((x, t), (x[:2], t[:2])):  # binary-sized, then small
            with pytest.raises(InvalidPayloadError) as caught:
                client.loss("cross_entropy", input=tensors[0], target=tensors[1], smoothing=0.1)
            assert caught.value.errors and caught.value.errors[0]["loc"] == ["body", "smoothing"]


# --------------------------------------------------------------------------- the result cache

needs_huge_pages = pytest.mark.skipif(
    HUGE_PAGES is None, reason="large results come from torch.empty without MADV_HUGEPAGE"
)
MiB = 1 << 20


def memory(tensor: torch.Tensor) -> range:
    """The bytes of the block a tensor's storage lies in."""
    storage = tensor.untyped_storage()
    return range(storage.data_ptr(), storage.data_ptr() + storage.nbytes())


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    first, second = memory(a), memory(b)
    return first.start < second.stop and second.start < first.stop


@pytest.fixture
def small_large_results(monkeypatch: pytest.MonkeyPatch) -> int:
    """Results of 1 MiB and more go through the cache (not 32 MiB), so that
    the tests move a few MB, not hundreds."""
    monkeypatch.setattr(client_module, "HUGE_PAGE_FROM", MiB)
    return MiB


@needs_huge_pages
def test_a_dropped_block_is_handed_out_again_and_a_referenced_one_never() -> None:
    cache = ResultCache(200 * MiB)
    first = receive_buffer([32 * MiB // 4], torch.float32, cache)
    first.fill_(7.0)
    block = first.data_ptr()
    kept = receive_buffer([32 * MiB // 4], torch.float32, cache)  # first is alive: another
    assert not shares_memory(first, kept) and len(cache) == 2
    kept.fill_(1.0)
    del first
    again = receive_buffer([8 * MiB], torch.float32, cache)
    # the same block, not a fresh mapping at the same address: it still holds the 7s
    assert again.data_ptr() == block and float(again[-1]) == 7.0
    assert not shares_memory(again, kept) and bool((kept == 1.0).all())
    # a view, a .numpy(), a dtype view or a storage keeps the block as the tensor does
    holders: list[Any] = [
        lambda t: t[100:200],
        lambda t: t.numpy()[5:9],
        lambda t: t.view(torch.uint8).reshape(4, -1)[1],
        lambda t: t.untyped_storage(),
        lambda t: memoryview(t.numpy()),
    ]
    for hold in holders:
        held = hold(again)
        del again
        other = receive_buffer([8 * MiB], torch.float32, cache)
        assert other.data_ptr() != block
        del held, other
        again = receive_buffer([8 * MiB], torch.float32, cache)
        assert again.data_ptr() == block
    assert len(cache) == 3 and cache.held_bytes == 3 * 32 * MiB


@needs_huge_pages
def test_blocks_are_whole_huge_pages_and_a_size_takes_its_own_class() -> None:
    cache = ResultCache(500 * MiB)
    odd = receive_buffer([32 * MiB + 3], torch.uint8, cache)
    assert odd.numel() == 32 * MiB + 3 and len(odd.untyped_storage()) == 32 * MiB + 3
    assert cache.held_bytes == 32 * MiB + HUGE_PAGE
    block = odd.data_ptr()
    del odd
    near = receive_buffer([17 * MiB], torch.bfloat16, cache)  # 34 MiB: the same class
    assert near.data_ptr() == block and near.dtype == torch.bfloat16
    del near
    larger = receive_buffer([36 * MiB], torch.uint8, cache)  # a free block, but too small
    assert larger.data_ptr() != block and len(cache) == 2


@needs_huge_pages
def test_the_cache_never_holds_more_than_its_limit() -> None:
    cache = ResultCache(100 * MiB)  # room for two 34 MiB blocks
    results = []
    for _ in range(4):
        results.append(receive_buffer([33 * MiB], torch.uint8, cache))
        assert cache.held_bytes <= 100 * MiB
    assert len(cache) == 2 and cache.held_bytes == 68 * MiB
    assert len({r.data_ptr() for r in results}) == 4  # the last two: fresh, not kept
    del results
    big = receive_buffer([60 * MiB], torch.uint8, cache)  # lets go of the older free block
    assert len(cache) == 2 and cache.held_bytes == 94 * MiB
    del big
    huge = receive_buffer([120 * MiB], torch.uint8, cache)  # over the limit on its own:
    assert cache.held_bytes == 94 * MiB and huge.numel() == 120 * MiB  # the cache stays
    cache.clear()
    assert len(cache) == 0 and cache.held_bytes == 0
    with pytest.raises(ValueError, match="result_cache_bytes"):
        ResultCache(-1)


@needs_huge_pages
def test_a_cache_of_zero_keeps_nothing() -> None:
    cache = ResultCache(0)
    for _ in range(3):
        result = receive_buffer([33 * MiB], torch.uint8, cache)
        assert result.numel() == 33 * MiB
        assert len(cache) == 0 and cache.held_bytes == 0
        del result


@needs_huge_pages
def test_threads_never_get_the_same_block(small_large_results: int) -> None:
    cache = ResultCache(6 * 2 * MiB)  # fewer blocks than threads hold at once
    failures: list[str] = []

    def work(mark: int) -> None:
        for _ in range(40):
            tensor = receive_buffer([MiB], torch.int16, cache)
            tensor.fill_(mark)
            time.sleep(0.0005)
            if not bool((tensor == mark).all()):
                failures.append(f"thread {mark}: overwritten")
            del tensor

    threads = [threading.Thread(target=work, args=(mark,)) for mark in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert cache.held_bytes <= 12 * MiB


@needs_huge_pages
def test_client_reuses_a_dropped_result_at_the_real_threshold(live_server: str) -> None:
    x, t = logits(8192, 1024, seed=5)  # 32 MiB of gradient back: the cache's smallest
    value, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"])
    with LossClient(live_server) as client:
        first = client.loss("cross_entropy", input=x, target=t, grad=True)
        assert went_binary(first)
        assert_same(first.grad["input"], grads["input"])
        block = first.grad["input"].data_ptr()
        del first
        again = client.loss("cross_entropy", input=x, target=t, grad=True)
        assert again.grad["input"].data_ptr() == block and len(client.result_cache) == 1
        assert_same(again.value, value)
        assert_same(again.grad["input"], grads["input"])
    assert len(client.result_cache) == 0  # close() lets go


@needs_huge_pages
def test_client_results_never_share_memory(live_server: str, small_large_results: int) -> None:
    (x1, t1), (x2, t2), (x3, t3) = (logits(1024, 1024, seed=s) for s in (1, 2, 3))
    _, want1 = expected("cross_entropy", {"input": x1, "target": t1}, ["input"])
    _, want2 = expected("cross_entropy", {"input": x2, "target": t2}, ["input"])
    _, want3 = expected("cross_entropy", {"input": x3, "target": t3}, ["input"])
    with LossClient(live_server) as client:
        first = client.loss("cross_entropy", input=x1, target=t1, grad=True)
        second = client.loss("cross_entropy", input=x2, target=t2, grad=True)
        assert not shares_memory(first.grad["input"], second.grad["input"])
        assert_same(first.grad["input"], want1["input"])
        assert_same(second.grad["input"], want2["input"])
        # only views of both stay: a row, and a numpy slice
        row = first.grad["input"][7]
        array = second.grad["input"].numpy()[100:200]
        blocks = {first.grad["input"].data_ptr(), second.grad["input"].data_ptr()}
        del first, second
        third = client.loss("cross_entropy", input=x3, target=t3, grad=True)
        assert third.grad["input"].data_ptr() not in blocks
        assert not shares_memory(third.grad["input"], row)
        assert_same(third.grad["input"], want3["input"])
        assert_same(row, want1["input"][7])
        assert np.array_equal(array, want2["input"].numpy()[100:200])
        assert len(client.result_cache) == 3
        # once the views are gone, their blocks serve the next results
        del row, array, third
        reused = [client.loss("cross_entropy", input=x1, target=t1, grad=True) for _ in range(3)]
        assert len(client.result_cache) == 3
        assert len({r.grad["input"].data_ptr() for r in reused}) == 3
        for result in reused:
            assert_same(result.grad["input"], want1["input"])


@needs_huge_pages
def test_client_two_outputs_of_one_answer_and_bfloat16(
    live_server: str, small_large_results: int
) -> None:
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(1024, 1024, generator=gen).to(torch.bfloat16)  # 2 MiB: 2 MiB back, twice
    b = torch.randn(1024, 1024, generator=gen).to(torch.bfloat16)
    value, grads = expected("l1_loss", {"input": a, "target": b}, ["input", "target"])
    with LossClient(live_server, binary_threshold=0) as client:
        for _ in range(3):
            result = client.loss("l1_loss", input=a, target=b, grad=["input", "target"])
            assert went_binary(result)
            assert not shares_memory(result.grad["input"], result.grad["target"])
            assert_same(result.value, value)
            assert_same(result.grad["input"], grads["input"])
            assert_same(result.grad["target"], grads["target"])
            del result
        assert len(client.result_cache) == 2


@needs_huge_pages
def test_client_cache_bound_and_off(live_server: str, small_large_results: int) -> None:
    x, t = logits(1024, 1024, seed=6)  # 4 MiB of gradient: blocks of 4 MiB
    _, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"])
    with LossClient(live_server, result_cache_bytes=9 * MiB) as client:
        kept = [client.loss("cross_entropy", input=x, target=t, grad=True) for _ in range(4)]
        assert client.result_cache.held_bytes == 8 * MiB and len(client.result_cache) == 2
        assert len({r.grad["input"].data_ptr() for r in kept}) == 4
        for result in kept:
            assert_same(result.grad["input"], grads["input"])
    with LossClient(live_server, result_cache_bytes=0) as client:
        for _ in range(2):
            result = client.loss("cross_entropy", input=x, target=t, grad=True)
            assert_same(result.grad["input"], grads["input"])
            assert len(client.result_cache) == 0 and client.result_cache.held_bytes == 0


@needs_huge_pages
def test_async_client_results_from_its_cache(live_server: str, small_large_results: int) -> None:
    x, t = logits(1024, 1024, seed=8)
    _, grads = expected("cross_entropy", {"input": x, "target": t}, ["input"])

    async def calls() -> tuple[list[LossResult], int]:
        async with AsyncLossClient(live_server, result_cache_bytes=64 * MiB) as client:
            results = list(
                await asyncio.gather(
                    *(client.loss("cross_entropy", input=x, target=t, grad=True) for _ in range(3))
                )
            )
            return results, len(client.result_cache)

    results, blocks = asyncio.run(calls())
    assert blocks == 3
    assert len({r.grad["input"].data_ptr() for r in results}) == 3
    for result in results:
        assert_same(result.grad["input"], grads["input"])
