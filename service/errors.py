"""One error hierarchy for the whole service.

Compute and codec code raise these; ``service.api.problems`` turns them into
RFC 9457 problem details (v1) and ``{"error": ...}`` bodies (v2).
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# What an error may repeat of the client's input. A message quotes at most
# QUOTE_LIMIT characters of any value (``quote``); whatever builds a message,
# no detail, msg or loc part is kept longer than MESSAGE_LIMIT, and a problem
# lists at most MAX_ERRORS field errors: a 50 MB string in a body must not come
# back as a 100 MB error.
QUOTE_LIMIT = 200
MESSAGE_LIMIT = 2000
MAX_ERRORS = 50

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = QUOTE_LIMIT
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 10


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters of it.

    Long strings and containers are cut before anything is formatted (a
    value's repr is never built in full, so no size or nesting depth of a
    client value costs more than ``limit``), and a cut says how long the
    value was.
    """
    if isinstance(value, str | bytes | bytearray):
        text, total = repr(value[:limit]), len(value)
        unit, shown = ("characters" if isinstance(value, str) else "bytes"), limit
    else:
        try:
            text = _REPR.repr(value)
        except (ValueError, RecursionError):  # an int of more digits than str() allows
            text = f"<{type(value).__name__}>"
        total = len(value) if isinstance(value, list | tuple | dict) else 0
        unit, shown = "items", _REPR.maxlist
    if len(text) <= limit and total <= shown:
        return text
    return f"{text[:limit]}... ({total} {unit} in all)" if total else f"{text[:limit]}..."


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message as kept: at most ``limit`` characters, saying where it was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"


def _clip_loc(part: str | int) -> str | int:
    return clip(part, QUOTE_LIMIT) if isinstance(part, str) else part


@dataclass(frozen=True)
class FieldError:
    loc: tuple[str | int, ...]
    msg: str

    def __post_init__(self) -> None:
        # field names can be client keys (an unknown field of any length)
        object.__setattr__(self, "loc", tuple(_clip_loc(p) for p in self.loc[:100]))
        object.__setattr__(self, "msg", clip(self.msg))

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
        detail = clip(detail)
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
        if len(errors) > MAX_ERRORS:
            more = FieldError(errors[0].loc[:1], f"and {len(errors) - MAX_ERRORS} more errors")
            errors = [*errors[:MAX_ERRORS], more]
        super().__init__(detail or errors[0].text(), errors=errors)


class Overloaded(ServiceError):
    status, title, slug = 503, "Service overloaded", "overloaded"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


def invalid(loc: str | int | Sequence[str | int], msg: str) -> InvalidPayload:
    """An InvalidPayload for one field: ``raise invalid("target", "expected ...")``."""
    path: tuple[str | int, ...] = (loc,) if isinstance(loc, str | int) else tuple(loc)
    return InvalidPayload([FieldError(("body", *path), msg)])


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """ " (did you mean 'x'?)" for the closest of ``choices`` to a misspelt
    name (standard library ``difflib``; else the first choice the name
    begins, "huber" -> "huber_loss"), "" when none is close."""
    lowered = {choice.lower(): choice for choice in choices}
    key = name[:QUOTE_LIMIT].lower()
    # 0.75: close enough for typos (label_smothing, cross_entropi), not so
    # loose that focal_loss passes for l1_loss
    found = difflib.get_close_matches(key, list(lowered), n=1, cutoff=0.75)
    if not found and len(key) >= 3:
        found = [choice for choice in lowered if choice.startswith(key)][:1]
    return f" (did you mean {lowered[found[0]]!r}?)" if found else ""
