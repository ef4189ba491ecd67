"""Sustained load on the service as shipped (issue 6, ``scripts/load-test``).

The service (``loss-service serve``, one uvicorn worker, so its pid is the serving
process) runs pinned to core 0 on a free loopback port; wrk, one thread and a fixed
number of connections, runs on core 1 (this process's core) for ``--duration``
seconds with a Lua script that rotates through a mix of request kinds and counts
every non-2xx response (and every batch item that failed). This process samples
the server's VmRSS once a second. Passes when there was no error and the mean RSS
of the last minute is less than 10% above the mean RSS of the first minute.

Writes a markdown summary to stdout and to bench/results/load-test-latest.md.
Exit status: 0 pass, 1 a check failed, 2 the server did not start or the run broke.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.load import (
    ROOT,
    BenchError,
    Server,
    client,
    cpu_model,
    exit_on_signals,
    git_commit,
    service,
    vm_kib,
)
from bench.payloads import Body, Tensors, b64, nested, tensors, v2_binary

RESULTS = ROOT / "bench" / "results" / "load-test-latest.md"
MIN_DURATION_S = 130  # a first and a last minute that do not overlap, with room between
WINDOW_S = 60.0
MAX_GROWTH = 0.10
PIDFILE_ENV = "LOAD_TEST_PIDFILE"  # scripts/load-test kills this pid's group on exit


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Kind:
    """One request kind of the mix: a route and a body."""

    name: str
    path: str
    body: Body

    @property
    def route(self) -> str:
        """The route label the server's metrics count this kind under."""
        if self.path.startswith("/v1/losses/"):
            return "/v1/losses/{name}"
        if self.path.startswith("/v2/models/") and self.path.endswith("/infer"):
            return "/v2/models/{name}/infer"
        return self.path


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


def mix() -> list[Kind]:
    """The request kinds wrk cycles through, one after the other."""
    small = tensors("small")  # [8, 10] float32 logits, [8] int64 classes
    rng = np.random.default_rng(6)
    medium = Tensors(
        rng.standard_normal((256, 100), dtype=np.float32),
        rng.integers(0, 100, 256, dtype=np.int64),
    )
    other = rng.standard_normal((8, 10), dtype=np.float32)
    log_probs = np.log(_softmax(small.logits))
    probs = _softmax(other)

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    mse = {"input": small.logits, "target": other}
    kl = {"input": log_probs, "target": probs, "reduction": "batchmean"}
    ce = {"input": small.logits, "target": small.target}
    v2_json = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(small.logits.shape),
                "data": small.logits.ravel(),
            },
            {
                "name": "target",
                "datatype": "INT64",
                "shape": list(small.target.shape),
                "data": small.target,
            },
        ]
    }
    batch = {
        "items": [
            {"loss": "cross_entropy", **ce},
            {"loss": "mse_loss", **mse},
            {"loss": "kl_div", **kl},
        ]
    }
    v2_bin = v2_binary(small)
    return [
        Kind(
            "v1 cross_entropy [8,10] nested", "/v1/losses/cross_entropy", Body("ce", nested(small))
        ),
        Kind(
            "v1 cross_entropy [8,10] nested, grad",
            "/v1/losses/cross_entropy",
            Body("ce grad", nested(small, grad=True)),
        ),
        Kind(
            "v1 cross_entropy [256,100] b64", "/v1/losses/cross_entropy", Body("b64", b64(medium))
        ),
        Kind("v1 mse_loss [8,10]", "/v1/losses/mse_loss", Body("mse", dumps(mse))),
        Kind("v1 kl_div [8,10] batchmean", "/v1/losses/kl_div", Body("kl", dumps(kl))),
        Kind("v1 batch, 3 items", "/v1/batch", Body("batch", dumps(batch))),
        Kind("v2 infer JSON [8,10]", "/v2/models/cross_entropy/infer", Body("v2", dumps(v2_json))),
        Kind("v2 infer binary [8,10]", "/v2/models/cross_entropy/infer", v2_bin),
    ]


def check_response(kind: Kind, response: httpx.Response) -> None:
    """The preflight check of one kind: 200 and a finite loss in the body it should have."""
    if response.status_code != 200:
        raise BenchError(f"{kind.name}: HTTP {response.status_code}: {response.text[:500]}")
    if kind.path == "/v2/models/cross_entropy/infer":
        if kind.body.headers.get("content-type") == "application/octet-stream":
            return  # binary output: status and header checked, the bytes are the tests' job
        outputs = response.json()["outputs"]
        values = [o["data"] for o in outputs if o["name"] == "loss"]
        if not values or not all(np.isfinite(values[0])):
            raise BenchError(f"{kind.name}: no finite output: {response.text[:500]}")
        return
    data = response.json()
    results = data["results"] if kind.path == "/v1/batch" else [data]
    for result in results:
        if "error" in result or not np.isfinite(result["value"]):
            raise BenchError(f"{kind.name}: bad result: {response.text[:500]}")
    if b'"error"' in response.content:  # what the wrk script counts as a failed item
        raise BenchError(f"{kind.name}: the body has an error key: {response.text[:500]}")


