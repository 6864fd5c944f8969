"""schemathesis against the running service: every answer is what /openapi.json says it may be.

Cases are generated from the service's own schema: schema-valid ones must be served, schema-invalid
ones refused with a 4xx, and every answer must match its declared status, headers and body. The one
refusal a schema-valid request may get is a bound the schema cannot state, because it depends on the
variant and the config: 422 ``limit_exceeded``, naming the bound (a variant's sizes and steps, what a
batch fits, the cost bound). The app under test has a tight cost bound so that the requests that do
run take the tiny checkpoints well under a second on two CPU cores.

A multipart form carries only text, so a schema-breaking null or bool in an edit field arrives as the
text "null" or "True", often a valid value: such cases are not held to negative_data_rejection.
"""

from __future__ import annotations

import io

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

APP = "conformance"
ROUTE = "/conformance"
# Megapixel-steps: an edit of one image at the default 256x256 and 40 steps, with the CFG the edit model runs by
# default, costs 10.5.
MAX_REQUEST_COST = 11.0


@pytest.fixture(scope="module")
def conformance_schema(service, tiny_root):
    from ray import serve

    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data

    data = embedded_config_data(tiny_root)
    data["serving"].update({"app_name": APP})
    data["serving"]["limits"]["max_request_cost"] = MAX_REQUEST_COST
    data["models"] = {k: v for k, v in data["models"].items() if k in ("z-image-turbo", "qwen-image-edit-2509")}
    service.add_application(parse_config(data, APP), ROUTE)
    try:
        yield schemathesis.openapi.from_url(f"{service.url}{ROUTE}/openapi.json")
    finally:
        serve.delete(APP)


@schemathesis.check
def refused_only_over_a_stated_limit(ctx, response, case) -> bool | None:
    """positive_data_acceptance, except for 422 ``limit_exceeded`` (see the module's docstring)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.status_code < 400 or response.status_code in (404, 429) or response.status_code >= 500:
        return None  # 404: a generated model name nobody serves; 5xx: not_a_server_error's to judge
    code = response.json()["error"]["code"]
    if response.status_code == 422 and code == "limit_exceeded":
        return None
    raise AssertionError(f"a schema-valid request was refused: {response.status_code} {response.text}")


def carried_faithfully(case) -> bool:
    """Whether a multipart body says what the generated case meant. A form field is text: a case that
    breaks the schema with null, a bool, an object or an array reaches the server as the text "null",
    "True", ... which may well be a valid value of the field."""
    if case.media_type != "multipart/form-data" or not isinstance(case.body, dict):
        return True
    return not any(value is None or isinstance(value, (bool, dict, list))
                   for name, value in case.body.items() if name != "image")


@schemathesis.check
def refused_when_invalid(ctx, response, case) -> bool | None:
    """negative_data_rejection, for the cases the request can carry as generated (see carried_faithfully)."""
    if not carried_faithfully(case):
        return None
    return negative_data_rejection(ctx, response, case)


def real_png(size: int = 32) -> bytes:
    """The schema says binary; a file the server can decode is a PNG, which no schema can say."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


OPERATIONS = [("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("GET", "/v1/models"),
              ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/fleet"),
              # The Files and Batches API (docs/batch.md)
              ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
              ("GET", "/v1/files/{file_id}/content"), ("DELETE", "/v1/files/{file_id}"), ("POST", "/v1/batches"),
              ("GET", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"), ("POST", "/v1/batches/{batch_id}/cancel")]


def test_the_operations_below_are_all_the_schema_has(conformance_schema):
    declared = {(result.ok().method.upper(), result.ok().path) for result in conformance_schema.get_all_operations()}
    assert declared == set(OPERATIONS)


# schemathesis's own pytest plugin (from_fixture) does not run under pytest 9, so each operation and
# generation mode is one hypothesis test here, with schemathesis's strategies and checks.
# Negative cases need a body to break: the other operations take at most an id or a query, any string of which is
# valid (a missing object is a 404).
WITH_BODY = {("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("POST", "/v1/files"),
             ("POST", "/v1/batches")}
NAMES_AN_OBJECT = {("GET", "/v1/files/{file_id}"), ("GET", "/v1/files/{file_id}/content"),
                   ("DELETE", "/v1/files/{file_id}"), ("POST", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"),
                   ("POST", "/v1/batches/{batch_id}/cancel")}
CASES = [(method, path, mode) for method, path in OPERATIONS for mode in GenerationMode
         if (method, path) in WITH_BODY or mode is GenerationMode.POSITIVE]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_answer_is_what_the_schema_declares(conformance_schema, service, method, path, mode):
    operation = conformance_schema[path][method]
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def answers_as_declared(case):
        if path == "/v1/images/edits" and isinstance(case.body, dict) and isinstance(case.body.get("image"), list):
            case.body["image"] = [real_png() for _ in case.body["image"]]
        response = case.call_and_validate(base_url=f"{service.url}{ROUTE}", timeout=120,
                                          excluded_checks=[positive_data_acceptance, negative_data_rejection],
                                          additional_checks=[refused_only_over_a_stated_limit, refused_when_invalid])
        if mode is GenerationMode.POSITIVE or carried_faithfully(case):
            statuses.append(response.status_code)

    answers_as_declared()
    # Not vacuous: valid requests were served (images made), invalid ones all refused. An operation on a file or
    # batch by id gets generated ids that name nothing: it must answer each 404, as documented.
    if mode is GenerationMode.POSITIVE and (method, path) in NAMES_AN_OBJECT:
        assert statuses and set(statuses) == {404}, statuses
    elif mode is GenerationMode.POSITIVE:
        assert 200 in statuses
    else:
        assert statuses and all(400 <= status < 500 for status in statuses)
