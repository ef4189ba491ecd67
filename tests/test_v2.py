"""The Open Inference Protocol endpoints, driven by an unmodified
``tritonclient.http`` against a real uvicorn process.

Expected values come from the same ``torch.nn.functional`` call in-process;
on the CPU and in the same dtype they must be equal bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.losses import LOSSES


@pytest.fixture(scope="module")
def triton(live_server: str) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=live_server.removeprefix("http://"))
    try:
        yield client
    finally:
        client.close()


def make_input(name: str, array: np.ndarray, *, binary: bool = True) -> httpclient.InferInput:
    datatypes = {
        np.dtype(np.float32): "FP32",
        np.dtype(np.float64): "FP64",
        np.dtype(np.float16): "FP16",
        np.dtype(np.int64): "INT64",
        np.dtype(np.int32): "INT32",
        np.dtype(ml_dtypes.bfloat16): "BF16",
    }
    tensor = httpclient.InferInput(name, list(array.shape), datatypes[array.dtype])
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def as_tensor(result: httpclient.InferResult, name: str) -> torch.Tensor:
    array = result.as_numpy(name)
    assert array is not None, f"output {name} missing from {result.get_response()}"
    return torch.from_numpy(np.array(array))


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype and bit-for-bit values (a 0-dim result travels as shape [1])."""
    expected = expected.detach()
    if expected.dim() == 0:
        expected = expected.reshape(1)
    assert actual.dtype == expected.dtype
    assert list(actual.shape) == list(expected.shape)
    assert torch.equal(actual, expected), (actual, expected)


def logits_and_classes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    input = torch.randn(4, 5, generator=g)
    target = torch.randint(0, 5, (4,), generator=g)
    return input.numpy(), target.numpy()


# --------------------------------------------------------------------------- health and metadata


