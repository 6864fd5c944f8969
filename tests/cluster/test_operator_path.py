"""The operator path, as docs/deploy.md gives it: `ray start` nodes carrying their pools' markers, `serve deploy`
of the generated serve config, `serve status`, every pool answering, a changed config rolled out under
traffic with no request failing, `serve shutdown`; then the cluster is stopped by its own processes.

Tiny checkpoints on CPU stand in for the weights and fake GPUs for the cards; 4-bit variants are left
out, since without CUDA only a Python-side test double loads them. All nodes share this machine, so
the Serve proxy runs on the head only (the generated config puts one on every node).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.configs import serve_config
from cluster.operator_nodes import OperatorNodes
from serve_app.domain.config import parse_fleet
from serve_app.embedded import embedded_config_data
from serve_app.runner import free_port, wait_until_ready

pytestmark = pytest.mark.integration

FLEET = {"pools": [
    {"name": "rtx4090", "gpu_class": "rtx-4090", "gpus_per_node": 1, "nodes": 1, "max_nodes": 1},
    {"name": "a100", "gpu_class": "a100-80g", "gpus_per_node": 1, "nodes": 1, "max_nodes": 1,
     "variants": ["qwen-image-edit-2511"]},
]}


def serve_cli(nodes: OperatorNodes, *args: str) -> subprocess.CompletedProcess:
    serve = os.path.join(os.path.dirname(sys.executable), "serve")
    return subprocess.run([serve, *args, "--address", nodes.dashboard_address], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, RAY_TMPDIR=nodes.tmpdir))


def deploy_file(tmp_path: Path, data: dict, fleet, name: str) -> Path:
    generated = serve_config(data, fleet)
    generated["proxy_location"] = "HeadOnly"  # one machine: a proxy per node would share one port
    path = tmp_path / name
    path.write_text(yaml.safe_dump(generated, sort_keys=False))
    return path


def png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ray_start_serve_deploy_roll_a_change_under_traffic_and_shut_down(tiny_root, tmp_path):
    fleet = parse_fleet(FLEET)
    port = free_port()
    data = embedded_config_data(tiny_root)
    data["serving"].update({"port": port, "host": "127.0.0.1"})
    data["models"] = {k: v for k, v in data["models"].items() if k in ("z-image-turbo", "qwen-image-edit-2511")}
    url = f"http://127.0.0.1:{port}"

    with OperatorNodes(fleet) as nodes:
        deployed = serve_cli(nodes, "deploy", str(deploy_file(tmp_path, data, fleet, "serve.yaml")))
        assert deployed.returncode == 0, deployed.stderr
        wait_until_ready(f"{url}/readyz", timeout_s=600)
        status = serve_cli(nodes, "status")
        assert status.returncode == 0 and "status: RUNNING" in status.stdout, status.stdout + status.stderr

        with httpx.Client(base_url=url, timeout=300) as client:
            generated = client.post("/v1/images/generations", json={
                "model": "z-image-turbo", "prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2})
            edited = client.post("/v1/images/edits", files=[("image", ("in.png", png(), "image/png"))],
                                 data={"model": "qwen-image-edit-2511", "prompt": "make it blue", "size": "64x64",
                                       "num_inference_steps": "2"})
        assert generated.status_code == 200 and edited.status_code == 200, (generated.text, edited.text)
        assert {generated.json()["pool"], edited.json()["pool"]} == {"rtx4090", "a100"}

        # A changed config rolls out while requests keep coming; none of them may fail.
        outcomes: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=url, timeout=300) as client:
                while not stop.is_set():
                    outcomes.append(client.post("/v1/images/generations", json={
                        "prompt": "a harbour", "size": "64x64", "num_inference_steps": 1}).status_code)

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            changed = dict(data, defaults={"width": 128, "height": 128})
            rolled = serve_cli(nodes, "deploy", str(deploy_file(tmp_path, changed, fleet, "serve-changed.yaml")))
            assert rolled.returncode == 0, rolled.stderr
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with httpx.Client(base_url=url, timeout=300) as client:
                    size = client.post("/v1/images/generations", json={
                        "prompt": "which config?", "num_inference_steps": 1}).json().get("size")
                if size == "128x128":
                    break
                time.sleep(1)
            assert size == "128x128", "the changed config never took over"
        finally:
            stop.set()
            sender.join()
        assert outcomes and set(outcomes) == {200}, outcomes

        down = serve_cli(nodes, "shutdown", "-y")
        assert down.returncode == 0, down.stderr
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=5).raise_for_status()
    leftover = subprocess.run(["pgrep", "-f", nodes.tmpdir], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes of this cluster still running: {leftover}"
