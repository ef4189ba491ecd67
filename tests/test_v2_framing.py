"""Malformed binary tensor framing on the real server: always a 400 with an
``{"error": ...}`` message, never a 5xx or a hang."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pytest

HEADER = "Inference-Header-Content-Length"
INPUT = np.array([[2, 1], [1, 2]], dtype=np.float32).tobytes()
TARGET = np.array([1, 0], dtype=np.int64).tobytes()
URL = "/v2/models/cross_entropy/infer"


def json_header(input_size: int = len(INPUT), target_size: int = len(TARGET)) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": input_size},
                },
                {
                    "name": "target",
                    "shape": [2],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": target_size},
                },
            ],
            "parameters": {"binary_data_output": True},
        }
    )


def post(base: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(base + URL, content=body, headers=headers, timeout=30)


def assert_bad_request(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, str) and error
    for word in words:
        assert word in error, error


def test_well_formed_binary_request_works(live_server: str) -> None:
    header = json_header()
    response = post(live_server, header + INPUT + TARGET, {HEADER: str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    result = orjson.loads(response.content[:length])
    (loss,) = result["outputs"]
    assert loss["parameters"]["binary_data_size"] == 4
    value = np.frombuffer(response.content[length:], dtype=np.float32)
    assert round(float(value[0]), 4) == 1.3133


@pytest.mark.parametrize("cut", [1, 7, len(TARGET) + 3])
def test_truncated_body(live_server: str, cut: int) -> None:
    header = json_header()
    body = (header + INPUT + TARGET)[:-cut]
    assert_bad_request(post(live_server, body, {HEADER: str(len(header))}), "binary_data_size")


def test_trailing_bytes_do_not_add_up(live_server: str) -> None:
    header = json_header()
    body = header + INPUT + TARGET + b"\0\0\0"
    assert_bad_request(post(live_server, body, {HEADER: str(len(header))}), "add up")


@pytest.mark.parametrize(
    ("input_size", "target_size"), [(12, 16), (16, 12), (20, 12), (0, 32), (16, -1)]
)
def test_wrong_binary_data_size(live_server: str, input_size: int, target_size: int) -> None:
    header = json_header(input_size, target_size)
    response = post(live_server, header + INPUT + TARGET, {HEADER: str(len(header))})
    assert_bad_request(response, "binary_data_size")


def test_binary_data_size_without_header_length(live_server: str) -> None:
    header = json_header()
    assert_bad_request(post(live_server, header, {}), "binary_data_size")


@pytest.mark.parametrize("extra", ["1", "1000", "1" + "0" * 12, "9" * 5000])
def test_header_length_past_the_body(live_server: str, extra: str) -> None:
    header = json_header()
    body = header + INPUT + TARGET
    response = post(live_server, body, {HEADER: str(len(body) + int(extra[:20])) + extra[20:]})
    assert_bad_request(response, HEADER, "body")


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", "12.0", "0x10", "", "1 2", "٣"])
def test_non_numeric_header_length(live_server: str, value: str) -> None:
    header = json_header()
    response = post(live_server, header + INPUT + TARGET, {HEADER: value.encode("utf-8")})
    assert_bad_request(response, HEADER)


@pytest.mark.parametrize("value", [b"\xb2", b"\xb9", b"\xbd", b"1\xb2"])
def test_latin1_digit_header_length(live_server: str, value: bytes) -> None:
    """ "\xb2" is "²" in latin-1, a digit to str.isdigit() but not to int()."""
    parts = urlsplit(live_server)
    body = json_header() + INPUT + TARGET
    request = (
        (f"POST {URL} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(body)}\r\n").encode()
        + HEADER.encode()
        + b": "
        + value
        + b"\r\n\r\n"
        + body
    )
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    assert status == 400, reply
    assert HEADER.encode() in reply


@pytest.mark.parametrize("delta", [-1, -20, 5])
def test_header_length_off_by_some(live_server: str, delta: int) -> None:
    header = json_header()
    response = post(live_server, header + INPUT + TARGET, {HEADER: str(len(header) + delta)})
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_header_length_zero(live_server: str) -> None:
    response = post(live_server, json_header() + INPUT + TARGET, {HEADER: "0"})
    assert_bad_request(response, "JSON")


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b"null", b'{"inputs": 3}', b'{"inputs": []}', b"\xff\xfe"],
)
def test_malformed_json_bodies(live_server: str, body: bytes) -> None:
    assert_bad_request(post(live_server, body, {}))


def test_body_shorter_than_content_length_does_not_hang(live_server: str) -> None:
    """A client that announces more bytes than it sends and half-closes gets a
    4xx or a closed connection, never a 5xx, and the server keeps serving."""
    parts = urlsplit(live_server)
    header = json_header()
    body = header + INPUT
    request = (
        f"POST {URL} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Length: {len(body) + len(TARGET)}\r\n{HEADER}: {len(header)}\r\n\r\n"
    ).encode() + body
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    if reply:
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, reply
    health: Any = httpx.get(live_server + "/v2/health/live", timeout=30).json()
    assert health == {"live": True}
