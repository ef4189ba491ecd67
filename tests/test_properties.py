"""Property-based tests: over shapes and values, no 5xx and no mismatch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cases import assert_same, decode, encode

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
reductions = st.sampled_from(["none", "mean", "sum"])
forms = st.sampled_from(["nested", "flat", "b64"])


@st.composite
def tensor_pair(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    shape = draw(shapes)
    n = 1
    for d in shape:
        n *= d
    a = draw(st.lists(floats, min_size=n, max_size=n))
    b = draw(st.lists(floats, min_size=n, max_size=n))
    return torch.tensor(a).reshape(shape), torch.tensor(b).reshape(shape)


@SETTINGS
@given(
    pair=tensor_pair(),
    reduction=reductions,
    form=forms,
    loss=st.sampled_from(
        [
            "mse_loss",
            "l1_loss",
            "smooth_l1_loss",
            "huber_loss",
            "binary_cross_entropy_with_logits",
            "soft_margin_loss",
        ]
    ),
)
def test_elementwise_losses_match_torch(
    client: TestClient,
    pair: tuple[torch.Tensor, torch.Tensor],
    reduction: str,
    form: str,
    loss: str,
) -> None:
    input, target = pair
    if input.numel() == 0 and input.dim() > 1:
        form = "flat"  # a nested [] cannot say [0, 0]
    body = {
        "input": encode(input, form),
        "target": encode(target, form),
        "reduction": reduction,
        "encoding": "flat",
    }
    response = client.post(f"/v1/losses/{loss}", json=body)
    assert response.status_code == 200, response.text
    expected = getattr(F, loss)(input, target, reduction=reduction)
    assert_same(decode(response.json()["value"], expected.dtype), expected)


@SETTINGS
@given(
    n=st.integers(0, 4),
    c=st.integers(1, 5),
    data=st.data(),
    reduction=reductions,
    grad=st.booleans(),
)
def test_cross_entropy_never_5xx_and_matches_when_valid(
    client: TestClient, n: int, c: int, data: st.DataObject, reduction: str, grad: bool
) -> None:
    logits = data.draw(st.lists(st.lists(floats, min_size=c, max_size=c), min_size=n, max_size=n))
    target = data.draw(st.lists(st.integers(-101, c + 1), min_size=n, max_size=n))
    input = torch.tensor(logits, dtype=torch.float32).reshape(n, c)
    body: dict[str, Any] = {
        "input": encode(input, "flat"),
        "target": target,
        "reduction": reduction,
        "grad": grad,
        "encoding": "flat",
    }
    response = client.post("/v1/losses/cross_entropy", json=body)
    valid = all(0 <= t < c or t == -100 for t in target)
    assert response.status_code == (200 if valid else 422), response.text
    if valid:
        x = input.clone().requires_grad_(grad)
        expected = F.cross_entropy(
            x, torch.tensor(target, dtype=torch.int64).reshape(n), reduction=reduction
        )
        assert_same(decode(response.json()["value"], torch.float32), expected)
        if grad:
            (g,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
            assert_same(decode(response.json()["grad"]["input"], torch.float32), g)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(
    body=st.dictionaries(
        st.sampled_from(
            [
                "input",
                "target",
                "weight",
                "reduction",
                "grad",
                "dtype",
                "encoding",
                "ignore_index",
                "label_smoothing",
                "grad_output",
                "device",
            ]
        ),
        json_values,
        max_size=6,
    ),
    loss=st.sampled_from(["cross_entropy", "ctc_loss", "gaussian_nll_loss", "kl_div"]),
)
def test_arbitrary_json_never_5xx(client: TestClient, body: dict[str, Any], loss: str) -> None:
    response = client.post(f"/v1/losses/{loss}", json=body)
    assert response.status_code in (200, 413, 422), response.text
