"""The access log's per-request line (``AccessLog.request``) is the general
``AccessLog.line`` byte for byte, whatever the request id, labels, numbers
and clock: the fast line writes the labels' JSON once and the timestamp once
per millisecond."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from service.logs import AccessLog

FAST = settings(max_examples=400, deadline=None, derandomize=True)

printable_ids = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
labels = st.tuples(
    st.sampled_from(["POST", "GET", "HEAD", "PROPFIND"]),
    st.sampled_from(["/v1/losses/{name}", "/v2/models/{name}/infer", 'odd "route"\\']),
    st.one_of(st.none(), st.sampled_from(["cross_entropy", "mse_loss", "unknown"])),
    st.sampled_from([200, 400, 413, 422, 500, 503]),
    st.one_of(st.none(), st.sampled_from(["cpu", "cuda:0"])),
)
requests = st.tuples(
    st.one_of(printable_ids, st.just("b6e498a69e1af6f1000000002c1af11e")),
    labels,
    st.floats(min_value=0, max_value=1e5, allow_nan=False),
    st.integers(min_value=0, max_value=2**40),
    st.integers(min_value=0, max_value=2**40),
    # finishing times close together (one batch: shared milliseconds and
    # seconds) and far apart, in any order
    st.one_of(
        st.floats(min_value=1.7e9, max_value=1.7e9 + 0.01),
        st.floats(min_value=0, max_value=4e9),
    ),
    st.one_of(st.none(), st.text(max_size=30)),  # a path, where the log names it
)


def general(log: AccessLog, request: tuple) -> bytes:  # type: ignore[type-arg]
    request_id, (method, route, loss, status, device), duration, in_, out, now, path = request
    fields = {
        "request_id": request_id, "method": method, "route": route, "loss": loss,
        "status": status, "duration_ms": round(duration * 1000, 3), "bytes_in": in_,
        "bytes_out": out, "device": device,
    }  # fmt: skip
    if path is not None:
        fields["path"] = path
    return log.line(fields, now)


@FAST
@given(st.lists(requests, min_size=1, max_size=8), st.sampled_from(["json", "text"]))
def test_the_request_line_is_the_general_line(batch: list, fmt: str) -> None:  # type: ignore[type-arg]
    fast, slow = AccessLog(fmt, print), AccessLog(fmt, print)
    for request in batch:
        request_id, labels_, duration, in_, out, now, path = request
        line = fast.request(request_id.encode(), labels_, duration, in_, out, now, path)
        assert line == general(slow, request)
        if fmt == "json":
            assert json.loads(line)["request_id"] == request_id


def test_a_request_id_that_needs_escaping_is_escaped() -> None:
    log = AccessLog("json", print)
    labels_ = ("POST", "/v1/losses/{name}", "cross_entropy", 200, "cpu")
    for request_id in ('a"b', "back\\slash", "plain-id"):
        line = log.request(request_id.encode(), labels_, 0.001, 1, 2, 1.7e9)
        assert json.loads(line)["request_id"] == request_id
