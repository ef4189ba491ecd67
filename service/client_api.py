"""Typed methods per loss for LossClient and AsyncLossClient (mixins).

GENERATED from the loss table (service/losses) by scripts/generate-client-api:
do not edit; tests/test_client_api.py fails when this file drifts from the table.
Each method is ``self.loss("<name>", ...)`` with the loss's tensor arguments as
parameters and its options, ``grad`` and the request fields typed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

import numpy as np
import torch

if TYPE_CHECKING:
    from service.client import LossResult

# What a tensor argument may be: a torch tensor, a numpy array, (nested) lists, a number.
TensorLike = torch.Tensor | np.ndarray[Any, Any] | Sequence[Any] | float
FloatDtype = Literal["float16", "bfloat16", "float32", "float64"]
Encoding = Literal["nested", "flat", "b64"]


class CrossEntropyFields(TypedDict, total=False):
    """The optional fields of cross_entropy: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    ignore_index: int  # default -100
    label_smoothing: float  # default 0.0
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target", "weight"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class NllLossFields(TypedDict, total=False):
    """The optional fields of nll_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    ignore_index: int  # default -100
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class BinaryCrossEntropyFields(TypedDict, total=False):
    """The optional fields of binary_cross_entropy: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class BinaryCrossEntropyWithLogitsFields(TypedDict, total=False):
    """The optional fields of binary_cross_entropy_with_logits: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    pos_weight: TensorLike
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class KlDivFields(TypedDict, total=False):
    """The optional fields of kl_div: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    log_target: bool  # default False
    reduction: Literal["none", "batchmean", "sum", "mean"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class L1LossFields(TypedDict, total=False):
    """The optional fields of l1_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target", "weight"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class MseLossFields(TypedDict, total=False):
    """The optional fields of mse_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target", "weight"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class SmoothL1LossFields(TypedDict, total=False):
    """The optional fields of smooth_l1_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    beta: float  # default 1.0
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class HuberLossFields(TypedDict, total=False):
    """The optional fields of huber_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    delta: float  # default 1.0
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target", "weight"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class SoftMarginLossFields(TypedDict, total=False):
    """The optional fields of soft_margin_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class MultilabelSoftMarginLossFields(TypedDict, total=False):
    """The optional fields of multilabel_soft_margin_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target", "weight"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class MultilabelMarginLossFields(TypedDict, total=False):
    """The optional fields of multilabel_margin_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class MultiMarginLossFields(TypedDict, total=False):
    """The optional fields of multi_margin_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    weight: TensorLike
    p: Literal[1, 2]  # default 1
    margin: float  # default 1.0
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class HingeEmbeddingLossFields(TypedDict, total=False):
    """The optional fields of hinge_embedding_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    margin: float  # default 1.0
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class CosineEmbeddingLossFields(TypedDict, total=False):
    """The optional fields of cosine_embedding_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    margin: float  # default 0.0
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input1", "input2"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class MarginRankingLossFields(TypedDict, total=False):
    """The optional fields of margin_ranking_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    margin: float  # default 0.0
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input1", "input2", "target"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class TripletMarginLossFields(TypedDict, total=False):
    """The optional fields of triplet_margin_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    margin: float  # default 1.0
    p: float  # default 2.0
    eps: float  # default 1e-06
    swap: bool  # default False
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["anchor", "positive", "negative"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class TripletMarginWithDistanceLossFields(TypedDict, total=False):
    """The optional fields of triplet_margin_with_distance_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    distance_function: Literal["pairwise_distance", "cosine_distance"] | None  # default None
    margin: float  # default 1.0
    swap: bool  # default False
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["anchor", "positive", "negative"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class PoissonNllLossFields(TypedDict, total=False):
    """The optional fields of poisson_nll_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    log_input: bool  # default True
    full: bool  # default False
    eps: float  # default 1e-08
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class GaussianNllLossFields(TypedDict, total=False):
    """The optional fields of gaussian_nll_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    full: bool  # default False
    eps: float  # default 1e-06
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["input", "target", "var"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class CtcLossFields(TypedDict, total=False):
    """The optional fields of ctc_loss: its options (torch defaults), its
    optional tensor arguments, grad and the request fields."""

    blank: int  # default 0
    zero_infinity: bool  # default False
    reduction: Literal["none", "mean", "sum"]  # default 'mean'
    grad: bool | Sequence[Literal["log_probs"]]
    grad_output: TensorLike
    device: str
    dtype: FloatDtype
    encoding: Encoding


class LossMethods:
    """One method per loss of the table, under its torch.nn.functional name."""

    def loss(self, name: str, /, **fields: Any) -> LossResult:
        raise NotImplementedError  # the client's

    def cross_entropy(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[CrossEntropyFields],
    ) -> LossResult:
        """``torch.nn.functional.cross_entropy`` on the service."""
        return self.loss(
            "cross_entropy",
            input=input,
            target=target,
            **fields,
        )

    def nll_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[NllLossFields],
    ) -> LossResult:
        """``torch.nn.functional.nll_loss`` on the service."""
        return self.loss(
            "nll_loss",
            input=input,
            target=target,
            **fields,
        )

    def binary_cross_entropy(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[BinaryCrossEntropyFields],
    ) -> LossResult:
        """``torch.nn.functional.binary_cross_entropy`` on the service."""
        return self.loss(
            "binary_cross_entropy",
            input=input,
            target=target,
            **fields,
        )

    def binary_cross_entropy_with_logits(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[BinaryCrossEntropyWithLogitsFields],
    ) -> LossResult:
        """``torch.nn.functional.binary_cross_entropy_with_logits`` on the service."""
        return self.loss(
            "binary_cross_entropy_with_logits",
            input=input,
            target=target,
            **fields,
        )

    def kl_div(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[KlDivFields],
    ) -> LossResult:
        """``torch.nn.functional.kl_div`` on the service."""
        return self.loss(
            "kl_div",
            input=input,
            target=target,
            **fields,
        )

    def l1_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[L1LossFields],
    ) -> LossResult:
        """``torch.nn.functional.l1_loss`` on the service."""
        return self.loss(
            "l1_loss",
            input=input,
            target=target,
            **fields,
        )

    def mse_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MseLossFields],
    ) -> LossResult:
        """``torch.nn.functional.mse_loss`` on the service."""
        return self.loss(
            "mse_loss",
            input=input,
            target=target,
            **fields,
        )

    def smooth_l1_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[SmoothL1LossFields],
    ) -> LossResult:
        """``torch.nn.functional.smooth_l1_loss`` on the service."""
        return self.loss(
            "smooth_l1_loss",
            input=input,
            target=target,
            **fields,
        )

    def huber_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[HuberLossFields],
    ) -> LossResult:
        """``torch.nn.functional.huber_loss`` on the service."""
        return self.loss(
            "huber_loss",
            input=input,
            target=target,
            **fields,
        )

    def soft_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[SoftMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.soft_margin_loss`` on the service."""
        return self.loss(
            "soft_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    def multilabel_soft_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MultilabelSoftMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.multilabel_soft_margin_loss`` on the service."""
        return self.loss(
            "multilabel_soft_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    def multilabel_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MultilabelMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.multilabel_margin_loss`` on the service."""
        return self.loss(
            "multilabel_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    def multi_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MultiMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.multi_margin_loss`` on the service."""
        return self.loss(
            "multi_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    def hinge_embedding_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[HingeEmbeddingLossFields],
    ) -> LossResult:
        """``torch.nn.functional.hinge_embedding_loss`` on the service."""
        return self.loss(
            "hinge_embedding_loss",
            input=input,
            target=target,
            **fields,
        )

    def cosine_embedding_loss(
        self,
        input1: TensorLike,
        input2: TensorLike,
        target: TensorLike,
        **fields: Unpack[CosineEmbeddingLossFields],
    ) -> LossResult:
        """``torch.nn.functional.cosine_embedding_loss`` on the service."""
        return self.loss(
            "cosine_embedding_loss",
            input1=input1,
            input2=input2,
            target=target,
            **fields,
        )

    def margin_ranking_loss(
        self,
        input1: TensorLike,
        input2: TensorLike,
        target: TensorLike,
        **fields: Unpack[MarginRankingLossFields],
    ) -> LossResult:
        """``torch.nn.functional.margin_ranking_loss`` on the service."""
        return self.loss(
            "margin_ranking_loss",
            input1=input1,
            input2=input2,
            target=target,
            **fields,
        )

    def triplet_margin_loss(
        self,
        anchor: TensorLike,
        positive: TensorLike,
        negative: TensorLike,
        **fields: Unpack[TripletMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.triplet_margin_loss`` on the service."""
        return self.loss(
            "triplet_margin_loss",
            anchor=anchor,
            positive=positive,
            negative=negative,
            **fields,
        )

    def triplet_margin_with_distance_loss(
        self,
        anchor: TensorLike,
        positive: TensorLike,
        negative: TensorLike,
        **fields: Unpack[TripletMarginWithDistanceLossFields],
    ) -> LossResult:
        """``torch.nn.functional.triplet_margin_with_distance_loss`` on the service."""
        return self.loss(
            "triplet_margin_with_distance_loss",
            anchor=anchor,
            positive=positive,
            negative=negative,
            **fields,
        )

    def poisson_nll_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[PoissonNllLossFields],
    ) -> LossResult:
        """``torch.nn.functional.poisson_nll_loss`` on the service."""
        return self.loss(
            "poisson_nll_loss",
            input=input,
            target=target,
            **fields,
        )

    def gaussian_nll_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        var: TensorLike,
        **fields: Unpack[GaussianNllLossFields],
    ) -> LossResult:
        """``torch.nn.functional.gaussian_nll_loss`` on the service."""
        return self.loss(
            "gaussian_nll_loss",
            input=input,
            target=target,
            var=var,
            **fields,
        )

    def ctc_loss(
        self,
        log_probs: TensorLike,
        targets: TensorLike,
        input_lengths: TensorLike,
        target_lengths: TensorLike,
        **fields: Unpack[CtcLossFields],
    ) -> LossResult:
        """``torch.nn.functional.ctc_loss`` on the service."""
        return self.loss(
            "ctc_loss",
            log_probs=log_probs,
            targets=targets,
            input_lengths=input_lengths,
            target_lengths=target_lengths,
            **fields,
        )


class AsyncLossMethods:
    """One method per loss of the table, under its torch.nn.functional name."""

    async def loss(self, name: str, /, **fields: Any) -> LossResult:
        raise NotImplementedError  # the client's

    async def cross_entropy(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[CrossEntropyFields],
    ) -> LossResult:
        """``torch.nn.functional.cross_entropy`` on the service."""
        return await self.loss(
            "cross_entropy",
            input=input,
            target=target,
            **fields,
        )

    async def nll_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[NllLossFields],
    ) -> LossResult:
        """``torch.nn.functional.nll_loss`` on the service."""
        return await self.loss(
            "nll_loss",
            input=input,
            target=target,
            **fields,
        )

    async def binary_cross_entropy(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[BinaryCrossEntropyFields],
    ) -> LossResult:
        """``torch.nn.functional.binary_cross_entropy`` on the service."""
        return await self.loss(
            "binary_cross_entropy",
            input=input,
            target=target,
            **fields,
        )

    async def binary_cross_entropy_with_logits(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[BinaryCrossEntropyWithLogitsFields],
    ) -> LossResult:
        """``torch.nn.functional.binary_cross_entropy_with_logits`` on the service."""
        return await self.loss(
            "binary_cross_entropy_with_logits",
            input=input,
            target=target,
            **fields,
        )

    async def kl_div(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[KlDivFields],
    ) -> LossResult:
        """``torch.nn.functional.kl_div`` on the service."""
        return await self.loss(
            "kl_div",
            input=input,
            target=target,
            **fields,
        )

    async def l1_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[L1LossFields],
    ) -> LossResult:
        """``torch.nn.functional.l1_loss`` on the service."""
        return await self.loss(
            "l1_loss",
            input=input,
            target=target,
            **fields,
        )

    async def mse_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MseLossFields],
    ) -> LossResult:
        """``torch.nn.functional.mse_loss`` on the service."""
        return await self.loss(
            "mse_loss",
            input=input,
            target=target,
            **fields,
        )

    async def smooth_l1_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[SmoothL1LossFields],
    ) -> LossResult:
        """``torch.nn.functional.smooth_l1_loss`` on the service."""
        return await self.loss(
            "smooth_l1_loss",
            input=input,
            target=target,
            **fields,
        )

    async def huber_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[HuberLossFields],
    ) -> LossResult:
        """``torch.nn.functional.huber_loss`` on the service."""
        return await self.loss(
            "huber_loss",
            input=input,
            target=target,
            **fields,
        )

    async def soft_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[SoftMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.soft_margin_loss`` on the service."""
        return await self.loss(
            "soft_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    async def multilabel_soft_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MultilabelSoftMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.multilabel_soft_margin_loss`` on the service."""
        return await self.loss(
            "multilabel_soft_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    async def multilabel_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MultilabelMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.multilabel_margin_loss`` on the service."""
        return await self.loss(
            "multilabel_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    async def multi_margin_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[MultiMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.multi_margin_loss`` on the service."""
        return await self.loss(
            "multi_margin_loss",
            input=input,
            target=target,
            **fields,
        )

    async def hinge_embedding_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[HingeEmbeddingLossFields],
    ) -> LossResult:
        """``torch.nn.functional.hinge_embedding_loss`` on the service."""
        return await self.loss(
            "hinge_embedding_loss",
            input=input,
            target=target,
            **fields,
        )

    async def cosine_embedding_loss(
        self,
        input1: TensorLike,
        input2: TensorLike,
        target: TensorLike,
        **fields: Unpack[CosineEmbeddingLossFields],
    ) -> LossResult:
        """``torch.nn.functional.cosine_embedding_loss`` on the service."""
        return await self.loss(
            "cosine_embedding_loss",
            input1=input1,
            input2=input2,
            target=target,
            **fields,
        )

    async def margin_ranking_loss(
        self,
        input1: TensorLike,
        input2: TensorLike,
        target: TensorLike,
        **fields: Unpack[MarginRankingLossFields],
    ) -> LossResult:
        """``torch.nn.functional.margin_ranking_loss`` on the service."""
        return await self.loss(
            "margin_ranking_loss",
            input1=input1,
            input2=input2,
            target=target,
            **fields,
        )

    async def triplet_margin_loss(
        self,
        anchor: TensorLike,
        positive: TensorLike,
        negative: TensorLike,
        **fields: Unpack[TripletMarginLossFields],
    ) -> LossResult:
        """``torch.nn.functional.triplet_margin_loss`` on the service."""
        return await self.loss(
            "triplet_margin_loss",
            anchor=anchor,
            positive=positive,
            negative=negative,
            **fields,
        )

    async def triplet_margin_with_distance_loss(
        self,
        anchor: TensorLike,
        positive: TensorLike,
        negative: TensorLike,
        **fields: Unpack[TripletMarginWithDistanceLossFields],
    ) -> LossResult:
        """``torch.nn.functional.triplet_margin_with_distance_loss`` on the service."""
        return await self.loss(
            "triplet_margin_with_distance_loss",
            anchor=anchor,
            positive=positive,
            negative=negative,
            **fields,
        )

    async def poisson_nll_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        **fields: Unpack[PoissonNllLossFields],
    ) -> LossResult:
        """``torch.nn.functional.poisson_nll_loss`` on the service."""
        return await self.loss(
            "poisson_nll_loss",
            input=input,
            target=target,
            **fields,
        )

    async def gaussian_nll_loss(
        self,
        input: TensorLike,
        target: TensorLike,
        var: TensorLike,
        **fields: Unpack[GaussianNllLossFields],
    ) -> LossResult:
        """``torch.nn.functional.gaussian_nll_loss`` on the service."""
        return await self.loss(
            "gaussian_nll_loss",
            input=input,
            target=target,
            var=var,
            **fields,
        )

    async def ctc_loss(
        self,
        log_probs: TensorLike,
        targets: TensorLike,
        input_lengths: TensorLike,
        target_lengths: TensorLike,
        **fields: Unpack[CtcLossFields],
    ) -> LossResult:
        """``torch.nn.functional.ctc_loss`` on the service."""
        return await self.loss(
            "ctc_loss",
            log_probs=log_probs,
            targets=targets,
            input_lengths=input_lengths,
            target_lengths=target_lengths,
            **fields,
        )
