"""Model engines: a catalog variant loaded as a real diffusers pipeline, behind the ``ImageEngine`` protocol.

One module per model family (``z_image``, ``qwen_image_edit``, ``qwen_image_21``) on a shared base (``base``:
loading, seeds, stage timing, cancellation). Each family's record (``serve_app.domain.families``) names its engine;
``load_engine`` loads a variant with the engine its pipeline's family names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from serve_app.domain.families import FAMILIES, family_of
from serve_app.domain.specs import EngineSpec
from serve_app.engines.protocol import ImageEngine

EngineLoader = Callable[[EngineSpec], ImageEngine]


def engine_class(pipeline: str) -> type:
    """The engine of a diffusers pipeline class name (the catalog's ``pipeline``), as its family names it."""
    module, _, name = family_of(pipeline).engine.partition(":")
    return getattr(importlib.import_module(f"serve_app.engines.{module}"), name)


def nunchaku_families() -> dict[str, tuple[str, frozenset[str]]]:
    """Pipeline class -> (its nunchaku transformer class, the keywords the pipeline passes it)."""
    families = [engine_class(pipeline) for pipeline, family in FAMILIES.items() if family.nunchaku]
    return {f.pipeline_class: (f.nunchaku_transformer_class, f.transformer_call_keywords) for f in families}


def load_engine(spec: EngineSpec) -> ImageEngine:
    """Load ``spec.variant`` with its family's engine (the default ``EngineLoader``)."""
    return engine_class(spec.variant.pipeline).load(spec)
