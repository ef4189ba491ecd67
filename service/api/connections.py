"""What a connection may cost before any request exists: uvicorn's httptools
protocol with the limits it lacks.

uvicorn bounds neither how long a client may take to send a request's headers
nor how large they may grow (httptools accumulates an unterminated header line
for as long as it keeps coming), and at shutdown it lets an upload that never
ends hold the process until the graceful timeout cancels it with a 500. This
protocol adds, per connection:

- a header timeout (``LOSS_SERVICE_HEADER_TIMEOUT``): headers not complete in
  time end the connection with a 408;
- a cap on the request line and headers together
  (``LOSS_SERVICE_MAX_HEADER_BYTES``): over it, a 431 before any routing or
  key check;
- a client that stops reading its response for ``LOSS_SERVICE_BODY_TIMEOUT``
  is disconnected (a response that cannot be sent would otherwise hold its
  memory, and its share of the memory budget, for ever);
- at shutdown (after the drain period), connections still uploading a body
  are closed at once, while computations in flight finish;
- a read of many pipelined requests is parsed in steps (``PARSE_STEP``), and
  no more than ``PIPELINE_DEPTH`` parsed requests wait per connection, so a
  flood neither holds the event loop nor piles up request cycles.

The body idle timeout is the application's own (``service.api.runtime``), so
it holds under any ASGI server.

It also answers small compute requests itself, in the call that parsed them,
without an ASGI request cycle (``service.api.direct``): a POST to a compute
route whose whole small body came with its headers. Any other request, and
any that one cannot answer, goes to the application as uvicorn would send it.

``loss-service serve`` installs this protocol; with plain uvicorn pass
``--http service.api.connections:GuardedHttpToolsProtocol``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.direct import Headers, direct_server
from service.api.problems import problem_type
from service.config import settings

log = logging.getLogger("service.errors")

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
# Requests of one read (one parse step) answered directly at most: the rest of
# a pipelined read goes to the application, whose tasks take turns with every
# other connection (a read of 256 KiB can hold thousands of small requests).
DIRECT_PER_READ = 4
# The most bytes of requests' heads and small bodies parsed in one event-loop
# step: uvloop hands over up to 256 KiB at once, and a read holding a whole
# pipelined flood (thousands of small requests) held the loop for up to 87 ms
# while every one was parsed and queued. The rest of such a read is parsed in
# later steps, reading paused meanwhile; a large body's bytes are not split
# (each step would be one more chunk for the application to take).
PARSE_STEP = 16 * 1024
# Requests parsed ahead of the one being answered, per connection, past which
# the rest of a read waits unparsed until the application has taken some:
# parsed all at once, a flood's 3,000 waiting request cycles per connection
# were garbage the collector walked again and again (full collections took up to
# 74 ms) and memory no limit counted.
PIPELINE_DEPTH = 32


class HeaderWatch:
    """The header timeouts and keep-alive deadlines of every connection of one
    event loop, checked by one timer: a connection only writes down when its
    headers are due, or when it has been idle long enough (a timer armed and
    cancelled per request cost more than the rest of the connection's
    bookkeeping). A deadline is met within a tenth of the header timeout (at
    most 1 s) after it passes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.interval = min(1.0, max(0.05, timeout / 10))
        self.connections: set[GuardedHttpToolsProtocol] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, connection: GuardedHttpToolsProtocol) -> None:
        self.connections.add(connection)
        if self.timer is None:
            self.timer = self.loop.call_later(self.interval, self.sweep)

    def discard(self, connection: GuardedHttpToolsProtocol) -> None:
        self.connections.discard(connection)

    def sweep(self) -> None:
        now = self.loop.time()
        late = [c for c in self.connections if c.headers_due is not None and c.headers_due <= now]
        for connection in late:
            connection.headers_due = None
            connection._header_timed_out()
        idle = [c for c in self.connections if c.idle_due is not None and c.idle_due <= now]
        for connection in idle:  # uvicorn's keep-alive timeout, ended as uvicorn ends it
            connection.idle_due = None
            if not connection.transport.is_closing():
                connection.transport.close()
        self.timer = self.loop.call_later(self.interval, self.sweep) if self.connections else None


_WATCHES: dict[asyncio.AbstractEventLoop, HeaderWatch] = {}


