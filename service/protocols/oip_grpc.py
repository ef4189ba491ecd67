"""The Open Inference Protocol over gRPC: a ``ModelInferRequest`` ->
``InferRequest``; an ``Evaluation`` -> a ``ModelInferResponse``; model
metadata as protobuf. Pure: the servicer (``service.api.grpc``) hands it
messages already received.

The messages are Triton's generated ones (``tritonclient.grpc.service_pb2``,
a superset of KServe's ``grpc_predict_v2.proto``). Tensors come as raw
little-endian bytes (``raw_input_contents``, one entry per input, in input
order) or in the typed ``contents`` fields; outputs always go back raw
(``raw_output_contents``), as Triton sends them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tritonclient.grpc import service_pb2 as pb

from service.compute import Evaluation
from service.errors import BadRequest, quote
from service.losses import LossSpec
from service.protocols import oip
from service.protocols.oip import DATATYPES, InferRequest
from service.shm import PARAMETERS as SHARED_MEMORY
from service.shm import Reference, Regions, reference
from service.tensors import MAX_DIMS, ElementBudget, bytes_to_tensor, check_dims, tensor_view

# Which typed ``contents`` field carries each datatype, and the numpy dtype
# its values are read in (FP16 and BF16 have none: they travel raw).
CONTENTS: dict[str, tuple[str, type[np.generic]]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint8),
    # widened to INT64 (``oip.WIDENED``): read at the field's own width
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}

# Bytes per element of each datatype on the wire (looked up once, not per
# request), and the numpy dtype raw bytes are read as where there is one
# (BF16 has none; BOOL travels as one byte per element).
ITEMSIZES: dict[str, int] = {datatype: oip.itemsize(datatype) for datatype in oip.ACCEPTED}
RAW_DTYPES: dict[str, type[np.generic]] = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "BOOL": np.uint8,
}
# Output dtypes whose bytes numpy writes (the float dtypes but BF16).
NUMPY_OUTPUT_DTYPES = frozenset({torch.float16, torch.float32, torch.float64})


def parameter_value(parameter: pb.InferParameter) -> Any:
    """An ``InferParameter`` as the plain value a JSON parameter would be."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which is not None else None


def parse_infer(
    spec: LossSpec,
    message: pb.ModelInferRequest,
    budget: ElementBudget,
    regions: Regions | None = None,
) -> InferRequest:
    """A ModelInferRequest -> decoded tensors, parameters and outputs
    (``regions``: the registered shared-memory regions inputs and outputs
    may name)."""
    parameters = message.parameters
    request = InferRequest(
        spec,
        message.id or None,
        tensors={},
        parameters={k: parameter_value(v) for k, v in parameters.items()} if parameters else {},
        outputs=None,
        binary_output=True,
    )
    inputs = list(message.inputs)
    if not inputs:
        raise BadRequest(
            f"inputs must not be empty; model {spec.name} takes {oip.describe_inputs(spec)}"
        )
    shared = [
        _shared_memory("input", item.name, item.parameters, regions) if item.parameters else None
        for item in inputs
    ]
    # raw_input_contents holds the inputs not in shared memory, in order (as Triton reads it)
    raw = list(message.raw_input_contents)
    unshared = shared.count(None)
    if raw and len(raw) != unshared:
        raise BadRequest(
            f"raw_input_contents holds {len(raw)} entries for {unshared} inputs not in shared "
            "memory; send one per such input, in input order, or none (typed contents)"
        )
    contents = iter(raw)
    for item, ref in zip(inputs, shared, strict=True):
        datatype = item.datatype
        name = oip.checked_input(spec, item.name, datatype)
        if ref is None:
            tensor = _decode_input(name, item, datatype, next(contents) if raw else None, budget)
        else:
            assert regions is not None
            shape, _ = _checked_shape(name, item, budget)
            tensor = oip.read_region(name, datatype, shape, regions, ref)
        oip.add_input(request, name, tensor)
    if message.outputs:
        request.outputs = []
        for output in message.outputs:
            ref = _shared_memory("output", output.name, output.parameters, regions)
            requested = oip.output_request(spec, request.outputs, output.name)
            if ref is not None:
                assert regions is not None
                requested.target = regions.target(f"output {quote(output.name)}", ref)
            request.outputs.append(requested)
    oip.check_inputs(request)
    return request


def _shared_memory(
    kind: str, name: str, parameters: Any, regions: Regions | None
) -> Reference | None:
    """The region an input's or output's (``kind``) parameters name (the only
    parameters a tensor may carry here), if any."""
    if not parameters:
        return None
    what = f"{kind} {quote(name)}"
    values = {k: parameter_value(v) for k, v in parameters.items()}
    unknown = set(values) - set(SHARED_MEMORY)
    if unknown:
        raise BadRequest(
            f"{what}: unsupported parameter(s) {quote(sorted(unknown))} (only "
            f"{', '.join(SHARED_MEMORY)})"
        )
    ref = reference(what, values)
    if ref is not None and regions is None:
        raise BadRequest(f"{what}: shared memory is not available here")
    return ref


