"""The ``loss-service`` command line, run as subprocesses against a real
server (``serve`` starts its own), and the README's client and command-line
examples replayed against the live server."""

from __future__ import annotations

import contextlib
import doctest
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
import torch.nn.functional as F

from service.cli import main
from service.losses import LOSSES
from service.losses.info import loss_info
from tests.conftest import ROOT, free_port

ENTRY_POINT = Path(sys.executable).with_name("loss-service")
COMMAND = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "service.cli"]
README = (ROOT / "README.md").read_text()

X = torch.tensor([[0.5, -1.25, 2.0, 0.0], [1.5, 0.25, -0.5, 3.0], [-2.0, 1.0, 0.75, -0.125]])
T = torch.tensor([3, 0, 1])
W = [0.5, 1.0, 2.0, 1.5]


class Run:
    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.out, self.err = cwd / f"{id(self)}.out", cwd / f"{id(self)}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [*COMMAND, *args], cwd=cwd, env=env, stdout=out, stderr=err
            )

    def wait(self) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=120)
        return code, self.out.read_text(), self.err.read_text()


@pytest.fixture(scope="module")
def runs(
    live_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, str, str]]:
    """One subprocess per command, started together (each one imports torch);
    the variants of a command run in-process (main())."""
    cwd = tmp_path_factory.mktemp("cli")
    np.save(cwd / "x.npy", X.numpy())
    torch.save(T, cwd / "t.pt")
    (cwd / "w.json").write_text(json.dumps(W))
    env = {**os.environ, "LOSS_SERVICE_URL": live_server, "COLUMNS": "100"}
    env.pop("LOSS_SERVICE_API_KEY", None)
    commands = {
        "table": ["losses"],
        "files": [
            "compute", "CrossEntropyLoss", "--input", "x.npy", "--target", "t.pt",
            "--tensor", "weight=w.json", "--option", "reduction=sum",
            "--option", "label_smoothing=0.1", "--grad", "--json",
        ],
        "openapi": ["openapi", "--out", str(cwd / "openapi.json")],
    }  # fmt: skip
    started = {name: Run(args, cwd, env) for name, args in commands.items()}
    results = {name: run.wait() for name, run in started.items()}
    results["openapi file"] = (0, (cwd / "openapi.json").read_text(), "")
    return results


