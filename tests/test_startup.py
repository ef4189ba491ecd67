"""Starting the server, as a new user does: settings checked before it
listens (one line naming the variable, no traceback), the start-up line,
``--version``, ``python -m service`` and ``GET /version`` (contract §12).
All through real subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service import __version__
from service.cli import browsable_url
from service.config import Settings, torch_threads
from tests.conftest import (
    ROOT,
    free_port,
    server_log,
    start_server,
    stop_server,
    wait_for_workers,
)

BIN = Path(sys.executable).parent
LAUNCHERS = {
    "loss-service serve": [str(BIN / "loss-service"), "serve"],
    "uvicorn service.main:app": [str(BIN / "uvicorn"), "service.main:app", "--port", "0"],
}
# A CUDA index no machine has: refused with the list of what this one has.
ABSENT_CUDA = f"cuda:{torch.cuda.device_count() + 8}"
BAD_SETTINGS = {
    "device gpu": ("LOSS_SERVICE_DEVICE", "gpu", "expected auto, cpu, cuda or cuda:N"),
    "device absent": ("LOSS_SERVICE_DEVICE", ABSENT_CUDA, "allowed here: auto, cpu"),
    "port abc": ("LOSS_SERVICE_PORT", "abc", "valid integer"),
    "port range": ("LOSS_SERVICE_PORT", "70000", "less than or equal to 65535"),
    "log level": ("LOSS_SERVICE_LOG_LEVEL", "loud", "'debug', 'info', 'warning' or 'error'"),
    "workers": ("LOSS_SERVICE_WORKERS", "none", "valid integer"),
}


def expected_versions(devices: list[str]) -> dict[str, object]:
    return {
        "name": "loss-service",
        "version": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": devices,
    }


def local_devices() -> list[str]:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


@pytest.fixture(scope="module")
def refused() -> dict[tuple[str, str], subprocess.CompletedProcess[str]]:
    """Every bad setting under both launchers, started together (each imports torch)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOSS_SERVICE_")}
    base["LOSS_SERVICE_HOST"] = "127.0.0.1"
    started = {}
    for case, (variable, value, _) in BAD_SETTINGS.items():
        for launcher, command in LAUNCHERS.items():
            env = {"LOSS_SERVICE_PORT": str(free_port()), **base, variable: value}
            started[case, launcher] = subprocess.Popen(
                command, cwd=ROOT, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
    results = {}
    for key, proc in started.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # it started serving: the test below says so
            out, err = proc.communicate()
        results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_a_bad_setting_stops_the_server_with_one_line(
    refused: dict[tuple[str, str], subprocess.CompletedProcess[str]], case: str, launcher: str
) -> None:
    variable, value, allowed = BAD_SETTINGS[case]
    done = refused[case, launcher]
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no traceback, no uvicorn banner
    assert lines[0].startswith(f"loss-service: {variable}={value!r}: "), lines[0]
    assert allowed in lines[0]
    assert done.stdout == ""


def test_start_up_line_says_where_the_docs_are_and_what_runs() -> None:
    """The line comes once the server listens; its URLs answer."""
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_LOG_FORMAT": "json"})
    try:
        records = [json.loads(line) for line in server_log(proc).splitlines() if line]
        (line,) = [r for r in records if r["logger"] == "loss_service"]
        assert line["msg"] == f"serving on {url}"
        assert line["docs"] == f"{url}/docs"
        assert (line["version"], line["torch"]) == (__version__, torch.__version__)
        assert line["cuda"] == (torch.version.cuda or "none")
        assert (line["devices"], line["workers"]) == ("cpu", 1)
        docs = httpx.get(line["docs"], timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        version = httpx.get(f"{url}/version", timeout=10)
        assert version.status_code == 200
        assert version.json() == expected_versions(local_devices())
    finally:
        stop_server(proc)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8000"),  # the container's: not an address to open
        ("::", "http://[::1]:8000"),
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("::1", "http://[::1]:8000"),
        ("loss.example", "http://loss.example:8000"),
    ],
)
def test_start_up_url_is_one_a_browser_can_open(host: str, url: str) -> None:
    assert browsable_url(host, 8000) == url


@pytest.mark.parametrize(
    "command",
    [[str(BIN / "loss-service"), "--version"], [sys.executable, "-m", "service", "--version"]],
    ids=["loss-service", "python -m service"],
)
def test_version_command(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    devices = ", ".join(local_devices())
    cuda = torch.version.cuda or "none"
    assert done.stdout == (
        f"loss-service {__version__} (torch {torch.__version__}, CUDA {cuda}, devices: {devices})\n"
    )


def test_python_m_service_is_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: loss-service")
    for command in ("serve", "openapi", "losses", "compute", "--version"):
        assert command in done.stdout


def test_version_route_in_process(client: TestClient) -> None:
    response = client.get("/version")
    assert response.status_code == 200
    assert response.json() == expected_versions(local_devices())
    schema = client.get("/openapi.json").json()
    ref = schema["paths"]["/version"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ref["schema"] == {"$ref": "#/components/schemas/VersionInfo"}
    assert schema["components"]["schemas"]["VersionInfo"]["required"] == [
        "name", "version", "torch", "cuda", "devices",
    ]  # fmt: skip


def test_several_workers_share_the_cpus_among_their_torch_threads() -> None:
    """Two workers that each kept torch's default thread count (every CPU)
    spun against each other in torch's pool: 300 small requests a second on
    2 cores instead of 5,800. Each of N workers takes 1/N of the CPUs unless
    LOSS_SERVICE_TORCH_THREADS says otherwise; one worker keeps torch's own."""
    cpus = len(os.sched_getaffinity(0))
    assert torch_threads(Settings(workers=1)) == 0
    assert torch_threads(Settings(workers=2)) == max(1, cpus // 2)
    assert torch_threads(Settings(workers=4 * cpus)) == 1
    assert torch_threads(Settings(workers=2, torch_threads=3)) == 3


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_each_worker_logs_in_the_service_format(fmt: str) -> None:
    """With LOSS_SERVICE_WORKERS > 1 uvicorn spawns each worker with Python's
    default logging: the workers' own lines (started, ready, stopped) were
    lost, and an error logged in a worker came out as plain text. Each
    worker now applies the service's log configuration: every line is in
    the chosen format, and each worker says when it is ready and when it
    stops."""
    proc, url = start_server(
        {"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_WORKERS": "2", "LOSS_SERVICE_LOG_FORMAT": fmt}
    )
    try:
        wait_for_workers(proc, 2)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        proc.terminate()
        proc.wait(timeout=30)
        lines = server_log(proc).splitlines()
    finally:
        stop_server(proc)
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is JSON
        assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records), records
        messages = [(r["logger"], r["msg"]) for r in records]
    else:
        stamped = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) ")
        assert all(stamped.match(line) for line in lines), lines
        messages = [tuple(line.split(" ", 3)[2:4]) for line in lines]
    workers = {m for _, m in messages if m.startswith("Started server process")}
    assert len(workers) == 2, messages
    assert messages.count(("uvicorn.error", "Application startup complete.")) == 2, messages
    assert len({m for _, m in messages if m.startswith("Finished server process")}) == 2
    assert any(logger == "loss_service.access" for logger, _ in messages), messages
