"""The typed per-loss client methods (service/client_api.py): generated from
the loss table and in step with it, checked by mypy --strict on code that uses
them (and refused where that code is wrong), and equal to torch when called."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

from service import client_api
from service.client import AsyncLossClient, LossClient
from service.losses import LOSSES
from service.losses.client_api import TARGET, render
from tests.conftest import ROOT

GOOD = """
    import asyncio

    import numpy as np
    import torch

    from service.client import AsyncLossClient, LossClient, LossResult

    def use(client: LossClient, x: torch.Tensor, t: torch.Tensor) -> float:
        a: LossResult = client.cross_entropy(x, t, reduction="sum", label_smoothing=0.1, grad=True)
        b = client.multi_margin_loss(x, t, p=2, margin=0.5, weight=torch.ones(3))
        c = client.ctc_loss(x, t, [5], [2], blank=0, zero_infinity=True, grad=["log_probs"])
        d = client.kl_div(x, np.zeros((2, 3)), reduction="batchmean", log_target=False)
        e = client.triplet_margin_with_distance_loss(x, x, x, distance_function=None)
        f = client.gaussian_nll_loss(x, x, 0.5, device="cpu", dtype="float64")
        return float(a) + float(b) + float(c) + float(d) + float(e) + float(f)

    async def use_async(client: AsyncLossClient, x: torch.Tensor) -> torch.Tensor:
        result = await client.mse_loss(x, x, reduction="none", encoding="b64")
        return result.value
"""

BAD = {
    'client.cross_entropy(x, t, reduction="avg")': "reduction",
    "client.cross_entropy(x, t, label_smothing=0.1)": "label_smothing",
    "client.multi_margin_loss(x, t, p=3)": '"p"',
    "client.ctc_loss(x, t, [5])": "target_lengths",
    'client.nll_loss(x, t, ignore_index="a")': "ignore_index",
    'client.mse_loss(x, t, grad=["weight2"])': "weight2",
    "client.focal_loss(x, t)": "focal_loss",
}


def mypy(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(snippet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_generated_file_matches_the_table() -> None:
    assert TARGET.read_text() == render(), "run scripts/generate-client-api"
    check = subprocess.run(
        [sys.executable, "-m", "service.losses.client_api", "--check"], cwd=ROOT, timeout=120
    )
    assert check.returncode == 0
    for spec in LOSSES.values():
        for mixin in (client_api.LossMethods, client_api.AsyncLossMethods):
            params = inspect.signature(getattr(mixin, spec.name)).parameters
            required = [a.name for a in spec.args if a.required]
            assert list(params) == ["self", *required, "fields"], spec.name
        fields = getattr(
            client_api, "".join(p.capitalize() for p in spec.name.split("_")) + "Fields"
        )
        optional = {a.name for a in spec.args if not a.required}
        assert optional | {o.name for o in spec.options} <= set(fields.__annotations__)


def test_mypy_strict_accepts_good_code_and_refuses_bad(tmp_path: Path) -> None:
    good = mypy(GOOD, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    lines = "\n".join(f"    {call}  # {i}" for i, call in enumerate(BAD))
    bad = mypy(
        "import torch\nfrom service.client import LossClient\n\n"
        "def use(client: LossClient, x: torch.Tensor, t: torch.Tensor) -> None:\n" + lines + "\n",
        tmp_path,
    )
    assert bad.returncode == 1
    for i, (call, word) in enumerate(BAD.items()):
        errors = [ln for ln in bad.stdout.splitlines() if f"snippet.py:{5 + i}:" in ln]
        assert errors and any(word in e for e in errors), (call, bad.stdout)


def test_typed_methods_call_the_service(live_server: str) -> None:
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    with LossClient(live_server) as client:
        result = client.cross_entropy(x, t, reduction="sum", label_smoothing=0.2, grad=True)
        margin = client.margin_ranking_loss(x[:, 0], x[:, 1], [1.0, -1, 1, -1, 1, -1], margin=0.1)

    async def call() -> torch.Tensor:
        async with AsyncLossClient(live_server) as client:
            return (await client.huber_loss(x, x.flip(0), delta=0.3)).value

    leaf = x.clone().requires_grad_()
    value = F.cross_entropy(leaf, t, reduction="sum", label_smoothing=0.2)
    (grad,) = torch.autograd.grad(value, leaf)
    assert torch.equal(result.value, value.detach())
    assert torch.equal(result.grad["input"], grad)
    signs = torch.tensor([1.0, -1, 1, -1, 1, -1])
    assert torch.equal(margin.value, F.margin_ranking_loss(x[:, 0], x[:, 1], signs, margin=0.1))
    assert torch.equal(asyncio.run(call()), F.huber_loss(x, x.flip(0), delta=0.3))