def _checked_shape(
    name: str, item: pb.ModelInferRequest.InferInputTensor, budget: ElementBudget
) -> tuple[list[int], int]:
    """An input's shape, checked and counted, and its number of elements (its
    datatype: oip.check_datatype)."""
    shape = list(item.shape)
    if len(shape) > MAX_DIMS or min(shape, default=0) < 0:
        raise BadRequest(
            f"input {quote(name)}: shape must hold at most {MAX_DIMS} non-negative "
            f"dimensions, got {quote(shape)}"
        )
    extent = check_dims(shape, (name, "shape"))  # 422: a shape torch cannot hold
    numel = math.prod(shape)
    budget.take(name, numel, extent)
    return shape, numel


def _decode_input(
    name: str,
    item: pb.ModelInferRequest.InferInputTensor,
    datatype: str,
    raw: bytes | None,
    budget: ElementBudget,
) -> torch.Tensor:
    """One input from its raw bytes or typed contents (``datatype``: the
    item's, checked by ``oip.checked_input``)."""
    shape, numel = _checked_shape(name, item, budget)
    if raw is not None:
        itemsize = ITEMSIZES[datatype]
        if len(raw) != numel * itemsize:
            raise BadRequest(
                f"input {quote(name)}: raw_input_contents holds {len(raw)} bytes but shape "
                f"{shape} of {datatype} takes {numel * itemsize}"
            )
        if datatype in oip.WIDENED:
            return oip.widen_bytes(name, datatype, raw).reshape(shape)
        np_dtype = RAW_DTYPES.get(datatype)
        if np_dtype is not None and numel:
            # protobuf's bytes are immutable: one copy into a bytearray, which
            # the tensor then owns (numpy's view of it costs less than torch's)
            values = np.frombuffer(bytearray(raw), np_dtype).reshape(shape)
            tensor = torch.from_numpy(values)
            return tensor != 0 if datatype == "BOOL" else tensor
        dtype = DATATYPES[datatype]
        wire_dtype = torch.uint8 if dtype == torch.bool else dtype
        return bytes_to_tensor(raw, wire_dtype, shape, as_bool=dtype == torch.bool)
    if datatype not in CONTENTS:
        raise BadRequest(
            f"input {quote(name)}: {datatype} has no typed contents field; send it in "
            "raw_input_contents"
        )
    field, np_dtype = CONTENTS[datatype]
    values = getattr(item.contents, field)
    if len(values) != numel:
        raise BadRequest(
            f"input {quote(name)}: shape {shape} takes {numel} elements, "
            f"contents.{field} holds {len(values)}"
        )
    if datatype in oip.WIDENED:  # checked against the datatype's range there
        return oip.widen(name, datatype, np.array(values, dtype=np_dtype)).reshape(shape)
    # uint_contents holds uint32 values: one past UINT8's range is refused, never wrapped
    if datatype == "UINT8" and numel and max(values) > 255:
        raise BadRequest(f"input {quote(name)}: contents.{field} holds {max(values)}, past UINT8")
    return torch.from_numpy(np.array(values, dtype=np_dtype)).reshape(shape)


def encode_response(request: InferRequest, evaluation: Evaluation) -> pb.ModelInferResponse:
    """Every selected output, its bytes in raw_output_contents."""
    response = pb.ModelInferResponse(
        model_name=request.spec.name, model_version=oip.MODEL_VERSION, id=request.id or ""
    )
    for output, tensor in oip.selected_outputs(request, evaluation):
        added = response.outputs.add(
            name=output.name,
            datatype=oip.DATATYPE_NAMES[tensor.dtype],
            shape=oip.wire_shape(output, tensor),
        )
        if output.target is not None:
            output.target.write(f"output {quote(output.name)}", tensor)
            for key, value in output.target.ref.parameters().items():
                if isinstance(value, str):
                    added.parameters[key].string_param = value
                else:
                    added.parameters[key].int64_param = value
            # an empty entry keeps raw_output_contents in step with outputs
            response.raw_output_contents.append(b"")
        else:
            response.raw_output_contents.append(_raw_bytes(tensor))
    return response


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's little-endian row-major bytes, copied once: numpy's
    tobytes (any layout) where numpy has the dtype, else the codec's view."""
    if tensor.dtype in NUMPY_OUTPUT_DTYPES:
        return tensor.numpy().tobytes()
    return bytes(tensor_view(tensor))


def model_metadata(metadata: dict[str, Any]) -> pb.ModelMetadataResponse:
    """``oip.model_metadata`` as protobuf (which has no per-tensor parameters)."""

    def tensors(items: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(
                name=t["name"], datatype=t["datatype"], shape=t["shape"]
            )
            for t in items
        ]

    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=metadata["versions"],
        platform=metadata["platform"],
        inputs=tensors(metadata["inputs"]),
        outputs=tensors(metadata["outputs"]),
    )
