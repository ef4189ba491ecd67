"""The Open Inference Protocol over gRPC (contract section 10), driven by
the unmodified ``tritonclient.grpc`` (sync and aio) against a real server
process; and every case of ``tests/cases.py`` through all three front doors
(v1 JSON, OIP REST, OIP gRPC) with identical results.

Expected values come from the same ``torch.nn.functional`` call in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from service.protocols.oip import DATATYPE_NAMES
from tests.cases import CASES, Case, assert_same, decode, request_body, torch_call
from tests.conftest import free_port, start_server, stop_server

KEY = "grpc-test-key"


@dataclass
class Server:
    http: str  # base URL
    grpc: str  # host:port


def _serve(env: dict[str, str]) -> Iterator[Server]:
    port = free_port()
    proc, url = start_server(
        {"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_GRPC_PORT": str(port), **env}
    )
    try:
        yield Server(url, f"127.0.0.1:{port}")
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from _serve({})


@pytest.fixture(scope="module")
def guarded() -> Iterator[Server]:
    """API keys and small limits."""
    yield from _serve({"LOSS_SERVICE_API_KEYS": KEY, "LOSS_SERVICE_MAX_TENSOR_ELEMENTS": "1000"})


@pytest.fixture(scope="module")
def triton(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        yield client
    finally:
        client.close()


def grpc_input(name: str, tensor: torch.Tensor) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(tensor.shape), DATATYPE_NAMES[tensor.dtype])
    item.set_data_from_numpy(tensor.numpy())
    return item


def http_input(name: str, tensor: torch.Tensor) -> httpclient.InferInput:
    item = httpclient.InferInput(name, list(tensor.shape), DATATYPE_NAMES[tensor.dtype])
    item.set_data_from_numpy(tensor.numpy(), binary_data=True)
    return item


def as_tensor(array: np.ndarray | None) -> torch.Tensor:
    assert array is not None
    return torch.from_numpy(np.array(array))


# --------------------------------------------------------------------------- three front doors


def _parameters(case: Case, reduction: str) -> dict[str, Any]:
    numbers = {k: v for k, v in case.tensors.items() if not isinstance(v, torch.Tensor)}
    options = {k: v for k, v in case.options.items() if v is not None}
    return {**options, **numbers, "reduction": reduction, "grad": True, "device": "cpu"}


Outcome = tuple[str, Any]  # ("ok", {output: tensor}) or ("error", status)


def _v1(server: Server, case: Case, reduction: str) -> Outcome:
    body = request_body(case, reduction, "b64", grad=True, encoding="b64", device="cpu")
    response = httpx.post(f"{server.http}/v1/losses/{case.loss}", json=body, timeout=30)
    if response.status_code != 200:
        return "error", response.status_code
    data = response.json()
    dtype = getattr(torch, data["dtype"])
    value = data["value"]
    if isinstance(value, dict):
        loss = decode(value, dtype)
    else:  # a 0-dim value is a JSON number, exact as a double: its bits come back
        loss = torch.tensor([value], dtype=torch.float64).to(dtype)
    outputs = {"loss": loss}
    for name, grad in data["grad"].items():
        outputs[f"grad_{name}"] = decode(grad, case.tensors[name].dtype)  # type: ignore[union-attr]
    return "ok", outputs


def _rest(server: Server, case: Case, reduction: str) -> Outcome:
    client = httpclient.InferenceServerClient(server.http.removeprefix("http://"))
    tensors = {k: v for k, v in case.tensors.items() if isinstance(v, torch.Tensor)}
    try:
        result = client.infer(
            case.loss,
            [http_input(k, v) for k, v in tensors.items()],
            parameters=_parameters(case, reduction),
        )
    except InferenceServerException as exc:
        return "error", int(exc.status() or 0)
    finally:
        client.close()
    names = [o["name"] for o in result.get_response()["outputs"]]
    return "ok", {name: as_tensor(result.as_numpy(name)) for name in names}


GRPC_STATUS = {
    "StatusCode.INVALID_ARGUMENT": 422,
    "StatusCode.NOT_FOUND": 404,
    "StatusCode.RESOURCE_EXHAUSTED": 413,
}


def _grpc(client: grpcclient.InferenceServerClient, case: Case, reduction: str) -> Outcome:
    tensors = {k: v for k, v in case.tensors.items() if isinstance(v, torch.Tensor)}
    try:
        result = client.infer(
            case.loss,
            [grpc_input(k, v) for k, v in tensors.items()],
            parameters=_parameters(case, reduction),
        )
    except InferenceServerException as exc:
        return "error", GRPC_STATUS.get(str(exc.status()), 0)
    names = [o.name for o in result.get_response().outputs]
    return "ok", {name: as_tensor(result.as_numpy(name)) for name in names}


@pytest.mark.parametrize(
    ("case", "reduction"),
    [
        pytest.param(case, reduction, id=f"{case.loss}-{case.id}-{reduction}")
        for case in CASES
        for reduction in case.spec.reductions
    ],
)
def test_three_front_doors_agree(
    server: Server, triton: grpcclient.InferenceServerClient, case: Case, reduction: str
) -> None:
    """Value and gradients: v1 JSON (b64 tensors), OIP REST (binary) and OIP
    gRPC (raw) give the same bits, and the value is torch's in-process."""
    v1, rest, grpc_ = (
        _v1(server, case, reduction),
        _rest(server, case, reduction),
        _grpc(triton, case, reduction),
    )
    if v1[0] == "error":  # torch refuses this gradient: every door says so alike
        assert v1 == rest == ("error", 422) and grpc_ == ("error", 422), (v1, rest, grpc_)
        return
    assert rest[0] == grpc_[0] == "ok", (rest, grpc_)
    expected = torch_call(case, reduction)
    assert_same(v1[1]["loss"], expected.reshape(1) if expected.dim() == 0 else expected)
    assert list(v1[1]) == list(rest[1]) == list(grpc_[1])
    for name, tensor in v1[1].items():
        assert_same(rest[1][name], tensor)
        assert_same(grpc_[1][name], tensor)


