"""Gradients over every differentiable argument of every loss equal
torch.autograd.grad in-process, with default and explicit grad_output."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from tests.cases import CASES, Case, assert_same, decode, encode, request_body, torch_call
from tests.device import DEVICE, on_device


def expected_grads(
    case: Case, reduction: str, names: list[str], grad_output: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tensors = on_device(case.tensors)
    leaves = []
    for name in names:
        leaf = tensors[name]
        assert isinstance(leaf, torch.Tensor)
        tensors[name] = leaf.clone().requires_grad_(True)
        leaves.append(tensors[name])
    out = torch_call(case, reduction, tensors)
    ones = torch.ones_like(out)
    go = grad_output.to(out.device) if grad_output is not None else ones
    grads = torch.autograd.grad(out, leaves, grad_outputs=go, allow_unused=True)
    return out.detach().cpu(), {
        n: (g if g is not None else torch.zeros_like(leaf)).cpu()
        for n, g, leaf in zip(names, grads, leaves, strict=True)
    }


def grad_request(
    client: TestClient, case: Case, reduction: str, grad: object, **extra: object
) -> dict[str, object]:
    body = request_body(case, reduction, grad=grad, device=DEVICE, **extra)
    response = client.post(f"/v1/losses/{case.loss}", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data, dict)
    return data


def check(data: dict[str, object], value: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
    assert_same(decode(data["value"], value.dtype), value)
    got = data["grad"]
    assert isinstance(got, dict) and set(got) == set(grads)
    for name, expected in grads.items():
        assert_same(decode(got[name], expected.dtype), expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.loss}-{c.id}")
def test_all_differentiable_arguments(client: TestClient, case: Case) -> None:
    names = case.spec.differentiable_args(case.tensors)
    assert names, "every loss is differentiable in its prediction"
    value, grads = expected_grads(case, "mean", names, None)
    check(grad_request(client, case, "mean", names), value, grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.loss}-{c.id}")
def test_grad_output_vector_jacobian_product(client: TestClient, case: Case) -> None:
    names = case.spec.differentiable_args(case.tensors)
    shape = torch_call(case, "none").shape
    grad_output = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    value, grads = expected_grads(case, "none", names, grad_output)
    data = grad_request(client, case, "none", names, grad_output=encode(grad_output, "nested"))
    check(data, value, grads)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.id in {"indices", "plain", "margin"}],
    ids=lambda c: f"{c.loss}-{c.id}",
)
def test_grad_true_means_the_prediction_arguments(client: TestClient, case: Case) -> None:
    names = [n for n in case.spec.prediction_args if n in case.tensors]
    value, grads = expected_grads(case, "sum", names, None)
    check(grad_request(client, case, "sum", True, encoding="b64"), value, grads)


def test_non_differentiable_argument_is_422_listing_the_differentiable_ones(
    client: TestClient,
) -> None:
    case = next(c for c in CASES if c.loss == "cross_entropy" and c.id == "weight")
    response = client.post(
        "/v1/losses/cross_entropy", json=request_body(case, "mean", grad=["target"])
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "'target'" in detail and "differentiable arguments: input" in detail


def test_grad_output_shape_is_checked(client: TestClient) -> None:
    case = next(c for c in CASES if c.loss == "mse_loss")
    response = client.post(
        "/v1/losses/mse_loss",
        json=request_body(case, "none", grad=True, grad_output=[1.0, 2.0]),
    )
    assert response.status_code == 422
    body = response.json()
    assert body["errors"][0]["loc"] == ["body", "grad_output"]
    assert "expected shape [4, 5]" in body["detail"]
