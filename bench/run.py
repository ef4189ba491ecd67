"""The benchmark of issue 5 in one run: ceiling, floor, naive baseline, the
service and the in-process decode + compute, all measured now, on this machine.

Each server runs pinned to core 0 (``taskset -c 0``); this process and wrk run on
core 1 (``scripts/bench`` pins them). Prints the tables and writes them to
bench/results/<timestamp>.md and bench/results/latest.md. Exits 0 whatever the
ratios say; non-zero when a server fails to start or a request fails.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench import client_rows, grpc_rows, load, small_rows
from bench.load import (
    BenchError,
    Server,
    WrkResult,
    command_output,
    cpu_model,
    exit_on_signals,
    git_commit,
)
from bench.payloads import HEADER_LENGTH, Body, Payloads, Tensors, build

RESULTS = load.ROOT / "bench" / "results"
CE_PATH = "/v1/losses/cross_entropy"
V2_PATH = "/v2/models/cross_entropy/infer"

# Rows of the absolute table and the large-request columns.
BARE, FLOOR, NAIVE, V1, V2_JSON, V2, INPROC = (
    "bare ASGI app (ceiling; large = receiving the same bytes; grad = also returning as many "
    "bytes as the service's response)",
    "FastAPI route returning a constant (floor)",
    "naive FastAPI, pydantic `list[list[float]]` (baseline)",
    "service /v1 (small: nested JSON)",
    "service /v2 JSON (small: nested JSON data, JSON output)",
    "service /v2 binary extension (binary output)",
    "in-process, no HTTP (one core)",
)
ROWS = (BARE, FLOOR, NAIVE, V1, V2_JSON, V2, INPROC)
NESTED, B64, BINARY, NESTED_GRAD, BINARY_GRAD = (
    "large nested JSON",
    "large b64 JSON",
    "large binary",
    "large nested, grad",
    "large binary, grad",
)
LARGE_COLUMNS = (NESTED, B64, BINARY, NESTED_GRAD, BINARY_GRAD)


@dataclass
class Results:
    small: dict[str, WrkResult] = field(default_factory=dict)
    # each c16 round's result and the server's CPU seconds in it, by row
    small_rounds: dict[str, list[tuple[WrkResult, float]]] = field(default_factory=dict)
    c1: dict[str, WrkResult] = field(default_factory=dict)
    large: dict[tuple[str, str], float] = field(default_factory=dict)
    rss_kib: dict[str, tuple[int, int]] = field(default_factory=dict)  # (idle, peak)
    # the request without grad, timed in turn with its grad=true twin
    grad_pairs: dict[tuple[str, str], float] = field(default_factory=dict)
    orjson_loads_s: float = math.nan
    # /v1's large nested body, timed in turn with the same tensors as OIP JSON
    v1_json_twin: float = math.nan
    sizes: dict[str, float] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""
    client: client_rows.ClientResults | None = None  # issue 14's rows
    grpc_ms: dict[str, float] = field(default_factory=dict)  # bench.grpc_rows
    profile: small_rows.Profile | None = None  # issue 19's rows (bench.small_rows)
    scaling: small_rows.Scaling | None = None


@dataclass
class Options:
    duration: float
    c1_duration: float
    connections: int
    repeats: int
    naive_repeats: int
    rounds: int
    write: bool
    client_only: bool = False
    grpc_rounds: int = grpc_rows.ROUNDS


# --------------------------------------------------------------------------- checks


def reference_loss(t: Tensors) -> float:
    """cross_entropy (mean) in float64, to check what every real server returns."""
    x = t.logits.astype(np.float64)
    peak = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - peak).sum(axis=1)) + peak[:, 0]
    return float(np.mean(lse - x[np.arange(len(t.target)), t.target]))


def check_value(what: str, got: object, expected: float) -> None:
    if not isinstance(got, float) or not math.isclose(got, expected, rel_tol=1e-4):
        raise BenchError(f"{what}: loss {got!r}, expected {expected:.6f}")


def v1_check(expected: float, grad_shape: tuple[int, int] | None = None) -> Callable[..., None]:
    def check(response: httpx.Response) -> None:
        payload = orjson.loads(response.content)
        check_value("v1 response", payload.get("value"), expected)
        if grad_shape is not None:
            grad = payload.get("grad", {}).get("input")
            if not (isinstance(grad, list) and (len(grad), len(grad[0])) == grad_shape):
                raise BenchError(f"v1 grad response has no [{grad_shape}] grad.input")

    return check


def v2_check(expected: float, grad_bytes: int | None = None) -> Callable[..., None]:
    def check(response: httpx.Response) -> None:
        length = int(response.headers.get(HEADER_LENGTH, "-1"))
        if length < 0:
            raise BenchError(f"v2 response without {HEADER_LENGTH}: {response.text[:300]}")
        header = orjson.loads(response.content[:length])
        sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in header["outputs"]}
        value = np.frombuffer(response.content[length : length + sizes["loss"]], "<f4")
        check_value("v2 response", float(value[0]), expected)
        if grad_bytes is not None and sizes.get("grad_input") != grad_bytes:
            raise BenchError(f"v2 grad response: outputs {sizes}, expected {grad_bytes} B grad")

    return check


def v2_json_check(expected: float) -> Callable[..., None]:
    def check(response: httpx.Response) -> None:
        outputs = {o["name"]: o for o in orjson.loads(response.content)["outputs"]}
        check_value("v2 JSON response", float(outputs["loss"]["data"][0]), expected)

    return check


def naive_check(expected: float) -> Callable[..., None]:
    def check(response: httpx.Response) -> None:
        check_value("naive response", orjson.loads(response.content).get("value"), expected)

    return check


# --------------------------------------------------------------------------- measuring


@contextmanager
def running(server: Server, started: list[Server]) -> Iterator[Server]:
    print(f"== {server.name}: starting on core {load.SERVER_CORE} (port {server.port})", flush=True)
    started.append(server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Target:
    """One row's server, path, body and response check, for interleaved runs."""

    row: str
    server: Server
    path: str
    body: Body
    check: Callable[[httpx.Response], None] | None = None

    @property
    def url(self) -> str:
        return self.server.base + self.path

    @property
    def what(self) -> str:
        return f"{self.server.name} {self.body.name}"


