"""The embedded default: tiny offline checkpoints served on CPU, for a first run and for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_app.domain.config import AppConfig, parse_config
from serve_app.engines import EngineLoader
from serve_app.engines.gpu_doubles import load_without_nunchaku
from serve_app.engines.random_weights import build_all, tiny_checkpoint, tiny_lora, tiny_style_lora

# Small VAE/vision areas keep an edit on two CPU cores well under a second (the real pipeline
# resizes every input image to 1024^2 for the VAE, which costs seconds even with tiny weights).
TINY_EDIT_AREAS = {"edit_vae_image_area": 128 * 128, "edit_condition_image_area": 112 * 112}
# Batching without a wait: bench/throughput.py measured more images/s and a lower p99 from 4
# clients up, and no cost for a lone client (docs/benchmarks.md).
TINY_GENERATION_BATCHING = {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}
EMBEDDED_VARIANTS = ("z-image-turbo", "qwen-image-edit-2509", "qwen-image-edit-2511", "qwen-image-2.1")
# Per-request LoRAs of the embedded default (random weights; they change the image, nothing more). A LoRA fits
# one transformer architecture: the two edit models share theirs.
EMBEDDED_LORAS = {"tiny-style": ("z-image-turbo",), "tiny-edit-style": ("qwen-image-edit-2509", "qwen-image-edit-2511")}


def tiny_model_config(tiny_dir: Path, variant) -> dict[str, Any]:
    """``models.<id>`` settings that run ``variant`` on its base model's tiny checkpoint."""
    entry: dict[str, Any] = {"source": str(tiny_checkpoint(tiny_dir, variant.base_model))}
    if variant.source.lora_file is not None:
        entry["lora_source"] = str(tiny_lora(tiny_dir, variant.base_model))
    if "edit" in variant.tasks:
        entry.update(TINY_EDIT_AREAS)
    return entry


def tiny_loras(tiny_dir: Path, catalog, loras: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """``loras:`` entries for ``loras`` (name -> variants) on the tiny style LoRA of their variants' base model."""
    return {name: {"source": str(tiny_style_lora(tiny_dir, catalog.variant(variants[0]).base_model)),
                   "variants": list(variants)} for name, variants in loras.items()}


def embedded_config_data(tiny_dir: Path, **serving: Any) -> dict[str, Any]:
    from serve_app.domain.catalog import default_catalog

    catalog = default_catalog()
    models = {v: tiny_model_config(tiny_dir, catalog.variant(v)) for v in EMBEDDED_VARIANTS}
    models["z-image-turbo"].update(TINY_GENERATION_BATCHING)
    return {
        "device": {"device": "cpu"},
        "hf": {"offline": True},
        "defaults": {"width": 256, "height": 256},
        "models": models,
        "loras": tiny_loras(tiny_dir, catalog, EMBEDDED_LORAS),
        "serving": {
            "torch_threads": 1,
            "router_num_cpus": 0,  # I/O-bound; on 2 cores a reserved CPU would leave none for more apps
            "deployment": {"num_replicas": 1, "max_ongoing_requests": 4, "max_queued_requests": 32, "num_cpus": 0},
            # Two CPU cores: one 2048x2048 edit step already takes tens of seconds of them.
            "limits": {"max_request_cost": 32},
            **serving,
        },
    }


def embedded_config(tiny_dir: Path, **serving: Any) -> AppConfig:
    """Build the tiny checkpoints under ``tiny_dir`` if missing and return the embedded config."""
    build_all(tiny_dir)
    return parse_config(embedded_config_data(tiny_dir, **serving), "embedded default")


def tiny_loaders(config: AppConfig) -> dict[str, EngineLoader]:
    """Engine loaders for running ``config``'s variants on CPU: 4-bit variants through the
    ``load_without_nunchaku`` test double (nunchaku's kernels need CUDA); the rest load as they are."""
    catalog = config.build_catalog()
    return {m: load_without_nunchaku for m in config.models if catalog.variant(m).requires_nunchaku}


# attention_backend values that run on a CPU: torch SDPA's math and flash kernels (the others need CUDA or a package).
CPU_ATTENTION_BACKENDS = ("native", "_native_math", "_native_flash")


def cpu_settings(model_id: str, entry: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``models.<id>`` settings without what a CPU cannot run, and a line for each setting left out."""
    kept = dict(entry)
    dropped = []
    for key, why in (("offload_mode", "CPU pipelines hold their weights in RAM"),
                     ("torch_dtype", "CPU runs float32")):
        if kept.pop(key, None) is not None:
            dropped.append(f"models.{model_id}.{key}: {why}")
    if str(kept.get("parallel") or "").startswith("tp"):  # context parallel runs on CPU ranks, over gloo
        dropped.append(f"models.{model_id}.parallel {kept.pop('parallel')}: diffusers shards tensors only on "
                       "accelerators; served in one process")
    optimizations = dict(kept.get("optimizations") or {})
    backend = optimizations.get("attention_backend")
    if backend is not None and backend not in CPU_ATTENTION_BACKENDS:
        del optimizations["attention_backend"]
        dropped.append(f"models.{model_id}.optimizations.attention_backend {backend!r}: needs CUDA (CPU runs "
                       f"{', '.join(CPU_ATTENTION_BACKENDS)})")
    if optimizations:
        kept["optimizations"] = optimizations
    else:
        kept.pop("optimizations", None)
    return kept, dropped


def on_tiny_checkpoints(config: AppConfig, tiny_dir: Path) -> tuple[AppConfig, dict[str, EngineLoader], list[str]]:
    """``config`` as this machine can run it without a GPU: every variant from its base model's tiny checkpoint
    on CPU, offline, with the embedded default's CPU settings; GPU pools dropped (their nodes are not here),
    and swap groups kept, so they take turns as they would on a GPU. Speed options that run on a CPU (step
    caches, compile, VAE channels-last, the SDPA backends) are kept. Returns the config, its loaders, and a line
    for each setting a CPU cannot honour and that was left out."""
    build_all(tiny_dir)
    catalog = config.build_catalog()
    data = config.model_dump(mode="json", exclude_unset=True)
    embedded = embedded_config_data(tiny_dir)
    data["device"] = embedded["device"]
    data["hf"] = embedded["hf"]
    data["defaults"] = embedded["defaults"]
    data.pop("pools", None)
    models, dropped = {}, []
    for model_id, entry in data.get("models", {}).items():
        weights = ("source", "transformer_source", "revision", "transformer_revision", "lora_source", "lora_revision")
        kept, left_out = cpu_settings(model_id, {k: v for k, v in entry.items() if k not in weights})
        models[model_id] = {**kept, **tiny_model_config(tiny_dir, catalog.variant(model_id))}
        dropped += left_out
    data["models"] = models
    if data.get("loras"):  # each listed LoRA becomes the tiny one of its variants' architecture
        data["loras"] = tiny_loras(tiny_dir, catalog, {name: tuple(lora["variants"])
                                                       for name, lora in data["loras"].items()})
    serving = {**embedded["serving"], **{k: v for k, v in data.get("serving", {}).items()
                                         if k not in ("deployment", "torch_threads", "router_num_cpus")}}
    data["serving"] = serving
    for group in data.get("swap_groups", []):
        group.pop("deployment", None)
    tiny = parse_config(data, "config on tiny checkpoints")
    return tiny, tiny_loaders(tiny), dropped
