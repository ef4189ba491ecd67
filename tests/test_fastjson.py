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
from service.errors import InvalidPayload
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


# --------------------------------------------------------------------------- nesting


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


PADDING = b"[" + b"0.25," * 20000 + b"0.25]"  # takes a body past SIMDJSON_MIN_BODY


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"input": ' + deep_array(600) + b', "target": ' + PADDING + b"}", ["body", "input"]),
        (
            b'{"items": [{"loss": "l1_loss"}, {"input": {"shape": [1], "data": '
            + deep_array(600)
            + b'}}], "pad": '
            + PADDING
            + b"}",
            ["body", "items", 1, "input", "data"],
        ),
        (
            b'{"input": [1, [1, ' + deep_array(600) + b"]], " + b'"target": ' + PADDING + b"}",
            ["body", "input"],
        ),
    ],
)
def test_nesting_deeper_than_a_tensor_is_422_and_leaves_the_parser_usable(
    body: bytes, loc: list[object]
) -> None:
    assert len(body) > fastjson.SIMDJSON_MIN_BODY
    with pytest.raises(InvalidPayload, match="nested deeper than") as caught:
        fastjson.loads(body)
    assert list(caught.value.errors[0].loc) == loc
    # the same thread parses the next large bodies as if nothing had happened
    for rows in (200, 2000):
        good = json.dumps({"input": [[0.5] * 100] * rows}).encode()
        assert isinstance(fastjson.loads(good)["input"], NumericArray)


def test_a_parser_is_reused_only_after_a_conversion_that_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = json.dumps({"input": [[0.5] * 100] * 300}).encode()
    fastjson.loads(body)
    kept = fastjson._local.parser
    assert fastjson.loads(body) and fastjson._local.parser is kept  # reused
    monkeypatch.setattr(fastjson, "_rectangular", lambda *a: 1 / 0)  # a conversion that fails
    with pytest.raises(ZeroDivisionError):
        fastjson.loads(body)
    monkeypatch.undo()
    assert fastjson.loads(body)  # a fresh parser: the failed one's proxies may be alive
    assert fastjson._local.parser is not kept


