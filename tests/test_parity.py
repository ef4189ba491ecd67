"""Every loss x every reduction x its options: the service's value equals the
in-process torch.nn.functional call, bit for bit, in each tensor form.

LOSS_SERVICE_TEST_DEVICE=cuda runs the same suite on CUDA (in-process app),
against the in-process call on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from service.losses import LOSSES
from tests.cases import CASES, SPECS_WITH_CASES, Case, assert_same, decode, request_body, torch_call
from tests.device import DEVICE, on_device

PARAMS = [
    pytest.param(case, reduction, id=f"{case.loss}-{case.id}-{reduction}")
    for case in CASES
    for reduction in case.spec.reductions
]


def post(client: TestClient, case: Case, body: dict[str, object]) -> dict[str, object]:
    response = client.post(f"/v1/losses/{case.loss}", json={**body, "device": DEVICE})
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data, dict)
    return data


def value_of(data: dict[str, object], expected: torch.Tensor) -> torch.Tensor:
    assert data["shape"] == list(expected.shape)
    assert data["dtype"] == str(expected.dtype).removeprefix("torch.")
    return decode(data["value"], expected.dtype)


def test_every_loss_has_cases() -> None:
    assert set(LOSSES) == SPECS_WITH_CASES


@pytest.mark.parametrize(("case", "reduction"), PARAMS)
def test_value_equals_torch(client: TestClient, case: Case, reduction: str) -> None:
    expected = torch_call(case, reduction, on_device(case.tensors)).cpu()
    data = post(client, case, request_body(case, reduction))
    assert data["loss"] == case.loss
    assert str(data["device"]).startswith(DEVICE)
    assert_same(value_of(data, expected), expected)


@pytest.mark.parametrize("form", ["nested", "flat", "b64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.loss}-{c.id}")
def test_tensor_forms_agree(client: TestClient, case: Case, form: str) -> None:
    expected = torch_call(case, "none", on_device(case.tensors)).cpu()
    data = post(client, case, request_body(case, "none", form))
    assert_same(value_of(data, expected), expected)


@pytest.mark.parametrize("encoding", ["nested", "flat", "b64"])
def test_response_encodings_agree(client: TestClient, encoding: str) -> None:
    case = next(c for c in CASES if c.loss == "cross_entropy" and c.id == "weight")
    expected = torch_call(case, "none", on_device(case.tensors)).cpu()
    data = post(client, case, request_body(case, "none", encoding=encoding))
    if encoding != "nested":
        assert isinstance(data["value"], dict) and set(data["value"]) >= {"shape", "dtype"}
    assert_same(value_of(data, expected), expected)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_float_dtypes(client: TestClient, dtype: str) -> None:
    case = next(c for c in CASES if c.loss == "mse_loss" and c.id == "weight")
    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.to(torch_dtype) for k, v in on_device(case.tensors).items()}  # type: ignore[union-attr]
    expected = torch_call(case, "mean", tensors).cpu()
    data = post(client, case, request_body(case, "mean", dtype=dtype))
    assert data["dtype"] == dtype
    assert_same(value_of(data, expected), expected)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss", ["nll_loss", "cross_entropy"])
def test_unbatched_input_with_a_target_of_shape_1(
    client: TestClient, loss: str, reduction: str
) -> None:
    """torch takes target [1] as well as [] for a (C) input; the value is
    torch's, and its backward (which torch refuses) a 422 with torch's reason."""
    x, t = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([1])
    expected = getattr(torch.nn.functional, loss)(x, t, reduction=reduction)
    body = {"input": x.tolist(), "target": t.tolist(), "reduction": reduction, "device": DEVICE}
    response = client.post(f"/v1/losses/{loss}", json=body)
    assert response.status_code == 200, response.text
    assert_same(value_of(response.json(), expected), expected)
    with pytest.raises(RuntimeError, match="size mismatch"):
        leaf = x.clone().requires_grad_(True)
        out = getattr(torch.nn.functional, loss)(leaf, t, reduction=reduction)
        torch.autograd.grad(out, leaf, torch.ones_like(out))
    response = client.post(f"/v1/losses/{loss}", json={**body, "grad": True})
    assert response.status_code == 422 and "size mismatch" in response.json()["detail"]
