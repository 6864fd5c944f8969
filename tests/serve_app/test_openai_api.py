"""The ASGI app without Ray: its middlewares (key check, body limit) and the OpenAPI schema it states."""

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.api_keys import KeyRing
from serve_app.domain.specs import HttpSpec, key_digest
from serve_app.openai_api.middlewares import ApiKeyMiddleware, BodyLimitMiddleware
from serve_app.openai_api.routes import create_api


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
    from serve_app.openai_api.routes import create_api

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


def test_a_body_of_which_no_byte_arrived_is_a_503_to_retry_not_the_callers_fault():
    """What a request re-sent by Serve's router looks like when the router replica that first took it died after
    reading its body: the headers, then nothing (the proxy gave the body to the dead replica)."""
    import json

    app = app_with(BodyLimitMiddleware, max_bytes=10_000, read_timeout_s=0.2)
    for first in ([], [{"type": "http.request", "body": b"", "more_body": True}]):
        sent = run_asgi(app, {}, first)
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        error = json.loads(sent[1]["body"])["error"]
        assert error["code"] == "body_lost" and "send the request again" in error["message"]


def test_a_body_that_arrived_is_not_timed_afterwards():
    import json

    app = app_with(BodyLimitMiddleware, max_bytes=10_000, read_timeout_s=0.2)
    sent = run_asgi(app, {}, [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}])
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"a": 1}


def edit_form_client(**http) -> TestClient:
    from serve_app.domain.specs import HttpSpec
    from serve_app.openai_api.routes import create_api

    class EditsRefusedBeforeTheService:
        def record_error(self, task: str, reason: str) -> None:
            pass

        async def edit(self, request, key_id=None):
            raise AssertionError("a form over its limits must not reach the service")

    return TestClient(create_api(EditsRefusedBeforeTheService(), HttpSpec(**http)))


def test_an_edits_lora_scale_keeps_its_bounds_without_a_lora():
    """schemathesis found lora_scale=5 alone accepted (the bound of 4 applied only next to a lora), so the
    conformance test's outcome hung on what hypothesis generated."""
    client = edit_form_client()
    png = {"image": ("a.png", b"\x89PNG", "image/png")}
    for data in ({"lora_scale": "5"}, {"lora": "style", "lora_scale": "5"}, {"lora_scale": "-4.5"}):
        answer = client.post("/v1/images/edits", data={"prompt": "x", **data}, files=png)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["param"] == "lora_scale"


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

    result = ImageResult(images=[b"png"], variant="z-image-turbo", seeds=[1], width=64, height=64,
                         num_inference_steps=1, timings={"queue_s": 3.0, "total_s": 4.0}, replica="r1",
                         gpu_class="h100", pool="big", created=0)
    shown = result.to_openai()
    assert shown["timings"]["queue_s"] == 3.0 and shown["replica"] == "r1" and shown["pool"] == "big"
    hidden = result.to_openai(internals=False)
    assert not {"timings", "replica", "pool", "gpu_class", "retried_from", "batch_images"} & set(hidden)
    assert hidden["model"] == "z-image-turbo" and hidden["seeds"] == [1] and hidden["data"][0]["seed"] == 1


