"""The committed cluster configs are what the generator makes, and they mark nodes as the pools expect."""

import json
from pathlib import Path

import yaml

from cluster.configs import write_configs
from serve_app.fleet import node_labels, node_resources

ROOT = Path(__file__).resolve().parents[2]
FLEET = "cluster/fleets/example.yaml"


def test_committed_configs_match_the_generator(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for path in write_configs(FLEET, "serve_config.yaml", tmp_path):
        assert path.read_text() == (ROOT / "cluster" / path.name).read_text(), (
            f"cluster/{path.name} is stale: run `imageserve cluster-configs`")


def test_every_pool_has_a_node_type_with_its_markers(catalog):
    pools = yaml.safe_load((ROOT / FLEET).read_text())["pools"]
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    service = yaml.safe_load((ROOT / "cluster" / "kuberay-rayservice.yaml").read_text())
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for pool in pools:
        gpu = catalog.gpu(pool["gpu_class"])
        expected = node_resources(gpu, pool["gpus_per_node"])
        node_type = launcher["available_node_types"][f"gpu-{pool['name']}"]
        assert {k: v for k, v in node_type["resources"].items() if k not in ("CPU", "GPU")} == expected
        assert node_type["resources"]["GPU"] == pool["gpus_per_node"]
        assert node_type["labels"] == node_labels(gpu)
        assert (node_type["min_workers"], node_type["max_workers"]) == (pool["nodes"], pool["max_nodes"])
        group = groups[f"gpu-{pool['name']}"]
        assert json.loads(group["rayStartParams"]["resources"]) == expected
        assert group["maxReplicas"] == pool["max_nodes"]


def test_rayservice_serves_the_production_config_with_gcs_fault_tolerance():
    service = yaml.safe_load((ROOT / "cluster" / "kuberay-rayservice.yaml").read_text())
    serve_config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"] == serve_config["applications"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"]
    assert cluster["enableInTreeAutoscaling"] is True


def test_fault_tolerance_can_be_left_off(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    write_configs(FLEET, "serve_config.yaml", tmp_path, redis_address=None)
    service = yaml.safe_load((tmp_path / "kuberay-rayservice.yaml").read_text())
    assert "gcsFaultToleranceOptions" not in service["spec"]["rayClusterConfig"]
