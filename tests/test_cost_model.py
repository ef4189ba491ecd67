"""The cost model (service/losses/cost.py): every loss has one; it says the
size of the output; it catches the requests that would make torch hold or do
too much while ordinary requests stay far below the limit; it never raises or
allocates, whatever the shapes; and it bounds the real peak memory of every
call, within a small factor (tests/memory_probe.py measures it)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.losses import LOSSES, Cost, LossSpec, predict, predicted_bytes, resolve
from service.losses.cost import INDEX_UNITS, OVERHEAD_ELEMENTS, SATURATED, broadcast
from tests.cases import CASES, Case, torch_call
from tests.test_readme import EXAMPLE, README

ROOT = Path(__file__).resolve().parent.parent
# The default of LOSS_SERVICE_MAX_WORK_ELEMENTS.
MAX_WORK = 2**27
# Predictions may exceed the measured peak by this factor (plus the constant
# OVERHEAD_ELEMENTS), no more.
FACTOR = 4

Shapes = dict[str, tuple[int, ...]]
# A loss, the shapes of its tensors, its options and the gradients asked for.
Request = tuple[LossSpec, Shapes, dict[str, Any], list[str]]


def shapes_of(tensors: dict[str, torch.Tensor | float]) -> Shapes:
    return {n: tuple(t.shape) for n, t in tensors.items() if isinstance(t, torch.Tensor)}


def options_of(spec: LossSpec, options: dict[str, Any], reduction: str) -> dict[str, Any]:
    """The options as service.compute hands them over: every option, and the reduction."""
    return {**{o.name: o.default for o in spec.options}, **options, "reduction": reduction}


def held(spec: LossSpec, shapes: Shapes) -> int:
    return sum(
        math.prod(s) * (INDEX_UNITS if spec.arg(n).role == "index" else 1)
        for n, s in shapes.items()
    )


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("spec", LOSSES.values(), ids=list(LOSSES))
def test_every_loss_has_a_cost(spec: LossSpec) -> None:
    assert callable(spec.cost)


def test_a_loss_without_a_cost_cannot_be_registered() -> None:
    spec = LOSSES["mse_loss"]
    fields = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.init and f.name != "cost"
    }
    with pytest.raises(TypeError, match="cost"):
        LossSpec(**fields)


def case_grads(case: Case) -> list[list[str]]:
    return [[], [n for n in case.spec.prediction_args if n in case.tensors]]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.loss}-{c.id}" for c in CASES])
def test_value_elements_are_the_output_size(case: Case) -> None:
    spec, shapes = case.spec, shapes_of(case.tensors)
    for reduction in spec.reductions:
        expected = torch_call(case, reduction).numel()
        for grad in case_grads(case):
            cost = predict(spec, shapes, options_of(spec, case.options, reduction), grad)
            assert all(type(v) is int for v in dataclasses.astuple(cost)), cost
            assert cost.value_elements == expected, (reduction, grad)
            assert cost.memory_elements >= held(spec, shapes) + expected
            assert cost.work_elements >= cost.memory_elements


# --------------------------------------------------------------------------- the limit


def ctc_shapes(t: int, n: int, c: int, targets: tuple[int, ...]) -> Shapes:
    return {
        "log_probs": (t, n, c),
        "targets": targets,
        "input_lengths": (n,),
        "target_lengths": (n,),
    }


# Requests within the request limits (at most 2**26 elements sent) that would
# make torch hold or do far more.
ATTACKS: list[tuple[str, Shapes, dict[str, Any], list[str]]] = [
    ("mse_loss", {"input": (40000, 1), "target": (1, 40000)}, {}, []),
    ("mse_loss", {"input": (10000, 1), "target": (1, 10000)}, {"reduction": "none"}, []),
    ("mse_loss", {"input": (2**25,), "target": (2**25,)}, {"reduction": "none"}, ["input"]),
    ("l1_loss", {"input": (12000, 1), "target": (1, 12000)}, {}, []),
    ("kl_div", {"input": (8000, 1), "target": (1, 8000)}, {"reduction": "batchmean"}, []),
    ("kl_div", {"input": (2**25,), "target": (2**25,)}, {}, []),
    ("poisson_nll_loss", {"input": (2**25,), "target": (2**25,)}, {"full": True}, []),
    ("gaussian_nll_loss", {"input": (2**24,), "target": (2**24,), "var": (2**24,)}, {}, ["var"]),
    ("gaussian_nll_loss", {"input": (9000, 1), "target": (1, 9000)}, {}, []),
    ("ctc_loss", ctc_shapes(36000, 1, 2, (1, 18000)), {}, []),
    ("ctc_loss", ctc_shapes(20000, 8, 2, (8, 1000)), {"reduction": "sum"}, ["log_probs"]),
    ("multilabel_margin_loss", {"input": (1, 100000), "target": (1, 100000)}, {}, []),
    ("multilabel_margin_loss", {"input": (100, 4000), "target": (100, 4000)}, {}, []),
    (
        "cross_entropy",
        {"input": (2**15, 2**10), "target": (2**15, 2**10)},
        {"label_smoothing": 0.1},
        [],
    ),
    (
        "cross_entropy",
        {"input": (2**24, 2), "target": (2**24,), "weight": (2,)},
        {"label_smoothing": 0.1},
        [],
    ),
    ("cross_entropy", {"input": (2**15, 2**11 - 1), "target": (2**15,)}, {}, ["input"]),
    (
        "binary_cross_entropy_with_logits",
        {"input": (2**25 - 1,), "target": (2**25 - 1,), "pos_weight": (1,)},
        {},
        ["input"],
    ),
    (
        "cosine_embedding_loss",
        {"input1": (40000, 1), "input2": (1, 40000), "target": (40000,)},
        {},
        [],
    ),
    (
        "triplet_margin_loss",
        {"anchor": (2000, 1, 64), "positive": (1, 2000, 64), "negative": (1, 1, 64)},
        {},
        [],
    ),
    (
        "triplet_margin_with_distance_loss",
        {"anchor": (2**23, 2), "positive": (2**23, 2), "negative": (2**23, 2)},
        {"distance_function": "cosine_distance"},
        ["anchor"],
    ),
    ("multilabel_soft_margin_loss", {"input": (2**25,), "target": (2**25,)}, {}, []),
    ("hinge_embedding_loss", {"input": (2**25,), "target": (2**25,)}, {}, []),
]


@pytest.mark.parametrize("loss, shapes, options, grad", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attacks_exceed_the_work_limit(
    loss: str, shapes: Shapes, options: dict[str, Any], grad: list[str]
) -> None:
    spec = LOSSES[loss]
    assert sum(math.prod(s) for s in shapes.values()) <= 2**26  # within the request limits
    cost = predict(spec, shapes, options_of(spec, options, options.get("reduction", "mean")), grad)
    assert cost.work_elements > MAX_WORK, cost


def ordinary_requests() -> list[Request]:
    """The README's examples and the test cases."""
    requests = []
    for m in EXAMPLE.finditer(README):
        spec = resolve(m["path"].rsplit("/", 1)[-1])
        body = json.loads(m["body"])
        shapes = {n: tuple(torch.tensor(body[n]).shape) for n in spec.tensor_names if n in body}
        options = {k: v for k, v in body.items() if k in spec.option_names}
        grad = spec.prediction_args if body.get("grad") is True else body.get("grad") or []
        requests.append((spec, shapes, options, grad))
    for case in CASES:
        for grad in case_grads(case):
            requests.append((case.spec, shapes_of(case.tensors), case.options, grad))
    return requests


