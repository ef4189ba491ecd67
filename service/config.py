"""Settings: every knob comes from the environment, prefix ``LOSS_SERVICE_``.

Nothing else in the service reads ``os.environ``. A malformed value stops the
process at import (so ``loss-service serve`` and ``uvicorn service.main:app``
alike) with one line naming the variable and what it accepts; a device the
machine does not have is checked by ``check_device`` before the server starts.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "LOSS_SERVICE_"
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# A secret's value never goes into an error message.
_SECRET_FIELDS = frozenset({"api_keys"})


class SettingsError(ValueError):
    """A setting the server cannot start with; the message is one line that
    names the variable and says what is allowed."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOSS_SERVICE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="Open Inference Protocol over gRPC (as Triton); 0 = off"
    )
    workers: int = Field(1, ge=1)
    device: str = Field("auto", description=f"Default device: {DEVICE_FORMS}")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch.set_num_threads per worker; 0: torch's own with one worker, the "
        "CPUs this process may use divided among LOSS_SERVICE_WORKERS with more",
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_tensor_elements: int = Field(2**26, ge=1, description="Per request, all tensors")
    max_elements_per_tensor: int = Field(2**26, ge=1, description="Per tensor")
    max_work_elements: int = Field(
        2**27,
        ge=1,
        description="Per request: the peak elements its loss call is predicted to hold or "
        "touch (broadcasts, outputs, gradients, CTC tables, pairwise work); over it, 413 "
        "before torch runs",
    )
    memory_budget_bytes: int = Field(
        0,
        ge=0,
        description="Bytes all requests in flight may hold together (bodies as they arrive, "
        "parsing, predicted computations and responses); a request that does not fit waits "
        "for room until the queue timeout, then 503. 0 = half of the container's memory "
        "limit (cgroup v2 or v1), else half of the machine's RAM",
    )
    max_concurrency: int = Field(0, ge=0, description="Computations at once; 0 = CPU count")
    inline_max_body_bytes: int = Field(
        16 * 1024,
        ge=0,
        description="Uncompressed bodies up to this size are decoded on the event loop, and "
        "computed there when their predicted memory is small (cheaper than a thread "
        "hand-off); 0 sends every request to the worker pool",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client may take to send a request's headers; 408"
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds a request body may stop arriving; 408"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Request line and headers in total; over it, 431"
    )
    idle_trim_seconds: float = Field(
        1.0,
        ge=0,
        description="Seconds without a request in flight after which freed heap memory is "
        "handed back to the system (malloc_trim); 0 never",
    )
    queue_timeout: float = Field(
        10.0, gt=0, description="Seconds a request may wait for a computation slot, then 503"
    )
    compute_timeout: float = Field(
        60.0, gt=0, description="Seconds a request waits for its computation, then 503"
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated; empty = no auth"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated; empty = CORS off"
    )
    metrics_requires_key: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    malloc_keep_bytes: int | None = Field(
        None,
        ge=0,
        description="glibc malloc keeps up to this much freed memory for the next request "
        "(large tensors then reuse pages instead of faulting in fresh ones) until the "
        "service goes idle; 0 keeps glibc's defaults; unset = an eighth of the memory "
        "budget, at most 512 MiB",
    )
    pin_body_memory: bool | None = Field(
        None,
        description="Receive large v2 binary bodies into page-locked (pinned) host memory, so "
        "that their tensors reach a CUDA device at full DMA speed instead of through the "
        "driver's pageable staging copy; unset = on where the default device is CUDA",
    )
    shutdown_drain_seconds: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM, seconds /readyz answers 503 while requests are still "
        "served; then computations in flight finish and uploads still running are cut",
    )

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"expected {DEVICE_FORMS}")
        return value

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def describe(exc: ValidationError) -> str:
    """One line naming each variable that failed, its value and what is allowed."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        value = "" if field in _SECRET_FIELDS else "=" + _shown(error.get("input"))
        parts.append(f"{ENV_PREFIX}{field.upper()}{value}: {message}")
    return "; ".join(parts)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_settings() -> Settings:
    """The settings from the environment, or a SettingsError."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe(exc)) from None
    except SourceError as exc:  # a value pydantic-settings could not even parse
        raise SettingsError(str(exc)) from None


def torch_threads(settings: Settings) -> int:
    """The torch threads a worker takes (0: leave torch's default). With
    several workers each gets its share of the CPUs this process may use: two
    workers that each kept torch's default (every CPU) spun against each other
    in torch's thread pool, and a small request took 50 ms instead of 0.3."""
    if settings.torch_threads or settings.workers == 1:
        return settings.torch_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // settings.workers)


def check_device(device: str) -> None:
    """A SettingsError when the default device is not on this machine: else
    every request would get a 422 blaming the client's ``device``."""
    if device in ("auto", "cpu"):
        return
    import torch  # here: reading the settings does not need torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = f"{ENV_PREFIX}DEVICE={device!r}"
    if count == 0:
        build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        raise SettingsError(
            f"{name}: this machine has no CUDA device (torch {torch.__version__}, {build}); "
            "allowed here: auto, cpu"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        allowed = ", ".join(["auto", "cpu", "cuda", *(f"cuda:{i}" for i in range(count))])
        raise SettingsError(
            f"{name}: this machine has {count} CUDA device(s); allowed here: {allowed}"
        )


try:
    settings = load_settings()
except SettingsError as exc:
    # Raised while the server's modules are imported: one line, no traceback.
    raise SystemExit(f"loss-service: {exc}") from None
