"""Shared-memory rows of the benchmark (issue 16), in one run: cross_entropy
with the gradient of its input, float32 [N, 1000] with int64 targets, for
N = 4096 and 65536 (limits raised for the latter), each row the median of
its calls:

- in-process: the torch call (tensors over the same host bytes, no copy,
  then the loss and ``torch.autograd.grad``), the physical limit;
- shm http / shm grpc: tritonclient.http / tritonclient.grpc with every
  input read from a system shared-memory region and the loss and gradient
  written into another (the response carries no tensor data); the client
  then holds the gradient as a numpy view of the region (no copy), as a
  co-located client whose tensors live in the region does;
- v2 binary: tritonclient.http with the binary tensor extension (inputs and
  outputs as raw bytes in the HTTP bodies);
- v1 b64: httpx posting ``{"shape", "dtype", "b64"}`` tensors with
  ``encoding: "b64"`` (the body sent as 1 MiB slices: httpx's large-bytes
  path is the slow one), the gradient decoded back into numpy.

    .venv/bin/python -m bench.shm_rows [rounds]

The machine may be shared: compare the ratios of one run, not absolute
times across runs.
"""

from __future__ import annotations

import base64
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import torch
import torch.nn.functional as F
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from tests.conftest import free_port, start_server, stop_server

CLASSES = 1000
SIZES = {4096: 10, 65536: 3}  # rows: calls per round
LIMITS = {
    "LOSS_SERVICE_MAX_TENSOR_ELEMENTS": str(2**28),
    "LOSS_SERVICE_MAX_ELEMENTS_PER_TENSOR": str(2**28),
    "LOSS_SERVICE_MAX_WORK_ELEMENTS": str(2**30),
    "LOSS_SERVICE_MAX_BODY_BYTES": str(2**30),
    "LOSS_SERVICE_MEMORY_BUDGET_BYTES": str(8 * 2**30),
}


def median_ms(call: Callable[[], Any], n: int) -> float:
    call()  # warm: first-touch of the pages, caches
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def in_process(raw_x: bytearray, raw_t: bytearray, n: int) -> Callable[[], Any]:
    def call() -> Any:
        x = torch.frombuffer(raw_x, dtype=torch.float32).reshape(n, CLASSES).requires_grad_()
        t = torch.frombuffer(raw_t, dtype=torch.int64)
        loss = F.cross_entropy(x, t)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.item(), grad

    return call


