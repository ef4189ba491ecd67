"""Large bodies take the simdjson path (service.fastjson): the same values, the
same errors as the small-body path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from service import fastjson
from service.fastjson import NumericArray
from tests.cases import assert_same, decode

N, C = 400, 100  # about 0.4 MB of JSON: well above fastjson.SIMDJSON_MIN_BODY


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, C, generator=torch.Generator().manual_seed(seed))


def targets() -> torch.Tensor:
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(1))


def post(client: TestClient, body: dict[str, object], loss: str = "cross_entropy") -> object:
    raw = json.dumps(body).encode()
    assert len(raw) > fastjson.SIMDJSON_MIN_BODY
    return client.post(
        f"/v1/losses/{loss}", content=raw, headers={"content-type": "application/json"}
    )


def test_large_arrays_come_out_as_flat_buffers() -> None:
    body = json.dumps(
        {
            "input": logits().tolist(),
            "target": targets().tolist(),
            "small": [1, 2],
            "flags": [True] * 500,
        }
    ).encode()
    parsed = fastjson.loads(body)
    assert isinstance(parsed["input"], NumericArray) and parsed["input"].shape == (N, C)
    assert parsed["input"].flat.dtype == np.float64
    assert isinstance(parsed["target"], NumericArray) and parsed["target"].flat.dtype == np.int64
    assert parsed["small"] == [1, 2] and parsed["flags"] == [True] * 500


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("form", ["nested", "flat"])
def test_values_equal_torch(client: TestClient, dtype: str, form: str) -> None:
    x, t = logits(), targets()
    torch_dtype = getattr(torch, dtype)
    values = x.tolist() if form == "nested" else {"shape": [N, C], "data": x.reshape(-1).tolist()}
    response = post(
        client,
        {"input": values, "target": t.tolist(), "dtype": dtype, "reduction": "none", "grad": True},
    )
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    data = response.json()  # type: ignore[attr-defined]
    inp = torch.tensor(x.tolist(), dtype=torch_dtype, requires_grad=True)
    expected = F.cross_entropy(inp, t, reduction="none")
    (grad,) = torch.autograd.grad(expected, inp, torch.ones_like(expected))
    assert_same(decode(data["value"], torch_dtype), expected)
    assert_same(decode(data["grad"]["input"], torch_dtype), grad)


def test_integers_in_a_float_role_and_integral_floats_in_an_index_role(
    client: TestClient,
) -> None:
    ints = torch.randint(-5, 5, (N, C), generator=torch.Generator().manual_seed(2))
    t = targets()
    response = post(client, {"input": ints.tolist(), "target": [float(v) for v in t.tolist()]})
    assert response.status_code == 200  # type: ignore[attr-defined]
    expected = F.cross_entropy(ints.float(), t)
    assert response.json()["value"] == expected.item()  # type: ignore[attr-defined]


def test_nonfinite_strings_in_a_large_array(client: TestClient) -> None:
    x = logits().tolist()
    x[3][7] = "Infinity"
    x[5][1] = "NaN"
    response = post(client, {"input": x, "target": targets().tolist(), "reduction": "none"})
    assert response.status_code == 200  # type: ignore[attr-defined]
    value = response.json()["value"]  # type: ignore[attr-defined]
    assert value[5] == "NaN" and all(isinstance(v, float) for v in value[:3])


@pytest.mark.parametrize("rows", [
    [C] * (N - 1) + [C - 1],                  # one short row
    [C + 1, C - 1] + [C] * (N - 2),           # same total count, still ragged
])  # fmt: skip
def test_ragged_large_arrays_are_the_same_422(client: TestClient, rows: list[int]) -> None:
    x = [[0.5] * n for n in rows]
    response = post(client, {"input": x, "target": targets().tolist()})
    assert response.status_code == 422  # type: ignore[attr-defined]
    assert "ragged" in response.json()["detail"]  # type: ignore[attr-defined]


def test_fractional_and_out_of_range_indices_in_a_large_array(client: TestClient) -> None:
    t = [float(v) for v in targets().tolist()]
    t[10] = 2.5
    response = post(client, {"input": logits().tolist(), "target": t})
    assert response.status_code == 422  # type: ignore[attr-defined]
    assert "fractional value 2.5" in response.json()["detail"]  # type: ignore[attr-defined]
    t[10] = C
    response = post(client, {"input": logits().tolist(), "target": t})
    assert response.status_code == 422  # type: ignore[attr-defined]
    assert f"class index {C} out of range" in response.json()["detail"]  # type: ignore[attr-defined]


def test_large_invalid_json_is_422(client: TestClient) -> None:
    raw = b'{"input": [' + b"1.0," * 50000 + b"]}"
    response = client.post(
        "/v1/losses/mse_loss", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "invalid JSON" in response.json()["detail"]


def test_huge_numbers_fall_back_to_the_same_answers(client: TestClient) -> None:
    x = [[1e300] * C for _ in range(N)]  # fine as float64, inf in float32
    response = post(
        client, {"input": x, "target": [[0.0] * C] * N, "reduction": "sum"}, loss="mse_loss"
    )
    assert response.status_code == 200  # type: ignore[attr-defined]
    expected = F.mse_loss(torch.tensor(x), torch.zeros(N, C), reduction="sum")
    value = response.json()["value"]  # type: ignore[attr-defined]
    assert value == ("Infinity" if math.isinf(expected.item()) else expected.item())
