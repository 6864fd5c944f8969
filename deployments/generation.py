"""The text-to-image deployment (Z-Image-Turbo variants), with optional dynamic batching."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from dataclasses import dataclass, field

from ray import serve

from deployments.batching import BatchQueue
from deployments.model_server import ModelServer
from serve_app.schemas import GenerateRequest, ImageResult


@dataclass
class _Waiting:
    """One request waiting in (or running as part of) a batch."""

    request: GenerateRequest
    width: int
    height: int
    entered: float = field(default_factory=time.perf_counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def batch_key(self, steps: int) -> tuple:
        """Everything but the prompt and seed must agree for one pipeline call."""
        r = self.request
        return (self.width, self.height, steps, r.n, r.guidance_scale, r.negative_prompt)


@serve.deployment(name="generation")
class GenerationServer(ModelServer):
    """Z-Image generation. With ``models.<id>.max_batch_size`` > 1, requests that arrive within
    ``batch_wait_timeout_s`` of each other and share size, steps, ``n`` and guidance run as one
    pipeline call (prompts batched); a request with ``n >= max_batch_size`` runs alone."""

    task = "generate"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model = self.config.models.get(self.variant.id)
        self.max_batch_size = model.max_batch_size if model else 1
        self._batches = BatchQueue(self._run_batch, self.max_batch_size, model.batch_wait_timeout_s,
                                   size_of=lambda w: w.request.n) if self.max_batch_size > 1 else None

    def _warmup(self) -> None:
        width, height = self._warmup_size()
        self.pipeline.generate("warm-up", width=width, height=height, num_inference_steps=1, seed=0)

    async def generate(self, request: GenerateRequest, width: int, height: int) -> ImageResult:
        """Run one generation request whose size the router has already resolved and checked."""
        if self.max_batch_size <= 1 or request.n >= self.max_batch_size:
            return await self._serve(request, width, height, 0, functools.partial(
                self.pipeline.generate, guidance_scale=request.guidance_scale))
        self._check_serving()
        waiting = _Waiting(request, width, height)
        try:
            return await self._batches.submit(waiting.batch_key(self._steps(request)), waiting)
        except asyncio.CancelledError:
            # A batch that is running stops only when every request in it has gone.
            waiting.stop.set()
            self.metrics.failed()
            raise

    async def _run_batch(self, group: list[_Waiting]) -> list[ImageResult | Exception]:
        """One pipeline call for requests that share a batch key, in arrival order."""
        try:
            return await self._submit(
                functools.partial(self._generate_group, group), lambda: all(w.stop.is_set() for w in group),
                (group[0].width, group[0].height, 0), [w.entered for w in group])
        except Exception as err:  # noqa: BLE001 - every request of the group gets the classified error
            for _ in group:
                self.metrics.failed()
            return [self._classify(err)] * len(group)

    def _generate_group(self, group: list[_Waiting], should_stop) -> list[ImageResult]:
        first = group[0].request
        steps = self._steps(first)
        width, height, n = group[0].width, group[0].height, first.n
        result = self.pipeline.generate(
            [w.request.prompt for w in group], n=n, width=width, height=height, num_inference_steps=steps,
            guidance_scale=first.guidance_scale, negative_prompt=first.negative_prompt,
            seed=[w.request.seed for w in group], should_stop=should_stop)
        results = []
        for i in range(len(group)):
            share = type(result)(result.images[i * n:(i + 1) * n], result.seeds[i * n:(i + 1) * n],
                                 dict(result.timings), result.steps)
            results.append(self._result(share, width, height, steps))
        return results
