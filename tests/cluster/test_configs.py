"""The committed deployables are what the generator makes from the example fleet and production config,
they mark nodes as the pools expect, and they hold the line docs/security.md draws: the Serve config whole,
an edge with header and idle timeouts in front of Serve (run here with a real HAProxy), policies that select
this RayService's pods alone and bound their egress, no service-account token but the autoscaler's, and
third-party images by digest."""

import json
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from cluster.configs import (
    EDGE_LABELS,
    RAY_POD_LABELS,
    REDIS_LABELS,
    SERVE_SERVICE,
    SERVICE_ACCOUNT_DIR,
    EdgeTimeouts,
    edge_haproxy_config,
    write_configs,
)
from serve_app.domain.config_files import load_fleet
from serve_app.domain.placement import node_labels, node_resources
from serve_app.examples import EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG
from serve_app.runner import free_port
from tests.cluster.edge_support import running_edge_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "cluster" / "deploy"


def test_committed_configs_match_the_generator(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    serve_config = tmp_path / "serve_config.yaml"
    written = write_configs(EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG, serve_config, tmp_path)
    assert written[0] == serve_config
    assert serve_config.read_text() == (ROOT / "serve_config.yaml").read_text(), (
        "serve_config.yaml is stale: run `make cluster-configs`")
    for path in written[1:]:
        assert path.read_text() == (DEPLOY / path.name).read_text(), (
            f"cluster/deploy/{path.name} is stale: run `make cluster-configs`")


def test_every_pool_has_a_node_type_with_its_markers(catalog):
    fleet = load_fleet(EXAMPLE_FLEET)
    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for pool in fleet.pools:
        gpu = catalog.gpu(pool.gpu_class)
        expected = node_resources(gpu, pool.gpus_per_node)
        node_type = launcher["available_node_types"][f"gpu-{pool.name}"]
        assert {k: v for k, v in node_type["resources"].items() if k not in ("CPU", "GPU")} == expected
        assert node_type["resources"]["GPU"] == pool.gpus_per_node
        assert node_type["labels"] == node_labels(gpu)
        assert (node_type["min_workers"], node_type["max_workers"]) == (pool.nodes, pool.max_nodes)
        group = groups[f"gpu-{pool.name}"]
        assert json.loads(group["rayStartParams"]["resources"]) == expected
        assert group["maxReplicas"] == pool.max_nodes


def test_the_serve_config_serves_the_production_config_on_the_fleets_pools():
    (application,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    config = application["args"]["config"]
    production = yaml.safe_load(EXAMPLE_PRODUCTION_CONFIG.read_text())
    assert {k: v for k, v in config.items() if k != "pools"} == production
    assert [p["name"] for p in config["pools"]] == [p.name for p in load_fleet(EXAMPLE_FLEET).pools]
    assert all("nodes" not in p and "max_nodes" not in p for p in config["pools"])


def test_rayservice_serves_the_production_config_with_gcs_fault_tolerance():
    service = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())
    serve_config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"] == serve_config["applications"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"]
    assert cluster["enableInTreeAutoscaling"] is True


def test_fault_tolerance_can_be_left_off(tmp_path):
    write_configs(EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG, tmp_path / "serve_config.yaml", tmp_path,
                  redis_address=None)
    service = yaml.safe_load((tmp_path / "kuberay-rayservice.yaml").read_text())
    assert "gcsFaultToleranceOptions" not in service["spec"]["rayClusterConfig"]


def test_every_pod_is_ready_only_when_imageserve_answers_readyz():
    service = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for spec in specs:
        (container,) = spec["containers"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}


