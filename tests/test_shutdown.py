"""Graceful shutdown of a real uvicorn process (contract section 9): on
SIGTERM readiness turns 503 first while requests are still served; after the
drain period new connections are refused, a computation in flight finishes
with its answer, and an upload still running is cut without a response
(never a 500)."""

from __future__ import annotations

import json
import signal
import socket
import time
from datetime import datetime
from urllib.parse import urlsplit

import httpx
import torch
import torch.nn.functional as F

from tests.conftest import server_log, start_server, stop_server, wait_for_workers

BODY = json.dumps({"input": [[2, 1], [1, 2]], "target": [1, 0]}).encode()
# multilabel_margin_loss does C * C work per sample: about two seconds here
C = 50_000
SLOW = json.dumps({"input": [[0.5] * C], "target": [list(range(C))], "reduction": "sum"}).encode()


def post(url: str, path: str, body: bytes, send: int | None = None) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:send])
    return sock


def answer(sock: socket.socket) -> bytes:
    response = b""
    try:
        while b"}" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except OSError:
        pass
    sock.close()
    return response


def test_sigterm_drains_finishes_computations_and_cuts_uploads() -> None:
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu",
                              "LOSS_SERVICE_MAX_WORK_ELEMENTS": str(2**34),
                              "LOSS_SERVICE_SHUTDOWN_DRAIN_SECONDS": "1.5"})  # fmt: skip
    try:
        finished_in_drain = post(url, "/v1/losses/cross_entropy", BODY, send=10)
        stalled = post(url, "/v1/losses/cross_entropy", BODY, send=10)

        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        # the OIP readiness of the server and of each model turns with it
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        model_ready = httpx.get(f"{url}/v2/models/cross_entropy/ready")
        assert model_ready.status_code == 503
        assert model_ready.json() == {"name": "cross_entropy", "ready": False}
        assert httpx.get(f"{url}/healthz").status_code == 200
        finished_in_drain.sendall(BODY[10:])  # completes within the drain period
        assert answer(finished_in_drain).startswith(b"HTTP/1.1 200")

        computing = post(url, "/v1/losses/multilabel_margin_loss", SLOW)
        time.sleep(1.4)  # past the drain: uvicorn stops accepting
        try:
            refused = httpx.get(f"{url}/healthz", timeout=2).status_code != 200
        except httpx.TransportError:
            refused = True
        assert refused

        assert answer(stalled) == b"", "an upload still running after the drain is cut"
        response = answer(computing)
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        value = json.loads(response.split(b"\r\n\r\n", 1)[1])["value"]
        x = torch.full((1, C), 0.5)
        expected = F.multilabel_margin_loss(x, torch.arange(C).reshape(1, C), reduction="sum")
        assert value == expected.item()
        # uvicorn re-raises the SIGTERM it handled once it has shut down
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = server_log(proc)
        assert " 500" not in log and '"status":500' not in log
    finally:
        stop_server(proc)  # also closes its log file when it has exited already


def test_each_worker_drains_before_it_stops() -> None:
    """With LOSS_SERVICE_WORKERS > 1 uvicorn's supervisor forwards SIGTERM to
    each worker: every worker turns /readyz 503 for the drain period while
    it still answers, then stops (the drain was the single server's alone
    before: workers stopped accepting at once)."""
    drain = 3.0
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_WORKERS": "2",
                              "LOSS_SERVICE_LOG_FORMAT": "json",
                              "LOSS_SERVICE_SHUTDOWN_DRAIN_SECONDS": str(drain)})  # fmt: skip
    try:
        wait_for_workers(proc, 2)
        proc.send_signal(signal.SIGTERM)
        signalled, signalled_at = time.monotonic(), time.time()
        time.sleep(0.5)
        # new connections land on either worker: every one says draining
        for _ in range(8):
            with httpx.Client() as fresh:
                ready = fresh.get(f"{url}/readyz", timeout=5)
                assert ready.status_code == 503 and ready.json()["status"] == "draining"
                computed = fresh.post(f"{url}/v1/losses/cross_entropy", content=BODY,
                                      headers={"Content-Type": "application/json"})  # fmt: skip
                assert computed.status_code == 200
        assert time.monotonic() - signalled < drain
        assert proc.wait(timeout=30) == 0
        # each worker stopped accepting only after the drain
        records = [json.loads(line) for line in server_log(proc).splitlines()]
        stops = [r["ts"] for r in records if r["msg"] == "Shutting down"]
        assert len(stops) == 2, records
        for stamp in stops:
            stopped = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            assert stopped - signalled_at >= drain - 0.05, (stamp, signalled_at)
    finally:
        stop_server(proc)
