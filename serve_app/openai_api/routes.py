"""The OpenAI images API over HTTP, and the ingress deployment that serves it in front of the router.

Routes: ``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart, ``image``
or ``image[]``), both answering Server-Sent Events with ``stream: true``, ``GET /v1/models``,
``GET /healthz`` (liveness), ``GET /readyz`` (readiness),
``GET /metrics``; the OpenAPI schema is at ``/openapi.json``. Every error is JSON:
``{"error": {"code", "message", "param", "type"}}``. This module parses and answers HTTP;
``deployments.router.Router`` does the work.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Protocol

import anyio
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.router import Router
from serve_app import __version__
from serve_app.api_keys import METRICS_KEYS_ENV, RELOAD_S, KeyRing, key_id_secret, refuse_open_non_loopback
from serve_app.domain.errors import ImageServeError, InternalError, error_type
from serve_app.domain.schemas import (
    MAX_EDIT_IMAGES,
    MAX_LORA_SCALE,
    MAX_PARTIAL_IMAGES,
    EditRequest,
    GenerateRequest,
    ImageResult,
    ImagesResponse,
    LoraRequest,
    PartialImage,
    StreamAccepted,
)
from serve_app.domain.specs import HttpSpec, RouterSpec

logger = logging.getLogger(__name__)


class ImageService(Protocol):
    """What the HTTP layer needs from the router."""

    async def generate(self, request: GenerateRequest, key_id: str | None = None) -> ImageResult: ...
    async def edit(self, request: EditRequest, key_id: str | None = None) -> ImageResult: ...
    def generate_stream(self, request: GenerateRequest,
                        key_id: str | None = None) -> AsyncIterator[StreamAccepted | PartialImage | ImageResult]: ...
    def edit_stream(self, request: EditRequest,
                    key_id: str | None = None) -> AsyncIterator[StreamAccepted | PartialImage | ImageResult]: ...
    async def models(self, internals: bool = True) -> dict[str, Any]: ...
    async def health(self, internals: bool = True) -> dict[str, Any]: ...
    async def readiness(self, internals: bool = True) -> dict[str, Any]: ...
    async def metrics_text(self) -> str: ...
    def record_error(self, task: str, reason: str) -> None: ...


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. invalid_request, overloaded, model_not_found.")
    message: str = Field(description="What went wrong and what to do.")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    type: str = Field(description="invalid_request_error below 500, server_error from 500.")


class ErrorBody(BaseModel):
    """Every error answer, as OpenAI's API and client shape it."""

    error: ErrorDetail


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
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
    400: _error("An undecodable image, a decompression bomb, an image past the decode limits (JPEG scans, "
                "chunks), or a value these models cannot honour (background: transparent; a listed LoRA the "
                "requested model does not take); several Authorization headers."),
    401: _error("An API key is configured and the request has no valid `Authorization: Bearer` key."),
    404: _error("Unknown model, or a LoRA not on this service's list: the message lists the known ones."),
    408: _error("The request outlived `serving.request_timeout_s` (its denoising is stopped), or its body took "
                "longer than `serving.limits.body_read_timeout_s` to arrive."),
    413: _error("The body is over `serving.limits.max_body_mb` (`max_json_kb` for JSON), or a form field over "
                "`max_form_field_kb`."),
    415: _error("An input file is not a PNG, JPEG or WEBP image."),
    422: _error("A field is invalid (`param` names it): type, range, size, steps, n, cost bound, form parts."),
    429: _error("Every replica is busy and its queue is full (`overloaded`), or this key is over its own limits "
                "(`rate_limit_exceeded`).", retry_after=True),
    503: _error("No replica can serve it now: not deployed here, out of GPU memory, or failing; the key file "
                "cannot be read (`keys_unavailable`); or no byte of the body arrived (`body_lost`).",
                retry_after=True),
}


def described(name: str) -> str:
    """An edit form field's description: the request schema's own, so the two cannot drift apart."""
    return EditRequest.model_fields[name].description or ""


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "param": param, "type": error_type(status)}},
                        status_code=status, headers=headers)


