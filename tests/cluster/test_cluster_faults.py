"""The cluster's own faults under steady traffic: the GCS killed and restarted (fault tolerance on a real,
TLS-only Redis, as the generated RayService runs it), a router replica killed, the HTTP proxy killed.

One private cluster serves all three (head with fixed GCS port, GCS tables in Redis; the embedded default's
Z-Image on tiny weights, two router replicas). Clients send requests one after another, each with its own
seed; every request is logged with what came back. Nothing waits for a fixed time: each step waits until the
traffic log shows what it waits for (answers after the fault, the app back to RUNNING), with deadlines far
beyond what a loaded two-core machine needs, so a deadline is a failure and never a race. docs/reliability.md
gives the figures these runs measured.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster.configs import EdgeTimeouts
from serve_app.runner import free_port
from tests.cluster.edge_support import running_edge_for
from tests.cluster.redis_support import PASSWORD, running_redis

pytestmark = pytest.mark.integration

APP = "imageserve"
DEADLINE_S = 180


@dataclass
class Answer:
    sent: float
    seed: int
    status: int | str  # the HTTP status, or the client error's name when no answer came
    seeds: list[int] = field(default_factory=list)
    seconds: float = 0.0
    retry_after: str | None = None


class Traffic:
    """``clients`` threads, each sending generation requests one after another, logging every outcome."""

    def __init__(self, url: str, clients: int = 2) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._seeds = iter(range(1_000_000))
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _client(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                with self._changed:
                    seed = next(self._seeds)
                started = time.monotonic()
                answer = Answer(started, seed, "none")
                try:
                    response = client.post("/v1/images/generations", json={
                        "prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1, "seed": seed})
                    answer.status = response.status_code
                    answer.retry_after = response.headers.get("retry-after")
                    if response.status_code == 200:
                        answer.seeds = response.json()["seeds"]
                    else:
                        time.sleep(0.2)  # an edge's 503 comes at once too
                except httpx.HTTPError as err:
                    answer.status = type(err).__name__
                    time.sleep(0.2)  # a refused connection returns at once: do not spin
                answer.seconds = time.monotonic() - started
                with self._changed:
                    self.answers.append(answer)
                    self._changed.notify_all()

    def ok_since(self, moment: float) -> list[Answer]:
        return [a for a in self.answers if a.sent >= moment and a.status == 200]

    def wait_for_ok(self, count: int, since: float, deadline_s: float = DEADLINE_S) -> float:
        """Wait until ``count`` requests sent after ``since`` were answered 200; returns when the first was."""
        deadline = time.monotonic() + deadline_s
        with self._changed:
            while len(self.ok_since(since)) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"fewer than {count} answers after the fault in {deadline_s}s: {self.summary()}"
                self._changed.wait(min(left, 5))
            return self.ok_since(since)[0].sent + self.ok_since(since)[0].seconds

    def summary(self, since: float = 0.0) -> Counter:
        return Counter(a.status for a in self.answers if a.sent >= since)


def wait_until(check, what: str, deadline_s: float = DEADLINE_S) -> float:
    """Poll ``check`` until it is true; returns the seconds it took."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < deadline_s:
        try:
            if check():
                return time.monotonic() - started
        except Exception as err:  # noqa: BLE001 - the GCS or a replica may not answer yet: ask again
            last = err
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {deadline_s}s (last error: {last!r})")


def running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications[APP]
    return app.deployments[deployment].replica_states.get("RUNNING", 0) if app.status == "RUNNING" else 0


