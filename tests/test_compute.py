"""What ``plan`` reads of the tensors in its one pass, and ``compute`` then
uses without reading them again."""

from __future__ import annotations

import pytest
import torch

from service.compute import Argument, LossCall, Timings, compute, plan
from service.config import Settings
from service.schemas import parse_options
from tests.cases import CASES, Case


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tensor_bytes_in_are_what_the_tensors_hold(case: Case) -> None:
    spec = case.spec
    arguments: dict[str, Argument] = {  # copies: compute sets requires_grad on them
        name: (value.clone(), True) if isinstance(value, torch.Tensor) else value
        for name, value in case.tensors.items()
    }
    options = parse_options(spec, case.options, ("parameters",))
    call = LossCall(spec, arguments, options, grad=True)
    timings = Timings()
    checked = plan(call, Settings(), timings)
    evaluation = compute(checked, timings)
    tensors = [t for t in case.tensors.values() if isinstance(t, torch.Tensor)]
    assert timings.tensor_bytes_in == sum(t.nbytes for t in tensors) > 0
    assert not checked.on_cuda
    assert evaluation.value.device.type == "cpu"
