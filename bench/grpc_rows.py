"""gRPC rows of the benchmark (issue 15), with their ceiling measured in the
same run: a bare grpc.aio servicer that answers every ModelInfer with a
constant, in a process of its own pinned to the server core as the service
is. Also v1 JSON against OIP REST JSON for the same small request.

``scripts/bench`` runs ``measure`` as its own section (beside the HTTP rows,
against the same service process); alone:

    .venv/bin/python -m bench.grpc_rows [rounds]

Each side of a ratio uses the same client (tritonclient.grpc; httpx for the
JSON routes), the two sides timed in turn, round after round; the figures
are medians over rounds of c1 medians.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bench import load
from bench.load import BenchError, Server

SMALL_CALLS = 300  # per round and side, after 20 warm-up calls
LARGE_CALLS = 6
ROUNDS = 3

SMALL, BARE_SMALL, LARGE, BARE_LARGE, V1_JSON, V2_JSON = (
    "service gRPC small c1",
    "bare grpc.aio servicer small c1 (ceiling)",
    "service gRPC large [4096,1000]",
    "bare grpc.aio servicer large (receiving the same bytes)",
    "service /v1 small JSON c1 (httpx)",
    "service /v2 small JSON c1 (httpx)",
)
ROWS = (SMALL, BARE_SMALL, LARGE, BARE_LARGE, V1_JSON, V2_JSON)


class Constant(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    RESPONSE = pb.ModelInferResponse(model_name="cross_entropy", model_version="1")

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: object
    ) -> pb.ModelInferResponse:
        return self.RESPONSE


def serve_bare(port: int) -> None:
    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**30)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Constant(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def grpc_ready(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
            except grpc.FutureTimeoutError:
                return False
        return True

    return ready


def bare_server(log_dir: Path) -> Server:
    """The ceiling: the bare servicer, pinned to the server core."""
    port = load.free_port()
    command = [str(load.VENV_BIN / "python"), "-m", "bench.grpc_rows", "--bare", str(port)]
    return Server(
        "bare-grpc", command, {}, "", log_dir / "bare-grpc.log", port, ready=grpc_ready(port)
    )


def c1_ms(call: Callable[[], Any], n: int) -> float:
    for _ in range(min(n, 20)):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def inputs(x: np.ndarray[Any, Any], t: np.ndarray[Any, Any]) -> list[grpcclient.InferInput]:
    a = grpcclient.InferInput("input", list(x.shape), "FP32")
    a.set_data_from_numpy(x)
    b = grpcclient.InferInput("target", list(t.shape), "INT64")
    b.set_data_from_numpy(t)
    return [a, b]


def measure(service: Server, bare: Server, rounds: int = ROUNDS) -> dict[str, float]:
    """Median c1 milliseconds of every row. ``service`` serves HTTP on its
    port and gRPC on LOSS_SERVICE_GRPC_PORT."""
    grpc_port = service.env["LOSS_SERVICE_GRPC_PORT"]
    print(f"== gRPC rows: {rounds} rounds, the service and the bare servicer in turn", flush=True)
    svc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    ceiling = grpcclient.InferenceServerClient(f"127.0.0.1:{bare.port}")
    http = load.client(60)
    small = inputs(np.array([[2, 1], [1, 2]], np.float32), np.array([1, 0], np.int64))
    g = np.random.default_rng(0)
    large = inputs(g.standard_normal((4096, 1000), dtype=np.float32), g.integers(0, 1000, 4096))
    expected = 1.3132616  # cross_entropy [[2, 1], [1, 2]], [1, 0] (contract section 4)
    got = svc.infer("cross_entropy", small).as_numpy("loss")
    if got is None or abs(float(got[0]) - expected) > 1e-6:
        raise BenchError(f"gRPC small request answered {got}, expected {expected}")
    v1 = {"input": [[2, 1], [1, 2]], "target": [1, 0]}
    v2 = {
        "inputs": [
            {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [2, 1, 1, 2]},
            {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, 0]},
        ]
    }

    def post(path: str, body: dict[str, Any]) -> None:
        response = http.post(service.base + path, json=body)
        if response.status_code != 200:
            raise BenchError(f"{path} answered {response.status_code}: {response.text[:200]}")

    calls: dict[str, Callable[[], Any]] = {
        SMALL: lambda: svc.infer("cross_entropy", small),
        BARE_SMALL: lambda: ceiling.infer("cross_entropy", small),
        LARGE: lambda: svc.infer("cross_entropy", large),
        BARE_LARGE: lambda: ceiling.infer("cross_entropy", large),
        V1_JSON: lambda: post("/v1/losses/cross_entropy", v1),
        V2_JSON: lambda: post("/v2/models/cross_entropy/infer", v2),
    }
    rows: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for name, call in calls.items():
                n = LARGE_CALLS if name in (LARGE, BARE_LARGE) else SMALL_CALLS
                rows.setdefault(name, []).append(c1_ms(call, n))
            service.check_alive()
            bare.check_alive()
    finally:
        svc.close()
        ceiling.close()
        http.close()
    return {name: statistics.median(values) for name, values in rows.items()}


def ratios(ms: dict[str, float]) -> list[tuple[str, float, str, bool]]:
    """(what, value, target, met) for the targets of issue 15."""
    small = ms[BARE_SMALL] / ms[SMALL]
    large = ms[LARGE] / ms[BARE_LARGE]
    json = ms[V1_JSON] / ms[V2_JSON]
    return [
        ("gRPC small c1 req/s / bare servicer's", small, ">= 0.6", small >= 0.6),
        ("gRPC large time / bare servicer's", large, "<= 1.5", large <= 1.5),
        ("/v2 JSON small c1 req/s / /v1's", json, ">= 0.9", json >= 0.9),
    ]


def report(ms: dict[str, float]) -> list[str]:
    lines = ["| row | c1 median | c1 req/s |", "|---|---:|---:|"]
    for name in ROWS:
        lines.append(f"| {name} | {ms[name]:.3f} ms | {1000 / ms[name]:,.0f} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
    for what, value, target, met in ratios(ms):
        lines.append(f"| {what} | {value:.2f} | {target} | {'yes' if met else 'NO'} |")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["--bare"]:
        serve_bare(int(argv[1]))
        return 0
    rounds = int(argv[0]) if argv else ROUNDS
    load.exit_on_signals()
    with tempfile.TemporaryDirectory(prefix="loss-bench-grpc-") as tmp:
        service, bare = load.service(Path(tmp)), bare_server(Path(tmp))
        try:
            service.start()
            bare.start()
            print("\n".join(report(measure(service, bare, rounds))))
        finally:
            service.stop()
            bare.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
