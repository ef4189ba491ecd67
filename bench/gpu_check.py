"""scripts/gpu-check: the service verified on a real CUDA device, in one run.

1. Parity and gradients: every case of tests.cases x every reduction x float32,
   float16 and bfloat16, sent over HTTP to a real service process (default
   device ``auto``), must equal the in-process torch call on the same device
   and dtype bit for bit, and the float64 CPU computation from the same
   dtype-rounded inputs within a tolerance per dtype. Where torch itself
   refuses a loss for a dtype, the service must answer 4xx.
2. Out of memory: a small request whose computation needs more than the
   card's free memory must get 503 (Retry-After), and the service must go on
   answering.
3. Performance: large cross_entropy end to end over the v2 binary extension
   and v1 b64 JSON, sent by curl (a client that is not the bottleneck), each
   beside the bare ASGI app receiving the same bytes and answering as many (the
   ceiling) and the in-process CUDA call, in the same run; on CUDA also with
   the body received into pageable instead of pinned memory.

It writes a short markdown report and exits 1 if any check failed. Without
CUDA it is a dry run that claims nothing and exits 0; ``--rehearse-on-cpu``
runs the same flow on the CPU (no OOM check) to prove the script itself.

Only the standard library is imported at the top: the dry run and the
install from carried wheels (``.whl/``, made by scripts/gpu-wheels) happen
before the service's dependencies are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    import numpy as np
    import torch

    from tests.cases import Case

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DRY_RUN = "Dry run: nothing was checked, nothing is claimed, no report written."
SITE_ENV = "GPU_CHECK_SITE"  # set once the carried wheels are installed (no second try)
PROBE = "import service.main, service.cli, uvicorn, httpx, numpy, orjson, tests.cases, bench.load"

DTYPES = ("float32", "float16", "bfloat16")
# (rtol, atol) against float64 on the CPU from the same dtype-rounded inputs.
# Each is about ten units in the last place of the dtype (eps: 1.2e-7, 9.8e-4,
# 7.8e-3), widened to cover the reductions over up to 240 terms in the cases
# and the cancellations in differences of logs. For reduction="sum" the atol
# is multiplied by the number of terms summed.
TOLERANCES = {"float32": (1e-4, 1e-5), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
REPEATS_ON_MISMATCH = 4  # extra in-process runs when the service differs

# cross_entropy shapes of the benchmark: (rows, classes); grad is timed on the first.
BENCH_SHAPES = {
    "full": [(65536, 1000), (4096, 32000)],
    "quick": [(8192, 1000), (1024, 8000)],
    "rehearse": [(4096, 200), (512, 2000)],
    "rehearse-quick": [(512, 100), (64, 1000)],
}
SERVICE_LIMITS = {
    "LOSS_SERVICE_MAX_BODY_BYTES": str(2**30),  # the b64 [4096, 32000] body is 699 MB
    "LOSS_SERVICE_MAX_TENSOR_ELEMENTS": str(2**28),  # [4096, 32000] is 131M elements
    "LOSS_SERVICE_MAX_ELEMENTS_PER_TENSOR": str(2**28),
    "LOSS_SERVICE_COMPUTE_TIMEOUT": "600",
    "LOSS_SERVICE_QUEUE_TIMEOUT": "600",
    "LOSS_SERVICE_LOG_LEVEL": "warning",
    "LOSS_SERVICE_LOG_FORMAT": "text",
    "LOSS_SERVICE_GRPC_PORT": "0",  # two services run side by side; HTTP is what is timed
}


class CheckError(RuntimeError):
    """The run cannot go on (the service did not start, a request failed outright)."""


# =========================================================================== setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-check", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="smaller benchmark sizes, 2 timed")
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="the same flow on the CPU with small sizes (no OOM check); not a GPU result",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="where to write the report (a directory: the default name inside it); default "
        "bench/results/gpu-check-<device>.md, or a temporary file for a rehearsal",
    )
    parser.add_argument(
        "--wheels", type=Path, default=ROOT / ".whl", help="carried wheels (default .whl/)"
    )
    parser.add_argument("--only", help="comma-separated loss names (default: every loss)")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help=f"comma-separated (default {','.join(DTYPES)})"
    )
    parser.add_argument("--commit", help="the commit to name when this tree has no .git")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = set(args.dtypes) - set(DTYPES)
    if unknown:
        parser.error(f"--dtypes: unknown {sorted(unknown)}; choose from {', '.join(DTYPES)}")
    return args


def cuda_state() -> tuple[str | None, bool]:
    """(torch version or None, whether it sees a CUDA device)."""
    try:
        import torch
    except ImportError:
        return None, False
    return torch.__version__, bool(torch.cuda.is_available())


def probe(env: dict[str, str]) -> str | None:
    """None when the service and this script import in ``sys.executable``; else the error."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def version_key(text: str) -> tuple[int, ...]:
    """A rough ordering of release versions (digits only), enough to see 'older'."""
    return tuple(int(m) for m in re.findall(r"\d+", text.split("+")[0])[:4])


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name, version


def wheels_to_install(wheels: list[Path]) -> list[Path]:
    """The carried wheels this Python lacks or has an older version of. What it
    has already at that version or newer stays (torch's own dependencies too)."""
    chosen = []
    for wheel in wheels:
        name, version = wheel_name_version(wheel)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or version_key(installed) < version_key(version):
            chosen.append(wheel)
    return chosen


