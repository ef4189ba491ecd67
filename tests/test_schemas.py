"""The request envelope and the options are validated once per distinct set
of values and remembered (``service.schemas``): what a remembered set gives
must be what pydantic gives for that body, whatever came before it."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from service.config import Settings
from service.errors import InvalidPayload
from service.losses import LOSSES
from service.protocols.v1 import evaluate
from service.schemas import (
    options_model,
    parse_options,
    parse_request,
    request_model,
    validation_error,
)

X = [[0.5, -0.5], [1.0, 2.0]]


def pydantic_says(loss: str, body: dict[str, Any]) -> object:
    """What validating the body afresh gives: its fields, or its errors."""
    model = request_model(LOSSES[loss])
    try:
        return model.model_validate(body).__dict__
    except ValidationError as exc:
        return validation_error(exc, ("body",), list(model.model_fields)).errors


def cached_says(loss: str, body: dict[str, Any]) -> object:
    try:
        return parse_request(LOSSES[loss], body)
    except InvalidPayload as exc:
        return exc.errors


def same(a: object, b: object) -> bool:
    """Equal, with each value's type and each float's sign (1 == 1.0 == True
    and -0.0 == 0.0 in Python, but they are not the same option to torch)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (a != a and b != b)
    return a is b or a == b


# Bodies that each follow a body equal to them in Python but not the same request.
SEQUENCES: list[tuple[str, list[dict[str, Any]]]] = [
    ("margin_ranking_loss", [{"input1": [1.0], "input2": [1.0], "target": [1.0], "margin": m}
                             for m in (0.0, -0.0, 0, False, 0.0)]),
    ("cross_entropy", [{"input": X, "target": [0, 1], "ignore_index": v}
                       for v in (1, True, 1.0, 1)]),
    ("cross_entropy", [{"input": X, "target": [0, 1], "label_smoothing": v}
                       for v in (0.0, -0.0, 0, False)]),
    ("cross_entropy", [{"input": X, "target": [0, 1], "grad": v} for v in (True, 1, "true")]),
    ("cross_entropy", [
        {"input": X, "target": [0, 1], "weight": [1.0, 2.0]},
        {"input": X, "target": [1, 0]},  # no weight: not the last body's
        {"input": X, "target": [1, 0], "grad_output": 2.0, "grad": True},
        {"input": X, "target": [1, 0], "grad": True},  # nor its grad_output
        {"input": X},  # target missing
        {"input": X, "target": [1, 0], "weigth": [1.0, 2.0]},  # misspelt
        {"input": X, "target": [1, 0], "reduce": True},  # deprecated
        {"input": X, "target": [1, 0], "grad": ["input"]},  # a list: not a key
        {"input": X, "target": [1, 0], "grad": ["input"]},
        {"input": X, "target": [1, 0], "dtype": "float16", "device": "cpu"},
        {"dtype": "float16", "device": "cpu", "input": X, "target": [1, 0]},  # same, reordered
        {"input": X, "target": [1, 0], "dtype": "float17", "device": "cpu"},
    ]),
]  # fmt: skip


@pytest.mark.parametrize(("loss", "bodies"), SEQUENCES)
def test_a_remembered_envelope_is_what_pydantic_gives(
    loss: str, bodies: list[dict[str, Any]]
) -> None:
    for _ in range(2):  # the second time round, every valid one is remembered
        for body in bodies:
            got, expected = cached_says(loss, body), pydantic_says(loss, body)
            if isinstance(got, dict):
                assert same(got, expected), (body, got, expected)
                for name in LOSSES[loss].tensor_names:  # the values sent, not copies
                    assert got[name] is body.get(name)
            elif "reduce" not in body:  # refused before pydantic sees it
                assert got == expected


@pytest.mark.parametrize(("loss", "bodies"), SEQUENCES[:3])
def test_remembered_options_are_what_pydantic_gives(
    loss: str, bodies: list[dict[str, Any]]
) -> None:
    spec = LOSSES[loss]
    for _ in range(2):
        for body in bodies:
            options = {k: v for k, v in body.items() if k in spec.option_names}
            try:
                expected: object = options_model(spec).model_validate(options).model_dump()
            except ValidationError:
                with pytest.raises(InvalidPayload):
                    parse_options(spec, options, ("parameters",))
                continue
            assert same(parse_options(spec, options, ("parameters",)), expected)


def test_a_remembered_envelope_is_not_shared() -> None:
    """Each call gets its own dict: changing one changes no later call's."""
    spec = LOSSES["cross_entropy"]
    first = parse_request(spec, {"input": X, "target": [0, 1]})
    first["reduction"] = "sum"
    assert parse_request(spec, {"input": X, "target": [0, 1]})["reduction"] == "mean"


def test_a_zero_keeps_its_sign_after_the_other_zero() -> None:
    """margin_ranking_loss with margin -0.0 gives -0.0 where 0.0 gives 0.0:
    a remembered margin 0.0 must not stand in for -0.0."""
    spec, x, y = LOSSES["margin_ranking_loss"], [1.0, 2.0], [1.0, -1.0]
    body = {"input1": x, "input2": x, "target": y, "reduction": "none"}
    for margin in (0.0, -0.0, 0.0, -0.0):
        value = evaluate(spec, {**body, "margin": margin}, Settings())["value"]
        got = orjson.loads(orjson.dumps(value))
        expected = F.margin_ranking_loss(
            torch.tensor(x), torch.tensor(x), torch.tensor(y), margin=margin, reduction="none"
        ).tolist()
        assert [math.copysign(1, v) for v in got] == [math.copysign(1, v) for v in expected]
        assert math.copysign(1, got[0]) == math.copysign(1, margin)
