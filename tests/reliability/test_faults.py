"""Faults: OOM, a broken CUDA context, a killed replica, a model that cannot load, redeploys."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.integration


def generate(url, prompt="fine", **extra):
    with httpx.Client(base_url=url, timeout=120) as client:
        return client.post("/v1/images/generations",
                           json={"prompt": prompt, "size": "64x64", "num_inference_steps": 2, **extra})


def running_replicas(deployment, app="imageserve"):
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


def replica_ids(deployment, app="imageserve") -> set[str]:
    """Ids of the live replica actors of a deployment (what answers report as ``replica``)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def test_out_of_memory_is_503_and_the_same_replica_serves_the_next_request(http, encoded):
    from serve_app.engines.gpu_doubles import OOM_TRIGGER

    files = [("image", ("a.png", encoded("PNG"), "image/png"))]
    data = {"model": "qwen-image-edit-2509", "size": "64x64", "num_inference_steps": "2"}
    failed = http.post("/v1/images/edits", files=files, data={**data, "prompt": OOM_TRIGGER})
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "out_of_memory"
    assert failed.headers["retry-after"]
    ok = http.post("/v1/images/edits", files=files, data={**data, "prompt": "after the oom"})
    assert ok.status_code == 200  # one replica: the same one that ran out of memory


def test_a_cuda_fault_replaces_the_replica_while_the_other_keeps_serving(reliable):
    from serve_app.engines.gpu_doubles import CUDA_FAULT_TRIGGER

    before = replica_ids("gen-z-image-turbo")
    assert len(before) == 2
    faulted = generate(reliable.url, CUDA_FAULT_TRIGGER)
    assert faulted.status_code == 503 and "CUDA fault" in faulted.json()["error"]["message"]
    deadline = time.monotonic() + 120
    served = 0
    while time.monotonic() < deadline:
        response = generate(reliable.url)  # the healthy replica (or a retry) keeps answering
        served += response.status_code == 200
        now = replica_ids("gen-z-image-turbo")
        if len(now - before) >= 1 and running_replicas("gen-z-image-turbo") == 2:
            break
        time.sleep(1)
    assert len(now - before) >= 1, "the faulted replica was not replaced"
    assert served >= 1


def test_a_replica_killed_under_load_loses_under_one_percent(reliable):
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::imageserve#gen-z-image-turbo#")]
    assert len(names) == 2
    victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    results = []
    lock = threading.Lock()

    def one(i):
        response = generate(reliable.url, f"load {i}")
        with lock:
            results.append(response.status_code)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        time.sleep(1.0)
        ray.kill(victim, no_restart=False)
        for f in futures:
            f.result()
    failures = sum(code != 200 for code in results)
    assert len(results) == 200 and failures <= 1, results  # < 1%
    deadline = time.monotonic() + 120
    while running_replicas("gen-z-image-turbo") < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert running_replicas("gen-z-image-turbo") == 2  # capacity is back


def test_a_model_that_cannot_load_fails_its_deployment_with_the_reason(reliable, tmp_path, http):
    from ray import serve

    from serve_app.domain.config import parse_config
    from serve_app.runner import deploy

    config = parse_config({"device": {"device": "cpu"}, "serving": {"app_name": "broken", "warmup": False},
                           "models": {"z-image-turbo": {"source": str(tmp_path / "missing")}}})
    # Serve gives up after a bounded number of constructor failures and says so.
    with pytest.raises(RuntimeError, match="DEPLOY_FAILED|failed"):
        deploy(config, route_prefix="/broken")
    status = serve.status().applications["broken"]
    assert status.status == "DEPLOY_FAILED", status
    assert "does not exist" in str(status.deployments["gen-z-image-turbo"].message)
    assert http.post("/v1/images/generations", json={"prompt": "other apps serve on", "size": "64x64",
                                                     "num_inference_steps": 1}).status_code == 200
    serve.delete("broken")


def test_a_redeploy_lets_the_request_in_flight_finish_on_the_replica_it_replaces(reliable):
    """A new version of the model deployment replaces both replicas; the one running a request drains it.

    No timing assumption: the request is seen in flight before the redeploy starts, the graceful
    shutdown timeout (300 s) is far beyond the request's length, and the answer names its replica.
    """
    from ray import serve

    from serve_app import GenerateRequest
    from serve_app.engines.gpu_doubles import cuda_fault_loader, out_of_memory_loader
    from serve_app.runner import deploy

    app = serve.get_app_handle("imageserve")
    before = replica_ids("gen-z-image-turbo")
    response = app.generate.remote(GenerateRequest(prompt="in flight", size="512x512", num_inference_steps=100,
                                                   seed=1))
    deadline = time.monotonic() + 120
    while app.health.remote().result()["in_flight"].get("gen-z-image-turbo", 0) == 0:
        assert time.monotonic() < deadline, "the request never reached the model deployment"
        time.sleep(0.05)
    # A changed engine setting is a new version of the deployment: Serve replaces its replicas.
    config = reliable.config.model_copy(deep=True)
    config.models["z-image-turbo"].optimizations.vae_channels_last = True
    deploy(config, {"z-image-turbo": cuda_fault_loader(), "qwen-image-edit-2509": out_of_memory_loader(0)},
           route_prefix="/")
    result = response.result(timeout_s=600)
    assert result.replica in before and len(result.images) == 1
    deadline = time.monotonic() + 120
    while replica_ids("gen-z-image-turbo") & before and time.monotonic() < deadline:
        time.sleep(1)
    assert not replica_ids("gen-z-image-turbo") & before, "the replicas of the old version are still alive"
