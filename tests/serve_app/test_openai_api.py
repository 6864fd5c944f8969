"""The ASGI app without Ray: its middlewares (key check, body limit) and the OpenAPI schema it states."""

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.api_keys import KeyRing
from serve_app.domain.specs import HttpSpec, key_digest
from serve_app.openai_api import ApiKeyMiddleware, BodyLimitMiddleware


def app_with(middleware, **kwargs):
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/echo-too")
    async def echo_too(body: dict) -> dict:
        return body

    app.add_middleware(middleware, **kwargs)
    return app


def test_key_middleware_passes_lifespan_and_open_paths():
    keys = KeyRing((key_digest("k1"), key_digest("k2")), environ={})
    with TestClient(app_with(ApiKeyMiddleware, keys=keys)) as client:  # runs lifespan startup
        assert client.get("/healthz").status_code == 200
        assert client.post("/echo", json={}).status_code == 401
        assert client.post("/echo", json={}, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert client.post("/echo", json={}, headers={"Authorization": "bearer k1"}).status_code == 200


def test_body_limit_refuses_declared_and_streamed_bodies():
    with TestClient(app_with(BodyLimitMiddleware, max_bytes=100)) as client:
        assert client.post("/echo", json={"a": "x" * 200}).status_code == 413

        def chunks():
            yield b'{"a": "'
            yield b"x" * 200
            yield b'"}'

        streamed = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.post("/echo", json={"a": "small"}).status_code == 200


def create_api_without_service():
    """The app with no service behind it, for what it answers on its own (schema, refusals)."""
    from serve_app.openai_api import create_api

    class NoService:
        def record_error(self, task: str, reason: str) -> None:
            pass

    return create_api(NoService())


def openapi_schema() -> dict:
    return create_api_without_service().openapi()


def test_the_schema_declares_every_error_status_with_the_error_body():
    schema = openapi_schema()
    error_body = schema["components"]["schemas"]["ErrorBody"]
    assert set(error_body["properties"]) == {"error"}
    assert set(schema["components"]["schemas"]["ErrorDetail"]["properties"]) == {"code", "message", "param", "type"}
    for path in ("/v1/images/generations", "/v1/images/edits"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "408", "413", "415", "422", "429", "503"} <= set(responses)
        for status in ("400", "422", "429", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}
        assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]


def test_the_edit_operation_describes_its_multipart_fields_and_limits():
    schema = openapi_schema()
    body = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    fields = form["properties"]
    assert {"image", "prompt", "n", "size", "quality", "output_format", "output_compression",
            "background", "seed", "num_inference_steps", "true_cfg_scale"} <= set(fields)
    assert all(field.get("description") for field in fields.values())
    assert set(form["required"]) == {"image", "prompt"}
    assert (fields["image"]["minItems"], fields["image"]["maxItems"]) == (1, 3)
    assert "image[]" in fields["image"]["description"]  # accepted, described, not a second field


def test_the_edit_forms_fields_carry_the_request_types_and_no_null():
    schema = openapi_schema()
    body = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert not any("anyOf" in field for field in fields.values())
    assert fields["quality"]["enum"] == ["low", "medium", "high", "auto"]
    assert (fields["n"]["minimum"], fields["n"]["maximum"]) == (1, 10)
    assert (fields["output_compression"]["minimum"], fields["output_compression"]["maximum"]) == (0, 100)
    assert fields["prompt"]["pattern"] == r"\S" and fields["prompt"]["maxLength"] == 4000
    generate = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert fields["size"]["pattern"] == generate["size"]["pattern"]


def test_the_size_pattern_is_the_size_rule():
    import re

    from serve_app.domain.schemas import SIZE_SCHEMA_PATTERN, parse_size

    pattern = re.compile(SIZE_SCHEMA_PATTERN)
    for size in ("16x16", "1024x768", "4096x4096", "auto"):
        assert pattern.search(size)
    assert parse_size("4096x16") == (4096, 16)
    for size in ("0x16", "17x16", "4112x16", "16x16x16", "016x16", "1024X1024", " 16x16"):
        assert not pattern.search(size)
        with pytest.raises(ValueError):
            parse_size(size)


def test_the_json_route_takes_kilobytes_and_the_edit_route_megabytes():
    with TestClient(app_with(BodyLimitMiddleware, max_bytes=10_000, route_limits={"/echo": 100})) as client:
        refused = client.post("/echo", json={"a": "x" * 200})
        assert refused.status_code == 413 and "over the 0.1 KB limit" in refused.json()["error"]["message"]
        other = client.post("/echo-too", json={"a": "x" * 200})
        assert other.status_code != 413  # other routes keep the general limit


def test_a_junk_body_costs_kilobytes_of_answer_and_megabytes_of_memory_at_most():
    """The amplification bench/amplification.py measures, held to bounds: 9 MB of unknown keys, one 5 MB
    key, the same streamed without a length, and 60 KB of unknown keys (under the JSON limit, parsed)."""
    from bench.amplification import CASES, measure

    for case in CASES:
        row = measure(case)
        assert 400 <= row["status"] < 500, (case, row)
        assert row["response_bytes"] < 1_000 if row["status"] == 413 else row["response_bytes"] < 2_000, (case, row)
        assert row["peak_rss_growth_mb"] < 50, (case, row)


def test_a_422_names_the_first_few_invalid_fields_and_counts_the_rest():
    client = TestClient(create_api_without_service())
    body = {"prompt": "a cat", "size": "big", **{f"unknown_{i}": i for i in range(100)}, "k" * 1000: 1}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"].endswith("and 97 more") and len(error["message"]) < 1_000
    assert error["param"] == "size"


