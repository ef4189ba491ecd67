"""loss-service: torch.nn.functional losses (values and gradients) over HTTP."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def version_info(devices: list[str]) -> dict[str, Any]:
    """What ``GET /version`` and ``loss-service --version`` report (contract §12)."""
    import torch  # here: the client imports this package and may not need torch yet

    return {
        "name": "loss-service",
        "version": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": devices,
    }
