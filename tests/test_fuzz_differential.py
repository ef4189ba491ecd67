"""Differential fuzzing: random losses, shapes (0-dim and empty included),
dtypes, reductions, tensor forms, response encodings and request forms (v1,
a /v1/batch item, v2 JSON) against the same call in-process, bit for bit
(NaN equals NaN); and hostile nesting, integers and dimensions, which must
only ever get a 4xx."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.protocols.oip import DATATYPE_NAMES
from tests.cases import assert_same, decode, encode

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # the same examples each run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HOSTILE = settings(FUZZ, max_examples=250)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
Tensors = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- inputs


def floats(low: float = -8.0, high: float = 8.0) -> st.SearchStrategy[float]:
    finite = st.floats(low, high, allow_nan=False, width=32)
    return st.one_of(finite, finite, finite, st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))


def values(
    draw: st.DrawFn, shape: list[int], dtype: torch.dtype, low: float = -8.0, high: float = 8.0
) -> torch.Tensor:
    n = math.prod(shape)
    # the numbers as the dtype holds them, so the JSON carries them exactly
    data = draw(st.lists(floats(low, high), min_size=n, max_size=n))
    return torch.tensor(data, dtype=torch.float64).to(dtype).reshape(shape)


def shapes(min_dims: int = 0, max_dims: int = 3) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 4), min_size=min_dims, max_size=max_dims)


def elementwise(low: float = -8.0, high: float = 8.0, target_low: float = -8.0) -> Any:
    def build(draw: st.DrawFn, dtype: torch.dtype) -> Tensors:
        shape = draw(shapes())
        return {
            "input": values(draw, shape, dtype, low, high),
            "target": values(draw, shape, dtype, target_low, high),
        }

    return build


def classes(probabilities: bool) -> Any:
    def build(draw: st.DrawFn, dtype: torch.dtype) -> Tensors:
        c = draw(st.integers(1, 4))
        batch = draw(st.sampled_from([[], [draw(st.integers(0, 3))]]))
        input = values(draw, [*batch, c], dtype)
        if probabilities and draw(st.booleans()):
            target = values(draw, [*batch, c], dtype, 0.0, 1.0).nan_to_num(0.5, 1.0, 0.0)
        else:
            n = math.prod(batch)
            target = torch.tensor(
                draw(st.lists(st.integers(0, c - 1) | st.just(-100), min_size=n, max_size=n)),
                dtype=torch.int64,
            ).reshape(batch)
        return {"input": input, "target": target}

    return build


def multi_margin(draw: st.DrawFn, dtype: torch.dtype) -> Tensors:
    c = draw(st.integers(1, 4))
    batch = draw(st.sampled_from([[], [1], [draw(st.integers(1, 3))]]))  # (C) takes [] or [1]
    n = math.prod(batch)
    target = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    input = values(draw, [c] if batch == [1] and draw(st.booleans()) else [*batch, c], dtype)
    return {"input": input, "target": torch.tensor(target, dtype=torch.int64).reshape(batch)}


def pairs(draw: st.DrawFn, dtype: torch.dtype) -> Tensors:
    shape = draw(st.sampled_from([[], [draw(st.integers(0, 4))]]))
    signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=math.prod(shape), max_size=4))
    target = torch.tensor(signs[: math.prod(shape)], dtype=dtype).reshape(shape)
    return {
        "input1": values(draw, shape, dtype),
        "input2": values(draw, shape, dtype),
        "target": target,
    }


def gaussian(draw: st.DrawFn, dtype: torch.dtype) -> Tensors:
    shape = draw(shapes(1))
    return {
        "input": values(draw, shape, dtype),
        "target": values(draw, shape, dtype),
        "var": values(draw, shape, dtype, 0.125, 4.0).nan_to_num(1.0, 1.0, 1.0),
    }


@dataclass(frozen=True)
class Loss:
    name: str
    build: Callable[[st.DrawFn, torch.dtype], Tensors]
    index: tuple[str, ...] = ()  # arguments in an index role


LOSSES = [
    Loss("mse_loss", elementwise()),
    Loss("l1_loss", elementwise()),
    Loss("smooth_l1_loss", elementwise()),
    Loss("huber_loss", elementwise()),
    Loss("soft_margin_loss", elementwise()),
    Loss("binary_cross_entropy_with_logits", elementwise(target_low=0.0)),
    Loss("binary_cross_entropy", elementwise(0.0, 1.0, 0.0)),
    Loss("kl_div", elementwise()),
    Loss("poisson_nll_loss", elementwise(target_low=0.0)),
    Loss("hinge_embedding_loss", elementwise()),
    Loss("cross_entropy", classes(probabilities=True)),
    Loss("nll_loss", classes(probabilities=False), ("target",)),
    Loss("multi_margin_loss", multi_margin, ("target",)),
    Loss("margin_ranking_loss", pairs),
    Loss("gaussian_nll_loss", gaussian),
]


def clean(tensors: Tensors, name: str) -> Tensors:
    """binary_cross_entropy refuses input outside [0, 1] (NaN included)."""
    if name == "binary_cross_entropy":
        tensors["input"] = tensors["input"].nan_to_num(0.5, 1.0, 0.0)
    return tensors


def in_process(
    loss: Loss, tensors: Tensors, reduction: str, grad: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """torch's value and the gradients of its float arguments; None where torch refuses."""
    leaves = {
        n: t.clone().requires_grad_(True)
        for n, t in tensors.items()
        if grad and n in ("input", "input1", "input2")
    }
    try:
        value = getattr(F, loss.name)(**{**tensors, **leaves}, reduction=reduction)
        if not leaves:
            return value.detach(), {}
        grads = torch.autograd.grad(
            value, list(leaves.values()), torch.ones_like(value), allow_unused=True
        )
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    return value.detach(), {
        n: g if g is not None else torch.zeros_like(leaf)
        for (n, leaf), g in zip(leaves.items(), grads, strict=True)
    }


