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


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/v1/losses/cross_entropy", "GET, POST"),  # describe and compute
        ("PUT", "/v1/losses/CrossEntropyLoss", "GET, POST"),
        ("GET", "/v1/batch", "POST"),
        ("DELETE", "/v2/models/mse_loss/infer", "POST"),
    ],
)
def test_405_allow_lists_every_method_of_the_route(
    clients: tuple[TestClient, TestClient], method: str, path: str, allow: str
) -> None:
    for client in clients:
        response = client.request(method, path)
        assert response.status_code == 405, response.text
        assert response.headers["allow"] == allow
        for listed in allow.split(", "):  # and each method it lists is served
            assert client.request(listed, path).status_code != 405


def test_a_trailing_slash_is_the_same_route(clients: tuple[TestClient, TestClient]) -> None:
    for client in clients:
        plain = client.post("/v1/losses/cross_entropy", json=CE)
        slashed = client.post("/v1/losses/cross_entropy/", json=CE, follow_redirects=False)
        assert slashed.status_code == 200 and slashed.json() == plain.json()
        infer = client.post("/v2/models/cross_entropy/infer/", json=INFER, follow_redirects=False)
        assert infer.status_code == 200
        described = client.get("/v1/losses/mse_loss/", follow_redirects=False)
        assert described.status_code == 200 and described.json()["name"] == "mse_loss"


def test_root_redirects_to_the_docs(clients: tuple[TestClient, TestClient]) -> None:
    for client in clients:
        response = client.get("/", follow_redirects=False)
        assert response.status_code == 302 and response.headers["location"] == "/docs"


def test_a_405_quotes_a_bounded_method(clients: tuple[TestClient, TestClient]) -> None:
    method = "X" * 5000
    for client in clients:
        response = client.request(method, "/v1/losses/cross_entropy")
        assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
        assert len(response.json()["detail"]) < 100
