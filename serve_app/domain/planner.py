"""VRAM planner: will a model variant run on a GPU, in which offload mode, using how much memory and time.

An estimate is a sum of named parts, each from a stated source (``imageserve plan --explain`` prints them):

* weights (catalog): parameters x bytes per parameter, or a quantized file's size, per component;
* activations (traced): each stage's allocations, traced from the real model classes at full size on
  the meta device (``serve_app.engines.memory_trace``) and interpolated between traced shapes;
* what a trace cannot see (fitted): the CUDA context, the caching allocator's reserve over what is
  allocated, and the extra held when every stage stays resident or when model offload swaps modules,
  fitted to published GPU measurements (``serve_app.domain.calibration``);
* or, where a GPU measured exactly this call, that measurement (measured over fitted over traced).

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

from serve_app.domain.calibration import Calibration, Source, default_calibration
from serve_app.domain.catalog import FP4_SMS, GIB, INT4_SMS, ComponentSpec, GPUClass, ModelVariant
from serve_app.domain.shapes import (
    MPIX,
    text_encoder_tokens,
    transformer_tokens,
)

OffloadMode = Literal["none", "model", "sequential"]
OFFLOAD_MODES: tuple[OffloadMode, ...] = ("none", "model", "sequential")
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


class PlannerSettings(BaseModel):
    """Margins, and overrides of the calibrated terms (None: the calibration's fitted value)."""

    cuda_context_gib: float | None = Field(
        default=None, ge=0, description="CUDA context + cuBLAS workspace; None: fitted to measurements.")
    margin_fraction: float = Field(default=0.05, ge=0, lt=1, description="Safety margin as a fraction of VRAM.")
    margin_min_gib: float = Field(default=0.5, ge=0, description="Smallest safety margin in GiB.")
    compute_efficiency: float | None = Field(
        default=None, gt=0, le=2,
        description="Fraction of the catalog's bf16 TFLOPS a transformer forward reaches; None: calibrated "
                    "per architecture and precision.")
    four_bit_speedup: float | None = Field(
        default=None, gt=0, description="nunchaku 4-bit vs bf16 compute speed; None: calibrated per architecture.")
    host_to_device_gbps: float = Field(
        default=25.0, gt=0, description="PCIe weight streaming rate under offload (GB/s).")
    unknown_gpu_tflops: float = Field(default=50.0, gt=0, description="TFLOPS assumed for GPUs without a figure.")
    host_link_efficiency: float = Field(
        default=0.8, gt=0, le=1,
        description="Share of the host link's nominal rate a pinned host-to-GPU copy reaches (about 25 of 31.5 "
                    "GB/s on PCIe 4.0 x16); prices a swap.")
    disk_read_gbps: float = Field(
        default=3.0, gt=0,
        description="Rate a cold start reads weights from disk (GB/s); `python -m bench.load` measures a node's.")
    peer_link_efficiency: float = Field(
        default=0.8, gt=0, le=1,
        description="Share of a GPU-to-GPU link's nominal rate a collective reaches (multi-GPU replicas; the same "
                    "share as host_link_efficiency, unmeasured on the peer links).")
    host_reserve_gib: float = Field(
        default=8.0, ge=0, description="Host RAM a swap group leaves to the OS, Python, Ray and CUDA's host side.")

    def margin_gib(self, vram_gib: float) -> float:
        return max(self.margin_min_gib, self.margin_fraction * vram_gib)


class EstimatePart(BaseModel):
    """One named part of an estimate and where its figure comes from."""

    name: str
    gib: float
    source: Source
    detail: str = ""


class StageEstimate(BaseModel):
    weights_gib: float
    activations_gib: float
    activations_source: Source = "traced"


class VramEstimate(BaseModel):
    """Peak device memory for one request shape in one offload mode, with its parts."""

    mode: OffloadMode
    peak_gib: float
    peak_stage: str
    weights_gib: float = Field(description="Weights resident during the peak stage.")
    activations_gib: float = Field(description="Activations of the peak stage.")
    cuda_context_gib: float
    overhead_gib: float = Field(description="Allocator reserve and mode overhead (fitted).")
    stages: dict[str, StageEstimate]
    parts: list[EstimatePart] = Field(description="What the peak is made of; they add up to it.")
    source: Source = Field(description="'measured' when a GPU measured this very call, else the parts' sum.")


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
    seconds_per_image: float | None = Field(
        default=None, description="Expected seconds for one image in the chosen mode (estimate_seconds), or null.")


def request_shape(variant: ModelVariant, width: int | None, height: int | None,
                  num_input_images: int | None) -> tuple[int, int, int]:
    """A request's output size and input images, the variant's defaults where not given (one input image for
    an edit variant)."""
    if num_input_images is None:
        num_input_images = 1 if "edit" in variant.tasks else 0
    return width or variant.defaults.width, height or variant.defaults.height, num_input_images


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
            what = f"{variant.precision} needs sm_{needed} or newer; {gpu.name} is sm_{sm}"
            if variant.precision == "fp8":
                what += f" ({gpu.architecture} has no fp8 tensor cores)"
            return what
    return None


def _catalog_activations(c: ComponentSpec, tokens: float, mpix: float, images: int) -> float:
    """A component's activations from the catalog's own (est.) figures, for modules never traced."""
    return (c.activation_gib_fixed + c.activation_gib_per_1k_tokens * tokens / 1000
            + c.activation_gib_per_mpix * mpix + c.activation_gib_per_image * images)


def stage_activations(variant: ModelVariant, width: int, height: int, images: int, batch: int,
                      cfg_batch: bool, calibration: Calibration) -> dict[str, tuple[float, Source, str]]:
    """Activation GiB per component role, with the source and what was looked up.

    ``cfg_batch``: the pipeline stacks the unconditional pass into the batch (Z-Image with
    ``guidance_scale > 0``), doubling the transformer's batch. Qwen-Image-Edit runs its CFG pass as a
    second forward after the first, so its peak stays one forward's.
    """
    comps = variant.components
    traced = calibration.traced
    out: dict[str, tuple[float, Source, str]] = {}

    def look_up(role: str, stage, size: float, n: int, catalog_tokens=0.0, catalog_mpix=0.0):
        c = comps[role]
        gib = traced.activations(c.traced_module, stage, size, n)
        if gib is not None:
            unit = "px" if stage.startswith("vae") else "tokens"
            return gib, "traced", f"{c.traced_module} {stage} at {size:,.0f} {unit}, batch {n}"
        return (_catalog_activations(c, catalog_tokens, catalog_mpix, images) * n, "catalog",
                "catalog estimate (no trace for this module)")

    text_tokens = text_encoder_tokens(variant.family, images)
    out["text_encoder"] = look_up("text_encoder", "text_encoder", text_tokens, 1, catalog_tokens=text_tokens)
    tokens = transformer_tokens(width, height, images)
    forward_batch = batch * (2 if cfg_batch else 1)
    out["transformer"] = look_up("transformer", "transformer", tokens, forward_batch, catalog_tokens=tokens)
    if (extra := nunchaku_buffers_gib(variant, tokens * forward_batch)) > 0:
        gib, source, detail = out["transformer"]
        out["transformer"] = (gib + extra, source, f"{detail} (bf16 module), + {extra:.2f} GiB of nunchaku's 4-bit "
                                                   "activation and low-rank buffers (est.)")
    decode = look_up("vae", "vae_decode", width * height, batch, catalog_mpix=width * height / MPIX)
    if images:
        area = variant.family.input_image_side ** 2
        encode = look_up("vae", "vae_encode", area, 1, catalog_mpix=area / MPIX)
        decode = max(decode, encode, key=lambda item: item[0])
    out["vae"] = decode
    return out


def nunchaku_buffers_gib(variant: ModelVariant, tokens: float) -> float:
    """What a nunchaku 4-bit transformer allocates beyond the bf16 module's activations (est.): the widest
    layer's input quantized to 4 bits with its scales (one fp16 per 64 int4 values, one fp8 per 16 fp4),
    and the 16-bit low-rank branch's output (tokens x rank)."""
    t = variant.transformer
    if not t.quantized or not t.widest_linear_features:
        return 0.0
    scale_bytes = 2 / 64 if t.stored_dtype == "int4" else 1 / 16
    rank = variant.svdq_rank or 0
    return tokens * (t.widest_linear_features * (0.5 + scale_bytes) + rank * 2) / GIB


def _cfg_batches(variant: ModelVariant, cfg: bool | None) -> bool:
    runs_cfg = variant.runs_cfg() if cfg is None else cfg
    return runs_cfg and variant.family.cfg_in_batch


def estimate_vram(
    variant: ModelVariant,
    mode: OffloadMode,
    width: int,
    height: int,
    num_input_images: int = 0,
    torch_dtype: str = "bfloat16",
    settings: PlannerSettings | None = None,
    batch_size: int = 1,
    cfg: bool | None = None,
    calibration: Calibration | None = None,
) -> VramEstimate:
    """Peak per-process VRAM in GiB (as NVML counts it) for one pipeline call of this shape in this mode.

    Args:
        batch_size: images in one call (batched generation): it multiplies activations, not weights.
        cfg: whether the request runs classifier-free guidance (None: the variant's defaults do or not).
        calibration: traced and fitted terms (the built-in calibration when None).
    """
    settings = settings or PlannerSettings()
    calibration = calibration or default_calibration()
    fit = calibration.memory
    dtype = DTYPE_SHORT[torch_dtype]
    activations = stage_activations(variant, width, height, num_input_images, batch_size,
                                    _cfg_batches(variant, cfg), calibration)
    all_weights = sum(c.weight_bytes(dtype) for c in variant.components.values()) / GIB
    stages: dict[str, StageEstimate] = {}
    for role, comp in variant.components.items():
        if mode == "none":
            resident = all_weights
        elif mode == "model":
            resident = comp.weight_bytes(dtype) / GIB
        else:
            resident = comp.streamed_bytes(dtype) / GIB
        gib, source, _ = activations[role]
        stages[role] = StageEstimate(weights_gib=resident, activations_gib=gib, activations_source=source)
    peak_stage = max(stages, key=lambda r: stages[r].weights_gib + stages[r].activations_gib)
    stage = stages[peak_stage]
    context = fit.cuda_context_gib.value if settings.cuda_context_gib is None else settings.cuda_context_gib
    context_source: Source = "fitted" if settings.cuda_context_gib is None else "catalog"
    reserve = fit.reserve_fraction.value * stage.activations_gib
    mode_terms = {"none": fit.resident_overhead_gib, "model": fit.model_offload_overhead_gib}
    mode_overhead = mode_terms[mode].value if mode in mode_terms else 0.0
    weights_detail = {"none": "every component resident", "model": f"{peak_stage} alone (model offload)",
                      "sequential": f"one block or module of the {peak_stage} (sequential offload)"}[mode]
    parts = [
        EstimatePart(name="weights", gib=stage.weights_gib, source="catalog", detail=weights_detail),
        EstimatePart(name=f"{peak_stage} activations", gib=stage.activations_gib, source=stage.activations_source,
                     detail=activations[peak_stage][2]),
        EstimatePart(name="allocator reserve", gib=reserve, source="fitted",
                     detail=f"{fit.reserve_fraction.value:.2f} x the peak stage's activations"),
        EstimatePart(name="CUDA context", gib=context, source=context_source, detail=fit.cuda_context_gib.description),
    ]
    if mode_overhead:
        parts.append(EstimatePart(name=f"{mode} mode overhead", gib=mode_overhead, source="fitted",
                                  detail=mode_terms[mode].description))
    peak = sum(part.gib for part in parts)
    source: Source = "traced"
    measured = (calibration.measured_peak(variant.id, mode, width, height, num_input_images, batch_size)
                if cfg is None else None)
    if measured is not None:
        parts.append(EstimatePart(name="measured on a GPU", gib=measured.gib - peak, source="measured",
                                  detail=f"{measured.id}: {measured.gib} GiB on {measured.gpu} ({measured.source}); "
                                         "this line takes the sum to it"))
        peak, source = measured.gib, "measured"
    return VramEstimate(
        mode=mode,
        peak_gib=round(peak, 2),
        peak_stage=peak_stage,
        weights_gib=round(stage.weights_gib, 2),
        activations_gib=round(stage.activations_gib, 2),
        cuda_context_gib=round(context, 2),
        overhead_gib=round(reserve + mode_overhead, 2),
        stages=stages,
        parts=[part.model_copy(update={"gib": round(part.gib, 3)}) for part in parts],
        source=source,
    )


def mode_problem(variant: ModelVariant, mode: OffloadMode, gpu: GPUClass | None = None) -> str | None:
    """Why an offload mode cannot be used with this variant (on this GPU) at all, or None."""
    if mode != "none" and gpu is not None and gpu.unified_memory:
        return f"{gpu.name} shares one memory with the CPU: offloading to the host frees nothing"
    if mode == "sequential" and not variant.transformer.per_block_offload:
        if variant.requires_nunchaku:
            return f"{variant.id}: the nunchaku {variant.base_model} transformer has no per-block offload"
        return f"{variant.id}: sequential offload is off for this variant (per_block_offload: false in the catalog)"
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
    calibration: Calibration | None = None,
    cfg: bool | None = None,
) -> Plan:
    """Decide whether ``variant`` fits ``gpu`` for a request shape, and in which offload mode.

    Args:
        width, height: output size in pixels (the variant's default when None).
        num_input_images: input images of an edit request (1 for edit variants when None).
        modes: offload modes allowed, tried fastest first; pass one mode to force it.
        batch_size: images per pipeline call (a generation deployment's ``max_batch_size``).
        calibration: traced and fitted terms (the built-in calibration when None).
        cfg: whether the request runs classifier-free guidance (None: the variant's defaults do or not).
    """
    settings = settings or PlannerSettings()
    calibration = calibration or default_calibration()
    width, height, num_input_images = request_shape(variant, width, height, num_input_images)
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
        if (why := mode_problem(variant, mode, gpu)) is not None:
            mode_reasons[mode] = why
            continue
        est = estimate_vram(variant, mode, width, height, num_input_images, torch_dtype, settings, batch_size,
                            cfg=cfg, calibration=calibration)
        estimates[mode] = est
        if est.peak_gib <= usable:
            seconds = estimate_seconds(variant, gpu, mode, width, height, num_input_images, settings=settings,
                                       calibration=calibration).total_s
            return Plan(
                fits=True, mode=mode, peak_vram_gib=est.peak_gib, reason=None,
                estimates=estimates, mode_reasons=mode_reasons, seconds_per_image=seconds, **base,
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
    other_s: float = Field(description="Text encoding, VAE and the pipeline around them.")
    offload_s: float = Field(description="Moving weights host to device under offload.")
    forward_tflop: float
    forwards: int
    efficiency: float = Field(description="Fraction of the catalog's bf16 TFLOPS a forward reaches.")
    efficiency_source: str
    four_bit_speedup: float = 1.0


def four_bit_speedup(gpu: GPUClass, calibration: Calibration) -> tuple[float, str]:
    """nunchaku 4-bit vs bf16 compute speed on ``gpu``: per sm (A100's sm_80 apart), else per architecture."""
    terms = calibration.timing.four_bit_speedup
    term = terms.get(f"sm_{gpu.sm}") or terms.get(gpu.architecture) or terms["default"]
    return term.value, term.description


def estimate_seconds(
    variant: ModelVariant,
    gpu: GPUClass,
    mode: OffloadMode = "none",
    width: int | None = None,
    height: int | None = None,
    num_input_images: int | None = None,
    num_inference_steps: int | None = None,
    settings: PlannerSettings | None = None,
    calibration: Calibration | None = None,
) -> SecondsEstimate:
    """Expected seconds per image: transformer FLOPs at the calibrated fraction of peak for the GPU's
    architecture and precision, plus the fitted time around the denoising, plus offload traffic.

    The router starts from this and then trusts measured latency per GPU pool.
    """
    settings = settings or PlannerSettings()
    calibration = calibration or default_calibration()
    timing = calibration.timing
    width, height, num_input_images = request_shape(variant, width, height, num_input_images)
    steps = num_inference_steps or variant.defaults.num_inference_steps
    t = variant.transformer
    tokens = transformer_tokens(width, height, num_input_images)
    forward_flop = t.flops_per_token * tokens + t.attention_flops_per_token_sq * tokens**2
    forwards = steps * (2 if variant.runs_cfg() else 1)
    tflops = gpu.bf16_tflops or settings.unknown_gpu_tflops
    efficiency, efficiency_source = timing.efficiency_for(gpu.architecture, "bf16", t.traced_module)
    if settings.compute_efficiency is not None:
        efficiency, efficiency_source = settings.compute_efficiency, "planner settings"
    speedup = 1.0
    if t.quantized:
        speedup = (four_bit_speedup(gpu, calibration)[0] if settings.four_bit_speedup is None
                   else settings.four_bit_speedup)
    denoise = forwards * forward_flop / (tflops * 1e12 * efficiency * speedup)
    mpix = width * height / MPIX + num_input_images
    other = timing.other_seconds_per_mpix.value * mpix
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
        efficiency=efficiency, efficiency_source=efficiency_source, four_bit_speedup=speedup,
    )


def plan_table(
    variants: list[ModelVariant],
    gpus: list[GPUClass],
    width: int | None = None,
    height: int | None = None,
    num_input_images: int | None = None,
    modes: tuple[OffloadMode, ...] = OFFLOAD_MODES,
    settings: PlannerSettings | None = None,
    calibration: Calibration | None = None,
) -> list[Plan]:
    """Every GPU x variant verdict, GPU-major, in catalog order."""
    return [plan(v, g, width, height, num_input_images, modes=modes, settings=settings, calibration=calibration)
            for g in gpus for v in variants]
