"""The loss table: one ``LossSpec`` per ``torch.nn.functional`` loss.

Routes, request models, the catalog, the OpenAPI examples and the tests are
all generated from ``LOSSES``; adding a loss is one ``register(LossSpec(...))``
in ``service/losses/catalog.py``.

Each spec carries its ``cost`` (``service.losses.cost``): what the call will
hold and do, predicted from the decoded shapes and options before torch runs.
The request limits only count what a client sends, while one small request
can make torch broadcast, unreduce or tabulate billions of elements; the cost
is what the work limit and the memory budget are checked against, so an
out-of-memory is refused up front as a 413 or queued as a 503 instead of
taking the process down. It is required, so that no loss can be registered
without saying what it costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from service.errors import UnknownLoss, did_you_mean, quote
from service.losses.cost import CostFn

ArgRole = Literal["float", "index", "class_target", "float_or_number"]
Tensors = dict[str, torch.Tensor | float]
Validator = Callable[[Tensors, Mapping[str, Any]], None]
# What torch would warn about for these arguments (its exact messages).
Warner = Callable[[Tensors, Mapping[str, Any]], list[str]]

REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


@dataclass(frozen=True)
class TensorArg:
    """One tensor argument of a loss, under its torch name.

    role: ``float`` takes the request's float dtype; ``index`` is int64 class
    indices or lengths; ``class_target`` is cross_entropy's target (indices,
    or class probabilities when shaped like input); ``float_or_number`` is a
    tensor or a plain number passed to torch as a Python float (``var``).
    """

    name: str
    role: ArgRole
    shape: str
    required: bool = True
    differentiable: bool = False
    prediction: bool = False
    description: str = ""


@dataclass(frozen=True)
class Option:
    """A non-tensor argument with torch's default."""

    name: str
    type: type
    default: Any
    description: str
    choices: tuple[Any, ...] | None = None
    ge: float | None = None
    le: float | None = None


@dataclass(frozen=True, eq=False)
class LossSpec:
    name: str
    alias: str
    fn: Callable[..., torch.Tensor]
    args: tuple[TensorArg, ...]
    options: tuple[Option, ...]
    formula: str
    description: str
    example: dict[str, Any]
    cost: CostFn
    reductions: tuple[str, ...] = REDUCTIONS
    validate: Validator | None = None
    # torch's Python warnings for a call, predicted from the checked
    # arguments: catching them as they are raised would need
    # warnings.catch_warnings, which swaps process-wide state and is not
    # thread-safe (calls run in worker threads) before Python 3.14
    torch_warnings: Warner | None = None
    # Arguments that are differentiable only for some inputs (cross_entropy's
    # target and weight, with class-probability targets): the names, and a
    # test on the decoded tensors that says when.
    conditionally_differentiable: tuple[str, ...] = ()
    differentiable_when: Callable[[Tensors], bool] | None = None
    # Options that travel as names on the wire but as objects to torch.
    torch_options: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    option_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "option_names", (*(o.name for o in self.options), "reduction"))

    @property
    def tensor_names(self) -> list[str]:
        return [a.name for a in self.args]

    @property
    def prediction_args(self) -> list[str]:
        return [a.name for a in self.args if a.prediction]

    def arg(self, name: str) -> TensorArg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)

    def differentiable_args(self, tensors: Tensors) -> list[str]:
        """Arguments torch can differentiate for these particular inputs."""
        extra: tuple[str, ...] = ()
        if self.differentiable_when is not None and self.differentiable_when(tensors):
            extra = self.conditionally_differentiable
        return [
            a.name
            for a in self.args
            if (a.differentiable or a.name in extra)
            and isinstance(tensors.get(a.name), torch.Tensor)
        ]

    @property
    def maybe_differentiable(self) -> list[str]:
        """Every argument that can be differentiable for some input (for docs)."""
        return [
            a.name
            for a in self.args
            if a.differentiable or a.name in self.conditionally_differentiable
        ]


LOSSES: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: LossSpec) -> LossSpec:
    for key in (spec.name.lower(), spec.alias.lower()):
        if key in _ALIASES:
            raise ValueError(f"loss name {key!r} registered twice")
        _ALIASES[key] = spec.name
    LOSSES[spec.name] = spec
    return spec


def canonical_name(name: str) -> str | None:
    """The canonical name for a name or alias, None when unknown."""
    return _ALIASES.get(name.lower())


def resolve(name: str) -> LossSpec:
    """A canonical name or a torch.nn class name (any case) -> its spec."""
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        suggestion = did_you_mean(name, [*LOSSES, *(s.alias for s in LOSSES.values())])
        raise UnknownLoss(
            f"unknown loss {quote(name)}{suggestion}; known losses: {', '.join(sorted(LOSSES))} "
            "(torch.nn class names such as CrossEntropyLoss are accepted too)"
        )
    return LOSSES[canonical]
