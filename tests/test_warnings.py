"""The ``warnings`` of a v1 response are torch's own: for every case of every
loss (and the broadcasting cases torch warns about), what the service returns
equals what the same in-process call makes torch warn, word for word, and
a call in one worker thread never gets another's warnings."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.cases import CASES, Case, request_body, torch_call

BROADCASTING = [
    Case(loss, f"{loss}-broadcast", {"input": torch.ones(2, 2), "target": torch.zeros(2)})
    for loss in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")
] + [Case("kl_div", "kl_div-broadcast", {"input": torch.ones(3, 2), "target": torch.ones(1, 2)})]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(Settings(device="cpu")))


def torch_warnings(case: Case, reduction: str) -> list[str]:
    """What torch warns about for this call, recorded in-process (one thread)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch_call(case, reduction)
    return [str(w.message) for w in caught]


def cases() -> list[Any]:
    return [
        pytest.param(case, reduction, id=f"{case.id}-{reduction}")
        for case in [*CASES, *BROADCASTING]
        for reduction in case.spec.reductions
    ]


@pytest.mark.parametrize(("case", "reduction"), cases())
def test_warnings_are_torchs(client: TestClient, case: Case, reduction: str) -> None:
    expected = torch_warnings(case, reduction)
    response = client.post(f"/v1/losses/{case.loss}", json=request_body(case, reduction))
    assert response.status_code == 200, response.text
    assert response.json().get("warnings", []) == expected


def test_silent_broadcasting_is_reported(client: TestClient) -> None:
    body = {"input": [[1.0, 2.0], [3.0, 4.0]], "target": [1.0, 2.0]}
    result = client.post("/v1/losses/mse_loss", json=body).json()
    assert (
        result["value"]
        == torch.nn.functional.mse_loss(
            torch.tensor(body["input"]), torch.tensor(body["target"])
        ).item()
    )  # the value is still torch's
    assert result["warnings"] == [
        "Using a target size (torch.Size([2])) that is different to the input size "
        "(torch.Size([2, 2])). This will likely lead to incorrect results due to "
        "broadcasting. Please ensure they have the same size."
    ]
    same = client.post("/v1/losses/mse_loss", json={**body, "target": body["input"]}).json()
    assert "warnings" not in same  # no field when torch has nothing to say


def test_warnings_stay_with_their_own_call_across_threads(client: TestClient) -> None:
    """Calls run in worker threads: each response has its own call's
    warnings, never a neighbour's (what a process-wide catch_warnings would mix)."""
    warned = {"input": [[1.0, 2.0], [3.0, 4.0]], "target": [1.0, 2.0], "reduction": "sum"}
    quiet = {"input": [[1.0, 2.0], [3.0, 4.0]], "target": [[1.0, 2.0], [3.0, 4.0]]}

    def post(i: int) -> tuple[bool, list[str]]:
        body = warned if i % 2 else quiet
        result = client.post("/v1/losses/mse_loss", json=body).json()
        return bool(i % 2), result.get("warnings", [])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(200)))
    for should_warn, got in results:
        assert len(got) == (1 if should_warn else 0)