# --------------------------------------------------------------------------- the sync client


def test_health_and_metadata(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("CrossEntropyLoss") and triton.is_model_ready("mse_loss", "1")
    metadata = triton.get_server_metadata()
    assert metadata.name == "loss-service" and "parameters" in metadata.extensions
    model = triton.get_model_metadata("cross_entropy")
    assert model.name == "cross_entropy" and model.versions == ["1"]
    assert [i.name for i in model.inputs] == ["input", "target", "weight", "grad_output"]
    assert "grad_input" in [o.name for o in model.outputs]


def test_dtypes_round_trip(triton: grpcclient.InferenceServerClient) -> None:
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.float32, torch.float64):
        x, y = torch.randn(3, 4, generator=g).to(dtype), torch.randn(3, 4, generator=g).to(dtype)
        result = triton.infer(
            "mse_loss",
            [grpc_input("input", x), grpc_input("target", y)],
            parameters={"reduction": "none"},
        )
        assert_same(
            as_tensor(result.as_numpy("loss")), torch.nn.functional.mse_loss(x, y, reduction="none")
        )
    # INT32 class indices, and a selected output (the gradient only)
    x, t = torch.randn(4, 5, generator=g), torch.randint(0, 5, (4,), generator=g)
    result = triton.infer(
        "cross_entropy",
        [grpc_input("input", x), grpc_input("target", t.to(torch.int32))],
        outputs=[grpcclient.InferRequestedOutput("grad_input")],
    )
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(leaf, t), leaf)
    assert [o.name for o in result.get_response().outputs] == ["grad_input"]
    assert_same(as_tensor(result.as_numpy("grad_input")), expected)


def test_typed_contents_and_grad_output(server: Server) -> None:
    """Tensors in the typed contents fields (a client other than tritonclient),
    and grad_output as an input."""
    x, t = [0.4, 0.1], [0.2, 0.8]
    request = pb.ModelInferRequest(model_name="BCELoss", id="7")
    request.parameters["reduction"].string_param = "none"
    request.parameters["grad"].bool_param = True
    for name, values in (("input", x), ("target", t), ("grad_output", [1.0, 2.0])):
        item = request.inputs.add(name=name, datatype="FP32", shape=[2])
        item.contents.fp32_contents.extend(values)
    with grpc.insecure_channel(server.grpc) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.id == "7" and [o.name for o in response.outputs] == ["loss", "grad_input"]
    leaf = torch.tensor(x).requires_grad_(True)
    loss = torch.nn.functional.binary_cross_entropy(leaf, torch.tensor(t), reduction="none")
    (grad,) = torch.autograd.grad(loss, leaf, torch.tensor([1.0, 2.0]))
    values = [
        torch.frombuffer(bytearray(raw), dtype=torch.float32)
        for raw in response.raw_output_contents
    ]
    assert_same(values[0], loss.detach())
    assert_same(values[1], grad)