def test_losses_table_lists_every_loss(
    runs: dict[str, tuple[int, str, str]],
    live_server: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = runs["table"]
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["LOSS", "ARGUMENTS", "GRAD", "OPTIONS", "(defaults)"]
    assert all(len(line) < 100 for line in lines)
    firsts = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ")]
    assert firsts[: len(LOSSES)] == list(LOSSES)
    row = next(line for line in lines if line.startswith("cross_entropy "))
    assert "ignore_index=-100," in row and "input, target," in row

    monkeypatch.setenv("COLUMNS", "100")  # the server's catalog prints the same table
    assert main(["losses", "--url", live_server]) == 0
    assert capsys.readouterr().out == out


def test_losses_json_is_the_catalog(live_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["losses", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    assert catalog == httpx.get(f"{live_server}/v1/losses").json()
    assert catalog["losses"] == json.loads(orjson.dumps([loss_info(s) for s in LOSSES.values()]))


def test_compute_reads_npy_pt_and_json_files(runs: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = runs["files"]
    assert code == 0, err
    response = json.loads(out)
    leaf = X.clone().requires_grad_()
    value = F.cross_entropy(leaf, T, torch.tensor(W), reduction="sum", label_smoothing=0.1)
    (grad,) = torch.autograd.grad(value, leaf)
    assert response["loss"] == "cross_entropy" and response["dtype"] == "float32"
    assert response["value"] == value.item()
    assert response["grad"] == {"input": grad.tolist()}


def test_compute_prints_values_and_grads(
    live_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(X, tmp_path / "x.pt")
    np.save(tmp_path / "t.npy", T.numpy())
    files = ["--input", str(tmp_path / "x.pt"), "--target", str(tmp_path / "t.npy")]
    options = ["--option", "reduction=none", "--grad", "--url", live_server]
    assert main(["compute", "cross_entropy", *files, *options]) == 0
    out = capsys.readouterr().out
    leaf = X.clone().requires_grad_()
    value = F.cross_entropy(leaf, T, reduction="none")
    (grad,) = torch.autograd.grad(value, leaf, torch.ones_like(value))
    value_text, grad_text = out.split("grad input = ")
    assert value_text.startswith("cross_entropy = [") and "(float32, cpu)" in value_text
    for text, expected in ((value_text.split("(")[0], value), (grad_text, grad)):
        printed = [float(n) for n in re.findall(r"-?\d+\.\d*(?:e[-+]\d+)?", text)]
        assert np.allclose(printed, expected.detach().reshape(-1).tolist(), rtol=0, atol=5.01e-5)


def test_compute_error_prints_the_problem(
    live_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.json").write_text("[[2, 1], [1, 2]]")
    argv = ["compute", "focal_loss", "--input", str(tmp_path / "x.json"), "--url", live_server]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("loss-service: 404 Unknown loss: unknown loss 'focal_loss'")
    assert "cross_entropy" in err and "Traceback" not in err


def test_openapi_out_is_the_apps_document(runs: dict[str, tuple[int, str, str]]) -> None:
    from service.main import app

    assert runs["openapi"][0] == 0, runs["openapi"][2]
    assert json.loads(runs["openapi file"][1]) == json.loads(orjson.dumps(app.openapi()))


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.txt").write_text("1")
    cases = (
        (["compute", "mse_loss", "--input", str(tmp_path / "missing.json")], "cannot read"),
        (["compute", "mse_loss", "--input", str(tmp_path / "x.txt")], "unknown file type"),
        (["compute", "mse_loss", "--tensor", "weight"], "NAME=FILE"),
        (["compute", "mse_loss", "--option", "=1"], "KEY=VALUE"),
        (["compute"], "the following arguments are required: name"),
    )
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_unreachable_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["losses", "--url", url, "--max-retries", "0"]) == 3
    assert f"loss-service: cannot reach {url}/v1/losses" in capsys.readouterr().err


def test_serve_starts_and_stops_on_sigterm() -> None:
    port = free_port()
    env = {**os.environ, "LOSS_SERVICE_DEVICE": "cpu", "LOSS_SERVICE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no /healthz in 60 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        seed = {"input": [[2, 1], [1, 2]], "target": [1, 0]}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/losses/cross_entropy", json=seed)
        assert round(answer.json()["value"], 4) == 1.3133
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


# --------------------------------------------------------------------------- README


def readme_section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


def test_readme_client_example_is_real(live_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSS_SERVICE_URL", live_server)
    monkeypatch.delenv("LOSS_SERVICE_API_KEY", raising=False)
    (block,) = re.findall(r"```pycon\n(.*?)```", readme_section("Python client"), re.S)
    test = doctest.DocTestParser().get_doctest(block, {}, "README", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()
    assert len(test.examples) >= 8


def test_readme_command_line_examples_are_real(
    live_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each ``$ loss-service ...`` line runs in-process (main()), any other line
    in bash; the output must be what the README shows (a final ``...`` line:
    the output goes on)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOSS_SERVICE_URL", live_server)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("LOSS_SERVICE_API_KEY", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    blocks = re.findall(r"```console\n(.*?)```", readme_section("Command line"), re.S)
    commands = [c for block in blocks for c in re.split(r"^\$ ", block, flags=re.M) if c]
    assert sum(c.startswith("loss-service compute") for c in commands) >= 4
    last_code = 0
    for command in commands:
        line, _, shown = command.partition("\n")
        if line.startswith("loss-service "):
            output = io.StringIO()
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                last_code = main(shlex.split(line)[1:])
            printed = output.getvalue()
        elif line == "echo $?":
            printed = f"{last_code}\n"
        else:
            printed = subprocess.run(
                line, shell=True, capture_output=True, text=True, check=True
            ).stdout
        if shown.endswith("...\n"):
            assert printed.startswith(shown.removesuffix("...\n")), (line, printed)
        else:
            assert printed == shown, (line, printed)
    seed = "loss-service compute cross_entropy --input input.json --target target.json\n"
    assert seed + "cross_entropy = 1.3133  (float32, cpu)\n" in commands


def test_a_closed_pipe_is_not_an_error() -> None:
    # loss-service losses | head -1
    proc = subprocess.Popen(
        [str(ENTRY_POINT), "losses"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"LOSS")
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    with proc.stderr:
        assert b"Traceback" not in proc.stderr.read()