@pytest.fixture(scope="module")
def fault_tolerant_service(tiny_root, tmp_path_factory):
    """A head whose GCS keeps its tables in a TLS Redis, serving the embedded default's Z-Image."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data
    from serve_app.runner import deploy, wait_until_ready, worker_env

    tmpdir = tempfile.mkdtemp(prefix="isv-ft-", dir="/tmp")
    os.makedirs(os.path.join(tmpdir, "ray"), exist_ok=True)
    with running_redis(tmp_path_factory.mktemp("redis")) as redis, pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", tmpdir)
        env.setenv("RAY_REDIS_ADDRESS", f"rediss://127.0.0.1:{redis.port}")
        env.setenv("RAY_REDIS_CA_CERT", str(redis.ca_cert))
        # A restarted GCS must come back where the raylets and workers look for it.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "redis_password": PASSWORD, "gcs_server_port": free_port()})
        try:
            ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": worker_env()})
            data = embedded_config_data(Path(tiny_root), router_replicas=2, batch={
                "state_dir": str(tmp_path_factory.mktemp("batch-state")), "poll_interval_s": 0.2})
            data["models"] = {"z-image-turbo": data["models"]["z-image-turbo"]}
            data["loras"] = {}
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            deploy(parse_config(data, "fault tolerance"), route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(f"{url}/readyz")
            yield cluster, url
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
                shutil.rmtree(tmpdir, ignore_errors=True)


def assert_each_request_answered_once(traffic: Traffic) -> None:
    """No request lost silently (every one logged an outcome) and none answered twice (each 200 carries its
    own seed, and each seed appears once)."""
    seeds = [a.seed for a in traffic.answers]
    assert len(seeds) == len(set(seeds))
    for answer in traffic.answers:
        assert answer.status != "none"
        if answer.status == 200:
            assert answer.seeds == [answer.seed]


def test_serve_answers_through_a_gcs_outage_and_the_gcs_comes_back_with_the_app(fault_tolerant_service):
    cluster, url = fault_tolerant_service
    from ray import serve

    with Traffic(url) as traffic:
        traffic.wait_for_ok(5, since=0)
        killed = time.monotonic()
        cluster.head_node.kill_gcs_server()
        traffic.wait_for_ok(20, since=killed)  # served while no GCS runs
        outage_ok = len(traffic.ok_since(killed))
        restarted = time.monotonic()
        cluster.head_node.start_gcs_server()
        recovery_s = wait_until(lambda: running_replicas("gen-z-image-turbo") == 1 and running_replicas("router") == 2,
                                "the application RUNNING again, as the restarted GCS reads it")
        traffic.wait_for_ok(5, since=time.monotonic())
    statuses = traffic.summary()
    print(f"GCS outage {restarted - killed:.1f}s: {outage_ok} answered during it; status back in {recovery_s:.1f}s "
          f"after the restart; all answers: {dict(statuses)}")
    assert set(statuses) == {200}, statuses  # nothing on a request's path needs the GCS
    assert_each_request_answered_once(traffic)
    assert serve.status().applications[APP].status == "RUNNING"


def test_a_batch_runs_on_through_a_gcs_outage_and_answers_each_line_once(fault_tolerant_service):
    """Batch state lives outside Ray: the two router replicas go on running lines while no GCS runs, and the batch
    completes after the GCS restarts with every line in the output once."""
    import io
    import json

    import httpx

    cluster, url = fault_tolerant_service
    lines = 30
    text = "".join(json.dumps({"custom_id": f"gcs-{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": {"prompt": f"item {i}", "size": "128x128", "num_inference_steps": 4}}) + "\n"
                   for i in range(lines))
    with httpx.Client(base_url=url, timeout=120) as client:
        file = client.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(text.encode()))},
                           data={"purpose": "batch"}).json()
        batch_id = client.post("/v1/batches", json={"input_file_id": file["id"], "completion_window": "24h",
                                                    "endpoint": "/v1/images/generations"}).json()["id"]

        def completed() -> int:
            return client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"]

        wait_until(lambda: completed() >= 3, "a few lines answered")
        cluster.head_node.kill_gcs_server()
        during = completed()
        wait_until(lambda: completed() >= during + 3, "lines answered while no GCS runs")
        cluster.head_node.start_gcs_server()
        wait_until(lambda: client.get(f"/v1/batches/{batch_id}").json()["status"] == "completed", "the batch done")
        batch = client.get(f"/v1/batches/{batch_id}").json()
        assert batch["request_counts"] == {"total": lines, "completed": lines, "failed": 0}
        out = client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in out) == sorted(f"gcs-{i}" for i in range(lines))
    wait_until(lambda: running_replicas("gen-z-image-turbo") == 1 and running_replicas("router") == 2,
               "the application RUNNING again, as the restarted GCS reads it")


def router_replica_names() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#router#"))


def test_a_killed_router_replica_costs_at_most_the_requests_it_held(fault_tolerant_service):
    import ray

    _, url = fault_tolerant_service
    before = router_replica_names()
    assert len(before) == 2
    with Traffic(url, clients=4) as traffic:
        traffic.wait_for_ok(8, since=0)
        killed = time.monotonic()
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        first_ok = traffic.wait_for_ok(10, since=killed)
        replaced_s = wait_until(lambda: len(router_replica_names()) == 2 and router_replica_names() != before
                                and running_replicas("router") == 2, "a new router replica")
    failed = {status: n for status, n in traffic.summary(since=killed - 60).items() if status != 200}
    print(f"router replica killed: first answer after it {first_ok - killed:.2f}s, replaced in {replaced_s:.1f}s, "
          f"failures {failed}")
    assert sum(failed.values()) <= 4  # at most the four clients' requests in flight on the killed replica
    assert all(isinstance(status, int) and status >= 500 for status in failed)  # a complete answer, a 5xx
    assert_each_request_answered_once(traffic)


def test_a_killed_http_proxy_costs_clients_of_the_edge_503s_until_serve_restarts_it(fault_tolerant_service):
    """Traffic through the generated edge (cluster/configs.py, real HAProxy). Serve restarts a killed proxy; the
    new one answers 404 to every path until its route table arrives (ray 2.60 proxy_router.py ready_for_traffic),
    which clients of the proxy itself saw (one run: 113 answers 404 and 258 refused connections). The edge checks
    /-/healthz, keeps requests off a proxy that is not ready, and answers 503 with Retry-After meanwhile."""
    import ray

    _, url = fault_tolerant_service
    (proxy,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_PROXY_ACTOR")]
    with running_edge_for(url.removeprefix("http://"), EdgeTimeouts()) as edge_port, \
            Traffic(f"http://127.0.0.1:{edge_port}") as traffic:
        traffic.wait_for_ok(5, since=0)
        killed = time.monotonic()
        ray.kill(ray.get_actor(proxy, namespace="serve"), no_restart=True)
        back = traffic.wait_for_ok(5, since=killed)
    during = [a for a in traffic.answers if a.sent >= killed and a.status != 200]
    print(f"HTTP proxy killed: answers through the edge again after {back - killed:.1f}s; "
          f"meanwhile {dict(Counter(a.status for a in during))}")
    # Every request sent while no proxy was ready got a complete answer from the edge: 503 with Retry-After.
    assert during and all(a.status == 503 and a.retry_after == "2" for a in during), Counter(a.status for a in during)
    assert_each_request_answered_once(traffic)
