"""Production behaviour in-process: API keys, CORS, request ids, metrics that
move, backpressure (503 + Retry-After), and the per-request log line."""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import middleware
from service.config import Settings
from service.logs import AccessLog, TextFormatter
from service.main import create_app

CE = "/v1/losses/cross_entropy"
GOOD = {"input": [[2, 1], [1, 2]], "target": [1, 0]}


def make(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(device="cpu", **settings)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with make(api_keys="k-one,k-two") as c:
        yield c


def test_api_key_required(keyed: TestClient) -> None:
    missing = keyed.post(CE, json=GOOD)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.headers["content-type"] == "application/problem+json"
    assert "API key" in missing.json()["detail"]
    assert keyed.post(CE, json=GOOD, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert keyed.post(CE, json=GOOD, headers={"X-API-Key": "k-on"}).status_code == 401
    assert keyed.post(CE, json=GOOD, headers={"Authorization": "Bearer k-two"}).status_code == 200
    assert keyed.post(CE, json=GOOD, headers={"X-API-Key": "k-one"}).status_code == 200
    assert keyed.get("/v1/losses").status_code == 401
    v2 = keyed.get("/v2/models/cross_entropy")
    assert v2.status_code == 401 and "error" in v2.json()


def test_health_readiness_docs_stay_open(keyed: TestClient) -> None:
    for path in (
        "/healthz",
        "/readyz",
        "/docs",
        "/redoc",
        "/openapi.json",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
    ):
        assert keyed.get(path).status_code == 200, path
    # the root sends a browser to the docs, keys or not
    root = keyed.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"].endswith("/docs")
    assert keyed.post("/", json={}).status_code == 401  # only GET / is open


def test_metrics_can_require_the_key() -> None:
    with make(api_keys="k", metrics_requires_key=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": "k"}).status_code == 200


def test_no_auth_and_no_cors_by_default(client: TestClient) -> None:
    response = client.post(CE, json=GOOD, headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_cors_when_configured() -> None:
    with make(cors_origins="https://app.example") as c:
        preflight = c.options(CE, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})  # fmt: skip
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        ok = c.post(CE, json=GOOD, headers={"Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = c.post(CE, json=GOOD, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_request_id_echoed_or_generated(client: TestClient) -> None:
    echoed = client.post(CE, json=GOOD, headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = client.post(CE, json={"input": 1})
    assert generated.status_code == 422
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert client.get("/nope").headers["x-request-id"]


def sample(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample in the Prometheus text at /metrics (0 if absent)."""
    for line in client.get("/metrics").text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and m[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', m[2] or "")) == labels:
            return float(m[3])
    return 0.0


def test_metrics_counters_move(client: TestClient) -> None:
    # by route template and canonical loss name, whichever name the client used
    ok = {"method": "POST", "route": "/v1/losses/{name}", "loss": "cross_entropy", "status": "200"}
    bad = {"method": "POST", "route": "/v1/losses/{name}", "loss": "cross_entropy", "status": "422"}
    unknown = {"method": "POST", "route": "/v1/losses/{name}", "loss": "unknown", "status": "404"}
    v2 = {"method": "POST", "route": "/v2/models/{name}/infer", "loss": "mse_loss", "status": "200"}
    labels = {"ok": ok, "bad": bad, "unknown": unknown, "v2": v2}
    before = {k: sample(client, "loss_service_requests_total", **v) for k, v in labels.items()}
    errors = sample(client, "loss_service_errors_total", **bad)
    tensor_in = sample(client, "loss_service_tensor_bytes_total", direction="in")
    client.post(CE, json=GOOD)
    client.post("/v1/losses/CrossEntropyLoss", json=GOOD)
    client.post(CE, json={"input": [[2, 1]], "target": [7]})
    client.post("/v1/losses/no-such-loss", json=GOOD)
    client.post("/v2/models/MSELoss/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1], "data": [1.0]},
        {"name": "target", "datatype": "FP32", "shape": [1], "data": [0.0]}]})  # fmt: skip
    assert sample(client, "loss_service_requests_total", **ok) == before["ok"] + 2
    assert sample(client, "loss_service_requests_total", **bad) == before["bad"] + 1
    assert sample(client, "loss_service_requests_total", **unknown) == before["unknown"] + 1
    assert sample(client, "loss_service_requests_total", **v2) == before["v2"] + 1
    assert sample(client, "loss_service_errors_total", **bad) == errors + 1
    # two requests decoded a 2x2 float32 input and a 2-element int64 target
    assert sample(client, "loss_service_tensor_bytes_total", direction="in") >= tensor_in + 64
    text = client.get("/metrics").text
    for name in (
        "loss_service_request_duration_seconds_bucket",
        "loss_service_in_flight_requests",
        "loss_service_queued_computations",
        "loss_service_body_bytes_total",
    ):
        assert name in text


def test_503_when_every_computation_slot_stays_busy() -> None:
    # inline_max_body_bytes=0: even this small request goes through the pool
    with make(max_concurrency=1, queue_timeout=0.2, inline_max_body_bytes=0) as c:
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        holder = object()
        assert c.portal is not None
        c.portal.call(runtime.slots.acquire_on_behalf_of, holder)  # one computation in progress
        try:
            busy = c.post(CE, json=GOOD)
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "1"
            assert "computation slots" in busy.json()["detail"]
            assert c.post("/v2/models/cross_entropy/infer", json={"inputs": []}).status_code in (
                400,
                503,
            )
        finally:
            c.portal.call(runtime.slots.release_on_behalf_of, holder)
        assert c.post(CE, json=GOOD).status_code == 200


def test_503_when_a_computation_outlives_the_compute_timeout() -> None:
    with make(compute_timeout=1e-6, inline_max_body_bytes=0) as c:
        slow = c.post(CE, json=GOOD)
        assert slow.status_code == 503 and slow.headers["retry-after"]
        assert "LOSS_SERVICE_COMPUTE_TIMEOUT" in slow.json()["detail"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_one_log_line_per_request_without_tensor_contents(fmt: str) -> None:
    secret = 123.456789
    lines: list[bytes] = []
    with make(log_format=fmt) as c:
        c.app.state.runtime.access_log = AccessLog(fmt, lines.append)  # type: ignore[attr-defined]
        c.post(
            CE,
            json={"input": [[secret, 1], [1, 2]], "target": [1, 0]},
            headers={"X-Request-ID": "log-test"},
        )
    assert len(lines) == 1 and lines[0].endswith(b"\n")
    text = lines[0].decode()
    assert str(secret) not in text
    if fmt == "json":
        line = json.loads(text)
        assert line["request_id"] == "log-test" and line["status"] == 200
        assert line["route"] == "/v1/losses/{name}" and line["loss"] == "cross_entropy"
        assert line["device"] == "cpu" and line["bytes_in"] > 0 and line["duration_ms"] > 0
        assert line["level"] == "info" and line["ts"].endswith("Z")
    else:
        assert (
            "request_id=log-test" in text and "status=200" in text and "loss=cross_entropy" in text
        )


LOGFMT_PAIR = re.compile(r'(\S+?)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s|$)')


def logfmt_fields(line: str) -> list[tuple[str, str]]:
    """The key=value pairs a logfmt reader sees in a text line, values unquoted."""
    pairs = []
    for key, value in LOGFMT_PAIR.findall(line):
        if value.startswith('"'):
            value = json.loads(value)  # logfmt's escapes are JSON's, for these
        pairs.append((key, value))
    return pairs


@pytest.mark.parametrize(
    "request_id",
    ["abc status=500 route=/v1/admin", 'a"b status=500', "x=1", "back\\slash", "ok"],
)
def test_text_log_values_cannot_forge_fields(request_id: str) -> None:
    lines: list[bytes] = []
    with make(log_format="text") as c:
        c.app.state.runtime.access_log = AccessLog("text", lines.append)  # type: ignore[attr-defined]
        c.post(CE, json=GOOD, headers={"X-Request-ID": request_id})
    (line,) = lines
    assert line.count(b"\n") == 1
    fields = logfmt_fields(line.decode())
    keys = [key for key, _ in fields]
    assert keys.count("status") == 1 and keys.count("route") == 1, fields
    assert dict(fields)["request_id"] == request_id and dict(fields)["status"] == "200"


def test_text_formatter_quotes_field_values_and_messages() -> None:
    from service.logs import TextFormatter

    record = logging.LogRecord("service", logging.WARNING, __file__, 1, "%s", ("x=1\ny",), None)
    record.fields = {"path": "/v1/a b", "n": 3, "who": 'say "hi"', "empty": ""}
    text = TextFormatter().format(record)
    assert "\n" not in text
    assert '"x=1\\ny"' in text
    assert dict(logfmt_fields(text)) == {
        "path": "/v1/a b",
        "n": "3",
        "who": 'say "hi"',
        "empty": "",
    }


def test_finished_requests_are_recorded_in_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(middleware, "RECORD_DELAY", 0.5)  # room for a slow machine
    writes: list[bytes] = []
    app = create_app(Settings(log_format="json"))
    app.state.runtime.access_log = AccessLog("json", writes.append)

    async def two_requests() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for request_id in ("a", "b"):
                response = await client.post(CE, json=GOOD, headers={"X-Request-ID": request_id})
                assert response.status_code == 200
            assert writes == []  # not recorded yet
            await asyncio.sleep(0.8)
            assert len(writes) == 1  # both lines in one write
            writes.clear()
            await client.post(CE, json=GOOD, headers={"X-Request-ID": "c"})
            metrics = (await client.get("/metrics")).text  # a scrape records first
            assert 'loss_service_requests_total{loss="cross_entropy"' in metrics
            assert len(writes) == 1 and b'"request_id":"c"' in writes[0]

    asyncio.run(two_requests())


def test_no_request_log_above_info() -> None:
    with make(log_level="warning") as c:
        assert c.app.state.runtime.access_log is None  # type: ignore[attr-defined]


def test_small_requests_are_computed_inline_and_large_ones_in_the_pool() -> None:
    with make(max_concurrency=1, queue_timeout=0.2, inline_max_body_bytes=1000) as c:
        runtime = c.app.state.runtime  # type: ignore[attr-defined]
        holder = object()
        assert c.portal is not None
        c.portal.call(runtime.slots.acquire_on_behalf_of, holder)
        try:
            assert c.post(CE, json=GOOD).status_code == 200  # inline: no slot needed
            large = {"input": [[0.5] * 300] * 2, "target": [1, 0]}  # over 1000 bytes
            assert c.post(CE, json=large).status_code == 503
        finally:
            c.portal.call(runtime.slots.release_on_behalf_of, holder)


FAULTS = """
import resource, sys
from service.limits import keep_freed_memory
kept = keep_freed_memory(int(sys.argv[1]))

def faults_of_a_64_mib_buffer() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = bytearray(64 * 1024 * 1024)
    buffer[::4096] = b"x" * len(buffer[::4096])
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_64_mib_buffer()
print(kept, faults_of_a_64_mib_buffer())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_kept_for_the_next_large_request() -> None:
    def second_buffer(keep: int) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, str(keep)], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    # a 64 MiB buffer is 16,384 pages: faulted in afresh each time by default,
    # reused once the service keeps freed memory
    assert second_buffer(0) == ("False", pytest.approx(16384, rel=0.1))
    kept, faults = second_buffer(512 * 1024 * 1024)
    assert kept == "True" and faults < 1000


def test_metrics_count_describe_and_compute_of_a_loss_apart(client: TestClient) -> None:
    route = {"route": "/v1/losses/{name}", "loss": "mse_loss", "status": "200"}
    get_before = sample(client, "loss_service_requests_total", method="GET", **route)
    post_before = sample(client, "loss_service_requests_total", method="POST", **route)
    assert client.get("/v1/losses/mse_loss").status_code == 200
    assert client.post("/v1/losses/mse_loss", json={"input": [1.0], "target": [0.0]}).is_success
    assert client.post("/v1/losses/mse_loss", json={"input": [1.0], "target": [0.0]}).is_success
    assert sample(client, "loss_service_requests_total", method="GET", **route) == get_before + 1
    assert sample(client, "loss_service_requests_total", method="POST", **route) == post_before + 2
    # a made-up method is one bounded label value, not a new series per name
    client.request("FOOBAR", "/v1/nowhere")
    client.request("BAZQUX", "/v1/nowhere")
    text = client.get("/metrics").text
    assert 'method="FOOBAR"' not in text and 'method="other"' in text


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_log_names_the_path_where_the_route_does_not(fmt: str) -> None:
    lines: list[bytes] = []
    long = "/v1/" + "x" * 5000
    with make(log_format=fmt) as c:
        c.app.state.runtime.access_log = AccessLog(fmt, lines.append)  # type: ignore[attr-defined]
        c.get("/no/such path")  # unmatched
        c.get("/", follow_redirects=False)  # a redirect
        c.post("/v1/losses/focal_loss", json=GOOD)  # a 404 on a route
        c.get(long)
        c.post(CE, json=GOOD)  # matched: the route template says it all
        c.get("/no/such/path/")  # as sent: its slash dropped only for routing
    lines = b"".join(lines).splitlines()  # written in batches
    assert len(lines) == 6
    if fmt == "json":
        paths = [json.loads(line).get("path") for line in lines]
    else:
        paths = [dict(logfmt_fields(line.decode())).get("path") for line in lines]
        assert all(b"loss=None" not in line and b"=None" not in line for line in lines)
    assert paths[:3] == ["/no/such path", "/", "/v1/losses/focal_loss"]
    assert paths[3] is not None and paths[3].startswith("/v1/xxx") and len(paths[3]) < 300
    assert paths[4] is None
    assert paths[5] == "/no/such/path/"


def test_text_log_lines_share_the_access_logs_timestamp_style() -> None:
    iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
    record = logging.LogRecord("service", logging.INFO, "x.py", 1, "started", None, None)
    record.fields = {"loss": None, "workers": 1}
    text = TextFormatter().format(record)
    assert iso.match(text) and "loss=" not in text and text.endswith("started workers=1")
    access = AccessLog("text").line({"method": "GET", "loss": None}, 1700000000.25).decode()
    assert iso.match(access) and access.startswith("2023-11-14T22:13:20.250Z ")
    assert "loss=" not in access


def test_what_a_client_names_does_not_grow_the_record_memo(client: TestClient) -> None:
    records = client.app.state.direct.records  # type: ignore[attr-defined]
    route = {"route": "/v1/losses/{name}", "status": "200"}
    before = sample(client, "loss_service_requests_total", method="POST", loss="mse_loss", **route)
    for index in range(50):  # unknown losses: 404s, each name its own
        assert client.post(f"/v1/losses/nope{index}", json={}).status_code == 404
    body = {"input": [1.0], "target": [0.0]}
    for name in ("mse_loss", "MSELoss", "mse_LOSS"):  # aliases: one loss, one series
        assert client.post(f"/v1/losses/{name}", json=body).is_success
    client.get("/metrics")  # records what is pending
    assert not any(key[1] and key[1].startswith("nope") for key in records.entries)
    after = sample(client, "loss_service_requests_total", method="POST", loss="mse_loss", **route)
    assert after == before + 3
    unknown = sample(
        client, "loss_service_requests_total", method="POST", loss="unknown",
        route="/v1/losses/{name}", status="404",
    )  # fmt: skip
    assert unknown >= 50