@pytest.mark.parametrize("internals", [True, False])
def test_an_image_answer_is_the_spliced_body_with_server_timing_only_among_internals(internals):
    """The route sends the replica's base64 spliced into the JSON (issue 31), byte for byte what JSONResponse
    wrote before; Server-Timing names the stages' milliseconds only where answers show internals."""
    from starlette.responses import JSONResponse

    from serve_app.domain.schemas import ImageResult
    from serve_app.openai_api.routes import create_api

    result = ImageResult(images=[b"\x89PNG" * 1000], variant="z-image-turbo", seeds=[1], width=64, height=64,
                                 num_inference_steps=1, created=0,
                                 timings={"queue_s": 0.002, "total_s": 0.5, "encode_s": 0.0105, "to_router_s": 0.003})

    class OneAnswer:
        async def generate(self, request, key_id=None):
            return result

        def record_error(self, task: str, reason: str) -> None:
            pass

    with TestClient(create_api(OneAnswer(), HttpSpec(show_internals=internals))) as client:
        answer = client.post("/v1/images/generations", json={"prompt": "a cat"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.content == JSONResponse(result.to_openai(internals=internals)).body
    if internals:
        stages = [part.split(";")[0] for part in answer.headers["server-timing"].split(", ")]
        assert stages == ["queue", "total", "encode", "to_router", "answer"]
        assert "encode;dur=10.5" in answer.headers["server-timing"]
    else:
        assert "server-timing" not in answer.headers


def test_server_errors_name_no_pool_or_gpu_when_internals_are_off():
    """A replica failure, an OOM or an unplaceable model names pools and GPU classes (other tenants' placement);
    a multi-tenant endpoint answers the same status and code with a message of its own."""
    from serve_app.domain.errors import InternalError, ModelUnavailableError, ReplicaOutOfMemoryError

    failures = iter([InternalError("z-image-turbo failed on pool a100-big: RuntimeError", retry_after_s=2),
                     ReplicaOutOfMemoryError("ran out of memory on rtx4090; no pool with more memory", retry_after_s=2),
                     ModelUnavailableError("qwen-image-edit-2511 does not fit rtx4090 (22.7 GiB usable)")] * 2)

    class FailingService:
        def record_error(self, task: str, reason: str) -> None:
            pass

        async def generate(self, request, key_id=None):
            raise next(failures)

    for internals in (True, False):
        client = TestClient(create_api(FailingService(), HttpSpec(show_internals=internals)))
        for code in ("internal_error", "out_of_memory", "model_unavailable"):
            answer = client.post("/v1/images/generations", json={"prompt": "x"})
            assert answer.status_code == 503 and answer.json()["error"]["code"] == code
            message = answer.json()["error"]["message"]
            named = any(name in message for name in ("a100-big", "rtx4090", "GiB"))
            assert named is internals, message


def test_a_silent_stream_gets_keep_alive_comments_and_a_late_error_becomes_an_error_event():
    """``event_stream`` driven by hand: the events wait until the test has read a keep-alive comment, so no
    sleep decides the outcome (the keep-alive interval is 10 ms)."""
    import asyncio

    from serve_app.domain.errors import ReplicaOutOfMemoryError
    from serve_app.domain.schemas import GenerateRequest, PartialImage, StreamAccepted
    from serve_app.openai_api.sse import event_stream

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
    from serve_app.openai_api.sse import event_stream

    async def refused():
        raise RateLimitedError("over this key's limit", retry_after_s=3)
        yield  # an async generator

    with pytest.raises(RateLimitedError):
        asyncio.run(event_stream(refused(), "image_generation", GenerateRequest(prompt="x", stream=True),
                                 HttpSpec()))


def test_several_authorization_headers_are_a_400_whichever_one_holds_the_key():
    """A proxy in front may check the first header while a server using the last lets the other one in."""
    keys = KeyRing((key_digest("k1"),), environ={})
    with TestClient(app_with(ApiKeyMiddleware, keys=keys)) as client:
        for headers in ([("Authorization", "Bearer k1"), ("Authorization", "Bearer wrong")],
                        [("Authorization", "Bearer wrong"), ("Authorization", "Bearer k1")],
                        [("Authorization", "Bearer k1"), ("authorization", "Bearer k1")]):
            refused = client.post("/echo", json={}, headers=headers)
            assert refused.status_code == 400, (headers, refused.text)
            assert refused.json()["error"] == {
                "code": "invalid_request", "message": "2 Authorization headers: send exactly one, "
                "`Authorization: Bearer <key>`", "param": None, "type": "invalid_request_error"}
        assert client.post("/echo", json={}, headers=[("Authorization", "Bearer k1")]).status_code == 200


def test_a_vanished_key_file_refuses_every_request_503_until_it_is_back(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("k1\n")
    keys = KeyRing(keys_file=str(keys_file), reload_s=0, environ={})
    with TestClient(app_with(ApiKeyMiddleware, keys=keys)) as client:
        assert client.post("/echo", json={}, headers={"Authorization": "Bearer k1"}).status_code == 200
        keys_file.unlink()
        for headers in ({"Authorization": "Bearer k1"}, {}):
            refused = client.post("/echo", json={}, headers=headers)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            assert refused.json()["error"] == {  # the file's path and error stay in the router's log
                "code": "keys_unavailable", "message": "the service cannot check API keys right now; retry shortly",
                "param": None, "type": "server_error"}
        assert client.get("/healthz").status_code == 200  # the probes stay open
        keys_file.write_text("k1\n")
        assert client.post("/echo", json={}, headers={"Authorization": "Bearer k1"}).status_code == 200


class MetricsOnly:
    """A service with metrics and nothing else behind the API."""

    def record_error(self, task: str, reason: str) -> None:
        pass

    async def metrics_text(self) -> str:
        return 'ray_imageserve_key_requests_total{key_id="0badf00d"} 1.0\n'


def test_metrics_take_a_metrics_key_and_no_api_key():
    """/metrics shows every key's series: a tenant's key gets 403, the scraper's metrics key opens it and nothing
    else."""
    http = HttpSpec(api_key_sha256=(key_digest("tenant"),), metrics_key_sha256=(key_digest("scraper"),))
    client = TestClient(create_api(MetricsOnly(), http))
    tenant, scraper = ({"Authorization": f"Bearer {key}"} for key in ("tenant", "scraper"))
    refused = client.get("/metrics", headers=tenant)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert "metrics key" in refused.json()["error"]["message"]
    assert client.get("/metrics").status_code == 401
    shown = client.get("/metrics", headers=scraper)
    assert shown.status_code == 200 and "key_id" in shown.text
    assert client.get("/v1/models", headers=scraper).status_code == 401  # a metrics key opens /metrics only


def test_with_api_keys_and_no_metrics_key_metrics_are_closed_to_every_key():
    client = TestClient(create_api(MetricsOnly(), HttpSpec(api_key_sha256=(key_digest("tenant"),))))
    assert client.get("/metrics", headers={"Authorization": "Bearer tenant"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer other"}).status_code == 401


def test_metrics_keys_from_the_environment_guard_metrics_on_an_otherwise_open_local_run(monkeypatch):
    monkeypatch.setenv("IMAGESERVE_METRICS_KEYS", "scraper")
    client = TestClient(create_api(MetricsOnly(), HttpSpec()))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scraper"}).status_code == 200
    assert client.get("/openapi.json").status_code == 200  # no API key configured: the rest stays open


def router_behind_http(monkeypatch, show_internals: bool):
    """A real Router (no Ray: its handles are never called) on two pools, a variant that fits neither (placement's
    reason names both pools), two requests in flight and one running replica per served deployment, behind the
    HTTP API."""
    import deployments.router as router_module
    from deployments.router import Router
    from serve_app.domain.config import parse_config
    from serve_app.domain.specs import resolve_application
    from serve_app.openai_api.routes import create_api

    monkeypatch.setattr(router_module, "REPLICA_COUNT_TTL_S", 3600)  # the background refresh reads once
    config = parse_config({
        "models": {"z-image-turbo": {}, "qwen-image-edit-2511": {}, "qwen-image-edit-2509": {}},
        "pools": [{"name": "pool4090", "gpu_class": "rtx-4090", "variants": ["z-image-turbo"]},
                  {"name": "poola100", "gpu_class": "a100-80g", "variants": ["qwen-image-edit-2511"]}]})
    spec = resolve_application(config).router
    router = Router(spec, {route.deployment: None for route in spec.routes})
    running = {route.deployment: 1 for route in spec.routes}
    # serve.status() stands in
    monkeypatch.setattr(router, "_read_replica_states", lambda: {d: {"RUNNING": n} for d, n in running.items()})
    router.table.outstanding[spec.routes[0].deployment] = 2
    return router, running, create_api(router, HttpSpec(show_internals=show_internals))


INTERNALS = ("pool4090", "poola100", "in_flight", "replicas", "pools", "deployment", "gen-z-image-turbo",
             "resolves_to", "unavailable_reason")


def test_probes_and_model_cards_say_nothing_of_load_or_placement_when_internals_are_off(monkeypatch):
    router, running, app = router_behind_http(monkeypatch, show_internals=False)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        models = client.get("/v1/models")
        assert models.status_code == 200 and not [word for word in INTERNALS if word in models.text], models.text
        cards = {card["id"]: card for card in models.json()["data"]}
        assert cards["z-image-turbo"]["served"] is True and cards["z-image-turbo"]["vram_gib"]
        assert cards["qwen-image-edit-2509"]["served"] is False
        assert cards["qwen-image-edit"]["served"] is True  # an alias says whether it is served, not where
        running.clear()
        router.table.replicas = {}  # what the background refresh reads next: nothing running
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.headers["retry-after"]
        assert not_ready.json()["error"]["message"] == "not ready: a served model has no running replica yet"
        fleet = client.get("/v1/fleet")
        assert fleet.status_code == 200 and not [word for word in INTERNALS if word in fleet.text], fleet.text


def test_an_operator_endpoint_shows_load_and_placement(monkeypatch):
    _, _, app = router_behind_http(monkeypatch, show_internals=True)
    with TestClient(app) as client:
        assert client.get("/healthz").json()["in_flight"] == {"gen-z-image-turbo@pool4090": 2}
        assert client.get("/readyz").json()["replicas"] == {"qwen-image-edit-2511": 1, "z-image-turbo": 1}
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        assert cards["z-image-turbo"]["pools"][0]["pool"] == "pool4090" and cards["z-image-turbo"]["replicas"] == 1
        assert "poola100" in cards["qwen-image-edit-2509"]["unavailable_reason"]
        assert cards["qwen-image-edit"]["resolves_to"] == {"poola100": "qwen-image-edit-2511"}
        fleet = client.get("/v1/fleet").json()
        assert [p["pool"] for p in fleet["pools"]] == ["pool4090", "poola100"]
        z = next(v for v in fleet["variants"] if v["id"] == "z-image-turbo")
        assert z["queue_depth"] == 2 and z["routes"][0]["running"] == 1 and z["routes"][0]["offload_mode"]


def test_a_caller_who_leaves_a_stream_closes_its_events_without_an_error(caplog):
    """Starlette's StreamingResponse as Serve's proxy drives it (ASGI spec 2.3: a disconnect cancels the stream
    with an anyio cancel scope) while the next event is being awaited in its own task. The events generator must
    be closed in order (its ``finally``, where the router cancels the replica's stream, runs) and nothing may
    raise "aclose(): asynchronous generator is already running". Events, not sleeps, order the steps."""
    import asyncio
    import logging

    from serve_app.domain.schemas import GenerateRequest, StreamAccepted
    from serve_app.openai_api.sse import event_stream

    async def run():
        waiting_for_the_replica = asyncio.Event()
        closed = []

        async def events():
            yield StreamAccepted(variant="z-image-turbo", num_inference_steps=4, preview_steps=[])
            try:
                waiting_for_the_replica.set()
                await asyncio.Event().wait()  # a replica still denoising: no event comes
                yield None
            finally:
                closed.append("the replica's stream was cancelled")

        stream = events()
        response = await event_stream(stream, "image_generation", GenerateRequest(prompt="x", stream=True),
                                      HttpSpec(stream_keepalive_s=600))

        async def receive():
            await waiting_for_the_replica.wait()
            return {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST",
                 "path": "/v1/images/generations", "headers": []}
        await asyncio.wait_for(response(scope, receive, send), timeout=60)  # a bound on a hang, not a race
        return stream, closed, sent

    with caplog.at_level(logging.WARNING):
        stream, closed, sent = asyncio.run(run())
    assert closed == ["the replica's stream was cancelled"]
    assert stream.ag_frame is None  # closed: nothing left suspended in it
    assert sent[0]["type"] == "http.response.start"
    assert "already running" not in caplog.text and "never retrieved" not in caplog.text


def test_the_proxy_guard_hides_serves_route_table_through_rays_own_callback_hook():
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH does in each proxy, with Ray's own functions: import the
    callback, validate its middlewares, wrap the proxy's app. /-/routes is a 404 JSON error; the rest passes."""
    from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    from serve_app.proxy_guard import PROXY_CALLBACK

    async def serve_proxy(scope, receive, send):  # stands in for the proxy's own answers
        body = b'{"/": "imageserve"}' if scope["path"].endswith("/-/routes") else b"success"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(PROXY_CALLBACK))
    client = TestClient(_apply_middlewares(serve_proxy, middlewares))
    hidden = client.get("/-/routes")
    assert hidden.status_code == 404 and "imageserve" not in hidden.text
    assert hidden.json()["error"] == {"code": "not_found", "message": "Not Found", "param": None,
                                      "type": "invalid_request_error"}
    assert client.get("/-/healthz").text == "success"
    assert client.get("/v1/-/routes").status_code == 200  # only the proxy's own path


def test_a_streams_clean_up_finishes_inside_the_cancel_scope_of_a_client_that_left():
    """Starlette's cancel scope cancels every await of the stream's task again until the scope exits. When the
    client leaves just as the next event arrived, the events generator sits at a yield that no task is inside:
    only the ``aclose`` at the end of the clean-up runs its ``finally`` (where the router frees the key's in-flight
    slot and cancels the replica's stream) now, rather than whenever it is garbage-collected."""
    import asyncio

    import anyio

    from serve_app.openai_api.sse import _close

    async def run() -> list[str]:
        closed = []

        async def events():
            try:
                yield "accepted"
                yield "a preview"
                yield "the image"
            finally:
                closed.append("the replica's stream was cancelled")

        stream = events()
        await anext(stream)
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.wait({pending})  # the next event arrived; the generator waits at its yield
        with anyio.CancelScope() as client_left:
            client_left.cancel()
            await _close(stream, pending)
        return list(closed)  # now: asyncio.run would close a generator left open afterwards, at its shutdown

    assert asyncio.run(run()) == ["the replica's stream was cancelled"]


def test_the_production_example_serves_no_metrics_and_no_internals_on_its_public_port():
    """Prometheus scrapes each node's Ray metrics port on a cluster; /metrics on port 8000 would show every key's
    use to whoever gets past the key check."""
    from serve_app.domain.config_files import load_config
    from serve_app.examples import EXAMPLE_PRODUCTION_CONFIG

    serving = load_config(EXAMPLE_PRODUCTION_CONFIG).serving
    assert serving.metrics_route is False and serving.internals_shown() is False
    client = TestClient(create_api(MetricsOnly(), HttpSpec(metrics_route=serving.metrics_route)))
    assert client.get("/metrics").status_code == 404