def small_load(res: Results, targets: list[Target], scripts: Path, opts: Options) -> None:
    """wrk at c16 and at c1 against each target, in ``opts.rounds`` rounds that
    take the targets in turn: a slow spell of this shared machine then falls on
    every row of a ratio, not on one. req/s = the median of the rounds' req/s
    (a ratio of two rows: the median of the rounds' ratios, ``round_ratio``);
    c1 p50 = the median of the rounds' p50s. The server's CPU time in each
    c16 round is kept too (``cpu_per_request``)."""
    with load.client(60) as client:
        for t in targets:
            response = load.post(client, t.url, t.body, f"{t.what} small")
            if t.check is not None:
                t.check(response)
    scripts_for = {t.row: load.wrk_script(t.body, scripts) for t in targets}
    # wrk takes whole seconds
    c16_seconds = max(1, round(opts.duration / opts.rounds))
    c1_seconds = max(1, round(opts.c1_duration / opts.rounds))
    c16: dict[str, list[WrkResult]] = {t.row: [] for t in targets}
    c1: dict[str, list[WrkResult]] = {t.row: [] for t in targets}
    cpu: dict[str, list[float]] = {t.row: [] for t in targets}
    for _ in range(opts.rounds):
        for t in targets:
            before = load.cpu_seconds(t.server.pid)
            c16[t.row].append(
                load.wrk(t.url, scripts_for[t.row], opts.connections, c16_seconds,
                         t.what + " c16")
            )  # fmt: skip
            cpu[t.row].append(load.cpu_seconds(t.server.pid) - before)
        for t in targets:
            c1[t.row].append(
                load.wrk(t.url, scripts_for[t.row], 1, c1_seconds, t.what + " c1")
            )  # fmt: skip
    for t in targets:
        t.server.check_alive()
        runs = c16[t.row]
        res.small_rounds[t.row] = list(zip(runs, cpu[t.row], strict=True))
        middle = statistics.median(r.rps for r in runs)
        res.small[t.row] = WrkResult(
            round(middle * 1e6), 1e6, statistics.median(r.p50_ms for r in runs)
        )
        runs = c1[t.row]
        res.c1[t.row] = WrkResult(
            sum(r.requests for r in runs),
            sum(r.seconds for r in runs),
            statistics.median(r.p50_ms for r in runs),
        )
        print(
            f"   {t.row[:40]}: {res.small[t.row].rps:,.0f} req/s at c{opts.connections} "
            f"(rounds: {', '.join(f'{r.rps:,.0f}' for r in c16[t.row])}), "
            f"c1 p50 {res.c1[t.row].p50_ms:.3f} ms",
            flush=True,
        )


