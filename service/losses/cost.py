"""What one loss call will cost, predicted from its shapes and options alone
(contract section 9).

The request limits count what a request sends; a loss can hold far more:
broadcasting (``mse_loss`` input [N, 1] with target [1, N] makes N * N
elements), the unreduced loss, autograd's saved tensors and the gradients,
CTC's alignment tables. The service checks the prediction against
``LOSS_SERVICE_MAX_WORK_ELEMENTS`` and reserves its bytes from the memory
budget before torch runs, so every prediction is an upper bound of what torch
really holds, and stays within a small factor of it so that honest requests
are not refused.

Units: every count is in elements of the request's float dtype, an int64
element (class indices, lengths) counting ``INDEX_UNITS`` = 4, its 8 bytes
over the smallest float itemsize (2), and a bool mask counting 1. So
``predicted_bytes(cost, itemsize)``, ``memory_elements * itemsize``, bounds
the bytes for every float dtype: exact for float16/bfloat16, generous for
int64 indices next to float32/float64.

Two facts beyond shapes and options make a prediction tighter when the caller
has them, and are never needed for it to be a bound: ``options["dtype"]``,
the request's float dtype by its wire name (CPU float16/bfloat16 ``mean``
copies its input to float32; float32/float64 do not), and, for ctc_loss with
concatenated targets, ``options["max_target_length"]``.

The coefficients were measured, not guessed: tests/memory_probe.py runs every
loss at a million elements and more (each reduction, without and with each
gradient, broadcasting, each option that changes torch's path, every float
dtype) and tests/test_cost_model.py checks each prediction against the real
peak memory of the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from service.losses.registry import LossSpec

Shapes = Mapping[str, tuple[int, ...]]
Options = Mapping[str, Any]

# An int64 element in units of the smallest float dtype (8 bytes / 2 bytes).
INDEX_UNITS = 4
# What a call holds besides its tensors' data: tensor and autograd objects,
# TensorIterator state, the interpreter's small allocations. Measured at up to
# a few hundred KiB; 2**18 elements cover it at every itemsize.
OVERHEAD_ELEMENTS = 1 << 18
# Float dtypes whose mean() makes no float32 copy of its input.
EXACT_MEAN = frozenset({"float32", "float64"})
# Counts saturate here: past it every limit is exceeded anyway, and an int64
# stays printable in logs, metrics and JSON (orjson refuses bigger ints).
SATURATED = 2**63 - 1


@dataclass(frozen=True)
class Cost:
    """The predicted cost of one call, in elements of its float dtype
    (an int64 element counts ``INDEX_UNITS``).

    memory_elements: the peak held at once: the inputs, the broadcast and
    elementwise intermediates, the output, autograd's saved tensors and the
    gradients, the loss's own tables (CTC's alpha and beta).
    work_elements: what is checked against ``MAX_WORK_ELEMENTS``: the memory,
    or more where a loss spends time on elements it never holds (the N * C * C
    pairs of multilabel_margin_loss, CTC's alpha and beta recursions), plus
    the elements of the output and gradients that the response encodes.
    value_elements: the number of elements of the loss output.
    """

    memory_elements: int
    work_elements: int
    value_elements: int


CostFn = Callable[[Shapes, Options, Sequence[str]], Cost]


def predict(spec: LossSpec, shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
    """The cost of ``spec`` on tensors of these shapes (a plain-number
    argument absent) with these options (``reduction`` included),
    differentiating the ``grad`` arguments (none: no gradient)."""
    return spec.cost({n: tuple(s) for n, s in shapes.items()}, options, grad)


def predicted_bytes(cost: Cost, itemsize: int) -> int:
    """The bytes a call may hold at once, for a float dtype of ``itemsize``."""
    return cost.memory_elements * itemsize


def total(
    memory: int, rows: int, shapes: Shapes, options: Options, grad: Sequence[str], work: int = 0
) -> Cost:
    """The cost of a call that holds ``memory`` elements (its inputs included)
    and whose unreduced loss has ``rows`` elements; ``work``: the steps of a
    loss that go beyond what it holds."""
    if options.get("reduction", "mean") == "mean" and options.get("dtype") not in EXACT_MEAN:
        # On the CPU, mean() of float16/bfloat16 first copies its input to float32.
        memory += 2 * rows
    memory += OVERHEAD_ELEMENTS
    value = 1 if scalar_reduction(options) else rows
    # Each element of the output and the gradients is encoded once more, after
    # the computation, for the response.
    encoded = value + sum(numel(shapes[n]) for n in grad if n in shapes)
    return Cost(
        memory_elements=min(memory, SATURATED),
        work_elements=min(max(memory, work) + encoded, SATURATED),
        value_elements=min(value, SATURATED),
    )


def scalar_reduction(options: Options) -> bool:
    return bool(options.get("reduction", "mean") != "none")


# --------------------------------------------------------------------------- shapes


def numel(shape: Sequence[int]) -> int:
    """Exact, in Python ints: [2**62, 2**62] neither wraps nor allocates."""
    return math.prod(shape)


def broadcast(*shapes: Sequence[int]) -> tuple[int, ...] | None:
    """``torch.broadcast_shapes`` in pure Python; None where torch refuses."""
    if shapes and all(s == shapes[0] for s in shapes):
        return tuple(shapes[0])
    ndim = max((len(s) for s in shapes), default=0)
    result: list[int] = []
    for i in range(1, ndim + 1):
        sizes = {s[-i] for s in shapes if len(s) >= i} - {1}
        if len(sizes) > 1:
            return None
        result.append(sizes.pop() if sizes else 1)
    return tuple(reversed(result))


class Extent(NamedTuple):
    """shape: the elementwise result (every operand broadcast; where they do
    not broadcast, the largest that some of them do). largest: the most
    elements any one step can make: the result, an operand alone, or the
    broadcast of some of them (a loss refused at its third operand has made
    the first two's by then)."""

    shape: tuple[int, ...]
    largest: int


def extent(shapes: Iterable[Sequence[int]]) -> Extent:
    operands = list(shapes)
    everything = broadcast(*operands)
    if everything is not None and (size := numel(everything)):
        # No part can be bigger than a nonempty whole.
        return Extent(everything, size)
    shape, largest = everything, 0
    for k in range(1, len(operands) + 1):
        for group in combinations(operands, k):
            made = broadcast(*group)
            if made is not None and numel(made) >= largest:
                largest = numel(made)
                shape = made if everything is None else everything
    return Extent(shape or (), largest)


def without(shape: Sequence[int], dim: int) -> tuple[int, ...]:
    """``shape`` with dimension ``dim`` (negative counts from the end) reduced away."""
    if not shape:
        return ()
    dim %= len(shape)
    return (*shape[:dim], *shape[dim + 1 :])


def held(shapes: Shapes, index: Iterable[str] = ()) -> int:
    """The inputs themselves, each int64 element counting ``INDEX_UNITS``."""
    indices = set(index)
    return sum(numel(s) * (INDEX_UNITS if n in indices else 1) for n, s in shapes.items())


# --------------------------------------------------------------------------- footprints

Coefficient = int | tuple[int, int]


def _pair(c: Coefficient) -> tuple[int, int]:
    return (c, 0) if isinstance(c, int) else c


@dataclass(frozen=True)
class Temps:
    """What a call holds beyond its inputs at its peak, in multiples of its
    main size M (the broadcast operands, or the input) and, given a pair
    ``(a, b)``, of its rows R (one loss per sample): a * M + b * R.

    forward: without gradients, any reduction.
    backward: one gradient, reduction ``none`` (the output and its
    grad_output included).
    backward_reduced: one gradient, a scalar reduction.
    per_grad: each further gradient.

    Whole multiples, each rounded up from a measurement: the fraction left
    over covers the bool masks and the dtype-dependent scraps.
    """

    forward: Coefficient
    backward: Coefficient
    backward_reduced: Coefficient
    per_grad: Coefficient = 1

    def elements(self, main: int, rows: int, options: Options, grads: int) -> int:
        if not grads:
            a, b = _pair(self.forward)
        else:
            a, b = _pair(self.backward_reduced if scalar_reduction(options) else self.backward)
            more_a, more_b = _pair(self.per_grad)
            a, b = a + more_a * (grads - 1), b + more_b * (grads - 1)
        return a * main + b * rows


TempsFor = Callable[[Shapes, Options], Temps]


def when(test: Callable[[Shapes, Options], bool], then: Temps, otherwise: Temps) -> TempsFor:
    """``then`` for the arguments on which torch takes another path."""

    def choose(shapes: Shapes, options: Options) -> Temps:
        return then if test(shapes, options) else otherwise

    return choose


def weighted(plain: Temps, with_weight: Temps) -> TempsFor:
    """A loss that torch computes step by step in Python once given a weight."""
    return when(lambda shapes, options: "weight" in shapes, with_weight, plain)


def _temps(temps: Temps | TempsFor, shapes: Shapes, options: Options) -> Temps:
    return temps if isinstance(temps, Temps) else temps(shapes, options)


def elementwise(
    *operands: str,
    temps: Temps | TempsFor,
    summed: Callable[[Shapes], int] | None = None,
) -> CostFn:
    """A loss computed elementwise on the broadcast of ``operands``; each
    element is a row of the output, or with ``summed`` the dimension of the
    broadcast shape that each row sums (multilabel_soft_margin_loss's classes).
    """

    def cost(shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
        shape, largest = extent(shapes[n] for n in operands if n in shapes)
        rows = numel(without(shape, summed(shapes)) if summed else shape)
        extra = _temps(temps, shapes, options).elements(largest, rows, options, len(grad))
        return total(held(shapes) + extra, rows, shapes, options, grad)

    return cost


def classes(temps: Temps | TempsFor, *, probabilities: bool = False, pairs: bool = False) -> CostFn:
    """A loss on class scores, input (C), (N, C) or (N, C, d1, ...), and int64
    class indices: M is the input, R the input without its class dimension.

    probabilities: a target shaped like the input is class probabilities.
    pairs: the loss compares each target class with every class, N * C * C
    steps that hold nothing.
    """

    def cost(shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
        shape = shapes["input"]
        dim = 1 if len(shape) >= 2 else 0
        main, rows = numel(shape), numel(without(shape, dim))
        extra = _temps(temps, shapes, options).elements(main, rows, options, len(grad))
        indices = () if probabilities and shapes.get("target") == shape else ("target",)
        work = main * shape[dim] if pairs and shape else 0
        return total(held(shapes, indices) + extra, rows, shapes, options, grad, work)

    return cost


# --------------------------------------------------------------------------- losses
#
# The elementwise losses state their temporaries in the catalog; the losses
# below need more than a broadcast shape to say theirs. Each number is the
# measured peak over the inputs, rounded up; the comments say where torch
# (torch/nn/functional.py, ATen's Loss*.cpp) makes the elements.


def _cross_entropy_temps(shapes: Shapes, options: Options) -> Temps:
    probabilities = shapes.get("target") == shapes["input"]
    weighted = "weight" in shapes
    smoothing = float(options.get("label_smoothing") or 0.0) > 0.0
    if probabilities:
        # log_softmax, then -(log_softmax * target [* weight]) summed per row;
        # smoothing mixes a uniform target in first.
        size = 2 + weighted + smoothing
        return Temps(
            forward=(size, 2),
            backward=(max(size, 3), 3),
            backward_reduced=(max(size, 3), 0),
            per_grad=(1, 1),
        )
    if smoothing:
        # nll_loss, and the smoothing term: -log_softmax [* weight] summed per
        # row, masked where the target is ignore_index, reduced.
        return Temps(forward=(1 + weighted, 8), backward=(3, 4), backward_reduced=(3, 6))
    # log_softmax, saved for the backward, then nll_loss on it.
    return Temps(forward=(1, 1), backward=(3, 2), backward_reduced=(3, 0))


cross_entropy = classes(_cross_entropy_temps, probabilities=True)

# The loss per row and the total weight; the backward zeroes a gradient like
# the input and scatters into it.
nll_loss = classes(Temps(forward=(0, 1), backward=(1, 2), backward_reduced=(1, 0)))
multi_margin_loss = classes(Temps(forward=(0, 1), backward=(1, 2), backward_reduced=(1, 0)))
# is_target, a float mask like the input, is saved for the backward.
multilabel_margin_loss = classes(
    Temps(forward=(1, 1), backward=(2, 2), backward_reduced=(2, 0)), pairs=True
)


def ctc_loss(shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
    """The forward fills log_alpha, (N, T, 2S + 1) for the longest target S;
    the backward fills log_beta, as big, and a gradient like log_probs.

    From shapes alone S is the padded width or, for concatenated targets, all
    of them (one target may hold them all), N times too many when the targets
    are equally long: a caller that has read target_lengths can say
    ``options["max_target_length"]``.
    """
    log_probs, targets = shapes["log_probs"], shapes["targets"]
    batched = len(log_probs) == 3
    time = log_probs[0] if log_probs else 0
    batch = log_probs[1] if batched else 1
    longest = targets[1] if batched and len(targets) == 2 else numel(targets)
    if options.get("max_target_length") is not None:
        longest = min(longest, int(options["max_target_length"]))
    table = batch * time * (2 * longest + 1)
    # Per item: lengths, offsets, the losses and their reduction.
    scraps = 8 * batch
    extra = 2 * table + 2 * numel(log_probs) + scraps if grad else table + scraps
    inputs = held(shapes, ("targets", "input_lengths", "target_lengths"))
    losses = batch if batched else 1
    return total(inputs + extra, losses, shapes, options, grad, work=table * (1 + bool(grad)))


def cosine_embedding_loss(shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
    """input1 * input2 and each input squared, summed per row, then a dozen
    tensors a row long (norms, cosines, the two masked branches)."""
    shape, largest = extent([shapes["input1"], shapes["input2"]])
    target = shapes["target"]
    # The products are summed over dimension target.dim(), then broadcast
    # against the target.
    losses = broadcast(without(shape, len(target)), target)
    rows = numel(losses) if losses is not None else max(numel(target), numel(shape[:-1]))
    temps = Temps(forward=(1, 10), backward=(3, 11), backward_reduced=(3, 11), per_grad=(1, 0))
    extra = temps.elements(largest, rows, options, len(grad))
    return total(held(shapes) + extra, rows, shapes, options, grad)


def triplet_margin_loss(shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
    """Two p-norm distances (three with swap), each of a difference as big as
    the broadcast inputs; a p other than 1 or 2 saves more for the backward."""
    distances = 3 if options.get("swap") else 2
    heavy = 4 if float(options.get("p", 2.0)) not in (1.0, 2.0) else 0
    temps = Temps(
        forward=(2, 1 + distances),
        backward=(3 + distances + heavy, 3 * distances + heavy),
        backward_reduced=(3 + distances + heavy, 3 * distances + heavy),
        per_grad=0,
    )
    return _triplet(shapes, options, grad, temps, distances)


def triplet_margin_with_distance_loss(
    shapes: Shapes, options: Options, grad: Sequence[str]
) -> Cost:
    """As triplet_margin_loss with p = 2, or with 1 - cosine_similarity: its
    products and norms, a row long, and their gradients."""
    if options.get("distance_function") != "cosine_distance":
        return triplet_margin_loss(shapes, {**options, "p": 2.0}, grad)
    distances = 3 if options.get("swap") else 2
    temps = Temps(
        forward=(3, 2 + distances),
        backward=(2 * distances + 4, 6 * distances),
        backward_reduced=(2 * distances + 4, 6 * distances),
        per_grad=0,
    )
    return _triplet(shapes, options, grad, temps, distances)


def _triplet(
    shapes: Shapes, options: Options, grad: Sequence[str], temps: Temps, distances: int
) -> Cost:
    shape, largest = extent(shapes[n] for n in ("anchor", "positive", "negative"))
    rows = numel(without(shape, -1))
    extra = temps.elements(largest, rows, options, len(grad))
    return total(held(shapes) + extra, rows, shapes, options, grad, work=largest * distances)


_gaussian = elementwise(
    "input",
    "target",
    "var",
    # var.clone() (clamped), log(var), (input - target) ** 2 / var, their sum
    # and half of it; the backward keeps the squares and the quotients, and
    # var's gradient takes the most.
    temps=Temps(forward=4, backward=9, backward_reduced=7),
)


def gaussian_nll_loss(shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
    """torch unsqueezes a var one dimension short of the input before it
    broadcasts; a plain-number var becomes var * ones_like(input)."""
    var, input = shapes.get("var"), shapes["input"]
    if var is not None and var != input and var == input[:-1]:
        shapes = {**shapes, "var": (*var, 1)}
    return _gaussian(shapes, options, grad)


def poisson_nll_loss(shapes: Shapes, options: Options, grad: Sequence[str]) -> Cost:
    """exp(input) - target * input (input - target * log(input + eps) for
    rates); ``full`` adds Stirling's term: five tensors like the target."""
    shape, largest = extent([shapes["input"], shapes["target"]])
    extra = Temps(forward=4, backward=6, backward_reduced=5).elements(
        largest, 0, options, len(grad)
    )
    if options.get("full"):
        extra += numel(shapes["target"]) * (4 if grad else 5)
    return total(held(shapes) + extra, numel(shape), shapes, options, grad)
