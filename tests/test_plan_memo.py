"""What ``plan`` remembers of a call's structure (``compute._PLANNED``: roles,
gradients, cost) never changes an answer: a call planned after any other
gets what a fresh process gives it, errors included, and the checks that
read values run on every call."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service import compute
from service.compute import Argument, LossCall, Plan, Timings, plan
from service.config import Settings
from service.errors import ServiceError
from service.losses import LOSSES
from service.schemas import parse_options
from tests.cases import CASES, Case

SETTINGS = Settings()


def outcome(call: LossCall, settings: Settings = SETTINGS) -> tuple[Any, ...]:
    """What planning ``call`` gives, as values to compare: the error, or the
    plan's fields (its tensors by value)."""
    try:
        checked: Plan = plan(call, settings, Timings())
    except ServiceError as exc:
        return ("error", type(exc).__name__, exc.status, str(exc.detail))
    tensors = {
        name: (value.dtype, tuple(value.shape), value.tolist())
        if isinstance(value, torch.Tensor)
        else value
        for name, value in checked.tensors.items()
    }
    return (
        list(tensors),
        tensors,
        checked.grad_names,
        checked.device,
        checked.cost,
        checked.memory_bytes,
        checked.warnings,
        checked.tensor_bytes,
        checked.on_cuda,
    )


def fresh(call: LossCall, settings: Settings = SETTINGS) -> tuple[Any, ...]:
    compute._PLANNED.clear()
    return outcome(call, settings)


def case_call(case: Case, *, explicit: bool, grad: bool) -> LossCall:
    arguments: dict[str, Argument] = {
        name: (value, explicit) if isinstance(value, torch.Tensor) else value
        for name, value in case.tensors.items()
    }
    options = parse_options(case.spec, case.options, ("parameters",))
    return LossCall(case.spec, arguments, options, grad=grad)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_call_planned_again_gets_what_it_got_first(
    case: Case, explicit: bool, grad: bool
) -> None:
    call = case_call(case, explicit=explicit, grad=grad)
    first = fresh(call)
    assert outcome(call) == first  # remembered, where its structure tells all


def ce(
    input: torch.Tensor,
    target: torch.Tensor,
    explicit: bool = True,
    float_dtype: torch.dtype = torch.float32,
    **options: Any,
) -> LossCall:
    spec = LOSSES["cross_entropy"]
    arguments: dict[str, Argument] = {"input": (input, explicit), "target": (target, explicit)}
    parsed = parse_options(spec, options, ("parameters",))
    return LossCall(spec, arguments, parsed, float_dtype=float_dtype)


def bce(input: torch.Tensor, target: torch.Tensor) -> LossCall:
    spec = LOSSES["binary_cross_entropy"]
    return LossCall(
        spec,
        {"input": (input, True), "target": (target, True)},
        parse_options(spec, {}, ("parameters",)),
    )


LOGITS = torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, -0.5]])
VOLUME = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 10
# calls of a few structures, each with values that pass and values that do not
CALLS = {
    "indices": ce(LOGITS, torch.tensor([2, 0])),
    "index out of range": ce(LOGITS, torch.tensor([3, 0])),
    "negative index": ce(LOGITS, torch.tensor([-1, 0])),
    "ignored index": ce(LOGITS, torch.tensor([-100, 1])),
    "indices, ignore_index 3": ce(LOGITS, torch.tensor([3, 0]), ignore_index=3),
    "indices, not explicit": ce(LOGITS, torch.tensor([2, 0]), explicit=False),
    "float indices, not explicit": ce(LOGITS, torch.tensor([2.0, 0.0]), explicit=False),
    "fractional indices, not explicit": ce(LOGITS, torch.tensor([2.5, 0.0]), explicit=False),
    "probabilities": ce(LOGITS, torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])),
    "probabilities, float64": ce(
        LOGITS, torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    ),
    "probabilities, not explicit, float64": ce(
        LOGITS, torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64), False
    ),
    # float64 tensors in a request of dtype float64 (kept) and of float32 (cast)
    "float64, dtype float64": ce(LOGITS.double(), LOGITS.softmax(1).double(), False, torch.float64),
    "float64, dtype float32": ce(LOGITS.double(), LOGITS.softmax(1).double(), False),
    # same rank as input, another shape: fractions make them probabilities
    "same rank, fractions": ce(VOLUME, torch.full((2, 1, 4), 0.5)),
    "same rank, whole numbers": ce(VOLUME, torch.full((2, 1, 4), 1.0)),
    "spatial indices": ce(VOLUME, torch.zeros(2, 4, dtype=torch.int64)),
    "spatial index out of range": ce(VOLUME, torch.full((2, 4), 7)),
    "bce": bce(torch.tensor([0.4, 0.1]), torch.tensor([0.2, 0.8])),
    "bce, input outside [0, 1]": bce(torch.tensor([1.4, 0.1]), torch.tensor([0.2, 0.8])),
}


