"""Reading request bodies and running compute off the event loop, with
backpressure: at most N computations at once, a bounded wait for a slot."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from service import fastjson
from service.config import Settings
from service.errors import (
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.logs import AccessLog
from service.metrics import Metrics

T = TypeVar("T")

JSON_TYPES = ("application/json", "")
# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

# A request body as read: bytes, or the buffer it was read into.
Body = bytes | bytearray | memoryview
# Where raw tensor bytes in a body start, as read (a cache line; torch wants
# at most 8 for its element types).
ALIGNMENT = 64

# Bodies larger than this are read into one preallocated buffer.
PREALLOCATE_MIN_BYTES = 64 * 1024


class Runtime:
    """Per-app state: settings, metrics, the computation slots, the drain flag."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.capacity = settings.max_concurrency or os.cpu_count() or 1
        self.slots = anyio.CapacityLimiter(self.capacity)
        self.threads = anyio.CapacityLimiter(self.capacity)
        self.draining = False
        verbose = settings.log_level in ("debug", "info")
        self.access_log = AccessLog(settings.log_format) if verbose else None
        # record what finished requests left for the metrics and the log
        self.flushers: list[Callable[[], None]] = []

    def flush(self) -> None:
        for flush in self.flushers:
            flush()

    async def run(self, func: Callable[..., T], *args: Any, body_bytes: int) -> T:
        """Run ``func`` in a worker thread once a computation slot is free.

        Requests of at most ``inline_max_body_bytes`` are computed on the
        event loop instead: their work (tens to hundreds of microseconds) costs
        less than handing it to a worker thread and back, and a body that
        small bounds it. Everything larger goes through the pool.

        A request that waits longer than the queue timeout for a slot, or
        longer than the compute timeout for its result, gets a 503; a
        computation that outlives its request keeps its slot until it ends,
        so the pool never runs more than N at once.
        """
        if body_bytes <= self.settings.inline_max_body_bytes:
            return func(*args)
        token = object()
        loop = asyncio.get_running_loop()
        self.metrics.queued.inc()
        try:
            with anyio.move_on_after(self.settings.queue_timeout) as waited:
                await self.slots.acquire_on_behalf_of(token)
        finally:
            self.metrics.queued.dec()
        if waited.cancelled_caught:
            raise Overloaded(
                f"all {self.capacity} computation slots stayed busy for "
                f"{self.settings.queue_timeout:g} s; retry later",
                retry_after=1,
            )
        self.metrics.computing.inc()

        def work() -> T:
            try:
                return func(*args)
            finally:
                # without waiting for the loop (the request may have given up on us)
                with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
                    loop.call_soon_threadsafe(self._release, token)

        with anyio.move_on_after(self.settings.compute_timeout) as ran:
            return await anyio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=self.threads
            )
        assert ran.cancelled_caught
        raise Overloaded(
            f"the computation took longer than {self.settings.compute_timeout:g} s "
            "(LOSS_SERVICE_COMPUTE_TIMEOUT); retry later or send less",
            retry_after=5,
        )

    def _release(self, token: object) -> None:
        self.slots.release_on_behalf_of(token)
        self.metrics.computing.dec()


def runtime(request: Request) -> Runtime:
    value = request.app.state.runtime
    assert isinstance(value, Runtime)
    return value


async def read_body(request: Request, limit: int, *, align: int = 0) -> Body:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``.

    A large body with a Content-Length is read into one buffer of that size
    (no second copy to join chunks); others are joined at the end. With
    ``align`` (where raw tensor bytes start: the v2 binary extension's JSON
    header length), that buffer is placed so that they start 64-byte aligned
    and the tensors use them in place.
    """
    length = header(request, b"content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} bytes "
            "(LOSS_SERVICE_MAX_BODY_BYTES)"
        )
    try:
        if declared is not None and declared > PREALLOCATE_MIN_BYTES:
            return await _read_into(request, declared, align)
        return await _read_chunks(request, limit)
    except ClientDisconnect:
        raise BadRequest("the client disconnected before sending the whole body") from None


async def _next_chunk(receive: Receive) -> tuple[bytes, bool]:
    """The next piece of the body straight from the ASGI messages (no starlette
    stream generator per chunk), and whether more follows."""
    message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnect()
    return message.get("body", b""), message.get("more_body", False)


async def _read_chunks(request: Request, limit: int) -> bytes:
    # a small body is one message, returned as is
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk, more = await _next_chunk(request.receive)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {limit} bytes (LOSS_SERVICE_MAX_BODY_BYTES)"
            )
        if not more:
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def _read_into(request: Request, length: int, align: int) -> bytearray | memoryview:
    buffer: bytearray | None = None
    if 0 < align < length:
        # not zero-filled first: every byte is about to be written
        raw = np.empty(length + ALIGNMENT, np.uint8)
        start = -(raw.ctypes.data + align) % ALIGNMENT
        view = raw.data[start : start + length]
    else:
        buffer = bytearray(length)
        view = memoryview(buffer)
    # this loop's pace is the upload's (the server stops reading the socket
    # until the app takes the last chunk)
    size = 0
    more = True
    while more:
        chunk, more = await _next_chunk(request.receive)
        view[size : size + len(chunk)] = chunk  # the server enforces Content-Length
        size += len(chunk)
    if buffer is None:
        return view
    view.release()
    return buffer


def scope_header(scope: Scope, name: bytes) -> bytes | None:
    """One request header (lower-case ``name``), read from the ASGI scope
    without building starlette's Headers."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def header(request: Request, name: bytes) -> str | None:
    value = scope_header(request.scope, name)
    return value.decode("latin-1") if value is not None else None


def require_json(request: Request) -> None:
    media = (header(request, b"content-type") or "").split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"content type {media!r} is not supported; send application/json"
        )


def parse_json(body: bytes | bytearray) -> Any:
    """A JSON body; large numeric arrays come out as flat buffers (service.fastjson)."""
    return fastjson.loads(body)


class RawResponse(Response):
    """A 200 (or ``status``) response with its header list written directly:
    the compute routes answer every request with one, and starlette's header
    machinery costs more than the rest of a small response."""

    def __init__(
        self,
        content: bytes | bytearray,
        media_type: bytes,
        headers: list[tuple[bytes, bytes]],
        status: int = 200,
    ) -> None:
        self.status_code = status
        self.background = None
        self.body = content if isinstance(content, bytes) else memoryview(content)
        self.raw_headers = [
            (b"content-length", b"%d" % len(content)),
            (b"content-type", media_type),
            *headers,
        ]


def keep_freed_memory(keep_bytes: int) -> bool:
    """Have glibc's malloc keep up to ``keep_bytes`` of freed memory for reuse.

    By default glibc serves every block over 32 MiB (and, until its threshold
    adapts, over 128 KiB) with a fresh ``mmap`` and gives it back on free, so
    each large request faults in its body, its tensors and their results page
    by page: a large b64 request spent about half its time so. Blocks up to
    ``keep_bytes / 2`` now come from the heap, and up to ``keep_bytes`` of free
    heap stays mapped. The price is resident memory that stays at the level of
    the largest recent request. Returns False where this is not glibc.
    """
    if keep_bytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    keep = min(keep_bytes, 2**31 - 1)  # mallopt takes a C int
    return all(
        mallopt(param, value)
        for param, value in (
            (M_MMAP_THRESHOLD, keep // 2),
            (M_TRIM_THRESHOLD, keep),
            (M_TOP_PAD, min(keep // 8, 64 * 1024 * 1024)),
        )
    )
