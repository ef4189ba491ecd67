"""Reading request bodies and running compute off the event loop, with
backpressure: at most N computations at once, a bounded wait for a slot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import numpy as np
import torch
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from service import fastjson
from service.compute import Prepared
from service.config import Settings
from service.errors import (
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    quote,
)
from service.limits import (
    MemoryBudget,
    Reservation,
    default_budget,
    trim_freed_memory,
)
from service.logs import AccessLog
from service.metrics import Metrics
from service.shm import Regions

T = TypeVar("T")

JSON_TYPES = ("application/json", "")
# The default of LOSS_SERVICE_MALLOC_KEEP_BYTES where the budget allows it.
MALLOC_KEEP_MAX = 512 * 1024 * 1024

# A request body as read: bytes, or the buffer it was read into.
Body = bytes | bytearray | memoryview
# Where raw tensor bytes in a body start, as read (a cache line; torch wants
# at most 8 for its element types).
ALIGNMENT = 64

# Bodies larger than this are read into one preallocated buffer.
PREALLOCATE_MIN_BYTES = 64 * 1024
# v2 binary bodies at least this large go into pinned memory where that is on
# (below it, the pageable copy costs less than a trip to a worker thread).
PIN_MIN_BYTES = 1024 * 1024


# Bodies this small, sent uncompressed, are decoded on the event loop; they
# are computed there too when their predicted memory is at most this many
# bytes (tens to hundreds of microseconds of work, less than a hand-off to a
# worker thread and back). Everything else runs in the worker pool.
INLINE_MAX_WORK_BYTES = 4 * 1024 * 1024

# What parsing a JSON body may hold beyond the body itself, per byte and per
# value (simdjson's tape holds 16 bytes per number, the decoded arrays 8).
JSON_PARSE_BYTES_PER_BYTE = 2
JSON_PARSE_BYTES_PER_VALUE = 32

Admit = Callable[[int, str], None]
COMMA = ord(",")


def parse_bytes(body: Body, commas: int | None = None) -> int:
    """What parsing a JSON body is predicted to hold beside the body
    (``commas``: counted already, as the body arrived)."""
    if len(body) < PREALLOCATE_MIN_BYTES:
        return len(body) * 16
    values = commas if commas is not None else fastjson.count_byte(body, COMMA)
    return len(body) * JSON_PARSE_BYTES_PER_BYTE + (values + 1) * JSON_PARSE_BYTES_PER_VALUE


class Runtime:
    """Per-app state: settings, metrics, the computation slots, the memory
    budget, the drain flag."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.capacity = settings.max_concurrency or os.cpu_count() or 1
        self.slots = anyio.CapacityLimiter(self.capacity)
        self.threads = anyio.CapacityLimiter(self.capacity)
        budget = settings.memory_budget_bytes or default_budget()
        self.bodies = MemoryBudget(budget // 4, "memory budget for request bodies")
        self.budget = MemoryBudget(budget - budget // 4, "memory budget for computations")
        self.metrics.memory_budget.set(budget)
        # what glibc keeps of freed memory must fit beside the budget
        self.malloc_keep_bytes = (
            settings.malloc_keep_bytes
            if settings.malloc_keep_bytes is not None
            else min(MALLOC_KEEP_MAX, budget // 8)
        )
        self.metrics.memory_reserved.set_function(lambda: self.budget.used + self.bodies.used)
        self.draining = False
        verbose = settings.log_level in ("debug", "info")
        self.access_log = AccessLog(settings.log_format) if verbose else None
        # record what finished requests left for the metrics and the log
        self.flushers: list[Callable[[], None]] = []
        self.parsing = threading.Lock()
        self.holding = 0  # requests in flight that hold memory
        self.last_held = 0.0
        self.trim_due: asyncio.TimerHandle | None = None
        self.pin_bodies = pin_bodies(settings)
        # each worker process would have its own registry: a region
        # registered with one would be unknown to the others
        self.regions = Regions(
            self.bodies,
            enabled=settings.workers == 1,
            why_not="it needs LOSS_SERVICE_WORKERS=1 (each worker process would hold its own "
            "regions)",
        )

    def flush(self) -> None:
        for flush in self.flushers:
            flush()

    # ------------------------------------------------------------- memory per request

    def reservation(self, scope: Scope, pool: str = "memory") -> Reservation:
        """What this request holds in one pool of the memory budget
        (``memory``: computations, ``body_memory``: bodies), released by the
        request middleware when the response has gone."""
        state = scope.setdefault("state", {})
        held = state.get(pool)
        if held is None:
            budget = self.budget if pool == "memory" else self.bodies
            held = state[pool] = Reservation(budget)
            if not state.get("holds_memory"):
                state["holds_memory"] = True
                self.holding += 1
        assert isinstance(held, Reservation)
        return held

    def request_ended(self, scope: Scope) -> None:
        state = scope.get("state", {})
        for pool in ("memory", "body_memory"):
            held = state.get(pool)
            if held is not None:
                held.end()
        if not state.get("holds_memory"):
            return  # health checks and the like leave nothing to hand back
        self.holding -= 1
        self.last_held = time.monotonic()
        delay = self.settings.idle_trim_seconds
        if self.holding == 0 and delay and self.trim_due is None:
            loop = asyncio.get_running_loop()
            self.trim_due = loop.call_later(delay, self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        """No request has held memory for ``idle_trim_seconds``: hand freed
        heap pages back, so that resident memory returns to its idle size
        (glibc otherwise keeps the freed memory of every worker thread's
        arena). Requests that hold no memory (probes) do not delay it."""
        self.trim_due = None
        if self.holding:
            return  # the last of those requests re-arms it when it ends
        quiet = time.monotonic() - self.last_held
        delay = self.settings.idle_trim_seconds
        if quiet < delay:
            self.trim_due = loop.call_later(delay - quiet, self._trim, loop)
            return
        loop.run_in_executor(None, trim_freed_memory)
        # pinned bodies and results (service.tensors.to_host)
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            loop.run_in_executor(None, empty_pinned_cache)

    # ------------------------------------------------------------- where work runs

    async def evaluate(
        self,
        scope: Scope,
        prepare: Callable[[Admit], Prepared[T]],
        *,
        wire_bytes: int,
        compressed: bool = False,
    ) -> T:
        """Decode, check and cost a request (``prepare``), then compute it
        (``scope``: the request's, HTTP or gRPC, whose state holds its reservations).

        Small uncompressed bodies are prepared on the event loop, and also
        computed there when their prediction is small (a hand-off to a worker
        thread would cost more than the work). Everything else runs in the
        worker pool, in one slot: what decompressing and parsing will hold is
        reserved before, and what the call and its response are predicted to
        hold before they are computed.
        """
        deadline = time.monotonic() + self.settings.queue_timeout
        if self.decodes_inline(wire_bytes, compressed):
            prepared = prepare(self.admit_inline)
            if self.computes_inline(prepared):
                return prepared.finish()
            held = self.reservation(scope)
            return await self.run(
                self._reserve_and_finish, prepared, held, deadline, 0, held=held, deadline=deadline
            )
        held = self.reservation(scope)
        return await self.run(self._in_pool, prepare, held, deadline, held=held, deadline=deadline)

    def decodes_inline(self, wire_bytes: int, compressed: bool) -> bool:
        """Whether a body is decoded on the event loop: small and uncompressed."""
        return not compressed and wire_bytes <= self.settings.inline_max_body_bytes

    @staticmethod
    def computes_inline(prepared: Prepared[Any]) -> bool:
        """Whether a decoded call is computed on the event loop: predicted small."""
        return prepared.memory_bytes <= INLINE_MAX_WORK_BYTES

    @staticmethod
    def admit_inline(n: int, what: str) -> None:
        """A small body parsed on the event loop holds little: nothing to reserve."""

    def _in_pool(
        self, prepare: Callable[[Admit], Prepared[T]], held: Reservation, deadline: float
    ) -> T:
        parsing = 0

        def admit(n: int, what: str) -> None:
            nonlocal parsing
            self.budget.reserve_blocking(n, deadline, what, holding=held.held)
            held.add(n)
            parsing += n

        # Parsing is Python and GIL-bound (simdjson, base64 and the codec
        # hold the GIL in calls of milliseconds each): two parsing threads
        # would not parse faster, but would keep the event loop waiting for
        # the GIL twice as often. Computing (torch releases the GIL) still
        # overlaps.
        with self.parsing:
            prepared = prepare(admit)
        return self._reserve_and_finish(prepared, held, deadline, parsing)

    def _reserve_and_finish(
        self, prepared: Prepared[T], held: Reservation, deadline: float, parsing: int
    ) -> T:
        """Swap what parsing held for what the computation is predicted to
        hold, then compute."""
        extra = prepared.memory_bytes - parsing
        if extra > 0:
            self.budget.reserve_blocking(extra, deadline, "this request", holding=held.held)
            held.add(extra)
        else:
            held.give_back(-extra)
        return prepared.finish()

    async def run(
        self,
        func: Callable[..., T],
        *args: Any,
        held: Reservation | None = None,
        deadline: float | None = None,
    ) -> T:
        """Run ``func`` in a worker thread once a computation slot is free.

        A request that waits past its deadline (the queue timeout) for a slot,
        or longer than the compute timeout for its result, gets a 503; a
        computation that outlives its request keeps its slot and its memory
        reservation until it ends, so the pool never runs more than N at once
        and the budget never undercounts.
        """
        if deadline is None:
            deadline = time.monotonic() + self.settings.queue_timeout
        token = object()
        loop = asyncio.get_running_loop()
        self.metrics.queued.inc()
        try:
            with anyio.move_on_after(max(deadline - time.monotonic(), 0)) as waited:
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
        if held is not None:
            held.pin()

        # Taken once: by the worker thread as it starts the computation, or
        # by this request when it ends before that (cancelled, e.g. by Ray
        # Serve when the client disconnects, or timed out): anyio then never
        # runs ``work``, and the slot would otherwise be lost for good.
        claim = threading.Lock()

        def work() -> T:
            if not claim.acquire(blocking=False):
                raise asyncio.CancelledError  # the request is gone: nobody reads this
            try:
                return func(*args)
            finally:
                if held is not None:
                    held.unpin()
                # without waiting for the loop (the request may have given up on us)
                with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
                    loop.call_soon_threadsafe(self._release, token)

        try:
            with anyio.move_on_after(self.settings.compute_timeout) as ran:
                return await anyio.to_thread.run_sync(
                    work, abandon_on_cancel=True, limiter=self.threads
                )
        finally:
            if claim.acquire(blocking=False):  # ``work`` never started and never will
                if held is not None:
                    held.unpin()
                self._release(token)
        assert ran.cancelled_caught
        raise Overloaded(
            f"the computation took longer than {self.settings.compute_timeout:g} s "
            "(LOSS_SERVICE_COMPUTE_TIMEOUT); retry later or send less",
            retry_after=5,
        )

    def _release(self, token: object) -> None:
        self.slots.release_on_behalf_of(token)
        self.metrics.computing.dec()


RUNTIME_KEY = "loss_service.runtime"


def runtime(request: Request) -> Runtime:
    """The app's runtime: put in the scope by the request middleware (reading
    it from the app's state costs a few attribute lookups more)."""
    value = request.scope.get(RUNTIME_KEY) or request.app.state.runtime
    assert isinstance(value, Runtime)
    return value


async def read_body(
    request: Request, limit: int, *, align: int = 0, count_commas: bool = False
) -> Body:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``.

    Every byte counts against the memory budget as it arrives (a request
    waits for room, then gets a 503), and a body that stops arriving for
    ``body_timeout`` seconds is a 408. A large body with a Content-Length is
    read into one buffer of that size, reserved in virtual memory only: its
    pages become resident as the bytes arrive, so an idle connection that
    announced 64 MiB holds nothing. With ``align`` (where raw tensor bytes
    start: the v2 binary extension's JSON header length), the buffer is placed
    so that they start 64-byte aligned and the tensors use them in place.
    With ``count_commas`` (a JSON body), its commas are counted piece by piece
    as it arrives, for ``parse_bytes``: the count overlaps the upload instead
    of costing a pass of its own (``body_commas`` in the scope's state).
    """
    length = header(request.scope, b"content-length")
    declared = (
        int(length)
        if length is not None and length.isascii() and length.isdigit() and len(length) < 19
        else None
    )
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} bytes "
            "(LOSS_SERVICE_MAX_BODY_BYTES)"
        )
    rt = runtime(request)
    receive = request.receive
    if declared is not None and declared <= PREALLOCATE_MIN_BYTES:
        # A small body almost always came with its headers: one message, taken
        # as it is (no reservation: the server buffers this much per
        # connection anyway; a client that sends no body at all meets the
        # connection layer's header timeout, which runs until body bytes come).
        first = await receive()
        if first["type"] == "http.request" and not first.get("more_body", False):
            request.scope.setdefault("state", {})["body_read"] = True
            body: Body = first.get("body", b"")
            return body
        receive = _replay(first, receive)
    if declared is not None and rt.bodies.used + declared > rt.bodies.limit:
        # refused before the client uploads any of it
        raise rt.bodies.refusal(declared, "the request body")
    reader = BodyReader(receive, rt, rt.reservation(request.scope, "body_memory"))
    reader.commas = 0 if count_commas else None
    try:
        if declared is not None and declared > PREALLOCATE_MIN_BYTES:
            pinned = rt.pin_bodies and align > 0 and declared >= PIN_MIN_BYTES
            body = await reader.watched(reader.read_into(declared, align, pinned))
        else:
            body = await reader.watched(reader.read_chunks(limit))
        state = request.scope.setdefault("state", {})
        state["body_read"] = True
        state["body_commas"] = reader.commas
        return body
    except ClientDisconnect:
        raise BadRequest("the client disconnected before sending the whole body") from None


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` with ``first`` (already received) in front."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class BodyReader:
    """The body straight from the ASGI messages (no starlette stream generator
    per chunk), counted against the memory budget as it arrives."""

    def __init__(self, receive: Receive, rt: Runtime, held: Reservation) -> None:
        self.receive = receive
        self.budget = rt.bodies
        self.held = held
        self.queue_timeout = rt.settings.queue_timeout
        self.body_timeout = rt.settings.body_timeout
        self.last = 0.0  # time.monotonic() of the last body bytes
        self.commas: int | None = None  # counted as the body arrives, when not None
        self.prereserved = False  # the whole buffer is counted already (pinned)

    async def watched(self, reading: Awaitable[T]) -> T:
        """``reading``, cancelled with a 408 once no body bytes have arrived
        for the body timeout: one timer for the whole body (a timeout per
        chunk cost more than copying the chunk)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        timed_out = False
        handle: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal handle, timed_out
            idle = time.monotonic() - self.last
            if idle >= self.body_timeout:
                timed_out = True
                task.cancel()
            else:
                handle = loop.call_later(self.body_timeout - idle, check)

        self.last = time.monotonic()
        handle = loop.call_later(self.body_timeout, check)
        try:
            return await reading
        except asyncio.CancelledError:
            if not timed_out:
                raise
            task.uncancel()
            raise RequestTimeout(
                f"no body bytes arrived for {self.body_timeout:g} s (LOSS_SERVICE_BODY_TIMEOUT)"
            ) from None
        finally:
            if handle is not None:
                handle.cancel()

    async def next_chunk(self) -> tuple[bytes, bool]:
        """The next piece of the body, and whether more follows."""
        message = await self.receive()
        self.last = time.monotonic()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        if chunk and not self.prereserved:
            if not self.budget.try_reserve(len(chunk)):
                deadline = time.monotonic() + self.queue_timeout
                await self.budget.reserve(
                    len(chunk), deadline, "the request body", holding=self.held.held
                )
            self.held.add(len(chunk))
            self.last = time.monotonic()
        if chunk and self.commas is not None:
            self.commas += fastjson.count_byte(chunk, COMMA)
        return chunk, message.get("more_body", False)

    async def read_chunks(self, limit: int) -> bytes:
        # a small body is one message, returned as is
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk, more = await self.next_chunk()
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

    async def read_into(self, length: int, align: int, pinned: bool = False) -> memoryview:
        raw = await self.pinned(length + ALIGNMENT) if pinned else None
        if raw is None:
            # np.empty: neither zero-filled nor touched, so resident memory
            # grows with the bytes that arrive, not with the Content-Length
            raw = np.empty(length + ALIGNMENT, np.uint8)
        start = -(raw.ctypes.data + align) % ALIGNMENT if 0 < align < length else 0
        view = raw.data[start : start + length]
        # this loop's pace is the upload's (the server stops reading the socket
        # until the app takes the last chunk)
        size = 0
        more = True
        while more:
            chunk, more = await self.next_chunk()
            view[size : size + len(chunk)] = chunk  # the server enforces Content-Length
            size += len(chunk)
        return view

    async def pinned(self, size: int) -> np.ndarray[Any, Any] | None:
        """A page-locked buffer of ``size`` bytes, counted against the budget
        in full before it exists (its pages are resident from the start, and
        torch's caching host allocator rounds it up to a power of two), or
        None where it cannot be had (the pageable path then)."""
        block = pinned_block_bytes(size)
        if block > self.budget.limit:
            return None
        if not self.budget.try_reserve(block):
            deadline = time.monotonic() + self.queue_timeout
            await self.budget.reserve(block, deadline, "the request body", holding=self.held.held)
        self.held.add(block)
        try:
            # off the event loop: a new block takes a cudaHostAlloc (tens of
            # milliseconds for hundreds of MB); a cached one microseconds
            raw = await anyio.to_thread.run_sync(pinned_buffer, size)
        except RuntimeError:  # no page-locked memory to be had
            self.held.give_back(block)
            return None
        self.prereserved = True
        return raw


def pin_bodies(settings: Settings) -> bool:
    """Whether large v2 binary bodies are received into pinned host memory:
    as asked, else where the default device is CUDA. The tensors of such a
    body are used in place, so the host-to-device copy reads pinned pages at
    the DMA engine's speed (a pageable copy goes through the driver's
    staging buffer at a fraction of it)."""
    if not torch.cuda.is_available():
        return False
    if settings.pin_body_memory is not None:
        return settings.pin_body_memory
    return settings.device == "auto" or settings.device.startswith("cuda")


def pinned_block_bytes(size: int) -> int:
    """What torch's caching host allocator takes for ``size`` bytes."""
    return 1 << max(size - 1, 0).bit_length()


def pinned_buffer(size: int) -> np.ndarray[Any, Any]:
    # the array keeps the tensor (and its pinned block) alive
    return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()


def empty_pinned_cache() -> None:
    """Hand the pinned blocks torch's host allocator keeps for reuse back to
    the system (their pages are resident and outside the memory budget once
    the request that used them has ended)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def is_compressed(encoding: str) -> bool:
    return encoding.strip().lower() not in ("", "identity")


def decompress(
    body: Body, encoding: str, limit: int, admit: Admit, *, step: int = 4 * 1024 * 1024
) -> Body:
    """Undo a request's Content-Encoding (gzip or deflate), never past ``limit``
    bytes, reserving the decompressed bytes in the memory budget as they come
    (a small body can inflate a thousandfold)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:40]!r} is not supported; use gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    size = 0
    pending: bytes | memoryview = memoryview(body)
    try:
        while True:
            part = inflater.decompress(pending, step)
            pending = inflater.unconsumed_tail
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(
                    f"decompressed request body exceeds the limit of {limit} bytes "
                    "(LOSS_SERVICE_MAX_BODY_BYTES)"
                )
            admit(len(part), "the decompressed request body")
            parts.append(part)
            if inflater.eof or (not pending and not part):
                break
    except zlib.error as exc:
        raise BadRequest(f"invalid {encoding} request body: {exc}") from None
    if not inflater.eof:
        raise BadRequest(f"truncated {encoding} request body")
    # the join doubles the bytes for a moment
    admit(size, "the decompressed request body")
    return b"".join(parts)


HEADERS_KEY = "loss_service.headers"


def scope_header(scope: Scope, name: bytes) -> bytes | None:
    """One request header (lower-case ``name``; the first of its name), read
    from the ASGI scope without building starlette's Headers: the headers
    become one dict at the first read, kept in the scope for the next."""
    headers = scope.get(HEADERS_KEY)
    if headers is None:
        # reversed: the first of a repeated name wins, as a scan from the front
        headers = scope[HEADERS_KEY] = dict(reversed(scope["headers"]))
    value = headers.get(name)
    return value if value is None or type(value) is bytes else bytes(value)


def header(scope: Scope, name: bytes) -> str | None:
    """One request header as text (``scope_header``)."""
    value = scope_header(scope, name)
    return value.decode("latin-1") if value is not None else None


def require_json(scope: Scope) -> None:
    raw = scope_header(scope, b"content-type")
    if raw == b"application/json":
        return
    media = (raw or b"").decode("latin-1").split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"content type {quote(media)} is not supported; send application/json"
        )


# A JSON body; large numeric arrays come out as flat buffers (service.fastjson).
parse_json = fastjson.loads


class RawResponse(Response):
    """A 200 (or ``status``) response with its header list written directly:
    the compute routes answer every request with one, and starlette's header
    machinery costs more than the rest of a small response."""

    def __init__(
        self,
        content: bytes | bytearray | memoryview,
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


class PiecesResponse(RawResponse):
    """A response whose body goes out as the pieces it was made of (a JSON
    header, then views of result tensors), each its own write: a large
    gradient is not copied into one body first."""

    def __init__(
        self,
        pieces: list[bytes | memoryview],
        media_type: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        super().__init__(b"", media_type, headers)
        self.pieces = pieces
        self.raw_headers[0] = (b"content-length", b"%d" % sum(len(p) for p in pieces))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self.pieces) - 1
        for i, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < last})
