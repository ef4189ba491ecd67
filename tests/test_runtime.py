"""Runtime.run (service/api/runtime.py): a request cancelled while it waits
for its computation to start must give its computation slot back.

Ray Serve cancels a request's task when its client disconnects (uvicorn
does not); a slot lost that way leaves a replica with max_concurrency 1
answering nothing but 503s after its queue timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.api.runtime import Runtime
from service.config import Settings


@pytest.mark.parametrize("steps", range(8))
def test_a_request_cancelled_before_its_computation_starts_frees_its_slot(steps: int) -> None:
    """Cancelled after ``steps`` turns of the event loop: whichever point of
    taking a slot and handing the work to a thread that falls on, the slot
    comes back, and the next request computes."""
    runtime = Runtime(Settings(max_concurrency=1, queue_timeout=2))
    ran = threading.Event()

    def compute() -> int:
        ran.set()
        time.sleep(0.05)
        return 7

    async def scenario() -> None:
        task = asyncio.ensure_future(runtime.run(compute))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # a computation that did start keeps its slot until it ends
        deadline = time.monotonic() + 5
        while runtime.slots.borrowed_tokens and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert runtime.slots.borrowed_tokens == 0, f"slot lost (computation ran: {ran.is_set()})"
        assert await runtime.run(compute) == 7

    asyncio.run(scenario())
