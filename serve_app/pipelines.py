"""Load a catalog variant as a real diffusers pipeline and run it.

``load_pipeline`` builds ``ZImagePipeline`` or ``QwenImageEditPlusPipeline`` with
``from_pretrained`` from a local folder or a (cached) hub repo, applies dtype, device and
offload mode, and for 4-bit variants loads the nunchaku transformer after checking the GPU's
architecture. ``ImagePipeline`` runs it with the argument names diffusers users know, per-image
seeds, stage timings, and cancellation between denoising steps.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from serve_app.catalog import GPUClass, ModelVariant
from serve_app.config import AppConfig, HFConfig, ModelConfig, OptimizationConfig
from serve_app.planner import OffloadMode, architecture_problem, plan

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_SEED = 2**31 - 1
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelLoadError(RuntimeError):
    """A variant could not be loaded; the message says why and what to do."""


class IncompatibleHardwareError(ModelLoadError):
    """The variant cannot run on this device (architecture, VRAM, or no GPU for 4-bit)."""


class GenerationCancelled(RuntimeError):
    """The caller asked to stop; denoising ended early and no image is returned."""


@dataclass
class PipelineResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise IncompatibleHardwareError("device 'cuda' was asked for, but torch sees no CUDA device")
    return requested


def resolve_source(source: str, hf: HFConfig, skip_transformer: bool = False) -> Path:
    """A local pipeline folder for ``source`` (a folder, or a hub repo id from the local cache).

    ``skip_transformer`` leaves out the bf16 transformer (41 GB for Qwen-Image-Edit) when a
    nunchaku 4-bit transformer replaces it.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if not HUB_REPO_ID.fullmatch(source):
        raise ModelLoadError(f"model folder {source} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            source, cache_dir=hf.cache_dir, local_files_only=hf.offline,
            ignore_patterns=["transformer/*"] if skip_transformer else None,
        ))
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
        where = "in the local Hugging Face cache (offline mode)" if hf.offline else "on the Hub"
        raise ModelLoadError(f"{source} is not available {where}: {type(err).__name__}: {err}") from None


def _nunchaku_transformer(variant: ModelVariant, model_cfg: ModelConfig, hf: HFConfig, dtype: torch.dtype):
    from serve_app.nunchaku_support import transformer_class

    cls = transformer_class(variant.pipeline)
    source = model_cfg.transformer_source
    if source is None:
        from huggingface_hub import hf_hub_download

        try:
            source = hf_hub_download(
                variant.source.transformer_repo, variant.source.transformer_file,
                cache_dir=hf.cache_dir, local_files_only=hf.offline,
            )
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(
                f"{variant.source.transformer_repo}/{variant.source.transformer_file} is not available: {err}"
            ) from None
    elif Path(source).is_dir():
        source = str(Path(source) / variant.source.transformer_file)
    if not Path(source).exists():
        raise ModelLoadError(f"nunchaku transformer file {source} does not exist")
    return cls.from_pretrained(source, torch_dtype=dtype)


def _apply_edit_image_areas(model_cfg: ModelConfig) -> None:
    # The edit pipeline reads these module constants at call time; one variant per process.
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_module

    if model_cfg.edit_vae_image_area:
        edit_module.VAE_IMAGE_SIZE = model_cfg.edit_vae_image_area
    if model_cfg.edit_condition_image_area:
        edit_module.CONDITION_IMAGE_SIZE = model_cfg.edit_condition_image_area


def _apply_offload(pipe, mode: OffloadMode, device: str, nunchaku_transformer: bool) -> None:
    if device == "cpu" or mode == "none":
        pipe.to(device)
        return
    if mode == "model":
        pipe.enable_model_cpu_offload()
        return
    if nunchaku_transformer:
        # nunchaku streams its own blocks; accelerate handles the text encoder and VAE.
        pipe.transformer.set_offload(True, use_pin_memory=False, num_blocks_on_gpu=1)
        pipe._exclude_from_cpu_offload.append("transformer")
    pipe.enable_sequential_cpu_offload()


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


def apply_optimizations(pipe, options: OptimizationConfig) -> list[str]:
    """Apply the configured speed options to a loaded pipeline; returns what was applied.

    bench/gpu_fullsize.py measures each option against the default on a GPU.
    """
    applied = []
    if options.attention_backend is not None:
        try:
            pipe.transformer.set_attention_backend(options.attention_backend)
        except (AttributeError, ImportError, RuntimeError, ValueError) as err:
            raise ModelLoadError(f"attention_backend {options.attention_backend!r} is not usable here: {err}") from None
        applied.append(f"attention_backend={options.attention_backend}")
    if options.vae_channels_last:
        set_channels_last(pipe.vae)
        applied.append("vae_channels_last")
    if options.compile_transformer:
        pipe.transformer.compile(mode=options.compile_mode)
        applied.append(f"compile_transformer={options.compile_mode}")
    return applied


