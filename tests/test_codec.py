"""The tensor codec on its own: forms, dtypes, roles and their errors."""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import orjson
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import BadRequest, InvalidPayload, PayloadTooLarge
from service.protocols import oip_json
from service.tensors import (
    DTYPE_NAMES,
    DTYPES,
    ElementBudget,
    decode_tensor,
    encode_scalar,
    encode_tensor,
    tensor_view,
)
from tests.cases import assert_same


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


def as_json(wire: object) -> object:
    """A wire value (it may hold orjson fragments) as the client reads it."""
    return orjson.loads(orjson.dumps(wire))


def test_dtype_table_and_inverse() -> None:
    assert {DTYPE_NAMES[v]: v for v in DTYPES.values()} == DTYPES


@pytest.mark.parametrize("name", list(DTYPES))
def test_b64_round_trip_every_dtype(name: str) -> None:
    dtype = DTYPES[name]
    source = (torch.arange(6) % 2 == 0) if dtype == torch.bool else torch.arange(6).to(dtype)
    wire = as_json(encode_tensor(source.reshape(2, 3), "b64"))
    assert isinstance(wire, dict)
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


@pytest.mark.parametrize("action", ["error", "ignore", "default", "always"])
def test_float32_overflow_is_infinite_whatever_the_warning_filter(action: str) -> None:
    """A cast past float32's range gives inf as torch does, whether warnings
    are errors (a retry with numpy's check off) or not."""
    values = [1e308, -1e308, 3.5e38, 1.0]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter(action)
        got = decode(values, dtype=torch.float32)
        flat = decode({"shape": [2, 2], "data": values}, dtype=torch.float32)
    assert torch.equal(got, torch.tensor(values, dtype=torch.float32))
    assert torch.equal(flat, got.reshape(2, 2))


def test_float32_overflow_warns_nothing_in_a_server() -> None:
    """Under Python's default warning filters (a server's), a client's 1e308
    writes no numpy warning to the log."""
    code = (
        "import torch; from service.tensors import decode_tensor, ElementBudget\n"
        "t = decode_tensor([1e308, 2.0], field='input', role='float', "
        "float_dtype=torch.float32, budget=ElementBudget(100))\n"
        "print(t.tolist())"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[inf, 2.0]"
    assert "overflow" not in done.stderr, done.stderr


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
    assert as_json(encode_tensor(t, "nested")) == ["NaN", "Infinity", "-Infinity", 1.0]
    assert as_json(encode_tensor(t, "flat")["data"]) == ["NaN", "Infinity", "-Infinity", 1.0]

    assert encode_scalar(torch.tensor(float("nan"))) == "NaN"
    flat = decode({"shape": [2], "data": ["NaN", 2]})
    assert math.isnan(flat[0]) and flat[1] == 2


@pytest.mark.parametrize("shape", [[3], [70000], [2, 40000], [40000, 2], [3, 70000], [2, 3, 30000]])
def test_large_outputs_are_written_in_pieces_as_torch_gives_them(shape: list[int]) -> None:
    g = torch.Generator().manual_seed(7)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    flat = t.reshape(-1)
    flat[::7] = math.nan
    flat[1::11] = math.inf
    flat[2::13] = -math.inf
    expected = [
        x if math.isfinite(x) else NONFINITE_TEXT[x if x == x else "nan"] for x in flat.tolist()
    ]
    assert as_json(encode_tensor(t, "flat"))["data"] == expected  # type: ignore[index]
    nested = as_json(encode_tensor(t, "nested"))
    assert np.array(nested, dtype=object).reshape(-1).tolist() == expected


NONFINITE_TEXT: dict[object, str] = {"nan": "NaN", math.inf: "Infinity", -math.inf: "-Infinity"}


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
        decode({"shape": [2**30, 4], "b64": ""}, limit=2**26)
    with pytest.raises(PayloadTooLarge):
        decode([[0.0] * 20] * 20, limit=100)


def test_empty_b64_tensor() -> None:
    t = decode({"shape": [0, 3], "dtype": "float32", "b64": base64.b64encode(b"").decode()})
    assert t.shape == (0, 3)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([2**63, 0], "dimension 0 is 9223372036854775808, outside int64"),
        ([0, 2**63], "dimension 1 is 9223372036854775808, outside int64"),
        ([0, 2**63 - 1], "overflow"),
        ([2**40, 2**40, 2**40], "overflow"),
        ([0, 2**31, 2**31], "overflow"),
    ],
)
@pytest.mark.parametrize("form", ["data", "b64"])
def test_dimensions_outside_int64_or_overflowing_are_422(
    shape: list[int], words: str, form: str
) -> None:
    with pytest.raises(InvalidPayload, match=words) as caught:
        decode({"shape": shape, form: [] if form == "data" else ""}, limit=2**26)
    assert caught.value.errors[0].loc == ("body", "x", "shape")


