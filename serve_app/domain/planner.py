"""VRAM planner: will a model variant run on a GPU, in which offload mode, using how much memory.

The estimate is built from visible parts so a measured figure can correct any one of them:

* weights: parameters x bytes per parameter (or the quantized file size), per component;
* activations: per stage (text encoding, denoising, VAE), from sequence tokens and megapixels;
* CUDA context and, under sequential offload, the streaming buffers.

Offload modes, fastest first:

* ``none``: every component resident; peak = all weights + the largest stage's activations.
* ``model`` (``enable_model_cpu_offload``): one component resident at a time; peak = the
  heaviest stage's weights + activations.
* ``sequential`` (``enable_sequential_cpu_offload``, or nunchaku per-block offload for its
  transformer): one block or module at a time; slow, streams the weights every step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serve_app.domain.catalog import FP4_SMS, GIB, INT4_SMS, ComponentSpec, GPUClass, ModelVariant

OffloadMode = Literal["none", "model", "sequential"]
OFFLOAD_MODES: tuple[OffloadMode, ...] = ("none", "model", "sequential")
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}

# Tokens the planner assumes for a prompt after the chat template (est.).
TEXT_TOKENS = 256
# QwenImageEditPlusPipeline re-encodes every input image at ~1024^2 area for the VAE
# (4096 latent tokens) and at ~384^2 area for the vision encoder (~188 merged tokens).
EDIT_VAE_IMAGE_AREA = 1024 * 1024
EDIT_CONDITION_TOKENS_PER_IMAGE = 188
# Latent pixels per token: 8x VAE downsampling and 2x2 patches.
PIXELS_PER_TOKEN = 16 * 16
MPIX = 1024 * 1024


class PlannerSettings(BaseModel):
    cuda_context_gib: float = Field(default=0.75, ge=0, description="CUDA context + cuBLAS workspace (est.).")
    sequential_buffer_gib: float = Field(
        default=1.0, ge=0, description="Pinned/streaming buffers under sequential offload (est.).")
    margin_fraction: float = Field(default=0.05, ge=0, lt=1, description="Safety margin as a fraction of VRAM.")
    margin_min_gib: float = Field(default=0.5, ge=0, description="Smallest safety margin in GiB.")
    compute_efficiency: float = Field(
        default=0.4, gt=0, le=1,
        description="Fraction of peak bf16 TFLOPS a transformer forward reaches "
                    "(est.; published H100/H200 runs: 0.3-0.57).",
    )
    four_bit_speedup: float = Field(
        default=2.0, gt=0, description="nunchaku 4-bit vs bf16 compute speed (est.; 1 on A100).")
    host_to_device_gbps: float = Field(
        default=25.0, gt=0, description="PCIe weight streaming rate under offload (GB/s).")
    text_and_vae_seconds_at_100_tflops: float = Field(
        default=0.3, ge=0, description="Text encoding + VAE work per 1024^2 image at 100 TFLOPS (est.)."
    )
    unknown_gpu_tflops: float = Field(default=50.0, gt=0, description="TFLOPS assumed for GPUs without a figure.")

    def margin_gib(self, vram_gib: float) -> float:
        return max(self.margin_min_gib, self.margin_fraction * vram_gib)


class StageEstimate(BaseModel):
    weights_gib: float
    activations_gib: float


class VramEstimate(BaseModel):
    """Peak device memory for one request shape in one offload mode, with its parts."""

    mode: OffloadMode
    peak_gib: float
    peak_stage: str
    weights_gib: float = Field(description="Weights resident during the peak stage.")
    activations_gib: float = Field(description="Activations of the peak stage.")
    cuda_context_gib: float
    offload_buffer_gib: float
    stages: dict[str, StageEstimate]


class Plan(BaseModel):
    """The planner's verdict for one (variant, GPU, request shape)."""

    gpu: str
    variant: str
    fits: bool
    mode: OffloadMode | None = Field(description="Fastest offload mode that fits, or null.")
    peak_vram_gib: float | None = Field(description="Estimated peak in the chosen mode (or the lightest mode tried).")
    usable_vram_gib: float
    reason: str | None = Field(description="Why it does not fit, or null.")
    width: int
    height: int
    num_input_images: int
    estimates: dict[str, VramEstimate] = Field(default_factory=dict)
    mode_reasons: dict[str, str] = Field(default_factory=dict, description="Why each rejected mode was rejected.")


def _sms_text(sms: list[int]) -> str:
    return "sm_" + "/".join(str(s) for s in sms)


