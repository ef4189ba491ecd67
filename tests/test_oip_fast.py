"""The OIP JSON front door's short cuts for the common request (an all-JSON
body of plain inputs, a loss-only answer) give the bytes its general path
gives: each is compared with that path over many requests."""

from __future__ import annotations

import math
from typing import Any

import orjson
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.compute import Evaluation, LossCall
from service.losses import resolve
from service.protocols import v1
from service.protocols.oip import InferRequest, OutputRequest
from service.protocols.oip_json import encode_response

FAST = settings(max_examples=400, deadline=None, derandomize=True)

SPECS = st.sampled_from([resolve(n) for n in ("cross_entropy", "mse_loss", "nll_loss", "BCELoss")])
FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, 65504.0, 0.1]),
)
IDS = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(['"', "\\", "\x00\x1f", "é☃"]))


def evaluation(spec: Any, value: torch.Tensor) -> Evaluation:
    return Evaluation(LossCall(spec, {}, options={}), value)


def loss_request(spec: Any, request_id: str | None, outputs: Any = None) -> InferRequest:
    return InferRequest(spec, request_id, tensors={}, parameters={}, outputs=outputs)


@FAST
@given(spec=SPECS, dtype=FLOAT_DTYPES, number=VALUES, request_id=IDS)
def test_a_loss_only_response_is_what_the_general_path_writes(
    spec: Any, dtype: torch.dtype, number: float, request_id: str | None
) -> None:
    value = torch.tensor(number, dtype=dtype)
    fast = encode_response(loss_request(spec, request_id), evaluation(spec, value))
    # naming the loss output takes the general path, to the same answer
    named = loss_request(spec, request_id, [OutputRequest("loss")])
    general = encode_response(named, evaluation(spec, value))
    assert fast == general
    item = value.item()
    data = (
        item
        if math.isfinite(item)
        else {math.inf: "Infinity", -math.inf: "-Infinity"}.get(item, "NaN")
    )
    expected: dict[str, Any] = {"model_name": spec.name, "model_version": "1"}
    if request_id is not None:
        expected["id"] = request_id
    expected["parameters"] = {"device": "cpu"}
    expected["outputs"] = [
        {"name": "loss", "shape": [1], "datatype": fast_datatype(dtype), "data": [data]}
    ]
    assert fast == ([orjson.dumps(expected)], None)


def fast_datatype(dtype: torch.dtype) -> str:
    return {torch.float32: "FP32", torch.float64: "FP64", torch.float16: "FP16"}.get(dtype, "BF16")


def test_a_loss_with_elements_or_gradients_takes_the_general_path() -> None:
    spec = resolve("mse_loss")
    value = torch.tensor([1.5, -0.0])
    [header], length = encode_response(loss_request(spec, "7"), evaluation(spec, value))
    assert length is None
    assert orjson.loads(header)["outputs"] == [
        {"name": "loss", "shape": [2], "datatype": "FP32", "data": [1.5, -0.0]}
    ]
    scalar = torch.tensor(0.25)
    graded = Evaluation(LossCall(spec, {}, options={}), scalar, {"input": torch.tensor([0.5])})
    [header], _ = encode_response(loss_request(spec, None), graded)
    assert [o["name"] for o in orjson.loads(header)["outputs"]] == ["loss", "grad_input"]


# ---------------------------------------------------------------- /v1's answer


@FAST
@given(
    spec=SPECS,
    dtype=st.one_of(FLOAT_DTYPES, st.sampled_from([torch.int64, torch.bool])),
    number=VALUES,
    grad=st.sampled_from([False, True, [], ["input"]]),
    warned=st.booleans(),
    shape=st.sampled_from([(), (1,), (2, 0), (3,)]),
)
def test_a_v1_body_is_the_general_response_dumped(
    spec: Any,
    dtype: torch.dtype,
    number: float,
    grad: Any,
    warned: bool,
    shape: tuple[int, ...],
) -> None:
    value = (
        torch.full(shape, number, dtype=torch.float64).to(dtype)
        if math.isfinite(number) or dtype.is_floating_point
        else torch.zeros(shape, dtype=dtype)
    )
    result = Evaluation(
        LossCall(spec, {}, options={}, grad=grad),
        value,
        {"input": torch.zeros(2)} if grad else {},
        ["a warning"] if warned else [],
    )
    body = v1.encode_body(result)
    assert body == orjson.dumps(v1.encode_response(result))
    answer = orjson.loads(body)
    assert answer["shape"] == list(shape) and answer["loss"] == spec.name
    if not shape:  # the number itself, read back (non-finite ones as text)
        item = value.item()
        assert answer["value"] == item or (
            isinstance(item, float)
            and not math.isfinite(item)
            and answer["value"] in ("NaN", "Infinity", "-Infinity")
        )
