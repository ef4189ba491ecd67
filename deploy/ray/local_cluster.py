"""A Ray cluster of several nodes on this one machine, for the multi-node test
and the replica benchmark: each node is its own ``ray start --block`` process
(a raylet with its own CPUs, custom resource and loopback address: the head
127.0.0.2, the others 127.0.0.3, ...), all on ports picked free, under one
temporary directory, without the dashboard, with a small object store.

Teardown never uses ``ray stop`` (it stops every Ray process on the machine,
other people's too): each ``ray start --block`` is sent SIGTERM and stops the
processes it started; then any process still carrying this cluster's marker
variable (workers and replicas inherit it) is killed, and the directory goes.

    with LocalRayCluster(nodes=2, cpus_per_node=2) as cluster:
        cluster.serve_run(config)        # a Serve config dict; HTTP on cluster.http_port
        cluster.driver("print(ray.nodes())")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARKER = "LOSS_SERVICE_RAY_CLUSTER_ID"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRayCluster:
    def __init__(
        self,
        nodes: int = 2,
        cpus_per_node: int = 2,
        object_store_bytes: int = 80 * 1024 * 1024,
        env: dict[str, str] | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_bytes = object_store_bytes
        self.start_timeout = start_timeout
        self.id = uuid.uuid4().hex[:12]
        # short: Ray's socket paths must fit in 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="lsray-", dir="/tmp"))
        self.gcs_port = free_port()
        self.http_port = free_port()
        self.head_ip = "127.0.0.2"
        self.address = f"{self.head_ip}:{self.gcs_port}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            MARKER: self.id,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "RAY_USAGE_STATS_ENABLED": "0",
            # One proxy fronts the cluster here (proxy_location HeadOnly: two
            # proxies cannot share one machine's port). Serve's proxy prefers
            # replicas on its own node; off, every replica gets requests.
            "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
            "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0",
            **(env or {}),
        }

    # ------------------------------------------------------------------ nodes

    def node_ip(self, index: int) -> str:
        return f"127.0.0.{index + 2}"

    def start(self) -> None:
        for index in range(self.nodes):
            self._start_node(index)

    def _start_node(self, index: int) -> None:
        log = self.dir / f"node{index}.log"
        args = [
            str(BIN / "ray"), "start", "--block",
            f"--node-ip-address={self.node_ip(index)}",
            f"--num-cpus={self.cpus_per_node}",
            f"--resources={json.dumps({f'node{index}': 1})}",
            f"--object-store-memory={self.object_store_bytes}",
            "--include-log-monitor=false", "--disable-usage-stats",
            # 0: workers bind ports the kernel picks, never a fixed range
            "--min-worker-port=0", "--max-worker-port=0",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--temp-dir={self.dir}",
        ]  # fmt: skip
        if index == 0:
            args += [
                "--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ]  # fmt: skip
        else:
            args += [f"--address={self.address}"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.processes.append(proc)
        deadline = time.monotonic() + self.start_timeout
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {index} did not start:\n{self.log_tail(log)}")
            time.sleep(0.2)

    def log_tail(self, path: Path, chars: int = 3000) -> str:
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def descendants(self) -> set[tuple[int, str]]:
        """Every live process below this cluster's ``ray start`` processes.
        Ray's dashboard and runtime-env agents start with an environment of
        their own (no marker), and can outlive their raylet: found this way
        while their parents still live, they are killed with the rest. Each
        comes with its start time, so that a reused pid is never killed."""
        children: dict[int, list[tuple[int, str]]] = {}
        for entry in Path("/proc").glob("[0-9]*/stat"):
            try:
                # fields after the parenthesised name: state, ppid, ..., starttime (20th)
                fields = entry.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append((int(entry.parent.name), fields[19]))
            except (OSError, IndexError, ValueError):
                continue
        found: set[tuple[int, str]] = set()
        todo = [proc.pid for proc in self.processes if proc.poll() is None]
        while todo:
            parent = todo.pop()
            for child in children.get(parent, []):
                if child not in found:
                    found.add(child)
                    todo.append(child[0])
        return found

    def stop(self) -> None:
        tree = self.descendants()
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # A node that has not stopped in 10 s (it waits for its workers) is
        # killed: its leftovers carry the marker and are killed below.
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        for pid, started in tree:
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[19] == started:
                    os.kill(pid, signal.SIGKILL)
        for _ in range(2):
            if not self.kill_strays():
                break
            time.sleep(1)
        shutil.rmtree(self.dir, ignore_errors=True)

    def own_pids(self, cmdline_contains: str = "") -> list[int]:
        """This cluster's processes (those carrying its marker variable)."""
        mark = f"{MARKER}={self.id}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # gone, or not ours to read
                continue
            if cmdline_contains in cmdline:
                pids.append(int(entry.name))
        return pids

    def kill_strays(self) -> int:
        pids = self.own_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ Serve

    def driver(self, code: str, timeout: float = 120.0) -> str:
        """Run ``code`` in a Ray driver connected to the cluster (``ray`` and
        ``serve`` imported); returns what it printed."""
        script = "import ray\nfrom ray import serve\n"
        script += f"ray.init(address={self.address!r}, namespace='serve', log_to_driver=False)\n"
        script += textwrap.dedent(code)
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=self.env, capture_output=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"driver failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
        return done.stdout.decode()

    def serve_config(self, path: Path = ROOT / "deploy/ray/serve.yaml") -> dict[str, Any]:
        """A Serve config file, its HTTP proxy moved to this cluster's port on
        loopback and onto the head node only."""
        config: dict[str, Any] = yaml.safe_load(path.read_text())
        config["proxy_location"] = "HeadOnly"
        config.setdefault("http_options", {}).update(host="127.0.0.1", port=self.http_port)
        return config

    def serve_run(self, config: dict[str, Any], timeout: float = 120.0) -> None:
        """``serve run --non-blocking`` of ``config``, as a user would."""
        path = self.dir / f"serve-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run(
            [str(BIN / "serve"), "run", "--non-blocking", "--address", self.address, str(path)],
            cwd=ROOT, env=self.env, capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"serve run failed:\n{done.stderr.decode(errors='replace')}")

    def serve_status(self) -> dict[str, Any]:
        """``serve.status()`` as a dict: application status and, per
        deployment, its status and replica states."""
        out = self.driver(
            "import dataclasses, json\n"
            "print(json.dumps(dataclasses.asdict(serve.status()), default=str))"
        )
        status: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return status

    def replica_states(self, app: str = "loss-service", deployment: str = "LossService") -> Any:
        status = self.serve_status()
        application = status["applications"].get(app) or {}
        return (application.get("deployments") or {}).get(deployment, {}).get("replica_states", {})

    def ongoing_requests(self, app: str = "loss-service", deployment: str = "LossService") -> str:
        """The requests in flight that Serve's autoscaler last computed for a
        deployment (a private controller method: for failure messages only)."""
        try:
            return self.driver(
                "from ray.serve._private.common import DeploymentID\n"
                "from ray.serve._private.constants import SERVE_CONTROLLER_NAME\n"
                "controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace='serve')\n"
                "print(ray.get(controller._get_total_num_requests_for_deployment_for_testing"
                f".remote(DeploymentID(name={deployment!r}, app_name={app!r}))))"
            ).strip()
        except Exception as error:  # a diagnostic must not hide the failure it explains
            return f"unknown ({error!r:.200})"
