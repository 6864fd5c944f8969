"""The Batch API through the official openai client, against the running embedded default: the whole flow for
generation and edits, each output line equal to what the synchronous route answers, bad lines in the error file."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def jsonl(lines: list[dict]) -> io.BytesIO:
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    data.name = "requests.jsonl"
    return data


def finished(client, batch_id: str, deadline_s: float = 600):
    """The batch once it is in a final state (polled as a client would)."""
    started = time.monotonic()
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() - started < deadline_s, f"batch still {batch.status} after {deadline_s} s"
        time.sleep(0.2)


def answers(client, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    return {line["custom_id"]: line for line in map(json.loads, client.files.content(file_id).text.splitlines())}


def test_a_generation_batch_runs_through_the_openai_client_and_answers_as_the_route_does(openai_client):
    body = {"model": "z-image-turbo", "prompt": "a red fox", "size": "64x64", "seed": 7, "num_inference_steps": 2}
    requests = [
        {"custom_id": "fox", "method": "POST", "url": "/v1/images/generations", "body": body},
        {"custom_id": "two", "method": "POST", "url": "/v1/images/generations",
         "body": {**body, "n": 2, "seed": 11}},
        {"custom_id": "odd-size", "method": "POST", "url": "/v1/images/generations", "body": {**body, "size": "65x64"}},
        {"custom_id": "typo", "method": "POST", "url": "/v1/images/generations", "body": {**body, "n": "two"}},
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/images/edits", "body": body},
    ]
    uploaded = openai_client.files.create(file=jsonl(requests), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations",
                                         completion_window="24h", metadata={"run": "fox"})
    assert batch.status == "validating" and batch.metadata == {"run": "fox"}
    batch = finished(openai_client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 5 and batch.request_counts.completed == 2
    assert batch.request_counts.failed == 3
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    out, errors = answers(openai_client, batch.output_file_id), answers(openai_client, batch.error_file_id)
    assert sorted(out) == ["fox", "two"] and sorted(errors) == ["odd-size", "typo", "wrong-url"]

    # Each answer is what the route answers for that request: same seeds, same pixels.
    direct = openai_client.images.generate(**{k: v for k, v in body.items() if k in ("model", "prompt", "size")},
                                           extra_body={"seed": 7, "num_inference_steps": 2})
    answer = out["fox"]["response"]
    assert answer["status_code"] == 200 and answer["body"]["seeds"] == [7]
    assert len(out["two"]["response"]["body"]["data"]) == 2
    batched = Image.open(io.BytesIO(base64.b64decode(answer["body"]["data"][0]["b64_json"])))
    alone = Image.open(io.BytesIO(base64.b64decode(direct.data[0].b64_json)))
    assert batched.tobytes() == alone.tobytes()

    # Bad lines carry the route's own error body; a line that is not this batch's endpoint never ran.
    assert errors["odd-size"]["response"]["status_code"] == 422
    assert errors["odd-size"]["response"]["body"]["error"]["param"] == "size"
    assert errors["typo"]["response"]["body"]["error"]["code"] == "invalid_request"
    assert errors["wrong-url"]["response"] is None and errors["wrong-url"]["error"]["code"] == "mismatched_url"
    assert batch.id in [b.id for b in openai_client.batches.list()]


def test_an_edit_batch_takes_images_as_data_urls_and_uploaded_files(openai_client, png_file):
    red = png_file((255, 0, 0)).getvalue()
    blue_file = openai_client.files.create(file=("blue.png", png_file((0, 0, 255)).getvalue()), purpose="vision")
    data_url = "data:image/png;base64," + base64.b64encode(red).decode()
    body = {"model": "qwen-image-edit-2511", "prompt": "make it green", "size": "64x64", "seed": 3,
            "num_inference_steps": 2}
    requests = [
        {"custom_id": "url", "method": "POST", "url": "/v1/images/edits",
         "body": {**body, "images": [{"image_url": data_url}]}},
        {"custom_id": "two", "method": "POST", "url": "/v1/images/edits",
         "body": {**body, "images": [{"image_url": data_url}, {"file_id": blue_file.id}]}},
        {"custom_id": "remote", "method": "POST", "url": "/v1/images/edits",
         "body": {**body, "images": [{"image_url": "https://example.com/a.png"}]}},
        {"custom_id": "not-an-image", "method": "POST", "url": "/v1/images/edits",
         "body": {**body, "images": [{"image_url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}]}},
    ]
    uploaded = openai_client.files.create(file=jsonl(requests), purpose="batch")
    batch = finished(openai_client, openai_client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/images/edits", completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == 2 and batch.request_counts.failed == 2
    out, errors = answers(openai_client, batch.output_file_id), answers(openai_client, batch.error_file_id)
    assert sorted(out) == ["two", "url"]
    assert "fetches no remote URLs" in errors["remote"]["response"]["body"]["error"]["message"]
    assert errors["not-an-image"]["response"]["status_code"] in (400, 415)
    direct = openai_client.images.edit(model="qwen-image-edit-2511", image=png_file((255, 0, 0)),
                                       prompt="make it green", size="64x64",
                                       extra_body={"seed": 3, "num_inference_steps": 2})
    batched = out["url"]["response"]["body"]["data"][0]["b64_json"]
    assert Image.open(io.BytesIO(base64.b64decode(batched))).tobytes() == Image.open(
        io.BytesIO(base64.b64decode(direct.data[0].b64_json))).tobytes()


def test_files_and_batches_refuse_what_they_cannot_take(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        openai_client.files.content("file-missing")
    with pytest.raises(openai.UnprocessableEntityError, match="purpose"):
        openai_client.files.create(file=("a.txt", b"x"), purpose="fine-tune")
    empty = openai_client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
    failed = finished(openai_client, openai_client.batches.create(
        input_file_id=empty.id, endpoint="/v1/images/generations", completion_window="24h").id)
    assert failed.status == "failed" and "no requests" in failed.errors.data[0].message
    with pytest.raises(openai.UnprocessableEntityError, match="endpoint"):
        openai_client.batches.create(input_file_id=empty.id, endpoint="/v1/embeddings", completion_window="24h")
    listed = openai_client.files.list(purpose="batch")
    assert empty.id in [f.id for f in listed]
    assert openai_client.files.delete(empty.id).deleted
    with pytest.raises(openai.NotFoundError):
        openai_client.files.retrieve(empty.id)


def test_a_cancelled_batch_answers_every_line_once(openai_client):
    body = {"model": "z-image-turbo", "prompt": "slow", "size": "256x256", "num_inference_steps": 8}
    requests = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/images/generations", "body": body}
                for i in range(20)]
    uploaded = openai_client.files.create(file=jsonl(requests), purpose="batch")
    batch = openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations",
                                         completion_window="24h")
    while openai_client.batches.retrieve(batch.id).status == "validating":
        time.sleep(0.05)
    cancelling = openai_client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = finished(openai_client, batch.id)
    assert batch.status == "cancelled"
    out, errors = answers(openai_client, batch.output_file_id), answers(openai_client, batch.error_file_id)
    assert not set(out) & set(errors) and len(out) + len(errors) == 20
    assert batch.request_counts.completed == len(out) and batch.request_counts.failed == len(errors)
    assert all(line["error"]["code"] == "batch_cancelled" for line in errors.values())