def test_the_image_is_written_into_both_cluster_configs(tmp_path):
    from serve_app.cli import main

    image = "registry.example.com/team/imageserve:0.1.0-nunchaku"
    assert main(["cluster-configs", "--serve-config-out", str(tmp_path / "serve_config.yaml"),
                 "--manifests-out", str(tmp_path), "--image", image]) == 0
    launcher = yaml.safe_load((tmp_path / "ray-cluster.yaml").read_text())
    assert launcher["docker"]["image"] == image and "setup_commands" not in launcher
    cluster = yaml.safe_load((tmp_path / "kuberay-rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    assert {container["image"] for spec in specs for container in spec["containers"]} == {image}


def test_every_pod_mounts_the_api_keys_secret_where_the_production_config_reads_it():
    production = yaml.safe_load(EXAMPLE_PRODUCTION_CONFIG.read_text())
    keys_file = Path(production["serving"]["api_keys_file"])
    cluster = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for spec in specs:
        (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
        assert volume["secret"] == {"secretName": "imageserve-api-keys",
                                    "items": [{"key": "api-keys", "path": keys_file.name}]}
        (container,) = spec["containers"]
        assert {"name": "api-keys", "mountPath": str(keys_file.parent), "readOnly": True} in container["volumeMounts"]


def test_the_generated_cluster_is_locked_by_default():
    cluster = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}  # Ray token auth: no anonymous job submission
    password = cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "imageserve-redis", "key": "password"}
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for spec in [head, *workers]:
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert all(spec["automountServiceAccountToken"] is False for spec in [head, *workers])

    ray_policy = policies()["imageserve-ray"]
    assert ray_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    opened = {port["port"] for rule in ray_policy["spec"]["ingress"] for port in rule.get("ports", [])}
    assert opened == {8000, 8265, 8080}  # the GCS (6379) and the Ray client (10001) only among Ray pods
    serve_rules = [r for r in ray_policy["spec"]["ingress"] if {"protocol": "TCP", "port": 8000} in r.get("ports", [])]
    assert [r["from"] for r in serve_rules] == [
        [{"podSelector": {"matchLabels": EDGE_LABELS}}],  # clients, through the edge's timeouts
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-operator"}}}]]

    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    (start_head,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start_head and "RAY_AUTH_MODE=token" in start_head
    assert all("RAY_AUTH_MODE=token" in c for c in launcher["worker_start_ray_commands"] if "ray start" in c)
    assert "~/.ray/auth_token" in launcher["file_mounts"]


def test_the_gcs_speaks_tls_to_a_redis_only_the_head_can_reach():
    cluster = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == "rediss://imageserve-redis:6379"
    head = cluster["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    ca_cert = next(e["value"] for e in container["env"] if e["name"] == "RAY_REDIS_CA_CERT")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "redis-tls"]
    assert ca_cert == f"{mount['mountPath']}/ca.crt"
    (volume,) = [v for v in head["volumes"] if v["name"] == "redis-tls"]
    assert volume["secret"]["secretName"] == "imageserve-redis-tls"
    for group in cluster["workerGroupSpecs"]:  # workers never talk to Redis
        assert all(v["name"] != "redis-tls" for v in group["template"]["spec"]["volumes"])

    items = {item["kind"]: item for item in yaml.safe_load((DEPLOY / "redis.yaml").read_text())["items"]}
    (redis,) = items["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--port") + 1] == "0"  # no plain-text port
    assert args[args.index("--tls-port") + 1] == "6379"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # Kubernetes expands it from the Secret
    (password,) = redis["env"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "imageserve-redis", "key": "password"}
    assert args[args.index("--appendonly") + 1] == "yes"
    (rule,) = items["NetworkPolicy"]["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"] == RAY_POD_LABELS  # this RayService's head, not any head
    assert items["Service"]["metadata"]["name"] == "imageserve-redis"


def test_a_plain_redis_address_gets_no_tls_and_no_generated_redis(tmp_path):
    write_configs(EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG, tmp_path / "serve_config.yaml", tmp_path,
                  redis_address="redis.internal:6379")
    cluster = yaml.safe_load((tmp_path / "kuberay-rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == "redis.internal:6379"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert all(v["name"] != "redis-tls" for v in head["volumes"])
    assert not (tmp_path / "redis.yaml").exists()


# ---- helpers over the committed manifests ---------------------------------------------------------------------

def policies(folder: Path = DEPLOY) -> dict[str, dict]:
    """Every NetworkPolicy the generator writes, by name."""
    found = {}
    for path in folder.glob("*.yaml"):
        document = yaml.safe_load(path.read_text()) or {}
        for item in document.get("items", [document]):
            if item.get("kind") == "NetworkPolicy":
                found[item["metadata"]["name"]] = item
    return found


def rayservice(folder: Path = DEPLOY) -> dict:
    return yaml.safe_load((folder / "kuberay-rayservice.yaml").read_text())


def pod_templates(folder: Path = DEPLOY) -> list[dict]:
    """Every pod template the generator writes: the RayService's head and workers, Redis and the edge."""
    cluster = rayservice(folder)["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for name in ("redis.yaml", "edge.yaml"):
        templates += [item["spec"]["template"] for item in yaml.safe_load((folder / name).read_text())["items"]
                      if item["kind"] == "Deployment"]
    return templates


def edge_items(folder: Path = DEPLOY) -> dict[str, dict]:
    return {item["kind"]: item for item in yaml.safe_load((folder / "edge.yaml").read_text())["items"]}


def production_config_with(tmp_path: Path, **serving_or_hf) -> Path:
    """The example production config with some values changed, written to tmp_path."""
    config = yaml.safe_load(EXAMPLE_PRODUCTION_CONFIG.read_text())
    for dotted, value in serving_or_hf.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path = tmp_path / "production.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- item 6: the RayService runs Serve with the config's http_options ----------------------------------------

def test_the_rayservice_gives_serve_the_whole_serve_config_http_options_included():
    """KubeRay parses serveConfigV2 and PUTs it, as JSON, to the dashboard's /api/serve/applications/
    (rayservice_controller.go updateServeDeployment), which validates it as Ray's ServeDeploySchema and starts
    Serve with its http_options (dashboard/modules/serve/serve_head.py). Without them Serve has no request
    timeout: no 408, and a timed-out request's denoising never stops."""
    from ray.serve.schema import ServeDeploySchema

    served = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert served == yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(json.loads(json.dumps(served)))  # what the dashboard does with it
    production = yaml.safe_load(EXAMPLE_PRODUCTION_CONFIG.read_text())
    assert schema.http_options.request_timeout_s == production["serving"]["request_timeout_s"] == 600
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)
    assert schema.proxy_location.value == "EveryNode"


def test_a_changed_http_option_makes_kuberay_start_a_new_raycluster(tmp_path):
    """A running Serve keeps the http_options it started with (serve_head.py logs "not possible to update its
    HTTP options without restarting it"), and KubeRay applies a change of serveConfigV2 alone to the running
    cluster. It prepares a new RayCluster when rayClusterConfig's hash changes (rayservice_controller.go
    shouldPrepareNewCluster), so the options are also in the head's pod template."""
    write_configs(EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG, tmp_path / "a.yaml", tmp_path / "a")
    changed = production_config_with(tmp_path, serving__request_timeout_s=300)
    write_configs(EXAMPLE_FLEET, changed, tmp_path / "b.yaml", tmp_path / "b")
    before, after = (rayservice(tmp_path / name)["spec"]["rayClusterConfig"] for name in ("a", "b"))
    assert before != after
    annotation = "imageserve.io/serve-start-options"
    options = json.loads(after["headGroupSpec"]["template"]["metadata"]["annotations"][annotation])
    assert options["http_options"]["request_timeout_s"] == 300
    del before["headGroupSpec"]["template"]["metadata"]["annotations"][annotation]
    del after["headGroupSpec"]["template"]["metadata"]["annotations"][annotation]
    assert before == after  # nothing else in the cluster changed


# ---- item 7: header, idle and client timeouts in front of Serve's proxy ----------------------------------------

def test_clients_reach_serve_only_through_the_edge_and_its_timeouts():
    """Serve's uvicorn has no header or idle timeout for a connection that has not sent a request: the edge's
    HAProxy does. The Serve port admits the edge's pods, and the KubeRay operator (it checks the head's proxy at
    /-/healthz, rayservice_controller.go updateHeadPodServeLabel); no ingress namespace reaches it directly."""
    ray_policy = policies()["imageserve-ray"]
    sources = [source for rule in ray_policy["spec"]["ingress"] if {"protocol": "TCP", "port": 8000} in rule.get(
        "ports", []) for source in rule["from"]]
    assert sources == [{"podSelector": {"matchLabels": EDGE_LABELS}},
                       {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-operator"}}}]
    items = edge_items()
    (container,) = items["Deployment"]["spec"]["template"]["spec"]["containers"]
    address = next(e["value"] for e in container["env"] if e["name"] == "SERVE_ADDRESS")
    assert address == f"{SERVE_SERVICE}.$(POD_NAMESPACE).svc.cluster.local:8000"  # KubeRay's Serve Service
    assert items["Service"]["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": 8080}]
    assert items["Deployment"]["spec"]["template"]["metadata"]["annotations"]["imageserve.io/haproxy-cfg-sha256"]


def haproxy_timeouts(config: str) -> dict[str, float]:
    """`timeout <name> <n>s|ms` lines of a haproxy.cfg, in seconds."""
    found = {}
    for name, value, unit in re.findall(r"^\s*timeout ([\w-]+) (\d+)(s|ms)$", config, flags=re.M):
        found[name] = int(value) / (1000 if unit == "ms" else 1)
    return found


def test_the_committed_edge_bounds_headers_idle_connections_and_silent_clients():
    from serve_app.domain.config import parse_config

    config = edge_items()["ConfigMap"]["data"]["haproxy.cfg"]
    timeouts = haproxy_timeouts(config)
    serving = parse_config(yaml.safe_load(EXAMPLE_PRODUCTION_CONFIG.read_text())).serving
    assert timeouts["http-request"] <= 10  # 40 header-trickling connections were open after 154 s without it
    assert timeouts["http-keep-alive"] <= 10  # and 5 idle ones
    assert timeouts["client"] <= 60
    # Serve's own 408 (request_timeout_s) comes before the edge gives up on a silent Serve.
    assert timeouts["server"] > serving.request_timeout_s
    assert "option abortonclose" in config  # a hang-up still reaches Serve, which stops the denoising
    assert config == edge_haproxy_config(EdgeTimeouts.for_request_timeout(serving.request_timeout_s))


# The edge run for real (tests/cluster/edge_support.py) in front of uvicorn, the server Serve's proxy runs.

class Backend:
    """uvicorn serving /slow/<seconds> (answers after that long, or notes the client left), / (at once), and
    /-/healthz as Serve's proxy does: 200 once ``ready`` (it holds its route table), 503 before."""

    def __init__(self):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        self.disconnects: list[float] = []
        self.ready = True
        self.requests = 0

        async def slow(request):
            import asyncio

            started = time.monotonic()
            while time.monotonic() - started < float(request.path_params["seconds"]):
                if await request.is_disconnected():
                    self.disconnects.append(time.monotonic() - started)
                    return PlainTextResponse("gone")
                await asyncio.sleep(0.05)
            return PlainTextResponse("slow answer")

        async def fast(request):
            self.requests += 1
            return PlainTextResponse("answer")

        async def healthz(request):
            return PlainTextResponse("success" if self.ready else "Route table is not populated yet.",
                                     status_code=200 if self.ready else 503)

        app = Starlette(routes=[Route("/slow/{seconds}", slow), Route("/-/healthz", healthz), Route("/", fast)])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@contextmanager
def running_edge(timeouts: EdgeTimeouts):
    backend = Backend()
    backend.thread.start()
    try:
        deadline = time.monotonic() + 10
        while not backend.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        with running_edge_for(f"127.0.0.1:{backend.port}", timeouts) as port:
            yield port, backend
    finally:
        backend.server.should_exit = True
        backend.thread.join(timeout=10)


def closed_after(sock: socket.socket, trickle: bytes = b"") -> tuple[float, bytes]:
    """Seconds until the edge closes ``sock`` (sending ``trickle`` one byte every 0.2 s meanwhile), and what came."""
    started, received = time.monotonic(), b""
    sock.settimeout(0.2)
    for byte in [*trickle] + [None] * 1000:
        if byte is not None:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    return time.monotonic() - started, received


SHORT = EdgeTimeouts(http_request_s=2, http_keep_alive_s=1, client_s=2, connect_s=1, server_s=10)


def test_the_edge_closes_connections_that_trickle_headers_or_send_nothing():
    with running_edge(SHORT) as (port, _):
        results = {}

        def run(name, prepare, trickle=b""):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                prepare(sock)
                results[name] = closed_after(sock, trickle)

        def kept_alive(sock):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")

        headers = b"GET / HTTP/1.1\r\nHost: edge\r\nX-Slow: " + b"a" * 200  # never complete
        cases = [("trickled headers", lambda s: None, headers), ("nothing sent", lambda s: None, b""),
                 ("idle after an answer", kept_alive, b""), ("trickled after an answer", kept_alive, headers)]
        threads = [threading.Thread(target=run, args=case) for case in cases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = {name: round(took, 1) for name, (took, _) in results.items()}
    # timeout http-request (2 s) bounds a request's headers, however slowly they come; timeout http-keep-alive
    # (1 s) an idle kept-alive connection. Without the edge, uvicorn held all of these open.
    assert 1.5 <= seconds["trickled headers"] <= 3.5, seconds
    assert 1.5 <= seconds["nothing sent"] <= 3.5, seconds
    assert 0.5 <= seconds["idle after an answer"] <= 2.5, seconds
    assert seconds["trickled after an answer"] <= 3.5, seconds
    assert results["trickled headers"][1].startswith(b"HTTP/1.1 408")


def test_the_edge_waits_for_a_slow_answer_and_passes_a_hang_up_on_to_serve():
    with running_edge(SHORT) as (port, backend):
        # An answer slower than timeout client (2 s) while the client waits quietly still arrives: the client
        # timeout applies while the client should be sending or reading, not while Serve works.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /slow/3 HTTP/1.1\r\nHost: edge\r\n\r\n")
            _, answer = closed_after(sock)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"slow answer"), answer
        # A client that hangs up mid-request: Serve sees the disconnect at once (option abortonclose) and
        # cancels the request, which stops the denoising (docs/streaming.md).
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /slow/8 HTTP/1.1\r\nHost: edge\r\n\r\n")
            time.sleep(0.5)
        deadline = time.monotonic() + 4
        while not backend.disconnects and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.disconnects and backend.disconnects[0] < 2, backend.disconnects



def test_the_edge_keeps_requests_off_a_serve_proxy_that_is_not_ready_and_answers_503_meanwhile():
    """A proxy Serve has just restarted answers 404 to every path until its route table arrives (ray 2.60
    proxy_router.py ready_for_traffic); its /-/healthz says 503 meanwhile. The edge checks /-/healthz and, while
    the proxy is not ready, answers 503 itself: JSON as imageserve's errors, with Retry-After."""
    import httpx

    with running_edge(SHORT) as (port, backend), httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/").status_code == 200
        backend.ready = False
        response = wait_for_status(client, 503)
        assert response.headers["retry-after"] == "2"
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "service_unavailable"
        assert response.json()["error"]["type"] == "server_error"
        seen = backend.requests
        for _ in range(5):  # once marked down (two failed checks), no request reaches the proxy that is not ready
            assert client.get("/").status_code == 503
        assert backend.requests == seen
        backend.ready = True
        assert wait_for_status(client, 200).text == "answer"


def wait_for_status(client, status: int, deadline_s: float = 30):
    """The first answer with ``status``: the edge changes its mind at its next checks (1 s apart here), so ask
    until it has, with a deadline far beyond what a loaded machine needs."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = client.get("/")
        if response.status_code == status:
            return response
        assert time.monotonic() < deadline, f"still {response.status_code} after {deadline_s}s"
        time.sleep(0.1)

# ---- item 9: policies select this RayService's pods, egress is bounded, no token where none is needed ---------

def test_every_ray_pod_carries_the_label_the_policies_select_it_by():
    """KubeRay names a RayService's cluster `imageserve-<random>` and labels its pods with that name, so the
    policies select the pod template's own label, which KubeRay keeps (common/pod.go labelPod), on every pod of
    this RayService whichever of its RayClusters (serving, or prepared by an upgrade) it belongs to."""
    cluster = rayservice()["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        assert template["metadata"]["labels"] == RAY_POD_LABELS
    assert not any(key.startswith("ray.io/") for key in RAY_POD_LABELS)  # KubeRay overwrites those


def _selectors(policy: dict) -> list[dict]:
    spec = policy["spec"]
    found = [spec["podSelector"]]
    for rule in [*spec.get("ingress", []), *spec.get("egress", [])]:
        for peer in [*rule.get("from", []), *rule.get("to", [])]:
            if "podSelector" in peer and "namespaceSelector" not in peer:
                found.append(peer["podSelector"])
    return found


def test_no_policy_selects_pods_by_a_label_every_raycluster_has():
    """`ray.io/cluster Exists` admitted every RayCluster's pods in the namespace, and `ray.io/node-type: head`
    every head: each pod selector now names this RayService, its edge or its Redis."""
    found = policies()
    assert set(found) == {"imageserve-ray", "imageserve-ray-head", "imageserve-edge", "imageserve-redis"}
    for name, policy in found.items():
        for selector in _selectors(policy):
            labels = selector.get("matchLabels", {})
            assert labels in (RAY_POD_LABELS, EDGE_LABELS, REDIS_LABELS), (name, selector)
            assert all(e["operator"] != "Exists" for e in selector.get("matchExpressions", [])), (name, selector)
    # Redis: this RayService's GCS, i.e. its head, and KubeRay's Redis cleanup pod (the head pod relabelled).
    (rule,) = found["imageserve-redis"]["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"] == {"matchLabels": RAY_POD_LABELS, "matchExpressions": [
        {"key": "ray.io/node-type", "operator": "In", "values": ["head", "redis-cleanup"]}]}


def _egress(policy: dict) -> list[tuple[tuple, tuple]]:
    """(destinations, ports) of each egress rule, as comparable tuples."""
    return [(tuple(json.dumps(peer, sort_keys=True) for peer in rule.get("to", [])),
             tuple(sorted((p["protocol"], p["port"]) for p in rule.get("ports", []))))
            for rule in policy["spec"]["egress"]]


def test_egress_is_only_what_each_pod_needs():
    found = policies()
    for policy in found.values():
        assert "Egress" in policy["spec"]["policyTypes"], policy["metadata"]["name"]
    dns = ((json.dumps({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}, sort_keys=True),),
           (("TCP", 53), ("UDP", 53)))
    ray_pods = json.dumps({"podSelector": {"matchLabels": RAY_POD_LABELS}}, sort_keys=True)
    # Every Ray pod: the other Ray pods of this RayService (Ray's ports are chosen at run time) and DNS. The
    # config is offline, so nothing on the Internet.
    assert _egress(found["imageserve-ray"]) == [((ray_pods,), ()), dns]
    # The head: the Kubernetes API (its autoscaler; 443 or 6443 behind the `kubernetes` Service) and Redis.
    redis = json.dumps({"podSelector": {"matchLabels": REDIS_LABELS}}, sort_keys=True)
    assert _egress(found["imageserve-ray-head"]) == [((), (("TCP", 443), ("TCP", 6443))), ((redis,), (("TCP", 6379),))]
    assert _egress(found["imageserve-edge"]) == [((ray_pods,), (("TCP", 8000),)), dns]
    assert _egress(found["imageserve-redis"]) == []  # Redis reaches nothing


def test_a_config_that_downloads_from_the_hub_may_reach_https_outside_the_cluster(tmp_path):
    online = production_config_with(tmp_path, hf__offline=False)
    write_configs(EXAMPLE_FLEET, online, tmp_path / "serve_config.yaml", tmp_path)
    hub = [rule for rule in policies(tmp_path)["imageserve-ray"]["spec"]["egress"] if rule.get("ports") == [
        {"protocol": "TCP", "port": 443}]]
    assert hub == [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12",
                                                                          "192.168.0.0/16"]}}],
                    "ports": [{"protocol": "TCP", "port": 443}]}]


def test_a_redis_of_your_own_is_reached_on_its_port(tmp_path):
    write_configs(EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG, tmp_path / "serve_config.yaml", tmp_path,
                  redis_address="redis.internal:6380")
    assert {"ports": [{"protocol": "TCP", "port": 6380}]} in policies(tmp_path)["imageserve-ray-head"]["spec"]["egress"]


def test_no_pod_mounts_a_service_account_token_but_the_autoscaler_gets_one():
    """The in-tree autoscaler scales the RayCluster through the Kubernetes API with the head's service account
    (Ray's autoscaler/_private/kuberay/node_provider.py reads IN_CLUSTER_TOKEN_PATH). It alone gets the token;
    the Ray container, where replicas and any submitted job run, has none."""
    for template in pod_templates():
        assert template["spec"]["automountServiceAccountToken"] is False
        for container in template["spec"]["containers"]:
            assert all(m["mountPath"] != SERVICE_ACCOUNT_DIR for m in container.get("volumeMounts", []))
    cluster = rayservice()["spec"]["rayClusterConfig"]
    (mount,) = cluster["autoscalerOptions"]["volumeMounts"]
    assert mount == {"name": "autoscaler-token", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}
    (volume,) = [v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in sources
    assert {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in sources


# ---- item 8: third-party images by digest -----------------------------------------------------------------------

def test_redis_and_the_edge_are_pulled_by_digest_redis_past_the_cve_2025_49844_fix():
    images = {c["image"] for t in pod_templates() for c in t["spec"]["containers"] if "imageserve:" not in c["image"]}
    assert len(images) == 2
    for image in images:
        assert re.fullmatch(r"[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
    (redis,) = [image for image in images if image.startswith("redis:")]
    version = tuple(int(part) for part in redis.split(":")[1].split("@")[0].split("."))
    assert version >= (7, 2, 11)  # CVE-2025-49844 (Lua use-after-free) is fixed in 7.2.11, 7.4.6, 8.0.4, 8.2.2


def test_every_ray_container_starts_serves_proxy_with_the_route_table_hidden():
    """Serve's proxy runs on any node and answers /-/routes to anyone unless its environment names imageserve's
    guard; the key-id secret comes from an optional Secret."""
    from cluster.configs import KEY_ID_SECRET
    from serve_app.proxy_guard import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    service = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env[PROXY_CALLBACK_ENV]["value"] == PROXY_CALLBACK
        secret = env["IMAGESERVE_KEY_ID_SECRET"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": KEY_ID_SECRET, "key": "secret", "optional": True}
    launcher = (DEPLOY / "ray-cluster.yaml").read_text()
    assert launcher.count(f"{PROXY_CALLBACK_ENV}={PROXY_CALLBACK}") == 2  # head and worker start commands
