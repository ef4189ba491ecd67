"""A hypothesis fuzzer over losses x shapes x reductions x gradients against
the server in its 1 GiB cgroup: shapes that broadcast up to and past the work
limit, values from seeded generators. Every answer is torch's (bit for bit)
or a 4xx/503, and the server lives."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import Limited

# the losses fuzzed, each called as fn(input, target, reduction=...)
ELEMENTWISE: dict[str, Callable[..., torch.Tensor]] = {
    "mse_loss": F.mse_loss,
    "l1_loss": F.l1_loss,
    "smooth_l1_loss": F.smooth_l1_loss,
    "huber_loss": F.huber_loss,
    "soft_margin_loss": F.soft_margin_loss,
    "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
    "kl_div": F.kl_div,
    "poisson_nll_loss": F.poisson_nll_loss,
}
# broadcasting is what torch allows for these targets; the others need one shape
BROADCASTS = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "poisson_nll_loss"}


def b64(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": "float32",
            "b64": base64.b64encode(t.numpy().tobytes()).decode()}  # fmt: skip


def decoded(value: Any) -> torch.Tensor:
    if not isinstance(value, dict):
        return torch.tensor(value, dtype=torch.float32)
    raw = bytearray(base64.b64decode(value["b64"]))
    return torch.frombuffer(raw, dtype=torch.float32).reshape(value["shape"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, torch.Tensor, torch.Tensor, str, bool]:
    loss = draw(st.sampled_from(sorted(ELEMENTWISE)))
    n = draw(st.sampled_from([1, 3, 64, 1000, 4096, 16384]))
    m = draw(st.sampled_from([1, 5, 256, 4096, 16384]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    input = torch.randn(n, 1, generator=g)
    if loss in BROADCASTS and draw(st.booleans()):
        target = torch.rand(1, m, generator=g)
    else:
        target = torch.rand(n, 1, generator=g)
    return loss, input, target, draw(st.sampled_from(["none", "mean", "sum"])), draw(st.booleans())


def test_fuzz_within_and_past_the_limits(limited: Limited) -> None:
    with limited.attack("hypothesis fuzzer") as seen:

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        @given(request=requests())
        def one(request: tuple[str, torch.Tensor, torch.Tensor, str, bool]) -> None:
            status = check(limited, *request)
            seen(status)

        one()


def check(
    limited: Limited,
    loss: str,
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    grad: bool,
) -> int:
    body = {"input": b64(input), "target": b64(target), "reduction": reduction,
            "grad": grad, "encoding": "b64"}  # fmt: skip
    response = httpx.post(f"{limited.url}/v1/losses/{loss}", json=body, timeout=120)
    if response.status_code != 200:
        assert response.status_code in (413, 422, 503), response.text[:300]
        return response.status_code
    x = input.clone().requires_grad_(grad)
    expected = ELEMENTWISE[loss](x, target, reduction=reduction)
    result = response.json()
    assert torch.equal(decoded(result["value"]), expected.detach()) or (
        expected.isnan().all() and decoded(result["value"]).isnan().all()
    )
    if grad:
        (expected_grad,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
        assert torch.equal(decoded(result["grad"]["input"]), expected_grad)
    return 200
