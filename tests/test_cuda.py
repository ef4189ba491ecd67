"""CUDA paths: run where torch sees a GPU, skipped cleanly elsewhere.
scripts/gpu-check runs these too, beside its own parity, gradient, OOM and speed checks."""

from __future__ import annotations

from typing import Any

import numpy as np
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


# --------------------------------------------------------------------------- pinned bodies


def v2_binary_body(x: torch.Tensor, target: torch.Tensor) -> tuple[bytes, int]:
    import orjson

    raw_x, raw_t = x.numpy().tobytes(), target.numpy().tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": len(raw_x)}},
                {"name": "target", "shape": list(target.shape), "datatype": "INT64",
                 "parameters": {"binary_data_size": len(raw_t)}},
            ],
            "parameters": {"grad": True, "binary_data_output": True},
        }
    )  # fmt: skip
    return header + raw_x + raw_t, len(header)


def test_pinned_buffers_are_page_locked() -> None:
    from service.api.runtime import pin_bodies, pinned_block_bytes, pinned_buffer

    assert torch.from_numpy(pinned_buffer(3 * 1024 * 1024)).is_pinned()
    assert pinned_block_bytes(3 * 1024 * 1024) == 4 * 1024 * 1024
    assert pin_bodies(Settings(device="auto"))
    assert pin_bodies(Settings(device="cuda:0"))
    assert not pin_bodies(Settings(device="cpu"))
    assert pin_bodies(Settings(device="cpu", pin_body_memory=True))
    assert not pin_bodies(Settings(device="auto", pin_body_memory=False))


@pytest.mark.parametrize("pinned", [True, False])
def test_large_binary_body_on_cuda_is_exact_pinned_or_not(pinned: bool) -> None:
    """A v2 binary body over the pinning threshold, received into pinned (or
    pageable) memory, computed on the GPU: the loss and the gradient equal the
    in-process call bit for bit, and the body's reservation goes back."""
    import numpy as np
    import orjson

    app = create_app(Settings(device="cuda", pin_body_memory=pinned))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2048, 1000, generator=generator)
    target = torch.randint(0, 1000, (2048,), generator=generator)
    body, header_length = v2_binary_body(x, target)
    on_gpu = x.cuda().requires_grad_(True)
    loss = F.cross_entropy(on_gpu, target.cuda())
    (grad,) = torch.autograd.grad(loss, on_gpu)
    with TestClient(app) as client:
        response = client.post(
            "/v2/models/cross_entropy/infer",
            content=body,
            headers={
                "content-type": "application/octet-stream",
                "inference-header-content-length": str(header_length),
            },
        )
        assert response.status_code == 200, response.text
        length = int(response.headers["inference-header-content-length"])
        outputs = orjson.loads(response.content[:length])["outputs"]
        sizes = [o["parameters"]["binary_data_size"] for o in outputs]
        data = response.content[length:]
        assert np.frombuffer(data[: sizes[0]], "<f4")[0] == loss.item()
        assert data[sizes[0] : sizes[0] + sizes[1]] == grad.cpu().numpy().tobytes()
        rt = app.state.runtime
        assert rt.pin_bodies is pinned
        assert rt.bodies.used == 0


def test_large_results_come_back_through_pinned_memory() -> None:
    from service.tensors import PINNED_RESULT_MIN_BYTES, to_host

    # 2 MiB of float32, strided
    big = torch.randn(PINNED_RESULT_MIN_BYTES, device="cuda").view(-1, 4)[:, ::2]
    assert not big.is_contiguous() and big.nbytes >= PINNED_RESULT_MIN_BYTES
    host = to_host(big)
    assert host.device.type == "cpu" and host.is_pinned()
    assert torch.equal(host, big.cpu())
    small = torch.randn(16, device="cuda")
    assert torch.equal(to_host(small), small.cpu())
    on_cpu = torch.randn(4)
    assert to_host(on_cpu) is on_cpu


# --------------------------------------------------------------------------- CUDA shared memory
# A real server process (cudaIpcOpenMemHandle refuses a handle from its own
# process); the regions made here with tritonclient's cuda_shared_memory.


def _cuda_shm_ready() -> bool:
    from service.shm import cuda_available

    return cuda_available()


@pytest.fixture(scope="module")
def cuda_server() -> Any:
    from tests.conftest import free_port, start_server, stop_server

    port = free_port()
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cuda", "LOSS_SERVICE_GRPC_PORT": str(port)})
    try:
        yield url.removeprefix("http://"), f"127.0.0.1:{port}"
    finally:
        stop_server(proc)


@pytest.mark.skipif(not _cuda_shm_ready(), reason="cuda-python is not installed (extra 'cuda')")
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cuda_shared_memory_in_and_out(cuda_server: Any, protocol: str) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.cuda_shared_memory as cudashm

    mod: Any = httpclient if protocol == "http" else grpcclient
    client = mod.InferenceServerClient(cuda_server[0] if protocol == "http" else cuda_server[1])
    g = torch.Generator().manual_seed(16)
    x = torch.randn(64, 10, generator=g)
    t = torch.randint(0, 10, (64,), generator=g)
    tensors = {"input": x, "target": t}
    handles = {}
    try:
        assert "cuda_shared_memory" in (
            client.get_server_metadata()["extensions"]
            if protocol == "http"
            else client.get_server_metadata().extensions
        )
        for name, size in (("input", x.nbytes), ("target", t.nbytes), ("loss", 4),
                           ("grad_input", x.nbytes)):  # fmt: skip
            region = f"{protocol}_{name}"
            handles[name] = cudashm.create_shared_memory_region(region, size, 0)
            raw = cudashm.get_raw_handle(handles[name])
            client.register_cuda_shared_memory(region, raw, 0, size)
        inputs, outputs = [], []
        for name, tensor in tensors.items():
            cudashm.set_shared_memory_region(handles[name], [tensor.numpy()])
            item = mod.InferInput(name, list(tensor.shape), "FP32" if name == "input" else "INT64")
            item.set_shared_memory(f"{protocol}_{name}", tensor.nbytes)
            inputs.append(item)
        for name, size in (("loss", 4), ("grad_input", x.nbytes)):
            out = mod.InferRequestedOutput(name)
            out.set_shared_memory(f"{protocol}_{name}", size)
            outputs.append(out)
        client.infer("cross_entropy", inputs, outputs=outputs)
        leaf = x.cuda().requires_grad_()
        loss = F.cross_entropy(leaf, t.cuda())
        (grad,) = torch.autograd.grad(loss, leaf)
        got_loss = cudashm.get_contents_as_numpy(handles["loss"], np.float32, [1])
        got_grad = cudashm.get_contents_as_numpy(handles["grad_input"], np.float32, [64, 10])
        # bit for bit: the same call on the same device
        assert torch.equal(torch.from_numpy(got_loss.copy()), loss.detach().cpu().reshape(1))
        assert torch.equal(torch.from_numpy(got_grad.copy()), grad.cpu())
        # a bad handle is a 400 / INVALID_ARGUMENT, never a 5xx
        with pytest.raises(Exception) as excinfo:
            client.register_cuda_shared_memory(f"{protocol}_bad", b"AAAA", 0, 8)
        assert "raw_handle" in str(excinfo.value)
    finally:
        client.unregister_cuda_shared_memory()
        for handle in handles.values():
            cudashm.destroy_shared_memory_region(handle)
        client.close()
