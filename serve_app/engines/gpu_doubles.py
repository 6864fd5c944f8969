"""TEST DOUBLES for what only a GPU does. Used by the tests and the simulated fleet, never in production.

This machine has no CUDA, so CUDA errors cannot happen and nunchaku's 4-bit kernels cannot run.
Each double wraps or loads a *real* engine and stands in for exactly one of those things:

* ``OutOfMemoryOnSmallGPUs`` raises ``torch.OutOfMemoryError`` as a CUDA device does when a request
  does not fit, on nodes that declare less VRAM than a threshold (or for a trigger prompt);
* ``CudaFaultOnPrompt`` raises the ``RuntimeError("CUDA error: ...")`` of a broken CUDA context for
  a trigger prompt;
* ``load_without_nunchaku`` loads a 4-bit variant with its base model's stored (bf16) transformer,
  standing in for the nunchaku kernels that need CUDA.

The loaders below are picklable, so ``build_app_from_config(loaders=...)`` can send them to replicas;
the fault doubles load 4-bit variants through ``load_without_nunchaku`` too, as every engine here runs on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence

import torch

from serve_app.domain.placement import VRAM_GIB_LABEL
from serve_app.domain.specs import EngineSpec
from serve_app.engines import load_engine
from serve_app.engines.protocol import EngineResult, ImageEngine, Job

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
