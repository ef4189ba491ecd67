"""The baseline: the FastAPI app most people would write first.

pydantic validates ``list[list[float]]`` element by element, then
``torch.tensor`` copies the Python floats. Run:
``uvicorn bench.apps.naive:app --no-access-log``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class CrossEntropyRequest(BaseModel):
    input: list[list[float]]
    target: list[int]


class LossResponse(BaseModel):
    value: float


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/losses/cross_entropy")
def cross_entropy(request: CrossEntropyRequest) -> LossResponse:
    logits = torch.tensor(request.input)
    target = torch.tensor(request.target)
    return LossResponse(value=F.cross_entropy(logits, target).item())