# --------------------------------------------------------------------------- wrk

LUA = """\
-- Rotates through the request kinds; counts non-2xx responses and bodies with an
-- "error" key (a failed /v1/batch item) as errors.
local kinds = {kinds}
local requests = {{}}
local i = 0
bad_status = 0
bad_body = 0
statuses = ""
local seen = {{}}

function init(args)
  for k, kind in ipairs(kinds) do
    local f = assert(io.open(kind.file, "rb"))
    local body = f:read("*a")
    f:close()
    requests[k] = wrk.format("POST", kind.path, kind.headers, body)
  end
end

function request()
  i = i % #requests + 1
  return requests[i]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    bad_status = bad_status + 1
    if not seen[status] then
      seen[status] = true
      statuses = statuses .. status .. " "
    end
  elseif body and string.find(body, '"error"', 1, true) then
    bad_body = bad_body + 1
  end
end

local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local bs, bb, st = 0, 0, ""
  for _, t in ipairs(threads) do
    bs = bs + t:get("bad_status")
    bb = bb + t:get("bad_body")
    st = st .. t:get("statuses")
  end
  local e = summary.errors
  io.write(string.format(
    'LOADTEST {{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d, "bad_status": %d, "bad_body": %d, '
    .. '"statuses": "%s", "p50_us": %f, "p90_us": %f, "p99_us": %f, "max_us": %f, '
    .. '"mean_us": %f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, bs, bb, st, latency:percentile(50.0), latency:percentile(90.0),
    latency:percentile(99.0), latency.max, latency.mean))
end
"""


def _lua(value: Any) -> str:
    """A Lua literal for strings, numbers, lists and string-keyed dicts."""
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid Lua string literal here
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def wrk_script(kinds: list[Kind], directory: Path) -> Path:
    entries = []
    for index, kind in enumerate(kinds):
        data = directory / f"body{index}.bin"
        data.write_bytes(kind.body.content)
        entries.append({"file": str(data), "path": kind.path, "headers": kind.body.headers})
    script = directory / "load.lua"
    script.write_text(LUA.format(kinds=_lua(entries)))
    return script


# --------------------------------------------------------------------------- run


@dataclass
class Result:
    duration_s: float
    connections: int
    wrk: dict[str, Any]
    rss_ready_kib: int
    rss_preflight_kib: int
    samples: list[tuple[float, int]]  # (seconds since the load started, VmRSS KiB)
    hwm_kib: int
    metrics: dict[tuple[str, str], float]  # loss_service_requests_total by (route, status)
    log_lines: int

    @property
    def errors(self) -> int:
        w = self.wrk
        keys = ("connect", "read", "write", "timeout", "bad_status", "bad_body")
        return sum(int(w[k]) for k in keys)

    @property
    def rps(self) -> float:
        return float(self.wrk["requests"]) / (float(self.wrk["duration_us"]) / 1e6)

    def metrics_sum(self, routes: set[str] | None = None, status: str | None = None) -> float:
        return sum(
            v
            for (route, st), v in self.metrics.items()
            if (routes is None or route in routes) and (status is None or st == status)
        )

    def window(self, first: bool) -> list[int]:
        end = self.samples[-1][0]
        if first:
            return [rss for t, rss in self.samples if t < WINDOW_S]
        return [rss for t, rss in self.samples if t > end - WINDOW_S]

    @property
    def first_mean(self) -> float:
        return statistics.fmean(self.window(first=True))

    @property
    def last_mean(self) -> float:
        return statistics.fmean(self.window(first=False))

    @property
    def growth(self) -> float:
        return (self.last_mean - self.first_mean) / self.first_mean

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.growth < MAX_GROWTH


def scrape_metrics(base: str) -> dict[tuple[str, str], float]:
    """loss_service_requests_total by (route, status)."""
    with client(10) as c:
        response = c.get(base + "/metrics")
    if response.status_code != 200:
        raise BenchError(f"/metrics: HTTP {response.status_code}: {response.text[:500]}")
    counts: dict[tuple[str, str], float] = {}
    pattern = re.compile(r"^loss_service_requests_total\{(.*)\}\s+(\S+)$")
    for line in response.text.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        key = (labels.get("route", "?"), labels.get("status", "?"))
        counts[key] = counts.get(key, 0.0) + float(match.group(2))
    if not counts:
        raise BenchError("/metrics has no loss_service_requests_total series")
    return counts


