"""The v2 request and response forms in-process: JSON data shapes, outputs,
parameters and the errors for what the protocol or the loss cannot take."""

from __future__ import annotations

import gzip
import math
from typing import Any

import numpy as np
import orjson
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

HEADER = "Inference-Header-Content-Length"


def tensor(name: str, shape: list[int], datatype: str, data: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def ce_inputs() -> list[dict[str, Any]]:
    return [
        tensor("input", [2, 2], "FP32", [[2, 1], [1, 2]]),
        tensor("target", [2], "INT64", [1, 0]),
    ]


def infer(client: TestClient, body: dict[str, Any], model: str = "cross_entropy") -> Any:
    return client.post(f"/v2/models/{model}/infer", json=body)


def outputs(response: Any) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def error(response: Any, status: int = 400) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


def test_health_bodies(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/MSELoss/ready").json() == {"name": "mse_loss", "ready": True}
    assert "unknown loss" in error(client.get("/v2/models/nope/ready"), 404)


def test_json_data_flat_and_nested_are_the_same(client: TestClient) -> None:
    nested = outputs(infer(client, {"inputs": ce_inputs()}))
    flat_inputs = ce_inputs()
    flat_inputs[0]["data"] = [2, 1, 1, 2]
    flat = outputs(infer(client, {"inputs": flat_inputs}))
    assert nested == flat
    expected = F.cross_entropy(torch.tensor([[2.0, 1], [1, 2]]), torch.tensor([1, 0]))
    assert nested["loss"] == {
        "name": "loss",
        "shape": [1],
        "datatype": "FP32",
        "data": [expected.item()],
    }


def test_id_echoed_and_model_name_canonical(client: TestClient) -> None:
    response = infer(client, {"id": "abc", "inputs": ce_inputs()}, model="crossentropyloss")
    assert response.json()["id"] == "abc"
    assert response.json()["model_name"] == "cross_entropy"
    assert "id" not in infer(client, {"inputs": ce_inputs()}).json()


def test_binary_data_output_for_all(client: TestClient) -> None:
    response = infer(
        client, {"inputs": ce_inputs(), "parameters": {"binary_data_output": True, "grad": True}}
    )
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    header = orjson.loads(response.content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert [o["name"] for o in header["outputs"]] == ["loss", "grad_input"]
    assert sizes == [4, 16]
    assert len(response.content) == length + sum(sizes)
    grad = np.frombuffer(response.content[length + 4 :], dtype=np.float32).reshape(2, 2)
    x = torch.tensor([[2.0, 1], [1, 2]], requires_grad=True)
    (expected,) = torch.autograd.grad(F.cross_entropy(x, torch.tensor([1, 0])), [x])
    assert torch.equal(torch.from_numpy(grad.copy()), expected)


def test_per_output_binary_overrides_the_default(client: TestClient) -> None:
    body = {
        "inputs": ce_inputs(),
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "loss", "parameters": {"binary_data": False}}],
    }
    response = infer(client, body)
    assert HEADER not in response.headers
    assert "data" in outputs(response)["loss"]


def test_reduction_none_keeps_torch_shape_and_fp64(client: TestClient) -> None:
    body = {
        "inputs": [
            tensor("input", [2, 3], "FP64", [0.5, 1.5, -1, 2, 0, 3]),
            tensor("target", [2, 3], "FP64", [0, 0, 0, 1, 1, 1]),
        ],
        "parameters": {"reduction": "none"},
    }
    loss = outputs(infer(client, body, "mse_loss"))["loss"]
    assert loss["shape"] == [2, 3]
    assert loss["datatype"] == "FP64"
    expected = F.mse_loss(
        torch.tensor([0.5, 1.5, -1, 2, 0, 3], dtype=torch.float64),
        torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.float64),
        reduction="none",
    )
    assert loss["data"] == expected.tolist()


