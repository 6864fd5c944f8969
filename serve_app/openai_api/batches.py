"""The Files and Batches routes, as openai-python's ``client.files`` and ``client.batches`` call them.

``POST /v1/files`` (multipart: ``file``, ``purpose``, optional ``expires_after[anchor]`` and
``expires_after[seconds]``), ``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``DELETE /v1/files/{id}``; ``POST /v1/batches`` (JSON), ``GET /v1/batches``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``. The router's ``BatchApi`` (``deployments/batch_api.py``) does the work; this
module parses and answers HTTP. docs/batch.md shows the client flow.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from serve_app.domain.errors import InvalidRequestError, LimitExceededError
from serve_app.domain.specs import HttpSpec
from serve_app.openai_api.middlewares import key_id_of

# A file's multipart envelope (boundaries, headers, the purpose field) on top of its bytes.
MULTIPART_SLACK_BYTES = 64_000
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400  # OpenAI's bounds for expires_after.seconds


def body_limits(max_file_bytes: int, http: HttpSpec) -> dict[str, int]:
    """The body limit of each of these routes (the rest keep the service's ``max_body_mb``)."""
    return {"/v1/files": max_file_bytes + MULTIPART_SLACK_BYTES, "/v1/batches": http.max_json_bytes}


def batch_routes(service: Any) -> APIRouter:
    """The routes over ``service.batch_api`` (the router replica's)."""
    routes = APIRouter()

    def api():
        return service.batch_api

    @routes.post("/v1/files", summary="Upload a file (purpose batch: a JSONL batch input; vision: an edit's image)")
    async def create_file(request: Request) -> dict[str, Any]:
        form = await request.form(max_files=1, max_fields=8, max_part_size=64_000)
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequestError("file is required (multipart field 'file')", param="file")
            if not isinstance(purpose, str):
                raise InvalidRequestError("purpose is required", param="purpose")
            expires_after = _expires_after(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
            data = await upload.read()
            return await api().create_file(key_id_of(request), upload.filename or "upload", purpose, data,
                                           expires_after)
        finally:
            await form.close()

    @routes.get("/v1/files", summary="List this key's files")
    async def list_files(request: Request, purpose: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
                         order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        return await api().list_files(key_id_of(request), purpose, limit, after, order)

    @routes.get("/v1/files/{file_id}", summary="A file's object")
    async def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
        return await api().retrieve_file(key_id_of(request), file_id)

    @routes.get("/v1/files/{file_id}/content", summary="A file's bytes (a batch's output and error files: JSONL)")
    async def file_content(request: Request, file_id: str) -> Response:
        data = await api().file_content(key_id_of(request), file_id)
        return Response(data, media_type="application/octet-stream")

    @routes.delete("/v1/files/{file_id}", summary="Delete a file")
    async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
        return await api().delete_file(key_id_of(request), file_id)

    @routes.post("/v1/batches", summary="Create a batch of image requests from an uploaded JSONL file")
    async def create_batch(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError as err:
            raise InvalidRequestError(f"the body is not JSON ({err})") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        return await api().create_batch(key_id_of(request), body)

    @routes.get("/v1/batches", summary="List this key's batches, newest first")
    async def list_batches(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           after: str | None = None) -> dict[str, Any]:
        return await api().list_batches(key_id_of(request), limit, after)

    @routes.get("/v1/batches/{batch_id}", summary="A batch's object: status, request counts, output files")
    async def retrieve_batch(request: Request, batch_id: str) -> dict[str, Any]:
        return await api().retrieve_batch(key_id_of(request), batch_id)

    @routes.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch: lines not yet run are not run")
    async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
        return await api().cancel_batch(key_id_of(request), batch_id)

    return routes


def _expires_after(anchor: Any, seconds: Any) -> int | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequestError("expires_after[anchor] must be created_at", param="expires_after")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        raise InvalidRequestError("expires_after[seconds] must be an integer", param="expires_after") from None
    if not MIN_EXPIRY_S <= value <= MAX_EXPIRY_S:
        raise LimitExceededError(f"expires_after[seconds] must be {MIN_EXPIRY_S} to {MAX_EXPIRY_S}",
                                 param="expires_after")
    return value
