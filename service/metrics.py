"""Prometheus metrics (prometheus-client), one registry per app.

With several uvicorn workers each worker keeps its own counters; the
container and Kubernetes setups run one worker per replica, so a scrape sees
the whole replica.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Protocol

import torch
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BUCKET_LABELS = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]  # the "le" values


class _CudaMemory(Collector):
    def collect(self) -> Iterator[Metric]:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return
        allocated = GaugeMetricFamily(
            "loss_service_cuda_memory_allocated_bytes",
            "Bytes of CUDA memory held by tensors",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "loss_service_cuda_memory_reserved_bytes",
            "Bytes of CUDA memory reserved by the caching allocator",
            labels=["device"],
        )
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
            reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


class Metrics:
    """The registry: per-request series (plain numbers, see ``RequestStats``),
    the computation gauges and CUDA memory."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = RequestStats()
        r.register(self.requests)
        self.models = ModelStats()
        self.queued = Gauge(
            "loss_service_queued_computations", "Computations waiting for a slot", registry=r
        )
        self.computing = Gauge(
            "loss_service_running_computations", "Computations running", registry=r
        )
        r.register(_CudaMemory())
        self.memory_budget = Gauge(
            "loss_service_memory_budget_bytes",
            "Bytes all requests in flight may hold together (LOSS_SERVICE_MEMORY_BUDGET_BYTES)",
            registry=r,
        )
        self.memory_reserved = Gauge(
            "loss_service_memory_reserved_bytes",
            "Bytes of the memory budget reserved by requests in flight now",
            registry=r,
        )


class Series:
    """One (method, route, loss, status): its request count and latency histogram."""

    __slots__ = ("buckets", "count", "created", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1


class RequestStats(Collector):
    """Requests, errors, latency and bytes as plain Python numbers, turned into
    Prometheus families only when scraped.

    prometheus-client's labelled Counter and Histogram take a lock and several
    calls per update, about a tenth of a small request's cost. Every update
    here happens on the event loop (the middleware), and so does the scrape
    (``/metrics`` is an async route), so nothing needs a lock.
    """

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str, int], Series] = {}
        self.in_flight = 0
        self.body_in = self.body_out = self.tensor_in = self.tensor_out = 0
        self.direct = 0  # answered by the connection layer (service.api.direct)
        self.created = time.time()

    def record(self, method: str, route: str, loss: str, status: int, seconds: float) -> None:
        """One finished request; route and loss are bounded (route templates,
        known losses), so are status and method (the HTTP methods a route
        takes, or GRPC), so the series stay few."""
        self.series_for(method, route, loss, status).observe(seconds)

    def series_for(self, method: str, route: str, loss: str, status: int) -> Series:
        """The series of (method, route, loss, status), made at its first request."""
        key = (method, route, loss, status)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series()
        return series

    def collect(self) -> Iterator[Metric]:
        labels = ["method", "route", "loss", "status"]
        requests = CounterMetricFamily(
            "loss_service_requests",
            "HTTP requests by method, route, loss and status",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "loss_service_errors",
            "Error responses (status >= 400) by method, route, loss and status",
            labels=labels,
        )
        latency = HistogramMetricFamily(
            "loss_service_request_duration_seconds",
            "Request latency by method, route and loss",
            labels=["method", "route", "loss"],
        )
        by_route: dict[tuple[str, str, str], list[Series]] = {}
        for (method, route, loss, status), series in sorted(self.series.items()):
            values = [method, route, loss, str(status)]
            requests.add_metric(values, series.count, created=series.created)
            if status >= 400:
                errors.add_metric(values, series.count, created=series.created)
            by_route.setdefault((method, route, loss), []).append(series)
        for (method, route, loss), group in by_route.items():
            counts = [sum(s.buckets[i] for s in group) for i in range(len(LATENCY_BUCKETS) + 1)]
            cumulative = list(accumulate(counts))
            latency.add_metric(
                [method, route, loss],
                list(zip(BUCKET_LABELS, cumulative, strict=True)),
                sum(s.sum for s in group),
            )
        tensor = self._in_out(
            "loss_service_tensor_bytes",
            "Bytes of tensors decoded (in) and returned (out)",
            self.tensor_in,
            self.tensor_out,
        )
        body = self._in_out(
            "loss_service_body_bytes",
            "HTTP body bytes received (in) and sent (out)",
            self.body_in,
            self.body_out,
        )
        in_flight = GaugeMetricFamily(
            "loss_service_in_flight_requests", "Requests being served", value=self.in_flight
        )
        direct = CounterMetricFamily(
            "loss_service_direct_responses",
            "Compute requests answered by the connection layer, without an ASGI request cycle "
            "(small bodies computed on the event loop); counted in loss_service_requests too",
            value=self.direct,
            created=self.created,
        )
        yield from (requests, errors, latency, tensor, body, in_flight, direct)

    def _in_out(self, name: str, documentation: str, in_: int, out: int) -> Metric:
        family = CounterMetricFamily(name, documentation, labels=["direction"])
        family.add_metric(["in"], in_, created=self.created)
        family.add_metric(["out"], out, created=self.created)
        return family


class Timed(Protocol):
    """What one request's record reads of its ``compute.Timings``."""

    decode: float
    compute: float
    encode: float
    tensor_bytes_in: int
    tensor_bytes_out: int
    device: str | None


class ModelCounters:
    """One loss's inference counters, in the units of Triton's statistics
    extension (counts and nanoseconds; the last inference in ms since the epoch)."""

    __slots__ = (
        "fail_count",
        "fail_ns",
        "infer_ns",
        "input_ns",
        "last_inference",
        "output_ns",
        "success_count",
        "success_ns",
    )  # fmt: skip

    def __init__(self) -> None:
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.input_ns = self.infer_ns = self.output_ns = 0
        self.last_inference = 0

    def record(self, status: int, seconds: float, timings: Timed | None, now: float) -> None:
        """One finished inference; ``timings`` (the request's ``Timings``)
        splits a success into input, inference and output time."""
        ns = int(seconds * 1e9)
        if status != 200:
            self.fail_count += 1
            self.fail_ns += ns
            return
        self.success_count += 1
        self.success_ns += ns
        self.last_inference = int(now * 1000)
        if timings is not None:
            self.input_ns += int(timings.decode * 1e9)
            self.infer_ns += int(timings.compute * 1e9)
            self.output_ns += int(timings.encode * 1e9)


class ModelStats:
    """Inference statistics by model (loss), whatever the front door (v1,
    OIP REST, OIP gRPC): one evaluation request is one inference and one
    execution (no batching across requests). Updated on the event loop,
    where the statistics routes read them."""

    def __init__(self) -> None:
        self.models: dict[str, ModelCounters] = {}

    def record(
        self, loss: str, status: int, seconds: float, timings: Timed | None, now: float
    ) -> None:
        """One finished inference of ``loss``."""
        self.counters_for(loss).record(status, seconds, timings, now)

    def counters_for(self, loss: str) -> ModelCounters:
        counters = self.models.get(loss)
        if counters is None:
            counters = self.models[loss] = ModelCounters()
        return counters
