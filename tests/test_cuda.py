"""CUDA paths: run where torch sees a GPU, skipped cleanly elsewhere.
scripts/gpu-check runs these too, beside its own parity, gradient, OOM and speed checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
]
SEED = {"input": [[2, 1], [1, 2]], "target": [1, 0]}


@pytest.fixture(scope="module")
def auto_client() -> TestClient:
    return TestClient(create_app(Settings(device="auto")))


def test_auto_and_cuda_run_on_the_gpu(auto_client: TestClient) -> None:
    expected = F.cross_entropy(
        torch.tensor([[2.0, 1.0], [1.0, 2.0]], device="cuda"), torch.tensor([1, 0], device="cuda")
    )
    for device in (None, "auto", "cuda", "cuda:0"):
        body = SEED if device is None else {**SEED, "device": device}
        data = auto_client.post("/v1/losses/cross_entropy", json=body).json()
        assert data["device"] == "cuda:0"
        assert data["value"] == expected.item()


def test_missing_cuda_index_names_the_devices(auto_client: TestClient) -> None:
    index = torch.cuda.device_count()
    response = auto_client.post(
        "/v1/losses/cross_entropy", json={**SEED, "device": f"cuda:{index}"}
    )
    assert response.status_code == 422
    assert "cuda:0" in response.json()["detail"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtypes_on_cuda(auto_client: TestClient, dtype: str) -> None:
    torch_dtype = getattr(torch, dtype)
    x = torch.tensor([[2.0, 1.0], [1.0, 2.0]], device="cuda", dtype=torch_dtype, requires_grad=True)
    loss = F.cross_entropy(x, torch.tensor([1, 0], device="cuda"))
    (grad,) = torch.autograd.grad(loss, x)
    response = auto_client.post(
        "/v1/losses/cross_entropy", json={**SEED, "dtype": dtype, "grad": True}
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["dtype"] == dtype
    assert data["value"] == loss.item()
    assert data["grad"]["input"] == grad.tolist()


def test_out_of_range_class_index_is_422_not_a_device_assert(auto_client: TestClient) -> None:
    bad = auto_client.post(
        "/v1/losses/cross_entropy",
        json={"input": [[2, 1], [1, 2]], "target": [1, 7], "device": "cuda"},
    )
    assert bad.status_code == 422
    # the CUDA context is still healthy
    assert auto_client.post("/v1/losses/cross_entropy", json=SEED).status_code == 200
