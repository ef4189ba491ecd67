"""Servers pinned to one core, and the load on the other: wrk for throughput and
c1 latency, sequential requests for the large bodies (service.transfer, not httpx),
/proc for peak RSS."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import httpx

from bench.payloads import Body
from service import transfer

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SERVER_CORE = "0"
START_TIMEOUT_S = 120.0


class BenchError(RuntimeError):
    """A server that did not start or a request that failed: the run is invalid."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A server process pinned to ``SERVER_CORE``; its pid is the serving process."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    log: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    # readiness for a server with no HTTP route (a gRPC one); else GET ready_path
    ready: Callable[[], bool] | None = None
    cores: str = SERVER_CORE  # taskset's list

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["taskset", "-c", self.cores, *self.command],
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.process.returncode} on start:\n"
                    + self.log_tail()
                )
            if self.ready is not None:
                if self.ready():
                    return
            else:
                try:
                    with client(2) as c:
                        if c.get(self.base + self.ready_path).status_code == 200:
                            return
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise BenchError(f"{self.name} not ready after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise BenchError(f"{self.name} died:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def uvicorn_app(name: str, module: str, log_dir: Path, ready_path: str) -> Server:
    """A comparison app: uvicorn, one worker (in-process), no access log."""
    port = free_port()
    command = [
        str(VENV_BIN / "python"),
        "-m",
        "uvicorn",
        module,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return Server(name, command, {}, ready_path, log_dir / f"{name}.log", port)


def service(log_dir: Path) -> Server:
    """The service as shipped: its own CLI, default middleware, metrics and logs."""
    port = free_port()
    env = {
        "LOSS_SERVICE_HOST": "127.0.0.1",
        "LOSS_SERVICE_PORT": str(port),
        "LOSS_SERVICE_DEVICE": "cpu",
        # a free port, not Triton's 8001: another run may hold that one
        "LOSS_SERVICE_GRPC_PORT": str(free_port()),
        # the console script's own sys.path lacks the checkout: without this,
        # a run from another worktree measured the editable install's code
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    command = [str(VENV_BIN / "loss-service"), "serve"]
    return Server("service", command, env, "/readyz", log_dir / "service.log", port)


# --------------------------------------------------------------------------- wrk

LUA = """\
local f = assert(io.open({path}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests": %d, "duration_us": %d, "p50_us": %f, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50.0), e.connect, e.read,
    e.write, e.status, e.timeout))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def wrk_script(body: Body, directory: Path) -> Path:
    slug = body.name.replace(" ", "_")
    data = directory / f"{slug}.body"
    data.write_bytes(body.content)
    headers = "\n".join(
        f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in body.headers.items()
    )
    script = directory / f"{slug}.lua"
    script.write_text(LUA.format(path=_lua_string(str(data)), headers=headers))
    return script


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def wrk(url: str, script: Path, connections: int, seconds: float, what: str) -> WrkResult:
    """One wrk run (one thread; wrk inherits this process's core). Any socket error
    or non-2xx response makes the run invalid."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed on {what}: {proc.stdout}\n{proc.stderr}")
    stats = json.loads(line.removeprefix("BENCH "))
    errors = {k: stats[k] for k in ("connect", "read", "write", "status", "timeout") if stats[k]}
    if errors:
        raise BenchError(f"{what}: wrk saw errors {errors} (status = non-2xx responses)")
    if stats["requests"] == 0:
        raise BenchError(f"{what}: wrk completed no request")
    return WrkResult(stats["requests"], stats["duration_us"] / 1e6, stats["p50_us"] / 1e3)


# --------------------------------------------------------------------------- httpx


def client(timeout: float) -> httpx.Client:
    """A loopback client that ignores any proxy settings of the environment."""
    return httpx.Client(timeout=timeout, trust_env=False)


def post(client: httpx.Client, url: str, body: Body, what: str) -> httpx.Response:
    response = client.post(url, content=body.content, headers=body.headers)
    if response.status_code != 200:
        raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return response


class LargePoster:
    """Large requests through service.transfer, the Python client's own
    connection code: the body goes from memory in 1 MiB pieces and the
    response is read in large pieces (httpx would cost 3-10x curl on large
    bodies and measure itself, not the server). A timed request reads the
    response into one reused buffer, as curl to /dev/null discards it."""

    def __init__(self, timeout: float) -> None:
        self.timeout = httpx.Timeout(timeout)
        self.pools: dict[str, transfer.ConnectionPool] = {}
        self.scratch = bytearray()

    def post(self, url: str, body: Body, what: str, keep: bool = False) -> httpx.Response:
        """One request; ``keep``: the response's body too (else it is read and dropped)."""
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        pool = self.pools.get(base)
        if pool is None:
            pool = self.pools[base] = transfer.ConnectionPool(base, self.timeout)
        content = memoryview(body.content)
        with pool.request("POST", parts.path, [content], len(content), body.headers) as reply:
            if reply.status != 200 or keep or reply.remaining is None:
                response = httpx.Response(reply.status, headers=reply.headers,
                                          content=reply.read_all())  # fmt: skip
            else:
                if len(self.scratch) < reply.remaining:
                    self.scratch = bytearray(reply.remaining)
                reply.read_into(memoryview(self.scratch)[: reply.remaining])
                response = httpx.Response(reply.status, headers=reply.headers)
        if response.status_code != 200:
            raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
        return response

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def __enter__(self) -> LargePoster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def median_seconds(
    client: httpx.Client,
    url: str,
    body: Body,
    what: str,
    repeats: int,
    check: Callable[[httpx.Response], None] | None = None,
) -> float:
    """Median end-to-end seconds of ``repeats`` sequential requests after one warm-up
    (whose response ``check`` validates)."""
    response = post(client, url, body, what)
    if check is not None:
        check(response)
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        post(client, url, body, what)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds(pid: int | str) -> float:
    """The CPU time (user + system) process ``pid`` has used so far."""
    return proc_stat(pid)[1]


def proc_stat(pid: int | str) -> tuple[int, float]:
    """Process ``pid``'s parent and CPU time (user + system) so far, from
    ``/proc/<pid>/stat`` (the fields after the command, which may hold any
    character, ")" included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field such as VmHWM (peak RSS) or VmRSS, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/{pid}/status")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops its servers."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)


# --------------------------------------------------------------------------- report facts


def command_output(*command: str) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (proc.stdout or proc.stderr).strip()


def git_commit() -> str:
    commit = command_output("git", "rev-parse", "--short", "HEAD")
    dirty = command_output("git", "status", "--porcelain", "--", "service", "pyproject.toml")
    return commit + (" + uncommitted changes in service/" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"
