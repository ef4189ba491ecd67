"""The hostile suite: attacks on a real server inside a memory-limited cgroup.

The server runs in a child memory cgroup of 1 GiB (cgroup v1
``memory.limit_in_bytes`` where this machine mounts it, else cgroup v2
``memory.max``), exactly as a container limit would hold it: past the limit
the kernel OOM-kills it. Each attack asserts that the process is alive
afterwards, that no answer was a 5xx other than 503, and that ``/healthz``
kept answering within 100 ms (p99) while the attack ran.

Where no cgroup is writable the suite says so on stderr and skips; it never
passes without having run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ROOT, start_server, stop_server

LIMIT_BYTES = 1024**3
ARTIFACTS = Path(os.environ.get("LOSS_SERVICE_ARTIFACTS", ROOT / "artifacts"))
# the suite's own limits, shorter than the defaults so it stays fast
SERVER_ENV = {
    "LOSS_SERVICE_DEVICE": "cpu",
    "LOSS_SERVICE_HEADER_TIMEOUT": "2",
    "LOSS_SERVICE_BODY_TIMEOUT": "3",
    "LOSS_SERVICE_QUEUE_TIMEOUT": "5",
    "LOSS_SERVICE_LOG_LEVEL": "warning",
    "LOSS_SERVICE_IDLE_TRIM_SECONDS": os.environ.get("TRIM", "1"),
}


# The attacking clients run at a low priority (nice 10) and the /healthz
# probe at a high one (nice -10, where allowed): on a small machine the probe
# then measures the server, not the clients' turn for a core (loopback
# uploads cost the sender a lot of CPU).
CLIENT_NICE = 10


def _memory_cgroup_parent() -> tuple[Path, str, str] | None:
    """(this process's memory cgroup directory, limit file, peak file), v1 or v2."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory", path.lstrip("/"))
            return base, "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                base = root / path.lstrip("/")
                if (base / "cgroup.controllers").exists():
                    return base, "memory.max", "memory.peak"
    return None


@dataclass
class Cgroup:
    path: Path
    limit_file: str
    peak_file: str

    @classmethod
    def create(cls, limit: int) -> Cgroup | str:
        """A child memory cgroup with ``limit``, or why there can be none."""
        found = _memory_cgroup_parent()
        if found is None:
            return "no memory cgroup controller is mounted"
        parent, limit_file, peak_file = found
        path = parent / f"loss-service-hostile-{os.getpid()}"
        try:
            path.mkdir(exist_ok=True)
            (path / limit_file).write_text(str(limit))
            swap = path / "memory.memsw.limit_in_bytes"  # no swapping past the limit
            if swap.exists():
                swap.write_text(str(limit))
            elif (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        except OSError as exc:
            return f"cannot create a memory cgroup under {parent}: {exc}"
        return cls(path, limit_file, peak_file)

    def peak(self) -> int:
        try:
            return int((self.path / self.peak_file).read_text())
        except (OSError, ValueError):
            return -1

    def oom_kills(self) -> int:
        try:
            text = (self.path / "memory.oom_control").read_text()
        except OSError:
            text = (self.path / "memory.events").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


@dataclass
class Limited:
    """A server in a 1 GiB cgroup, and what the attacks saw."""

    url: str
    proc: subprocess.Popen[bytes]
    cgroup: Cgroup
    statuses: list[int] = field(default_factory=list)
    idle_rss: int = 0  # resident memory once started, before any attack

    def alive(self) -> bool:
        return self.proc.poll() is None and self.cgroup.oom_kills() == 0

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return -1

    @contextmanager
    def attack(self, name: str) -> Iterator[Callable[[int], None]]:
        """Run an attack while a separate process probes /healthz; afterwards
        the server must be alive, every status the attack saw a non-5xx or
        503, and /healthz p99 under 100 ms."""
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            monitor = subprocess.Popen(
                [sys.executable, "-m", "tests.hostile.monitor", self.url, out.name],
                cwd=ROOT,
            )
            # the probe's first answer comes before the attack: on a busy
            # machine its start-up alone took longer than a fixed half second,
            # and a quick attack was over before it probed once
            ready, deadline = Path(f"{out.name}.ready"), time.monotonic() + 60
            while not ready.exists() and monitor.poll() is None:
                assert time.monotonic() < deadline, f"{name}: the /healthz probe never started"
                time.sleep(0.05)
            ready.unlink(missing_ok=True)
            seen: list[int] = []
            try:
                yield seen.append
            finally:
                monitor.terminate()
                monitor.wait(timeout=10)
            samples = json.loads(Path(out.name).read_text() or "[]")
        self.statuses += seen
        assert self.alive(), f"{name}: the server died (exit {self.proc.poll()})"
        bad = [s for s in seen if s >= 500 and s != 503]
        assert not bad, f"{name}: 5xx answers {bad}"
        assert samples, f"{name}: /healthz was never probed"
        failed = [s for s, _ in samples if s != 200]
        assert not failed, f"{name}: /healthz answered {failed[:5]}"
        latencies = sorted(t for _, t in samples)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        record(name, p99=p99, probes=len(samples), peak=self.cgroup.peak(), rss=self.rss())
        assert p99 < 0.1, f"{name}: /healthz p99 {p99 * 1000:.0f} ms while it ran"
        assert httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200


RESULTS: dict[str, dict[str, float]] = {}


def record(name: str, **values: float) -> None:
    RESULTS[name] = values


def all_at_once(target: Callable[[], None], count: int) -> None:
    """Run ``target`` in ``count`` threads at once and wait for them all."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def send_raw(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """POST ``body`` on a plain socket and return the whole response: a
    client that costs the machine nothing beside the server (httpx spends
    seconds of CPU on large bodies, which the probe would then measure)."""
    parts = urlsplit(url)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as sock:
        try:
            sock.sendall(head.encode())
            sock.sendall(body)
        except OSError:
            pass  # answered (and closed) before the whole body went
        chunks = []
        try:
            while data := sock.recv(1 << 20):
                chunks.append(data)
                response = b"".join(chunks)
                top, sep, rest = response.partition(b"\r\n\r\n")
                if sep:
                    length = next((int(line.split(b":")[1]) for line in top.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                    if len(rest) >= length:
                        return response
        except OSError:
            pass
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _start(env: dict[str, str]) -> Limited:
    cgroup = Cgroup.create(LIMIT_BYTES)
    if isinstance(cgroup, str):
        print(f"\n*** HOSTILE SUITE SKIPPED: {cgroup} ***\n", file=sys.stderr)
        pytest.skip(f"hostile suite needs a writable memory cgroup: {cgroup}")
    procs = cgroup.path / "cgroup.procs"
    wrap = ["sh", "-c", f'echo $$ > "{procs}" && exec "$0" "$@"']
    proc, url = start_server({**SERVER_ENV, **env}, wrap=wrap)
    server = Limited(url, proc, cgroup)
    server.idle_rss = server.rss()
    return server


def _renice(step: int) -> int:
    """Change this process's nice value by ``step`` (every thread of it);
    returns the step taken (0 where lowering it back is not allowed)."""
    before = os.nice(0)
    try:
        os.nice(step)
    except OSError:
        return 0
    return os.nice(0) - before


@pytest.fixture(scope="package")
def limited() -> Iterator[Limited]:
    """The server with its default limits (the suite's shorter timeouts aside)
    in a 1 GiB cgroup."""
    server = _start({})
    niced = _renice(CLIENT_NICE)
    try:
        yield server
    finally:
        _renice(-niced)
        stop_server(server.proc)
        peak = server.cgroup.peak()
        server.cgroup.remove()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        report = {"cgroup_limit": LIMIT_BYTES, "peak": peak, "attacks": RESULTS}
        (ARTIFACTS / "hostile-suite.json").write_text(json.dumps(report, indent=2))
        print(f"\nhostile suite: peak memory {peak / 2**20:.0f} MiB of {LIMIT_BYTES >> 20} MiB",
              file=sys.stderr)  # fmt: skip
