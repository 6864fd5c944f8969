"""A simulated GPU fleet on one machine: ``imageserve cluster-sim`` and the fleet tests use it.

``ray.cluster_utils.Cluster`` starts one raylet per fleet node; each declares fake GPUs plus the
same resources and labels as a real node of its class (``serve_app.domain.placement``), so placement
and routing run exactly as on a cluster. The pipelines are the tiny checkpoints on CPU; 4-bit
variants run through the ``load_without_nunchaku`` test double, since nunchaku's kernels need CUDA.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve_app.domain.config import AppConfig, FleetConfig, parse_config
from serve_app.domain.config_files import load_fleet
from serve_app.domain.placement import node_labels, node_resources
from serve_app.embedded import embedded_config_data, tiny_loaders, tiny_model_config
from serve_app.engines import EngineLoader
from serve_app.runner import QUIET_SHUTDOWN_SYSTEM_CONFIG, PrivateRayCluster, deploy, lock_private_ray, worker_env

# Served by the embedded default, whose integration tests reach it through the official client.
SIMULATED_ELSEWHERE = frozenset({"qwen-image-2.1"})


def simulation_config(fleet: FleetConfig, tiny_dir: Path, models: list[str] | None = None,
                      autoscaling: dict[str, Any] | None = None) -> AppConfig:
    """The embedded tiny-model config, extended to every catalog variant but the fp8 ones and Qwen-Image-2.1 (or
    to ``models``) on ``fleet``. fp8 variants run torchao's weight-only path on CPU, which the engine tests load,
    and the embedded default serves Qwen-Image-2.1; in the simulation they would only add more replicas to start
    on two cores (one clean-clone run's `cluster-sim` outlived its test's 600 s with fifteen)."""
    from serve_app.domain.catalog import default_catalog
    from serve_app.engines.random_weights import build_all

    build_all(tiny_dir)
    data = embedded_config_data(tiny_dir)
    simulated = [v for v in default_catalog().variants.values() if (
        v.id in models if models is not None else v.precision != "fp8" and v.id not in SIMULATED_ELSEWHERE)]
    data["models"] = {v.id: tiny_model_config(tiny_dir, v) for v in simulated}
    data["defaults"] = {"width": 1024, "height": 1024}  # plan for the real request size; tests ask small ones
    data["serving"]["warmup"] = True
    deployment = data["serving"]["deployment"]
    deployment.pop("num_replicas", None)
    if autoscaling:
        deployment["autoscaling"] = autoscaling
    else:
        deployment["num_replicas"] = 1
    return fleet.serve_with(parse_config(data, "simulated fleet"))


def simulation_loaders(config: AppConfig, loaders: dict[str, EngineLoader] | None = None) -> dict[str, EngineLoader]:
    """Engine loaders of a simulated fleet: 4-bit variants without nunchaku, then ``loaders`` over them."""
    return {**tiny_loaders(config), **(loaders or {})}


class SimulatedFleet(PrivateRayCluster):
    """Head node (no GPU) + one raylet per fleet node with fake GPUs, markers and labels."""

    def __init__(self, fleet: FleetConfig, head_cpus: int = 2) -> None:
        self.fleet = fleet
        self.head_cpus = head_cpus
        self.cluster = None
        self.tmpdir: str | None = None

    def start(self) -> SimulatedFleet:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SimulatedFleet:
        import ray
        from ray.cluster_utils import Cluster

        from serve_app.domain.catalog import default_catalog

        catalog = default_catalog()
        self.tmpdir = tempfile.mkdtemp(prefix="isv-fleet-", dir="/tmp")
        # Ray puts its sessions and the cluster address file under $RAY_TMPDIR/ray.
        os.environ["RAY_TMPDIR"] = self.tmpdir
        os.makedirs(os.path.join(self.tmpdir, "ray"), exist_ok=True)
        lock_private_ray(self.tmpdir)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.head_cpus, "num_gpus": 0, "include_dashboard": False,
            "_system_config": QUIET_SHUTDOWN_SYSTEM_CONFIG,
        })
        for pool in self.fleet.pools:
            gpu = catalog.gpu(pool.gpu_class)
            for _ in range(pool.nodes):
                self.cluster.add_node(num_cpus=1, num_gpus=pool.gpus_per_node,
                                      resources=node_resources(gpu, pool.gpus_per_node), labels=node_labels(gpu))
        ray.init(address=self.cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": worker_env()})
        if threading.current_thread() is threading.main_thread():
            from serve_app.runner import interrupt_on_signals

            interrupt_on_signals()
        return self

    def deploy(self, config: AppConfig, port: int, timeout_s: float = 600,
               loaders: dict[str, EngineLoader] | None = None) -> str:
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        deploy(config, simulation_loaders(config, loaders), route_prefix="/", timeout_s=timeout_s)
        return f"http://127.0.0.1:{port}"

    def _stop_processes(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def _png(color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_requests(config: AppConfig, count: int) -> list[tuple[str, str]]:
    """(task, model) pairs cycling over every served variant and the two aliases."""
    catalog = config.build_catalog()
    names = [(task, v.id) for v in catalog.variants.values() if v.id in config.models_to_load() for task in v.tasks]
    names += [("generate", "z-image-turbo"), ("edit", "qwen-image-edit")]
    return [names[i % len(names)] for i in range(count)]


def send_mixed_load(url: str, config: AppConfig, count: int, concurrency: int = 8) -> dict[str, Any]:
    """Send ``count`` mixed generation/edit requests over HTTP; tally outcomes as the replicas report them."""
    import httpx

    image = _png((180, 60, 20))
    lock = threading.Lock()
    tally: dict[str, Any] = {"requests": count, "ok": 0, "errors": 0, "misroutes": 0,
                             "per_pool": Counter(), "per_variant_pool": Counter(), "error_samples": []}

    def one(item: tuple[str, str]) -> None:
        task, model = item
        with httpx.Client(base_url=url, timeout=300) as client:
            if task == "generate":
                response = client.post("/v1/images/generations", json={
                    "model": model, "prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2})
            else:
                response = client.post("/v1/images/edits", files=[("image", ("in.png", image, "image/png"))],
                                       data={"model": model, "prompt": "make it blue", "size": "64x64",
                                             "num_inference_steps": "2"})
        with lock:
            if response.status_code != 200:
                tally["errors"] += 1
                if len(tally["error_samples"]) < 5:
                    tally["error_samples"].append(f"{response.status_code} {response.text[:200]}")
                return
            body = response.json()
            tally["ok"] += 1
            tally["per_pool"][body["pool"]] += 1
            tally["per_variant_pool"][f"{body['model']}@{body['pool']}"] += 1
            if body.get("gpu_class") is None or not _replica_says_it_fits(body):
                tally["misroutes"] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, mixed_requests(config, count)))
    tally["per_pool"] = dict(tally["per_pool"])
    tally["per_variant_pool"] = dict(sorted(tally["per_variant_pool"].items()))
    return tally


def _replica_says_it_fits(body: dict[str, Any]) -> bool:
    from serve_app.domain.catalog import default_catalog
    from serve_app.domain.planner import plan

    # The replica reports its node's GPU class; the planner checks the variant against it.
    gpu = default_catalog().gpus.get(body["gpu_class"])
    return gpu is not None and plan(default_catalog().variant(body["model"]), gpu).fits


def run_simulation(fleet_path: str | os.PathLike, requests: int, tiny_dir: Path, port: int = 8765,
                   concurrency: int = 8) -> dict[str, Any]:
    fleet = load_fleet(fleet_path)
    config = simulation_config(fleet, tiny_dir)
    if not port:
        from serve_app.runner import free_port

        port = free_port()
    started = time.monotonic()
    with SimulatedFleet(fleet) as simulated:
        url = simulated.deploy(config, port)
        ready_s = time.monotonic() - started
        tally = send_mixed_load(url, config, requests, concurrency)
    tally["startup_s"] = round(ready_s, 1)
    tally["total_s"] = round(time.monotonic() - started, 1)
    return tally
