"""Trace what each pipeline stage allocates, from the real model classes at full size, with no GPU.

Every module is built on PyTorch's ``meta`` device (shapes and dtypes, no storage), and one stage runs
under :class:`AllocationTracker`, which records every tensor storage the stage creates and frees. The
peak it reports is the activation memory of that stage as eager PyTorch allocates it on a GPU: the
same ops, the same shapes, the same frees.

Two things a meta-device run cannot see are handled here:

* **Attention.** Every GPU the catalog plans for runs a fused SDPA kernel (flash on sm_80+,
  memory-efficient on sm_75), neither of which builds the L x L score matrix. On meta, PyTorch picks
  the path: with autograd on it decomposes into the math kernel and builds the matrix, under inference
  mode torch 2.13 does not. The trace does not depend on that choice: it swaps SDPA for a stand-in that
  allocates what the fused kernels allocate, the output and a float32 log-sum-exp per query row.
* **What is outside the ops**: the CUDA context, cuBLAS workspaces, the caching allocator's reserve over
  what is allocated. Those are fitted to published GPU measurements in ``serve_app.domain.calibration``.

``imageserve calibrate --trace`` runs :func:`trace_all` and writes the table the planner reads.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serve_app.domain.catalog import GIB
from serve_app.domain.families import FAMILIES
from serve_app.domain.shapes import (
    EDIT_VAE_SIDE,
    PROMPT_TOKENS,
    Z_IMAGE_TEXT_TOKENS,
    text_encoder_tokens,
    transformer_tokens,
)

TRACE_DTYPE = torch.bfloat16
# Output sizes and batch sizes traced per stage; the planner interpolates between them (linearly in
# tokens or pixels, which is how these stages grow once attention no longer builds an L x L matrix).
TRACE_SIDES = (512, 1024, 1536, 2048)
TRACE_BATCHES = (1, 2)
EDIT_INPUT_IMAGES = (1, 2, 3)


@dataclass(frozen=True)
class StageTrace:
    """One traced point: a stage of one module at one shape."""

    module: str  # the catalog component id, e.g. "z-image-transformer"
    stage: str  # "text_encoder", "transformer", "vae_decode", "vae_encode"
    shape: dict[str, int]  # what the point is keyed by: tokens, pixels, batch, images
    params_gib: float
    activations_gib: float
    seconds: float


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """Allocate what flash / memory-efficient attention allocates: the output and a float32 log-sum-exp
    per (batch, head, query row). No score matrix."""
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    logsumexp = torch.empty(*query.shape[:-1], dtype=torch.float32, device=query.device)
    del logsumexp
    return out


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Swap ``torch.nn.functional.scaled_dot_product_attention`` for the flash-like stand-in.

    diffusers' attention dispatch, transformers' sdpa integration and the VAEs' attention blocks all
    look the function up on ``torch.nn.functional`` at call time, so one swap covers every module.
    """
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _flash_like_sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


class AllocationTracker(TorchDispatchMode):
    """Count the bytes of every tensor storage created while active, and the peak of their sum.

    A storage counts from the op that creates it until Python frees it, as the caching allocator sees
    it on a GPU (eager mode frees an intermediate when its last reference goes). It checks the same
    thing as PyTorch's ``MemTracker`` at a fraction of the cost: no module hooks, only storages.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        size = storage.nbytes()

        def freed(_, key=key, size=size):
            self._live.pop(key, None)
            self.current -= size

        self._live[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in torch.utils._pytree.tree_leaves(out):
            if isinstance(item, torch.Tensor):
                self._count(item)
        return out


def trace_stage(module: torch.nn.Module, run: Callable[[], object]) -> tuple[float, float, float]:
    """(parameter GiB, activation peak GiB, seconds) of ``run()`` over a meta-device ``module``.

    ``run`` creates its own inputs inside the trace, so they count, as they do on a GPU.
    """
    params = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    tracker = AllocationTracker()
    started = time.perf_counter()
    with fused_attention(), torch.inference_mode(), tracker:
        result = run()
        del result
    return params / GIB, tracker.peak / GIB, time.perf_counter() - started


def _meta(*shape: int, dtype: torch.dtype = TRACE_DTYPE) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def build_meta_pipeline(variant_id: str):
    """The variant's pipeline at full size on the meta device (bf16 modules; no memory)."""
    from serve_app.engines.random_weights import random_weight_pipeline

    return random_weight_pipeline(variant_id, "full", "meta", TRACE_DTYPE)


