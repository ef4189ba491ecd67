"""scripts/gpu-check where there is no GPU: a dry run that claims nothing, and
its whole flow rehearsed on the CPU (bench/gpu_check.py --rehearse-on-cpu)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA machine runs the real check, not the dry run"
)


def env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k != "PYTHON" and not k.startswith("LOSS_SERVICE_")
    }


def reports() -> set[Path]:
    return set((ROOT / "bench" / "results").glob("gpu-check-*.md"))


def test_without_cuda_it_is_a_dry_run_that_claims_nothing() -> None:
    before = reports()
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check")],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CUDA is absent:"), proc.stdout
    assert "sees no CUDA device" in proc.stdout or "has torch" in proc.stdout
    assert "nothing is claimed, no report written" in proc.stdout
    assert reports() == before


def test_the_whole_flow_rehearsed_on_the_cpu(tmp_path: Path) -> None:
    report = tmp_path / "rehearsal.md"
    before = reports()
    command = [sys.executable, "bench/gpu_check.py", "--rehearse-on-cpu", "--quick"]
    proc = subprocess.run(
        [*command, "--report", str(report)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    assert text.startswith("# REHEARSAL on CPU: not a GPU result")
    counts = {
        m["dtype"]: [int(m[k]) for k in ("checks", "exact", "nondet", "unsupported", "failed")]
        for m in re.finditer(
            r"^\| (?P<dtype>float32|float16|bfloat16) \| (?P<checks>\d+) \| (?P<exact>\d+) \| "
            r"(?P<nondet>\d+) \| (?P<unsupported>\d+) \| (?P<failed>\d+) \|$",
            text,
            re.M,
        )
    }
    assert set(counts) == {"float32", "float16", "bfloat16"}, text
    for dtype, (checks, exact, nondet, unsupported, failed) in counts.items():
        assert checks > 0 and exact > 0, dtype
        assert failed == 0, dtype
        assert checks == exact + nondet + unsupported, dtype
    assert counts["float32"][3] == 0  # torch has every loss in float32
    assert "**Verdict: rehearsal green**" in text
    assert "Result: **SKIPPED**" in text  # no device memory to exhaust on the CPU
    assert "| v1 b64 JSON |" in text and "equal to in-process" in text
    # every row beside the bare app's time for the same bytes (the ceiling)
    assert "| ceiling | service / ceiling |" in text
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert rows and all(re.search(r"\| \d+\.\d\dx \|", row) for row in rows), rows
    assert reports() == before  # a rehearsal never writes where GPU reports go
