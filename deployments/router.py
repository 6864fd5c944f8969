"""The router: ingress deployment that validates requests and sends each to a replica that can serve it.

Routing state is a list of *routes* per variant, each a (GPU pool, deployment handle) pair, so a
fleet with several GPU pools per variant only adds routes; the request path does not change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError

from serve_app.catalog import ModelVariant
from serve_app.config import AppConfig
from serve_app.errors import (
    ImageServeError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    OverloadedError,
)
from serve_app.images import open_image
from serve_app.planner import OFFLOAD_MODES, estimate_vram, plan
from serve_app.schemas import EditRequest, GenerateRequest, ImageResult

logger = logging.getLogger(__name__)

DEFAULT_MODEL = {"generate": "z-image-turbo", "edit": "qwen-image-edit"}
ENDPOINT = {"generate": "/v1/images/generations", "edit": "/v1/images/edits"}
RETRY_AFTER_S = 2


@dataclass
class Route:
    """One way to serve a variant: a deployment on one GPU pool."""

    pool: str
    gpu_class: str | None
    deployment: str
    handle: Any


def _unwrap(err: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's RayTaskError wrapper."""
    return getattr(err, "cause", None) or err


@serve.deployment(name="router", max_ongoing_requests=1000)
@serve.ingress()
class Router:
    """Ingress: HTTP (see ``serve_app.api``) and Python handle calls both arrive here.

    Args:
        routes: variant id -> list of {"pool", "gpu_class", "deployment", "handle"}.
        config: the app config as a plain dict.
        unavailable: variant id -> why this application does not serve it.
    """

    def __init__(self, routes: dict[str, list[dict[str, Any]]], config: dict[str, Any],
                 unavailable: dict[str, str]) -> None:
        self.config = AppConfig.model_validate(config)
        self.catalog = self.config.build_catalog()
        self.routes = {vid: [Route(**r) for r in rs] for vid, rs in routes.items()}
        self.unavailable = unavailable
        self._outstanding: Counter[str] = Counter()
        self._replica_counts: tuple[float, dict[str, int]] = (0.0, {})
        self._static_model_info = {v.id: self._describe(v) for v in self.catalog.variants.values()}

    def __serve_build_asgi_app__(self):
        from serve_app.api import create_api

        return create_api(self)

    # ---- resolution and validation -------------------------------------------------------

    def resolve(self, name: str | None, task: str) -> ModelVariant:
        """A requested model name (variant id or alias) -> the variant this deployment will run."""
        name = name or DEFAULT_MODEL[task]
        try:
            candidates = self.catalog.candidates(name)
        except KeyError:
            raise ModelNotFoundError(
                f"unknown model {name!r}; known models: {', '.join(self.catalog.names())}", param="model"
            ) from None
        for_task = [v for v in candidates if v.task == task]
        if not for_task:
            other = candidates[0].task
            raise InvalidRequestError(
                f"{name} is {'an edit' if other == 'edit' else 'a generation'} model: send it to {ENDPOINT[other]}", param="model"
            )
        served = [v for v in for_task if self.routes.get(v.id)]
        if not served:
            reasons = "; ".join(f"{v.id}: {self.unavailable.get(v.id, 'not deployed')}" for v in for_task)
            raise ModelUnavailableError(f"no replica of this deployment can serve {name} ({reasons})",
                                        param="model")
        return served[0]

    def resolve_size(self, request: GenerateRequest | EditRequest, variant: ModelVariant) -> tuple[int, int]:
        width, height = request.dimensions()
        width = width or self.config.defaults.width or variant.defaults.width
        height = height or self.config.defaults.height or variant.defaults.height
        for side in (width, height):
            if not variant.min_side <= side <= variant.max_side:
                raise InvalidRequestError(
                    f"size {width}x{height} is outside {variant.id}'s range of "
                    f"{variant.min_side} to {variant.max_side} pixels per side", param="size",
                )
        return width, height

    def check_images(self, request: EditRequest, variant: ModelVariant) -> None:
        if len(request.images) > variant.max_input_images:
            raise InvalidRequestError(
                f"{variant.id} takes at most {variant.max_input_images} input images, got {len(request.images)}",
                param="image",
            )
        for i, data in enumerate(request.images):
            open_image(data, name=f"image {i + 1}")

    # ---- dispatch -------------------------------------------------------------------------

    def choose_route(self, variant: ModelVariant) -> Route:
        """The route with the fewest requests this router has outstanding on it."""
        return min(self.routes[variant.id], key=lambda r: self._outstanding[r.deployment])

    async def _dispatch(self, variant: ModelVariant, method: str, *args: Any) -> ImageResult:
        route = self.choose_route(variant)
        self._outstanding[route.deployment] += 1
        try:
            return await getattr(route.handle, method).remote(*args)
        except BackPressureError:
            raise OverloadedError(
                f"{variant.id} is at capacity (every replica busy and its queue full); retry shortly",
                retry_after_s=RETRY_AFTER_S,
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below, never surfaced raw
            cause = _unwrap(err)
            if isinstance(cause, ImageServeError):
                raise cause from None
            logger.exception("%s failed on %s", variant.id, route.deployment)
            raise InternalError(
                f"{variant.id} failed on {route.pool}: {type(cause).__name__}; retry shortly",
                retry_after_s=RETRY_AFTER_S,
            ) from None
        finally:
            self._outstanding[route.deployment] -= 1

    async def generate(self, request: GenerateRequest) -> ImageResult:
        """Text to image. Same path for HTTP and for ``serve.get_app_handle(...).generate``."""
        variant = self.resolve(request.model, "generate")
        width, height = self.resolve_size(request, variant)
        return await self._dispatch(variant, "generate", request, width, height)

    async def edit(self, request: EditRequest) -> ImageResult:
        """Instruction editing of 1 to 3 images."""
        variant = self.resolve(request.model, "edit")
        width, height = self.resolve_size(request, variant)
        self.check_images(request, variant)
        return await self._dispatch(variant, "edit", request, width, height)

    # ---- introspection --------------------------------------------------------------------

    def _describe(self, variant: ModelVariant) -> dict[str, Any]:
        w, h = self.config.defaults.width, self.config.defaults.height
        return {
            "id": variant.id,
            "object": "model",
            "owned_by": "imageserve",
            "task": variant.task,
            "base_model": variant.base_model,
            "precision": variant.precision,
            "svdq_rank": variant.svdq_rank,
            "default_steps": variant.defaults.num_inference_steps,
            "max_input_images": variant.max_input_images,
            "vram_gib": {m: estimate_vram(variant, m, w or variant.defaults.width, h or variant.defaults.height,
                                          1 if variant.task == "edit" else 0).peak_gib for m in OFFLOAD_MODES},
            "gpu_classes": [
                {"gpu_class": g.id, "offload_mode": p.mode, "peak_vram_gib": p.peak_vram_gib}
                for g in self.catalog.gpus.values() if (p := plan(variant, g, w, h)).fits
            ],
        }

    def _running_replicas(self) -> dict[str, int]:
        stamp, counts = self._replica_counts
        if time.monotonic() - stamp < 2.0:
            return counts
        counts = {}
        try:
            app = serve.status().applications.get(self.config.serving.app_name)
            for name, status in (app.deployments if app else {}).items():
                counts[name] = status.replica_states.get("RUNNING", 0)
        except Exception:  # noqa: BLE001 - status is informative only
            logger.warning("could not read serve status", exc_info=True)
        self._replica_counts = (time.monotonic(), counts)
        return counts

    async def models(self) -> dict[str, Any]:
        counts = await asyncio.to_thread(self._running_replicas)
        data = []
        for vid, info in self._static_model_info.items():
            routes = self.routes.get(vid, [])
            entry = dict(info)
            entry["served"] = bool(routes)
            entry["pools"] = [{"pool": r.pool, "gpu_class": r.gpu_class, "deployment": r.deployment,
                               "replicas": counts.get(r.deployment, 0)} for r in routes]
            entry["replicas"] = sum(p["replicas"] for p in entry["pools"])
            if not routes:
                entry["unavailable_reason"] = self.unavailable.get(vid, "not deployed")
            data.append(entry)
        for alias in self.catalog.aliases:
            if alias in self.catalog.variants:
                continue  # a variant id that is also an alias is listed once, as the variant
            task = self.catalog.candidates(alias)[0].task
            try:
                resolves_to = self.resolve(alias, task).id
            except ImageServeError:
                resolves_to = None
            data.append({"id": alias, "object": "model", "owned_by": "imageserve", "task": task,
                         "alias_for": self.catalog.aliases[alias], "resolves_to": resolves_to})
        return {"object": "list", "data": data}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.routes)}