def choose_offload_mode(
    variant: ModelVariant, gpu: GPUClass | None, forced: OffloadMode | None, config: AppConfig
) -> tuple[OffloadMode, float | None]:
    """The offload mode to load with and the planner's peak estimate (None on CPU)."""
    if gpu is None:
        return "none", None
    modes = (forced,) if forced else ("none", "model", "sequential")
    verdict = plan(variant, gpu, config.defaults.width, config.defaults.height, modes=modes,
                   settings=config.device.planner, batch_size=config.batch_size(variant.id))
    if not verdict.fits:
        raise IncompatibleHardwareError(f"{variant.id} does not fit {gpu.name}: {verdict.reason}")
    return verdict.mode, verdict.peak_vram_gib


def load_pipeline(variant: ModelVariant, config: AppConfig, gpu: GPUClass | None = None) -> "ImagePipeline":
    """Load ``variant`` as configured in ``config.models[variant.id]`` (catalog defaults otherwise).

    Args:
        gpu: the GPU class of the local device; detected from CUDA when None.
    """
    model_cfg = config.models.get(variant.id) or ModelConfig()
    device = resolve_device(config.device.device)
    if device == "cuda" and gpu is None:
        from serve_app.hardware import detect_local_gpu

        local = detect_local_gpu(config.build_catalog())
        gpu = local.gpu_class if local else None
    simulated = device == "cpu" and variant.requires_nunchaku and model_cfg.simulate_without_nunchaku
    if device == "cpu":
        gpu = None
        if variant.requires_nunchaku and not simulated:
            raise IncompatibleHardwareError(f"{variant.id} is a nunchaku 4-bit variant and needs a CUDA GPU")
    elif gpu is not None and (problem := architecture_problem(variant, gpu)):
        # Before any weight is read: a wrong-architecture load would only fail later, slower.
        raise IncompatibleHardwareError(f"{variant.id} cannot run here: {problem}")

    mode, planned_peak = choose_offload_mode(variant, gpu, config.offload_mode_for(variant.id), config)
    dtype_name = model_cfg.torch_dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    source = model_cfg.source or variant.source.local_path or variant.source.hub_repo
    if source is None:
        raise ModelLoadError(f"{variant.id}: no weights source configured")

    started = time.perf_counter()
    use_nunchaku = variant.requires_nunchaku and not simulated
    folder = resolve_source(source, config.hf, skip_transformer=use_nunchaku)
    import diffusers
    import transformers

    # Progress bars only clutter replica logs; load time is logged (and exported) instead.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    pipeline_cls = getattr(diffusers, variant.pipeline)
    kwargs: dict = {"dtype": dtype, "use_safetensors": True, "local_files_only": True}
    if use_nunchaku:
        kwargs["transformer"] = _nunchaku_transformer(variant, model_cfg, config.hf, dtype)
    if variant.pipeline == "QwenImageEditPlusPipeline":
        from serve_app.processors import ImageOnlyQwen2VLProcessor, torchvision_available

        if not torchvision_available():
            kwargs["processor"] = ImageOnlyQwen2VLProcessor.from_checkpoint(folder)
        _apply_edit_image_areas(model_cfg)
    try:
        pipe = pipeline_cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"{variant.id}: loading {folder} failed: {type(err).__name__}: {err}") from err
    if variant.scheduler_overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **variant.scheduler_overrides)
    _apply_offload(pipe, mode, device, nunchaku_transformer=use_nunchaku)
    applied = apply_optimizations(pipe, model_cfg.optimizations)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - started
    logger.info("loaded %s from %s on %s (%s, offload=%s%s) in %.2fs", variant.id, folder, device, dtype_name, mode,
                "".join(f", {a}" for a in applied), load_seconds)
    return ImagePipeline(variant, pipe, device, dtype_name, mode, load_seconds, planned_peak, str(folder))


