"""The committed deployables are what the generator makes from the example fleet and production config,
and they mark nodes as the pools expect."""

import json
from pathlib import Path

import yaml

from cluster.configs import write_configs
from serve_app.domain.config import load_fleet
from serve_app.domain.placement import node_labels, node_resources
from serve_app.examples import EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG

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
    assert all(spec["automountServiceAccountToken"] is False for spec in workers)

    policy = yaml.safe_load((DEPLOY / "kuberay-networkpolicy.yaml").read_text())
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    opened = {port["port"] for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])}
    assert opened == {8000, 8265, 8080}  # the GCS (6379) and the Ray client (10001) only among Ray pods
    serve_rule = next(r for r in policy["spec"]["ingress"] if r.get("ports") == [{"protocol": "TCP", "port": 8000}])
    assert serve_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                                         "ingress-nginx"}}}]

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
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/node-type": "head"}}}]
    assert items["Service"]["metadata"]["name"] == "imageserve-redis"


def test_a_plain_redis_address_gets_no_tls_and_no_generated_redis(tmp_path):
    write_configs(EXAMPLE_FLEET, EXAMPLE_PRODUCTION_CONFIG, tmp_path / "serve_config.yaml", tmp_path,
                  redis_address="redis.internal:6379")
    cluster = yaml.safe_load((tmp_path / "kuberay-rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == "redis.internal:6379"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert all(v["name"] != "redis-tls" for v in head["volumes"])
    assert not (tmp_path / "redis.yaml").exists()
