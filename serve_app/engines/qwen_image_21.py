"""Qwen-Image-2.1 on diffusers' ``QwenImage21Pipeline``: generation from a prompt, and editing with up to three
condition images, from one checkpoint and one engine (the family record: ``serve_app.domain.families``).

What differs from the other families, read in diffusers 0.42.1 ``pipelines/qwenimage21/pipeline_qwenimage21.py``:

- Prompt and condition images go through one Qwen3-VL encoder (``Qwen3VLProcessor``), whose tokens the single-stream
  transformer reads as a prefix whose keys and values it caches after the first step (``use_kv_cache``).
- Each condition image is resized to ``output_resolution`` squared (1024^2 by default) for both the vision
  encoder and the VAE; ``models.<id>.edit_vae_image_area`` sets that area here, as it sets the VAE area of
  Qwen-Image-Edit.
- The VAE works on RGBA: the pipeline hands back (H, W, 4) arrays, and this engine keeps the RGB channels (every
  output here is opaque).
- Sides are floored to multiples of 32 (16x VAE, 2x2 vision merge); the family's ``size_multiple`` makes the
  router refuse other sizes instead.
- CFG runs when ``true_cfg_scale > 1`` and a negative prompt is given; 40 steps by default.

Every job runs alone and each of its ``n`` images is a call of its own, as for Qwen-Image-Edit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from serve_app.domain.catalog import ModelVariant
from serve_app.domain.images import decode_image
from serve_app.domain.schemas import EditRequest, LoraRequest
from serve_app.domain.specs import EngineSpec
from serve_app.engines.base import DiffusersEngine
from serve_app.engines.protocol import EngineResult, Job
from serve_app.engines.qwen_processors import ImageOnlyQwen3VLProcessor, torchvision_available

# ---- the engine ---------------------------------------------------------------------------------------------------


class QwenImage21Engine(DiffusersEngine):
    """Qwen-Image-2.1 generation and editing; implements ``ImageEngine``."""

    pipeline_class = "QwenImage21Pipeline"
    nunchaku_transformer_class = ""  # no nunchaku build exists (the family record says so; the catalog has none)
    transformer_call_keywords = frozenset()

    @classmethod
    def extra_components(cls, spec: EngineSpec, folder: Path) -> dict[str, Any]:
        if torchvision_available():
            return {}
        return {"processor": ImageOnlyQwen3VLProcessor.from_checkpoint(folder)}

    def output_resolution(self) -> int:
        """The side of the square area condition images are resized to (``edit_vae_image_area``, else the
        pipeline's 1024), floored to the pipeline's multiple of 32."""
        area = self.spec.edit_vae_image_area
        side = math.isqrt(area) if area else 1024
        return max(32, side // 32 * 32)

    def warm_up(self) -> None:
        width, height = self.warm_up_size()
        self.call(None, "warm-up", width=width, height=height, num_inference_steps=self.variant.min_inference_steps,
                  seed=0)
        self.latent_rgb()  # fitted now, so that the first stream's previews cost what the others' do

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt's length in the processor's tokenizer (the pipeline has no ``tokenizer`` of its own)."""
        return len(self.pipe.processor.tokenizer(prompt)["input_ids"])

    def encode_for_preview(self, pixels):
        """RGB pixels as the pipeline encodes a condition image: opaque RGBA, one frame, normalized latents."""
        alpha = torch.ones_like(pixels[:, :1])
        latents = self.pipe.vae.encode(torch.cat([pixels, alpha], dim=1).unsqueeze(2)).latent_dist.mode()
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return ((latents - mean) / std).squeeze(2)

    def latent_grid(self, latents, width: int, height: int):
        """The loop's flattened (batch, tokens, channels) latents as (batch, channels, h, w)."""
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor).squeeze(2)

    def sigmas(self, steps: int) -> list[float] | None:
        """The sigma grid of ``steps`` steps. The checkpoint's own (``sample_sigmas``) where it has that many; the
        pipeline would otherwise run its configured grid whatever the steps asked (pipeline_qwenimage21.py, "Prepare
        timesteps"), so another count gets the pipeline's own linear grid of that length."""
        configured = self.pipe.config.get("sample_sigmas")
        if configured is None or len(configured) == steps:
            return None
        return [float(s) for s in np.linspace(1.0, 1 / steps, steps)]

    def batch_key(self, job: Job) -> Hashable:
        return id(job)  # one request per pipeline call

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        results = []
        for job in jobs:
            r = job.request
            # As for Qwen-Image-Edit: the router's own plain PNGs, decoded again under the same bounds.
            images = None
            if isinstance(r, EditRequest):
                images = [decode_image(data, self.spec.max_input_pixels, name=f"image {i + 1}")
                          for i, data in enumerate(r.images)]
            result = self.call(
                images, r.prompt, n=r.n, width=job.width, height=job.height,
                num_inference_steps=job.num_inference_steps, true_cfg_scale=getattr(r, "true_cfg_scale", None),
                negative_prompt=r.negative_prompt, seed=r.seed, lora=r.lora, should_stop=should_stop,
                on_step=self.step_hook(job, job.width, job.height))
            result.prompt_tokens = self.prompt_tokens(r.prompt)
            results.append(result)
        return results

    def call(
        self,
        images: list[Image.Image] | None,
        prompt: str,
        *,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        true_cfg_scale: float | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        lora: LoraRequest | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, Any], None] | None = None,
    ) -> EngineResult:
        """Generate (``images`` None) or edit with 1 to ``max_input_images`` condition images.

        Args:
            images (`list[PIL.Image.Image]`, *optional*): condition images, in the order the prompt names them.
            prompt (`str`): what to make, or the instruction.
            n (`int`): outputs; each is its own pipeline call.
            width, height (`int`, *optional*): output size, multiples of 32; the variant's default when None.
            num_inference_steps (`int`, *optional*): denoising steps (variant default: 40).
            true_cfg_scale (`float`, *optional*): CFG runs when > 1 and a negative prompt is given.
            negative_prompt (`str`, *optional*): the variant's default when None.
            seed (`int`, *optional*): image ``i`` uses ``seed + i``; random when None.
            lora (`LoraRequest`, *optional*): a per-request LoRA of the allow-list, at its scale.
            should_stop (`Callable[[], bool]`, *optional*): polled after every step; True cancels.
            on_step (`Callable[[int, torch.Tensor], None]`, *optional*): called after every step with its
                index and the latents (``step_hook`` makes a stream's previews).

        Returns:
            `EngineResult` with ``n`` RGB images; its timings add up the ``n`` calls.
        """
        if images is not None and not 1 <= len(images) <= self.variant.max_input_images:
            raise ValueError(f"{self.variant.id} takes 1 to {self.variant.max_input_images} condition images")
        defaults = self.variant.defaults
        seeds = self.seeds(seed, n)
        steps = num_inference_steps or defaults.num_inference_steps
        negative = negative_prompt if negative_prompt is not None else defaults.negative_prompt
        cfg_scale = defaults.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
        if not self.variant.runs_cfg(true_cfg_scale=cfg_scale, negative_prompt=negative):
            negative = None  # the pipeline warns on every call that it ignores one
        condition = [image.convert("RGB") for image in images] if images else None

        def call_pipeline(generator, on_step_end) -> list:
            out = self.pipe(
                prompt=prompt,
                image=condition,
                negative_prompt=negative,
                true_cfg_scale=cfg_scale or 1.0,
                width=width or defaults.width,
                height=height or defaults.height,
                num_inference_steps=steps,
                sigmas=self.sigmas(steps),
                output_resolution=self.output_resolution(),
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="np",  # (H, W, 4) arrays: RGBA, of which the RGB channels are kept
            )
            return [image[..., :3] for image in out.images]

        return self.one_call_per_image(seeds, steps, should_stop, on_step, lora, call_pipeline)

    # ---- the tiny checkpoint ---------------------------------------------------------------------------------

    @classmethod
    def build_tiny(cls, folder: str | os.PathLike, variant: ModelVariant, seed: int = 0) -> Path:
        """Save a random-weight ``QwenImage21Pipeline`` of the real classes at toy sizes to ``folder``."""
        folder = Path(folder)
        tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
        # save_pretrained records the subclass, which from_pretrained cannot import: record the real class, as the
        # real checkpoint does.
        index = json.loads((folder / "model_index.json").read_text())
        index["processor"] = ["transformers", "Qwen3VLProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in ("processor_config.json", "tokenizer_config.json"):
            path = folder / "processor" / name
            data = json.loads(path.read_text())
            data["processor_class"] = "Qwen3VLProcessor"
            path.write_text(json.dumps(data, indent=2) + "\n")
        return folder


# Qwen3-VL's chat template cut to what the pipeline uses; unlike the Qwen2 text template of the tiny tokenizer it
# takes content as a list of parts, which QwenImage21Pipeline.__init__ sends to count the system prompt's tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
TINY_TEXT_HIDDEN = 32  # the text encoder's width = the transformer's context_in_dim = the vision tower's output
TINY_DIMS = {
    # mrope_section sums to head_dim / 2, interleaved as in Qwen3-VL.
    "text": dict(hidden_size=TINY_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                                  "mrope_interleaved": True}),
    "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_TEXT_HIDDEN,
                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                   deepstack_visual_indexes=[0]),
    # Five levels, four 2x downsamples: the 16x the pipeline assumes (vae_scale_factor = 16); RGBA in and out.
    "vae": dict(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True, True], in_channels=4, out_channels=4, is_residual=True),
    # The rotary axes sum to the head dim.
    "transformer": dict(patch_size=1, in_channels=64, out_channels=64, num_layers=2, attention_head_dim=16,
                        num_attention_heads=2, context_in_dim=TINY_TEXT_HIDDEN, mlp_ratio=3, axes_dims_rope=(4, 6, 6),
                        causal_condition=True),
    # The pipeline's calculate_shift defaults (the real scheduler_config.json is not readable offline).
    "scheduler": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential"),
}


def tiny_pipeline(seed: int = 0):
    """A random-weight ``QwenImage21Pipeline`` at toy sizes, in memory."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from serve_app.engines.random_weights import build_tokenizer, padded_vocab_size

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {name: tokenizer.convert_tokens_to_ids(name)
           for name in ("<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen3VLConfig(
        text_config={**TINY_DIMS["text"], "vocab_size": padded_vocab_size(tokenizer),
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=dict(TINY_DIMS["vision"]), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    # One vision slot is a 32x32 px tile (16 px patches, 2x2 merge), as the pipeline assumes; the smallest area is
    # one tile, so a small condition image is not scaled up past what its latents hold.
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 16777216}, patch_size=16,
                                               temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    z = TINY_DIMS["vae"]["z_dim"]
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_DIMS["scheduler"]),
        vae=AutoencoderKLQwenImage21(latents_mean=[0.0] * z, latents_std=[1.0] * z, **TINY_DIMS["vae"]),
        text_encoder=Qwen3VLForConditionalGeneration(config).eval(),
        processor=ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=CHAT_TEMPLATE),
        transformer=QwenImage21Transformer2DModel(**TINY_DIMS["transformer"]))
