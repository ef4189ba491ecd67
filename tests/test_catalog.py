"""The catalog is generated from the table, and the table's defaults are torch's."""

from __future__ import annotations

import inspect

import pytest
import torch.nn as nn
import torch.nn.functional as F
from fastapi.testclient import TestClient

from service.losses import LOSSES, LossSpec
from tests.cases import assert_same, decode

SPECS = list(LOSSES.values())
ids = [s.name for s in SPECS]


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_defaults_equal_torch_signature(spec: LossSpec) -> None:
    params = inspect.signature(getattr(F, spec.name)).parameters
    for option in spec.options:
        assert option.name in params, f"{option.name} is not an argument of F.{spec.name}"
        assert option.default == params[option.name].default, option.name
    assert params["reduction"].default == "mean"
    for arg in spec.args:
        assert arg.name in params, f"{arg.name} is not an argument of F.{spec.name}"
        assert (params[arg.name].default is inspect.Parameter.empty) == arg.required, arg.name
    torch_args = set(params) - {"size_average", "reduce"}
    assert torch_args == {*spec.tensor_names, *spec.option_names}


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_alias_is_the_torch_nn_class(spec: LossSpec) -> None:
    assert isinstance(getattr(nn, spec.alias), type)


def test_every_functional_loss_is_in_the_table() -> None:
    functional = {
        n
        for n in dir(F)
        if n.endswith("_loss")
        or n
        in {"cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div"}
    }
    assert functional <= set(LOSSES), functional - set(LOSSES)


def test_list(client: TestClient) -> None:
    response = client.get("/v1/losses")
    assert response.status_code == 200
    losses = response.json()["losses"]
    assert [item["name"] for item in losses] == list(LOSSES)
    assert len(losses) == 21


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_describe_by_name_and_alias(client: TestClient, spec: LossSpec) -> None:
    info = client.get(f"/v1/losses/{spec.alias.upper()}").json()
    assert info == client.get(f"/v1/losses/{spec.name}").json()
    assert info["aliases"] == [spec.alias]
    assert [a["name"] for a in info["arguments"]] == spec.tensor_names
    assert {o["name"] for o in info["options"]} == set(spec.option_names)
    reduction = next(o for o in info["options"] if o["name"] == "reduction")
    assert reduction["default"] == "mean" and "none" in reduction["allowed"]
    assert info["formula"] and spec.name in info["description"]
    # the worked example's result is what the service returns for it
    posted = client.post(f"/v1/losses/{spec.name}", json=info["example"]["request"])
    assert posted.status_code == 200 and posted.json() == info["example"]["response"]


def test_example_results_equal_torch() -> None:
    spec = LOSSES["kl_div"]
    from service.losses.info import example_response

    result = example_response(spec)
    import torch

    expected = F.kl_div(
        torch.tensor(spec.example["input"]), torch.tensor(spec.example["target"]), reduction="sum"
    )
    assert_same(decode(result["value"], torch.float32), expected)


def test_unknown_loss_is_404_naming_the_known(client: TestClient) -> None:
    response = client.get("/v1/losses/focal_loss")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "cross_entropy" in response.json()["detail"]
