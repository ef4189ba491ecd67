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
