"""The batch runner and its stores without Ray: leases, exactly-once results, expiry, retries and webhooks, each
over the embedded SQLite store and over the cluster's Redis (a real redis-server on loopback, with TLS and a
password, as cluster/deploy/redis.yaml runs it).

Lines run on a real tiny Z-Image replica in this process, reached directly instead of through the router (the
integration tests take the router's path over HTTP). A "router replica that dies" is a runner whose tasks are
cancelled before they record anything, exactly what a killed process leaves in the store.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.batch_runner import BatchRunner
from deployments.batch_store import SqliteBatchStore
from deployments.batch_store_redis import RedisBatchStore
from deployments.model_replica import ModelReplica
from serve_app.domain.batches import BatchSettings
from serve_app.domain.config import parse_config
from serve_app.domain.errors import RateLimitedError
from serve_app.domain.specs import resolve_application

ENDPOINT = "/v1/images/generations"


@pytest.fixture(scope="module")
def z_replica(tiny_models):
    config = parse_config({"device": {"device": "cpu"}, "serving": {"warmup": False},
                           "models": {"z-image-turbo": {"source": str(tiny_models["z-image-turbo"])}}})
    (spec,) = resolve_application(config).replicas
    replica = ModelReplica(spec)
    yield replica
    replica.shutdown()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from tests.cluster.redis_support import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def new_store(request, tmp_path):
    """``new_store()``: an empty store of the parameter's kind, its file contents under ``tmp_path``."""
    if request.param == "sqlite":
        return lambda: SqliteBatchStore(tmp_path)
    from tests.cluster.redis_support import PASSWORD

    server = request.getfixturevalue("redis_server")
    app = f"test-{tmp_path.name}"  # each test its own keys
    return lambda: RedisBatchStore.connect(f"rediss://127.0.0.1:{server.port}/0", app, str(tmp_path), PASSWORD,
                                           str(server.ca_cert))


def settings(tmp_path, **overrides) -> BatchSettings:
    return BatchSettings(state_dir=str(tmp_path), poll_interval_s=0.05, **overrides)


def submit(store, count: int, window_s: int = 86400) -> str:
    """A batch of ``count`` generation lines, as batches.create leaves it (validating)."""
    text = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": ENDPOINT,
                               "body": {"prompt": f"prompt {i}", "seed": i, "num_inference_steps": 2}}) + "\n"
                   for i in range(count))
    file = store.create_file(None, "in.jsonl", "batch", text.encode(), None)
    return store.create_batch(None, ENDPOINT, file["id"], "24h", window_s, None, 10)["id"]


