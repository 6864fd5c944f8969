"""The Files and Batches routes, as openai-python's ``client.files`` and ``client.batches`` call them.

``POST /v1/files`` (multipart: ``file``, ``purpose``, optional ``expires_after[anchor]`` and
``expires_after[seconds]``), ``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``DELETE /v1/files/{id}``; ``POST /v1/batches`` (JSON), ``GET /v1/batches``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``. The router's ``BatchApi`` (``deployments/batch_api.py``) does the work; this
module parses and answers HTTP. docs/batch.md shows the client flow.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from serve_app.domain.batches import (
    FILE_PURPOSES,
    BatchCreate,
    BatchList,
    BatchObject,
    FileDeleted,
    FileList,
    FileObject,
)
from serve_app.domain.specs import HttpSpec
from serve_app.openai_api.forms import bounded_form_route
from serve_app.openai_api.middlewares import key_id_of
from serve_app.openai_api.openapi import error_doc

# A file's multipart envelope (boundaries, headers, the purpose field) on top of its bytes.
MULTIPART_SLACK_BYTES = 64_000
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400  # OpenAI's bounds for expires_after.seconds
Purpose = Literal[FILE_PURPOSES]  # type: ignore[valid-type]

# What these routes can answer besides their 200 (docs/batch.md).
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_doc("A multipart body that cannot be parsed."),
    401: error_doc("An API key is configured and the request has no valid `Authorization: Bearer` key."),
    404: error_doc("No such file or batch for this key (another key's objects are not found either)."),
    413: error_doc("The file is over `serving.batch.max_file_mb`, or the body over the route's limit."),
    422: error_doc("A field is invalid (`param` names it), or the input file is not a batch file."),
    429: error_doc("This key has `serving.batch.max_active_batches_per_key` unfinished batches.", retry_after=True),
    503: error_doc("The key file cannot be read, or no byte of the body arrived.", retry_after=True),
}


def body_limits(max_file_bytes: int, http: HttpSpec) -> dict[str, int]:
    """The body limit of each of these routes (the rest keep the service's ``max_body_mb``)."""
    return {"/v1/files": max_file_bytes + MULTIPART_SLACK_BYTES, "/v1/batches": http.max_json_bytes}


def batch_routes(service: Any) -> APIRouter:
    """The routes over ``service.batch_api`` (the router replica's)."""
    routes = APIRouter(responses=RESPONSES)
    # The upload's form: one file and a few short fields, parsed under these bounds.
    uploads = APIRouter(responses=RESPONSES, route_class=bounded_form_route(
        {"max_files": 1, "max_fields": 8, "max_part_size": 64_000}))

    def api():
        return service.batch_api

    @uploads.post("/v1/files", response_model=FileObject,
                  summary="Upload a file (purpose batch: a JSONL batch input; vision: an edit line's image)")
    async def create_file(
        request: Request,
        file: Annotated[UploadFile, File(description="The file: a batch's JSONL, or an image an edit line names.")],
        purpose: Annotated[Purpose, Form(description="batch, vision or user_data.")],
        expires_after_seconds: Annotated[int | None, Form(
            alias="expires_after[seconds]", ge=MIN_EXPIRY_S, le=MAX_EXPIRY_S,
            description="Seconds after creation the file expires (batch files: 30 days unless given). Its "
                        "anchor, expires_after[anchor], has one value in OpenAI's API, created_at, and is not read.")
        ] = None,
    ) -> dict[str, Any]:
        data = await file.read()
        return await api().create_file(key_id_of(request), file.filename or "upload", purpose, data,
                                       expires_after_seconds)

    @routes.get("/v1/files", response_model=FileList, summary="List this key's files")
    async def list_files(request: Request, purpose: Purpose | None = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                         after: Annotated[str | None, Query(max_length=64)] = None,
                         order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        return await api().list_files(key_id_of(request), purpose, limit, after, order)

    @routes.get("/v1/files/{file_id}", response_model=FileObject, summary="A file's object")
    async def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
        return await api().retrieve_file(key_id_of(request), file_id)

    @routes.get("/v1/files/{file_id}/content", response_class=Response,
                responses={200: {"content": {"application/octet-stream": {"schema": {
                    "type": "string", "format": "binary"}}}, "description": "The file's bytes (output files: JSONL)."}},
                summary="A file's bytes (a batch's output and error files: JSONL, one answer a line)")
    async def file_content(request: Request, file_id: str) -> Response:
        data = await api().file_content(key_id_of(request), file_id)
        return Response(data, media_type="application/octet-stream")

    @routes.delete("/v1/files/{file_id}", response_model=FileDeleted, summary="Delete a file")
    async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
        return await api().delete_file(key_id_of(request), file_id)

    @routes.post("/v1/batches", response_model=BatchObject,
                 summary="Create a batch of image requests from an uploaded JSONL file")
    async def create_batch(request: Request, body: BatchCreate) -> dict[str, Any]:
        return await api().create_batch(key_id_of(request), body)

    @routes.get("/v1/batches", response_model=BatchList, summary="List this key's batches, newest first")
    async def list_batches(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           after: Annotated[str | None, Query(max_length=64)] = None) -> dict[str, Any]:
        return await api().list_batches(key_id_of(request), limit, after)

    @routes.get("/v1/batches/{batch_id}", response_model=BatchObject,
                summary="A batch's object: status, request counts, output and error files")
    async def retrieve_batch(request: Request, batch_id: str) -> dict[str, Any]:
        return await api().retrieve_batch(key_id_of(request), batch_id)

    @routes.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject,
                 summary="Cancel a batch: lines not yet run never run, running ones stop at their next step")
    async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
        return await api().cancel_batch(key_id_of(request), batch_id)

    routes.include_router(uploads)
    return routes
