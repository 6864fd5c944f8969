"""The router: it checks each request and sends it to a model replica that can serve it.

Python handle callers reach ``Router.generate`` / ``Router.edit`` directly; HTTP callers reach them
through the OpenAI images API that ``serve_app.openai_api`` puts in front of this class. The policy
that picks a (variant, GPU pool) lives in ``serve_app.domain.routing`` (no Ray there); this module
does the I/O: calling replicas, measuring them, retrying once on a larger GPU after an
out-of-memory error (and once after a lost replica), and mapping failures to the errors callers see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.batch_api import BatchApi
from deployments.batch_runner import BatchRunner
from deployments.batch_store import open_store
from deployments.metrics import RouterMetrics, error_reason, fetch_node_metrics, replica_id
from serve_app.domain.catalog import ModelVariant
from serve_app.domain.errors import (
    ImageServeError,
    InternalError,
    LimitExceededError,
    LoraNotFoundError,
    NotReadyError,
    OverloadedError,
    RateLimitedError,
    ReplicaOutOfMemoryError,
    UnsupportedValueError,
)
from serve_app.domain.fleet import RecentLatencies, fleet_status
from serve_app.domain.images import (
    DecodeLimits,
    InputImage,
    input_decode_cost,
    inspect_image,
    limit_pillow,
    prepare_input_image,
)
from serve_app.domain.planner import OFFLOAD_MODES, estimate_vram, plan
from serve_app.domain.quotas import Admission, KeyQuotas
from serve_app.domain.routing import Route, RoutingTable
from serve_app.domain.schemas import (
    MAX_SEED,
    AliasCard,
    EditRequest,
    GenerateRequest,
    ImageResult,
    ModelCard,
    PartialImage,
    StreamAccepted,
)
from serve_app.domain.specs import RouterSpec

logger = logging.getLogger(__name__)
# One line per answered request, naming the caller by key id: under "ray.serve", so that Serve writes it to
# the replica's log file with the request id, next to its own access line.
request_log = logging.getLogger("ray.serve.imageserve.requests")

RETRY_AFTER_S = 2
REPLICA_COUNT_TTL_S = 2.0
READY_RETRY_AFTER_S = 5  # a replica loads in seconds (tiny) to minutes (20B from disk): ask again soon
# Threads per router replica that check and decode input images (Pillow releases the GIL): at most this many
# images in decoding memory at once (~0.25 GB each at 16 MP), the rest waiting with only their bytes.
INPUT_DECODE_WORKERS = 2
# A replica that dies mid-request (killed, node lost) never answered: one retry is safe.
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


def lora_load_cost(result: ImageResult, cost: float) -> float:
    """What the LoRA load or hotswap a request caused cost, in its own megapixel-steps: the GPU seconds the load
    took (``lora_load_s``, timed by the engine) at the rate the request's pipeline work ran. A batch shares one
    load, and each of its requests pays in proportion to its share of the work. 0 without a load."""
    load_s = result.timings.get("lora_load_s", 0.0)
    work_s = result.timings.get("total_s", 0.0) - load_s
    if load_s <= 0 or work_s <= 0:
        return 0.0
    return cost * load_s / work_s


def received(result: ImageResult) -> None:
    """Time Ray took to bring ``result`` from the replica (``timings.to_router_s``). Replica and router may be on
    two nodes: their clocks agree to NTP's precision, and a skew that would make it negative counts as 0."""
    if result.replied_at is not None:
        result.timings["to_router_s"] = round(max(0.0, time.time() - result.replied_at), 4)


