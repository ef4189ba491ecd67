"""The request bodies: cross_entropy on seeded random logits, in every wire form.

small = input [8, 10] float32 + target [8]; large = input [4096, 1000] float32
+ target [4096]. Nested JSON is written by orjson from the float32 arrays (the
shortest repr that round-trips a float32), so the large body is 44.7 MB.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = {"content-type": "application/json"}
SHAPES = {"small": (8, 10), "large": (4096, 1000)}
SEEDS = {"small": 0, "large": 1}


@dataclass(frozen=True)
class Body:
    """One request body, with the headers it is sent with."""

    name: str
    content: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))

    @property
    def megabytes(self) -> float:
        return len(self.content) / 1e6


@dataclass(frozen=True)
class Tensors:
    logits: np.ndarray
    target: np.ndarray


def tensors(size: str) -> Tensors:
    rows, classes = SHAPES[size]
    rng = np.random.default_rng(SEEDS[size])
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    target = rng.integers(0, classes, rows, dtype=np.int64)
    return Tensors(logits, target)


def nested(t: Tensors, **extra: Any) -> bytes:
    return orjson.dumps(
        {"input": t.logits, "target": t.target, **extra}, option=orjson.OPT_SERIALIZE_NUMPY
    )


def b64(t: Tensors, **extra: Any) -> bytes:
    def form(array: np.ndarray, dtype: str) -> dict[str, Any]:
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        return {"shape": list(array.shape), "dtype": dtype, "b64": base64.b64encode(raw).decode()}

    return orjson.dumps(
        {"input": form(t.logits, "float32"), "target": form(t.target, "int64"), **extra}
    )


def v2_binary(t: Tensors, **parameters: Any) -> Body:
    """The OIP v2 binary tensor extension: a JSON header, then FP32 and INT64 bytes."""
    logits = t.logits.astype("<f4").tobytes()
    target = t.target.astype("<i8").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(t.logits.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(logits)},
                },
                {
                    "name": "target",
                    "shape": list(t.target.shape),
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": len(target)},
                },
            ],
            "parameters": {"binary_data_output": True, **parameters},
        }
    )
    return Body(
        "v2 binary",
        header + logits + target,
        {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))},
    )


def v2_json(t: Tensors) -> Body:
    """The OIP v2 JSON form: nested ``data`` (written as ``nested`` writes it), JSON output."""
    inputs = [
        {"name": "input", "shape": list(t.logits.shape), "datatype": "FP32", "data": t.logits},
        {"name": "target", "shape": list(t.target.shape), "datatype": "INT64", "data": t.target},
    ]
    return Body("v2 JSON", orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY))


@dataclass(frozen=True)
class Payloads:
    small: Tensors
    large: Tensors
    small_nested: Body
    small_v2: Body
    small_v2_json: Body
    large_nested: Body
    large_v2_json: Body
    large_nested_grad: Body
    large_b64: Body
    large_v2: Body
    large_v2_grad: Body

    def write(self, directory: Path) -> None:
        """The raw bodies and arrays, for the in-process measurement."""
        (directory / "large_nested.json").write_bytes(self.large_nested.content)
        (directory / "large_logits.f32").write_bytes(self.large.logits.astype("<f4").tobytes())
        (directory / "large_target.i64").write_bytes(self.large.target.astype("<i8").tobytes())


def build() -> Payloads:
    small, large = tensors("small"), tensors("large")
    large_v2_grad = v2_binary(large, grad=True)
    return Payloads(
        small=small,
        large=large,
        small_nested=Body("small nested", nested(small)),
        small_v2=v2_binary(small),
        small_v2_json=v2_json(small),
        large_nested=Body("large nested", nested(large)),
        large_v2_json=Body("large v2 JSON", v2_json(large).content),
        large_nested_grad=Body("large nested grad", nested(large, grad=True)),
        large_b64=Body("large b64", b64(large)),
        large_v2=v2_binary(large),
        large_v2_grad=Body("v2 binary grad", large_v2_grad.content, large_v2_grad.headers),
    )
