"""Memory the service may use, shared by every request in flight.

The budget (``LOSS_SERVICE_MEMORY_BUDGET_BYTES``) has two pools. Request
bodies take a quarter, byte by byte as they arrive (an idle connection that
announced 64 MiB holds nothing); computations take the rest: a request holding
a computation slot reserves what decompressing and parsing its body will
make, then what its loss call and response are predicted to hold (the cost
model of ``service.losses.cost``), before it allocates them. A reservation
that does not fit waits for room until the queue timeout, then 503 with
``Retry-After``; one that could never fit is a 413 at once, and one that
nobody can make room for (every byte of its pool held by requests that wait
too: uploads holding part of their bodies, say) is a 503 at once instead of
a deadlock until the queue timeout. So the process
never holds much more than the budget beyond its idle size, whatever clients
send, and a container's memory limit is not reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

from service.errors import Overloaded, PayloadTooLarge

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# cgroup v1 reports "no limit" as a page-aligned LONG_MAX; anything above this is no limit.
NO_LIMIT = 2**60


def container_memory_limit(proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``, the smallest along the path), None when there
    is none or it cannot be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    roots: tuple[str, ...]
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            roots, name = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"), "memory.max"
        elif "memory" in controllers.split(","):
            roots, name = ("/sys/fs/cgroup/memory",), "memory.limit_in_bytes"
        else:
            continue
        for root in roots:
            limits += _limits_along(Path(root), path, name)
    real = [limit for limit in limits if 0 < limit < NO_LIMIT]
    return min(real) if real else None


def _limits_along(root: Path, path: str, name: str) -> list[int]:
    found: list[int] = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts) + 1):
        file = root.joinpath(*parts[:depth], name)
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isascii() and text.isdigit():
            found.append(int(text))
    return found


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def default_budget() -> int:
    """Half of the container's memory limit, else half of the machine's RAM
    (the other half is the idle process, torch's own caches and slack)."""
    limit = container_memory_limit()
    return (limit if limit is not None else physical_memory()) // 2


def human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class MemoryBudget:
    """Bytes reserved by the requests in flight, against a limit.

    Thread-safe: the event loop reserves body bytes, worker threads reserve
    what their computation will hold, and either releases.
    """

    def __init__(self, limit: int, name: str = "memory budget") -> None:
        self.limit = limit
        self.name = name
        self.used = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._waiting_held = 0  # bytes held by callers that wait for room
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def _check_possible(self, n: int, what: str) -> None:
        if n > self.limit:
            raise self._too_large(n, what)

    def _too_large(self, n: int, what: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"{what} needs about {human(n)} of memory, more than this server's whole "
            f"{self.name} of {human(self.limit)} (LOSS_SERVICE_MEMORY_BUDGET_BYTES); send less"
        )

    def try_reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.used -= n
            self._room.notify_all()
            waiters = list(self._waiters)
        for loop, woken in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(woken.set)

    def refusal(self, n: int, what: str) -> Overloaded | PayloadTooLarge:
        """The error for a reservation that does not fit now."""
        if n > self.limit:
            return self._too_large(n, what)
        return self._overloaded(n, what)

    async def reserve(self, n: int, deadline: float, what: str, holding: int = 0) -> None:
        """The same as ``reserve_blocking``, on the event loop."""
        if n <= 0 or self.try_reserve(n):
            return
        self._check_possible(n, what)
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        waiter = (loop, woken)
        with self._lock:
            self._waiters.add(waiter)
            self._waiting_held += holding
        try:
            while not self.try_reserve(n):
                remaining = deadline - time.monotonic()
                with self._lock:
                    stuck = self.used <= self._waiting_held
                if remaining <= 0 or stuck:
                    raise self._overloaded(n, what)
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), remaining)
        finally:
            with self._lock:
                self._waiters.discard(waiter)
                self._waiting_held -= holding

    def reserve_blocking(self, n: int, deadline: float, what: str, holding: int = 0) -> None:
        """Reserve ``n`` bytes from a worker thread, waiting for room until
        ``deadline`` (time.monotonic()), then 503.

        ``holding`` is what the caller already holds. A wait that nobody can
        end (every byte in use is held by callers that are waiting too) fails
        at once instead of waiting for its deadline.
        """
        if n <= 0:
            return
        self._check_possible(n, what)
        with self._room:
            self._waiting_held += holding
            try:
                while self.used + n > self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.used <= self._waiting_held:
                        raise self._overloaded(n, what)
                    self._room.wait(remaining)
                self.used += n
            finally:
                self._waiting_held -= holding

    def _overloaded(self, n: int, what: str) -> Overloaded:
        return Overloaded(
            f"{what} needs about {human(n)} of memory and the server's {self.name} "
            f"({human(self.limit)}, LOSS_SERVICE_MEMORY_BUDGET_BYTES) is in use by other "
            "requests; retry later",
            retry_after=1,
        )


class Reservation:
    """The bytes one request holds. They go back to the budget once the
    request has ended and no worker thread still computes for it (a
    computation that outlives its request, after a compute timeout, still
    holds what it uses)."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0
        self.ended = False
        self.threads = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.held += n

    def give_back(self, n: int) -> None:
        """Release part of what is held (what was reserved for a step that is over)."""
        with self._lock:
            n = min(n, self.held)
            self.held -= n
        self.budget.release(n)

    def pin(self) -> None:
        with self._lock:
            self.threads += 1

    def unpin(self) -> None:
        with self._lock:
            self.threads -= 1
        self._release_if_done()

    def end(self) -> None:
        with self._lock:
            self.ended = True
        self._release_if_done()

    def _release_if_done(self) -> None:
        with self._lock:
            if not self.ended or self.threads:
                return
            n, self.held = self.held, 0
        self.budget.release(n)


# --------------------------------------------------------------------------- freed memory


def libc_function(name: str) -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # musl, macOS
        return None
    return function


def trim_freed_memory() -> bool:
    """Give the pages of freed heap memory back to the system (glibc
    ``malloc_trim``); False where there is no such call."""
    trim = libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


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
    mallopt = libc_function("mallopt")  # None on musl, macOS
    if keep_bytes <= 0 or mallopt is None:
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


def remember(memo: dict[K, V], key: K, value: V, kept: int) -> None:
    """Put ``key`` in a memo of at most ``kept`` entries. A full memo starts
    over: clients repeat a few keys, so they come back at once, where a memo
    that stopped adding would leave every later request on the slow path
    after one client sent ``kept`` distinct ones."""
    if len(memo) >= kept:
        memo.clear()
    memo[key] = value
