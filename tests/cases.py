"""Seeded random inputs for every loss in the table, and the helpers that send
them to the service and compute the same call in-process.

Each case is valid input for its loss with some non-default options; the
parity and gradient suites run every case under every reduction.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from service.losses import LOSSES, LossSpec
from tests.device import DEVICE


@dataclass
class Case:
    loss: str
    id: str
    tensors: dict[str, torch.Tensor | float]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.loss]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g)


def _ints(g: torch.Generator, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=g)


def _signs(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def build_cases() -> list[Case]:
    g = _gen(1234)
    n, c = 4, 5
    cases: list[Case] = []
    add = cases.append

    # cross_entropy
    target = _ints(g, c, n)
    add(Case("cross_entropy", "indices", {"input": _randn(g, n, c), "target": target}))
    add(
        Case(
            "cross_entropy",
            "weight",
            {"input": _randn(g, n, c), "target": target, "weight": _rand(g, c) + 0.1},
        )
    )
    ignored = target.clone()
    ignored[1] = 2
    ignored[3] = 2
    add(
        Case(
            "cross_entropy",
            "ignore_index",
            {"input": _randn(g, n, c), "target": ignored, "weight": _rand(g, c)},
            {"ignore_index": 2},
        )
    )
    default_ignored = target.clone()
    default_ignored[0] = -100
    add(
        Case(
            "cross_entropy", "ignore_default", {"input": _randn(g, n, c), "target": default_ignored}
        )
    )
    add(
        Case(
            "cross_entropy",
            "label_smoothing",
            {"input": _randn(g, n, c), "target": target, "weight": _rand(g, c)},
            {"label_smoothing": 0.15},
        )
    )
    add(
        Case(
            "cross_entropy",
            "probabilities",
            {
                "input": _randn(g, n, c),
                "target": torch.softmax(_randn(g, n, c), 1),
                "weight": _rand(g, c),
            },
            {"label_smoothing": 0.1},
        )
    )
    add(
        Case(
            "cross_entropy",
            "k_dim",
            {"input": _randn(g, 2, 3, 4, 5), "target": _ints(g, 3, 2, 4, 5)},
        )
    )
    add(Case("cross_entropy", "unbatched", {"input": _randn(g, c), "target": torch.tensor(3)}))

    # nll_loss
    logp = torch.log_softmax(_randn(g, n, c), 1)
    add(Case("nll_loss", "indices", {"input": logp, "target": target}))
    add(
        Case(
            "nll_loss",
            "weight_ignore",
            {"input": logp, "target": default_ignored, "weight": _rand(g, c)},
        )
    )
    add(Case("nll_loss", "ignore_index", {"input": logp, "target": ignored}, {"ignore_index": 2}))
    add(
        Case(
            "nll_loss",
            "k_dim",
            {"input": torch.log_softmax(_randn(g, 2, 3, 4), 1), "target": _ints(g, 3, 2, 4)},
        )
    )

    # binary cross entropy
    add(
        Case(
            "binary_cross_entropy",
            "plain",
            {"input": torch.sigmoid(_randn(g, n, c)), "target": _rand(g, n, c)},
        )
    )
    add(
        Case(
            "binary_cross_entropy",
            "weight",
            {
                "input": torch.sigmoid(_randn(g, n, c)),
                "target": _rand(g, n, c),
                "weight": _rand(g, c),
            },
        )
    )
    add(
        Case(
            "binary_cross_entropy_with_logits",
            "plain",
            {"input": _randn(g, n, c), "target": _rand(g, n, c)},
        )
    )
    add(
        Case(
            "binary_cross_entropy_with_logits",
            "weights",
            {
                "input": _randn(g, n, c),
                "target": _rand(g, n, c),
                "weight": _rand(g, n, c),
                "pos_weight": _rand(g, c) * 3,
            },
        )
    )

    # kl_div
    add(
        Case(
            "kl_div",
            "probabilities",
            {
                "input": torch.log_softmax(_randn(g, n, c), 1),
                "target": torch.softmax(_randn(g, n, c), 1),
            },
        )
    )
    add(
        Case(
            "kl_div",
            "log_target",
            {
                "input": torch.log_softmax(_randn(g, n, c), 1),
                "target": torch.log_softmax(_randn(g, n, c), 1),
            },
            {"log_target": True},
        )
    )

    # regression losses
    for name in ("l1_loss", "mse_loss", "huber_loss"):
        add(Case(name, "plain", {"input": _randn(g, n, c), "target": _randn(g, n, c)}))
        add(
            Case(
                name,
                "weight",
                {"input": _randn(g, n, c), "target": _randn(g, n, c), "weight": _rand(g, n, c)},
            )
        )
    add(
        Case(
            "huber_loss",
            "delta",
            {"input": _randn(g, n, c), "target": _randn(g, n, c)},
            {"delta": 0.3},
        )
    )
    add(Case("smooth_l1_loss", "plain", {"input": _randn(g, n, c), "target": _randn(g, n, c)}))
    add(
        Case(
            "smooth_l1_loss",
            "beta",
            {"input": _randn(g, n, c), "target": _randn(g, n, c)},
            {"beta": 0.25},
        )
    )

    # margin losses
    add(Case("soft_margin_loss", "plain", {"input": _randn(g, n, c), "target": _signs(g, n, c)}))
    add(
        Case(
            "multilabel_soft_margin_loss",
            "weight",
            {"input": _randn(g, n, c), "target": _ints(g, 2, n, c).float(), "weight": _rand(g, c)},
        )
    )
    add(
        Case(
            "multilabel_soft_margin_loss",
            "plain",
            {"input": _randn(g, n, c), "target": _ints(g, 2, n, c).float()},
        )
    )
    add(
        Case(
            "multilabel_margin_loss",
            "padded",
            {
                "input": _randn(g, n, c),
                "target": torch.tensor(
                    [[3, 0, -1, 1, 2], [1, -1, 0, 0, 0], [4, 3, 2, 1, 0], [-1, 0, 0, 0, 0]]
                ),
            },
        )
    )
    add(Case("multi_margin_loss", "plain", {"input": _randn(g, n, c), "target": target}))
    add(
        Case(
            "multi_margin_loss",
            "p2_weight",
            {"input": _randn(g, n, c), "target": target, "weight": _rand(g, c)},
            {"p": 2, "margin": 0.5},
        )
    )
    add(  # torch takes target [1] for an unbatched (C) input
        Case(
            "multi_margin_loss", "unbatched_target_1", {"input": _randn(g, c), "target": target[:1]}
        )
    )
    add(
        Case(
            "hinge_embedding_loss",
            "margin",
            {"input": _randn(g, n, c).abs(), "target": _signs(g, n, c)},
            {"margin": 0.7},
        )
    )
    add(
        Case(
            "cosine_embedding_loss",
            "margin",
            {"input1": _randn(g, n, c), "input2": _randn(g, n, c), "target": _signs(g, n)},
            {"margin": 0.2},
        )
    )
    add(
        Case(
            "margin_ranking_loss",
            "0-dim",  # 0-dim gradients are bare numbers in the nested encoding
            {
                "input1": torch.tensor(0.3),
                "input2": torch.tensor(-0.2),
                "target": torch.tensor(-1.0),
            },
        )
    )
    add(
        Case(
            "margin_ranking_loss",
            "margin",
            {"input1": _randn(g, n), "input2": _randn(g, n), "target": _signs(g, n)},
            {"margin": 0.1},
        )
    )
    triplet = {"anchor": _randn(g, n, c), "positive": _randn(g, n, c), "negative": _randn(g, n, c)}
    add(Case("triplet_margin_loss", "plain", dict(triplet)))
    add(
        Case(
            "triplet_margin_loss",
            "options",
            dict(triplet),
            {"margin": 0.5, "p": 1.0, "eps": 1e-5, "swap": True},
        )
    )
    add(Case("triplet_margin_with_distance_loss", "default", dict(triplet)))
    add(
        Case(
            "triplet_margin_with_distance_loss",
            "pairwise",
            dict(triplet),
            {"distance_function": "pairwise_distance", "margin": 2.0},
        )
    )
    add(
        Case(
            "triplet_margin_with_distance_loss",
            "cosine_swap",
            dict(triplet),
            {"distance_function": "cosine_distance", "swap": True, "margin": 0.3},
        )
    )

    # likelihoods
    add(
        Case(
            "poisson_nll_loss",
            "log_input",
            {"input": _randn(g, n, c), "target": _ints(g, 5, n, c).float()},
        )
    )
    add(
        Case(
            "poisson_nll_loss",
            "rates_full",
            {"input": _rand(g, n, c) * 3, "target": _ints(g, 5, n, c).float()},
            {"log_input": False, "full": True, "eps": 1e-6},
        )
    )
    add(
        Case(
            "gaussian_nll_loss",
            "var_tensor",
            {"input": _randn(g, n, c), "target": _randn(g, n, c), "var": _rand(g, n, c) + 0.1},
        )
    )
    add(
        Case(
            "gaussian_nll_loss",
            "var_number_full",
            {"input": _randn(g, n, c), "target": _randn(g, n, c), "var": 0.7},
            {"full": True, "eps": 1e-4},
        )
    )
    add(
        Case(
            "gaussian_nll_loss",
            "var_last_dim_1",
            {"input": _randn(g, n, c), "target": _randn(g, n, c), "var": _rand(g, n, 1) + 0.1},
        )
    )

    # ctc
    t, s = 12, 4
    log_probs = torch.log_softmax(_randn(g, t, n, c), 2)
    lengths = torch.tensor([4, 2, 3, 1])
    padded = torch.randint(1, c, (n, s), generator=g)
    add(
        Case(
            "ctc_loss",
            "padded",
            {
                "log_probs": log_probs,
                "targets": padded,
                "input_lengths": torch.tensor([12, 10, 11, 8]),
                "target_lengths": lengths,
            },
        )
    )
    add(
        Case(
            "ctc_loss",
            "padded_past_lengths",  # torch reads no target past its length: any padding
            {
                "log_probs": log_probs,
                "targets": torch.where(torch.arange(s) < lengths.reshape(-1, 1), padded, -1),
                "input_lengths": torch.tensor([12, 10, 11, 8]),
                "target_lengths": lengths,
            },
        )
    )
    concatenated = torch.randint(1, c, (int(lengths.sum()),), generator=g)
    add(
        Case(
            "ctc_loss",
            "concatenated",
            {
                "log_probs": log_probs,
                "targets": concatenated,
                "input_lengths": torch.tensor([12, 12, 12, 12]),
                "target_lengths": lengths,
            },
        )
    )
    impossible = torch.full((n, s), 1)
    add(
        Case(
            "ctc_loss",
            "zero_infinity_blank",
            {
                "log_probs": log_probs,
                "targets": impossible + 1,
                "input_lengths": torch.tensor([2, 12, 12, 12]),
                "target_lengths": lengths,
            },
            {"zero_infinity": True, "blank": 1},
        )
    )
    return cases


CASES = build_cases()
SPECS_WITH_CASES = {c.loss for c in CASES}


# --------------------------------------------------------------------------- in-process


def _cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(x, y)


def torch_kwargs(case: Case, reduction: str) -> dict[str, Any]:
    options = dict(case.options)
    if "distance_function" in options:
        options["distance_function"] = {
            "pairwise_distance": F.pairwise_distance,
            "cosine_distance": _cosine_distance,
        }[options["distance_function"]]
    return {**options, "reduction": reduction}


def torch_call(
    case: Case, reduction: str, tensors: dict[str, torch.Tensor | float] | None = None
) -> torch.Tensor:
    fn: Callable[..., torch.Tensor] = getattr(F, case.loss)
    return fn(**(tensors if tensors is not None else case.tensors), **torch_kwargs(case, reduction))


# --------------------------------------------------------------------------- wire


def encode(t: torch.Tensor | float, form: str) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    if form == "nested":
        return _strings(t.tolist())
    dtype = str(t.dtype).removeprefix("torch.")
    if form == "flat":
        return {"shape": list(t.shape), "dtype": dtype, "data": _strings(t.reshape(-1).tolist())}
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"shape": list(t.shape), "dtype": dtype, "b64": base64.b64encode(raw).decode()}


def _strings(data: Any) -> Any:
    """Non-finite floats as the JSON strings of the contract."""
    if isinstance(data, list):
        return [_strings(x) for x in data]
    if isinstance(data, float) and not math.isfinite(data):
        return "NaN" if math.isnan(data) else ("Infinity" if data > 0 else "-Infinity")
    return data


def request_body(case: Case, reduction: str, form: str = "nested", **extra: Any) -> dict[str, Any]:
    body = {name: encode(t, form) for name, t in case.tensors.items()}
    return {**body, **case.options, "reduction": reduction, **extra}


def _numbers(data: Any) -> Any:
    if isinstance(data, list):
        return [_numbers(x) for x in data]
    if isinstance(data, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[data]
    return data


def decode(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A response tensor (any encoding) -> torch.Tensor."""
    if isinstance(value, dict):
        shape = value["shape"]
        if "b64" in value:
            raw = bytearray(base64.b64decode(value["b64"]))
            if not raw:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(raw, dtype=dtype).reshape(shape)
        return torch.tensor(_numbers(value["data"]), dtype=dtype).reshape(shape)
    return torch.tensor(_numbers(value), dtype=dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality on CPU (NaN equals NaN); on CUDA, where kernels may
    reduce in a different order from call to call, torch's default tolerances."""
    expected = expected.detach()
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if DEVICE == "cpu":
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(actual, expected, equal_nan=True)