def test_grad_output_input_and_grad_list(client: TestClient) -> None:
    body = {
        "inputs": [
            tensor("input", [3], "FP32", [0.5, 1.5, -1]),
            tensor("target", [3], "FP32", [0, 1, 0]),
            tensor("grad_output", [3], "FP32", [1, 2, 3]),
        ],
        "parameters": {"reduction": "none", "grad": ["target"]},
    }
    result = outputs(infer(client, body, "l1_loss"))
    assert list(result) == ["loss", "grad_target"]
    t = torch.tensor([0.0, 1, 0], requires_grad=True)
    loss = F.l1_loss(torch.tensor([0.5, 1.5, -1]), t, reduction="none")
    (expected,) = torch.autograd.grad(loss, [t], torch.tensor([1.0, 2, 3]))
    assert result["grad_target"]["data"] == expected.tolist()


def test_empty_grad_output(client: TestClient) -> None:
    body = {
        "inputs": [
            tensor("input", [0], "FP32", []),
            tensor("target", [0], "FP32", []),
            tensor("grad_output", [0], "FP32", []),
        ],
        "parameters": {"reduction": "none", "grad": True},
    }
    result = outputs(infer(client, body, "mse_loss"))
    assert result["loss"]["shape"] == [0] and result["grad_input"]["shape"] == [0]
    body["parameters"]["binary_data_output"] = True  # type: ignore[index]
    response = infer(client, body, "mse_loss")
    assert response.status_code == 200 and response.headers[HEADER]
    wrong = {**body, "inputs": [*body["inputs"][:2], tensor("grad_output", [1], "FP32", [1])]}
    assert "grad_output" in error(infer(client, wrong, "mse_loss"), 422)


def test_number_argument_as_parameter(client: TestClient) -> None:
    body = {
        "inputs": [tensor("input", [2], "FP32", [1, 2]), tensor("target", [2], "FP32", [1.5, 1])],
        "parameters": {"var": 0.5},
    }
    loss = outputs(infer(client, body, "GaussianNLLLoss"))["loss"]
    expected = F.gaussian_nll_loss(torch.tensor([1.0, 2]), torch.tensor([1.5, 1]), 0.5)
    assert loss["data"] == [expected.item()]


def test_bool_and_uint8_and_nonfinite(client: TestClient) -> None:
    body = {
        "inputs": [
            tensor("input", [3], "FP32", ["NaN", 1, 2]),
            tensor("target", [3], "FP32", [0, 1, 2]),
        ],
        "parameters": {"reduction": "none"},
    }
    assert outputs(infer(client, body, "l1_loss"))["loss"]["data"][0] == "NaN"
    bool_target = {
        "inputs": [
            tensor("input", [2], "FP32", [0.4, 0.1]),
            tensor("target", [2], "BOOL", [True, False]),
        ]
    }
    message = error(infer(client, bool_target, "binary_cross_entropy"), 422)
    assert "target" in message and "floating" in message
    uint8_target = {
        "inputs": [
            tensor("input", [2, 2], "FP32", [2, 1, 1, 2]),
            tensor("target", [2], "UINT8", [1, 0]),
        ]
    }
    assert outputs(infer(client, uint8_target))["loss"]["datatype"] == "FP32"


