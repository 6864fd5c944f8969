"""Streams under faults: an error after the stream began arrives as an error event with the body the JSON
answer would have had."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def sse_events(text: str) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def test_an_error_after_the_stream_started_is_an_error_event_with_the_json_answers_body(http, encoded):
    from serve_app.engines.gpu_doubles import OOM_TRIGGER  # TEST DOUBLE: a CUDA OOM on this prompt

    files = [("image", ("a.png", encoded("PNG"), "image/png"))]
    data = {"model": "qwen-image-edit-2509", "size": "64x64", "num_inference_steps": "2", "prompt": OOM_TRIGGER}
    streamed = http.post("/v1/images/edits", files=files, data={**data, "stream": "true", "partial_images": "1"})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    (event,) = sse_events(streamed.text)
    plain = http.post("/v1/images/edits", files=files, data=data)
    assert plain.status_code == 503
    assert event == ("error", plain.json())
    assert event[1]["error"]["code"] == "out_of_memory"
