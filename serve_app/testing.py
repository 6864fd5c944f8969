"""Test doubles for what this machine cannot do for real. Used by tests and simulations only.

A CUDA out-of-memory error cannot happen without a GPU, so ``OutOfMemoryOnSmallGPUs`` wraps a real
loaded pipeline and raises ``torch.OutOfMemoryError`` (the exception class torch raises on a real
OOM) when the replica's node declares less VRAM than a threshold.
"""

from __future__ import annotations

import functools

import torch

from serve_app.catalog import ModelVariant
from serve_app.config import AppConfig
from serve_app.pipelines import ImagePipeline, load_pipeline


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

    def _maybe_fail(self) -> None:
        self.calls += 1
        vram = _node_vram_gib()
        if self.calls > 1 and vram is not None and vram < self.threshold_gib:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (test double: node has {vram:g} GiB)")

    def generate(self, *args, **kwargs):
        self._maybe_fail()
        return self._pipeline.generate(*args, **kwargs)

    def edit(self, *args, **kwargs):
        self._maybe_fail()
        return self._pipeline.edit(*args, **kwargs)


def _load_with_oom(variant: ModelVariant, config: AppConfig, threshold_gib: float) -> OutOfMemoryOnSmallGPUs:
    return OutOfMemoryOnSmallGPUs(load_pipeline(variant, config), threshold_gib)


def out_of_memory_loader(threshold_gib: float):
    """A picklable loader (for ``build_app_from_config(loaders=...)``) that wraps pipelines in the double."""
    return functools.partial(_load_with_oom, threshold_gib=threshold_gib)