# --------------------------------------------------------------------------- wire


def v1_body(
    tensors: Tensors, form: str, reduction: str, grad: bool, encoding: str, dtype: torch.dtype
) -> dict[str, Any]:
    body: dict[str, Any] = {n: encode(t, form) for n, t in tensors.items()}
    body.update(reduction=reduction, encoding=encoding, dtype=str(dtype).removeprefix("torch."))
    if grad:
        body["grad"] = True
    return body


def v2_body(tensors: Tensors, reduction: str, grad: bool) -> dict[str, Any]:
    inputs = [
        {
            "name": n,
            "shape": list(t.shape),
            "datatype": DATATYPE_NAMES[t.dtype],
            "data": encode(t.reshape(-1), "nested"),
        }
        for n, t in tensors.items()
    ]
    parameters: dict[str, Any] = {"reduction": reduction}
    if grad:
        parameters["grad"] = True
    return {"inputs": inputs, "parameters": parameters}


def v2_tensor(output: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    return decode({"shape": output["shape"], "data": output["data"]}, dtype)


@dataclass(frozen=True)
class Call:
    """A drawn call: the loss, its tensors, options and wire forms."""

    loss: Loss
    tensors: Tensors
    dtype: torch.dtype
    reduction: str
    form: str  # how the request writes tensors
    encoding: str  # how the response writes them
    grad: bool


@st.composite
def calls(draw: st.DrawFn) -> Call:
    loss = draw(st.sampled_from(LOSSES))
    dtype = draw(st.sampled_from(DTYPES))
    tensors = clean(loss.build(draw, dtype), loss.name)
    form = draw(st.sampled_from(["nested", "flat", "b64"]))
    if form == "nested" and any(t.numel() == 0 and t.dim() > 1 for t in tensors.values()):
        form = "flat"  # a nested [] cannot say [0, 3]
    return Call(
        loss,
        tensors,
        dtype,
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        form=form,
        encoding=draw(st.sampled_from(["nested", "flat", "b64"])),
        grad=draw(st.booleans()),
    )


@FUZZ
@given(call=calls(), request_form=st.sampled_from(["v1", "batch", "v2"]))
def test_service_equals_torch(client: TestClient, call: Call, request_form: str) -> None:
    loss, tensors, dtype, reduction = call.loss, call.tensors, call.dtype, call.reduction
    form, encoding, grad = call.form, call.encoding, call.grad
    expected = in_process(loss, tensors, reduction, grad)

    if request_form == "v2":
        response = client.post(
            f"/v2/models/{loss.name}/infer", json=v2_body(tensors, reduction, grad)
        )
        if expected is None:
            assert 400 <= response.status_code < 500, response.text
            return
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        value, grads = expected
        assert_same(v2_tensor(outputs["loss"], value.dtype), value.reshape(value.shape or [1]))
        for name, g in grads.items():
            assert_same(v2_tensor(outputs[f"grad_{name}"], g.dtype), g)
        return

    body = v1_body(tensors, form, reduction, grad, encoding, dtype)
    if request_form == "batch":
        response = client.post("/v1/batch", json={"items": [{"loss": loss.name, **body}]})
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        status = result["error"]["status"] if "error" in result else 200
    else:
        response = client.post(f"/v1/losses/{loss.name}", json=body)
        result, status = response.json(), response.status_code
    if expected is None:
        assert 400 <= status < 500, result
        return
    assert status == 200, result
    value, grads = expected
    assert result["shape"] == list(value.shape)
    assert_same(from_wire(result["value"], value), value)
    for name, g in grads.items():
        assert_same(from_wire(result["grad"][name], g), g)


def from_wire(wire: Any, like: torch.Tensor) -> torch.Tensor:
    """A response tensor; nested JSON cannot say the dimensions after a zero one."""
    tensor = decode(wire, like.dtype)
    return tensor.reshape(like.shape) if like.numel() == 0 else tensor


@FUZZ
@given(
    ints=st.lists(
        st.integers(-(2**64), 2**64) | st.integers(-(2**54), 2**54) | st.integers(-5, 5),
        min_size=1,
        max_size=6,
    ),
    dtype=st.sampled_from(DTYPES),
    form=st.sampled_from(["nested", "flat", "v2"]),
)
def test_integers_in_a_float_role_equal_torch_tensor(
    client: TestClient, ints: list[int], dtype: torch.dtype, form: str
) -> None:
    """Any JSON integer as a float is torch.tensor(json_value, dtype) exactly."""
    expected = torch.tensor(ints, dtype=dtype)
    zeros = [0] * len(ints)
    name = str(dtype).removeprefix("torch.")
    if form == "v2":
        response = client.post(
            "/v2/models/l1_loss/infer",
            json={
                "inputs": [
                    {"name": n, "shape": [len(ints)], "datatype": DATATYPE_NAMES[dtype], "data": d}
                    for n, d in (("input", ints), ("target", zeros))
                ],
                "parameters": {"reduction": "none"},
            },
        )
        assert response.status_code == 200, response.text
        assert_same(v2_tensor(response.json()["outputs"][0], dtype), expected.abs())
        return
    wrap = (lambda d: d) if form == "nested" else (lambda d: {"shape": [len(d)], "data": d})
    body = {"input": wrap(ints), "target": wrap(zeros), "reduction": "none", "dtype": name}
    response = client.post("/v1/losses/l1_loss", json=body)
    assert response.status_code == 200, response.text
    assert_same(decode(response.json()["value"], dtype), expected.abs())


# --------------------------------------------------------------------------- hostile


def nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def deep_json(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


PLACES = [
    "input",
    "ragged",
    "data",
    "shape",
    "grad_output",
    "batch",
    "v2_data",
    "v2_shape",
    "v2_id",
]


@HOSTILE
@given(
    depth=st.integers(65, 1100),  # a tensor has at most 64 dimensions
    place=st.sampled_from(PLACES),
    large=st.booleans(),
)
def test_hostile_nesting_is_only_ever_a_4xx(
    client: TestClient, depth: int, place: str, large: bool
) -> None:
    deep = deep_json(depth)
    pad = b"[" + b"0.5," * 20000 + b"0.5]" if large else b"[0.5]"
    path = "/v1/losses/mse_loss"
    v2_inputs = (
        b'{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]},'
        b'{"name": "target", "shape": [1], "datatype": "FP32", "data": [1]}'
    )
    if place.startswith("v2"):
        path = "/v2/models/mse_loss/infer"
        body = {
            "v2_data": b'{"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", '
            b'"data": [1, %s]}], "pad": %s}' % (deep, pad),
            "v2_shape": b'{"inputs": [{"name": "input", "shape": %s, "datatype": "FP32", '
            b'"data": [1]}], "pad": %s}' % (deep, pad),
            "v2_id": b'{"inputs": [%s], "id": %s, "pad": %s}' % (v2_inputs, deep, pad),
        }[place]
    elif place == "batch":
        path = "/v1/batch"
        body = b'{"items": [{"loss": "mse_loss", "input": %s, "target": %s}]}' % (deep, pad)
    else:
        field = {
            "input": b'"input": %s' % deep,
            "ragged": b'"input": [[1], %s]' % deep,
            "data": b'"input": {"shape": [2], "data": [1, %s]}' % deep,
            "shape": b'"input": {"shape": %s, "data": [1]}' % deep,
            "grad_output": b'"input": [1], "grad": true, "grad_output": %s' % deep,
        }[place]
        body = b'{%s, "target": %s}' % (field, pad)
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    status = response.status_code
    if place == "batch" and status == 200:  # the item fails alone
        status = response.json()["results"][0]["error"]["status"]
    assert 400 <= status < 500, response.text[:500]
    # and the server still answers right
    good = client.post("/v1/losses/mse_loss", json={"input": [1.0, 2.0], "target": [0.0, 0.0]})
    assert good.json()["value"] == 2.5


BIG_INTEGERS = st.sampled_from(
    [2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63), -(2**63) - 1]
) | st.integers(-(2**80), 2**80)


@HOSTILE
@given(
    value=BIG_INTEGERS,
    where=st.sampled_from(["target", "ignore_index", "blank", "targets", "lengths", "v2_target"]),
)
def test_huge_integers_in_index_roles_are_refused_or_right(
    client: TestClient, value: int, where: str
) -> None:
    """Outside int64 an index is a 422, never wrapped; inside, torch's answer
    or torch's refusal."""
    x = [[1.0, 2.0]]
    if where in ("blank", "targets", "lengths"):
        body: dict[str, Any] = {
            "log_probs": [[[-1.0, -1.0]]] * 3,
            "targets": [[1]],
            "input_lengths": [3],
            "target_lengths": [1],
        }
        if where == "blank":
            body["blank"] = value
        elif where == "targets":
            body["targets"] = [[value]]
        else:
            body["input_lengths"] = [value]
        response = client.post("/v1/losses/ctc_loss", json=body)
    elif where == "v2_target":
        response = client.post(
            "/v2/models/cross_entropy/infer",
            json={
                "inputs": [
                    {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
                    {"name": "target", "shape": [1], "datatype": "INT64", "data": [value]},
                ]
            },
        )
    elif where == "target":
        body = {"input": x, "target": [value], "ignore_index": -(2**63), "reduction": "sum"}
        response = client.post("/v1/losses/cross_entropy", json=body)
    else:
        body = {"input": x, "target": [0], "ignore_index": value}
        response = client.post("/v1/losses/cross_entropy", json=body)
        if -(2**63) <= value < 2**63:  # a fine ignore_index: torch's value
            expected = F.cross_entropy(torch.tensor(x), torch.tensor([0]), ignore_index=value)
            assert response.status_code == 200, response.text
            assert_same(decode(response.json()["value"], torch.float32), expected)
    assert response.status_code < 500, response.text
    if not -(2**63) <= value < 2**63:
        assert 400 <= response.status_code < 500, response.text


DIMENSIONS = st.sampled_from([0, 1, 2, 3, 2**31, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**70])


@HOSTILE
@given(
    shape=st.lists(DIMENSIONS, min_size=1, max_size=4),
    form=st.sampled_from(["data", "b64", "v2", "v2_binary", "batch"]),
    reduction=st.sampled_from(["none", "sum"]),
    encoding=st.sampled_from(["nested", "flat", "b64"]),
)
def test_huge_dimensions_are_only_ever_a_4xx_or_torchs_value(
    client: TestClient, shape: list[int], form: str, reduction: str, encoding: str
) -> None:
    n = math.prod(shape)
    data: list[float] = [0.5] * n if n <= 16 else []
    if form.startswith("v2"):
        item: dict[str, Any] = {"shape": shape, "datatype": "FP32"}
        if form == "v2":
            item["data"] = data
        else:
            item["parameters"] = {"binary_data_size": 4 * len(data)}
        header = json.dumps(
            {
                "inputs": [{"name": "input", **item}, {"name": "target", **item}],
                "parameters": {"reduction": reduction},
            }
        ).encode()
        raw = b"" if form == "v2" else torch.tensor(data * 2).numpy().tobytes()
        response = client.post(
            "/v2/models/mse_loss/infer",
            content=header + raw,
            headers={"inference-header-content-length": str(len(header))},
        )
        status = response.status_code
    else:
        key = "data" if form != "b64" else "b64"
        wire = base64.b64encode(torch.tensor(data).numpy().tobytes()).decode()
        tensor = {"shape": shape, key: data if key == "data" else wire}
        body = {"input": tensor, "target": tensor, "reduction": reduction, "encoding": encoding}
        if form == "batch":
            response = client.post("/v1/batch", json={"items": [{"loss": "mse_loss", **body}]})
            assert response.status_code == 200, response.text
            result = response.json()["results"][0]
            status = result["error"]["status"] if "error" in result else 200
        else:
            response = client.post("/v1/losses/mse_loss", json=body)
            status = response.status_code
    extent = math.prod(max(d, 1) for d in shape)  # what the per-tensor limit weighs
    if n == len(data) and extent <= 2**26:  # a tensor the service takes
        assert status == 200, response.text
        return
    assert 400 <= status < 500, response.text


@pytest.mark.parametrize("request_form", ["v1", "batch"])
def test_a_0_dim_gradient_is_a_bare_number(client: TestClient, request_form: str) -> None:
    x = torch.tensor(1.5, requires_grad=True)
    loss = F.mse_loss(x, torch.tensor(1.0))
    (grad,) = torch.autograd.grad(loss, x)
    body = {"input": 1.5, "target": 1.0, "grad": True}
    if request_form == "batch":
        result = client.post("/v1/batch", json={"items": [{"loss": "mse_loss", **body}]}).json()
        result = result["results"][0]
    else:
        result = client.post("/v1/losses/mse_loss", json=body).json()
    assert result["grad"]["input"] == grad.item()
