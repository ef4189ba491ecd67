"""Where errors become responses: RFC 9457 problem details on v1 and the ops
routes, ``{"error": "..."}`` on the Open Inference Protocol (v2) routes."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from service.errors import FieldError, InvalidPayload, ServiceError, clip

log = logging.getLogger("service.errors")

# Problem types resolve on the service itself: a relative reference (RFC 9457
# section 3.1.1 allows one), so it names the page of whichever host answered,
# behind any proxy, without echoing the client's Host header.
PROBLEMS_PAGE = "/errors"

# Every problem type the service can answer with: slug -> status, title and
# what it means to the caller. ``GET /errors`` is made from this table, with
# one anchor per slug (a test follows every type the service can emit).
PROBLEM_TYPES: dict[str, tuple[int, str, str]] = {
    "bad-request": (400, "Bad Request",
        "The request is malformed for its protocol: Open Inference Protocol framing "
        "(binary data sizes, Inference-Header-Content-Length, unknown inputs, outputs or "
        "parameters), or a malformed compressed body."),
    "unauthorized": (401, "Unauthorized",
        "API keys are configured (LOSS_SERVICE_API_KEYS) and the request carries none "
        "that matches: send Authorization: Bearer <key> or X-API-Key: <key>."),
    "not-found": (404, "Not Found",
        "No route has this path (or the model version does not exist). GET /docs lists "
        "every route."),
    "unknown-loss": (404, "Unknown loss",
        "The name is neither a torch.nn.functional loss nor a torch.nn class name; the "
        "detail names the closest known loss and lists them all (GET /v1/losses)."),
    "method-not-allowed": (405, "Method Not Allowed",
        "The route exists but not for this method; the Allow header lists every method it "
        "takes (GET describes a loss, POST computes it)."),
    "request-timeout": (408, "Request Timeout",
        "The request headers or body stopped arriving (LOSS_SERVICE_HEADER_TIMEOUT, "
        "LOSS_SERVICE_BODY_TIMEOUT); the connection is closed."),
    "payload-too-large": (413, "Payload too large",
        "The body is over LOSS_SERVICE_MAX_BODY_BYTES, the tensors over "
        "LOSS_SERVICE_MAX_TENSOR_ELEMENTS, or the call is predicted to take more than "
        "LOSS_SERVICE_MAX_WORK_ELEMENTS or the whole memory budget; the detail names the "
        "size, the limit and the setting. Send less, or split it into several requests."),
    "unsupported-media-type": (415, "Unsupported media type",
        "The body is not JSON (Content-Type application/json), or for the Open Inference "
        "Protocol not JSON with the binary tensor extension."),
    "invalid-payload": (422, "Invalid payload",
        "The body parsed but a field holds something the loss cannot take: errors lists "
        "each field (loc) with what was expected and what came (a shape, a dtype, a class "
        "index out of range, an unknown option with the closest allowed one), and detail "
        "repeats the first. Argument combinations torch itself refuses are here too, with "
        "torch's reason."),
    "request-header-fields-too-large": (431, "Request Header Fields Too Large",
        "The request headers are over 64 KiB in all; the connection is closed."),
    "internal": (500, "Internal Server Error",
        "A bug in the service, never the client's input; it has been logged with the "
        "request id (X-Request-ID)."),
    "http-error": (400, "HTTP error", "Another HTTP-level refusal; the detail says which."),
    "overloaded": (503, "Service overloaded",
        "Every computation slot or the memory budget stayed busy past the queue timeout, "
        "or the device or host ran out of memory: retry after the Retry-After seconds."),
}  # fmt: skip


def problem_type(slug: str) -> str:
    return f"{PROBLEMS_PAGE}#{slug}"


def problems_page() -> str:
    """The page the problem types point at: one anchor per type."""
    sections = "\n".join(
        f'<section id="{slug}"><h2><a href="#{slug}">{status} {html.escape(title)}</a></h2>'
        f"<p><code>type: {problem_type(slug)}</code></p><p>{html.escape(text)}</p></section>"
        for slug, (status, title, text) in PROBLEM_TYPES.items()
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>loss-service: problem types</title></head><body>"
        "<h1>loss-service problem types</h1><p>Every v1 error is RFC 9457 problem details "
        "(<code>application/problem+json</code>) whose <code>type</code> points at one of "
        "these sections; <code>errors</code> lists each offending field as "
        "<code>loc</code> and <code>msg</code>.</p>\n"
        f"{sections}\n</body></html>\n"
    )


def problem_body(error: ServiceError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem_type(error.slug),
        "title": error.title,
        "status": error.status,
        "detail": clip(error.detail),  # errors.py bounds them; this holds whatever is raised
    }
    if error.errors:
        body["errors"] = [{"loc": list(e.loc), "msg": clip(e.msg)} for e in error.errors]
    return body


def error_response(request: Request, error: ServiceError) -> Response:
    return error_reply(request.scope, error)


def error_reply(scope: Scope, error: ServiceError) -> Response:
    """The response to ``error``, in the form of the request's protocol."""
    if scope["path"].startswith("/v2"):
        content = orjson.dumps({"error": clip(error.detail)})
        media_type = "application/json"
    else:
        content = orjson.dumps(problem_body(error))
        media_type = "application/problem+json"
    headers = error.headers
    if not scope.get("state", {}).get("body_read") and has_body(scope["headers"]):
        # answered before its body was read (refused from its headers, or
        # part-way): closing the connection stops the upload, where keeping
        # it would read and discard the rest of the body on the event loop
        headers = {**headers, "Connection": "close"}
    return Response(content, status_code=error.status, media_type=media_type, headers=headers)


def internal_error(scope: Scope) -> Response:
    """The answer to an exception no handler expected (a bug, never the
    client's input): logged with its traceback, a 500 that says so. Called
    from inside the ``except`` that caught it."""
    log.exception("unhandled error on %s %s", scope["method"], scope["path"])
    return error_reply(scope, ServiceError("internal error; it has been logged"))


# The methods a 405's Allow may name (HEAD comes with every GET route).
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route takes at this request's path, asked of the
    router itself (routes may be nested routers)."""
    return [
        method
        for method in METHODS
        if any(r.matches({**scope, "method": method})[0] == Match.FULL for r in app.router.routes)
    ]


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
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route whose
            # path matched; GET and POST of /v1/losses/{name} are two routes
            allowed = allowed_methods(app, request.scope)
            headers["Allow"] = ", ".join(allowed)
            method = request.method if len(request.method) <= 20 else f"{request.method[:20]}..."
            detail = f"{method} is not allowed here; this route takes {headers['Allow']}"
        return error_response(request, _HTTPProblem(exc.status_code, detail, headers))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request.scope)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
