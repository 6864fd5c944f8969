"""Node autoscaling, simulated: a head started with Ray's fake multi-node provider (autoscaler v2).

Node types are the fleet's pools with the same resources and labels as ``serve_app.domain.placement``
gives real nodes. A replica that needs a pool with no node makes the autoscaler launch one (a local
raylet with fake GPUs); idle nodes go away after ``idle_timeout_minutes``.

The head runs as ``ray start --head --block`` in a process group of its own, with a private
``RAY_TMPDIR`` and port; stopping signals that group only, so nobody else's Ray is touched.
The provider is loaded as an ``external`` module because the PyPI wheel lacks the defaults file
of the ``fake_multinode`` type.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from cluster.configs import node_type_name
from serve_app.domain.catalog import default_catalog
from serve_app.domain.config import FleetConfig
from serve_app.domain.placement import node_labels, node_resources
from serve_app.runner import PrivateRayCluster, free_port, worker_env

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def autoscaling_config(fleet: FleetConfig, gcs_address: str, idle_timeout_minutes: float,
                       head_cpus: int = 2) -> dict[str, Any]:
    catalog = default_catalog()
    node_types: dict[str, Any] = {
        "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
    }
    for pool in fleet.pools:
        gpu = catalog.gpu(pool.gpu_class)
        node_types[node_type_name(pool)] = {
            "resources": {"CPU": 1, "GPU": pool.gpus_per_node, **node_resources(gpu, pool.gpus_per_node)},
            "labels": node_labels(gpu),
            "node_config": {},
            "min_workers": pool.nodes,
            "max_workers": pool.max_nodes,
        }
    empty: dict[str, Any] = {key: [] for key in (
        "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
        "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    return {
        "cluster_name": "imageserve-fake",
        "max_workers": sum(p.max_nodes for p in fleet.pools),
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 10,
        "provider": {"type": "external", "module": PROVIDER, "launch_multiple": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **empty,
    }


class FakeAutoscalingCluster(PrivateRayCluster):
    """A private Ray cluster whose GPU nodes come and go with demand; use as a context manager."""

    def __init__(self, fleet: FleetConfig, idle_timeout_minutes: float = 0.1, head_cpus: int = 2,
                 grace_s: float = 15) -> None:
        self.fleet = fleet
        self.grace_s = grace_s
        self.idle_timeout_minutes = idle_timeout_minutes
        self.head_cpus = head_cpus
        self.tmpdir: str | None = None
        self.head: subprocess.Popen | None = None
        self.address: str | None = None

    def start(self, timeout_s: float = 90) -> FakeAutoscalingCluster:
        import ray
        from ray._private.services import get_node_ip_address

        try:
            self.tmpdir = tempfile.mkdtemp(prefix="isv-autoscale-", dir="/tmp")
            os.makedirs(os.path.join(self.tmpdir, "ray"), exist_ok=True)
            port = free_port("")
            self.address = f"{get_node_ip_address()}:{port}"
            config_path = Path(self.tmpdir) / "autoscaling.yaml"
            config_path.write_text(yaml.safe_dump(
                autoscaling_config(self.fleet, self.address, self.idle_timeout_minutes, self.head_cpus)))
            env = dict(os.environ, RAY_FAKE_CLUSTER="1", RAY_enable_autoscaler_v2="1",
                       RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID, RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
                       RAY_TMPDIR=self.tmpdir, RAY_AUTH_MODE="disabled")
            ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
            self.head = subprocess.Popen(
                [ray_cli, "start", "--head", f"--port={port}", f"--autoscaling-config={config_path}",
                 f"--num-cpus={self.head_cpus}", "--num-gpus=0", "--block", "--disable-usage-stats",
                 "--include-dashboard=true", "--dashboard-port=0"],
                env=env, start_new_session=True, stdout=open(Path(self.tmpdir) / "head.log", "w"),
                stderr=subprocess.STDOUT,
            )
            os.environ["RAY_TMPDIR"] = self.tmpdir
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    ray.init(address=self.address, log_to_driver=False,
                             runtime_env={"env_vars": worker_env()})
                    return self
                except Exception:
                    if time.monotonic() > deadline or self.head.poll() is not None:
                        raise
                    time.sleep(1)
        except BaseException:
            self.stop()
            raise

    def alive_nodes(self) -> list[dict[str, Any]]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def _stop_processes(self) -> None:
        if self.head is None:
            return
        # The head, its GCS, the autoscaler and the nodes it launched share this process group.
        if self.head.poll() is None:
            os.killpg(self.head.pid, signal.SIGTERM)
            try:
                self.head.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.head.pid, signal.SIGKILL)
                self.head.wait(10)
        try:
            os.killpg(self.head.pid, signal.SIGKILL)  # stragglers of our group, if any
        except ProcessLookupError:
            pass
