"""Z-Image-Turbo text-to-image on diffusers' ``ZImagePipeline`` (bf16, or nunchaku int4/fp4).

Requests that share size, steps, ``n``, guidance and negative prompt run as one pipeline call
with a list of prompts; each keeps its own seeds, so batched images match unbatched ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from serve_app.domain.catalog import ModelVariant
from serve_app.domain.schemas import LoraRequest
from serve_app.engines.base import DiffusersEngine
from serve_app.engines.protocol import EngineResult, Job


class ZImageEngine(DiffusersEngine):
    """Z-Image generation; implements ``ImageEngine``."""

    pipeline_class = "ZImagePipeline"
    nunchaku_transformer_class = "NunchakuZImageTransformer2DModel"
    # diffusers 0.42, pipelines/z_image/pipeline_z_image.py: transformer(x, t, cap_feats, joint_attention_kwargs=,
    # return_dict=)
    transformer_call_keywords = frozenset({"joint_attention_kwargs", "return_dict"})

    @classmethod
    def context_parallel_plan(cls, transformer) -> dict:
        """diffusers 0.42.1's ZImageTransformer2DModel has no ``_cp_plan``; this is ours. The refiners run whole on
        every rank (two layers each, before the sequence is built); the main layers take 1/N of the joined image
        and caption sequence with its rotary table, and the final layer's output is gathered before unpatchify.
        The attention mask stays whole: Ulysses attends over the whole sequence for 1/N of the heads."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        return {
            "layers.0": {"x": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
            "layers.*": {"freqs_cis": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
            # A ModuleDict by patch size (diffusers' wildcard takes only ModuleLists): each one the model has.
            **{f"all_final_layer.{key}": ContextParallelOutput(gather_dim=1, expected_dims=3)
               for key in transformer.all_final_layer},
        }

    @classmethod
    def largest_side(cls, pipe) -> int | None:
        """Rotary position tables of ``axes_lens`` patches per spatial axis bound the latent grid: a side of
        ``axes_lens x patch x VAE factor`` pixels (the real checkpoint: 512 x 2 x 8 = 8192)."""
        config = getattr(pipe.transformer, "config", None)
        axes_lens = getattr(config, "axes_lens", None)
        if not axes_lens or len(axes_lens) < 3:
            return None
        patch = (getattr(config, "all_patch_size", None) or (2,))[0]
        return min(axes_lens[1:]) * patch * pipe.vae_scale_factor

    @classmethod
    def build_tiny(cls, folder: str | os.PathLike, variant: ModelVariant) -> Path:
        """The tiny random-weight checkpoint of ``variant``'s base model (``random_weights.build_all``)."""
        from serve_app.engines.random_weights import build_z_image

        return build_z_image(folder)

    def warm_up(self) -> None:
        width, height = self.warm_up_size()
        self.generate("warm-up", width=width, height=height, num_inference_steps=self.variant.min_inference_steps,
                      seed=0)
        self.latent_rgb()  # fitted now, so that the first stream's previews cost what the others' do

    def encode_for_preview(self, pixels):
        vae = self.pipe.vae
        latents = vae.encode(pixels).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor  # as the denoising loop holds them

    def batch_key(self, job: Job) -> Hashable:
        """Everything but the prompt and the seed must agree for one pipeline call (the LoRA and its scale too:
        one adapter is active per call); a stream runs alone."""
        if job.on_preview is not None:
            return id(job)
        r = job.request
        return job.width, job.height, job.num_inference_steps, r.n, r.guidance_scale, r.negative_prompt, r.lora

    def run(self, jobs: Sequence[Job], should_stop: Callable[[], bool]) -> list[EngineResult]:
        first = jobs[0]
        n = first.request.n
        batch = self.generate(
            [job.request.prompt for job in jobs], n=n, width=first.width, height=first.height,
            num_inference_steps=first.num_inference_steps, guidance_scale=first.request.guidance_scale,
            negative_prompt=first.request.negative_prompt, seed=[job.request.seed for job in jobs],
            lora=first.request.lora, should_stop=should_stop,
            on_step=self.step_hook(first if len(jobs) == 1 else None, first.width, first.height))
        return [EngineResult(batch.images[i * n:(i + 1) * n], batch.seeds[i * n:(i + 1) * n], dict(batch.timings),
                             batch.steps, batch.batch_images, batch.denoised_images,
                             prompt_tokens=self.prompt_tokens(job.request.prompt)) for i, job in enumerate(jobs)]

    def generate(
        self,
        prompt: str | list[str],
        *,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        seed: int | list[int | None] | None = None,
        lora: LoraRequest | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, Any], None] | None = None,
    ) -> EngineResult:
        """Text to image; a list of prompts runs as one batched pipeline call.

        Args:
            prompt (`str` or `list[str]`): what to draw; a list batches several requests that share
                every other argument.
            n (`int`): images per prompt; image ``i`` of a prompt uses seed ``seed + i``.
            width, height (`int`, *optional*): output size; the variant's default when None.
            num_inference_steps (`int`, *optional*): denoising steps (variant default).
            guidance_scale (`float`, *optional*): CFG scale; Z-Image-Turbo is distilled for 0, and any
                value above 0 runs CFG (two transformer forwards per step).
            negative_prompt (`str`, *optional*): used only when ``guidance_scale > 0``.
            seed (`int` or `list`, *optional*): random when None; one per prompt for a list.
            lora (`LoraRequest`, *optional*): a per-request LoRA of the allow-list, at its scale.
            should_stop (`Callable[[], bool]`, *optional*): polled after every step; True cancels.
            on_step (`Callable[[int, torch.Tensor], None]`, *optional*): called after every step with its
                index and the latents (``step_hook`` makes the previews of a stream).

        Returns:
            `EngineResult` with images and seeds in prompt order, ``n`` per prompt.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = seed if isinstance(seed, list) else [seed] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} seeds")
        defaults = self.variant.defaults
        seeds = [s for one in per_prompt for s in self.seeds(one, n)]
        steps = num_inference_steps or defaults.num_inference_steps
        negative = negative_prompt if negative_prompt is not None else defaults.negative_prompt
        with self.pipeline_call(steps, should_stop, on_step, lora) as call:
            out = self.pipe(
                prompt=prompts if len(prompts) > 1 else prompts[0],
                negative_prompt=[negative] * len(prompts) if negative is not None and len(prompts) > 1 else negative,
                width=width or defaults.width,
                height=height or defaults.height,
                num_inference_steps=steps,
                guidance_scale=defaults.guidance_scale if guidance_scale is None else guidance_scale,
                num_images_per_prompt=n,
                # CPU generators make a seed give the same image on any device.
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=call.on_step_end,
                output_type="np",  # arrays: the replica converts and encodes them off this thread
            )
        images = list(out.images)
        return EngineResult(images, seeds, call.timings, call.steps_done, batch_images=len(images),
                            denoised_images=len(images))
