"""``python -m tests.hostile.monitor URL OUT``: ask URL/healthz every 10 ms
until SIGTERM, then write each answer's status and latency to OUT (JSON);
OUT.ready appears once the first probe has its answer.

A process of its own, so that neither the attack's threads nor pytest's GIL
delay the probe: what it measures is the server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from types import FrameType

import httpx

INTERVAL = 0.01


def main(url: str, out: str) -> None:
    stop = False

    def on_term(sig: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with contextlib.suppress(OSError):
        os.nice(-10)  # the probe measures the server, not its own turn for a core
    samples: list[tuple[int, float]] = []
    with httpx.Client(timeout=5) as client:
        while not stop:
            start = time.perf_counter()
            try:
                status = client.get(f"{url}/healthz").status_code
            except httpx.HTTPError:
                status = 0
            samples.append((status, time.perf_counter() - start))
            if len(samples) == 1:  # the attack starts once the probe is answered
                with open(f"{out}.ready", "w"):
                    pass
            time.sleep(INTERVAL)
    with open(out, "w") as f:
        json.dump(samples, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
