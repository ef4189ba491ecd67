"""Small compute requests answered by the connection layer (service.api.direct)
against the same requests served by the ASGI application, over a real socket.

A request whose whole small body comes with its headers is answered by the
connection; the same request sent with a chunked body goes the ASGI way. The
two answers must be the same bytes (but for the date, the request id and the
timings), for valid requests, for every kind of error, and for every loss;
``loss_service_direct_responses_total`` says which way each one went.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cases import assert_same
from tests.conftest import start_server, stop_server
from tests.test_fuzz_differential import (
    FUZZ,
    Call,
    calls,
    from_wire,
    in_process,
    v1_body,
    v2_body,
)

DIRECT = re.compile(rb"^loss_service_direct_responses_total (\S+)$", re.M)
# the connection header too: refused before its body is read (a 404 for an
# unknown loss, a 415), a chunked request closes its connection, where the
# direct path has the whole body already and keeps it open
VOLATILE = {b"date", b"x-request-id", b"server-timing", b"connection"}


class Response:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def stable(self) -> tuple[int, list[tuple[bytes, bytes]], bytes, list[bytes]]:
        """What must not differ between the two ways: all but the date, the
        request id and the timings' values (their names must match)."""
        timing = self.header(b"server-timing") or b""
        names = [part.split(b";")[0].strip() for part in timing.split(b",") if part]
        kept = [(k, v) for k, v in self.headers if k not in VOLATILE]
        return self.status, kept, self.body, names


