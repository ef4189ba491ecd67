"""The seed examples of contract section 4, by canonical name and by alias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

LOG = [math.log(0.5), math.log(0.2), math.log(0.3)]
SEEDS = [
    ("cross_entropy", "CrossEntropyLoss", {"input": [[2, 1], [1, 2]], "target": [1, 0]}, "1.3133"),
    ("binary_cross_entropy", "BCELoss", {"input": [0.4, 0.1], "target": [0.2, 0.8]}, "1.2275"),
    (
        "binary_cross_entropy_with_logits",
        "BCEWithLogitsLoss",
        {"input": [0.4, 0.1], "target": [0.2, 0.8]},
        "0.7487",
    ),
    ("l1_loss", "L1Loss", {"input": [[3, 1], [1, 0]], "target": [[1, 0], [1, 0]]}, "0.7500"),
    ("mse_loss", "MSELoss", {"input": [[3, 1], [1, 0]], "target": [[1, 0], [1, 0]]}, "1.2500"),
    ("nll_loss", "NLLLoss", {"input": [[3, 1], [2, 4]], "target": [0, 1]}, "-3.5000"),
    (
        "kl_div",
        "KLDivLoss",
        {"input": LOG, "target": [0.1, 0.2, 0.7], "reduction": "sum"},
        "0.4322",
    ),
]


def in_process(name: str, body: dict[str, object]) -> float:
    input = torch.tensor(body["input"], dtype=torch.float32)
    target_values = body["target"]
    target = (
        torch.tensor(target_values)
        if name in {"cross_entropy", "nll_loss"}
        else torch.tensor(target_values, dtype=torch.float32)
    )
    reduction = str(body.get("reduction", "mean"))
    return float(getattr(F, name)(input, target, reduction=reduction).item())


@pytest.mark.parametrize(("name", "alias", "body", "printed"), SEEDS)
@pytest.mark.parametrize("spelling", ["canonical", "alias", "lower"])
def test_seed_example(
    client: TestClient,
    name: str,
    alias: str,
    body: dict[str, object],
    printed: str,
    spelling: str,
) -> None:
    path = {"canonical": name, "alias": alias, "lower": alias.lower()}[spelling]
    response = client.post(f"/v1/losses/{path}", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["loss"] == name
    assert f"{data['value']:.4f}" == printed
    assert data["value"] == in_process(name, body)
    assert data["shape"] == [] and data["dtype"] == "float32" and data["device"] == "cpu"
    assert "decode;dur=" in response.headers["server-timing"]


def test_contract_grad_example(client: TestClient) -> None:
    response = client.post(
        "/v1/losses/cross_entropy",
        json={"input": [[2, 1], [1, 2]], "target": [1, 0], "grad": True},
    )
    assert response.status_code == 200
    x = torch.tensor([[2.0, 1.0], [1.0, 2.0]], requires_grad=True)
    loss = F.cross_entropy(x, torch.tensor([1, 0]))
    (grad,) = torch.autograd.grad(loss, x)
    assert response.json()["grad"] == {"input": grad.tolist()}
