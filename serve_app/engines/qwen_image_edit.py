"""Qwen-Image-Edit-2509/-2511 instruction editing on diffusers' ``QwenImageEditPlusPipeline``
(bf16, or nunchaku int4/fp4 Lightning for 2509).

The pipeline takes one image set per call, so every job runs alone and each of its ``n`` outputs
is a call of its own. It resizes each input image to a fixed area for the VAE and another for the
vision encoder; those areas are module constants of diffusers, which this engine sets only for the
length of its own calls (``models.<id>.edit_vae_image_area`` / ``edit_condition_image_area``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from serve_app.domain.catalog import ModelVariant
from serve_app.domain.images import decode_image
from serve_app.domain.schemas import LoraRequest
from serve_app.domain.specs import EngineSpec
from serve_app.engines.base import DiffusersEngine
from serve_app.engines.protocol import EngineResult, Job
from serve_app.engines.qwen_processors import ImageOnlyQwen2VLProcessor, torchvision_available

# Every engine in the process sets diffusers' input-area constants under this lock for its call only.
_INPUT_AREAS_LOCK = threading.Lock()


@contextmanager
def input_image_areas(vae_area: int | None, condition_area: int | None) -> Iterator[None]:
    """Within this block, the edit pipeline resizes inputs to these areas (its defaults when None)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_module

    with _INPUT_AREAS_LOCK:
        defaults = edit_module.VAE_IMAGE_SIZE, edit_module.CONDITION_IMAGE_SIZE
        edit_module.VAE_IMAGE_SIZE = vae_area or defaults[0]
        edit_module.CONDITION_IMAGE_SIZE = condition_area or defaults[1]
        try:
            yield
        finally:
            edit_module.VAE_IMAGE_SIZE, edit_module.CONDITION_IMAGE_SIZE = defaults


class QwenImageEditEngine(DiffusersEngine):
    """Qwen-Image-Edit editing; implements ``ImageEngine``."""

    pipeline_class = "QwenImageEditPlusPipeline"
    nunchaku_transformer_class = "NunchakuQwenImageTransformer2DModel"
    # diffusers 0.42, pipelines/qwenimage/pipeline_qwenimage_edit_plus.py: the transformer call in the denoising loop
    transformer_call_keywords = frozenset({"hidden_states", "timestep", "guidance", "encoder_hidden_states_mask",
                                           "encoder_hidden_states", "img_shapes", "attention_kwargs", "return_dict"})

    @classmethod
    def extra_components(cls, spec: EngineSpec, folder: Path) -> dict[str, Any]:
        if torchvision_available():
            return {}
        return {"processor": ImageOnlyQwen2VLProcessor.from_checkpoint(folder)}

    @classmethod
    def build_tiny(cls, folder: str | os.PathLike, variant: ModelVariant) -> Path:
        """The tiny random-weight checkpoint of ``variant``'s base model: 2511 has ``zero_cond_t``."""
        from serve_app.engines.random_weights import build_qwen_image_edit

        return build_qwen_image_edit(folder, zero_cond_t=variant.base_model.endswith("2511"))

    def warm_up(self) -> None:
        width, height = self.warm_up_size()
        gray = Image.new("RGB", (width, height), (127, 127, 127))
        self.edit([gray], "warm-up", width=width, height=height, num_inference_steps=self.variant.min_inference_steps,
                  seed=0)
        self.latent_rgb()  # fitted now, so that the first stream's previews cost what the others' do

    def _latent_statistics(self, like):
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def encode_for_preview(self, pixels):
        latents = self.pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()  # a one-frame video
        mean, std = self._latent_statistics(latents)
        return ((latents - mean) / std).squeeze(2)  # normalized as the pipeline normalizes image latents

    def latent_grid(self, latents, width: int, height: int):
        """The packed (batch, patches, channels x 4) latents of the loop as (batch, channels, h, w)."""
        unpacked = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        return unpacked.squeeze(2)

    def batch_key(self, job: Job) -> Hashable:
        return id(job)  # one image set per pipeline call: every job runs alone

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        results = []
        for job in jobs:
            r = job.request
            # Through the router these are its own plain PNGs (``prepare_input_image``): it decoded the caller's
            # bytes under DecodeLimits off its event loop, so this is a bounded decode of trusted pixels. A caller
            # inside the cluster that reaches this deployment directly gets the same bounds.
            images = [decode_image(data, self.spec.max_input_pixels, name=f"image {i + 1}")
                      for i, data in enumerate(r.images)]
            result = self.edit(
                images, r.prompt, n=r.n, width=job.width, height=job.height,
                num_inference_steps=job.num_inference_steps, true_cfg_scale=r.true_cfg_scale,
                negative_prompt=r.negative_prompt, seed=r.seed, lora=r.lora, should_stop=should_stop,
                on_step=self.step_hook(job, job.width, job.height))
            result.prompt_tokens = self.prompt_tokens(r.prompt)
            results.append(result)
        return results

    def edit(
        self,
        images: list[Image.Image],
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
        """Instruction editing of 1 to ``max_input_images`` images.

        Args:
            images (`list[PIL.Image.Image]`): the input images, in the order the prompt names them.
            prompt (`str`): the instruction.
            n (`int`): outputs; each is its own pipeline call (the pipeline takes batch size 1).
            width, height (`int`, *optional*): output size; the variant's default when None.
            num_inference_steps (`int`, *optional*): denoising steps (variant default).
            true_cfg_scale (`float`, *optional*): CFG runs when > 1 and a negative prompt is given.
            negative_prompt (`str`, *optional*): the variant's default (" ") when None.
            seed (`int`, *optional*): image ``i`` uses ``seed + i``; random when None.
            lora (`LoraRequest`, *optional*): a per-request LoRA of the allow-list, at its scale.
            should_stop (`Callable[[], bool]`, *optional*): polled after every step; True cancels.
            on_step (`Callable[[int, torch.Tensor], None]`, *optional*): called after every step of every
                output's call with its index and the latents (``step_hook`` makes a stream's previews).

        Returns:
            `EngineResult` with ``n`` images; its timings add up the ``n`` calls.
        """
        if not 1 <= len(images) <= self.variant.max_input_images:
            raise ValueError(f"{self.variant.id} takes 1 to {self.variant.max_input_images} input images")
        defaults = self.variant.defaults
        seeds = self.seeds(seed, n)
        steps = num_inference_steps or defaults.num_inference_steps
        negative = negative_prompt if negative_prompt is not None else defaults.negative_prompt
        cfg_scale = defaults.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
        # Without CFG (true_cfg_scale <= 1: the Lightning variants) the pipeline ignores a negative prompt, and warns
        # that it does on every call; it is passed only where it is used.
        if not self.variant.runs_cfg(true_cfg_scale=cfg_scale, negative_prompt=negative):
            negative = None
        rgb = [image.convert("RGB") for image in images]

        def call_pipeline(generator, on_step_end) -> list:
            with input_image_areas(self.spec.edit_vae_image_area, self.spec.edit_condition_image_area):
                return list(self.pipe(
                    image=rgb,
                    prompt=prompt,
                    negative_prompt=negative,
                    true_cfg_scale=cfg_scale,
                    width=width or defaults.width,
                    height=height or defaults.height,
                    num_inference_steps=steps,
                    generator=generator,
                    callback_on_step_end=on_step_end,
                    output_type="np",  # arrays: the replica converts and encodes them off this thread
                ).images)

        return self.one_call_per_image(seeds, steps, should_stop, on_step, lora, call_pipeline)