class _StageTimer:
    """Times the pipeline's text encoding, VAE encode and VAE decode by wrapping those calls."""

    def __init__(self, pipe) -> None:
        self.seconds: dict[str, float] = {}
        self._wrap(pipe, "encode_prompt", "text_encode_s")
        self._wrap(pipe.vae, "encode", "vae_encode_s")
        self._wrap(pipe.vae, "decode", "vae_decode_s")

    def _wrap(self, owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds = {}


class ImagePipeline:
    """One loaded variant. Calls are serialized: diffusers pipelines are not thread-safe."""

    def __init__(self, variant: ModelVariant, pipe, device: str, torch_dtype: str, offload_mode: OffloadMode,
                 load_seconds: float, planned_peak_gib: float | None = None, folder: str | None = None) -> None:
        self.variant = variant
        self.pipe = pipe
        self.device = device
        self.torch_dtype = torch_dtype
        self.offload_mode = offload_mode
        self.load_seconds = load_seconds
        self.planned_peak_gib = planned_peak_gib
        self.folder = folder
        self._lock = threading.Lock()
        self._timer = _StageTimer(pipe)

    def _run(self, call_kwargs: dict, should_stop: Callable[[], bool] | None) -> tuple[list[Image.Image], dict, int]:
        steps_done = 0
        stopped = False

        def on_step_end(pipe, step, timestep, callback_kwargs):
            nonlocal steps_done, stopped
            steps_done = step + 1
            if should_stop is not None and should_stop():
                stopped = True
                pipe._interrupt = True
            return callback_kwargs

        with self._lock:
            self._timer.reset()
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.pipe(**call_kwargs, callback_on_step_end=on_step_end, output_type="pil")
            total = time.perf_counter() - started
            timings = dict(self._timer.seconds)
        if stopped:
            raise GenerationCancelled(f"stopped after {steps_done} of {call_kwargs['num_inference_steps']} steps")
        other = sum(timings.values())
        timings["denoise_s"] = max(total - other, 0.0)
        timings["total_s"] = total
        return list(out.images), timings, steps_done

    def _seeds(self, seed: int | None, n: int) -> list[int]:
        base = secrets.randbelow(MAX_SEED - n) if seed is None else seed
        return [(base + i) % (MAX_SEED + 1) for i in range(n)]

    def _size(self, width: int | None, height: int | None) -> tuple[int, int]:
        return width or self.variant.defaults.width, height or self.variant.defaults.height

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
        should_stop: Callable[[], bool] | None = None,
    ) -> PipelineResult:
        """Text to image; a list of prompts runs as one batched pipeline call.

        Args:
            prompt (`str` or `list[str]`): what to draw; a list batches several requests that share
                every other argument.
            n (`int`): images per prompt; image ``i`` of a prompt uses seed ``seed + i``.
            width, height (`int`, *optional*): output size; the variant's default when None.
            num_inference_steps (`int`, *optional*): denoising steps (variant default).
            guidance_scale (`float`, *optional*): CFG scale; Z-Image-Turbo is distilled for 0.
            negative_prompt (`str`, *optional*): used only when ``guidance_scale > 1``.
            seed (`int` or `list`, *optional*): random when None; one per prompt for a list.
            should_stop (`Callable[[], bool]`, *optional*): polled after every step; True cancels.

        Returns:
            `PipelineResult` with images and seeds in prompt order, ``n`` per prompt.
        """
        if self.variant.task != "generate":
            raise TypeError(f"{self.variant.id} is an edit variant")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = seed if isinstance(seed, list) else [seed] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} seeds")
        d = self.variant.defaults
        width, height = self._size(width, height)
        seeds = [s for one in per_prompt for s in self._seeds(one, n)]
        steps = num_inference_steps or d.num_inference_steps
        negative = negative_prompt if negative_prompt is not None else d.negative_prompt
        call = dict(
            prompt=prompts if len(prompts) > 1 else prompts[0],
            negative_prompt=[negative] * len(prompts) if negative is not None and len(prompts) > 1 else negative,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
            num_images_per_prompt=n,
            # CPU generators make a seed give the same image on any device.
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        )
        images, timings, done = self._run(call, should_stop)
        return PipelineResult(images, seeds, timings, done)

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
        should_stop: Callable[[], bool] | None = None,
    ) -> PipelineResult:
        """Instruction editing of 1 to ``max_input_images`` images.

        Args:
            images (`list[PIL.Image.Image]`): the input images, in the order the prompt names them.
            prompt (`str`): the instruction.
            n (`int`): outputs; each is its own pipeline call (the pipeline takes batch size 1).
            width, height (`int`, *optional*): output size; the variant's default when None.
            true_cfg_scale (`float`, *optional*): CFG runs when > 1 and a negative prompt is given.
            negative_prompt (`str`, *optional*): the variant's default (" ") when None.
            seed, should_stop: as in :meth:`generate`.
        """
        if self.variant.task != "edit":
            raise TypeError(f"{self.variant.id} is a generation variant")
        if not 1 <= len(images) <= self.variant.max_input_images:
            raise ValueError(f"{self.variant.id} takes 1 to {self.variant.max_input_images} input images")
        d = self.variant.defaults
        width, height = self._size(width, height)
        seeds = self._seeds(seed, n)
        steps = num_inference_steps or d.num_inference_steps
        outputs: list[Image.Image] = []
        timings: dict[str, float] = {}
        done = 0
        for s in seeds:
            call = dict(
                image=[img.convert("RGB") for img in images],
                prompt=prompt,
                negative_prompt=negative_prompt if negative_prompt is not None else d.negative_prompt,
                true_cfg_scale=d.true_cfg_scale if true_cfg_scale is None else true_cfg_scale,
                width=width,
                height=height,
                num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(s),
            )
            imgs, t, done = self._run(call, should_stop)
            outputs.extend(imgs)
            for key, value in t.items():
                timings[key] = timings.get(key, 0.0) + value
        return PipelineResult(outputs, seeds, timings, done)