def test_ordinary_requests_stay_far_below_the_limit() -> None:
    requests = ordinary_requests()
    assert len(requests) > 2 * len(CASES)
    for spec, shapes, options, grad in requests:
        for reduction in spec.reductions:
            cost = predict(spec, shapes, options_of(spec, options, reduction), grad)
            assert cost.work_elements < MAX_WORK // 256, (spec.name, shapes, cost)


# --------------------------------------------------------------------------- any shapes

DIMS = st.sampled_from([0, 1, 2, 3, 7, 40000, 2**31, 2**62])


@st.composite
def calls(draw: st.DrawFn) -> Request:
    spec = draw(st.sampled_from(list(LOSSES.values())))
    shapes = {
        a.name: tuple(draw(st.lists(DIMS, max_size=5)))
        for a in spec.args
        if (a.required and a.role != "float_or_number") or draw(st.booleans())
    }
    options = options_of(spec, {}, draw(st.sampled_from(spec.reductions)))
    if draw(st.booleans()):
        options["dtype"] = draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]))
    differentiable = [n for n in spec.maybe_differentiable if n in shapes]
    grad = draw(st.lists(st.sampled_from(differentiable), unique=True)) if differentiable else []
    return spec, shapes, options, grad


@settings(max_examples=300, deadline=None)
@given(calls())
def test_any_shapes_are_predicted_without_raising(call: Request) -> None:
    """Absurd shapes ([2**62, 0], [40000, 1] with [1, 40000], 2**62 ** 5) come
    back as bounded ints at once: nothing is allocated, nothing overflows."""
    spec, shapes, options, grad = call
    cost = predict(spec, shapes, options, grad)
    assert isinstance(cost, Cost)
    for value in dataclasses.astuple(cost):
        assert type(value) is int and 0 <= value <= SATURATED
    assert OVERHEAD_ELEMENTS <= cost.memory_elements <= cost.work_elements
    assert cost.memory_elements >= min(held(spec, shapes), SATURATED)


