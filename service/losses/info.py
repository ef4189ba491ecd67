"""What the catalog says about a loss (contract section 6): its arguments,
options, formula and worked example, read from the loss table."""

from __future__ import annotations

from functools import cache
from typing import Any

from service.losses.registry import LossSpec


@cache
def example_response(spec: LossSpec) -> dict[str, Any]:
    """The worked example's result, computed by torch on the CPU."""
    # the evaluation path imports the loss table: imported here, when first used
    from service.config import Settings
    from service.protocols.v1 import evaluate

    return evaluate(spec, {**spec.example, "device": "cpu"}, Settings())


def loss_info(spec: LossSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "aliases": [spec.alias],
        "description": spec.description,
        "formula": spec.formula,
        "arguments": [
            {
                "name": a.name,
                "role": a.role,
                "shape": a.shape,
                "required": a.required,
                "differentiable": a.name in spec.maybe_differentiable,
                "prediction": a.prediction,
                "description": a.description,
            }
            for a in spec.args
        ],
        "options": [
            {
                "name": o.name,
                "type": o.type.__name__,
                "default": o.default,
                "allowed": list(o.choices) if o.choices is not None else None,
                "description": o.description,
            }
            for o in spec.options
        ]
        + [
            {
                "name": "reduction",
                "type": "str",
                "default": "mean",
                "allowed": list(spec.reductions),
                "description": "how the per-element losses are reduced",
            }
        ],
        "differentiable": spec.maybe_differentiable,
        "example": {"request": spec.example, "response": example_response(spec)},
    }
