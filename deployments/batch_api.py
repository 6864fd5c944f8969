"""The Files and Batches API as the router serves it: what openai-python's ``client.files`` and ``client.batches``
call, over the shared store (``deployments.batch_store``), with OpenAI's objects and imageserve's bounds.

Every object belongs to the API key that made it: another key's file or batch is not found (404), as a missing
one is. Without API keys every caller is the same caller.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from deployments.batch_runner import BatchRunner
from deployments.batch_store import BatchStore
from serve_app.domain.batches import (
    COMPLETION_WINDOWS,
    FILE_PURPOSES,
    BatchCreate,
    BatchSettings,
    batch_object,
    file_object,
)
from serve_app.domain.errors import (
    InvalidRequestError,
    LimitExceededError,
    RateLimitedError,
    ResourceNotFoundError,
    UnsupportedValueError,
)

MAX_LIST = 10_000


class BatchApi:
    """``files.create/retrieve/content/delete/list`` and ``batches.create/retrieve/list/cancel``."""

    def __init__(self, store: BatchStore, settings: BatchSettings, runner: BatchRunner) -> None:
        self.store = store
        self.settings = settings
        self.runner = runner

    # ---- files -----------------------------------------------------------------------------

    async def create_file(self, key_id: str | None, filename: str, purpose: str, data: bytes,
                          expires_after_s: int | None = None) -> dict[str, Any]:
        if purpose not in FILE_PURPOSES:
            raise UnsupportedValueError(f"purpose {purpose!r}: this service takes {', '.join(FILE_PURPOSES)}",
                                        param="purpose")
        if len(data) > self.settings.max_file_bytes:
            raise LimitExceededError(
                f"the file is {len(data)} bytes, over this service's {self.settings.max_file_bytes}", param="file")
        # As OpenAI's: batch inputs expire after 30 days (file_expiry_days), other files when expires_after says.
        lifetime = expires_after_s if expires_after_s is not None else (
            self.settings.file_expiry_days * 86400 if purpose == "batch" else None)
        row = await asyncio.to_thread(self.store.create_file, key_id, filename[:255] or "upload", purpose, data,
                                      None if lifetime is None else int(time.time() + lifetime))
        return file_object(row)

    async def _file(self, key_id: str | None, file_id: str) -> dict[str, Any]:
        self.runner.start()  # a router replica Serve just replaced resumes its batches at its first call
        row = await asyncio.to_thread(self.store.get_file, file_id, key_id)
        if row is None:
            raise ResourceNotFoundError(f"no file {file_id!r}", param="file_id")
        return row

    async def retrieve_file(self, key_id: str | None, file_id: str) -> dict[str, Any]:
        return file_object(await self._file(key_id, file_id))

    async def file_content(self, key_id: str | None, file_id: str) -> bytes:
        row = await self._file(key_id, file_id)
        try:
            return await asyncio.to_thread(self.store.file_content, row["id"])
        except FileNotFoundError:
            raise ResourceNotFoundError(f"file {file_id!r} has no content (it expired)", param="file_id") from None

    async def delete_file(self, key_id: str | None, file_id: str) -> dict[str, Any]:
        if not await asyncio.to_thread(self.store.delete_file, file_id, key_id):
            raise ResourceNotFoundError(f"no file {file_id!r}", param="file_id")
        return {"id": file_id, "object": "file", "deleted": True}

    async def list_files(self, key_id: str | None, purpose: str | None, limit: int, after: str | None,
                         order: str) -> dict[str, Any]:
        rows = await asyncio.to_thread(self.store.list_files, key_id, purpose, min(limit, MAX_LIST) + 1, after, order)
        page = [file_object(r) for r in rows[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(rows) > limit}

    # ---- batches ---------------------------------------------------------------------------

    async def create_batch(self, key_id: str | None, body: BatchCreate) -> dict[str, Any]:
        """A new batch from ``body`` (its endpoint, window and metadata already checked by its type)."""
        endpoint, window, metadata, input_file_id = (body.endpoint, body.completion_window, body.metadata,
                                                     body.input_file_id)
        row = await self._file(key_id, input_file_id)
        if row["purpose"] != "batch":
            raise InvalidRequestError(f"file {input_file_id} was uploaded with purpose {row['purpose']!r}, not "
                                      "'batch'", param="input_file_id")
        batch = await asyncio.to_thread(self.store.create_batch, key_id, endpoint, input_file_id, window,
                                        COMPLETION_WINDOWS[window], metadata, self.settings.max_active_batches_per_key)
        if batch is None:
            raise RateLimitedError(f"this key has {self.settings.max_active_batches_per_key} unfinished batches, the "
                                   "most it may have; wait for one to finish", retry_after_s=60)
        self.runner.wake()
        return batch_object(batch)

    async def _batch(self, key_id: str | None, batch_id: str) -> dict[str, Any]:
        self.runner.start()
        row = await asyncio.to_thread(self.store.get_batch, batch_id, key_id)
        if row is None:
            raise ResourceNotFoundError(f"no batch {batch_id!r}", param="batch_id")
        return row

    async def retrieve_batch(self, key_id: str | None, batch_id: str) -> dict[str, Any]:
        return batch_object(await self._batch(key_id, batch_id))

    async def list_batches(self, key_id: str | None, limit: int, after: str | None) -> dict[str, Any]:
        rows = await asyncio.to_thread(self.store.list_batches, key_id, min(limit, MAX_LIST) + 1, after)
        page = [batch_object(r) for r in rows[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(rows) > limit}

    async def cancel_batch(self, key_id: str | None, batch_id: str) -> dict[str, Any]:
        await self._batch(key_id, batch_id)
        row = await asyncio.to_thread(self.store.cancel_batch, batch_id, key_id)
        self.runner.wake()
        return batch_object(row)