def _unwrap(err: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's RayTaskError wrapper."""
    return getattr(err, "cause", None) or err


class Router:
    """Validates requests and dispatches each to the best route.

    Args:
        spec: the catalog, the routes of every served variant, limits and HTTP settings.
        handles: deployment name -> handle of that model deployment.
    """

    @classmethod
    def serve_options(cls, spec: RouterSpec) -> dict[str, Any]:
        # The router awaits replicas and does little work itself: many requests share one replica. Past its
        # bound, Serve's proxy queues a few more and answers the rest 429 with Retry-After.
        return {"name": "router", "num_replicas": spec.num_replicas,
                "max_ongoing_requests": spec.max_ongoing_requests, "max_queued_requests": spec.max_queued_requests,
                "backpressure_config": {"status_code": 429, "retry_after_s": RETRY_AFTER_S},
                "graceful_shutdown_timeout_s": spec.graceful_shutdown_timeout_s,
                "ray_actor_options": {"num_cpus": spec.num_cpus}}

    def __init__(self, spec: RouterSpec, handles: dict[str, Any]) -> None:
        self.spec = spec
        self.catalog = spec.catalog
        limit_pillow(spec.max_input_pixels)
        self.decode_limits = DecodeLimits(max_pixels=spec.max_input_pixels)
        self._decoders = ThreadPoolExecutor(INPUT_DECODE_WORKERS, thread_name_prefix="input-decode")
        routes: dict[str, list[Route]] = {}
        for r in spec.routes:
            handle = handles[r.deployment]
            if r.shared:  # a swap group: the variant travels as the multiplexed model id, for affinity
                handle = handle.options(multiplexed_model_id=r.variant)
            routes.setdefault(r.variant, []).append(Route(
                pool=r.pool, gpu_class=r.gpu_class, deployment=r.deployment, handle=handle,
                vram_gib=r.vram_gib, cost_s=r.cost_s, min_replicas=r.min_replicas, offload_mode=r.offload_mode))
        self.table = RoutingTable(self.catalog, routes, dict(spec.unavailable))
        self._shared = {r.deployment for r in spec.routes if r.shared}
        self._lora_handles: dict[tuple[str, str], Any] = {}
        self._refresher: asyncio.Task | None = None
        self._counts_read = False  # whether table.replicas holds a reading of Serve's status yet
        self._replica_states: dict[str, dict[str, int]] = {}  # the same reading, every state: the fleet view's
        self.latencies = RecentLatencies()  # interactive answers' seconds, per variant: the fleet view's p50/p95
        self.metrics = RouterMetrics()
        self.quotas = KeyQuotas(spec.key_limits.share(spec.num_replicas))
        self._static_model_info = {v.id: self._describe(v) for v in self.catalog.variants.values()}
        self.batch_api = self._batch_api(spec) if spec.batch.enabled else None

    def _batch_api(self, spec: RouterSpec) -> BatchApi:
        """The Files and Batches API over the shared store, and this replica's batch runner (started with the
        replica's event loop: here if it runs, else at the first request or health check)."""
        store = open_store(spec.batch, spec.app_name)
        owner = f"{replica_id() or 'router'}-{os.getpid()}-{secrets.token_hex(4)}"
        runner = BatchRunner(store, spec.batch, self._background_answer, owner, spec.http.show_internals,
                             self.metrics)
        with contextlib.suppress(RuntimeError):  # no running loop: started later
            asyncio.get_running_loop()
            runner.start()
        return BatchApi(store, spec.batch, runner)

    def _start_background(self) -> None:
        self._start_replica_count_refresh()
        if self.batch_api is not None:
            self.batch_api.runner.start()

    async def check_health(self) -> None:
        """Serve's periodic health check; it also starts this replica's batch runner after a restart, when no
        request has arrived yet to start it (a batch resumes without one). The replica-count refresh stays with the
        first request: started here, at a replica's start, its first reading raced the application's deploy and
        a readiness probe once answered 503 in CI after the replicas ran."""
        if self.batch_api is not None:
            self.batch_api.runner.start()

    async def _background_answer(self, task: str, request: GenerateRequest | EditRequest,
                                 key_id: str | None) -> ImageResult:
        """A batch line's answer: the request's own path, as background work (model replicas run it only while no
        interactive request waits)."""
        return await self._answer(task, request, key_id, background=True)

    # ---- the two tasks ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, key_id: str | None = None) -> ImageResult:
        """Text to image. Same path for HTTP and for ``serve.get_app_handle(...).generate``.
        ``key_id``: the caller's API key id (the HTTP layer sets it), for per-key limits, metrics and logs."""
        return await self._answer("generate", request, key_id)

    async def edit(self, request: EditRequest, key_id: str | None = None) -> ImageResult:
        """Instruction editing of 1 to 3 images."""
        return await self._answer("edit", request, key_id)

    async def generate_stream(self, request: GenerateRequest,
                              key_id: str | None = None) -> AsyncIterator[StreamAccepted | PartialImage | ImageResult]:
        """Text to image, streamed: ``StreamAccepted`` once a replica has taken the request, the previews
        ``request.partial_images`` asks for per image (``PartialImage``), then the ``ImageResult``. Through a
        handle: ``handle.options(stream=True).generate_stream.remote(request)``. Refusals raise before the
        first event; a failure later raises where the stream stands."""
        async for event in self._events("generate", request, key_id, streamed=True):
            yield event

    async def edit_stream(self, request: EditRequest,
                          key_id: str | None = None) -> AsyncIterator[StreamAccepted | PartialImage | ImageResult]:
        """Instruction editing, streamed as ``generate_stream`` streams."""
        async for event in self._events("edit", request, key_id, streamed=True):
            yield event

    def _checked(self, task: str, request: GenerateRequest | EditRequest) -> tuple[list[ModelVariant],
                                                                                 tuple[int, int], float]:
        """The variants that may serve ``request``, its size and its cost, or the error refusing it."""
        variants = self.check_lora(request, self.table.resolve(request.model, task))
        size = self.resolve_size(request, variants[0])
        self.check_input_images(request, variants[0])
        self.check_output(request)
        self.check_guidance(request, variants)
        self.check_steps(request, variants)
        cost = self.check_cost(request, variants[0], size)
        self.check_batch_fits(request, variants, size)
        return variants, size, cost

    async def _answer(self, task: str, request: GenerateRequest | EditRequest, key_id: str | None,
                      background: bool = False) -> ImageResult:
        """A plain answer is the last event of the request's stream (asking for no previews)."""
        result = None
        async for event in self._events(task, request.model_copy(update={"partial_images": 0}), key_id,
                                        streamed=False, background=background):
            result = event
        assert isinstance(result, ImageResult), result  # _dispatch ends with the result, or raises
        return result

    async def _events(self, task: str, request: GenerateRequest | EditRequest, key_id: str | None,
                      streamed: bool, background: bool = False) -> AsyncIterator[StreamAccepted | PartialImage |
                                                                                  ImageResult]:
        """The one path of every request: checked, admitted under its key's limits, dispatched, charged. A
        caller that leaves (cancels its call, or stops reading its stream) ends here as "cancelled".
        ``background``: a batch line, which model replicas run only while no interactive request waits."""
        variant_id = None
        status = "cancelled"  # unless it ends otherwise
        started = time.monotonic()
        try:
            variants, size, cost = self._checked(task, request)
            variant_id = variants[0].id
            request, decode_cost, admission = await self._admitted(key_id, request, cost)
            request = self.seeded(request)
            try:
                async for event in self._dispatch(variants, request, size, background):
                    if isinstance(event, ImageResult):
                        self._answered(key_id, task, event, cost, decode_cost)
                        if not background:  # a batch line waits for idle time: not what users see
                            self.latencies.record(event.variant, time.monotonic() - started)
                        status = "ok"
                    yield event
            finally:
                admission.release()
        except ImageServeError as err:
            status = error_reason(err)
            self._refused(key_id, task, variant_id, err)
            raise
        finally:
            if status == "cancelled":
                self.metrics.error(task, variant_id, "cancelled")
                self.metrics.keyed(key_id, task, "cancelled")
            if streamed:
                self.metrics.streams.inc(tags={"task": task, "status": status})

    def _answered(self, key_id: str | None, task: str, result: ImageResult, cost: float,
                  decode_cost: float = 0.0) -> None:
        """Charge the request what it cost: its planned cost, plus the GPU time a LoRA load or hotswap took for it
        (``lora_load_cost``), which only the replica knows and which the key's bucket pays after the fact.
        ``decode_cost``, what its input images cost to decode, was charged at admission (``_admitted``)."""
        extra = lora_load_cost(result, cost)
        if extra:
            self.quotas.charge(key_id, extra)
        self.metrics.keyed(key_id, task, "ok", cost + decode_cost + extra)
        request_log.info("key %s: %s %s, %.2f megapixel-steps%s%s, %.2f s", key_id or "-", task, result.variant,
                         cost + decode_cost + extra, f" ({extra:.2f} for a LoRA load)" if extra else "",
                         f" ({decode_cost:.2f} to decode its inputs)" if decode_cost else "",
                         result.timings.get("total_s", 0.0))

    def _refused(self, key_id: str | None, task: str, variant_id: str | None, err: ImageServeError) -> None:
        self.metrics.error(task, variant_id, error_reason(err))
        self.metrics.keyed(key_id, task, error_reason(err))
        if isinstance(err, RateLimitedError):
            request_log.info("key %s: %s refused by its per-key limit (%s)", key_id, task, err.message)

    # ---- validation ---------------------------------------------------------------------------

    def check_lora(self, request: GenerateRequest | EditRequest, variants: list[ModelVariant]) -> list[ModelVariant]:
        """The variants that take the request's LoRA (all of them without one), or the error refusing it."""
        if request.lora is None:
            return variants
        name = request.lora.name
        allowed = self.spec.loras.get(name)
        if allowed is None:
            listed = ", ".join(sorted(self.spec.loras)) or "none: this service takes no per-request LoRA"
            raise LoraNotFoundError(f"LoRA {name!r} is not on this service's list ({listed})", param="lora")
        taking = [v for v in variants if v.id in allowed]
        if not taking:
            raise UnsupportedValueError(
                f"LoRA {name!r} applies to {', '.join(allowed) or 'no served variant'}, not to "
                f"{request.model or variants[0].id}", param="lora")
        return taking

    def resolve_size(self, request: GenerateRequest | EditRequest, variant: ModelVariant) -> tuple[int, int]:
        width, height = request.dimensions()
        width = width or self.spec.default_width or variant.defaults.width
        height = height or self.spec.default_height or variant.defaults.height
        for side in (width, height):
            if not variant.min_side <= side <= variant.max_side:
                raise LimitExceededError(
                    f"size {width}x{height} is outside {variant.id}'s range of "
                    f"{variant.min_side} to {variant.max_side} pixels per side", param="size",
                )
            if side % variant.family.size_multiple:
                raise LimitExceededError(f"size {width}x{height}: {variant.id} takes sides in multiples of "
                                         f"{variant.family.size_multiple}", param="size")
        return width, height

    def check_input_images(self, request: GenerateRequest | EditRequest, variant: ModelVariant) -> None:
        """The number of input images; their bytes are checked and decoded off the event loop (``_admitted``)."""
        if request.num_input_images > variant.max_input_images:
            raise LimitExceededError(
                f"{variant.id} takes at most {variant.max_input_images} input images, got {request.num_input_images}",
                param="image",
            )

    async def _admitted(self, key_id: str | None, request: GenerateRequest | EditRequest,
                        cost: float) -> tuple[GenerateRequest | EditRequest, float, Admission]:
        """Admit ``request`` under its key's limits, its input images checked before and decoded after, in the
        decode threads (never on the event loop): first each image's structure and header against
        ``decode_limits`` (JPEG scans, chunks and segments, pixels: ``inspect_image``), so that a hostile file
        is refused before it is admitted or charged; then the admission, for ``cost`` plus what the images
        cost to decode (``input_decode_cost``); then the decode itself, under its CPU budget, whose pixels,
        re-encoded as plain PNGs, replace the caller's bytes, so that the replica decodes nothing untrusted.
        Returns the request to dispatch, the decode cost and the admission."""
        if not request.input_images:
            return request, 0.0, self.quotas.admit(key_id, cost)
        inputs: list[InputImage] = await self._decoded(inspect_image, request.input_images)
        decode_cost = input_decode_cost(inputs)
        admission = self.quotas.admit(key_id, cost + decode_cost)
        try:
            images: list[bytes] = await self._decoded(prepare_input_image, request.input_images)
        except BaseException:
            admission.release()
            raise
        return request.model_copy(update={"images": images}), decode_cost, admission

    async def _decoded(self, work: Callable[[bytes, DecodeLimits, str], Any], images: list[bytes]) -> list[Any]:
        """``work(image, decode_limits, name)`` for every image, in the decode threads; the first image's error
        (in request order) if any fails."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(
            loop.run_in_executor(self._decoders, work, data, self.decode_limits, f"image {i + 1}")
            for i, data in enumerate(images)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def check_steps(self, request: GenerateRequest | EditRequest, variants: list[ModelVariant]) -> None:
        """Steps every variant the request may run as can take (an alias may land on any of them)."""
        if request.num_inference_steps is None:
            return
        strictest = max(variants, key=lambda v: v.min_inference_steps)
        if request.num_inference_steps < strictest.min_inference_steps:
            raise LimitExceededError(
                f"{strictest.id} needs at least {strictest.min_inference_steps} denoising steps "
                f"(got {request.num_inference_steps})", param="num_inference_steps")

    @staticmethod
    def check_guidance(request: GenerateRequest | EditRequest, variants: list[ModelVariant]) -> None:
        """A guidance scale the pipeline of every variant the request may run as reads (``PipelineFamily.cfg_knob``):
        Qwen-Image-2.1 guides by ``true_cfg_scale``, so its generations take no ``guidance_scale``."""
        for knob in ("guidance_scale", "true_cfg_scale"):
            if getattr(request, knob, None) is None:
                continue
            ignoring = [v.id for v in variants if v.family.cfg_knob != knob]
            if ignoring:
                raise UnsupportedValueError(f"{', '.join(ignoring)} takes no {knob}: its pipeline guides by "
                                            f"{variants[0].family.cfg_knob}, which this route does not take",
                                            param=knob)

    @staticmethod
    def check_output(request: GenerateRequest | EditRequest) -> None:
        if request.background == "transparent":
            raise UnsupportedValueError(
                "background 'transparent' is not available: these models make opaque RGB images with no alpha "
                "channel; use 'opaque' or 'auto'", param="background")

    def check_batch_fits(self, request: GenerateRequest | EditRequest, variants: list[ModelVariant],
                         size: tuple[int, int]) -> None:
        """``n`` generated images run as one pipeline call: some GPU serving the request must hold that batch.
        (An edit makes its ``n`` images one call after another.)"""
        if request.n == 1 or not variants[0].family.batches_requests:
            return
        gpus = [(variant, self.catalog.gpus[route.gpu_class], route.offload_mode) for variant in variants
                for route in self.table.routes.get(variant.id, []) if route.gpu_class in self.catalog.gpus]
        if not gpus:
            return  # CPU replicas: no planner bound

        def fits(n: int) -> bool:
            # In the mode the route's replicas loaded with (a batch cannot move them to a lighter one), and with
            # CFG, which the pipeline stacks into the batch.
            return any(plan(variant, gpu, *size, request.num_input_images, batch_size=n,
                            modes=(mode,) if mode else OFFLOAD_MODES, cfg=request.runs_cfg(variant)).fits
                       for variant, gpu, mode in gpus)

        if fits(request.n):
            return
        largest = next((n for n in range(request.n - 1, 0, -1) if fits(n)), 0)
        raise LimitExceededError(
            f"n={request.n} images at {size[0]}x{size[1]} do not fit one pipeline call on any GPU serving "
            f"{variants[0].id}; at most {largest} per request at this size", param="n")

    def check_cost(self, request: GenerateRequest | EditRequest, variant: ModelVariant,
                   size: tuple[int, int]) -> float:
        """The request's cost in megapixel-steps; no single request may ask for more than the configured bound."""
        bound = self.spec.max_request_cost
        steps = variant.steps_for(request.num_inference_steps, request.quality)
        cfg = request.runs_cfg(variant)
        cost = request.cost(*size, steps, cfg)
        if bound is None or cost <= bound:
            return cost
        raise LimitExceededError(
            f"this request costs {cost:.0f} megapixel-steps ({size[0]}x{size[1]} x {steps} steps x n={request.n}"
            f" x (1 + {request.num_input_images} input images){' x 2 for classifier-free guidance' if cfg else ''}),"
            f" over this service's limit of {bound:g}: ask for fewer steps, a smaller size or fewer images",
            param="size")

    # ---- dispatch -------------------------------------------------------------------------

    async def _dispatch(self, variants: list[ModelVariant], request: GenerateRequest | EditRequest,
                        size: tuple[int, int], background: bool = False,
                        ) -> AsyncIterator[StreamAccepted | PartialImage | ImageResult]:
        """The request's events from the route the policy picks. Out of memory there is retried once on a larger
        GPU while no preview has been sent (the caller holds the first ``StreamAccepted``; the retry's own is
        not repeated)."""
        self._start_background()
        options = self.table.options(variants)
        variant, route = self.table.choose(options, images=request.n)
        self.metrics.decisions.inc(tags={"task": request.task, "variant": variant.id, "pool": route.pool,
                                         "gpu_class": route.gpu_class or "unknown"})
        previewed = False
        try:
            async for event in self._call(variant, route, self.with_steps(request, variant), size,
                                          background=background):
                previewed |= isinstance(event, PartialImage)
                yield event
        except ReplicaOutOfMemoryError as oom:
            retry = None if previewed else self.table.choose(self.table.larger_than(options, route), images=request.n)
            if retry is None:
                why = "its previews were already sent" if previewed else f"no pool with more memory serves {variant.id}"
                raise ReplicaOutOfMemoryError(f"{oom.message}; {why}", retry_after_s=oom.retry_after_s) from None
            self._retrying(variant, route, retry[1], "oom")
            async for event in self._call(*retry, self.with_steps(request, retry[0]), size, accepted=True,
                                          background=background):
                if isinstance(event, ImageResult):
                    event.retried_from = route.pool
                yield event

    async def _call(self, variant: ModelVariant, route: Route, request: GenerateRequest | EditRequest,
                    size: tuple[int, int], accepted: bool = False,
                    background: bool = False) -> AsyncIterator[StreamAccepted | PartialImage |
                                                                                      ImageResult]:
        """One route's events for ``request`` (``StreamAccepted`` left out when the caller has one already), its
        failures mapped to the errors callers see. A replica lost (killed, its node gone) before a preview was
        sent is retried once on the same route: it never answered. A batch line (``background``) is left out of the
        route's load that the routing policy weighs: a replica runs it only in time no interactive request wants."""
        load = 0 if background else 1
        self.table.outstanding[route.deployment] += load
        self._queue_gauge(variant, route)
        handle = self._handle(route, request).options(stream=True)
        previewed = False
        try:
            for attempt in (1, 2):
                events = handle.stream.remote(request, *size, background=background)
                finished = False
                try:
                    async for event in events:
                        if isinstance(event, StreamAccepted):
                            if accepted:
                                continue
                            accepted = True
                        previewed |= isinstance(event, PartialImage)
                        if isinstance(event, ImageResult):
                            received(event)
                            route.observe(event.timings.get("total_s", 0.0) / max(len(event.images), 1))
                        yield event
                    finished = True
                    return
                except REPLICA_LOST as lost:
                    if attempt == 2 or previewed:
                        raise
                    logger.warning("%s: a replica of %s was lost (%s); retrying once", variant.id, route.deployment,
                                   type(lost).__name__)
                    self._retrying(variant, route, route, "replica_lost")
                finally:
                    if not finished:
                        events.cancel()  # the replica stops denoising for a caller that left
        except Exception as err:  # noqa: BLE001 - every failure is mapped to the caller's answer, and logged;
            # cancellation and a closed generator (BaseExceptions) pass
            raise self._replica_failure(err, variant, route) from None
        finally:
            self.table.outstanding[route.deployment] -= load
            self._queue_gauge(variant, route)

    @staticmethod
    def seeded(request: GenerateRequest | EditRequest) -> GenerateRequest | EditRequest:
        """``request`` with its seed drawn here when it has none: a retry (on a larger GPU, or after a lost
        replica) then makes the same images, and the seed the answer reports is the one that made them."""
        if request.seed is not None:
            return request
        return request.model_copy(update={"seed": secrets.randbelow(MAX_SEED - request.n)})

    @staticmethod
    def with_steps(request: GenerateRequest | EditRequest, variant: ModelVariant) -> GenerateRequest | EditRequest:
        """``request`` with the denoising steps ``variant`` runs it with (its own, its quality's, the variant's
        default), resolved once for the variant the route serves: an alias may land on a variant whose default
        differs, and the replica runs what it is sent."""
        steps = variant.steps_for(request.num_inference_steps, request.quality)
        return request if steps == request.num_inference_steps else request.model_copy(
            update={"num_inference_steps": steps})

    def _retrying(self, variant: ModelVariant, route: Route, to: Route, reason: str) -> None:
        if reason == "oom":
            logger.warning("%s ran out of memory on %s; retrying on %s", variant.id, route.pool, to.pool)
        self.metrics.retries.inc(tags={"variant": variant.id, "from_pool": route.pool, "to_pool": to.pool,
                                       "reason": reason})

    def _handle(self, route: Route, request: GenerateRequest | EditRequest):
        """The route's handle for ``request``: one with a per-request LoRA names it as the multiplexed model id,
        so Serve sends it first to a replica that has that LoRA loaded (a swap group's id names the variant)."""
        if request.lora is None or route.deployment in self._shared:
            return route.handle
        key = (route.deployment, request.lora.name)
        if key not in self._lora_handles:
            self._lora_handles[key] = route.handle.options(multiplexed_model_id=request.lora.name)
        return self._lora_handles[key]

    def _replica_failure(self, err: Exception, variant: ModelVariant, route: Route) -> ImageServeError:
        """The error a caller sees for a replica call that failed: capacity, the replica's own answer, or
        (anything else) an internal error, logged here with its traceback."""
        if isinstance(err, BackPressureError):
            return OverloadedError(f"{variant.id} is at capacity (every replica busy and its queue full); "
                                   "retry shortly", retry_after_s=RETRY_AFTER_S)
        cause = _unwrap(err)
        if isinstance(cause, ImageServeError):
            return cause
        logger.error("%s failed on %s", variant.id, route.deployment, exc_info=cause)
        return InternalError(f"{variant.id} failed on {route.pool}: {type(cause).__name__}; retry shortly",
                             retry_after_s=RETRY_AFTER_S)

    def _queue_gauge(self, variant: ModelVariant, route: Route) -> None:
        self.metrics.queue.set(self.table.outstanding[route.deployment],
                               tags={"variant": variant.id, "pool": route.pool})

    # ---- operations -----------------------------------------------------------------------

    def record_error(self, task: str, reason: str) -> None:
        """Errors the HTTP layer answers before a request reaches ``generate``/``edit``."""
        self.metrics.error(task, None, reason)

    async def metrics_text(self) -> str:
        """This node's Ray metrics export, reduced to imageserve's series."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        return await asyncio.to_thread(fetch_node_metrics, node["MetricsExportPort"])

    def _describe(self, variant: ModelVariant) -> ModelCard:
        """A variant's model card: what the catalog and the planner say, the same for every caller."""
        # A request without a size gets the deployment's default (else the variant's): the VRAM figures are
        # planned at that size, with one input image for an edit, and the card says so.
        w = self.spec.default_width or variant.defaults.width
        h = self.spec.default_height or variant.defaults.height
        images = 1 if "edit" in variant.tasks else 0
        return {
            "id": variant.id,
            "object": "model",
            "owned_by": "imageserve",
            "task": "+".join(variant.tasks),
            "tasks": list(variant.tasks),
            "base_model": variant.base_model,
            "precision": variant.precision,
            "svdq_rank": variant.svdq_rank,
            "default_steps": variant.defaults.num_inference_steps,
            "max_input_images": variant.max_input_images,
            "size_range": {"min_side": variant.min_side, "max_side": variant.max_side,
                           "multiple_of": variant.family.size_multiple},
            "default_size": f"{w}x{h}",
            "loras": sorted(name for name, variants in self.spec.loras.items() if variant.id in variants),
            "vram_planned_at": {"size": f"{w}x{h}", "input_images": images},
            "vram_gib": {m: estimate_vram(variant, m, w, h, images).peak_gib for m in OFFLOAD_MODES},
            "gpu_classes": [
                {"gpu_class": g.id, "offload_mode": p.mode, "peak_vram_gib": p.peak_vram_gib}
                for g in self.catalog.gpus.values() if (p := plan(variant, g, w, h, images or None)).fits
            ],
            "served": False,
        }

    def _read_replica_states(self) -> dict[str, dict[str, int]]:
        """Deployment -> Serve's replica state -> count, for this application."""
        app = serve.status().applications.get(self.spec.app_name)
        # Its keys are ReplicaState members, a str Enum: .value is the plain name ("RUNNING").
        return {name: {getattr(state, "value", state): count for state, count in status.replica_states.items()}
                for name, status in (app.deployments if app else {}).items()}

    async def _read_replica_counts(self) -> None:
        """One reading of Serve's status into the cache: the states for the fleet view, the running counts for
        routing and readiness."""
        self._replica_states = await asyncio.to_thread(self._read_replica_states)
        self.table.replicas = {name: states.get("RUNNING", 0) for name, states in self._replica_states.items()}
        self._counts_read = True

    async def _refresh_replica_counts(self) -> None:
        while True:
            try:
                await self._read_replica_counts()
                for variant_id, routes in self.table.routes.items():
                    for route in routes:
                        self.metrics.replicas.set(self.table.replicas.get(route.deployment, 0), tags={
                            "variant": variant_id, "pool": route.pool, "gpu_class": route.gpu_class or "unknown"})
            except Exception:
                logger.warning("could not read serve status", exc_info=True)
            await asyncio.sleep(REPLICA_COUNT_TTL_S)

    async def _running_replicas(self) -> dict[str, int]:
        """Running replicas per deployment, as the background refresh last read them: /v1/models and /readyz
        must not ask the Serve controller on every request. The first call reads once, before any refresh."""
        self._start_replica_count_refresh()
        if not self._counts_read:
            await self._read_replica_counts()
        return self.table.replicas

    def _start_replica_count_refresh(self) -> None:
        """Running replicas per deployment are refreshed in the background, never on a request's path."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_replica_counts())

    async def models(self, internals: bool = True) -> dict[str, Any]:
        """The model cards. ``internals`` (``serving.show_internals`` over HTTP; a handle caller is inside the
        cluster) adds where each variant runs: its pools, deployments and running replicas, why an unserved one is
        not served (placement's reasons name pools and GPUs), and which pool each alias lands on."""
        counts = await self._running_replicas() if internals else {}
        data: list[ModelCard | AliasCard] = []
        for vid, info in self._static_model_info.items():
            routes = self.table.routes.get(vid, [])
            entry = ModelCard(**info)
            entry["served"] = bool(routes)
            if internals:
                entry["pools"] = [{"pool": r.pool, "gpu_class": r.gpu_class, "deployment": r.deployment,
                                   "replicas": counts.get(r.deployment, 0)} for r in routes]
                entry["replicas"] = sum(p["replicas"] for p in entry["pools"])
                if not routes:
                    entry["unavailable_reason"] = self.table.unavailable.get(vid, "not deployed")
            data.append(entry)
        for alias in self.catalog.aliases:
            if alias in self.catalog.variants:
                continue  # a variant id that is also an alias is listed once, as the variant
            task = self.catalog.candidates(alias)[0].tasks[0]
            try:
                resolves_to = {r.pool: v.id for v, r in self.table.options(self.table.resolve(alias, task))}
            except ImageServeError:
                resolves_to = None
            card = AliasCard(id=alias, object="model", owned_by="imageserve", task=task,
                             alias_for=self.catalog.aliases[alias], served=resolves_to is not None)
            if internals:
                card["resolves_to"] = resolves_to
            data.append(card)
        return {"object": "list", "data": data}

    async def readiness(self, internals: bool = True) -> dict[str, Any]:
        """Ready when every served variant can take a request now; NotReadyError (503) says which cannot, and
        the answer counts replicas, unless ``internals`` is off: then a probe learns ready or not, nothing more."""
        running = await self._running_replicas()
        waiting = self.table.not_ready(running)
        if waiting:
            reasons = "; ".join(f"{variant}: {why}" for variant, why in waiting.items())
            message = f"not ready: {reasons}" if internals else "not ready: a served model has no running replica yet"
            raise NotReadyError(message, retry_after_s=READY_RETRY_AFTER_S)
        if not internals:
            return {"status": "ready"}
        replicas = {variant: sum(running.get(r.deployment, 0) for r in routes)
                    for variant, routes in sorted(self.table.routes.items())}
        return {"status": "ready", "replicas": replicas}

    async def fleet(self, internals: bool = True) -> dict[str, Any]:
        """The fleet view of the console (``serve_app.domain.fleet``): pools, and per served variant its replicas
        running and starting, its placement, its queue here and its recent p50/p95 seconds. From this replica's
        caches (Serve's status, its routes, its answers): it never asks the Serve controller on a request's path.
        Without ``internals``, served variants and whether each is ready, nothing more."""
        await self._running_replicas()
        return fleet_status(self.catalog, self.spec.routes, self._replica_states, self.table.outstanding,
                            self.latencies, internals)

    async def health(self, internals: bool = True) -> dict[str, Any]:
        """Liveness, and with ``internals`` the served variants and the requests this router has at each
        deployment (other tenants' load: not for a multi-tenant endpoint's public probe)."""
        if not internals:
            return {"status": "ok"}
        in_flight = {name: count for name, count in self.table.outstanding.items() if count}
        return {"status": "ok", "models": sorted(self.table.routes), "in_flight": in_flight}
