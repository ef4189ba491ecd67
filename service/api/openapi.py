"""The OpenAPI document's last touches, after FastAPI has generated it: the
tensor schema shared by ``$ref``, the service's error models (not FastAPI's
``HTTPValidationError``) with a real example for every documented error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.api.problems import problem_body
from service.config import settings
from service.errors import (
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.losses import LOSSES, resolve
from service.protocols.oip import input_name
from service.protocols.v1 import evaluate
from service.schemas import TENSOR_SCHEMA

TENSOR_REF = "#/components/schemas/Tensor"
PROBLEM_REF = "#/components/schemas/Problem"
V2_ERROR_REF = "#/components/schemas/V2Error"
PROBLEM_JSON = "application/problem+json"


def share_tensor_schema(node: Any) -> Any:
    """Every inline copy of the tensor schema -> a ``$ref`` to one copy; a
    field's own description stays beside the reference (OpenAPI 3.1)."""
    if isinstance(node, dict):
        if node.get("anyOf") == TENSOR_SCHEMA["anyOf"]:
            own = {
                k: v
                for k, v in node.items()
                if k not in ("anyOf", "title") and TENSOR_SCHEMA.get(k) != v
            }
            return {"$ref": TENSOR_REF, **own}
        return {k: share_tensor_schema(v) for k, v in node.items()}
    if isinstance(node, list):
        return [share_tensor_schema(v) for v in node]
    return node


def _raised(make: Callable[[], object]) -> ServiceError:
    """The error a real call raises (so an example is the service's own words)."""
    try:
        make()
    except ServiceError as exc:
        return exc
    raise AssertionError("the example call was expected to fail")


def _misspelt_option(loss: str) -> ServiceError:
    """A real 422 of a loss: its worked example with ``reduction`` misspelt."""
    spec = LOSSES[loss]
    body = {**spec.example, "reductoin": spec.example.get("reduction", "sum")}
    body.pop("reduction", None)
    return _raised(lambda: evaluate(spec, body, settings))


def error_examples(loss: str | None) -> dict[int, ServiceError]:
    """One real error per status the routes document (422: of this loss)."""
    shape = {"input": [[1.0, 2.0], [3.0, 4.0]], "target": [1.0, 2.0, 3.0], "device": "cpu"}
    return {
        400: _raised(lambda: input_name(LOSSES["mse_loss"], "inputs")),
        404: _raised(lambda: resolve("cross_entropi")),
        # the default limit, whatever this process was started with: the
        # committed document must not depend on the environment
        413: PayloadTooLarge(
            "request body of 70000000 bytes exceeds the limit of 67108864 bytes "
            "(LOSS_SERVICE_MAX_BODY_BYTES)"
        ),
        415: UnsupportedMediaType(
            "content type 'text/plain' is not supported; send application/json"
        ),
        422: _misspelt_option(loss)
        if loss is not None
        else _raised(lambda: evaluate(LOSSES["mse_loss"], shape, settings)),
        503: Overloaded("all 4 computation slots stayed busy for 10 s; retry later"),
    }


def _schema_ref(response: dict[str, Any]) -> str | None:
    for media in response.get("content", {}).values():
        ref = media.get("schema", {}).get("$ref")
        if ref is not None:
            return str(ref)
    return None


def document_errors(schema: dict[str, Any]) -> None:
    """Each operation's error responses: problem details as
    ``application/problem+json`` (v1, ops) or ``{"error"}`` (v2), each with an
    example; FastAPI's own 422 (path parameters that cannot fail: every one
    is a string) is dropped with its models."""
    cache: dict[str | None, dict[int, ServiceError]] = {}
    for operations in schema["paths"].values():
        for operation in operations.values():
            loss = operation.get("operationId")
            loss = loss if loss in LOSSES else None
            responses: dict[str, Any] = operation.get("responses", {})
            for status, response in list(responses.items()):
                ref = _schema_ref(response)
                if ref == "#/components/schemas/HTTPValidationError":
                    del responses[status]
                    continue
                if ref not in (PROBLEM_REF, V2_ERROR_REF):
                    continue
                examples = cache.get(loss) or cache.setdefault(loss, error_examples(loss))
                error = examples.get(int(status)) or BadRequest(response["description"])
                if ref == PROBLEM_REF:
                    example: dict[str, Any] = problem_body(error)
                    response["content"] = {PROBLEM_JSON: {"schema": {"$ref": ref}}}
                else:
                    example = {"error": error.detail}
                response["content"][next(iter(response["content"]))]["example"] = example
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)


def finish_document(schema: dict[str, Any]) -> dict[str, Any]:
    schema = share_tensor_schema(schema)
    schema["components"]["schemas"]["Tensor"] = TENSOR_SCHEMA
    document_errors(schema)
    return schema