def _status(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), str(info.value.message())


def test_errors_map_to_status_codes(triton: grpcclient.InferenceServerClient) -> None:
    x = grpc_input("input", torch.zeros(2, 3))
    t = grpc_input("target", torch.tensor([7, 0]))
    ok = grpc_input("target", torch.tensor([2, 0]))
    code, message = _status(lambda: triton.infer("focal_loss", [x, t]))
    assert code == "StatusCode.NOT_FOUND" and "focal_loss" in message
    code, message = _status(lambda: triton.infer("cross_entropy", [x, t]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "target" in message
    code, message = _status(
        lambda: triton.infer("cross_entropy", [x, ok], parameters={"reduction": "avg"})
    )
    assert code == "StatusCode.INVALID_ARGUMENT" and "reduction" in message
    code, message = _status(lambda: triton.infer("cross_entropy", [x, t], model_version="2"))
    assert code == "StatusCode.NOT_FOUND" and "version" in message
    code, _ = _status(lambda: triton.get_log_settings())
    assert code == "StatusCode.UNIMPLEMENTED"


def test_api_keys_and_limits(guarded: Server) -> None:
    client = grpcclient.InferenceServerClient(guarded.grpc)
    x, y = torch.ones(2), torch.zeros(2)
    inputs = [grpc_input("input", x), grpc_input("target", y)]
    assert client.is_server_live()  # health answers without a key, as over HTTP
    code, message = _status(lambda: client.infer("mse_loss", inputs))
    assert code == "StatusCode.UNAUTHENTICATED" and "API key" in message
    code, _ = _status(
        lambda: client.infer("mse_loss", inputs, headers={"authorization": "Bearer no"})
    )
    assert code == "StatusCode.UNAUTHENTICATED"
    auth = {"authorization": f"Bearer {KEY}"}
    result = client.infer("mse_loss", inputs, headers=auth)
    assert result.as_numpy("loss").tolist() == [1.0]
    big = [grpc_input("input", torch.ones(2000)), grpc_input("target", torch.ones(2000))]
    code, message = _status(lambda: client.infer("mse_loss", big, headers=auth))
    assert code == "StatusCode.RESOURCE_EXHAUSTED" and "LOSS_SERVICE_MAX" in message
    client.close()


def test_health_service_reflection_and_metrics(server: Server) -> None:
    with grpc.insecure_channel(server.grpc) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    metrics = httpx.get(f"{server.http}/metrics", timeout=10).text
    assert 'route="/inference.GRPCInferenceService/ModelInfer"' in metrics


# --------------------------------------------------------------------------- the aio client


def test_aio_client(server: Server) -> None:
    x, t = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([1, 0])

    async def run() -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(server.grpc)
        try:
            assert await client.is_server_ready()
            inputs = []
            for name, tensor in (("input", x), ("target", t)):
                item = aioclient.InferInput(name, list(tensor.shape), DATATYPE_NAMES[tensor.dtype])
                item.set_data_from_numpy(tensor.numpy())
                inputs.append(item)
            results = await asyncio.gather(
                *(
                    client.infer("CrossEntropyLoss", inputs, parameters={"grad": True})
                    for _ in range(8)
                )
            )
            return [r.as_numpy("grad_input") for r in results]
        finally:
            await client.close()

    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(leaf, t), leaf)
    for grad in asyncio.run(run()):
        assert_same(as_tensor(grad), expected)


def test_misspelt_names_get_the_closest_one(triton: grpcclient.InferenceServerClient) -> None:
    """The suggestions come from the code every front door shares."""
    x = grpc_input("input", torch.zeros(2, 3))
    t = grpc_input("target", torch.tensor([2, 0]))
    code, message = _status(lambda: triton.infer("cross_entropi", [x, t]))
    assert code == "StatusCode.NOT_FOUND" and "(did you mean 'cross_entropy'?)" in message
    code, message = _status(
        lambda: triton.infer("cross_entropy", [x, t], parameters={"label_smothing": 0.1})
    )
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "(did you mean 'label_smoothing'?)" in message
