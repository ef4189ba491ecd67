"""Misspelt names get the closest known one (difflib) and the list of what is
allowed, over v1 and the Open Inference Protocol alike (tests/test_grpc.py
checks gRPC)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.losses import LOSSES
from service.main import create_app

GOOD = {"input": [[2, 1], [1, 2]], "target": [1, 0]}
INPUTS = [
    {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [2, 1, 1, 2]},
    {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, 0]},
]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(Settings(device="cpu")))


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("cross_entropi", "cross_entropy"),
        ("CrossEntropyLos", "CrossEntropyLoss"),
        ("mse_los", "mse_loss"),
        ("bce_with_logits", "BCEWithLogitsLoss"),
        ("huber", "huber_loss"),  # the start of a name
        ("focal_loss", None),  # not close to any name: no guess, the list still comes
    ],
)
def test_unknown_loss_names_the_closest(client: TestClient, name: str, closest: str | None) -> None:
    for response in (
        client.post(f"/v1/losses/{name}", json=GOOD),
        client.get(f"/v1/losses/{name}"),
    ):
        assert response.status_code == 404
        detail = response.json()["detail"]
        assert ("did you mean" in detail) == (closest is not None)
        if closest is not None:
            assert f"(did you mean {closest!r}?)" in detail
        assert all(loss in detail for loss in LOSSES)
    v2 = client.post(f"/v2/models/{name}/infer", json={"inputs": INPUTS})
    assert v2.status_code == 404
    assert (f"(did you mean {closest!r}?)" in v2.json()["error"]) == (closest is not None)


def test_unknown_option_in_a_batch_item_names_the_closest(client: TestClient) -> None:
    body = {"items": [{"loss": "cross_entropy", **GOOD, "ignore_indx": 0}]}
    (item,) = client.post("/v1/batch", json=body).json()["results"]
    error = item["error"]["errors"][0]
    assert error["loc"] == ["body", "items", 0, "ignore_indx"]
    assert "(did you mean 'ignore_index'?)" in error["msg"] and "allowed fields:" in error["msg"]


def test_unknown_oip_parameter_names_the_closest(client: TestClient) -> None:
    body = {"inputs": INPUTS, "parameters": {"label_smothing": 0.1}}
    response = client.post("/v2/models/cross_entropy/infer", json=body)
    assert response.status_code == 400
    message = response.json()["error"]
    assert "(did you mean 'label_smoothing'?)" in message
    assert "ignore_index, label_smoothing, reduction" in message  # and what is allowed
