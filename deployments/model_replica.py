"""Model replicas: one engine (one variant) per Ray Serve replica, fed by a batch queue.

The path of a request inside a replica:

``run`` (called by the router) makes a ``Job`` and queues it under its engine's batch key; the queue
(``deployments/batching.py``) runs one batch at a time (the replica has one pipeline), and while a batch runs
the next one fills;
``_run_batch`` hands a batch to the replica's worker thread; there ``_run_in_worker`` calls
``engine.run`` and turns each result into an ``ImageResult``. An unbatched request
(``max_batch_size`` 1, and every edit) is a batch of one through the same path.

``ModelReplica`` is the deployment of every variant, whichever tasks its pipeline family serves; its Serve
options come from its spec (``serve_options``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

from ray import serve
from ray.serve import Application

from deployments.autoscaling_policy import BACKGROUND_METRIC, INTERACTIVE_METRIC, autoscaling_options
from deployments.batching import REQUEUE, BatchQueue
from deployments.metrics import ReplicaMetrics, host_rss_bytes, replica_id, shape_label
from deployments.parallel_replica import ParallelEngine, load_parallel_engine, placement_options
from serve_app.domain.catalog import GPUClass
from serve_app.domain.errors import (
    ImageServeError,
    InternalError,
    ModelUnavailableError,
    ReplicaOutOfMemoryError,
    RequestCancelledError,
    UnsupportedValueError,
)
from serve_app.domain.images import encode_image, limit_pillow, to_pil
from serve_app.domain.placement import GPU_CLASS_LABEL
from serve_app.domain.planner import estimate_vram, plan
from serve_app.domain.schemas import (
    EditRequest,
    GenerateRequest,
    ImageResult,
    PartialImage,
    StreamAccepted,
    Usage,
    preview_steps,
)
from serve_app.domain.shapes import PIXELS_PER_TOKEN
from serve_app.domain.shapes import image_tokens as image_tokens_of
from serve_app.domain.specs import ReplicaSpec
from serve_app.engines import EngineLoader, load_engine
from serve_app.engines.protocol import (
    DeviceFault,
    EngineOutOfMemory,
    EngineResult,
    GenerationCancelled,
    Job,
    RankFailure,
    engine_failure,
)

logger = logging.getLogger(__name__)


class GpuGate(Protocol):
    """What a replica's batches pass through when its GPU is shared (``deployments.swap_replica``)."""

    def turn(self, member: ModelReplica, jobs: Sequence[Job]) -> contextlib.AbstractAsyncContextManager:
        """Wait until ``member`` may use the GPU, with its weights there; hold it until the block ends."""


@dataclass
class _Made:
    """A job's images as the pipeline made them (arrays), before encoding."""

    job: Job
    result: EngineResult
    queue_s: float
    encoded: list[bytes] | None = None  # encode_workers 0: encoded on the GPU's thread
    encode_s: float = 0.0


def node_gpu_class(gpus: Sequence[GPUClass]) -> GPUClass | None:
    """The GPU this replica got: the CUDA device if any, else what its Ray node's labels declare
    (the simulated fleet's fake-GPU nodes carry the same labels as real ones)."""
    from serve_app.engines.hardware import detect_local_gpu

    local = detect_local_gpu(gpus)
    if local is not None:
        return local.gpu_class
    try:
        import ray

        label = ray.get_runtime_context().get_node_labels().get(GPU_CLASS_LABEL)
    except Exception:  # noqa: BLE001 - outside Ray there are no labels
        return None
    return next((g for g in gpus if g.id == label), None) if label else None


