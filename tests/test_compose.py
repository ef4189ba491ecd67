"""docker-compose.yml hands every LOSS_SERVICE_* setting to the container
(from the shell or an .env file), so that e.g. API keys set there are not
silently dropped. Read as YAML, then resolved by the Compose client itself
(``config`` needs no Docker engine); the CI container proof (scripts/ci-docker)
runs it with a key set and expects 401 without the key."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
SETTINGS = {f"LOSS_SERVICE_{name.upper()}" for name in Settings.model_fields}


def service_environment(document: dict[str, Any]) -> dict[str, Any]:
    environment = document["services"]["loss-service"]["environment"]
    assert isinstance(environment, dict)
    return environment


def test_compose_file_names_every_setting() -> None:
    """A setting added to service/config.py fails here until compose passes it."""
    environment = service_environment(yaml.safe_load(COMPOSE.read_text()))
    assert SETTINGS - set(environment) == set()
    # a name not (or no longer) among the settings is harmless: the service ignores it
    assert all(name.startswith("LOSS_SERVICE_") for name in environment)
    # inside the container the server listens on all interfaces, on the port published
    assert environment["LOSS_SERVICE_HOST"] == "0.0.0.0"
    assert environment["LOSS_SERVICE_PORT"] == "8000"
    # with no value: passed through from the shell or .env when set, else left unset
    assert environment["LOSS_SERVICE_API_KEYS"] is None


def compose_client() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return command
    return None


def resolved(tmp_path: Path, files: list[Path], shell: dict[str, str], dotenv: str) -> Any:
    """``compose config`` in a project folder holding the compose files and an .env."""
    command = compose_client()
    if command is None:
        pytest.skip("no Compose client (docker compose or docker-compose)")
    for file in files:
        shutil.copy(file, tmp_path / file.name)
    (tmp_path / ".env").write_text(dotenv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSS_SERVICE_")}
    args = [arg for file in files for arg in ("-f", file.name)]
    done = subprocess.run(
        [*command, *args, "config"],
        cwd=tmp_path,
        env={**env, **shell},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU]], ids=["cpu", "gpu"])
def test_compose_passes_settings_from_the_shell_and_dotenv(
    tmp_path: Path, files: list[Path]
) -> None:
    document = resolved(
        tmp_path,
        files,
        shell={"LOSS_SERVICE_API_KEYS": "from-shell", "LOSS_SERVICE_WORKERS": "3"},
        dotenv="LOSS_SERVICE_MAX_CONCURRENCY=5\nLOSS_SERVICE_LOG_FORMAT=text\n",
    )
    environment = service_environment(document)
    assert environment["LOSS_SERVICE_API_KEYS"] == "from-shell"
    assert environment["LOSS_SERVICE_WORKERS"] in ("3", 3)
    assert environment["LOSS_SERVICE_MAX_CONCURRENCY"] in ("5", 5)
    assert environment["LOSS_SERVICE_LOG_FORMAT"] == "text"
    device = "cuda" if GPU in files else "auto"
    assert environment["LOSS_SERVICE_DEVICE"] == device
    # what was not set stays unset (Compose v1 prints null, v2 leaves it out),
    # so the service's own default applies
    assert environment.get("LOSS_SERVICE_MAX_BODY_BYTES") is None
