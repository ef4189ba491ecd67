"""One error hierarchy for the whole service.

Compute and codec code raise these; ``service.api.problems`` turns them into
RFC 9457 problem details (v1) and ``{"error": ...}`` bodies (v2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    loc: tuple[str | int, ...]
    msg: str

    def text(self) -> str:
        where = ".".join(str(p) for p in self.loc if p != "body")
        return f"{where}: {self.msg}" if where else self.msg


class ServiceError(Exception):
    status: int = 500
    title: str = "Internal Server Error"
    slug: str = "internal"

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors)
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, title, slug = 400, "Bad Request", "bad-request"


class Unauthorized(ServiceError):
    status, title, slug = 401, "Unauthorized", "unauthorized"


class UnknownLoss(ServiceError):
    status, title, slug = 404, "Unknown loss", "unknown-loss"


class NotFound(ServiceError):
    status, title, slug = 404, "Not Found", "not-found"


class RequestTimeout(ServiceError):
    """408: the body stopped arriving; the connection is closed after the answer."""

    status, title, slug = 408, "Request timeout", "request-timeout"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Connection": "close"})


class PayloadTooLarge(ServiceError):
    status, title, slug = 413, "Payload too large", "payload-too-large"


class UnsupportedMediaType(ServiceError):
    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class InvalidPayload(ServiceError):
    """422: the request parsed but a field holds something the loss cannot take."""

    status, title, slug = 422, "Invalid payload", "invalid-payload"

    def __init__(self, errors: Sequence[FieldError], *, detail: str | None = None) -> None:
        if not errors:
            raise ValueError("InvalidPayload needs at least one FieldError")
        super().__init__(detail or errors[0].text(), errors=errors)


class Overloaded(ServiceError):
    status, title, slug = 503, "Service overloaded", "overloaded"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


def invalid(loc: str | int | Sequence[str | int], msg: str) -> InvalidPayload:
    """An InvalidPayload for one field: ``raise invalid("target", "expected ...")``."""
    path: tuple[str | int, ...] = (loc,) if isinstance(loc, str | int) else tuple(loc)
    return InvalidPayload([FieldError(("body", *path), msg)])
