"""The ASGI app without Ray: its middlewares (key check, body limit) and the OpenAPI schema it states."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.api_keys import KeyRing
from serve_app.domain.specs import key_digest
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
