"""Large bodies over plain HTTP/1.1 at the socket's speed, for service.client.

httpx sends a large ``bytes`` body and reads a large response 64 KiB at a time,
through h11, with copies on the way (encode/httpcore#1029, encode/httpx#3660):
measured here on a 64 MB body, 3-10x curl's time. The standard library's
``http.client`` sends each piece of the body with one ``sendall`` and reads the
response with ``readinto`` straight into the caller's buffers, so a tensor's
bytes are copied once each way (socket <-> tensor memory) and never joined.

What this module does not do, httpx keeps doing for the client: TLS, proxies,
HTTP/2, custom transports. ``Exchange`` maps its failures onto httpx's
exception types, so a caller sees the same errors from either path.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Self
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import httpx

PIECE = 1 << 20  # bytes per sendall / readinto: per-piece timeouts, as httpx's are
MAX_ERROR_BODY = 1 << 20  # an error answer is read up to this much


def usable(base_url: str, trust_env: bool = True) -> bool:
    """Whether ``base_url`` can be reached directly: plain http, no proxy for it."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if not trust_env:
        return True
    proxies = getproxies()
    if not any(k in proxies for k in ("http", "all")):
        return True
    return bool(proxy_bypass(parts.hostname))


def pieces(views: Iterable[memoryview]) -> Iterator[memoryview]:
    """Each view cut into PIECE-byte slices (no copies)."""
    for view in views:
        flat = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        for start in range(0, flat.nbytes, PIECE):
            yield flat[start : start + PIECE]


@contextlib.contextmanager
def reading(drop: Callable[[], None], timed_out: str) -> Iterator[None]:
    """Failures while reading a response as httpx's exceptions (``timed_out``:
    what a timeout says); the connection, in an unknown state then, is
    dropped first (``drop``)."""
    try:
        yield
    except TimeoutError:
        drop()
        raise httpx.ReadTimeout(timed_out) from None
    except (http.client.HTTPException, OSError) as exc:
        drop()
        raise httpx.RemoteProtocolError(f"reading the response: {exc!r}") from exc


class Reply:
    """A response whose status line and headers have been read; the body is
    read by the caller (``read_into`` / ``read_all``), then ``close`` gives the
    connection back to its pool."""

    def __init__(
        self,
        pool: ConnectionPool,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        timeout: httpx.Timeout,
    ) -> None:
        self._pool, self._conn, self._response = pool, conn, response
        self._timeout = timeout
        self.status = response.status
        self.reason = response.reason
        self.headers = httpx.Headers(response.getheaders())
        self._done = False

    @property
    def remaining(self) -> int | None:
        """Body bytes not read yet (None when the server sent no Content-Length)."""
        return self._response.length

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        """Failures while reading the body as httpx's exceptions; the
        connection, in an unknown state then, is dropped."""
        return reading(self._discard, f"no response data within {self._timeout.read} s")

    def read_into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` from the body: the next ``buffer.nbytes`` bytes."""
        flat = buffer.cast("B") if buffer.ndim != 1 or buffer.format != "B" else buffer
        position = 0
        with self._reading():
            while position < flat.nbytes:
                got = self._response.readinto(flat[position : position + PIECE])
                if not got:
                    raise httpx.RemoteProtocolError("the server closed the connection early")
                position += got

    def read_all(self, limit: int | None = None) -> bytes:
        """The rest of the body (at most ``limit`` bytes, then the connection is dropped)."""
        length = self.remaining
        if length is not None and (limit is None or length <= limit):
            data = bytearray(length)
            self.read_into(memoryview(data))
            return bytes(data)
        with self._reading():
            data_read = self._response.read(limit) if limit is not None else self._response.read()
        if limit is not None:
            self._discard()  # the unread rest would corrupt the next exchange
        return data_read

    def close(self) -> None:
        """Back to the pool when the body was read in full and the server keeps
        the connection open; else closed."""
        if self._done:
            return
        self._done = True
        read = self._response.length == 0 or self._response.isclosed()
        if read and not self._response.will_close:
            self._pool.give_back(self._conn)
            return
        self._conn.close()

    def _discard(self) -> None:
        self._done = True
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            self._discard()
        self.close()


def idle_and_open(conn: http.client.HTTPConnection) -> bool:
    """Whether a kept connection can take a request: an idle connection with
    something to read (the end of the stream, most often) was closed by the
    server at its keep-alive timeout, and sending a large body into it would
    only fail. A peek, not select(), which refuses descriptors past 1023."""
    sock = conn.sock
    if sock is None:
        return False
    sock.setblocking(False)  # request() sets the timeouts again
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # nothing to read: still open
    except OSError:
        return False
    return False


class ConnectionPool:
    """Keep-alive connections to one host, shared by threads (one exchange per
    connection at a time)."""

    def __init__(self, base_url: str, timeout: httpx.Timeout, max_idle: int = 8) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(
        self, method: str, path: str, body: Iterable[memoryview], length: int,
        headers: Mapping[str, str],
    ) -> Reply:  # fmt: skip
        """Send the request (``body``: its pieces, ``length`` bytes in all) and read
        the status line and headers. A connection taken from the pool that the
        server had closed meanwhile is a RemoteProtocolError, as in httpx."""
        conn = self._take()
        if conn.sock is None:
            self._connect(conn)
        sock = conn.sock
        try:
            sock.settimeout(self.timeout.write)
            conn.putrequest(method, self.prefix + path, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            for piece in pieces(body):
                sock.sendall(piece)
        except TimeoutError:
            conn.close()
            raise httpx.WriteTimeout(f"could not send within {self.timeout.write} s") from None
        except OSError as exc:
            # The server may have answered before the body was in (a 413) and
            # closed: that answer, when it can still be read, says why.
            try:
                sock.settimeout(self.timeout.read)
                response = conn.getresponse()
            except (http.client.HTTPException, OSError):
                conn.close()
                raise httpx.RemoteProtocolError(f"sending the request: {exc!r}") from exc
            return Reply(self, conn, response, self.timeout)
        with reading(conn.close, f"no response within {self.timeout.read} s"):
            sock.settimeout(self.timeout.read)
            response = conn.getresponse()
        return Reply(self, conn, response, self.timeout)

    def _connect(self, conn: http.client.HTTPConnection) -> None:
        conn.timeout = self.timeout.connect
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise httpx.ConnectTimeout(f"no connection within {self.timeout.connect} s") from None
        except OSError as exc:
            conn.close()
            raise httpx.ConnectError(str(exc)) from exc
        # the body goes in large pieces: no Nagle delay on the last small one
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _take(self) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                if not self._idle:
                    return http.client.HTTPConnection(self.host, self.port)
                conn = self._idle.pop()
            if idle_and_open(conn):
                return conn
            conn.close()

    def give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
