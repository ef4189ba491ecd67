"""The loss table. Importing this package registers every loss."""

from service.losses import catalog as _catalog  # noqa: F401  (registers the specs)
from service.losses.cost import Cost, CostFn, Shapes, predict, predicted_bytes
from service.losses.registry import LOSSES, LossSpec, Option, TensorArg, resolve

__all__ = [
    "LOSSES",
    "Cost",
    "CostFn",
    "LossSpec",
    "Option",
    "Shapes",
    "TensorArg",
    "predict",
    "predicted_bytes",
    "resolve",
]
