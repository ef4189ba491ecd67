"""Each invalid payload of contract section 8 gets its 4xx with a message that
names the field and what was expected; the server keeps serving."""

from __future__ import annotations

import base64

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

CE = "/v1/losses/cross_entropy"
GOOD = {"input": [[2, 1], [1, 2]], "target": [1, 0]}
B64_2x2 = base64.b64encode(torch.zeros(2, 2).numpy().tobytes()).decode()


def deep(depth: int) -> object:
    value: object = 1.0
    for _ in range(depth):
        value = [value]
    return value


BAD: list[tuple[str, str, dict[str, object], int, tuple[object, ...], str]] = [
    ("ragged", CE, {"input": [[2, 1], [1]], "target": [1, 0]}, 422, ("input",), "ragged"),
    (
        "wrong target shape",
        CE,
        {"input": [[2, 1, 0, 0, 0], [1, 2, 0, 0, 0]], "target": [1, 0, 1]},
        422,
        ("target",),
        "expected shape [2] (N) for input [2, 5], got [3]",
    ),
    (
        "class index out of range",
        CE,
        {"input": [[2, 1], [1, 2]], "target": [1, 2]},
        422,
        ("target",),
        "class index 2 out of range",
    ),
    (
        "negative class index",
        "/v1/losses/nll_loss",
        {"input": [[2, 1], [1, 2]], "target": [-1, 0]},
        422,
        ("target",),
        "class index -1 out of range",
    ),
    (
        "fractional index",
        CE,
        {"input": [[2, 1], [1, 2]], "target": [1.5, 0]},
        422,
        ("target",),
        "fractional value 1.5",
    ),
    (
        "NaN index",
        CE,
        {"input": [[2, 1], [1, 2]], "target": ["NaN", 0]},
        422,
        ("target",),
        "non-finite",
    ),
    (
        "bad dtype name",
        CE,
        {"input": {"shape": [2, 2], "dtype": "float8", "data": [1, 2, 3, 4]}, "target": [1, 0]},
        422,
        ("input", "dtype"),
        "float32",
    ),
    ("bad request dtype", CE, {**GOOD, "dtype": "int8"}, 422, ("dtype",), "float32"),
    (
        "flat count mismatch",
        CE,
        {"input": {"shape": [2, 2], "data": [1, 2, 3]}, "target": [1, 0]},
        422,
        ("input", "data"),
        "expected 4 elements for shape [2, 2], got 3",
    ),
    (
        "invalid base64",
        CE,
        {"input": {"shape": [2, 2], "dtype": "float32", "b64": "@@@"}, "target": [1, 0]},
        422,
        ("input", "b64"),
        "invalid base64",
    ),
    (
        "base64 length mismatch",
        CE,
        {"input": {"shape": [2, 3], "dtype": "float32", "b64": B64_2x2}, "target": [1, 0]},
        422,
        ("input", "b64"),
        "expected 24 bytes (6 x float32) for shape [2, 3], got 16",
    ),
    (
        "integer dtype for a float role",
        CE,
        {"input": {"shape": [2, 2], "dtype": "int64", "data": [1, 2, 3, 4]}, "target": [1, 0]},
        422,
        ("input",),
        "expected a floating dtype",
    ),
    (
        "string in array",
        CE,
        {"input": [[2, "x"], [1, 2]], "target": [1, 0]},
        422,
        ("input",),
        "got the string 'x'",
    ),
    (
        "object instead of tensor",
        CE,
        {"input": True, "target": [1, 0]},
        422,
        ("input",),
        "expected a tensor",
    ),
    (
        "nesting deeper than a tensor can have",
        "/v1/losses/mse_loss",
        {"input": deep(65), "target": deep(65)},
        422,
        ("input",),
        "deeper than 64",
    ),
    ("missing field", CE, {"input": [[2, 1], [1, 2]]}, 422, ("target",), "Field required"),
    ("unknown field", CE, {**GOOD, "smoothing": 0.1}, 422, ("smoothing",), "unknown field"),
    (
        "deprecated size_average",
        CE,
        {**GOOD, "size_average": False},
        422,
        ("size_average",),
        "use reduction",
    ),
    ("deprecated reduce", CE, {**GOOD, "reduce": False}, 422, ("reduce",), "use reduction"),
    ("bad reduction", CE, {**GOOD, "reduction": "batchmean"}, 422, ("reduction",), "'none'"),
    (
        "label_smoothing out of range",
        CE,
        {**GOOD, "label_smoothing": 1.5},
        422,
        ("label_smoothing",),
        "less than or equal to 1",
    ),
    (
        "device the server does not have",
        CE,
        {**GOOD, "device": "cuda:7"},
        422,
        ("device",),
        "it has cpu",
    ),
    ("nonsense device", CE, {**GOOD, "device": "tpu"}, 422, ("device",), "it has cpu"),
    (
        "BCE input outside [0, 1]",
        "/v1/losses/binary_cross_entropy",
        {"input": [1.5, 0.1], "target": [0.2, 0.8]},
        422,
        ("input",),
        "[0, 1]",
    ),
    (
        "BCE target shape",
        "/v1/losses/binary_cross_entropy",
        {"input": [0.5, 0.1], "target": [0.2, 0.8, 0.1]},
        422,
        ("target",),
        "expected shape [2]",
    ),
    ("weight shape", CE, {**GOOD, "weight": [1, 2, 3]}, 422, ("weight",), "expected shape [2] (C)"),
    (
        "multilabel index out of range",
        "/v1/losses/multilabel_margin_loss",
        {"input": [[0.1, 0.2]], "target": [[1, 2]]},
        422,
        ("target",),
        "class index 2",
    ),
    (
        "multi_margin p",
        "/v1/losses/multi_margin_loss",
        {"input": [[0.1, 0.2]], "target": [1], "p": 3},
        422,
        ("p",),
        "1 or 2",
    ),
    (
        "ctc lengths",
        "/v1/losses/ctc_loss",
        {
            "log_probs": [[[-1.0, -1.0]]] * 3,
            "targets": [[1]],
            "input_lengths": [1, 2],
            "target_lengths": [1],
        },
        422,
        ("input_lengths",),
        "expected shape [1] (N)",
    ),
    (
        "ctc input length past T",
        "/v1/losses/ctc_loss",
        {
            "log_probs": [[[-1.0, -1.0]]] * 3,
            "targets": [[1]],
            "input_lengths": [4],
            "target_lengths": [1],
        },
        422,
        ("input_lengths",),
        "[0, 3]",
    ),
    (
        "ctc targets out of range",
        "/v1/losses/ctc_loss",
        {
            "log_probs": [[[-1.0, -1.0]]] * 3,
            "targets": [[2]],
            "input_lengths": [3],
            "target_lengths": [1],
        },
        422,
        ("targets",),
        "class index 2",
    ),
    (
        "dtype torch lacks on this device",
        "/v1/losses/ctc_loss",
        {
            "log_probs": [[[-1.0, -1.0]]] * 3,
            "targets": [[1]],
            "input_lengths": [3],
            "target_lengths": [1],
            "dtype": "float16",
        },
        422,
        ("dtype",),
        "float16",
    ),
    (
        "torch's own shape check",
        "/v1/losses/gaussian_nll_loss",
        {"input": [1.0, 2.0, 3.0], "target": [1.0, 2.0, 3.0], "var": [1.0, 2.0]},
        422,
        (),
        "rejected the arguments: var is of incorrect size",
    ),
    (
        # torch's "size of tensor a (2) must match ... tensor b (3)" names no field
        "shapes that do not broadcast name both fields",
        "/v1/losses/mse_loss",
        {"input": [[1.0, 2.0], [3.0, 4.0]], "target": [1.0, 2.0, 3.0]},
        422,
        ("target",),
        "shape [3] does not broadcast with input [2, 2]",
    ),
    (
        "shapes that do not broadcast, kl_div",
        "/v1/losses/kl_div",
        {"input": [1.0, 2.0, 3.0], "target": [1.0, 2.0]},
        422,
        ("target",),
        "shape [2] does not broadcast with input [3]",
    ),
    (
        "fractional class target not shaped like input",
        CE,
        {"input": [[2, 1], [1, 2]], "target": [1.5, 0.2]},
        422,
        ("target",),
        "fractional value 1.5; probability targets must have the input's shape [2, 2], got [2]",
    ),
    (
        "misspelt option names the closest and lists the allowed",
        CE,
        {**GOOD, "label_smothing": 0.1},
        422,
        ("label_smothing",),
        "unknown field for this loss (did you mean 'label_smoothing'?); allowed fields: "
        "device, dtype, grad, grad_output, encoding, input, target, weight, ignore_index, "
        "label_smoothing, reduction",
    ),
    (
        "unknown field with no close match still lists the allowed",
        "/v1/losses/mse_loss",
        {"input": [1.0], "target": [1.0], "zzz": 1},
        422,
        ("zzz",),
        "unknown field for this loss; allowed fields: device,",
    ),
    (
        "grad of an index argument",
        CE,
        {**GOOD, "grad": ["target"]},
        422,
        ("grad",),
        "differentiable arguments: input",
    ),
    (
        "grad of a missing argument",
        CE,
        {**GOOD, "grad": ["weight"]},
        422,
        ("grad",),
        "was not given",
    ),
    (
        "grad_output without grad",
        CE,
        {**GOOD, "grad_output": 1.0},
        422,
        ("grad_output",),
        "only used with grad",
    ),
    ("a list instead of an object", CE, [1, 2], 422, (), "expected a JSON object"),  # type: ignore[list-item]
    (
        "dimension past int64",
        "/v1/losses/mse_loss",
        {"input": {"shape": [2**63, 0], "data": []}, "target": [1.0]},
        422,
        ("input", "shape"),
        "outside int64",
    ),
    (
        "dimensions that overflow with reduction none",
        "/v1/losses/mse_loss",
        {
            "input": {"shape": [0, 2**63 - 1], "b64": ""},
            "target": {"shape": [0, 2**63 - 1], "b64": ""},
            "reduction": "none",
        },
        422,
        ("input", "shape"),
        "overflow",
    ),
    (
        "class index past int64",
        CE,
        {"input": [[1.0, 2.0]], "target": [2**70], "ignore_index": -(2**63), "reduction": "sum"},
        422,
        ("target",),
        "int64's range",
    ),
    (
        "class index 2**63 is not wrapped",
        CE,
        {"input": [[1.0, 2.0]], "target": [2**63]},
        422,
        ("target",),
        "got 9223372036854775808",
    ),
    (
        "ignore_index past int64",
        CE,
        {**GOOD, "ignore_index": 2**63},
        422,
        ("ignore_index",),
        "less than or equal to 9223372036854775807",
    ),
    (
        "blank past int64",
        "/v1/losses/ctc_loss",
        {
            "log_probs": [[[-1.0, -1.0]]] * 3,
            "targets": [[1]],
            "input_lengths": [3],
            "target_lengths": [1],
            "blank": 2**63,
        },
        422,
        ("blank",),
        "less than or equal to 9223372036854775807",
    ),
    (
        "grad_output with an empty grad list",
        CE,
        {**GOOD, "grad": [], "grad_output": "garbage"},
        422,
        ("grad_output",),
        "only used with grad",
    ),
    (
        "multi_margin_loss over an empty batch with mean",
        "/v1/losses/multi_margin_loss",
        {"input": {"shape": [0, 3], "data": []}, "target": {"shape": [0], "data": []}},
        422,
        ("input",),
        "empty batch",
    ),
    (
        "multilabel_margin_loss over an empty batch with sum",
        "/v1/losses/multilabel_margin_loss",
        {
            "input": {"shape": [0, 3], "data": []},
            "target": {"shape": [0, 3], "data": []},
            "reduction": "sum",
        },
        422,
        ("input",),
        "uninitialised memory",
    ),
    (
        "class probabilities of the wrong shape",
        CE,
        {"input": [[1.0, 2.0]], "target": [[0.5, 0.25, 0.25]]},
        422,
        ("target",),
        "expected shape [1, 2] for class probabilities (input's shape",
    ),
    (
        "an elementwise weight is not broadcast",
        "/v1/losses/l1_loss",
        {"input": [[1.0, 2.0], [3.0, 4.0]], "target": [[0.0, 0.0], [0.0, 0.0]], "weight": [1, 2]},
        422,
        ("weight",),
        "expected shape [2, 2] (same as input",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "loc", "text"), [pytest.param(*b[1:], id=b[0]) for b in BAD]
)
def test_invalid_payload(
    client: TestClient, path: str, body: object, status: int, loc: tuple[object, ...], text: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["type"]
    assert text in problem["detail"], problem
    assert problem["errors"][0]["loc"] == ["body", *loc]
    assert problem["detail"] == (
        f"{'.'.join(str(p) for p in loc)}: {problem['errors'][0]['msg']}"
        if loc
        else problem["errors"][0]["msg"]
    )
    # and the server keeps serving
    assert client.post(CE, json=GOOD).status_code == 200


def test_not_json_is_422(client: TestClient) -> None:
    response = client.post(CE, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "invalid JSON" in response.json()["detail"]


def test_wrong_content_type_is_415(client: TestClient) -> None:
    response = client.post(CE, content=b"input=1", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


def test_deep_nesting_is_rejected_without_crashing(client: TestClient) -> None:
    body = b'{"input": ' + b"[" * 10000 + b"1" + b"]" * 10000 + b', "target": 1}'
    response = client.post(CE, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert client.post(CE, json=GOOD).status_code == 200


def test_unknown_loss_is_404(client: TestClient) -> None:
    response = client.post("/v1/losses/focal_loss", json=GOOD)
    assert response.status_code == 404
    assert "cross_entropy" in response.json()["detail"]


def test_empty_tensors_follow_torch(client: TestClient) -> None:
    # torch gives a result for an empty mse_loss with reduction="sum": 0
    ok = client.post("/v1/losses/mse_loss", json={"input": [], "target": [], "reduction": "sum"})
    assert ok.status_code == 200 and ok.json()["value"] == 0.0
    # and NaN for "mean", which travels as the string "NaN"
    nan = client.post("/v1/losses/mse_loss", json={"input": [], "target": []})
    assert nan.status_code == 200 and nan.json()["value"] == "NaN"


def test_nonfinite_values_travel_as_strings(client: TestClient) -> None:
    response = client.post(
        "/v1/losses/l1_loss",
        json={
            "input": ["Infinity", 1.0, "NaN"],
            "target": [0, "-Infinity", 0],
            "reduction": "none",
        },
    )
    assert response.status_code == 200
    assert response.json()["value"] == ["Infinity", "Infinity", "NaN"]


def test_limits() -> None:
    app = create_app(Settings(device="cpu", max_body_bytes=1000, max_tensor_elements=10))
    with TestClient(app) as small:
        too_big = small.post(CE, json={"input": [[0.0] * 300] * 2, "target": [0, 1]})
        assert too_big.status_code == 413
        assert "1000 bytes" in too_big.json()["detail"]
        too_many = small.post(
            CE, json={"input": {"shape": [4, 4], "b64": "AAAA"}, "target": [0, 1, 2, 3]}
        )
        assert too_many.status_code == 413
        assert "more than 10 elements" in too_many.json()["detail"]
        assert small.post(CE, json=GOOD).status_code == 200
    app = create_app(Settings(device="cpu", max_elements_per_tensor=4))
    with TestClient(app) as per_tensor:
        one_big = per_tensor.post(CE, json={"input": [[1.0] * 3] * 2, "target": [0, 1]})
        assert one_big.status_code == 413
        assert "input: 6 elements" in one_big.json()["detail"]
        assert per_tensor.post(CE, json=GOOD).status_code == 200


@pytest.mark.parametrize("size", [50_000, 5_000_000])
def test_messages_quote_at_most_200_characters_of_a_value(client: TestClient, size: int) -> None:
    huge = "a" * size
    for body in (
        {"input": huge, "target": [1]},
        {"input": [[1.0, huge]], "target": [1]},
        {"input": {"shape": [1], "dtype": huge, "data": [1]}, "target": [1]},
        {"input": {"shape": huge, "data": [1]}, "target": [1]},
        {**GOOD, "reduction": huge},
        {**GOOD, huge: 1},
    ):
        response = client.post(CE, json=body)
        assert response.status_code == 422
        assert len(response.content) < 3000, response.content[:300]
        assert "a" * 201 not in response.text
    # a message built elsewhere is still cut where problem details are made
    response = client.post(CE, json={**GOOD, "device": huge})
    assert response.status_code == 422 and len(response.content) < 6000
    response = client.post(CE, json={"input": huge, "target": [1]})
    assert f"({size} characters in all)" in response.json()["detail"]
    v2 = client.post(
        "/v2/models/cross_entropy/infer",
        json={"inputs": [{"name": "input", "shape": [1], "datatype": huge, "data": [1]}]},
    )
    assert v2.status_code == 400 and len(v2.content) < 1000


def test_a_problem_lists_a_bounded_number_of_errors(client: TestClient) -> None:
    body = {**GOOD, **{f"unknown_{i}": i for i in range(1000)}}
    response = client.post(CE, json=body)
    problem = response.json()
    assert response.status_code == 422 and len(problem["errors"]) == 51
    assert problem["errors"][-1]["msg"] == "and 950 more errors"


def test_values_nested_deeper_than_repr_goes_are_quoted_not_a_500(client: TestClient) -> None:
    deep = b"[" * 1000 + b"]" * 1000  # within orjson's limit, past repr's
    inputs = (
        b'[{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]},'
        b'{"name": "target", "shape": [1], "datatype": "FP32", "data": [1]}]'
    )
    for path, body in (
        ("/v2/models/mse_loss/infer", b'{"inputs": %s, "id": %s}' % (inputs, deep)),
        (
            "/v2/models/mse_loss/infer",
            b'{"inputs": %s, "parameters": {"binary_data_output": %s}}' % (inputs, deep),
        ),
        (
            "/v2/models/mse_loss/infer",
            b'{"inputs": %s, "parameters": {"grad": [%s]}}' % (inputs, deep),
        ),
        (
            "/v2/models/mse_loss/infer",
            b'{"inputs": %s, "outputs": [{"name": "loss", "parameters": {"binary_data": %s}}]}'
            % (inputs, deep),
        ),
        (
            "/v2/models/mse_loss/infer",
            b'{"inputs": [{"name": "input", "shape": %s, "datatype": "FP32", "data": [1]}]}' % deep,
        ),
        ("/v1/losses/mse_loss", b'{"input": {"shape": %s, "data": [1]}, "target": [1]}' % deep),
        ("/v1/losses/mse_loss", b'{"input": [1], "target": [1], "unknown": %s}' % deep),
    ):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (path, response.text)


def test_a_bad_batch_item_fails_alone(client: TestClient) -> None:
    good = {"loss": "mse_loss", "input": [1.0, 2.0], "target": [0.0, 0.5]}
    items = [
        good,
        {"loss": "mse_loss", "input": {"shape": [0, 2**63 - 1], "b64": ""},
         "target": {"shape": [0, 2**63 - 1], "b64": ""}, "reduction": "none"},
        {"loss": "mse_loss", "input": {"shape": [2**63, 0], "data": []}, "target": [1.0]},
        {"loss": "cross_entropy", "input": [[1.0, 2.0]], "target": [2**63]},
        good,
    ]  # fmt: skip
    response = client.post("/v1/batch", json={"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = F.mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5])).item()
    assert results[0]["value"] == results[4]["value"] == expected
    for index in (1, 2, 3):
        problem = results[index]["error"]
        assert problem["status"] == 422
        assert problem["errors"][0]["loc"][:3] == ["body", "items", index]


def test_long_names_are_quoted_at_most_200_characters(client: TestClient) -> None:
    """A 5000-character loss name or device is cut in the message, and the 404
    still lists the known losses."""
    response = client.post("/v1/losses/" + "x" * 5000, json={})
    assert response.status_code == 404
    assert "x" * 201 not in response.text and "cross_entropy" in response.json()["detail"]
    body = {"input": [1.0], "target": [1.0], "device": "y" * 5000}
    response = client.post("/v1/losses/mse_loss", json=body)
    assert response.status_code == 422
    assert "y" * 201 not in response.text and "cpu" in response.json()["detail"]


def _broken_loss(*args: object, **kwargs: object) -> None:
    raise RuntimeError("a bug in the core")


@pytest.mark.parametrize("fast_dispatch", [True, False], ids=["hot path", "FastAPI router"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CE, GOOD),
        (
            "/v2/models/cross_entropy/infer",
            {
                "inputs": [
                    {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [2, 1, 1, 2]},
                    {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, 0]},
                ]
            },
        ),
    ],
    ids=["v1", "v2"],
)
def test_a_bug_is_a_logged_500_in_the_protocol_s_form(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fast_dispatch: bool,
    path: str,
    body: dict[str, object],
) -> None:
    """An exception no handler expected is the service's bug: a 500 in the
    route's error form that says it was logged, and the log holds the
    traceback with the method and path (the same on every door: the
    connection layer's direct answers are tested in test_direct.py)."""
    import service.compute

    app = create_app(Settings(device="cpu"), fast_dispatch=fast_dispatch)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level("ERROR"):
        # after start-up, which runs every loss's worked example
        monkeypatch.setattr(service.compute, "run_loss", _broken_loss)
        response = client.post(path, json=body)
    assert response.status_code == 500
    if path.startswith("/v2"):
        assert response.json() == {"error": "internal error; it has been logged"}
    else:
        problem = response.json()
        assert (problem["status"], problem["title"]) == (500, "Internal Server Error")
        assert problem["detail"] == "internal error; it has been logged"
        assert problem["type"].endswith("#internal")
    (logged,) = [r for r in caplog.records if r.name == "service.errors"]
    assert logged.getMessage() == f"unhandled error on POST {path}"
    assert logged.exc_info is not None and "a bug in the core" in str(logged.exc_info[1])
