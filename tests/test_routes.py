"""The compute routes come from one table (service.api.routes): the hot-path
dispatch serves them in production, and FastAPI's copies (which declare them
in the OpenAPI document) answer the same requests the same way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

CE = {"input": [[2, 1], [1, 2]], "target": [1, 0], "grad": True}
INFER = {
    "inputs": [
        {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [2, 1, 1, 2]},
        {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, 0]},
    ],
    "parameters": {"grad": True},
}
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/losses/cross_entropy", CE),
    ("/v1/losses/CrossEntropyLoss", CE),
    ("/v1/losses/cross_entropy", {**CE, "target": [7, 0]}),
    ("/v1/losses/focal_loss", CE),
    ("/v2/models/cross_entropy/infer", INFER),
    ("/v2/models/CrossEntropyLoss/versions/1/infer", INFER),
    ("/v2/models/cross_entropy/versions/2/infer", INFER),
    ("/v2/models/cross_entropy/infer", {**INFER, "parameters": {"reduction": "avg"}}),
]


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[TestClient, TestClient]]:
    settings = Settings(device="cpu", log_level="warning")
    with (
        TestClient(create_app(settings), raise_server_exceptions=False) as fast,
        TestClient(
            create_app(settings, fast_dispatch=False), raise_server_exceptions=False
        ) as plain,
    ):
        yield fast, plain


@pytest.mark.parametrize(("path", "body"), REQUESTS)
def test_fastapi_routes_answer_as_the_dispatch_does(
    clients: tuple[TestClient, TestClient], path: str, body: dict[str, Any]
) -> None:
    fast, plain = (c.post(path, json=body) for c in clients)
    # a route FastAPI lacked would be its own 404 or 405, with another body
    assert fast.status_code == plain.status_code
    assert fast.headers["content-type"] == plain.headers["content-type"]
    assert fast.json() == plain.json()