class Connection:
    """One keep-alive HTTP/1.1 connection, written and read by hand."""

    def __init__(self, url: str) -> None:
        self.url = urlsplit(url)
        self.open()

    def open(self) -> None:
        self.sock = socket.create_connection((self.url.hostname, self.url.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.pending += data
        return bool(data)

    def read(self) -> Response:
        while b"\r\n\r\n" not in self.pending:
            assert self._fill(), "connection closed before a response"
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        length = int(next(v for k, v in headers if k == b"content-length"))
        while len(self.pending) < length:
            assert self._fill(), "connection closed inside a body"
        body, self.pending = self.pending[:length], self.pending[length:]
        return Response(status, headers, body)

    def closed_by_server(self) -> bool:
        self.sock.settimeout(5)
        return self.sock.recv(1) == b""


def request(
    path: str, body: bytes, headers: dict[str, str] | None = None, version: str = "1.1"
) -> bytes:
    """A request with its body in one piece (Content-Length)."""
    fields = {"Host": "test", "Content-Type": "application/json", **(headers or {})}
    fields["Content-Length"] = str(len(body))
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"POST {path} HTTP/{version}\r\n{head}\r\n".encode() + body


def chunked(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The same request with a chunked body: always the ASGI way."""
    fields = {"Host": "test", "Content-Type": "application/json", **(headers or {})}
    fields["Transfer-Encoding"] = "chunked"
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    chunks = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + chunks + b"0\r\n\r\n"


def direct_count(conn: Connection, headers: dict[str, str] | None = None) -> float:
    fields = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    conn.send(f"GET /metrics HTTP/1.1\r\nHost: test\r\n{fields}\r\n".encode())
    found = DIRECT.search(conn.read().body)
    assert found is not None, "the metric loss_service_direct_responses_total is missing"
    return float(found.group(1))


def both_ways(
    conn: Connection, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[Response, Response]:
    """The request answered by the connection layer, then by the application;
    checks from the metric that each went the way it should."""
    before = direct_count(conn)
    conn.send(request(path, body, headers))
    direct = conn.read()
    assert direct.header(b"connection") is None  # the body is in: the connection stays
    middle = direct_count(conn)
    conn.send(chunked(path, body, headers))
    asgi = conn.read()
    if asgi.header(b"connection") == b"close":
        conn.close()
        conn.open()
    after = direct_count(conn)
    assert (middle - before, after - middle) == (1, 0), "the request did not go the expected ways"
    return direct, asgi


@pytest.fixture(scope="module")
def conn(live_server: str) -> Iterator[Connection]:
    connection = Connection(live_server)
    yield connection
    connection.close()


# --------------------------------------------------------------------------- the same answers


MUTATIONS = ["none", "none", "none", "alias", "slash", "truncated", "not_json", "unknown_loss",
             "unknown_option", "bad_reduction", "drop_argument"]  # fmt: skip


@settings(FUZZ, max_examples=400)
@given(
    call=calls(),
    protocol=st.sampled_from(["v1", "v2"]),
    mutation=st.sampled_from(MUTATIONS),
)
def test_direct_answers_are_the_applications(
    conn: Connection, call: Call, protocol: str, mutation: str
) -> None:
    loss, tensors, dtype, reduction = call.loss, call.tensors, call.dtype, call.reduction
    form, encoding, grad = call.form, call.encoding, call.grad
    payload: dict[str, Any] = (
        v1_body(tensors, form, reduction, grad, encoding, dtype)
        if protocol == "v1"
        else v2_body(tensors, reduction, grad)
    )
    name = loss.name
    headers = None
    if mutation == "alias":
        name = "".join(part.title() for part in name.split("_"))  # MseLoss: may be unknown
    elif mutation == "unknown_loss":
        name = name + "x"
    elif mutation == "unknown_option":
        payload["reductoin" if protocol == "v1" else "parameters"] = {"reductoin": "sum"}
    elif mutation == "bad_reduction":
        target = payload if protocol == "v1" else payload["parameters"]
        target["reduction"] = "average"
    elif mutation == "drop_argument":
        if protocol == "v1":
            payload.pop(next(iter(tensors)))
        else:
            payload["inputs"] = payload["inputs"][1:]
    body = json.dumps(payload).encode()
    if mutation == "truncated":
        body = body[: len(body) // 2]
    elif mutation == "not_json":
        headers = {"Content-Type": "text/plain"}
    path = f"/v1/losses/{name}" if protocol == "v1" else f"/v2/models/{name}/infer"
    if mutation == "slash":
        path += "/"

    direct, asgi = both_ways(conn, path, body, headers)
    assert direct.stable() == asgi.stable()
    assert direct.header(b"x-request-id") != asgi.header(b"x-request-id")

    # and the direct answer is torch's, where the request is the plain one
    expected = in_process(loss, tensors, reduction, grad)
    if mutation != "none" or protocol != "v1":
        return
    result = json.loads(direct.body)
    if expected is None:
        assert 400 <= direct.status < 500, result
        return
    assert direct.status == 200, result
    value, grads = expected
    assert_same(from_wire(result["value"], value), value)
    for arg, g in grads.items():
        assert_same(from_wire(result["grad"][arg], g), g)


def test_v2_binary_data_is_answered_directly_and_the_same(conn: Connection) -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    target = torch.arange(8) % 10
    header = json.dumps({
        "inputs": [
            {"name": "input", "shape": [8, 10], "datatype": "FP32",
             "parameters": {"binary_data_size": logits.numel() * 4}},
            {"name": "target", "shape": [8], "datatype": "INT64",
             "parameters": {"binary_data_size": target.numel() * 8}},
        ],
        "parameters": {"grad": True, "binary_data_output": True},
    }).encode()  # fmt: skip
    body = header + logits.numpy().tobytes() + target.numpy().tobytes()
    extra = {"Inference-Header-Content-Length": str(len(header))}
    direct, asgi = both_ways(conn, "/v2/models/cross_entropy/infer", body, extra)
    assert direct.stable() == asgi.stable()
    assert direct.status == 200
    length = int(direct.header(b"inference-header-content-length") or b"0")
    meta = json.loads(direct.body[:length])
    raw = direct.body[length:]
    outputs = {o["name"]: o for o in meta["outputs"]}
    leaf = logits.clone().requires_grad_(True)
    value = torch.nn.functional.cross_entropy(leaf, target)
    (grad,) = torch.autograd.grad(value, [leaf])
    size = outputs["loss"]["parameters"]["binary_data_size"]
    loss_out = torch.frombuffer(bytearray(raw[:size]), dtype=torch.float32)
    grad_out = torch.frombuffer(bytearray(raw[size:]), dtype=torch.float32).reshape(8, 10)
    assert_same(loss_out, value.detach().reshape(1))
    assert_same(grad_out, grad)


# --------------------------------------------------------------------------- the connection


SMALL = json.dumps({"input": [[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]], "target": [0, 2]}).encode()
CE = "/v1/losses/cross_entropy"


def expected_ce() -> float:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]])
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])))


def test_pipelined_requests_are_answered_in_order(live_server: str) -> None:
    conn = Connection(live_server)
    try:
        bodies = [
            json.dumps({"input": [[float(i), 0.0]], "target": [0]}).encode() for i in range(3)
        ]
        # direct, then one the application serves, then direct again, in one write
        conn.send(
            request(CE, bodies[0])
            + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
            + chunked(CE, bodies[1])
            + request(CE, bodies[2])
        )
        first, health, second, third = (conn.read() for _ in range(4))
        assert health.body == b'{"status":"ok"}'
        for response, i in zip((first, second, third), range(3), strict=True):
            logits = torch.tensor([[float(i), 0.0]])
            value = torch.nn.functional.cross_entropy(logits, torch.tensor([0]))
            assert json.loads(response.body)["value"] == value.item()
    finally:
        conn.close()


def test_a_read_of_many_pipelined_requests_is_answered_whole_and_in_order(
    live_server: str,
) -> None:
    # several PARSE_STEPs of requests in one write: parsed in steps across
    # turns of the event loop, with a body of its own (larger than a step,
    # crossing step boundaries) and chunked requests among them
    from service.api.connections import PARSE_STEP

    conn = Connection(live_server)
    try:
        wide = [[float(j % 7) for j in range(2000)]]  # ~10 KB of JSON per row
        large = json.dumps({"input": wide * 4, "target": [1, 2, 3, 4]}).encode()
        assert len(large) > PARSE_STEP
        sent: list[bytes] = []
        expected: list[float] = []
        for i in range(400):
            logits = [[float(i % 13), 0.5, -1.0]]
            body = json.dumps({"input": logits, "target": [i % 3]}).encode()
            sent.append(chunked(CE, body) if i % 50 == 7 else request(CE, body))
            value = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor([i % 3]))
            expected.append(value.item())
            if i in (120, 121, 300):
                sent.append(request(CE, large))
                big = torch.nn.functional.cross_entropy(
                    torch.tensor(wide * 4), torch.tensor([1, 2, 3, 4])
                )
                expected.append(big.item())
        data = b"".join(sent)
        assert len(data) > 4 * PARSE_STEP
        conn.send(data)
        for value in expected:
            response = conn.read()
            assert response.status == 200
            assert json.loads(response.body)["value"] == value
    finally:
        conn.close()


def test_a_body_in_two_pieces_is_served_by_the_application(live_server: str) -> None:
    conn = Connection(live_server)
    try:
        before = direct_count(conn)
        whole = request(CE, SMALL)
        conn.send(whole[:-10])
        time.sleep(0.2)  # a read of its own for the rest
        conn.send(whole[-10:])
        response = conn.read()
        assert response.status == 200
        assert json.loads(response.body)["value"] == expected_ce()
        assert direct_count(conn) == before  # not answered directly
    finally:
        conn.close()


@pytest.mark.parametrize(("version", "extra"), [("1.0", {}), ("1.1", {"Connection": "close"})])
def test_a_connection_that_asks_to_close_is_closed(
    live_server: str, version: str, extra: dict[str, str]
) -> None:
    conn = Connection(live_server)
    try:
        conn.send(request(CE, SMALL, extra, version))
        response = conn.read()
        assert response.status == 200
        assert response.header(b"connection") == b"close"
        assert conn.closed_by_server()
    finally:
        conn.close()


def test_the_request_id_given_is_echoed(conn: Connection) -> None:
    conn.send(request(CE, SMALL, {"X-Request-ID": "trace-42"}))
    assert conn.read().header(b"x-request-id") == b"trace-42"


def test_a_computation_too_large_for_the_event_loop_goes_to_the_pool(conn: Connection) -> None:
    # 1024 x 1024 broadcast from a body of a few KB: the runtime computes it
    # in the worker pool, so the connection layer hands it to the application
    column = torch.linspace(-1, 1, 1024)
    body = json.dumps(
        {"input": column.reshape(-1, 1).tolist(), "target": column.reshape(1, -1).tolist()}
    ).encode()
    before = direct_count(conn)
    conn.send(request("/v1/losses/mse_loss", body))
    response = conn.read()
    assert direct_count(conn) == before
    assert response.status == 200, response.body
    with pytest.warns(UserWarning):  # the broadcast, as torch warns
        value = torch.nn.functional.mse_loss(column.reshape(-1, 1), column.reshape(1, -1))
    assert json.loads(response.body)["value"] == value.item()


def test_a_compressed_body_is_served_by_the_application(conn: Connection) -> None:
    import gzip

    before = direct_count(conn)
    conn.send(request(CE, gzip.compress(SMALL), {"Content-Encoding": "gzip"}))
    response = conn.read()
    assert response.status == 200
    assert json.loads(response.body)["value"] == expected_ce()
    assert direct_count(conn) == before


# --------------------------------------------------------------------------- keys and CORS


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[str]:
    proc, url = start_server({
        "LOSS_SERVICE_DEVICE": "cpu",
        "LOSS_SERVICE_API_KEYS": "k1",
        "LOSS_SERVICE_CORS_ORIGINS": "https://app.example",
        "LOSS_SERVICE_GRPC_PORT": "0",
    })  # fmt: skip
    try:
        yield url
    finally:
        stop_server(proc)


def test_keys_and_cors_hold_on_the_direct_path(guarded_server: str) -> None:
    conn = Connection(guarded_server)
    key = {"X-API-Key": "k1"}
    try:
        before = direct_count(conn, key)
        conn.send(request(CE, SMALL))
        assert conn.read().status == 401
        conn.send(request(CE, SMALL, {"Authorization": "Bearer nope"}))
        assert conn.read().status == 401
        conn.send(request(CE, SMALL, {"Origin": "https://app.example", **key}))
        cors = conn.read()
        assert cors.status == 200
        assert cors.header(b"access-control-allow-origin") == b"https://app.example"
        assert direct_count(conn, key) == before  # all three went the ASGI way
        conn.send(request(CE, SMALL, {"Authorization": "Bearer k1"}))
        answered = conn.read()
        assert answered.status == 200
        assert json.loads(answered.body)["value"] == expected_ce()
        assert direct_count(conn, key) == before + 1
    finally:
        conn.close()


def test_an_idle_keep_alive_connection_is_closed_after_uvicorns_timeout(live_server: str) -> None:
    """uvicorn's keep-alive timeout (5 s) holds, checked by the connection
    layer's sweep (within a second after it) instead of a timer per response."""
    conn = Connection(live_server)
    try:
        conn.send(request(CE, SMALL))
        assert conn.read().status == 200
        start = time.monotonic()
        conn.sock.settimeout(10)
        assert conn.sock.recv(1) == b""  # closed by the server, without a response
        waited = time.monotonic() - start
        assert 4.5 < waited < 7.5, waited
    finally:
        conn.close()


class FakeTransport:
    """What the protocol writes, kept (no socket)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, pieces: list[bytes]) -> None:
        self.written.extend(bytes(p) for p in pieces)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def connected(loop: Any, transport: FakeTransport) -> Any:
    """The service's connection protocol on ``loop`` for a new app, without a
    socket: what it writes goes to ``transport``."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.api.connections import GuardedHttpToolsProtocol
    from service.config import Settings
    from service.main import create_app

    app = create_app(Settings(device="cpu", log_level="warning", grpc_port=0))
    config = Config(app=app, lifespan="off", proxy_headers=False, log_config=None)
    protocol = GuardedHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=loop
    )
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol


def test_a_failure_in_the_direct_answer_leaves_the_request_to_the_application(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from service.api.direct import DirectServer

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the direct path")

    monkeypatch.setattr(DirectServer, "answer", broken)
    loop = asyncio.new_event_loop()
    try:
        transport = FakeTransport()
        protocol = connected(loop, transport)
        assert protocol.direct is not None
        protocol.data_received(request(CE, SMALL))

        async def answered() -> bytes:
            while not b"".join(transport.written).endswith(b"}"):
                await asyncio.sleep(0.01)
            return b"".join(transport.written)

        raw = loop.run_until_complete(asyncio.wait_for(answered(), 30))
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert json.loads(body)["value"] == expected_ce()
        protocol.connection_lost(None)
    finally:
        loop.close()


def test_a_bug_in_the_core_is_a_logged_500_on_the_direct_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The direct answer's form of the service's 500 (test_errors.py has the
    ASGI doors'): answered on the connection, not handed on, and logged."""
    import asyncio

    import service.compute

    monkeypatch.setattr(service.compute, "run_loss", lambda *a, **k: 1 / 0)
    loop = asyncio.new_event_loop()
    try:
        transport = FakeTransport()
        protocol = connected(loop, transport)

        async def send() -> None:  # on a running loop, as a server calls it
            protocol.data_received(request(CE, SMALL))

        with caplog.at_level("ERROR"):
            loop.run_until_complete(send())
        assert protocol.direct.records.stats.direct == 1  # answered on the connection
        head, _, body = b"".join(transport.written).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 500 ")
        problem = json.loads(body)
        assert problem["detail"] == "internal error; it has been logged"
        (logged,) = [r for r in caplog.records if r.name == "service.errors"]
        assert logged.getMessage() == f"unhandled error on POST {CE}"
        assert logged.exc_info is not None and logged.exc_info[0] is ZeroDivisionError
        protocol.connection_lost(None)
    finally:
        loop.close()


class PausingTransport(FakeTransport):
    """A FakeTransport that remembers whether reading is paused."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_a_pipelined_flood_waits_unparsed_while_the_queue_is_full() -> None:
    # 3,000 small requests in one read: at most PIPELINE_DEPTH request cycles
    # (plus one step's worth) wait at any moment, reading stays paused while
    # bytes wait, no header deadline runs on bytes the client has sent, and
    # every request gets its answer, in order
    import asyncio

    from service.api.connections import PARSE_STEP, PIPELINE_DEPTH

    loop = asyncio.new_event_loop()
    count = 3000
    inputs = [[[float(i % 13), 0.5, -1.0]] for i in range(count)]
    sent = [
        request(CE, json.dumps({"input": x, "target": [i % 3]}).encode())
        for i, x in enumerate(inputs)
    ]
    expected = [
        torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor([i % 3])).item()
        for i, x in enumerate(inputs)
    ]
    try:
        transport = PausingTransport()
        protocol = connected(loop, transport)
        protocol.data_received(b"".join(sent))
        deepest = len(protocol.pipeline)
        assert protocol.unparsed and transport.paused

        async def answered() -> None:
            nonlocal deepest
            seen, answers = 0, 0
            while answers < count:
                answers += sum(w.count(b"HTTP/1.1 200 ") for w in transport.written[seen:])
                seen = len(transport.written)
                deepest = max(deepest, len(protocol.pipeline))
                if protocol.unparsed:
                    assert transport.paused
                    if not protocol.pipeline and not protocol.step_due:
                        raise AssertionError("bytes wait with nothing to wake them")
                    assert protocol.headers_due is None or protocol.step_due
                await asyncio.sleep(0)

        loop.run_until_complete(asyncio.wait_for(answered(), 120))
        assert deepest <= PIPELINE_DEPTH + PARSE_STEP // min(map(len, sent)) + 1, deepest
        assert not protocol.unparsed and not transport.paused
        raw = b"".join(transport.written)
        bodies = [json.loads(part.partition(b"\r\n\r\n")[2] or b"{}") for part in
                  raw.split(b"HTTP/1.1 ")[1:]]  # fmt: skip
        assert len(bodies) == count
        assert [body["value"] for body in bodies] == expected
        protocol.connection_lost(None)
    finally:
        loop.close()
