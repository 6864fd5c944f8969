"""Server-Sent Events of a streamed request, as openai-python parses them (docs/streaming.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pybase64
from fastapi.responses import StreamingResponse

from serve_app.domain.errors import ImageServeError, InternalError
from serve_app.domain.schemas import (
    EditRequest,
    GenerateRequest,
    ImageResult,
    PartialImage,
    StreamAccepted,
)
from serve_app.domain.specs import HttpSpec

logger = logging.getLogger(__name__)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_events(event: PartialImage | ImageResult, prefix: str, request: GenerateRequest | EditRequest,
                  internals: bool) -> list[bytes]:
    """The SSE events of one stream item, as openai-python's ImageGenStreamEvent / ImageEditStreamEvent parse
    them: a partial image, or one completed event per image (each carrying the request's usage). imageserve
    adds ``image_index`` (which of the n images) and, on completed events, ``seed`` and ``model`` (and, with
    ``internals``, ``pool`` and ``gpu_class``)."""
    common = {"background": "opaque", "created_at": int(time.time()), "quality": request.quality or "auto",
              "size": f"{event.width}x{event.height}", "output_format": event.output_format}
    if isinstance(event, PartialImage):
        return [_sse(f"{prefix}.partial_image", {
            "type": f"{prefix}.partial_image", "b64_json": pybase64.b64encode_as_string(event.image),
            "partial_image_index": event.partial_image_index, "image_index": event.image_index, **common})]
    answer = event.to_openai(internals=internals)
    # With internals, where it ran too, as the plain answer says it (the console labels downloads with it).
    where = {"pool": answer["pool"], "gpu_class": answer["gpu_class"]} if internals else {}
    return [_sse(f"{prefix}.completed", {
        "type": f"{prefix}.completed", "b64_json": image["b64_json"], "usage": answer["usage"],
        "image_index": index, "seed": image["seed"], "model": answer["model"], **where, **common})
        for index, image in enumerate(answer["data"])]


async def event_stream(events: AsyncIterator[StreamAccepted | PartialImage | ImageResult], prefix: str,
                       request: GenerateRequest | EditRequest, http: HttpSpec) -> StreamingResponse:
    """Server-Sent Events of ``events``, started once the first one (``StreamAccepted``) says a replica took the
    request: a refusal before that (bad input, a per-key limit, a full queue) raises, and is answered as JSON
    with its status. Later errors arrive as an ``error`` event with the same body; a silent stretch (queued,
    or slow steps) gets an SSE comment every ``http.stream_keepalive_s`` so proxies keep the connection."""
    iterator = aiter(events)
    await anext(iterator)

    async def body() -> AsyncIterator[bytes]:
        pending = asyncio.ensure_future(anext(iterator))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=http.stream_keepalive_s)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                except ImageServeError as err:
                    yield _sse("error", (err if http.show_internals else err.hiding_internals()).body())
                    return
                except Exception as err:
                    logger.exception("a stream failed")
                    yield _sse("error", InternalError(f"the stream failed: {type(err).__name__}").body())
                    return
                for chunk in stream_events(event, prefix, request, http.show_internals):
                    yield chunk
                pending = asyncio.ensure_future(anext(iterator))
        finally:
            await _close(iterator, pending)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _close(iterator: AsyncIterator[Any], pending: asyncio.Future) -> None:
    """Stop the events of a stream whose caller left (the replica stops denoising) or that ended.

    ``pending`` (a task awaiting the iterator's next event) may still be running the generator: it is cancelled
    and waited for before ``aclose``, which raises "aclose(): asynchronous generator is already running" on a
    generator another task is inside. Shielded: Starlette cancels a stream whose client left with an anyio cancel
    scope, which cancels every await of this task again until the scope exits; unshielded, the wait would end there
    and ``aclose`` never run, leaving a generator whose next event had just arrived at its yield until garbage
    collection, and with it the router's clean-up (the key's in-flight slot, the replica's stream)."""
    with anyio.CancelScope(shield=True):
        pending.cancel()
        await asyncio.wait({pending})
        if not pending.cancelled():
            pending.exception()  # retrieved, so asyncio does not log "exception was never retrieved"
        await iterator.aclose()
