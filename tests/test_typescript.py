"""A caller in another language: the TypeScript example (examples/typescript),
its client generated from openapi/openapi.json, type-checked with tsc and run
with Node against a real server; every value it got is compared here with
the in-process torch call on the tensors it sent.

Needs Node and the example's node_modules (``npm ci`` in examples/typescript,
as scripts/ci-typescript does); skipped without them, unless
LOSS_SERVICE_REQUIRE_TYPESCRIPT=1 (CI), where their absence fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "typescript"
INDEX_TARGETS = {"cross_entropy", "nll_loss"}  # class indices: int64, as the service decodes them


def _missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    if not (EXAMPLE / "node_modules").is_dir():
        return "examples/typescript has no node_modules (npm ci there, or scripts/ci-typescript)"
    return None


def _npm(*args: str) -> str:
    done = subprocess.run(
        ["npm", "run", "--silent", *args], cwd=EXAMPLE, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"npm run {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def built() -> None:
    """The client generated from the committed OpenAPI document, type-checked
    (tsc --noEmit) and compiled."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("LOSS_SERVICE_REQUIRE_TYPESCRIPT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    _npm("generate")
    _npm("typecheck")
    _npm("build")


def _run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOSS_SERVICE_URL": url}
    env.pop("LOSS_SERVICE_API_KEY", None)
    return subprocess.run(
        ["node", "dist/seed.js", *args],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def in_process(loss: str, request: dict[str, Any]) -> tuple[float, dict[str, list[Any]]]:
    """The value torch gives for what the program sent, and its gradients."""
    input = torch.tensor(request["input"], dtype=torch.float32, requires_grad=True)
    target = torch.tensor(
        request["target"], dtype=torch.int64 if loss in INDEX_TARGETS else torch.float32
    )
    options = {k: v for k, v in request.items() if k not in {"input", "target", "grad"}}
    value = getattr(F, loss)(input, target, **options)
    grads: dict[str, list[Any]] = {}
    if request.get("grad"):
        (grad,) = torch.autograd.grad(value, input)
        grads["input"] = grad.tolist()
    return value.item(), grads


def test_typescript_example_matches_torch(built: None, live_server: str) -> None:
    done = _run(live_server, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["failures"] == []
    assert report["version"] == {
        "name": "loss-service",
        "version": report["version"]["version"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": ["cpu"],
    }
    losses = [o["loss"] for o in report["outcomes"]]
    assert set(losses) == {
        "cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits",
        "l1_loss", "mse_loss", "nll_loss", "kl_div",
    }  # fmt: skip
    for outcome in report["outcomes"]:
        value, grads = in_process(outcome["loss"], outcome["request"])
        assert outcome["value"] == value, outcome  # bit for bit, through JSON and JavaScript
        assert outcome.get("grad", {}) == grads, outcome
    assert any(o.get("grad") for o in report["outcomes"])  # the gradient was asked for
    problem = report["problem"]
    assert problem["status"] == 422
    assert problem["errors"][0]["loc"][-1] == "target"


def test_typescript_example_readable_output(built: None, live_server: str) -> None:
    done = _run(live_server)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"torch {torch.__version__}" in lines[0]
    assert "cross_entropy = 1.3133" in lines
    assert "kl_div = 0.4322" in lines
    assert lines[-1].startswith("invalid request -> 422: target:")


def test_typescript_example_fails_when_the_server_is_gone(built: None) -> None:
    """A server that cannot be reached is a failure (exit 1), not a silent pass."""
    done = _run("http://127.0.0.1:9")  # the discard port: nothing listens there
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip()
