"""The batch runner: each router replica's loop that turns queued batch lines into answers.

Every router replica runs one. Each tick it validates new batches, claims lines up to ``lines_in_flight``, ends
the batches that are done, cancelled or past their window (writing their output and error files), renews the
leases of its running lines and posts due webhooks. A line runs through ``answer``, the router's own path for a
request (checks, per-key limits and charge, routing, retries), marked as background work: a model replica runs
it only while no interactive request waits, and stops it at the next denoising step when one arrives
(``deployments.batching.BatchQueue``).

What survives what: the store holds every batch, line and result. A router replica that dies leaves its lines
leased; when the lease lapses another replica (or this one, restarted) runs them again, and ``store.record``
keeps the first answer only. A model replica lost mid-line is retried by the router's own path, then by this
runner (a 503 is retried up to ``max_attempts``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from deployments.batch_store import BatchStore
from serve_app.domain.batches import (
    BATCH_ENDPOINTS,
    RETRYABLE_STATUS,
    WEBHOOK_EVENTS,
    BatchSettings,
    answer_line,
    data_url_bytes,
    parse_input_file,
    sign_webhook,
    webhook_backoff_s,
    webhook_event,
)
from serve_app.domain.errors import (
    ImageServeError,
    InternalError,
    InvalidRequestError,
    RateLimitedError,
    validation_error,
)
from serve_app.domain.schemas import EditRequest, GenerateRequest, ImageResult

logger = logging.getLogger(__name__)

Answer = Callable[[str, GenerateRequest | EditRequest, str | None], Awaitable[ImageResult]]
EXPIRED = {"code": "batch_expired", "message": "This request could not be executed before the completion window "
                                               "expired."}
CANCELLED = {"code": "batch_cancelled", "message": "This request was not run: the batch was cancelled."}
FILE_SWEEP_S = 60.0


class BatchRunner:
    """One router replica's share of the batch work.

    Args:
        store: the batch store every router replica shares.
        settings: ``serving.batch``.
        answer: runs one request as background work; returns its result or raises the route's error.
        owner: this replica's name in line leases (unique per process).
        internals: whether answers name replica, pool and timings (``serving.show_internals``).
        metrics: the router's metrics (``batch_line`` and ``batch_backlog``), or None.
    """

    def __init__(self, store: BatchStore, settings: BatchSettings, answer: Answer, owner: str,
                 internals: bool = True, metrics: Any = None) -> None:
        self.store = store
        self.settings = settings
        self._answer = answer
        self.owner = owner
        self.internals = internals
        self.metrics = metrics
        self.webhook_secret = os.environ.get(settings.webhook_secret_env) if settings.webhook_url else None
        if settings.webhook_url and not self.webhook_secret:
            raise ValueError(f"serving.batch.webhook_url is set but {settings.webhook_secret_env} is not: webhooks are "
                             "signed, so the router needs the secret (whsec_...) in that environment variable")
        self.in_flight: dict[tuple[str, int], asyncio.Task] = {}
        self._withdrawn: set[tuple[str, int]] = set()  # lines of cancelled batches this runner stopped
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._renewed = 0.0
        self._ticking: asyncio.Lock | None = None
        self._swept = 0.0

    def start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop = asyncio.get_running_loop()
            self._loop_task = self._loop.create_task(self._run())

    def wake(self) -> None:
        """Look for work now (a batch was created or cancelled here). Safe from any thread or event loop: Serve may
        call a replica's methods on another loop than the one the runner started on."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        for task in [self._loop_task, *self.in_flight.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._loop_task, *self.in_flight.values()] if t], return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as err:  # a store hiccup must not end the loop: the next tick retries
                if sys.is_finalizing() or (isinstance(err, RuntimeError) and "after shutdown" in str(err)):
                    return  # the replica is going away (Serve stops it); its leases lapse and another runner goes on
                logger.exception("batch runner tick failed: %s: %s", type(err).__name__, err)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)
            except asyncio.TimeoutError:
                pass

    async def tick(self) -> None:
        """One round: validate, claim, finish, renew, deliver, sweep. Rounds never overlap (a caller's own tick and
        the loop's would otherwise both count the free slots and claim twice as many lines)."""
        if self._ticking is None:
            self._ticking = asyncio.Lock()
        async with self._ticking:
            await self._tick()

    async def _tick(self) -> None:
        while (batch := await asyncio.to_thread(self.store.claim_validation, self.settings.lease_s)) is not None:
            await self.validate(batch)
        free = self.settings.lines_in_flight - len(self.in_flight)
        if free > 0:
            for line in await asyncio.to_thread(self.store.claim_lines, self.owner, free, self.settings.lease_s):
                key = (line["batch_id"], line["idx"])
                self.in_flight[key] = asyncio.get_running_loop().create_task(self._run_line(line))
                self.in_flight[key].add_done_callback(lambda _, key=key: self._line_done(key))
        await self._withdraw_cancelled()
        for batch in await asyncio.to_thread(self.store.due_to_finish, int(time.time())):
            await self.finish(batch)
        now = time.monotonic()
        if self.in_flight and now - self._renewed > self.settings.lease_s / 3:
            await asyncio.to_thread(self.store.renew, self.owner, self.settings.lease_s)
            self._renewed = now
        if self.settings.webhook_url:
            await self.deliver_webhooks()
        if now - self._swept > FILE_SWEEP_S:
            await asyncio.to_thread(self.store.expire_files, int(time.time()))
            self._swept = now
        if self.metrics is not None:
            counts = await asyncio.to_thread(self.store.line_counts)
            self.metrics.batch_backlog(counts["queued"], counts["running"], counts["backlog_age_s"])

    async def _withdraw_cancelled(self) -> None:
        """Stop this runner's lines of batches being cancelled: their requests end at the next denoising step, and
        the lines go back to the store unanswered, where the batch's end answers them ``batch_cancelled``."""
        for batch_id in {batch_id for batch_id, _ in self.in_flight}:
            batch = await asyncio.to_thread(self.store.batch, batch_id)
            if batch is not None and batch["status"] == "cancelling":
                for key, task in list(self.in_flight.items()):
                    if key[0] == batch_id and key not in self._withdrawn:
                        self._withdrawn.add(key)
                        task.cancel()

    def _line_done(self, key: tuple[str, int]) -> None:
        self._withdrawn.discard(key)
        self.in_flight.pop(key, None)
        self._wake.set()  # a slot is free: claim the next line now, not at the next poll

    # ---- validation ------------------------------------------------------------------------

    async def validate(self, batch: dict[str, Any]) -> None:
        """Read the batch's input file into lines (bad ones answered now), or fail the batch when it holds none."""
        try:
            data = await asyncio.to_thread(self.store.file_content, batch["input_file_id"])
        except FileNotFoundError:
            await asyncio.to_thread(self.store.fail_batch, batch["id"], "invalid_file",
                                    f"input file {batch['input_file_id']} is gone (deleted or expired)")
            return
        lines, refused = await asyncio.to_thread(parse_input_file, data, batch["endpoint"], self.settings)
        if refused is not None:
            await asyncio.to_thread(self.store.fail_batch, batch["id"], "invalid_file", refused)
            return
        good = [line for line in lines if line.error is None]
        bad = [(line, json.dumps(answer_line(line.custom_id, None, None, line.error))) for line in lines if line.error]
        models = {line.body.get("model") for line in good}
        model = models.pop() if len(models) == 1 else None
        await asyncio.to_thread(self.store.start_batch, batch["id"], good, bad, model)
        self._wake.set()

    # ---- one line -------------------------------------------------------------------------

    def request_of(self, endpoint: str, body: dict[str, Any], key_id: str | None) -> GenerateRequest | EditRequest:
        """The line's body as the route would have parsed it; the route's 422 when it does not parse."""
        try:
            if BATCH_ENDPOINTS[endpoint] == "generate":
                return GenerateRequest.model_validate(body)
            fields = dict(body)
            references = fields.pop("images", None)
            if "image" in fields:  # the multipart form's name, by habit
                references = fields.pop("image")
            if not isinstance(references, list) or not 1 <= len(references) <= 3:
                raise InvalidRequestError("images: a list of 1 to 3 references, each {\"image_url\": \"data:...\"} "
                                          "or {\"file_id\": \"file-...\"}", param="image")
            return EditRequest.model_validate({**fields, "images": [self._image(ref, key_id) for ref in references]})
        except ValidationError as err:
            raise validation_error(list(err.errors())) from None

    def _image(self, reference: Any, key_id: str | None) -> bytes:
        if isinstance(reference, dict) and isinstance(reference.get("file_id"), str):
            row = self.store.get_file(reference["file_id"], key_id)
            if row is None:
                raise InvalidRequestError(f"file {reference['file_id']} not found", param="image")
            return self.store.file_content(row["id"])
        if isinstance(reference, dict) and isinstance(reference.get("image_url"), str):
            try:
                return data_url_bytes(reference["image_url"])
            except ValueError as err:
                raise InvalidRequestError(str(err), param="image") from None
        raise InvalidRequestError("each image is {\"image_url\": \"data:...\"} or {\"file_id\": \"file-...\"}",
                                  param="image")

    async def _run_line(self, line: dict[str, Any]) -> None:
        batch_id, idx = line["batch_id"], line["idx"]
        try:
            await self._answered_line(line)
        except asyncio.CancelledError:
            if (batch_id, idx) in self._withdrawn:  # its batch is being cancelled: release the line
                await asyncio.to_thread(self.store.requeue, batch_id, idx, 0.0)
            raise  # else this runner is stopping, as a dying replica would: the lease lapses

    async def _answered_line(self, line: dict[str, Any]) -> None:
        batch_id, idx, custom_id = line["batch_id"], line["idx"], line["custom_id"]
        try:
            request = await asyncio.to_thread(self.request_of, line["endpoint"], json.loads(line["body"]),
                                              line["key_id"])
            result = await self._answer(BATCH_ENDPOINTS[line["endpoint"]], request, line["key_id"])
            answer = answer_line(custom_id, 200, json.loads(result.openai_body(internals=self.internals)))
            ok = True
        except ImageServeError as err:
            if err.status_code in RETRYABLE_STATUS and (
                    isinstance(err, RateLimitedError) or line["attempts"] + 1 < self.settings.max_attempts):
                # Overload, a per-key limit, a replica loading or lost: the line waits and runs again.
                await asyncio.to_thread(self.store.requeue, batch_id, idx, float(err.retry_after_s or 2))
                return
            err = err if self.internals else err.hiding_internals()
            answer, ok = answer_line(custom_id, err.status_code, err.body()), False
        except Exception as err:
            logger.exception("batch %s line %d failed", batch_id, idx)
            wrapped = InternalError(f"internal error: {type(err).__name__}")
            answer, ok = answer_line(custom_id, wrapped.status_code, wrapped.body()), False
        if await asyncio.to_thread(self.store.record, batch_id, idx, ok, json.dumps(answer)):
            if self.metrics is not None:
                self.metrics.batch_line("completed" if ok else "failed")

    # ---- the end of a batch ----------------------------------------------------------------

    async def finish(self, batch: dict[str, Any]) -> None:
        """End ``batch``: completed, cancelled or expired, its answers written to its output and error files."""
        now = int(time.time())
        status = batch["status"]
        if status in ("in_progress", "validating") and batch["expires_at"] <= now:
            final, unfinished_answer = "expired", EXPIRED
        elif status == "cancelling":
            final, unfinished_answer = "cancelled", CANCELLED
        else:
            final, unfinished_answer = "completed", None
        if not await asyncio.to_thread(self.store.begin_finalizing, batch["id"], status, self.settings.lease_s):
            return
        if unfinished_answer is not None:
            unfinished = await asyncio.to_thread(self.store.unfinished_lines, batch["id"])
            await asyncio.to_thread(self.store.close_lines, batch["id"], {
                line["idx"]: json.dumps(answer_line(line["custom_id"], None, None, unfinished_answer))
                for line in unfinished})
        output_id = await asyncio.to_thread(self._answers_file, batch, "ok", "output")
        error_id = await asyncio.to_thread(self._answers_file, batch, "error", "errors")
        webhook = None
        if self.settings.webhook_url:
            event = webhook_event(WEBHOOK_EVENTS[final], batch["id"])
            webhook = (self.settings.webhook_url, json.dumps(event).encode())
        await asyncio.to_thread(self.store.end_batch, batch["id"], final, output_id, error_id, webhook)
        logger.info("batch %s %s", batch["id"], final)
        self._wake.set()

    def _answers_file(self, batch: dict[str, Any], outcome: str, kind: str) -> str | None:
        text = "".join(line + "\n" for line in self.store.results(batch["id"], outcome))
        if not text:
            return None
        expires = int(time.time() + self.settings.file_expiry_days * 86400)
        return self.store.create_file(batch["key_id"], f"{batch['id']}_{kind}.jsonl", "batch_output", text.encode(),
                                      expires)["id"]

    # ---- webhooks -------------------------------------------------------------------------

    async def deliver_webhooks(self) -> None:
        """Post the due webhooks, each signed afresh (its timestamp is the try's); a failure backs off."""
        import httpx

        due = await asyncio.to_thread(self.store.due_webhooks, 30.0)
        if not due:
            return
        async with httpx.AsyncClient(timeout=10.0) as client:
            for hook in due:
                headers = sign_webhook(self.webhook_secret, hook["id"], int(time.time()), hook["body"])
                error = None
                try:
                    response = await client.post(hook["url"], content=hook["body"], headers=headers)
                    if response.is_success:
                        await asyncio.to_thread(self.store.webhook_sent, hook["id"], True, None, None)
                        continue
                    error = f"HTTP {response.status_code}"
                except httpx.HTTPError as err:
                    error = f"{type(err).__name__}: {err}"
                attempt = hook["attempts"] + 1
                next_at = (time.time() + webhook_backoff_s(attempt)
                           if attempt < self.settings.webhook_max_attempts else None)
                logger.warning("webhook %s to %s failed (%s)%s", hook["id"], hook["url"], error,
                               "" if next_at else "; giving up")
                await asyncio.to_thread(self.store.webhook_sent, hook["id"], False, next_at, error)