# An answer names this many invalid fields at most, each cut to this length: a body of 400,000 unknown
# keys (or one 5 MB key) must not come back as megabytes of error message (bench/amplification.py).
MAX_REPORTED_ERRORS = 5
MAX_REPORTED_NAME = 64


def _field_name(error: dict) -> str:
    name = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "form", "query")) or "body"
    return name if len(name) <= MAX_REPORTED_NAME else name[:MAX_REPORTED_NAME] + "..."


def _validation_response(errors: list[dict]) -> JSONResponse:
    param = _field_name(errors[0])
    param = {"body": None, "images": "image"}.get(param, param)
    message = "; ".join(f"{_field_name(e)}: {e['msg']}" for e in errors[:MAX_REPORTED_ERRORS])
    if len(errors) > MAX_REPORTED_ERRORS:
        message += f"; and {len(errors) - MAX_REPORTED_ERRORS} more"
    return error_response(422, "invalid_request", message, param)


OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes carry no key
METRICS_PATH = "/metrics"  # every key's series: opened by a metrics key, never by an API key


def key_id_of(request: Request) -> str | None:
    """The caller's key id, as ApiKeyMiddleware found it (None on an endpoint without keys)."""
    return request.scope.get("state", {}).get("key_id")


class ApiKeyMiddleware:
    """Bearer-key check on every route but the probes (/healthz, /readyz), against ``keys``'s digests
    (serve_app/api_keys.py). The caller's key id goes into the ASGI scope as ``state["key_id"]``.

    ``/metrics`` shows every key's series, so it takes ``metrics_keys`` only: an API key gets 403. With no
    metrics key configured it is open only where no API key is configured either (a local run).
    Several ``Authorization`` headers are a 400: a proxy in front may have checked another one than this."""

    def __init__(self, app, keys: KeyRing, metrics_keys: KeyRing | None = None) -> None:
        self.app = app
        self.keys = keys
        self.metrics_keys = metrics_keys or KeyRing(warn_if_open=False, environ={})

    @staticmethod
    def _token(header: bytes | None) -> bytes | None:
        if not header:
            return None
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        return token.strip()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/"))
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        ring = self.metrics_keys if path == METRICS_PATH else self.keys
        if not ring.configured and not (path == METRICS_PATH and self.keys.configured):
            return await self.app(scope, receive, send)  # open: no key of this kind is configured
        # ASGI servers lower-case header names; every Authorization header counts, not the last one alone.
        headers = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(headers) > 1:
            response = error_response(400, "invalid_request", f"{len(headers)} Authorization headers: send exactly "
                                      "one, `Authorization: Bearer <key>`")
            return await response(scope, receive, send)
        if ring.unavailable():
            # Fail closed, and say it is the server's fault: the client's key may be fine, and a 5xx pages someone.
            response = error_response(503, "keys_unavailable", "the service cannot check API keys right now; retry "
                                      "shortly", headers={"Retry-After": str(int(RELOAD_S))})
            return await response(scope, receive, send)
        token = self._token(headers[0] if headers else None)
        key_id = ring.check(token) if token is not None else None
        if key_id is not None:
            scope.setdefault("state", {})["key_id"] = key_id
            return await self.app(scope, receive, send)
        if path == METRICS_PATH and token is not None and self.keys.check(token) is not None:
            response = error_response(403, "permission_denied", "/metrics shows every key's use: it takes a metrics "
                                      f"key (serving.metrics_key_sha256 or {METRICS_KEYS_ENV}), not an API key")
            return await response(scope, receive, send)
        which = "a metrics key" if path == METRICS_PATH else "a valid API key"
        response = error_response(401, "unauthorized", f"{which} is required: Authorization: Bearer <key>",
                                  headers={"WWW-Authenticate": 'Bearer realm="imageserve"'})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Bounds what a request body may cost before the app parses it.

    - Size: 413 at once from Content-Length, or as soon as a streamed body passes the limit.
      ``route_limits`` sets a smaller limit per path (the JSON generation route takes kilobytes, not the
      megabytes an edit's images need).
    - Time: 408 when the body has not fully arrived ``read_timeout_s`` after the request began, so a
      client that trickles a body (or stops sending one) does not hold a router slot; 503 when not one byte of
      it arrived (``_too_slow``: what a request re-sent by Serve after its first router replica died looks like).
    In both cases the app then sees the client leave and stops reading.
    """

    def __init__(self, app, max_bytes: int, route_limits: dict[str, int] | None = None,
                 read_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = route_limits or {}
        self.read_timeout_s = read_timeout_s

    @staticmethod
    def _too_large(limit: int) -> JSONResponse:
        size = f"{limit / 1e6:g} MB" if limit >= 1e6 else f"{limit / 1e3:g} KB"
        return error_response(413, "request_too_large", f"request body over the {size} limit of this route")

    def _too_slow(self, received: int) -> JSONResponse:
        if received == 0:
            # Not one byte of the body reached this router replica. Serve's proxy hands a request's body to one
            # replica: the first that takes it drains the proxy's queue of the client's messages (Ray 2.60
            # serve/_private/proxy.py, receive_asgi_messages). When that replica dies before Serve's router hears
            # it accepted the request, the router re-sends the request to another (serve/_private/router.py,
            # _route_and_send_request_once retries on ActorDiedError), whose body never comes: a 408 would blame
            # a client that sent everything. Without a byte nobody can tell that from a client that sent none,
            # so the answer is the server's: 503 with Retry-After.
            return error_response(
                503, "body_lost", f"no byte of the request body reached the server within {self.read_timeout_s:g} s:"
                " it was lost when the router replica that first took the request failed (Serve re-sends such a "
                "request without its body), or none was sent; send the request again",
                headers={"Retry-After": "1"})
        return error_response(408, "body_timeout", f"the request body did not arrive within {self.read_timeout_s:g} s")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/"))
        limit = self.route_limits.get(path, self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(limit)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = None if self.read_timeout_s is None else loop.time() + self.read_timeout_s
        seen = 0
        state = {"started": False, "refused": False, "body_done": False}

        async def refuse(response: JSONResponse) -> dict:
            state["refused"] = True
            if not state["started"]:
                await response(scope, receive, send)
            return {"type": "http.disconnect"}

        async def guarded_receive():
            nonlocal seen
            if state["refused"] or state["body_done"] or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    return await refuse(self._too_slow(seen))
            if message["type"] == "http.request" and not state["refused"]:
                seen += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if seen > limit:
                    return await refuse(self._too_large(limit))
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            if not state["refused"]:
                await send(message)

        await self.app(scope, guarded_receive, guarded_send)


class FormLimitError(HTTPException):
    """A multipart form over one of its limits, with the error code and param the answer carries (an
    HTTPException, since FastAPI turns any other exception raised while it parses a form into a bare 400)."""

    def __init__(self, status_code: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(status_code=status_code, detail=message)
        self.code = code
        self.param = param


class BoundedFormRequest(Request):
    """A request whose multipart form is parsed under ``limits`` (max_files, max_fields, max_part_size), the
    lower of these and any FastAPI asks for, with Starlette's refusals turned into imageserve's errors."""

    limits: dict[str, int] = {}

    async def _get_form(self, **requested):
        limits = {name: min(value, requested.get(name, value)) for name, value in self.limits.items()}
        try:
            return await super()._get_form(**limits)
        except StarletteHTTPException as err:
            raise self._refusal(str(err.detail), limits) from None

    @staticmethod
    def _refusal(detail: str, limits: dict[str, int]) -> HTTPException:
        if detail.startswith("Too many files"):
            return FormLimitError(422, "limit_exceeded", f"at most {limits['max_files']} images per edit", "image")
        if detail.startswith("Too many fields"):
            return FormLimitError(422, "limit_exceeded", f"more than {limits['max_fields']} form fields")
        if detail.startswith("Part exceeded"):
            return FormLimitError(413, "request_too_large",
                                  f"a form field over the {limits['max_part_size'] / 1e3:g} KB limit")
        return FormLimitError(400, "invalid_request", f"unreadable multipart body: {detail}")


def bounded_form_route(limits: dict[str, int]) -> type[APIRoute]:
    """An APIRoute class whose requests parse their forms under ``limits`` (FastAPI's custom route pattern)."""
    request_class = type("LimitedFormRequest", (BoundedFormRequest,), {"limits": dict(limits)})

    class BoundedFormRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def bounded(request: Request):
                return await handler(request_class(request.scope, request.receive))

            return bounded

    return BoundedFormRoute


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_events(event: PartialImage | ImageResult, prefix: str, request: GenerateRequest | EditRequest,
                  internals: bool) -> list[bytes]:
    """The SSE events of one stream item, as openai-python's ImageGenStreamEvent / ImageEditStreamEvent parse
    them: a partial image, or one completed event per image (each carrying the request's usage). imageserve
    adds ``image_index`` (which of the n images) and, on completed events, ``seed``."""
    common = {"background": "opaque", "created_at": int(time.time()), "quality": request.quality or "auto",
              "size": f"{event.width}x{event.height}", "output_format": event.output_format}
    if isinstance(event, PartialImage):
        return [_sse(f"{prefix}.partial_image", {
            "type": f"{prefix}.partial_image", "b64_json": base64.b64encode(event.image).decode("ascii"),
            "partial_image_index": event.partial_image_index, "image_index": event.image_index, **common})]
    answer = event.to_openai(internals=internals)
    return [_sse(f"{prefix}.completed", {
        "type": f"{prefix}.completed", "b64_json": image["b64_json"], "usage": answer["usage"],
        "image_index": index, "seed": image["seed"], **common}) for index, image in enumerate(answer["data"])]


async def event_stream(events: AsyncIterator[StreamAccepted | PartialImage | ImageResult], prefix: str,
                       request: GenerateRequest | EditRequest, http: HttpSpec) -> StreamingResponse:
    """Server-Sent Events of ``events``, started once the first one (``StreamAccepted``) says a replica took the
    request: a refusal before that (bad input, a per-key limit, a full queue) raises, and is answered as JSON
    with its status. Later errors arrive as an ``error`` event with the same body; a silent stretch (queued,
    or slow steps) gets an SSE comment every ``http.stream_keepalive_s`` so proxies keep the connection."""
    iterator = aiter(events)
    await anext(iterator)

    async def body() -> AsyncIterator[bytes]:
        pending = asyncio.ensure_future(anext(iterator))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=http.stream_keepalive_s)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                except ImageServeError as err:
                    yield _sse("error", (err if http.show_internals else err.hiding_internals()).body())
                    return
                except Exception as err:
                    logger.exception("a stream failed")
                    yield _sse("error", InternalError(f"the stream failed: {type(err).__name__}").body())
                    return
                for chunk in stream_events(event, prefix, request, http.show_internals):
                    yield chunk
                pending = asyncio.ensure_future(anext(iterator))
        finally:
            await _close(iterator, pending)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _close(iterator: AsyncIterator[Any], pending: asyncio.Future) -> None:
    """Stop the events of a stream whose caller left (the replica stops denoising) or that ended.

    ``pending`` (a task awaiting the iterator's next event) may still be running the generator: it is cancelled
    and waited for before ``aclose``, which raises "aclose(): asynchronous generator is already running" on a
    generator another task is inside. Shielded: Starlette cancels a stream whose client left with an anyio cancel
    scope, which cancels every await of this task again until the scope exits; unshielded, the wait would end there
    and ``aclose`` never run, leaving a generator whose next event had just arrived at its yield until garbage
    collection, and with it the router's clean-up (the key's in-flight slot, the replica's stream)."""
    with anyio.CancelScope(shield=True):
        pending.cancel()
        await asyncio.wait({pending})
        if not pending.cancelled():
            pending.exception()  # retrieved, so asyncio does not log "exception was never retrieved"
        await iterator.aclose()


def create_api(service: ImageService, http: HttpSpec | None = None) -> FastAPI:
    """The FastAPI app over ``service`` (the router replica)."""
    http = http or HttpSpec()
    app = FastAPI(
        title="imageserve",
        version=__version__,
        description="OpenAI-compatible image generation (Z-Image-Turbo) and editing (Qwen-Image-Edit).",
    )

    @app.exception_handler(ImageServeError)
    async def _service_error(_: Request, err: ImageServeError) -> JSONResponse:
        err = err if http.show_internals else err.hiding_internals()
        return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers())

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        service.record_error("edit" if request.url.path.endswith("/edits") else "generate", "bad_input")
        return _validation_response(list(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if isinstance(err, FormLimitError):
            service.record_error("edit", "bad_input")
            return error_response(err.status_code, err.code, str(err.detail), err.param)
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(err.status_code, code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        wrapped = InternalError(f"internal error: {type(err).__name__}; retry shortly", retry_after_s=2)
        return JSONResponse(wrapped.body(), status_code=wrapped.status_code, headers=wrapped.headers())

    # The answers carry megabytes of base64: returned as JSONResponse, they skip FastAPI's validation and
    # re-encoding of the return value, which only copies those megabytes again.
    @app.post("/v1/images/generations", summary="Create images from a prompt", response_class=JSONResponse,
              responses=IMAGE_ROUTE_RESPONSES)
    async def generations(body: GenerateRequest, http_request: Request) -> JSONResponse:
        if body.stream:
            return await event_stream(service.generate_stream(body, key_id_of(http_request)), "image_generation",
                                      body, http)
        result = await service.generate(body, key_id_of(http_request))
        return JSONResponse(result.to_openai(internals=http.show_internals))

    form_routes = APIRouter(route_class=bounded_form_route({
        "max_files": MAX_EDIT_IMAGES, "max_fields": http.max_form_fields, "max_part_size": http.max_form_field_bytes}))

    @form_routes.post("/v1/images/edits", summary="Edit 1 to 3 images by instruction", response_class=JSONResponse,
                      responses=IMAGE_ROUTE_RESPONSES)
    async def edits(
        http_request: Request,
        prompt: Annotated[str, Form(description="The edit instruction (1-4000 characters, not blank).")],
        image: Annotated[list[UploadFile] | None, File(
            description="Input image(s), 1 to 3: PNG, JPEG or WEBP, each up to `serving.limits.max_input_pixels` "
                        "pixels; the body up to `max_body_mb`. Also taken as `image[]` (what openai-python sends "
                        "for several images), 1 to 3 in all.")] = None,
        image_array: Annotated[list[UploadFile] | None, File(alias="image[]", description="Same as image.")] = None,
        model: Annotated[str | None, Form(description=described("model"))] = None,
        n: Annotated[int, Form(description=described("n"), ge=1, le=10)] = 1,
        size: Annotated[str | None, Form(description=described("size"))] = None,
        quality: Annotated[str | None, Form(description=described("quality"))] = None,
        output_format: Annotated[str, Form(description=described("output_format"))] = "png",
        output_compression: Annotated[int | None, Form(description=described("output_compression"))] = None,
        background: Annotated[str | None, Form(description=described("background"))] = None,
        response_format: Annotated[str, Form(description=described("response_format"))] = "b64_json",
        seed: Annotated[int | None, Form(description=described("seed"))] = None,
        num_inference_steps: Annotated[int | None, Form(description=described("num_inference_steps"))] = None,
        true_cfg_scale: Annotated[float | None, Form(description=described("true_cfg_scale"))] = None,
        negative_prompt: Annotated[str | None, Form(description="What to steer away from (with CFG).")] = None,
        user: Annotated[str | None, Form(description=described("user"))] = None,
        stream: Annotated[bool, Form(description=described("stream"))] = False,
        partial_images: Annotated[int, Form(description=described("partial_images"), ge=0,
                                            le=MAX_PARTIAL_IMAGES)] = 0,
        lora: Annotated[str | None, Form(description="Name of a per-request LoRA from the service's list "
                                                     "(docs/loras.md); JSON's `lora.name`.")] = None,
        # Its bounds hold with or without `lora` (the schema states them for the field alone): a scale of 5 was
        # accepted when no LoRA was named.
        lora_scale: Annotated[float, Form(description="Its scale (JSON's `lora.scale`); ignored without `lora`.",
                                          ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)] = 1.0,
    ) -> JSONResponse:
        files = [*(image or []), *(image_array or [])]
        try:
            request = EditRequest(
                images=[await f.read() for f in files], prompt=prompt, model=model, n=n, size=size,
                quality=quality, output_format=output_format, output_compression=output_compression,
                background=background,
                response_format=response_format, seed=seed, num_inference_steps=num_inference_steps,
                true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt, user=user, stream=stream,
                partial_images=partial_images,
                lora=None if lora is None else {"name": lora, "scale": lora_scale},
            )
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None
        if request.stream:
            return await event_stream(service.edit_stream(request, key_id_of(http_request)), "image_edit", request,
                                      http)
        result = await service.edit(request, key_id_of(http_request))
        return JSONResponse(result.to_openai(internals=http.show_internals))

    app.include_router(form_routes)

    @app.get("/v1/models", summary="Model variants and their needs (and, with serving.show_internals, the pools "
                                   "and replicas serving them)")
    async def list_models() -> dict[str, Any]:
        return await service.models(internals=http.show_internals)

    if http.metrics_route:
        @app.get(METRICS_PATH, summary="Prometheus metrics of this node (single-node runs); with API keys "
                                       "configured, it takes a metrics key", response_class=PlainTextResponse)
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(await service.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/healthz", summary="Liveness of the HTTP router")
    async def healthz() -> dict[str, Any]:
        return await service.health(internals=http.show_internals)

    @app.get("/readyz", summary="Readiness: every served variant can take a request now",
             responses={503: _error("Some served variant has no running replica yet; the message says which (not "
                                    "with serving.show_internals: false).", retry_after=True)})
    async def readyz() -> dict[str, Any]:
        return await service.readiness(internals=http.show_internals)

    app.openapi = lambda: _edit_form_as_the_request_states_it(FastAPI.openapi(app))

    # Outermost first: the key check runs before anything reads the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=http.max_body_bytes,
                       route_limits={"/v1/images/generations": http.max_json_bytes},
                       read_timeout_s=http.body_read_timeout_s)
    id_secret = key_id_secret()
    keys = KeyRing(http.api_key_sha256, http.api_keys_file, id_secret=id_secret)
    metrics_keys = KeyRing(http.metrics_key_sha256, id_secret=id_secret, env_var=METRICS_KEYS_ENV, warn_if_open=False)
    refuse_open_non_loopback(keys, http.host, http.public)
    if keys.configured or metrics_keys.configured:
        app.add_middleware(ApiKeyMiddleware, keys=keys, metrics_keys=metrics_keys)
    return app


def _edit_form_as_the_request_states_it(schema: dict[str, Any]) -> dict[str, Any]:
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


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    field = {key: value for key, value in field.items() if key != "default" or value is not None}
    kinds = field.pop("anyOf", None)
    if kinds is None:
        return field
    (kind,) = [k for k in kinds if k != {"type": "null"}]
    return {**field, **kind}


@serve.ingress()
class OpenAIIngress(Router):
    """The router deployment with the OpenAI images API in front: HTTP and handle calls both arrive here."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self.spec.http)


def build_ingress(spec: RouterSpec, replicas: dict[str, Application]) -> Application:
    """The application's ingress, bound to its spec and to the model deployments it routes to."""
    return serve.deployment(OpenAIIngress).options(**Router.serve_options(spec)).bind(spec, replicas)
