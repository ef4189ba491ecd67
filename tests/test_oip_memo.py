"""What the OIP front door remembers (the checks of a JSON-data input, those
of an all-JSON request's inputs, which inputs are missing, what a request's
parameters came out as) never changes an answer: a request answered after
another that filled those memos gets the same bytes it gets from a fresh
process, whatever came before it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.compute import LossCall
from service.errors import ServiceError
from service.losses import resolve
from service.protocols import oip, oip_json

MEMO = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def forget() -> None:
    oip_json._CHECKED.clear()
    oip_json._PLANS.clear()
    oip._CALLS.clear()
    oip._missing.cache_clear()


def base() -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "input", "shape": [2, 3], "datatype": "FP32",
             "data": [0.5, -1.0, 2.0, 0.25, 0.0, -0.5]},
            {"name": "target", "shape": [2], "datatype": "INT64", "data": [2, 0]},
        ],
        "parameters": {"reduction": "sum"},
    }  # fmt: skip


# what a later request may change of the one before it: values equal to the
# remembered ones but of another type, other names, fields and parameters
SHAPES = st.sampled_from([[2, 3], [2.0, 3], [True, 3], [2, 3, 1], [6], [2, -3], ["2", 3]])
TARGET_SHAPES = st.sampled_from([[2], [2.0], [True], [1], [2, 1]])
NAMES = st.sampled_from(["input", "Input", "target", "weight", "grad_output", "nope", 1])
DATATYPES = st.sampled_from(["FP32", "FP64", "FP16", "INT64", "INT32", "fp32", "BYTES", 32])
PARAMETERS = st.dictionaries(
    st.sampled_from(
        [
            "reduction",
            "label_smoothing",
            "ignore_index",
            "grad",
            "device",
            "binary_data_output",
            "foo",
        ]
    ),
    st.sampled_from(
        [
            "sum",
            "mean",
            "none",
            0.0,
            -0.0,
            0.1,
            1,
            True,
            False,
            -100,
            ["input"],
            "input",
            "cpu",
            None,
        ]
    ),
    max_size=3,
)


@st.composite
def variants(draw: st.DrawFn) -> dict[str, Any]:
    body = base()
    first, second = body["inputs"]
    first["shape"] = draw(SHAPES)
    second["shape"] = draw(TARGET_SHAPES)
    if draw(st.booleans()):
        first["name"] = draw(NAMES)
    if draw(st.booleans()):
        first["datatype"] = draw(DATATYPES)
    if draw(st.booleans()):
        second["datatype"] = draw(DATATYPES)
    if draw(st.booleans()):
        first["extra"] = 1
    if draw(st.booleans()):
        second["parameters"] = draw(st.sampled_from([{}, None, {"binary_data_size": 8}]))
    if draw(st.booleans()):
        body["inputs"] = [first]  # the target missing
    body["parameters"] = draw(PARAMETERS)
    if draw(st.booleans()):
        body["outputs"] = [{"name": "loss"}]
    return body


def answer(client: TestClient, body: dict[str, Any]) -> tuple[int, bytes]:
    response = client.post("/v2/models/cross_entropy/infer", content=json.dumps(body))
    return response.status_code, response.content


@pytest.fixture(autouse=True)
def fresh() -> Any:
    forget()
    yield
    forget()


@MEMO
@given(before=variants(), after=variants())
def test_a_request_gets_what_a_fresh_process_gives(
    client: TestClient, before: dict[str, Any], after: dict[str, Any]
) -> None:
    forget()
    fresh = answer(client, after)
    forget()
    answer(client, base())
    answer(client, before)  # the memos now hold what these two left
    assert answer(client, after) == fresh
    assert answer(client, after) == fresh  # and what it left itself


def test_the_memos_are_used(client: TestClient) -> None:
    """The plain request fills each memo once, and a repeat reads them (a
    memo that is never read would keep these tests green for nothing)."""
    status, first = answer(client, base())
    assert status == 200
    assert len(oip_json._CHECKED) == 2 and len(oip._CALLS) == 1
    assert len(oip_json._PLANS) == 1
    misses = oip._missing.cache_info().misses
    assert answer(client, base()) == (200, first)
    assert oip._missing.cache_info().misses == misses
    assert len(oip_json._CHECKED) == 2 and len(oip._CALLS) == 1
    assert len(oip_json._PLANS) == 1


@pytest.mark.parametrize(
    ("remembered", "later"),
    [([1, 6], [True, 6]), ([1, 6], [1.0, 6]), ([2, 3], [2.0, 3]), ([2, 3], [2, 3.0])],
)
def test_a_dimension_of_another_type_is_not_the_remembered_one(
    client: TestClient, remembered: list[Any], later: list[Any]
) -> None:
    """True and 1.0 equal 1 (and hash alike): a shape [True, 6] after a
    remembered [1, 6] must still be refused as a fresh process refuses it."""
    body = base()
    body["inputs"][0]["shape"] = later
    fresh = answer(client, body)
    assert fresh[0] == 400
    forget()
    warm = base()
    warm["inputs"][0]["shape"] = remembered
    warm["inputs"][0]["data"] = [0.5] * 6
    assert answer(client, warm)[0] in (200, 422)
    assert answer(client, body) == fresh


def call_fields(call: LossCall) -> str:
    """Every field of a call, tensors by identity (their == is elementwise),
    written with each value's type (1, 1.0 and True are equal)."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value))
        if isinstance(value, tuple | list):
            return type(value)(plain(v) for v in value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return repr({f.name: plain(getattr(call, f.name)) for f in dataclasses.fields(call)})


@MEMO
@given(
    parameters=PARAMETERS,
    encoding=st.sampled_from(["flat", "raw"]),
    binary_output=st.booleans(),
    grad_output=st.booleans(),
)
def test_a_remembered_call_is_the_one_the_general_path_makes(
    parameters: dict[str, Any], encoding: str, binary_output: bool, grad_output: bool
) -> None:
    forget()
    tensors = {"input": torch.zeros(2, 3), "target": torch.tensor([2, 0])}
    upstream = torch.ones(()) if grad_output else None
    spec = resolve("cross_entropy")
    request = oip.InferRequest(spec, None, tensors, parameters, None, binary_output, upstream)
    try:
        general = oip._loss_call(request, encoding)
    except ServiceError:
        return  # refused: nothing is remembered
    first = oip.loss_call(request, encoding)
    # remembered, unless a value cannot be a key (a list of grad names)
    assert oip._CALLS or any(type(v) is list for v in parameters.values())
    again = oip.loss_call(request, encoding)
    assert call_fields(first) == call_fields(general)
    assert call_fields(again) == call_fields(general)


TARGET = {"name": "target", "shape": [2], "datatype": "INT64", "data": [2, 0]}
NO_DATA = {"name": "target", "shape": [2], "datatype": "INT64"}


@pytest.mark.parametrize(
    ("remembered", "later"),
    [
        # as many fields as the remembered input, one of them unknown
        ({**TARGET, "parameters": None}, {**TARGET, "extra": None}),
        ({**TARGET, "parameters": {}}, {**TARGET, "extra": {}}),
        ({**TARGET, "parameters": None}, {**NO_DATA, "parameters": None, "extra": [2, 0]}),
        # parameters that say something
        ({**TARGET, "parameters": {}}, {**TARGET, "parameters": {"binary_data_size": 16}}),
        # the same fields in another order, or with a parameters that says nothing
        (TARGET, dict(reversed(TARGET.items()))),
        (TARGET, {**TARGET, "parameters": None}),
        ({**TARGET, "parameters": {}}, TARGET),
    ],
)
def test_an_input_with_other_fields_is_not_the_remembered_one(
    client: TestClient, remembered: dict[str, Any], later: dict[str, Any]
) -> None:
    """The memo keys leave out an input's field names (only an input with
    the plain ones gets a key): a later input with other fields, as many of
    them, still gets what a fresh process gives it."""
    body = base()
    body["inputs"][1] = later
    fresh = answer(client, body)
    forget()
    warm = base()
    warm["inputs"][1] = remembered
    assert answer(client, warm)[0] == 200
    assert oip_json._PLANS  # remembered
    assert answer(client, body) == fresh


def test_a_full_memo_starts_over_and_keeps_serving(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends ever new parameter values fills a memo; it then
    starts over (bounded) instead of leaving every later request on the slow
    path, and answers stay the same."""
    monkeypatch.setattr(oip, "CALLS_KEPT", 8)
    status, plain = answer(client, base())
    assert status == 200
    for i in range(20):  # 20 distinct parameter sets
        body = base()
        body["parameters"] = {"reduction": "sum", "label_smoothing": i / 100}
        assert answer(client, body)[0] == 200
        assert 1 <= len(oip._CALLS) <= 8
    assert answer(client, base()) == (200, plain)
    # a parameter set never seen is still remembered: the memo took it in
    # (where one that stopped adding at its bound would not)
    fresh = base()
    fresh["parameters"] = {"reduction": "mean"}
    before = len(oip._CALLS)
    assert answer(client, fresh)[0] == 200
    assert len(oip._CALLS) in (before + 1, 1)
    assert answer(client, base()) == (200, plain)


# gaussian_nll_loss takes var as an input or as a number parameter: which
# inputs a request needs depends on its parameters' names
GAUSSIAN_INPUTS = st.lists(
    st.sampled_from(
        [
            {"name": "input", "shape": [3], "datatype": "FP32", "data": [0.5, 1.0, -0.5]},
            {"name": "target", "shape": [3], "datatype": "FP32", "data": [0.0, 1.0, 2.0]},
            {"name": "var", "shape": [3], "datatype": "FP32", "data": [1.0, 0.5, 2.0]},
            {"name": "var", "shape": [3], "datatype": "FP64", "data": [1, 0.5, "NaN"]},
            {"name": "grad_output", "shape": [], "datatype": "FP32", "data": [1.0]},
        ]
    ),
    min_size=1,
    max_size=4,
)
GAUSSIAN_PARAMETERS = st.sampled_from(
    [{}, {"var": 0.5}, {"var": "x"}, {"full": True}, {"var": 1, "grad": True}]
)


@st.composite
def gaussian(draw: st.DrawFn) -> dict[str, Any]:
    return {"inputs": draw(GAUSSIAN_INPUTS), "parameters": draw(GAUSSIAN_PARAMETERS)}


def gaussian_answer(client: TestClient, body: dict[str, Any]) -> tuple[int, bytes]:
    response = client.post("/v2/models/gaussian_nll_loss/infer", content=json.dumps(body))
    return response.status_code, response.content


@MEMO
@given(before=st.lists(gaussian(), max_size=3), after=gaussian())
def test_which_inputs_a_request_needs_is_not_taken_from_another(
    client: TestClient, before: list[dict[str, Any]], after: dict[str, Any]
) -> None:
    forget()
    fresh = gaussian_answer(client, after)
    forget()
    for body in before:
        gaussian_answer(client, body)
    assert gaussian_answer(client, after) == fresh
    assert gaussian_answer(client, after) == fresh


def _edit(body: dict[str, Any], edit: str, index: int) -> None:
    inputs = body["inputs"]
    item = inputs[index % len(inputs)]
    if edit == "extra field":
        item["extra"] = 1
    elif edit == "parameters renamed":  # as many fields, one of them unknown
        item["extra"] = item.pop("parameters", None)
    elif edit == "dimension as float":
        item["shape"] = [float(d) for d in item["shape"]]
    elif edit == "dimension as bool":
        item["shape"] = [True if d == 1 else d for d in [1, *item["shape"]]]
    elif edit == "another name":
        item["name"] = "weight"
    elif edit == "another datatype":
        item["datatype"] = "FP64" if item["datatype"] != "FP64" else "INT64"
    elif edit == "input parameters":
        item["parameters"] = {"binary_data_size": 8}
    elif edit == "no data":
        del item["data"]
    elif edit == "twice":
        inputs.append(dict(item))
    elif edit == "one fewer":
        del inputs[index % len(inputs)]
    elif edit == "a parameter":
        body["parameters"] = {**body.get("parameters", {}), "label_smoothing": 0.1}
    elif edit == "parameter names":
        body["parameters"] = {"binary_data_output": False}
    elif edit == "outputs":
        body["outputs"] = [{"name": "grad_input"}]
    elif isinstance(item.get("data"), list) and item["data"]:
        data = item["data"]
        item["data"] = {
            "non-finite data": ["NaN", *data[1:]],
            "boolean data": [True, *data[1:]],
            "one more value": [*data, 1],
            "nested data": [data],
            "fractional data": [v + 0.5 if isinstance(v, int | float) else v for v in data],
        }[edit]


EDITS = st.sampled_from(
    ["extra field", "parameters renamed", "dimension as float", "dimension as bool",
     "another name", "another datatype", "input parameters", "no data", "twice", "one fewer",
     "a parameter", "parameter names", "outputs", "non-finite data", "boolean data",
     "one more value", "nested data", "fractional data"]
)  # fmt: skip


@MEMO
@given(before=variants(), edit=EDITS, index=st.integers(0, 1))
def test_a_request_one_edit_away_from_a_remembered_one_gets_its_own_answer(
    client: TestClient, before: dict[str, Any], edit: str, index: int
) -> None:
    after = json.loads(json.dumps(before))
    _edit(after, edit, index)
    if not after["inputs"]:
        return
    forget()
    fresh = answer(client, after)
    forget()
    answer(client, before)
    assert answer(client, after) == fresh


def test_a_remembered_request_still_meets_the_element_limits(client: TestClient) -> None:
    """The memos are shared by every app in the process: a request remembered
    under generous limits is still held to a stricter app's (a hit skips the
    checks, never the element budget)."""
    from service.config import Settings
    from service.main import create_app

    body = base()  # 6 + 2 elements
    assert answer(client, body)[0] == 200
    assert answer(client, body)[0] == 200  # remembered now
    assert oip_json._PLANS
    for limits in ({"max_tensor_elements": 7}, {"max_elements_per_tensor": 5}):
        strict = create_app(Settings(device="cpu", log_level="warning", **limits))
        with TestClient(strict, raise_server_exceptions=False) as other:
            status, content = answer(other, body)
        assert status == 413, content
        assert b"LOSS_SERVICE_MAX_" in content
