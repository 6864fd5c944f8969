"""One call of a pipeline: the stage timer that wraps text encoding and the VAE, and ``PipelineCall``, the
per-call state the step callback updates (steps done, stopping between steps, previews)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.domain.schemas import StageTimings
from serve_app.engines.protocol import GenerationCancelled

logger = logging.getLogger(__name__)


class StageTimer:
    """Times the pipeline's text encoding, VAE encode and VAE decode by wrapping those calls.

    On CUDA the host returns from a kernel launch long before the GPU is done, so ``synchronize``
    (``torch.cuda.synchronize``) runs before and after each stage; without it the VAE's time lands
    in the next stage or in ``denoise_s``. On CPU there is nothing to wait for and it is None.
    """

    def __init__(self, pipe, synchronize: Callable[[], None] | None = None) -> None:
        self.seconds: StageTimings = {}
        self.synchronize = synchronize
        self._wrap(pipe, "encode_prompt", "text_encode_s")
        self._wrap(pipe.vae, "encode", "vae_encode_s")
        self._wrap(pipe.vae, "decode", "vae_decode_s")

    def _wrap(self, owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self.synchronize is not None:
                self.synchronize()
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                if self.synchronize is not None:
                    self.synchronize()
                return result
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


@dataclass
class PipelineCall:
    """One call of a pipeline in progress: pass ``on_step_end`` as its ``callback_on_step_end``."""

    num_inference_steps: int
    should_stop: Callable[[], bool] | None
    on_step: Callable[[int, Any], None] | None = None  # (step, latents after it), e.g. ``LatentPreviewer``
    steps_done: int = 0
    stopped: bool = False
    timings: StageTimings = field(default_factory=dict)

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.steps_done = step + 1
        if self.on_step is not None:
            self.on_step(step, callback_kwargs["latents"])
        if self.should_stop is not None and self.should_stop():
            self.stopped = True
            pipe._interrupt = True  # diffusers checks it before the next step
        return callback_kwargs

    def cancelled(self) -> GenerationCancelled:
        return GenerationCancelled(f"stopped after {self.steps_done} of {self.num_inference_steps} steps")