def test_a_zero_dimension_does_not_hide_the_others_from_the_budget() -> None:
    # no elements, but 2**40 rows: its nested JSON alone would be terabytes
    with pytest.raises(PayloadTooLarge, match="no elements but spans 1099511627776"):
        decode({"shape": [2**40, 0], "data": []}, limit=2**26)
    assert decode({"shape": [1000, 0], "b64": ""}).shape == (1000, 0)


@pytest.mark.parametrize("encoding", ["nested", "flat", "b64"])
def test_encoding_never_fails_for_a_tensor_torch_made(encoding: str) -> None:
    # numpy refuses an array this large even without elements
    huge_empty = torch.empty([0, 2**62])
    wire = as_json(encode_tensor(huge_empty, encoding))  # type: ignore[arg-type]
    if encoding == "nested":
        assert wire == []
    else:
        assert wire["shape"] == [0, 2**62]
    assert as_json(encode_tensor(torch.empty(3, 0, 2**50), "nested")) == [[], [], []]


def test_nested_encoding_of_too_many_empty_rows_is_refused() -> None:
    with pytest.raises(PayloadTooLarge, match='"flat" or "b64"'):
        encode_tensor(torch.empty(2**27, 0), "nested")
    assert encode_tensor(torch.empty(2**27, 0), "flat")["shape"] == [2**27, 0]


def test_nested_encoding_of_a_0_dim_tensor_is_a_bare_number() -> None:
    assert encode_tensor(torch.tensor(0.5), "nested") == 0.5
    assert encode_tensor(torch.tensor(float("-inf")), "nested") == "-Infinity"
    assert encode_tensor(torch.tensor(3), "nested") == 3
    assert encode_tensor(torch.tensor(True), "nested") is True
    assert encode_tensor(torch.tensor(0.5), "flat")["data"] is not None


@pytest.mark.parametrize(
    "source",
    [
        torch.empty(0),
        torch.empty(0, 3).t(),
        torch.arange(12.0)[::3],
        torch.arange(12.0).reshape(3, 4)[:, 1:2],  # one element per row, stride 4
        torch.arange(12.0).reshape(3, 4)[1:2, 2],  # one element at stride 4
        torch.tensor(2.5),
        torch.tensor([1.0, 2.0]).expand(3, 2),
        torch.arange(6).reshape(2, 3).t(),
        torch.tensor([True, False, True])[::2],
        torch.arange(4, dtype=torch.bfloat16)[1::2],
    ],
)
def test_tensor_view_is_the_row_major_bytes_of_any_layout(source: torch.Tensor) -> None:
    fresh = torch.tensor(source.tolist(), dtype=source.dtype).reshape(-1)  # a new, dense copy
    if fresh.dtype == torch.bool:
        fresh = fresh.to(torch.uint8)
    raw = fresh.view(torch.uint8).numpy().tobytes() if fresh.numel() else b""
    assert bytes(tensor_view(source)) == raw


# --------------------------------------------------------------------------- numbers


INTEGERS_PAST_2_53 = [
    9007199791611905,
    2**53 + 1,
    -(2**53) - 3,
    2**62 + 2**38 + 1,
    2**63 - 1,
    -(2**63),
    123456789123456789,
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_integers_in_a_float_role_round_as_torch_tensor_does(dtype: torch.dtype) -> None:
    # torch.tensor reads a Python int as a double and rounds once from it;
    # int64 straight to float32 rounds differently past 2**53
    expected = torch.tensor(INTEGERS_PAST_2_53, dtype=dtype)
    assert torch.equal(decode(INTEGERS_PAST_2_53, dtype=dtype), expected)
    flat = {"shape": [len(INTEGERS_PAST_2_53)], "data": INTEGERS_PAST_2_53}
    assert torch.equal(decode(flat, dtype=dtype), expected)
    mixed = [*INTEGERS_PAST_2_53, "NaN"]  # the slow path, one number at a time
    assert_same(
        decode(mixed, dtype=dtype), torch.tensor([*INTEGERS_PAST_2_53, math.nan], dtype=dtype)
    )
    beyond = [2**63, 2**64 - 1, 2**63 + 2**40]  # past int64: numpy makes them uint64
    assert torch.equal(decode(beyond, dtype=dtype), torch.tensor(beyond, dtype=dtype))


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ([2**63], "9223372036854775808"),
        ([float(2**70)], "1180591620717411303424"),
        ([-(2.0**63) * 2], "-18446744073709551616"),
        ([1, 2**63 + 5], "9223372036854775808"),  # via a double, like torch
    ],
)
def test_index_values_outside_int64_are_refused_not_wrapped(
    value: list[object], shown: str
) -> None:
    with pytest.raises(InvalidPayload, match=f"int64's range .*got {shown}"):
        decode(value, role="index")
    assert torch.equal(
        decode([2**63 - 1, -(2**63)], role="index"), torch.tensor([2**63 - 1, -(2**63)])
    )


