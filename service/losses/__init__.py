"""The loss table. Importing this package registers every loss."""

from service.losses import catalog as _catalog  # noqa: F401  (registers the specs)
from service.losses.registry import LOSSES, LossSpec, Option, TensorArg, resolve

__all__ = ["LOSSES", "LossSpec", "Option", "TensorArg", "resolve"]