def large_time(res: Results, column: str, targets: list[Target], repeats: int) -> None:
    """Median end-to-end seconds per target, after one checked warm-up each; the
    timed requests take the targets in turn (bare, service, bare, ...)."""
    times: dict[str, list[float]] = {t.row: [] for t in targets}
    with load.LargePoster(600) as client:  # not httpx: it would be the bottleneck
        for t in targets:
            response = client.post(t.url, t.body, t.what, keep=True)
            if t.check is not None:
                t.check(response)
        for _ in range(repeats):
            for t in targets:
                start = time.perf_counter()
                client.post(t.url, t.body, t.what)
                times[t.row].append(time.perf_counter() - start)
    for t in targets:
        t.server.check_alive()
        res.large[(t.row, column)] = statistics.median(times[t.row])
        print(
            f"   {column} ({t.body.megabytes:.1f} MB), {t.server.name}: "
            f"{res.large[(t.row, column)]:.4f} s",
            flush=True,
        )


def peak_rss(
    res: Results,
    row: str,
    server: Server,
    payloads: Payloads,
    check: Callable[[httpx.Response], None],
) -> None:
    """VmHWM of the fresh server: after one small request, then after the first
    large nested-JSON request."""
    with load.client(600) as client:
        load.post(client, server.base + CE_PATH, payloads.small_nested, f"{server.name} small")
        idle = load.vm_kib(server.pid, "VmHWM")
        response = load.post(client, server.base + CE_PATH, payloads.large_nested, server.name)
        check(response)
        peak = load.vm_kib(server.pid, "VmHWM")
    res.rss_kib[row] = (idle, peak)
    print(f"   peak RSS {peak / 1024:.0f} MiB (before the large request {idle / 1024:.0f} MiB)")


