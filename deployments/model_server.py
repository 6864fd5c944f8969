"""What the generation and edit deployments share: load, warm up, run off the event loop, cancel."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from serve_app.catalog import ModelVariant
from serve_app.config import AppConfig
from serve_app.errors import InvalidRequestError, RequestCancelledError
from serve_app.images import encode_png
from serve_app.pipelines import GenerationCancelled, ImagePipeline, PipelineResult, load_pipeline
from serve_app.schemas import ImageResult

logger = logging.getLogger(__name__)

Loader = Callable[[ModelVariant, AppConfig], ImagePipeline]


def _replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit tests) there is no context
        return None


class ModelServer:
    """One variant's pipeline in one replica.

    Args:
        variant_id: the catalog variant this replica serves.
        config: the app config as a plain dict (it crosses process boundaries).
        loader: builds the pipeline; ``load_pipeline`` unless a test injects another.
    """

    task: str = ""

    def __init__(self, variant_id: str, config: dict[str, Any], loader: Loader | None = None) -> None:
        self.config = AppConfig.model_validate(config)
        self.variant = self.config.build_catalog().variant(variant_id)
        if self.variant.task != self.task:
            raise ValueError(f"{variant_id} is a {self.variant.task} variant, not {self.task}")
        if self.config.serving.torch_threads:
            import torch

            torch.set_num_threads(self.config.serving.torch_threads)
        # One worker: a diffusers pipeline runs one call at a time; others wait in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipeline-{variant_id}")
        self.pipeline = (loader or load_pipeline)(self.variant, self.config)
        self.replica = _replica_id()
        self.gpu_class = "cpu" if self.pipeline.device == "cpu" else self._gpu_class_name()
        self._unhealthy: str | None = None
        if self.config.serving.warmup:
            started = time.perf_counter()
            self._warmup()
            logger.info("%s warmed up in %.2fs", variant_id, time.perf_counter() - started)

    def _gpu_class_name(self) -> str | None:
        from serve_app.hardware import detect_local_gpu

        local = detect_local_gpu(self.config.build_catalog())
        return local.gpu_class.id if local else None

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
            "planned_peak_vram_gib": self.pipeline.planned_peak_gib,
        }

    async def _run(self, work: Callable[..., PipelineResult], **kwargs: Any) -> PipelineResult:
        """Run blocking pipeline work in the worker thread; cancellation stops it between steps."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(work, should_stop=stop.is_set, **kwargs))
        try:
            # shield: a cancelled caller must not abandon the thread mid-step; we tell it to stop.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            raise
        except GenerationCancelled as err:
            raise RequestCancelledError(str(err)) from None
        except ValueError as err:
            raise InvalidRequestError(str(err)) from None

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
            created=int(time.time()),
        )
