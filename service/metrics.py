"""Prometheus metrics (prometheus-client), one registry per app.

With several uvicorn workers each worker keeps its own counters; the
container and Kubernetes setups run one worker per replica, so a scrape sees
the whole replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


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
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loss_service_requests", "HTTP requests by route, loss and status",
            ["route", "loss", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "loss_service_request_duration_seconds", "Request latency by route and loss",
            ["route", "loss"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "loss_service_errors", "Error responses (status >= 400) by route, loss and status",
            ["route", "loss", "status"], registry=r,
        )  # fmt: skip
        self.tensor_bytes = Counter(
            "loss_service_tensor_bytes", "Bytes of tensors decoded (in) and returned (out)",
            ["direction"], registry=r,
        )  # fmt: skip
        self.body_bytes = Counter(
            "loss_service_body_bytes", "HTTP body bytes received (in) and sent (out)",
            ["direction"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "loss_service_in_flight_requests", "Requests being served", registry=r
        )
        self.queued = Gauge(
            "loss_service_queued_computations", "Computations waiting for a slot", registry=r
        )
        self.computing = Gauge(
            "loss_service_running_computations", "Computations running", registry=r
        )
        r.register(_CudaMemory())
        # label children resolved once, not per request
        self.body_in = self.body_bytes.labels("in")
        self.body_out = self.body_bytes.labels("out")
        self.tensor_in = self.tensor_bytes.labels("in")
        self.tensor_out = self.tensor_bytes.labels("out")
        self._series: dict[tuple[str, str, int], Series] = {}

    def series(self, route: str, loss: str, status: int) -> Series:
        """The per-request metrics of one (route, loss, status), cached: route
        and loss are bounded (route templates, known losses), so is status."""
        key = (route, loss, status)
        found = self._series.get(key)
        if found is None:
            code = str(status)
            found = self._series[key] = Series(
                self.requests.labels(route, loss, code),
                self.latency.labels(route, loss),
                self.errors.labels(route, loss, code) if status >= 400 else None,
            )
        return found


@dataclass(frozen=True)
class Series:
    requests: Counter
    latency: Histogram
    errors: Counter | None
