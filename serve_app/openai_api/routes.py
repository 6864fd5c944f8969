"""The routes of the OpenAI images API, over an ``ImageService`` (the router replica).

Routes: ``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart, ``image``
or ``image[]``), both answering Server-Sent Events with ``stream: true``, the Files and Batches API
(``serve_app.openai_api.batches``), ``GET /v1/models``,
``GET /healthz`` (liveness), ``GET /readyz`` (readiness),
``GET /metrics``, ``GET /v1/fleet`` and the console page at ``/ui`` (``serve_app.console``); the OpenAPI schema
is at ``/openapi.json``. Every error is JSON:
``{"error": {"code", "message", "param", "type"}}``. This module parses and answers HTTP;
``deployments.router.Router`` does the work. ``create_api`` puts together the error handlers, the image
routes, the model and probe routes, and the middlewares, each below.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.api_keys import METRICS_KEYS_ENV, KeyRing, key_id_secret, refuse_open_non_loopback
from serve_app.console import console_routes
from serve_app.domain.errors import ImageServeError, InternalError
from serve_app.domain.schemas import (
    MAX_EDIT_IMAGES,
    MAX_LORA_SCALE,
    MAX_PARTIAL_IMAGES,
    EditRequest,
    GenerateRequest,
    ImageResult,
    PartialImage,
    StreamAccepted,
)
from serve_app.domain.specs import HttpSpec
from serve_app.openai_api.batches import batch_routes, body_limits
from serve_app.openai_api.errors import error_response, validation_response
from serve_app.openai_api.forms import FormLimitError, bounded_form_route
from serve_app.openai_api.middlewares import METRICS_PATH, ApiKeyMiddleware, BodyLimitMiddleware, key_id_of
from serve_app.openai_api.openapi import (
    IMAGE_ROUTE_RESPONSES,
    described,
    edit_form_as_the_request_states_it,
    error_doc,
    form_without_null,
)
from serve_app.openai_api.sse import event_stream

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
    async def fleet(self, internals: bool = True) -> dict[str, Any]: ...
    async def health(self, internals: bool = True) -> dict[str, Any]: ...
    async def readiness(self, internals: bool = True) -> dict[str, Any]: ...
    async def metrics_text(self) -> str: ...
    def record_error(self, task: str, reason: str) -> None: ...


def create_api(service: ImageService, http: HttpSpec | None = None) -> FastAPI:
    """The FastAPI app over ``service`` (the router replica)."""
    http = http or HttpSpec()
    app = FastAPI(
        title="imageserve",
        version=__version__,
        description="OpenAI-compatible image generation (Z-Image-Turbo) and editing (Qwen-Image-Edit).",
    )
    add_error_handlers(app, service, http)
    add_generation_route(app, service, http)
    app.include_router(edit_routes(service, http))
    app.include_router(console_routes())
    batch_api = getattr(service, "batch_api", None)
    if batch_api is not None:
        app.include_router(batch_routes(service))
    add_model_and_probe_routes(app, service, http)
    app.openapi = lambda: stated_forms(FastAPI.openapi(app), batch_api is not None)
    add_middlewares(app, http, body_limits(batch_api.settings.max_file_bytes, http) if batch_api else {})
    return app


def stated_forms(schema: dict[str, Any], batches: bool) -> dict[str, Any]:
    """The schema's multipart forms as their requests state them (``serve_app.openai_api.openapi``)."""
    schema = edit_form_as_the_request_states_it(schema)
    return form_without_null(schema, "/v1/files") if batches else schema


def add_error_handlers(app: FastAPI, service: ImageService, http: HttpSpec) -> None:
    """Every error answered as JSON: imageserve's own, validation, HTTP, and the unexpected (a 500)."""

    @app.exception_handler(ImageServeError)
    async def _service_error(_: Request, err: ImageServeError) -> JSONResponse:
        err = err if http.show_internals else err.hiding_internals()
        return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers())

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        service.record_error("edit" if request.url.path.endswith("/edits") else "generate", "bad_input")
        return validation_response(list(err.errors()))

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


