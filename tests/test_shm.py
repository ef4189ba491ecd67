"""System shared memory (contract section 11), driven by the unmodified
``tritonclient.http``, ``tritonclient.grpc`` and
``tritonclient.utils.shared_memory`` against a real server process: every
loss family through regions, with gradients, bit-identical to the same
``torch.nn.functional`` call in-process; every bad region a 400 /
INVALID_ARGUMENT that names the problem. Every /dev/shm object a test
creates is unlinked by it."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from service.limits import MemoryBudget
from service.protocols.oip import DATATYPE_NAMES
from service.shm import Regions
from tests.conftest import free_port, start_server, stop_server

BUDGET = 64 * 1024 * 1024  # the body pool (a quarter) holds 16 MiB of regions
COUNTER = itertools.count()


@dataclass
class Server:
    http: str  # base URL
    grpc: str  # host:port


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    port = free_port()
    proc, url = start_server(
        {
            "LOSS_SERVICE_DEVICE": "cpu",
            "LOSS_SERVICE_GRPC_PORT": str(port),
            "LOSS_SERVICE_MEMORY_BUDGET_BYTES": str(BUDGET),
        }
    )
    try:
        yield Server(url, f"127.0.0.1:{port}")
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.http.removeprefix("http://"))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def grpc(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        yield client
    finally:
        client.close()


Client = httpclient.InferenceServerClient | grpcclient.InferenceServerClient


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest) -> Client:
    value: Client = request.getfixturevalue(request.param)
    return value


def unique(prefix: str) -> tuple[str, str]:
    """A region name and a POSIX key no other test (or test run) uses."""
    n = next(COUNTER)
    return f"{prefix}_{n}", f"/loss_test_{os.getpid()}_{prefix}_{n}"


@pytest.fixture
def regions(http: httpclient.InferenceServerClient) -> Iterator[Callable[..., Any]]:
    """Create (and register) regions; each is unregistered and unlinked after the test."""
    made: list[tuple[str, Any]] = []

    def make(size: int, prefix: str = "r", register: bool = True) -> tuple[str, str, Any]:
        name, key = unique(prefix)
        handle = shm.create_shared_memory_region(name, key, size, create_only=True)
        made.append((name, handle))
        if register:
            http.register_system_shared_memory(name, key, size)
        return name, key, handle

    yield make
    registered = {r["name"] for r in http.get_system_shared_memory_status()}
    for name, handle in made:
        if name in registered:
            http.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)


def align(n: int) -> int:
    return -(-n // 64) * 64


def protocol(client: Client) -> Any:
    return httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient


def infer_through_regions(
    client: Client,
    make: Callable[..., Any],
    model: str,
    tensors: dict[str, torch.Tensor],
    outputs: dict[str, tuple[torch.dtype, list[int]]],
    parameters: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Every input from one region, every output into another; the outputs as
    read back from the region."""
    mod = protocol(client)
    in_size = sum(align(t.nbytes) for t in tensors.values())
    name_in, _, handle_in = make(in_size, "in")
    inputs = []
    offset = 0
    for arg, tensor in tensors.items():
        shm.set_shared_memory_region(handle_in, [tensor.numpy()], offset=offset)
        item = mod.InferInput(arg, list(tensor.shape), DATATYPE_NAMES[tensor.dtype])
        item.set_shared_memory(name_in, tensor.nbytes, offset=offset)
        inputs.append(item)
        offset += align(tensor.nbytes)
    sizes = {n: torch.empty(s, dtype=d).nbytes for n, (d, s) in outputs.items()}
    name_out, _, handle_out = make(sum(align(s) for s in sizes.values()), "out")
    requested, places = [], {}
    offset = 0
    for output, size in sizes.items():
        item = mod.InferRequestedOutput(output)
        item.set_shared_memory(name_out, size, offset=offset)
        requested.append(item)
        places[output] = offset
        offset += align(size)
    result = client.infer(model, inputs, outputs=requested, parameters=parameters)
    read = {}
    for output, (dtype, shape) in outputs.items():
        described = result.get_output(output)
        if isinstance(described, dict):  # REST: no data, and the region's parameters
            assert "data" not in described
            assert described["parameters"]["shared_memory_region"] == name_out
        assert list(described["shape"] if isinstance(described, dict) else described.shape) == (
            shape
        )
        array = shm.get_contents_as_numpy(
            handle_out, torch.empty(0, dtype=dtype).numpy().dtype, shape, offset=places[output]
        )
        read[output] = torch.from_numpy(array.copy())
    return read


