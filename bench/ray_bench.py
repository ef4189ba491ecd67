"""Requests per second through Ray Serve's proxy with 1 and 2 replicas, beside
the plain ``loss-service serve`` with 1 and 2 uvicorn workers, in one run.

    scripts/bench-ray [--duration 5] [--repeats 3] [--connections 8] [--no-write]

Every server gets the same settings (CPU, one torch thread per process). The
Ray rows run on a two-node cluster on this machine (deploy/ray/local_cluster.py,
2 CPUs a node), the replicas spread over both nodes, one proxy in front. Nothing
is pinned: on a 2-core machine the servers, Ray's own processes and wrk share
both cores, as a second worker or replica needs the second core. Each repeat
measures every target once (interleaved), and the tables give medians.
Writes bench/results/ray-<UTC timestamp>.md and bench/results/ray-latest.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from bench.load import BenchError, WrkResult, cpu_model, free_port, git_commit, wrk, wrk_script
from bench.payloads import Body, Tensors, b64
from deploy.ray.local_cluster import LocalRayCluster

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SETTINGS = {"device": "cpu", "torch_threads": 1, "log_level": "warning"}
SEED = Body("seed", b'{"input": [[2, 1], [1, 2]], "target": [1, 0]}')


def bodies() -> list[Body]:
    """The seed request (the per-request cost) and a 256 x 1000 cross_entropy
    in base64 (1.3 MB: decoding and compute weigh more)."""
    rng = np.random.default_rng(18)
    logits = rng.standard_normal((256, 1000), dtype=np.float32)
    target = rng.integers(0, 1000, 256, dtype=np.int64)
    return [SEED, Body("256x1000 b64", b64(Tensors(logits, target)))]


@contextmanager
def plain_service(workers: int, log: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        **{f"LOSS_SERVICE_{k.upper()}": str(v) for k, v in SETTINGS.items()},
        "LOSS_SERVICE_HOST": "127.0.0.1",
        "LOSS_SERVICE_PORT": str(port),
        "LOSS_SERVICE_WORKERS": str(workers),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "loss-service"), "serve"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise BenchError(f"server exited on start:\n{tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise BenchError(f"{url} not ready in 180 s")


def deploy_replicas(cluster: LocalRayCluster, replicas: int) -> None:
    config = cluster.serve_config()
    application = config["applications"][0]
    application["args"]["settings"].update(SETTINGS)
    deployment = application["deployments"][0]
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = replicas
    cluster.serve_run(config)
    deadline = time.monotonic() + 240
    while cluster.replica_states() != {"RUNNING": replicas}:
        if time.monotonic() > deadline:
            raise BenchError(f"{replicas} replicas not RUNNING: {cluster.serve_status()}")
        time.sleep(1)
    wait_ready(f"http://127.0.0.1:{cluster.http_port}", None, None)


def measure(
    url: str, scripts: dict[str, Path], connections: int, seconds: float
) -> dict[str, WrkResult]:
    results = {}
    path = "/v1/losses/cross_entropy"
    for name, script in scripts.items():
        try:
            wrk(url + path, script, connections, seconds, f"{name} warm-up")
        except BenchError as error:
            # a replica set just changed may still be settling; the measured run must not fail
            print(f"   warm-up: {error}", flush=True)
        results[name] = wrk(url + path, script, connections, seconds, name)
    # one connection, for the latency a single request pays
    results["seed c1"] = wrk(url + path, scripts[SEED.name], 1, seconds, "seed c1")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    scripts = {body.name: wrk_script(body, work) for body in bodies()}
    runs: dict[str, list[dict[str, WrkResult]]] = defaultdict(list)
    started = time.monotonic()
    with LocalRayCluster(nodes=2, cpus_per_node=2) as cluster:
        ray_url = f"http://127.0.0.1:{cluster.http_port}"
        for repeat in range(args.repeats):
            print(f"== repeat {repeat + 1}/{args.repeats}", flush=True)
            for workers in (1, 2):
                name = f"loss-service serve, {workers} worker{'s' * (workers > 1)}"
                with plain_service(workers, work / f"plain{workers}.log") as url:
                    runs[name].append(measure(url, scripts, args.connections, args.duration))
                print(f"   {name}: {summary(runs[name][-1])}", flush=True)
            for replicas in (1, 2):
                name = f"Ray Serve proxy, {replicas} replica{'s' * (replicas > 1)}"
                deploy_replicas(cluster, replicas)
                runs[name].append(measure(ray_url, scripts, args.connections, args.duration))
                print(f"   {name}: {summary(runs[name][-1])}", flush=True)
    report = render(runs, args, time.monotonic() - started)
    print(report)
    if not args.no_write:
        results = ROOT / "bench" / "results"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for path in (results / f"ray-{stamp}.md", results / "ray-latest.md"):
            path.write_text(report)
        print(f"wrote bench/results/ray-{stamp}.md and ray-latest.md")
    return 0


def summary(result: dict[str, WrkResult]) -> str:
    return ", ".join(f"{k} {v.rps:.0f} req/s p50 {v.p50_ms:.2f} ms" for k, v in result.items())


def render(
    runs: dict[str, list[dict[str, WrkResult]]], args: argparse.Namespace, took: float
) -> str:
    names = [b.name for b in bodies()]
    lines = [
        "# Ray Serve replicas beside uvicorn workers",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, {cpu_model()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; `scripts/bench-ray "
        f"--duration {args.duration:g} --repeats {args.repeats} --connections {args.connections}`"
        f" ({took:.0f} s). Medians of {args.repeats} interleaved repeats; wrk, "
        f"{args.connections} connections, POST /v1/losses/cross_entropy. Every process: CPU, "
        "one torch thread. Ray: two nodes on this machine (2 CPUs each), replicas spread "
        "over them, one proxy. Nothing pinned: servers, Ray and wrk share the cores.",
        "",
        "| target | "
        + " | ".join(f"{n}: req/s" for n in names)
        + " | seed, 1 connection: p50 ms |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    medians: dict[str, dict[str, float]] = {}
    for target, results in runs.items():
        rps = {n: statistics.median(r[n].rps for r in results) for n in names}
        p50 = statistics.median(r["seed c1"].p50_ms for r in results)
        medians[target] = {**rps, "p50": p50}
        cells = " | ".join(f"{rps[n]:.0f}" for n in names)
        lines.append(f"| {target} | {cells} | {p50:.2f} |")
    plain = medians.get("loss-service serve, 1 worker")
    ray = medians.get("Ray Serve proxy, 1 replica")
    if plain and ray:
        extra_ms = ray["p50"] - plain["p50"]
        per_request_ms = 1000 / ray[SEED.name] - 1000 / plain[SEED.name]
        lines += [
            "",
            f"Serve's proxy per request (seed request, 1 replica against 1 worker): "
            f"+{extra_ms:.2f} ms of latency at one connection, "
            f"+{per_request_ms:.2f} ms of machine time per request at "
            f"{args.connections} connections.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