async def until(condition, tick, deadline_s: float = 300.0):
    """Tick the runner(s) until ``condition()``; the deadline only ends a test that would otherwise hang."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < deadline_s, "the runner never got there"
        await tick()
        await asyncio.sleep(0.05)


def answered(store, batch_id: str) -> tuple[list[str], list[str]]:
    batch = store.batch(batch_id)
    ids = []
    for file_id in (batch["output_file_id"], batch["error_file_id"]):
        lines = store.file_content(file_id).decode().splitlines() if file_id else []
        ids.append([json.loads(line)["custom_id"] for line in lines])
    return ids[0], ids[1]


def test_lines_a_dead_router_replica_held_run_again_elsewhere_and_each_is_recorded_once(
        tmp_path, new_store, z_replica):
    store = new_store()
    batch_id = submit(store, 6)
    calls: list[str] = []

    async def answer(task, request, key_id):
        calls.append(request.prompt)
        return await z_replica.run(request, 64, 64)

    async def hangs(task, request, key_id):
        await asyncio.Event().wait()

    async def main():
        dying = BatchRunner(store, settings(tmp_path, lease_s=0.5, lines_in_flight=2), hangs, "router-a")
        await dying.tick()  # validates the batch and claims two lines
        assert len(dying.in_flight) == 2
        await dying.stop()  # the replica dies: its lines stay leased to it, unanswered
        survivor = BatchRunner(store, settings(tmp_path, lease_s=30, lines_in_flight=2), answer, "router-b")
        await until(lambda: store.batch(batch_id)["status"] == "completed", survivor.tick)
        await survivor.stop()

    asyncio.run(main())
    out, errors = answered(store, batch_id)
    assert sorted(out) == [f"line-{i}" for i in range(6)] and errors == []
    assert sorted(calls) == [f"prompt {i}" for i in range(6)]  # each line ran once to its end
    assert store.batch(batch_id)["completed"] == 6


def test_a_late_answer_from_a_lapsed_lease_is_not_recorded_twice(tmp_path, new_store):
    store = new_store()
    batch_id = submit(store, 1)
    runner = BatchRunner(store, settings(tmp_path), None, "router-a")
    asyncio.run(runner.validate(store.claim_validation(30)))
    (first,) = store.claim_lines("router-a", 1, lease_s=0.0)  # its lease lapses at once
    (again,) = store.claim_lines("router-b", 1, lease_s=30)
    assert (first["idx"], again["idx"]) == (0, 0) and again["attempts"] == 1
    assert store.record(batch_id, 0, True, "{}") is True
    assert store.record(batch_id, 0, True, "{}") is False  # router-a's late answer
    assert store.batch(batch_id)["completed"] == 1


def test_a_rate_limited_line_waits_and_runs_again_instead_of_failing(tmp_path, new_store, z_replica):
    store = new_store()
    batch_id = submit(store, 2)
    refusals = []

    async def answer(task, request, key_id):
        if not refusals:
            refusals.append(request.prompt)
            raise RateLimitedError("over this key's cost per minute", retry_after_s=1)
        return await z_replica.run(request, 64, 64)

    async def main():
        runner = BatchRunner(store, settings(tmp_path, max_attempts=1), answer, "router")
        await until(lambda: store.batch(batch_id)["status"] == "completed", runner.tick)
        await runner.stop()

    asyncio.run(main())
    assert sorted(answered(store, batch_id)[0]) == ["line-0", "line-1"] and len(refusals) == 1


def test_a_batch_past_its_window_expires_with_its_unrun_lines_in_the_error_file(tmp_path, new_store):
    store = new_store()
    batch_id = submit(store, 3, window_s=0)  # its window has passed by the first tick

    async def hangs(task, request, key_id):
        await asyncio.Event().wait()

    async def main():
        runner = BatchRunner(store, settings(tmp_path, lines_in_flight=1), hangs, "router")
        await until(lambda: store.batch(batch_id)["status"] == "expired", runner.tick)
        await runner.stop()

    asyncio.run(main())
    out, errors = answered(store, batch_id)
    assert out == [] and sorted(errors) == ["line-0", "line-1", "line-2"]
    error_file = store.file_content(store.batch(batch_id)["error_file_id"]).decode().splitlines()
    assert {json.loads(line)["error"]["code"] for line in error_file} == {"batch_expired"}


class Receiver(BaseHTTPRequestHandler):
    """A webhook endpoint on loopback that refuses its first delivery (500) and takes the rest."""

    received: list[tuple[dict, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(500 if len(type(self).received) == 1 else 200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_finished_batch_posts_a_signed_webhook_that_openai_python_verifies_retrying_a_failed_delivery(
        tmp_path, new_store, z_replica, monkeypatch):
    from openai import OpenAI

    from serve_app.runner import free_port

    secret = "whsec_" + "dGhlLXdlYmhvb2stc2VjcmV0"
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", secret)
    Receiver.received.clear()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = new_store()
    batch_id = submit(store, 1)

    async def answer(task, request, key_id):
        return await z_replica.run(request, 64, 64)

    async def main():
        runner = BatchRunner(store, settings(tmp_path, webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
                                             webhook_secret_env="TEST_WEBHOOK_SECRET"), answer, "router")
        await until(lambda: any(hook["delivered_at"] for hook in store.webhooks()), runner.tick)
        await runner.stop()

    try:
        asyncio.run(main())
    finally:
        server.shutdown()
    (first_headers, first_body), (headers, body) = Receiver.received
    assert first_headers["webhook-id"] == headers["webhook-id"] and first_body == body  # one event, tried twice
    event = OpenAI(api_key="unused", base_url="http://127.0.0.1:9").webhooks.unwrap(body, headers, secret=secret)
    assert event.type == "batch.completed" and event.data.id == batch_id
    assert store.webhooks()[0]["attempts"] == 2


def test_a_webhook_url_without_its_secret_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGESERVE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="IMAGESERVE_WEBHOOK_SECRET is not"):
        BatchRunner(SqliteBatchStore(tmp_path), settings(tmp_path, webhook_url="http://127.0.0.1:9/hook"), None, "r")


def test_the_files_and_batches_api_answers_the_same_over_either_store(tmp_path, new_store):
    """What openai-python's files and batches calls do, at the API layer, over both stores: listing and paging,
    per-key objects, the key's bound on unfinished batches, and a cancel that stops the running line and ends the
    batch."""
    from deployments.batch_api import BatchApi
    from serve_app.domain.batches import BatchCreate
    from serve_app.domain.errors import RateLimitedError, ResourceNotFoundError

    store = new_store()

    async def hangs(task, request, key_id):
        await asyncio.Event().wait()

    async def main():
        runner = BatchRunner(store, settings(tmp_path, max_active_batches_per_key=2, lines_in_flight=1), hangs,
                             "router")
        api = BatchApi(store, runner.settings, runner)
        lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": ENDPOINT,
                                    "body": {"prompt": "x"}}) + "\n" for i in range(3)).encode()
        files = [await api.create_file("key-a", f"f{i}.jsonl", "batch", lines) for i in range(3)]
        listed = await api.list_files("key-a", "batch", limit=2, after=None, order="desc")
        assert [f["id"] for f in listed["data"]] == [f["id"] for f in files[::-1][:2]] and listed["has_more"]
        rest = await api.list_files("key-a", None, limit=10, after=listed["last_id"], order="desc")
        assert [f["id"] for f in rest["data"]] == [files[0]["id"]]
        assert (await api.list_files("key-b", None, limit=10, after=None, order="desc"))["data"] == []
        with pytest.raises(ResourceNotFoundError):
            await api.retrieve_file("key-b", files[0]["id"])  # another key's file is not found
        assert await api.file_content("key-a", files[0]["id"]) == lines

        def body(file: dict, **extra) -> BatchCreate:
            return BatchCreate(input_file_id=file["id"], endpoint=ENDPOINT, completion_window="24h", **extra)

        first = await api.create_batch("key-a", body(files[0], metadata={"run": "1"}))
        second = await api.create_batch("key-a", body(files[1]))
        with pytest.raises(RateLimitedError, match="2 unfinished batches"):
            await api.create_batch("key-a", body(files[2]))
        assert [b["id"] for b in (await api.list_batches("key-a", 10, None))["data"]] == [second["id"], first["id"]]
        await until(lambda: store.batch(first["id"])["status"] == "in_progress", runner.tick)
        await runner.tick()  # one line of the first batch runs (and hangs); its other two wait
        assert len(runner.in_flight) == 1, sorted(runner.in_flight)
        assert (await api.cancel_batch("key-a", first["id"]))["status"] == "cancelling"
        await until(lambda: store.batch(first["id"])["status"] == "cancelled", runner.tick)
        await runner.stop()
        done = await api.retrieve_batch("key-a", first["id"])
        # The running line was stopped too: all three are answered batch_cancelled, once each.
        assert done["request_counts"] == {"total": 3, "completed": 0, "failed": 3} and done["metadata"] == {"run": "1"}
        errors = (await api.file_content("key-a", done["error_file_id"])).decode().splitlines()
        assert {json.loads(line)["error"]["code"] for line in errors} == {"batch_cancelled"}
        assert (await api.delete_file("key-a", files[2]["id"]))["deleted"]
        with pytest.raises(ResourceNotFoundError):
            await api.delete_file("key-a", files[2]["id"])

    asyncio.run(main())


def test_files_expire_as_openais_do_and_the_sweep_deletes_them(tmp_path, new_store):
    from deployments.batch_api import BatchApi

    store = new_store()

    async def main():
        runner = BatchRunner(store, settings(tmp_path), None, "router")
        api = BatchApi(store, runner.settings, runner)
        batch_input = await api.create_file(None, "in.jsonl", "batch", b"{}\n")
        image = await api.create_file(None, "a.png", "vision", b"png")
        short = await api.create_file(None, "b.png", "vision", b"png", expires_after_s=3600)
        await runner.stop()
        return batch_input, image, short

    batch_input, image, short = asyncio.run(main())
    assert batch_input["expires_at"] - batch_input["created_at"] == 30 * 86400  # purpose batch: 30 days
    assert image["expires_at"] is None and short["expires_at"] - short["created_at"] == 3600
    assert store.expire_files(short["expires_at"]) == 1
    assert store.get_file(short["id"], None) is None and not (tmp_path / "files" / short["id"]).exists()
    assert store.expire_files(batch_input["expires_at"]) == 1 and store.get_file(image["id"], None) is not None