def architecture_problem(variant: ModelVariant, gpu: GPUClass) -> str | None:
    """Why ``variant`` cannot run on ``gpu``'s architecture at all, or None."""
    sm = gpu.sm
    if variant.compute_capabilities is not None:
        allowed = sorted({int(c.replace(".", "")) for c in variant.compute_capabilities})
        if sm not in allowed:
            what = f"{variant.precision} needs {_sms_text(allowed)}; {gpu.name} is sm_{sm}"
            if variant.precision == "fp4" and sm in INT4_SMS:
                what += " (it runs the int4 variants)"
            elif variant.precision == "int4" and sm in FP4_SMS:
                what += " (it runs the fp4 variants)"
            elif variant.requires_nunchaku and sm not in INT4_SMS + FP4_SMS:
                what += f" ({gpu.architecture} has no 4-bit tensor cores nunchaku can use)"
            return what
    if variant.min_compute_capability is not None:
        needed = int(variant.min_compute_capability.replace(".", ""))
        if sm < needed:
            return f"{variant.precision} needs sm_{needed} or newer; {gpu.name} is sm_{sm}"
    return None


def _stage_activations(variant: ModelVariant, width: int, height: int, images: int) -> dict[str, float]:
    comps = variant.components
    out_tokens = (width * height) / PIXELS_PER_TOKEN
    cond_tokens = images * (EDIT_VAE_IMAGE_AREA / PIXELS_PER_TOKEN)
    text_tokens = TEXT_TOKENS + images * EDIT_CONDITION_TOKENS_PER_IMAGE

    def act(c: ComponentSpec, tokens: float = 0.0, mpix: float = 0.0) -> float:
        return (
            c.activation_gib_fixed
            + c.activation_gib_per_1k_tokens * tokens / 1000
            + c.activation_gib_per_mpix * mpix
            + c.activation_gib_per_image * images
        )

    # The VAE encodes each input image (one at a time) and decodes the output: the larger wins.
    vae_mpix = max(width * height / MPIX, EDIT_VAE_IMAGE_AREA / MPIX if images else 0.0)
    return {
        "text_encoder": act(comps["text_encoder"], tokens=text_tokens),
        "transformer": act(comps["transformer"], tokens=out_tokens + cond_tokens + TEXT_TOKENS),
        "vae": act(comps["vae"], mpix=vae_mpix),
    }


def estimate_vram(
    variant: ModelVariant,
    mode: OffloadMode,
    width: int,
    height: int,
    num_input_images: int = 0,
    torch_dtype: str = "bfloat16",
    settings: PlannerSettings | None = None,
    batch_size: int = 1,
) -> VramEstimate:
    """Peak VRAM in GiB for one pipeline call of this shape in this offload mode.

    ``batch_size`` images in one call (batched generation) multiply the activations, not the weights.
    """
    settings = settings or PlannerSettings()
    dtype = DTYPE_SHORT[torch_dtype]
    activations = {role: gib * batch_size
                   for role, gib in _stage_activations(variant, width, height, num_input_images).items()}
    all_weights = sum(c.weight_bytes(dtype) for c in variant.components.values()) / GIB
    stages: dict[str, StageEstimate] = {}
    for role, comp in variant.components.items():
        if mode == "none":
            resident = all_weights
        elif mode == "model":
            resident = comp.weight_bytes(dtype) / GIB
        else:
            resident = comp.streamed_bytes(dtype) / GIB
        stages[role] = StageEstimate(weights_gib=resident, activations_gib=activations[role])
    peak_stage = max(stages, key=lambda r: stages[r].weights_gib + stages[r].activations_gib)
    buffer = settings.sequential_buffer_gib if mode == "sequential" else 0.0
    peak = stages[peak_stage].weights_gib + stages[peak_stage].activations_gib + settings.cuda_context_gib + buffer
    return VramEstimate(
        mode=mode,
        peak_gib=round(peak, 2),
        peak_stage=peak_stage,
        weights_gib=round(stages[peak_stage].weights_gib, 2),
        activations_gib=round(stages[peak_stage].activations_gib, 2),
        cuda_context_gib=settings.cuda_context_gib,
        offload_buffer_gib=buffer,
        stages=stages,
    )


def mode_problem(variant: ModelVariant, mode: OffloadMode) -> str | None:
    """Why an offload mode cannot be used with this variant at all, or None."""
    if mode == "sequential" and not variant.transformer.per_block_offload:
        return f"{variant.id}: the nunchaku {variant.base_model} transformer has no per-block offload"
    return None