SHAPES = st.lists(st.sampled_from([0, 1, 2, 3]), max_size=4).map(tuple)


@given(st.lists(SHAPES, min_size=1, max_size=4))
def test_broadcast_is_torchs(shapes: list[tuple[int, ...]]) -> None:
    try:
        expected: tuple[int, ...] | None = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        expected = None
    assert broadcast(*shapes) == expected


def test_saturated_not_overflowed() -> None:
    huge = (2**62,) * 5
    cost = predict(LOSSES["mse_loss"], {"input": huge, "target": huge}, {"reduction": "none"}, [])
    assert cost.memory_elements == cost.work_elements == cost.value_elements == SATURATED
    empty = predict(
        LOSSES["mse_loss"], {"input": (2**62, 0), "target": (2**62, 0)}, {"reduction": "none"}, []
    )
    assert empty.value_elements == 0 and empty.memory_elements == OVERHEAD_ELEMENTS


def test_index_elements_count_their_bytes() -> None:
    """int64 indices count INDEX_UNITS elements each, so that the bytes of a
    float16 request, its int64 targets included, are bounded too."""
    nll = LOSSES["nll_loss"]
    shapes = {"input": (1000, 3), "target": (1000,)}
    cost = predict(nll, shapes, {"reduction": "none"}, [])
    inputs = 1000 * 3 * 2 + 1000 * 8  # float16 input, int64 target
    assert predicted_bytes(cost, 2) == cost.memory_elements * 2 >= inputs
    wider = predict(nll, {**shapes, "target": (2000,)}, {"reduction": "none"}, [])
    assert wider.memory_elements - cost.memory_elements >= 1000 * INDEX_UNITS


def test_hints_only_tighten() -> None:
    """options["dtype"] and ctc's options["max_target_length"] are facts a
    caller may add; without them the prediction is the looser bound."""
    mse, shapes = LOSSES["mse_loss"], {"input": (1000, 1), "target": (1, 1000)}
    for dtype in ("float32", "float64"):
        assert (
            predict(mse, shapes, {"dtype": dtype}, []).memory_elements
            < predict(mse, shapes, {}, []).memory_elements
        )
    ctc = LOSSES["ctc_loss"]
    concatenated = {
        "log_probs": (1000, 32, 20),
        "targets": (32 * 100,),
        "input_lengths": (32,),
        "target_lengths": (32,),
    }
    told = predict(ctc, concatenated, {"max_target_length": 100}, [])
    padded = predict(ctc, {**concatenated, "targets": (32, 100)}, {}, [])
    unknown = predict(ctc, concatenated, {}, [])
    assert told == padded
    assert unknown.memory_elements > 20 * told.memory_elements


# --------------------------------------------------------------------------- measured


def probe(*args: str) -> list[dict[str, Any]]:
    """tests/memory_probe.py in a fresh process; glibc gives every tensor
    its own mmap, so freeing it shrinks the resident set at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def check(rows: Sequence[dict[str, Any]]) -> list[str]:
    failures = []
    for r in rows:
        slack = OVERHEAD_ELEMENTS * getattr(torch, r["dtype"]).itemsize
        where = f"{r['loss']}/{r['case']} {r['dtype']} {r['reduction']} grad={r['grad']}"
        if r["predicted"] < r["measured"]:
            failures.append(f"{where}: predicted {r['predicted']} < measured {r['measured']}")
        if r["predicted"] > FACTOR * r["measured"] + slack:
            failures.append(f"{where}: predicted {r['predicted']} > {FACTOR} x {r['measured']}")
        if r["unhinted"] < r["predicted"]:
            failures.append(f"{where}: unhinted {r['unhinted']} < {r['predicted']}")
    return failures


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK),
    reason="measures the resident set through Linux's /proc/self/{clear_refs,status}",
)
def test_predictions_bound_the_measured_peak() -> None:
    """Every loss at half a million elements and up: each reduction, without
    and with each gradient, broadcast and weighted, in float32; the losses
    whose CPU mean() copies float16/bfloat16 to float32, in bfloat16 too."""
    rows = probe("--size", str(2**19))
    rows += probe(
        "--size",
        str(2**19),
        "--dtype",
        "bfloat16",
        "--only",
        "mse_loss/broadcast,kl_div/plain,hinge_embedding_loss/plain,"
        "cross_entropy/C2_weight_smoothing,triplet_margin_loss/D256_swap_inf",
    )
    assert {r["loss"] for r in rows} == set(LOSSES)
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    failures = check(rows)
    assert not failures, "\n".join(failures)
