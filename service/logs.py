"""Logging: one structured line per request (JSON or key=value text), and
the same formats for the service's and uvicorn's own log records."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson


class AccessLog:
    """The per-request line: no LogRecord, no handler lock, no formatter chain
    (this runs on every request).

    On the event loop, the lines of the requests that finish in one turn of
    the loop go out in one ``write``, made as soon as that turn's callbacks
    have run (``call_soon``): microseconds later, and one system call instead
    of one per request under load. Elsewhere each line is written at once.
    """

    def __init__(self, fmt: str, write: Callable[[bytes], object] | None = None) -> None:
        self.json = fmt == "json"
        self.write = write or (lambda data: os.write(sys.stderr.fileno(), data))
        self._second = -1
        self._prefix = ""
        self._pending: list[bytes] = []

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self.write(data)

    def _emit(self, line: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.write(line)
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(line)

    def __call__(self, fields: dict[str, Any]) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        ts = f"{self._prefix}.{int((now - second) * 1000):03d}Z"
        if self.json:
            line = orjson.dumps({"ts": ts, "level": "info", "logger": "loss_service.access",
                                 "msg": "request", **fields})  # fmt: skip
        else:
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{ts} INFO loss_service.access request {pairs}".encode()
        self._emit(line + b"\n")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        text = f"{self.formatTime(record)} {record.levelname} {record.name} {record.getMessage()}"
        text = f"{text} {fields}" if fields else text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(level: str, fmt: str) -> None:
    """Route the service's and uvicorn's logs through one formatter on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    for name in ("loss_service", "service", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # AccessLog replaces it
