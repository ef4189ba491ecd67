"""POST /v1/batch: many evaluations, in order, each item failing alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient


def test_batch_in_order_with_a_failing_item(client: TestClient) -> None:
    items = [
        {"loss": "cross_entropy", "input": [[2, 1], [1, 2]], "target": [1, 0]},
        {"loss": "MSELoss", "input": [[3, 1], [1, 0]], "target": [[1, 0], [1, 0]], "grad": True},
        {"loss": "cross_entropy", "input": [[2, 1], [1, 2]], "target": [1, 5]},
        {"loss": "focal_loss", "input": [1.0], "target": [1.0]},
        {
            "loss": "l1_loss",
            "input": [1.0, 2.0],
            "target": [0.0, 0.0],
            "reduction": "none",
            "encoding": "flat",
        },
    ]
    response = client.post("/v1/batch", json={"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 5

    x = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert results[0]["value"] == F.cross_entropy(x, torch.tensor([1, 0])).item()
    inp = torch.tensor([[3.0, 1.0], [1.0, 0.0]], requires_grad=True)
    loss = F.mse_loss(inp, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    (grad,) = torch.autograd.grad(loss, inp)
    assert results[1]["value"] == loss.item() and results[1]["grad"]["input"] == grad.tolist()

    assert results[2]["error"]["status"] == 422
    assert results[2]["error"]["errors"][0]["loc"] == ["body", "items", 2, "target"]
    assert "class index 5" in results[2]["error"]["detail"]
    assert results[3]["error"]["status"] == 404
    assert results[4]["value"] == {"shape": [2], "dtype": "float32", "data": [1.0, 2.0]}


def test_invalid_envelope_is_422(client: TestClient) -> None:
    for body in ({"item": []}, {"items": 3}, [1]):
        response = client.post("/v1/batch", json=body)
        assert response.status_code == 422
        assert response.json()["errors"][0]["loc"] == ["body", "items"]
