"""Logging: one structured line per request (JSON or key=value text), and
the same formats for the service's and uvicorn's own log records."""

from __future__ import annotations

import logging
import logging.config
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson


class AccessLog:
    """The per-request line: no LogRecord, no handler lock, no formatter chain
    (this runs for every request). ``line`` formats one; ``write`` takes any
    number of lines at once (the request middleware writes a batch)."""

    def __init__(self, fmt: str, write: Callable[[bytes], object] | None = None) -> None:
        self.json = fmt == "json"
        self.write = write or _write_stderr
        self._second = -1
        self._prefix = ""
        self._millisecond, self._stamp_bytes = (-1, -1), b""
        # the fixed parts of a JSON request line, by its labels (``request``)
        self._parts: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}

    def _stamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def line(self, fields: dict[str, Any], now: float) -> bytes:
        """One line for a request that finished at ``now`` (time.time())."""
        ts = self._stamp(now)
        if self.json:
            return orjson.dumps({"ts": ts, "level": "info", "logger": "loss_service.access",
                                 "msg": "request", **fields}) + b"\n"  # fmt: skip
        pairs = text_fields(fields)
        return f"{ts} INFO loss_service.access request {pairs}\n".encode()

    def request(
        self,
        request_id: bytes,
        labels: tuple[str, str, str | None, int, str | None],
        duration: float,
        bytes_in: int,
        bytes_out: int,
        now: float,
        path: str | None = None,
    ) -> bytes:
        """The line of one request: ``line`` with the fields ``request_id``,
        then ``labels`` (method, route, loss, status, device), the duration in
        ms, the bytes in and out, and the path when given, byte for byte.
        Without a path the labels' JSON is written once (they are few: the
        caller passes bounded ones), and a line costs about a third of
        ``line``'s."""
        parts = (
            (self._parts.get(labels) or self._learn(labels)) if self.json and path is None else None
        )
        if parts is None or not (request_id.isalnum() or PLAIN_ID.fullmatch(request_id)):
            method, route, loss, status, device = labels
            fields = {
                "request_id": request_id.decode(), "method": method, "route": route,
                "loss": loss, "status": status, "duration_ms": round(duration * 1000, 3),
                "bytes_in": bytes_in, "bytes_out": bytes_out, "device": device,
            }  # fmt: skip
            if path is not None:
                fields["path"] = path
            return self.line(fields, now)
        middle, last = parts
        second = int(now)
        millisecond = (second, int((now - second) * 1000))  # as _stamp reads it
        if millisecond != self._millisecond:  # a batch's lines share a few
            self._millisecond, self._stamp_bytes = millisecond, self._stamp(now).encode()
        return b'{"ts":"%s%s%s%s%s,"bytes_in":%d,"bytes_out":%d%s' % (
            self._stamp_bytes, REQUEST_PREFIX, request_id, middle,
            orjson.dumps(round(duration * 1000, 3)), bytes_in, bytes_out, last,
        )  # fmt: skip

    def _learn(self, labels: tuple[str, str, str | None, int, str | None]) -> tuple[bytes, bytes]:
        if len(self._parts) >= 512:  # bounded all the same (a client chooses the method)
            self._parts.clear()
        method, route, loss, status, device = labels
        fixed = orjson.dumps({"method": method, "route": route, "loss": loss, "status": status})
        parts = self._parts[labels] = (
            b'",' + fixed[1:-1] + b',"duration_ms":',
            b',"device":' + orjson.dumps(device) + b"}\n",
        )
        return parts


# A request id written into a JSON line as it is: printable ASCII without a
# quote or a backslash (any other is escaped by orjson, on the slow path).
PLAIN_ID = re.compile(rb"[ !#-\[\]-~]*")
REQUEST_PREFIX = b'","level":"info","logger":"loss_service.access","msg":"request","request_id":"'


# A value is written bare only when it cannot be read as more than one value:
# no space, quote, "=", backslash, and nothing that is not printable (control
# characters, line and paragraph separators).
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
_BARE_TYPES = (int, float, bool)
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def logfmt(value: Any) -> str:
    """One value of a key=value text line (logfmt): bare when that is
    unambiguous, else in double quotes with backslash escapes, so a value
    (a client's request id, a path) can never forge another field or line."""
    if value is None or type(value) in _BARE_TYPES:
        return str(value)
    text = str(value)
    if text and text.isprintable() and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + "".join(_escape(c) for c in text) + '"'


def _escape(char: str) -> str:
    escaped = _ESCAPES.get(char)
    if escaped is not None:
        return escaped
    if char.isprintable() or char == " ":
        return char
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _message(text: str) -> str:
    """A log message as free text, quoted like a value when it could be read
    as fields (an "=") or as more than one line."""
    if text.isprintable() and "=" not in text and '"' not in text:
        return text
    return logfmt(text)


def text_fields(fields: dict[str, Any]) -> str:
    """``k=v`` pairs of a text line; a field without a value (null in JSON) is
    left out rather than written ``loss=None``."""
    return " ".join(f"{k}={logfmt(v)}" for k, v in fields.items() if v is not None)


def iso_utc(created: float) -> str:
    """A timestamp as every log line writes it: ISO 8601, UTC, milliseconds, Z."""
    second = int(created)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{stamp}.{int((created - second) * 1000):03d}Z"


def _write_stderr(data: bytes) -> None:
    with memoryview(data) as rest:
        while rest:  # a pipe may take a large batch in parts
            rest = rest[os.write(sys.stderr.fileno(), rest) :]


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = text_fields(getattr(record, "fields", {}))
        message = _message(record.getMessage())
        text = f"{iso_utc(record.created)} {record.levelname} {record.name} {message}"
        text = f"{text} {fields}" if fields else text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


# The loggers whose records go through the service's formatter on stderr.
SERVICE_LOGGERS = ("loss_service", "service", "uvicorn", "uvicorn.error")


def dict_config(level: str, fmt: str) -> dict[str, Any]:
    """The service's and uvicorn's log records through one formatter on
    stderr, as a ``logging.config.dictConfig`` dict: what ``configure``
    applies here, and what uvicorn applies in each worker process it spawns
    (``LOSS_SERVICE_WORKERS`` > 1), which starts with Python's defaults."""
    formatter = "JSONFormatter" if fmt == "json" else "TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": {"()": f"service.logs.{formatter}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "service",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
            for name in SERVICE_LOGGERS
        },
    }


def configure(level: str, fmt: str) -> None:
    """Route the service's and uvicorn's logs through one formatter on stderr."""
    logging.config.dictConfig(dict_config(level, fmt))
    logging.getLogger("uvicorn.access").disabled = True  # AccessLog replaces it
