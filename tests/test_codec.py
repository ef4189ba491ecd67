"""The tensor codec on its own: forms, dtypes, roles and their errors."""

from __future__ import annotations

import base64
import math

import pytest
import torch

from service.errors import InvalidPayload, PayloadTooLarge
from service.tensors import (
    DTYPE_NAMES,
    DTYPES,
    ElementBudget,
    decode_tensor,
    encode_scalar,
    encode_tensor,
)


def decode(
    value: object, role: str = "float", dtype: torch.dtype = torch.float32, limit: int = 1000
) -> torch.Tensor:
    return decode_tensor(
        value,
        field="x",
        role=role,
        float_dtype=dtype,  # type: ignore[arg-type]
        budget=ElementBudget(limit),
    )


def test_dtype_table_and_inverse() -> None:
    assert {DTYPE_NAMES[v]: v for v in DTYPES.values()} == DTYPES


@pytest.mark.parametrize("name", list(DTYPES))
def test_b64_round_trip_every_dtype(name: str) -> None:
    dtype = DTYPES[name]
    source = (torch.arange(6) % 2 == 0) if dtype == torch.bool else torch.arange(6).to(dtype)
    wire = encode_tensor(source.reshape(2, 3), "b64")
    assert wire["dtype"] == name and wire["shape"] == [2, 3]
    back = decode_tensor(
        wire, field="x", role="any", float_dtype=torch.float32, budget=ElementBudget(100)
    )
    assert back.dtype == dtype and torch.equal(back, source.reshape(2, 3))


def test_float_role_takes_the_request_dtype() -> None:
    assert decode([1, 2], dtype=torch.float64).dtype == torch.float64
    assert decode([[1.5]], dtype=torch.bfloat16).dtype == torch.bfloat16
    assert decode(3).shape == ()


def test_float_role_rounds_once_like_torch_tensor() -> None:
    values = [0.1, 1 / 3, 1e-40, 65504.0, 1e308]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert torch.equal(decode(values, dtype=dtype), torch.tensor(values, dtype=dtype))


def test_index_role() -> None:
    assert decode([1, 2], role="index").dtype == torch.int64
    assert torch.equal(decode([1.0, 2.0], role="index"), torch.tensor([1, 2]))
    assert decode({"shape": [2], "dtype": "int32", "data": [1, 2]}, role="index").dtype == (
        torch.int64
    )
    with pytest.raises(InvalidPayload, match=r"fractional value 0\.5"):
        decode([0.5], role="index")


def test_nonfinite_strings_both_ways() -> None:
    t = decode(["NaN", "Infinity", "-Infinity", 1])
    assert math.isnan(t[0]) and t[1] == math.inf and t[2] == -math.inf
    assert encode_tensor(t, "nested") == ["NaN", "Infinity", "-Infinity", 1.0]
    assert encode_tensor(t, "flat")["data"] == ["NaN", "Infinity", "-Infinity", 1.0]
    assert encode_scalar(torch.tensor(float("nan"))) == "NaN"
    flat = decode({"shape": [2], "data": ["NaN", 2]})
    assert math.isnan(flat[0]) and flat[1] == 2


def test_flat_form_checks_count_and_nesting() -> None:
    assert decode({"shape": [2, 2], "data": [1, 2, 3, 4]}).shape == (2, 2)
    with pytest.raises(InvalidPayload, match="expected 4 elements for shape"):
        decode({"shape": [2, 2], "data": [1, 2, 3]})
    with pytest.raises(InvalidPayload, match="flat array"):
        decode({"shape": [2], "data": [[1], [2]]})
    with pytest.raises(InvalidPayload, match="exactly one of"):
        decode({"shape": [1], "data": [1], "b64": ""})


def test_element_budget_is_checked_before_allocating() -> None:
    with pytest.raises(PayloadTooLarge):
        decode({"shape": [2**62, 2**62], "b64": ""}, limit=2**26)
    with pytest.raises(PayloadTooLarge):
        decode([[0.0] * 20] * 20, limit=100)


def test_empty_b64_tensor() -> None:
    t = decode({"shape": [0, 3], "dtype": "float32", "b64": base64.b64encode(b"").decode()})
    assert t.shape == (0, 3)
