"""The Batch API's plain-Python parts: reading an input file, its bounds, the objects, webhook signatures."""

from __future__ import annotations

import json
import time

import pytest

from serve_app.domain.batches import BatchSettings, batch_object, data_url_bytes, parse_input_file, sign_webhook

ENDPOINT = "/v1/images/generations"


def line(custom_id, **overrides) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": {"prompt": "x"},
                       **overrides})


def test_each_bad_line_is_answered_on_its_own_and_the_good_ones_stay_requests():
    text = "\n".join([line("a"), "not json", line("a"), json.dumps({"method": "POST"}), line("b", method="GET"),
                      line("c", url="/v1/images/edits"), line("d", body="x"), "[1]", line("e"), ""]).encode()
    lines, refused = parse_input_file(text, ENDPOINT, BatchSettings())
    assert refused is None
    assert [(ln.custom_id, ln.error["code"] if ln.error else None) for ln in lines] == [
        ("a", None), (None, "invalid_json"), ("a", "duplicate_custom_id"), (None, "missing_custom_id"),
        ("b", "invalid_method"), ("c", "mismatched_url"), ("d", "invalid_body"), (None, "invalid_json"), ("e", None)]
    assert lines[1].error["message"].startswith("line 2:")


def test_a_file_fails_its_batch_only_when_no_request_can_be_read_from_it():
    settings = BatchSettings(max_lines=2, max_line_kb=0.2)
    assert parse_input_file(b"\n \n", ENDPOINT, settings)[1] == "the input file holds no requests"
    assert "at most 2" in parse_input_file(("\n".join([line("a"), line("b"), line("c")])).encode(), ENDPOINT,
                                           settings)[1]
    assert "not UTF-8" in parse_input_file(b"\xff\xfe", ENDPOINT, settings)[1]
    (long,), refused = parse_input_file(line("a", body={"prompt": "x" * 300}).encode(), ENDPOINT, settings)
    assert refused is None and long.error["code"] == "line_too_large"


def test_images_come_as_data_urls_and_remote_urls_are_not_fetched():
    assert data_url_bytes("data:image/png;base64,aGk=") == b"hi"
    with pytest.raises(ValueError, match="fetches no remote URLs"):
        data_url_bytes("https://example.com/a.png")
    with pytest.raises(ValueError, match="base64"):
        data_url_bytes("data:image/png,plain")
    with pytest.raises(ValueError, match="not valid base64"):
        data_url_bytes("data:image/png;base64,***")


def test_the_batch_object_is_what_openai_python_reads():
    from openai.types import Batch

    row = {"id": "batch_1", "endpoint": ENDPOINT, "input_file_id": "file-1", "completion_window": "24h",
           "status": "in_progress", "created_at": 1, "expires_at": 2, "in_progress_at": 1, "total": 3,
           "completed": 1, "failed": 1, "metadata": json.dumps({"a": "b"}),
           "errors": json.dumps([{"code": "x", "message": "y", "line": None, "param": None}])}
    batch = Batch.model_validate(batch_object(row), strict=False)
    assert batch.request_counts.total == 3 and batch.metadata == {"a": "b"} and batch.errors.data[0].code == "x"


def test_webhook_signatures_verify_with_openai_pythons_own_check():
    from openai import OpenAI
    from openai._exceptions import InvalidWebhookSignatureError

    secret = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHM="
    body = json.dumps({"id": "evt_1", "object": "event", "type": "batch.completed", "created_at": 1,
                       "data": {"id": "batch_1"}}).encode()
    headers = sign_webhook(secret, "msg_1", int(time.time()), body)
    client = OpenAI(api_key="unused", base_url="http://127.0.0.1:9")  # never called: unwrap runs locally
    event = client.webhooks.unwrap(body, headers, secret=secret)
    assert event.type == "batch.completed" and event.data.id == "batch_1"
    with pytest.raises(InvalidWebhookSignatureError):
        client.webhooks.unwrap(body + b" ", headers, secret=secret)