def test_liveness_and_readiness(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("cross_entropy")
    assert triton.is_model_ready("CrossEntropyLoss")
    assert triton.is_model_ready("mse_loss", model_version="1")
    assert not triton.is_model_ready("no_such_loss")


def test_server_metadata(triton: httpclient.InferenceServerClient) -> None:
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "loss-service"
    assert isinstance(metadata["version"], str)
    assert "binary_tensor_data" in metadata["extensions"]


@pytest.mark.parametrize("name", list(LOSSES))
def test_model_metadata_for_every_loss(triton: httpclient.InferenceServerClient, name: str) -> None:
    spec = LOSSES[name]
    metadata = triton.get_model_metadata(spec.alias)
    assert metadata["name"] == spec.name
    assert [i["name"] for i in metadata["inputs"]] == [*spec.tensor_names, "grad_output"]
    for tensor in metadata["inputs"] + metadata["outputs"]:
        assert tensor["datatype"] in ("FP32", "INT64")
        assert tensor["shape"] == [-1]  # any shape: the rank is torch's to check
    outputs = [o["name"] for o in metadata["outputs"]]
    assert outputs[0] == "loss"
    assert outputs[1:] == [f"grad_{n}" for n in spec.maybe_differentiable]


def test_model_metadata_datatypes(triton: httpclient.InferenceServerClient) -> None:
    metadata = triton.get_model_metadata("cross_entropy")
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs["input"]["datatype"] == "FP32"
    assert inputs["input"]["parameters"]["datatypes"] == ["FP16", "BF16", "FP32", "FP64"]
    assert inputs["target"]["datatype"] == "INT64"
    assert "INT8" in inputs["target"]["parameters"]["datatypes"]
    assert inputs["weight"]["parameters"]["required"] is False


def test_unknown_model_raises(triton: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        triton.get_model_metadata("no_such_loss")
    assert excinfo.value.status() == "404"
    assert "cross_entropy" in excinfo.value.message()

    input, target = logits_and_classes()
    with pytest.raises(InferenceServerException) as excinfo:
        triton.infer("no_such_loss", [make_input("input", input), make_input("target", target)])
    assert excinfo.value.status() == "404"
    assert "unknown loss" in excinfo.value.message()


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("model", ["cross_entropy", "CrossEntropyLoss", "crossentropyloss"])
def test_cross_entropy_binary_inputs_and_outputs(
    triton: httpclient.InferenceServerClient, model: str
) -> None:
    input, target = logits_and_classes()
    result = triton.infer(model, [make_input("input", input), make_input("target", target)])
    expected = F.cross_entropy(torch.from_numpy(input), torch.from_numpy(target))
    assert_same(as_tensor(result, "loss"), expected)
    assert result.get_response()["model_name"] == "cross_entropy"
    assert [o["name"] for o in result.get_response()["outputs"]] == ["loss"]
    assert "binary_data_size" in result.get_output("loss")["parameters"]


def test_json_inputs_and_json_outputs(triton: httpclient.InferenceServerClient) -> None:
    input, target = logits_and_classes(1)
    result = triton.infer(
        "CrossEntropyLoss",
        [
            make_input("input", input, binary=False),
            make_input("target", target, binary=False),
        ],
        outputs=[
            httpclient.InferRequestedOutput("loss", binary_data=False),
            httpclient.InferRequestedOutput("grad_input", binary_data=False),
        ],
        parameters={"reduction": "sum", "label_smoothing": 0.1},
        request_id="request-17",
    )
    response = result.get_response()
    assert response["id"] == "request-17"
    assert all("data" in o for o in response["outputs"])

    x = torch.from_numpy(input).requires_grad_(True)
    expected = F.cross_entropy(x, torch.from_numpy(target), reduction="sum", label_smoothing=0.1)
    (grad,) = torch.autograd.grad(expected, [x])
    assert_same(as_tensor(result, "loss"), expected)
    assert_same(as_tensor(result, "grad_input"), grad)


def test_grad_parameter_returns_gradients(triton: httpclient.InferenceServerClient) -> None:
    input, target = logits_and_classes(2)
    result = triton.infer(
        "cross_entropy",
        [make_input("input", input), make_input("target", target)],
        parameters={"grad": True, "reduction": "mean"},
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["loss", "grad_input"]
    x = torch.from_numpy(input).requires_grad_(True)
    expected = F.cross_entropy(x, torch.from_numpy(target))
    (grad,) = torch.autograd.grad(expected, [x])
    assert_same(as_tensor(result, "loss"), expected)
    assert_same(as_tensor(result, "grad_input"), grad)


def test_mse_loss_fp64_reduction_none_and_selected_output(
    triton: httpclient.InferenceServerClient,
) -> None:
    g = torch.Generator().manual_seed(3)
    input = torch.randn(3, 4, dtype=torch.float64, generator=g)
    target = torch.randn(3, 4, dtype=torch.float64, generator=g)
    result = triton.infer(
        "MSELoss",
        [make_input("input", input.numpy()), make_input("target", target.numpy())],
        outputs=[httpclient.InferRequestedOutput("loss")],
        parameters={"reduction": "none"},
    )
    assert_same(as_tensor(result, "loss"), F.mse_loss(input, target, reduction="none"))
    assert result.get_output("loss")["datatype"] == "FP64"


def test_outputs_select_gradients_without_grad_parameter(
    triton: httpclient.InferenceServerClient,
) -> None:
    g = torch.Generator().manual_seed(4)
    input = torch.randn(5, generator=g)
    target = torch.randn(5, generator=g)
    result = triton.infer(
        "mse_loss",
        [make_input("input", input.numpy()), make_input("target", target.numpy())],
        outputs=[
            httpclient.InferRequestedOutput("grad_target"),
            httpclient.InferRequestedOutput("grad_input", binary_data=False),
        ],
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["grad_target", "grad_input"]
    x, t = input.clone().requires_grad_(True), target.clone().requires_grad_(True)
    grad_x, grad_t = torch.autograd.grad(F.mse_loss(x, t), [x, t])
    assert_same(as_tensor(result, "grad_input"), grad_x)
    assert_same(as_tensor(result, "grad_target"), grad_t)


def test_kl_div_with_options(triton: httpclient.InferenceServerClient) -> None:
    g = torch.Generator().manual_seed(5)
    input = torch.log_softmax(torch.randn(4, 6, generator=g), dim=1)
    target = torch.log_softmax(torch.randn(4, 6, generator=g), dim=1)
    result = triton.infer(
        "KLDivLoss",
        [make_input("input", input.numpy()), make_input("target", target.numpy(), binary=False)],
        parameters={"reduction": "batchmean", "log_target": True, "grad": "input,target"},
    )
    x, t = input.clone().requires_grad_(True), target.clone().requires_grad_(True)
    expected = F.kl_div(x, t, reduction="batchmean", log_target=True)
    grad_x, grad_t = torch.autograd.grad(expected, [x, t])
    assert_same(as_tensor(result, "loss"), expected)
    assert_same(as_tensor(result, "grad_input"), grad_x)
    assert_same(as_tensor(result, "grad_target"), grad_t)


def test_seed_examples_reproduce(triton: httpclient.InferenceServerClient) -> None:
    """Contract section 4's seed values, through the v2 endpoint."""
    cases: list[tuple[str, dict[str, Any], dict[str, Any], float]] = [
        ("cross_entropy", {"input": [[2, 1], [1, 2]], "target": [1, 0]}, {}, 1.3133),
        ("binary_cross_entropy", {"input": [0.4, 0.1], "target": [0.2, 0.8]}, {}, 1.2275),
        ("nll_loss", {"input": [[3, 1], [2, 4]], "target": [0, 1]}, {}, -3.5),
        (
            "kl_div",
            {"input": [math.log(0.5), math.log(0.2), math.log(0.3)], "target": [0.1, 0.2, 0.7]},
            {"reduction": "sum"},
            0.4322,
        ),
    ]
    for model, tensors, parameters, value in cases:
        index_args = {"target"} if model in ("cross_entropy", "nll_loss") else set()
        inputs = [
            make_input(
                name,
                np.array(data, dtype=np.int64 if name in index_args else np.float32),
            )
            for name, data in tensors.items()
        ]
        result = triton.infer(model, inputs, parameters=parameters)
        assert round(float(as_tensor(result, "loss")[0]), 4) == value, model


def test_bf16_and_fp16_inputs(triton: httpclient.InferenceServerClient) -> None:
    g = torch.Generator().manual_seed(6)
    for dtype, np_dtype in ((torch.bfloat16, ml_dtypes.bfloat16), (torch.float16, np.float16)):
        input = torch.randn(8, generator=g).to(dtype)
        target = torch.randn(8, generator=g).to(dtype)
        result = triton.infer(
            "l1_loss",
            [
                make_input("input", input.float().numpy().astype(np_dtype)),
                make_input("target", target.float().numpy().astype(np_dtype)),
            ],
        )
        loss = result.as_numpy("loss")
        assert loss is not None
        assert result.get_output("loss")["datatype"] == (
            "BF16" if dtype == torch.bfloat16 else "FP16"
        )
        expected = F.l1_loss(input, target).float().reshape(1)
        assert torch.equal(torch.from_numpy(loss.astype(np.float32)), expected)


def test_int32_class_indices_and_mixed_binary_json(
    triton: httpclient.InferenceServerClient,
) -> None:
    input, target = logits_and_classes(7)
    weight = np.linspace(0.5, 1.5, 5, dtype=np.float32)
    result = triton.infer(
        "nll_loss",
        [
            make_input("input", input),
            make_input("target", target.astype(np.int32), binary=False),
            make_input("weight", weight),
        ],
        parameters={"ignore_index": int(target[0])},
    )
    expected = F.nll_loss(
        torch.from_numpy(input),
        torch.from_numpy(target),
        weight=torch.from_numpy(weight),
        ignore_index=int(target[0]),
    )
    assert_same(as_tensor(result, "loss"), expected)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(triton: httpclient.InferenceServerClient, algorithm: str) -> None:
    input, target = logits_and_classes(8)
    result = triton.infer(
        "cross_entropy",
        [make_input("input", input), make_input("target", target)],
        request_compression_algorithm=algorithm,
    )
    expected = F.cross_entropy(torch.from_numpy(input), torch.from_numpy(target))
    assert_same(as_tensor(result, "loss"), expected)


def test_invalid_payload_raises_with_message(triton: httpclient.InferenceServerClient) -> None:
    input, _ = logits_and_classes()
    with pytest.raises(InferenceServerException) as excinfo:
        triton.infer(
            "mse_loss",
            [make_input("input", input), make_input("target", input[:2])],
        )
    assert excinfo.value.status() is not None and excinfo.value.status().startswith("4")
    assert excinfo.value.message()

    with pytest.raises(InferenceServerException) as excinfo:
        triton.infer(
            "mse_loss",
            [make_input("input", input), make_input("target", input)],
            parameters={"reduction": "average"},
        )
    assert "reduction" in excinfo.value.message()
    assert excinfo.value.status() is not None and excinfo.value.status().startswith("4")


def test_versioned_infer(triton: httpclient.InferenceServerClient) -> None:
    input, target = logits_and_classes(9)
    result = triton.infer(
        "cross_entropy",
        [make_input("input", input), make_input("target", target)],
        model_version="1",
    )
    expected = F.cross_entropy(torch.from_numpy(input), torch.from_numpy(target))
    assert_same(as_tensor(result, "loss"), expected)
    with pytest.raises(InferenceServerException):
        triton.get_model_metadata("cross_entropy", model_version="2")
