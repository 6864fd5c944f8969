"""The configured speed options applied to a loaded pipeline: channels-last, the attention backend,
torch.compile and the step caches (``OptimizationConfig``)."""

from __future__ import annotations

import logging

import torch

from serve_app.domain.config import OptimizationConfig, StepCacheConfig
from serve_app.engines.protocol import ModelLoadError

logger = logging.getLogger(__name__)


def set_channels_last(module: torch.nn.Module, enabled: bool = True) -> None:
    """Put every convolution's weights of ``module`` in channels-last format (or back).

    Per convolution, because the Qwen-Image VAE mixes Conv3d (5-D, channels_last_3d) and 2-D layers.
    """
    for conv in module.modules():
        if isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)):
            if not enabled:
                fmt = torch.contiguous_format
            else:
                fmt = torch.channels_last_3d if isinstance(conv, torch.nn.Conv3d) else torch.channels_last
            conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    """Run every attention of ``transformer`` (and only those) on ``backend``.

    diffusers 0.42.1's ``ModelMixin.set_attention_backend`` sets the backend on each attention processor of the
    model and then also makes it the process-wide default (``_AttentionBackendRegistry.set_active_backend``),
    which every other model in the process, whose processors name no backend, then runs on: another member of a
    swap group, say, where a maskless backend breaks Z-Image's masked calls. The default is put back. A
    transformer whose attention modules are not diffusers' (nunchaku's) takes no backend: refused rather than
    logged as applied.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(backend)
    except (AttributeError, ImportError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"attention_backend {backend!r} is not usable here: {err}") from None
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
    taken = [m for m in transformer.modules()
             if getattr(getattr(m, "processor", None), "_attention_backend", None) is not None]
    if not taken:
        raise ModelLoadError(f"attention_backend {backend!r}: no attention module of {type(transformer).__name__} "
                             "takes a diffusers attention backend")


def apply_optimizations(pipe, options: OptimizationConfig) -> list[str]:
    """Apply the configured speed options to a loaded pipeline; returns what was applied.

    bench/gpu_fullsize.py measures each option against the default on a GPU.
    """
    applied = []
    if options.attention_backend is not None:
        set_attention_backend(pipe.transformer, options.attention_backend)
        applied.append(f"attention_backend={options.attention_backend}")
    if options.vae_channels_last:
        set_channels_last(pipe.vae)
        applied.append("vae_channels_last")
    if options.step_cache is not None:
        pipe.transformer.enable_cache(step_cache_config(options.step_cache))
        applied.append(f"step_cache={options.step_cache.kind}")
    if options.compile_transformer:
        pipe.transformer.compile(mode=options.compile_mode)
        applied.append(f"compile_transformer={options.compile_mode}")
    return applied


def step_cache_config(cache: StepCacheConfig):
    """diffusers' cache config for ``cache``."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.kind == "first_block":
        return FirstBlockCacheConfig(threshold=cache.threshold)
    return TaylorSeerCacheConfig(cache_interval=cache.cache_interval,
                                 disable_cache_before_step=cache.disable_cache_before_step)
