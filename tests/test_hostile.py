"""Hostile input against a real uvicorn process: each gets its 4xx with
problem details, and the server is still healthy afterwards."""

from __future__ import annotations

import base64
import json
import select
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import start_server, stop_server

CE = "/v1/losses/cross_entropy"
GOOD = {"input": [[2, 1], [1, 2]], "target": [1, 0]}
LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu",
                              "LOSS_SERVICE_MAX_BODY_BYTES": str(LIMIT)})  # fmt: skip
    try:
        yield url
    finally:
        stop_server(proc)


def healthy(url: str) -> None:
    assert httpx.get(f"{url}/healthz").status_code == 200
    response = httpx.post(f"{url}{CE}", json=GOOD)
    assert response.status_code == 200 and round(response.json()["value"], 4) == 1.3133


def raw_request(url: str, head: bytes, body_chunks: Iterator[bytes]) -> tuple[int, bytes, int]:
    """Send a request on a raw socket, stop sending when the server answers or
    closes, and return (status, response bytes, body bytes sent)."""
    parts = urlsplit(url)
    sent = 0
    response = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server answered (or closed) before the body was sent
            try:
                sock.sendall(chunk)
            except (OSError, TimeoutError):
                break
            sent += len(chunk)
        try:
            while b"\r\n\r\n" not in response:
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (OSError, TimeoutError):
            pass
    status = int(response.split(b" ", 2)[1]) if response else 0
    return status, response, sent


def test_100_mb_body_is_refused_from_its_content_length(server: str) -> None:
    size = 100 * 1024 * 1024
    head = (f"POST {CE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()  # fmt: skip
    chunks = iter([b"[" + b"0," * 32768] * 1600)
    status, response, sent = raw_request(server, head, chunks)
    assert status == 413
    assert b"application/problem+json" in response
    assert sent < size // 2, f"the client had to send {sent} bytes before the 413"
    healthy(server)


def test_chunked_body_over_the_limit_is_refused_while_streaming(server: str) -> None:
    head = (f"POST {CE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip
    piece = b"0," * 32768
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    status, _, sent = raw_request(server, head, iter([chunk] * 400))  # 26 MB offered
    assert status == 413
    assert sent < 400 * len(chunk)
    healthy(server)


B64_4 = base64.b64encode(torch.zeros(4).numpy().tobytes()).decode()
HOSTILE = [
    ("element overflow", {"input": {"shape": [2**27], "b64": ""}, "target": [0]}, 413, "elements"),
    (
        "shape product overflows int64",
        {"input": {"shape": [2**40, 2**40, 2**40], "b64": ""}, "target": [0]},
        422,
        "overflow",
    ),
    (
        "more than 64 dimensions",
        {"input": {"shape": [1] * 65, "data": [1]}, "target": [0]},
        422,
        "at most 64 dimensions",
    ),
    ("ragged", {"input": [[1, 2], [3]], "target": [0, 1]}, 422, "ragged"),
    (
        "invalid base64",
        {"input": {"shape": [1, 4], "b64": "!!notbase64"}, "target": [0]},
        422,
        "invalid base64",
    ),
    (
        "base64 length mismatch",
        {"input": {"shape": [2, 4], "b64": B64_4}, "target": [0, 1]},
        422,
        "expected 32 bytes",
    ),
    ("NaN in an index-role tensor", {"input": [[1, 2]], "target": ["NaN"]}, 422, "non-finite"),
    ("negative class index", {"input": [[1, 2]], "target": [-3]}, 422, "out of range"),
    ("class index past C", {"input": [[1, 2]], "target": [2]}, 422, "out of range"),
]


@pytest.mark.parametrize(
    ("body", "status", "text"), [pytest.param(*h[1:], id=h[0]) for h in HOSTILE]
)
def test_hostile_payload(server: str, body: object, status: int, text: str) -> None:
    response = httpx.post(f"{server}{CE}", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert text in response.json()["detail"]
    healthy(server)


def test_depth_10000_nesting(server: str) -> None:
    body = b'{"input": ' + b"[" * 10000 + b"1" + b"]" * 10000 + b', "target": [0]}'
    response = httpx.post(
        f"{server}{CE}", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    healthy(server)


@pytest.mark.parametrize(("content", "ctype", "status"), [
    (b'{"input": [1]}', "text/plain", 415),
    (b"input=1&target=2", "application/x-www-form-urlencoded", 415),
    (b"\x00\xff{{{", "application/json", 422),
    (b"", "application/json", 422),
])  # fmt: skip
def test_wrong_content(server: str, content: bytes, ctype: str, status: int) -> None:
    response = httpx.post(f"{server}{CE}", content=content, headers={"content-type": ctype})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    healthy(server)


def test_empty_tensors_follow_torch(server: str) -> None:
    body = {"input": {"shape": [0, 3], "data": []}, "target": {"shape": [0], "data": []}}
    response = httpx.post(f"{server}{CE}", json=body)
    expected = F.cross_entropy(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    assert response.status_code == 200
    assert response.json()["value"] == ("NaN" if expected.isnan() else expected.item())
    healthy(server)


def test_a_body_nested_too_deep_does_not_poison_later_bodies() -> None:
    """A large body with an argument nested 600 deep once left the worker's
    reused simdjson parser unusable: every later 64 KiB - 4 MiB body was a 422.
    One computation slot, so the same worker thread parses every body."""
    proc, url = start_server({"LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_MAX_CONCURRENCY": "1",
                              "LOSS_SERVICE_LOG_LEVEL": "warning"})  # fmt: skip
    try:
        deep = b"[" * 600 + b"1" + b"]" * 600
        poison = b'{"input": ' + deep + b', "target": [' + b"0.5, " * 20000 + b"0.5]}"
        assert len(poison) > 64 * 1024
        for _ in range(3):
            response = httpx.post(
                f"{url}/v1/losses/mse_loss",
                content=poison,
                headers={"content-type": "application/json"},
                timeout=30,
            )
            assert response.status_code == 422, response.text
            assert response.json()["errors"][0]["loc"] == ["body", "input"]
        generator = torch.Generator().manual_seed(5)
        for rows in (150, 600, 1500, 2500):  # about 100 KiB to 2 MiB
            x, t = torch.randn(rows, 20, generator=generator), torch.randn(rows, 20)
            body = json.dumps({"input": x.tolist(), "target": t.tolist(), "reduction": "sum"})
            assert 100 * 1024 < len(body) < 4 * 1024 * 1024
            response = httpx.post(
                f"{url}/v1/losses/mse_loss",
                content=body,
                headers={"content-type": "application/json"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            expected = F.mse_loss(
                torch.tensor(x.tolist()), torch.tensor(t.tolist()), reduction="sum"
            )
            assert response.json()["value"] == expected.item()
    finally:
        stop_server(proc)
