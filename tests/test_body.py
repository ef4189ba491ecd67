"""Reading request bodies: large bodies land in one buffer, and with the v2
binary extension the tensor bytes after the JSON header land 64-byte aligned,
so that the tensors use them in place."""

from __future__ import annotations

import asyncio
import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from starlette.requests import Request

from service.api.runtime import ALIGNMENT, PREALLOCATE_MIN_BYTES, Runtime, read_body
from service.config import Settings
from service.tensors import bytes_to_tensor

RUNTIME = Runtime(Settings(memory_budget_bytes=1 << 30))


def request_with(body: bytes, chunk: int = 65536) -> Request:
    messages = [
        {"type": "http.request", "body": body[i : i + chunk], "more_body": i + chunk < len(body)}
        for i in range(0, len(body), chunk)
    ]

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", str(len(body)).encode())],
        "app": SimpleNamespace(state=SimpleNamespace(runtime=RUNTIME)),
    }
    return Request(scope, receive)


def address(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).ctypes.data)


@pytest.mark.parametrize("header_length", [1, 243, 1000, 4095])
def test_tensor_bytes_after_the_header_are_aligned_and_used_in_place(header_length: int) -> None:
    logits = torch.randn(300, 100)
    body = b"h" * header_length + logits.numpy().tobytes()
    assert len(body) > PREALLOCATE_MIN_BYTES
    read = asyncio.run(read_body(request_with(body), 1 << 30, align=header_length))
    assert bytes(read) == body
    binary = memoryview(read)[header_length:]
    assert address(binary) % ALIGNMENT == 0
    tensor = bytes_to_tensor(binary, torch.float32, [300, 100], as_bool=False)
    assert torch.equal(tensor, logits)
    assert tensor.data_ptr() == address(binary)  # no copy


def test_without_align_a_large_body_is_one_writable_buffer() -> None:
    body = bytes(range(256)) * 1000
    read = asyncio.run(read_body(request_with(body), 1 << 30))
    assert isinstance(read, memoryview) and not read.readonly and bytes(read) == body
    ctypes.addressof((ctypes.c_char * len(read)).from_buffer(read))  # still writable


def test_body_bytes_count_against_the_memory_budget_as_they_arrive() -> None:
    used = RUNTIME.bodies.used
    body = b"x" * (PREALLOCATE_MIN_BYTES * 3)
    request = request_with(body)
    asyncio.run(read_body(request, 1 << 30))
    assert RUNTIME.bodies.used - used == len(body)
    request.scope["state"]["body_memory"].end()
    assert RUNTIME.bodies.used == used


def test_a_small_body_comes_back_as_sent() -> None:
    read = asyncio.run(read_body(request_with(b'{"a": 1}'), 1 << 30, align=3))
    assert bytes(read) == b'{"a": 1}'


def test_pinning_asked_for_without_cuda_changes_nothing() -> None:
    """LOSS_SERVICE_PIN_BODY_MEMORY=true on a machine without CUDA: bodies
    stay pageable, and a large v2 binary body still computes exactly."""
    import orjson
    import torch.nn.functional as F
    from fastapi.testclient import TestClient

    from service.main import create_app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_cuda.py covers pinning")
    app = create_app(Settings(pin_body_memory=True))
    assert app.state.runtime.pin_bodies is False
    x = torch.randn(1024, 512, generator=torch.Generator().manual_seed(3))
    target = torch.arange(1024) % 512
    raw_x, raw_t = x.numpy().tobytes(), target.numpy().tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1024, 512], "datatype": "FP32",
                 "parameters": {"binary_data_size": len(raw_x)}},
                {"name": "target", "shape": [1024], "datatype": "INT64",
                 "parameters": {"binary_data_size": len(raw_t)}},
            ]
        }
    )  # fmt: skip
    with TestClient(app) as client:
        response = client.post(
            "/v2/models/cross_entropy/infer",
            content=header + raw_x + raw_t,
            headers={
                "content-type": "application/octet-stream",
                "inference-header-content-length": str(len(header)),
            },
        )
    assert response.status_code == 200, response.text
    value = response.json()["outputs"][0]["data"][0]
    assert np.float32(value) == F.cross_entropy(x, target).item()
