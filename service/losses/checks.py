"""Shape and value checks run before torch sees the tensors.

Torch checks most things itself (its messages become 422s), but some bad
inputs are device-side asserts on CUDA (class index out of range, BCE input
outside [0, 1]) that would poison the CUDA context, and some of its messages
do not name the field. These checks give every such input a 422 that names
the field, the shape or range expected, and what came.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from service.errors import invalid
from service.losses.registry import Tensors


def tensor(tensors: Tensors, name: str) -> torch.Tensor:
    value = tensors[name]
    assert isinstance(value, torch.Tensor)
    return value


def shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def class_dim(input: torch.Tensor, *, unbatched_ok: bool = True, field: str = "input") -> int:
    """The number of classes C of an (N, C, ...) or (C) input."""
    dims = input.dim()
    if dims == 0 or (dims == 1 and not unbatched_ok):
        expected = "(C), (N, C) or (N, C, d1, ...)" if unbatched_ok else "(N, C, ...)"
        raise invalid(field, f"expected shape {expected}, got {shape(input)}")
    return input.shape[0] if dims == 1 else input.shape[1]


def expect_shape(
    field: str, t: torch.Tensor, expected: list[int], words: str, ref: str, ref_t: torch.Tensor
) -> None:
    if shape(t) != expected:
        raise invalid(
            field,
            f"expected shape {expected} {words} for {ref} {shape(ref_t)}, got {shape(t)}",
        )


def class_indices(
    field: str, t: torch.Tensor, num_classes: int, *, allowed: tuple[int, ...] = ()
) -> None:
    """Every index in [0, num_classes), or one of the values torch accepts too."""
    count = t.numel()
    if count == 0:
        return
    # Checks run on the CPU copy, before the move to a device. The common case
    # (all in range) costs no torch op: Python's min/max over a few indices,
    # two vectorised numpy passes over many.
    if count <= 256:
        values = (t if t.dim() == 1 else t.reshape(-1)).tolist()
        low, high = min(values), max(values)
    else:
        array = t.numpy()
        low, high = array.min(), array.max()
    if low >= 0 and high < num_classes:
        return
    bad = (t < 0) | (t >= num_classes)
    for value in allowed:
        bad &= t != value
    if bool(bad.any()):
        first = int(t[bad].reshape(-1)[0].item())
        extra = "" if not allowed else f" (or {', '.join(str(v) for v in allowed)})"
        raise invalid(
            field,
            f"class index {first} out of range: expected values in [0, {num_classes - 1}]{extra}",
        )


def class_weight(tensors: Tensors, num_classes: int) -> None:
    weight = tensors.get("weight")
    if isinstance(weight, torch.Tensor) and shape(weight) != [num_classes]:
        raise invalid(
            "weight",
            f"expected shape [{num_classes}] (C), one weight per class, got {shape(weight)}",
        )


def class_target(tensors: Tensors, options: Mapping[str, Any]) -> None:
    """cross_entropy / nll_loss: input (C), (N, C) or (N, C, d1, ...); target
    class indices shaped like input without C, or (cross_entropy only)
    probabilities shaped like input."""
    input, target = tensor(tensors, "input"), tensor(tensors, "target")
    num_classes = class_dim(input)
    class_weight(tensors, num_classes)
    input_shape = input.shape  # read once: each read builds a torch.Size
    dims = len(input_shape)
    if target.is_floating_point():
        if target.shape != input_shape:
            expected = [] if dims == 1 else [input_shape[0], *input_shape[2:]]
            raise invalid(
                "target",
                f"expected shape {shape(input)} for class probabilities (input's shape; "
                f"class indices would be integers of shape {expected}), got {shape(target)}",
            )
        return
    # the expected shape of class indices, as a tuple (torch.Size compares as
    # one; slicing and adding torch.Sizes builds three of them)
    index_shape = () if dims == 1 else (input_shape[0], *input_shape[2:])
    if target.shape != index_shape and not (dims == 1 and target.shape == (1,)):
        # torch takes [1] for [] here
        words = "(a 0-dim class index)" if dims == 1 else "(N)" if dims == 2 else "(N, d1, ...)"
        expect_shape("target", target, list(index_shape), words, "input", input)
    class_indices("target", target, num_classes, allowed=(options["ignore_index"],))


def same_shape(field: str, ref: str = "input") -> Any:
    def check(tensors: Tensors, options: Mapping[str, Any]) -> None:
        expect_shape(
            field,
            tensor(tensors, field),
            shape(tensor(tensors, ref)),
            "(same as input)",
            ref,
            tensor(tensors, ref),
        )

    return check


def binary_cross_entropy(tensors: Tensors, options: Mapping[str, Any]) -> None:
    same_shape("target")(tensors, options)
    input = tensor(tensors, "input")
    if input.numel() and not bool(((input >= 0) & (input <= 1)).all()):
        raise invalid(
            "input",
            "expected probabilities in [0, 1] (apply sigmoid first, "
            "or use binary_cross_entropy_with_logits)",
        )


def _empty_batch(name: str, input: torch.Tensor, options: Mapping[str, Any]) -> None:
    """torch returns uninitialised memory for these losses over an empty batch
    with a scalar reduction (where other losses give NaN for mean, 0 for sum)."""
    if input.dim() == 2 and input.shape[0] == 0 and options["reduction"] != "none":
        raise invalid(
            "input",
            f"an empty batch (N = 0, input {shape(input)}) with reduction "
            f"{options['reduction']!r}: torch.nn.functional.{name} returns uninitialised "
            "memory for it; send at least one sample, or use reduction 'none'",
        )


def multilabel_margin(tensors: Tensors, options: Mapping[str, Any]) -> None:
    input, target = tensor(tensors, "input"), tensor(tensors, "target")
    if input.dim() not in (1, 2):
        raise invalid("input", f"expected shape (C) or (N, C), got {shape(input)}")
    expect_shape("target", target, shape(input), "(class indices padded with -1)", "input", input)
    class_indices("target", target, input.shape[-1], allowed=(-1,))
    _empty_batch("multilabel_margin_loss", input, options)


def multi_margin(tensors: Tensors, options: Mapping[str, Any]) -> None:
    input, target = tensor(tensors, "input"), tensor(tensors, "target")
    if input.dim() not in (1, 2):
        raise invalid("input", f"expected shape (C) or (N, C), got {shape(input)}")
    num_classes = input.shape[-1]
    class_weight(tensors, num_classes)
    words = "(N)" if input.dim() == 2 else "(a 0-dim class index)"
    if not (input.dim() == 1 and shape(target) == [1]):  # torch takes [1] for [] here
        expect_shape("target", target, shape(input)[:-1], words, "input", input)
    class_indices("target", target, num_classes)
    _empty_batch("multi_margin_loss", input, options)


def ctc(tensors: Tensors, options: Mapping[str, Any]) -> None:
    log_probs = tensor(tensors, "log_probs")
    targets = tensor(tensors, "targets")
    input_lengths = tensor(tensors, "input_lengths")
    target_lengths = tensor(tensors, "target_lengths")
    if log_probs.dim() not in (2, 3):
        raise invalid("log_probs", f"expected shape (T, N, C) or (T, C), got {shape(log_probs)}")
    batched = log_probs.dim() == 3
    length_shape = [log_probs.shape[1]] if batched else []
    words = "(N)" if batched else "(a 0-dim length)"
    expect_shape("input_lengths", input_lengths, length_shape, words, "log_probs", log_probs)
    expect_shape("target_lengths", target_lengths, length_shape, words, "log_probs", log_probs)
    time_steps, num_classes = log_probs.shape[0], log_probs.shape[-1]
    blank = options["blank"]
    if not 0 <= blank < num_classes:
        raise invalid("blank", f"expected a class index in [0, {num_classes - 1}], got {blank}")
    if input_lengths.numel() and bool(((input_lengths < 0) | (input_lengths > time_steps)).any()):
        raise invalid("input_lengths", f"expected lengths in [0, {time_steps}] (T)")
    if target_lengths.numel() and bool((target_lengths < 0).any()):
        raise invalid("target_lengths", "expected non-negative lengths")
    if batched and targets.dim() == 2:
        if targets.shape[0] != log_probs.shape[1]:
            raise invalid(
                "targets",
                f"expected shape (N, S) with N = {log_probs.shape[1]}, got {shape(targets)}",
            )
        if target_lengths.numel() and int(target_lengths.max()) > targets.shape[1]:
            raise invalid("target_lengths", f"expected lengths at most S = {targets.shape[1]}")
    elif targets.dim() == 1:
        total = int(target_lengths.sum()) if target_lengths.numel() else 0
        if batched and targets.shape[0] != total:
            raise invalid(
                "targets",
                f"expected sum(target_lengths) = {total} concatenated targets, "
                f"got {targets.shape[0]}",
            )
        if not batched and total > targets.shape[0]:
            raise invalid("target_lengths", f"expected a length at most S = {targets.shape[0]}")
    else:
        expected = "(N, S) or (sum(target_lengths))" if batched else "(S)"
        raise invalid("targets", f"expected shape {expected}, got {shape(targets)}")
    # torch reads only the first target_lengths[n] targets of each sequence:
    # what pads a row past its length may hold anything
    if targets.dim() == 2:
        used = targets[torch.arange(targets.shape[1]) < target_lengths.reshape(-1, 1)]
    elif not batched:
        used = targets[: int(target_lengths)]
    else:
        used = targets
    class_indices("targets", used, num_classes)


# --------------------------------------------------------------------------- warnings


def target_size_warning(tensors: Tensors, options: Mapping[str, Any]) -> list[str]:
    """l1_loss, mse_loss, smooth_l1_loss, huber_loss: torch's UserWarning when
    target broadcasts against input (a classic bug in the caller's code)."""
    input, target = tensors["input"], tensors["target"]
    assert isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
    if target.size() == input.size():  # the common case: one comparison
        return []
    return [
        f"Using a target size ({target.size()}) that is different to the input size "
        f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
        "Please ensure they have the same size."
    ]


# torch's own text, sentences run together as torch writes them
KL_DIV_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def kl_div_mean_warning(tensors: Tensors, options: Mapping[str, Any]) -> list[str]:
    return [KL_DIV_MEAN_WARNING] if options["reduction"] == "mean" else []