def test_reserved_client_parameters_are_ignored(client: TestClient) -> None:
    body = {
        "inputs": ce_inputs(),
        "parameters": {"priority": 1, "timeout": 100, "sequence_id": 0},
    }
    assert outputs(infer(client, body))["loss"]["shape"] == [1]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": ce_inputs(), "extra": 1}, ["extra"]),
        ({"inputs": ce_inputs(), "id": 5}, ["id"]),
        ({"inputs": ce_inputs()[:1]}, ["missing", "target"]),
        ({"inputs": [*ce_inputs(), tensor("bias", [1], "FP32", [1])]}, ["unknown input", "bias"]),
        ({"inputs": [*ce_inputs(), ce_inputs()[1]]}, ["twice"]),
        ({"inputs": ce_inputs(), "outputs": [{"name": "value"}]}, ["unknown output", "loss"]),
        (
            {"inputs": ce_inputs(), "outputs": [{"name": "loss"}, {"name": "loss"}]},
            ["twice"],
        ),
        (
            {
                "inputs": ce_inputs(),
                "outputs": [{"name": "loss", "parameters": {"classification": 2}}],
            },
            ["classification"],
        ),
        ({"inputs": ce_inputs(), "parameters": {"beta": 1}}, ["unknown parameter", "beta"]),
        ({"inputs": ce_inputs(), "parameters": {"binary_data_output": "yes"}}, ["boolean"]),
        ({"inputs": [tensor("input", [2], "BYTES", ["a", "b"])]}, ["datatype", "FP32"]),
        ({"inputs": [tensor("input", [-1], "FP32", [1])]}, ["shape"]),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32"}]}, ["neither"]),
        (
            {
                "inputs": [
                    {**tensor("input", [1], "FP32", [1]), "parameters": {"binary_data_size": 4}}
                ]
            },
            ["both"],
        ),
        (
            {
                "inputs": [
                    {
                        **tensor("input", [1], "FP32", [1]),
                        "parameters": {"shared_memory_region": "r"},
                    }
                ]
            },
            # shared memory (tests/test_shm.py) names its region and its size
            ["shared_memory_region needs shared_memory_byte_size"],
        ),
        ({"inputs": [tensor("input", [3], "FP32", [1, 2])]}, ["3 elements", "2"]),
    ],
)
def test_protocol_errors_are_400(client: TestClient, body: Any, words: list[str]) -> None:
    message = error(infer(client, body))
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    ("inputs", "parameters", "words"),
    [
        ([tensor("target", [2], "INT64", [1.5, 0])], {}, ["target", "fractional"]),
        ([tensor("target", [2], "INT64", [7, 0])], {}, ["target", "range"]),
        ([tensor("target", [2], "INT32", [2**40, 0])], {}, ["target", "INT32"]),
        ([tensor("target", [3], "INT64", [1, 0, 1])], {}, ["target"]),
        ([], {"reduction": "avg"}, ["parameters.reduction"]),
        ([], {"size_average": True}, ["reduction"]),
        ([], {"grad": ["target"]}, ["differentiate", "target"]),
        ([], {"grad": 3}, ["parameters.grad"]),
        ([], {"device": "tpu"}, ["device", "cpu"]),
        (
            [tensor("target", [2], "INT64", [2**63, 0])],
            {},
            ["target", "int64", "9223372036854775808"],
        ),
        ([tensor("target", [2], "UINT8", [-1, 0])], {}, ["target", "UINT8", "got -1"]),
        ([tensor("input", [0, 2**63 - 1], "FP32", [])], {}, ["input.shape", "overflow"]),
        ([tensor("input", [0, 2**63], "FP32", [])], {}, ["input.shape", "outside int64"]),
        ([tensor("input", [0, 2**64], "FP32", [])], {}, ["input.shape", "outside int64"]),
    ],
)
def test_invalid_values_are_422(
    client: TestClient, inputs: list[dict[str, Any]], parameters: dict[str, Any], words: list[str]
) -> None:
    given = {t["name"]: t for t in ce_inputs()} | {t["name"]: t for t in inputs}
    message = error(infer(client, {"inputs": list(given.values()), "parameters": parameters}), 422)
    for word in words:
        assert word in message, message


def test_compressed_and_unsupported_encodings(client: TestClient) -> None:
    payload = orjson.dumps({"inputs": ce_inputs()})
    ok = client.post(
        "/v2/models/cross_entropy/infer",
        content=gzip.compress(payload),
        headers={"Content-Encoding": "gzip"},
    )
    assert outputs(ok)["loss"]["shape"] == [1]
    bad = client.post(
        "/v2/models/cross_entropy/infer",
        content=gzip.compress(payload)[:-8],
        headers={"Content-Encoding": "gzip"},
    )
    assert "gzip" in error(bad)
    unsupported = client.post(
        "/v2/models/cross_entropy/infer", content=payload, headers={"Content-Encoding": "br"}
    )
    assert "Content-Encoding" in error(unsupported, 415)