def latent_grid(width: int, height: int) -> tuple[int, int]:
    """Latent height and width (8x VAE downsampling) of an image."""
    return height // 8, width // 8


# -- Z-Image-Turbo -----------------------------------------------------------------------------------

def trace_z_image_transformer(transformer, side: int, batch: int) -> StageTrace:
    """One ``ZImageTransformer2DModel`` forward as ``ZImagePipeline`` calls it: a list of latents
    (C, 1, H, W) and a list of caption features, one per image in the (CFG-doubled) batch."""
    lat_h, lat_w = latent_grid(side, side)

    def run():
        latents = [_meta(16, 1, lat_h, lat_w) for _ in range(batch)]
        captions = [_meta(PROMPT_TOKENS, 2560) for _ in range(batch)]
        timestep = _meta(batch, dtype=torch.float32)
        return transformer(latents, timestep, captions, return_dict=False)

    params, acts, seconds = trace_stage(transformer, run)
    tokens = transformer_tokens(side, side)
    return StageTrace("z-image-transformer", "transformer", {"tokens": tokens, "batch": batch}, params, acts, seconds)


def trace_qwen3_text_encoder(text_encoder) -> StageTrace:
    """The Qwen3-4B encoder as ``ZImagePipeline`` runs it: 512 padded tokens, every hidden state kept.

    The pipeline's padding mask is left out: transformers inspects its values to build the causal mask,
    which a meta tensor cannot give, and that mask (512 x 512 booleans) is a quarter of a MiB."""
    tokens = Z_IMAGE_TEXT_TOKENS

    def run():
        input_ids = torch.empty(1, tokens, dtype=torch.long, device="meta")
        return text_encoder(input_ids=input_ids, output_hidden_states=True)

    params, acts, seconds = trace_stage(text_encoder, run)
    return StageTrace("qwen3-4b-text-encoder", "text_encoder", {"tokens": tokens, "batch": 1}, params, acts, seconds)


def trace_vae_decode(vae, module: str, side: int, video_axis: bool) -> StageTrace:
    """``vae.decode`` of one image's latents (the pipelines decode one call's batch at once; batch 1)."""
    lat_h, lat_w = latent_grid(side, side)

    def run():
        shape = (1, 16, 1, lat_h, lat_w) if video_axis else (1, 16, lat_h, lat_w)
        return vae.decode(_meta(*shape), return_dict=False)

    params, acts, seconds = trace_stage(vae, run)
    return StageTrace(module, "vae_decode", {"pixels": side * side, "batch": 1}, params, acts, seconds)


def trace_vae_encode(vae, module: str, side: int) -> StageTrace:
    """``vae.encode`` of one input image (the edit pipeline encodes input images one at a time)."""

    def run():
        return vae.encode(_meta(1, 3, 1, side, side), return_dict=False)

    params, acts, seconds = trace_stage(vae, run)
    return StageTrace(module, "vae_encode", {"pixels": side * side, "batch": 1}, params, acts, seconds)


# -- Qwen-Image-Edit ---------------------------------------------------------------------------------

