"""Measure the real peak memory of every loss call against its predicted cost.

Run as a script (tests/test_cost_model.py starts it in a subprocess): it
prints one JSON object per call with the predicted and the measured bytes.

The measurement: glibc is told to serve every allocation over 64 KiB with its
own mmap (``MALLOC_MMAP_THRESHOLD_``, set by the caller), so a freed tensor
leaves the resident set at once and the resident set follows torch's live
tensors page for page. Before each call the kernel's high-water mark is reset
(``/proc/self/clear_refs``); after it, ``VmHWM`` minus the resident size
before the inputs were made is the call's peak, inputs included. Each call
runs once small first, so that lazy initialisation (thread pools, autograd's
engine) is not counted.

Every case is big enough (a few million elements) that the tensors dominate,
and the call is made as ``service.compute.run_loss`` makes it: under
``torch.inference_mode`` without gradients; otherwise with the leaves marked,
``grad_output = ones_like(value)`` and ``torch.autograd.grad``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from service.losses import LOSSES
from service.losses.cost import predict, predicted_bytes

Tensors = dict[str, torch.Tensor | float]


@dataclass
class Big:
    """A case built at any size: ``build(m)`` makes inputs of about m elements."""

    loss: str
    id: str
    build: Callable[[int], Tensors]
    options: dict[str, Any] = field(default_factory=dict)
    reductions: tuple[str, ...] = ("none", "mean")
    # What a caller may tell the prediction beyond shapes and options.
    hints: dict[str, Any] = field(default_factory=dict)


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_g())


def rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=_g())


def ints(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=_g())


def signs(*shape: int) -> torch.Tensor:
    return ints(2, *shape).float() * 2 - 1


MAKERS = {"randn": randn, "rand": rand, "signs": signs, "counts": lambda *s: ints(5, *s).float()}


# --------------------------------------------------------------------------- inputs of ~m elements


def scores(m: int, c: int, *, target: str = "indices", weight: bool = False, k: int = 0) -> Tensors:
    """(N, C) or (N, C, k) class scores, class indices or probabilities."""
    rows = max(m // c // max(k, 1), 1)
    shape = (rows, c, k) if k else (rows, c)
    if target == "indices":
        labels = ints(c, rows, *shape[2:])
    elif target == "multilabel":
        labels = ints(c, *shape)
        labels[:, c // 2] = -1
    elif target == "binary":
        labels = ints(2, *shape).float()
    else:
        labels = torch.softmax(randn(*shape), 1)
    return {"input": randn(*shape), "target": labels, **({"weight": rand(c)} if weight else {})}


def pair(
    m: int,
    input: str = "randn",
    target: str = "randn",
    *,
    crossed: bool = False,
    weight: str | None = None,
    var: str | float | None = None,
) -> Tensors:
    """input and target of m elements, or [sqrt(m), 1] against [1, sqrt(m)];
    a weight or var like the input ("same"), one dimension short ("short"),
    of one column ("column"), or a number."""
    side = math.isqrt(m)
    shapes = ((side, 1), (1, side)) if crossed else ((m // 16, 16), (m // 16, 16))
    out: Tensors = {"input": MAKERS[input](*shapes[0]), "target": MAKERS[target](*shapes[1])}
    extra = {"same": shapes[0], "short": shapes[0][:1], "column": (shapes[0][0], 1)}
    if weight is not None:
        out["weight"] = rand(*extra[weight])
    if isinstance(var, float):
        out["var"] = var
    elif var is not None:
        out["var"] = rand(*extra[var]) + 0.1
    return out


def vectors(m: int, d: int, names: tuple[str, ...], *, crossed: bool = False) -> Tensors:
    """Rows of d-vectors, or [s, 1, d] against [1, s, d] (and [1, 1, d])."""
    if crossed:
        side = math.isqrt(m // d)
        shapes = [(side, 1, d), (1, side, d), (1, 1, d)]
    else:
        shapes = [(m // d, d)] * 3
    out: Tensors = {n: randn(*s) for n, s in zip(names, shapes, strict=False)}
    if "target" in names:
        out["target"] = signs(shapes[0][0])
    return out


def ctc(m: int, t: int, n: int, c: int, s: int, form: str = "padded") -> Tensors:
    """log_probs (T, N, C), T = t at m = 2**21; N targets of length s."""
    time = max(t * m >> 21, 2)
    log_probs = torch.log_softmax(randn(time, n, c), 2)
    if form == "unbatched":
        return {
            "log_probs": log_probs[:, 0],
            "targets": ints(c - 1, s) + 1,
            "input_lengths": torch.tensor(time),
            "target_lengths": torch.tensor(s),
        }
    targets = ints(c - 1, n * s) + 1
    return {
        "log_probs": log_probs,
        "targets": targets if form == "concatenated" else targets.reshape(n, s),
        "input_lengths": torch.full((n,), time),
        "target_lengths": torch.full((n,), s),
    }


TRIPLET = ("anchor", "positive", "negative")
COSINE = ("input1", "input2", "target")


def big_cases() -> list[Big]:
    """Each loss on each path torch takes for it: equal shapes and
    broadcasting, weights, options; many classes (the input dominates) and
    few (the tensors a row long do); long rows and rows of one."""
    ce, nll, kl = "cross_entropy", "nll_loss", "kl_div"
    cases = [
        *(
            Big(ce, f"C{c}_{name}", partial(scores, c=c, **kw), options)
            for c in (2, 512)
            for name, kw, options in [
                ("indices", {}, {}),
                ("weight_smoothing", {"weight": True}, {"label_smoothing": 0.1, "ignore_index": 0}),
                ("smoothing", {}, {"label_smoothing": 0.2}),
                ("probabilities", {"target": "probabilities"}, {}),
                (
                    "probabilities_weight_smoothing",
                    {"target": "probabilities", "weight": True},
                    {"label_smoothing": 0.1},
                ),
            ]
        ),
        Big(ce, "C1_smoothing", partial(scores, c=1), {"label_smoothing": 0.1}),
        Big(ce, "k_dim", partial(scores, c=4, k=16, weight=True), {"label_smoothing": 0.1}),
        Big(
            ce,
            "k_dim_probabilities",
            partial(scores, c=4, k=16, target="probabilities"),
            {"label_smoothing": 0.1},
        ),
        Big(ce, "unbatched", lambda m: {"input": randn(m), "target": torch.tensor(3)}),
        *(Big(nll, f"C{c}_weight", partial(scores, c=c, weight=True)) for c in (1, 2, 512)),
        Big(nll, "k_dim", partial(scores, c=4, k=16)),
        *(
            Big("multi_margin_loss", f"C{c}_p2_weight", partial(scores, c=c, weight=True), {"p": 2})
            for c in (1, 2, 512)
        ),
        *(
            Big("multilabel_margin_loss", f"C{c}", partial(scores, c=c, target="multilabel"))
            for c in (1, 16)
        ),
        *(
            Big(
                "multilabel_soft_margin_loss",
                f"C{c}",
                partial(scores, c=c, target="binary", weight=w),
            )
            for c, w in ((1, True), (16, True), (512, False))
        ),
        *(
            Big(loss, name, partial(pair, **kw), options)
            for loss in ("l1_loss", "mse_loss", "huber_loss", "smooth_l1_loss")
            for name, kw, options in [
                ("plain", {}, {}),
                ("broadcast", {"crossed": True}, {"delta": 0.5} if loss == "huber_loss" else {}),
                *([("weight", {"weight": "same"}, {})] if loss != "smooth_l1_loss" else []),
            ]
        ),
        Big("smooth_l1_loss", "beta0", pair, {"beta": 0.0}),
        Big("soft_margin_loss", "plain", partial(pair, target="signs")),
        Big("hinge_embedding_loss", "plain", partial(pair, target="signs"), {"margin": 0.7}),
        Big("hinge_embedding_loss", "broadcast", partial(pair, target="signs", crossed=True)),
        Big("binary_cross_entropy", "plain", partial(pair, input="rand", target="rand")),
        Big(
            "binary_cross_entropy",
            "weight",
            partial(pair, input="rand", target="rand", weight="column"),
        ),
        Big("binary_cross_entropy_with_logits", "plain", partial(pair, target="rand")),
        Big(
            "binary_cross_entropy_with_logits",
            "weight",
            partial(pair, target="rand", weight="same"),
        ),
        Big(
            "binary_cross_entropy_with_logits",
            "pos_weight",
            lambda m: {**pair(m, target="rand"), "pos_weight": rand(16)},
        ),
        Big(
            kl,
            "plain",
            partial(pair, target="rand"),
            reductions=("none", "batchmean", "sum", "mean"),
        ),
        Big(kl, "log_target", pair, {"log_target": True}),
        Big(kl, "broadcast", partial(pair, target="rand", crossed=True)),
        Big("poisson_nll_loss", "log_input", partial(pair, target="rand")),
        Big(
            "poisson_nll_loss",
            "rates",
            partial(pair, input="rand", target="rand"),
            {"log_input": False},
        ),
        Big(
            "poisson_nll_loss",
            "rates_full",
            partial(pair, input="rand", target="counts"),
            {"log_input": False, "full": True},
        ),
        Big(
            "poisson_nll_loss",
            "full_broadcast",
            partial(pair, target="counts", crossed=True),
            {"full": True},
        ),
        Big("gaussian_nll_loss", "var", partial(pair, var="same")),
        Big("gaussian_nll_loss", "var_number", partial(pair, var=0.7), {"full": True}),
        Big("gaussian_nll_loss", "var_short", partial(pair, var="short")),
        Big("gaussian_nll_loss", "broadcast", partial(pair, crossed=True, var="column")),
        Big(
            "margin_ranking_loss",
            "plain",
            lambda m: {"input1": randn(m), "input2": randn(m), "target": signs(m)},
        ),
        *(
            Big("cosine_embedding_loss", f"D{d}", partial(vectors, d=d, names=COSINE))
            for d in (1, 256)
        ),
        *(
            Big(loss, f"D{d}{name}", partial(vectors, d=d, names=TRIPLET), options)
            for loss, name, options, dims in [
                ("triplet_margin_loss", "", {}, (1, 256)),
                ("triplet_margin_loss", "_swap_p1", {"swap": True, "p": 1.0}, (256,)),
                ("triplet_margin_loss", "_swap_inf", {"swap": True, "p": math.inf}, (1, 256)),
                ("triplet_margin_loss", "_p3", {"p": 3.0}, (256,)),
                ("triplet_margin_with_distance_loss", "_swap", {"swap": True}, (256,)),
                (
                    "triplet_margin_with_distance_loss",
                    "_cosine_swap",
                    {"distance_function": "cosine_distance", "swap": True},
                    (1, 256),
                ),
            ]
            for d in dims
        ),
        Big(
            "cosine_embedding_loss",
            "broadcast",
            lambda m: {
                "input1": randn(math.isqrt(m), 1),
                "input2": randn(1, math.isqrt(m)),
                "target": signs(math.isqrt(m)),
            },
        ),
        Big(
            "triplet_margin_loss", "broadcast", partial(vectors, d=16, names=TRIPLET, crossed=True)
        ),
        Big(
            "ctc_loss",
            "long_targets",
            partial(ctc, t=4096, n=16, c=4, s=64),
            reductions=("none", "mean", "sum"),
        ),
        Big(
            "ctc_loss",
            "concatenated",
            partial(ctc, t=4096, n=16, c=4, s=64, form="concatenated"),
            hints={"max_target_length": 64},
        ),
        Big("ctc_loss", "many_classes", partial(ctc, t=512, n=16, c=256, s=8)),
        Big("ctc_loss", "unbatched", partial(ctc, t=2048, n=1, c=4, s=500, form="unbatched")),
        Big(
            "ctc_loss",
            "zero_infinity",
            partial(ctc, t=1024, n=16, c=8, s=400),
            {"zero_infinity": True},
        ),
    ]
    return cases


def grad_sets(loss: str, tensors: Tensors) -> list[list[str]]:
    """No gradient, the predictions', every differentiable argument's, each alone."""
    spec = LOSSES[loss]
    every = spec.differentiable_args(tensors)
    sets = [[], [n for n in spec.prediction_args if n in every], every]
    if len(every) > 1:
        sets += [[n] for n in every]
    unique: list[list[str]] = []
    for s in sets:
        if s not in unique and (s or not unique):
            unique.append(s)
    return unique


# --------------------------------------------------------------------------- measuring


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert match is not None, field
    return int(match.group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def options_for(loss: str, options: dict[str, Any], reduction: str) -> dict[str, Any]:
    spec = LOSSES[loss]
    return {**{o.name: o.default for o in spec.options}, **options, "reduction": reduction}


def call(loss: str, tensors: Tensors, options: dict[str, Any], grad: list[str]) -> torch.Tensor:
    """One call as service.compute.run_loss makes it; returns the value."""
    spec = LOSSES[loss]
    kwargs = spec.torch_options(options) if spec.torch_options else options
    if not grad:
        with torch.inference_mode():
            return spec.fn(**tensors, **kwargs)
    leaves = []
    for name in grad:
        tensor = tensors[name]
        assert isinstance(tensor, torch.Tensor)
        leaves.append(tensor.requires_grad_(True))
    value = spec.fn(**tensors, **kwargs)
    grads = torch.autograd.grad(value, leaves, grad_outputs=torch.ones_like(value))
    del grads
    return value.detach()


def measure(inputs: Tensors, loss: str, options: dict[str, Any], grad: list[str]) -> int:
    """The peak bytes of one call, its inputs included. The inputs are
    resident already; the call gets aliases of them, fresh autograd leaves."""
    tensors = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}
    held = sum(t.nbytes for t in tensors.values() if isinstance(t, torch.Tensor))
    before = _status("VmRSS")
    _reset_peak()
    value = call(loss, tensors, options, grad)
    peak = _status("VmHWM")
    del value, tensors
    return held + peak - before


def shapes_of(tensors: Tensors) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in tensors.items() if isinstance(t, torch.Tensor)}


def convert(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    return {
        n: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for n, t in tensors.items()
    }


def runs(size: int, dtypes: list[torch.dtype], only: str) -> Iterator[dict[str, Any]]:
    for case in big_cases():
        if only and not f"{case.loss}/{case.id}".startswith(tuple(only.split(","))):
            continue
        small = case.build(4096)
        for dtype in dtypes:
            inputs = convert(case.build(size), dtype)
            shapes = shapes_of(inputs)
            name = str(dtype).removeprefix("torch.")
            for reduction in case.reductions:
                options = options_for(case.loss, case.options, reduction)
                for grad in grad_sets(case.loss, small):
                    try:  # once small: lazy initialisation is not the call's
                        measure(convert(small, dtype), case.loss, options, grad)
                    except (RuntimeError, NotImplementedError) as exc:
                        if "not implemented for" in str(exc):
                            break  # this dtype on the CPU: torch refuses it, a 422
                        raise
                    measured = measure(inputs, case.loss, options, grad)
                    spec = LOSSES[case.loss]
                    hinted = {**options, **case.hints, "dtype": name}
                    predicted = predict(spec, shapes, hinted, grad)
                    unhinted = predict(spec, shapes, options, grad)
                    yield {
                        "loss": case.loss,
                        "case": case.id,
                        "dtype": name,
                        "reduction": reduction,
                        "grad": grad,
                        "shapes": {n: list(s) for n, s in shapes.items()},
                        "predicted": predicted_bytes(predicted, dtype.itemsize),
                        "unhinted": predicted_bytes(unhinted, dtype.itemsize),
                        "measured": measured,
                    }
            del inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 21, help="elements of the main input")
    parser.add_argument("--dtype", action="append", default=[], help="float32 (default), ...")
    parser.add_argument("--only", default="", help="loss/case prefixes, comma-separated")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    dtypes = [getattr(torch, d) for d in args.dtype or ["float32"]]
    for row in runs(args.size, dtypes, args.only):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