def header_watch(loop: asyncio.AbstractEventLoop, timeout: float) -> HeaderWatch:
    watch = _WATCHES.get(loop)
    if watch is None:
        for old in [other for other in _WATCHES if other.is_closed()]:
            del _WATCHES[old]
        watch = _WATCHES[loop] = HeaderWatch(loop, timeout)
    return watch


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = settings.header_timeout
        self.max_header_bytes = settings.max_header_bytes
        # from the connection's start, then from each message's first byte
        self.awaiting_headers = True
        self.header_bytes = 0
        self.arriving = 0  # the bytes of the data_received call in progress
        # loop.time() by which the headers (or a body's first bytes) must be in
        self.headers_due: float | None = None
        # loop.time() after which an idle keep-alive connection is closed
        self.idle_due: float | None = None
        self.watch = header_watch(self.loop, self.header_timeout)
        self.write_timeout = settings.body_timeout
        self.write_timer: asyncio.TimerHandle | None = None
        self.refused = False
        self.completed_here = False  # a message completed in the read in progress
        self.answered_here = 0  # requests answered directly in the read in progress
        # answering small compute requests here (None: the app has no direct server)
        self.direct = direct_server(self.app)
        self.direct_request: tuple[Any, str, Headers] | None = None  # (route, path, headers)
        self.direct_body: list[bytes] = []
        self.unparsed: list[bytes] = []  # read, not yet parsed (PARSE_STEP)
        self.step_due = False  # the next step of ``unparsed`` is scheduled
        self.deadline_held = False  # a header deadline set aside while bytes wait
        self.in_message = False  # a message has begun and not completed
        self.body_received = 0  # of the message in progress

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.headers_due = self.loop.time() + self.header_timeout
        self.watch.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.headers_due = None
        self.watch.discard(self)
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        super().resume_writing()

    def _write_timed_out(self) -> None:
        """The client read none of its response for the write timeout."""
        self.write_timer = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.unparsed:  # bytes of an earlier read still wait: these go after them
            self.unparsed.append(data)
            self.transport.pause_reading()
            return
        if len(data) > PARSE_STEP:
            data = self._step(data)
        self._parse(data)
        self._next_step()

    def _step(self, data: bytes) -> bytes:
        """What of ``data`` to parse now (the rest waits in ``unparsed``): at
        most PARSE_STEP bytes past the body in progress, whose own bytes are
        not split (all of a chunked one's)."""
        limit = PARSE_STEP
        if self.in_message and not self.awaiting_headers:
            length = next((v for k, v in self.headers if k == b"content-length"), None)
            if length is None or not length.isdigit():
                return data  # chunked (or refused): as it came
            limit += max(int(length) - self.body_received, 0)
        if len(data) <= limit:
            return data
        self.unparsed.insert(0, data[limit:])
        return data[:limit]

    def _next_step(self) -> None:
        """After a step that left bytes unparsed: reading pauses, and the next
        step comes in a later turn of the event loop, or, while PIPELINE_DEPTH
        requests wait, once the application has taken one
        (``on_response_complete``). The client sent what waits, so no header
        deadline runs meanwhile."""
        if not self.unparsed or self.transport.is_closing():
            return
        self.transport.pause_reading()
        if self.headers_due is not None:
            self.headers_due, self.deadline_held = None, True
        if not self.step_due and len(self.pipeline) < PIPELINE_DEPTH:
            self.step_due = True
            self.loop.call_soon(self._parse_next)

    def _parse_next(self) -> None:
        """The next step of a large read; reading resumes after the last
        step, unless uvicorn's flow control holds it."""
        self.step_due = False
        if self.refused or self.transport.is_closing():
            self.unparsed = []
            return
        if self.deadline_held:  # the deadline restarts as the bytes are parsed
            self.deadline_held = False
            self.headers_due = self.loop.time() + self.header_timeout
        self._parse(self._step(self.unparsed.pop(0)))
        if self.unparsed:
            self._next_step()
        elif not self.flow.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def _parse(self, data: bytes) -> None:
        if self.refused:
            return
        self.idle_due = None
        self.arriving = len(data)
        self.completed_here = False
        self.answered_here = 0
        super().data_received(data)
        self.arriving = 0
        if self.direct_request is not None:
            # its body did not all come with the headers: the ASGI way, with
            # what came so far
            self.direct_request = None
            body, self.direct_body = b"".join(self.direct_body), []
            if not self.transport.is_closing():
                self._to_application(body, complete=False)
        if self.awaiting_headers:  # a message has begun and its headers are not complete
            self.header_bytes += len(data)
            if self.completed_here and self.header_bytes > self.max_header_bytes:
                # this read held whole (pipelined) messages before this one's
                # start: count what is known of this one instead (a header line
                # still arriving is counted from the next read on, so the slack
                # is at most the rest of this read)
                self.header_bytes = len(self.url) + sum(
                    len(k) + len(v) + 4 for k, v in self.headers
                )
        if self.refused or (self.awaiting_headers and self.header_bytes > self.max_header_bytes):
            self._refuse(
                431,
                f"the request line and headers exceed {self.max_header_bytes} bytes "
                "(LOSS_SERVICE_MAX_HEADER_BYTES)",
            )

    def on_response_complete(self) -> None:
        """uvicorn's: the next pipelined request, or the keep-alive deadline,
        here checked by the HeaderWatch sweep instead of a timer per response."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif not self.unparsed:
            self.idle_due = self.loop.time() + self.timeout_keep_alive
        # bytes of a read still wait: reading stays paused, and their next
        # step comes now that the queue has room
        self._next_step()

    def shutdown(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            # still uploading after the drain period: cut it (its request ends
            # as a disconnect, and nothing answers for it)
            self.transport.close()
            return
        super().shutdown()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        # uvicorn's, less the ASGI scope: most requests are answered directly
        # and never need one (``_open_scope`` makes it for the application)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.awaiting_headers = True
        self.header_bytes = 0
        self.in_message = True
        self.body_received = 0
        if self.headers_due is None:
            self.headers_due = self.loop.time() + self.header_timeout

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        # the request line and headers came in the bytes counted so far and
        # the call in progress: only when those could exceed the cap are they
        # measured one by one
        if self.header_bytes + self.arriving > self.max_header_bytes:
            size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            if size > self.max_header_bytes:
                self.refused = True
                self.headers_due = None
                self._open_scope()  # uvicorn's upgrade check reads it
                return
        if self.direct is not None and self._direct_candidate():
            return  # no request cycle: answered at the message's end (or sent on)
        self._open_scope()
        # the deadline holds on until the body's first bytes (the application
        # reads a small body without a timeout of its own); a message without
        # a body completes here, in the same parse
        super().on_headers_complete()

    def _open_scope(self) -> None:
        """The request's ASGI scope, as uvicorn's ``on_message_begin`` makes it."""
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_body(self, body: bytes) -> None:
        self.headers_due = None
        self.body_received += len(body)
        if self.direct_request is not None:
            self.direct_body.append(body)  # at most the direct server's body limit
        elif not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.headers_due = None
        self.completed_here = True
        self.in_message = False
        if self.direct_request is not None:
            self._answer_directly()
        elif not self.refused:
            super().on_message_complete()

    # ------------------------------------------------------------------ direct answers

    def _direct_candidate(self) -> bool:
        """Whether this request may be answered here: a POST to a compute
        route, nothing in flight on the connection, the client reading its
        responses, and headers the direct server takes."""
        parser = self.parser
        cycle = self.cycle
        if (
            parser.get_method() != b"POST"
            or self.answered_here >= DIRECT_PER_READ
            or self.expect_100_continue
            or (cycle is not None and not cycle.response_complete)
            or self.flow.write_paused
            or self.limit_concurrency is not None
            or self.root_path
            or parser.should_upgrade()
        ):
            return False
        url = self.url
        # a path without a query (or fragment) is the whole request target
        plain = url[:1] == b"/" and b"?" not in url and b"#" not in url
        raw_path = url if plain else httptools.parse_url(url).path
        if b"%" in raw_path or not raw_path.isascii():
            return False  # percent-decoding is uvicorn's
        path = raw_path.decode("ascii")
        headers = dict(reversed(self.headers))  # the first of a repeated name wins
        assert self.direct is not None
        found = self.direct.route(path, headers)
        if found is None:
            return False
        self.direct_request = (found, path, headers)
        self.direct_body = []
        return True

    def _answer_directly(self) -> None:
        assert self.direct is not None and self.direct_request is not None
        found, path, headers = self.direct_request
        self.direct_request = None
        chunks, self.direct_body = self.direct_body, []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        parser = self.parser
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        try:
            answer = self.direct.answer(
                found, path, self.headers, headers, body, keep_alive,
                self.server_state.default_headers,
            )  # fmt: skip
        except Exception:  # a bug here: the application answers instead (a 500 at worst)
            log.exception("answering POST %s on the connection", path)
            answer = None
        if answer is None:
            self._to_application(body, complete=True)
            return
        pieces, keep_alive = answer
        self.answered_here += 1
        if len(pieces) == 2 and len(pieces[1]) <= 256 * 1024:
            self.transport.write(b"".join(pieces))  # one write, one segment
        else:
            self.transport.writelines(pieces)
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()  # uvicorn's: the next pipelined request, or keep-alive

    def _to_application(self, body: bytes, complete: bool) -> None:
        """Send the request the direct server did not answer to the
        application, as uvicorn would have: its cycle, then the body so far."""
        self._open_scope()
        HttpToolsProtocol.on_headers_complete(self)
        if body:
            HttpToolsProtocol.on_body(self, body)
        if complete:
            HttpToolsProtocol.on_message_complete(self)

    # ------------------------------------------------------------------ limits

    def _header_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        if self.awaiting_headers:
            what = "the request headers did not arrive"
        else:
            what = "no body bytes came after the request headers"
            if self.cycle is not None:
                self.cycle.disconnected = True  # the application's read ends
                self.cycle.message_event.set()
        self._refuse(408, f"{what} within {self.header_timeout:g} s (LOSS_SERVICE_HEADER_TIMEOUT)")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` with problem details and close the connection."""
        self.refused = True
        self.headers_due = None
        if self.transport.is_closing():
            return
        slug = REASONS[status].decode().lower().replace(" ", "-")
        body = orjson.dumps({
            "type": problem_type(slug),
            "title": REASONS[status].decode(),
            "status": status,
            "detail": detail,
        })  # fmt: skip
        head = b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]) + (
            b"content-type: application/problem+json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()
