"""A batch survives the processes that run it: a model replica killed mid-line and a router replica killed
mid-batch each leave every line answered once in the output, none lost and none recorded twice."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

LINES = 24


def submit(client: httpx.Client, tag: str) -> str:
    body = {"model": "z-image-turbo", "size": "256x256", "num_inference_steps": 8}
    text = "".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": {**body, "prompt": f"{tag} {i}", "seed": i}}) + "\n" for i in range(LINES))
    file = client.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(text.encode()))}, data={"purpose": "batch"})
    assert file.status_code == 200, file.text
    batch = client.post("/v1/batches", json={"input_file_id": file.json()["id"], "completion_window": "24h",
                                             "endpoint": "/v1/images/generations"})
    assert batch.status_code == 200, batch.text
    return batch.json()["id"]


def state(client: httpx.Client, batch_id: str) -> dict | None:
    """The batch, or None while no router replica answers (one is being replaced)."""
    try:
        answer = client.get(f"/v1/batches/{batch_id}")
    except httpx.TransportError:
        return None
    return answer.json() if answer.status_code == 200 else None


def wait_for(client: httpx.Client, batch_id: str, condition, deadline_s: float = 600) -> dict:
    started = time.monotonic()
    while not ((batch := state(client, batch_id)) and condition(batch)):
        assert time.monotonic() - started < deadline_s, f"batch {batch_id} never got there: {batch}"
        time.sleep(0.2)
    return batch


def every_line_once(client: httpx.Client, batch: dict, tag: str) -> None:
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}, batch
    lines = client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()
    ids = [json.loads(line)["custom_id"] for line in lines]
    assert sorted(ids) == sorted(f"{tag}-{i}" for i in range(LINES))  # each once: none lost, none twice
    assert batch["error_file_id"] is None


def actor_names(prefix: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def kill_one(prefix: str) -> str:
    """Kill one live Serve replica actor whose name starts with ``prefix``; its name."""
    import ray

    (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)][:1]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    return actor["name"]


FINISHED = ("completed", "failed", "expired", "cancelled")


def test_a_model_replica_killed_mid_line_leaves_every_line_answered_once(reliable, http):
    batch_id = submit(http, "model-kill")
    wait_for(http, batch_id, lambda b: b["request_counts"]["completed"] >= 2)
    killed = kill_one("SERVE_REPLICA::imageserve#gen-z-image-turbo#")  # two lines run at any time: one dies
    every_line_once(http, wait_for(http, batch_id, lambda b: b["status"] in FINISHED), "model-kill")
    assert killed not in actor_names("SERVE_REPLICA::imageserve#gen-z-image-turbo#")


def test_a_router_replica_killed_mid_batch_leaves_every_line_answered_once(reliable, http):
    """The router replica dies holding two leased lines; Serve starts another, whose runner resumes the batch and
    runs those two again once their lease (3 s here) lapses."""
    batch_id = submit(http, "router-kill")
    wait_for(http, batch_id, lambda b: b["request_counts"]["completed"] >= 2)
    killed = kill_one("SERVE_REPLICA::imageserve#router#")
    every_line_once(http, wait_for(http, batch_id, lambda b: b["status"] in FINISHED), "router-kill")
    assert killed not in actor_names("SERVE_REPLICA::imageserve#router#")


def test_batch_lines_are_held_to_their_keys_limits_and_wait_instead_of_failing(reliable, api_key):
    """/secure meters each key (a burst of 0.3 megapixel-steps, refilled at 0.01 a minute). A batch of three lines
    of 0.2 each gets one through; the router refuses the others under the key's limit, and they wait in the queue
    (a 429 is retried until the window ends), neither failed nor run past the limit."""
    from pathlib import Path

    from serve_app.api_keys import cluster_key_id_secret, key_id
    from serve_app.domain.specs import key_digest

    logs = Path(reliable.tmpdir) / "session_latest" / "logs"
    refusal = f"key {key_id(key_digest(api_key), cluster_key_id_secret())}: generate refused by its per-key limit"

    def refusals() -> int:
        return sum(p.read_text(errors="ignore").count(refusal) for p in logs.rglob("*secure*router*") if p.is_file())

    before = refusals()
    body = {"size": "224x224", "num_inference_steps": 4}  # 0.2 megapixel-steps
    text = "".join(json.dumps({"custom_id": f"metered-{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": {**body, "prompt": f"metered {i}"}}) + "\n" for i in range(3))
    with httpx.Client(base_url=reliable.url + "/secure", timeout=120,
                      headers={"Authorization": f"Bearer {api_key}"}) as client:
        file = client.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(text.encode()))},
                           data={"purpose": "batch"}).json()
        batch_id = client.post("/v1/batches", json={"input_file_id": file["id"], "completion_window": "24h",
                                                    "endpoint": "/v1/images/generations"}).json()["id"]
        started = time.monotonic()
        while refusals() < before + 2:  # both other lines tried and refused under the key's limit
            assert time.monotonic() - started < 300, "the key's limit never refused a batch line"
            time.sleep(0.5)
        batch = client.get(f"/v1/batches/{batch_id}").json()
        assert batch["status"] == "in_progress"
        assert batch["request_counts"] == {"total": 3, "completed": 1, "failed": 0}  # the refused ones wait
        client.post(f"/v1/batches/{batch_id}/cancel")
        batch = wait_for(client, batch_id, lambda b: b["status"] in FINISHED)
        assert batch["status"] == "cancelled" and batch["request_counts"]["completed"] == 1