def expected(
    fn: Callable[..., torch.Tensor], tensors: dict[str, torch.Tensor], grad: list[str], **kw: Any
) -> dict[str, torch.Tensor]:
    leaves = {k: v.clone().requires_grad_(k in grad) for k, v in tensors.items()}
    value = fn(**leaves, **kw)
    # ones as the upstream gradient, as the service's default
    grads = torch.autograd.grad(value, [leaves[g] for g in grad], torch.ones_like(value))
    result = {"loss": value.detach().reshape(1) if value.dim() == 0 else value.detach()}
    result.update({f"grad_{g}": t for g, t in zip(grad, grads, strict=True)})
    return result


def assert_bitwise(actual: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == wanted.keys()
    for name, tensor in wanted.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, equal_nan=True)


def _family_cases() -> list[tuple[str, dict[str, torch.Tensor], list[str], dict[str, Any]]]:
    g = torch.Generator().manual_seed(16)
    log_probs = torch.randn(12, 2, 5, generator=g).log_softmax(2)
    return [
        (  # classification
            "cross_entropy",
            {"input": torch.randn(8, 5, generator=g), "target": torch.randint(0, 5, (8,))},
            ["input"],
            {"label_smoothing": 0.1},
        ),
        (  # regression, per element
            "mse_loss",
            {"input": torch.randn(4, 3, generator=g), "target": torch.randn(4, 3, generator=g)},
            ["input", "target"],
            {"reduction": "none"},
        ),
        (  # margin
            "margin_ranking_loss",
            {
                "input1": torch.randn(6, generator=g),
                "input2": torch.randn(6, generator=g),
                "target": torch.randint(0, 2, (6,)).float() * 2 - 1,
            },
            ["input1", "input2"],
            {"margin": 0.25},
        ),
        (  # sequence: CTC
            "ctc_loss",
            {
                "log_probs": log_probs,
                "targets": torch.randint(1, 5, (2, 4)),
                "input_lengths": torch.tensor([12, 10]),
                "target_lengths": torch.tensor([4, 3]),
            },
            ["log_probs"],
            {},
        ),
    ]


@pytest.mark.parametrize("case", _family_cases(), ids=lambda c: c[0])
def test_every_family_through_regions_equals_torch(
    client: Client,
    regions: Callable[..., Any],
    case: tuple[str, dict[str, torch.Tensor], list[str], dict[str, Any]],
) -> None:
    model, tensors, grad, options = case
    wanted = expected(getattr(F, model), tensors, grad, **options)
    outputs = {n: (t.dtype, list(t.shape)) for n, t in wanted.items()}
    parameters: dict[str, Any] = {**options, "grad": ",".join(grad)}
    actual = infer_through_regions(client, regions, model, tensors, outputs, parameters)
    assert_bitwise(actual, wanted)


