"""Open Inference Protocol conformance of both front doors, REST and gRPC,
driven by the unmodified ``tritonclient.http`` and ``tritonclient.grpc``
against one real server process: the integer datatypes, BOOL and BYTES,
which outputs come back, the body's model_name/model_version, the model
metadata, and the statistics, model-repository and model-configuration
extensions.

Expected values come from the same ``torch.nn.functional`` call in-process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.losses import LOSSES
from tests.conftest import free_port, start_server, stop_server

INTEGER_TYPES = {
    "INT8": np.int8,
    "INT16": np.int16,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT32": np.int32,
    "UINT8": np.uint8,
}
LOGITS = np.array([[2.0, 1.0, 0.5], [1.0, 2.0, -1.0]], dtype=np.float32)


@dataclass
class Clients:
    url: str
    http: httpclient.InferenceServerClient
    grpc: grpcclient.InferenceServerClient


@pytest.fixture(scope="module")
def clients() -> Iterator[Clients]:
    port = free_port()
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_GRPC_PORT": str(port)})
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        yield Clients(url, http, grpc)
    finally:
        http.close()
        grpc.close()
        stop_server(proc)


Client = httpclient.InferenceServerClient | grpcclient.InferenceServerClient
FRONT_DOORS = ["http", "grpc"]


def client_of(clients: Clients, door: str) -> Any:
    return clients.http if door == "http" else clients.grpc


def make_input(door: str, name: str, array: np.ndarray, datatype: str) -> Any:
    module = httpclient if door == "http" else grpcclient
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def status_of(excinfo: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(excinfo.value.status())


BAD_REQUEST = {"http": ("400",), "grpc": ("StatusCode.INVALID_ARGUMENT",)}
INVALID = {"http": ("422",), "grpc": ("StatusCode.INVALID_ARGUMENT",)}
NOT_FOUND = {"http": "404", "grpc": "StatusCode.NOT_FOUND"}


# --------------------------------------------------------------------------- datatypes


@pytest.mark.parametrize("door", FRONT_DOORS)
@pytest.mark.parametrize("datatype", list(INTEGER_TYPES))
def test_integer_datatypes_as_class_indices(clients: Clients, door: str, datatype: str) -> None:
    client = client_of(clients, door)
    target = np.array([2, 0], dtype=INTEGER_TYPES[datatype])
    result = client.infer(
        "cross_entropy",
        [make_input(door, "input", LOGITS, "FP32"), make_input(door, "target", target, datatype)],
    )
    expected = F.cross_entropy(torch.from_numpy(LOGITS), torch.tensor([2, 0]))
    assert torch.equal(torch.tensor(result.as_numpy("loss")), expected.reshape(1))


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_integer_lengths_for_ctc(clients: Clients, door: str) -> None:
    """INT16 targets and UINT32 lengths: every index role takes them."""
    g = torch.Generator().manual_seed(3)
    log_probs = torch.randn(6, 2, 4, generator=g).log_softmax(2)
    targets = np.array([[1, 2], [3, 1]], dtype=np.int16)
    input_lengths = np.array([6, 5], dtype=np.uint32)
    target_lengths = np.array([2, 1], dtype=np.uint32)
    result = client_of(clients, door).infer(
        "ctc_loss",
        [
            make_input(door, "log_probs", log_probs.numpy(), "FP32"),
            make_input(door, "targets", targets, "INT16"),
            make_input(door, "input_lengths", input_lengths, "UINT32"),
            make_input(door, "target_lengths", target_lengths, "UINT32"),
        ],
    )
    expected = F.ctc_loss(
        log_probs, torch.tensor([[1, 2], [3, 1]]), torch.tensor([6, 5]), torch.tensor([2, 1])
    )
    assert torch.equal(torch.tensor(result.as_numpy("loss")), expected.reshape(1))


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_uint64_past_int64_is_refused(clients: Clients, door: str) -> None:
    target = np.array([2**63, 0], dtype=np.uint64)
    with pytest.raises(InferenceServerException) as excinfo:
        client_of(clients, door).infer(
            "cross_entropy",
            [
                make_input(door, "input", LOGITS, "FP32"),
                make_input(door, "target", target, "UINT64"),
            ],
        )
    assert status_of(excinfo) in INVALID[door]
    message = excinfo.value.message()
    assert "target" in message and "9223372036854775808" in message and "int64" in message


@pytest.mark.parametrize("door", FRONT_DOORS)
@pytest.mark.parametrize("datatype", ["INT8", "INT64", "BOOL"])
def test_non_float_datatype_in_a_float_role(clients: Clients, door: str, datatype: str) -> None:
    """BOOL and integers in a float role: a 422 naming the input and the float datatypes."""
    numpy_type = np.bool_ if datatype == "BOOL" else np.int64 if datatype == "INT64" else np.int8
    target = np.array([1, 0], dtype=numpy_type)
    with pytest.raises(InferenceServerException) as excinfo:
        client_of(clients, door).infer(
            "binary_cross_entropy",
            [
                make_input(door, "input", np.array([0.4, 0.1], np.float32), "FP32"),
                make_input(door, "target", target, datatype),
            ],
        )
    assert status_of(excinfo) in INVALID[door]
    message = excinfo.value.message()
    for word in ("target", datatype, "FP16, BF16, FP32, FP64"):
        assert word in message, message


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_bool_class_indices_and_bytes_are_refused(clients: Clients, door: str) -> None:
    client = client_of(clients, door)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(
            "cross_entropy",
            [
                make_input(door, "input", LOGITS, "FP32"),
                make_input(door, "target", np.array([True, False]), "BOOL"),
            ],
        )
    assert status_of(excinfo) in INVALID[door]
    assert "target" in excinfo.value.message() and "bool" in excinfo.value.message()
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(
            "cross_entropy",
            [
                make_input(door, "input", LOGITS, "FP32"),
                make_input(door, "target", np.array([b"a", b"b"], dtype=np.object_), "BYTES"),
            ],
        )
    assert status_of(excinfo) in BAD_REQUEST[door]
    assert "datatype" in excinfo.value.message() and "UINT64" in excinfo.value.message()


def test_integer_json_data_out_of_range(clients: Clients) -> None:
    body = {
        "inputs": [
            {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": LOGITS.tolist()},
            {"name": "target", "shape": [2], "datatype": "INT8", "data": [200, 0]},
        ]
    }
    response = httpx.post(f"{clients.url}/v2/models/cross_entropy/infer", json=body)
    assert response.status_code == 422
    assert "target" in response.json()["error"] and "[-128, 127]" in response.json()["error"]


# --------------------------------------------------------------------------- outputs and metadata


def test_outputs_omitted_or_empty_return_what_metadata_promises(clients: Clients) -> None:
    metadata = clients.http.get_model_metadata("mse_loss")
    always = [o["name"] for o in metadata["outputs"] if not o["parameters"]["optional"]]
    assert always == ["loss"]
    inputs = [
        {"name": "input", "shape": [2], "datatype": "FP64", "data": [1.5, 2]},
        {"name": "target", "shape": [2], "datatype": "FP64", "data": [1, 0]},
    ]
    url = f"{clients.url}/v2/models/mse_loss/infer"
    for extra in ({}, {"outputs": []}):
        plain = httpx.post(url, json={"inputs": inputs, **extra}).json()["outputs"]
        assert [o["name"] for o in plain] == always
        with_grad = httpx.post(
            url, json={"inputs": inputs, "parameters": {"grad": True}, **extra}
        ).json()["outputs"]
        assert [o["name"] for o in with_grad] == ["loss", "grad_input"]
    # an FP64 input gives FP64 outputs: one of the datatypes the metadata names
    x = torch.tensor([1.5, 2.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = F.mse_loss(x, y)
    (grad,) = torch.autograd.grad(loss, [x])
    assert with_grad[0]["datatype"] == "FP64" and with_grad[0]["data"] == [loss.item()]
    assert with_grad[1]["data"] == grad.tolist()
    assert "FP64" in metadata["outputs"][0]["parameters"]["datatype"]


@pytest.mark.parametrize("name", list(LOSSES))
def test_model_metadata_lists_grad_output_datatypes_and_any_shape(
    clients: Clients, name: str
) -> None:
    spec = LOSSES[name]
    rest = clients.http.get_model_metadata(name)
    grpc = clients.grpc.get_model_metadata(name, as_json=True)
    assert [i["name"] for i in rest["inputs"]] == [*spec.tensor_names, "grad_output"]
    assert [i["name"] for i in grpc["inputs"]] == [*spec.tensor_names, "grad_output"]
    assert [o["name"] for o in grpc["outputs"]] == [o["name"] for o in rest["outputs"]]
    for tensor in rest["inputs"]:
        assert tensor["shape"] == [-1]
        assert tensor["datatype"] in tensor["parameters"]["datatypes"]
    grad_output = rest["inputs"][-1]["parameters"]
    assert grad_output["required"] is False
    assert grad_output["datatypes"] == ["FP16", "BF16", "FP32", "FP64"]


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_grad_output_input_is_used(clients: Clients, door: str) -> None:
    x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0])
    upstream = torch.tensor([1.0, 2.0, -3.0])
    loss = F.l1_loss(x, y, reduction="none")
    (expected,) = torch.autograd.grad(loss, [x], grad_outputs=upstream)
    module = httpclient if door == "http" else grpcclient
    result = client_of(clients, door).infer(
        "l1_loss",
        [
            make_input(door, "input", x.detach().numpy(), "FP32"),
            make_input(door, "target", y.numpy(), "FP32"),
            make_input(door, "grad_output", upstream.numpy(), "FP32"),
        ],
        outputs=[module.InferRequestedOutput("grad_input")],
        parameters={"reduction": "none"},
    )
    assert torch.equal(torch.tensor(result.as_numpy("grad_input")), expected)


# --------------------------------------------------------------------------- model_name in the body


def test_body_model_name_and_version_checked_against_the_route(clients: Clients) -> None:
    inputs = [
        {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": LOGITS.tolist()},
        {"name": "target", "shape": [2], "datatype": "INT64", "data": [2, 0]},
    ]
    expected = F.cross_entropy(torch.from_numpy(LOGITS), torch.tensor([2, 0])).item()
    url = f"{clients.url}/v2/models/cross_entropy/infer"
    for fields in (
        {"model_name": "cross_entropy", "model_version": "1"},
        {"model_name": "CrossEntropyLoss"},
        {"model_version": ""},
    ):
        response = httpx.post(url, json={**fields, "inputs": inputs})
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [expected]
    for fields, words in (
        ({"model_name": "mse_loss"}, ["model_name", "mse_loss", "cross_entropy"]),
        ({"model_version": "2"}, ["model_version", "'2'", "'1'"]),
        ({"model_name": 7}, ["model_name", "string"]),
    ):
        response = httpx.post(url, json={**fields, "inputs": inputs})
        assert response.status_code == 400, response.text
        for word in words:
            assert word in response.json()["error"], response.text


# --------------------------------------------------------------------------- extensions


def test_extensions_are_listed(clients: Clients) -> None:
    wanted = {"statistics", "model_repository", "model_configuration"}
    assert wanted <= set(clients.http.get_server_metadata()["extensions"])
    assert wanted <= set(clients.grpc.get_server_metadata(as_json=True)["extensions"])


def _counts(stats: dict[str, Any]) -> tuple[int, int, int]:
    (model,) = stats["model_stats"]
    inference = model["inference_stats"]
    return (
        int(model["inference_count"]),
        int(inference["success"].get("count", 0)),
        int(inference["fail"].get("count", 0)),
    )


def test_statistics_count_inferences_of_both_front_doors(clients: Clients) -> None:
    http, grpc = clients.http, clients.grpc
    before = _counts(http.get_inference_statistics("huber_loss"))
    for door in FRONT_DOORS:
        client = client_of(clients, door)
        arrays = [np.array([1.0, 2.0], np.float32), np.array([0.0, 2.5], np.float32)]
        for _ in range(2):
            client.infer(
                "huber_loss",
                [
                    make_input(door, n, a, "FP32")
                    for n, a in zip(("input", "target"), arrays, strict=True)
                ],
            )
        with pytest.raises(InferenceServerException):
            client.infer("huber_loss", [make_input(door, "input", arrays[0], "FP32")])
    after_http = _counts(http.get_inference_statistics("huber_loss", model_version="1"))
    after_grpc = _counts(grpc.get_inference_statistics("huber_loss", as_json=True))
    assert after_http == after_grpc
    assert after_http == (before[0] + 4, before[1] + 4, before[2] + 2)
    everything = http.get_inference_statistics()
    assert sorted(m["name"] for m in everything["model_stats"]) == sorted(LOSSES)
    model = next(m for m in everything["model_stats"] if m["name"] == "huber_loss")
    assert model["inference_stats"]["compute_infer"]["ns"] > 0
    assert model["last_inference"] > 0


def test_stats_paths_are_not_models(clients: Clients) -> None:
    response = httpx.get(f"{clients.url}/v2/models/stats")
    assert response.status_code == 200 and "unknown loss" not in response.text
    missing = httpx.get(f"{clients.url}/v2/models/no_such_loss/stats")
    assert missing.status_code == 404 and "unknown loss" in missing.json()["error"]
    wrong_version = httpx.get(f"{clients.url}/v2/models/mse_loss/versions/2/stats")
    assert wrong_version.status_code == 404


def test_repository_index_load_and_unload(clients: Clients) -> None:
    http, grpc = clients.http, clients.grpc
    rest_index = http.get_model_repository_index()
    grpc_index = grpc.get_model_repository_index(as_json=True)["models"]
    assert sorted(m["name"] for m in rest_index) == sorted(LOSSES)
    assert {m["state"] for m in rest_index} == {"READY"}
    assert [(m["name"], m["state"]) for m in grpc_index] == [
        (m["name"], m["state"]) for m in rest_index
    ]
    for client in (http, grpc):
        client.load_model("MSELoss")
        client.unload_model("mse_loss")
        assert client.is_model_ready("mse_loss")
    for door, client in (("http", http), ("grpc", grpc)):
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model("no_such_loss")
        assert status_of(excinfo) == NOT_FOUND[door]
        with pytest.raises(InferenceServerException) as excinfo:
            client.unload_model("no_such_loss")
        assert status_of(excinfo) == NOT_FOUND[door]
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model("mse_loss", config='{"max_batch_size": 8}')
        assert status_of(excinfo) in BAD_REQUEST[door]
        assert "config" in excinfo.value.message()


def test_model_config_agrees_with_metadata(clients: Clients) -> None:
    metadata = clients.http.get_model_metadata("cross_entropy")
    rest = clients.http.get_model_config("CrossEntropyLoss")
    grpc = clients.grpc.get_model_config("cross_entropy", as_json=True)["config"]
    assert rest["name"] == grpc["name"] == "cross_entropy"
    assert rest["max_batch_size"] == 0
    assert [(i["name"], i["data_type"]) for i in rest["input"]] == [
        (i["name"], f"TYPE_{i['datatype']}") for i in metadata["inputs"]
    ]
    assert [i["name"] for i in grpc["input"]] == [i["name"] for i in rest["input"]]
    assert [o["name"] for o in rest["output"]] == [o["name"] for o in metadata["outputs"]]
    optional = {i["name"] for i in rest["input"] if i["optional"]}
    assert optional == {"weight", "grad_output"}
    with pytest.raises(InferenceServerException) as excinfo:
        clients.grpc.get_model_config("cross_entropy", model_version="2")
    assert status_of(excinfo) == NOT_FOUND["grpc"]
