"""The Python client against curl, in one run (issue 14).

For cross_entropy on [4096, 1000] and on [16384, 1000] float32 (a body near the
default 64 MiB limit), with the gradient returned and without, the timed
requests take in turn:

- ``client``: ``LossClient.loss(...)`` against the service (encoding, sending,
  computing, receiving and decoding: what a caller waits for);
- ``curl -> service``: curl sending the very bytes the client sends, receiving
  the same response into /dev/null;
- ``curl -> bare``: the same bytes to the bare app, which returns as many bytes
  as the service's response (the transport's ceiling);

and, for the transport alone against the bare app, the client's connection
code (service.transfer, as LossClient uses it) sending the body, and reading a
response of the gradient's size into a new tensor, beside curl doing the same.
That tensor comes from a ResultCache of LossClient's default size, as a large
result does; the one before it was dropped, so its block is read into again
(a loop over results the caller drops; under 32 MiB, results come from
torch.empty, cache or not). Context columns: the cache off (fresh memory),
reading into one tensor kept throughout, and writing as many bytes into fresh
memory without a socket.

Run only these rows: ``scripts/bench --client-only`` (or ``taskset -c 1
.venv/bin/python -m bench.client_rows``). Servers run on core 0, this driver and
curl on core 1, as in bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

from bench import load
from bench.load import BenchError, Server
from service import transfer
from service.client import (
    DEFAULT_RESULT_CACHE_BYTES,
    BinaryRequest,
    LossClient,
    ResultCache,
    binary_request,
    receive_buffer,
)

RESULTS = load.ROOT / "bench" / "results"
SIZES = {"[4096, 1000]": 4096, "[16384, 1000] (body near the 64 MiB limit)": 16384}
CLASSES = 1000
V2_HEADER = "Inference-Header-Content-Length"


@dataclass
class Row:
    """One measured pair: the client's and curl's median seconds."""

    name: str
    client: float
    curl: float
    context: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.client / self.curl


@dataclass
class ClientResults:
    rows: list[Row] = field(default_factory=list)
    sizes_mb: dict[str, float] = field(default_factory=dict)


def curl(url: str, body: Path | None, headers: dict[str, str]) -> float:
    """curl's own time_total for one request; the response goes to /dev/null."""
    command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-X", "POST"]
    if body is not None:
        command += ["--data-binary", f"@{body}"]
    for key, value in headers.items():
        command += ["-H", f"{key}: {value}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    status, seconds = [*out.stdout.split(), "", ""][:2]
    if out.returncode != 0 or status != "200":
        raise BenchError(f"curl {url}: exit {out.returncode}, HTTP {status}: {out.stderr[-300:]}")
    return float(seconds)


def timed(action: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    return run


def interleaved(actions: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each action, after one warm-up each, taken in turn so
    that a slow spell of the shared machine falls on every side of a ratio."""
    times: dict[str, list[float]] = {name: [] for name in actions}
    for action in actions.values():
        action()
    for _ in range(repeats):
        for name, action in actions.items():
            times[name].append(action())
    return {name: statistics.median(values) for name, values in times.items()}


def check(result_value: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor,
          t: torch.Tensor) -> None:  # fmt: skip
    leaf = x.clone().requires_grad_()
    value = F.cross_entropy(leaf, t)
    if not torch.equal(result_value, value.detach()):
        raise BenchError(f"client loss {result_value} != torch {value}")
    if grad is not None and not torch.equal(grad, torch.autograd.grad(value, leaf)[0]):
        raise BenchError("client gradient differs from torch in-process")


def measure_size(
    res: ClientResults, label: str, rows: int, service: Server, bare: Server,
    work: Path, repeats: int,
) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, CLASSES, generator=gen)
    t = torch.randint(0, CLASSES, (rows,), generator=gen)
    with LossClient(service.base, timeout=600) as client:
        for grad in (False, True):
            request = binary_request("cross_entropy", {"input": x, "target": t, "grad": grad}, 0)
            assert isinstance(request, BinaryRequest)
            path = work / f"body-{rows}-{grad}.bin"
            with path.open("wb") as f:
                for part in request.parts:
                    f.write(part)
            res.sizes_mb[label] = request.length / 1e6
            headers = request.headers()
            url = service.base + request.path
            returned = len(httpx.post(url, content=path.read_bytes(), headers=headers,
                                      timeout=600).content)  # fmt: skip
            result = client.loss("cross_entropy", input=x, target=t, grad=grad)
            check(result.value, result.grad.get("input"), x, t)
            echo = {**headers, "x-response-bytes": str(returned)}
            times = interleaved(
                {
                    "client": timed(
                        partial(client.loss, "cross_entropy", input=x, target=t, grad=grad)
                    ),
                    "curl": partial(curl, url, path, headers),
                    "bare": partial(curl, bare.base + "/", path, echo),
                },
                repeats,
            )
            what = "loss and gradient" if grad else "loss only"
            res.rows.append(
                Row(
                    f"{label}, {what}: {request.length / 1e6:.1f} MB up, "
                    f"{returned / 1e6:.1f} MB back; client vs curl, both to the service",
                    times["client"],
                    times["curl"],
                    {"curl -> bare app (ceiling)": times["bare"]},
                )
            )
            print(f"   {res.rows[-1].name}: {times}", flush=True)
            service.check_alive()
    transport_rows(res, label, x, t, bare, work, repeats)


def transport_rows(
    res: ClientResults, label: str, x: torch.Tensor, t: torch.Tensor, bare: Server,
    work: Path, repeats: int,
) -> None:  # fmt: skip
    """The client's connection code alone, against the bare app: up, then down."""
    request = binary_request("cross_entropy", {"input": x, "target": t, "grad": True}, 0)
    assert isinstance(request, BinaryRequest)
    path = work / "transport.bin"
    with path.open("wb") as f:
        for part in request.parts:
            f.write(part)
    down = {"x-response-bytes": str(x.nbytes)}
    pool = transfer.ConnectionPool(bare.base, httpx.Timeout(600))
    results = ResultCache(DEFAULT_RESULT_CACHE_BYTES)

    def upload() -> None:
        with pool.request("POST", "/", request.parts, request.length, request.headers()) as r:
            r.read_all()

    def download(cache: ResultCache | None) -> None:
        with pool.request("POST", "/", [], 0, down) as r:
            tensor = receive_buffer(list(x.shape), torch.float32, cache)
            r.read_into(tensor.view(-1).view(torch.uint8).numpy().data)

    reused = torch.empty(x.shape, dtype=torch.float32)
    reused.fill_(0)

    def download_reused() -> None:
        with pool.request("POST", "/", [], 0, down) as r:
            r.read_into(reused.view(-1).view(torch.uint8).numpy().data)

    def touch() -> None:
        receive_buffer(list(x.shape), torch.float32).view(-1).view(torch.uint8).fill_(1)

    try:
        times = interleaved(
            {
                "touch": timed(touch),
                "client up": timed(upload),
                "curl up": lambda: curl(bare.base + "/", path, request.headers()),
                "client down": timed(lambda: download(results)),
                "curl down": lambda: curl(bare.base + "/", None, down),
                "client down fresh": timed(lambda: download(None)),
                "client down reused": timed(download_reused),
            },
            repeats,
        )
    finally:
        pool.close()
    mb = request.length / 1e6
    res.rows.append(
        Row(f"{label}, transport only: {mb:.1f} MB up to the bare app", times["client up"],
            times["curl up"])
    )  # fmt: skip
    res.rows.append(
        Row(
            f"{label}, transport only: {x.nbytes / 1e6:.1f} MB down from the bare app "
            "(client: into a new tensor from LossClient's result cache; curl: to /dev/null)",
            times["client down"],
            times["curl down"],
            {
                "client with the result cache off (fresh memory)": times["client down fresh"],
                "client into one reused tensor (the transport alone)": times["client down reused"],
                "writing as many bytes into fresh memory, no socket": times["touch"],
            },
        )
    )
    print(f"   {label} transport: {times}", flush=True)


def measure(work: Path, started: list[Server], repeats: int) -> ClientResults:
    res = ClientResults()
    logs = work / "client-logs"
    logs.mkdir(exist_ok=True)
    bare = load.uvicorn_app("bare", "bench.apps.bare_asgi:app", logs, "/")
    service = load.service(logs)
    for server in (bare, service):
        print(f"== {server.name}: starting on core {load.SERVER_CORE}", flush=True)
        started.append(server)
        server.start()
    try:
        for label, rows in SIZES.items():
            print(f"== client rows, cross_entropy {label}", flush=True)
            measure_size(res, label, rows, service, bare, work, repeats)
    finally:
        for server in (bare, service):
            server.stop()
    return res


def report_lines(res: ClientResults, repeats: int) -> list[str]:
    lines = [
        "## The Python client against curl (issue 14)",
        "",
        f"Median of {repeats} requests per column, taken in turn after one warm-up each. "
        "Client = `LossClient.loss(...)` (its /v2 binary call: encode, send, compute, "
        "receive into new tensors, large ones over its result cache's blocks, results checked "
        "bit-equal to torch in-process); curl = "
        "the same bytes, response to /dev/null. Transport rows: the client's connection "
        "code (`service.transfer`) against the bare app.",
        "",
        "| what | client | curl | client / curl | target | context |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in res.rows:
        context = ", ".join(f"{k} {v:.4f} s" for k, v in row.context.items())
        verdict = "PASS" if row.ratio <= 1.3 else "FAIL"
        lines.append(
            f"| {row.name} | {row.client:.4f} s | {row.curl:.4f} s | {row.ratio:.2f} | "
            f"<= 1.3 {verdict} | {context} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.client_rows", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per column (5)")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave bench/results/ alone"
    )
    args = parser.parse_args(argv)
    load.exit_on_signals()
    started_at = datetime.now(UTC)
    started: list[Server] = []
    before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        with tempfile.TemporaryDirectory(prefix="loss-bench-client-") as tmp:
            res = measure(Path(tmp), started, args.repeats)
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in started:
            server.stop()
    after = Path("/proc/loadavg").read_text().split()[:3]
    text = "\n".join(
        [
            f"# loss-service client benchmark, {started_at:%Y-%m-%d %H:%M:%S} UTC",
            "",
            f"- commit: {load.git_commit()}",
            f"- machine: {platform.node()}, {load.cpu_model()}, {os.cpu_count()} cores; "
            f"load average {' '.join(before)} before, {' '.join(after)} after",
            f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
            f"{load.command_output('curl', '--version').splitlines()[0]}",
            "",
            *report_lines(res, args.repeats),
            "",
        ]
    )
    print("\n" + text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in (f"client-{started_at:%Y%m%dT%H%M%SZ}.md", "client-latest.md"):
            (RESULTS / name).write_text(text)
            print(f"wrote bench/results/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
