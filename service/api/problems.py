"""Where errors become responses: RFC 9457 problem details on v1 and the ops
routes, ``{"error": "..."}`` on the Open Inference Protocol (v2) routes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.errors import FieldError, InvalidPayload, ServiceError, clip

log = logging.getLogger("service.errors")

PROBLEM_TYPE = "https://github.com/loss-service/loss-service/blob/main/README.md#errors"


def problem_body(error: ServiceError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"{PROBLEM_TYPE}-{error.slug}",
        "title": error.title,
        "status": error.status,
        "detail": clip(error.detail),  # errors.py bounds them; this holds whatever is raised
    }
    if error.errors:
        body["errors"] = [{"loc": list(e.loc), "msg": clip(e.msg)} for e in error.errors]
    return body


def error_response(request: Request, error: ServiceError) -> Response:
    if request.url.path.startswith("/v2"):
        content = orjson.dumps({"error": clip(error.detail)})
        media_type = "application/json"
    else:
        content = orjson.dumps(problem_body(error))
        media_type = "application/problem+json"
    headers = error.headers
    if not request.scope.get("state", {}).get("body_read") and has_body(request.scope["headers"]):
        # answered before its body was read (refused from its headers, or
        # part-way): closing the connection stops the upload, where keeping
        # it would read and discard the rest of the body on the event loop
        headers = {**headers, "Connection": "close"}
    return Response(content, status_code=error.status, media_type=media_type, headers=headers)


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's (lower-case) headers announce a body."""
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
        for name, value in headers
    )


class _HTTPProblem(ServiceError):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None) -> None:
        super().__init__(detail, headers=headers)
        self.status = status
        self.title = {404: "Not Found", 405: "Method Not Allowed"}.get(status, "HTTP error")
        self.slug = self.title.lower().replace(" ", "-")


def install(app: FastAPI) -> None:
    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [FieldError(tuple(e["loc"]), e["msg"]) for e in exc.errors()]
        return error_response(request, InvalidPayload(errors))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(
            request, _HTTPProblem(exc.status_code, str(exc.detail), dict(exc.headers or {}))
        )

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, ServiceError("internal error; it has been logged"))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