def test_regions_mix_with_binary_tensors(
    http: httpclient.InferenceServerClient, regions: Callable[..., Any]
) -> None:
    """The input from a region at an offset, the target as binary data; the
    loss back as binary data, the gradient into a region."""
    x = torch.randn(16, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (16,))
    wanted = expected(F.cross_entropy, {"input": x, "target": target}, ["input"])
    name, _, handle = regions(128 + x.nbytes + x.nbytes)
    shm.set_shared_memory_region(handle, [x.numpy()], offset=128)
    item = httpclient.InferInput("input", [16, 7], "FP64").set_shared_memory(name, x.nbytes, 128)
    t = httpclient.InferInput("target", [16], "INT64")
    t.set_data_from_numpy(target.numpy())
    grad = httpclient.InferRequestedOutput("grad_input")
    grad.set_shared_memory(name, x.nbytes, offset=128 + x.nbytes)
    result = http.infer(
        "CrossEntropyLoss", [item, t], outputs=[httpclient.InferRequestedOutput("loss"), grad]
    )
    assert torch.equal(torch.from_numpy(result.as_numpy("loss").copy()), wanted["loss"])
    out = result.get_output("grad_input")
    assert out["shape"] == [16, 7]
    assert out["parameters"]["shared_memory_region"] == name
    written = shm.get_contents_as_numpy(handle, np.float64, [16, 7], offset=128 + x.nbytes)
    assert torch.equal(torch.from_numpy(written.copy()), wanted["grad_input"])


def test_status_lists_regions_and_v2_lists_the_extension(
    server: Server,
    http: httpclient.InferenceServerClient,
    grpc: grpcclient.InferenceServerClient,
    regions: Callable[..., Any],
) -> None:
    name, key, _ = regions(256)
    assert http.get_system_shared_memory_status(name) == [
        {"name": name, "key": key, "offset": 0, "byte_size": 256}
    ]
    status = grpc.get_system_shared_memory_status(name, as_json=True)
    assert status["regions"][name]["key"] == key
    assert status["regions"][name]["byte_size"] == "256"
    extensions = httpx.get(f"{server.http}/v2").json()["extensions"]
    assert "system_shared_memory" in extensions
    assert ("cuda_shared_memory" in extensions) == torch.cuda.is_available()
    assert "system_shared_memory" in grpc.get_server_metadata().extensions


# --------------------------------------------------------------------------- refusals


def refused(call: Callable[[], Any], *words: str) -> str:
    """The call fails with a 400 / INVALID_ARGUMENT whose message holds ``words``."""
    with pytest.raises(InferenceServerException) as excinfo:
        call()
    status, message = excinfo.value.status(), excinfo.value.message()
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (status, message)
    for word in words:
        assert word in message, (word, message)
    return str(message)


@pytest.mark.parametrize(
    "key",
    ["/../etc/passwd", "a/b", "..", "/.", "/dev/shm/x", "", "x\x00y"],
    ids=["dotdot-path", "slash", "dotdot", "dot", "absolute", "empty", "nul"],
)
def test_keys_outside_dev_shm_are_refused(client: Client, key: str) -> None:
    refused(
        lambda: client.register_system_shared_memory("bad_key", key, 8),
        "not a POSIX shared-memory name",
    )


def test_a_symbolic_link_in_dev_shm_is_refused(client: Client, tmp_path: Any) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * 64)
    name, key = unique("link")
    link = f"/dev/shm{key}"
    os.symlink(outside, link)
    try:
        refused(lambda: client.register_system_shared_memory(name, key, 8), "cannot be opened")
    finally:
        os.unlink(link)


def test_bad_registrations_are_refused(client: Client, regions: Callable[..., Any]) -> None:
    name, key, _ = regions(64, register=False)
    refused(lambda: client.register_system_shared_memory(name, "/no_such_key_16", 8), "no shared")
    refused(lambda: client.register_system_shared_memory(name, key, 65), "runs past the end")
    refused(
        lambda: client.register_system_shared_memory(name, key, 8, offset=64), "runs past the end"
    )
    refused(lambda: client.register_system_shared_memory(name, key, 0), "at least 1")
    client.register_system_shared_memory(name, key, 64)
    refused(lambda: client.register_system_shared_memory(name, key, 64), "already registered")
    refused(lambda: client.unregister_system_shared_memory("never_registered"), "not registered")
    refused(lambda: client.get_system_shared_memory_status("never_registered"), "not registered")


