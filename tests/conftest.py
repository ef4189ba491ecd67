"""Shared fixtures: the app in-process (httpx over ASGI) and a real uvicorn
process for the tests where the wire matters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    """The app in-process, over httpx (no sockets). Without the request log: its
    lines are written in batches from the client's event-loop thread, between
    tests' output captures (test_operations checks the log)."""
    app = create_app(Settings(device="cpu", log_level="warning"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOGS: dict[int, IO[bytes]] = {}


def server_log(proc: subprocess.Popen[bytes]) -> str:
    """What a server started by start_server wrote to stderr (its logs)."""
    log = LOGS[proc.pid]
    log.seek(0)
    return log.read().decode(errors="replace")


def start_server(
    env: dict[str, str] | None = None, wrap: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A real uvicorn process serving the app on a free loopback port (``wrap``:
    a command that execs the server's, e.g. to enter a cgroup first)."""
    port = free_port()
    full_env = {**os.environ, "LOSS_SERVICE_HOST": "127.0.0.1", "LOSS_SERVICE_PORT": str(port)}
    full_env.update(env or {})
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop_server)
    proc = subprocess.Popen(
        [*(wrap or []), sys.executable, "-m", "service.cli", "serve"],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        # a file, not a pipe: nobody reads the request log while tests run, and a
        # full pipe would block the server
        stderr=log,
    )
    LOGS[proc.pid] = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = server_log(proc)
            LOGS.pop(proc.pid).close()
            raise RuntimeError(f"server exited with {proc.returncode}: {err[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError("server did not become ready in 60 s")


def wait_for_workers(proc: subprocess.Popen[bytes], workers: int) -> None:
    """Until each of a server's ``workers`` processes has said it is ready:
    start_server returns when the first one answers /readyz."""
    deadline = time.monotonic() + 60
    while server_log(proc).count("Application startup complete.") < workers:
        assert time.monotonic() < deadline, server_log(proc)
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    LOGS.pop(proc.pid).close()


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """Base URL of a real uvicorn process with the default settings (CPU)."""
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu"})
    try:
        yield url
    finally:
        stop_server(proc)