def test_small_bodies_past_orjsons_depth_limit_are_a_clear_422(client: TestClient) -> None:
    body = b'{"input": ' + deep_array(2000) + b', "target": [1]}'
    assert len(body) < fastjson.SIMDJSON_MIN_BODY
    response = client.post(
        "/v1/losses/mse_loss", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "deeper than orjson's limit of 1024 levels" in response.json()["detail"]


@pytest.mark.parametrize("depth", [70, 500, 600, 1000])
@pytest.mark.parametrize("where", ["nested", "ragged", "flat", "v2"])
def test_small_bodies_nested_deep_are_422_naming_the_field(
    client: TestClient, depth: int, where: str
) -> None:
    inner = deep_array(depth)
    if where == "v2":
        body = (
            b'{"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1, '
            + inner
            + b']}, {"name": "target", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}'
        )
        response = client.post(
            "/v2/models/mse_loss/infer", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"].startswith("input:")
        return
    value = {
        "nested": inner,
        "ragged": b"[[1], " + inner + b"]",
        "flat": b'{"shape": [2], "data": [1, ' + inner + b"]}",
    }[where]
    body = b'{"input": ' + value + b', "target": [1]}'
    response = client.post(
        "/v1/losses/mse_loss", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"][:2] == ["body", "input"]


# --------------------------------------------------------------------------- not all numbers


def test_large_arrays_with_nonfinite_strings_decode_into_one_float64_buffer(
    client: TestClient,
) -> None:
    x = logits().tolist()
    x[3][7], x[5][1], x[399][99] = "Infinity", "NaN", "-Infinity"
    parsed = fastjson.loads(json.dumps({"input": x}).encode())["input"]
    assert isinstance(parsed, NumericArray) and parsed.shape == (N, C)
    assert parsed.flat.dtype == np.float64
    numbers = {"Infinity": math.inf, "NaN": math.nan, "-Infinity": -math.inf}
    expected = torch.tensor([[numbers.get(v, v) for v in row] for row in x])
    response = post(
        client, {"input": x, "target": targets().tolist(), "reduction": "none", "grad": True}
    )
    assert response.status_code == 200  # type: ignore[attr-defined]
    inp = expected.clone().requires_grad_(True)
    loss = F.cross_entropy(inp, targets(), reduction="none")
    (grad,) = torch.autograd.grad(loss, inp, torch.ones_like(loss))
    assert_same(decode(response.json()["value"], torch.float32), loss)  # type: ignore[attr-defined]
    assert_same(decode(response.json()["grad"]["input"], torch.float32), grad)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("x", "got the string 'x'"),
        (None, "got null"),
        ({"a": 1}, "got an object"),
        ([1.0], "ragged"),
    ],
)
@pytest.mark.parametrize("form", ["nested", "flat"])
def test_large_arrays_of_something_else_are_the_same_422_as_small_ones(
    client: TestClient, bad: object, words: str, form: str
) -> None:
    x = logits().tolist()
    x[0][0] = "NaN"  # so the fast path cannot take it
    x[200][50] = bad
    small = [[0.5, "NaN"], [0.5, bad]]
    for rows, n in ((x, N), (small, 2)):
        if form == "flat":
            value: object = {"shape": [n, len(rows[0])], "data": [v for row in rows for v in row]}
        else:
            value = rows
        body = {"input": value, "target": [0] * n}
        raw = json.dumps(body).encode()
        response = client.post(
            "/v1/losses/cross_entropy", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        problem = response.json()
        expected = "flat array" if form == "flat" and isinstance(bad, list) else words
        assert expected in problem["detail"], problem
        assert problem["errors"][0]["loc"] == ["body", "input"] + (
            ["data"] if form == "flat" else []
        )
    parsed = fastjson.loads(json.dumps({"input": x}).encode())["input"]
    assert isinstance(parsed, fastjson.InvalidArray)  # found without building a list


def test_integers_past_64_bits_read_as_torch_reads_them(client: TestClient) -> None:
    x = [float(i) for i in range(30000)]
    big = 2**70 + 2**20
    body = {"input": [*x, big], "target": [0.0] * 30001, "reduction": "sum"}
    raw = json.dumps(body).encode()
    assert len(raw) > fastjson.SIMDJSON_MIN_BODY  # simdjson refuses it; orjson reads it
    response = client.post(
        "/v1/losses/l1_loss", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    expected = F.l1_loss(torch.tensor([*x, big]), torch.zeros(30001), reduction="sum")
    assert response.json()["value"] == expected.item()


def test_large_integer_arrays_in_a_float_role_go_through_a_double(client: TestClient) -> None:
    ints = [9007199791611905 + 2 * i for i in range(5000)]
    raw = json.dumps({"input": ints, "target": [0] * 5000, "reduction": "none"}).encode()
    assert isinstance(fastjson.loads(raw)["input"], NumericArray)
    response = client.post(
        "/v1/losses/l1_loss", content=raw, headers={"content-type": "application/json"}
    )
    expected = torch.tensor(ints, dtype=torch.float32)
    assert_same(decode(response.json()["value"], torch.float32), expected)


@pytest.mark.parametrize(
    "hidden",
    [[1.0], [[2.0]], "pair"],  # an array where a number belongs, with as many numbers
)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_an_array_hidden_where_a_number_belongs_is_ragged(
    client: TestClient, hidden: object, nonfinite: bool
) -> None:
    x: list[list[object]] = logits().tolist()  # type: ignore[assignment]
    if hidden == "pair":  # [], [a, b] in one row: still 100 numbers
        x[7][3], x[7][4] = [], [0.5, 0.5]
    else:
        x[200][50] = hidden
    if nonfinite:
        x[0][0] = "NaN"  # the slow path reads the other rows in C too
    raw = json.dumps({"input": x, "target": targets().tolist(), "note": "a [ in a string"}).encode()
    parsed = fastjson.loads(raw)
    assert isinstance(parsed["input"], fastjson.InvalidArray), parsed["input"]
    response = post(client, {"input": x, "target": targets().tolist()})
    assert response.status_code == 422  # type: ignore[attr-defined]
    assert "ragged" in response.json()["detail"]  # type: ignore[attr-defined]


def test_first_rows_that_promise_more_numbers_than_the_body_holds(client: TestClient) -> None:
    # shape [100] * 9 by the first row at each depth: 10**18 numbers, never allocated
    inner: object = list(range(100))
    for _ in range(8):
        inner = [inner] + [[0]] * 99
    raw = json.dumps({"input": inner, "target": [0.5] * 20000}).encode()
    assert len(raw) > fastjson.SIMDJSON_MIN_BODY
    response = client.post(
        "/v1/losses/mse_loss", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "ragged" in response.json()["detail"]
