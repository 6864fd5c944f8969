"""Model engines: a catalog variant loaded as a real diffusers pipeline, behind the ``ImageEngine`` protocol.

One module per model family (``z_image``, ``qwen_image_edit``) on a shared base (``base``: loading,
seeds, stage timing, cancellation). ``load_engine`` picks the family from the variant's pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

from serve_app.domain.specs import EngineSpec
from serve_app.engines.protocol import ImageEngine

EngineLoader = Callable[[EngineSpec], ImageEngine]


def engine_class(pipeline: str) -> type:
    """The engine family for a diffusers pipeline class name (the catalog's ``pipeline``)."""
    if pipeline == "ZImagePipeline":
        from serve_app.engines.z_image import ZImageEngine

        return ZImageEngine
    if pipeline == "QwenImageEditPlusPipeline":
        from serve_app.engines.qwen_image_edit import QwenImageEditEngine

        return QwenImageEditEngine
    raise ValueError(f"no engine for pipeline {pipeline!r}")


def nunchaku_families() -> dict[str, tuple[str, frozenset[str]]]:
    """Pipeline class -> (its nunchaku transformer class, the keywords the pipeline passes it)."""
    families = (engine_class("ZImagePipeline"), engine_class("QwenImageEditPlusPipeline"))
    return {f.pipeline_class: (f.nunchaku_transformer_class, f.transformer_call_keywords) for f in families}


def load_engine(spec: EngineSpec) -> ImageEngine:
    """Load ``spec.variant`` with its family's engine (the default ``EngineLoader``)."""
    return engine_class(spec.variant.pipeline).load(spec)
