"""In-process decode + compute on one core, no HTTP: what the wire forms cost
before any server is involved. Run by bench.run as
``taskset -c 0 python -m bench.inprocess DIR``; prints one JSON object."""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import orjson
import torch
import torch.nn.functional as F


def median_seconds(func: Callable[[], object], repeats: int) -> float:
    func()  # warm-up
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(directory: Path, repeats: int) -> dict[str, float]:
    nested = (directory / "large_nested.json").read_bytes()
    logits_bytes = (directory / "large_logits.f32").read_bytes()
    target_bytes = (directory / "large_target.i64").read_bytes()
    rows = len(target_bytes) // 8
    classes = len(logits_bytes) // 4 // rows
    # frombuffer over read-only bytes warns (the tensor must not be written); it is not.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def from_bytes(grad: bool) -> float:
        logits = torch.frombuffer(logits_bytes, dtype=torch.float32).reshape(rows, classes)
        target = torch.frombuffer(target_bytes, dtype=torch.int64)
        if grad:
            logits = logits.clone().requires_grad_()
            loss = F.cross_entropy(logits, target)
            loss.backward()  # type: ignore[no-untyped-call]
            assert logits.grad is not None
            return loss.item()
        with torch.inference_mode():
            return F.cross_entropy(logits, target).item()

    def from_nested() -> float:
        payload = orjson.loads(nested)
        logits = torch.tensor(payload["input"], dtype=torch.float32)
        target = torch.tensor(payload["target"], dtype=torch.int64)
        with torch.inference_mode():
            return F.cross_entropy(logits, target).item()

    def orjson_only() -> object:
        return orjson.loads(nested)

    return {
        "binary": median_seconds(lambda: from_bytes(False), repeats),
        "binary_grad": median_seconds(lambda: from_bytes(True), repeats),
        "orjson_loads": median_seconds(orjson_only, max(1, repeats // 2)),
        "nested": median_seconds(from_nested, max(1, repeats // 2)),
        "value": from_bytes(False),
        "torch_threads": float(torch.get_num_threads()),
    }


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