def run_asgi(app, scope_extra: dict, messages: list[dict]) -> list[dict]:
    """Drive ``app`` as a server would: the body arrives as ``messages``, then nothing more ever comes (a
    client that stopped sending). Returns what the app sent."""
    import asyncio

    async def drive():
        sent = []
        pending = list(messages)
        never = asyncio.Event()

        async def receive():
            if pending:
                return pending.pop(0)
            await never.wait()

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/echo", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], **scope_extra}
        await asyncio.wait_for(app(scope, receive, send), timeout=60)  # the bound under test is 0.2 s
        return sent

    return asyncio.run(drive())


def test_a_body_that_stops_arriving_gets_408_at_the_read_deadline():
    import json

    app = app_with(BodyLimitMiddleware, max_bytes=10_000, read_timeout_s=0.2)
    sent = run_asgi(app, {}, [{"type": "http.request", "body": b'{"a": "x', "more_body": True}])
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "body_timeout" and "0.2 s" in error["message"]
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1  # the app's own answer is dropped


def test_a_body_that_arrived_is_not_timed_afterwards():
    import json

    app = app_with(BodyLimitMiddleware, max_bytes=10_000, read_timeout_s=0.2)
    sent = run_asgi(app, {}, [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}])
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"a": 1}


def edit_form_client(**http) -> TestClient:
    from serve_app.domain.specs import HttpSpec
    from serve_app.openai_api import create_api

    class EditsRefusedBeforeTheService:
        def record_error(self, task: str, reason: str) -> None:
            pass

        async def edit(self, request, key_id=None):
            raise AssertionError("a form over its limits must not reach the service")

    return TestClient(create_api(EditsRefusedBeforeTheService(), HttpSpec(**http)))


def test_edit_forms_are_parsed_under_file_field_and_part_limits():
    client = edit_form_client(max_form_fields=20, max_form_field_bytes=5_000)
    png = ("a.png", b"\x89PNG", "image/png")
    too_many_files = client.post("/v1/images/edits", data={"prompt": "x"}, files=[("image", png)] * 4)
    assert too_many_files.status_code == 422
    assert too_many_files.json()["error"] == {"code": "limit_exceeded", "message": "at most 3 images per edit",
                                              "param": "image", "type": "invalid_request_error"}
    too_many_fields = client.post("/v1/images/edits", data={"prompt": "x", **{f"f{i}": "1" for i in range(30)}},
                                  files=[("image", png)])
    assert too_many_fields.status_code == 422 and "more than 20 form fields" in too_many_fields.text
    too_long = client.post("/v1/images/edits", data={"prompt": "x" * 6_000}, files=[("image", png)])
    assert too_long.status_code == 413
    assert too_long.json()["error"]["message"] == "a form field over the 5 KB limit"


def test_answers_hide_where_they_ran_when_internals_are_off():
    from serve_app.domain.schemas import ImageResult

    result = ImageResult(variant="z-image-turbo", images=[b"png"], seeds=[1], width=64, height=64,
                         num_inference_steps=1, timings={"queue_s": 3.0, "total_s": 4.0}, replica="r1",
                         gpu_class="h100", pool="big", created=0)
    shown = result.to_openai()
    assert shown["timings"]["queue_s"] == 3.0 and shown["replica"] == "r1" and shown["pool"] == "big"
    hidden = result.to_openai(internals=False)
    assert not {"timings", "replica", "pool", "gpu_class", "retried_from", "batch_images"} & set(hidden)
    assert hidden["model"] == "z-image-turbo" and hidden["seeds"] == [1] and hidden["data"][0]["seed"] == 1


def test_a_silent_stream_gets_keep_alive_comments_and_a_late_error_becomes_an_error_event():
    """``event_stream`` driven by hand: the events wait until the test has read a keep-alive comment, so no
    sleep decides the outcome (the keep-alive interval is 10 ms)."""
    import asyncio

    from serve_app.domain.errors import ReplicaOutOfMemoryError
    from serve_app.domain.schemas import GenerateRequest, PartialImage, StreamAccepted
    from serve_app.openai_api import event_stream

    request = GenerateRequest(prompt="x", size="64x64", stream=True, partial_images=1)
    error = ReplicaOutOfMemoryError("ran out of memory", retry_after_s=2)

    async def run() -> list[bytes]:
        kept_alive = asyncio.Event()

        async def events():
            yield StreamAccepted(variant="z-image-turbo", num_inference_steps=4, preview_steps=[2])
            await kept_alive.wait()
            yield PartialImage(image_index=0, partial_image_index=0, step=2, image=b"\x89PNG", width=64, height=64)
            raise error

        response = await event_stream(events(), "image_generation", request, HttpSpec(stream_keepalive_s=0.01))
        chunks = []
        async for chunk in response.body_iterator:
            chunks.append(chunk)
            if chunk.startswith(b":"):
                kept_alive.set()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0] == b": keep-alive\n\n"
    events = [c for c in chunks if not c.startswith(b":")]
    assert events[0].startswith(b"event: image_generation.partial_image\n")
    assert b'"partial_image_index":0' in events[0] and b'"size":"64x64"' in events[0]
    assert events[1] == b"event: error\ndata: " + json.dumps(error.body(), separators=(",", ":")).encode() + b"\n\n"


def test_a_refusal_before_the_first_event_raises_so_it_is_answered_as_json():
    import asyncio

    from serve_app.domain.errors import RateLimitedError
    from serve_app.domain.schemas import GenerateRequest
    from serve_app.openai_api import event_stream

    async def refused():
        raise RateLimitedError("over this key's limit", retry_after_s=3)
        yield  # an async generator

    with pytest.raises(RateLimitedError):
        asyncio.run(event_stream(refused(), "image_generation", GenerateRequest(prompt="x", stream=True),
                                 HttpSpec()))
