"""TEST DOUBLES for what only a GPU does. Used by the tests and the simulated fleet, never in production.

This machine has no CUDA, so CUDA errors cannot happen and nunchaku's 4-bit kernels cannot run.
Each double wraps or loads a *real* engine and stands in for exactly one of those things:

* ``OutOfMemoryOnSmallGPUs`` raises ``torch.OutOfMemoryError`` as a CUDA device does when a request
  does not fit, on nodes that declare less VRAM than a threshold (or for a trigger prompt);
* ``CudaFaultOnPrompt`` raises the ``RuntimeError("CUDA error: ...")`` of a broken CUDA context for
  a trigger prompt;
* ``load_without_nunchaku`` loads a 4-bit variant with its base model's stored (bf16) transformer,
  standing in for the nunchaku kernels that need CUDA;
* ``GpuTimingDouble`` stands in for a whole GPU pipeline call: it blocks as long as the GPU would,
  without the GIL, and returns photo-like images (bench/hot_path.py measures the serving path with it).

The loaders below are picklable, so ``build_app_from_config(loaders=...)`` can send them to replicas;
the fault doubles load 4-bit variants through ``load_without_nunchaku`` too, as every engine here runs on CPU.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch

from serve_app.domain.placement import VRAM_GIB_LABEL
from serve_app.domain.specs import EngineSpec
from serve_app.engines import load_engine
from serve_app.engines.protocol import EngineInfo, EngineResult, GenerationCancelled, ImageEngine, Job, LoraState

OOM_TRIGGER = "test-double: out of memory"
CUDA_FAULT_TRIGGER = "test-double: cuda fault"


def _node_vram_gib() -> float | None:
    import ray

    label = ray.get_runtime_context().get_node_labels().get(VRAM_GIB_LABEL)
    return float(label) if label else None


class _Wrapper:
    """Delegates the ``ImageEngine`` protocol to a real engine."""

    def __init__(self, engine: ImageEngine) -> None:
        self.engine = engine
        self.variant = engine.variant
        self.info = engine.info

    def warm_up(self) -> None:
        self.engine.warm_up()

    def batch_key(self, job: Job) -> Hashable:
        return self.engine.batch_key(job)

    def park(self) -> int:
        return self.engine.park()

    def unpark(self) -> int:
        return self.engine.unpark()

    def lora_state(self) -> LoraState:
        return self.engine.lora_state()

    def reset_peak_memory(self) -> None:
        self.engine.reset_peak_memory()

    def peak_memory_bytes(self) -> int | None:
        return self.engine.peak_memory_bytes()

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        return self.engine.run(jobs, should_stop)


class OutOfMemoryOnSmallGPUs(_Wrapper):
    """TEST DOUBLE for CUDA running out of memory: a real engine whose calls raise
    ``torch.OutOfMemoryError`` on nodes that declare under ``threshold_gib`` of VRAM, or when a job's
    prompt is ``OOM_TRIGGER``. Warm-up (a tiny call) succeeds, as it would on a real GPU."""

    def __init__(self, engine: ImageEngine, threshold_gib: float) -> None:
        super().__init__(engine)
        self.threshold_gib = threshold_gib

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        vram = _node_vram_gib() if self.threshold_gib else None
        if any(job.request.prompt == OOM_TRIGGER for job in jobs) or (vram is not None and vram < self.threshold_gib):
            where = "trigger prompt" if vram is None else f"node has {vram:g} GiB"
            raise torch.OutOfMemoryError(f"CUDA out of memory (test double: {where})")
        return self.engine.run(jobs, should_stop)


class CudaFaultOnPrompt(_Wrapper):
    """TEST DOUBLE for a broken CUDA context: a real engine whose call raises a CUDA error when a
    job's prompt is ``CUDA_FAULT_TRIGGER`` (the whole batch fails, as on a GPU)."""

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        if any(job.request.prompt == CUDA_FAULT_TRIGGER for job in jobs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (test double)")
        return self.engine.run(jobs, should_stop)


def _load_with_oom(spec: EngineSpec, threshold_gib: float) -> OutOfMemoryOnSmallGPUs:
    return OutOfMemoryOnSmallGPUs(load_without_nunchaku(spec), threshold_gib)


def out_of_memory_loader(threshold_gib: float) -> Callable[[EngineSpec], ImageEngine]:
    """Loads engines wrapped in ``OutOfMemoryOnSmallGPUs`` (0: only the trigger prompt fails)."""
    return functools.partial(_load_with_oom, threshold_gib=threshold_gib)


def _load_with_cuda_fault(spec: EngineSpec) -> CudaFaultOnPrompt:
    return CudaFaultOnPrompt(load_without_nunchaku(spec))


def cuda_fault_loader() -> Callable[[EngineSpec], ImageEngine]:
    """Loads engines wrapped in ``CudaFaultOnPrompt``."""
    return _load_with_cuda_fault


def load_without_nunchaku(spec: EngineSpec) -> ImageEngine:
    """TEST DOUBLE for nunchaku's 4-bit kernels: load a 4-bit variant from ``spec.source`` with the
    checkpoint's own stored transformer, on CPU. Its scheduler settings and defaults (a Lightning
    variant's 4 steps, say) stay the 4-bit variant's; only the transformer's kernels differ."""
    variant = spec.variant
    if not variant.requires_nunchaku:
        return load_engine(spec)
    stand_in = variant.model_copy(update={"precision": "bf16", "requires_nunchaku": False, "svdq_rank": None,
                                          "compute_capabilities": None})
    return load_engine(spec.model_copy(update={"variant": stand_in}))


def photo_like_image(width: int = 1024, height: int = 1024, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) float array in [0, 1], as a pipeline hands it back, the same every run: smooth
    shapes at three scales plus sensor-like noise, so encoders face what a diffusion model's output gives
    them (a flat image would flatter them, random noise would punish them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((8, 0.6), (48, 0.3), (256, 0.1)):
        layer = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        smooth = Image.fromarray(layer).resize((width, height), Image.BICUBIC)
        image += weight * np.asarray(smooth, dtype=np.float32) / 255
    image += rng.normal(0, 0.015, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


class GpuTimingDouble:
    """TEST DOUBLE for a GPU's time: a pipeline call that blocks ``seconds_per_image`` per image, step by step, in
    ``time.sleep``, which releases the GIL as a thread waiting on CUDA kernels does, and returns
    photo-like images of the asked size (the same every run). Nothing a pipeline does on the CPU is
    simulated: it isolates what the serving path (queueing, encoding, HTTP) adds around a GPU.
    ``unpark`` blocks ``unpark_seconds``, standing in for copying the weights back to a GPU."""

    def __init__(self, spec: EngineSpec, seconds_per_image: float, unpark_seconds: float = 0.0) -> None:
        self.variant = spec.variant
        self.seconds_per_image = seconds_per_image
        self.unpark_seconds = unpark_seconds
        self.info = EngineInfo(device="cpu", torch_dtype="bfloat16", offload_mode="none", load_seconds=0.0,
                               source=f"<GPU timing double: {seconds_per_image} s per image>")
        self._images: dict[tuple[int, int], np.ndarray] = {}

    def warm_up(self) -> None:
        return None

    def batch_key(self, job: Job) -> Hashable:
        return id(job)

    def park(self) -> int:
        return 0

    def unpark(self) -> int:
        time.sleep(self.unpark_seconds)
        return 0

    def lora_state(self) -> LoraState:
        return LoraState()

    def reset_peak_memory(self) -> None:
        return None

    def peak_memory_bytes(self) -> int | None:
        return None

    def image(self, width: int, height: int) -> np.ndarray:
        if (width, height) not in self._images:
            self._images[(width, height)] = photo_like_image(width, height)
        return self._images[(width, height)]

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        """The batch's time spread over its denoising steps; ``should_stop`` is asked after each, as the real
        pipeline's step callback asks it (a cancelled caller, or a batch line preempted by interactive work)."""
        images = sum(job.request.n for job in jobs)
        steps = max(job.num_inference_steps for job in jobs)
        started = time.perf_counter()
        for step in range(steps):
            time.sleep(self.seconds_per_image * images / steps)
            if should_stop() and step < steps - 1:
                raise GenerationCancelled(f"stopped after {step + 1} of {steps} steps")
        seconds = time.perf_counter() - started
        return [EngineResult([self.image(job.width, job.height)] * job.request.n, list(range(job.request.n)),
                             {"denoise_s": seconds, "total_s": seconds}, job.num_inference_steps,
                             batch_images=images, denoised_images=images, prompt_tokens=len(job.request.prompt.split()))
                for job in jobs]


def _load_timing_double(spec: EngineSpec, seconds_per_image: float, unpark_seconds: float) -> GpuTimingDouble:
    return GpuTimingDouble(spec, seconds_per_image, unpark_seconds)


def gpu_timing_loader(seconds_per_image: float, unpark_seconds: float = 0.0) -> Callable[[EngineSpec], ImageEngine]:
    """Loads ``GpuTimingDouble`` engines that take ``seconds_per_image`` of (simulated) GPU time per image
    and ``unpark_seconds`` to come back onto the (simulated) GPU."""
    return functools.partial(_load_timing_double, seconds_per_image=seconds_per_image, unpark_seconds=unpark_seconds)
