"""The ASGI app without Ray: its middlewares (key check, body limit) and the OpenAPI schema it states."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.openai_api import ApiKeyMiddleware, BodyLimitMiddleware


def app_with(middleware, **kwargs):
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    app.add_middleware(middleware, **kwargs)
    return app


def test_key_middleware_passes_lifespan_and_open_paths():
    with TestClient(app_with(ApiKeyMiddleware, keys=[b"k1", b"k2"])) as client:  # runs lifespan startup
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


def openapi_schema() -> dict:
    from serve_app.openai_api import create_api

    class NoService:
        """The schema needs no service: nothing is called."""

        def record_error(self, task: str, reason: str) -> None:
            raise AssertionError("no request is made")

    return create_api(NoService()).openapi()


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
