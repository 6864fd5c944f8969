"""Streamed answers (``stream: true``, ``partial_images``): the official openai client over HTTP, Ray Serve
handles, and a caller who leaves. Errors after the start: tests/reliability/test_streaming_faults.py."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_the_openai_client_streams_a_generation_with_partial_images(openai_client):
    events = list(openai_client.images.generate(
        model="z-image-turbo", prompt="a red fox", size="96x64", stream=True, partial_images=2,
        extra_body={"seed": 3, "num_inference_steps": 6}))
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    for event in events:
        assert size_of(event.b64_json) == (96, 64) and event.size == "96x64" and event.output_format == "png"
    completed = events[-1]
    assert completed.usage.output_tokens == 24 and completed.usage.total_tokens > completed.usage.output_tokens
    assert completed.model_extra["seed"] == 3


def test_the_openai_client_streams_an_edit_and_n_images_each_get_their_events(openai_client, png_file):
    events = list(openai_client.images.edit(
        model="qwen-image-edit", image=png_file((255, 0, 0)), prompt="make it blue", size="64x64", n=2,
        stream=True, partial_images=1, extra_body={"num_inference_steps": 4, "output_format": "jpeg"}))
    partial = [e for e in events if e.type == "image_edit.partial_image"]
    completed = [e for e in events if e.type == "image_edit.completed"]
    assert sorted(e.model_extra["image_index"] for e in partial) == [0, 1]
    assert [e.model_extra["image_index"] for e in completed] == [0, 1]
    assert all(e.partial_image_index == 0 for e in partial)
    assert all(size_of(e.b64_json) == (64, 64) and e.output_format == "jpeg" for e in events)


def test_a_refusal_before_the_stream_is_an_ordinary_json_error(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        next(iter(openai_client.images.generate(model="dall-e-3", prompt="x", stream=True)))
    assert err.value.body["code"] == "model_not_found"


def test_handles_stream_typed_events(service):
    from ray import serve

    from serve_app import GenerateRequest
    from serve_app.domain.schemas import ImageResult, PartialImage, StreamAccepted

    handle = serve.get_app_handle(service.config.serving.app_name).options(stream=True)
    request = GenerateRequest(model="z-image-turbo", prompt="a lighthouse", size="64x64", seed=1,
                              num_inference_steps=4, partial_images=3, stream=True)

    async def collect():
        return [event async for event in handle.generate_stream.remote(request)]

    import asyncio

    events = asyncio.run(collect())
    assert isinstance(events[0], StreamAccepted) and events[0].preview_steps == [1, 2, 3]
    assert [type(e) for e in events[1:]] == [PartialImage] * 3 + [ImageResult]
    assert [e.step for e in events[1:4]] == [1, 2, 3]
    assert events[-1].seeds == [1]


def test_a_caller_who_leaves_a_stream_stops_its_denoising_and_the_router_logs_no_error(service):
    from pathlib import Path

    import httpx

    from tests.reliability.test_overload_and_timeouts import replica_info_of_any, steps_of, wait_for_cancellation

    before = replica_info_of_any("gen-z-image-turbo")
    body = {"model": "z-image-turbo", "prompt": "watched, then left", "size": "512x512", "num_inference_steps": 100,
            "stream": True, "partial_images": 3}
    with httpx.Client(base_url=service.url, timeout=120) as client:
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("event: image_generation.partial_image"):
                    break  # the first preview (after 25 of 100 steps): leave
        done, total = steps_of(wait_for_cancellation("gen-z-image-turbo", before)["last_cancelled"])
        assert total == 100 and 25 <= done < total  # 28 here: the steps run while the cancellation travels
        # A request answered by the router's event loop after the cancellation reached the replica: the stream's
        # tear-down (a few steps, each queued at once, no I/O) ran on that loop before this request's many.
        assert client.get("/healthz").status_code == 200
    # Closing the stream's events while a task was still inside them logged "RuntimeError: aclose(): asynchronous
    # generator is already running" with a traceback, on the router's stderr, on every disconnect.
    logs = Path(service.tmpdir) / "session_latest" / "logs"
    for path in [*logs.glob("*.err"), *logs.glob("serve/*.log")]:
        assert "asynchronous generator is already running" not in path.read_text(errors="ignore"), path
