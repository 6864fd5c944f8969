"""What the generation and edit deployments share: load, warm up, run off the event loop, cancel."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from serve_app.catalog import GPUClass, ModelVariant
from serve_app.config import AppConfig
from serve_app.errors import (
    InvalidRequestError,
    ModelUnavailableError,
    ReplicaOutOfMemoryError,
    RequestCancelledError,
)
from serve_app.images import encode_png
from serve_app.metrics import ReplicaMetrics, host_rss_bytes, shape_label
from serve_app.pipelines import GenerationCancelled, ImagePipeline, PipelineResult, load_pipeline
from serve_app.planner import estimate_vram, plan
from serve_app.schemas import ImageResult

logger = logging.getLogger(__name__)

Loader = Callable[[ModelVariant, AppConfig], ImagePipeline]


def _replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit tests) there is no context
        return None


def _node_gpu_class(catalog) -> GPUClass | None:
    """The GPU this replica got: the CUDA device if any, else what its Ray node's labels declare
    (the simulated fleet's fake-GPU nodes carry the same labels as real ones)."""
    from serve_app.fleet import GPU_CLASS_LABEL
    from serve_app.hardware import detect_local_gpu

    local = detect_local_gpu(catalog)
    if local is not None:
        return local.gpu_class
    try:
        import ray

        label = ray.get_runtime_context().get_node_labels().get(GPU_CLASS_LABEL)
    except Exception:  # noqa: BLE001 - outside Ray there are no labels
        return None
    return catalog.gpus.get(label) if label else None


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


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _is_cuda_fault(err: BaseException) -> bool:
    """A CUDA error that leaves the context unusable (illegal access, device-side assert, ECC...)."""
    text = str(err)
    return "CUDA error" in text or "device-side assert" in text


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelServer:
    """One variant's pipeline in one replica.

    Args:
        variant_id: the catalog variant this replica serves.
        config: the app config as a plain dict (it crosses process boundaries).
        loader: builds the pipeline; ``load_pipeline`` unless a test injects another.
        pool: {"name", "gpu_class", "mode"} of the GPU pool this deployment targets, if any.
    """

    task: str = ""

    def __init__(self, variant_id: str, config: dict[str, Any], loader: Loader | None = None,
                 pool: dict[str, Any] | None = None) -> None:
        self.config = AppConfig.model_validate(config)
        catalog = self.config.build_catalog()
        self.variant = catalog.variant(variant_id)
        self.pool = pool
        self._unhealthy: str | None = None
        self.last_cancelled: str | None = None
        self.warmup_seconds: float | None = None
        self.node_gpu = _node_gpu_class(catalog)
        pool_gpu = catalog.gpu(pool["gpu_class"]) if pool else None
        if pool_gpu is not None:
            self._unhealthy = pool_mismatch(pool_gpu, self.node_gpu)
        # Whether the planner says this variant fits the GPU the replica really got.
        self.fits_node = None if self.node_gpu is None else plan(
            self.variant, self.node_gpu, self.config.defaults.width, self.config.defaults.height,
            settings=self.config.device.planner, batch_size=self.config.batch_size(variant_id)).fits
        if self.variant.task != self.task:
            raise ValueError(f"{variant_id} is a {self.variant.task} variant, not {self.task}")
        if self.config.serving.torch_threads:
            import torch

            torch.set_num_threads(self.config.serving.torch_threads)
        # One worker: a diffusers pipeline runs one call at a time; others wait in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipeline-{variant_id}")
        self.pipeline = (loader or load_pipeline)(self.variant, self.config)
        self.replica = _replica_id()
        self.gpu_class = self.node_gpu.id if self.node_gpu else ("cpu" if self.pipeline.device == "cpu" else None)
        self.metrics = ReplicaMetrics(self.task, variant_id, self.gpu_class, pool["name"] if pool else None,
                                      self.pipeline.device)
        self.metrics.model_loaded(self.pipeline.load_seconds, self.pipeline.offload_mode)
        if self._unhealthy is not None:
            logger.error("%s refuses to serve: %s", variant_id, self._unhealthy)
        elif self.config.serving.warmup:
            started = time.perf_counter()
            self._warmup()
            self.warmup_seconds = time.perf_counter() - started
            logger.info("%s warmed up in %.2fs", variant_id, self.warmup_seconds)

    def _warmup(self) -> None:
        raise NotImplementedError

    def _warmup_size(self) -> tuple[int, int]:
        side = max(self.variant.min_side, 64)
        return side, side

    async def check_health(self) -> None:
        if self._unhealthy is not None:
            raise RuntimeError(self._unhealthy)

    async def info(self) -> dict[str, Any]:
        return {
            "variant": self.variant.id,
            "replica": self.replica,
            "device": self.pipeline.device,
            "gpu_class": self.gpu_class,
            "torch_dtype": self.pipeline.torch_dtype,
            "offload_mode": self.pipeline.offload_mode,
            "load_seconds": self.pipeline.load_seconds,
            "warmup_seconds": self.warmup_seconds,
            "host_rss_bytes": host_rss_bytes(),
            "planned_peak_vram_gib": self.pipeline.planned_peak_gib,
            "pool": self.pool,
            "node_gpu_class": self.node_gpu.id if self.node_gpu else None,
            "fits_node": self.fits_node,
            "unhealthy": self._unhealthy,
            "last_cancelled": self.last_cancelled,
        }

    def _measured(self, work: Callable[..., list[ImageResult]], should_stop, shape: tuple[int, int, int],
                  entered: list[float]) -> list[ImageResult]:
        """Run ``work`` (one pipeline call answering ``len(entered)`` requests) in the worker thread and
        record its stages, each request's queue wait and the memory peak."""
        import torch

        started = time.perf_counter()
        cuda = self.pipeline.device == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        results = work(should_stop)
        width, height, images = shape
        # Generation puts every image of a call in the batch dimension; editing runs one per call.
        call_batch = sum(len(r.images) for r in results) if self.task == "generate" else 1
        planned = estimate_vram(self.variant, self.pipeline.offload_mode, width, height, images,
                                self.pipeline.torch_dtype, self.config.device.planner, call_batch).peak_gib
        self.metrics.vram_peak(shape_label(width, height, images), planned,
                               torch.cuda.max_memory_allocated() if cuda else None)
        if self.task == "generate":
            self.metrics.pipeline_call(call_batch)
        for result, arrived in zip(results, entered):
            queue_s = started - arrived
            # A batch shares one denoising time; edit outputs are sequential calls whose times add up.
            self.metrics.observe(result.timings, queue_s, result.num_inference_steps, len(result.images),
                                 call_batch if self.task == "generate" else None)
            result.timings["queue_s"] = round(queue_s, 4)
            result.batch_images = call_batch
        return results

    def _check_serving(self) -> None:
        if self._unhealthy is not None:
            self.metrics.failed()
            raise ModelUnavailableError(f"{self.variant.id}: {self._unhealthy}", retry_after_s=5)

    def _submit(self, work: Callable[..., list[ImageResult]], should_stop: Callable[[], bool],
                shape: tuple[int, int, int], entered: list[float]) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(self._measured, work, should_stop, shape, entered))

    async def _run(self, work: Callable[..., list[ImageResult]], shape: tuple[int, int, int]) -> ImageResult:
        """Run one request's blocking pipeline work in the worker thread; cancellation stops it between steps."""
        self._check_serving()
        stop = threading.Event()
        future = self._submit(work, stop.is_set, shape, [time.perf_counter()])
        try:
            # shield: a cancelled caller must not abandon the thread mid-step; we tell it to stop.
            return (await asyncio.shield(future))[0]
        except asyncio.CancelledError:
            stop.set()
            self.metrics.failed()
            future.add_done_callback(self._note_abandoned)
            raise
        except Exception as err:  # noqa: BLE001 - classified for the caller
            self.metrics.failed()
            raise self._classify(err) from None

    def _note_abandoned(self, future) -> None:
        """Record how far a call got after its caller went away (the thread stops at the next step)."""
        err = None if future.cancelled() else future.exception()
        if isinstance(err, GenerationCancelled):
            self.last_cancelled = str(err)

    def _classify(self, err: Exception) -> Exception:
        """The error a caller should see for a failure inside the pipeline call."""
        if isinstance(err, GenerationCancelled):
            self.last_cancelled = str(err)
            return RequestCancelledError(str(err))
        if isinstance(err, ValueError):
            return InvalidRequestError(str(err))
        if isinstance(err, RuntimeError) and _is_cuda_fault(err):
            # The CUDA context is gone: fail health checks so Serve replaces this replica.
            self._unhealthy = f"CUDA fault, replica must be replaced: {str(err)[:200]}"
            logger.error("%s: %s", self.variant.id, self._unhealthy)
            return ModelUnavailableError(f"{self.variant.id}: the replica hit a CUDA fault; retry", retry_after_s=2)
        if isinstance(err, (RuntimeError, MemoryError)) and _is_out_of_memory(err):
            _release_memory()
            where = self.node_gpu.name if self.node_gpu else self.pipeline.device
            return ReplicaOutOfMemoryError(
                f"{self.variant.id} ran out of memory on {where} ({type(err).__name__}); the memory was released",
                retry_after_s=2,
            )
        return err

    def _steps(self, request) -> int:
        return request.num_inference_steps or self.variant.defaults.num_inference_steps

    async def _serve(self, request, width: int, height: int, input_images: int,
                     call: Callable[..., PipelineResult]) -> ImageResult:
        """Run ``call(**common_kwargs)`` (the pipeline's generate or edit) off the event loop.

        ``common_kwargs`` are the arguments both tasks share: prompt, n, size, steps (the variant's
        default when the request has none), negative prompt, seed and the cancellation poll.
        """
        steps = self._steps(request)

        def work(should_stop):
            result = call(prompt=request.prompt, n=request.n, width=width, height=height,
                          num_inference_steps=steps, negative_prompt=request.negative_prompt,
                          seed=request.seed, should_stop=should_stop)
            return [self._result(result, width, height, steps)]

        return await self._run(work, (width, height, input_images))

    def _result(self, result: PipelineResult, width: int, height: int, steps: int) -> ImageResult:
        return ImageResult(
            variant=self.variant.id,
            images=[encode_png(image) for image in result.images],
            seeds=result.seeds,
            width=width,
            height=height,
            num_inference_steps=steps,
            timings={k: round(v, 4) for k, v in result.timings.items()},
            replica=self.replica,
            gpu_class=self.gpu_class,
            pool=self.pool["name"] if self.pool else None,
            node_gpu_class=self.node_gpu.id if self.node_gpu else None,
            fits_node=self.fits_node,
            created=int(time.time()),
        )