# The answers carry megabytes of base64, written by the replica: the body splices those texts in
# (ImageResult.openai_body) and is returned as a Response, which skips FastAPI's validation and
# re-encoding of the return value, and JSONResponse's json.dumps of the megabytes.

# The stages a Server-Timing header reports, in the order a request passes them.
SERVER_TIMING_STAGES = ("queue_s", "total_s", "encode_s", "to_router_s")


def image_response(result: ImageResult, http: HttpSpec) -> Response:
    """The answer's bytes; with ``show_internals``, a ``Server-Timing`` header too (the W3C header browsers'
    developer tools show): milliseconds queued, in the pipeline, encoding, moving to the router, and building
    this body."""
    started = time.perf_counter()
    body = result.openai_body(internals=http.show_internals)
    headers = None
    if http.show_internals:
        stages = [f"{stage.removesuffix('_s')};dur={1000 * result.timings[stage]:.1f}"
                  for stage in SERVER_TIMING_STAGES if stage in result.timings]
        headers = {"Server-Timing": ", ".join([*stages, f"answer;dur={1000 * (time.perf_counter() - started):.1f}"])}
    return Response(body, media_type="application/json", headers=headers)


def add_generation_route(app: FastAPI, service: ImageService, http: HttpSpec) -> None:
    @app.post("/v1/images/generations", summary="Create images from a prompt", response_class=JSONResponse,
              responses=IMAGE_ROUTE_RESPONSES)
    async def generations(body: GenerateRequest, http_request: Request) -> JSONResponse:
        if body.stream:
            return await event_stream(service.generate_stream(body, key_id_of(http_request)), "image_generation",
                                      body, http)
        result = await service.generate(body, key_id_of(http_request))
        return image_response(result, http)


def edit_routes(service: ImageService, http: HttpSpec) -> APIRouter:
    """The edit route, whose multipart form is parsed under the configured limits."""
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
        return image_response(result, http)

    return form_routes


def add_model_and_probe_routes(app: FastAPI, service: ImageService, http: HttpSpec) -> None:
    @app.get("/v1/models", summary="Model variants and their needs (and, with serving.show_internals, the pools "
                                   "and replicas serving them)")
    async def list_models() -> dict[str, Any]:
        return await service.models(internals=http.show_internals)

    @app.get("/v1/fleet", summary="The fleet as the console shows it: served variants and whether each is ready; "
                                  "with serving.show_internals, pools, replicas running and starting, placement, "
                                  "queue depth and recent p50/p95 seconds per variant (docs/console.md)")
    async def fleet() -> dict[str, Any]:
        return await service.fleet(internals=http.show_internals)

    if http.metrics_route:
        @app.get(METRICS_PATH, summary="Prometheus metrics of this node (single-node runs); with API keys "
                                       "configured, it takes a metrics key", response_class=PlainTextResponse)
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(await service.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/healthz", summary="Liveness of the HTTP router")
    async def healthz() -> dict[str, Any]:
        return await service.health(internals=http.show_internals)

    @app.get("/readyz", summary="Readiness: every served variant can take a request now",
             responses={503: error_doc("Some served variant has no running replica yet; the message says which (not "
                                    "with serving.show_internals: false).", retry_after=True)})
    async def readyz() -> dict[str, Any]:
        return await service.readiness(internals=http.show_internals)


def add_middlewares(app: FastAPI, http: HttpSpec, route_limits: dict[str, int] | None = None) -> None:
    """The body limits, and the key check outside them: it runs before anything reads the body."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=http.max_body_bytes,
                       route_limits={"/v1/images/generations": http.max_json_bytes, **(route_limits or {})},
                       read_timeout_s=http.body_read_timeout_s)
    id_secret = key_id_secret()
    keys = KeyRing(http.api_key_sha256, http.api_keys_file, id_secret=id_secret)
    metrics_keys = KeyRing(http.metrics_key_sha256, id_secret=id_secret, env_var=METRICS_KEYS_ENV, warn_if_open=False)
    refuse_open_non_loopback(keys, http.host, http.public)
    if keys.configured or metrics_keys.configured:
        app.add_middleware(ApiKeyMiddleware, keys=keys, metrics_keys=metrics_keys)


