"""Batch lines and Serve's autoscaler, on the real controller: two applications run the same kind of batch with
no interactive traffic. The one whose pool lets a backlog scale it (``batch_backlog_share: 1``) grows to its
``max_replicas``; the one with the default (0) keeps one replica over that same time, its lines using idle time."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
               "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 600}


def app_config(tiny_root, name: str, share: float, state_dir: str):
    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data

    data = embedded_config_data(tiny_root)
    data["models"] = {"z-image-turbo": {**data["models"]["z-image-turbo"],
                                        "deployment": {"autoscaling": {**AUTOSCALING, "batch_backlog_share": share}}}}
    data["loras"] = {}
    data["serving"].update({"app_name": name, "warmup": False,
                            "batch": {"state_dir": state_dir, "poll_interval_s": 0.2}})
    return parse_config(data, name)


def submit(client: httpx.Client, prefix: str, lines: int) -> str:
    body = {"size": "256x256", "num_inference_steps": 8}
    text = "".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/images/generations",
                               "body": {**body, "prompt": f"item {i}"}}) + "\n" for i in range(lines))
    file = client.post(f"{prefix}/v1/files", files={"file": ("in.jsonl", io.BytesIO(text.encode()))},
                       data={"purpose": "batch"}).json()
    return client.post(f"{prefix}/v1/batches", json={"input_file_id": file["id"], "completion_window": "24h",
                                                     "endpoint": "/v1/images/generations"}).json()["id"]


def replicas(app: str) -> dict[str, int]:
    from ray import serve

    (status,) = [s for name, s in serve.status().applications[app].deployments.items() if "z-image" in name]
    return dict(status.replica_states)


def test_a_batch_scales_a_pool_only_where_its_backlog_share_allows(service, tiny_root, tmp_path):
    from ray import serve

    service.add_application(app_config(tiny_root, "batch-idle", 0.0, str(tmp_path / "idle")), "/idle")
    service.add_application(app_config(tiny_root, "batch-backlog", 1.0, str(tmp_path / "backlog")), "/backlog")
    try:
        with httpx.Client(base_url=service.url, timeout=120) as client:
            idle, backlog = submit(client, "/idle", 400), submit(client, "/backlog", 400)
            started = time.monotonic()
            while replicas("batch-backlog").get("RUNNING", 0) < 2:
                assert time.monotonic() - started < 300, f"the backlog never scaled: {replicas('batch-backlog')}"
                time.sleep(0.5)
            # Over the same time, with the same load, the default pool asked for no second replica.
            assert replicas("batch-idle") == {"RUNNING": 1}
            assert client.get(f"/idle/v1/batches/{idle}").json()["request_counts"]["completed"] > 0
            for prefix, batch in (("/idle", idle), ("/backlog", backlog)):
                assert client.post(f"{prefix}/v1/batches/{batch}/cancel").status_code == 200
    finally:
        serve.delete("batch-idle")
        serve.delete("batch-backlog")
