"""The embedded default: tiny offline checkpoints served on CPU, for a first run and for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_app.config import AppConfig, parse_config

# Small VAE/vision areas keep an edit on two CPU cores well under a second (the real pipeline
# resizes every input image to 1024^2 for the VAE, which costs seconds even with tiny weights).
TINY_EDIT_AREAS = {"edit_vae_image_area": 128 * 128, "edit_condition_image_area": 112 * 112}
# Batching without a wait: bench/throughput.py measured more images/s and a lower p99 from 4
# clients up, and no cost for a lone client (docs/benchmarks.md).
TINY_GENERATION_BATCHING = {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}


def embedded_config_data(tiny_dir: Path, **serving: Any) -> dict[str, Any]:
    from serve_app.tiny_models import TINY_MODEL_DIRS

    return {
        "device": {"device": "cpu"},
        "hf": {"offline": True},
        "defaults": {"width": 256, "height": 256},
        "models": {
            "z-image-turbo": {"source": str(tiny_dir / TINY_MODEL_DIRS["z-image"]), **TINY_GENERATION_BATCHING},
            "qwen-image-edit-2509": {"source": str(tiny_dir / TINY_MODEL_DIRS["qwen-image-edit-2509"]),
                                     **TINY_EDIT_AREAS},
            "qwen-image-edit-2511": {"source": str(tiny_dir / TINY_MODEL_DIRS["qwen-image-edit-2511"]),
                                     **TINY_EDIT_AREAS},
        },
        "serving": {
            "torch_threads": 1,
            "router_num_cpus": 0,  # I/O-bound; on 2 cores a reserved CPU would leave none for more apps
            "deployment": {"num_replicas": 1, "max_ongoing_requests": 4, "max_queued_requests": 32, "num_cpus": 0},
            **serving,
        },
    }


def embedded_config(tiny_dir: Path, **serving: Any) -> AppConfig:
    """Build the tiny checkpoints under ``tiny_dir`` if missing and return the embedded config."""
    from serve_app.tiny_models import build_all

    build_all(tiny_dir)
    return parse_config(embedded_config_data(tiny_dir, **serving), "embedded default")
