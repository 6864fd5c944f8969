"""Test doubles for what this machine cannot do for real. Used by tests and simulations only.

CUDA errors cannot happen without a GPU, so these wrap a real loaded pipeline and raise what torch
raises on a GPU: ``OutOfMemoryOnSmallGPUs`` raises ``torch.OutOfMemoryError`` when the replica's
node declares less VRAM than a threshold (or for a trigger prompt); ``CudaFaultOnPrompt`` raises the
``RuntimeError("CUDA error: ...")`` of a broken CUDA context for a trigger prompt.
"""

from __future__ import annotations

import functools

import torch

from serve_app.catalog import ModelVariant
from serve_app.config import AppConfig
from serve_app.pipelines import ImagePipeline, load_pipeline


def _prompts(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _node_vram_gib() -> float | None:
    import ray

    label = ray.get_runtime_context().get_node_labels().get("imageserve.io/vram-gib")
    return float(label) if label else None


class OutOfMemoryOnSmallGPUs:
    """TEST DOUBLE: a real pipeline that raises ``torch.OutOfMemoryError`` on nodes under ``threshold_gib``.

    The first call (the replica's warm-up, at a tiny size) succeeds, as it would on a real GPU.
    """

    def __init__(self, pipeline: ImagePipeline, threshold_gib: float) -> None:
        self._pipeline = pipeline
        self.threshold_gib = threshold_gib
        self.calls = 0
        self.raised = 0

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def _maybe_fail(self, prompt: str | list[str] = "") -> None:
        self.calls += 1
        vram = _node_vram_gib() if self.threshold_gib else None
        if OOM_TRIGGER in _prompts(prompt) or (self.calls > 1 and vram is not None and vram < self.threshold_gib):
            self.raised += 1
            where = "trigger prompt" if vram is None else f"node has {vram:g} GiB"
            raise torch.OutOfMemoryError(f"CUDA out of memory (test double: {where})")

    def generate(self, prompt, *args, **kwargs):
        self._maybe_fail(prompt)
        return self._pipeline.generate(prompt, *args, **kwargs)

    def edit(self, images, prompt, *args, **kwargs):
        self._maybe_fail(prompt)
        return self._pipeline.edit(images, prompt, *args, **kwargs)


OOM_TRIGGER = "test-double: out of memory"
CUDA_FAULT_TRIGGER = "test-double: cuda fault"


class CudaFaultOnPrompt:
    """TEST DOUBLE: a real pipeline that raises a CUDA-context error for the prompt ``CUDA_FAULT_TRIGGER``."""

    def __init__(self, pipeline: ImagePipeline) -> None:
        self._pipeline = pipeline

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate(self, prompt, *args, **kwargs):
        if CUDA_FAULT_TRIGGER in _prompts(prompt):  # a batched call fails as a whole, as on a GPU
            raise RuntimeError("CUDA error: an illegal memory access was encountered (test double)")
        return self._pipeline.generate(prompt, *args, **kwargs)


def _load_with_cuda_fault(variant: ModelVariant, config: AppConfig) -> CudaFaultOnPrompt:
    return CudaFaultOnPrompt(load_pipeline(variant, config))


def cuda_fault_loader():
    return _load_with_cuda_fault


def _load_with_oom(variant: ModelVariant, config: AppConfig, threshold_gib: float) -> OutOfMemoryOnSmallGPUs:
    return OutOfMemoryOnSmallGPUs(load_pipeline(variant, config), threshold_gib)


def out_of_memory_loader(threshold_gib: float):
    """A picklable loader (for ``build_app_from_config(loaders=...)``) that wraps pipelines in the double."""
    return functools.partial(_load_with_oom, threshold_gib=threshold_gib)
