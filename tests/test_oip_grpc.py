"""The OIP gRPC codec (``service.protocols.oip_grpc``) on its own, and the
gRPC servicer's bookkeeping in-process: raw tensors decode and encode bit for
bit as the tensor codec does them, and every call is counted and logged once,
after its response."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2 as pb

from service.api.grpc_server import InferenceServicer
from service.compute import Evaluation
from service.config import Settings
from service.logs import AccessLog
from service.main import create_app
from service.protocols import oip, oip_grpc
from service.protocols.oip import DATATYPES, WIDENED
from service.tensors import ElementBudget, bytes_to_tensor, tensor_view

FLOAT_DATATYPES = ["FP16", "BF16", "FP32", "FP64"]
# every datatype a class target may arrive in (BOOL is refused later, by the core)
TARGET_DATATYPES = [*DATATYPES, *WIDENED]


def wire(tensor: torch.Tensor) -> bytes:
    return bytes(tensor_view(tensor))


def codec_decode(datatype: str, raw: bytes, shape: list[int]) -> torch.Tensor:
    """What the tensor codec makes of raw bytes (the reference)."""
    if datatype in WIDENED:
        return oip.widen_bytes("x", datatype, raw).reshape(shape)
    dtype = DATATYPES[datatype]
    wire_dtype = torch.uint8 if dtype == torch.bool else dtype
    return bytes_to_tensor(raw, wire_dtype, shape, as_bool=dtype == torch.bool)


def infer_message(*inputs: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="cross_entropy")
    for name, datatype, shape, raw in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_input_contents.append(raw)
    # as received: parsed from the wire, not built in place
    return pb.ModelInferRequest.FromString(message.SerializeToString())


def parse(message: pb.ModelInferRequest) -> oip.InferRequest:
    return oip_grpc.parse_infer(oip.model("cross_entropy"), message, ElementBudget(10_000))


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
    assert wire(actual) == wire(expected)


@pytest.mark.parametrize("shape", [[2, 3], [0, 3], []])
@pytest.mark.parametrize("float_datatype", FLOAT_DATATYPES)
@pytest.mark.parametrize("datatype", TARGET_DATATYPES)
def test_raw_inputs_decode_as_the_codec_does(
    datatype: str, float_datatype: str, shape: list[int]
) -> None:
    g = np.random.default_rng(7)
    n = int(np.prod(shape))
    logits = g.bytes(n * oip.itemsize(float_datatype))  # any bits: NaNs, infinities too
    target = g.bytes(n * oip.itemsize(datatype))
    if datatype == "UINT64":  # past int64 is a 422 (tested over the wire)
        target = (np.frombuffer(target, "<u8") >> 1).astype("<u8").tobytes()
    request = parse(
        infer_message(("input", float_datatype, shape, logits), ("target", datatype, shape, target))
    )
    same_bits(request.tensors["input"], codec_decode(float_datatype, logits, shape))
    same_bits(request.tensors["target"], codec_decode(datatype, target, shape))


def test_raw_input_size_and_name_errors() -> None:
    with pytest.raises(Exception, match="raw_input_contents holds 3 bytes"):
        parse(infer_message(("input", "FP32", [1], b"abc"), ("target", "INT64", [1], bytes(8))))
    with pytest.raises(Exception, match="unknown input 'logits'"):
        parse(infer_message(("logits", "FP32", [1], bytes(4))))
    with pytest.raises(Exception, match="expected a floating datatype"):
        parse(infer_message(("input", "INT64", [1], bytes(8))))
    # a refused name or datatype is refused every time (only what passed is remembered)
    with pytest.raises(Exception, match="unknown input 'logits'"):
        parse(infer_message(("logits", "FP32", [1], bytes(4))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_outputs_encode_as_the_codec_does(dtype: torch.dtype) -> None:
    request = parse(
        infer_message(("input", "FP32", [2, 2], bytes(16)), ("target", "INT64", [2], bytes(16)))
    )
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(3, 4, generator=g).to(dtype).t()  # not contiguous
    value = torch.randn((), generator=g).to(dtype)
    evaluation = Evaluation(oip.loss_call(request), value, {"input": grad})
    response = oip_grpc.encode_response(request, evaluation)
    assert [o.name for o in response.outputs] == ["loss", "grad_input"]
    assert list(response.outputs[1].shape) == [4, 3]
    assert response.raw_output_contents[0] == wire(value.reshape(1))
    assert response.raw_output_contents[1] == wire(grad)


class Context:
    """What the servicer reads of a grpc.aio call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.trailing: Any = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise RuntimeError(code, details)


def test_calls_are_counted_and_logged_once_after_their_response() -> None:
    app = create_app(Settings(device="cpu", grpc_port=0, log_level="info", log_format="json"))
    runtime = app.state.runtime
    lines: list[bytes] = []
    runtime.access_log = AccessLog("json", lines.append)
    servicer = InferenceServicer(app, runtime)
    logits, target = np.array([[2, 1], [1, 2]], np.float32), np.array([1, 0], np.int64)
    message = infer_message(
        ("input", "FP32", [2, 2], logits.tobytes()), ("target", "INT64", [2], target.tobytes())
    )
    context = Context((("x-request-id", "abc-1"),))

    async def call() -> pb.ModelInferResponse:
        response: pb.ModelInferResponse = await servicer.ModelInfer(message, context)
        # nothing recorded before the response has gone
        assert not lines and runtime.metrics.requests.body_out == 0
        await asyncio.sleep(0.05)  # past the record delay
        return response

    response = asyncio.run(call())
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [
        pytest.approx(1.3132616)
    ]
    assert context.trailing[0][0] == "server-timing"
    [line] = b"".join(lines).splitlines()
    assert b'"request_id":"abc-1"' in line
    assert b'"route":"/inference.GRPCInferenceService/ModelInfer"' in line
    stats = runtime.metrics.requests
    assert (stats.body_in, stats.body_out) == (message.ByteSize(), response.ByteSize())
    assert runtime.bodies.used == 0  # the message was counted while the call ran, then given back