def plan(
    variant: ModelVariant,
    gpu: GPUClass,
    width: int | None = None,
    height: int | None = None,
    num_input_images: int | None = None,
    modes: tuple[OffloadMode, ...] = OFFLOAD_MODES,
    torch_dtype: str = "bfloat16",
    settings: PlannerSettings | None = None,
    batch_size: int = 1,
) -> Plan:
    """Decide whether ``variant`` fits ``gpu`` for a request shape, and in which offload mode.

    Args:
        width, height: output size in pixels (the variant's default when None).
        num_input_images: input images of an edit request (1 for edit variants when None).
        modes: offload modes allowed, tried fastest first; pass one mode to force it.
        batch_size: images per pipeline call (a generation deployment's ``max_batch_size``).
    """
    settings = settings or PlannerSettings()
    width = width or variant.defaults.width
    height = height or variant.defaults.height
    if num_input_images is None:
        num_input_images = 1 if variant.task == "edit" else 0
    usable = round(gpu.vram_gib - settings.margin_gib(gpu.vram_gib), 2)
    base = dict(
        gpu=gpu.id, variant=variant.id, usable_vram_gib=usable, width=width, height=height,
        num_input_images=num_input_images,
    )

    problem = architecture_problem(variant, gpu)
    if problem is None and num_input_images > variant.max_input_images:
        problem = f"{variant.id} takes at most {variant.max_input_images} input images"
    if problem is not None:
        return Plan(fits=False, mode=None, peak_vram_gib=None, reason=problem, **base)

    estimates: dict[str, VramEstimate] = {}
    mode_reasons: dict[str, str] = {}
    for mode in modes:
        if (why := mode_problem(variant, mode)) is not None:
            mode_reasons[mode] = why
            continue
        est = estimate_vram(variant, mode, width, height, num_input_images, torch_dtype, settings, batch_size)
        estimates[mode] = est
        if est.peak_gib <= usable:
            return Plan(
                fits=True, mode=mode, peak_vram_gib=est.peak_gib, reason=None,
                estimates=estimates, mode_reasons=mode_reasons, **base,
            )
        mode_reasons[mode] = f"needs ~{est.peak_gib:.1f} GiB, {gpu.name} has {usable:.1f} GiB usable"

    lightest = min(estimates.values(), key=lambda e: e.peak_gib, default=None)
    if lightest is None:
        reason = "; ".join(mode_reasons.values())
    else:
        reason = (
            f"needs ~{lightest.peak_gib:.1f} GiB even with {lightest.mode} offload; "
            f"{gpu.name} has {gpu.vram_gib:g} GiB ({usable:.1f} usable)"
        )
    return Plan(
        fits=False, mode=None, peak_vram_gib=lightest.peak_gib if lightest else None, reason=reason,
        estimates=estimates, mode_reasons=mode_reasons, **base,
    )


class SecondsEstimate(BaseModel):
    """Seconds for one image of a request shape on one GPU class, with its parts."""

    total_s: float
    denoise_s: float
    other_s: float = Field(description="Text encoding and VAE.")
    offload_s: float = Field(description="Moving weights host to device under offload.")
    forward_tflop: float
    forwards: int


def transformer_tokens(width: int, height: int, num_input_images: int) -> float:
    return width * height / PIXELS_PER_TOKEN + num_input_images * EDIT_VAE_IMAGE_AREA / PIXELS_PER_TOKEN + TEXT_TOKENS


def estimate_seconds(
    variant: ModelVariant,
    gpu: GPUClass,
    mode: OffloadMode = "none",
    width: int | None = None,
    height: int | None = None,
    num_input_images: int | None = None,
    num_inference_steps: int | None = None,
    settings: PlannerSettings | None = None,
) -> SecondsEstimate:
    """Expected seconds per image: transformer FLOPs at a fraction of peak, plus text/VAE, plus offload traffic.

    The router starts from this and then trusts measured latency per GPU pool.
    """
    settings = settings or PlannerSettings()
    width = width or variant.defaults.width
    height = height or variant.defaults.height
    if num_input_images is None:
        num_input_images = 1 if variant.task == "edit" else 0
    steps = num_inference_steps or variant.defaults.num_inference_steps
    t = variant.transformer
    tokens = transformer_tokens(width, height, num_input_images)
    forward_flop = t.flops_per_token * tokens + t.attention_flops_per_token_sq * tokens**2
    forwards = steps * (2 if variant.runs_cfg() else 1)
    tflops = gpu.bf16_tflops or settings.unknown_gpu_tflops
    speed = tflops * 1e12 * settings.compute_efficiency
    if t.quantized and gpu.sm != 80:  # nunchaku on A100: memory savings, no speed gain (nunchaku#701)
        speed *= settings.four_bit_speedup
    denoise = forwards * forward_flop / speed
    mpix = width * height / MPIX + num_input_images
    other = settings.text_and_vae_seconds_at_100_tflops * mpix * 100 / tflops
    weights = {role: c.weight_bytes("bf16") for role, c in variant.components.items()}
    if mode == "model":
        offload = sum(weights.values()) / (settings.host_to_device_gbps * 1e9)
    elif mode == "sequential":
        streamed = weights["transformer"] * forwards + weights["text_encoder"] + weights["vae"]
        offload = streamed / (settings.host_to_device_gbps * 1e9)
    else:
        offload = 0.0
    return SecondsEstimate(
        total_s=round(denoise + other + offload, 3), denoise_s=round(denoise, 3), other_s=round(other, 3),
        offload_s=round(offload, 3), forward_tflop=round(forward_flop / 1e12, 1), forwards=forwards,
    )


def plan_table(
    variants: list[ModelVariant],
    gpus: list[GPUClass],
    width: int | None = None,
    height: int | None = None,
    num_input_images: int | None = None,
    modes: tuple[OffloadMode, ...] = OFFLOAD_MODES,
    settings: PlannerSettings | None = None,
) -> list[Plan]:
    """Every GPU x variant verdict, GPU-major, in catalog order."""
    return [
        plan(v, g, width, height, num_input_images, modes=modes, settings=settings) for g in gpus for v in variants
    ]
