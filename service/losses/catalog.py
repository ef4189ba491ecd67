"""Every loss of ``torch.nn.functional``, one ``register`` call each.

Descriptions point at the torch docs rather than copying them; the formula is
the per-element loss before ``reduction`` (``mean`` averages it, ``sum`` adds
it up, ``none`` returns it as is).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from service.losses import checks
from service.losses import cost as costs
from service.losses.cost import Temps, elementwise, weighted, when
from service.losses.registry import LossSpec, Option, TensorArg, register

DOCS = "https://pytorch.org/docs/stable/generated/torch.nn.functional.{}.html"


def _doc(name: str, text: str) -> str:
    return f"{text} Same as `torch.nn.functional.{name}` ({DOCS.format(name)})."


def _pred(name: str = "input", shape: str = "(N, *) or (*)", **kw: Any) -> TensorArg:
    return TensorArg(name, "float", shape, differentiable=True, prediction=True, **kw)


def _float(
    name: str, shape: str, *, required: bool = True, grad: bool = True, **kw: Any
) -> TensorArg:
    return TensorArg(name, "float", shape, required=required, differentiable=grad, **kw)


def _class_weight(grad: bool = False) -> TensorArg:
    return TensorArg(
        "weight",
        "float",
        "(C)",
        required=False,
        differentiable=grad,
        description="a manual rescaling weight for each class",
    )


def _elementwise_weight() -> TensorArg:
    return TensorArg(
        "weight",
        "float",
        "same as input (not broadcast)",
        required=False,
        differentiable=True,
        description="a weight for each element of the loss",
    )


IGNORE_INDEX = Option(
    "ignore_index",
    int,
    -100,
    "a target value that is ignored and does not contribute to the input gradient",
)
MARGIN0 = Option("margin", float, 0.0, "the margin")
MARGIN1 = Option("margin", float, 1.0, "the margin")

LOG_THIRD = math.log(1 / 3)

register(
    LossSpec(
        name="cross_entropy",
        alias="CrossEntropyLoss",
        fn=F.cross_entropy,
        args=(
            _pred(shape="(C), (N, C) or (N, C, d1, ..., dK): unnormalized logits"),
            TensorArg(
                "target",
                "class_target",
                "class indices shaped like input without C: () , (N) or (N, d1, ..., dK); "
                "or class probabilities shaped like input",
                description="int64 class indices in [0, C) (or ignore_index), or probabilities",
            ),
            _class_weight(),
        ),
        options=(
            IGNORE_INDEX,
            Option(
                "label_smoothing", float, 0.0, "amount of smoothing in [0.0, 1.0]", ge=0.0, le=1.0
            ),
        ),
        formula="l_n = -w_{y_n} log(softmax(x_n)_{y_n}); with probabilities p: "
        "l_n = -sum_c w_c p_{n,c} log(softmax(x_n)_c)",
        description=_doc("cross_entropy", "Cross entropy between logits and class targets."),
        example={"input": [[2, 1], [1, 2]], "target": [1, 0]},
        validate=checks.class_target,
        conditionally_differentiable=("target", "weight"),
        differentiable_when=lambda t: (
            isinstance(t.get("target"), torch.Tensor)
            and checks.tensor(t, "target").is_floating_point()
        ),
        cost=costs.cross_entropy,
    )
)

register(
    LossSpec(
        name="nll_loss",
        alias="NLLLoss",
        fn=F.nll_loss,
        args=(
            _pred(shape="(C), (N, C) or (N, C, d1, ..., dK): log-probabilities"),
            TensorArg("target", "index", "(), (N) or (N, d1, ..., dK): class indices in [0, C)"),
            _class_weight(),
        ),
        options=(IGNORE_INDEX,),
        formula="l_n = -w_{y_n} x_{n, y_n}",
        description=_doc("nll_loss", "Negative log likelihood of log-probabilities."),
        example={"input": [[3, 1], [2, 4]], "target": [0, 1]},
        validate=checks.class_target,
        cost=costs.nll_loss,
    )
)

register(
    LossSpec(
        name="binary_cross_entropy",
        alias="BCELoss",
        fn=F.binary_cross_entropy,
        args=(
            _pred(shape="(*): probabilities in [0, 1]"),
            _float("target", "same as input: targets in [0, 1]"),
            TensorArg(
                "weight",
                "float",
                "broadcastable to input",
                required=False,
                description="a weight for each element",
            ),
        ),
        options=(),
        formula="l_n = -w_n [y_n log x_n + (1 - y_n) log(1 - x_n)]",
        description=_doc(
            "binary_cross_entropy", "Binary cross entropy between probabilities and targets."
        ),
        example={"input": [0.4, 0.1], "target": [0.2, 0.8]},
        validate=checks.binary_cross_entropy,
        cost=elementwise("input", "target", "weight", temps=Temps(1, 3, 2)),
    )
)

register(
    LossSpec(
        name="binary_cross_entropy_with_logits",
        alias="BCEWithLogitsLoss",
        fn=F.binary_cross_entropy_with_logits,
        args=(
            _pred(shape="(*): logits"),
            _float("target", "same as input: targets in [0, 1]"),
            TensorArg(
                "weight",
                "float",
                "broadcastable to input",
                required=False,
                description="a weight for each element",
            ),
            TensorArg(
                "pos_weight",
                "float",
                "broadcastable to input along its last dimension (C)",
                required=False,
                description="a weight of positive examples, per class",
            ),
        ),
        options=(),
        formula="l_n = -w_n [p y_n log sigmoid(x_n) + (1 - y_n) log(1 - sigmoid(x_n))]",
        description=_doc(
            "binary_cross_entropy_with_logits",
            "Sigmoid and binary cross entropy in one numerically stable step.",
        ),
        example={"input": [0.4, 0.1], "target": [0.2, 0.8]},
        validate=checks.same_shape("target"),
        cost=elementwise(
            "input",
            "target",
            "weight",
            "pos_weight",
            temps=when(
                lambda shapes, options: "weight" in shapes or "pos_weight" in shapes,
                Temps(2, 6, 4, per_grad=2),
                Temps(2, 4, 3, per_grad=2),
            ),
        ),
    )
)

register(
    LossSpec(
        name="kl_div",
        alias="KLDivLoss",
        fn=F.kl_div,
        args=(
            _pred(shape="(*): log-probabilities"),
            _float("target", "same as input: probabilities (log-probabilities with log_target)"),
        ),
        options=(Option("log_target", bool, False, "whether target is given in log space"),),
        reductions=("none", "batchmean", "sum", "mean"),
        formula="l = y (log y - x); with log_target: l = exp(y) (y - x)",
        description=_doc(
            "kl_div",
            "Kullback-Leibler divergence. `batchmean` divides the sum by "
            "the batch size (the mathematically correct KL); `mean` divides by the "
            "number of elements, as torch does.",
        ),
        example={
            "input": [math.log(0.5), math.log(0.2), math.log(0.3)],
            "target": [0.1, 0.2, 0.7],
            "reduction": "sum",
        },
        torch_warnings=checks.kl_div_mean_warning,
        cost=elementwise("input", "target", temps=Temps(3, 8, 6)),
    )
)

register(
    LossSpec(
        name="l1_loss",
        alias="L1Loss",
        fn=F.l1_loss,
        args=(_pred(shape="(*)"), _float("target", "same as input"), _elementwise_weight()),
        options=(),
        formula="l_n = w_n |x_n - y_n|",
        description=_doc("l1_loss", "Mean absolute error."),
        example={"input": [[3, 1], [1, 0]], "target": [[1, 0], [1, 0]]},
        torch_warnings=checks.target_size_warning,
        cost=elementwise(
            "input", "target", "weight", temps=weighted(Temps(2, 5, 4), Temps(2, 6, 4))
        ),
    )
)

register(
    LossSpec(
        name="mse_loss",
        alias="MSELoss",
        fn=F.mse_loss,
        args=(_pred(shape="(*)"), _float("target", "same as input"), _elementwise_weight()),
        options=(),
        formula="l_n = w_n (x_n - y_n)^2",
        description=_doc("mse_loss", "Mean squared error."),
        example={"input": [[3, 1], [1, 0]], "target": [[1, 0], [1, 0]]},
        torch_warnings=checks.target_size_warning,
        cost=elementwise(
            "input", "target", "weight", temps=weighted(Temps(1, 3, 1), Temps(2, 7, 5))
        ),
    )
)

register(
    LossSpec(
        name="smooth_l1_loss",
        alias="SmoothL1Loss",
        fn=F.smooth_l1_loss,
        args=(_pred(shape="(*)"), _float("target", "same as input")),
        options=(Option("beta", float, 1.0, "where the loss changes from L2 to L1", ge=0.0),),
        formula="l_n = 0.5 (x_n - y_n)^2 / beta if |x_n - y_n| < beta else |x_n - y_n| - 0.5 beta",
        description=_doc("smooth_l1_loss", "L1 loss with a quadratic zone around zero."),
        example={"input": [0.5, 2.0, -1.0], "target": [0, 0, 0]},
        torch_warnings=checks.target_size_warning,
        cost=elementwise(
            "input",
            "target",
            temps=when(
                lambda shapes, options: options.get("beta", 1.0) == 0.0,
                Temps(2, 5, 4),  # l1_loss
                Temps(1, 3, 1),
            ),
        ),
    )
)

register(
    LossSpec(
        name="huber_loss",
        alias="HuberLoss",
        fn=F.huber_loss,
        args=(_pred(shape="(*)"), _float("target", "same as input"), _elementwise_weight()),
        options=(Option("delta", float, 1.0, "where the loss changes from L2 to L1", ge=0.0),),
        formula="l_n = 0.5 (x_n - y_n)^2 if |x_n - y_n| < delta "
        "else delta (|x_n - y_n| - 0.5 delta)",
        description=_doc("huber_loss", "Huber loss."),
        example={"input": [0.5, 2.0, -1.0], "target": [0, 0, 0], "delta": 0.5},
        torch_warnings=checks.target_size_warning,
        cost=elementwise(
            "input", "target", "weight", temps=weighted(Temps(1, 3, 1), Temps(2, 4, 3))
        ),
    )
)

register(
    LossSpec(
        name="soft_margin_loss",
        alias="SoftMarginLoss",
        fn=F.soft_margin_loss,
        args=(_pred(shape="(*)"), _float("target", "same as input: labels 1 or -1", grad=False)),
        options=(),
        formula="l_n = log(1 + exp(-y_n x_n))",
        description=_doc("soft_margin_loss", "Two-class logistic loss with labels in {1, -1}."),
        example={"input": [0.3, -1.2, 2.0], "target": [1, -1, -1]},
        cost=elementwise("input", "target", temps=Temps(1, 5, 4)),
    )
)

register(
    LossSpec(
        name="multilabel_soft_margin_loss",
        alias="MultiLabelSoftMarginLoss",
        fn=F.multilabel_soft_margin_loss,
        args=(
            _pred(shape="(N, C) or (C)"),
            _float("target", "same as input: 1 for a present label, 0 otherwise"),
            _class_weight(grad=True),
        ),
        options=(),
        formula="l_n = -1/C sum_c w_c [y_c log sigmoid(x_c) + (1 - y_c) log sigmoid(-x_c)]",
        description=_doc(
            "multilabel_soft_margin_loss", "Multi-label one-versus-all logistic loss."
        ),
        example={"input": [[0.2, -1.0, 1.5]], "target": [[1, 0, 1]]},
        cost=elementwise(
            "input",
            "target",
            "weight",
            temps=Temps((5, 1), (7, 1), (7, 1), per_grad=(2, 1)),
            summed=lambda shapes: len(shapes["input"]) - 1,
        ),
    )
)

register(
    LossSpec(
        name="multilabel_margin_loss",
        alias="MultiLabelMarginLoss",
        fn=F.multilabel_margin_loss,
        args=(
            _pred(shape="(N, C) or (C)"),
            TensorArg("target", "index", "same as input: class indices, padded at the end with -1"),
        ),
        options=(),
        formula="l_n = sum_{j in y, i not in y} max(0, 1 - (x_j - x_i)) / C",
        description=_doc(
            "multilabel_margin_loss",
            "Multi-class multi-label hinge loss; the "
            "target lists the label indices and stops at the first -1.",
        ),
        example={"input": [[0.1, 0.2, 0.4, 0.8]], "target": [[3, 0, -1, 1]]},
        validate=checks.multilabel_margin,
        cost=costs.multilabel_margin_loss,
    )
)

register(
    LossSpec(
        name="multi_margin_loss",
        alias="MultiMarginLoss",
        fn=F.multi_margin_loss,
        args=(
            _pred(shape="(N, C) or (C)"),
            TensorArg("target", "index", "(N) or (): class indices in [0, C)"),
            _class_weight(),
        ),
        options=(
            Option("p", int, 1, "the norm degree: 1 or 2", choices=(1, 2)),
            MARGIN1,
        ),
        formula="l_n = sum_{i != y} w_y max(0, margin - x_y + x_i)^p / C",
        description=_doc("multi_margin_loss", "Multi-class hinge loss."),
        example={"input": [[0.1, 0.2, 0.4, 0.8]], "target": [3]},
        validate=checks.multi_margin,
        cost=costs.multi_margin_loss,
    )
)

register(
    LossSpec(
        name="hinge_embedding_loss",
        alias="HingeEmbeddingLoss",
        fn=F.hinge_embedding_loss,
        args=(
            _pred(shape="(*): distances"),
            _float("target", "same as input: labels 1 or -1", grad=False),
        ),
        options=(MARGIN1,),
        formula="l_n = x_n if y_n = 1; max(0, margin - x_n) if y_n = -1",
        description=_doc(
            "hinge_embedding_loss",
            "Hinge loss on distances for similar (1) and dissimilar (-1) pairs.",
        ),
        example={"input": [0.3, 1.5, -0.2], "target": [1, -1, 1]},
        cost=elementwise("input", "target", temps=Temps(6, 7, 7)),
    )
)

register(
    LossSpec(
        name="cosine_embedding_loss",
        alias="CosineEmbeddingLoss",
        fn=F.cosine_embedding_loss,
        args=(
            _pred("input1", "(N, D) or (D)"),
            _pred("input2", "same as input1"),
            _float("target", "(N) or (): labels 1 or -1", grad=False),
        ),
        options=(MARGIN0,),
        formula="l_n = 1 - cos(x1_n, x2_n) if y_n = 1; "
        "max(0, cos(x1_n, x2_n) - margin) if y_n = -1",
        description=_doc(
            "cosine_embedding_loss",
            "Cosine similarity loss for similar (1) and dissimilar (-1) pairs.",
        ),
        example={"input1": [[1, 0], [0, 1]], "input2": [[1, 1], [1, 0]], "target": [1, -1]},
        cost=costs.cosine_embedding_loss,
    )
)

register(
    LossSpec(
        name="margin_ranking_loss",
        alias="MarginRankingLoss",
        fn=F.margin_ranking_loss,
        args=(
            _pred("input1", "(N) or ()"),
            _pred("input2", "same as input1"),
            _float("target", "same as input1: 1 if input1 should rank higher, -1 otherwise"),
        ),
        options=(MARGIN0,),
        formula="l_n = max(0, -y_n (x1_n - x2_n) + margin)",
        description=_doc("margin_ranking_loss", "Ranking hinge loss for pairs."),
        example={"input1": [0.5, 0.2], "input2": [0.1, 0.9], "target": [1, 1]},
        cost=elementwise("input1", "input2", "target", temps=Temps(4, 6, 5)),
    )
)

_TRIPLET_ARGS = (
    _pred("anchor", "(N, D) or (D)"),
    _pred("positive", "same as anchor"),
    _pred("negative", "same as anchor"),
)

register(
    LossSpec(
        name="triplet_margin_loss",
        alias="TripletMarginLoss",
        fn=F.triplet_margin_loss,
        args=_TRIPLET_ARGS,
        options=(
            MARGIN1,
            Option("p", float, 2.0, "the norm degree of the pairwise distance"),
            Option("eps", float, 1e-6, "a small constant for numerical stability"),
            Option("swap", bool, False, "use the distance swap (Balntas et al.)"),
        ),
        formula="l_n = max(0, d(a_n, p_n) - d(a_n, n_n) + margin), d = ||x - y + eps||_p",
        description=_doc("triplet_margin_loss", "Triplet loss with a p-norm distance."),
        example={
            "anchor": [[0, 0], [1, 1]],
            "positive": [[0.1, 0], [1, 0.9]],
            "negative": [[1, 0], [0, 0]],
        },
        cost=costs.triplet_margin_loss,
    )
)


def _cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(x, y)


DISTANCE_FUNCTIONS = {"pairwise_distance": F.pairwise_distance, "cosine_distance": _cosine_distance}


def _distance_function(options: dict[str, Any]) -> dict[str, Any]:
    name = options.get("distance_function")
    return {**options, "distance_function": DISTANCE_FUNCTIONS[name] if name else None}


register(
    LossSpec(
        name="triplet_margin_with_distance_loss",
        alias="TripletMarginWithDistanceLoss",
        fn=F.triplet_margin_with_distance_loss,
        args=_TRIPLET_ARGS,
        options=(
            Option(
                "distance_function",
                str,
                None,
                'null (torch\'s default, the pairwise distance), "pairwise_distance", or '
                '"cosine_distance" (1 - cosine_similarity)',
                choices=(None, *DISTANCE_FUNCTIONS),
            ),
            MARGIN1,
            Option("swap", bool, False, "use the distance swap (Balntas et al.)"),
        ),
        formula="l_n = max(0, d(a_n, p_n) - d(a_n, n_n) + margin)",
        description=_doc(
            "triplet_margin_with_distance_loss", "Triplet loss with a named distance function."
        ),
        example={
            "anchor": [[0, 0], [1, 1]],
            "positive": [[0.1, 0], [1, 0.9]],
            "negative": [[1, 0], [0, 0]],
            "distance_function": "cosine_distance",
        },
        torch_options=_distance_function,
        cost=costs.triplet_margin_with_distance_loss,
    )
)

register(
    LossSpec(
        name="poisson_nll_loss",
        alias="PoissonNLLLoss",
        fn=F.poisson_nll_loss,
        args=(
            _pred(shape="(*): log-rates (rates without log_input)"),
            _float("target", "same as input: counts"),
        ),
        options=(
            Option("log_input", bool, True, "input is log(rate)"),
            Option("full", bool, False, "add the Stirling approximation term"),
            Option("eps", float, 1e-8, "avoids log(0) when log_input is false"),
        ),
        formula="l_n = exp(x_n) - y_n x_n (log_input); x_n - y_n log(x_n + eps) otherwise",
        description=_doc("poisson_nll_loss", "Negative log likelihood of a Poisson target."),
        example={"input": [0.5, 1.0, -0.3], "target": [1, 2, 0]},
        cost=costs.poisson_nll_loss,
    )
)

register(
    LossSpec(
        name="gaussian_nll_loss",
        alias="GaussianNLLLoss",
        fn=F.gaussian_nll_loss,
        args=(
            _pred(shape="(N, *) or (*): means"),
            _float("target", "same as input"),
            TensorArg(
                "var",
                "float_or_number",
                "same as input, or with one fewer or a size-1 last dimension; "
                "or a number (a Python float to torch)",
                differentiable=True,
                description="variances, non-negative",
            ),
        ),
        options=(
            Option("full", bool, False, "add the constant term 0.5 log(2 pi)"),
            Option("eps", float, 1e-6, "clamps var for stability"),
        ),
        formula="l_n = 0.5 (log(max(var_n, eps)) + (x_n - y_n)^2 / max(var_n, eps))",
        description=_doc("gaussian_nll_loss", "Negative log likelihood of a Gaussian target."),
        example={"input": [1.0, 2.0], "target": [1.5, 1.0], "var": [0.5, 1.0]},
        cost=costs.gaussian_nll_loss,
    )
)


def _ctc_example() -> dict[str, Any]:
    return {
        "log_probs": [[[LOG_THIRD] * 3]] * 3,
        "targets": [[1, 2]],
        "input_lengths": [3],
        "target_lengths": [2],
    }


register(
    LossSpec(
        name="ctc_loss",
        alias="CTCLoss",
        fn=F.ctc_loss,
        args=(
            _pred("log_probs", "(T, N, C) or (T, C): log-probabilities over time"),
            TensorArg(
                "targets",
                "index",
                "(N, S) padded, or (sum(target_lengths)) concatenated; (S) unbatched",
            ),
            TensorArg("input_lengths", "index", "(N) or (): lengths <= T"),
            TensorArg("target_lengths", "index", "(N) or (): lengths <= S"),
        ),
        options=(
            Option("blank", int, 0, "the blank label"),
            Option(
                "zero_infinity", bool, False, "replace infinite losses and their gradients by 0"
            ),
        ),
        formula="l_n = -log sum over alignments of the target of prod_t p_t(alignment_t)",
        description=_doc(
            "ctc_loss",
            "Connectionist Temporal Classification loss; `mean` divides "
            "each loss by its target length, then averages over the batch.",
        ),
        example=_ctc_example(),
        validate=checks.ctc,
        cost=costs.ctc_loss,
    )
)
