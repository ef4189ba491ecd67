"""Triton's statistics, model-repository and model-configuration extensions
of the Open Inference Protocol, as plain JSON-able dicts: the REST routes
send them as they are, the gRPC servicer parses them into Triton's messages
(whose JSON mapping is the same), so both front doors say the same thing.

Every loss is a built-in model, always loaded: the repository lists them all
READY, and load/unload succeed without doing anything.
"""

from __future__ import annotations

from typing import Any

from service.errors import BadRequest, quote
from service.losses import LOSSES, LossSpec
from service.metrics import ModelCounters, ModelStats
from service.protocols.oip import MODEL_VERSION, model_metadata

# What /v2 (and gRPC ServerMetadata) lists for these extensions.
EXTENSIONS = ["statistics", "model_repository", "model_configuration"]


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_statistics(spec: LossSpec, counters: ModelCounters | None) -> dict[str, Any]:
    """One model's entry of Triton's statistics response. A request is one
    inference and one execution (no dynamic batching); ``compute_input`` is
    decoding and checking, ``compute_infer`` torch (and autograd),
    ``compute_output`` encoding. ``queue`` stays zero: waiting for a
    computation slot or for memory is not timed apart, it falls in the
    request's ``success``/``fail`` time only."""
    c = counters or ModelCounters()
    ok = c.success_count
    return {
        "name": spec.name,
        "version": MODEL_VERSION,
        "last_inference": c.last_inference,
        "inference_count": ok,
        "execution_count": ok,
        "inference_stats": {
            "success": _duration(ok, c.success_ns),
            "fail": _duration(c.fail_count, c.fail_ns),
            "queue": _duration(0, 0),
            "compute_input": _duration(ok, c.input_ns),
            "compute_infer": _duration(ok, c.infer_ns),
            "compute_output": _duration(ok, c.output_ns),
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": [],
    }


def statistics(stats: ModelStats, spec: LossSpec | None) -> dict[str, Any]:
    """The statistics of one model, or of every model (``spec`` None)."""
    specs = [spec] if spec is not None else list(LOSSES.values())
    return {"model_stats": [model_statistics(s, stats.models.get(s.name)) for s in specs]}


def repository_index(ready_only: bool = False) -> list[dict[str, str]]:
    """Every model, each READY (``ready_only`` changes nothing: all are)."""
    return [
        {"name": name, "version": MODEL_VERSION, "state": "READY", "reason": ""} for name in LOSSES
    ]


def check_load_parameters(parameters: dict[str, Any]) -> None:
    """A load request may not bring a configuration or files: the models are
    built in, and a load that silently ignored them would claim to have
    loaded something it did not."""
    given = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if given:
        raise BadRequest(
            f"load parameter(s) {quote(given)} are not supported: every loss is a built-in "
            "model, always loaded; load it without a configuration or files"
        )


def _config_tensor(tensor: dict[str, Any], optional: bool | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": tensor["name"],
        "data_type": f"TYPE_{tensor['datatype']}",
        "dims": tensor["shape"],
    }
    if optional is not None:
        config["optional"] = optional
    return config


def model_config(spec: LossSpec) -> dict[str, Any]:
    """A minimal Triton model configuration that holds for the loss: its
    inputs and outputs as in the metadata (default datatype, [-1] = any
    shape, optional inputs marked), no batching dimension, no instance
    groups of its own."""
    metadata = model_metadata(spec)
    return {
        "name": spec.name,
        "platform": "pytorch",
        "backend": "loss-service",
        "version_policy": {"specific": {"versions": [int(MODEL_VERSION)]}},
        "max_batch_size": 0,
        "input": [_config_tensor(t, not t["parameters"]["required"]) for t in metadata["inputs"]],
        "output": [_config_tensor(t, None) for t in metadata["outputs"]],
    }
