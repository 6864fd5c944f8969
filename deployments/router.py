"""The router: the ingress deployment. It validates requests and sends each to a replica that can serve it.

The policy that picks a (variant, GPU pool) lives in ``deployments.routing`` (no Ray there); this
module does the I/O: calling replicas, measuring them, retrying once on a larger GPU after an
out-of-memory error, and mapping failures to the errors callers see.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.routing import Route, RoutingTable
from serve_app.catalog import ModelVariant
from serve_app.config import AppConfig
from serve_app.errors import (
    ImageServeError,
    InternalError,
    InvalidRequestError,
    OverloadedError,
    ReplicaOutOfMemoryError,
)
from serve_app.images import open_image
from serve_app.metrics import RouterMetrics, error_reason, fetch_node_metrics
from serve_app.planner import OFFLOAD_MODES, estimate_vram, plan
from serve_app.schemas import EditRequest, GenerateRequest, ImageResult

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 2
REPLICA_COUNT_TTL_S = 2.0
# A replica that dies mid-request (killed, node lost) never answered: one retry is safe.
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


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
        self.table = RoutingTable(self.catalog, {vid: [Route(**r) for r in rs] for vid, rs in routes.items()},
                                  unavailable)
        self._refresher: asyncio.Task | None = None
        self.metrics = RouterMetrics()
        self._static_model_info = {v.id: self._describe(v) for v in self.catalog.variants.values()}

    def __serve_build_asgi_app__(self):
        from serve_app.api import create_api

        serving = self.config.serving
        return create_api(self, api_keys=serving.api_keys, max_body_bytes=int(serving.limits.max_body_mb * 1e6),
                          metrics_route=serving.metrics_route)

    # ---- resolution and validation -------------------------------------------------------

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
            open_image(data, self.config.serving.limits.max_input_pixels, name=f"image {i + 1}")

    # ---- dispatch -------------------------------------------------------------------------

    async def _dispatch(self, variants: list[ModelVariant], method: str, request: Any,
                        size: tuple[int, int]) -> ImageResult:
        self._start_replica_count_refresh()
        options = self.table.options(variants)
        variant, route = self.table.choose(options, images=request.n)
        self.metrics.decisions.inc(tags={"task": variant.task, "variant": variant.id, "pool": route.pool,
                                         "gpu_class": route.gpu_class or "unknown"})
        try:
            return await self._call(variant, route, method, request, size)
        except ReplicaOutOfMemoryError as oom:
            retry = self.table.choose(self.table.larger_than(options, route), images=request.n)
            if retry is None:
                raise ReplicaOutOfMemoryError(
                    f"{oom.message}; no pool with more memory serves {variant.id}", retry_after_s=oom.retry_after_s
                ) from None
            logger.warning("%s ran out of memory on %s; retrying on %s", variant.id, route.pool, retry[1].pool)
            self.metrics.retries.inc(tags={"variant": variant.id, "from_pool": route.pool, "to_pool": retry[1].pool,
                                           "reason": "oom"})
            result = await self._call(*retry, method, request, size)
            result.retried_from = route.pool
            return result

    async def _call(self, variant: ModelVariant, route: Route, method: str, request: Any,
                    size: tuple[int, int]) -> ImageResult:
        self.table.outstanding[route.deployment] += 1
        self._queue_gauge(variant, route)
        try:
            try:
                result = await getattr(route.handle, method).remote(request, *size)
            except REPLICA_LOST as lost:
                logger.warning("%s: a replica of %s was lost (%s); retrying once", variant.id, route.deployment,
                               type(lost).__name__)
                self.metrics.retries.inc(tags={"variant": variant.id, "from_pool": route.pool,
                                               "to_pool": route.pool, "reason": "replica_lost"})
                result = await getattr(route.handle, method).remote(request, *size)
            route.observe(result.timings.get("total_s", 0.0) / max(len(result.images), 1))
            return result
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
            self.table.outstanding[route.deployment] -= 1
            self._queue_gauge(variant, route)

    def _queue_gauge(self, variant: ModelVariant, route: Route) -> None:
        self.metrics.queue.set(self.table.outstanding[route.deployment],
                               tags={"variant": variant.id, "pool": route.pool})

    async def generate(self, request: GenerateRequest) -> ImageResult:
        """Text to image. Same path for HTTP and for ``serve.get_app_handle(...).generate``."""
        return await self._counted("generate", request)

    async def edit(self, request: EditRequest) -> ImageResult:
        """Instruction editing of 1 to 3 images."""
        return await self._counted("edit", request)

    async def _counted(self, task: str, request: GenerateRequest | EditRequest) -> ImageResult:
        variant_id = None
        try:
            variants = self.table.resolve(request.model, task)
            variant_id = variants[0].id
            size = self.resolve_size(request, variants[0])
            if task == "edit":
                self.check_images(request, variants[0])
            return await self._dispatch(variants, task, request, size)
        except ImageServeError as err:
            self.metrics.error(task, variant_id, error_reason(err))
            raise
        except asyncio.CancelledError:
            self.metrics.error(task, variant_id, "cancelled")
            raise

    def record_error(self, task: str, reason: str) -> None:
        """Errors the HTTP layer answers before a request reaches ``generate``/``edit``."""
        self.metrics.error(task, None, reason)

    async def metrics_text(self) -> str:
        """This node's Ray metrics export, reduced to imageserve's and Serve's series."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        return await asyncio.to_thread(fetch_node_metrics, node["MetricsExportPort"])

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

    def _read_replica_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        app = serve.status().applications.get(self.config.serving.app_name)
        for name, status in (app.deployments if app else {}).items():
            counts[name] = status.replica_states.get("RUNNING", 0)
        return counts

    async def _refresh_replica_counts(self) -> None:
        while True:
            try:
                self.table.replicas = await asyncio.to_thread(self._read_replica_counts)
                for variant_id, routes in self.table.routes.items():
                    for route in routes:
                        self.metrics.replicas.set(self.table.replicas.get(route.deployment, 0), tags={
                            "variant": variant_id, "pool": route.pool, "gpu_class": route.gpu_class or "unknown"})
            except Exception:  # noqa: BLE001 - counts are advisory; keep the last ones
                logger.warning("could not read serve status", exc_info=True)
            await asyncio.sleep(REPLICA_COUNT_TTL_S)

    def _start_replica_count_refresh(self) -> None:
        """Running replicas per deployment are refreshed in the background, never on a request's path."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_replica_counts())

    async def models(self) -> dict[str, Any]:
        counts = await asyncio.to_thread(self._read_replica_counts)
        data = []
        for vid, info in self._static_model_info.items():
            routes = self.table.routes.get(vid, [])
            entry = dict(info)
            entry["served"] = bool(routes)
            entry["pools"] = [{"pool": r.pool, "gpu_class": r.gpu_class, "deployment": r.deployment,
                               "replicas": counts.get(r.deployment, 0)} for r in routes]
            entry["replicas"] = sum(p["replicas"] for p in entry["pools"])
            if not routes:
                entry["unavailable_reason"] = self.table.unavailable.get(vid, "not deployed")
            data.append(entry)
        for alias in self.catalog.aliases:
            if alias in self.catalog.variants:
                continue  # a variant id that is also an alias is listed once, as the variant
            task = self.catalog.candidates(alias)[0].task
            try:
                resolves_to = {r.pool: v.id for v, r in self.table.options(self.table.resolve(alias, task))}
            except ImageServeError:
                resolves_to = None
            data.append({"id": alias, "object": "model", "owned_by": "imageserve", "task": task,
                         "alias_for": self.catalog.aliases[alias], "resolves_to": resolves_to})
        return {"object": "list", "data": data}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.table.routes)}
