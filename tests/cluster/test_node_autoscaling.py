"""Ray's fake multi-node autoscaler launches a GPU pool's node when a variant needs it, and removes it when idle."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration

FLEET = {"pools": [
    {"name": "a4500", "gpu_class": "rtx-a4500", "nodes": 1, "max_nodes": 1, "gpus_per_node": 2,
     "variants": ["z-image-turbo"]},
    # No node yet: the bf16 edit variant fits only here, so its replica makes the autoscaler launch one.
    {"name": "a100", "gpu_class": "a100-80g", "nodes": 0, "max_nodes": 1, "gpus_per_node": 2,
     "variants": ["qwen-image-edit-2511"]},
]}


def gpu_nodes(cluster, gpu_class):
    from serve_app.domain.placement import GPU_CLASS_LABEL

    return [n for n in cluster.alive_nodes() if n.get("Labels", {}).get(GPU_CLASS_LABEL) == gpu_class]


def test_a_pool_without_nodes_gets_one_on_demand_and_loses_it_when_idle(tiny_root):
    import httpx
    from ray import serve

    from cluster.autoscaling import FakeAutoscalingCluster
    from cluster.simulate import _png, simulation_config
    from serve_app.domain.config import parse_fleet
    from serve_app.runner import deploy, free_port

    fleet = parse_fleet(FLEET)
    config = simulation_config(fleet, tiny_root, models=["z-image-turbo", "qwen-image-edit-2511"])
    with FakeAutoscalingCluster(fleet, idle_timeout_minutes=0.1) as cluster:
        assert gpu_nodes(cluster, "a100-80g") == []
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        deploy(config, route_prefix="/", timeout_s=180)
        assert len(gpu_nodes(cluster, "a100-80g")) == 1

        # Over HTTP, not a driver handle: Serve's process-wide handle thread outlives this cluster and
        # would stop pushing the handle metrics that a later cluster's autoscaling tests rely on.
        response = httpx.post(f"http://127.0.0.1:{port}/v1/images/edits", timeout=120,
                              files=[("image", ("a.png", _png((1, 2, 3)), "image/png"))],
                              data={"model": "qwen-image-edit-2511", "prompt": "x", "size": "64x64",
                                    "num_inference_steps": "2"})
        body = response.json()
        assert response.status_code == 200, body
        assert (body["model"], body["pool"], body["gpu_class"]) == ("qwen-image-edit-2511", "a100", "a100-80g")

        serve.delete("imageserve")
        deadline = time.monotonic() + 90
        while gpu_nodes(cluster, "a100-80g"):
            assert time.monotonic() < deadline, "the idle a100 node was not removed"
            time.sleep(2)
        assert len(gpu_nodes(cluster, "rtx-a4500")) == 1  # the pool's min_workers stay
