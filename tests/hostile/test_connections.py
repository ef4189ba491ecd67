"""Connections that cost without ever making a request (contract section 9):
idle bodies announced at 64 MiB, slowloris headers, endless header lines.
The suite's server uses a 2 s header timeout and a 3 s body timeout (the
defaults are 10 s and 30 s)."""

from __future__ import annotations

import base64
import contextlib
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from tests.hostile.conftest import Limited, all_at_once

CE = "/v1/losses/cross_entropy"


def connect(server: Limited) -> socket.socket:
    parts = urlsplit(server.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    return sock


def status_of(sock: socket.socket, timeout: float = 30) -> int:
    """The status the server answers on this connection (0: closed without one)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    sock.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def head(length: int, path: str = CE) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip


@pytest.mark.parametrize("count", [63, 100])
def test_idle_connections_announcing_64_mib_bodies(limited: Limited, count: int) -> None:
    """Each sends headers with Content-Length 64 MiB and one body byte, then
    idles: memory grows with what arrives, and the body timeout ends each
    with a 408."""
    with limited.attack(f"{count} idle 64 MiB bodies") as seen:
        socks = []
        for _ in range(count):
            sock = connect(limited)
            sock.sendall(head(64 * 2**20) + b"[")
            socks.append(sock)
        time.sleep(1)
        assert limited.rss() < 900 * 2**20
        for sock in socks:
            status = status_of(sock)
            seen(status)
            assert status == 408


def test_slowloris_headers_end_in_408(limited: Limited) -> None:
    """150 connections trickle header bytes and never finish them."""
    socks = [connect(limited) for _ in range(150)]
    with limited.attack("150 slowloris connections") as seen:
        line = b"POST /v1/losses/cross_entropy HTTP/1.1\r\nHost: x\r\nX-Slow: "
        for sock in socks:
            sock.sendall(line)
        for _ in range(4):  # keep trickling past the header timeout
            time.sleep(0.5)
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a")
        for sock in socks:
            status = status_of(sock)
            seen(status)
            assert status == 408


def test_a_silent_connection_is_closed_after_the_header_timeout(limited: Limited) -> None:
    with limited.attack("silent connection") as seen:
        sock = connect(limited)
        start = time.monotonic()
        status = status_of(sock)
        seen(status)
        assert status == 408 and time.monotonic() - start < 10


def test_unterminated_header_lines_of_200_mb_are_a_431(limited: Limited) -> None:
    """Seven clients in parallel each send one header line of up to 200 MB."""
    statuses: list[int] = []

    def attack() -> None:
        sock = connect(limited)
        sent = 0
        try:
            sock.sendall(b"POST /v1/losses/cross_entropy HTTP/1.1\r\nX-Long: ")
            piece = b"a" * 2**20
            while sent < 200 * 2**20:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:
            pass
        statuses.append(status_of(sock))
        assert sent < 16 * 2**20, f"the server read {sent} bytes of one header line"

    with limited.attack("7 x 200 MB header lines") as seen:
        all_at_once(attack, 7)
        for status in statuses:
            seen(status)
    assert statuses == [431] * 7


def test_headers_over_64_kib_in_total_are_a_431(limited: Limited) -> None:
    headers = "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(80))
    with limited.attack("many headers") as seen:
        sock = connect(limited)
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        status = status_of(sock)
        seen(status)
    assert status == 431


def test_a_body_that_stops_arriving_is_a_408(limited: Limited) -> None:
    with limited.attack("stalled body") as seen:
        sock = connect(limited)
        sock.sendall(head(100) + b'{"input": ')
        start = time.monotonic()
        status = status_of(sock)
        seen(status)
    assert status == 408 and 2 < time.monotonic() - start < 10


def test_a_client_that_never_reads_its_response_is_disconnected(limited: Limited) -> None:
    """A large response nobody reads would hold its memory (and its share of
    the budget) for ever: after the write timeout (the body timeout, 3 s
    here) the connection is dropped and the memory comes back."""
    n = 2**20  # an 11 MB response: more than the socket buffers take
    half = base64.b64encode(np.full(n, 0.5, np.float32).tobytes())
    zero = base64.b64encode(np.zeros(n, np.float32).tobytes())
    body = b'{"input": {"shape": [%d], "b64": "%s"}, "target": {"shape": [%d], "b64": "%s"}, ' % (
        n,
        half,
        n,
        zero,
    )
    # b64 in both directions: this is about the write timeout, not JSON parsing
    body += b'"reduction": "none", "grad": true, "encoding": "b64"}'
    with limited.attack("a response nobody reads") as seen:
        socks = []
        for _ in range(4):
            sock = connect(limited)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(head(len(body), "/v1/losses/mse_loss") + body)
            socks.append(sock)
        # the responses wait, holding their memory, then the timeout frees it
        assert wait_for(lambda: reserved(limited) > 0, 10)
        assert wait_for(lambda: reserved(limited) == 0, 10)
        for sock in socks:
            sock.close()
        seen(200)


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def reserved(server: Limited) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("loss_service_memory_reserved_bytes"))
    return float(line.split()[-1])


def test_pipelined_floods_of_small_requests_share_the_event_loop(limited: Limited) -> None:
    """Eight connections each send 3,000 small requests in one write
    (pipelined, about 0.5 MB each) and read the answers as they come: the
    connection layer answers a few of one read itself and queues the rest
    for the application, so /healthz keeps its latency, and every request
    gets its answer, in order."""
    body = b'{"input": [[1.0, 2.0, 0.5]], "target": [0]}'
    one = head(len(body)) + body
    count = 3000

    def flood() -> None:
        sock = connect(limited)
        reader_statuses: list[int] = []

        def read_all() -> None:
            data = b""
            sock.settimeout(60)
            while len(reader_statuses) < count:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                while True:
                    end = data.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    headers = data[:end].split(b"\r\n")
                    length = next(
                        int(h.split(b":")[1])
                        for h in headers
                        if h.lower().startswith(b"content-length")
                    )
                    if len(data) < end + 4 + length:
                        break
                    reader_statuses.append(int(headers[0].split(b" ")[1]))
                    data = data[end + 4 + length :]

        import threading

        reader = threading.Thread(target=read_all)
        reader.start()
        sock.sendall(one * count)
        reader.join(timeout=120)
        sock.close()
        for status in reader_statuses:
            seen(status)
        answered.append(len(reader_statuses))
        ok.append(all(s == 200 for s in reader_statuses))

    answered: list[int] = []
    ok: list[bool] = []
    with limited.attack("8 pipelined floods of 3,000 small requests") as seen:
        all_at_once(flood, 8)
    assert answered == [count] * 8
    assert all(ok)
