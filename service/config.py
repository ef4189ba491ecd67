"""Settings: every knob comes from the environment, prefix ``LOSS_SERVICE_``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOSS_SERVICE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    device: str = Field("auto", description="Default device: auto, cpu, cuda or cuda:N")
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads; 0 keeps torch's own")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_tensor_elements: int = Field(2**26, ge=1, description="Per request, all tensors")
    max_concurrency: int = Field(0, ge=0, description="Computations at once; 0 = CPU count")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


settings = Settings()