def test_limits_are_413() -> None:
    settings = Settings(device="cpu", max_body_bytes=2000, max_tensor_elements=100)
    with TestClient(create_app(settings), raise_server_exceptions=False) as small:
        big = {"inputs": [tensor("input", [1000], "FP32", [0.5] * 1000)]}
        assert "limit" in error(infer(small, big, "mse_loss"), 413)
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [10**9],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 4 * 10**9},
                    }
                ]
            }
        )
        response = small.post(
            "/v2/models/mse_loss/infer", content=header, headers={HEADER: str(len(header))}
        )
        assert "elements" in error(response, 413)
        bomb = gzip.compress(b" " * 100_000)
        response = small.post(
            "/v2/models/mse_loss/infer", content=bomb, headers={"Content-Encoding": "gzip"}
        )
        assert "limit" in error(response, 413)


def test_openapi_lists_v2_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/models/{name}", "/v2/models/{name}/infer"):
        assert path in paths


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_device_parameter_runs_on_the_gpu(client: TestClient) -> None:
    g = torch.Generator().manual_seed(11)
    input, target = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    x, t = input.numpy().tobytes(), target.numpy().tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [6, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(x)},
                },
                {
                    "name": "target",
                    "shape": [6],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": len(t)},
                },
            ],
            "parameters": {"device": "cuda", "grad": True, "binary_data_output": True},
        }
    )
    response = client.post(
        "/v2/models/cross_entropy/infer",
        content=header + x + t,
        headers={HEADER: str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    values = np.frombuffer(response.content[length:], dtype=np.float32)
    xc = input.cuda().requires_grad_(True)
    expected = F.cross_entropy(xc, target.cuda())
    (grad,) = torch.autograd.grad(expected, [xc])
    assert values[0] == expected.item()
    assert torch.equal(torch.from_numpy(values[1:].copy()).reshape(6, 4), grad.cpu())


@pytest.mark.parametrize("layout", ["nested", "flat", "nonfinite"])
def test_large_json_data_equals_torch(client: TestClient, layout: str) -> None:
    """A JSON body past 64 KiB is parsed as /v1's are (each large array of
    numbers one numpy buffer): nested or flat data, and one holding the
    non-finite strings, give torch's values bit for bit."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((300, 40), dtype=np.float32)
    target = rng.integers(0, 40, 300)
    data: Any = logits.tolist() if layout == "nested" else logits.ravel().tolist()
    expected_input = torch.from_numpy(logits.copy())
    if layout == "nonfinite":
        data[5] = "Infinity"
        expected_input.view(-1)[5] = math.inf
    body = orjson.dumps({
        "inputs": [
            tensor("input", [300, 40], "FP32", data),
            tensor("target", [300], "INT64", target.tolist()),
        ],
        "parameters": {"reduction": "sum"},
    })  # fmt: skip
    assert len(body) > 64 * 1024
    response = client.post(
        "/v2/models/cross_entropy/infer", content=body, headers={"content-type": "application/json"}
    )
    got = outputs(response)["loss"]
    expected = F.cross_entropy(expected_input, torch.from_numpy(target), reduction="sum")
    assert got["datatype"] == "FP32" and got["shape"] == [1]
    (wire,) = got["data"]  # a number, or "NaN" / "Infinity" / "-Infinity"
    value = torch.tensor(float({"Infinity": "inf", "-Infinity": "-inf"}.get(wire, wire)))
    same = torch.equal(value.to(torch.float32), expected) or (
        math.isnan(value.item()) and math.isnan(expected.item())
    )
    assert same, (wire, expected)


def test_large_malformed_json_is_a_400(client: TestClient) -> None:
    """A large body that is not JSON is the same 400 as a small one."""
    body = b'{"inputs": [' + b"1.0, " * 20000 + b"}"
    response = client.post(
        "/v2/models/cross_entropy/infer", content=body, headers={"content-type": "application/json"}
    )
    assert "invalid JSON in the inference request header" in error(response, 400)


@pytest.mark.parametrize("action", ["load", "unload"])
def test_repository_load_and_unload_answer_the_documented_json(
    client: TestClient, action: str
) -> None:
    """The OpenAPI document says application/json for their 200 (schemathesis
    checks it): an empty object, where Triton sends no body."""
    response = client.post(f"/v2/repository/models/BCELoss/{action}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {}