def preflight(server: Server, kinds: list[Kind]) -> None:
    """Each kind once, checked, before the load (so a broken kind fails loudly)."""
    with client(30) as c:
        for kind in kinds:
            response = c.post(
                server.base + kind.path, content=kind.body.content, headers=kind.body.headers
            )
            check_response(kind, response)


def run_load(server: Server, kinds: list[Kind], opts: argparse.Namespace, tmp: Path) -> Result:
    rss_ready = vm_kib(server.pid, "VmRSS")
    preflight(server, kinds)
    rss_preflight = vm_kib(server.pid, "VmRSS")
    script = wrk_script(kinds, tmp)
    command = [
        "wrk",
        "-t1",
        f"-c{opts.connections}",
        f"-d{opts.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        server.base,
    ]
    print(
        f"== load: {len(kinds)} request kinds, {opts.connections} connections, "
        f"{opts.duration} s (server pid {server.pid}, core 0; wrk on core 1)",
        flush=True,
    )
    wrk_out = tmp / "wrk.out"
    samples: list[tuple[float, int]] = []
    with wrk_out.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            start = time.monotonic()
            tick = 0
            while proc.poll() is None:
                server.check_alive()
                t = time.monotonic() - start
                if t <= opts.duration:
                    samples.append((t, vm_kib(server.pid, "VmRSS")))
                if tick % 30 == 0 and tick:
                    print(f"   {t:5.0f} s  VmRSS {samples[-1][1] / 1024:7.1f} MiB", flush=True)
                tick += 1
                delay = start + tick - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=delay)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = wrk_out.read_text(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("LOADTEST ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (status {proc.returncode}):\n{text}")
    server.check_alive()
    stats = json.loads(line.removeprefix("LOADTEST "))
    if stats["requests"] == 0:
        raise BenchError("wrk completed no request")
    time.sleep(1.0)  # let requests wrk abandoned at its deadline finish on the server
    metrics = scrape_metrics(server.base)
    hwm = vm_kib(server.pid, "VmHWM")
    with server.log.open("rb") as log:
        log_lines = sum(1 for _ in log)
    return Result(
        duration_s=opts.duration,
        connections=opts.connections,
        wrk=stats,
        rss_ready_kib=rss_ready,
        rss_preflight_kib=rss_preflight,
        samples=samples,
        hwm_kib=hwm,
        metrics=metrics,
        log_lines=log_lines,
    )


# --------------------------------------------------------------------------- report


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def report(res: Result, kinds: list[Kind], started_at: datetime) -> str:
    w = res.wrk
    ok_errors = res.errors == 0
    ok_growth = res.growth < MAX_GROWTH
    verdict = "PASS" if res.passed else "FAIL"
    preflight_n = len(kinds)
    routes = {k.route for k in kinds}
    load_total = res.metrics_sum(routes)
    load_non200 = load_total - res.metrics_sum(routes, "200")
    diff = load_total - w["requests"] - preflight_n
    lines = [
        f"# scripts/load-test: {verdict}",
        "",
        f"{started_at:%Y-%m-%d %H:%M:%S} UTC, commit {git_commit()}, "
        f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}.",
        "",
        f"`loss-service serve` as shipped (`LOSS_SERVICE_DEVICE=cpu`, one uvicorn worker, "
        f"request log on, to a file) pinned to core 0 on 127.0.0.1; `wrk -t1 "
        f"-c{res.connections} -d{res.duration_s}s` on core 1, rotating through "
        f"{len(kinds)} request kinds; VmRSS of the server sampled every second. "
        "The machine may be shared: absolute throughput is indicative only.",
        "",
        "## Checks",
        "",
        "| check | value | result |",
        "|---|---|---|",
        f"| errors (socket errors, non-2xx, failed batch items) | {res.errors} | "
        f"{'PASS' if ok_errors else 'FAIL'} |",
        f"| RSS growth, last minute vs first minute | {res.growth * 100:+.2f}% (limit "
        f"{MAX_GROWTH * 100:.0f}%) | {'PASS' if ok_growth else 'FAIL'} |",
        "",
        "## Load",
        "",
        "| measure | value |",
        "|---|---|",
        f"| duration | {w['duration_us'] / 1e6:.1f} s |",
        f"| connections | {res.connections} |",
        f"| requests completed | {w['requests']} |",
        f"| throughput | {res.rps:.1f} req/s |",
        f"| latency p50 / p90 / p99 / max | {w['p50_us'] / 1e3:.2f} / {w['p90_us'] / 1e3:.2f} / "
        f"{w['p99_us'] / 1e3:.2f} / {w['max_us'] / 1e3:.2f} ms |",
        f"| latency mean | {w['mean_us'] / 1e3:.2f} ms |",
        f"| response bytes | {w['bytes'] / 1e6:.1f} MB |",
        f"| socket errors connect / read / write / timeout | {w['connect']} / {w['read']} / "
        f"{w['write']} / {w['timeout']} |",
        f"| non-2xx responses | {w['bad_status']}"
        + (f" (statuses: {w['statuses'].strip()})" if w["statuses"].strip() else "")
        + " |",
        f'| 2xx bodies with an `"error"` key (failed batch items) | {w["bad_body"]} |',
        "",
        "## Resident memory (VmRSS of the server)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| at start (ready, before any request) | {_mib(res.rss_ready_kib)} |",
        f"| after the preflight (each kind once) | {_mib(res.rss_preflight_kib)} |",
        f"| mean over the first minute of load ({len(res.window(True))} samples) | "
        f"{_mib(res.first_mean)} |",
        f"| mean over the last minute of load ({len(res.window(False))} samples) | "
        f"{_mib(res.last_mean)} |",
        f"| growth (last - first) / first | {res.growth * 100:+.2f}% |",
        f"| min / max sampled during load | {_mib(min(r for _, r in res.samples))} / "
        f"{_mib(max(r for _, r in res.samples))} |",
        f"| peak (VmHWM) | {_mib(res.hwm_kib)} |",
        "",
        "Every 10 s:",
        "",
        "| t (s) | VmRSS |",
        "|---|---|",
    ]
    next_t = 0.0
    for t, rss in res.samples:
        if t >= next_t:
            lines.append(f"| {t:.0f} | {_mib(rss)} |")
            next_t += 10.0
    lines += [
        "",
        "## Cross-check: the server's /metrics at the end",
        "",
        "| measure | value |",
        "|---|---|",
        f"| sum of `loss_service_requests_total` (every route) | {res.metrics_sum():.0f} |",
        "| by route and status | "
        + ", ".join(f"`{r}` {st}: {v:.0f}" for (r, st), v in sorted(res.metrics.items()))
        + " |",
        f"| on the load's routes | {load_total:.0f} (non-200: {load_non200:.0f}) |",
        f"| wrk completed + preflight | {w['requests']} + {preflight_n} = "
        f"{w['requests'] + preflight_n} |",
        f"| server minus client | {diff:+.0f} (expected 0 to {res.connections}) |",
        f"| request log lines (one per request, plus uvicorn's own) | {res.log_lines} |",
        "",
        "The server counts the requests that were in flight when wrk stopped at its "
        f"deadline (at most one per connection, {res.connections}); wrk does not.",
        "",
        "## Request mix (wrk sends them in turn)",
        "",
        "| kind | route | body bytes |",
        "|---|---|---|",
    ]
    lines += [f"| {k.name} | `POST {k.path}` | {len(k.body.content)} |" for k in kinds]
    lines += [
        "",
        "Each kind is sent once and its response checked (200, finite loss values, no "
        "failed batch item) before the load starts.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/load-test", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration",
        type=int,
        default=180,
        help=f"seconds of load (default 180, minimum {MIN_DURATION_S})",
    )
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS}")
    opts = parser.parse_args(argv)
    if opts.duration < MIN_DURATION_S:
        parser.error(f"--duration must be at least {MIN_DURATION_S} s (a first and a last minute)")
    if not 1 <= opts.connections <= 256:
        parser.error("--connections must be between 1 and 256")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    exit_on_signals()
    started_at = datetime.now(UTC)
    kinds = mix()
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp_name:
        tmp = Path(tmp_name)
        server = service(tmp)
        try:
            print(f"== starting the service on {server.base} (log {server.log})", flush=True)
            server.start()
            pidfile = os.environ.get(PIDFILE_ENV)
            if pidfile:
                Path(pidfile).write_text(f"{server.pid}\n")
            res = run_load(server, kinds, opts, tmp)
        except BenchError as exc:
            print(f"load-test: {exc}", file=sys.stderr)
            print(f"-- server log tail:\n{server.log_tail()}", file=sys.stderr)
            return 2
        finally:
            server.stop()  # also on Ctrl-C and SIGTERM
    text = report(res, kinds, started_at)
    print()
    print(text)
    if not opts.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"== wrote {RESULTS.relative_to(ROOT)}")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
