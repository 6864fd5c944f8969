"""What the OpenAPI schema says beyond FastAPI's own: the error answers of each route, and the edit
form's fields typed and bounded as EditRequest states them."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from serve_app.domain.schemas import (
    EditRequest,
    ImagesResponse,
    LoraRequest,
)

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. invalid_request, overloaded, model_not_found.")
    message: str = Field(description="What went wrong and what to do.")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    type: str = Field(description="invalid_request_error below 500, server_error from 500.")


class ErrorBody(BaseModel):
    """Every error answer, as OpenAI's API and client shape it."""

    error: ErrorDetail


def error_doc(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorBody, "description": description}
    if retry_after:
        response["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                               "schema": {"type": "integer"}}}
    return response


# What each image route can answer (docs/reliability.md has the error cases and their tests).
IMAGE_ROUTE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ImagesResponse, "description": "The images, base64-encoded, and how they were made; with "
                                                  "`stream: true`, Server-Sent Events (docs/streaming.md).",
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["event", "data"],
              "description": "One Server-Sent Event; `data` is its JSON (docs/streaming.md).",
              "properties": {
                  "event": {"type": "string", "enum": [
                      "image_generation.partial_image", "image_generation.completed",
                      "image_edit.partial_image", "image_edit.completed", "error"]},
                  "data": {"type": "string", "contentMediaType": "application/json"}}}}}},
    400: error_doc("An undecodable image, a decompression bomb, an image past the decode limits (JPEG scans, "
                "chunks), or a value these models cannot honour (background: transparent; a listed LoRA the "
                "requested model does not take); several Authorization headers."),
    401: error_doc("An API key is configured and the request has no valid `Authorization: Bearer` key."),
    404: error_doc("Unknown model, or a LoRA not on this service's list: the message lists the known ones."),
    408: error_doc("The request outlived `serving.request_timeout_s` (its denoising is stopped), or its body took "
                "longer than `serving.limits.body_read_timeout_s` to arrive."),
    413: error_doc("The body is over `serving.limits.max_body_mb` (`max_json_kb` for JSON), or a form field over "
                "`max_form_field_kb`."),
    415: error_doc("An input file is not a PNG, JPEG or WEBP image."),
    422: error_doc("A field is invalid (`param` names it): type, range, size, steps, n, cost bound, form parts."),
    429: error_doc("Every replica is busy and its queue is full (`overloaded`), or this key is over its own limits "
                "(`rate_limit_exceeded`).", retry_after=True),
    503: error_doc("No replica can serve it now: not deployed here, out of GPU memory, or failing; the key file "
                "cannot be read (`keys_unavailable`); or no byte of the body arrived (`body_lost`).",
                retry_after=True),
}


def described(name: str) -> str:
    """An edit form field's description: the request schema's own, so the two cannot drift apart."""
    return EditRequest.model_fields[name].description or ""


def edit_form_as_the_request_states_it(schema: dict[str, Any]) -> dict[str, Any]:
    """The edit form's fields with the types and limits EditRequest gives them (FastAPI states only the
    form's own annotations), and without null: a multipart form has none, an optional field is one the
    client leaves out (FastAPI's ``anyOf: [type, null]`` asks clients to send the text "null")."""
    body = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    # Left out: a schema listing both image and image[] could not say that together they hold 1 to 3.
    form["properties"].pop("image[]", None)
    stated = EditRequest.model_json_schema()["properties"]
    # The JSON body's lora object is two form fields: its name, and its scale.
    lora_fields = LoraRequest.model_json_schema()["properties"]
    stated.update(lora=lora_fields["name"], lora_scale=lora_fields["scale"])
    for name, field in form["properties"].items():
        kept = {key: field[key] for key in ("title", "description", "default") if key in field}
        typed = _not_null(stated.get(name, field))
        field.clear()
        field.update({**typed, **kept})
    form["properties"]["image"].update(minItems=stated["images"]["minItems"], maxItems=stated["images"]["maxItems"])
    form["required"] = sorted({*form.get("required", []), "image"})
    return schema


def form_without_null(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The multipart form of ``POST path`` with its optional fields stated without null: a form has no null, and
    a client that sent the text "null" for one would be refused."""
    body = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    form["properties"] = {name: _not_null(field) for name, field in form["properties"].items()}
    return schema


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    field = {key: value for key, value in field.items() if key != "default" or value is not None}
    kinds = field.pop("anyOf", None)
    if kinds is None:
        return field
    (kind,) = [k for k in kinds if k != {"type": "null"}]
    return {**field, **kind}