def test_a_region_over_the_budget_is_refused(
    http: httpclient.InferenceServerClient, regions: Callable[..., Any]
) -> None:
    name, key, _ = regions(BUDGET // 4 + 4096, register=False)
    with pytest.raises(InferenceServerException) as excinfo:
        http.register_system_shared_memory(name, key, BUDGET // 4 + 4096)
    assert excinfo.value.status() == "413"
    assert "memory budget" in str(excinfo.value.message())


def _cross_entropy(
    mod: Any, region: str, size: int, offset: int = 0
) -> tuple[list[Any], torch.Tensor]:
    x = mod.InferInput("input", [4, 3], "FP32").set_shared_memory(region, size, offset)
    target = torch.tensor([0, 2, 1, 1])
    t = mod.InferInput("target", [4], "INT64")
    t.set_data_from_numpy(target.numpy())
    return [x, t], target


def test_bad_references_are_refused(client: Client, regions: Callable[..., Any]) -> None:
    mod = protocol(client)
    name, _, _ = regions(64)

    def infer(region: str, size: int, offset: int = 0, outputs: Any = None) -> Any:
        inputs, _ = _cross_entropy(mod, region, size, offset)
        return lambda: client.infer("cross_entropy", inputs, outputs=outputs)

    refused(infer("no_such_region", 48), "no_such_region", "not registered")
    refused(infer(name, 40), "shared_memory_byte_size is 40", "takes 48 bytes")
    refused(infer(name, 48, offset=32), "runs past the end of region")
    refused(infer(name, 48, offset=4096), "runs past the end of region")
    small = mod.InferRequestedOutput("grad_input")
    small.set_shared_memory(name, 16)
    refused(infer(name, 48, outputs=[small]), "grad_input", "too small", "takes 48 bytes")
    past = mod.InferRequestedOutput("loss")
    past.set_shared_memory(name, 4, offset=62)
    refused(infer(name, 48, outputs=[past]), "runs past the end of region")


def test_unregistered_regions_cannot_be_used(client: Client, regions: Callable[..., Any]) -> None:
    mod = protocol(client)
    name, _, handle = regions(48)
    shm.set_shared_memory_region(handle, [np.ones((4, 3), np.float32)])
    inputs, _ = _cross_entropy(mod, name, 48)
    client.infer("cross_entropy", inputs)  # works while registered
    client.unregister_system_shared_memory(name)
    refused(lambda: client.infer("cross_entropy", inputs), name, "not registered")
    status = client.get_system_shared_memory_status()
    listed = [r["name"] for r in status] if isinstance(status, list) else list(status.regions)
    assert name not in listed


# --------------------------------------------------------------------------- the registry


def test_registry_counts_regions_in_the_budget_and_closes_them() -> None:
    budget = MemoryBudget(1 << 20)
    registry = Regions(budget)
    name, key = unique("unit")
    handle = shm.create_shared_memory_region(name, key, 4096 + 100, create_only=True)
    try:
        registry.register_system(name, key, 4096 + 3, 97)  # an offset off the page grid
        assert budget.used == 97
        shm.set_shared_memory_region(handle, [np.arange(24, dtype=np.int32)], offset=4096 + 4)
        from service.shm import Reference

        tensor = registry.read("input", Reference(name, 96, 1), torch.int32, [24])
        assert torch.equal(tensor, torch.arange(24, dtype=torch.int32))
        registry.close()  # with a tensor still over the mapping: unmapped when it goes
        assert budget.used == 0 and registry.status("system") == []
        assert torch.equal(tensor, torch.arange(24, dtype=torch.int32))
    finally:
        shm.destroy_shared_memory_region(handle)


def test_workers_over_one_turn_shared_memory_off() -> None:
    registry = Regions(MemoryBudget(1 << 20), enabled=False, why_not="LOSS_SERVICE_WORKERS=1")
    assert registry.extensions() == []
    with pytest.raises(Exception, match="LOSS_SERVICE_WORKERS=1"):
        registry.register_system("x", "/x", 0, 8)