def chunks(data: bytes, size: int = 1 << 20) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start : start + size]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    port = free_port()
    proc, url = start_server(
        {
            "LOSS_SERVICE_DEVICE": "cpu",
            "LOSS_SERVICE_GRPC_PORT": str(port),
            "LOSS_SERVICE_LOG_LEVEL": "warning",
            **LIMITS,
        }
    )
    address = url.removeprefix("http://")
    http = httpclient.InferenceServerClient(address, network_timeout=600, connection_timeout=600)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    plain = httpx.Client(base_url=url, timeout=600)
    handles: list[Any] = []
    rows: dict[str, list[float]] = {}
    try:
        for n, calls in SIZES.items():
            g = np.random.default_rng(n)
            x = g.standard_normal((n, CLASSES), dtype=np.float32)
            t = g.integers(0, CLASSES, n)
            xb, tb = x.nbytes, t.nbytes
            # the tensors live in the input region; the outputs go to another
            key = f"/loss_bench_{os.getpid()}_{n}"
            h_in = shm.create_shared_memory_region(f"in{n}", key + "_in", xb + tb)
            h_out = shm.create_shared_memory_region(f"out{n}", key + "_out", 64 + xb)
            handles += [h_in, h_out]
            shm.set_shared_memory_region(h_in, [x, t])
            http.register_system_shared_memory(f"in{n}", key + "_in", xb + tb)
            http.register_system_shared_memory(f"out{n}", key + "_out", 64 + xb)

            def shm_call(
                client: Any, mod: Any, n: int = n, xb: int = xb, tb: int = tb, out: Any = h_out
            ) -> Any:
                a = mod.InferInput("input", [n, CLASSES], "FP32")
                a.set_shared_memory(f"in{n}", xb)
                b = mod.InferInput("target", [n], "INT64")
                b.set_shared_memory(f"in{n}", tb, offset=xb)
                loss = mod.InferRequestedOutput("loss")
                loss.set_shared_memory(f"out{n}", 4)
                grad = mod.InferRequestedOutput("grad_input")
                grad.set_shared_memory(f"out{n}", xb, offset=64)
                client.infer("cross_entropy", [a, b], outputs=[loss, grad])
                return shm.get_contents_as_numpy(out, np.float32, [n, CLASSES], offset=64)

            def binary_call(x: np.ndarray = x, t: np.ndarray = t) -> Any:
                a = httpclient.InferInput("input", list(x.shape), "FP32")
                a.set_data_from_numpy(x)
                b = httpclient.InferInput("target", list(t.shape), "INT64")
                b.set_data_from_numpy(t)
                result = http.infer(
                    "cross_entropy",
                    [a, b],
                    outputs=[
                        httpclient.InferRequestedOutput("loss"),
                        httpclient.InferRequestedOutput("grad_input"),
                    ],
                )
                return result.as_numpy("grad_input")

            def b64_call(x: np.ndarray = x, t: np.ndarray = t) -> Any:
                head = b'{"grad": true, "encoding": "b64", "input": {"shape": [%d, %d], ' % (
                    x.shape[0],
                    CLASSES,
                )
                body = b"".join(
                    [
                        head,
                        b'"dtype": "float32", "b64": "',
                        base64.b64encode(x.tobytes()),
                        b'"}, "target": {"shape": [%d], "dtype": "int64", "b64": "' % len(t),
                        base64.b64encode(t.tobytes()),
                        b'"}}',
                    ]
                )
                response = plain.post(
                    "/v1/losses/cross_entropy",
                    content=chunks(body),  # type: ignore[arg-type]  # httpx sends memoryviews as bytes
                    headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
                )
                response.raise_for_status()
                grad = response.json()["grad"]["input"]
                return np.frombuffer(base64.b64decode(grad["b64"]), np.float32)

            raw_x, raw_t = bytearray(x.tobytes()), bytearray(t.tobytes())
            table: dict[str, Callable[[], Any]] = {
                f"in-process [{n},1000]": in_process(raw_x, raw_t, n),
                f"shm http [{n},1000]": lambda: shm_call(http, httpclient),
                f"shm grpc [{n},1000]": lambda: shm_call(grpc, grpcclient),
                f"v2 binary [{n},1000]": binary_call,
                f"v1 b64 [{n},1000]": b64_call,
            }
            # same values everywhere: the gradient of every row equals in-process
            _, want = table[f"in-process [{n},1000]"]()
            for name, call in table.items():
                if not name.startswith("in-process"):
                    got = np.asarray(call()).reshape(n, CLASSES)
                    assert np.array_equal(got, want.numpy()), name
            for _ in range(rounds):
                for name, call in table.items():
                    rows.setdefault(name, []).append(median_ms(call, calls))
            http.unregister_system_shared_memory(f"in{n}")
            http.unregister_system_shared_memory(f"out{n}")
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)
        http.close()
        grpc.close()
        plain.close()
        stop_server(proc)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print(f"cross_entropy + grad(input), float32; {os.cpu_count()} cpus (shared machine)")
    for name, ms in medians.items():
        rounds_text = ", ".join(f"{v:.1f}" for v in rows[name])
        print(f"{name:26s} {ms:9.1f} ms   (round medians {rounds_text})")
    for n in SIZES:
        base = medians[f"in-process [{n},1000]"]
        for kind in ("shm http", "shm grpc", "v2 binary", "v1 b64"):
            ratio = medians[f"{kind} [{n},1000]"] / base
            print(f"{kind} / in-process [{n},1000]: {ratio:.2f}x")


if __name__ == "__main__":
    main()