def trace_qwen_image_transformer(transformer, side: int, num_input_images: int, batch: int) -> StageTrace:
    """One ``QwenImageTransformer2DModel`` forward as ``QwenImageEditPlusPipeline`` calls it: the output's
    latent tokens followed by each input image's, and the prompt's hidden states."""
    lat_h, lat_w = latent_grid(side, side)
    cond_h, cond_w = latent_grid(EDIT_VAE_SIDE, EDIT_VAE_SIDE)
    text_tokens = PROMPT_TOKENS  # the pipeline drops the template and vision tokens before the transformer
    sequence = transformer_tokens(side, side, num_input_images)
    img_shapes = [[(1, lat_h // 2, lat_w // 2), *[(1, cond_h // 2, cond_w // 2)] * num_input_images]] * batch

    def run():
        return transformer(
            hidden_states=_meta(batch, sequence - text_tokens, 64),
            timestep=_meta(batch, dtype=torch.float32),
            encoder_hidden_states=_meta(batch, text_tokens, 3584),
            encoder_hidden_states_mask=torch.empty(batch, text_tokens, dtype=torch.long, device="meta"),
            img_shapes=img_shapes,
            return_dict=False,
        )

    params, acts, seconds = trace_stage(transformer, run)
    shape = {"tokens": sequence, "batch": batch, "images": num_input_images}
    return StageTrace("qwen-image-transformer", "transformer", shape, params, acts, seconds)


def trace_qwen_vl_text_encoder(text_encoder, num_input_images: int) -> StageTrace:
    """Qwen2.5-VL's language model as the edit pipeline runs it: prompt + vision tokens, every hidden
    state kept, and the LM head's logits (the pipeline asks for them through the model's forward).

    The vision tower is left out: its rotary tables and window index are computed from the image grid's
    values, which cannot mix with meta tensors, and over ~784 patches of a 384^2 image its activations
    are a few MiB beside the language model's hundreds. The model's own ``forward`` reads token ids
    to place the vision tokens, which a meta tensor cannot give, so the language model runs directly."""
    tokens = text_encoder_tokens(FAMILIES["QwenImageEditPlusPipeline"], num_input_images)
    model = text_encoder.model

    def run():
        embeds = _meta(1, tokens, 3584)
        position_ids = torch.empty(3, 1, tokens, dtype=torch.long, device="meta")
        out = model.language_model(inputs_embeds=embeds, position_ids=position_ids, output_hidden_states=True)
        logits = text_encoder.lm_head(out.last_hidden_state)
        return out, logits

    params, acts, seconds = trace_stage(text_encoder, run)
    shape = {"tokens": tokens, "batch": 1, "images": num_input_images}
    return StageTrace("qwen2.5-vl-7b-encoder", "text_encoder", shape, params, acts, seconds)


def trace_z_image(sides=TRACE_SIDES, batches=TRACE_BATCHES, text: bool = True) -> list[StageTrace]:
    pipe = build_meta_pipeline("z-image-turbo")
    points = [trace_z_image_transformer(pipe.transformer, side, batch) for side in sides for batch in batches]
    points += [trace_vae_decode(pipe.vae, "flux-vae-16ch", side, video_axis=False) for side in sides]
    if text:
        points.append(trace_qwen3_text_encoder(pipe.text_encoder))
    return points


def trace_qwen_image_edit(sides=TRACE_SIDES, batches=TRACE_BATCHES, images=EDIT_INPUT_IMAGES,
                          text: bool = True) -> list[StageTrace]:
    pipe = build_meta_pipeline("qwen-image-edit-2509")
    points = [trace_qwen_image_transformer(pipe.transformer, side, n, batch)
              for side in sides for n in images for batch in batches]
    points += [trace_vae_decode(pipe.vae, "qwen-image-vae", side, video_axis=True) for side in sides]
    points += [trace_vae_encode(pipe.vae, "qwen-image-vae", side) for side in sides]
    if text:
        points += [trace_qwen_vl_text_encoder(pipe.text_encoder, n) for n in images]
    return points


def trace_all(quick: bool = False) -> list[StageTrace]:
    """Every traced point the calibration table holds (``quick``: the smallest shapes only, for tests)."""
    if quick:
        return (trace_z_image(sides=(512,), batches=(1,), text=False)
                + trace_qwen_image_edit(sides=(512,), batches=(1,), images=(1,), text=False))
    return trace_z_image() + trace_qwen_image_edit()


def round_gib(value: float) -> float:
    """Round a traced figure to 1 MiB, so a re-trace on another machine compares equal."""
    return math.floor(value * 1024 + 0.5) / 1024
