"""The device the parity and gradient suites run on: cpu by default,
LOSS_SERVICE_TEST_DEVICE=cuda on a GPU machine. scripts/gpu-check runs its
own CUDA parity and gradient checks over HTTP (bench/gpu_check.py)."""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("LOSS_SERVICE_TEST_DEVICE", "cpu")


def on_device(tensors: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor | float]:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
