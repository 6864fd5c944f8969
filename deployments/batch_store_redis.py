"""The cluster store of the Batch API: state in the Redis the cluster already runs, file contents on a volume.

Same operations and guarantees as ``SqliteBatchStore`` (``deployments.batch_store``); the runner and the API call
either. Every step that must not interleave across router replicas (claiming lines, recording an answer,
creating a batch under the key's bound, ending one) is one Lua script or one MULTI/EXEC transaction, so a line
is claimed by one runner at a time and its answer recorded once.

Keys, under ``imageserve:<app>:`` (each application its own):

- ``file:<id>`` (JSON), ``files:<key>`` (by creation time), ``file_expiry`` (by expiry time);
- ``batch:<id>`` (hash), ``batches:<key>`` (by creation time), ``active:<key>`` and ``unfinished`` (sets),
  ``validating`` (by creation time);
- a batch's lines: ``body:<id>``, ``attempts:<id>``, ``done:<id>`` (outcome) and ``result:<id>`` (answer line),
  hashes by line index; ``queue`` (``<batch>:<idx>`` by the time it may run) and ``running`` (by lease end), with
  ``owner`` (member -> runner);
- ``webhook:<id>`` (JSON) and ``webhooks_due`` (by next try).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deployments.batch_files import write_contents
from serve_app.domain.batches import InputLine, new_id

INT_FIELDS = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
              "expired_at", "cancelling_at", "cancelled_at", "total", "completed", "failed")
NO_KEY = "-"  # the caller without an API key (key ids are digests, never "-")

CLAIM = """
local p, now, lease, count, owner = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local claimed = {}
local function take(m)
  local bid, idx = string.match(m, '^(.*):(%d+)$')
  if redis.call('HGET', p .. 'batch:' .. bid, 'status') ~= 'in_progress' then return end
  redis.call('ZADD', p .. 'running', now + lease, m)
  redis.call('HSET', p .. 'owner', m, owner)
  redis.call('HINCRBY', p .. 'attempts:' .. bid, idx, 1)
  table.insert(claimed, m)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', p .. 'running', '-inf', '(' .. now, 'LIMIT', 0, count)) do
  take(m)
end
if #claimed < count then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', p .. 'queue', '-inf', now, 'LIMIT', 0, count - #claimed)) do
    redis.call('ZREM', p .. 'queue', m)
    take(m)
  end
end
return claimed
"""

RECORD = """
local p, bid, idx, outcome, result = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local m = bid .. ':' .. idx
if redis.call('ZREM', p .. 'running', m) == 0 then return 0 end
redis.call('HDEL', p .. 'owner', m)
redis.call('HSET', p .. 'done:' .. bid, idx, outcome)
redis.call('HSET', p .. 'result:' .. bid, idx, result)
redis.call('HINCRBY', p .. 'batch:' .. bid, outcome == 'ok' and 'completed' or 'failed', 1)
return 1
"""

REQUEUE = """
local p, m, at = KEYS[1], ARGV[1], tonumber(ARGV[2])
if redis.call('ZREM', p .. 'running', m) == 1 then
  redis.call('HDEL', p .. 'owner', m)
  redis.call('ZADD', p .. 'queue', at, m)
end
return 0
"""

RENEW = """
local p, owner, lease_end = KEYS[1], ARGV[1], tonumber(ARGV[2])
local owners = redis.call('HGETALL', p .. 'owner')
for i = 1, #owners, 2 do
  if owners[i + 1] == owner then redis.call('ZADD', p .. 'running', 'XX', lease_end, owners[i]) end
end
return 0
"""

CLOSE = """
local p, bid = KEYS[1], ARGV[1]
local closed = 0
for i = 2, #ARGV, 2 do
  local idx, answer = ARGV[i], ARGV[i + 1]
  if redis.call('HSETNX', p .. 'done:' .. bid, idx, 'error') == 1 then
    redis.call('HSET', p .. 'result:' .. bid, idx, answer)
    redis.call('ZREM', p .. 'queue', bid .. ':' .. idx)
    redis.call('ZREM', p .. 'running', bid .. ':' .. idx)
    redis.call('HDEL', p .. 'owner', bid .. ':' .. idx)
    closed = closed + 1
  end
end
redis.call('HINCRBY', p .. 'batch:' .. bid, 'failed', closed)
return closed
"""

CREATE_BATCH = """
local p, kid, bid, max, created = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('SCARD', p .. 'active:' .. kid) >= max then return 0 end
for i = 5, #ARGV, 2 do redis.call('HSET', p .. 'batch:' .. bid, ARGV[i], ARGV[i + 1]) end
redis.call('SADD', p .. 'active:' .. kid, bid)
redis.call('SADD', p .. 'unfinished', bid)
redis.call('ZADD', p .. 'validating', created, bid)
redis.call('ZADD', p .. 'batches:' .. kid, created, bid)
return 1
"""

CLAIM_VALIDATION = """
local p, now, lease = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
for _, bid in ipairs(redis.call('ZRANGE', p .. 'validating', 0, -1)) do
  local lease_end = tonumber(redis.call('HGET', p .. 'batch:' .. bid, 'lease_until') or '0')
  if redis.call('HGET', p .. 'batch:' .. bid, 'status') == 'validating' and lease_end < now then
    redis.call('HSET', p .. 'batch:' .. bid, 'lease_until', now + lease)
    return bid
  end
end
return false
"""

BEGIN_FINALIZING = """
local b, from, now, lease = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HGET', b, 'status') ~= from then return 0 end
if tonumber(redis.call('HGET', b, 'lease_until') or '0') >= now then return 0 end
if from == 'in_progress' or from == 'finalizing' then
  redis.call('HSET', b, 'status', 'finalizing')
  redis.call('HSETNX', b, 'finalizing_at', math.floor(now))
end
redis.call('HSET', b, 'lease_until', now + lease)
return 1
"""

DUE_WEBHOOKS = """
local p, now, lease = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', p .. 'webhooks_due', '-inf', now)
for _, id in ipairs(due) do redis.call('ZADD', p .. 'webhooks_due', now + lease, id) end
return due
"""


class RedisBatchStore:
    """``SqliteBatchStore``'s operations over Redis; file contents under ``<state_dir>/files``."""

    def __init__(self, client: Any, app: str, state_dir: str | os.PathLike) -> None:
        self.redis = client
        self.p = f"imageserve:{app}:"
        self.files_dir = Path(state_dir) / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._scripts = {name: client.register_script(code) for name, code in (
            ("claim", CLAIM), ("record", RECORD), ("requeue", REQUEUE), ("renew", RENEW), ("close", CLOSE),
            ("create_batch", CREATE_BATCH), ("claim_validation", CLAIM_VALIDATION),
            ("begin_finalizing", BEGIN_FINALIZING), ("due_webhooks", DUE_WEBHOOKS))}

    @classmethod
    def connect(cls, url: str, app: str, state_dir: str, password: str | None = None,
                ca_cert: str | None = None) -> RedisBatchStore:
        import redis

        # redis-py's 5 s socket timeout turns a busy node's slow answer into a failed tick: a store call may wait
        # 30 s, as SQLite's lock wait does (the tick that waits holds nothing but its own lines' leases).
        options: dict[str, Any] = {"password": password, "decode_responses": True, "socket_timeout": 30,
                                   "socket_connect_timeout": 30}
        if ca_cert:
            options["ssl_ca_certs"] = ca_cert
        return cls(redis.Redis.from_url(url, **options), app, state_dir)

    def _run(self, script: str, *args: Any) -> Any:
        return self._scripts[script](keys=[self.p], args=list(args))

    @staticmethod
    def _kid(key_id: str | None) -> str:
        return key_id if key_id is not None else NO_KEY

    # ---- files ------------------------------------------------------------------------------

    def create_file(self, key_id: str | None, filename: str, purpose: str, data: bytes,
                    expires_at: int | None) -> dict[str, Any]:
        row = write_contents(self.files_dir, data, key_id=key_id, filename=filename, purpose=purpose,
                             expires_at=expires_at)
        file_id = row["id"]
        with self.redis.pipeline() as tx:
            tx.set(self.p + "file:" + file_id, json.dumps(row))
            # scored by the time of creation to the microsecond: created_at counts whole seconds, ids are random
            tx.zadd(self.p + "files:" + self._kid(key_id), {file_id: time.time()})
            if expires_at is not None:
                tx.zadd(self.p + "file_expiry", {file_id: expires_at})
            tx.execute()
        return row

    def get_file(self, file_id: str, key_id: str | None) -> dict[str, Any] | None:
        text = self.redis.get(self.p + "file:" + file_id)
        row = json.loads(text) if text else None
        return row if row is not None and row["key_id"] == key_id else None

    def file_content(self, file_id: str) -> bytes:
        return (self.files_dir / file_id).read_bytes()

    def list_files(self, key_id: str | None, purpose: str | None, limit: int, after: str | None,
                   order: str) -> list[dict[str, Any]]:
        ids = self.redis.zrange(self.p + "files:" + self._kid(key_id), 0, -1, desc=order == "desc")
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        rows = []
        for file_id in ids:
            row = self.get_file(file_id, key_id)
            if row is not None and (not purpose or row["purpose"] == purpose):
                rows.append(row)
                if len(rows) == limit:
                    break
        return rows

    def delete_file(self, file_id: str, key_id: str | None) -> bool:
        if self.get_file(file_id, key_id) is None:
            return False
        with self.redis.pipeline() as tx:
            tx.delete(self.p + "file:" + file_id)
            tx.zrem(self.p + "files:" + self._kid(key_id), file_id)
            tx.zrem(self.p + "file_expiry", file_id)
            deleted = tx.execute()[0]
        (self.files_dir / file_id).unlink(missing_ok=True)
        return bool(deleted)

    def expire_files(self, now: int) -> int:
        expired = self.redis.zrangebyscore(self.p + "file_expiry", "-inf", now)
        for file_id in expired:
            text = self.redis.get(self.p + "file:" + file_id)
            if text:
                self.delete_file(file_id, json.loads(text)["key_id"])
            self.redis.zrem(self.p + "file_expiry", file_id)
        return len(expired)

    # ---- batches ----------------------------------------------------------------------------

    def _row(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(self.p + "batch:" + batch_id)
        if not raw:
            return None
        row: dict[str, Any] = {field: None for field in ("key_id", "model", "output_file_id", "error_file_id",
                                                         "errors", "metadata", "lease_until", *INT_FIELDS)}
        for field, value in raw.items():
            row[field] = int(value) if field in INT_FIELDS else float(value) if field == "lease_until" else value
        row["key_id"] = None if raw.get("key_id", NO_KEY) == NO_KEY else raw["key_id"]
        for count in ("total", "completed", "failed"):
            row[count] = row[count] or 0
        return row

    def create_batch(self, key_id: str | None, endpoint: str, input_file_id: str, completion_window: str,
                     window_s: int, metadata: dict[str, str] | None, max_active: int) -> dict[str, Any] | None:
        now = int(time.time())
        batch_id = new_id("batch_")
        fields = {"id": batch_id, "key_id": self._kid(key_id), "endpoint": endpoint, "input_file_id": input_file_id,
                  "completion_window": completion_window, "status": "validating", "created_at": now,
                  "expires_at": now + window_s, "total": 0, "completed": 0, "failed": 0}
        if metadata:
            fields["metadata"] = json.dumps(metadata)
        pairs = [item for pair in fields.items() for item in pair]
        if not self._run("create_batch", self._kid(key_id), batch_id, max_active, time.time(), *pairs):
            return None
        return self.get_batch(batch_id, key_id)

    def get_batch(self, batch_id: str, key_id: str | None) -> dict[str, Any] | None:
        row = self._row(batch_id)
        return row if row is not None and row["key_id"] == key_id else None

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        return self._row(batch_id)

    def list_batches(self, key_id: str | None, limit: int, after: str | None) -> list[dict[str, Any]]:
        ids = self.redis.zrange(self.p + "batches:" + self._kid(key_id), 0, -1, desc=True)
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        return [row for row in map(self._row, ids[:limit]) if row is not None]

    def _members(self, batch_id: str, total: int) -> list[str]:
        return [f"{batch_id}:{idx}" for idx in range(total)]

    def cancel_batch(self, batch_id: str, key_id: str | None) -> dict[str, Any] | None:
        row = self.get_batch(batch_id, key_id)
        if row is not None and row["status"] in ("validating", "in_progress"):
            with self.redis.pipeline() as tx:
                tx.hset(self.p + "batch:" + batch_id,
                        mapping={"status": "cancelling", "cancelling_at": int(time.time())})
                tx.zrem(self.p + "validating", batch_id)
                members = self._members(batch_id, row["total"])
                if members:
                    tx.zrem(self.p + "queue", *members)  # queued lines will not run; running ones finish
                tx.execute()
        return self.get_batch(batch_id, key_id)

    def claim_validation(self, owner_lease_s: float) -> dict[str, Any] | None:
        batch_id = self._run("claim_validation", time.time(), owner_lease_s)
        return self._row(batch_id) if batch_id else None

    def start_batch(self, batch_id: str, lines: list[InputLine], bad: list[tuple[InputLine, str]],
                    model: str | None) -> None:
        import redis

        key = self.p + "batch:" + batch_id
        with self.redis.pipeline() as tx:
            try:
                tx.watch(key)
                if tx.hget(key, "status") != "validating":
                    return  # cancelled meanwhile, or another validator won
                created = float(tx.hget(key, "created_at"))
                tx.multi()
                if lines:
                    tx.hset(self.p + "body:" + batch_id, mapping={
                        str(ln.index): json.dumps({"custom_id": ln.custom_id, "body": ln.body}) for ln in lines})
                    # The queue's score is when a line may run: the batch's creation, in line order.
                    tx.zadd(self.p + "queue", {f"{batch_id}:{ln.index}": created + ln.index * 1e-6 for ln in lines})
                if bad:
                    tx.hset(self.p + "done:" + batch_id, mapping={str(ln.index): "error" for ln, _ in bad})
                    tx.hset(self.p + "result:" + batch_id, mapping={str(ln.index): answer for ln, answer in bad})
                fields = {"status": "in_progress", "in_progress_at": int(time.time()), "total": len(lines) + len(bad),
                          "failed": len(bad)}
                if model:
                    fields["model"] = model
                tx.hset(key, mapping=fields)
                tx.hdel(key, "lease_until")
                tx.zrem(self.p + "validating", batch_id)
                tx.execute()
            except redis.WatchError:
                return  # the batch changed under us (a cancel): the next tick sees it as it is

    def fail_batch(self, batch_id: str, code: str, message: str) -> bool:
        row = self._row(batch_id)
        if row is None or row["status"] != "validating":
            return False
        errors = json.dumps([{"code": code, "message": message, "line": None, "param": None}])
        with self.redis.pipeline() as tx:
            tx.hset(self.p + "batch:" + batch_id, mapping={"status": "failed", "failed_at": int(time.time()),
                                                           "errors": errors})
            tx.hdel(self.p + "batch:" + batch_id, "lease_until")
            self._unlist(tx, batch_id, row["key_id"])
            tx.execute()
        return True

    def _unlist(self, tx: Any, batch_id: str, key_id: str | None) -> None:
        tx.zrem(self.p + "validating", batch_id)
        tx.srem(self.p + "unfinished", batch_id)
        tx.srem(self.p + "active:" + self._kid(key_id), batch_id)

    # ---- lines ------------------------------------------------------------------------------

    def claim_lines(self, owner: str, count: int, lease_s: float) -> list[dict[str, Any]]:
        rows = []
        for member in self._run("claim", time.time(), lease_s, count, owner):
            batch_id, _, idx = member.rpartition(":")
            batch = self._row(batch_id)
            line = json.loads(self.redis.hget(self.p + "body:" + batch_id, idx))
            rows.append({"batch_id": batch_id, "idx": int(idx), "custom_id": line["custom_id"],
                         "body": json.dumps(line["body"]), "key_id": batch["key_id"], "endpoint": batch["endpoint"],
                         "attempts": int(self.redis.hget(self.p + "attempts:" + batch_id, idx)) - 1})
        return rows

    def renew(self, owner: str, lease_s: float) -> None:
        self._run("renew", owner, time.time() + lease_s)

    def record(self, batch_id: str, idx: int, ok: bool, result: str) -> bool:
        return bool(self._run("record", batch_id, idx, "ok" if ok else "error", result))

    def requeue(self, batch_id: str, idx: int, delay_s: float) -> None:
        self._run("requeue", f"{batch_id}:{idx}", time.time() + delay_s)

    def line_counts(self) -> dict[str, Any]:
        oldest = None
        for batch_id in self.redis.smembers(self.p + "unfinished"):
            row = self._row(batch_id)
            if row and row["status"] == "in_progress" and row["completed"] + row["failed"] < row["total"]:
                oldest = min(oldest or row["in_progress_at"], row["in_progress_at"])
        return {"queued": self.redis.zcard(self.p + "queue"), "running": self.redis.zcard(self.p + "running"),
                "backlog_age_s": 0.0 if oldest is None else max(0.0, time.time() - oldest)}

    # ---- the end of a batch ----------------------------------------------------------------

    def _running_of(self, batch_id: str, now: float) -> list[str]:
        return [m for m in self.redis.zrangebyscore(self.p + "running", now, "+inf")
                if m.rpartition(":")[0] == batch_id]

    def due_to_finish(self, now: int) -> list[dict[str, Any]]:
        due = []
        for batch_id in self.redis.smembers(self.p + "unfinished"):
            row = self._row(batch_id)
            if row is None:
                continue
            status = row["status"]
            if ((status == "in_progress" and row["completed"] + row["failed"] >= row["total"])
                    or (status == "cancelling" and not self._running_of(batch_id, time.time()))
                    or (status in ("in_progress", "validating") and row["expires_at"] <= now)
                    or (status == "finalizing" and (row["lease_until"] or 0) < time.time())):
                due.append(row)
        return due

    def begin_finalizing(self, batch_id: str, from_status: str, lease_s: float) -> bool:
        return bool(self._scripts["begin_finalizing"](keys=[self.p + "batch:" + batch_id],
                                                      args=[from_status, time.time(), lease_s]))

    def unfinished_lines(self, batch_id: str) -> list[dict[str, Any]]:
        row = self._row(batch_id)
        done = set(self.redis.hkeys(self.p + "done:" + batch_id))
        unfinished = []
        for idx in range(row["total"] if row else 0):
            if str(idx) not in done:
                line = self.redis.hget(self.p + "body:" + batch_id, str(idx))
                unfinished.append({"idx": idx, "custom_id": json.loads(line)["custom_id"] if line else None,
                                   "status": "unfinished"})
        return unfinished

    def close_lines(self, batch_id: str, answers: dict[int, str]) -> None:
        if answers:
            self._run("close", batch_id, *[item for idx, answer in answers.items() for item in (idx, answer)])

    def results(self, batch_id: str, outcome: str) -> Iterator[str]:
        done = self.redis.hgetall(self.p + "done:" + batch_id)
        chosen = sorted((int(idx) for idx, got in done.items() if got == outcome))
        for start in range(0, len(chosen), 500):
            yield from self.redis.hmget(self.p + "result:" + batch_id, [str(i) for i in chosen[start:start + 500]])

    def end_batch(self, batch_id: str, status: str, output_file_id: str | None, error_file_id: str | None,
                  webhook: tuple[str, bytes] | None) -> None:
        row = self._row(batch_id)
        fields = {"status": status, f"{status}_at": int(time.time())}
        fields.update({k: v for k, v in (("output_file_id", output_file_id), ("error_file_id", error_file_id)) if v})
        with self.redis.pipeline() as tx:
            tx.hset(self.p + "batch:" + batch_id, mapping=fields)
            tx.hdel(self.p + "batch:" + batch_id, "lease_until")
            for part in ("body:", "attempts:", "done:", "result:"):  # the files hold the answers now
                tx.delete(self.p + part + batch_id)
            self._unlist(tx, batch_id, row["key_id"] if row else None)
            if webhook is not None:
                hook_id = new_id("msg_")
                tx.set(self.p + "webhook:" + hook_id, json.dumps({
                    "id": hook_id, "url": webhook[0], "body": webhook[1].decode(), "attempts": 0,
                    "delivered_at": None, "last_error": None}))
                tx.zadd(self.p + "webhooks_due", {hook_id: time.time()})
            tx.execute()

    # ---- the webhook outbox ----------------------------------------------------------------

    def _hook(self, hook_id: str) -> dict[str, Any]:
        hook = json.loads(self.redis.get(self.p + "webhook:" + hook_id))
        hook["body"] = hook["body"].encode()
        return hook

    def due_webhooks(self, lease_s: float) -> list[dict[str, Any]]:
        return [self._hook(hook_id) for hook_id in self._run("due_webhooks", time.time(), lease_s)]

    def webhook_sent(self, webhook_id: str, delivered: bool, next_at: float | None, error: str | None) -> None:
        hook = json.loads(self.redis.get(self.p + "webhook:" + webhook_id))
        hook["attempts"] += 1
        hook["last_error"] = None if delivered else error
        if delivered:
            hook["delivered_at"] = time.time()
        with self.redis.pipeline() as tx:
            tx.set(self.p + "webhook:" + webhook_id, json.dumps(hook))
            if delivered or next_at is None:  # delivered, or out of attempts: kept, undelivered, with why
                tx.zrem(self.p + "webhooks_due", webhook_id)
            else:
                tx.zadd(self.p + "webhooks_due", {webhook_id: next_at})
            tx.execute()

    def webhooks(self) -> list[dict[str, Any]]:
        hooks = []
        for key in self.redis.scan_iter(self.p + "webhook:*"):
            hook = json.loads(self.redis.get(key))
            hooks.append({k: hook[k] for k in ("id", "url", "attempts", "delivered_at", "last_error")})
        return hooks
