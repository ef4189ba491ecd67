"""Settings: every knob comes from the environment, prefix ``LOSS_SERVICE_``.

Nothing else in the service reads ``os.environ``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOSS_SERVICE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    device: str = Field("auto", description="Default device: auto, cpu, cuda or cuda:N")
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads; 0 keeps torch's own")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_tensor_elements: int = Field(2**26, ge=1, description="Per request, all tensors")
    max_elements_per_tensor: int = Field(2**26, ge=1, description="Per tensor")
    max_concurrency: int = Field(0, ge=0, description="Computations at once; 0 = CPU count")
    inline_max_body_bytes: int = Field(
        16 * 1024,
        ge=0,
        description="Bodies up to this size are computed on the event loop (cheaper than a "
        "thread hand-off); 0 sends every request to the worker pool",
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
    malloc_keep_bytes: int = Field(
        512 * 1024 * 1024,
        ge=0,
        description="glibc malloc keeps up to this much freed memory for the next request "
        "(large tensors then reuse pages instead of faulting in fresh ones); 0 keeps glibc's "
        "defaults",
    )
    shutdown_drain_seconds: float = Field(
        0.0, ge=0, description="After SIGTERM, seconds /readyz answers 503 before draining"
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


settings = Settings()