def pool_mismatch(pool_gpu: GPUClass, got: GPUClass | None) -> str | None:
    """Why the GPU a replica got is not the pool's class, or None when it matches."""
    if got is None:
        return None
    same_arch = got.compute_capability == pool_gpu.compute_capability
    enough_memory = got.vram_gib >= 0.95 * pool_gpu.vram_gib
    if got.id == pool_gpu.id or (same_arch and enough_memory):
        return None
    return (f"this replica's pool expects {pool_gpu.name} (sm_{pool_gpu.sm}, {pool_gpu.vram_gib:g} GiB) but got "
            f"{got.name} (sm_{got.sm}, {got.vram_gib:g} GiB); check the pool's node markers")


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ReplicaInfo(TypedDict):
    """``ModelReplica.info``: how the engine loaded, where the replica runs, and its state now."""

    variant: str
    replica: str | None
    device: str
    gpu_class: str | None
    torch_dtype: str
    offload_mode: str
    load_seconds: float
    warmup_seconds: float | None
    host_rss_bytes: int | None
    planned_peak_vram_gib: float | None
    pool: str | None
    node_gpu_class: str | None
    fits_node: bool | None
    unhealthy: str | None
    last_cancelled: str | None
    loras_loaded: list[str]
    queued: int
    running: int
    batch_preemptions: int