def test_explicit_integer_dtypes_hold_only_their_integers() -> None:
    assert (
        decode({"shape": [2], "dtype": "int32", "data": [-5, 7]}, role="any").dtype == torch.int32
    )
    for data, words in [
        ([2**40], "int32's range"),
        ([1.5], "fractional value 1.5"),
        (["NaN"], "non-finite"),
    ]:
        with pytest.raises(InvalidPayload, match=words):
            decode({"shape": [1], "dtype": "int32", "data": data}, role="any")
    with pytest.raises(InvalidPayload, match=r"uint8's range \[0, 255\], got -1"):
        decode({"shape": [1], "dtype": "uint8", "data": [-1]}, role="any")


def test_booleans_among_numbers_are_one_and_zero_as_in_torch() -> None:
    assert torch.equal(decode([True, 2.5, False]), torch.tensor([True, 2.5, False]))
    t = decode([True, "NaN"])
    assert t[0] == 1.0 and math.isnan(t[1])


def test_slow_path_errors_name_what_is_wrong() -> None:
    for value, words in [
        ([1.0, "x"], "got the string 'x'"),
        ([1.0, None], "got null"),
        ([1.0, {"a": 1}], "got an object"),
        ([[1.0, "NaN"], [2.0]], "ragged"),
        ([[1.0, "NaN"], 2.0], "ragged"),
        ([1.0, [2.0], "NaN"], "ragged"),
        (["y" * 1000], "(1000 characters in all)"),
    ]:
        with pytest.raises(InvalidPayload, match=re.escape(words)):
            decode(value)
    with pytest.raises(InvalidPayload, match="flat array"):
        decode({"shape": [3], "data": [1.0, [2.0], "NaN"]})


# --------------------------------------------------------------------------- OIP JSON data

_ELEMENT = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "x"]),
)


def _oip_data(data: object, shape: list[int], datatype: str, fast: bool) -> tuple[str, object]:
    """What ``_decode_json_data`` makes of ``data``: ("ok", tensor) or the error."""
    direct = oip_json.DIRECT
    try:
        if not fast:
            oip_json.DIRECT = frozenset()
        tensor = oip_json._decode_json_data(
            "input", data, shape, math.prod(max(d, 1) for d in shape), datatype, ElementBudget(1000)
        )
        return "ok", tensor
    except (InvalidPayload, PayloadTooLarge, BadRequest) as exc:
        return type(exc).__name__, str(exc)
    finally:
        oip_json.DIRECT = direct


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(0, 4),
    cols=st.integers(1, 5),
    values=st.lists(_ELEMENT, min_size=0, max_size=20),
    nested=st.booleans(),
    declared=st.sampled_from(["same", "flat", "other"]),
    datatype=st.sampled_from(["FP32", "FP64", "FP16", "BF16", "INT64"]),
)
def test_small_oip_data_read_in_one_step_equals_the_general_path(
    rows: int, cols: int, values: list[object], nested: bool, declared: str, datatype: str
) -> None:
    """The one-step read of small OIP JSON data (``small_tensor``) gives the
    tensor, or the error, that the general path gives, bit for bit: plain
    numbers, booleans, integers past 2**53 and int64, non-finite strings,
    nested or flat, a shape that holds as many elements or not."""
    cells = (values * (rows * cols))[: rows * cols] if values else [0.5] * (rows * cols)
    data: object = [cells[r * cols : (r + 1) * cols] for r in range(rows)] if nested else cells
    shape = {"same": [rows, cols], "flat": [rows * cols], "other": [rows * cols + 1]}[declared]
    fast, general = _oip_data(data, shape, datatype, True), _oip_data(data, shape, datatype, False)
    assert fast[0] == general[0], (fast, general)
    if fast[0] == "ok":
        assert isinstance(fast[1], torch.Tensor) and isinstance(general[1], torch.Tensor)
        assert_same(fast[1], general[1])
    else:
        assert fast[1] == general[1]
