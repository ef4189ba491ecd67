"""Instructions per small request, counted by valgrind: a measure of the
small-request path that a shared machine's noise does not move (issue 19).

Each target's raw request bytes are fed to its HTTP protocol in one process
(uvicorn's for the FastAPI floor, the service's connection layer for /v1 and
v2 JSON), through a transport that keeps what is written, one request at a
time with an event-loop step between them as a server has. valgrind counts
the instructions of a run of N requests and of a run of none (after the same
warm-up); the difference over N is the count per request, the log lines and
metrics included. The hash seed is fixed, numpy's BLAS has no threads of its
own, and the log is flushed every 50 requests, not by its timer: work driven
by the clock, a random seed or idle threads otherwise moved the count by up
to 30k per request between runs.

    .venv/bin/python -m bench.instructions [floor v1 v2json] [--requests 1000]

Needs valgrind (``apt-get install valgrind``); about 2 minutes per target.
Instructions are not time: the service's request runs through torch, numpy
and orjson, and retires fewer instructions per cycle than the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import payloads

TARGETS = {
    "floor": "/v1/losses/cross_entropy",
    "v1": "/v1/losses/cross_entropy",
    "v2json": "/v2/models/cross_entropy/infer",
}
WARM_UP = 300
FLUSH_EVERY = 50


def request_bytes(target: str) -> bytes:
    small = payloads.tensors("small")
    body = payloads.v2_json(small).content if target == "v2json" else payloads.nested(small)
    head = (
        f"POST {TARGETS[target]} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        f"Content-Length: {len(body)}\r\ncontent-type: application/json\r\n\r\n"
    )
    return head.encode() + body


class Transport:
    """What a protocol writes, kept; nothing else."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.out.extend(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def serve(target: str, count: int) -> None:
    """The child: warm up, then ``count`` requests (what valgrind counts)."""
    os.environ.update(LOSS_SERVICE_DEVICE="cpu", LOSS_SERVICE_GRPC_PORT="0")
    import uvloop
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    flushers: list[Any] = []
    protocol: Any = HttpToolsProtocol
    lifespan: asyncio.Future[Any] | None = None
    if target == "floor":
        from bench.apps.fastapi_floor import app
    else:
        import torch

        import service.api.middleware
        import service.main
        from service.api.connections import GuardedHttpToolsProtocol

        service.api.middleware.RECORD_DELAY = 3600.0  # flushed below instead
        # one thread, as the benchmark's server pinned to one core has: idle
        # pool threads spin for a while, and valgrind counts every spin
        torch.set_num_threads(1)
        app = service.main.create_app()
        flushers = app.state.runtime.flushers
        protocol = GuardedHttpToolsProtocol
        lifespan = loop.run_until_complete(start(app))  # kept: its task lives on
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 30 Nov 2026 07:55:24 GMT"), (b"server", b"uvicorn")]
    config = Config(app=app, lifespan="off", proxy_headers=False, access_log=False, log_config=None)
    request = request_bytes(target)

    async def run(n: int) -> list[bytes]:
        connection = protocol(config=config, server_state=state, app_state={}, _loop=loop)
        transport = Transport()
        connection.connection_made(transport)
        for i in range(n):
            transport.out.clear()
            connection.data_received(request)
            while not transport.out or not transport.out[-1].endswith(b"}"):
                await asyncio.sleep(0)
            await asyncio.sleep(0)
            if i % FLUSH_EVERY == FLUSH_EVERY - 1:
                for flush in flushers:
                    flush()
        return transport.out

    out = loop.run_until_complete(run(WARM_UP))
    if not out[0].startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"{target}: {out[0][:200]!r}")
    loop.run_until_complete(run(count))
    for flush in flushers:
        flush()
    if lifespan is not None:
        lifespan.cancel()


async def start(app: Any) -> asyncio.Future[Any]:
    """The app's lifespan start-up, as a server runs it; its task (which
    waits for the shut-down that never comes)."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan: asyncio.Future[Any] = asyncio.ensure_future(app(scope, inbox.get, outbox.put))
    await outbox.get()
    return lifespan


def count(target: str, requests: int) -> int:
    """valgrind's instruction count of a child serving ``requests``."""
    with tempfile.TemporaryDirectory() as work:
        log = Path(work) / "valgrind.log"
        subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
             f"--log-file={log}", sys.executable, "-m", "bench.instructions", "--child", target,
             "--requests", str(requests)],
            # numpy's OpenBLAS threads poll while idle, and valgrind counted
            # up to 10k instructions per request of that polling: one thread
            env={**os.environ, "PYTHONHASHSEED": "0", "LOSS_SERVICE_LOG_LEVEL": "info",
                 "OPENBLAS_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
        )  # fmt: skip
        found = re.search(r"I\s+refs:\s+([\d,]+)", log.read_text())
        if found is None:
            raise SystemExit(f"valgrind gave no count for {target}: see {log}")
        return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Instructions per small request (valgrind).")
    parser.add_argument("targets", nargs="*", help=f"of {', '.join(TARGETS)} (all by default)")
    parser.add_argument("--requests", type=int, default=1000, help="requests counted (1000)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    named = [*args.targets, *([args.child] if args.child else [])]
    unknown = [t for t in named if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if args.child:
        serve(args.child, args.requests)
        return
    for target in args.targets or list(TARGETS):
        per_request = (count(target, args.requests) - count(target, 0)) / args.requests
        print(f"{target}: {per_request / 1000:,.1f}k instructions per request", flush=True)


if __name__ == "__main__":
    main()