def in_process(res: Results, payloads: Payloads, work: Path, opts: Options) -> None:
    print(f"== in-process decode + compute on core {load.SERVER_CORE}", flush=True)
    payloads.write(work)
    command = ["taskset", "-c", load.SERVER_CORE, sys.executable, "-m", "bench.inprocess"]
    proc = subprocess.run(
        [*command, str(work), str(opts.repeats)],
        cwd=load.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise BenchError(f"in-process measurement failed:\n{proc.stderr[-3000:]}")
    result = orjson.loads(proc.stdout.strip().splitlines()[-1])
    check_value("in-process", result["value"], reference_loss(payloads.large))
    res.large[(INPROC, NESTED)] = result["nested"]
    res.large[(INPROC, BINARY)] = result["binary"]
    res.large[(INPROC, BINARY_GRAD)] = result["binary_grad"]
    res.orjson_loads_s = result["orjson_loads"]
    print(
        f"   nested {result['nested']:.3f} s (orjson.loads alone {result['orjson_loads']:.3f} s), "
        f"binary {result['binary']:.4f} s, binary grad {result['binary_grad']:.4f} s",
        flush=True,
    )


def measure(opts: Options, work: Path, started: list[Server]) -> Results:
    res = Results(load_before=loadavg())
    print("== building payloads", flush=True)
    p = build()
    res.sizes = {b.name: b.megabytes for b in (p.large_nested, p.large_b64, p.large_v2)}
    small_ref, large_ref = reference_loss(p.small), reference_loss(p.large)
    scripts = work / "wrk"
    scripts.mkdir()
    logs = work / "logs"
    logs.mkdir()

    in_process(res, p, work, opts)

    # The naive app alone (its peak RSS from a fresh process): the baseline.
    naive = load.uvicorn_app("naive", "bench.apps.naive:app", logs, "/healthz")
    with running(naive, started) as s:
        peak_rss(res, NAIVE, s, p, naive_check(large_ref))
        small_load(res, [Target(NAIVE, s, CE_PATH, p.small_nested, naive_check(small_ref))],
                   scripts, opts)  # fmt: skip
        timed = [Target(NAIVE, s, CE_PATH, p.large_nested)]
        large_time(res, NESTED, timed, opts.naive_repeats)

    # The ratios' two sides run side by side (all on the server core, idle but
    # for the one measured), their measurements interleaved.
    bare = load.uvicorn_app("bare", "bench.apps.bare_asgi:app", logs, "/")
    floor = load.uvicorn_app("floor", "bench.apps.fastapi_floor:app", logs, "/healthz")
    with (
        running(bare, started) as b,
        running(floor, started) as f,
        running(load.service(logs), started) as s,
        running(grpc_rows.bare_server(logs), started) as g,
    ):
        peak_rss(res, V1, s, p, v1_check(large_ref))  # first: the service is fresh
        small_load(
            res,
            [
                # each ratio's two rows measured back to back in every round
                Target(FLOOR, f, CE_PATH, p.small_nested),
                Target(V1, s, CE_PATH, p.small_nested, v1_check(small_ref)),
                Target(V2_JSON, s, V2_PATH, p.small_v2_json, v2_json_check(small_ref)),
                Target(V2, s, V2_PATH, p.small_v2, v2_check(small_ref)),
                Target(BARE, b, CE_PATH, p.small_nested),
            ],
            scripts,
            opts,
        )
        shape = p.large.logits.shape
        grad_bytes = p.large.logits.nbytes
        pairs = [
            (NESTED, CE_PATH, V1, p.large_nested, v1_check(large_ref)),
            (B64, CE_PATH, V1, p.large_b64, v1_check(large_ref)),
            (BINARY, V2_PATH, V2, p.large_v2, v2_check(large_ref)),
        ]
        for column, path, row, body, check in pairs:
            targets = [Target(BARE, b, path, body), Target(row, s, path, body, check)]
            large_time(res, column, targets, opts.repeats)
        # the same tensors as an OIP JSON body (nested data), in turn with /v1's
        twins = Results()
        large_time(
            twins,
            "json pair",
            [
                Target(V1, s, CE_PATH, p.large_nested, v1_check(large_ref)),
                Target(V2_JSON, s, V2_PATH, p.large_v2_json, v2_json_check(large_ref)),
            ],
            opts.repeats,
        )
        res.large[(V2_JSON, NESTED)] = twins.large[(V2_JSON, "json pair")]
        res.v1_json_twin = twins.large[(V1, "json pair")]
        # grad=true and its request without, in turn
        grads = [
            (NESTED, NESTED_GRAD, CE_PATH, V1, p.large_nested, p.large_nested_grad,
             v1_check(large_ref), v1_check(large_ref, (shape[0], shape[1]))),
            (BINARY, BINARY_GRAD, V2_PATH, V2, p.large_v2, p.large_v2_grad,
             v2_check(large_ref), v2_check(large_ref, grad_bytes)),
        ]  # fmt: skip
        for plain_col, grad_col, path, row, plain, with_grad, check, grad_check in grads:
            # the transport alone: the bare app receiving the same body and
            # returning as many bytes as the service's grad response
            with load.client(600) as client:
                returned = len(load.post(client, s.base + path, with_grad, "grad size").content)
            echo = Body(
                f"{with_grad.name}, {returned / 1e6:.1f} MB back",
                with_grad.content,
                {**with_grad.headers, "x-response-bytes": str(returned)},
            )
            extra = Results()
            pair = [
                Target("plain", s, path, plain, check),
                Target("grad", s, path, with_grad, grad_check),
                Target("bare", b, path, echo),
            ]
            large_time(extra, "pair", pair, opts.repeats)
            res.large[(row, grad_col)] = extra.large[("grad", "pair")]
            res.large[(BARE, grad_col)] = extra.large[("bare", "pair")]
            res.grad_pairs[(row, plain_col)] = extra.large[("plain", "pair")]
        res.grpc_ms = grpc_rows.measure(s, g, opts.grpc_rounds)
        print("== where the service's time goes: py-spy (bench/small_rows.py)", flush=True)
        res.profile = small_rows.profile_service(s, load.wrk_script(p.small_nested, scripts))
    print("== LOSS_SERVICE_WORKERS=2 against 1 (bench/small_rows.py)", flush=True)
    res.scaling = small_rows.scaling(logs, started)
    print("== the Python client against curl (bench/client_rows.py)", flush=True)
    res.client = client_rows.measure(work, started, opts.repeats)
    res.load_after = loadavg()
    return res


# --------------------------------------------------------------------------- report


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(value: float) -> str:
    return f"{value:.2f} ms" if value >= 1 else f"{value:.3f} ms"


def fmt_s(value: float) -> str:
    return f"{value:.3f} s" if value >= 0.1 else f"{value:.4f} s"


def absolute_table(res: Results) -> list[str]:
    head = [
        "server",
        "small req/s (c16)",
        "small c1 p50",
        *LARGE_COLUMNS,
        "peak RSS, large nested",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in ROWS:
        cells = [row]
        cells.append(fmt_rps(res.small[row].rps) if row in res.small else "")
        cells.append(fmt_ms(res.c1[row].p50_ms) if row in res.c1 else "")
        for column in LARGE_COLUMNS:
            value = res.large.get((row, column))
            cells.append(fmt_s(value) if value is not None else "")
        rss = res.rss_kib.get(row)
        cells.append(f"{rss[1] / 1024:,.0f} MiB (idle {rss[0] / 1024:,.0f})" if rss else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float
    target: str
    ok: bool | None  # None: informative only


def round_ratio(res: Results, row: str, base: str) -> float:
    """The median over rounds of ``row``'s req/s over ``base``'s in the same
    round (measured back to back): a slow spell of the machine, which lasts
    seconds, then moves both sides of a ratio, not one."""
    pairs = zip(res.small_rounds[row], res.small_rounds[base], strict=True)
    return statistics.median(a.rps / b.rps for (a, _), (b, _) in pairs)


def cpu_per_request(res: Results, row: str) -> float:
    """The server's CPU microseconds per request at c16, the median over
    rounds. The pinned server is busy the whole round, so host contention
    moves it as it moves req/s."""
    return statistics.median(seconds / run.requests * 1e6 for run, seconds in res.small_rounds[row])


def ratios(res: Results) -> list[Ratio]:
    def large(row: str, column: str) -> float:
        return res.large[(row, column)]

    def at_least(name: str, value: float, limit: float) -> Ratio:
        return Ratio(name, value, f">= {limit:g}", value >= limit)

    def at_most(name: str, value: float, limit: float) -> Ratio:
        return Ratio(name, value, f"<= {limit:g}", value <= limit)

    return [
        at_least(
            "small req/s: service /v1 / FastAPI floor",
            round_ratio(res, V1, FLOOR),
            0.6,
        ),
        at_most(
            "small c1 p50: service /v1 / FastAPI floor",
            res.c1[V1].p50_ms / res.c1[FLOOR].p50_ms,
            1.5,
        ),
        at_most(
            "large nested JSON body: service /v2 JSON / service /v1, in turn (issue 15)",
            large(V2_JSON, NESTED) / res.v1_json_twin,
            1.2,
        ),
        at_least(
            "small req/s: service /v1 / FastAPI floor (issue 19)",
            round_ratio(res, V1, FLOOR),
            1.0,
        ),
        at_most(
            "small c1 p50: service /v1 / FastAPI floor (issue 19)",
            res.c1[V1].p50_ms / res.c1[FLOOR].p50_ms,
            1.2,
        ),
        at_least(
            "small req/s: service /v2 JSON / service /v1 (issues 15, 19)",
            round_ratio(res, V2_JSON, V1),
            0.9,
        ),
        Ratio(
            "small c1 p50: service /v2 JSON / service /v1",
            res.c1[V2_JSON].p50_ms / res.c1[V1].p50_ms,
            "",
            None,
        ),
        at_most(
            "large: service /v2 binary / bare app receiving the same bytes",
            large(V2, BINARY) / large(BARE, BINARY),
            1.5,
        ),
        at_most(
            "large: service /v1 b64 / bare app receiving the same b64 JSON body",
            large(V1, B64) / large(BARE, B64),
            2.5,
        ),
        at_most(
            "large: service /v1 nested JSON / bare app receiving the same JSON body",
            large(V1, NESTED) / large(BARE, NESTED),
            2.5,
        ),
        at_most(
            "large grad=true / without: service /v1 nested JSON (grad returned nested)",
            large(V1, NESTED_GRAD) / res.grad_pairs[(V1, NESTED)],
            1.5,
        ),
        at_most(
            "large grad=true / without: service /v2 binary (grad returned binary)",
            large(V2, BINARY_GRAD) / res.grad_pairs[(V2, BINARY)],
            1.5,
        ),
        at_most(
            "peak RSS during the large nested-JSON request: service / naive",
            res.rss_kib[V1][1] / res.rss_kib[NAIVE][1],
            0.5,
        ),
    ]


def speedups(res: Results) -> list[Ratio]:
    return [
        Ratio(
            "large nested, grad: service / bare app receiving the body and returning as many "
            "bytes as the service's response",
            res.large[(V1, NESTED_GRAD)] / res.large[(BARE, NESTED_GRAD)],
            "",
            None,
        ),
        Ratio(
            "large binary, grad: service / bare app receiving the body and returning as many "
            "bytes as the service's response",
            res.large[(V2, BINARY_GRAD)] / res.large[(BARE, BINARY_GRAD)],
            "",
            None,
        ),
        Ratio(
            "small req/s: service /v1 / naive (issue: >= 2.5 follows from the floor ratio)",
            res.small[V1].rps / res.small[NAIVE].rps,
            "",
            None,
        ),
        Ratio(
            "small c1 p50: naive / service /v1", res.c1[NAIVE].p50_ms / res.c1[V1].p50_ms, "", None
        ),
        Ratio(
            f"small, server CPU per request at c16: service /v1 / FastAPI floor "
            f"({cpu_per_request(res, V1):.0f} / {cpu_per_request(res, FLOOR):.0f} us)",
            cpu_per_request(res, V1) / cpu_per_request(res, FLOOR),
            "",
            None,
        ),
        Ratio(
            f"small, server CPU per request at c16: service /v2 JSON / service /v1 "
            f"({cpu_per_request(res, V2_JSON):.0f} / {cpu_per_request(res, V1):.0f} us)",
            cpu_per_request(res, V2_JSON) / cpu_per_request(res, V1),
            "",
            None,
        ),
        Ratio(
            "large nested JSON: naive / service /v1 (issue: about 8)",
            res.large[(NAIVE, NESTED)] / res.large[(V1, NESTED)],
            "",
            None,
        ),
        Ratio(
            "large: naive nested JSON / service /v2 binary",
            res.large[(NAIVE, NESTED)] / res.large[(V2, BINARY)],
            "",
            None,
        ),
        Ratio(
            "large nested JSON: in-process orjson + torch.tensor / service /v1",
            res.large[(INPROC, NESTED)] / res.large[(V1, NESTED)],
            "",
            None,
        ),
        Ratio(
            "peak RSS, large nested JSON: naive / service",
            res.rss_kib[NAIVE][1] / res.rss_kib[V1][1],
            "",
            None,
        ),
    ]


def ratio_table(items: list[Ratio], targets: bool) -> list[str]:
    if targets:
        lines = ["| ratio | measured | target | result |", "|---|---:|---:|---|"]
    else:
        lines = ["| ratio | measured |", "|---|---:|"]
    for r in items:
        if targets:
            verdict = "" if r.ok is None else "PASS" if r.ok else "FAIL"
            lines.append(f"| {r.name} | {r.value:.2f} | {r.target} | {verdict} |")
        else:
            lines.append(f"| {r.name} | {r.value:.1f}x |")
    return lines


def report(res: Results, opts: Options, started_at: datetime) -> str:
    import torch  # only for its version, after every measurement

    wrk_version = command_output("wrk", "-v").splitlines()[0].split(" Copyright")[0]
    checks = ratios(res)
    passed = sum(bool(r.ok) for r in checks)
    targeted = sum(r.ok is not None for r in checks)
    sizes = ", ".join(f"{name} {mb:.1f} MB" for name, mb in res.sizes.items())
    lines = [
        f"# loss-service benchmark, {started_at:%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"- commit: {git_commit()}",
        f"- machine: {platform.node()}, {cpu_model()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()} {platform.machine()}; "
        f"load average {res.load_before} before, {res.load_after} after",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, {wrk_version}",
        f"- method: every server pinned to core {load.SERVER_CORE} (`taskset`), uvicorn, one "
        "worker (the service through `loss-service serve` as shipped, LOSS_SERVICE_DEVICE=cpu; "
        "the comparison apps without access log); wrk and this driver on core 1. "
        "The bare app, the floor and the service run side by side and are measured in "
        "turn (wrk rounds, then large requests alternating bare/service), so that a slow "
        "spell of the shared machine falls on both sides of a ratio; the naive app runs alone. "
        f"Small = cross_entropy input [8,10] f32 + target [8]: wrk -t1 -c{opts.connections} "
        f"for {opts.duration:g} s (req/s), wrk -t1 -c1 for {opts.c1_duration:g} s (p50), "
        f"each in {opts.rounds} rounds; a row's req/s and p50 are the medians of its "
        "rounds, and a req/s ratio is the median of the rounds' ratios (its two rows run "
        "back to back in each round). "
        f"Large = input [4096,1000] f32 + target [4096] ({sizes}): median end-to-end "
        f"seconds of {opts.repeats} sequential requests per server after one warm-up "
        "(sent with service.transfer, the client's connection code, not httpx) "
        f"({opts.naive_repeats} for the naive app); grad=true is timed in turn with the same "
        "request without it, and its ratio uses that twin. "
        "v2 asks for binary output. Peak RSS = "
        "VmHWM of a fresh server after its first large nested-JSON request. In-process: "
        "median of repeated calls in one process on core 0 (nested = orjson.loads + "
        "torch.tensor + F.cross_entropy; orjson.loads alone "
        f"{fmt_s(res.orjson_loads_s)}; binary = torch.frombuffer + F.cross_entropy).",
        "",
        "## Absolute figures",
        "",
        *absolute_table(res),
        "",
        f"## Ratios of issue 5 ({passed} of {targeted} pass)",
        "",
        *ratio_table(checks, targets=True),
        "",
        "## Context: the service vs the transport alone and vs the naive baseline",
        "",
        *ratio_table(speedups(res), targets=False),
        "",
        *([*client_rows.report_lines(res.client, opts.repeats), ""] if res.client else []),
        "## gRPC and the JSON routes at c1 (issue 15)",
        "",
        f"The service's gRPC port against a bare grpc.aio servicer returning a constant "
        f"(its own process, also on core {load.SERVER_CORE}), and the same small request "
        "over /v1 and /v2 JSON; unmodified tritonclient.grpc (httpx for JSON), one call at a "
        f"time: median of {opts.grpc_rounds} rounds of {grpc_rows.SMALL_CALLS} small calls "
        f"({grpc_rows.LARGE_CALLS} large) per side, the sides in turn.",
        "",
        *grpc_rows.report(res.grpc_ms),
        "",
        *small_rows.report(res.profile, res.scaling),
        "Timings on a shared machine are noisy: compare ratios within one run, not "
        "absolute figures across runs.",
        "",
    ]
    return "\n".join(lines)


def write(text: str, started_at: datetime) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / f"{started_at:%Y%m%dT%H%M%SZ}.md", RESULTS / "latest.md"]
    for path in paths:
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=24, help="wrk seconds at c16 (24)")
    parser.add_argument("--c1-duration", type=float, default=12, help="wrk seconds at c1 (12)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument("--repeats", type=int, default=5, help="large requests timed (5)")
    parser.add_argument("--naive-repeats", type=int, default=3, help="for the naive app (3)")
    parser.add_argument(
        "--rounds", type=int, default=12, help="wrk rounds per server, taken in turn (12)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave bench/results/ alone"
    )
    parser.add_argument(
        "--client-only",
        action="store_true",
        help="only the Python client's rows against curl (bench/client_rows.py)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --duration 2 --c1-duration 1 --repeats 1 --naive-repeats 1 --rounds 1",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.c1_duration, args.repeats, args.naive_repeats = 2, 1, 1, 1
        args.rounds = 1
    grpc_rounds = 1 if args.quick else grpc_rows.ROUNDS
    return Options(
        args.duration,
        args.c1_duration,
        args.connections,
        args.repeats,
        args.naive_repeats,
        args.rounds,
        not args.no_write,
        args.client_only,
        grpc_rounds,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.client_only:
        return client_rows.main(
            ["--repeats", str(opts.repeats)] + ([] if opts.write else ["--no-write"])
        )
    exit_on_signals()
    started_at = datetime.now(UTC)
    begin = time.monotonic()
    started: list[Server] = []
    try:
        with tempfile.TemporaryDirectory(prefix="loss-bench-") as tmp:
            res = measure(opts, Path(tmp), started)
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in started:  # also on Ctrl-C and SIGTERM
            server.stop()
    text = report(res, opts, started_at)
    print("\n" + text)
    if opts.write:
        for path in write(text, started_at):
            print(f"wrote {path.relative_to(load.ROOT)}")
    print(f"(benchmark took {time.monotonic() - begin:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