def install_wheels(wheels: list[Path], target: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    pip += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
    proc = subprocess.run([*pip, *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckError(f"pip could not install the carried wheels:\n{proc.stderr[-2000:]}")


def ensure_dependencies(args: argparse.Namespace, argv: list[str]) -> None:
    """The service's imports work in this Python, or the carried wheels are
    installed into a temporary folder and this script starts again with it on
    PYTHONPATH; exits 1 naming what is missing when that is not enough."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    error = probe(env)
    if error is None:
        return
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    advice = "run scripts/gpu-wheels on a machine with PyPI and carry .whl/ with the working tree"
    if os.environ.get(SITE_ENV) or not wheels:
        where = (
            f"after installing the wheels of {args.wheels} into {os.environ[SITE_ENV]}"
            if os.environ.get(SITE_ENV)
            else f"and {args.wheels} holds no wheels"
        )
        print(f"gpu-check: the service cannot be imported here ({error}) {where}: {advice}.")
        raise SystemExit(1)
    chosen = wheels_to_install(wheels)
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    print(
        f"== the service's imports fail here ({error}): installing {len(chosen)} of the "
        f"{len(wheels)} carried wheels into {site}",
        flush=True,
    )
    print("   " + ", ".join(w.name.split("-")[0] for w in chosen), flush=True)
    try:
        install_wheels(chosen, site)
    except CheckError as exc:
        print(f"gpu-check: {exc}\n{advice}.")
        raise SystemExit(1) from None
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env[SITE_ENV] = str(site)
    sys.stdout.flush()
    # again, from the start: modules this process already imported (torch's
    # typing_extensions) must come from the new path too
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


# =========================================================================== small helpers


@dataclass
class Outcome:
    """One parity or gradient check."""

    kind: str  # "value" or "grad"
    name: str
    dtype: str
    status: str  # exact, nondeterministic, unsupported, FAIL
    detail: str = ""


@dataclass
class Report:
    rehearsal: bool
    device: str
    outcomes: list[Outcome] = field(default_factory=list)
    worst: dict[str, tuple[float, str]] = field(default_factory=dict)
    oom: list[str] = field(default_factory=list)
    oom_ok: bool | None = None  # None: skipped
    bench_rows: list[list[str]] = field(default_factory=list)
    bench_ok: bool | None = None  # None: skipped
    bench_bad: list[str] = field(default_factory=list)  # responses that differ from in-process
    cuda_shm_rows: list[list[str]] = field(default_factory=list)
    cuda_shm: str = ""  # why there are no CUDA shared-memory rows, where there are none
    seed: str = ""
    pytest: str = ""
    pytest_ok: bool | None = None  # None: not run
    seed_ok: bool = False
    errors: list[str] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    transport: str = ""

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return (
            self.seed_ok
            and not self.errors
            and not self.failures
            and bool(self.outcomes)
            and self.oom_ok is not False
            and self.bench_ok is not False
            and self.pytest_ok is not False
        )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# =========================================================================== the service


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    base: str
    log: Path
    grpc: str | None = None  # host:port of its OIP gRPC front door, where it has one

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process.poll() is None


@contextmanager
def service(
    rehearsal: bool, work: Path, name: str = "service", extra: dict[str, str] | None = None
) -> Iterator[Service]:
    """``python -m service.cli serve`` as a real process, default device ``auto``
    (``cpu`` for a rehearsal), limits raised for the benchmark's bodies; with
    ``name="bare"``, bench/apps/bare_asgi.py under uvicorn instead (the ceiling)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSS_SERVICE_")}
    env.update(SERVICE_LIMITS)
    env.update(extra or {})
    env["LOSS_SERVICE_HOST"] = "127.0.0.1"
    if rehearsal:
        env["LOSS_SERVICE_DEVICE"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log = work / f"{name}.log"
    grpc = None
    if name == "service":  # the one the CUDA shared-memory rows reach over gRPC too
        grpc = f"127.0.0.1:{free_port()}"
        env["LOSS_SERVICE_GRPC_PORT"] = grpc.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    if name == "bare":
        command = [sys.executable, "-m", "uvicorn", "bench.apps.bare_asgi:app", "--port",
                   str(port), "--no-access-log", "--log-level", "warning"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    svc = Service(process, f"http://127.0.0.1:{port}", log, grpc)
    try:
        wait_ready(svc)
        yield svc
    finally:
        stop(svc)


def wait_ready(svc: Service) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not svc.alive():
            raise CheckError(f"the service exited on start:\n{svc.log_tail()}")
        try:
            if httpx.get(f"{svc.base}/readyz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise CheckError(f"the service was not ready after 180 s:\n{svc.log_tail()}")


def stop(svc: Service) -> None:
    if not svc.alive():
        return
    try:
        os.killpg(svc.process.pid, signal.SIGTERM)
        svc.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(svc.process.pid, signal.SIGKILL)
        svc.process.wait(timeout=20)
    except ProcessLookupError:
        pass


# =========================================================================== parity


@dataclass
class Parity:
    """The comparisons of one device: in-process on ``device``, the float64
    reference on the CPU, the service over HTTP."""

    client: httpx.Client
    device: str  # "cuda" or "cpu", for the in-process calls
    served_on: str  # what the service must report: "cuda:0" or "cpu"
    outcomes: list[Outcome]
    worst: dict[str, tuple[float, str]]  # dtype -> the largest share of the tolerance used

    # ------------------------------------------------------------------ tensors

    @staticmethod
    def cast(tensors: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Float-role tensors in ``dtype`` (on the CPU); index tensors and numbers as they are."""
        return {
            k: v.to(dtype) if hasattr(v, "is_floating_point") and v.is_floating_point() else v
            for k, v in tensors.items()
        }

    def on_device(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in tensors.items()}

    def sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ comparing

    @staticmethod
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        """Bit for bit (NaN equals NaN)."""
        import torch

        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return bool(torch.equal(a, b))
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        equal = (a.view(bits) == b.view(bits)) | (a.isnan() & b.isnan())
        return bool(equal.all())

    @staticmethod
    def close(
        got: torch.Tensor, ref: torch.Tensor, dtype: str, terms: int
    ) -> tuple[bool, float, float]:
        """Within the dtype's tolerance of the float64 reference? With the largest
        difference and the largest share of the allowed difference it uses."""
        import torch

        rtol, atol = TOLERANCES[dtype]
        got, ref = got.double(), ref.double()
        if got.shape != ref.shape:
            return False, math.inf, math.inf
        ok = bool(torch.isclose(got, ref, rtol=rtol, atol=atol * terms, equal_nan=True).all())
        finite = torch.isfinite(got) & torch.isfinite(ref)
        diff = (got - ref).abs()[finite]
        if not diff.numel():
            return ok, 0.0, 0.0
        share = diff / (atol * terms + rtol * ref.abs()[finite])
        return ok, float(diff.max()), float(share.max())

    def record(self, kind: str, name: str, dtype: str, status: str, detail: str = "") -> None:
        self.outcomes.append(Outcome(kind, name, dtype, status, detail))

    # ------------------------------------------------------------------ HTTP

    def post(self, case: Case, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(f"/v1/losses/{case.loss}", json=body)

    def body(
        self, case: Case, tensors: dict[str, Any], reduction: str, dtype: str
    ) -> dict[str, Any]:
        from tests.cases import encode

        wire = {k: encode(v, "nested") for k, v in tensors.items()}  # dtype-exact numbers
        return {**wire, **case.options, "reduction": reduction, "dtype": dtype, "encoding": "b64"}

    def check_response(self, response: httpx.Response, expected: torch.Tensor) -> str | None:
        """A reason the 200 response is malformed, or None."""
        from service.tensors import dtype_name

        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:300]}"
        data = response.json()
        if data.get("device") != self.served_on:
            return f"computed on {data.get('device')!r}, expected {self.served_on!r}"
        if data.get("dtype") != dtype_name(expected.dtype):
            return f"dtype {data.get('dtype')!r}, expected {dtype_name(expected.dtype)!r}"
        if data.get("shape") != list(expected.shape):
            return f"shape {data.get('shape')}, expected {list(expected.shape)}"
        return None

    # ------------------------------------------------------------------ one check

    def compare(
        self,
        kind: str,
        name: str,
        dtype: str,
        run: Callable[[], list[torch.Tensor]],
        first: list[torch.Tensor],
        got: list[torch.Tensor],
        reference: list[torch.Tensor],
        terms: int,
    ) -> None:
        """``got`` (the service's tensors) against ``first``, what ``run()`` (the
        in-process call on the device) gave, and the float64 ``reference``."""
        exact = all(self.same(g, e) for g, e in zip(got, first, strict=True))
        status, detail = "exact", ""
        if not exact:
            repeats = [run() for _ in range(REPEATS_ON_MISMATCH)]
            reproducible = all(
                all(self.same(r, e) for r, e in zip(rep, first, strict=True)) for rep in repeats
            )
            diffs = [
                float((g.double() - e.double()).abs().nan_to_num(0.0).max())
                for g, e in zip(got, first, strict=True)
            ]
            if reproducible:
                self.record(
                    kind,
                    name,
                    dtype,
                    "FAIL",
                    f"the service differs from the reproducible in-process value "
                    f"(max |diff| {max(diffs):.3g})",
                )
                return
            within = [self.close(g, e, dtype, terms)[0] for g, e in zip(got, first, strict=True)]
            matched = any(
                all(self.same(g, e) for g, e in zip(got, rep, strict=True)) for rep in repeats
            )
            if not (matched or all(within)):
                self.record(
                    kind,
                    name,
                    dtype,
                    "FAIL",
                    f"in-process is nondeterministic and the service is outside the "
                    f"tolerance of it (max |diff| {max(diffs):.3g})",
                )
                return
            status = "nondeterministic"
            detail = (
                f"in-process runs differ among themselves; the service "
                f"{'matched one of them bit for bit' if matched else 'is within tolerance'} "
                f"(max |diff| to the first {max(diffs):.3g})"
            )
        for g, ref in zip(got, reference, strict=True):
            ok, diff, share = self.close(g, ref, dtype, terms)
            if share > self.worst.get(dtype, (-1.0, ""))[0]:
                self.worst[dtype] = (share, f"{kind} {name}")
            if not ok:
                self.record(
                    kind,
                    name,
                    dtype,
                    "FAIL",
                    f"equal to in-process ({status}) but off the float64 reference by {diff:.3g} "
                    f"(rtol/atol {TOLERANCES[dtype]}, terms {terms})",
                )
                return
        self.record(kind, name, dtype, status, detail)

    def unsupported(
        self, kind: str, name: str, dtype: str, message: str, response: httpx.Response
    ) -> None:
        if 400 <= response.status_code < 500:
            detail = f"torch: {message}; service: HTTP {response.status_code}"
            self.record(kind, name, dtype, "unsupported", detail)
        else:
            self.record(
                kind,
                name,
                dtype,
                "FAIL",
                f"torch raises in-process ({message}) but the service answered "
                f"HTTP {response.status_code}: {response.text[:200]}",
            )

    # ------------------------------------------------------------------ values

    def value(self, case: Case, reduction: str, dtype: str) -> None:
        import torch

        from tests.cases import decode, torch_call

        name = f"{case.loss}-{case.id}-{reduction}"
        tensors = self.cast(case.tensors, getattr(torch, dtype))
        body = self.body(case, tensors, reduction, dtype)

        def run() -> list[torch.Tensor]:
            out = torch_call(case, reduction, self.on_device(tensors))
            self.sync()
            return [out.cpu()]

        try:
            expected = run()[0]
        except Exception as exc:  # torch refuses this loss for this dtype
            self.unsupported("value", name, dtype, first_line(exc), self.post(case, body))
            return
        response = self.post(case, body)
        problem = self.check_response(response, expected)
        if problem is not None:
            self.record("value", name, dtype, "FAIL", problem)
            return
        got = decode(response.json()["value"], expected.dtype)
        reference = torch_call(case, reduction, self.cast(tensors, torch.float64))
        terms = self.terms(case, reduction)
        self.compare("value", name, dtype, run, [expected], [got], [reference], terms)

    @staticmethod
    def terms(case: Case, reduction: str) -> int:
        """How many terms a reduction="sum" adds up (for its atol); 1 otherwise."""
        if reduction != "sum":
            return 1
        first = next(iter(case.tensors.values()))
        return max(1, int(first.numel())) if hasattr(first, "numel") else 1

    # ------------------------------------------------------------------ gradients

    def grad(self, case: Case, reduction: str, dtype: str, with_grad_output: bool) -> None:
        import torch

        from tests.cases import decode, encode, torch_call

        torch_dtype = getattr(torch, dtype)
        tensors = self.cast(case.tensors, torch_dtype)
        names = case.spec.differentiable_args(tensors)
        qualifier = "grad_output" if with_grad_output else "ones"
        name = f"{case.loss}-{case.id}-{reduction}-{qualifier} d/d {','.join(names)}"
        grad_output = None
        body = self.body(case, tensors, reduction, dtype)
        body["grad"] = names
        if with_grad_output:
            shape = torch_call(case, reduction).shape
            generator = torch.Generator().manual_seed(7)
            grad_output = torch.randn(shape, generator=generator).to(torch_dtype)
            body["grad_output"] = encode(grad_output, "nested")

        def autograd(
            inputs: dict[str, Any], device: str, go: torch.Tensor | None
        ) -> list[torch.Tensor]:
            placed = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
            leaves = []
            for n in names:
                placed[n] = placed[n].clone().requires_grad_(True)
                leaves.append(placed[n])
            out = torch_call(case, reduction, placed)
            ones = torch.ones_like(out)
            upstream = go.to(device=out.device, dtype=out.dtype) if go is not None else ones
            grads = torch.autograd.grad(out, leaves, grad_outputs=upstream, allow_unused=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return [out.detach().cpu()] + [
                (g if g is not None else torch.zeros_like(leaf)).cpu()
                for g, leaf in zip(grads, leaves, strict=True)
            ]

        def run() -> list[torch.Tensor]:
            return autograd(tensors, self.device, grad_output)

        try:
            expected = run()
        except Exception as exc:
            self.unsupported("grad", name, dtype, first_line(exc), self.post(case, body))
            return
        response = self.post(case, body)
        problem = self.check_response(response, expected[0])
        if problem is not None:
            self.record("grad", name, dtype, "FAIL", problem)
            return
        data = response.json()
        if set(data.get("grad", {})) != set(names):
            self.record("grad", name, dtype, "FAIL", f"grads {sorted(data.get('grad', {}))}")
            return
        got = [decode(data["value"], expected[0].dtype)] + [
            decode(data["grad"][n], e.dtype) for n, e in zip(names, expected[1:], strict=True)
        ]
        go64 = grad_output.double() if grad_output is not None else None
        reference = autograd(self.cast(tensors, torch.float64), "cpu", go64)
        terms = self.terms(case, reduction)
        self.compare("grad", name, dtype, run, expected, got, reference, terms)


def run_parity(parity: Parity, dtypes: list[str], only: set[str] | None, subset: bool) -> None:
    """Every case (of the losses in ``only``) in every dtype; with ``subset`` (a quick
    rehearsal), float16 and bfloat16 take only the first case of each loss."""
    from tests.cases import CASES

    cases = [c for c in CASES if only is None or c.loss in only]
    first_of_each = [c for i, c in enumerate(cases) if c.loss not in {d.loss for d in cases[:i]}]
    for dtype in dtypes:
        start = time.monotonic()
        before = len(parity.outcomes)
        for case in first_of_each if subset and dtype != "float32" else cases:
            for reduction in case.spec.reductions:
                parity.value(case, reduction, dtype)
            parity.grad(case, "mean", dtype, with_grad_output=False)
            parity.grad(case, "none", dtype, with_grad_output=True)
        done = parity.outcomes[before:]
        counts = {s: sum(o.status == s for o in done) for s in STATUSES}
        print(
            f"   {dtype}: {len(done)} checks, "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f" ({time.monotonic() - start:.1f} s)",
            flush=True,
        )
        for o in done:
            if o.status == "FAIL":
                print(f"     FAIL {o.kind} {o.name}: {o.detail}", flush=True)


STATUSES = ("exact", "nondeterministic", "unsupported", "FAIL")


# =========================================================================== seed and OOM


def seed_check(client: httpx.Client, served_on: str, rep: Report) -> None:
    response = client.post(
        "/v1/losses/cross_entropy", json={"input": [[2, 1], [1, 2]], "target": [1, 0]}
    )
    data = response.json() if response.status_code == 200 else {}
    value, device = data.get("value"), data.get("device")
    rep.seed_ok = (
        response.status_code == 200
        and isinstance(value, float)
        and round(value, 4) == 1.3133
        and device == served_on
    )
    rep.seed = (
        f"seed request (cross_entropy [[2,1],[1,2]], [1,0], no device field): HTTP "
        f"{response.status_code}, value {value}, device {device!r} (expected 1.3133 on "
        f"{served_on!r}): {'ok' if rep.seed_ok else 'FAILED'}"
    )
    print("   " + rep.seed, flush=True)


def broadcast_request(n: int, seed: int) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """mse_loss with input [n, 1] and target [1, n]: torch broadcasts both to
    [n, n], so the computation allocates n² floats from 8n bytes of tensors."""
    import torch

    from tests.cases import encode

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=generator)
    y = torch.randn(1, n, generator=generator)
    return {"input": encode(x, "b64"), "target": encode(y, "b64")}, x, y


def moderate_check(client: httpx.Client, device: str, served_on: str, n: int) -> tuple[bool, str]:
    import torch.nn.functional as F

    body, x, y = broadcast_request(n, 1)
    response = client.post("/v1/losses/mse_loss", json=body)
    if response.status_code != 200:
        return False, f"HTTP {response.status_code}: {response.text[:300]}"
    data = response.json()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = set()
        for _ in range(3):
            values.add(F.mse_loss(x.to(device), y.to(device)).item())
    got = data["value"]
    ok = data["device"] == served_on and got in values
    nondet = "" if len(values) == 1 else f" (in-process gave {len(values)} different values)"
    what = f"[{n}, {n}] ({gib(4 * n * n)})"
    return ok, (
        f"HTTP 200 on {data['device']}, value {got!r}, in-process {sorted(values)}{nondet}: "
        f"{'equal' if ok else 'DIFFERENT'} (mse_loss broadcasting to {what})"
    )


def oom_check(client: httpx.Client, device: str, served_on: str, rep: Report) -> None:
    import torch

    if device == "cpu":
        ok, text = moderate_check(client, device, served_on, 1024)
        rep.oom_ok = None
        rep.oom = [
            "skipped: a CPU rehearsal has no device memory to exhaust (the real run sends "
            "mse_loss input [N, 1], target [1, N] with N^2 * 4 bytes > 1.5 x the card's free "
            "memory and expects 503 with Retry-After).",
            f"the same request shape with N = 1024 on the CPU: {text}.",
        ]
        if not ok:
            rep.errors.append(f"the broadcasting request failed on the CPU: {text}")
        for line in rep.oom:
            print("   " + line, flush=True)
        return
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    n = math.ceil(math.sqrt(1.5 * free / 4))
    body, _, _ = broadcast_request(n, 2)
    start = time.perf_counter()
    response = client.post("/v1/losses/mse_loss", json=body)
    took = time.perf_counter() - start
    retry_after = response.headers.get("retry-after")
    detail = response.text[:300].replace("\n", " ")
    got_503 = response.status_code == 503 and retry_after is not None and "memory" in response.text
    lines = [
        f"free memory before: {gib(free)} of {gib(total)} (torch.cuda.mem_get_info); request: "
        f"mse_loss input [{n}, 1], target [1, {n}] as b64 ({8 * n / 1e6:.1f} MB of tensors), "
        f"broadcasting to [{n}, {n}] = {gib(4 * n * n)} of float32 ({4 * n * n / free:.2f} x free)",
        f"answer: HTTP {response.status_code}, Retry-After {retry_after!r}, in {fmt_s(took)}: "
        f"{detail}",
    ]
    alive = client.get("/healthz").status_code == 200
    seed = Report(False, device)
    seed_check(client, served_on, seed)
    moderate_ok, moderate = moderate_check(client, device, served_on, 4096)
    free_after = torch.cuda.mem_get_info()[0]
    lines += [
        f"after it: /healthz {'200' if alive else 'FAILED'}; {seed.seed}",
        f"a moderate request after it: {moderate}",
        f"free memory after: {gib(free_after)}",
    ]
    rep.oom = lines
    rep.oom_ok = got_503 and alive and seed.seed_ok and moderate_ok
    for line in lines:
        print("   " + line, flush=True)


# =========================================================================== pytest


CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_client.py", "tests/test_client_large.py")


def cuda_tests(rep: Report) -> None:
    """tests/test_cuda.py (the app in-process on CUDA: auto/cuda devices, dtypes, a
    class index out of range as 422, not a device assert), where pytest is installed."""
    if importlib.util.find_spec("pytest") is None:
        rep.pytest = "not run: pytest is not installed in this Python"
        print("   " + rep.pytest, flush=True)
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    # only the plugins this project uses: a GPU image's many others stay out
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["-p", "pytest_timeout"]
    else:  # pyproject's `timeout` option is then unknown: not an error here
        command += ["-W", "ignore::pytest.PytestConfigWarning"]
    # the CUDA tests: the app, shared memory, and the client's tensors on a GPU
    command += ["-m", "cuda", *CUDA_TEST_FILES]
    try:
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        rep.pytest_ok = False
        rep.pytest = "tests/test_cuda.py did not finish in 300 s"
        return
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else f"exit status {proc.returncode}"
    rep.pytest_ok = proc.returncode == 0
    rep.pytest = f"`pytest -m cuda {' '.join(CUDA_TEST_FILES)}`: {summary}"
    if not rep.pytest_ok:
        rep.errors.append(f"tests/test_cuda.py failed:\n{proc.stdout[-3000:]}{proc.stderr[-1000:]}")
    print("   " + rep.pytest, flush=True)


# =========================================================================== benchmark


@dataclass
class Timed:
    median: float
    minimum: float
    server: dict[str, float] = field(default_factory=dict)  # Server-Timing medians, seconds


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        m = re.match(r"\s*(\w+);dur=([\d.]+)", part)
        if m:
            out[m.group(1)] = float(m.group(2)) / 1000
    return out


@dataclass
class Reply:
    """One response as the transport saw it (the parts the checks read)."""

    status_code: int
    headers: dict[str, str]  # names in lower case
    content: bytes  # empty where the transport was told not to keep it
    seconds: float
    size: int  # response body bytes received

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class Transport:
    """Sends a pre-built body and times the round trip with a client that is not
    the bottleneck, so that the rows measure the server: curl where it is
    installed (the body from a file, the response to a file or /dev/null, its
    own ``time_total``), else httpx sending the body in 1 MiB memoryview pieces
    with a Content-Length (about 8x faster than one ``bytes`` body, but slower
    than curl). The service and the bare app are timed with the same one."""

    def __init__(self, work: Path) -> None:
        self.curl = shutil.which("curl")
        self.work = work
        self.files: dict[tuple[int, int], Path] = {}
        if self.curl:
            version = subprocess.run(
                [self.curl, "--version"], capture_output=True, text=True, check=False
            ).stdout.split("\n")[0]
            self.name = " ".join(version.split()[:2]) or "curl"
        else:
            self.name = "httpx (1 MiB memoryview pieces; curl is not installed)"

    def forget(self) -> None:
        """Delete the body files of the last shape."""
        for path in self.files.values():
            path.unlink(missing_ok=True)
        self.files.clear()

    def _file(self, body: bytes) -> Path:
        key = (id(body), len(body))
        if key not in self.files:
            path = self.work / f"body-{len(self.files)}.bin"
            path.write_bytes(body)
            self.files[key] = path
        return self.files[key]

    def post(self, url: str, body: bytes, headers: dict[str, str], keep: bool = True) -> Reply:
        if self.curl is None:
            return self._post_httpx(url, body, headers, keep)
        out = self.work / "reply.bin"
        head = self.work / "reply.headers"
        command = [self.curl, "-sS", "--noproxy", "*", "-o", str(out) if keep else os.devnull]
        command += ["-D", str(head), "-w", "%{http_code} %{time_total} %{size_download}"]
        command += ["-H", "Expect:"]  # no 100-continue round trip before the body
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        command += ["--data-binary", f"@{self._file(body)}", url]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise CheckError(f"curl {url}: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
        code, seconds, size = proc.stdout.split()
        received: dict[str, str] = {}
        for line in head.read_text(errors="replace").splitlines():
            if line.startswith("HTTP/"):
                received = {}  # the last block is the final response's
            elif ":" in line:
                name, _, value = line.partition(":")
                received[name.strip().lower()] = value.strip()
        content = out.read_bytes() if keep else b""
        return Reply(int(code), received, content, float(seconds), int(float(size)))

    def _post_httpx(self, url: str, body: bytes, headers: dict[str, str], keep: bool) -> Reply:
        import httpx

        view = memoryview(body)
        piece = 1 << 20

        def pieces() -> Iterator[bytes]:
            for at in range(0, len(view), piece):
                yield view[at : at + piece]  # type: ignore[misc]  # httpx takes any buffer

        sent = {**headers, "content-length": str(len(body))}
        with httpx.Client(timeout=600, trust_env=False) as client:
            start = time.perf_counter()
            response = client.post(url, content=pieces(), headers=sent)
            seconds = time.perf_counter() - start
        content = response.content
        received = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, received, content if keep else b"", seconds,
                     len(content))  # fmt: skip


def time_requests(
    transport: Transport,
    url: str,
    content: bytes,
    headers: dict[str, str],
    repeats: int,
    check: Callable[[Reply], str],
) -> tuple[Timed, str, int]:
    """1 warm-up, its whole response checked, + ``repeats`` timed sequential
    requests (status and size checked; their bodies are not kept, so that
    writing them does not count). Returns the timing, the check's verdict and
    the response size."""
    first = transport.post(url, content, headers, keep=True)
    if first.status_code != 200:
        raise CheckError(f"{url}: HTTP {first.status_code}: {first.text[:300]}")
    verdict = check(first)
    times: list[float] = []
    timings: list[dict[str, float]] = []
    for _ in range(repeats):
        reply = transport.post(url, content, headers, keep=False)
        if reply.status_code != 200 or reply.size != first.size:
            raise CheckError(
                f"{url}: HTTP {reply.status_code}, {reply.size} bytes (the warm-up: 200, "
                f"{first.size} bytes)"
            )
        times.append(reply.seconds)
        timings.append(server_timing(reply.headers.get("server-timing", "")))
    server = {
        k: statistics.median(t.get(k, math.nan) for t in timings)
        for k in ("decode", "compute", "encode")
    }
    return Timed(statistics.median(times), min(times), server), verdict, first.size


def time_ceiling(
    transport: Transport, bare: str, content: bytes, response_size: int, repeats: int
) -> Timed:
    """The bare ASGI app receiving the same bytes and answering with as many
    bytes as the service did: what the server and transport alone cost."""
    headers = {"content-type": "application/octet-stream", "x-response-bytes": str(response_size)}
    times = []
    for i in range(repeats + 1):
        reply = transport.post(f"{bare}/", content, headers, keep=False)
        if reply.status_code != 200 or reply.size != response_size:
            raise CheckError(f"bare app: HTTP {reply.status_code}, {reply.size} bytes")
        if i:
            times.append(reply.seconds)
    return Timed(statistics.median(times), min(times))


def time_calls(fn: Callable[[], Any], repeats: int) -> tuple[Timed, list[Any]]:
    results = [fn()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return Timed(statistics.median(times), min(times)), results


@dataclass
class Bodies:
    rows: int
    classes: int
    logits: np.ndarray
    target: np.ndarray
    v2_json_out: bytes
    v2_header_length: int
    v1_b64: bytes
    v2_grad: bytes
    v2_grad_header_length: int


def build_bodies(rows: int, classes: int, grad: bool) -> Bodies:
    import base64

    import numpy as np
    import orjson

    rng = np.random.default_rng(rows * 100003 + classes)
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    target = rng.integers(0, classes, rows, dtype=np.int64)
    raw_x, raw_t = logits.astype("<f4").tobytes(), target.astype("<i8").tobytes()

    def v2(parameters: dict[str, Any]) -> tuple[bytes, int]:
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [rows, classes],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw_x)},
                    },
                    {
                        "name": "target",
                        "shape": [rows],
                        "datatype": "INT64",
                        "parameters": {"binary_data_size": len(raw_t)},
                    },
                ],
                "parameters": parameters,
            }
        )
        return header + raw_x + raw_t, len(header)

    def b64(shape: list[int], dtype: str, raw: bytes) -> dict[str, Any]:
        return {"shape": shape, "dtype": dtype, "b64": base64.b64encode(raw).decode()}

    v1 = orjson.dumps(
        {"input": b64([rows, classes], "float32", raw_x), "target": b64([rows], "int64", raw_t)}
    )
    json_out, json_len = v2({})
    grad_body, grad_len = v2({"grad": True, "binary_data_output": True}) if grad else (b"", 0)
    return Bodies(rows, classes, logits, target, json_out, json_len, v1, grad_body, grad_len)


V2_PATH, V1_PATH = "/v2/models/cross_entropy/infer", "/v1/losses/cross_entropy"


@dataclass
class Servers:
    """Where the benchmark sends its bodies."""

    service: str
    bare: str  # bench/apps/bare_asgi.py: the ceiling
    pageable: str | None  # the service with LOSS_SERVICE_PIN_BODY_MEMORY=false, on CUDA
    transport: Transport


def run_bench(servers: Servers, device: str, sizes: str, repeats: int, rep: Report) -> None:
    import torch

    rep.bench_ok = False  # until every shape ran
    for index, (rows, classes) in enumerate(BENCH_SHAPES[sizes]):
        bench_shape(servers, device, rows, classes, index == 0, repeats, rep)
        servers.transport.forget()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    rep.bench_ok = not rep.bench_bad


def bench_shape(
    servers: Servers,
    device: str,
    rows: int,
    classes: int,
    first: bool,
    repeats: int,
    rep: Report,
) -> None:
    """One shape: the in-process calls, then the service over v2 binary and v1 b64
    (and, for the first shape, v2 binary with grad, and v2 binary into pageable
    memory), each beside the bare app receiving the same bytes and answering as
    many, each response checked against the in-process value."""
    import numpy as np
    import orjson
    import torch
    import torch.nn.functional as F

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    start = time.monotonic()
    grad = first
    transport, service_url = servers.transport, servers.service
    b = build_bodies(rows, classes, grad)
    shape = f"[{rows}, {classes}]"
    print(
        f"   {shape}: bodies built in {time.monotonic() - start:.1f} s (v2 binary "
        f"{len(b.v2_json_out) / 1e6:.0f} MB, v1 b64 {len(b.v1_b64) / 1e6:.0f} MB)",
        flush=True,
    )
    raw_x = bytearray(b.logits.astype("<f4").tobytes())
    raw_t = bytearray(b.target.astype("<i8").tobytes())

    # ---- in-process, in this process, on the same device, synchronised
    resident = [torch.from_numpy(b.logits).to(device), torch.from_numpy(b.target).to(device)]

    def on_device() -> None:
        F.cross_entropy(resident[0], resident[1])
        sync()

    def host_tensors() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.frombuffer(raw_x, dtype=torch.float32).reshape(rows, classes).to(device)
        return x, torch.frombuffer(raw_t, dtype=torch.int64).to(device)

    def from_host() -> float:
        return float(F.cross_entropy(*host_tensors()).item())

    def from_host_grad() -> tuple[float, bytes]:
        x, t = host_tensors()
        x.requires_grad_(True)
        loss = F.cross_entropy(x, t)
        (g,) = torch.autograd.grad(loss, [x])
        return float(loss.item()), g.cpu().numpy().tobytes()

    inproc_device, _ = time_calls(on_device, repeats)
    inproc_host, host_values = time_calls(from_host, repeats)
    values = set(host_values)
    resident.clear()  # the device memory back before the service's turn

    def value_verdict(got: float) -> str:
        if got in values:
            return f"equal to in-process ({got:.7g})"
        close = any(math.isclose(got, v, rel_tol=1e-5) for v in values)
        if not close:
            rep.bench_bad.append(f"{shape}: {got!r}, in-process {sorted(values)}")
        return f"{'within 1e-5 of' if close else 'DIFFERENT from'} in-process ({got!r})"

    def check_v2_json(response: Reply) -> str:
        outputs = response.json()["outputs"]
        loss = next(o for o in outputs if o["name"] == "loss")
        return value_verdict(float(np.float32(loss["data"][0])))

    def check_v1(response: Reply) -> str:
        return value_verdict(float(orjson.loads(response.content)["value"]))

    v2_headers = {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(b.v2_header_length),
    }

    def ceiling(body: bytes, response_size: int) -> Timed:
        return time_ceiling(transport, servers.bare, body, response_size, repeats)

    v2_timed, v2_check, v2_size = time_requests(
        transport, service_url + V2_PATH, b.v2_json_out, v2_headers, repeats, check_v2_json
    )
    v2_ceiling = ceiling(b.v2_json_out, v2_size)
    v1_headers = {"content-type": "application/json"}
    v1_timed, v1_check, v1_size = time_requests(
        transport, service_url + V1_PATH, b.v1_b64, v1_headers, repeats, check_v1
    )
    add_row(rep, shape, "v2 binary in, JSON out", b.v2_json_out, v2_timed, v2_ceiling,
            inproc_host, inproc_device, v2_check)  # fmt: skip
    add_row(rep, shape, "v1 b64 JSON", b.v1_b64, v1_timed, ceiling(b.v1_b64, v1_size),
            inproc_host, inproc_device, v1_check)  # fmt: skip
    if first and servers.pageable is not None:
        paged, paged_check, _ = time_requests(
            transport, servers.pageable + V2_PATH, b.v2_json_out, v2_headers, repeats,
            check_v2_json,
        )  # fmt: skip
        add_row(rep, shape, "v2 binary in, JSON out, body in pageable memory (PIN_BODY_MEMORY "
                "=false)", b.v2_json_out, paged, v2_ceiling, inproc_host, inproc_device,
                paged_check)  # fmt: skip
    print(
        f"   {shape}: v2 binary {fmt_s(v2_timed.median)}, v1 b64 {fmt_s(v1_timed.median)}, "
        f"in-process from host {fmt_s(inproc_host.median)}, on device "
        f"{fmt_s(inproc_device.median)}",
        flush=True,
    )
    if not grad:
        return
    inproc_grad, grad_results = time_calls(from_host_grad, repeats)
    grad_values = {v for v, _ in grad_results}
    grad_bytes = {g for _, g in grad_results}
    del grad_results

    def check_grad(response: Reply) -> str:
        length = int(response.headers["inference-header-content-length"])
        header = orjson.loads(response.content[:length])
        sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in header["outputs"]}
        body = response.content[length:]
        loss = float(np.frombuffer(body[: sizes["loss"]], "<f4")[0])
        grad_raw = body[sizes["loss"] : sizes["loss"] + sizes["grad_input"]]
        value_ok = loss in grad_values
        grad_ok = grad_raw in grad_bytes
        if not (value_ok and grad_ok):
            rep.bench_bad.append(f"{shape} grad: loss {loss!r}, in-process {sorted(grad_values)}")
        return (
            f"loss {'equal to' if value_ok else 'DIFFERENT from'} in-process, grad "
            f"{'bit-identical to' if grad_ok else 'DIFFERENT from'} in-process"
        )

    grad_headers = {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(b.v2_grad_header_length),
    }
    grad_timed, grad_check, grad_size = time_requests(
        transport, service_url + V2_PATH, b.v2_grad, grad_headers, repeats, check_grad
    )
    add_row(rep, shape, "v2 binary, grad=true, binary out", b.v2_grad, grad_timed,
            ceiling(b.v2_grad, grad_size), inproc_grad, None, grad_check)  # fmt: skip
    print(
        f"   {shape} grad: v2 binary {fmt_s(grad_timed.median)}, in-process "
        f"{fmt_s(inproc_grad.median)}",
        flush=True,
    )


def _infer_into_region(client: Any, inputs: list[Any], output: Any, handle: Any) -> float:
    """One inference whose loss goes into a CUDA shared-memory region, read back."""
    import numpy as np
    import tritonclient.utils.cuda_shared_memory as cudashm

    client.infer("cross_entropy", inputs, outputs=[output])
    return float(cudashm.get_contents_as_numpy(handle, np.float32, [1])[0])


def cuda_shm_bench(svc: Service, shape: tuple[int, int], repeats: int, rep: Report) -> None:
    """cross_entropy on inputs already on the GPU, in CUDA shared-memory regions
    that a client made and registered with tritonclient (unmodified), the loss
    written into an output region: end to end over HTTP and gRPC, against the
    in-process call on tensors already on the device. Target: within
    1 ms + 2x of it."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from service.shm import cuda_available

    if not cuda_available():
        rep.cuda_shm = "not run: cuda-python is not importable in this Python"
        print("   " + rep.cuda_shm, flush=True)
        return
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.cuda_shared_memory as cudashm

    rows, classes = shape
    rng = np.random.default_rng(rows * 7 + classes)
    x = rng.standard_normal((rows, classes), dtype=np.float32)
    t = rng.integers(0, classes, rows, dtype=np.int64)
    resident = [torch.from_numpy(x).cuda(), torch.from_numpy(t).cuda()]

    def on_device() -> float:
        value = F.cross_entropy(resident[0], resident[1])
        torch.cuda.synchronize()
        return float(value.item())

    calls = max(repeats * 4, 20)
    inproc, values = time_calls(on_device, calls)
    expected = values[0]
    resident.clear()
    where = {"http": svc.base.removeprefix("http://"), "grpc": svc.grpc}
    for protocol, module in (("http", httpclient), ("grpc", grpcclient)):
        if where[protocol] is None:
            continue
        mod: Any = module
        client = mod.InferenceServerClient(where[protocol])
        handles: dict[str, Any] = {}
        try:
            for name, size in (("input", x.nbytes), ("target", t.nbytes), ("loss", 4)):
                region = f"gpu_check_{protocol}_{name}"
                handles[name] = cudashm.create_shared_memory_region(region, size, 0)
                raw = cudashm.get_raw_handle(handles[name])
                client.register_cuda_shared_memory(region, raw, 0, size)
            cudashm.set_shared_memory_region(handles["input"], [x])
            cudashm.set_shared_memory_region(handles["target"], [t])
            inputs = []
            for name, array, datatype in (("input", x, "FP32"), ("target", t, "INT64")):
                item = mod.InferInput(name, list(array.shape), datatype)
                item.set_shared_memory(f"gpu_check_{protocol}_{name}", array.nbytes)
                inputs.append(item)
            output = mod.InferRequestedOutput("loss")
            output.set_shared_memory(f"gpu_check_{protocol}_loss", 4)
            call = partial(_infer_into_region, client, inputs, output, handles["loss"])
            timed, got_values = time_calls(call, calls)
        finally:
            with contextlib.suppress(Exception):
                client.unregister_cuda_shared_memory()
            for handle in handles.values():
                cudashm.destroy_shared_memory_region(handle)
            client.close()
        same = all(v == expected for v in got_values)
        if not same:
            rep.bench_bad.append(f"CUDA shm {protocol}: {sorted(set(got_values))}, in-process "
                                 f"{expected!r}")  # fmt: skip
        bound = 1e-3 + 2 * inproc.median
        rep.cuda_shm_rows.append(
            [
                f"[{rows}, {classes}]",
                protocol,
                fmt_s(timed.median),
                fmt_s(timed.minimum),
                fmt_s(inproc.median),
                fmt_s(bound),
                "within" if timed.median <= bound else "OVER",
                "equal to in-process" if same else "DIFFERENT from in-process",
            ]
        )
        print(
            f"   CUDA shm over {protocol}: {fmt_s(timed.median)} (in-process on device "
            f"{fmt_s(inproc.median)}, target {fmt_s(bound)})",
            flush=True,
        )


def add_row(
    rep: Report,
    shape: str,
    transport: str,
    body: bytes,
    service_t: Timed,
    ceiling: Timed,
    host: Timed,
    on_device: Timed | None,
    check: str,
) -> None:
    server = service_t.server
    parts = [f"{k} {fmt_s(v)}" for k, v in server.items() if not math.isnan(v)]
    rep.bench_rows.append(
        [
            shape,
            transport,
            f"{len(body) / 1e6:,.1f} MB",
            fmt_s(service_t.median),
            fmt_s(service_t.minimum),
            fmt_s(ceiling.median),
            f"{service_t.median / ceiling.median:.2f}x",
            ", ".join(parts),
            fmt_s(host.median),
            f"{service_t.median / host.median:.1f}x",
            fmt_s(on_device.median) if on_device else "",
            f"{service_t.median / on_device.median:.0f}x" if on_device else "",
            check,
        ]
    )


# =========================================================================== report


def environment(device: str) -> dict[str, str]:
    import torch

    from bench.load import cpu_model

    facts = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        facts["device"] = torch.cuda.get_device_name(0)
        facts["memory"] = f"{gib(total)} total, {gib(free)} free at the start"
        facts["multiprocessors"] = str(props.multi_processor_count)
        facts["cuda"] = str(torch.version.cuda)
        facts["driver"] = nvidia_smi("driver_version")
    return facts


def nvidia_smi(query: str) -> str:
    if shutil.which("nvidia-smi") is None:
        return "? (no nvidia-smi)"
    try:
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "?"


def commit(args: argparse.Namespace) -> str:
    from bench.load import git_commit

    found = git_commit()
    if found and found != "?" and not found.startswith("fatal"):
        return found
    return args.commit or "unknown (no git repository here; pass --commit)"


def render(
    rep: Report,
    args: argparse.Namespace,
    facts: dict[str, str],
    started: datetime,
    argv: list[str],
) -> str:
    title = (
        "# REHEARSAL on CPU: not a GPU result"
        if rep.rehearsal
        else f"# GPU check: {facts.get('device', rep.device)}"
    )
    lines = [title, ""]
    if rep.rehearsal:
        lines += [
            "This run exercised scripts/gpu-check's flow on the CPU (device cpu, small "
            "benchmark sizes, no out-of-memory check). It says nothing about CUDA.",
            "",
        ]
    lines += [
        f"- date: {started:%Y-%m-%d %H:%M} UTC; commit {commit(args)}",
        *(f"- {k}: {v}" for k, v in facts.items()),
        f"- command: `{' '.join(['scripts/gpu-check', *argv])}`",
        "- service: a real `python -m service.cli serve` process on loopback, "
        + (
            "LOSS_SERVICE_DEVICE=cpu"
            if rep.rehearsal
            else "LOSS_SERVICE_DEVICE unset (default `auto`)"
        )
        + ", limits raised: "
        + ", ".join(f"{k.removeprefix('LOSS_SERVICE_')}={v}" for k, v in SERVICE_LIMITS.items()),
        f"- {rep.seed}",
        f"- {rep.pytest or 'tests/test_cuda.py: not run'}",
        "",
        "## Parity and gradients",
        "",
        "Every case of tests/cases.py under every reduction (values), and its gradients "
        "with respect to every differentiable argument (reduction mean with grad_output "
        "ones, and reduction none with a random grad_output), in each dtype. Inputs are "
        "rounded to the dtype first and sent as those exact numbers. **exact**: the "
        f"service's value and gradients equal the in-process torch call on {rep.device} in "
        "the same dtype bit for bit (NaN = NaN), and are within tolerance of float64 on the "
        "CPU computed from the same rounded inputs. **nondeterministic**: in-process runs "
        f"differ among themselves ({REPEATS_ON_MISMATCH} more were made after a mismatch) "
        "and the service is within tolerance of them. **unsupported**: torch itself raises "
        "for that loss and dtype in-process, and the service answered 4xx.",
        "",
        "| dtype | checks | exact | nondeterministic | unsupported by torch, service 4xx | "
        "failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dtype in args.dtypes:
        of = [o for o in rep.outcomes if o.dtype == dtype]
        counts = [sum(o.status == s for o in of) for s in STATUSES]
        lines.append(f"| {dtype} | {len(of)} | " + " | ".join(map(str, counts)) + " |")
    lines += [
        "",
        "Tolerances against float64 (`torch.isclose`; for reduction sum the atol is "
        "multiplied by the number of terms): "
        + "; ".join(f"{d} rtol {r:g}, atol {a:g}" for d, (r, a) in TOLERANCES.items())
        + ". About ten units in the last place of each dtype (eps 1.2e-7, 9.8e-4, 7.8e-3).",
        "",
    ]
    if rep.worst:
        lines += [
            "Largest share of the float64 tolerance used (1 = at the limit): "
            + "; ".join(f"{d} {share:.2f} ({what})" for d, (share, what) in rep.worst.items())
            + ".",
            "",
        ]
    for status, heading in (
        ("FAIL", "Failures"),
        ("nondeterministic", "Nondeterministic in torch on this device"),
    ):
        items = [o for o in rep.outcomes if o.status == status]
        if items:
            lines += [f"{heading}:", ""]
            lines += [f"- {o.dtype} {o.kind} {o.name}: {o.detail}" for o in items[:60]]
            if len(items) > 60:
                lines.append(f"- ... and {len(items) - 60} more")
            lines.append("")
    groups: dict[tuple[str, str, str], list[Outcome]] = {}
    for o in rep.outcomes:
        if o.status == "unsupported":
            groups.setdefault((o.dtype, o.name.split("-")[0], o.detail), []).append(o)
    if groups:
        lines += ["Unsupported by torch on this device (the service answered 4xx):", ""]
        for (dtype, loss, detail), items in groups.items():
            kinds = ", ".join(f"{sum(o.kind == k for o in items)} {k}s" for k in ("value", "grad"))
            lines.append(f"- {dtype} {loss} ({kinds}): {detail}")
        lines.append("")
    lines += ["## Out of memory", ""]
    verdict = {True: "PASS", False: "FAIL", None: "SKIPPED"}[rep.oom_ok]
    lines += [f"Result: **{verdict}**", ""] + [f"- {line}" for line in rep.oom] + [""]
    lines += ["## Performance: large cross_entropy", ""]
    if rep.bench_ok is None:
        lines += ["Skipped (--no-bench).", ""]
    else:
        lines += [
            f"Seeded random float32 logits and int64 labels, reduction mean, on {rep.device}. "
            f"Service: end-to-end seconds of sequential requests sent by {rep.transport} with "
            f"pre-built bodies (1 warm-up, its response checked in full, + {args.repeats} "
            "timed, their status and size checked), server-side durations from its "
            "Server-Timing header (medians). *Ceiling*: the bare ASGI app "
            "(bench/apps/bare_asgi.py, under uvicorn on the same machine) receiving the same "
            "bytes and answering with as many bytes as the service did, sent by the same "
            "client: what the server and the transport cost with no service at all. "
            "In-process, in this process on the same device, "
            "with synchronisation: *from host* = bytes -> torch.frombuffer -> .to(device) -> "
            "F.cross_entropy -> .item() (for the grad row: + torch.autograd.grad and the "
            "gradient copied back to host bytes); *on device* = F.cross_entropy on tensors "
            "already there + synchronize. Every response's value is checked against the "
            "in-process value.",
            "",
            "| shape | request | body | service median | service min | ceiling | "
            "service / ceiling | server side | in-process from host | service / from host | "
            "in-process on device | service / on device | check |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rep.bench_rows]
        lines.append("")
    if rep.cuda_shm_rows or rep.cuda_shm:
        lines += [
            "## CUDA shared memory",
            "",
            "cross_entropy (reduction mean) on inputs in CUDA shared-memory regions made and "
            "registered by an unmodified tritonclient (`tritonclient.utils.cuda_shared_memory`), "
            "the loss written into an output region and read back by the client: sequential "
            "`client.infer` calls, end to end, against `F.cross_entropy` on tensors already "
            "on the device + synchronize (medians). Target: within 1 ms + 2x of it.",
            "",
        ]
        if rep.cuda_shm:
            lines += [rep.cuda_shm, ""]
        else:
            lines += [
                "| shape | protocol | end to end median | min | in-process on device | "
                "target | verdict | value |",
                "|---|---|---:|---:|---:|---:|---|---|",
                *("| " + " | ".join(row) + " |" for row in rep.cuda_shm_rows),
                "",
            ]
    if rep.bench_bad:
        lines += ["Responses that differ from in-process:", ""]
        lines += [f"- {line}" for line in rep.bench_bad[:20]] + [""]
    if rep.errors:
        lines += ["## Errors", ""]
        for error in rep.errors:
            lines += ["```", error.strip(), "```", ""]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in rep.phase_seconds.items())
    lines += [f"Phases: {timing}.", ""]
    failed = len(rep.failures)
    bench = {True: "match in-process", False: "FAILED", None: "skipped"}[rep.bench_ok]
    tests = rep.pytest.split(": ", 1)[-1] if rep.pytest else "not run"
    tests = re.sub(r" in [\d.]+s$", "", tests) if rep.pytest_ok is not False else "FAILED"
    summary = (
        f"{len(rep.outcomes)} parity/gradient checks, {failed} failed; seed request "
        f"{'ok' if rep.seed_ok else 'FAILED'}; out of memory {verdict}; benchmark values "
        f"{bench}; CUDA tests: {tests}; {len(rep.errors)} errors"
    )
    if rep.rehearsal:
        verdict_line = (
            f"**Verdict: rehearsal {'green' if rep.ok else 'RED'}**: {summary}. Not a GPU result."
        )
    else:
        verdict_line = (
            f"**Verdict: {'PASS' if rep.ok else 'FAIL'}** on {facts.get('device')}: {summary}."
        )
    lines += [verdict_line, ""]
    return "\n".join(lines)


def report_path(args: argparse.Namespace, rep: Report, facts: dict[str, str]) -> Path:
    name = (
        "gpu-check-rehearsal-cpu.md"
        if rep.rehearsal
        else f"gpu-check-{slug(facts.get('device', 'cuda'))}.md"
    )
    if args.report is not None:
        given = Path(args.report)
        return given / name if given.is_dir() else given
    if rep.rehearsal:
        return Path(tempfile.gettempdir()) / name
    return ROOT / "bench" / "results" / name


# =========================================================================== main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    version, has_cuda = cuda_state()
    if version is None:
        print(f"CUDA is absent: {sys.executable} has no torch. {DRY_RUN}")
        return 0
    if not has_cuda and not args.rehearse_on_cpu:
        print(f"CUDA is absent: torch {version} on this machine sees no CUDA device. {DRY_RUN}")
        return 0
    if has_cuda:
        import torch

        free, total = torch.cuda.mem_get_info()
        print(
            f"== torch {version}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
            f"{gib(free)} free of {gib(total)}",
            flush=True,
        )
    ensure_dependencies(args, argv)

    import httpx
    import torch

    from bench.load import exit_on_signals

    warnings.simplefilter("ignore")  # torch's notes on broadcasting, reductions
    exit_on_signals()
    rehearsal = bool(args.rehearse_on_cpu)
    device = "cpu" if rehearsal else "cuda"
    served_on = "cpu" if rehearsal else "cuda:0"
    sizes = ("rehearse" if rehearsal else "full") + ("-quick" if args.quick else "")
    sizes = {"full-quick": "quick"}.get(sizes, sizes)
    args.repeats = 2 if args.quick else 5
    only = {n.strip() for n in args.only.split(",")} if args.only else None
    started = datetime.now(UTC)
    facts = environment(device)
    print(("== REHEARSAL on CPU (not a GPU result)" if rehearsal else "== CUDA check"), flush=True)
    for k, v in facts.items():
        print(f"   {k}: {v}", flush=True)

    rep = Report(rehearsal, device)
    begin = time.monotonic()

    def phase(name: str, heading: str, fn: Callable[[], None], svc: Service | None) -> None:
        """One step; what goes wrong in it goes into the report, and the next step runs."""
        print(f"== {heading}", flush=True)
        start = time.monotonic()
        try:
            fn()
        except Exception as exc:
            error = str(exc) if isinstance(exc, CheckError) else first_line(exc)
            if not isinstance(exc, CheckError | httpx.HTTPError):
                error += "\n" + traceback.format_exc(limit=-4)
            if svc is not None and not svc.alive():
                error += "\nthe service died; its log ends:\n" + svc.log_tail()
            rep.errors.append(f"{name}: {error}")
            print(f"gpu-check: {name} failed: {error}", flush=True)
        rep.phase_seconds[name] = time.monotonic() - start

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        try:
            with service(rehearsal, Path(tmp)) as svc:
                rep.phase_seconds["start"] = time.monotonic() - begin
                print(f"== service ready at {svc.base} ({rep.phase_seconds['start']:.0f} s)")
                with httpx.Client(base_url=svc.base, timeout=600, trust_env=False) as client:
                    parity = Parity(client, device, served_on, rep.outcomes, rep.worst)

                    def parity_checks() -> None:
                        seed_check(client, served_on, rep)
                        run_parity(parity, args.dtypes, only, subset=rehearsal and args.quick)

                    def bench() -> None:
                        work = Path(tmp)
                        with ExitStack() as stack:
                            bare = stack.enter_context(service(rehearsal, work, "bare"))
                            pageable = None
                            if not rehearsal:  # where pinning is on by default: its effect
                                off = {"LOSS_SERVICE_PIN_BODY_MEMORY": "false"}
                                pageable = stack.enter_context(
                                    service(rehearsal, work, "pageable", off)
                                )
                            transport = Transport(work)
                            stack.callback(transport.forget)
                            rep.transport = transport.name
                            servers = Servers(
                                svc.base, bare.base, pageable.base if pageable else None, transport
                            )
                            run_bench(servers, device, sizes, args.repeats, rep)

                    def oom() -> None:
                        oom_check(client, device, served_on, rep)

                    dtypes = ", ".join(args.dtypes)
                    phase(
                        "parity", f"parity and gradients on {device}: {dtypes}", parity_checks, svc
                    )
                    if not args.no_bench:
                        phase("benchmark", f"benchmark on {device} ({sizes} sizes)", bench, svc)
                    if not args.no_bench and not rehearsal:

                        def cuda_shm() -> None:
                            cuda_shm_bench(svc, BENCH_SHAPES[sizes][0], args.repeats, rep)

                        phase("cuda_shm", "CUDA shared memory", cuda_shm, svc)
                    phase("oom", "out of memory", oom, svc)
                if not svc.alive():
                    rep.errors.append(f"the service died:\n{svc.log_tail()}")
        except CheckError as exc:  # the service did not start
            rep.errors.append(str(exc))
            print(f"gpu-check: {exc}", flush=True)
    phase("pytest", "the CUDA tests", lambda: cuda_tests(rep), None)
    rep.phase_seconds["total"] = time.monotonic() - begin
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    text = render(rep, args, facts, started, argv)
    path = report_path(args, rep, facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\n{text.splitlines()[-1]}\nreport: {path} ({rep.phase_seconds['total']:.0f} s)")
    if os.environ.get(SITE_ENV, "").startswith(tempfile.gettempdir()):
        shutil.rmtree(os.environ[SITE_ENV], ignore_errors=True)  # the wheels installed for us
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