@pytest.mark.parametrize("first", list(CALLS))
def test_any_call_after_any_other_gets_what_a_fresh_process_gives(first: str) -> None:
    expected = {name: fresh(call) for name, call in CALLS.items()}
    for name, call in CALLS.items():
        compute._PLANNED.clear()
        outcome(CALLS[first])
        assert outcome(call) == expected[name], f"{name} after {first}"
        assert outcome(call) == expected[name], f"{name} twice after {first}"


def test_the_checks_that_read_values_run_on_every_call() -> None:
    compute._PLANNED.clear()
    outcome(CALLS["indices"])
    assert len(compute._PLANNED) == 1  # the structure is remembered
    got = outcome(CALLS["index out of range"])
    assert got[0] == "error" and "class index 3 out of range" in got[3]
    outcome(CALLS["bce"])
    got = outcome(CALLS["bce, input outside [0, 1]"])
    assert got[0] == "error" and "expected probabilities in [0, 1]" in got[3]


def test_a_call_whose_role_reads_values_is_not_remembered() -> None:
    compute._PLANNED.clear()
    outcome(CALLS["same rank, fractions"])
    outcome(CALLS["float indices, not explicit"])  # cast to int64 after its values' checks
    outcome(CALLS["probabilities, not explicit, float64"])  # cast to float32
    assert not compute._PLANNED


def test_ctc_is_planned_anew_for_each_longest_target() -> None:
    """CTC's cost reads the longest target length, a value."""
    case = next(c for c in CASES if c.loss == "ctc_loss")
    call = case_call(case, explicit=True, grad=False)
    compute._PLANNED.clear()
    outcome(call)
    assert not compute._PLANNED


def test_the_work_limit_of_each_app_holds_for_a_remembered_structure() -> None:
    tight = Settings(max_work_elements=4)
    compute._PLANNED.clear()
    assert outcome(CALLS["indices"])[0] != "error"
    refused = outcome(CALLS["indices"], tight)
    assert refused[:3] == ("error", "PayloadTooLarge", 413)
    assert "LOSS_SERVICE_MAX_WORK_ELEMENTS" in refused[3]
    assert refused == fresh(CALLS["indices"], tight)


def test_an_option_value_that_cannot_be_a_key_is_planned_without_the_memo() -> None:
    call = CALLS["indices"]
    unhashable = LossCall(call.spec, call.arguments, {**call.options, "extra": []})
    compute._PLANNED.clear()
    # the loss ignores the option it does not know: planned, not remembered
    assert outcome(unhashable)[0] != "error"
    assert not compute._PLANNED


def test_a_remembered_structure_skips_the_role_and_cost_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compute._PLANNED.clear()
    expected = outcome(CALLS["indices"])

    def fail(*args: Any) -> None:
        raise AssertionError("planned again from scratch")

    monkeypatch.setattr(compute, "assign_roles", fail)
    monkeypatch.setattr(compute, "_costed", fail)
    assert outcome(CALLS["indices"]) == expected
    got = outcome(CALLS["index out of range"])
    assert got[0] == "error" and "class index 3 out of range" in got[3]


def test_an_argument_given_as_none_is_one_not_given() -> None:
    """As ``assign_roles`` reads it (no front door sends one)."""
    call = CALLS["indices"]
    arguments: dict[str, Any] = {**call.arguments, "weight": None}
    with_none = LossCall(call.spec, arguments, call.options)
    expected = fresh(call)
    assert fresh(with_none) == expected
    assert outcome(with_none) == expected  # remembered, and taken again
