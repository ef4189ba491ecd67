"""Issue 19's extra rows for small requests: where the service's time goes
(a py-spy profile of the serving process under the small /v1 load, summed
by layer), and how req/s scales with ``LOSS_SERVICE_WORKERS=2`` against 1.

``scripts/bench`` runs both after the main table; alone (servers started
here, the profile needs py-spy from the dev extra):

    .venv/bin/python -m bench.small_rows
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import load, payloads
from bench.load import BenchError, Server

CE_PATH = "/v1/losses/cross_entropy"
PROFILE_SECONDS = 8
PROFILE_RATE = 200  # samples per second
SCALING_SECONDS = 4
SCALING_ROUNDS = 3

# Where a sampled frame's file lies -> the layer it is counted under (the
# first that matches, in this order).
LAYERS = (
    ("service.api: routes, request middleware, body reading, runtime", "/service/api/"),
    ("service.protocols: wire formats (v1 JSON, OIP)", "/service/protocols/"),
    ("service.compute + service.losses: checks, cost, the call", "/service/compute.py"),
    ("service.compute + service.losses: checks, cost, the call", "/service/losses/"),
    ("service.tensors + fastjson: the tensor codec", "/service/tensors.py"),
    ("service.tensors + fastjson: the tensor codec", "/service/fastjson.py"),
    ("service: metrics, logs, other", "/service/"),
    ("torch (the loss itself, tensor creation)", "/torch/"),
    ("numpy", "/numpy/"),
    ("pydantic (option and envelope validation)", "/pydantic"),
    ("orjson", "orjson"),
    ("starlette / fastapi", "/starlette/"),
    ("starlette / fastapi", "/fastapi/"),
    ("uvicorn + httptools (HTTP parsing, writing responses)", "/uvicorn/"),
    ("uvicorn + httptools (HTTP parsing, writing responses)", "httptools"),
    ("event loop (asyncio / uvloop)", "/asyncio/"),
    ("event loop (asyncio / uvloop)", "uvloop"),
)
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


@dataclass
class Profile:
    samples: int = 0
    layers: dict[str, int] = field(default_factory=dict)  # by the innermost frame
    functions: list[tuple[str, int]] = field(default_factory=list)  # top self time
    note: str = ""


@dataclass
class Scaling:
    one: float = 0.0  # req/s with LOSS_SERVICE_WORKERS=1
    two: float = 0.0
    rounds_one: list[float] = field(default_factory=list)
    rounds_two: list[float] = field(default_factory=list)


def layer_of(frame: str) -> str:
    match = FRAME.match(frame)
    # py-spy writes paths relative to sys.path ("service/api/v1.py"), or whole
    where = "/" + (match.group("file") if match else frame)
    for name, marker in LAYERS:
        if marker in where:
            return name
    return "other (C calls, the interpreter)"


def summarise(raw: str, top: int = 12) -> Profile:
    """py-spy's raw (collapsed) stacks -> samples by layer and the functions
    with most self time (the innermost frame of each sample)."""
    profile = Profile()
    layers: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        innermost = stack.rsplit(";", 1)[-1]
        profile.samples += n
        layers[layer_of(innermost)] += n
        match = FRAME.match(innermost)
        if match:
            short = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", match.group("file"))
            short = re.sub(r"^.*/(service|bench)/", r"\1/", short)
            innermost = f"{match.group('function')} ({short})"
        functions[innermost] += n
    profile.layers = dict(layers.most_common())
    profile.functions = functions.most_common(top)
    return profile


def profile_service(server: Server, script: Path) -> Profile:
    """py-spy on the serving process while wrk -c16 sends small /v1 requests."""
    spy = shutil.which("py-spy", path=str(load.VENV_BIN)) or shutil.which("py-spy")
    if spy is None:
        return Profile(note="py-spy is not installed (pip install -e '.[dev]'); no profile")
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "stacks.txt"
        command = [
            spy, "record", "--pid", str(server.pid), "--rate", str(PROFILE_RATE),
            "--duration", str(PROFILE_SECONDS), "--format", "raw", "--output", str(out),
            # only the thread holding the GIL: the gRPC poller's thread waits in
            # C and would otherwise count as busy
            "--gil",
        ]  # fmt: skip
        recorder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        load.wrk(server.base + CE_PATH, script, 16, PROFILE_SECONDS + 1, "profile c16")
        output, _ = recorder.communicate(timeout=60)
        if recorder.returncode != 0 or not out.exists():
            text = output.decode(errors="replace").strip().splitlines()
            return Profile(note=f"py-spy failed: {text[-1] if text else recorder.returncode}")
        return summarise(out.read_text())


def scaling(logs: Path, started: list[Server]) -> Scaling:
    """req/s at c16 for LOSS_SERVICE_WORKERS=1 and 2, both on every core
    (wrk shares them), taken in turn round by round."""
    result = Scaling()
    body = payloads.Body("small nested", payloads.nested(payloads.tensors("small")))
    script = load.wrk_script(body, logs)
    servers = []
    for workers in (1, 2):
        server = load.service(logs)
        server.name = f"service-{workers}w"
        server.env["LOSS_SERVICE_WORKERS"] = str(workers)
        server.cores = "0-1"
        servers.append(server)
    try:
        for workers, server in enumerate(servers, start=1):
            started.append(server)
            server.start()
            wait_for_workers(server, workers)
            load.wrk(server.base + CE_PATH, script, 16, 1, f"{server.name} warm-up")
        for _ in range(SCALING_ROUNDS):
            for server, rounds in zip(servers, (result.rounds_one, result.rounds_two), strict=True):
                run = load.wrk(server.base + CE_PATH, script, 16, SCALING_SECONDS, server.name)
                rounds.append(run.rps)
        for server in servers:
            server.check_alive()
    finally:
        for server in servers:
            server.stop()
    result.one = statistics.median(result.rounds_one)
    result.two = statistics.median(result.rounds_two)
    return result


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its children (the workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent, seconds = load.proc_stat(entry.name)
        except OSError:  # gone meanwhile
            continue
        if entry.name == str(pid) or parent == pid:
            total += seconds
    return total


def wait_for_workers(server: Server, workers: int, timeout: float = 180.0) -> None:
    """Until every worker process has started: the first one ready answers
    /readyz while the others still load torch on the same cores, so wait
    until the server's processes go quiet (under 5% of a core for 1 s)."""
    deadline = time.monotonic() + timeout
    before = tree_cpu_seconds(server.pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        server.check_alive()
        now = tree_cpu_seconds(server.pid)
        if now - before < 0.05:
            return
        before = now
    raise BenchError(f"{server.name}: {workers} workers still starting after {timeout:.0f} s")


def report(profile: Profile | None, scale: Scaling | None) -> list[str]:
    lines: list[str] = []
    if profile is not None:
        lines += [
            "## Where the service's time goes (issue 19)",
            "",
            f"py-spy, {PROFILE_RATE} samples/s for {PROFILE_SECONDS} s, on the serving process "
            "(the thread holding the GIL) while wrk -c16 sends the small /v1 request (a run of "
            "its own, after the measured rounds). Each sample is counted under the layer of "
            "its innermost Python frame; "
            "time in C (torch's kernels, orjson, httptools) falls to the Python frame that "
            "called it.",
            "",
        ]
        if profile.note:
            lines += [profile.note, ""]
        elif profile.samples:
            lines += ["| layer | share of samples |", "|---|---:|"]
            for name, n in profile.layers.items():
                lines.append(f"| {name} | {100 * n / profile.samples:.1f}% |")
            lines += ["", "| function (self time) | share |", "|---|---:|"]
            for name, n in profile.functions:
                lines.append(f"| `{name}` | {100 * n / profile.samples:.1f}% |")
            lines.append("")
    if scale is not None:
        lines += [
            "## Workers (issue 19)",
            "",
            f"The small /v1 request at c16 against `LOSS_SERVICE_WORKERS=1` and `=2`, each "
            f"server on both cores (wrk shares them), {SCALING_ROUNDS} rounds of "
            f"{SCALING_SECONDS} s taken in turn; median req/s.",
            "",
            "| workers | req/s | rounds |",
            "|---:|---:|---|",
            f"| 1 | {scale.one:,.0f} | {', '.join(f'{r:,.0f}' for r in scale.rounds_one)} |",
            f"| 2 | {scale.two:,.0f} | {', '.join(f'{r:,.0f}' for r in scale.rounds_two)} |",
            "",
            f"Scaling: 2 workers / 1 = {scale.two / scale.one:.2f} on this machine's "
            f"{os.cpu_count()} cores, where wrk takes a share of the same cores. Each of N "
            "workers takes 1/N of the CPUs for torch's threads unless "
            "`LOSS_SERVICE_TORCH_THREADS` says otherwise (with torch's default in each, two "
            "workers made about 300 req/s here).",
            "",
        ]
    return lines


def main() -> int:
    load.exit_on_signals()
    started: list[Server] = []
    with tempfile.TemporaryDirectory() as work:
        logs = Path(work)
        server = load.service(logs)
        body = payloads.Body("small nested", payloads.nested(payloads.tensors("small")))
        script = load.wrk_script(body, logs)
        try:
            started.append(server)
            server.start()
            load.wrk(server.base + CE_PATH, script, 16, 1, "warm-up")
            profile = profile_service(server, script)
        finally:
            server.stop()
        scale = scaling(logs, started)
    print("\n".join(report(profile, scale)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        sys.exit(1)