class ModelReplica:
    """One variant's engine in one replica.

    Args:
        spec: the replica's spec (variant, pool, engine settings, batching, Serve options).
        loader: builds the engine; ``load_engine`` unless a test or benchmark gives another.
        gate: when the GPU is shared with other variants (a swap group), what each batch must pass to get it.
    """

    @classmethod
    def serve_options(cls, spec: ReplicaSpec) -> dict[str, Any]:
        """The ``serve.deployment(...).options(...)`` of this deployment for ``spec``."""
        options = spec.options
        num_gpus = options.num_gpus if options.num_gpus is not None else (1.0 if spec.uses_gpu else 0.0)
        actor: dict[str, Any] = {
            "num_gpus": num_gpus,
            "num_cpus": options.num_cpus if options.num_cpus is not None else (1.0 if num_gpus else 0.0),
        }
        for key, value in spec.node_requirements.items():
            actor[key] = dict(value) if isinstance(value, dict) else value
        if options.resources:
            actor["resources"] = {**actor.get("resources", {}), **options.resources}
        if options.accelerator_type:
            actor["accelerator_type"] = options.accelerator_type
        if options.label_selector:
            actor["label_selector"] = dict(options.label_selector)
        result: dict[str, Any] = {"name": spec.name, "ray_actor_options": actor}
        engine = getattr(spec, "engine", None)  # a swap group's spec has its members' (never parallel: refused)
        if engine is not None and engine.ranks > 1:
            result.update(placement_options(spec, actor))
        for key in ("max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                    "graceful_shutdown_timeout_s"):
            value = getattr(options, key)
            if value is not None:
                result[key] = value
        if options.autoscaling is not None:
            result["autoscaling_config"] = autoscaling_options(options.autoscaling)
        else:
            result["num_replicas"] = options.num_replicas or 1
        # A batching replica has room for two batches: one running and one filling. With one, Serve hands the
        # replica nothing while its batch runs, and batches never grow.
        batching = getattr(spec, "batching", None)  # a swap group's spec states its members' instead
        if batching is not None and batching.max_batch_size > 1:
            result["max_ongoing_requests"] = max(result.get("max_ongoing_requests", 0), 2 * batching.max_batch_size)
        return result

    def __init__(self, spec: ReplicaSpec, loader: EngineLoader | None = None, gate: GpuGate | None = None) -> None:
        self.spec = spec
        self.variant = spec.variant
        self._gate = gate
        self._unhealthy: str | None = None
        self.last_cancelled: str | None = None
        self.warmup_seconds: float | None = None
        self.node_gpu = node_gpu_class(spec.engine.gpus)
        if spec.pool is not None:
            self._unhealthy = pool_mismatch(spec.pool.gpu, self.node_gpu)
        engine_spec = spec.engine
        limit_pillow(engine_spec.max_input_pixels)
        # Whether the planner says this variant fits the GPU the replica really got.
        self.fits_node = None if self.node_gpu is None else plan(
            self.variant, self.node_gpu, engine_spec.plan_width, engine_spec.plan_height,
            settings=engine_spec.planner, batch_size=engine_spec.batch_size).fits
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        # One worker: a pipeline runs one call at a time. Encoding runs beside it, so the GPU's thread only
        # drives the GPU (Pillow and zlib release the GIL while they encode).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipeline-{self.variant.id}")
        self._encoders = (ThreadPoolExecutor(max_workers=spec.encode_workers, thread_name_prefix="encode")
                          if spec.encode_workers else None)
        if engine_spec.ranks > 1:
            self.engine = load_parallel_engine(engine_spec, spec.torch_threads, loader)
        else:
            self.engine = (loader or load_engine)(engine_spec)
        self.replica = replica_id()
        device = self.engine.info.device
        self.gpu_class = self.node_gpu.id if self.node_gpu else ("cpu" if device == "cpu" else None)
        self.metrics = ReplicaMetrics("+".join(spec.tasks), self.variant.id, self.gpu_class,
                                      spec.pool.name if spec.pool else None, device)
        self.metrics.model_loaded(self.engine.info.load_seconds, self.engine.info.offload_mode)
        self._batches: BatchQueue[Job] = BatchQueue(self._run_batch, spec.batching.max_batch_size,
                                                    spec.batching.wait_s, size_of=lambda job: job.images,
                                                    preempt=self._preempt_background)
        # Set when interactive work arrives while a background batch runs: its denoising stops at the next step.
        self._preempting = threading.Event()
        # Requests this replica holds, running or queued, for the autoscaler (record_autoscaling_stats).
        self.background_ongoing = 0
        self.interactive_ongoing = 0
        self._running: Sequence[Job] = ()
        self._report_lora = self._lora_reporter(spec.engine.max_loaded_loras) if spec.engine.loras else None
        if self._unhealthy is not None:
            logger.error("%s refuses to serve: %s", self.variant.id, self._unhealthy)
        elif spec.warmup:
            started = time.perf_counter()
            self.engine.warm_up()
            self.warmup_seconds = time.perf_counter() - started
            logger.info("%s warmed up in %.2fs", self.variant.id, self.warmup_seconds)

    @staticmethod
    def _lora_reporter(capacity: int) -> Callable[[str], Awaitable[str]] | None:
        """What tells Serve's routers which per-request LoRAs this replica holds: the router calls with the
        LoRA's name as the multiplexed model id, so Serve prefers replicas that report it. The engine's own LRU
        loads the weights; Serve's LRU of the same size only mirrors it. None outside a Serve replica."""
        try:
            serve.get_replica_context()
        except Exception:  # noqa: BLE001 - outside Serve (unit tests, benchmarks) there is no router to tell
            return None

        async def loaded(lora_name: str) -> str:
            return lora_name

        return serve.multiplexed(max_num_models_per_replica=capacity)(loaded)

    async def _note_lora(self, request: GenerateRequest | EditRequest) -> None:
        if request.lora is not None and self._report_lora is not None:
            await self._report_lora(request.lora.name)

    async def rank_pids(self) -> list[int]:
        """Process ids of the processes this replica's engine runs in, rank 0 (this one) first."""
        if isinstance(self.engine, ParallelEngine):
            return await asyncio.get_running_loop().run_in_executor(None, self.engine.pids)
        return [os.getpid()]

    async def check_health(self) -> None:
        if self._unhealthy is None and isinstance(self.engine, ParallelEngine):
            # A peer rank that died while the replica was idle: found now, not by the next request.
            why = await asyncio.get_running_loop().run_in_executor(None, self.engine.dead_peer)
            if why is not None:
                self._unhealthy = f"a rank of this multi-GPU replica failed, replica must be replaced: {why}"
                logger.error("%s: %s", self.variant.id, self._unhealthy)
        if self._unhealthy is not None:
            raise RuntimeError(self._unhealthy)

    async def on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the replica's pipeline thread, where its engine's calls run (a swap moves weights there)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaler gets from this replica: the interactive requests and the batch lines it holds,
        which ``InteractiveFirstPolicy`` weighs apart (docs/batch.md)."""
        return {INTERACTIVE_METRIC: float(self.interactive_ongoing), BACKGROUND_METRIC: float(self.background_ongoing)}

    def oldest_queued_age(self) -> float | None:
        """Seconds the oldest request in this replica's queue has waited for a batch, or None."""
        return self._batches.oldest_age()

    def shutdown(self) -> None:
        """Stop this replica's threads: the memory sampler, the pipeline worker and the encoders."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        for pool in (getattr(self, "_executor", None), getattr(self, "_encoders", None)):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def __del__(self) -> None:
        # Serve calls __del__ when it stops a replica; a constructor that raised leaves some attributes unset.
        self.shutdown()

    async def info(self) -> ReplicaInfo:
        """What this replica loaded and how, and what it holds now (for operators and tests)."""
        info = self.engine.info
        return {
            "variant": self.variant.id,
            "replica": self.replica,
            "device": info.device,
            "gpu_class": self.gpu_class,
            "torch_dtype": info.torch_dtype,
            "offload_mode": info.offload_mode,
            "load_seconds": info.load_seconds,
            "warmup_seconds": self.warmup_seconds,
            "host_rss_bytes": host_rss_bytes(),
            "planned_peak_vram_gib": info.planned_peak_gib,
            "pool": self.spec.pool.name if self.spec.pool else None,
            "node_gpu_class": self.node_gpu.id if self.node_gpu else None,
            "fits_node": self.fits_node,
            "unhealthy": self._unhealthy,
            "last_cancelled": self.last_cancelled,
            "loras_loaded": list(self.engine.lora_state().loaded),
            "queued": self._batches.pending(),
            "running": len(self._running),
            "batch_preemptions": self._batches.preemptions,
        }

    async def run(self, request: GenerateRequest | EditRequest, width: int, height: int) -> ImageResult:
        """Run one request whose size (and input images) the router has resolved and checked: the last event of
        its ``stream``, without previews."""
        result = None
        async for event in self.stream(request.model_copy(update={"partial_images": 0}), width, height):
            result = event
        assert isinstance(result, ImageResult), result  # a stream ends with the result, or raises
        return result

    async def stream(self, request: GenerateRequest | EditRequest, width: int, height: int,
                     background: bool = False) -> AsyncIterator[StreamAccepted | PartialImage | ImageResult]:
        """The one path of a request in a replica (the router calls it through ``handle.options(stream=True)``):
        a ``StreamAccepted`` at once, ``request.partial_images`` previews per image while it denoises, then its
        ``ImageResult``. A caller that stops listening stops the denoising at the next step. ``background``: a batch
        line, which runs only while no interactive request waits here, and yields to one at the next step."""
        if self._unhealthy is not None:
            self.metrics.failed()
            raise ModelUnavailableError(f"{self.variant.id}: {self._unhealthy}", retry_after_s=5)
        if request.task not in self.variant.tasks:  # the router never sends one; a handle caller inside may
            raise UnsupportedValueError(f"{self.variant.id} serves {' and '.join(self.variant.tasks)}, not "
                                        f"{request.task}", param="model")
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue = asyncio.Queue()

        def on_preview(step: int, first_image: int, images: list) -> None:  # on the pipeline's thread
            loop.call_soon_threadsafe(previews.put_nowait, (step, first_image, images))

        steps = self.variant.steps_for(request.num_inference_steps, request.quality)
        await self._note_lora(request)
        wanted = preview_steps(steps, request.partial_images)
        # Only a job with previews to make runs alone (its batch key): a plain one batches with others.
        job = Job(request, width, height, steps, preview_steps=wanted, on_preview=on_preview if wanted else None,
                  background=background)
        result = asyncio.ensure_future(self._run_job(job))
        result.add_done_callback(lambda _: previews.put_nowait(None))
        sent: dict[int, int] = {}
        self.background_ongoing += background
        self.interactive_ongoing += not background
        try:
            yield StreamAccepted(variant=self.variant.id, num_inference_steps=steps,
                                 preview_steps=[step + 1 for step in wanted])
            while (taken := await previews.get()) is not None:
                step, first_image, images = taken
                for offset, image in enumerate(images):
                    data = await loop.run_in_executor(self._encoders, self._encode_preview, image, request, width,
                                                      height)
                    index = first_image + offset
                    yield PartialImage(image_index=index, partial_image_index=sent.get(index, 0), step=step + 1,
                                       image=data, output_format=request.output_format, width=width, height=height)
                    sent[index] = sent.get(index, 0) + 1
                    self.metrics.partial_image()
            yield await result
        finally:
            self.background_ongoing -= background
            self.interactive_ongoing -= not background
            if not result.done():  # the caller left: stop the denoising it no longer watches
                job.cancelled.set()
                result.cancel()

    def _encode_preview(self, image, request: GenerateRequest | EditRequest, width: int, height: int) -> bytes:
        """A latent-resolution preview scaled to the requested size, in the requested format."""
        from PIL import Image

        scaled = to_pil(image).resize((width, height), Image.Resampling.BILINEAR)
        return encode_image(scaled, request.output_format, request.output_compression, self.spec.png_writer)

    async def _run_job(self, job: Job) -> ImageResult:
        try:
            made: _Made = await self._batches.submit(self.engine.batch_key(job), job, background=job.background)
            return await self._encoded(made)
        except asyncio.CancelledError:
            # A running batch stops between steps once every job in it is cancelled.
            job.cancelled.set()
            self.metrics.failed()
            raise

    async def _encoded(self, made: _Made) -> ImageResult:
        """The job's images encoded in the encoder pool, in parallel, after its batch left the GPU's thread."""
        if made.encoded is not None:  # encode_workers 0: encoded on the GPU's thread already
            return self._image_result(made.job, made.result, made.queue_s, made.encoded, made.encode_s)
        request = made.job.request
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        images = await asyncio.gather(*(
            loop.run_in_executor(self._encoders, encode_image, image, request.output_format,
                                 request.output_compression, self.spec.png_writer)
            for image in made.result.images))
        return self._image_result(made.job, made.result, made.queue_s, list(images), time.perf_counter() - started)

    def _preempt_background(self) -> None:
        """Interactive work arrived while a background batch runs: stop it at its next denoising step."""
        self._preempting.set()

    async def _run_batch(self, jobs: list[Job]) -> list[_Made | Exception]:
        """Run one batch in the worker thread; a failure becomes every job's classified error. A background batch
        stopped for interactive work is requeued (``REQUEUE``), not failed."""
        self._running = jobs
        self._preempting.clear()
        try:
            async with self._gate.turn(self, jobs) if self._gate is not None else contextlib.nullcontext():
                return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_in_worker, jobs)
        except Exception as err:  # noqa: BLE001 - classified for the callers, never surfaced raw
            if jobs[0].background and self._preempting.is_set() and isinstance(engine_failure(err),
                                                                                GenerationCancelled):
                self.metrics.preempted()
                return [REQUEUE] * len(jobs)
            outcome = self._classify(err)
        finally:
            self._running = ()
        if isinstance(outcome, ReplicaOutOfMemoryError):
            # The exception, and the frames holding the failed call's tensors, are referenced until the
            # except block ends and the loop drops the callback that resumed this task (it holds the
            # failed future): only after one trip through the loop can freeing memory give it back.
            await asyncio.sleep(0)
            _release_memory()
        for job in jobs:
            if not job.cancelled.is_set():  # a caller that left was counted when it left
                self.metrics.failed()
        return [outcome] * len(jobs)

    def _run_in_worker(self, jobs: list[Job]) -> list[_Made]:
        """The engine call, and what it measured: stages, each job's queue wait, the memory peak."""
        started = time.perf_counter()
        self.engine.reset_peak_memory()
        before = self.engine.lora_state().uses
        preemptible = jobs[0].background
        results = self.engine.run(jobs, should_stop=lambda: (preemptible and self._preempting.is_set()) or all(
            job.cancelled.is_set() for job in jobs))
        for outcome, uses in self.engine.lora_state().uses.items():
            if uses > before.get(outcome, 0):
                self.metrics.lora_used(outcome, uses - before.get(outcome, 0))
        first, batch_images = jobs[0], results[0].batch_images
        info = self.engine.info
        planned = estimate_vram(self.variant, info.offload_mode, first.width, first.height,
                                first.request.num_input_images, info.torch_dtype, self.spec.engine.planner,
                                batch_images).peak_gib
        self.metrics.vram_peak(shape_label(first.width, first.height, first.request.num_input_images), planned,
                               self.engine.peak_memory_bytes())
        self.metrics.pipeline_call(batch_images)
        answers = []
        for job, result in zip(jobs, results, strict=True):
            queue_s = started - job.arrived
            self.metrics.observe(result.timings, queue_s, job.num_inference_steps, len(result.images),
                                 result.denoised_images)
            encoded, encode_s = None, 0.0
            if self._encoders is None:
                request = job.request
                encode_started = time.perf_counter()
                encoded = [encode_image(image, request.output_format, request.output_compression, self.spec.png_writer)
                           for image in result.images]
                encode_s = time.perf_counter() - encode_started
            answers.append(_Made(job, result, queue_s, encoded, encode_s))
        return answers

    def _usage(self, job: Job, result: EngineResult) -> Usage:
        """Text tokens as the pipeline's tokenizer counts them; image tokens as latent patches (16x16 px)."""
        area = self.spec.engine.edit_vae_image_area or self.variant.family.input_image_side ** 2
        image_tokens = job.request.num_input_images * (area // PIXELS_PER_TOKEN)
        output_tokens = len(result.images) * image_tokens_of(job.width, job.height)
        text = result.prompt_tokens
        return Usage(input_tokens=text + image_tokens,
                     input_tokens_details={"image_tokens": image_tokens, "text_tokens": text},
                     output_tokens=output_tokens, total_tokens=text + image_tokens + output_tokens)

    def _image_result(self, job: Job, result: EngineResult, queue_s: float, images: list[bytes],
                      encode_s: float) -> ImageResult:
        request = job.request
        return ImageResult(
            variant=self.variant.id,
            images=images,
            output_format=request.output_format,
            quality=request.quality or "auto",
            usage=self._usage(job, result),
            seeds=result.seeds,
            width=job.width,
            height=job.height,
            num_inference_steps=job.num_inference_steps,
            timings={**{k: round(v, 4) for k, v in result.timings.items()}, "queue_s": round(queue_s, 4),
                     "encode_s": round(encode_s, 4)},
            replica=self.replica,
            gpu_class=self.gpu_class,
            pool=self.spec.pool.name if self.spec.pool else None,
            node_gpu_class=self.node_gpu.id if self.node_gpu else None,
            fits_node=self.fits_node,
            batch_images=result.batch_images,
            created=int(time.time()),
            replied_at=time.time(),
        )

    def _classify(self, err: Exception) -> Exception:
        """The error a caller should see for a failure inside the engine call (the engine's typed failures,
        ``engine_failure``, for a raw one raised around its pipeline call)."""
        err = engine_failure(err)
        if isinstance(err, GenerationCancelled):
            self.last_cancelled = str(err)
            return RequestCancelledError(str(err))
        if isinstance(err, EngineOutOfMemory):  # the replica serves on once the memory is freed
            where = self.node_gpu.name if self.node_gpu else self.engine.info.device
            return ReplicaOutOfMemoryError(
                f"{self.variant.id} ran out of memory on {where}; the memory was released", retry_after_s=2)
        if isinstance(err, DeviceFault):
            # The CUDA context (or the ranks' process group) is gone: fail health checks so Serve replaces this
            # replica.
            what = "a rank of this multi-GPU replica failed" if isinstance(err, RankFailure) else "a CUDA fault"
            self._unhealthy = f"{what}, replica must be replaced: {str(err)[:200]}"
            logger.error("%s: %s", self.variant.id, self._unhealthy)
            return ModelUnavailableError(f"{self.variant.id}: the replica hit {what}; retry", retry_after_s=2)
        if isinstance(err, ImageServeError):
            return err  # already the caller's answer (an undecodable input image, say)
        # Anything else is the server's fault, never the caller's: the router has checked the request,
        # so a ValueError from inside the pipeline means a configuration or library problem.
        logger.error("%s: the pipeline call failed: %s: %s", self.variant.id, type(err).__name__, err)
        return InternalError(f"{self.variant.id} failed: {type(err).__name__}: {str(err)[:200]}", retry_after_s=2)


def build_replica(spec: ReplicaSpec, loader: EngineLoader | None = None) -> Application:
    """The bound Serve deployment of one ``ReplicaSpec``."""
    return serve.deployment(ModelReplica).options(**ModelReplica.serve_options(spec)).bind(spec, loader)
