"""The Ray Serve deployment (deploy/ray/) on a real two-node Ray cluster.

Two ``ray start`` processes on this machine, each a node with its own CPUs
and loopback address (deploy/ray/local_cluster.py), run the committed Serve
config (deploy/ray/serve.yaml, its proxy moved to a free port, the
autoscaling bounds made small) through ``serve run``. The tests then check,
through Serve's HTTP proxy: the replicas sit on both nodes and both answer;
every answer equals torch in-process and the single-process service's; a
replica killed with SIGKILL under load loses no request that is retried, and
Serve starts a new one; load makes the autoscaler add a replica. The cluster
is torn down whatever happens (its own processes only, never ``ray stop``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
import yaml

from deploy.ray.local_cluster import ROOT, LocalRayCluster
from service.client import LossClient
from tests.cases import CASES, assert_same, decode, encode, request_body, torch_call

with warnings.catch_warnings():
    # ray.serve's own models still pass extra keywords to pydantic's Field
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray.serve.schema import ServeDeploySchema

    from deploy.ray.app import NODE_HEADER, REPLICA_HEADER, check_settings

APP = "loss-service"
SEED = {"input": [[2, 1], [1, 2]], "target": [1, 0]}
MSE = {"input": [[3, 1], [1, 0]], "target": [[1, 0], [1, 0]]}
# Bounds on what the cluster may take, on a 2-core machine shared with others.
DEPLOY_TIMEOUT = 180.0
RECOVER_TIMEOUT = 90.0
UPSCALE_TIMEOUT = 90.0

pytestmark = pytest.mark.timeout(600)


def slow_ctc() -> dict[str, Any]:
    """A CTC loss with a small body (43 kB of log_probs) and about 0.1 s of
    compute in a replica: its time is the replica's, not the client's."""
    g = torch.Generator().manual_seed(7)
    T, N, C, S = 1000, 2, 4, 400
    return {
        "log_probs": torch.randn(T, N, C, generator=g).log_softmax(2),
        "targets": torch.randint(1, C, (N, S), generator=g),
        "input_lengths": torch.tensor([T] * N),
        "target_lengths": torch.tensor([S] * N),
    }


def test_config_settings_are_checked() -> None:
    """A misspelt setting in args.settings fails the build instead of being
    ignored; settings the proxy owns are refused; good ones pass."""
    with pytest.raises(ValueError, match=r"unknown setting.*torch_thread"):
        check_settings({"torch_thread": 1})
    with pytest.raises(ValueError, match="belong to Serve's proxy"):
        check_settings({"port": 9000})
    with pytest.raises(ValueError, match="max_body_bytes"):
        check_settings({"max_body_bytes": 0})
    assert check_settings({"device": "cpu", "torch_threads": 1}) == {
        "device": "cpu",
        "torch_threads": 1,
    }


def shipped_serve_configs() -> dict[str, Any]:
    rayservice = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    return {
        "serve.yaml": yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text()),
        "serve-gpu.yaml": yaml.safe_load((ROOT / "deploy/ray/serve-gpu.yaml").read_text()),
        "rayservice.yaml serveConfigV2": yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("name", list(shipped_serve_configs()))
def test_shipped_serve_configs_are_valid(name: str) -> None:
    """Each Serve config we ship passes Serve's own schema, and its
    args.settings pass the service's, before any cluster sees them."""
    config = shipped_serve_configs()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "deploy.ray.app:build"
    check_settings(application["args"]["settings"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    # The proxy reports its requests in flight to the autoscaler every 10 s by
    # default; every second here, so that the upscale test waits for the
    # decision rather than for the report.
    fast_reports = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    with LocalRayCluster(nodes=2, cpus_per_node=2, env=fast_reports) as cluster:
        config = cluster.serve_config()
        application = config["applications"][0]
        application["args"]["settings"].update(device="cpu", log_level="warning")
        deployment = application["deployments"][0]
        deployment["autoscaling_config"].update(
            min_replicas=2,
            initial_replicas=2,
            max_replicas=3,
            target_ongoing_requests=2,
            upscale_delay_s=1,
            downscale_delay_s=600,
            look_back_period_s=2,
            metrics_interval_s=0.5,
        )
        cluster.serve_run(config)
        wait_for(
            lambda: cluster.replica_states().get("RUNNING") == 2,
            DEPLOY_TIMEOUT,
            f"2 RUNNING replicas of {APP}",
            cluster,
        )
        wait_for(lambda: proxy_ready(cluster), 60, "Serve's proxy answering", cluster)
        yield cluster


def proxy_ready(cluster: LocalRayCluster) -> bool:
    try:
        return httpx.get(f"{url(cluster)}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def url(cluster: LocalRayCluster) -> str:
    return f"http://127.0.0.1:{cluster.http_port}"


def wait_for(
    check: Any,
    timeout: float,
    what: str,
    cluster: LocalRayCluster,
    context: Any = lambda: "",
) -> float:
    """Seconds until ``check()`` held; after ``timeout`` fails with
    ``context()``, Serve's status and the tail of Serve's controller log (its
    scaling decisions) and of the nodes' logs."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            logs = "\n".join(
                cluster.log_tail(p, 1500)
                for pattern in ("node*.log", "session_*/logs/serve/controller_*.log")
                for p in sorted(cluster.dir.glob(pattern))
            )
            pytest.fail(
                f"no {what} within {timeout:.0f} s; {context()}\n"
                f"status {cluster.serve_status()}\n{logs}"
            )
        time.sleep(1)
    return time.monotonic() - start


def wait_for_replicas(cluster: LocalRayCluster, count: int, what: str) -> float:
    """Seconds until ``count`` replicas run, as Serve reports them and as
    their processes show (``wait_for``)."""
    return wait_for(
        lambda: (
            cluster.replica_states().get("RUNNING") == count
            and len(cluster.own_pids("ServeReplica:loss-service")) == count
        ),
        RECOVER_TIMEOUT,
        what,
        cluster,
    )


def spread(
    cluster: LocalRayCluster, requests: int = 40, threads: int = 2
) -> tuple[Counter[str], set[str]]:
    """Replica ids (with counts) and node ids that answered ``requests``
    concurrent seed requests."""
    replicas: Counter[str] = Counter()
    nodes: set[str] = set()
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=url(cluster), timeout=30) as client:
            for _ in range(n):
                response = client.post("/v1/losses/cross_entropy", json=SEED)
                assert response.status_code == 200, response.text
                with lock:
                    replicas[response.headers[REPLICA_HEADER.decode()]] += 1
                    nodes.add(response.headers[NODE_HEADER.decode()])

    pool = [threading.Thread(target=worker, args=(requests // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return replicas, nodes


def test_two_replicas_on_two_nodes_both_answer(cluster: LocalRayCluster) -> None:
    node_ids = set(
        cluster.driver("print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))").split()
    )
    assert len(node_ids) == 2
    replicas, nodes = spread(cluster)
    assert len(replicas) == 2, replicas
    assert min(replicas.values()) >= 4, f"one replica took almost nothing: {replicas}"
    # the two replicas sit on the two different Ray nodes
    assert nodes == node_ids


def test_answers_equal_torch_and_the_single_process_service(
    cluster: LocalRayCluster, live_server: str
) -> None:
    """Every loss of the table, with gradients, through Serve's proxy: the value
    bit for bit torch's, the whole body the single uvicorn process's."""
    seen: set[str] = set()
    with (
        httpx.Client(base_url=url(cluster), timeout=60) as ray_client,
        httpx.Client(base_url=live_server, timeout=60) as plain_client,
    ):
        for case in CASES:
            for reduction in ("mean", "none"):
                body = request_body(case, reduction, "b64", encoding="b64", grad=True)
                via_ray = ray_client.post(f"/v1/losses/{case.loss}", json=body)
                plain = plain_client.post(f"/v1/losses/{case.loss}", json=body)
                assert via_ray.status_code == plain.status_code == 200, (case.id, via_ray.text)
                assert via_ray.json() == plain.json(), case.id
                expected = torch_call(case, reduction)
                assert_same(decode(via_ray.json()["value"], expected.dtype), expected)
                seen.add(via_ray.headers[REPLICA_HEADER.decode()])
        # the Open Inference Protocol too
        v2 = {
            "inputs": [
                {"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [2, 1, 1, 2]},
                {"name": "target", "shape": [2], "datatype": "INT64", "data": [1, 0]},
            ]
        }
        via_ray = ray_client.post("/v2/models/cross_entropy/infer", json=v2)
        plain = plain_client.post("/v2/models/cross_entropy/infer", json=v2)
        assert via_ray.status_code == plain.status_code == 200, via_ray.text
        assert via_ray.json() == plain.json()
        # a client error is the service's own 422, not a proxy error
        bad = ray_client.post("/v1/losses/cross_entropy", json={**SEED, "target": [1, 5]})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["loc"][-1] == "target"
    assert len(seen) == 2, seen
    seed_value = torch.nn.functional.cross_entropy(
        torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([1, 0])
    )
    assert via_ray.json()["outputs"][0]["data"] == [seed_value.item()]


def post_retrying(
    client: httpx.Client, body: dict[str, Any], failures: list[str], attempts: int = 20
) -> httpx.Response:
    """POST mse_loss, retrying 5xx answers and broken connections (a loss is
    a pure function: a retry is always safe); each failed attempt is added
    to ``failures`` as its status and content type, or its exception."""
    for _ in range(attempts):
        try:
            response = client.post("/v1/losses/mse_loss", json=body)
        except httpx.TransportError as error:
            failures.append(type(error).__name__)
            time.sleep(0.2)
            continue
        if response.status_code < 500:
            return response
        failures.append(f"{response.status_code} {response.headers.get('content-type')}")
        time.sleep(0.2)
    raise AssertionError(f"no answer after {attempts} attempts: {failures[-attempts:]}")


# What a request in flight on a replica that dies can get: Serve's proxy
# answers a bare 500 (its server's own text/plain page: the replica never
# started a response; the service itself never answers 500), or, when the
# response had started, the connection closes; a retry can also meet a 503.
REPLICA_DEATH_FAILURES = {
    "500 text/plain; charset=utf-8",
    "503 application/problem+json",  # the service's own
    "503 text/plain",  # Serve's proxy: no replica to take it
    "503 text/plain; charset=utf-8",
    "RemoteProtocolError",
    "ReadError",
    "ConnectError",
}


def test_killed_replica_loses_no_retried_request_and_comes_back(cluster: LocalRayCluster) -> None:
    before, _ = spread(cluster, requests=20)
    replica_pids = cluster.own_pids("ServeReplica:loss-service")
    assert len(replica_pids) == 2, replica_pids
    expected = torch.nn.functional.mse_loss(
        torch.tensor(MSE["input"], dtype=torch.float32),
        torch.tensor(MSE["target"], dtype=torch.float32),
    ).item()
    results: list[tuple[int, float]] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(base_url=url(cluster), timeout=30) as client:
            while not stop.is_set():
                response = post_retrying(client, MSE, failures)
                with lock:
                    results.append((response.status_code, response.json()["value"]))

    # one request at a time: below the autoscaler's target, so that the
    # replica count only moves because of the kill
    pool = [threading.Thread(target=load)]
    for t in pool:
        t.start()
    try:
        time.sleep(2)
        victim = replica_pids[0]
        os.kill(victim, signal.SIGKILL)
        sent_at_kill = len(results)
        time.sleep(8)
    finally:
        stop.set()
        for t in pool:
            t.join(timeout=120)
    assert len(results) > sent_at_kill + 5, "requests stopped being answered after the kill"
    assert all(status == 200 and value == expected for status, value in results), Counter(results)
    assert set(failures) <= REPLICA_DEATH_FAILURES, Counter(failures)
    took = wait_for_replicas(cluster, 2, "replacement replica")
    assert victim not in cluster.own_pids("ServeReplica:loss-service")
    after, _ = spread(cluster, requests=20)
    assert len(after) == 2 and set(after) != set(before), (before, after)

    # Now a kill that finds requests in flight: four slow requests, two in each
    # replica (one computing, one waiting: max_concurrency 1), through
    # LossClient, which must resend what the dying replica never answered and
    # return torch's value.
    ctc = slow_ctc()
    expected_ctc = torch.nn.functional.ctc_loss(**ctc)
    answers: list[torch.Tensor | BaseException] = []

    def slow_call() -> None:
        try:
            with LossClient(url(cluster), max_retries=10, backoff=0.2, timeout=60) as client:
                answers.append(client.loss("ctc_loss", **ctc).value)
        except BaseException as error:  # shown by the assertion below
            answers.append(error)

    proxy_log = next(cluster.dir.glob("session_*/logs/serve/proxy_*.log"))
    failed_before = proxy_log.read_text(errors="replace").count("ctc_loss 500")
    callers = [threading.Thread(target=slow_call) for _ in range(4)]
    for t in callers:
        t.start()
    time.sleep(0.15)
    os.kill(cluster.own_pids("ServeReplica:loss-service")[0], signal.SIGKILL)
    for t in callers:
        t.join(timeout=120)
    assert len(answers) == 4 and all(
        isinstance(a, torch.Tensor) and torch.equal(a, expected_ctc) for a in answers
    ), answers
    proxy_500s = proxy_log.read_text(errors="replace").count("ctc_loss 500") - failed_before
    wait_for_replicas(cluster, 2, "replacement of the second killed replica")
    print(
        f"\nkill: {len(results)} requests answered, retried after {dict(Counter(failures))}; "
        f"replacement running {took:.1f} s after the load stopped; a second kill under 4 slow "
        f"requests: all answered by LossClient, after {proxy_500s} proxy 500s"
    )


def test_load_makes_the_autoscaler_add_a_replica(cluster: LocalRayCluster) -> None:
    assert cluster.replica_states().get("RUNNING") == 2
    # The autoscaler counts requests in flight at Serve's proxy. A request with
    # a big body spends most of its time in this process's client threads
    # (building and reading megabytes under one GIL), so on a loaded machine 6
    # such threads kept only 2 to 3 requests in flight: below the 4 that ask for
    # a third replica. A CTC loss is the opposite: a 43 kB body and about 0.1 s
    # of compute in a replica that computes one request at a time
    # (max_concurrency 1), so nearly every thread's request is in flight at
    # any moment: about 8 in flight against a target of 2 per replica.
    slow = {name: encode(t, "b64") for name, t in slow_ctc().items()} | {"grad": True}
    stop = threading.Event()
    errors: list[str] = []
    answered = [0]

    def load() -> None:
        with httpx.Client(base_url=url(cluster), timeout=60) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/losses/ctc_loss", json=slow)
                except httpx.TransportError as error:  # shown below, not lost with the thread
                    errors.append(repr(error))
                    time.sleep(0.2)
                    continue
                if response.status_code == 200:
                    answered[0] += 1
                else:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    time.sleep(0.2)

    pool = [threading.Thread(target=load) for _ in range(8)]
    for t in pool:
        t.start()
    try:
        took = wait_for(
            lambda: cluster.replica_states().get("RUNNING", 0) >= 3,
            UPSCALE_TIMEOUT,
            "third replica under load",
            cluster,
            lambda: (
                f"load: {answered[0]} answered, {len(errors)} errors {errors[:5]}; "
                f"requests in flight as the autoscaler saw them: {cluster.ongoing_requests()}"
            ),
        )
    finally:
        stop.set()
        for t in pool:
            t.join(timeout=120)
    assert not errors, errors[:5]
    # the proxy learns of the new replica shortly after the controller does
    wait_for(
        lambda: len(spread(cluster, requests=30, threads=6)[0]) == 3,
        30,
        "answers from all 3 replicas",
        cluster,
    )
    print(
        f"\nautoscaler: a third replica RUNNING {took:.1f} s after the load started "
        f"({answered[0]} requests answered meanwhile)"
    )
