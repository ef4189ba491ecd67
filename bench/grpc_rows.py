"""gRPC rows of the benchmark (issue 15), with their ceiling measured in the
same run: a bare grpc.aio servicer that answers every ModelInfer with a
constant. Also v1 JSON against OIP REST JSON for the same small request.

    .venv/bin/python -m bench.grpc_rows [rounds]

Prints c1 medians (ms) and the ratios; the client is the same for both
sides of each ratio (tritonclient.grpc; httpx for the JSON routes).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.conftest import free_port, start_server, stop_server

N = 300


class Constant(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    RESPONSE = pb.ModelInferResponse(model_name="cross_entropy", model_version="1")

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: object
    ) -> pb.ModelInferResponse:
        return self.RESPONSE


def bare_server(port: int) -> None:
    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2**30)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Constant(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def c1_ms(call, n: int = N) -> float:
    for _ in range(20):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def inputs(x: np.ndarray, t: np.ndarray) -> list[grpcclient.InferInput]:
    a = grpcclient.InferInput("input", list(x.shape), "FP32")
    a.set_data_from_numpy(x)
    b = grpcclient.InferInput("target", list(t.shape), "INT64")
    b.set_data_from_numpy(t)
    return [a, b]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    gport, bport = free_port(), free_port()
    proc, url = start_server(
        {
            "LOSS_SERVICE_DEVICE": "cpu",
            "LOSS_SERVICE_GRPC_PORT": str(gport),
            "LOSS_SERVICE_LOG_LEVEL": "warning",
        }
    )
    threading.Thread(target=bare_server, args=(bport,), daemon=True).start()
    time.sleep(1)
    service = grpcclient.InferenceServerClient(f"127.0.0.1:{gport}")
    bare = grpcclient.InferenceServerClient(f"127.0.0.1:{bport}")
    http = httpx.Client(base_url=url)
    small = inputs(np.array([[2, 1], [1, 2]], np.float32), np.array([1, 0], np.int64))
    g = np.random.default_rng(0)
    large = inputs(g.standard_normal((4096, 1000), dtype=np.float32), g.integers(0, 1000, 4096))
    v1 = {"input": [[2, 1], [1, 2]], "target": [1, 0]}
    v2 = {
        "inputs": [
            {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [2, 1, 1, 2]},
            {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, 0]},
        ]
    }
    rows: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for name, call in {
                "grpc small c1": lambda: service.infer("cross_entropy", small),
                "bare grpc small c1": lambda: bare.infer("cross_entropy", small),
                "grpc large": lambda: service.infer("cross_entropy", large),
                "bare grpc large": lambda: bare.infer("cross_entropy", large),
                "v1 json small c1": lambda: http.post("/v1/losses/cross_entropy", json=v1),
                "v2 json small c1": lambda: http.post("/v2/models/cross_entropy/infer", json=v2),
            }.items():
                rows.setdefault(name, []).append(c1_ms(call, 10 if "large" in name else N))
    finally:
        stop_server(proc)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    for name, ms in medians.items():
        print(f"{name:24s} {ms:8.3f} ms   ({os.cpu_count()} cpus, rounds {rows[name]})")
    small = medians["bare grpc small c1"] / medians["grpc small c1"]
    large = medians["grpc large"] / medians["bare grpc large"]
    print(f"grpc small / bare: {small:.2f}x the ceiling's rate")
    print(f"grpc large / bare: {large:.2f}x the ceiling's time")
    v1, v2 = medians["v1 json small c1"], medians["v2 json small c1"]
    print(f"v2 json / v1 json small: {v1 / v2:.2f}x v1's rate")


if __name__ == "__main__":
    main()
