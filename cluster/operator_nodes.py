"""A Ray cluster started the way an operator starts one: ``ray start --head``, then ``ray start --address``
on each GPU node with its pool's markers, here all on one machine (the tests of the operator path).

Every node runs as ``ray start ... --block`` in a process group of its own, with a private
``RAY_TMPDIR`` and ports; stopping signals those groups only, so nobody else's Ray is touched (never
``ray stop``). Worker nodes declare fake GPUs and the same resources and labels a real node of their
pool gets (``serve_app.domain.placement``, as cluster/deploy/ writes them), so placement runs as on a
real cluster. Drive it with the ``serve`` CLI against ``dashboard_address``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_app.domain.catalog import default_catalog
from serve_app.domain.config import FleetConfig
from serve_app.domain.placement import node_labels, node_resources
from serve_app.runner import PrivateRayCluster, free_port


class OperatorNodes(PrivateRayCluster):
    """Head (no GPU, with the dashboard ``serve deploy`` talks to) + one node per fleet node."""

    def __init__(self, fleet: FleetConfig, head_cpus: int = 2, grace_s: float = 20) -> None:
        self.fleet = fleet
        self.head_cpus = head_cpus
        self.grace_s = grace_s
        self.tmpdir: str | None = None
        self.processes: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self.gcs_address: str | None = None
        self.dashboard_address: str | None = None

    def _ray(self, *args: str, log: str) -> subprocess.Popen:
        env = dict(os.environ, RAY_TMPDIR=self.tmpdir, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        path = Path(self.tmpdir) / log
        process = subprocess.Popen([ray_cli, "start", *args, "--block", "--disable-usage-stats"], env=env,
                                   start_new_session=True, stdout=open(path, "w"), stderr=subprocess.STDOUT)
        self.processes.append(process)
        self.logs[process.pid] = path
        return process

    def start(self, timeout_s: float = 180) -> OperatorNodes:
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> OperatorNodes:
        from ray._private.services import get_node_ip_address

        catalog = default_catalog()
        self.tmpdir = tempfile.mkdtemp(prefix="isv-operator-", dir="/tmp")
        os.makedirs(os.path.join(self.tmpdir, "ray"), exist_ok=True)
        port, dashboard_port = free_port(""), free_port()
        self.gcs_address = f"{get_node_ip_address()}:{port}"  # where `ray start --head` listens
        self.dashboard_address = f"http://127.0.0.1:{dashboard_port}"
        self._ray("--head", f"--port={port}", f"--num-cpus={self.head_cpus}",
                  "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={dashboard_port}", log="head.log")
        self._wait_for_dashboard(timeout_s)
        expected = 1
        for pool in self.fleet.pools:
            gpu = catalog.gpu(pool.gpu_class)
            labels = ",".join(f"{k}={v}" for k, v in node_labels(gpu).items())
            for n in range(pool.nodes):
                self._ray(f"--address={self.gcs_address}", "--num-cpus=1",
                          f"--num-gpus={pool.gpus_per_node}",
                          f"--resources={json.dumps(node_resources(gpu, pool.gpus_per_node))}",
                          f"--labels={labels}", log=f"node-{pool.name}-{n}.log")
                expected += 1
                # One at a time, as an operator's script would: raylets starting together on a loaded
                # machine time out registering with the GCS.
                self._wait_for_nodes(expected, timeout_s)
        return self

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"ray start --head exited\n{self.log_tail(self.processes[0])}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_address}/api/version", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"the dashboard at {self.dashboard_address} did not answer in {timeout_s}s")

    def log_tail(self, process: subprocess.Popen, lines: int = 30) -> str:
        """The end of a node's log (the folder is removed when the cluster stops)."""
        return "\n".join(self.logs[process.pid].read_text(errors="replace").splitlines()[-lines:])

    def alive_nodes(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.dashboard_address}/nodes?view=summary", timeout=10) as response:
            summary = json.load(response)["data"]["summary"]
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a node exited: {dead[0].args}\n{self.log_tail(dead[0])}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{count} nodes were not alive after {timeout_s}s (logs in {self.tmpdir})")

    def _stop_processes(self) -> None:
        # Workers first, then the head: each `ray start --block` stops the processes it started on SIGTERM.
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
            try:
                os.killpg(process.pid, signal.SIGKILL)  # stragglers of that group, if any
            except ProcessLookupError:
                pass
        self.processes = []
