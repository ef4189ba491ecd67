"""The exported OpenAPI document is current, and every example in it works."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.losses import LOSSES
from service.main import create_app

EXPORTED = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def current() -> dict[str, Any]:
    return create_app().openapi()


def test_exported_document_is_current() -> None:
    committed = json.loads(EXPORTED.read_text())
    assert committed == json.loads(json.dumps(current())), (
        "openapi/openapi.json is stale: run scripts/export-openapi"
    )


def examples() -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    doc = json.loads(EXPORTED.read_text())
    found = []
    for path, item in doc["paths"].items():
        post = item.get("post")
        if not post or "requestBody" not in post:
            continue
        if "sharedmemory" in path:
            continue  # its example needs a region a client made first: tests/test_shm.py
        request = post["requestBody"]["content"]["application/json"]["example"]
        response = post["responses"]["200"]["content"]["application/json"].get("example")
        for param in post.get("parameters", []):
            if param["in"] == "path":
                # a path parameter without its own example names the example's loss
                value = param.get("example", "cross_entropy")
                path = path.replace("{" + param["name"] + "}", value)
        found.append((path, request, response))
    return found


def test_every_loss_has_a_typed_operation_with_an_example() -> None:
    doc = json.loads(EXPORTED.read_text())
    for spec in LOSSES.values():
        post = doc["paths"][f"/v1/losses/{spec.name}"]["post"]
        body = post["requestBody"]["content"]["application/json"]
        ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][ref]
        assert set(spec.tensor_names) <= set(schema["properties"])
        assert set(spec.option_names) <= set(schema["properties"])
        assert schema["additionalProperties"] is False
        assert body["example"] == spec.example


@pytest.mark.parametrize(
    ("path", "request_body", "documented"), examples(), ids=[e[0] for e in examples()]
)
def test_documented_example_returns_its_documented_result(
    client: TestClient,
    path: str,
    request_body: dict[str, Any],
    documented: dict[str, Any] | None,
) -> None:
    response = client.post(path, json=request_body)
    assert response.status_code == 200, response.text
    if documented is not None:
        assert response.json() == documented


def test_operation_ids_are_readable_and_stable() -> None:
    doc = json.loads(EXPORTED.read_text())
    ids = {
        (path, method): op["operationId"]
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    assert len(set(ids.values())) == len(ids)
    for spec in LOSSES.values():
        assert ids[(f"/v1/losses/{spec.name}", "post")] == spec.name
    assert ids[("/v2/models/{name}/infer", "post")] == "model_infer"
    assert ids[("/healthz", "get")] == "healthz"
    # no method or path suffixes generated from the route
    assert not [i for i in ids.values() if i.endswith(("_get", "_post")) or "__" in i]


def walk(node: Any) -> Any:
    """Every dict in a JSON document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_one_shared_tensor_schema() -> None:
    doc = json.loads(EXPORTED.read_text())
    tensor = doc["components"]["schemas"]["Tensor"]
    copies = [d for d in walk(doc["paths"]) if d.get("anyOf") == tensor["anyOf"]]
    copies += [
        d for d in walk(doc["components"]) if d is not tensor and d.get("anyOf") == tensor["anyOf"]
    ]
    assert copies == []
    refs = [d for d in walk(doc) if d.get("$ref") == "#/components/schemas/Tensor"]
    # every tensor argument of every loss, its grad_output, and the responses
    assert len(refs) >= sum(len(s.args) + 1 for s in LOSSES.values())
    mse = doc["components"]["schemas"]["MSELossRequest"]["properties"]["target"]
    assert mse["$ref"] == "#/components/schemas/Tensor" and "float role" in mse["description"]


def test_every_documented_error_is_the_services_model_with_a_real_example() -> None:
    doc = json.loads(EXPORTED.read_text())
    assert "HTTPValidationError" not in json.dumps(doc)
    client = TestClient(create_app())
    checked = 0
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")) or "content" not in response:
                    continue
                ((media, content),) = response["content"].items()
                example = content["example"]
                if path.startswith("/v2"):
                    assert media == "application/json" and set(example) == {"error"}
                    assert content["schema"]["$ref"] == "#/components/schemas/V2Error"
                else:
                    assert media == "application/problem+json", (method, path, status)
                    assert content["schema"]["$ref"] == "#/components/schemas/Problem"
                    assert example["status"] == int(status) and example["detail"]
                    # its type resolves on the service (the /errors page)
                    page, anchor = example["type"].split("#")
                    assert f'id="{anchor}"' in client.get(page).text
                checked += 1
    assert checked > 100
    # the 422 of a loss is what the service really answers to that request
    op = doc["paths"]["/v1/losses/huber_loss"]["post"]
    body = {**op["requestBody"]["content"]["application/json"]["example"], "reductoin": "sum"}
    body.pop("reduction", None)
    answer = client.post("/v1/losses/huber_loss", json=body).json()
    assert answer == op["responses"]["422"]["content"]["application/problem+json"]["example"]
