"""The example fleet, simulated: fake-GPU nodes marked like real ones, real Serve, real HTTP, tiny pipelines."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration

FAST_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                    "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}
OOM_VARIANT = "qwen-image-edit-2509-svdq-int4-r128-lightning-4step"


@pytest.fixture(scope="module")
def fleet(tiny_root):
    from cluster.simulate import SimulatedFleet, simulation_config
    from serve_app.domain.config import parse_fleet
    from serve_app.domain.config_files import load_fleet
    from serve_app.engines.gpu_doubles import out_of_memory_loader
    from serve_app.examples import EXAMPLE_FLEET
    from serve_app.runner import free_port

    data = load_fleet(EXAMPLE_FLEET).model_dump(exclude_unset=True)
    for pool in data["pools"]:
        if pool["name"] == "rtx5090":
            # Room for every rtx5090 deployment to reach max_replicas at once.
            pool["deployment"] = {"autoscaling": FAST_AUTOSCALING}
            pool["gpus_per_node"] = 8
    example = parse_fleet(data)
    config = simulation_config(example, tiny_root)
    port = free_port()
    with SimulatedFleet(example) as simulated:
        # TEST DOUBLE: the int4 edit variant "runs out of memory" on nodes under 22 GiB (the A4500 pool).
        url = simulated.deploy(config, port, loaders={OOM_VARIANT: out_of_memory_loader(22)})
        yield url, config


def test_hundreds_of_mixed_requests_without_a_misroute(fleet):
    from cluster.simulate import send_mixed_load

    url, config = fleet
    tally = send_mixed_load(url, config, 210, concurrency=8)
    assert tally["errors"] == 0, tally["error_samples"]
    assert tally["ok"] == 210 and tally["misroutes"] == 0
    served = tally["per_variant_pool"]
    fp4 = {k.split("@")[1] for k in served if "fp4" in k}
    assert fp4 == {"rtx5090"}
    bf16_edit = {k.split("@")[1] for k in served if k.split("@")[0] in ("qwen-image-edit-2509", "qwen-image-edit-2511")}
    assert bf16_edit == {"a100"}


def test_out_of_memory_is_retried_once_on_a_larger_gpu(fleet):
    import httpx

    from cluster.simulate import _png

    url, _ = fleet

    def edit(_):
        with httpx.Client(base_url=url, timeout=120) as client:
            return client.post("/v1/images/edits", files=[("image", ("a.png", _png((9, 9, 9)), "image/png"))],
                               data={"model": OOM_VARIANT, "prompt": "x", "size": "64x64", "num_inference_steps": "2"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(edit, range(40)))
    assert [r.status_code for r in responses] == [200] * 40
    bodies = [r.json() for r in responses]
    retried = [b for b in bodies if b["retried_from"]]
    assert retried, "under load some requests should land on the A4500 pool and be retried"
    assert {b["retried_from"] for b in retried} == {"a4500"}
    assert {b["pool"] for b in retried} <= {"rtx4090", "a100"}
    assert all(b["pool"] != "a4500" for b in bodies)


def _states(deployment: str) -> dict:
    from ray import serve

    return dict(serve.status().applications["imageserve"].deployments[deployment].replica_states)


def _running(deployment: str) -> int:
    return _states(deployment).get("RUNNING", 0)


def _up(deployment: str) -> int:
    """Replicas the autoscaler has asked for and that are starting or serving."""
    states = _states(deployment)
    return states.get("RUNNING", 0) + states.get("STARTING", 0)


def test_replicas_scale_up_under_load_and_back_down(fleet):
    """Load over HTTP on the fp4 variant, which only the rtx5090 pool serves, so one deployment takes it.

    Over HTTP, not a driver handle: Serve's process-wide driver-handle state outlives the earlier
    clusters of this test process and did not reliably report load to this cluster's autoscaler.
    """
    import threading

    import httpx

    url, _ = fleet
    deployment = "gen-z-image-turbo-svdq-fp4-r32@rtx5090"
    assert _running(deployment) == 1
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                http.post("/v1/images/generations", json={"model": "z-image-turbo-svdq-fp4-r32", "prompt": "load",
                                                          "size": "64x64", "num_inference_steps": 4})

    clients = [threading.Thread(target=client, daemon=True) for _ in range(12)]
    for t in clients:
        t.start()
    try:
        deadline = time.monotonic() + 240  # a new replica imports torch and loads its pipeline first
        while time.monotonic() < deadline and _up(deployment) < 2:
            time.sleep(1)
        assert _up(deployment) == 2, _states(deployment)
    finally:
        stop.set()
        for t in clients:
            t.join(120)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _up(deployment) > 1:
        time.sleep(1)
    assert _up(deployment) == 1 and _running(deployment) == 1, _states(deployment)


def test_cluster_sim_command_end_to_end(tiny_root, tmp_path):
    """`imageserve cluster-sim --json` on the example fleet, as a user runs it (its own process and cluster)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "cluster-sim", "--requests", "40", "--tiny-dir", str(tiny_root),
         "--port", "0", "--json"],
        # Two minutes alone on this machine (start-up 123 s): the deadline is far past a loaded machine's.
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)  # stdout is the one JSON object: Ray's lines go to stderr
    assert (result["requests"], result["ok"], result["errors"], result["misroutes"]) == (40, 40, 0, 0)
    assert set(result["per_pool"]) <= {"a4500", "rtx4090", "a100", "rtx5090"}
