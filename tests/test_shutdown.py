"""Graceful shutdown of a real uvicorn process: on SIGTERM readiness turns 503
first, then new connections are refused while the in-flight request finishes."""

from __future__ import annotations

import json
import signal
import socket
import time
from urllib.parse import urlsplit

import httpx

from tests.conftest import server_log, start_server, stop_server

BODY = json.dumps({"input": [[2, 1], [1, 2]], "target": [1, 0]}).encode()


def test_sigterm_drains() -> None:
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu",
                              "LOSS_SERVICE_SHUTDOWN_DRAIN_SECONDS": "1.5"})  # fmt: skip
    try:
        parts = urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        head = (
            f"POST /v1/losses/cross_entropy HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        )
        sock.sendall(head.encode() + BODY[:10])  # a request in flight, half sent

        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert httpx.get(f"{url}/healthz").status_code == 200

        time.sleep(2.0)  # past the drain: uvicorn has stopped accepting
        try:
            refused = httpx.get(f"{url}/healthz", timeout=2).status_code != 200
        except httpx.TransportError:
            refused = True
        assert refused

        sock.sendall(BODY[10:])  # the in-flight request completes
        response = b""
        while b"}" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
        sock.close()
        assert response.startswith(b"HTTP/1.1 200")
        assert b'"value":1.31326162815094' in response
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        # the request log on stderr: one JSON line per request
        lines = [json.loads(x) for x in server_log(proc).splitlines() if '"request_id"' in x]
        posted = [x for x in lines if x["route"] == "/v1/losses/{name}"]
        assert posted and posted[-1]["status"] == 200 and posted[-1]["loss"] == "cross_entropy"
    finally:
        stop_server(proc)
